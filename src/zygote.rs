//! `--preload`: the zygote, a bootstrap process that imported uvicorn and
//! the app once and forks workers on request.
//!
//! The master talks to it over a private `SOCK_SEQPACKET` pair, one JSON
//! object per message:
//! * zygote → master: `{"ready": true, "pid": P}` once the app is imported;
//!   `{"warning": "…"}` while it starts; `{"error": "…"}` for a spawn
//!   that failed;
//! * forked worker → master, on the channel it inherited:
//!   `{"spawned": {"slot": S, "pid": P}}`, P being its own pid;
//! * master → zygote: `{"spawn": {"slot": S, "generation": G, "env": {…},
//!   "sockets": [L…]}}`, with one descriptor passed (`SCM_RIGHTS`) for each
//!   L: the slot's own socket for listener L (`--reuse-port`), which takes
//!   the place of that listener's in the worker.
//!
//! The zygote double-forks, so every worker is re-parented to the master
//! (a child subreaper, or PID 1) and supervised exactly like a cold-started
//! one; the worker reports itself before it proceeds, so the master always
//! knows a pid before it can send anything or exit.
//!
//! The zygote runs the app's import-time code, so nothing on the channel is
//! trusted. The master's end has `SO_PASSCRED`: the kernel stamps every
//! message with its sender's pid, and a reply adopts the process that sent
//! it, only if it names itself (see `master/zygotes.rs` for the other
//! checks). Intake is bounded: at most [`MAX_BATCH`] messages per channel
//! per pass of the loop, each at most [`MAX_MESSAGE`] bytes; a longer one,
//! or one that does not parse, is dropped and counted.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixCredentials,
};
use nix::unistd::Pid;

use crate::procfs;

/// How long the master waits for the zygote to report a forked worker.
pub const SPAWN_REPLY: Duration = Duration::from_secs(2);

/// The same for a base zygote under `--reload`: between requests it imports
/// the app's third-party modules, one at a time, and one can take seconds
/// (torch, pandas); a request that arrives meanwhile waits for it. A hung
/// zygote is then found later, which development can afford.
pub const SPAWN_REPLY_LEARNING: Duration = Duration::from_secs(30);

/// The longest message the master reads from a zygote's channel (the
/// longest the bootstrap sends is a few hundred bytes); a longer one is
/// dropped.
pub const MAX_MESSAGE: usize = 8 * 1024;

/// The most messages the master reads from one channel per pass of its
/// loop: a flood delays signals, reaping and the endpoints by one batch
/// (at most 64 × 8 KiB read and parsed) at most.
pub const MAX_BATCH: usize = 64;

/// The most messages read from one channel per pass while a reply is
/// awaited, until it is found: a reply queued behind a full channel (its
/// send buffer holds a few hundred messages at most) is read in the same
/// pass, before the worker's READY=1 on the notify socket, which is only
/// attributed to a worker the master has adopted.
pub const MAX_BATCH_AWAITING: usize = 1024;

/// Who sent a message on a channel, as the kernel says (`SCM_CREDENTIALS`):
/// the zygote, a worker reporting itself, or any process that holds the
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub pid: i32,
    pub uid: u32,
}

/// A message from the zygote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromZygote {
    /// The app is imported; the zygote takes spawn requests.
    Ready,
    /// A worker was forked.
    Spawned {
        slot: usize,
        /// Its pid, as reported (unverified, maybe out of range).
        pid: i64,
        /// The pid of the process that sent the message, as the kernel
        /// says (`SCM_CREDENTIALS`); `None` when not known.
        sender: Option<i32>,
    },
    /// Something the operator should know (threads at import time, …).
    Warning(String),
    /// A request failed.
    Error(String),
    /// The channel closed: the zygote is exiting.
    Closed,
    /// A message that was dropped unread: too long, or not one of the
    /// above (the reason, for the count).
    Unreadable(&'static str),
}

/// Parses one datagram from the zygote. A pid that is not a positive
/// `pid_t` or a slot out of range makes the message unreadable (`None`):
/// truncating it could name another process, and pid 0 or -1 given to
/// kill(2) means a whole process group or every process.
pub fn parse(bytes: &[u8]) -> Option<FromZygote> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v.get("ready").and_then(|r| r.as_bool()) == Some(true) {
        return Some(FromZygote::Ready);
    }
    if let Some(s) = v.get("spawned") {
        return Some(FromZygote::Spawned {
            slot: s.get("slot")?.as_u64()? as usize,
            pid: s.get("pid")?.as_i64()?,
            sender: None,
        });
    }
    if let Some(w) = v.get("warning").and_then(|w| w.as_str()) {
        return Some(FromZygote::Warning(w.to_string()));
    }
    v.get("error")
        .and_then(|e| e.as_str())
        .map(|e| FromZygote::Error(e.to_string()))
}

