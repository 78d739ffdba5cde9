//! sd_notify both ways: workers → procman (the receiver) and procman →
//! systemd (the sender).
//!
//! Receiver invariants:
//! * the socket lives at a path in a private 0700 directory, so only
//!   processes that can reach that directory (workers, their user) can send;
//! * the directory gets an unpredictable name (`mkdtemp`), in the first of
//!   `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR`, `$TMPDIR` (or `/tmp`) that
//!   the workers' user can traverse (root's `/run/user/0` is 0700: a
//!   `--user` worker could never reach a socket there); none reachable is
//!   an error at start naming the directories and the user;
//! * with `--user`, the socket is handed to the user before the directory
//!   (once the user owns the directory, it could swap the socket file),
//!   both through descriptors that do not follow symlinks;
//! * at exit procman removes only the directory it made (the path must
//!   still name that inode): a shared `/tmp` may hold other procmans'
//!   directories, e.g. from other PID namespaces;
//! * the sender is whoever `SCM_CREDENTIALS` says it is (the kernel fills it
//!   in because `SO_PASSCRED` is on), never what the payload claims;
//! * file descriptors passed with `SCM_RIGHTS` are refused by the kernel
//!   where it can (`SO_PASSRIGHTS`), else never closed last by the master
//!   (see closer.rs);
//! * truncated datagrams and payloads with NUL bytes are dropped whole,
//!   and only the first [`MAX_LINES`] lines of a datagram are read;
//! * it is read one datagram at a time ([`Receiver::receive`], one reused
//!   buffer): the master bounds how many it reads per pass of its loop.
//!
//! The master reads this socket before reaping children, so a `READY=1`
//! sent just before a worker exits is still attributed to it. It does not
//! always read a datagram as it arrives (an idle master reads heartbeats in
//! batches, see master/messages.rs), so each datagram carries the kernel's
//! time of sending (`SO_TIMESTAMPNS`, stamped when the datagram is queued):
//! a heartbeat counts from when it was sent, not from when it was read.
//! The queue holds at most `net.unix.max_dgram_qlen` datagrams (read when
//! the socket is made: the kernel copies the value into each new socket),
//! after which a worker's non-blocking send fails with `EAGAIN`.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::error::{Error, Result};
use crate::identity::Credentials;
use crate::safefs::{self, FileId, Kind};

/// One parsed notification line that procman acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `READY=1`.
    Ready,
    /// `RELOADING=1`: not ready until the next READY=1.
    Reloading,
    /// `STOPPING=1`: draining.
    Stopping,
    /// `WATCHDOG=1`: heartbeat.
    Heartbeat,
    /// `WATCHDOG=trigger`: treat as a timeout.
    WatchdogTrigger,
    /// `STATUS=…`.
    Status(String),
    /// `ERRNO=…`.
    Errno(String),
    /// `EXTEND_TIMEOUT_USEC=…`.
    ExtendTimeout(Duration),
    /// `X_PROCMAN_RECYCLE=reason`: the worker asks to be replaced.
    Recycle(String),
    /// `X_PROCMAN_ERROR=text`: why the worker is about to fail (shown in
    /// procman's own exit message, e.g. the app's import error).
    Error(String),
    /// `X_PROCMAN_TRACEBACK="json string"`: the traceback that goes with
    /// it, which the master logs (once, for the first failing worker).
    Traceback(String),
}

/// The lines of one datagram that are read; the rest are dropped (and
/// counted). The bootstrap sends at most 3 per datagram; systemd's
/// `sd_notify` users a handful.
pub const MAX_LINES: usize = 16;

/// Parses a datagram's payload into the messages procman understands.
/// Unknown keys and malformed lines are ignored, as systemd does. Only the
/// first [`MAX_LINES`] lines are read.
pub fn parse(payload: &str) -> Vec<Message> {
    payload
        .split('\n')
        .take(MAX_LINES)
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            Some(match (key, value) {
                ("READY", "1") => Message::Ready,
                ("RELOADING", "1") => Message::Reloading,
                ("STOPPING", "1") => Message::Stopping,
                ("WATCHDOG", "1") => Message::Heartbeat,
                ("WATCHDOG", "trigger") => Message::WatchdogTrigger,
                ("STATUS", s) => Message::Status(s.to_string()),
                ("ERRNO", s) => Message::Errno(s.to_string()),
                ("EXTEND_TIMEOUT_USEC", us) => {
                    Message::ExtendTimeout(Duration::from_micros(us.trim().parse().ok()?))
                }
                ("X_PROCMAN_RECYCLE", why) => Message::Recycle(why.to_string()),
                ("X_PROCMAN_ERROR", text) => Message::Error(text.to_string()),
                ("X_PROCMAN_TRACEBACK", json) => {
                    Message::Traceback(serde_json::from_str::<String>(json).ok()?)
                }
                _ => return None,
            })
        })
        .collect()
}

