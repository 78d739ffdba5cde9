//! Bind specs and the listening sockets made from them.
//!
//! A [`BindSpec`] is parsed without side effects (config time); a
//! [`Listener`] is created later, before any worker starts, and lives as long
//! as the master. Invariants:
//! * every listener fd is `FD_CLOEXEC` in the master; only the copies that
//!   `spawn.rs` places at fd 3.. survive a worker's exec;
//! * `O_NONBLOCK` is never changed after creation: the open file description
//!   is shared by every worker, so flipping it anywhere flips it everywhere;
//! * a unix socket file is removed at exit only if procman created it
//!   (inherited and `fd://` sockets are never unlinked), and only while its
//!   path still names the inode procman bound (someone may have moved it
//!   away and started another server there);
//! * with `--reuse-port`, each slot's own listening socket lives in its
//!   listener as long as the slot is wanted, not as long as a worker: a
//!   worker that stops (killed, recycled, replaced by a reload) takes only
//!   its copy with it, and the connections queued on the socket wait for
//!   the slot's next worker instead of being reset (nginx's master keeps
//!   its `reuseport` sockets the same way);
//! * an existing socket file is replaced only when connecting to it is
//!   refused (`ECONNREFUSED`: nobody listens); any other answer, such as
//!   `EACCES` from a socket procman may not even connect to, means "in use
//!   or not ours", and procman refuses to start rather than take it over.
//!
//! The parts: `spec.rs` (what `--bind` says), `activation.rs` (sockets
//! procman inherits); this file makes and owns the live listeners.

mod activation;
mod spec;

pub use activation::{
    activation_fds, claim_inherited, forget_inherited, give_back, record_inherited_fds,
    spec_matches, MAX_LISTEN_FDS,
};
pub use spec::{BindSpec, DEFAULT_PORT};

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{os_reason, Error, Result};
use crate::safefs::{self, FileId, Kind};

/// How sockets are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindOptions {
    /// listen(2) backlog.
    pub backlog: i32,
    /// umask for unix socket files.
    pub umask: u32,
    /// `--reuse-port`.
    pub reuse_port: bool,
    /// (uid, gid) that gets unix socket files (`--user`).
    pub owner: Option<(u32, u32)>,
}

impl BindOptions {
    /// Plain options, for tests and tools.
    pub fn new(backlog: i32) -> BindOptions {
        BindOptions {
            backlog,
            umask: 0o022,
            reuse_port: false,
            owner: None,
        }
    }
}

/// A listening socket owned by the master.
#[derive(Debug)]
pub struct Listener {
    pub spec: BindSpec,
    /// The socket. CLOEXEC in the master.
    pub fd: OwnedFd,
    /// Its `LISTEN_FDNAMES` entry.
    pub name: String,
    /// How it is shown in logs: `http://127.0.0.1:8000`, `unix:/run/app.sock`.
    pub display: String,
    /// The unix socket file procman created and must remove at exit, and
    /// the inode it was (removed only while the path still names it).
    pub unlink_at_exit: Option<(PathBuf, FileId)>,
    /// Passed to procman by systemd (socket activation), not bound here.
    pub inherited: bool,
    /// `--reuse-port`: this socket only holds the address (bound, not
    /// listening); each slot gets its own listening SO_REUSEPORT socket.
    pub reuse_port: bool,
    /// `--reuse-port`: each slot's listening socket, made for the slot's
    /// first worker and kept for the next ones ([`Listener::slot_socket`]).
    /// A cell: listeners are shared (`Rc`) between the settings a reload
    /// may go back to. An upgrade passes them on to the new image.
    pub(crate) slots: RefCell<BTreeMap<usize, OwnedFd>>,
}

