//! Sockets procman inherits: systemd socket activation (`LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`) and `fd://N`. Invariant:
//! `fd://N` takes only a descriptor that was already open when procman
//! started (recorded by [`record_inherited_fds`] before procman opens
//! anything) and is a listening socket, and each such descriptor once:
//! procman's own descriptors (signal pipe, notify socket, zygote
//! channels, listeners) are never adopted, since adopting one means
//! closing it later under its real owner.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use super::BindSpec;
use crate::error::os_reason;

/// Descriptors open when procman started and not yet taken by a listener:
/// the only ones `fd://N` may name.
static INHERITED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

fn inherited_set() -> std::sync::MutexGuard<'static, BTreeSet<RawFd>> {
    // A panic elsewhere cannot leave the set half-updated (each update is
    // one insert or remove), so a poisoned lock is still usable.
    INHERITED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the descriptors (3 and up) open at this moment as inherited.
/// Called first thing at start, before procman opens anything of its own.
pub fn record_inherited_fds() {
    let listed: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|n| *n > 2)
            .collect(),
        // Without /proc: look at the low numbers one by one.
        Err(_) => (3..1024).collect(),
    };
    // The listing included the directory's own fd, closed by now: keep only
    // what is still open.
    let open: BTreeSet<RawFd> = listed
        .into_iter()
        .filter(|n| nix::fcntl::fcntl(*n, nix::fcntl::FcntlArg::F_GETFD).is_ok())
        .collect();
    *inherited_set() = open;
}

/// Forgets `n` as inherited: an upgraded image's own descriptors, passed
/// on by its old image, are procman's, never `fd://`'s.
pub fn forget_inherited(n: RawFd) {
    inherited_set().remove(&n);
}

/// Takes the inherited descriptor `n` for a listener: it must have been
/// open when procman started, not be taken yet, and be a listening socket.
/// It becomes CLOEXEC (only the copies placed for workers survive exec).
pub fn claim_inherited(n: RawFd) -> std::result::Result<OwnedFd, String> {
    let mut set = inherited_set();
    if !set.contains(&n) {
        if nix::fcntl::fcntl(n, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Err(format!("fd {n} is not open"));
        }
        return Err(format!(
            "fd {n} belongs to procman (fd:// takes only a listening socket that was open when procman started, once)"
        ));
    }
    // SAFETY: `n` is in the set, so it was open at start and nothing in
    // procman has taken (or closed) it since; the borrow ends before any
    // ownership is taken below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(n) };
    match socket2::SockRef::from(&borrowed).is_listener() {
        Ok(true) => {}
        Ok(false) => return Err(format!("fd {n} is not a listening socket")),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return Err(format!("fd {n} is not a socket"))
        }
        Err(e) => return Err(format!("fd {n}: {}", os_reason(&e))),
    }
    nix::fcntl::fcntl(
        n,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| e.desc().to_string())?;
    set.remove(&n);
    // SAFETY: `n` is open (above) and was in the inherited set, which it
    // has just left: no other owner exists in this process, and no later
    // claim can create a second one.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Returns a descriptor taken by [`claim_inherited`], still open, so a
/// later `fd://` may take it again.
pub fn give_back(fd: OwnedFd) {
    let n = fd.into_raw_fd();
    inherited_set().insert(n);
}

/// The most sockets `LISTEN_FDS` may announce (systemd passes one per
/// `Listen…=` line of a socket unit: a handful).
pub const MAX_LISTEN_FDS: i32 = 4096;

/// Sockets systemd passed to procman itself (socket activation), read from
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. Pure: the caller passes
/// the variables and its pid. Returns (fd, name) pairs; empty when the
/// sockets are not ours (`LISTEN_PID` names another process).
pub fn activation_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    my_pid: u32,
) -> Vec<(RawFd, String)> {
    let ours = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(my_pid);
    let count = listen_fds
        .and_then(|n| n.trim().parse::<i32>().ok())
        .unwrap_or(0);
    // A count beyond any real socket unit is a corrupt variable: taking it
    // would mean adopting (and later closing) fds that are not sockets, or
    // allocating billions of entries.
    if !ours || count <= 0 || count > MAX_LISTEN_FDS {
        return Vec::new();
    }
    let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
    (0..count)
        .map(|i| {
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty())
                .map(|n| n.to_string())
                .unwrap_or_else(|| format!("fd-{}", 3 + i));
            (3 + i, name)
        })
        .collect()
}

/// Whether an inherited listener is the one a bind spec describes: same
/// unix path, or same TCP port and address (an unspecified spec address
/// matches a socket bound to the unspecified address).
pub fn spec_matches(spec: &BindSpec, fd: &OwnedFd) -> bool {
    let sock = socket2::SockRef::from(fd);
    let Ok(local) = sock.local_addr() else {
        return false;
    };
    match spec {
        BindSpec::Unix(path) => local.as_pathname() == Some(path.as_path()),
        BindSpec::Tcp { host, port } => match (local.as_socket(), host.parse::<IpAddr>()) {
            (Some(a), Ok(ip)) => a.port() == *port && a.ip() == ip,
            _ => false,
        },
        BindSpec::Fd(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_sockets_are_taken() {
        assert!(activation_fds(Some("1"), Some("2"), None, 42).is_empty());
        assert!(activation_fds(None, Some("2"), None, 42).is_empty());
        assert!(activation_fds(Some("42"), Some("0"), None, 42).is_empty());
        assert_eq!(
            activation_fds(Some("42"), Some("2"), Some("web:admin"), 42),
            vec![(3, "web".to_string()), (4, "admin".to_string())]
        );
        assert_eq!(
            activation_fds(Some("42"), Some("1"), None, 42),
            vec![(3, "fd-3".to_string())]
        );
    }

    #[test]
    fn an_absurd_listen_fds_is_ignored_not_allocated() {
        assert!(activation_fds(Some("42"), Some("2147483647"), None, 42).is_empty());
        assert!(activation_fds(Some("42"), Some("1000000000"), None, 42).is_empty());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn activation_variables_never_panic(
            pid in prop_oneof![any::<String>(), any::<u32>().prop_map(|n| n.to_string())],
            fds in prop_oneof![any::<String>(), any::<i64>().prop_map(|n| n.to_string())],
            names in any::<String>(),
        ) {
            let my_pid = pid.trim().parse::<u32>().unwrap_or(42);
            let got = activation_fds(Some(&pid), Some(&fds), Some(&names), my_pid);
            for (fd, _) in &got {
                prop_assert!(*fd >= 3);
            }
        }
    }
}