/// Why a datagram's payload was dropped whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// It holds a NUL byte (sd_notify payloads are text).
    Nul,
    /// It is not UTF-8.
    NotUtf8,
}

/// Parses a datagram's raw payload: NUL bytes or bytes that are not UTF-8
/// drop it whole (a half-understood notification is worse than none).
pub fn parse_datagram(payload: &[u8]) -> std::result::Result<Vec<Message>, Dropped> {
    if payload.contains(&0) {
        return Err(Dropped::Nul);
    }
    let text = std::str::from_utf8(payload).map_err(|_| Dropped::NotUtf8)?;
    Ok(parse(text))
}

/// The lines past [`MAX_LINES`] that [`parse`] leaves unread (empty ones,
/// such as after a final newline, not counted).
pub fn excess_lines(payload: &[u8]) -> usize {
    payload
        .split(|b| *b == b'\n')
        .skip(MAX_LINES)
        .filter(|l| !l.is_empty())
        .count()
}

impl std::fmt::Display for Message {
    /// The notification line, as a worker sends it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Ready => f.write_str("READY=1"),
            Message::Reloading => f.write_str("RELOADING=1"),
            Message::Stopping => f.write_str("STOPPING=1"),
            Message::Heartbeat => f.write_str("WATCHDOG=1"),
            Message::WatchdogTrigger => f.write_str("WATCHDOG=trigger"),
            Message::Status(s) => write!(f, "STATUS={s}"),
            Message::Errno(s) => write!(f, "ERRNO={s}"),
            Message::ExtendTimeout(d) => write!(f, "EXTEND_TIMEOUT_USEC={}", d.as_micros()),
            Message::Recycle(s) => write!(f, "X_PROCMAN_RECYCLE={s}"),
            Message::Error(s) => write!(f, "X_PROCMAN_ERROR={s}"),
            // A JSON string: one line, whatever the traceback holds.
            Message::Traceback(s) => write!(
                f,
                "X_PROCMAN_TRACEBACK={}",
                serde_json::Value::String(s.clone())
            ),
        }
    }
}

/// A datagram received from some process.
#[derive(Debug)]
pub struct Datagram {
    /// The sender's pid, from SCM_CREDENTIALS.
    pub pid: i32,
    /// The sender's uid, from SCM_CREDENTIALS.
    pub uid: u32,
    /// At most [`MAX_LINES`].
    pub messages: Vec<Message>,
    /// How long ago it was sent, by the kernel's timestamp (zero if it had
    /// none, or if the wall clock was stepped back meanwhile).
    pub age: Duration,
}

/// Why (part of) a received datagram was not handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Discard {
    /// Truncated (too long for the buffer, or its control data did not fit).
    Truncated,
    /// Without the sender's credentials.
    NoCredentials,
    /// NUL bytes or not UTF-8.
    Malformed,
    /// Lines past [`MAX_LINES`] (counted per line).
    ExcessLines,
    /// Descriptors passed with it (counted per descriptor).
    Descriptors,
    /// From a process that is no worker and no worker's descendant.
    NotAWorker,
}

impl Discard {
    pub const ALL: [Discard; 6] = [
        Discard::Truncated,
        Discard::NoCredentials,
        Discard::Malformed,
        Discard::ExcessLines,
        Discard::Descriptors,
        Discard::NotAWorker,
    ];

    /// The metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Discard::Truncated => "truncated",
            Discard::NoCredentials => "no-credentials",
            Discard::Malformed => "malformed",
            Discard::ExcessLines => "excess-lines",
            Discard::Descriptors => "descriptors",
            Discard::NotAWorker => "not-a-worker",
        }
    }
}

/// One datagram taken off the queue.
#[derive(Debug)]
pub struct Receipt {
    /// Its payload's length.
    pub bytes: usize,
    /// The sender, when the kernel said (pid, uid).
    pub sender: Option<(i32, u32)>,
    /// What it holds, if anything is to be handled.
    pub datagram: Option<Datagram>,
    /// What of it was discarded, with how many (datagrams, lines or
    /// descriptors).
    pub discarded: Vec<(Discard, usize)>,
}

/// The receiving socket workers send to.
pub struct Receiver {
    fd: OwnedFd,
    dir: PathBuf,
    /// The directory procman made, open: the socket is removed through it
    /// (whatever the path names by then), and the directory itself only
    /// while its path still names this inode.
    dir_fd: OwnedFd,
    dir_id: FileId,
    path: PathBuf,
    /// `net.unix.max_dgram_qlen` when the socket was made.
    queue_limit: usize,
    /// The payload buffer, reused by every read.
    buf: Vec<u8>,
    /// The control buffer, reused by every read.
    control: Vec<u8>,
    /// Whether the kernel refuses descriptors sent to the socket
    /// (`SO_PASSRIGHTS`).
    refuses_rights: bool,
    /// Where passed descriptors go when it does not.
    rights: crate::closer::Disposer,
}

