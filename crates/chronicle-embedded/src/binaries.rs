//! Finding the PostgreSQL server binaries installed on the machine.

use std::collections::HashSet;
use std::env;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{EmbeddedError, Result};

/// The environment variable that names the folder of the server binaries.
pub const PG_BIN_ENV: &str = "CHRONICLE_PG_BIN";

/// Folders that hold one PostgreSQL installation per version, and the
/// sub-folder of each version that holds its binaries.
const VERSIONED: &[(&str, &str, &str)] = &[
    // Debian and Ubuntu: /usr/lib/postgresql/15/bin
    ("/usr/lib/postgresql", "", "bin"),
    // Red Hat (PGDG packages): /usr/pgsql-15/bin
    ("/usr", "pgsql-", "bin"),
    // Homebrew: /opt/homebrew/opt/postgresql@16/bin
    ("/opt/homebrew/opt", "postgresql@", "bin"),
    ("/usr/local/opt", "postgresql@", "bin"),
];

/// A folder with `initdb`, `pg_ctl` and `postgres`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, if all three are there.
    pub fn in_dir(dir: &Path) -> Option<Binaries> {
        missing_in(dir).is_none().then(|| Binaries {
            dir: dir.to_path_buf(),
        })
    }

    pub fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }

    pub fn pg_ctl(&self) -> PathBuf {
        self.dir.join("pg_ctl")
    }

    /// The major version, as PostgreSQL writes it in `PG_VERSION` (`15`,
    /// or `9.6` before version 10).
    pub fn major_version(&self) -> Result<String> {
        let pg_ctl = self.pg_ctl();
        let output = Command::new(&pg_ctl)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| EmbeddedError::Command {
                program: pg_ctl.clone(),
                action: "report its version",
                status: e.to_string(),
                output: String::new(),
                hint: "check the PostgreSQL installation, or set CHRONICLE_PG_BIN",
            })?;
        let text = String::from_utf8_lossy(&output.stdout);
        parse_major_version(&text).ok_or_else(|| EmbeddedError::Command {
            program: pg_ctl,
            action: "report its version",
            status: output.status.to_string(),
            output: text.trim().to_owned(),
            hint: "check the PostgreSQL installation, or set CHRONICLE_PG_BIN",
        })
    }
}

/// The major version in `pg_ctl (PostgreSQL) 15.10 (Debian 15.10-0+deb12u1)`.
pub(crate) fn parse_major_version(text: &str) -> Option<String> {
    let version = text.split(')').nth(1)?.split_whitespace().next()?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    if major >= 10 {
        Some(major.to_string())
    } else {
        let minor: u32 = parts.next()?.parse().ok()?;
        Some(format!("{major}.{minor}"))
    }
}

fn missing_in(dir: &Path) -> Option<&'static str> {
    ["initdb", "pg_ctl", "postgres"]
        .into_iter()
        .find(|name| !is_executable(&dir.join(name)))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the binaries: `CHRONICLE_PG_BIN`, else `pg_config --bindir`, else
/// `initdb` on `PATH`, else the highest version in the versioned folders
/// distributions install into. For an existing cluster (`want` is the
/// major version in its `PG_VERSION`), the first of those of that version.
pub(crate) fn find(want: Option<&str>, data_dir: &Path) -> Result<Binaries> {
    find_with(env::var_os(PG_BIN_ENV), env::var_os("PATH"), want, data_dir)
}

pub(crate) fn find_with(
    env_bin: Option<OsString>,
    path_var: Option<OsString>,
    want: Option<&str>,
    data_dir: &Path,
) -> Result<Binaries> {
    if let Some(dir) = env_bin.filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if let Some(missing) = missing_in(&dir) {
            return Err(EmbeddedError::BadPgBin { path: dir, missing });
        }
        let bins = Binaries { dir };
        if let Some(want) = want {
            let found = bins.major_version()?;
            if found != want {
                return Err(mismatch(data_dir, want, found, bins.dir));
            }
        }
        return Ok(bins);
    }
    let (candidates, searched) = candidates(path_var);
    let Some(first) = candidates.first() else {
        return Err(EmbeddedError::BinariesNotFound { searched });
    };
    let Some(want) = want else {
        return Ok(first.clone());
    };
    let mut first_version = None;
    for bins in &candidates {
        let version = bins.major_version()?;
        if version == want {
            return Ok(bins.clone());
        }
        first_version.get_or_insert(version);
    }
    Err(mismatch(
        data_dir,
        want,
        first_version.unwrap_or_default(),
        first.dir.clone(),
    ))
}

