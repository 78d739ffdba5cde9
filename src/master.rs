//! The master loop: events in, policy decides, effects out.
//!
//! One thread, one `poll(2)` over the signal self-pipe and the notify
//! sockets (and, with `--reload`, the inotify descriptor), with the
//! earliest deadline as its timeout; nothing wakes the
//! master when nothing is due. The notify socket is in the poll set only
//! while a notification may need an answer at once; an idle master reads
//! heartbeats in batches (`messages` says when and why); the urgent socket
//! (`urgent`) is always in it. Each iteration:
//! drain signals, drain notifications (at every wake-up, whether the
//! socket was polled or not; before reaping, so a READY=1 sent just before
//! an exit is still attributed; before deadlines are acted on and before
//! the endpoints answer, so a heartbeat deadline or a status sees every
//! heartbeat sent so far), reap with `waitpid(-1, WNOHANG)` until empty,
//! handle passed deadlines, then reconcile the workers with the goal.
//!
//! Every event goes through [`Master::handle`], one `match` over (master
//! state, event) whose arms call small named methods: signals,
//! notifications, zygote messages, exits, and passed deadlines. Every part
//! lists its pending deadlines as data (`(Instant, Due)`, see
//! [`Master::deadlines`]); the loop sleeps until the earliest, and a passed
//! one is an `Event::Due` like any other, so no deadline is computed twice.
//! Decisions about which workers to start or stop live in `policy.rs`; the
//! master only turns them into system calls.
//!
//! The parts, each in its own file under `master/`. Owned values with their
//! own tests: `boot` (slot backoff, ever up, failed boots), `zygotes` (the
//! zygotes, which one serves a slot, the spawn request in flight and what
//! its reply is verified against, restart backoff, cold fallback),
//! `groups` (process groups outliving their leader, until empty),
//! `recycle` (the queue, memory sampling, lifetime jitter), `launch` (the
//! settings workers and zygotes start from, and their environment and fork
//! plan), `systemd` (procman's own supervisor), `exits` (exit statuses as
//! sentences). What the master does with them, as `impl Master`:
//! `lifecycle` (spawn, ready, exit), `boost` (a booting worker's raised
//! priority), `stop` (procman's stop and a
//! worker's), `messages` (sd_notify from workers; `inbox` reads them in
//! bounded batches and counts what it discards), `urgent` (the socket for
//! what cannot wait for a batched read), `preload` (starting
//! zygotes, adopting the workers they fork, their failures), `reload` (a
//! reload as a value), `observe` (the metrics and control endpoints),
//! `watch` (`--reload`: changed source files become one reload),
//! `upgrade` (re-exec in place: the pre-flight beside the loop, the
//! hand-over, and the new image adopting the state), and `wake` (the
//! deadlines as one list, the poll set, what a passed deadline does).
//! A worker's lifecycle events are logged with `worker_event!` (`events`),
//! so their JSON fields are the same at every site.

use std::ffi::OsString;
use std::rc::Rc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::bind::Listener;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::notify::{Message, Receiver};
use crate::policy::{self, Decision, Due, Goal};
use crate::signals::{MasterSignal, Signals};
use crate::workers::Table;
use crate::zygote::{FromZygote, Sender};
use inbox::Inbox;

#[macro_use]
mod events;

mod boost;
mod boot;
mod exits;
mod groups;
mod inbox;
mod launch;
mod lifecycle;
mod messages;
mod observe;
mod preload;
mod recycle;
mod reload;
mod share;
mod stop;
mod systemd;
mod upgrade;
mod urgent;
mod wake;
mod watch;
mod zygotes;

pub use exits::describe;
pub use launch::worker_base_env;

use boost::Boost;
use boot::Boot;
use exits::signal_group;
use groups::{Groups, Kernel};
use launch::{release, Reload, Settings};
use observe::Endpoints;
use recycle::Recycling;
use systemd::SystemdLink;
use urgent::Urgent;
use watch::Changes;
use zygotes::Zygotes;

