//! A small non-blocking server for the master's own loop: the metrics
//! endpoint (`--metrics`) and the control socket (`--control-socket`).
//!
//! The master is single-threaded, so nothing here may ever block it: the
//! listener and every connection are non-blocking, each pass of
//! [`Server::service`] does a bounded amount of work (a bounded number of
//! accepts, reads of at most [`MAX_REQUEST`] bytes and one write per
//! connection), a connection holds at most [`MAX_REQUEST`] bytes of
//! request, and each has a deadline after which it is closed whatever it
//! is doing. At most [`MAX_CONNS`] connections are open; a new one beyond
//! that evicts the oldest, so a flood of idle connections cannot lock out
//! an honest probe.
//!
//! An honest probe costs the master one wake-up. A TCP listener has
//! `TCP_DEFER_ACCEPT`: the kernel completes the handshake but reports the
//! listener readable only once the client's first bytes have arrived, so
//! the pass that accepts a connection also reads its whole request (the
//! read goes on until the socket is empty), answers it, and closes the
//! connection once the answer is written (`Connection: close`, no
//! keep-alive). The price: a TCP client that connects and sends nothing is
//! invisible to the master until the kernel's defer period ends (about
//! [`DEFER_ACCEPT_SECS`] seconds, rounded up by the kernel to its SYN-ACK
//! retransmission schedule, 7 s for 5); only then is it accepted and given
//! its read deadline. That costs the master nothing meanwhile and takes no
//! slot from an honest probe; a flood of them fills the kernel's SYN queue,
//! beyond which SYN cookies complete connections without the deferral
//! (they are accepted at once and dealt with by the bound and the
//! deadline). A unix socket has no such option: a connection is accepted
//! as soon as it is made and read in the same pass, so a client that wrote
//! its request before the master ran costs one wake-up, one that had not
//! yet written costs a second when its bytes arrive.
//!
//! A burst costs the loop one bounded pass at a time: each pass handles
//! at most [`ANSWERS_PER_PASS`] whole requests, and what is left stays in
//! the kernel (unread bytes, unaccepted connections), which keeps the
//! descriptors readable, so the loop's next `poll` returns at once, after
//! the master has handled its signals and reaped its children.
//!
//! A unix socket (`--control-socket`, `--metrics unix:PATH`) is made by
//! the same code as a `--bind unix:` socket ([`crate::bind::bind_unix_file`]):
//! its mode is set by the umask at bind(2), a stale file is replaced only
//! when connecting to it is refused, and at exit the file is removed only
//! while the path still names it.
//!
//! Framing is the caller's: [`Server::service`] hands each connection's
//! bytes to a function that says whether a whole request is there and, if
//! so, what to answer — now, or later (a control request that waits for a
//! reload), by [`Server::reply`].

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::safefs::FileId;

/// Open connections at most.
pub const MAX_CONNS: usize = 64;
/// Bytes of one request at most (HTTP request line and headers, or one
/// control line).
pub const MAX_REQUEST: usize = 8192;
/// Accepts per pass at most, so a connection flood cannot hold the loop.
const ACCEPTS_PER_PASS: usize = 128;
/// Requests answered (or taken on, for a later answer) per pass at most,
/// so a burst of scrapes cannot hold the loop: the rest are answered by
/// the next passes, each after the master's signals and reaping.
pub const ANSWERS_PER_PASS: usize = 16;
/// listen(2) backlog of a unix endpoint socket.
const UNIX_BACKLOG: i32 = 128;
/// `TCP_DEFER_ACCEPT` of a TCP listener: how long the kernel keeps a
/// connection that has sent nothing from `accept(2)`.
pub const DEFER_ACCEPT_SECS: u32 = 5;

/// A listening socket, TCP or unix.
pub enum Listen {
    /// `HOST:PORT`.
    Tcp(TcpListener),
    /// `unix:PATH`; the file is removed when the server is dropped, if the
    /// path still names the socket file made for it (its identity).
    Unix(UnixListener, PathBuf, FileId),
}

impl Listen {
    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listen::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listen::Unix(l, ..) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listen::Tcp(l) => l.as_fd(),
            Listen::Unix(l, ..) => l.as_fd(),
        }
    }
}

/// A connected socket.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true),
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }

    /// The uid of the peer of a unix connection.
    pub fn peer_uid(&self) -> Option<u32> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Unix(s) => {
                nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.uid())
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the framing function says about the bytes received so far.
pub enum Framed {
    /// Not a whole request yet.
    Incomplete,
    /// Answer this and close.
    Reply(Vec<u8>),
    /// The answer comes later, by [`Server::reply`] with this connection's
    /// id; the read deadline no longer applies.
    Later,
}

