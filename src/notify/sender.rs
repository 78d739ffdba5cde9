//! The sending side of sd_notify: procman's own link to systemd (or
//! whoever set `NOTIFY_SOCKET` for procman), a path or an `@abstract`
//! name. Every send is one datagram whose failure is logged and never
//! fatal: systemd being gone must not stop the master.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// procman's own link to systemd (or whoever set `NOTIFY_SOCKET` for it).
pub struct SystemdNotifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl SystemdNotifier {
    /// Reads `NOTIFY_SOCKET` (bytes: a path or an abstract name need not be
    /// UTF-8); `None` when unset or unusable.
    pub fn from_env(value: Option<&OsStr>) -> Option<SystemdNotifier> {
        let bytes = value?.as_bytes();
        let addr = if let Some(name) = bytes.strip_prefix(b"@") {
            SocketAddr::from_abstract_name(name).ok()?
        } else if bytes.starts_with(b"/") {
            SocketAddr::from_pathname(Path::new(OsStr::from_bytes(bytes))).ok()?
        } else {
            tracing::warn!(
                "ignoring NOTIFY_SOCKET={}: only paths and @abstract names are supported",
                String::from_utf8_lossy(bytes)
            );
            return None;
        };
        let socket = UnixDatagram::unbound().ok()?;
        Some(SystemdNotifier { socket, addr })
    }

    /// Sends one datagram; failures are logged, never fatal.
    pub fn send(&self, payload: &str) {
        if let Err(e) = self.socket.send_to_addr(payload.as_bytes(), &self.addr) {
            tracing::debug!("cannot notify systemd ({payload:?}): {e}");
        }
    }
}

/// CLOCK_MONOTONIC in microseconds, for `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}
