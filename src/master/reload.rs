//! HUP in the master: a reload is all-or-nothing.
//!
//! The next configuration, launch plan, base environment and listeners are
//! prepared as one value ([`Settings`]) before anything changes; a
//! configuration that does not load or whose new addresses cannot be bound
//! changes nothing. The prepared value is then swapped with the one in
//! force, which the [`Reload`] keeps. The reload either completes (every
//! slot runs the new generation; the previous settings are dropped, closing
//! the sockets only they used) or is aborted (the previous settings are
//! swapped back, so respawns use the old command and environment; sockets
//! only the new settings used are closed; new-generation workers still
//! starting are stopped, and those already serving are replaced by the
//! previous generation like a reload in reverse, so capacity never drops).
//!
//! Listeners are shared between both settings with `Rc`: a socket is closed
//! (and its unix socket file removed) when the last settings holding it are
//! dropped. Workers hold their own copies of the fds, so closing the
//! master's copy never cuts a worker's socket.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::exits::describe_exit;
use super::launch::{release, Reload, Settings};
use super::share::{procmans_nice, set_priority};
use super::{Master, MasterState};
use crate::bind::{BindSpec, Listener};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::notify;
use crate::policy;
use crate::workers::{StopReason, Worker};

/// `fd://N` in a new configuration must not name a descriptor a listener
/// already holds under another spec (`pool`: the listeners in force and
/// those a reload may go back to). bind.rs refuses every other descriptor
/// procman owns; this says which listener holds it.
fn check_fd_binds(cfg: &Config, pool: &[&Rc<Listener>]) -> Result<()> {
    for spec in &cfg.binds {
        let BindSpec::Fd(n) = spec else { continue };
        if pool.iter().any(|l| l.spec == *spec) {
            continue;
        }
        if let Some(l) = pool.iter().find(|l| l.fd.as_raw_fd() == *n) {
            return Err(Error::runtime(format!(
                "cannot bind {spec}: fd {n} belongs to procman (it is the listener for {})",
                l.display
            )));
        }
    }
    Ok(())
}

impl Master {
    /// HUP: re-read the configuration (file, environment, the original
    /// command line), prepare the next settings and roll every worker over
    /// to a new generation. A HUP during a reload supersedes it: a failure
    /// still goes back to what was in force before the first.
    pub(super) fn begin_reload(&mut self) {
        self.reload_to_new_generation(false);
    }