/// The queue limit of a unix datagram socket when `/proc` does not say:
/// the kernel's own default.
pub const DEFAULT_QUEUE_LIMIT: usize = 10;

/// `net.unix.max_dgram_qlen` of this network namespace, as new sockets
/// get it. The kernel refuses a datagram only when more than this many
/// are queued, so the socket holds one more; the master counts on this
/// many.
fn queue_limit() -> usize {
    std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_QUEUE_LIMIT)
}

/// Name of the socket inside the notify directory.
const SOCKET_NAME: &str = "notify.sock";

impl Receiver {
    /// Creates the private directory and binds the socket in it.
    /// `owner` (the workers' user) gets the socket and then the directory
    /// when workers drop privileges, since connecting needs write
    /// permission on the file.
    pub fn create(owner: Option<&Credentials>) -> Result<Receiver> {
        Receiver::create_with(owner, true)
    }

    /// As [`Receiver::create`]; `refuse_rights: false` leaves
    /// `SO_PASSRIGHTS` alone, as on a kernel without it (tests of the
    /// fallback).
    pub(crate) fn create_with(
        owner: Option<&Credentials>,
        refuse_rights: bool,
    ) -> Result<Receiver> {
        let base = notify_base(owner)?;
        let fail =
            |what: &str, e: &dyn std::fmt::Display| Error::runtime(format!("cannot {what}: {e}"));
        // mkdtemp: a fresh 0700 directory under an unpredictable name, so
        // nothing can be planted there in advance and no other procman's
        // directory (same pid in another PID namespace) is ever reused.
        let dir = nix::unistd::mkdtemp(&base.join("procman-XXXXXX")).map_err(|e| {
            fail(
                &format!("create the notify directory in {}", base.display()),
                &e.desc(),
            )
        })?;
        let made = safefs::open_own(&dir, Kind::Directory)
            .map_err(|e| fail(&format!("open the notify directory {}", dir.display()), &e));
        let (dir_file, dir_id) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let dir_fd = OwnedFd::from(dir_file);
        let path = dir.join(SOCKET_NAME);
        // Read before the socket is made, which copies the value.
        let queue_limit = queue_limit();
        match bind_socket(&path, &dir_fd, owner) {
            Ok(fd) => Ok(Receiver::around(
                fd,
                dir,
                dir_fd,
                dir_id,
                path,
                queue_limit,
                refuse_rights,
            )),
            Err(e) => {
                remove_made_dir(&dir, &dir_fd, dir_id);
                Err(e)
            }
        }
    }

    /// Its description for an upgraded image (`crate::upgrade`).
    pub fn record(&self) -> crate::upgrade::SocketRecord {
        crate::upgrade::SocketRecord {
            fd: self.fd.as_raw_fd(),
            dir_fd: self.dir_fd.as_raw_fd(),
            dir: self.dir.clone(),
            path: self.path.clone(),
            queue_limit: self.queue_limit,
        }
    }

    /// The socket an earlier image described, its descriptors `fd` and
    /// `dir_fd` (`r.fd`, `r.dir_fd`) taken over by the caller.
    pub fn adopt(
        r: &crate::upgrade::SocketRecord,
        fd: OwnedFd,
        dir_fd: OwnedFd,
    ) -> std::result::Result<Receiver, String> {
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", dir_fd.as_raw_fd()))
            .map_err(|e| format!("notify directory {}: {e}", r.dir.display()))?;
        // The socket kept its options across the exec; asking again for
        // SO_PASSRIGHTS=0 only learns whether the kernel has it.
        Ok(Receiver::around(
            fd,
            r.dir.clone(),
            dir_fd,
            FileId::of(&meta),
            r.path.clone(),
            r.queue_limit,
            true,
        ))
    }

