//! The worker table: one row per child process the master started and has
//! not reaped yet.
//!
//! Invariant: a row leaves the table only when its process is reaped by the
//! master loop, so a pid in the table can always be signalled safely (it
//! cannot have been reused by another process). A reaped worker's process
//! group that still has members is the master's to track (master/groups.rs).

use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// What passing a deadline means. Each part of the master lists its
/// pending deadlines as `(Instant, Due)`; the loop sleeps until the
/// earliest, and each passed one is handled as an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Alive for `--ready-after` since exec: ready.
    Stable(Pid),
    /// Not ready in time: kill, count as a boot failure.
    StartupTimeout(Pid),
    /// No heartbeat in time: SIGABRT, SIGKILL a second later.
    HeartbeatTimeout(Pid),
    /// A stopping worker's grace is over: SIGKILL.
    Kill(Pid),
    /// A lingering process group is due for SIGKILL, or for another look.
    Group(Pid),
    /// Time to tell systemd's watchdog we are alive.
    SystemdWatchdog,
    /// A worker has been ready for [`crate::policy::QUICK_DEATH`]: procman has been up.
    StayedUp(Pid),
    /// A worker reached --max-worker-lifetime: recycle it.
    Retire(Pid),
    /// Time for a --max-worker-memory sample.
    SampleMemory,
    /// A slot's backoff is over: it may be filled.
    BackoffOver(usize),
    /// A zygote did not import the app within --startup-timeout.
    ZygoteStartTimeout(Pid),
    /// The zygote's restart backoff is over.
    ZygoteBackoffOver,
    /// A zygote did not answer a spawn request in time.
    ZygoteSpawnTimeout(Pid),
    /// Time to read the notify socket, which an idle master does not poll.
    DrainNotifications,
    /// A booting worker's raised priority ends (its first startup deadline).
    BoostOver(Pid),
    /// `--reload`: source files changed and then stayed quiet (or kept
    /// changing too long): reload.
    ReloadChanges,
    /// Workers' autogroups wait for their share (the kernel's rate limit).
    Autogroups,
}

impl Due {
    /// Whether it still matters while procman stops: the workers' and
    /// their groups' deadlines and systemd's watchdog do, recycling,
    /// respawns and zygotes do not.
    pub fn during_stop(self) -> bool {
        matches!(
            self,
            Due::Stable(_)
                | Due::StartupTimeout(_)
                | Due::HeartbeatTimeout(_)
                | Due::Kill(_)
                | Due::Group(_)
                | Due::SystemdWatchdog
        )
    }
}

/// Where a worker is in its life, with what only that stage has: a
/// startup deadline exists only while starting, plans to leave (recycling,
/// draining, a lifetime) only until it is asked to stop, a stop only while
/// stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked; not ready yet.
    Starting {
        /// When it must be ready by (--startup-timeout, pushed later by
        /// EXTEND_TIMEOUT_USEC).
        deadline: Instant,
        /// `--ready exec`: when it becomes ready if it is still alive then
        /// (exec succeeded at spawn; `--ready-after` later).
        stable_at: Option<Instant>,
        active: Active,
    },
    /// Serving (since [`Worker::ready_at`]).
    Ready(Active),
    /// Asked to stop (or killed); waiting to be reaped.
    Stopping(Stop),
}

/// What only a worker that has not been asked to stop has: how it may
/// leave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Active {
    /// Marked for replacement (recycling), with the reason.
    pub recycle: Option<String>,
    /// It said STOPPING=1: it is leaving on its own, so it no longer
    /// counts as capacity and a replacement is started.
    pub draining: bool,
    /// When it is due for recycling by age (--max-worker-lifetime + jitter).
    pub retire_at: Option<Instant>,
    /// Consecutive memory samples above --max-worker-memory.
    pub samples_over_memory: u32,
    /// A reload lowered its CPU priority: its nice value before, to go back
    /// to if the reload fails.
    pub lowered_from: Option<i32>,
    /// It boots at a raised CPU priority (`master/boost.rs`).
    pub boosted: Option<Boosted>,
}

/// A booting worker's raised CPU priority: what it goes back to, and by
/// when at the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boosted {
    /// procman's own nice value when it was raised (never one read from
    /// the worker's group, whose members the worker chooses).
    pub back_to: i32,
    /// Its startup deadline as it was at the fork: the boost ends then even
    /// if EXTEND_TIMEOUT_USEC keeps the worker starting.
    pub until: Instant,
}

