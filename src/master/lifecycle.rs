//! A worker's life in the master: spawned (cold; see preload.rs for the
//! zygote), ready (by READY=1 or by staying alive), told to stop, killed
//! at its deadline, and reaped: what its exit means (a crash to respawn
//! with backoff, a failed boot, the end of procman).

use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::{debug, error};

use super::boost::end_boost;
use super::exits::{describe, exit_code};
use super::groups::Kernel;
use super::{Master, MasterState};
use crate::classes::FatalExit;
use crate::error::Error;
use crate::pid::ChildPid;
use crate::policy::{self, Backoff};
use crate::status::Observed;
use crate::workers::{Stop, StopReason, Worker, WorkerState};

impl Master {
    pub(super) fn on_exit(&mut self, pid: Pid, status: WaitStatus, now: Instant) {
        if let Some(z) = self.zygotes.get_mut(pid) {
            // What it sent before dying (a reply to a spawn the master gave
            // up on: that worker must be killed) is read before its channel
            // is closed with it.
            let last = if z.closed { Vec::new() } else { z.drain() };
            for (m, sender) in last {
                self.on_zygote_message(pid, m, sender, now);
            }
            let Some(z) = self.zygotes.remove(pid) else {
                return;
            };
            // A zygote has nothing to drain: whatever is left in its group
            // (an intermediate of a spawn) goes at once.
            if let Some(group) = ChildPid::new(pid.as_raw()) {
                let label = format!("zygote {pid}");
                self.groups.add(&Kernel, group, label, now, now);
            }
            self.on_zygote_exit(z, status, now);
            return;
        }
        let Some(w) = self.table.remove(pid) else {
            debug!(
                event = "orphan-reaped",
                process = pid.as_raw(),
                "Reaped process {pid} ({}) that is not a worker",
                describe(&status)
            );
            return;
        };
        let (reason, how) = self.record_exit(&w, &status);
        let reason = reason.as_str();
        if self.reload_worker_exited(&w, &status, now) {
            return;
        }
        let stopping_master = matches!(self.state, MasterState::Stopping { .. });
        match w.stop().map(|s| s.reason) {
            Some(reason) if reason.is_boot_failure() => {
                self.on_boot_failure(
                    &w,
                    &format!("not ready within {:?}", self.settings.cfg.startup_timeout),
                    None,
                    now,
                );
            }
            Some(StopReason::HeartbeatTimeout) => {
                worker_event!(
                    warn,
                    "exited",
                    reason = reason,
                    w,
                    "Worker {pid} (slot {}) exited after its timeout: {how}; respawning",
                    w.slot
                );
                self.note_death(&w, now);
            }
            Some(_) => worker_event!(
                info,
                "exited",
                reason = reason,
                w,
                "Worker {pid} (slot {}) exited: {how}",
                w.slot
            ),
            None if stopping_master => worker_event!(
                info,
                "exited",
                reason = reason,
                w,
                "Worker {pid} (slot {}) exited: {how}",
                w.slot
            ),
            None if w.is_starting() => {
                let code = exit_code(&status);
                self.on_boot_failure(&w, &how, code, now);
            }
            None => {
                // A ready worker killed by a signal procman did not send (an
                // operator's kill, the OOM killer) crashed: it is respawned
                // with the slot's backoff, but it did boot, so it never
                // counts toward the fatal boot-failure limit.
                let killed_from_outside = matches!(status, WaitStatus::Signaled(..));
                let failed = policy::is_failed_start(w.ready_for(now));
                if failed && !self.boot.ever_up() && !killed_from_outside {
                    self.on_boot_failure(&w, &how, exit_code(&status), now);
                } else {
                    let b = self.note_death(&w, now);
                    if b.next_spawn_at.is_some_and(|at| at > now) {
                        self.slot_waits(w.slot);
                    }
                    match b.next_spawn_at {
                        Some(at) => worker_event!(
                            warn,
                            "exited",
                            reason = reason,
                            w,
                            "Worker {pid} (slot {}) exited: {how}; respawning in {:.1}s (it keeps dying right after start)",
                            w.slot,
                            at.saturating_duration_since(now).as_secs_f64()
                        ),
                        None => worker_event!(
                            warn,
                            "exited",
                            reason = reason,
                            w,
                            "Worker {pid} (slot {}) exited: {how}; respawning",
                            w.slot
                        ),
                    }
                }
            }
        }
        self.linger_after(&w, now);
    }

    /// A worker's leader was reaped: if its process group still has
    /// members, they are SIGKILLed at the worker's stop deadline (at once on
    /// a quick stop, or if procman already sent SIGKILL); the group of a
    /// worker that died on its own gets the stop signal now and SIGKILL
    /// after the graceful timeout.
    fn linger_after(&mut self, w: &Worker, now: Instant) {
        let Some(group) = ChildPid::new(w.pid.as_raw()).filter(|g| g.group_has_members()) else {
            return;
        };
        let quick = matches!(self.state, MasterState::Stopping { quick: true, .. });
        let kill_at = match w.stop() {
            _ if quick => now,
            Some(Stop {
                kill_at: Some(at), ..
            }) => *at,
            Some(Stop { kill_at: None, .. }) => now,
            None => {
                group.signal_group_only(self.stop_signal());
                now + self.settings.cfg.graceful_timeout
            }
        };
        let label = format!("worker {} (slot {})", w.pid, w.slot);
        self.groups.add(&Kernel, group, label, kill_at, now);
    }

