//! What a command says besides its results, the same way on every command:
//! `--quiet` and `--verbose`, logging, progress bars and informational
//! lines on standard error.
//!
//! Results go to standard output through [`crate::output`]; everything here
//! goes to standard error, which never fails a command: a closed or full
//! standard error loses these lines, nothing else.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use crate::output::OutputFormat;

/// How much a command says on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verbosity {
    /// `--quiet`: errors and warnings only; no progress bars, no
    /// informational lines; logging at `error`.
    Quiet,
    /// The default: progress bars on a terminal, informational lines;
    /// logging at `warn`.
    #[default]
    Normal,
    /// `-v` (logging at `info`), `-vv` (`debug`), `-vvv` and more (`trace`).
    Verbose(u8),
}

impl Verbosity {
    /// From the global flags: `quiet` wins over a verbose count of 0 (clap
    /// refuses both together).
    pub fn from_flags(quiet: bool, verbose: u8) -> Self {
        match (quiet, verbose) {
            (true, _) => Verbosity::Quiet,
            (false, 0) => Verbosity::Normal,
            (false, n) => Verbosity::Verbose(n),
        }
    }

    /// The log filter the flags ask for, when `CHRONICLE_LOG` is not set.
    pub fn log_level(self) -> &'static str {
        match self {
            Verbosity::Quiet => "error",
            Verbosity::Normal => "warn",
            Verbosity::Verbose(1) => "info",
            Verbosity::Verbose(2) => "debug",
            Verbosity::Verbose(_) => "trace",
        }
    }
}

/// How log lines are written to standard error (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people: time, level, target, message and
    /// fields; coloured only on a terminal without `NO_COLOR`.
    #[default]
    Text,
    /// One JSON object per line for log shippers: `timestamp`, `level`,
    /// `target`, `fields` (with `message`) and the enclosing `spans`; never
    /// coloured.
    Json,
}

static VERBOSITY: OnceLock<Verbosity> = OnceLock::new();

/// This process's verbosity: what [`init`] set, else [`Verbosity::Normal`].
pub fn verbosity() -> Verbosity {
    VERBOSITY.get().copied().unwrap_or_default()
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    verbosity() == Verbosity::Quiet
}

/// Whether standard error gets colours: only on a terminal, and never when
/// `NO_COLOR` is set to anything but the empty string (no-color.org).
pub fn stderr_colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets this process's verbosity and starts logging to standard error.
///
/// The log filter is `CHRONICLE_LOG` when it is set (it wins over
/// `--quiet` and `-v`, so one module can be traced under any flags), else
/// the flags' level ([`Verbosity::log_level`]). A `CHRONICLE_LOG` that is
/// not a log filter is refused: the error names it and says why. Text
/// lines carry ANSI colours only when [`stderr_colours`] says so; JSON lines
/// never do. Called once, by [`crate::run`]; later calls change nothing.
pub fn init(verbosity: Verbosity, format: LogFormat) -> Result<(), String> {
    let level = verbosity.log_level();
    let filter = match std::env::var("CHRONICLE_LOG") {
        Ok(spec) if !spec.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&spec)
            .map_err(|e| {
                format!(
                    "CHRONICLE_LOG={spec:?} is not a log filter ({e}); give a level such as \
                     `debug` or directives such as `chronicle_projections=trace`, or unset it"
                )
            })?,
        _ => tracing_subscriber::EnvFilter::new(level),
    };
    if VERBOSITY.set(verbosity).is_err() {
        return Ok(());
    }
    // A second subscriber (an application that set its own before calling
    // `run`) keeps the first.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // It would report a failed write to standard error on standard
        // error, with a panicking `eprintln!`.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(stderr_colours()).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    Ok(())
}

/// Writes one line to standard error, whatever the verbosity. For
/// warnings, problems found and prompts; a failed write is ignored.
pub fn write_notice(line: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Writes a question to standard error without ending the line, for the
/// answer to follow on it; a failed write is ignored.
pub fn prompt(question: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{question} ");
    let _ = err.flush();
}

/// Writes one informational line to standard error (what happened, what to
/// run next), unless `--quiet`; a failed write is ignored.
pub fn write_note(line: fmt::Arguments<'_>) {
    if !quiet() {
        write_notice(line);
    }
}

/// An informational line on standard error, as `format!` takes it; nothing
/// under `--quiet`. See [`write_note`].
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::ui::write_note(format_args!($($arg)*))
    };
}

/// A line on standard error that `--quiet` keeps (warnings, problems), as
/// `format!` takes it. See [`write_notice`].
macro_rules! notice {
    ($($arg:tt)*) => {
        $crate::ui::write_notice(format_args!($($arg)*))
    };
}

pub(crate) use {note, notice};

/// Whether a progress bar is drawn: standard error is a terminal, and
/// neither `--quiet` nor `--output json` was given.
pub fn shows_progress(format: OutputFormat) -> bool {
    format == OutputFormat::Table && !quiet() && std::io::stderr().is_terminal()
}

/// A progress bar on standard error, or a hidden one when
/// [`shows_progress`] is false. `len` is the total (`None`: a spinner);
/// `template` is an indicatif template (a bad one falls back to the
/// default style). Every progress bar of the CLI comes from here.
pub fn progress(format: OutputFormat, len: Option<u64>, template: &str) -> indicatif::ProgressBar {
    if !shows_progress(format) {
        return indicatif::ProgressBar::hidden();
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
    let fallback = if len.is_some() {
        indicatif::ProgressStyle::default_bar()
    } else {
        indicatif::ProgressStyle::default_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .map(|style| style.progress_chars("=> "))
            .unwrap_or(fallback),
    );
    bar
}

/// A spinner with a message, on standard error: [`progress`] with no total.
pub fn spinner(format: OutputFormat) -> indicatif::ProgressBar {
    progress(format, None, "{spinner} {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_log_levels() {
        assert_eq!(Verbosity::from_flags(true, 0).log_level(), "error");
        assert_eq!(Verbosity::from_flags(false, 0).log_level(), "warn");
        assert_eq!(Verbosity::from_flags(false, 1).log_level(), "info");
        assert_eq!(Verbosity::from_flags(false, 2).log_level(), "debug");
        assert_eq!(Verbosity::from_flags(false, 7).log_level(), "trace");
    }

    #[test]
    fn bars_are_hidden_for_json() {
        assert!(!shows_progress(OutputFormat::Json));
        assert!(progress(OutputFormat::Json, Some(10), "{bar}").is_hidden());
    }
}
