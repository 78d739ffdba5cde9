//! `--preload`: the zygote, a bootstrap process that imported uvicorn and
//! the app once and forks workers on request.
//!
//! The master talks to it over a private `SOCK_SEQPACKET` pair, one JSON
//! object per message:
//! * zygote → master: `{"ready": true, "pid": P}` once the app is imported;
//!   `{"spawned": {"slot": S, "pid": P}}` for each worker; `{"warning": "…"}`;
//!   `{"error": "…"}`;
//! * master → zygote: `{"spawn": {"slot": S, "generation": G, "env": {…}}}`.
//!
//! The zygote double-forks, so every worker is re-parented to the master
//! (a child subreaper, or PID 1) and supervised exactly like a cold-started
//! one; the worker's pid is reported before the worker proceeds, so the
//! master always knows a pid before it can send anything or exit.
//!
//! The zygote runs the app's import-time code, so what it reports is not
//! trusted: a reported pid becomes a [`crate::pid::ChildPid`] only once
//! [`crate::pid::verify_reported`] found it to be a fresh child of the
//! master owned by the workers' user.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::unistd::Pid;

use crate::procfs;

/// How long the master waits for the zygote to report a forked worker.
pub const SPAWN_REPLY: Duration = Duration::from_secs(2);

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
    },
    /// Something the operator should know (threads at import time, …).
    Warning(String),
    /// A request failed.
    Error(String),
    /// The channel closed: the zygote is exiting.
    Closed,
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
    /// gets the whole [`SPAWN_REPLY`]). The reply arrives on the channel
    /// like any message; the master never waits for it.
    pub pending: Option<Pending>,
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
    /// When the master gives up on the reply.
    pub fn deadline(&self) -> Instant {
        self.requested_at + SPAWN_REPLY
    }
}

/// The two ends of a fresh control channel: (master's, zygote's).
pub fn channel() -> Result<(OwnedFd, OwnedFd), Errno> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
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
            channel,
        }
    }

    /// The channel, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Every message waiting on the channel.
    pub fn drain(&self) -> Vec<FromZygote> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            match recv(self.channel.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    out.push(FromZygote::Closed);
                    break;
                }
                Ok(n) => out.extend(parse(&buf[..n])),
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
        now: Instant,
    ) -> Result<(), String> {
        let env: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let msg =
            serde_json::json!({"spawn": {"slot": slot, "generation": generation, "env": env}});
        let not_before = procfs::boot_ticks_now();
        let bytes = msg.to_string().into_bytes();
        send(self.channel.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        let table: &[(&str, Option<FromZygote>)] = &[
            (r#"{"ready": true, "pid": 5}"#, Some(FromZygote::Ready)),
            (
                r#"{"spawned": {"slot": 2, "pid": 77}}"#,
                Some(FromZygote::Spawned { slot: 2, pid: 77 }),
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
            FromZygote::Spawned { slot, pid } => {
                serde_json::json!({"spawned": {"slot": slot, "pid": pid}})
            }
            FromZygote::Warning(w) => serde_json::json!({ "warning": w }),
            FromZygote::Error(e) => serde_json::json!({ "error": e }),
            FromZygote::Closed => serde_json::Value::Null,
        }
    }

    fn message() -> impl Strategy<Value = FromZygote> {
        prop_oneof![
            Just(FromZygote::Ready),
            (any::<u32>(), any::<i64>()).prop_map(|(slot, pid)| FromZygote::Spawned {
                slot: slot as usize,
                pid
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