    /// A reload; `sources_changed`: asked by `--reload` (only source files
    /// changed, see [`Master::keep_base_zygote`]).
    pub(super) fn reload_to_new_generation(&mut self, sources_changed: bool) {
        self.reload_began(Instant::now());
        self.systemd.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            notify::monotonic_usec()
        ));
        let prepared = crate::layers::reload_config(&self.args, &self.settings.cfg.options)
            .and_then(|(cfg, set_aside)| Ok((self.prepare(cfg)?, set_aside)));
        let mut next = match prepared {
            Ok((next, set_aside)) => {
                for name in set_aside {
                    warn!(
                        "--{name} changed in the configuration: takes effect at the next restart"
                    );
                }
                next
            }
            Err(e) => {
                error!(
                    event = "reload-failed",
                    "Reload failed: {e}; still serving with the previous configuration"
                );
                self.systemd.reload_failed(&format!("reload failed: {e}"));
                let status = self.status_line();
                self.systemd.send(&format!("READY=1\nSTATUS={status}"));
                self.reload_ended(Err(e.to_string()));
                return;
            }
        };
        for l in &self.settings.listeners {
            if !next.listeners.iter().any(|n| Rc::ptr_eq(n, l)) {
                info!("No longer listening at {} for new workers", l.display);
            }
        }
        // `next` now holds the settings that were in force.
        self.swap_settings(&mut next);
        self.latest_generation += 1;
        let generation = self.latest_generation;
        // Before `self.generation` moves on: the base zygote of the
        // generation in force may serve the new one.
        let kept = sources_changed
            && next.cfg.options == self.settings.cfg.options
            && self.keep_base_zygote(generation);
        match &mut self.reload {
            Some(r) => {
                info!(
                    event = "reload-superseded",
                    superseded = r.generation,
                    generation,
                    "Reload to generation {} superseded by generation {generation}",
                    r.generation
                );
                r.generation = generation;
                r.zygote_kept &= kept;
                release(next.listeners);
            }
            None => {
                self.reload = Some(Reload {
                    generation,
                    previous_generation: self.generation,
                    previous_required: self.required_generation,
                    previous: next,
                    zygote_kept: kept,
                })
            }
        }
        self.generation = generation;
        self.required_generation = generation;
        self.lower_outgoing(generation);
        // A new base zygote per generation (a changed virtualenv or uvicorn
        // is picked up), even if the last one fell back to cold starts.
        if self.base_zygote() && !kept {
            self.zygotes.warm_again();
        }
        info!(
            event = "reloading",
            generation,
            "Reloading: replacing {} workers with generation {generation}",
            self.settings.target
        );
    }

    /// `--reload` after source files changed, with the same options: the
    /// ready base zygote of the generation in force forks the new
    /// generation's workers too, instead of a new one being started (it
    /// holds Python and uvicorn, never the app: each worker imports the
    /// changed sources itself). Saves a zygote's start per reload; a HUP
    /// always starts a new one (a changed virtualenv or uvicorn is picked
    /// up). If the reload fails, the zygote goes back to the generation
    /// that goes on serving ([`Master::abort_reload`]): it holds what it
    /// held (under `--reload`, also the app's third-party modules), so the
    /// fix is served as soon as any other edit.
    fn keep_base_zygote(&mut self, generation: u64) -> bool {
        if !self.base_zygote() || !self.preloading() {
            return false;
        }
        let Some(z) = self.zygotes.ready(self.generation) else {
            return false;
        };
        z.generation = generation;
        info!(
            "Base zygote {} (Python and uvicorn) forks generation {generation} too: only sources changed",
            z.pid
        );
        true
    }

    /// The settings for a newly loaded configuration. Addresses already
    /// bound (now, or by the settings a reload may go back to) are reused;
    /// new ones are bound now. Nothing in force changes.
    fn prepare(&mut self, cfg: Config) -> Result<Settings> {
        let keep_inherited =
            !cfg.binds_given && self.settings.listeners.iter().all(|l| l.inherited);
        let listeners = if keep_inherited {
            self.settings.listeners.clone()
        } else {
            let pool: Vec<&Rc<Listener>> = self
                .settings
                .listeners
                .iter()
                .chain(self.reload.iter().flat_map(|r| r.previous.listeners.iter()))
                .collect();
            check_fd_binds(&cfg, &pool)?;
            let mut out: Vec<Rc<Listener>> = Vec::new();
            for spec in &cfg.binds {
                let reused = pool
                    .iter()
                    .find(|l| l.spec == *spec && !out.iter().any(|o| Rc::ptr_eq(o, l)));
                if let Some(l) = reused {
                    out.push(Rc::clone(l));
                    continue;
                }
                let opts = crate::bind::BindOptions {
                    // Only a restart changes these two.
                    reuse_port: self.settings.cfg.reuse_port,
                    owner: self.settings.cfg.bind_options().owner,
                    ..cfg.bind_options()
                };
                match Listener::bind(spec, &opts) {
                    Ok(l) => {
                        info!(
                            event = "listening",
                            address = %l.display,
                            name = %l.name,
                            "Listening at: {} ({}, bound on reload)",
                            l.display,
                            l.name
                        );
                        out.push(Rc::new(l));
                    }
                    Err(e) => {
                        // Nothing changes: files bound here go, and fd://
                        // sockets go back to the inherited ones.
                        for l in out {
                            if let Ok(l) = Rc::try_unwrap(l) {
                                l.abandon();
                            }
                        }
                        return Err(e);
                    }
                }
            }
            out
        };
        // The restart-only options kept their value in force (see
        // layers::reload_config); the identity also keeps its resolution
        // at start (the group list is not looked up again).
        let mut cfg = cfg;
        cfg.credentials = self.settings.cfg.credentials.clone();
        Ok(Settings::new(cfg, listeners))
    }

    fn swap_settings(&mut self, s: &mut Settings) {
        std::mem::swap(&mut self.settings, s);
    }

    /// Every slot runs the new generation: the previous settings go, and
    /// with them the sockets no longer in use.
    pub(super) fn complete_reload(&mut self) {
        let Some(r) = self.reload.take() else { return };
        if r.previous.target != self.settings.target {
            self.reshare();
        }
        for addr in release(r.previous.listeners) {
            info!("Closed {addr}");
        }
        info!(
            event = "reload-done",
            generation = r.generation,
            "Reload done: generation {} serving",
            r.generation
        );
        self.reload_ended(Ok(()));
        self.systemd.reload_succeeded();
        let status = self.status_line();
        self.systemd.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// The reload failed: the previous settings are back in force (for
    /// every respawn), sockets only the new ones used are closed, new
    /// workers still starting are stopped, and those already serving are
    /// replaced by the previous generation (the policy sees them as
    /// outdated).
    pub(super) fn abort_reload(&mut self, why: &str, now: Instant) {
        let Some(mut r) = self.reload.take() else {
            return;
        };
        // `r.previous` now holds the failed settings.
        self.swap_settings(&mut r.previous);
        self.generation = r.previous_generation;
        self.required_generation = r.previous_required;
        error!(
            event = "reload-failed",
            generation = r.generation,
            "Reload to generation {} failed: {why}; generation {} (the previous configuration) keeps serving",
            r.generation,
            self.generation
        );
        self.reload_ended(Err(why.to_string()));
        if r.zygote_kept {
            self.give_back_base_zygote(r.generation);
        }
        for addr in release(std::mem::take(&mut r.previous.listeners)) {
            info!("Closed {addr} (bound by the failed reload)");
        }
        let current = self.generation;
        let starting: Vec<Pid> = self
            .table
            .iter()
            .filter(|w| w.generation > current && w.is_starting())
            .map(|w| w.pid)
            .collect();
        let serving = self
            .table
            .iter()
            .filter(|w| w.generation > current && w.is_ready())
            .count();
        if serving > 0 {
            info!(
                "Replacing {serving} worker{} of the failed generation with generation {current}",
                if serving == 1 { "" } else { "s" }
            );
        }
        let grace = self.settings.cfg.graceful_timeout;
        for pid in starting {
            self.stop_worker(pid, StopReason::ReloadAborted, grace, now);
        }
        self.raise_back(current);
        self.systemd.reload_failed(&format!(
            "reload to generation {} failed: {why}",
            r.generation
        ));
        let status = self.status_line();
        self.systemd.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A failed reload whose base zygote was kept from the generation in
    /// force ([`Master::keep_base_zygote`]): that zygote, still ready, forks
    /// that generation's workers again, instead of a new one being
    /// started (which would know nothing of the app's third-party modules:
    /// the fix of a broken edit would be imported cold). It never imported
    /// the failed code: a base zygote imports no module of the app's trees.
    fn give_back_base_zygote(&mut self, failed: u64) {
        let current = self.generation;
        if let Some(z) = self.zygotes.ready(failed) {
            z.generation = current;
            info!(
                "Base zygote {} forks generation {current} again (the reload failed)",
                z.pid
            );
        }
    }

    /// The workers a reload replaces keep serving until their replacements
    /// are ready, at a lower CPU priority: on a busy machine the new
    /// generation's boots (CPU-bound imports) then get the CPUs first,
    /// instead of a share among every serving worker, and the outgoing
    /// ones serve with what is left. On an idle machine nothing changes.
    fn lower_outgoing(&mut self, generation: u64) {
        let mut lowered: Vec<(i32, i32)> = Vec::new();
        // From procman's own priority, never from one read from a worker's
        // group (whose members the worker chooses): the failed reload's
        // raise_back goes back to it.
        let Some(from) = procmans_nice() else {
            return;
        };
        let Some(to) = policy::lowered_nice(from) else {
            return;
        };
        for pid in policy::to_lower(&self.table, generation) {
            let Some(w) = self.table.get_mut(pid) else {
                continue;
            };
            if let Err(e) = set_priority(w, to) {
                debug!("Cannot lower the priority of worker {pid}: {e}");
                continue;
            }
            // A worker still booting at a raised priority is lowered too,
            // and is then no longer boosted.
            if let Some(a) = self.table.get_mut(pid).and_then(|w| w.active_mut()) {
                a.lowered_from = Some(from);
                a.boosted = None;
            }
            lowered.push((from, to));
        }
        let Some((from, to)) = lowered.first().copied() else {
            return;
        };
        let n = lowered.len();
        info!(
            event = "priority-lowered",
            workers = n,
            from,
            to,
            "Lowered the CPU priority of {n} outgoing worker{} (nice {from} to {to}) so that their replacements boot first",
            if n == 1 { "" } else { "s" }
        );
    }

    /// After a failed reload, the workers that keep serving get their
    /// priority back. Raising a priority needs CAP_SYS_NICE: without it a
    /// lowered worker is recycled instead (one at a time, its replacement
    /// ready first), so the previous generation ends up serving at its
    /// old priority either way.
    fn raise_back(&mut self, generation: u64) {
        for (pid, nice) in policy::to_restore(&self.table, generation) {
            let Some(w) = self.table.get_mut(pid) else {
                continue;
            };
            match set_priority(w, nice) {
                Ok(()) => {
                    let Some(w) = self.table.get_mut(pid) else {
                        continue;
                    };
                    if let Some(a) = w.active_mut() {
                        a.lowered_from = None;
                    }
                    worker_event!(
                        info,
                        "priority-restored",
                        w,
                        "Worker {pid} (slot {}) is back at nice {nice}",
                        w.slot
                    );
                }
                Err(e) => {
                    self.recycling.ask(
                        pid,
                        format!("reload failed: its priority, lowered for the reload, cannot be raised back to nice {nice} ({e})"),
                    );
                }
            }
        }
    }

    /// Called for every reaped worker before anything else. A worker of
    /// the generation being rolled out that died without being asked to
    /// (or for missing its startup or heartbeat deadline) fails the reload;
    /// a worker of a failed or superseded reload is only logged. Neither
    /// feeds the slot's backoff nor the boot-failure count: they say
    /// nothing about the configuration in force. Returns whether the exit
    /// was handled here.
    pub(super) fn reload_worker_exited(
        &mut self,
        w: &Worker,
        status: &WaitStatus,
        now: Instant,
    ) -> bool {
        if matches!(self.state, MasterState::Stopping { .. }) {
            return false;
        }
        let rolling_out = self.reload.as_ref().map(|r| r.generation);
        let baseline = self
            .reload
            .as_ref()
            .map_or(self.generation, |r| r.previous_generation);
        let how = describe_exit(status, w.stop());
        if rolling_out == Some(w.generation) {
            let reason = w.stop().map(|s| s.reason);
            let how = match reason {
                None if w.active().is_some_and(|a| a.draining) => return false,
                None => how,
                Some(StopReason::StartupTimeout) => {
                    format!("not ready within {:?}", self.settings.cfg.startup_timeout)
                }
                Some(StopReason::HeartbeatTimeout) => format!("timed out ({how})"),
                Some(_) => return false,
            };
            let what = if w.ready_at.is_some() {
                "died before the reload completed"
            } else {
                "failed to boot"
            };
            let detail = w
                .reported_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            super::lifecycle::log_traceback(w);
            self.abort_reload(
                &format!(
                    "worker {} (slot {}) of the new generation {what}: {how}{detail}",
                    w.pid, w.slot
                ),
                now,
            );
            return true;
        }
        if w.generation > baseline {
            worker_event!(
                info,
                "exited",
                reason = "reload",
                w,
                "Worker {} (slot {}) of the abandoned generation {} exited: {how}",
                w.pid,
                w.slot,
                w.generation
            );
            return true;
        }
        false
    }
}
