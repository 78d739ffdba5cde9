//! The only user of signal-hook: signals become bytes on a self-pipe, and
//! the master loop turns them into [`MasterSignal`]s.
//!
//! The handlers installed by signal-hook only record the signal and write
//! to the pipe (async-signal-safe); all work happens in the loop. Signals of
//! one kind that arrive before the loop drains them coalesce, as the kernel
//! coalesces standard signals anyway.
//!
//! The signal state procman inherits is not trusted: a shell, a supervisor
//! or a container runtime may start it with signals blocked or ignored
//! (with TERM and CHLD blocked, procman would ignore TERM and never reap).
//! [`Signals::install`] replaces the disposition of every handled signal
//! and then unblocks every signal.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
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
    /// USR2: in-place upgrade (re-exec, same pid; see upgrade.rs).
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
    /// Signals taken from the pipe before the master loop existed (while
    /// a pre-start command ran) and left for the loop.
    held: Vec<MasterSignal>,
}

impl Signals {
    /// Installs the handlers, then unblocks every signal. Call before the
    /// first fork, so no signal sent to a just-started worker's parent is
    /// lost.
    ///
    /// Whatever the parent left behind is undone here. Across exec a
    /// caught signal reverts to SIG_DFL but an ignored one stays ignored,
    /// so only SIG_DFL or SIG_IGN can be inherited; installing the handler
    /// replaces either (signal-hook chains only to a previous *handler*,
    /// never to SIG_IGN). The inherited mask is replaced by an empty one
    /// only after the handlers are in place: every signal is blocked in
    /// between, so a TERM the parent sent while it was blocked (pending)
    /// reaches the self-pipe instead of killing procman or being lost.
    pub fn install() -> Result<Signals> {
        let all = SigSet::all();
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&all), None)
            .map_err(|e| Error::runtime(format!("cannot block signals: {}", e.desc())))?;
        let (read, write) = UnixStream::pair()
            .map_err(|e| Error::runtime(format!("cannot create the signal pipe: {e}")))?;
        let delivery =
            SignalDelivery::with_pipe(read, write, SignalOnly, HANDLED.iter().map(|(s, _)| *s))
                .map_err(|e| Error::runtime(format!("cannot install signal handlers: {e}")))?;
        // Workers reset their own mask before exec (spawn.rs); the master
        // itself must not keep what its parent blocked either.
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .map_err(|e| Error::runtime(format!("cannot unblock signals: {}", e.desc())))?;
        Ok(Signals {
            delivery,
            held: Vec::new(),
        })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.delivery.get_read().as_fd()
    }

    /// Drains the pipe; returns the signals received since the last call
    /// (those held back by [`Signals::hold`] first).
    pub fn drain(&mut self) -> Vec<MasterSignal> {
        let mut out = std::mem::take(&mut self.held);
        out.extend(
            self.delivery
                .pending()
                .filter_map(|s| HANDLED.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)),
        );
        out
    }

    /// Gives a drained signal back, for the next [`Signals::drain`]: what
    /// start-up cannot act on (HUP, TTIN, ...) is left to the master loop.
    pub fn hold(&mut self, signal: MasterSignal) {
        if !self.held.contains(&signal) {
            self.held.push(signal);
        }
    }
}

impl MasterSignal {
    /// TERM, INT or QUIT: a request to stop.
    pub fn is_stop(self) -> bool {
        matches!(
            self,
            MasterSignal::Terminate | MasterSignal::Interrupt | MasterSignal::Quit
        )
    }

    pub fn number(self) -> i32 {
        HANDLED
            .iter()
            .find(|(_, m)| *m == self)
            .map_or(SIGTERM, |(s, _)| *s)
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
