//! `chronicle completions SHELL` and `chronicle man`: shell completion
//! scripts and manual pages, generated from the command line's own
//! definition, so they always match the binary. Neither needs a database.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use serde_json::json;

use crate::Cli;
use crate::output::{OutputFormat, write_json_lines, write_lines, write_record, write_text};

/// The command line's definition, as the completions and pages describe it.
fn command() -> clap::Command {
    Cli::command()
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut cmd = command();
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    // Into memory first: clap_complete panics when its writer fails.
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    script
}

/// Runs `chronicle completions SHELL`: the script on standard output (in
/// `--output json`, one object with the shell and the script).
pub fn completions(shell: Shell, format: OutputFormat) -> Result<()> {
    let script = completion_script(shell);
    match format {
        OutputFormat::Table => write_text(&script)?,
        OutputFormat::Json => write_record(
            &json!({
                "shell": shell.to_string(),
                "script": String::from_utf8_lossy(&script),
            }),
            format,
        )?,
    }
    Ok(())
}

/// A manual page for `cmd` (`chronicle` or one of its subcommands, named
/// `chronicle-read-all` and so on).
fn page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd)
        .manual("Chronicle Manual")
        .source(format!("chronicle {}", env!("CARGO_PKG_VERSION")))
}

/// The manual page of `chronicle` itself, in roff.
pub fn man_page() -> Result<Vec<u8>> {
    let mut roff = Vec::new();
    page(command()).render(&mut roff)?;
    Ok(roff)
}

/// Every page: `chronicle.1` and one per subcommand (`chronicle-read-all.1`),
/// as (file name, roff). The help subcommand has none.
pub fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        let man = page(cmd.clone());
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        pages.push((man.get_filename(), roff));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub.clone(), pages)?;
        }
        Ok(())
    }
    let mut cmd = command().disable_help_subcommand(true);
    // Gives each subcommand its display name (`chronicle-read-all`).
    cmd.build();
    let mut pages = Vec::new();
    walk(cmd, &mut pages)?;
    Ok(pages)
}

/// Runs `chronicle man`: without `out_dir`, the page of `chronicle` on
/// standard output (in `--output json`, one object with the page); with
/// it, every page written there, one line (or JSON object) per file.
pub fn man(out_dir: Option<&Path>, format: OutputFormat) -> Result<()> {
    let Some(dir) = out_dir else {
        let roff = man_page()?;
        match format {
            OutputFormat::Table => write_text(&roff)?,
            OutputFormat::Json => write_record(
                &json!({ "page": "chronicle.1", "roff": String::from_utf8_lossy(&roff) }),
                format,
            )?,
        }
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written: Vec<PathBuf> = Vec::new();
    for (name, roff) in man_pages()? {
        let path = dir.join(&name);
        std::fs::write(&path, roff).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    match format {
        OutputFormat::Table => write_lines(written.iter().map(|p| p.display()))?,
        OutputFormat::Json => write_json_lines(written.iter().map(|p| {
            json!({
                "page": p.file_name().map(|n| n.to_string_lossy()),
                "path": p,
            })
        }))?,
    }
    crate::ui::note!(
        "{} manual page(s) written to {}; read one with `man -l {}`",
        written.len(),
        dir.display(),
        dir.join("chronicle.1").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_a_page() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for name in [
            "chronicle.1",
            "chronicle-read-all.1",
            "chronicle-completions.1",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            assert!(script.contains("projections"), "{shell}");
        }
    }
}
