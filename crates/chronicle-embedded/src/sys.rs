//! The few operating-system calls std does not wrap. All of the crate's
//! `unsafe` code is in this module.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::path::PathBuf;

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// An entry of the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks a user up by name (`getpwnam_r`, so NSS sources count too).
pub(crate) fn user_by_name(name: &str) -> io::Result<Option<User>> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    lookup(|pwd, buf, len, result| {
        // SAFETY: every pointer is valid for the call: `c_name` is a live
        // C string, `pwd` and `result` point to locals, `buf` has `len` bytes.
        unsafe { libc::getpwnam_r(c_name.as_ptr(), pwd, buf, len, result) }
    })
}

/// Looks a user up by id.
pub(crate) fn user_by_uid(uid: u32) -> io::Result<Option<User>> {
    lookup(|pwd, buf, len, result| {
        // SAFETY: as in `user_by_name`.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
    })
}

/// A user's name, or `uid <n>` when it has none.
pub(crate) fn user_name(uid: u32) -> String {
    match user_by_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

fn lookup(
    call: impl Fn(
        *mut libc::passwd,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut libc::passwd,
    ) -> libc::c_int,
) -> io::Result<Option<User>> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `passwd` is plain data (integers and pointers); all zeroes
        // is a valid value, which getpw*_r overwrites.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            let larger = buf.len() * 2;
            buf.resize(larger, 0);
            continue;
        }
        if rc == libc::ENOENT || rc == libc::ESRCH {
            return Ok(None);
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success `pw_name` points to a NUL-terminated string
        // inside `buf`, which is still alive.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        return Ok(Some(User {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

/// Whether a process with this id exists (it may belong to another user).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negative ids name process groups, never one process.
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists
    // and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// When a process started, in clock ticks since boot (Linux `/proc`), to tell
/// a process from a later one that reuses its id.
pub(crate) fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may hold spaces; the
    // start time is field 22, the 20th after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A process's working directory (Linux `/proc`; `None` where unknown).
pub(crate) fn process_cwd(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// A process's command name (Linux `/proc`; `None` where unknown).
pub(crate) fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_users() {
        let root = user_by_uid(0).unwrap().expect("uid 0 exists");
        assert_eq!(root.name, "root");
        assert_eq!(user_by_name("root").unwrap(), Some(root));
        assert_eq!(user_by_name("no-such-user-chronicle").unwrap(), None);
    }

    #[test]
    fn knows_live_and_dead_processes() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(0));
        assert!(!process_exists(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid));
        assert!(process_start_ticks(std::process::id()).is_some());
        assert!(process_name(std::process::id()).is_some());
        assert_eq!(
            process_cwd(std::process::id()),
            std::env::current_dir().ok()
        );
    }
}
