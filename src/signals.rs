//! The only user of signal-hook: signals become bytes on a self-pipe, and
//! the master loop turns them into [`MasterSignal`]s.
//!
//! The handlers installed by signal-hook only record the signal and write
//! to the pipe (async-signal-safe); all work happens in the loop. Signals of
//! one kind that arrive before the loop drains them coalesce, as the kernel
//! coalesces standard signals anyway.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use signal_hook::consts::signal::*;
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

use crate::error::{Error, Result};

/// What a signal asks the master to do (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterSignal {
    /// TERM: graceful stop.
    Terminate,
    /// INT: quick stop.
    Interrupt,
    /// QUIT: quick stop.
    Quit,
    /// HUP: rolling reload.
    Reload,
    /// TTIN: one worker more.
    MoreWorkers,
    /// TTOU: one worker fewer.
    FewerWorkers,
    /// USR1: reopen the log file, forward to workers.
    ReopenLogs,
    /// USR2: in-place upgrade (not supported; logged).
    Upgrade,
    /// WINCH: ignored.
    WindowChanged,
    /// CHLD: reap.
    ChildExited,
}

/// Every signal the master handles, and its meaning.
pub const HANDLED: &[(i32, MasterSignal)] = &[
    (SIGTERM, MasterSignal::Terminate),
    (SIGINT, MasterSignal::Interrupt),
    (SIGQUIT, MasterSignal::Quit),
    (SIGHUP, MasterSignal::Reload),
    (SIGTTIN, MasterSignal::MoreWorkers),
    (SIGTTOU, MasterSignal::FewerWorkers),
    (SIGUSR1, MasterSignal::ReopenLogs),
    (SIGUSR2, MasterSignal::Upgrade),
    (SIGWINCH, MasterSignal::WindowChanged),
    (SIGCHLD, MasterSignal::ChildExited),
];

/// The self-pipe and its handlers.
pub struct Signals {
    delivery: SignalDelivery<UnixStream, SignalOnly>,
}

impl Signals {
    /// Installs the handlers. Call before the first fork, so no signal sent
    /// to a just-started worker's parent is lost.
    pub fn install() -> Result<Signals> {
        let (read, write) = UnixStream::pair()
            .map_err(|e| Error::runtime(format!("cannot create the signal pipe: {e}")))?;
        let delivery =
            SignalDelivery::with_pipe(read, write, SignalOnly, HANDLED.iter().map(|(s, _)| *s))
                .map_err(|e| Error::runtime(format!("cannot install signal handlers: {e}")))?;
        Ok(Signals { delivery })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.delivery.get_read().as_fd()
    }

    /// Drains the pipe; returns the signals received since the last call.
    pub fn drain(&mut self) -> Vec<MasterSignal> {
        self.delivery
            .pending()
            .filter_map(|s| HANDLED.iter().find(|(n, _)| *n == s).map(|(_, m)| *m))
            .collect()
    }
}

/// The raw numbers of the signals whose disposition the master changed; a
/// worker resets each to SIG_DFL before exec (SIGPIPE included: the Rust
/// runtime ignores it, and an ignored signal stays ignored across exec).
pub fn changed_dispositions() -> Vec<i32> {
    let mut v: Vec<i32> = HANDLED.iter().map(|(s, _)| *s).collect();
    v.push(SIGPIPE);
    v
}