    /// A receiver around a bound socket in its directory, with its reused
    /// buffers.
    fn around(
        fd: OwnedFd,
        dir: PathBuf,
        dir_fd: OwnedFd,
        dir_id: FileId,
        path: PathBuf,
        queue_limit: usize,
        refuse_rights: bool,
    ) -> Receiver {
        Receiver {
            refuses_rights: refuse_rights && crate::closer::refuse_rights(fd.as_fd()),
            fd,
            dir,
            dir_fd,
            dir_id,
            path,
            queue_limit,
            // Room for a traceback (the bootstrap sends at most 60000
            // bytes).
            buf: vec![0u8; 64 * 1024],
            // Credentials, the send time and the most descriptors one
            // message carries: anything that does not fit truncates
            // (MSG_CTRUNC) the datagram, and descriptors that do not fit
            // would be released by the kernel in the master.
            control: nix::cmsg_space!(
                libc::ucred,
                libc::timespec,
                [std::os::fd::RawFd; crate::closer::MAX_FDS_PER_MESSAGE]
            ),
            rights: crate::closer::Disposer::default(),
        }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// How many datagrams the socket queues before a send to it fails.
    pub fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    /// Whether the kernel refuses descriptors sent to the socket.
    pub fn refuses_rights(&self) -> bool {
        self.refuses_rights
    }

    /// The process that closes passed descriptors, if one runs (only where
    /// the kernel does not refuse them).
    pub fn closer(&self) -> Option<nix::unistd::Pid> {
        self.rights.closer()
    }

    /// Takes one datagram off the queue, if one is there. A malformed one
    /// comes back without a datagram, and what was discarded says why.
    pub fn receive(&mut self) -> Option<Receipt> {
        loop {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            let received = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut self.control),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let mut fds: Vec<std::os::fd::RawFd> = Vec::new();
            let (len, flags, cred, sent) = match received {
                Ok(msg) => {
                    let mut cred = None;
                    let mut sent = None;
                    for c in msg.cmsgs().into_iter().flatten() {
                        match c {
                            ControlMessageOwned::ScmCredentials(c) => {
                                cred = Some((c.pid(), c.uid()))
                            }
                            ControlMessageOwned::ScmTimestampns(ts) => sent = Some(ts),
                            ControlMessageOwned::ScmRights(passed) => fds.extend(passed),
                            _ => {}
                        }
                    }
                    (msg.bytes, msg.flags, cred, sent)
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return None,
                Err(e) => {
                    tracing::debug!("notify socket receive failed: {}", e.desc());
                    return None;
                }
            };
            let mut receipt = Receipt {
                bytes: len,
                sender: cred.filter(|(pid, _)| *pid > 0),
                datagram: None,
                discarded: Vec::new(),
            };
            // Never closed here: a close can block (closer.rs).
            if !fds.is_empty() {
                self.rights.dispose(&fds);
                receipt.discarded.push((Discard::Descriptors, fds.len()));
            }
            if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
                receipt.discarded.push((Discard::Truncated, 1));
                return Some(receipt);
            }
            let Some((pid, uid)) = receipt.sender else {
                receipt.discarded.push((Discard::NoCredentials, 1));
                return Some(receipt);
            };
            // The kernel never reports more than the buffer.
            let payload = self.buf.get(..len).unwrap_or_default();
            match parse_datagram(payload) {
                Ok(messages) => {
                    let excess = excess_lines(payload);
                    if excess > 0 {
                        receipt.discarded.push((Discard::ExcessLines, excess));
                    }
                    receipt.datagram = Some(Datagram {
                        pid,
                        uid,
                        messages,
                        age: sent.map_or(Duration::ZERO, age_of),
                    });
                }
                Err(Dropped::Nul | Dropped::NotUtf8) => {
                    receipt.discarded.push((Discard::Malformed, 1))
                }
            }
            return Some(receipt);
        }
    }
}

/// How long ago a kernel timestamp was taken. The stamp is wall-clock time
/// (`CLOCK_REALTIME`, the only clock `SO_TIMESTAMPNS` offers), so a step of
/// the clock between the send and now skews it; the master bounds the
/// result by its previous read of the queue.
fn age_of(sent: nix::sys::time::TimeSpec) -> Duration {
    let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME) else {
        return Duration::ZERO;
    };
    let sent = Duration::new(sent.tv_sec().max(0) as u64, sent.tv_nsec().max(0) as u32);
    let now = Duration::new(now.tv_sec().max(0) as u64, now.tv_nsec().max(0) as u32);
    now.saturating_sub(sent)
}

impl Drop for Receiver {
    fn drop(&mut self) {
        remove_made_dir(&self.dir, &self.dir_fd, self.dir_id);
        // Closing the socket releases what is still queued, descriptors
        // included, here: where the kernel passes them, they go to the
        // closer first (the path is gone, so no sender can add more; a
        // bounded number of reads, whatever is sent meanwhile).
        if !self.refuses_rights {
            for _ in 0..=self.queue_limit {
                if self.receive().is_none() {
                    break;
                }
            }
        }
    }
}

mod dir;
mod sender;
pub use dir::notify_base;
use dir::{bind_socket, remove_made_dir};
pub use sender::{monotonic_usec, SystemdNotifier};

#[cfg(test)]
mod tests;
