//! `--preload` in the master: one zygote per generation, started when
//! needed, asked for each worker over its channel, restarted with backoff
//! when it dies (the workers keep serving), retired when its generation has
//! no worker left, and given up for cold starts after repeated failures.

use std::os::fd::AsRawFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::exits::{describe, exit_code, signal_group};
use super::{Master, MasterState};
use crate::classes;
use crate::error::Error;
use crate::pid::ChildPid;
use crate::policy::Due;
use crate::workers::Worker;
use crate::zygote::{self, FromZygote, Pending, Zygote, ZygoteState};

impl Master {
    /// Whether workers are forked from a zygote: `--preload`'s, or the
    /// base zygote (the default; not with `--no-zygote`, nor with
    /// `--reuse-port`, whose workers each get their own sockets).
    pub(super) fn preloading(&self) -> bool {
        let cfg = &self.settings.cfg;
        cfg.uvicorn()
            .is_some_and(|u| u.preload || (u.zygote && !cfg.reuse_port))
            && !self.zygotes.cold()
    }

    /// Whether the zygote is the base one: uvicorn imported, not the app
    /// (each worker imports it after the fork).
    pub(super) fn base_zygote(&self) -> bool {
        self.settings.cfg.uvicorn().is_some_and(|u| !u.preload)
    }

    /// The base zygote could not start: this generation's workers start
    /// cold (the next HUP tries a new one), and this is logged.
    fn base_zygote_failed(&mut self, pid: Pid, detail: &str) {
        if self.zygotes.go_cold() {
            warn!(
                event = "zygote-cold",
                reason = "base-failed",
                zygote = pid.as_raw(),
                "The base zygote {pid} could not start ({detail}); workers start cold (each a new interpreter)"
            );
        }
    }

    /// The zygotes' pending deadlines: each one starting must be ready by
    /// --startup-timeout, a spawn request must be answered within
    /// [`zygote::SPAWN_REPLY`]; a restart waits for its backoff.
    pub(super) fn zygote_deadlines(&self) -> Vec<(Instant, Due)> {
        if !self.preloading() {
            return Vec::new();
        }
        self.zygotes.deadlines(self.settings.cfg.startup_timeout)
    }

    /// A zygote did not become ready in time: killed and restarted with
    /// backoff.
    pub(super) fn zygote_start_timed_out(&mut self, pid: Pid, now: Instant) {
        let Some(z) = self
            .zygotes
            .get_mut(pid)
            .filter(|z| z.state == ZygoteState::Starting)
        else {
            return;
        };
        let timeout = self.settings.cfg.startup_timeout;
        warn!("Zygote {pid} was not ready within {timeout:?}; killing it");
        signal_group(pid, Signal::SIGKILL);
        z.state = ZygoteState::Stopping;
        if self.base_zygote() {
            self.base_zygote_failed(pid, &format!("not ready within {timeout:?}"));
            return;
        }
        self.zygote_failed(now);
    }

    /// Starts the current generation's zygote when there is none (and its
    /// backoff is over), and retires zygotes whose generation has no worker
    /// left.
    pub(super) fn tend_zygotes(&mut self, now: Instant) {
        if !self.preloading() {
            return;
        }
        let current = self.generation;
        for z in self.zygotes.iter_mut() {
            let in_use = self
                .table
                .iter()
                .any(|w| w.is_active() && w.generation == z.generation);
            if z.generation != current && !in_use && z.state != ZygoteState::Stopping {
                info!(
                    "Zygote {} (generation {}) has no worker left; stopping it",
                    z.pid, z.generation
                );
                stop_zygote(z);
            }
        }
        if !self.zygotes.has(current) && self.zygotes.may_start(now) {
            self.start_zygote(now);
        }
    }