/// What the master as a whole is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum MasterState {
    /// The first workers are starting; systemd has not been told READY.
    Booting,
    Running,
    /// Stopping every worker; exits with `outcome` once all are reaped.
    Stopping {
        /// Quick (2 s grace) or graceful (--graceful-timeout).
        quick: bool,
        /// The exit: Ok for a clean stop, or the failure that caused it.
        outcome: std::result::Result<(), Error>,
    },
}

#[derive(Debug)]
pub enum Event {
    Signal(MasterSignal),
    /// A notification from a worker (already attributed).
    Notified {
        /// The worker it is attributed to.
        worker: Pid,
        /// The sender (the worker or one of its descendants).
        sender: i32,
        /// When it was sent (it may be read later).
        sent: Instant,
        message: Message,
    },
    /// A message on a zygote's channel, and who sent it.
    Zygote {
        pid: Pid,
        message: FromZygote,
        sender: Option<Sender>,
    },
    Exited {
        pid: Pid,
        status: WaitStatus,
    },
    Due(Due),
}

/// The master's whole state.
pub struct Master {
    /// What workers are started from (configuration, launch recipe,
    /// environment, listeners, target): one value a reload replaces whole.
    settings: Settings,
    signals: Signals,
    /// The notify socket and when it was last read.
    notify: Inbox,
    /// The notify socket that is always polled (`urgent`).
    urgent: Urgent,
    systemd: SystemdLink,
    table: Table,
    /// Backoff of each slot, and whether procman was ever up.
    boot: Boot,
    state: MasterState,
    generation: u64,
    required_generation: u64,
    reload: Option<Reload>,
    /// The highest generation ever started (a failed reload's number is
    /// not reused).
    latest_generation: u64,
    recycling: Recycling,
    expected_wake: Option<Instant>,
    /// The original command line, re-read (with the environment and the
    /// config file) on HUP.
    args: Vec<OsString>,
    /// `--preload`: the zygotes, their restart backoff and the fall-back to
    /// cold starts.
    zygotes: Zygotes,
    /// Process groups whose leader was reaped but which still have members.
    groups: Groups,
    /// Once a quick stop (or a second TERM) was asked for: no SIGKILL may be
    /// pushed past this, whatever a worker asks with EXTEND_TIMEOUT_USEC.
    kill_limit: Option<Instant>,
    /// `--metrics` and `--control-socket`, and what they report.
    endpoints: Endpoints,
    /// Whether booting workers may run at a raised priority (`boost`).
    boost: Boost,
    /// `--reload`: the source watch and the changes not yet reloaded.
    changes: Option<Changes>,
    /// This image took over from an earlier one (`upgrade`).
    upgraded: bool,
    /// An upgrade whose pre-flight runs (`upgrade`).
    checking: Option<upgrade::Checking>,
    /// When the kernel last refused a worker's autogroup (`share`; the
    /// master's start if it never did).
    autogroups_tried: Instant,
}

impl Master {
    /// Sets up the master around already-bound listeners. Installs the
    /// signal handlers and the notify socket; starts nothing yet.
    pub fn new(
        cfg: Config,
        listeners: Vec<Listener>,
        signals: Signals,
        args: Vec<OsString>,
    ) -> Result<Master> {
        let notify = Receiver::create(cfg.credentials.as_ref())?;
        let urgent = Urgent::create(cfg.credentials.as_ref(), Instant::now())?;
        let endpoints = Endpoints::bind(&cfg)?;
        let listeners = listeners.into_iter().map(Rc::new).collect();
        let changes = cfg.watch.as_ref().and_then(Changes::start);
        Ok(Master {
            settings: Settings::new(cfg, listeners),
            signals,
            notify: Inbox::new(notify, Instant::now()),
            urgent,
            systemd: SystemdLink::from_env(Instant::now()),
            table: Table::default(),
            boot: Boot::default(),
            state: MasterState::Booting,
            generation: 1,
            required_generation: 1,
            reload: None,
            latest_generation: 1,
            recycling: Recycling::new(),
            expected_wake: None,
            args,
            zygotes: Zygotes::default(),
            groups: Groups::default(),
            kill_limit: None,
            endpoints,
            boost: Boost::default(),
            changes,
            upgraded: false,
            checking: None,
            autogroups_tried: Instant::now(),
        })
    }