fn mismatch(data_dir: &Path, want: &str, found: String, bin_dir: PathBuf) -> EmbeddedError {
    EmbeddedError::VersionMismatch {
        data_dir: data_dir.to_path_buf(),
        cluster_version: want.to_owned(),
        found_version: found,
        bin_dir,
    }
}

/// Every folder with the server binaries, in order of preference, and a
/// description of where it looked.
fn candidates(path_var: Option<OsString>) -> (Vec<Binaries>, String) {
    let mut dirs: Vec<PathBuf> = Vec::new();

    if let Ok(output) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        && output.status.success()
    {
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }

    if let Some(path_var) = &path_var {
        for dir in env::split_paths(path_var) {
            let initdb = dir.join("initdb");
            if is_executable(&initdb) {
                // Prefer the folder the link points into (Debian links
                // /usr/bin/... into /usr/lib/postgresql/N/bin): pg_ctl finds
                // `postgres` beside itself.
                if let Some(real) = fs::canonicalize(&initdb)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                {
                    dirs.push(real);
                }
                dirs.push(dir);
            }
        }
    }

    for (parent, prefix, bin) in VERSIONED {
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let version = name.strip_prefix(prefix)?;
                let key = version
                    .split('.')
                    .map(str::parse)
                    .collect::<Result<Vec<u32>, _>>()
                    .ok()?;
                Some((key, entry.path().join(bin)))
            })
            .collect();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        dirs.extend(versions.into_iter().map(|(_, dir)| dir));
    }
    dirs.push(PathBuf::from("/usr/local/pgsql/bin"));

    let mut seen = HashSet::new();
    let found = dirs
        .into_iter()
        .filter(|dir| seen.insert(fs::canonicalize(dir).unwrap_or_else(|_| dir.clone())))
        .filter_map(|dir| Binaries::in_dir(&dir))
        .collect();
    let searched = format!(
        "${PG_BIN_ENV} (unset), `pg_config --bindir`, initdb on PATH, {}, /usr/local/pgsql/bin",
        VERSIONED
            .iter()
            .map(|(parent, prefix, bin)| format!("{parent}/{prefix}*/{bin}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    (found, searched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = |s| parse_major_version(s);
        assert_eq!(
            v("pg_ctl (PostgreSQL) 15.10 (Debian 15.10-0+deb12u1)\n").as_deref(),
            Some("15")
        );
        assert_eq!(v("pg_ctl (PostgreSQL) 17devel").as_deref(), Some("17"));
        assert_eq!(v("pg_ctl (PostgreSQL) 9.6.24").as_deref(), Some("9.6"));
        assert_eq!(v("something else"), None);
    }

    #[test]
    fn env_folder_without_binaries_is_refused_by_name() {
        let err = find_with(
            Some("/nonexistent/pg/bin".into()),
            None,
            None,
            Path::new("/x"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("CHRONICLE_PG_BIN is /nonexistent/pg/bin"),
            "{text}"
        );
        assert!(text.contains("`initdb`"), "{text}");
    }

    #[test]
    fn finds_the_installed_server() {
        let bins = find_with(None, env::var_os("PATH"), None, Path::new("/x")).unwrap();
        assert!(bins.initdb().is_file() && bins.pg_ctl().is_file());
        let version = bins.major_version().unwrap();
        // Asking for that version finds it; asking for another is a clear error.
        assert_eq!(
            find_with(None, env::var_os("PATH"), Some(&version), Path::new("/x")).unwrap(),
            bins
        );
        let err = find_with(None, env::var_os("PATH"), Some("8.4"), Path::new("/x/data"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("created by PostgreSQL 8.4"), "{err}");
        assert!(err.contains("chronicle dev reset"), "{err}");
    }

    #[test]
    fn not_found_says_what_to_install() {
        let err = EmbeddedError::BinariesNotFound {
            searched: "PATH".into(),
        }
        .to_string();
        assert!(err.contains("apt-get install postgresql"), "{err}");
        assert!(err.contains("DATABASE_URL"), "{err}");
    }
}
