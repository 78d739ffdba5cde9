//! `--preload` in the master: what it does with its zygotes (see
//! zygotes.rs for their bookkeeping): starts one per generation when
//! needed, asks it for each worker and adopts the worker it reports,
//! restarts it with backoff when it dies (the workers keep serving), retires
//! it when its generation has no worker left, and gives up for cold starts
//! after repeated failures; a zygote that cannot start fails the reload or
//! the boot that needed it.

use std::os::fd::AsRawFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::exits::{describe, exit_code};
use super::zygotes::{self, Heard};
use super::{Master, MasterState};
use crate::error::Error;
use crate::pid::ChildPid;
use crate::policy::Due;
use crate::workers::Worker;
use crate::zygote::{self, FromZygote, Pending, Sender, Zygote, ZygoteState};

impl Master {
    /// Whether workers are forked from a zygote (unless they start cold
    /// after repeated zygote failures).
    pub(super) fn preloading(&self) -> bool {
        zygotes::wanted(&self.settings.cfg) && !self.zygotes.cold()
    }

    /// Whether the zygote is the base one (see [`zygotes::is_base`]).
    pub(super) fn base_zygote(&self) -> bool {
        zygotes::is_base(&self.settings.cfg)
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

    /// The zygotes' pending deadlines, while workers come from them.
    pub(super) fn zygote_deadlines(&self) -> Vec<(Instant, Due)> {
        if !self.preloading() {
            return Vec::new();
        }
        self.zygotes.deadlines(self.settings.cfg.startup_timeout)
    }

    /// A zygote did not become ready in time: killed and restarted with
    /// backoff.
    pub(super) fn zygote_start_timed_out(&mut self, pid: Pid, now: Instant) {
        if !self.zygotes.is_starting(pid) {
            return;
        }
        let timeout = self.settings.cfg.startup_timeout;
        warn!("Zygote {pid} was not ready within {timeout:?}; killing it");
        self.zygotes.kill(pid, "after its startup timeout");
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
        let table = &self.table;
        let in_use = |g| table.iter().any(|w| w.is_active() && w.generation == g);
        for (pid, generation) in self.zygotes.unused(current, in_use) {
            info!("Zygote {pid} (generation {generation}) has no worker left; stopping it");
            self.zygotes.stop(pid);
        }
        if !self.zygotes.has(current) && self.zygotes.may_start() {
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
        let Some(plan) = self.settings.zygote_plan(
            self.notify.receiver().path(),
            self.urgent.path(),
            zygote_end.as_raw_fd(),
        ) else {
            return;
        };
        let spawned = plan
            .map_err(|e| format!("'{}' contains a NUL byte", e.0))
            .and_then(|p| p.spawn().map_err(|e| e.desc().to_string()));
        drop(zygote_end);
        match spawned {
            Ok(s) if s.exec_error.is_none() => {
                let mut z = Zygote::new(s.pid, self.generation, master_end, now);
                // --reload: it imports what its workers learned between requests.
                if !opts.preload && self.settings.cfg.watch.is_some() {
                    z.reply_within = zygote::SPAWN_REPLY_LEARNING;
                }
                let imports = if opts.preload {
                    format!("imports {} once", opts.app)
                } else {
                    format!(
                        "base: Python and {}; each worker imports {}",
                        opts.server.name(),
                        opts.app
                    )
                };
                zygote_event!(
                    info,
                    "zygote-starting",
                    z,
                    "Starting zygote {} for generation {} ({imports})",
                    z.pid,
                    z.generation
                );
                self.zygotes.add(z);
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

    /// Takes in a bounded batch of each zygote's messages (see
    /// [`zygote::MAX_BATCH`]): the loop comes back for more after signals,
    /// reaping and the endpoints.
    pub(super) fn drain_zygotes(&mut self, now: Instant) {
        for (pid, message, sender) in self.zygotes.drain() {
            let event = super::Event::Zygote {
                pid,
                message,
                sender,
            };
            self.handle(event, now);
        }
    }

    /// `sender`, which sent a notification, if it is a worker once the
    /// zygotes' channels were read: while a zygote awaits a reply, the
    /// worker that sent it may already notify (it reports itself first, but
    /// its report may be queued behind other messages the last batch left).
    pub(super) fn awaited_worker(&mut self, sender: Pid, now: Instant) -> Option<Pid> {
        if !self.zygotes.awaiting() {
            return None;
        }
        self.drain_zygotes(now);
        self.table.get(sender).map(|_| sender)
    }

    /// Messages dropped from zygotes' channels since the start, by reason
    /// (for `/metrics`).
    pub(super) fn zygote_drops(&self) -> std::collections::BTreeMap<String, u64> {
        self.zygotes
            .drops()
            .iter()
            .map(|(why, n)| (why.to_string(), *n))
            .collect()
    }

    pub(super) fn on_zygote_message(
        &mut self,
        pid: Pid,
        message: FromZygote,
        sender: Option<Sender>,
        now: Instant,
    ) {
        let uids = self.workers_uids();
        let (table, groups) = (&self.table, &self.groups);
        let known = |p: i32| {
            if table.get(Pid::from_raw(p)).is_some() {
                Some("a worker")
            } else if groups.tracks(p) {
                Some("a tracked process group")
            } else {
                None
            }
        };
        let heard = self
            .zygotes
            .hear(pid, message, uids, crate::pid::verify_reported, known);
        match heard {
            Heard::Nothing => {}
            Heard::Dropped(why) => self.zygote_dropped(pid, sender, why, now),
            Heard::Unasked { stray } => {
                kill_stray(pid, Some(stray));
                self.zygote_dropped(pid, sender, "unexpected", now);
            }
            Heard::Ready {
                generation,
                started_at,
            } => info!(
                event = "zygote-ready",
                zygote = pid.as_raw(),
                generation,
                "Zygote {pid} ready in {:.3}s (generation {generation})",
                now.saturating_duration_since(started_at).as_secs_f64(),
            ),
            Heard::Warning(w) => warn!("Zygote {pid}: {w}"),
            Heard::SpawnFailed { slot, why, stray } => {
                kill_stray(pid, stray);
                self.zygote_spawn_failed(pid, slot, &why, now)
            }
            Heard::Adopt { worker, pending } => self.adopt_forked(pid, worker, &pending),
            Heard::Late { worker, slot } => {
                warn!("Zygote {pid} reported worker {worker} (slot {slot}) too late; killing it");
                worker.signal_group(Signal::SIGKILL);
            }
            Heard::Untrusted { why, stray } => {
                error!(
                    "Zygote {pid} reported a worker it did not fork: {why}; signalling nothing it named, restarting the zygote"
                );
                kill_stray(pid, stray);
                if self
                    .zygotes
                    .kill(pid, "after a reply naming a worker it did not fork")
                {
                    self.zygote_failed(now);
                }
            }
        }
    }

    /// Counts a message dropped from zygote `pid`'s channel, and says so
    /// when a line is due (the first drop, then at most every 10 s).
    fn zygote_dropped(
        &mut self,
        pid: Pid,
        sender: Option<Sender>,
        why: &'static str,
        now: Instant,
    ) {
        if let Some(line) = self.zygotes.dropped(pid, sender, why, now) {
            let by = line
                .sender
                .map(|s| format!("pid {} uid {}", s.pid, s.uid))
                .unwrap_or_else(|| "an unknown process".into());
            warn!(
                event = "zygote-messages-dropped",
                zygote = line.zygote.as_raw(),
                sender_pid = line.sender.map(|s| s.pid),
                sender_uid = line.sender.map(|s| s.uid),
                reason = line.why,
                dropped = line.dropped,
                total = line.total,
                "Dropped {} message{} on the channel of zygote {}, the last from {by} ({}: the channel takes one reply per request, messages of at most {} bytes); {} in all, counted in procman_zygote_messages_dropped_total, said at most every {}s",
                line.dropped,
                if line.dropped == 1 { "" } else { "s" },
                line.zygote,
                line.why,
                zygote::MAX_MESSAGE,
                line.total,
                zygotes::DROPS_SAID_EVERY.as_secs()
            );
        }
    }

    /// Asks the current generation's zygote for a worker in `slot` (see
    /// [`zygotes::Zygotes::ask`]).
    pub(super) fn spawn_from_zygote(&mut self, slot: usize, now: Instant) {
        let cpu = self.settings.slot_cpu(slot);
        let Some(sockets) = self.slot_sockets(slot, now) else {
            return;
        };
        if let Err((zpid, e)) = self.zygotes.ask(slot, self.generation, cpu, &sockets, now) {
            self.zygote_spawn_failed(zpid, slot, &e, now);
        }
    }

    /// The zygote reported the worker of `pending`, verified: it is
    /// supervised from now on (killed at once if procman is stopping).
    fn adopt_forked(&mut self, zpid: Pid, w: ChildPid, pending: &Pending) {
        let slot = pending.slot;
        if matches!(self.state, MasterState::Stopping { .. }) {
            warn!("Zygote {zpid} reported worker {w} (slot {slot}) during shutdown; killing it");
            w.signal_group(Signal::SIGKILL);
            return;
        }
        self.zygotes.worked();
        let mut worker = Worker::new(
            w.pid(),
            slot,
            pending.generation,
            pending.requested_at,
            self.settings.cfg.startup_timeout,
        );
        if self.table.get(w.pid()).is_some() {
            // Refused when the reply was heard; never two rows for a pid.
            error!("Zygote {zpid} reported worker {w} (slot {slot}), already a worker; ignored");
            return;
        }
        // Before its `booting` event, as for a worker the master forks.
        self.share_cpu(&mut worker, Instant::now());
        self.boost_booting(&mut worker);
        worker_event!(
            info,
            "booting",
            worker,
            zygote = zpid.as_raw(),
            "Booting worker {slot} with pid {w} (generation {}, forked from zygote {zpid})",
            worker.generation
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
        self.zygotes.kill(zpid, "after a failed spawn");
        self.zygote_failed(now);
    }

    /// A spawn request was not answered in time.
    pub(super) fn zygote_spawn_timed_out(&mut self, zpid: Pid, now: Instant) {
        let within = self.zygotes.get_mut(zpid).map(|z| z.reply_within);
        let Some(slot) = self.zygotes.take_request(zpid) else {
            return;
        };
        let why = format!(
            "the zygote did not answer a spawn request in {}s",
            within.unwrap_or(zygote::SPAWN_REPLY).as_secs()
        );
        self.zygote_spawn_failed(zpid, slot, &why, now);
    }

    pub(super) fn on_zygote_exit(&mut self, z: Zygote, status: WaitStatus, now: Instant) {
        let how = match (&status, z.kill_cause) {
            (WaitStatus::Signaled(_, Signal::SIGKILL, _), Some(cause)) => {
                format!("killed by procman {cause}")
            }
            _ => describe(&status),
        };
        match z.state {
            // Asked to stop (retired, or found broken and counted then).
            ZygoteState::Stopping => {
                zygote_event!(
                    info,
                    "zygote-exited",
                    reason = "stopped",
                    z,
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
                        // What explains it, once: the zygote is the one
                        // import of the new code.
                        if let Some(tb) = &z.reported_traceback {
                            error!(
                                zygote = z.pid.as_raw(),
                                traceback = tb.as_str(),
                                "Zygote {} (generation {}) could not load the app:",
                                z.pid,
                                z.generation
                            );
                        }
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
                zygote_event!(
                    warn,
                    "zygote-exited",
                    reason = "failed",
                    z,
                    "Zygote {} failed to start: {detail}",
                    z.pid
                );
                self.zygote_failed(now);
            }
            ZygoteState::Ready => {
                zygote_event!(
                    warn,
                    "zygote-exited",
                    reason = "died",
                    z,
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

/// A refused reply's sender that is a fresh child of the master nothing
/// supervises (the zygote's fork, verified like a worker): killed, so that
/// it cannot serve unsupervised. Its pid cannot have been reused: it is
/// the master's child, not reaped yet.
fn kill_stray(zpid: Pid, stray: Option<ChildPid>) {
    if let Some(p) = stray {
        warn!("Zygote {zpid}: killing process {p}, which sent a refused reply (it must not serve unsupervised)");
        p.signal_group(Signal::SIGKILL);
    }
}