impl Listener {
    /// Binds one spec. `umask` applies to a unix socket file. With
    /// `reuse_port`, a TCP socket is bound with SO_REUSEPORT but does not
    /// listen: it reserves the address, and [`Listener::worker_socket`]
    /// makes each worker's listener.
    pub fn bind(spec: &BindSpec, opts: &BindOptions) -> Result<Listener> {
        let BindOptions {
            backlog,
            umask,
            reuse_port,
            owner,
        } = *opts;
        let fail = |reason: String| Error::runtime(format!("cannot bind {spec}: {reason}"));
        let (fd, display, unlink) = match spec {
            BindSpec::Tcp { host, port } => {
                let addr = resolve(host, *port).map_err(fail)?;
                let sock = tcp_socket(addr, backlog, !reuse_port, reuse_port)
                    .map_err(|e| fail(bind_reason(&e, addr)))?;
                let local = sock
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .unwrap_or(addr);
                (OwnedFd::from(sock), format!("http://{local}"), None)
            }
            BindSpec::Unix(path) => {
                let (sock, id) = bind_unix_file(path, backlog, umask, owner).map_err(fail)?;
                (
                    OwnedFd::from(sock),
                    format!("unix:{}", path.display()),
                    Some((path.clone(), id)),
                )
            }
            BindSpec::Fd(n) => {
                let fd = claim_inherited(*n).map_err(fail)?;
                (fd, format!("fd://{n}"), None)
            }
        };
        // Name TCP sockets by the port they really got (port 0 binds).
        let named = match (
            spec,
            socket2::SockRef::from(&fd)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket()),
        ) {
            (BindSpec::Tcp { host, .. }, Some(a)) => BindSpec::Tcp {
                host: host.clone(),
                port: a.port(),
            },
            _ => spec.clone(),
        };
        Ok(Listener {
            spec: spec.clone(),
            fd,
            name: named.fd_name(),
            display,
            unlink_at_exit: unlink,
            inherited: false,
            reuse_port: reuse_port && matches!(spec, BindSpec::Tcp { .. }),
            slots: RefCell::default(),
        })
    }

    /// Wraps a socket inherited from systemd (socket activation). It is never
    /// unlinked by procman.
    pub fn inherited(spec: BindSpec, fd: OwnedFd, name: String) -> Listener {
        let display = describe_fd(&fd).unwrap_or_else(|| format!("{spec}"));
        Listener {
            spec,
            fd,
            name,
            display,
            unlink_at_exit: None,
            inherited: true,
            reuse_port: false,
            slots: RefCell::default(),
        }
    }

    /// Slot `slot`'s listening SO_REUSEPORT socket on this listener's
    /// address (`--reuse-port`), made on first use and kept until
    /// [`Listener::forget_slots`]. The kernel spreads new connections over
    /// every listening socket of the group; the fd stays the master's.
    pub fn slot_socket(&self, slot: usize, backlog: i32) -> std::io::Result<RawFd> {
        if let Some(fd) = self.slots.borrow().get(&slot) {
            return Ok(fd.as_raw_fd());
        }
        let addr = socket2::SockRef::from(&self.fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("not a TCP socket"))?;
        let fd = OwnedFd::from(tcp_socket(addr, backlog, true, true)?);
        let raw = fd.as_raw_fd();
        self.slots.borrow_mut().insert(slot, fd);
        Ok(raw)
    }

    /// The slot sockets the master holds, (slot, fd), for an upgrade's
    /// state.
    pub fn slot_fds(&self) -> Vec<(usize, RawFd)> {
        self.slots
            .borrow()
            .iter()
            .map(|(slot, fd)| (*slot, fd.as_raw_fd()))
            .collect()
    }

    /// Closes the master's copy of the slot sockets `which` selects. The
    /// connections queued on one are reset once no worker holds it either
    /// (unless `net.ipv4.tcp_migrate_req` moves them to the group's other
    /// sockets).
    pub fn forget_slots(&self, which: impl Fn(usize) -> bool) {
        self.slots.borrow_mut().retain(|&slot, _| !which(slot));
    }

    /// Removes the unix socket file procman created, if any, and if the
    /// path still names it.
    pub fn remove_file(&mut self) {
        if let Some((path, id)) = self.unlink_at_exit.take() {
            safefs::remove_if_same(&path, id);
        }
    }

    /// Undoes [`Listener::bind`] for a listener that never served (a
    /// failed reload or start): its socket file is removed, and an
    /// `fd://` descriptor goes back, open, to the inherited ones it was
    /// taken from.
    pub fn abandon(mut self) {
        self.remove_file();
        if matches!(self.spec, BindSpec::Fd(_)) && !self.inherited {
            give_back(self.fd);
        }
    }
}

/// Describes an fd's bound address for the log ("http://…" or "unix:…").
fn describe_fd(fd: &OwnedFd) -> Option<String> {
    let sock = socket2::SockRef::from(fd);
    let addr = sock.local_addr().ok()?;
    if let Some(a) = addr.as_socket() {
        return Some(format!("http://{a}"));
    }
    addr.as_pathname().map(|p| format!("unix:{}", p.display()))
}

fn resolve(host: &str, port: u16) -> std::result::Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host '{host}': {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("host '{host}' has no address"))
}

fn bind_reason(err: &std::io::Error, addr: SocketAddr) -> String {
    let reason = os_reason(err);
    match err.raw_os_error() {
        Some(libc::EACCES) if addr.port() < 1024 => {
            format!("{reason} (try a port above 1023, or start as root and use --user)")
        }
        Some(libc::EADDRINUSE) => format!("{reason} (another process is listening there)"),
        _ => reason,
    }
}

