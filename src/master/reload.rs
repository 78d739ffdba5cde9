//! HUP in the master: re-read the configuration, apply it (binding new
//! addresses, retiring removed ones), and roll over to a new generation; or,
//! when the new generation cannot boot, go back to the previous one.

use std::time::Instant;

use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::{worker_base_env, Master, Reload};
use crate::bind::Listener;
use crate::classes;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::notify;
use crate::workers::{StopReason, WorkerState};

impl Master {
    /// HUP: re-read the configuration (file, environment, the original
    /// command line), apply it, and roll every worker over to a new
    /// generation. A configuration that does not load or whose new sockets
    /// cannot be bound changes nothing: the running workers keep serving.
    pub(super) fn begin_reload(&mut self) {
        if let Some(sd) = &self.systemd {
            sd.send(&format!(
                "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
                notify::monotonic_usec()
            ));
        }
        let applied = crate::startup::load_config(&self.args)
            .and_then(|loaded| loaded.ok_or_else(|| Error::usage("--help or --version on reload")))
            .and_then(|(cfg, _)| self.apply_config(cfg));
        if let Err(e) = applied {
            error!("Reload failed: {e}; still serving with the previous configuration");
            if let Some(sd) = &self.systemd {
                sd.send(&format!("READY=1\nSTATUS=reload failed: {e}"));
            }
            return;
        }
        let (previous_required, previous_generation) = self
            .reload
            .map_or((self.required_generation, self.generation), |r| {
                (r.previous_required, r.previous_generation)
            });
        self.generation += 1;
        self.required_generation = self.generation;
        self.reload = Some(Reload {
            generation: self.generation,
            previous_required,
            previous_generation,
        });
        info!(
            "Reloading: replacing {} workers with generation {}",
            self.target, self.generation
        );
    }

    /// Switches to a newly loaded configuration. New addresses are bound
    /// now; sockets no longer wanted are closed once the workers that use
    /// them are gone (when the reload completes).
    pub(super) fn apply_config(&mut self, cfg: Config) -> Result<()> {
        let mut next: Vec<Listener> = Vec::new();
        let mut kept = vec![false; self.listeners.len()];
        let keep_inherited = !cfg.binds_given && self.listeners.iter().all(|l| l.inherited);
        if keep_inherited {
            kept.iter_mut().for_each(|k| *k = true);
        } else {
            for spec in &cfg.binds {
                match self.listeners.iter().position(|l| l.spec == *spec) {
                    Some(i) if !kept[i] => kept[i] = true,
                    _ => match Listener::bind(
                        spec,
                        &crate::bind::BindOptions {
                            // Only a restart changes these two.
                            reuse_port: self.cfg.reuse_port,
                            owner: self.cfg.bind_options().owner,
                            ..cfg.bind_options()
                        },
                    ) {
                        Ok(l) => {
                            info!("Listening at: {} ({}, bound on reload)", l.display, l.name);
                            next.push(l);
                        }
                        Err(e) => {
                            for l in &mut next {
                                l.remove_file();
                            }
                            return Err(e);
                        }
                    },
                }
            }
        }
        for (what, changed) in [
            ("--user/--group", cfg.credentials != self.cfg.credentials),
            ("--pid", cfg.pidfile != self.cfg.pidfile),
            (
                "--log-file/--log-format/--log-level",
                cfg.log_file != self.cfg.log_file
                    || cfg.log_format != self.cfg.log_format
                    || cfg.log_level != self.cfg.log_level,
            ),
            ("--reuse-port", cfg.reuse_port != self.cfg.reuse_port),
        ] {
            if changed {
                warn!("{what} changed in the configuration: takes effect at the next restart");
            }
        }
        // Keep the surviving listeners in their order, then the new ones.
        let old = std::mem::take(&mut self.listeners);
        for (l, keep) in old.into_iter().zip(kept) {
            if keep {
                self.listeners.push(l);
            } else {
                info!("No longer listening at {} for new workers", l.display);
                self.retired_listeners.push(l);
            }
        }
        self.listeners.extend(next);
        let mut cfg = cfg;
        // What only a restart can change stays as it was.
        cfg.credentials = self.cfg.credentials.clone();
        cfg.reuse_port = self.cfg.reuse_port;
        self.launch = classes::launch(&cfg);
        self.base_env = worker_base_env(&cfg);
        self.target = cfg.workers;
        self.cfg = cfg;
        Ok(())
    }

    pub(super) fn abort_reload(&mut self, why: &str, now: Instant) {
        let Some(r) = self.reload.take() else { return };
        self.required_generation = r.previous_required;
        // New spawns go back to the previous generation (with --preload,
        // its zygote still holds the code that works).
        self.generation = r.previous_generation;
        error!(
            "Reload to generation {} failed: {why}; the running workers keep serving",
            r.generation
        );
        let starting: Vec<Pid> = self
            .table
            .iter()
            .filter(|w| w.generation == r.generation && w.state == WorkerState::Starting)
            .map(|w| w.pid)
            .collect();
        let grace = self.cfg.graceful_timeout;
        for pid in starting {
            self.stop_worker(pid, StopReason::ReloadAborted, grace, now);
        }
        if let Some(sd) = &self.systemd {
            sd.send(&format!(
                "READY=1\nSTATUS=reload to generation {} failed; {} workers serving",
                r.generation,
                self.table.ready_count()
            ));
        }
    }
}
