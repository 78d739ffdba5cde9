//! The link to procman's own supervisor (systemd, or anything speaking
//! sd_notify): READY/RELOADING/STOPPING/STATUS, the watchdog ping when
//! `WATCHDOG_USEC` asks for one, and a worker's `EXTEND_TIMEOUT_USEC`
//! passed on while systemd waits for procman. Without `NOTIFY_SOCKET`,
//! sending is a no-op.
//!
//! STATUS= is never stale: the master calls [`SystemdLink::status`] with
//! the line [`status_text`] makes for its state at every iteration, and
//! it is sent only when it changed ("starting: 1/4 workers ready",
//! "reloading to generation 3: 2/4 ready", "stopping: draining 4
//! workers", "4/4 workers ready, generation 3"). A failed reload's reason
//! leads every line until a reload succeeds.
//!
//! Extensions: systemd kills a start, reload or stop job at
//! `TimeoutStartSec`/`TimeoutStopSec` (the reload job runs under the start
//! timeout), however long procman would let a worker take. When a
//! worker's `EXTEND_TIMEOUT_USEC` is accepted while systemd waits for
//! procman (booting, reloading, stopping), procman asks systemd for the
//! same: the time left on the worker's deadline, never more than the
//! worker asked for. systemd never shortens a timeout for it, so asking
//! when the unit's own timeout would have been enough is harmless.

use std::time::{Duration, Instant};

use super::{Master, MasterState};
use crate::notify::SystemdNotifier;
use crate::policy::{self, Due};
use crate::workers::{Stop, WorkerState};

/// The longest failure reason shown in STATUS= (a datagram must stay under
/// 4096 bytes; a worker's last words can be long).
const MAX_REASON: usize = 512;

/// procman's side of sd_notify.
pub(super) struct SystemdLink {
    notifier: Option<SystemdNotifier>,
    watchdog: Option<(Duration, Instant)>,
    /// The last STATUS= sent.
    status: String,
    /// The last reload's failure, until a reload succeeds.
    failed_reload: Option<String>,
}

/// What the master is doing, for STATUS=.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Starting,
    Running,
    Reloading(u64),
    Stopping,
}

/// The numbers a STATUS= line shows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Counts {
    pub phase: Phase,
    /// Ready workers of the generation in force (or being rolled out).
    pub ready: usize,
    pub target: usize,
    pub generation: u64,
    /// Workers still alive (drained during a stop).
    pub alive: usize,
}

/// The STATUS= line for `c`, led by a failed reload's reason.
pub(super) fn status_text(c: &Counts, failed_reload: Option<&str>) -> String {
    let s = |n: usize| if n == 1 { "" } else { "s" };
    let base = match c.phase {
        Phase::Starting => format!("starting: {}/{} workers ready", c.ready, c.target),
        Phase::Reloading(g) => format!(
            "reloading to generation {g}: {}/{} ready",
            c.ready, c.target
        ),
        Phase::Stopping => format!("stopping: draining {} worker{}", c.alive, s(c.alive)),
        Phase::Running => format!(
            "{}/{} workers ready, generation {}",
            c.ready, c.target, c.generation
        ),
    };
    match failed_reload {
        Some(why) => format!("{why}; {base}"),
        None => base,
    }
}

/// `why` as one bounded line.
fn one_line(why: &str) -> String {
    let text = crate::escape::text(why);
    if text.len() <= MAX_REASON {
        return text.into_owned();
    }
    let mut end = MAX_REASON;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

impl SystemdLink {
    /// From procman's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub(super) fn from_env(now: Instant) -> SystemdLink {
        let notifier = SystemdNotifier::from_env(std::env::var_os("NOTIFY_SOCKET").as_deref());
        let interval = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        SystemdLink {
            notifier,
            watchdog: interval.map(|d| (d, now + d)),
            status: String::new(),
            failed_reload: None,
        }
    }

    /// Sends `text` (newline-separated assignments), if anyone listens.
    /// A STATUS= in it is remembered as the status shown.
    pub(super) fn send(&mut self, text: &str) {
        if let Some(status) = text.lines().find_map(|l| l.strip_prefix("STATUS=")) {
            self.status = status.to_string();
        }
        if let Some(sd) = &self.notifier {
            sd.send(text);
        }
    }

    /// Sends `line` as STATUS= unless it is already what systemd shows.
    pub(super) fn status(&mut self, line: String) {
        if line != self.status {
            self.send(&format!("STATUS={line}"));
        }
    }

    /// A reload failed: its reason leads every STATUS= until one succeeds.
    pub(super) fn reload_failed(&mut self, why: &str) {
        self.failed_reload = Some(one_line(why));
    }

    /// A reload succeeded: the last failure is history.
    pub(super) fn reload_succeeded(&mut self) {
        self.failed_reload = None;
    }

    pub(super) fn failed_reload(&self) -> Option<&str> {
        self.failed_reload.as_deref()
    }

    /// Asks systemd for `by` more (its current job's timeout is pushed to
    /// at least now + `by`).
    fn extend(&mut self, by: Duration) {
        if !by.is_zero() {
            self.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
        }
    }

    /// The next watchdog ping, if the watchdog is on.
    pub(super) fn deadline(&self) -> Option<(Instant, Due)> {
        self.watchdog.map(|(_, at)| (at, Due::SystemdWatchdog))
    }

    /// The ping is due: sends it and schedules the next.
    pub(super) fn ping(&mut self, now: Instant) {
        self.send("WATCHDOG=1");
        if let Some((interval, at)) = &mut self.watchdog {
            *at = now + *interval;
        }
    }
}