fn tcp_socket(
    addr: SocketAddr,
    backlog: i32,
    listen: bool,
    reuse_port: bool,
) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Like nginx: [::]:80 means IPv6 only, so 0.0.0.0:80 can be bound too.
        sock.set_only_v6(true)?;
    }
    sock.bind(&SockAddr::from(addr))?;
    if listen {
        sock.listen(backlog)?;
    }
    Ok(sock)
}

/// Binds a listening unix stream socket at `path`, the one way procman
/// makes a socket file (`--bind unix:`, `--control-socket`, `--metrics
/// unix:`): a stale file is replaced only when connecting to it is refused
/// (see [`remove_stale_socket`]); the file's mode is `0o777 & !umask` from
/// the moment it exists (the umask is set around bind(2), and nothing
/// changes the mode by path afterwards); the file is then opened without
/// following a symlink and checked to be the socket procman made (the
/// directory may be writable by others, who could swap the path
/// meanwhile), and handed to `owner` through that descriptor. The answer
/// carries the file's identity, for [`safefs::remove_if_same`] at exit.
/// The socket is `CLOEXEC` and blocking. A file that cannot be handed to
/// `owner` is removed (while the path still names it) before the error.
pub fn bind_unix_file(
    path: &Path,
    backlog: i32,
    umask: u32,
    owner: Option<(u32, u32)>,
) -> std::result::Result<(Socket, FileId), String> {
    remove_stale_socket(path)?;
    let sock = unix_listener(path, backlog, umask).map_err(|e| os_reason(&e))?;
    let (file, id) = safefs::open_own(path, Kind::Socket)
        .map_err(|e| format!("the socket file changed under procman: {}", os_reason(&e)))?;
    // Workers that run as --user own their socket file, as with gunicorn
    // (they can then manage or remove it themselves).
    if let Some((uid, gid)) = owner {
        if let Err(e) = safefs::chown_fd(&file, uid, gid) {
            safefs::remove_if_same(path, id);
            return Err(format!(
                "cannot hand it to the worker user: {}",
                os_reason(&e)
            ));
        }
    }
    Ok((sock, id))
}

fn unix_listener(path: &Path, backlog: i32, umask: u32) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    let addr = SockAddr::unix(path)?;
    // The socket file's mode comes from the process umask at bind(2) time;
    // the master is single-threaded, so setting it around the call is safe.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    let bound = sock.bind(&addr);
    nix::sys::stat::umask(old);
    bound?;
    sock.listen(backlog)?;
    Ok(sock)
}

/// A socket file nobody listens on is left over from a crash: replace it.
/// A live socket or a file that is not a socket is someone else's: refuse.
/// Only `ECONNREFUSED` proves nobody listens; `EACCES` (a socket procman may
/// not connect to, e.g. root's, seen by an unprivileged procman) or any
/// other error leaves the file alone.
fn remove_stale_socket(path: &Path) -> std::result::Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(os_reason(&e)),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket (refusing to replace it)",
            path.display()
        ));
    }
    match probe_unix(path) {
        Ok(()) => Err(format!(
            "a live server is already listening on {}",
            path.display()
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).map_err(|e| os_reason(&e))
        }
        Err(e) => Err(format!(
            "{} exists and may be in use (connecting to it failed: {}); not replacing it",
            path.display(),
            os_reason(&e)
        )),
    }
}

/// Connects to a unix stream socket without blocking: a live server whose
/// backlog is full answers `EAGAIN`, which counts as live too.
fn probe_unix(path: &Path) -> std::io::Result<()> {
    let sock = Socket::new(Domain::UNIX, Type::STREAM.cloexec().nonblocking(), None)?;
    match sock.connect(&SockAddr::unix(path)?) {
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_unix_socket_is_replaced_but_a_live_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("procman-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("s.sock");
        let spec = BindSpec::Unix(path.clone());
        let mut live = Listener::bind(&spec, &BindOptions::new(16)).expect("first bind");
        let err = Listener::bind(&spec, &BindOptions::new(16)).expect_err("live socket");
        assert!(err.to_string().contains("already listening"), "{err}");
        // Closing without unlinking leaves a stale file behind, as a crash would.
        drop(live.fd);
        live.unlink_at_exit = None;
        let mut again = Listener::bind(&spec, &BindOptions::new(16)).expect("stale file replaced");
        again.remove_file();
        assert!(!path.exists());
        std::fs::write(&path, b"x").expect("write");
        let err = Listener::bind(&spec, &BindOptions::new(16)).expect_err("regular file");
        assert!(err.to_string().contains("not a socket"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