/// Why the master stopped a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// procman is shutting down.
    Shutdown,
    /// Replaced by a newer worker (reload or recycle).
    Replaced,
    /// One worker too many (TTOU).
    Excess,
    /// No heartbeat within --timeout (or WATCHDOG=trigger).
    HeartbeatTimeout,
    /// Not ready within --startup-timeout.
    StartupTimeout,
    /// Part of a reload that failed.
    ReloadAborted,
}

impl StopReason {
    /// Whether the worker's death counts as a failed boot.
    pub fn is_boot_failure(self) -> bool {
        matches!(self, StopReason::StartupTimeout)
    }
}

/// A stop in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    pub reason: StopReason,
    /// When SIGKILL is due; `None` once it has been sent.
    pub kill_at: Option<Instant>,
    /// Why procman sent SIGKILL, once it has ("after the graceful
    /// timeout"): the exit message then names procman, not the OOM killer.
    pub killed: Option<&'static str>,
}

/// One worker process.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its pid (also its process group id and its session id).
    pub pid: Pid,
    /// Stable slot index (PROCMAN_WORKER_ID).
    pub slot: usize,
    /// Generation it was started in (PROCMAN_GENERATION).
    pub generation: u64,
    /// Life stage, with its deadlines.
    pub state: WorkerState,
    /// When it was forked.
    pub started_at: Instant,
    /// When it became ready, if it ever did (kept while it stops: how long
    /// it served decides whether its death was a failed start).
    pub ready_at: Option<Instant>,
    /// Its last WATCHDOG=1, if it ever sent one.
    pub last_heartbeat: Option<Instant>,
    /// The last error it reported (X_PROCMAN_ERROR=), for the exit message.
    pub reported_error: Option<String>,
    /// Its traceback (X_PROCMAN_TRACEBACK=), logged if its death decides.
    pub reported_traceback: Option<String>,
    /// Its own memory cgroup (not procman's), read when it became ready,
    /// with its OOM kill count then: a SIGKILL is the OOM killer's for sure
    /// if that count rose.
    pub own_cgroup: Option<(crate::procfs::MemoryCgroup, u64)>,
    /// Its autogroup's share of the CPU (`master/share.rs`).
    pub share: Share,
}

/// A worker's autogroup: the offset its nice value is written with, and
/// whether that is still to be done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// Added to its nice value for its autogroup's.
    pub offset: i32,
    /// Not written yet: the kernel's rate limit refused, or the offset
    /// changed.
    pub pending: bool,
}

impl Worker {
    /// A freshly forked worker.
    pub fn new(pid: Pid, slot: usize, generation: u64, now: Instant, startup: Duration) -> Self {
        Worker {
            pid,
            slot,
            generation,
            state: WorkerState::Starting {
                deadline: now + startup,
                stable_at: None,
                active: Active::default(),
            },
            started_at: now,
            ready_at: None,
            last_heartbeat: None,
            reported_error: None,
            reported_traceback: None,
            own_cgroup: None,
            share: Share::default(),
        }
    }

    /// How it may leave, unless it was asked to stop.
    pub fn active(&self) -> Option<&Active> {
        match &self.state {
            WorkerState::Starting { active, .. } | WorkerState::Ready(active) => Some(active),
            WorkerState::Stopping(_) => None,
        }
    }

    /// The same, mutably.
    pub fn active_mut(&mut self) -> Option<&mut Active> {
        match &mut self.state {
            WorkerState::Starting { active, .. } | WorkerState::Ready(active) => Some(active),
            WorkerState::Stopping(_) => None,
        }
    }

    /// Starting → ready (keeping how it may leave); false if it was not
    /// starting.
    pub fn become_ready(&mut self, now: Instant) -> bool {
        let WorkerState::Starting { active, .. } = &mut self.state else {
            return false;
        };
        self.state = WorkerState::Ready(std::mem::take(active));
        self.ready_at = Some(now);
        true
    }

    /// Not stopping: it counts toward capacity (ready) or soon will.
    pub fn is_active(&self) -> bool {
        !self.is_stopping()
    }

    /// Still starting.
    pub fn is_starting(&self) -> bool {
        matches!(self.state, WorkerState::Starting { .. })
    }