    /// `--reuse-port`: the slot's own listening sockets, (listener index,
    /// fd), made for its first worker and kept by the master for the next
    /// ones; empty without the option. `None` (logged, and the slot backs
    /// off) when one cannot be made.
    pub(super) fn slot_sockets(
        &mut self,
        slot: usize,
        now: Instant,
    ) -> Option<Vec<(usize, RawFd)>> {
        let mut own = Vec::new();
        for (index, l) in self.settings.listeners.iter().enumerate() {
            if !l.reuse_port {
                continue;
            }
            match l.slot_socket(slot, self.settings.cfg.backlog) {
                Ok(fd) => own.push((index, fd)),
                Err(e) => {
                    error!(
                        "cannot create a SO_REUSEPORT socket on {} for slot {slot}: {e}",
                        l.display
                    );
                    self.boot.spawn_failed(slot, now);
                    return None;
                }
            }
        }
        Some(own)
    }

    /// `--reuse-port`: a slot whose next worker waits for its backoff
    /// gives up its socket unless another worker (of the other generation)
    /// still serves in it: the connections queued there would wait for a
    /// worker that may not come. The next worker gets a new socket.
    fn slot_waits(&self, slot: usize) {
        if !self.table.iter().any(|w| w.slot == slot) {
            self.settings.forget_slot_sockets(|s| s == slot);
        }
    }

    /// Records a death in the slot's backoff; returns the new backoff.
    pub(super) fn note_death(&mut self, w: &Worker, now: Instant) -> Backoff {
        self.boot.death(w.slot, w.ready_for(now), now)
    }

    /// A worker died before it was ready. Its traceback (a uvicorn worker
    /// sends it instead of printing it) is logged here, where its death is
    /// decided: workers that fail the same way while procman is already
    /// stopping because of the first one are not (see `on_exit`).
    pub(super) fn on_boot_failure(
        &mut self,
        w: &Worker,
        how: &str,
        code: Option<i32>,
        now: Instant,
    ) {
        let b = self.note_death(w, now);
        if b.next_spawn_at.is_some_and(|at| at > now) {
            self.slot_waits(w.slot);
        }
        log_traceback(w);
        let why = w
            .reported_error
            .as_ref()
            .map_or(String::new(), |e| format!(" ({e})"));
        let detail = w
            .reported_error
            .clone()
            .unwrap_or_else(|| format!("worker {} {how}", w.pid));
        let retry = match b.next_spawn_at {
            Some(t) if t > now => format!(
                "retrying in {:.1}s",
                t.saturating_duration_since(now).as_secs_f64()
            ),
            _ => "retrying now".to_string(),
        };
        if self.boot.ever_up() {
            worker_event!(
                warn,
                "boot-failed",
                w,
                "Worker {} (slot {}) failed to boot: {how}{why}; still serving with the others, {retry}",
                w.pid, w.slot
            );
            return;
        }
        let failures = self.boot.count_failure();
        let class = &self.settings.class;
        let fatal = match code.and_then(|c| class.fatal_boot_exit(c)) {
            Some(FatalExit::AppImport) => Some(Error::AppImport(match &w.reported_error {
                Some(e) => e.clone(),
                None => format!(
                    "Failed to load application '{}' (worker {} exited with status 4; its error is above)",
                    class.app.as_deref().unwrap_or("?"),
                    w.pid
                ),
            })),
            Some(FatalExit::BootFailed) => Some(Error::BootFailed(format!(
                "workers failed to boot: {detail}"
            ))),
            _ if failures >= policy::MAX_BOOT_FAILURES => {
                Some(Error::BootFailed(format!(
                    "workers failed to boot {failures} times in a row and none ever stayed up; last: {detail}"
                )))
            }
            _ => None,
        };
        match fatal {
            Some(err) => {
                worker_event!(error, "boot-failed", w, "{err}");
                self.begin_stop(true, Err(err), now);
            }
            None => {
                worker_event!(
                    warn,
                    "boot-failed",
                    w,
                    "Worker {} (slot {}) failed to boot: {how}{why} (attempt {} of {}); {retry}",
                    w.pid,
                    w.slot,
                    failures,
                    policy::MAX_BOOT_FAILURES
                );
            }
        }
    }