    /// Runs until every worker is gone after a stop. Returns the outcome.
    pub fn run(mut self) -> Result<()> {
        // How the count was chosen matters for `auto` (affinity mask or
        // cgroup quota); a number the operator gave needs no explanation.
        let why = match self.settings.cfg.workers_reason.as_str() {
            "set" | "default" => String::new(),
            reason => format!(" ({reason})"),
        };
        if !self.upgraded {
            info!(
                "Starting {} worker{}{why}: {}",
                self.settings.target,
                plural(self.settings.target),
                self.settings.cfg.describe_workers()
            );
        }
        // A stop requested during the pre-start commands is honoured before
        // any worker starts.
        for sig in self.signals.drain() {
            self.handle(Event::Signal(sig), Instant::now());
        }
        if self.upgraded {
            // Workers that exited while the image changed: reaped now,
            // whether or not their CHLD is still pending.
            let now = Instant::now();
            self.drain_notifications(now);
            while let Some((pid, status)) = reap_one() {
                self.handle(Event::Exited { pid, status }, now);
            }
        }
        loop {
            let now = Instant::now();
            self.act(now);
            self.report_status();
            self.flush_endpoints(now);
            if let MasterState::Stopping { outcome, .. } = &self.state {
                // Done only when no process of any group we created remains.
                if self.table.is_empty() && self.zygotes.is_empty() && self.groups.is_empty() {
                    let outcome = outcome.clone();
                    self.finish();
                    return outcome;
                }
            }
            let listen = self.pace_notifications();
            let wake = self.next_wake();
            self.expected_wake = wake;
            self.wait(wake.map(|w| w.saturating_duration_since(now)), listen);
            let now = Instant::now();
            if let Some(late) = policy::was_suspended(self.expected_wake, now) {
                self.forgive_suspension(late, now);
            }
            for sig in self.signals.drain() {
                self.handle(Event::Signal(sig), now);
            }
            self.drain_zygotes(now);
            self.read_urgent(now);
            self.read_changes(now);
            self.drain_notifications(now);
            while let Some((pid, status)) = reap_one() {
                if self.preflight_exited(pid, status) {
                    continue;
                }
                // A worker can send its last words (X_PROCMAN_ERROR) and
                // exit between the read above and `waitpid`; once it is a
                // zombie, everything it sent is queued: read it first.
                self.drain_notifications(now);
                self.handle(Event::Exited { pid, status }, now);
            }
            // Requests (a stop, a scale, a reload) are events too: the
            // next round's `act` carries them out.
            self.serve_endpoints(now);
        }
    }