    pub(super) fn start_zygote(&mut self, now: Instant) {
        let Some(opts) = self.settings.cfg.uvicorn() else {
            return;
        };
        let (master_end, zygote_end) = match zygote::channel() {
            Ok(pair) => pair,
            Err(e) => {
                error!("cannot create the zygote's channel: {}", e.desc());
                self.zygote_failed(now);
                return;
            }
        };
        let json = classes::uvicorn::app_config(
            opts,
            &self.settings.cfg,
            classes::uvicorn::Mode::Zygote {
                import_app: opts.preload,
            },
        );
        let (env, pid_vars) = self.settings.child_env(
            self.notify.path(),
            &[
                (classes::uvicorn::CONFIG_VAR, json.to_string()),
                (
                    "PROCMAN_ZYGOTE_FD",
                    (3 + self.settings.listeners.len()).to_string(),
                ),
                ("PROCMAN_MASTER_PID", std::process::id().to_string()),
            ],
        );
        let mut fds: Vec<_> = self
            .settings
            .listeners
            .iter()
            .map(|l| l.fd.as_raw_fd())
            .collect();
        fds.push(zygote_end.as_raw_fd());
        let plan = self.settings.child_plan(&env, &pid_vars, &fds);
        let spawned = plan
            .map_err(|e| format!("'{}' contains a NUL byte", e.0))
            .and_then(|p| p.spawn().map_err(|e| e.desc().to_string()));
        drop(zygote_end);
        match spawned {
            Ok(s) if s.exec_error.is_none() => {
                if opts.preload {
                    info!(
                        event = "zygote-starting",
                        zygote = s.pid.as_raw(),
                        generation = self.generation,
                        "Starting zygote {} for generation {} (imports {} once)",
                        s.pid,
                        self.generation,
                        opts.app
                    );
                } else {
                    info!(
                        event = "zygote-starting",
                        zygote = s.pid.as_raw(),
                        generation = self.generation,
                        "Starting zygote {} for generation {} (base: Python and uvicorn; each worker imports {})",
                        s.pid, self.generation, opts.app
                    );
                }
                self.zygotes
                    .add(Zygote::new(s.pid, self.generation, master_end, now));
            }
            Ok(s) => {
                let (stage, errno) = s
                    .exec_error
                    .unwrap_or((crate::spawn::Stage::Exec, Errno::UnknownErrno));
                error!("cannot {} the zygote: {}", stage.describe(), errno.desc());
                // It exits at once; reap it as an unknown child.
                self.zygote_failed(now);
            }
            Err(e) => {
                error!("cannot start the zygote: {e}");
                self.zygote_failed(now);
            }
        }
    }

