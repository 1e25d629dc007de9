//! Where a cluster's files are, and the port and socket folder it uses.

use std::env;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{EmbeddedError, Result};
use crate::sys;

/// The PostgreSQL data directory (`PGDATA`) inside the cluster folder.
pub(crate) const DATA: &str = "data";
/// Where initdb writes a new cluster before it is moved to [`DATA`], so an
/// interrupted initdb never leaves a half-made cluster behind.
pub(crate) const INIT_TMP: &str = "data.initdb";
/// The socket folder inside the cluster folder.
pub(crate) const RUN: &str = "run";
/// The server's log.
pub(crate) const LOG: &str = "postgres.log";
/// The previous log, kept when the log grows past [`LOG_ROTATE_BYTES`].
pub(crate) const LOG_OLD: &str = "postgres.log.1";
/// The lock taken around init, start, stop and reset.
pub(crate) const LOCK: &str = ".lock";
/// Where the server listens, for people and other tools.
pub(crate) const RECORD: &str = "server.info";
/// Every name this crate writes in a cluster folder (reset deletes these).
pub(crate) const KNOWN: &[&str] = &[
    DATA,
    INIT_TMP,
    RUN,
    LOG,
    LOG_OLD,
    RECORD,
    crate::throwaway::OWNER,
    LOCK,
];
pub(crate) const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// The longest socket path the kernel accepts (`sun_path` less its NUL).
#[cfg(target_os = "linux")]
pub(crate) const MAX_SOCKET_PATH: usize = 107;
#[cfg(not(target_os = "linux"))]
pub(crate) const MAX_SOCKET_PATH: usize = 103;

/// The paths of one cluster, all absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub root: PathBuf,
    pub data: PathBuf,
    pub init_tmp: PathBuf,
    pub log: PathBuf,
    pub lock: PathBuf,
    pub record: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl Layout {
    /// The layout of the cluster in `root`, which should be absolute and
    /// canonical: the port and the fallback socket folder derive from it.
    pub fn new(root: PathBuf) -> Layout {
        let hash = fnv1a(root.as_os_str().as_bytes());
        let port = 20_000 + ((hash >> 32) % 40_000) as u16;
        let run = root.join(RUN);
        let socket_dir = if socket_dir_usable(&run, port) {
            run
        } else {
            short_socket_dir(hash)
        };
        Layout {
            data: root.join(DATA),
            init_tmp: root.join(INIT_TMP),
            log: root.join(LOG),
            lock: root.join(LOCK),
            record: root.join(RECORD),
            socket_dir,
            port,
            root,
        }
    }

    /// Whether the socket folder is the short one under `/tmp`.
    pub fn socket_dir_is_outside(&self) -> bool {
        !self.socket_dir.starts_with(&self.root)
    }

    /// The major version of an initialised cluster.
    pub fn pg_version(&self) -> Option<String> {
        fs::read_to_string(self.data.join("PG_VERSION"))
            .ok()
            .map(|v| v.trim().to_owned())
    }
}

/// `<dir>/.s.PGSQL.<port>`.
pub(crate) fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Whether PostgreSQL can put its socket in `dir`: the path fits in a
/// socket address, and it can be written in `unix_socket_directories`
/// (a comma-separated list in a quoted string) and in pg_ctl's shell
/// command without quoting trouble.
pub(crate) fn socket_dir_usable(dir: &Path, port: u16) -> bool {
    let fits = socket_path(dir, port).as_os_str().len() <= MAX_SOCKET_PATH;
    let plain = dir.to_str().is_some_and(|s| {
        !s.chars()
            .any(|c| c.is_control() || matches!(c, ',' | '\'' | '"' | '\\' | '$' | '`'))
    });
    fits && plain
}

/// `/tmp/chronicle-<hash of the cluster path>`: short enough for any port.
fn short_socket_dir(hash: u64) -> PathBuf {
    PathBuf::from(format!("/tmp/chronicle-{hash:016x}"))
}