/// The zygote's life stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZygoteState {
    /// Importing the app.
    Starting,
    /// Taking spawn requests.
    Ready,
    /// Asked to exit (or found broken); waiting to be reaped.
    Stopping,
}

/// One zygote process.
#[derive(Debug)]
pub struct Zygote {
    pub pid: Pid,
    /// The generation whose workers it forks.
    pub generation: u64,
    pub state: ZygoteState,
    pub started_at: Instant,
    /// The same, in [`procfs::boot_ticks_now`] units: a worker it reports
    /// cannot be older.
    pub started_ticks: u64,
    /// The error it reported before exiting (X_PROCMAN_ERROR).
    pub reported_error: Option<String>,
    /// The traceback that goes with it (X_PROCMAN_TRACEBACK).
    pub reported_traceback: Option<String>,
    /// Its end of the channel closed (it is exiting): no more polling, or
    /// the end-of-file would wake the loop forever.
    pub closed: bool,
    /// The spawn request it has not answered yet (one at a time: each
    /// gets the whole `reply_within`). The reply arrives on the channel
    /// like any message; the master never waits for it.
    pub pending: Option<Pending>,
    /// Requests given up on (no reply in time) whose reply may still
    /// come: each allows one late reply; any other is dropped.
    pub late: u32,
    /// Warnings taken in while it started (a few; the rest are dropped).
    pub warnings: u32,
    /// How long a spawn request may wait for its reply: [`SPAWN_REPLY`],
    /// or [`SPAWN_REPLY_LEARNING`].
    pub reply_within: Duration,
    /// Why procman itself killed it ("for the upgrade"), once it has: its
    /// SIGKILL is then not a mystery (nor perhaps the OOM killer's).
    pub kill_cause: Option<&'static str>,
    channel: OwnedFd,
}

/// A spawn request sent to a zygote, awaiting its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The slot asked for.
    pub slot: usize,
    /// The generation of the worker.
    pub generation: u64,
    /// When it was asked for (the worker's start, for its startup timeout).
    pub requested_at: Instant,
    /// The same in [`procfs::boot_ticks_now`] units: the reported worker
    /// cannot be older.
    pub not_before: u64,
}

impl Pending {
    /// When the master gives up on the reply, if the zygote gets `within`.
    pub fn deadline(&self, within: Duration) -> Instant {
        self.requested_at + within
    }
}

/// The two ends of a fresh control channel: (master's, zygote's). The
/// master's end is non-blocking (a zygote that stops reading cannot block a
/// request) and has `SO_PASSCRED` (each message comes with its sender's
/// pid).
pub fn channel() -> Result<(OwnedFd, OwnedFd), Errno> {
    let (master, zygote) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    setsockopt(&master, sockopt::PassCred, &true)?;
    // A descriptor app code in the zygote passes would get its final close
    // in the master's thread (the kernel releases what a receive has no
    // room for there), and a close can block (a lingering socket, a FUSE
    // file): refused by the kernel where it can (Linux 6.16 and later, as
    // for the notify socket; closer.rs); elsewhere the README says so.
    crate::closer::refuse_rights(master.as_fd());
    // SOCK_NONBLOCK set both ends (two open file descriptions); the
    // bootstrap makes its own end blocking again.
    Ok((master, zygote))
}

impl Zygote {
    /// Wraps a just-spawned zygote and the master's end of its channel.
    pub fn new(pid: Pid, generation: u64, channel: OwnedFd, now: Instant) -> Zygote {
        Zygote {
            pid,
            generation,
            state: ZygoteState::Starting,
            started_at: now,
            started_ticks: procfs::boot_ticks_now(),
            reported_error: None,
            reported_traceback: None,
            closed: false,
            pending: None,
            late: 0,
            warnings: 0,
            reply_within: SPAWN_REPLY,
            kill_cause: None,
            channel,
        }
    }