    pub(super) fn on_zygote_message(&mut self, pid: Pid, message: FromZygote, now: Instant) {
        let uids = self.workers_uids();
        let Some(z) = self.zygotes.get_mut(pid) else {
            return;
        };
        match message {
            FromZygote::Ready => {
                if z.state == ZygoteState::Starting {
                    // The backoff is reset by a worker it forked, not here:
                    // a zygote that imports fine but reports nonsense must
                    // still be backed off and given up on.
                    z.state = ZygoteState::Ready;
                    info!(
                        event = "zygote-ready",
                        zygote = pid.as_raw(),
                        generation = z.generation,
                        "Zygote {pid} ready in {:.3}s (generation {})",
                        now.saturating_duration_since(z.started_at).as_secs_f64(),
                        z.generation
                    );
                }
            }
            FromZygote::Warning(w) => warn!("Zygote {pid}: {w}"),
            // Its answer to the request in flight.
            FromZygote::Error(e) if z.pending.is_some() => {
                let slot = z.pending.take().map_or(0, |p| p.slot);
                self.zygote_spawn_failed(pid, slot, &e, now);
            }
            FromZygote::Error(e) => warn!("Zygote {pid} reported an error: {e}"),
            // The reply to the request in flight: the worker is supervised
            // from now on, if it is a process the zygote just forked.
            FromZygote::Spawned { slot, pid: worker }
                if z.pending.is_some_and(|p| p.slot == slot) =>
            {
                let Some(pending) = z.pending.take() else {
                    return;
                };
                let expected = Zygote::expected(&pending, uids);
                match crate::pid::verify_reported(worker, &expected) {
                    Ok(w) => self.adopt_forked(pid, w, &pending),
                    Err(e) => self.zygote_spawn_failed(
                        pid,
                        slot,
                        &format!("it reported a worker it did not fork: {e}"),
                        now,
                    ),
                }
            }
            // A reply that came after the master gave up on the request:
            // that worker is not supervised, so it must not serve. Killed
            // only if it is a process the zygote forked since it started;
            // a zygote that reports anything else is broken.
            FromZygote::Spawned { slot, pid: worker } => {
                let expected = crate::pid::Expected {
                    parent: std::process::id() as i32,
                    uids,
                    not_before: z.started_ticks,
                };
                match crate::pid::verify_reported(worker, &expected) {
                    Ok(w) => {
                        warn!(
                            "Zygote {pid} reported worker {w} (slot {slot}) too late; killing it"
                        );
                        w.signal_group(Signal::SIGKILL);
                    }
                    Err(e) => {
                        error!(
                            "Zygote {pid} reported a worker it did not fork: {e}; signalling nothing, restarting the zygote"
                        );
                        if z.state != ZygoteState::Stopping {
                            z.state = ZygoteState::Stopping;
                            signal_group(pid, Signal::SIGKILL);
                            self.zygote_failed(now);
                        }
                    }
                }
            }
            // Its exit status (reaped soon) says what happened.
            FromZygote::Closed => {
                debug!("Zygote {pid} closed its channel");
                z.closed = true;
                if let Some(p) = z.pending.take() {
                    self.zygote_spawn_failed(pid, p.slot, "the zygote closed its channel", now);
                }
            }
        }
    }

    /// Asks the current generation's zygote for a worker in `slot`. The
    /// worker joins the table when the zygote's reply arrives (an event
    /// like any other); one request at a time per zygote.
    pub(super) fn spawn_from_zygote(&mut self, slot: usize, now: Instant) {
        let current = self.generation;
        let Some(z) = self.zygotes.ready(current) else {
            // The zygote is still importing: the slot is filled once it is
            // ready (its channel wakes the loop).
            return;
        };
        if z.pending.is_some() {
            // Asked again once the reply in flight arrived.
            return;
        }
        let zpid = z.pid;
        let env = vec![
            ("PROCMAN_WORKER_ID".to_string(), slot.to_string()),
            ("PROCMAN_GENERATION".to_string(), current.to_string()),
        ];
        if let Err(e) = z.request(slot, current, &env, now) {
            self.zygote_spawn_failed(zpid, slot, &e, now);
        }
    }

    /// The zygote reported the worker of `pending`, verified: it is
    /// supervised from now on (killed at once if procman is stopping).
    fn adopt_forked(&mut self, zpid: Pid, w: ChildPid, pending: &Pending) {
        let slot = pending.slot;
        let generation = pending.generation;
        if matches!(self.state, MasterState::Stopping { .. }) {
            warn!("Zygote {zpid} reported worker {w} (slot {slot}) during shutdown; killing it");
            w.signal_group(Signal::SIGKILL);
            return;
        }
        self.zygotes.worked();
        info!(
            event = "booting",
            worker = w.as_raw(),
            zygote = zpid.as_raw(),
            slot,
            generation,
            "Booting worker {slot} with pid {w} (generation {generation}, forked from zygote {zpid})"
        );
        let worker = Worker::new(
            w.pid(),
            slot,
            generation,
            pending.requested_at,
            self.settings.cfg.startup_timeout,
        );
        self.table.insert(worker);
    }

