//! Where the notify socket lives, and how its directory is made and
//! removed: the first candidate directory the workers' user can traverse,
//! a `mkdtemp` directory in it, the socket bound there and handed to the
//! user through descriptors that do not follow symlinks (the socket before
//! the directory), and at exit the directory removed only while its path
//! still names the inode procman made.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
};

use super::SOCKET_NAME;
use crate::error::{Error, Result};
use crate::identity::Credentials;
use crate::safefs::{self, FileId, Kind};

/// Where the notify directory goes: the first candidate that exists and
/// that `user` (the workers' user, if not procman's own) can traverse.
/// Also called at start before anything is bound, so an unreachable one
/// stops procman before it binds or starts anything.
pub fn notify_base(user: Option<&Credentials>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    // systemd sets RUNTIME_DIRECTORY to a colon-separated list when a unit
    // has several RuntimeDirectory= entries.
    if let Some(v) = std::env::var_os("RUNTIME_DIRECTORY") {
        candidates.extend(std::env::split_paths(&v).filter(|p| p.is_absolute()));
    }
    if let Some(v) = std::env::var_os("XDG_RUNTIME_DIR") {
        candidates.push(PathBuf::from(v));
    }
    candidates.push(std::env::temp_dir());
    let mut seen = std::collections::BTreeSet::new();
    candidates.retain(|p| seen.insert(p.clone()));
    let mut refused: Vec<String> = Vec::new();
    for dir in candidates.into_iter().filter(|p| p.is_dir()) {
        match user.map_or(Ok(()), |u| traversable(&dir, u)) {
            Ok(()) => return Ok(dir),
            Err(why) => {
                tracing::debug!("notify socket not in {}: {why}", dir.display());
                refused.push(why);
            }
        }
    }
    let who = user.map_or("procman".to_string(), |u| format!("user {}", u.user_name));
    Err(Error::runtime(format!(
        "cannot place the notify socket where {who} can reach it: {} (set RUNTIME_DIRECTORY or TMPDIR to a directory {who} can traverse)",
        if refused.is_empty() {
            "no runtime or temporary directory exists".to_string()
        } else {
            refused.join("; ")
        }
    )))
}

/// Whether `user` may search every directory from `/` down to `dir`, by
/// the mode bits (owner, group or other; ACLs are not consulted, so a
/// directory opened to the user by an ACL alone is passed over).
fn traversable(dir: &Path, user: &Credentials) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if user.uid == 0 {
        return Ok(());
    }
    let full = std::fs::canonicalize(dir).map_err(|e| {
        format!(
            "{} cannot be resolved: {}",
            dir.display(),
            crate::error::os_reason(&e)
        )
    })?;
    for step in full.ancestors() {
        let meta = std::fs::metadata(step)
            .map_err(|e| format!("{}: {}", step.display(), crate::error::os_reason(&e)))?;
        let mode = meta.mode();
        let bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid || user.groups.contains(&meta.gid()) {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(format!(
                "{} is not traversable by user {} (uid {}; the directory is mode {:o}, owner {}:{})",
                step.display(),
                user.user_name,
                user.uid,
                mode & 0o7777,
                meta.uid(),
                meta.gid()
            ));
        }
    }
    Ok(())
}

/// Binds the notify socket at `path` (in the directory open as `dir_fd`)
/// and, with `--user`, hands the socket, then the directory, to the user.
pub(super) fn bind_socket(
    path: &Path,
    dir_fd: &OwnedFd,
    owner: Option<&Credentials>,
) -> Result<OwnedFd> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| Error::runtime(format!("cannot {what}: {e}"));
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| fail("create the notify socket", &e))?;
    let addr = UnixAddr::new(path).map_err(|e| fail("name the notify socket", &e))?;
    bind(fd.as_raw_fd(), &addr)
        .map_err(|e| fail(&format!("bind the notify socket {}", path.display()), &e))?;
    setsockopt(&fd, sockopt::PassCred, &true)
        .map_err(|e| fail("enable SO_PASSCRED on the notify socket", &e))?;
    // The kernel stamps each datagram as it is queued, so a heartbeat read
    // late still counts from when it was sent.
    setsockopt(&fd, sockopt::ReceiveTimestampns, &true)
        .map_err(|e| fail("enable SO_TIMESTAMPNS on the notify socket", &e))?;
    // The queue is bounded by net.unix.max_dgram_qlen datagrams (often
    // 10) whatever the buffer size, so the master drains it promptly
    // (also between spawns) and workers retry what must arrive
    // (READY=1); the buffer only has to hold those datagrams' bytes.
    let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
    if let Some(user) = owner {
        // The socket first: while procman still owns the directory, nobody
        // else can have replaced the file in it.
        let (sock_file, _) = safefs::open_own(path, Kind::Socket)
            .map_err(|e| fail("open the notify socket file", &e))?;
        safefs::chown_fd(&sock_file, user.uid, user.gid)
            .map_err(|e| fail("hand the notify socket to the worker user", &e))?;
        let dir_handle = std::fs::File::from(
            dir_fd
                .try_clone()
                .map_err(|e| fail("duplicate a descriptor", &e))?,
        );
        safefs::chown_fd(&dir_handle, user.uid, user.gid)
            .map_err(|e| fail("hand the notify directory to the worker user", &e))?;
    }
    Ok(fd)
}

/// Removes the socket through the directory's descriptor (if the worker
/// user, who may own the directory, moved it or put a symlink at its path,
/// this still acts inside the directory procman made, nowhere else), then
/// the directory, only while its path still names the inode procman made.
pub(super) fn remove_made_dir(dir: &Path, dir_fd: &OwnedFd, dir_id: FileId) {
    let _ = nix::unistd::unlinkat(
        Some(dir_fd.as_raw_fd()),
        SOCKET_NAME,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    if FileId::at(dir) == Some(dir_id) {
        let _ = std::fs::remove_dir(dir);
    }
}
