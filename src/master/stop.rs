//! Stopping: procman's own stop (graceful or quick, and a second signal
//! that hurries it), and the stop of one worker: its class's stop signal,
//! a SIGKILL at the end of its grace, SIGABRT first for a worker that
//! stopped answering.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{debug, info};

use super::boost::end_boost;
use super::exits::{kill_cause, signal_group};
use super::{plural, Master, MasterState};
use crate::error::Error;
use crate::policy;
use crate::workers::{Stop, StopReason, WorkerState};

impl Master {
    pub(super) fn begin_stop(
        &mut self,
        quick: bool,
        outcome: std::result::Result<(), Error>,
        now: Instant,
    ) {
        let how = if quick { "quick" } else { "graceful" };
        let active = self.table.iter().filter(|w| w.is_active()).count();
        info!(
            event = "shutdown",
            quick,
            "Shutting down: {how}, {active} worker{}",
            plural(active)
        );
        self.systemd.send("STOPPING=1");
        // No worker will accept from a slot socket again: new connections
        // go elsewhere (or are refused) rather than wait in its queue.
        self.settings.forget_slot_sockets(|_| true);
        self.state = MasterState::Stopping { quick, outcome };
        let grace = self.stop_grace(quick);
        if quick {
            self.kill_limit = Some(now + grace);
        }
        let pids: Vec<Pid> = self.table.iter().map(|w| w.pid).collect();
        for pid in pids {
            self.stop_worker(pid, StopReason::Shutdown, grace, now);
        }
        self.zygotes.stop_all();
        // Leftovers of workers that are already gone: the stop deadline
        // applies to them too, and a quick stop does not wait for them.
        self.groups.kill_by(if quick { now } else { now + grace });
    }

    /// A second TERM/INT/QUIT during a stop: everyone gets at most 2 s more.
    pub(super) fn hurry_stop(&mut self, now: Instant) {
        info!(
            event = "shutdown",
            quick = true,
            reason = "second-signal",
            "Shutting down: quick (second signal)"
        );
        if let MasterState::Stopping { quick, .. } = &mut self.state {
            *quick = true;
        }
        let limit = now + policy::QUICK_STOP_GRACE;
        self.kill_limit = Some(self.kill_limit.map_or(limit, |l| l.min(limit)));
        for w in self.table.iter_mut() {
            if let WorkerState::Stopping(Stop {
                kill_at: Some(at), ..
            }) = &mut w.state
            {
                *at = (*at).min(limit);
            }
        }
        self.groups.kill_by(now);
    }

    pub(super) fn stop_worker(
        &mut self,
        pid: Pid,
        reason: StopReason,
        grace: Duration,
        now: Instant,
    ) {
        let signal = self.stop_signal();
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        if let WorkerState::Stopping(stop) = &mut w.state {
            // Already stopping: only a shorter grace applies.
            if let Some(at) = &mut stop.kill_at {
                *at = (*at).min(now + grace);
            }
            return;
        }
        // The recycle reason lives with the active worker: kept for its
        // exit's reason before the stop replaces that state.
        if let Some(why) = w.active().and_then(|a| a.recycle.as_deref()) {
            self.endpoints.note_recycle(pid, why);
        }
        let (signal, kill_at) = match reason {
            StopReason::StartupTimeout => (Signal::SIGKILL, None),
            // A uvicorn worker still starting may not have its handlers
            // yet: QUIT's default action would dump core, TERM just ends it.
            _ if signal == Signal::SIGQUIT && w.is_starting() => {
                (Signal::SIGTERM, Some(now + grace))
            }
            _ => (signal, Some(now + grace)),
        };
        match reason {
            StopReason::Shutdown => {}
            StopReason::Replaced => worker_event!(
                info,
                "stopping",
                reason = "replaced",
                w,
                "Stopping worker {pid} (slot {}): replaced",
                w.slot
            ),
            StopReason::Excess => {
                worker_event!(
                    info,
                    "stopping",
                    reason = "excess",
                    w,
                    "Stopping worker {pid} (slot {}): one worker fewer",
                    w.slot
                )
            }
            _ => {}
        }
        let killed = kill_at.is_none().then(|| kill_cause(reason, false));
        // Whatever it and its helpers do while they stop, they do it at
        // procman's priority.
        end_boost(w);
        w.state = WorkerState::Stopping(Stop {
            reason,
            kill_at,
            killed,
        });
        signal_group(pid, signal);
    }

    pub(super) fn startup_timed_out(&mut self, pid: Pid, now: Instant) {
        if let Some(w) = self.table.get(pid) {
            worker_event!(
                warn,
                "stopping",
                reason = "startup-timeout",
                w,
                "Worker {pid} (slot {}) was not ready within {:?}; killing it",
                w.slot,
                self.settings.cfg.startup_timeout
            );
        }
        self.stop_worker(pid, StopReason::StartupTimeout, Duration::ZERO, now);
    }

    /// SIGABRT now, SIGKILL one second later (gunicorn's order: a chance to
    /// dump a stack first).
    pub(super) fn abort_worker(&mut self, pid: Pid, now: Instant) {
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        if w.is_stopping() {
            return;
        }
        end_boost(w);
        w.state = WorkerState::Stopping(Stop {
            reason: StopReason::HeartbeatTimeout,
            kill_at: Some(now + policy::ABORT_GRACE),
            killed: None,
        });
        signal_group(pid, Signal::SIGABRT);
    }

    /// The signal that stops a worker now: its class's quick one during a
    /// quick stop.
    pub(super) fn stop_signal(&self) -> Signal {
        let quick = matches!(self.state, MasterState::Stopping { quick: true, .. });
        let class = &self.settings.class;
        if quick {
            class.quick_stop_signal
        } else {
            class.stop_signal
        }
    }

    pub(super) fn stop_grace(&self, quick: bool) -> Duration {
        if quick {
            policy::QUICK_STOP_GRACE.min(
                self.settings
                    .cfg
                    .graceful_timeout
                    .max(Duration::from_millis(1)),
            )
        } else {
            self.settings.cfg.graceful_timeout
        }
    }

    /// No heartbeat within --timeout: SIGABRT, then SIGKILL.
    pub(super) fn heartbeat_timed_out(&mut self, pid: Pid, now: Instant) {
        if let Some(w) = self.table.get(pid) {
            let silent = w
                .last_heartbeat
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            worker_event!(
                warn,
                "stopping",
                reason = "timeout",
                w,
                "Worker {pid} (slot {}) timed out after {:.0}s without a heartbeat; aborting",
                w.slot,
                silent.as_secs_f64()
            );
            let limit = self.settings.cfg.timeout.unwrap_or_default();
            debug!(
                "Worker {pid}: aborted {:.1} ms after its heartbeat deadline",
                silent.saturating_sub(limit).as_secs_f64() * 1000.0
            );
        }
        self.abort_worker(pid, now);
    }

    /// A stopping worker's grace is over: SIGKILL, remembering that procman
    /// sent it (so its exit is not blamed on the OOM killer).
    pub(super) fn kill_overdue(&mut self, pid: Pid, _now: Instant) {
        let quick = matches!(self.state, MasterState::Stopping { quick: true, .. });
        if let Some(w) = self.table.get_mut(pid) {
            if let WorkerState::Stopping(stop) = &mut w.state {
                stop.kill_at = None;
                stop.killed = Some(kill_cause(stop.reason, quick));
            }
            worker_event!(
                warn,
                "killing",
                w,
                "Worker {pid} (slot {}) did not stop in time; killing it",
                w.slot
            );
        }
        signal_group(pid, Signal::SIGKILL);
    }
}