    /// The one place every event is decided.
    fn handle(&mut self, event: Event, now: Instant) {
        use MasterSignal as S;
        let stopping = matches!(self.state, MasterState::Stopping { .. });
        match (stopping, event) {
            (_, Event::Signal(S::ChildExited)) => {} // reaping follows in the loop
            (false, Event::Signal(S::Terminate)) => self.begin_stop(false, Ok(()), now),
            (false, Event::Signal(S::Interrupt | S::Quit)) => self.begin_stop(true, Ok(()), now),
            (true, Event::Signal(S::Terminate | S::Interrupt | S::Quit)) => self.hurry_stop(now),
            (false, Event::Signal(S::Reload)) => self.begin_reload(),
            (false, Event::Signal(S::MoreWorkers)) => self.scale(1),
            (false, Event::Signal(S::FewerWorkers)) => self.scale(-1),
            (true, Event::Signal(s @ (S::Reload | S::MoreWorkers | S::FewerWorkers))) => {
                info!("Ignoring {s:?}: shutting down")
            }
            (_, Event::Signal(S::ReopenLogs)) => self.reopen_logs(),
            (false, Event::Signal(S::Upgrade)) => self.ask_upgrade(None, None),
            (true, Event::Signal(S::Upgrade)) => info!("Ignoring USR2: shutting down"),
            (_, Event::Signal(S::WindowChanged)) => {}
            (
                _,
                Event::Notified {
                    worker,
                    sender,
                    sent,
                    message,
                },
            ) => self.on_message(worker, sender, sent, message, now),
            (
                _,
                Event::Zygote {
                    pid,
                    message,
                    sender,
                },
            ) => self.on_zygote_message(pid, message, sender, now),
            (_, Event::Exited { pid, status }) => self.on_exit(pid, status, now),
            // Deadlines of what is not pursued during a stop are not even
            // listed then; one that passed with the one that began the stop
            // is dropped.
            (true, Event::Due(d)) if !d.during_stop() => {}
            (_, Event::Due(d)) => self.on_due(d, now),
        }
    }

    // ---- effects of each event ----

    fn scale(&mut self, delta: isize) {
        let before = self.settings.target;
        self.settings.target = (self.settings.target as isize + delta).max(1) as usize;
        if self.settings.target == before {
            info!(
                event = "scaled",
                reason = "floor",
                workers = before,
                "Keeping {before} worker: never fewer than 1"
            );
            return;
        }
        info!(
            event = "scaled",
            workers = self.settings.target,
            "Workers: {before} -> {}",
            self.settings.target
        );
        self.reshare();
        self.report_status();
    }

    /// USR1: reopen our log file. Only ready uvicorn workers get USR1 too:
    /// their bootstrap handles it, but USR1's default action is to
    /// terminate, which is what a command worker (or a uvicorn worker whose
    /// interpreter has not installed its handler yet) would do with it.
    fn reopen_logs(&mut self) {
        let reopened = crate::logging::reopen();
        let pids: Vec<Pid> = if self.settings.class.reopens_logs_on_usr1 {
            self.table
                .iter()
                .filter(|w| w.is_ready())
                .map(|w| w.pid)
                .collect()
        } else {
            Vec::new()
        };
        if let Err(why) = reopened {
            // Refused (see logging.rs): the workers still reopen it as
            // themselves, by their own rights.
            warn!(event = "log-reopen-failed", "{why}");
        } else if pids.is_empty() {
            info!(event = "log-reopened", "Reopened the log");
        } else {
            info!(
                event = "log-reopened",
                "Reopened the log; forwarding USR1 to {} ready worker{}",
                pids.len(),
                plural(pids.len())
            );
        }
        for pid in pids {
            signal_group(pid, Signal::SIGUSR1);
        }
    }

    // ---- the periodic part of each iteration ----