    /// A spawn request failed (an error reply, no reply in time, a reply
    /// that is not to be trusted, or the channel closed). Nothing reported
    /// is signalled: only the zygote (our own child) is killed, and
    /// restarted with backoff.
    fn zygote_spawn_failed(&mut self, zpid: Pid, slot: usize, why: &str, now: Instant) {
        error!(
            event = "zygote-spawn-failed",
            zygote = zpid.as_raw(),
            slot,
            "Zygote {zpid} could not fork a worker for slot {slot}: {why}; restarting it"
        );
        if let Some(z) = self.zygotes.get_mut(zpid) {
            z.pending = None;
            if z.state != ZygoteState::Stopping {
                signal_group(zpid, Signal::SIGKILL);
                z.state = ZygoteState::Stopping;
            }
        }
        self.zygote_failed(now);
    }

    /// A spawn request was not answered in time.
    pub(super) fn zygote_spawn_timed_out(&mut self, zpid: Pid, now: Instant) {
        let Some(p) = self.zygotes.get_mut(zpid).and_then(|z| z.pending) else {
            return;
        };
        let why = format!(
            "the zygote did not answer a spawn request in {}s",
            zygote::SPAWN_REPLY.as_secs()
        );
        self.zygote_spawn_failed(zpid, p.slot, &why, now);
    }

    pub(super) fn on_zygote_exit(&mut self, z: Zygote, status: WaitStatus, now: Instant) {
        let how = describe(&status);
        match z.state {
            // Asked to stop (retired, or found broken and counted then).
            ZygoteState::Stopping => {
                info!(
                    event = "zygote-exited",
                    reason = "stopped",
                    zygote = z.pid.as_raw(),
                    generation = z.generation,
                    "Zygote {} (generation {}) exited: {how}",
                    z.pid,
                    z.generation
                )
            }
            ZygoteState::Starting => {
                let detail = z
                    .reported_error
                    .clone()
                    .unwrap_or_else(|| format!("zygote {} {how}", z.pid));
                // No app was imported: nothing the reload or the boot
                // depends on; cold workers show what is wrong, if anything.
                if self.base_zygote() {
                    self.base_zygote_failed(z.pid, &detail);
                    return;
                }
                if let Some(generation) = self.reload.as_ref().map(|r| r.generation) {
                    if generation == z.generation {
                        self.abort_reload(
                            &format!("the new code could not be loaded: {detail}"),
                            now,
                        );
                        return;
                    }
                }
                if !self.boot.ever_up() {
                    let err = match exit_code(&status) {
                        Some(4) => Error::AppImport(detail),
                        _ => Error::BootFailed(format!("the zygote failed to start: {detail}")),
                    };
                    error!("{err}");
                    self.begin_stop(true, Err(err), now);
                    return;
                }
                warn!(
                    event = "zygote-exited",
                    reason = "failed",
                    zygote = z.pid.as_raw(),
                    generation = z.generation,
                    "Zygote {} failed to start: {detail}",
                    z.pid
                );
                self.zygote_failed(now);
            }
            ZygoteState::Ready => {
                warn!(
                    event = "zygote-exited",
                    reason = "died",
                    zygote = z.pid.as_raw(),
                    generation = z.generation,
                    "Zygote {} (generation {}) exited: {how}; its workers keep serving, restarting it",
                    z.pid,
                    z.generation
                );
                self.zygote_failed(now);
            }
        }
    }

    /// The uids a worker forked by the zygote must have.
    fn workers_uids(&self) -> [u32; 4] {
        crate::pid::workers_uids(self.settings.cfg.credentials.as_ref().map(|c| c.uid))
    }

    /// Backs off zygote restarts; after 3 failures in a row, workers start
    /// cold (each imports the app itself) and this is logged.
    pub(super) fn zygote_failed(&mut self, now: Instant) {
        if let Some(failures) = self.zygotes.failed(now) {
            warn!(
                event = "zygote-cold",
                reason = "failures",
                "The zygote failed {failures} times in a row; new workers start cold (each a new interpreter)"
            );
        }
    }
}

/// Asks a zygote to exit (it has nothing to drain).
pub(super) fn stop_zygote(z: &mut Zygote) {
    if z.state != ZygoteState::Stopping {
        z.state = ZygoteState::Stopping;
        signal_group(z.pid, Signal::SIGTERM);
    }
}