/// FNV-1a, 64 bits: stable across Rust versions, unlike `DefaultHasher`.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `dir` made absolute against the current folder, and canonical if it
/// exists.
pub(crate) fn resolve(dir: &Path) -> Result<PathBuf> {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        let cwd = env::current_dir()
            .map_err(|e| EmbeddedError::io("find the current folder for", dir, e))?;
        cwd.join(dir)
    };
    Ok(fs::canonicalize(&absolute).unwrap_or(absolute))
}

/// Creates `dir` and its missing parents. As root, the folders it creates
/// get mode 0755 whatever the umask, so the server's user can pass through.
pub(crate) fn create_dirs(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(p) = next {
        if p.exists() {
            break;
        }
        missing.push(p);
        next = p.parent();
    }
    for p in missing.into_iter().rev() {
        match fs::create_dir(p) {
            Ok(()) => {
                if sys::euid() == 0 {
                    fs::set_permissions(p, fs::Permissions::from_mode(0o755))
                        .map_err(|e| EmbeddedError::io("set permissions of", p, e))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(EmbeddedError::io("create the folder", p, e)),
        }
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters (and `/` unless
/// `slash` is false), for a URL path segment or query value.
pub(crate) fn percent_encode(bytes: &[u8], slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The connection URL: no host in the authority, the socket folder in
/// `host=` (a host before it would make tokio-postgres try TCP first).
pub(crate) fn url(socket_dir: &Path, port: u16, database: &str) -> String {
    format!(
        "postgresql:///{}?host={}&port={port}&user=postgres&sslmode=disable",
        percent_encode(database.as_bytes(), false),
        percent_encode(socket_dir.as_os_str().as_bytes(), true),
    )
}

/// Writes `text` to `path` atomically (a temporary file, then a rename).
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| EmbeddedError::io("write", path, e))
}

/// The `socket_dir` written in a cluster's record, if any.
pub(crate) fn recorded_socket_dir(layout: &Layout) -> Option<PathBuf> {
    let text = fs::read_to_string(&layout.record).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("socket_dir="))
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // FNV-1a test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn short_paths_keep_the_socket_inside_the_cluster() {
        let layout = Layout::new(PathBuf::from("/work/app/.chronicle/postgres"));
        assert_eq!(
            layout.socket_dir,
            Path::new("/work/app/.chronicle/postgres/run")
        );
        assert!((20_000..60_000).contains(&layout.port));
        assert!(!layout.socket_dir_is_outside());
        assert_eq!(
            layout,
            Layout::new(PathBuf::from("/work/app/.chronicle/postgres"))
        );
        assert_ne!(
            layout.port,
            Layout::new(PathBuf::from("/work/other/.chronicle/postgres")).port
        );
    }

    #[test]
    fn long_or_awkward_paths_get_a_short_socket_folder() {
        let long = PathBuf::from(format!("/home/{}/.chronicle/postgres", "x".repeat(90)));
        let layout = Layout::new(long);
        assert!(layout.socket_dir_is_outside());
        assert!(layout.socket_dir.starts_with("/tmp"));
        assert!(
            socket_path(&layout.socket_dir, layout.port)
                .as_os_str()
                .len()
                <= MAX_SOCKET_PATH
        );
        assert!(Layout::new(PathBuf::from("/srv/a,b")).socket_dir_is_outside());
        assert!(Layout::new(PathBuf::from("/srv/it's")).socket_dir_is_outside());
        assert!(!Layout::new(PathBuf::from("/srv/with space")).socket_dir_is_outside());
    }

    #[test]
    fn urls_encode_the_socket_folder() {
        assert_eq!(
            url(Path::new("/tmp/a b+c&d"), 5432, "my db"),
            "postgresql:///my%20db?host=/tmp/a%20b%2Bc%26d&port=5432&user=postgres&sslmode=disable"
        );
        assert_eq!(
            url(Path::new("/srv/run"), 41000, "postgres"),
            "postgresql:///postgres?host=/srv/run&port=41000&user=postgres&sslmode=disable"
        );
    }
}
