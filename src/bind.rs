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
//! * an existing socket file is replaced only when connecting to it is
//!   refused (`ECONNREFUSED`: nobody listens); any other answer, such as
//!   `EACCES` from a socket procman may not even connect to, means "in use
//!   or not ours", and procman refuses to start rather than take it over;
//! * `fd://N` takes only a descriptor that was already open when procman
//!   started (recorded by [`record_inherited_fds`] before procman opens
//!   anything) and is a listening socket, and each such descriptor once:
//!   procman's own descriptors (signal pipe, notify socket, zygote
//!   channels, listeners) are never adopted, since adopting one means
//!   closing it later under its real owner.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{os_reason, Error, Result};
use crate::safefs::{self, FileId, Kind};

/// Port used when a bind spec names a host without a port (gunicorn's default).
pub const DEFAULT_PORT: u16 = 8000;

/// One `--bind` value, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSpec {
    /// A TCP address; the host may be a name resolved at bind time.
    Tcp {
        /// IP literal or host name.
        host: String,
        /// Port; 0 asks the kernel for a free one.
        port: u16,
    },
    /// A unix stream socket at a path.
    Unix(PathBuf),
    /// An already-open listening socket inherited as this fd.
    Fd(RawFd),
}

impl BindSpec {
    /// Parses `HOST:PORT`, `:PORT`, `[V6]:PORT`, `tcp://…`, `unix:PATH`, `fd://N`.
    /// The error is only the reason; the caller names the flag and value.
    pub fn parse(text: &str) -> std::result::Result<BindSpec, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty address".into());
        }
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/app.sock".into());
            }
            // sun_path holds 108 bytes including the terminating NUL.
            if path.len() > 107 {
                return Err(format!(
                    "unix socket path is {} bytes long; the limit is 107",
                    path.len()
                ));
            }
            return Ok(BindSpec::Unix(PathBuf::from(path)));
        }
        if let Some(n) = text.strip_prefix("fd://") {
            let fd: RawFd = n
                .parse()
                .map_err(|_| format!("'{n}' is not a file descriptor number"))?;
            if fd < 3 {
                return Err(format!("fd {fd} is stdin, stdout or stderr, not a socket"));
            }
            return Ok(BindSpec::Fd(fd));
        }
        let rest = text.strip_prefix("tcp://").unwrap_or(text);
        if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| "missing ']' after the IPv6 address".to_string())?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("'{host}' is not an IPv6 address"))?;
            let port = match after {
                "" => DEFAULT_PORT,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("unexpected '{p}' after ']'"))?,
                )?,
            };
            return Ok(BindSpec::Tcp {
                host: host.to_string(),
                port,
            });
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                if host.contains(':') {
                    return Err("an IPv6 address must be in brackets, e.g. [::1]:8000".into());
                }
                (host, parse_port(port)?)
            }
            None => (rest, DEFAULT_PORT),
        };
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("'{host}' is not a host name or IP address"));
        }
        Ok(BindSpec::Tcp {
            host: host.to_string(),
            port,
        })
    }

    /// The name this socket gets in `LISTEN_FDNAMES` (no `:`, printable ASCII).
    pub fn fd_name(&self) -> String {
        let raw = match self {
            BindSpec::Tcp { host, port } => format!("tcp-{host}-{port}"),
            BindSpec::Unix(p) => format!("unix-{}", p.display()),
            BindSpec::Fd(n) => format!("fd-{n}"),
        };
        let name: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != ':' {
                    c
                } else {
                    '_'
                }
            })
            .take(255)
            .collect();
        name
    }
}

impl std::fmt::Display for BindSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindSpec::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            // "unix:80" would read back as a socket file named 80.
            BindSpec::Tcp { host, port } if host == "unix" => write!(f, "tcp://{host}:{port}"),
            BindSpec::Tcp { host, port } => write!(f, "{host}:{port}"),
            // parse() drops one leading "//" (unix://PATH), so a path that
            // starts with "//" is written with it to read back unchanged.
            BindSpec::Unix(p) if p.as_os_str().as_encoded_bytes().starts_with(b"//") => {
                write!(f, "unix://{}", p.display())
            }
            BindSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            BindSpec::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