struct Conn {
    id: u64,
    stream: Stream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Closed when this passes (unless waiting for a later answer).
    deadline: Instant,
    waiting: bool,
    opened: Instant,
}

/// A listener and its bounded set of connections.
pub struct Server {
    listen: Listen,
    conns: Vec<Conn>,
    next_id: u64,
    timeout: Duration,
}

impl Server {
    /// Serves on an already-bound, non-blocking listener; each connection
    /// gets `timeout` to send its request and read the answer.
    pub fn new(listen: Listen, timeout: Duration) -> Server {
        Server {
            listen,
            conns: Vec::new(),
            next_id: 1,
            timeout,
        }
    }

    /// Binds `HOST:PORT` or `unix:PATH` (mode `mode`), non-blocking.
    pub fn bind(addr: &str, mode: u32, timeout: Duration) -> std::io::Result<Server> {
        let listen = match addr.strip_prefix("unix:") {
            Some(path) => {
                let path = PathBuf::from(path);
                let (l, id) = bind_unix(&path, mode)?;
                Listen::Unix(l, path, id)
            }
            None => {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                defer_accept(&l, DEFER_ACCEPT_SECS)?;
                Listen::Tcp(l)
            }
        };
        Ok(Server::new(listen, timeout))
    }

    /// Where it listens: `HOST:PORT` (the real port when 0 was asked) or
    /// `unix:PATH`.
    pub fn address(&self) -> String {
        match &self.listen {
            Listen::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listen::Unix(_, p, _) => format!("unix:{}", p.display()),
        }
    }

    /// The TCP port it listens on (tests bind port 0).
    pub fn local_port(&self) -> Option<u16> {
        match &self.listen {
            Listen::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listen::Unix(..) => None,
        }
    }

    /// The file descriptors to poll and for what: the listener for input,
    /// each connection for input or (with an answer pending) output.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, bool)> {
        let mut out = vec![(self.listen.fd(), false)];
        out.extend(
            self.conns
                .iter()
                .filter(|c| !c.waiting || !c.output.is_empty())
                .map(|c| (c.stream.fd(), !c.output.is_empty())),
        );
        out
    }

    /// When the earliest connection is due to be closed.
    pub fn deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter(|c| !c.waiting)
            .map(|c| c.deadline)
            .min()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// One pass: accept what is pending (bounded), read what each
    /// connection sent, answer whole requests, write pending answers, and
    /// close finished and overdue connections. `frame` is given the
    /// connection's id, its bytes so far and the stream (for the peer's
    /// credentials). Never blocks.
    pub fn service(&mut self, now: Instant, mut frame: impl FnMut(u64, &[u8], &Stream) -> Framed) {
        let mut buf = [0u8; 4096];
        // Requests handled this pass: at most ANSWERS_PER_PASS. What is
        // left waits in the kernel (unread bytes, unaccepted connections),
        // which keeps its descriptor readable: the loop's next poll
        // returns at once, after signals and reaping.
        let mut budget = ANSWERS_PER_PASS;
        // Connections already open first (they have waited longest).
        for c in &mut self.conns {
            if budget > 0
                && c.output.is_empty()
                && !c.waiting
                && read_request(c, &mut buf, now, &mut frame)
            {
                budget -= 1;
            }
        }
        for _ in 0..ACCEPTS_PER_PASS {
            if budget == 0 {
                break;
            }
            match self.listen.accept() {
                Ok(stream) => {
                    if stream.set_nonblocking().is_err() {
                        continue;
                    }
                    if self.conns.len() >= MAX_CONNS {
                        // Evict the oldest connection that is not waiting for
                        // a later answer (an idle one, most likely hostile).
                        if let Some(i) = self
                            .conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| !c.waiting && c.output.is_empty())
                            .min_by_key(|(_, c)| c.opened)
                            .map(|(i, _)| i)
                        {
                            self.conns.swap_remove(i);
                        } else {
                            continue; // drop the new one
                        }
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let mut c = Conn {
                        id,
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        written: 0,
                        deadline: now + self.timeout,
                        waiting: false,
                        opened: now,
                    };
                    if read_request(&mut c, &mut buf, now, &mut frame) {
                        budget -= 1;
                    }
                    self.conns.push(c);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break, // WouldBlock, or a transient error (EMFILE…)
            }
        }
        self.flush(now);
    }

    /// Writes pending answers only (reads and accepts nothing), and
    /// closes what is finished.
    pub fn flush(&mut self, now: Instant) {
        for c in self.conns.iter_mut().filter(|c| !c.output.is_empty()) {
            match c.stream.write(&c.output[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if would_block(&e) => {}
                Err(_) => c.deadline = now,
            }
            if c.written >= c.output.len() {
                c.deadline = now;
                c.waiting = false;
            }
        }
        self.conns
            .retain(|c| c.waiting && c.output.is_empty() || c.deadline > now);
    }

    /// Answers a connection that was told [`Framed::Later`]; the answer
    /// is written by the next passes of [`Server::service`].
    pub fn reply(&mut self, id: u64, bytes: Vec<u8>, now: Instant) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            c.output = bytes;
            c.written = 0;
            c.deadline = now + self.timeout;
            c.waiting = false;
        }
    }

    /// The ids of connections waiting for a later answer.
    pub fn waiting(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|c| c.waiting)
            .map(|c| c.id)
            .collect()
    }

    /// Takes a connection out (its answer comes from elsewhere: an
    /// upgraded image), as its descriptor, made blocking.
    pub fn take(&mut self, id: u64) -> Option<OwnedFd> {
        let i = self.conns.iter().position(|c| c.id == id)?;
        let c = self.conns.swap_remove(i);
        let fd: OwnedFd = match c.stream {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        };
        let _ = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        );
        Some(fd)
    }

    /// Its description for an upgraded image: the listener's descriptor,
    /// and the socket file's path and identity for a unix one.
    pub fn record(&self) -> crate::upgrade::EndpointRecord {
        crate::upgrade::EndpointRecord {
            fd: self.listen.fd().as_raw_fd(),
            unix: match &self.listen {
                Listen::Tcp(_) => None,
                Listen::Unix(_, p, id) => {
                    let (dev, ino) = id.parts();
                    Some((p.clone(), dev, ino))
                }
            },
        }
    }

    /// Raw fd of the listener (for tests and diagnostics).
    pub fn listener_fd(&self) -> RawFd {
        self.listen.fd().as_raw_fd()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Listen::Unix(_, path, id) = &self.listen {
            crate::safefs::remove_if_same(path, *id);
        }
    }
}