    /// The channel, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// The messages waiting on the channel, at most [`MAX_BATCH`] (or, while
    /// a reply is awaited, up to [`MAX_BATCH_AWAITING`] until a reply is
    /// read), each with its sender: the loop comes back for the rest after
    /// its other work (the channel is still readable, so its poll returns at
    /// once).
    pub fn drain(&self) -> Vec<(FromZygote, Option<Sender>)> {
        let mut out = Vec::new();
        // One byte more than the longest message: a message that fills it
        // was longer (or cut: MSG_TRUNC), and is dropped either way.
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut awaiting = self.pending.is_some() || self.late > 0;
        let mut limit = if awaiting {
            MAX_BATCH_AWAITING
        } else {
            MAX_BATCH
        };
        while out.len() < limit {
            match receive(self.channel.as_raw_fd(), &mut buf) {
                Ok(m) => {
                    let closed = m.0 == FromZygote::Closed;
                    let reply = matches!(m.0, FromZygote::Spawned { .. } | FromZygote::Error(_));
                    if awaiting && reply {
                        awaiting = false;
                        limit = MAX_BATCH.max(out.len() + 1);
                    }
                    out.push(m);
                    if closed {
                        break;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break, // EAGAIN: nothing more
            }
        }
        out
    }

    /// Asks for a worker; the reply (its pid, or an error) comes later as
    /// a message on the channel, and `pending` holds the request until then.
    /// The reported pid must then be a process with the workers' uids that
    /// the master can vouch for (see [`crate::pid::verify_reported`]).
    pub fn request(
        &mut self,
        slot: usize,
        generation: u64,
        env: &[(String, String)],
        sockets: &[(usize, RawFd)],
        now: Instant,
    ) -> Result<(), String> {
        let env: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let places: Vec<usize> = sockets.iter().map(|s| s.0).collect();
        let msg = serde_json::json!({"spawn": {
            "slot": slot, "generation": generation, "env": env, "sockets": places}});
        let not_before = procfs::boot_ticks_now();
        let bytes = msg.to_string().into_bytes();
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        // The slot's own sockets (--reuse-port) go with the request: the
        // kernel gives the zygote its own descriptors for them, and the
        // master keeps its copies.
        let fds: Vec<RawFd> = sockets.iter().map(|s| s.1).collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            self.channel.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            flags,
            None,
        )
        .map_err(|e| format!("cannot reach the zygote: {}", e.desc()))?;
        self.pending = Some(Pending {
            slot,
            generation,
            requested_at: now,
            not_before,
        });
        Ok(())
    }
}

/// One message from the channel `fd`, read into `buf` (of
/// [`MAX_MESSAGE`] + 1 bytes), with its sender.
fn receive(fd: i32, buf: &mut [u8]) -> Result<(FromZygote, Option<Sender>), Errno> {
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let mut iov = [IoSliceMut::new(buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let m = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), flags)?;
    let sender = m.cmsgs().ok().and_then(|mut c| {
        c.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(cred) => Some(Sender {
                pid: cred.pid(),
                uid: cred.uid(),
            }),
            _ => None,
        })
    });
    let (n, cut) = (m.bytes, m.flags.contains(MsgFlags::MSG_TRUNC));
    // End of file carries no credentials; an empty message does.
    if n == 0 && sender.is_none() {
        return Ok((FromZygote::Closed, None));
    }
    if cut || n > MAX_MESSAGE {
        return Ok((FromZygote::Unreadable("oversized"), sender));
    }
    let m = match parse(&buf[..n]) {
        Some(FromZygote::Spawned { slot, pid, .. }) => FromZygote::Spawned {
            slot,
            pid,
            sender: sender.map(|s| s.pid),
        },
        Some(m) => m,
        None => FromZygote::Unreadable("unreadable"),
    };
    Ok((m, sender))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::send;

    /// A channel and a zygote-side end to write to it.
    fn pair() -> (Zygote, OwnedFd) {
        let (master, zygote) = channel().expect("socketpair");
        (
            Zygote::new(Pid::from_raw(2), 1, master, Instant::now()),
            zygote,
        )
    }

    fn put(fd: &OwnedFd, bytes: &[u8]) {
        send(fd.as_raw_fd(), bytes, MsgFlags::empty()).expect("send");
    }

    #[test]
    fn a_zygote_cannot_pass_descriptors_to_the_master_where_the_kernel_refuses_them() {
        let (_master, zygote) = channel().expect("socketpair");
        let probe = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let refuses = crate::closer::refuse_rights(probe.1.as_fd());
        let file = std::fs::File::open("/dev/null").expect("open");
        let fds = [file.as_raw_fd()];
        let sent = nix::sys::socket::sendmsg::<()>(
            zygote.as_raw_fd(),
            &[std::io::IoSlice::new(b"{}")],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        );
        if refuses {
            assert_eq!(
                sent,
                Err(Errno::EPERM),
                "the master's end refuses SCM_RIGHTS"
            );
        } else {
            assert!(
                sent.is_ok(),
                "a kernel without SO_PASSRIGHTS lets them through"
            );
        }
    }

    #[test]
    fn a_batch_is_bounded_and_each_message_is_read_with_its_sender() {
        let (z, end) = pair();
        let me = std::process::id() as i32;
        put(
            &end,
            format!(r#"{{"spawned": {{"slot": 1, "pid": {me}}}}}"#).as_bytes(),
        );
        put(&end, &vec![b' '; MAX_MESSAGE + 1]);
        put(&end, b"not json");
        put(&end, b"");
        for _ in 0..MAX_BATCH {
            put(&end, br#"{"warning": "w"}"#);
        }
        let first = z.drain();
        assert_eq!(first.len(), MAX_BATCH, "one batch");
        let uid = nix::unistd::getuid().as_raw();
        assert!(
            first
                .iter()
                .all(|(_, s)| *s == Some(Sender { pid: me, uid })),
            "each with its sender"
        );
        let first: Vec<FromZygote> = first.into_iter().map(|(m, _)| m).collect();
        assert_eq!(
            &first[..4],
            &[
                FromZygote::Spawned {
                    slot: 1,
                    pid: me as i64,
                    sender: Some(me)
                },
                FromZygote::Unreadable("oversized"),
                FromZygote::Unreadable("unreadable"),
                FromZygote::Unreadable("unreadable"),
            ],
            "an empty message is not the end of the channel"
        );
        drop(end);
        let rest = z.drain();
        assert_eq!(rest.len(), 5, "the rest next time: {rest:?}");
        assert_eq!(rest.last(), Some(&(FromZygote::Closed, None)));
    }

    #[test]
    fn an_awaited_reply_behind_a_flood_is_read_in_one_pass() {
        let (mut z, end) = pair();
        z.pending = Some(Pending {
            slot: 1,
            generation: 1,
            requested_at: Instant::now(),
            not_before: 0,
        });
        // A full channel: its send buffer holds a few hundred messages.
        for _ in 0..100 {
            put(&end, br#"{"warning": "w"}"#);
        }
        put(&end, br#"{"spawned": {"slot": 1, "pid": 9}}"#);
        for _ in 0..100 {
            put(&end, br#"{"warning": "w"}"#);
        }
        let got = z.drain();
        assert_eq!(got.len(), 101, "up to the reply, then no more");
        assert!(matches!(got[100].0, FromZygote::Spawned { slot: 1, .. }));
        z.pending = None;
        assert_eq!(z.drain().len(), MAX_BATCH, "no reply awaited: one batch");
    }

    #[test]
    fn messages_parse() {
        let table: &[(&str, Option<FromZygote>)] = &[
            (r#"{"ready": true, "pid": 5}"#, Some(FromZygote::Ready)),
            (
                r#"{"spawned": {"slot": 2, "pid": 77}}"#,
                Some(FromZygote::Spawned {
                    slot: 2,
                    pid: 77,
                    sender: None,
                }),
            ),
            (
                r#"{"warning": "threads"}"#,
                Some(FromZygote::Warning("threads".into())),
            ),
            (
                r#"{"error": "boom"}"#,
                Some(FromZygote::Error("boom".into())),
            ),
            (
                r#"{"spawned": {"slot": 0, "pid": 4294967295}}"#,
                Some(FromZygote::Spawned {
                    slot: 0,
                    pid: 4294967295,
                    sender: None,
                }),
            ),
            (r#"{"spawned": {"slot": "x"}}"#, None),
            ("not json", None),
        ];
        for (text, want) in table {
            assert_eq!(&parse(text.as_bytes()), want, "{text}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A message as the bootstrap writes it.
    fn to_json(m: &FromZygote) -> serde_json::Value {
        match m {
            FromZygote::Ready => serde_json::json!({"ready": true, "pid": 7}),
            FromZygote::Spawned { slot, pid, .. } => {
                serde_json::json!({"spawned": {"slot": slot, "pid": pid}})
            }
            FromZygote::Warning(w) => serde_json::json!({ "warning": w }),
            FromZygote::Error(e) => serde_json::json!({ "error": e }),
            FromZygote::Closed | FromZygote::Unreadable(_) => serde_json::Value::Null,
        }
    }

    fn message() -> impl Strategy<Value = FromZygote> {
        prop_oneof![
            Just(FromZygote::Ready),
            (any::<u32>(), any::<i64>()).prop_map(|(slot, pid)| FromZygote::Spawned {
                slot: slot as usize,
                pid,
                sender: None,
            }),
            any::<String>().prop_map(FromZygote::Warning),
            any::<String>().prop_map(FromZygote::Error),
        ]
    }

    /// JSON shaped like the protocol, with numbers of any size and sign.
    fn json_like() -> impl Strategy<Value = Vec<u8>> {
        let number = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("\"7\"".to_string()),
            Just("null".to_string()),
        ];
        (number.clone(), number).prop_map(|(slot, pid)| {
            format!(r#"{{"spawned": {{"slot": {slot}, "pid": {pid}}}}}"#).into_bytes()
        })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn any_bytes_are_parsed_or_ignored_without_panic(
            bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), json_like()],
        ) {
            // Whatever pid it names is checked by pid::verify_reported.
            let _ = parse(&bytes);
        }

        #[test]
        fn messages_as_the_bootstrap_writes_them_parse_back(m in message()) {
            let bytes = to_json(&m).to_string().into_bytes();
            prop_assert_eq!(parse(&bytes), Some(m));
        }
    }
}