    /// Serving.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, WorkerState::Ready(_))
    }

    /// Asked to stop.
    pub fn is_stopping(&self) -> bool {
        matches!(self.state, WorkerState::Stopping(_))
    }

    /// The stop in progress, if it is stopping.
    pub fn stop(&self) -> Option<&Stop> {
        match &self.state {
            WorkerState::Stopping(stop) => Some(stop),
            _ => None,
        }
    }

    /// Its next deadline and what passing it means: the one place a
    /// worker's deadlines are computed (`timeout`: --timeout, the
    /// heartbeat limit).
    pub fn deadline(&self, timeout: Option<Duration>) -> Option<(Instant, Due)> {
        match self.state {
            // Either ready by exec or out of time, never both
            // (--ready-after is shorter than --startup-timeout).
            WorkerState::Starting {
                deadline,
                stable_at,
                ..
            } => Some(match stable_at {
                Some(t) if t <= deadline => (t, Due::Stable(self.pid)),
                _ => (deadline, Due::StartupTimeout(self.pid)),
            }),
            WorkerState::Ready(_) => {
                let beat = self.last_heartbeat?;
                Some((beat + timeout?, Due::HeartbeatTimeout(self.pid)))
            }
            WorkerState::Stopping(Stop { kill_at, .. }) => Some((kill_at?, Due::Kill(self.pid))),
        }
    }

    /// How long it has been ready.
    pub fn ready_for(&self, now: Instant) -> Option<Duration> {
        self.ready_at.map(|r| now.saturating_duration_since(r))
    }
}

/// All workers not yet reaped.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Worker>,
}

impl Table {
    /// Adds a row; false (and nothing added) if its pid has one already.
    /// A pid is in the table at most once, so every deadline (`Due`, which
    /// names a pid) and every event finds its own row, and a row leaves
    /// when its process is reaped.
    pub fn insert(&mut self, w: Worker) -> bool {
        if self.get(w.pid).is_some() {
            return false;
        }
        self.rows.push(w);
        true
    }

    /// Removes the row of a reaped process.
    pub fn remove(&mut self, pid: Pid) -> Option<Worker> {
        let i = self.rows.iter().position(|w| w.pid == pid)?;
        Some(self.rows.swap_remove(i))
    }

    pub fn get(&self, pid: Pid) -> Option<&Worker> {
        self.rows.iter().find(|w| w.pid == pid)
    }

    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.rows.iter_mut().find(|w| w.pid == pid)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Worker> {
        self.rows.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.rows.iter_mut()
    }

    /// Number of rows (processes not yet reaped).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Ready workers (serving).
    pub fn ready_count(&self) -> usize {
        self.rows.iter().filter(|w| w.is_ready()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stage_has_only_its_own_data() {
        let t0 = Instant::now();
        let pid = Pid::from_raw(7);
        let mut w = Worker::new(pid, 0, 1, t0, Duration::from_secs(5));
        let limit = Some(Duration::from_secs(10));
        assert_eq!(
            w.deadline(limit),
            Some((t0 + Duration::from_secs(5), Due::StartupTimeout(pid)))
        );
        w.active_mut().expect("active").retire_at = Some(t0);
        // Ready: no startup deadline any more; what it plans stays.
        assert!(w.become_ready(t0));
        assert!(!w.become_ready(t0), "only once");
        assert_eq!(w.deadline(limit), None, "no heartbeat yet: no deadline");
        w.last_heartbeat = Some(t0);
        assert_eq!(
            w.deadline(limit),
            Some((t0 + Duration::from_secs(10), Due::HeartbeatTimeout(pid)))
        );
        assert_eq!(w.active().and_then(|a| a.retire_at), Some(t0));
        // Stopping: only the stop; its plans to leave are gone with it.
        w.state = WorkerState::Stopping(Stop {
            reason: StopReason::Shutdown,
            kill_at: Some(t0),
            killed: None,
        });
        assert!(w.active().is_none());
        assert_eq!(w.deadline(limit), Some((t0, Due::Kill(pid))));
        assert_eq!(w.ready_at, Some(t0), "how long it served is kept");
    }

    #[test]
    fn a_pid_has_one_row_at_most() {
        let t0 = Instant::now();
        let pid = Pid::from_raw(7);
        let mut table = Table::default();
        assert!(table.insert(Worker::new(pid, 0, 1, t0, Duration::from_secs(5))));
        assert!(!table.insert(Worker::new(pid, 1, 1, t0, Duration::from_secs(5))));
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(pid).map(|w| w.slot), Some(0), "the first row");
        assert!(table.remove(pid).is_some());
        assert!(table.is_empty(), "reaping it leaves no row behind");
    }
}