    pub(super) fn spawn_worker(&mut self, slot: usize) {
        // Each worker's own start time: ages order "the oldest" for TTOU.
        let now = Instant::now();
        if self.preloading() {
            self.spawn_from_zygote(slot, now);
            return;
        }
        let cpu = self.settings.slot_cpu(slot);
        let extra = super::launch::worker_vars(slot, self.generation, cpu);
        let (env, pid_vars) =
            self.settings
                .child_env(self.notify.receiver().path(), self.urgent.path(), &extra);
        let Some(own) = self.slot_sockets(slot, now) else {
            return;
        };
        let mut fds: Vec<_> = self
            .settings
            .listeners
            .iter()
            .map(|l| l.fd.as_raw_fd())
            .collect();
        for (index, fd) in own {
            fds[index] = fd;
        }
        let plan = self.settings.child_plan(&env, &pid_vars, &fds);
        let plan = match plan {
            Ok(p) => p.with_cpu(cpu),
            Err(e) => {
                let err = Error::usage(format!(
                    "cannot start a worker: '{}' contains a NUL byte",
                    e.0
                ));
                error!("{err}");
                self.begin_stop(true, Err(err), now);
                return;
            }
        };
        let spawned = plan.spawn();
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                // fork failed (EAGAIN, ENOMEM): treat like a failed boot of
                // this slot so the retry backs off.
                error!("cannot fork a worker for slot {slot}: {}", e.desc());
                self.boot.spawn_failed(slot, now);
                return;
            }
        };
        let mut w = Worker::new(
            spawned.pid,
            slot,
            self.generation,
            now,
            self.settings.cfg.startup_timeout,
        );
        if let Some(life) = self.settings.cfg.max_worker_lifetime {
            let jitter = self.settings.cfg.max_worker_lifetime_jitter;
            let lifetime = self.recycling.lifetime(life, jitter);
            if let Some(a) = w.active_mut() {
                a.retire_at = Some(now + lifetime);
            }
        }
        match spawned.exec_error {
            Some((stage, errno)) => {
                error!(
                    "cannot {} {}: {} (worker {}, slot {slot})",
                    stage.describe(),
                    self.settings
                        .launch
                        .argv
                        .first()
                        .map(String::as_str)
                        .unwrap_or("?"),
                    errno.desc(),
                    spawned.pid
                );
                w.reported_error = Some(format!(
                    "cannot {} {}: {}",
                    stage.describe(),
                    self.settings.launch.program.display(),
                    errno.desc()
                ));
            }
            None => {
                let exec_ready = !self.settings.class.notify_ready;
                let ready_at_once = exec_ready && self.settings.cfg.ready_after.is_zero();
                self.share_cpu(&mut w, now);
                // Raised before its `booting` event, so that whoever reads
                // that event finds it at the priority it boots at; not at
                // all if it is ready at once (there is no boot to speed up).
                if !ready_at_once {
                    self.boost_booting(&mut w);
                }
                worker_event!(
                    info,
                    "booting",
                    w,
                    "Booting worker {slot} with pid {} (generation {})",
                    w.pid,
                    w.generation
                );
                // --ready exec: ready once it has stayed alive for
                // --ready-after; dying sooner is a failed boot, so a command
                // that exits at once never replaces a working one.
                if ready_at_once {
                    mark_ready(&mut w, now, &self.endpoints.observed);
                } else if exec_ready {
                    if let WorkerState::Starting { stable_at, .. } = &mut w.state {
                        *stable_at = Some(now + self.settings.cfg.ready_after);
                    }
                }
            }
        }
        self.table.insert(w);
    }

    /// `--ready exec`: alive through its stability window, so ready; it
    /// stayed up, so a later crash is not a failed boot.
    pub(super) fn stable(&mut self, pid: Pid, now: Instant) {
        if let Some(w) = self.table.get_mut(pid).filter(|w| w.is_starting()) {
            mark_ready(w, now, &self.endpoints.observed);
            self.boot.stayed_up();
        }
    }
}

/// Logs the traceback a worker reported (X_PROCMAN_TRACEBACK=: a failed
/// import, or a failed lifespan startup), if any:
/// called where its death is decided, so that of N workers failing the same
/// way only the one that decides is shown.
pub(super) fn log_traceback(w: &Worker) {
    if let Some(tb) = &w.reported_traceback {
        // The traceback is a field: the text log marks each of its lines
        // as this worker's (logging.rs), JSON appends it to the message.
        error!(
            worker = w.pid.as_raw(),
            slot = w.slot,
            traceback = tb.as_str(),
            "Worker {} (slot {}) failed to boot:",
            w.pid,
            w.slot,
        );
    }
}

pub(super) fn mark_ready(w: &mut Worker, now: Instant, observed: &Observed) {
    if !w.become_ready(now) {
        return;
    }
    end_boost(w);
    // Read now, once the worker (or a wrapper it runs under) had its boot
    // to move into a cgroup of its own.
    w.own_cgroup = observed.own_cgroup_of(w.pid.as_raw());
    let boot = now.saturating_duration_since(w.started_at);
    observed.ready(boot);
    worker_event!(
        info,
        "ready",
        w,
        "Worker {} (slot {}) ready in {:.3}s",
        w.pid,
        w.slot,
        boot.as_secs_f64()
    );
}