    /// Handles passed deadlines, then brings the workers in line with the goal.
    fn act(&mut self, now: Instant) {
        let memory = self.settings.cfg.max_worker_memory;
        let interval = memory.map(|_| self.settings.cfg.memory_check_interval);
        self.recycling.sample_every(interval, now);
        let (passed, _) = policy::split_due(&self.deadlines(), now);
        for due in passed {
            self.handle(Event::Due(due), now);
        }
        self.groups.forget_empty(&Kernel);
        if matches!(self.state, MasterState::Stopping { .. }) {
            // Zygotes have nothing to drain: once the workers are gone, any
            // zygote still around is not waited for.
            if self.table.is_empty() {
                for z in self.zygotes.iter() {
                    signal_group(z.pid, Signal::SIGKILL);
                }
            }
            return;
        }
        self.tend_zygotes(now);
        self.recycling.start_next(&mut self.table);
        // A spawn can make a worker ready at once (`--ready-after 0`), which
        // lets an outdated one go: settle in a few passes, not a wake-up.
        for _ in 0..4 {
            let goal = self.goal();
            let decisions = policy::reconcile(&self.table, &goal, self.boot.backoff());
            if decisions.is_empty() {
                break;
            }
            for d in decisions {
                match d {
                    Decision::Spawn { slot } => {
                        self.spawn_worker(slot);
                        // Forked workers notify within milliseconds, and the
                        // notify queue holds only max_dgram_qlen datagrams
                        // (often 10): empty it between spawns. At the time of
                        // receipt: `now` is from before this spawn, and a
                        // READY=1 stamped with it would read "ready in 0.000s".
                        // Zygote replies first: a forked worker may send
                        // READY=1 as soon as its zygote reported it, and it
                        // is only attributed once that report was read.
                        let now = Instant::now();
                        self.drain_zygotes(now);
                        self.drain_notifications(now);
                    }
                    Decision::Stop { pid, reason } => {
                        let grace = self.settings.cfg.graceful_timeout;
                        self.stop_worker(pid, reason, grace, now);
                    }
                }
                if matches!(self.state, MasterState::Stopping { .. }) {
                    return;
                }
            }
        }
        if self.settings.listeners.iter().any(|l| l.reuse_port) {
            let wanted = policy::wanted_slots(&self.table, &self.goal());
            self.settings
                .forget_slot_sockets(|slot| !wanted.contains(&slot));
        }
        self.check_milestones();
    }

    fn goal(&self) -> Goal {
        Goal {
            target: self.settings.target,
            required_generation: self.required_generation,
            max_booting: self.settings.max_booting,
        }
    }

    /// READY to systemd when the first generation is up, and the end of a
    /// reload once no outdated worker remains.
    fn check_milestones(&mut self) {
        let fresh_ready = self
            .table
            .iter()
            .filter(|w| w.is_ready() && policy::is_fresh(w, &self.goal()))
            .count();
        if self.state == MasterState::Booting && fresh_ready >= self.settings.target {
            self.state = MasterState::Running;
            info!(
                event = "all-ready",
                generation = self.generation,
                "All {} worker{} ready",
                self.settings.target,
                plural(self.settings.target)
            );
            let status = self.status_line();
            self.systemd.send(&format!("READY=1\nSTATUS={status}"));
            // Start-up is over: its code need not stay mapped.
            shed_startup_code();
        }
        if let Some(generation) = self.reload.as_ref().map(|r| r.generation) {
            let outdated = self
                .table
                .iter()
                .any(|w| w.is_active() && w.generation != generation);
            if !outdated && fresh_ready >= self.settings.target {
                self.complete_reload();
                // So is a reload's (reading the configuration, binding).
                shed_startup_code();
            }
        }
    }

    /// What systemd shows (see `systemd`): never stale.
    fn status_line(&self) -> String {
        systemd::status_text(&self.status_counts(), self.systemd.failed_reload())
    }

    fn report_status(&mut self) {
        let line = self.status_line();
        self.systemd.status(line);
    }

    fn finish(&mut self) {
        self.systemd.status("stopped".to_string());
        if let Some(r) = self.reload.take() {
            release(r.previous.listeners);
        }
        release(std::mem::take(&mut self.settings.listeners));
    }
}

/// Reaps one child, if any has exited.
fn reap_one() -> Option<(Pid, WaitStatus)> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return None,
            Ok(status) => match status.pid() {
                Some(pid) => return Some((pid, status)),
                None => return None,
            },
            Err(Errno::EINTR) => continue,
            Err(_) => return None, // ECHILD: nothing left
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Drops the mappings of procman's code that only start-up (or a reload)
/// ran (`shed`); said at debug level.
fn shed_startup_code() {
    match crate::shed::startup_code() {
        Ok(n) => debug!("Dropped {} KiB of start-up code's mappings", n / 1024),
        Err(e) => debug!("Cannot drop the start-up code's mappings: {e}"),
    }
}