impl Master {
    /// The numbers for STATUS= now.
    pub(super) fn status_counts(&self) -> Counts {
        let goal = self.goal();
        let phase = match (&self.state, &self.reload) {
            (MasterState::Stopping { .. }, _) => Phase::Stopping,
            (_, Some(r)) => Phase::Reloading(r.generation),
            (MasterState::Booting, None) => Phase::Starting,
            (MasterState::Running, None) => Phase::Running,
        };
        Counts {
            phase,
            ready: self
                .table
                .iter()
                .filter(|w| w.is_ready() && policy::is_fresh(w, &goal))
                .count(),
            target: self.settings.target,
            generation: self.generation,
            alive: self.table.iter().count(),
        }
    }

    /// A worker's `EXTEND_TIMEOUT_USEC` (`asked`) was handled: while
    /// systemd waits for procman (its start, a reload, its stop), ask
    /// systemd for the time now left on the worker's deadline, at most
    /// `asked`.
    pub(super) fn forward_extension(
        &mut self,
        pid: nix::unistd::Pid,
        asked: Duration,
        now: Instant,
    ) {
        let stopping = matches!(self.state, MasterState::Stopping { .. });
        let waited_for = self.state == MasterState::Booting || self.reload.is_some();
        let deadline = match self.table.get(pid).map(|w| &w.state) {
            Some(WorkerState::Starting { deadline, .. }) if waited_for && !stopping => *deadline,
            Some(WorkerState::Stopping(Stop {
                kill_at: Some(at), ..
            })) if stopping => *at,
            _ => return,
        };
        self.systemd
            .extend(deadline.saturating_duration_since(now).min(asked));
    }
}

/// `WATCHDOG_USEC/2` when systemd's watchdog is on for procman (`me`):
/// `WATCHDOG_PID`, when set, must name it.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok()? != me {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_what_procman_is_doing_led_by_a_failed_reload() {
        let c = |phase, ready, alive| Counts {
            phase,
            ready,
            target: 4,
            generation: 3,
            alive,
        };
        let table = [
            (
                c(Phase::Starting, 1, 4),
                None,
                "starting: 1/4 workers ready",
            ),
            (
                c(Phase::Reloading(4), 2, 6),
                None,
                "reloading to generation 4: 2/4 ready",
            ),
            (
                c(Phase::Stopping, 0, 1),
                None,
                "stopping: draining 1 worker",
            ),
            (
                c(Phase::Stopping, 0, 3),
                None,
                "stopping: draining 3 workers",
            ),
            (
                c(Phase::Running, 4, 4),
                None,
                "4/4 workers ready, generation 3",
            ),
            (
                c(Phase::Running, 4, 4),
                Some("reload failed: bad"),
                "reload failed: bad; 4/4 workers ready, generation 3",
            ),
        ];
        for (counts, failed, want) in table {
            assert_eq!(status_text(&counts, failed), want);
        }
    }

    #[test]
    fn a_failure_reason_is_one_bounded_line() {
        assert_eq!(one_line("a\nb"), "a\\nb");
        let long = "é".repeat(1000);
        let line = one_line(&long);
        assert!(
            line.len() <= MAX_REASON + 3 && line.ends_with("..."),
            "{}",
            line.len()
        );
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_interval_when_it_is_for_us() {
        let half = Some(Duration::from_secs(5));
        let table = [
            (Some("10000000"), None, half),
            (Some("10000000"), Some("42"), half),
            (Some("10000000"), Some("43"), None),
            (Some("10000000"), Some("x"), None),
            (Some("0"), None, None),
            (Some("ten"), None, None),
            (None, Some("42"), None),
        ];
        for (usec, pid, want) in table {
            assert_eq!(watchdog_interval(usec, pid, 42), want, "{usec:?} {pid:?}");
        }
    }
}