fn parse_port(text: &str) -> std::result::Result<u16, String> {
    match text.parse::<u32>() {
        Ok(p) if p <= 65535 => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range (0-65535)")),
        Err(_) => Err(format!("'{text}' is not a port number")),
    }
}

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
    /// listening); each worker gets its own listening SO_REUSEPORT socket.
    pub reuse_port: bool,
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
                remove_stale_socket(path).map_err(fail)?;
                let sock = unix_listener(path, backlog, umask).map_err(|e| fail(os_reason(&e)))?;
                // The file just bound, opened without following a symlink
                // and checked to be still our socket: the directory may be
                // writable by others, who could swap the path meanwhile.
                let (file, id) = safefs::open_own(path, Kind::Socket).map_err(|e| {
                    fail(format!(
                        "the socket file changed under procman: {}",
                        os_reason(&e)
                    ))
                })?;
                // Workers that run as --user own their socket file, as with
                // gunicorn (they can then manage or remove it themselves).
                if let Some((uid, gid)) = owner {
                    if let Err(e) = safefs::chown_fd(&file, uid, gid) {
                        safefs::remove_if_same(path, id);
                        return Err(fail(format!(
                            "cannot hand it to the worker user: {}",
                            os_reason(&e)
                        )));
                    }
                }
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
        }
    }

    /// A new listening SO_REUSEPORT socket on this listener's address, for
    /// one worker (`--reuse-port`). The kernel spreads new connections
    /// over every listening socket of the group.
    pub fn worker_socket(&self, backlog: i32) -> std::io::Result<OwnedFd> {
        let addr = socket2::SockRef::from(&self.fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("not a TCP socket"))?;
        tcp_socket(addr, backlog, true, true).map(OwnedFd::from)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> BindSpec {
        BindSpec::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_every_documented_form() {
        let table: &[(&str, BindSpec)] = &[
            ("127.0.0.1:8000", tcp("127.0.0.1", 8000)),
            (":9000", tcp("0.0.0.0", 9000)),
            ("0.0.0.0:0", tcp("0.0.0.0", 0)),
            ("[::1]:8080", tcp("::1", 8080)),
            ("[::]:80", tcp("::", 80)),
            ("localhost:5000", tcp("localhost", 5000)),
            ("tcp://10.0.0.1:81", tcp("10.0.0.1", 81)),
            ("example.org", tcp("example.org", 8000)),
            ("unix:/run/app.sock", BindSpec::Unix("/run/app.sock".into())),
            ("unix:rel.sock", BindSpec::Unix("rel.sock".into())),
            ("fd://3", BindSpec::Fd(3)),
        ];
        for (text, want) in table {
            assert_eq!(BindSpec::parse(text).as_ref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_forms_with_a_reason() {
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            (":65536", "out of range"),
            ("127.0.0.1:http", "not a port"),
            ("::1:80", "brackets"),
            ("[::1", "missing ']'"),
            ("[zz]:80", "not an IPv6"),
            ("unix:", "needs a path"),
            ("fd://x", "not a file descriptor"),
            ("fd://1", "stdin, stdout or stderr"),
            ("a b:80", "not a host"),
        ];
        for (text, want) in table {
            let err = BindSpec::parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn fd_names_have_no_colons() {
        assert_eq!(tcp("::1", 80).fd_name(), "tcp-__1-80");
        assert_eq!(tcp("127.0.0.1", 80).fd_name(), "tcp-127.0.0.1-80");
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "127.0.0.1:80",
            "[::1]:80",
            "unix:/x.sock",
            "fd://4",
            "tcp://unix:80",
            "unix:////x.sock",
        ] {
            let spec = BindSpec::parse(text).expect("parses");
            assert_eq!(spec.to_string(), text);
            assert_eq!(BindSpec::parse(&spec.to_string()), Ok(spec));
        }
    }

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
mod activation_tests {
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
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> ProptestConfig {
        ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Text shaped like a bind spec, so that many cases parse.
    fn spec_like() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            Just(String::new()),
            "[a-z0-9.:_\\[\\]/ -]{0,12}",
            Just("unix".to_string()),
            Just("fd".to_string()),
            Just("tcp".to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| format!("[{a}]")),
        ];
        let port = prop_oneof![
            Just(String::new()),
            (0u32..70000).prop_map(|p| format!(":{p}"))
        ];
        let prefix = prop_oneof![
            Just(""),
            Just("tcp://"),
            Just("unix:"),
            Just("unix://"),
            Just("fd://")
        ];
        (prefix, host, port).prop_map(|(pre, h, p)| format!("{pre}{h}{p}"))
    }

    proptest! {
        #![proptest_config(cases())]

        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let _ = BindSpec::parse(&text);
        }

        #[test]
        fn what_parses_prints_back_to_the_same_spec(text in prop_oneof![spec_like(), any::<String>()]) {
            if let Ok(spec) = BindSpec::parse(&text) {
                let shown = spec.to_string();
                prop_assert_eq!(BindSpec::parse(&shown), Ok(spec), "{:?} shown as {:?}", text, shown);
            }
        }

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

    #[test]
    fn an_absurd_listen_fds_is_ignored_not_allocated() {
        assert!(activation_fds(Some("42"), Some("2147483647"), None, 42).is_empty());
        assert!(activation_fds(Some("42"), Some("1000000000"), None, 42).is_empty());
    }
}