/// Reads what `c` has sent, until the socket is empty, the request is
/// whole, or it is too long (each read adds at least one byte, so this
/// ends within [`MAX_REQUEST`] bytes): a request that arrived with its
/// connection is answered in the pass that accepts it, whatever its size.
/// Whether a whole request was framed (answered, or taken on for later).
fn read_request(
    c: &mut Conn,
    buf: &mut [u8],
    now: Instant,
    frame: &mut impl FnMut(u64, &[u8], &Stream) -> Framed,
) -> bool {
    loop {
        match c.stream.read(buf) {
            Ok(0) => c.deadline = now, // peer closed before asking
            Ok(n) => {
                let room = MAX_REQUEST.saturating_sub(c.input.len());
                c.input.extend_from_slice(&buf[..n.min(room)]);
                match frame(c.id, &c.input, &c.stream) {
                    Framed::Incomplete if c.input.len() >= MAX_REQUEST => {
                        c.deadline = now; // too long: close
                    }
                    Framed::Incomplete => continue,
                    Framed::Reply(bytes) => {
                        c.output = bytes;
                        return true;
                    }
                    Framed::Later => {
                        c.waiting = true;
                        return true;
                    }
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => c.deadline = now,
        }
        return false;
    }
}

/// Sets `TCP_DEFER_ACCEPT` on a listening TCP socket: the kernel reports
/// it readable only once a connection's first bytes have arrived (or,
/// for one that sends nothing, after about `secs` seconds).
fn defer_accept(l: &TcpListener, secs: u32) -> std::io::Result<()> {
    let value = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live
    // c_int on our stack; the descriptor is the listener's, open for the
    // duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Binds a unix socket at `path` with permissions `mode` from the start,
/// non-blocking, by the same steps as a `--bind unix:` socket
/// ([`crate::bind::bind_unix_file`]): a stale socket file (connecting to
/// it is refused) is replaced, a live one or any other file is an error,
/// and the file is removed at exit only while the path still names it.
fn bind_unix(path: &Path, mode: u32) -> std::io::Result<(UnixListener, FileId)> {
    let (sock, id) = crate::bind::bind_unix_file(path, UNIX_BACKLOG, !mode & 0o777, None)
        .map_err(std::io::Error::other)?;
    let l = UnixListener::from(std::os::fd::OwnedFd::from(sock));
    if let Err(e) = l.set_nonblocking(true) {
        crate::safefs::remove_if_same(path, id);
        return Err(e);
    }
    Ok((l, id))
}

#[cfg(test)]
mod tests;
