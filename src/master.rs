//! The master loop: events in, policy decides, effects out.
//!
//! One thread, one `poll(2)` over the signal self-pipe and the notify
//! socket, with the earliest deadline as its timeout; nothing wakes the
//! master when nothing is due. Each iteration: drain signals, drain
//! notifications (before reaping, so a READY=1 sent just before an exit is
//! still attributed), reap with `waitpid(-1, WNOHANG)` until empty, handle
//! passed deadlines, then reconcile the workers with the goal.
//!
//! Every event goes through [`Master::handle`], one `match` over (master
//! state, event) whose arms call small named methods. Decisions about which
//! workers to start or stop live in `policy.rs`; this file only turns them
//! into system calls.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::bind::Listener;
use crate::classes::{self, Launch};
use crate::config::{Config, WorkerKind};
use crate::error::{Error, Result};
use crate::notify::{Datagram, Message, Receiver, SystemdNotifier};
use crate::pid::ChildPid;
use crate::policy::{self, Backoff, Decision, Due, Goal};
use crate::procfs;
use crate::signals::{self, MasterSignal, Signals};
use crate::spawn::Plan;
use crate::workers::{GroupKill, Lingering, Stop, StopReason, Table, Worker, WorkerState};
use crate::zygote::{FromZygote, Zygote};

mod preload;
mod recycle;
mod reload;

use preload::stop_zygote;
use recycle::Random;
use reload::{release, Reload};

/// Variables procman may have inherited from its own supervisor that must
/// never reach a worker (they describe procman's sockets, not the worker's).
const SCRUBBED: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
];

/// What the master as a whole is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum MasterState {
    /// The first workers are starting; systemd has not been told READY.
    Booting,
    /// Serving.
    Running,
    /// Stopping every worker; exits with `outcome` once all are reaped.
    Stopping {
        /// Quick (2 s grace) or graceful (--graceful-timeout).
        quick: bool,
        /// The exit: Ok for a clean stop, or the failure that caused it.
        outcome: std::result::Result<(), Error>,
    },
}

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// A signal to the master.
    Signal(MasterSignal),
    /// A notification from a worker (already attributed).
    Notified {
        /// The worker it is attributed to.
        worker: Pid,
        /// The sender (the worker or one of its descendants).
        sender: i32,
        /// What it said.
        message: Message,
    },
    /// A message from a zygote (`--preload`).
    Zygote {
        /// The zygote.
        pid: Pid,
        /// What it said.
        message: FromZygote,
    },
    /// A child was reaped.
    Exited {
        /// Its pid.
        pid: Pid,
        /// How it ended.
        status: WaitStatus,
    },
    /// A deadline passed.
    Due(Due),
}

/// The master's whole state.
pub struct Master {
    cfg: Config,
    launch: Launch,
    /// Shared with the settings a reload may go back to (see reload.rs).
    listeners: Vec<Rc<Listener>>,
    signals: Signals,
    notify: Receiver,
    systemd: Option<SystemdNotifier>,
    systemd_watchdog: Option<(Duration, Instant)>,
    base_env: Vec<(OsString, OsString)>,
    table: Table,
    backoff: BTreeMap<usize, Backoff>,
    state: MasterState,
    target: usize,
    generation: u64,
    required_generation: u64,
    reload: Option<Reload>,
    /// The highest generation ever started (a failed reload's number is
    /// not reused).
    latest_generation: u64,
    ever_up: bool,
    boot_failures: u32,
    recycle_queue: VecDeque<(Pid, String)>,
    expected_wake: Option<Instant>,
    next_memory_sample: Option<Instant>,
    random: Random,
    /// The original command line, re-read (with the environment and the
    /// config file) on HUP.
    args: Vec<OsString>,
    /// `--preload`: the zygotes (the current generation's, and older ones
    /// until their workers are gone).
    zygotes: Vec<Zygote>,
    /// Backoff of zygote (re)starts.
    zygote_backoff: Backoff,
    /// After repeated zygote failures, workers start cold.
    cold_fallback: bool,
    /// Process groups whose leader was reaped but which still have members.
    lingering: Vec<Lingering>,
    /// Once a quick stop (or a second TERM) was asked for: no SIGKILL may be
    /// pushed past this, whatever a worker asks with EXTEND_TIMEOUT_USEC.
    kill_limit: Option<Instant>,
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
        let systemd = SystemdNotifier::from_env(std::env::var_os("NOTIFY_SOCKET").as_deref());
        let systemd_watchdog = systemd_watchdog_interval().map(|d| (d, Instant::now() + d));
        let base_env = worker_base_env(&cfg);
        let launch = classes::launch(&cfg);
        let target = cfg.workers;
        Ok(Master {
            cfg,
            launch,
            listeners: listeners.into_iter().map(Rc::new).collect(),
            signals,
            notify,
            systemd,
            systemd_watchdog,
            base_env,
            table: Table::default(),
            backoff: BTreeMap::new(),
            state: MasterState::Booting,
            target,
            generation: 1,
            required_generation: 1,
            reload: None,
            latest_generation: 1,
            ever_up: false,
            boot_failures: 0,
            recycle_queue: VecDeque::new(),
            expected_wake: None,
            next_memory_sample: None,
            random: Random::seeded(),
            args,
            zygotes: Vec::new(),
            zygote_backoff: Backoff::default(),
            cold_fallback: false,
            lingering: Vec::new(),
            kill_limit: None,
        })
    }

    /// Runs until every worker is gone after a stop. Returns the outcome.
    pub fn run(mut self) -> Result<()> {
        // How the count was chosen matters for `auto` (affinity mask or
        // cgroup quota); a number the operator gave needs no explanation.
        let why = match self.cfg.workers_reason.as_str() {
            "set" | "default" => String::new(),
            reason => format!(" ({reason})"),
        };
        info!(
            "Starting {} worker{}{why}: {}",
            self.target,
            plural(self.target),
            self.cfg.describe_workers()
        );
        // A stop requested during the pre-start commands is honoured before
        // any worker starts.
        for sig in self.signals.drain() {
            self.handle(Event::Signal(sig), Instant::now());
        }
        loop {
            let now = Instant::now();
            self.act(now);
            if let MasterState::Stopping { outcome, .. } = &self.state {
                // Done only when no process of any group we created remains.
                if self.table.is_empty() && self.zygotes.is_empty() && self.lingering.is_empty() {
                    let outcome = outcome.clone();
                    self.finish();
                    return outcome;
                }
            }
            let wake = self.next_wake();
            self.expected_wake = wake;
            self.wait(wake.map(|w| w.saturating_duration_since(now)));
            let now = Instant::now();
            if let Some(late) = policy::was_suspended(self.expected_wake, now) {
                self.forgive_suspension(late, now);
            }
            for sig in self.signals.drain() {
                self.handle(Event::Signal(sig), now);
            }
            let from_zygotes: Vec<(Pid, FromZygote)> = self
                .zygotes
                .iter()
                .filter(|z| !z.closed)
                .flat_map(|z| z.drain().into_iter().map(move |m| (z.pid, m)))
                .collect();
            for (pid, message) in from_zygotes {
                self.handle(Event::Zygote { pid, message }, now);
            }
            self.drain_notifications(now);
            while let Some((pid, status)) = reap_one() {
                self.handle(Event::Exited { pid, status }, now);
            }
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
            (_, Event::Signal(S::Upgrade)) => {
                warn!("Ignoring USR2: in-place upgrade is not supported; use HUP for a rolling reload")
            }
            (_, Event::Signal(S::WindowChanged)) => {}
            (
                _,
                Event::Notified {
                    worker,
                    sender,
                    message,
                },
            ) => self.on_message(worker, sender, message, now),
            (_, Event::Zygote { pid, message }) => self.on_zygote_message(pid, message, now),
            (_, Event::Exited { pid, status }) => self.on_exit(pid, status, now),
            // Deadlines of what is not pursued during a stop are not even
            // listed then; one that passed with the one that began the stop
            // is dropped.
            (true, Event::Due(d)) if !d.during_stop() => {}
            (_, Event::Due(d)) => self.on_due(d, now),
        }
    }

    // ---- effects of each event ----

    fn begin_stop(&mut self, quick: bool, outcome: std::result::Result<(), Error>, now: Instant) {
        let how = if quick { "quick" } else { "graceful" };
        let active = self.table.iter().filter(|w| w.is_active()).count();
        info!("Shutting down: {how}, {active} worker{}", plural(active));
        if let Some(sd) = &self.systemd {
            sd.send("STOPPING=1");
        }
        self.state = MasterState::Stopping { quick, outcome };
        let grace = self.stop_grace(quick);
        if quick {
            self.kill_limit = Some(now + grace);
        }
        let pids: Vec<Pid> = self.table.iter().map(|w| w.pid).collect();
        for pid in pids {
            self.stop_worker(pid, StopReason::Shutdown, grace, now);
        }
        for z in &mut self.zygotes {
            stop_zygote(z);
        }
        // Leftovers of workers that are already gone: the stop deadline
        // applies to them too, and a quick stop does not wait for them.
        let limit = if quick { now } else { now + grace };
        for g in &mut self.lingering {
            if let GroupKill::At(at) = &mut g.kill {
                *at = (*at).min(limit);
            }
        }
    }

    /// A second TERM/INT/QUIT during a stop: everyone gets at most 2 s more.
    fn hurry_stop(&mut self, now: Instant) {
        info!("Shutting down: quick (second signal)");
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
        for g in &mut self.lingering {
            if let GroupKill::At(at) = &mut g.kill {
                *at = (*at).min(now);
            }
        }
    }

    fn scale(&mut self, delta: isize) {
        let before = self.target;
        self.target = (self.target as isize + delta).max(1) as usize;
        if self.target == before {
            info!("Keeping {before} worker: never fewer than 1");
            return;
        }
        info!("Workers: {before} -> {}", self.target);
        self.report_status();
    }

    /// USR1: reopen our log file. Only ready uvicorn workers get USR1 too:
    /// their bootstrap handles it, but USR1's default action is to
    /// terminate, which is what a command worker (or a uvicorn worker whose
    /// interpreter has not installed its handler yet) would do with it.
    fn reopen_logs(&mut self) {
        crate::logging::reopen();
        let pids: Vec<Pid> = match self.cfg.kind {
            WorkerKind::Uvicorn(_) => self
                .table
                .iter()
                .filter(|w| w.is_ready())
                .map(|w| w.pid)
                .collect(),
            WorkerKind::Command { .. } => Vec::new(),
        };
        if pids.is_empty() {
            info!("Reopened the log");
        } else {
            info!(
                "Reopened the log; forwarding USR1 to {} ready worker{}",
                pids.len(),
                plural(pids.len())
            );
        }
        for pid in pids {
            signal_group(pid, Signal::SIGUSR1);
        }
    }

    fn on_message(&mut self, pid: Pid, sender: i32, message: Message, now: Instant) {
        let notify_ready = self.cfg.workers_notify_ready();
        let kill_limit = self.kill_limit;
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        match message {
            Message::Ready => {
                if w.is_starting() && notify_ready {
                    mark_ready(w, now);
                }
            }
            Message::Heartbeat => w.last_heartbeat = Some(now),
            Message::WatchdogTrigger => {
                if w.is_active() {
                    warn!(
                        worker = pid.as_raw(),
                        slot = w.slot,
                        "Worker {pid} (slot {}) sent WATCHDOG=trigger; aborting",
                        w.slot
                    );
                    self.abort_worker(pid, now);
                }
            }
            Message::Status(s) => info!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Worker {pid} (slot {}) status: {s}",
                w.slot
            ),
            Message::Errno(e) => warn!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Worker {pid} (slot {}) reported errno {e}",
                w.slot
            ),
            Message::ExtendTimeout(d) => match &mut w.state {
                WorkerState::Starting { deadline, .. } => {
                    *deadline = (*deadline).max(now + d);
                    debug!("Worker {pid} extended its startup deadline by {d:?}");
                }
                WorkerState::Stopping(Stop {
                    kill_at: Some(at), ..
                }) => {
                    let wanted = now + d;
                    match kill_limit {
                        // A quick stop is bounded: the worker keeps what it
                        // has, up to the quick stop's deadline.
                        Some(limit) if wanted > limit => {
                            *at = (*at).max(limit);
                            info!(
                                worker = pid.as_raw(),
                                slot = w.slot,
                                "Worker {pid} (slot {}) asked for {d:?} more time to stop; a quick stop allows {:.1}s more",
                                w.slot,
                                at.saturating_duration_since(now).as_secs_f64()
                            );
                        }
                        _ => *at = (*at).max(wanted),
                    }
                }
                _ => {}
            },
            Message::Stopping => {
                w.draining = true;
                debug!("Worker {pid} (slot {}) is draining", w.slot);
            }
            Message::Reloading => debug!("Worker {pid} sent RELOADING=1 (ignored)"),
            Message::Recycle(why) => {
                if w.is_active()
                    && w.recycle.is_none()
                    && !self.recycle_queue.iter().any(|(p, _)| *p == pid)
                {
                    info!(
                        worker = pid.as_raw(),
                        slot = w.slot,
                        "Worker {pid} (slot {}) asks to be recycled: {why}",
                        w.slot
                    );
                    self.recycle_queue.push_back((pid, why));
                }
            }
            Message::Error(text) => w.reported_error = Some(text),
            Message::Traceback(text) => w.reported_traceback = Some(text),
        }
        if sender != pid.as_raw() {
            debug!("notification from {sender} attributed to worker {pid}");
        }
    }

    fn on_exit(&mut self, pid: Pid, status: WaitStatus, now: Instant) {
        if let Some(i) = self.zygotes.iter().position(|z| z.pid == pid) {
            // What it sent before dying (a reply to a spawn the master gave
            // up on: that worker must be killed) is read before its channel
            // is closed with it.
            if !self.zygotes[i].closed {
                for m in self.zygotes[i].drain() {
                    self.on_zygote_message(pid, m, now);
                }
            }
            let z = self.zygotes.swap_remove(i);
            // A zygote has nothing to drain: whatever is left in its group
            // (an intermediate of a spawn) goes at once.
            if let Some(group) = ChildPid::new(pid.as_raw()) {
                self.linger(group, format!("zygote {pid}"), now, now);
            }
            self.on_zygote_exit(z, status, now);
            return;
        }
        let Some(w) = self.table.remove(pid) else {
            debug!(
                "Reaped process {pid} ({}) that is not a worker",
                describe(&status)
            );
            return;
        };
        if self.reload_worker_exited(&w, &status, now) {
            return;
        }
        let how = describe_exit(&status, w.stop());
        let stopping_master = matches!(self.state, MasterState::Stopping { .. });
        match w.stop().map(|s| s.reason) {
            Some(reason) if reason.is_boot_failure() => {
                self.on_boot_failure(
                    &w,
                    &format!("not ready within {:?}", self.cfg.startup_timeout),
                    None,
                    now,
                );
            }
            Some(StopReason::HeartbeatTimeout) => {
                warn!(
                    worker = pid.as_raw(),
                    slot = w.slot,
                    "Worker {pid} (slot {}) exited after its timeout: {how}; respawning",
                    w.slot
                );
                self.note_death(&w, now);
            }
            Some(_) => info!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Worker {pid} (slot {}) exited: {how}",
                w.slot
            ),
            None if stopping_master => info!(
                worker = pid.as_raw(),
                slot = w.slot,
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
                if failed && !self.ever_up && !killed_from_outside {
                    self.on_boot_failure(&w, &how, exit_code(&status), now);
                } else {
                    let b = self.note_death(&w, now);
                    match b.next_spawn_at {
                        Some(at) => warn!(
                            worker = pid.as_raw(),
                            slot = w.slot,
                            "Worker {pid} (slot {}) exited: {how}; respawning in {:.1}s (it keeps dying right after start)",
                            w.slot,
                            at.saturating_duration_since(now).as_secs_f64()
                        ),
                        None => warn!(worker = pid.as_raw(), slot = w.slot, "Worker {pid} (slot {}) exited: {how}; respawning", w.slot),
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
                now + self.cfg.graceful_timeout
            }
        };
        let label = format!("worker {} (slot {})", w.pid, w.slot);
        self.linger(group, label, kill_at, now);
    }

    /// Tracks group `pgid` until it is empty; its members get SIGKILL at
    /// `kill_at`.
    fn linger(&mut self, pgid: ChildPid, label: String, kill_at: Instant, now: Instant) {
        if !pgid.group_has_members() {
            return;
        }
        info!(
            "The process group of {label} still has processes; {}",
            if kill_at > now {
                format!(
                    "killing them in {:.1}s unless they exit",
                    kill_at.saturating_duration_since(now).as_secs_f64()
                )
            } else {
                "killing them".to_string()
            }
        );
        self.lingering.push(Lingering {
            pgid,
            label,
            kill: GroupKill::At(kill_at),
        });
        self.tend_groups(now);
    }

    /// Forgets emptied groups, SIGKILLs those whose deadline passed, and
    /// stops waiting for members that survive SIGKILL for long.
    fn tend_groups(&mut self, now: Instant) {
        self.lingering.retain_mut(|g| {
            if !g.pgid.group_has_members() {
                debug!("The process group of {} is empty", g.label);
                return false;
            }
            match &mut g.kill {
                GroupKill::At(at) if *at <= now => {
                    warn!(
                        "Killing what is left of the process group of {} (SIGKILL)",
                        g.label
                    );
                    // Non-empty (just checked), so the number still names
                    // this group: it cannot be reused while a member remains.
                    g.pgid.signal_group_only(Signal::SIGKILL);
                    g.kill = GroupKill::Sent {
                        at: now,
                        looked: now,
                    };
                    true
                }
                GroupKill::Sent { at, .. } if now >= *at + policy::GROUP_KILL_PATIENCE => {
                    warn!(
                        "The process group of {} still has processes {:?} after SIGKILL; no longer waiting for them",
                        g.label,
                        policy::GROUP_KILL_PATIENCE
                    );
                    false
                }
                GroupKill::Sent { looked, .. } => {
                    *looked = now;
                    true
                }
                GroupKill::At(_) => true,
            }
        });
    }

    /// Records a death in the slot's backoff; returns the new backoff.
    fn note_death(&mut self, w: &Worker, now: Instant) -> Backoff {
        let ready_for = w.ready_for(now);
        if ready_for.is_some_and(|d| d >= policy::QUICK_DEATH) {
            self.ever_up = true;
        }
        let prev = self.backoff.get(&w.slot).copied().unwrap_or_default();
        let next = policy::after_death(prev, policy::is_failed_start(ready_for), now);
        self.backoff.insert(w.slot, next);
        next
    }

    /// A worker died before it was ready. Its traceback (a uvicorn worker
    /// sends it instead of printing it) is logged here, where its death is
    /// decided: workers that fail the same way while procman is already
    /// stopping because of the first one are not (see `on_exit`).
    fn on_boot_failure(&mut self, w: &Worker, how: &str, code: Option<i32>, now: Instant) {
        let b = self.note_death(w, now);
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
        if self.ever_up {
            warn!(
                "Worker {} (slot {}) failed to boot: {how}{why}; still serving with the others, {retry}",
                w.pid, w.slot
            );
            return;
        }
        self.boot_failures += 1;
        let uvicorn = matches!(self.cfg.kind, WorkerKind::Uvicorn(_));
        let fatal = match code {
            Some(4) if uvicorn => Some(Error::AppImport(match &w.reported_error {
                Some(e) => e.clone(),
                None => format!(
                    "Failed to load application '{}' (worker {} exited with status 4; its error is above)",
                    self.cfg.uvicorn().map(|u| u.app.as_str()).unwrap_or("?"),
                    w.pid
                ),
            })),
            Some(3) if uvicorn => Some(Error::BootFailed(format!(
                "workers failed to boot: {detail}"
            ))),
            _ if self.boot_failures >= policy::MAX_BOOT_FAILURES => {
                Some(Error::BootFailed(format!(
                    "workers failed to boot {} times in a row and none ever stayed up; last: {detail}",
                    self.boot_failures
                )))
            }
            _ => None,
        };
        match fatal {
            Some(err) => {
                error!("{err}");
                self.begin_stop(true, Err(err), now);
            }
            None => {
                warn!(
                    "Worker {} (slot {}) failed to boot: {how}{why} (attempt {} of {}); {retry}",
                    w.pid,
                    w.slot,
                    self.boot_failures,
                    policy::MAX_BOOT_FAILURES
                );
            }
        }
    }

    // ---- the periodic part of each iteration ----

    /// Handles passed deadlines, then brings the workers in line with the goal.
    fn act(&mut self, now: Instant) {
        if self.cfg.max_worker_memory.is_some() && self.next_memory_sample.is_none() {
            self.next_memory_sample = Some(now + self.cfg.memory_check_interval);
        }
        let (passed, _) = policy::split_due(&self.deadlines(), now);
        for due in passed {
            self.handle(Event::Due(due), now);
        }
        self.tend_groups(now);
        if matches!(self.state, MasterState::Stopping { .. }) {
            // Zygotes have nothing to drain: once the workers are gone, any
            // zygote still around is not waited for.
            if self.table.is_empty() {
                for z in &self.zygotes {
                    signal_group(z.pid, Signal::SIGKILL);
                }
            }
            return;
        }
        self.tend_zygotes(now);
        self.start_next_recycle();
        // A spawn can make a worker ready at once (`--ready-after 0`), which
        // lets an outdated one go: settle in a few passes, not a wake-up.
        for _ in 0..4 {
            let goal = self.goal();
            let decisions = policy::reconcile(&self.table, &goal, &self.backoff, now);
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
                        self.drain_notifications(Instant::now());
                    }
                    Decision::Stop { pid, reason } => {
                        let grace = self.cfg.graceful_timeout;
                        self.stop_worker(pid, reason, grace, now);
                    }
                }
                if matches!(self.state, MasterState::Stopping { .. }) {
                    return;
                }
            }
        }
        self.check_milestones();
    }

    /// Every pending deadline of every part of the master, as data: the
    /// one list both the wake-up ([`Master::next_wake`]) and the event path
    /// ([`Master::on_due`]) read. Handling a passed deadline removes it or
    /// moves it on.
    fn deadlines(&self) -> Vec<(Instant, Due)> {
        let mut out = policy::worker_deadlines(&self.table, self.cfg.timeout);
        out.extend(self.lingering.iter().map(Lingering::deadline));
        out.extend(
            self.systemd_watchdog
                .map(|(_, at)| (at, Due::SystemdWatchdog)),
        );
        if matches!(self.state, MasterState::Stopping { .. }) {
            return out;
        }
        // ever_up is learnt when the first ready worker has been up long
        // enough, so a later failure is judged correctly.
        if !self.ever_up {
            out.extend(
                self.table.iter().filter(|w| w.is_active()).filter_map(|w| {
                    Some((w.ready_at? + policy::QUICK_DEATH, Due::StayedUp(w.pid)))
                }),
            );
        }
        out.extend(
            self.table
                .iter()
                .filter(|w| w.is_active())
                .filter_map(|w| Some((w.retire_at?, Due::Retire(w.pid)))),
        );
        out.extend(self.next_memory_sample.map(|at| (at, Due::SampleMemory)));
        out.extend(policy::backoff_deadlines(&self.backoff));
        out.extend(self.zygote_deadlines());
        out
    }

    /// A deadline passed.
    fn on_due(&mut self, due: Due, now: Instant) {
        match due {
            Due::Stable(pid) => {
                if let Some(w) = self.table.get_mut(pid).filter(|w| w.is_starting()) {
                    mark_ready(w, now);
                    // Alive through its stability window: it stayed up, so
                    // a later crash is not a failed boot.
                    self.ever_up = true;
                    self.boot_failures = 0;
                }
            }
            Due::StartupTimeout(pid) => self.startup_timed_out(pid, now),
            Due::HeartbeatTimeout(pid) => {
                if let Some(w) = self.table.get(pid) {
                    let silent = w
                        .last_heartbeat
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                    warn!(
                        worker = pid.as_raw(),
                        slot = w.slot,
                        "Worker {pid} (slot {}) timed out after {:.0}s without a heartbeat; aborting",
                        w.slot,
                        silent.as_secs_f64()
                    );
                    let limit = self.cfg.timeout.unwrap_or_default();
                    debug!(
                        "Worker {pid}: aborted {:.1} ms after its heartbeat deadline",
                        silent.saturating_sub(limit).as_secs_f64() * 1000.0
                    );
                }
                self.abort_worker(pid, now);
            }
            Due::Kill(pid) => {
                let quick = matches!(self.state, MasterState::Stopping { quick: true, .. });
                if let Some(w) = self.table.get_mut(pid) {
                    if let WorkerState::Stopping(stop) = &mut w.state {
                        stop.kill_at = None;
                        stop.killed = Some(kill_cause(stop.reason, quick));
                    }
                    warn!(
                        worker = pid.as_raw(),
                        slot = w.slot,
                        "Worker {pid} (slot {}) did not stop in time; killing it",
                        w.slot
                    );
                }
                signal_group(pid, Signal::SIGKILL);
            }
            Due::Group(_) => self.tend_groups(now),
            Due::SystemdWatchdog => {
                if let Some(sd) = &self.systemd {
                    sd.send("WATCHDOG=1");
                }
                if let Some((interval, at)) = &mut self.systemd_watchdog {
                    *at = now + *interval;
                }
            }
            Due::StayedUp(_) => {
                self.ever_up = true;
                self.boot_failures = 0;
            }
            Due::Retire(pid) => self.retire(pid, now),
            Due::SampleMemory => self.sample_memory(now),
            Due::BackoffOver(slot) => {
                if let Some(b) = self.backoff.get_mut(&slot) {
                    b.next_spawn_at = None;
                }
            }
            Due::ZygoteStartTimeout(pid) => self.zygote_start_timed_out(pid, now),
            Due::ZygoteBackoffOver => self.zygote_backoff.next_spawn_at = None,
            Due::ZygoteSpawnTimeout(pid) => self.zygote_spawn_timed_out(pid, now),
        }
    }

    fn goal(&self) -> Goal {
        Goal {
            target: self.target,
            required_generation: self.required_generation,
        }
    }

    /// The earliest moment something is due.
    fn next_wake(&self) -> Option<Instant> {
        self.deadlines().into_iter().map(|(at, _)| at).min()
    }

    fn wait(&self, timeout: Option<Duration>) {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Round up, so the loop never wakes just before a deadline and
            // spins until it passes.
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![
            PollFd::new(self.signals.fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            self.zygotes
                .iter()
                .map(|z| PollFd::new(z.fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => warn!("poll failed: {}", e.desc()),
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
        if self.state == MasterState::Booting && fresh_ready >= self.target {
            self.state = MasterState::Running;
            info!("All {} worker{} ready", self.target, plural(self.target));
            if let Some(sd) = &self.systemd {
                sd.send(&format!("READY=1\nSTATUS={}", self.status_line()));
            }
        }
        if let Some(generation) = self.reload.as_ref().map(|r| r.generation) {
            let outdated = self
                .table
                .iter()
                .any(|w| w.is_active() && w.generation != generation);
            if !outdated && fresh_ready >= self.target {
                self.complete_reload();
            }
        }
    }

    fn status_line(&self) -> String {
        format!(
            "{}/{} workers ready, generation {}",
            self.table.ready_count(),
            self.target,
            self.generation
        )
    }

    fn report_status(&self) {
        if let Some(sd) = &self.systemd {
            sd.send(&format!("STATUS={}", self.status_line()));
        }
    }

    // ---- system calls on workers ----

    /// The environment of a child (worker or zygote): procman's own (less
    /// what described procman's sockets) with `--env`, the class's
    /// variables, `extra`, and the protocol variables. Also returns the
    /// variables whose value the child's own pid fills in after fork.
    fn child_env(
        &self,
        extra: &[(&str, String)],
    ) -> (Vec<(OsString, OsString)>, Vec<&'static str>) {
        let mut env = self.base_env.clone();
        let mut set = |k: &str, v: OsString| {
            env.retain(|(key, _)| key != k);
            env.push((k.into(), v));
        };
        for (k, v) in &self.launch.env {
            set(k, v.into());
        }
        for (k, v) in extra {
            set(k, v.into());
        }
        set("LISTEN_FDS", self.listeners.len().to_string().into());
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        set("LISTEN_FDNAMES", names.join(":").into());
        // The path as bytes: a runtime directory need not be UTF-8.
        set("NOTIFY_SOCKET", self.notify.path().as_os_str().to_owned());
        let mut pid_vars = vec!["LISTEN_PID"];
        if let Some(t) = self.cfg.timeout {
            set("WATCHDOG_USEC", t.as_micros().to_string().into());
            pid_vars.push("WATCHDOG_PID");
        }
        (env, pid_vars)
    }

    /// What to fork for a child of the configured class: its program,
    /// argv, environment and these fds at 3.., as the workers' user, in
    /// their directory, with their umask.
    fn child_plan(
        &self,
        env: &[(OsString, OsString)],
        pid_vars: &[&str],
        fds: &[std::os::fd::RawFd],
    ) -> std::result::Result<Plan, crate::spawn::NulError> {
        Plan::new(
            &self.launch.program,
            &self.launch.argv,
            env,
            pid_vars,
            fds,
            self.cfg.credentials.as_ref(),
            self.cfg.chdir.as_deref(),
            self.cfg.umask,
            &signals::changed_dispositions(),
        )
        // With --log-file, the workers' stderr is the log file too.
        .map(|plan| plan.with_stderr(crate::logging::file_fd()))
    }

    fn spawn_worker(&mut self, slot: usize) {
        // Each worker's own start time: ages order "the oldest" for TTOU.
        let now = Instant::now();
        if self.preloading() {
            self.spawn_from_zygote(slot, now);
            return;
        }
        let (env, pid_vars) = self.child_env(&[
            ("PROCMAN_WORKER_ID", slot.to_string()),
            ("PROCMAN_GENERATION", self.generation.to_string()),
        ]);
        // With --reuse-port each worker gets its own listening socket, made
        // here before the fork and closed in the master right after it.
        let mut own_sockets = Vec::new();
        for l in self.listeners.iter().filter(|l| l.reuse_port) {
            match l.worker_socket(self.cfg.backlog) {
                Ok(fd) => own_sockets.push(fd),
                Err(e) => {
                    error!(
                        "cannot create a SO_REUSEPORT socket on {} for slot {slot}: {e}",
                        l.display
                    );
                    let prev = self.backoff.get(&slot).copied().unwrap_or_default();
                    self.backoff
                        .insert(slot, policy::after_death(prev, true, now));
                    return;
                }
            }
        }
        let mut own = own_sockets.iter();
        let fds: Vec<_> = self
            .listeners
            .iter()
            .map(|l| match l.reuse_port.then(|| own.next()).flatten() {
                Some(fd) => fd.as_raw_fd(),
                None => l.fd.as_raw_fd(),
            })
            .collect();
        let plan = self.child_plan(&env, &pid_vars, &fds);
        let plan = match plan {
            Ok(p) => p,
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
        drop(own_sockets);
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                // fork failed (EAGAIN, ENOMEM): treat like a failed boot of
                // this slot so the retry backs off.
                error!("cannot fork a worker for slot {slot}: {}", e.desc());
                let prev = self.backoff.get(&slot).copied().unwrap_or_default();
                self.backoff
                    .insert(slot, policy::after_death(prev, true, now));
                return;
            }
        };
        let mut w = Worker::new(
            spawned.pid,
            slot,
            self.generation,
            now,
            self.cfg.startup_timeout,
        );
        if let Some(life) = self.cfg.max_worker_lifetime {
            let jitter = self
                .cfg
                .max_worker_lifetime_jitter
                .mul_f64(self.random.unit());
            w.retire_at = Some(now + life + jitter);
        }
        match spawned.exec_error {
            Some((stage, errno)) => {
                error!(
                    "cannot {} {}: {} (worker {}, slot {slot})",
                    stage.describe(),
                    self.launch.argv.first().map(String::as_str).unwrap_or("?"),
                    errno.desc(),
                    spawned.pid
                );
                w.reported_error = Some(format!(
                    "cannot {} {}: {}",
                    stage.describe(),
                    self.launch.program.display(),
                    errno.desc()
                ));
            }
            None => {
                info!(
                    worker = spawned.pid.as_raw(),
                    slot,
                    generation = self.generation,
                    "Booting worker {slot} with pid {} (generation {})",
                    spawned.pid,
                    self.generation
                );
                // --ready exec: ready once it has stayed alive for
                // --ready-after; dying sooner is a failed boot, so a command
                // that exits at once never replaces a working one.
                if !self.cfg.workers_notify_ready() {
                    if self.cfg.ready_after.is_zero() {
                        mark_ready(&mut w, now);
                    } else {
                        if let WorkerState::Starting { stable_at, .. } = &mut w.state {
                            *stable_at = Some(now + self.cfg.ready_after);
                        }
                    }
                }
            }
        }
        self.table.insert(w);
    }

    fn stop_worker(&mut self, pid: Pid, reason: StopReason, grace: Duration, now: Instant) {
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
            StopReason::Replaced => info!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Stopping worker {pid} (slot {}): replaced",
                w.slot
            ),
            StopReason::Excess => {
                info!("Stopping worker {pid} (slot {}): one worker fewer", w.slot)
            }
            _ => {}
        }
        let killed = kill_at.is_none().then(|| kill_cause(reason, false));
        w.state = WorkerState::Stopping(Stop {
            reason,
            kill_at,
            killed,
        });
        signal_group(pid, signal);
    }

    fn startup_timed_out(&mut self, pid: Pid, now: Instant) {
        if let Some(w) = self.table.get(pid) {
            warn!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Worker {pid} (slot {}) was not ready within {:?}; killing it",
                w.slot,
                self.cfg.startup_timeout
            );
        }
        self.stop_worker(pid, StopReason::StartupTimeout, Duration::ZERO, now);
    }

    /// SIGABRT now, SIGKILL one second later (gunicorn's order: a chance to
    /// dump a stack first).
    fn abort_worker(&mut self, pid: Pid, now: Instant) {
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        if w.is_stopping() {
            return;
        }
        w.state = WorkerState::Stopping(Stop {
            reason: StopReason::HeartbeatTimeout,
            kill_at: Some(now + policy::ABORT_GRACE),
            killed: None,
        });
        signal_group(pid, Signal::SIGABRT);
    }

    fn stop_signal(&self) -> Signal {
        let quick = matches!(self.state, MasterState::Stopping { quick: true, .. });
        match (&self.cfg.kind, quick) {
            // The bootstrap treats QUIT as "exit now", TERM as "drain".
            (WorkerKind::Uvicorn(_), true) => Signal::SIGQUIT,
            (WorkerKind::Uvicorn(_), false) => Signal::SIGTERM,
            (WorkerKind::Command { .. }, _) => self.cfg.stop_signal,
        }
    }

    fn stop_grace(&self, quick: bool) -> Duration {
        if quick {
            policy::QUICK_STOP_GRACE.min(self.cfg.graceful_timeout.max(Duration::from_millis(1)))
        } else {
            self.cfg.graceful_timeout
        }
    }

    /// After a suspension of the master, heartbeats that could not be
    /// received meanwhile are not held against the workers.
    fn forgive_suspension(&mut self, late: Duration, now: Instant) {
        warn!(
            "The master was suspended for {:.1}s; giving workers a fresh timeout",
            late.as_secs_f64()
        );
        for w in self.table.iter_mut() {
            if w.last_heartbeat.is_some() {
                w.last_heartbeat = Some(now);
            }
            if let WorkerState::Starting { deadline, .. } = &mut w.state {
                *deadline += late;
            }
        }
    }

    /// Receives and handles every queued notification.
    fn drain_notifications(&mut self, now: Instant) {
        for datagram in self.notify.drain() {
            self.dispatch_datagram(datagram, now);
        }
    }

    /// Attributes a datagram to a worker by the sender's credentials:
    /// the worker itself or one of its descendants. Others are dropped.
    fn dispatch_datagram(&mut self, d: Datagram, now: Instant) {
        let sender = Pid::from_raw(d.pid);
        if let Some(z) = self.zygotes.iter_mut().find(|z| z.pid == sender) {
            for m in d.messages {
                if let Message::Error(text) = m {
                    z.reported_error = Some(text);
                }
            }
            return;
        }
        let worker = if self.table.get(sender).is_some() {
            Some(sender)
        } else {
            owning_worker(d.pid, |p| self.table.get(Pid::from_raw(p)).is_some()).map(Pid::from_raw)
        };
        let Some(worker) = worker else {
            debug!(
                "Dropped a notification from pid {}, which is not a worker",
                d.pid
            );
            return;
        };
        for message in d.messages {
            self.handle(
                Event::Notified {
                    worker,
                    sender: d.pid,
                    message,
                },
                now,
            );
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.reload.take() {
            release(r.previous.listeners);
        }
        release(std::mem::take(&mut self.listeners));
    }
}

/// The environment every worker (and pre-start command) starts from:
/// procman's own, without what described procman's sockets, plus `--env`.
/// Names and values are bytes: a variable that is not UTF-8 is passed on
/// unchanged (`std::env::vars` would panic on it).
pub fn worker_base_env(cfg: &Config) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !SCRUBBED.iter().any(|s| k == s))
        .collect();
    for (k, v) in &cfg.env {
        env.retain(|(key, _)| key != k.as_str());
        env.push((k.into(), v.into()));
    }
    env
}

/// Logs the traceback a worker reported (X_PROCMAN_TRACEBACK=), if any:
/// called where its death is decided, so that of N workers failing the same
/// way only the one that decides is shown.
fn log_traceback(w: &Worker) {
    if let Some(tb) = &w.reported_traceback {
        error!(
            worker = w.pid.as_raw(),
            slot = w.slot,
            "Worker {} (slot {}) could not load the app:\n{}",
            w.pid,
            w.slot,
            tb.trim_end()
        );
    }
}

fn mark_ready(w: &mut Worker, now: Instant) {
    w.state = WorkerState::Ready;
    w.ready_at = Some(now);
    let boot = now.saturating_duration_since(w.started_at);
    info!(
        worker = w.pid.as_raw(),
        slot = w.slot,
        "Worker {} (slot {}) ready in {:.3}s",
        w.pid,
        w.slot,
        boot.as_secs_f64()
    );
}

/// The worker a non-worker sender belongs to: the nearest ancestor that is
/// a worker, or else the worker whose process group it is in.
fn owning_worker(pid: i32, is_worker: impl Fn(i32) -> bool) -> Option<i32> {
    let mut current = pid;
    for _ in 0..32 {
        let procfs::Stat { ppid, pgrp, .. } = procfs::stat(current)?;
        if current == pid && is_worker(pgrp) {
            return Some(pgrp);
        }
        if is_worker(ppid) {
            return Some(ppid);
        }
        if ppid <= 1 {
            return None;
        }
        current = ppid;
    }
    None
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

/// Signals a worker's whole process group (its helpers included); falls
/// back to the pid if the group is already gone. Every signal the master
/// sends to a child goes through [`ChildPid`], which cannot hold 0 (our own
/// group), -1 (every process) or 1 (init); such a value would be a bug.
fn signal_group(pid: Pid, sig: Signal) {
    match ChildPid::new(pid.as_raw()) {
        Some(child) => child.signal_group(sig),
        None => error!("refusing to send {sig} to pid {pid}: not a single process"),
    }
}

/// What procman says when it SIGKILLs a worker itself, by why it stopped it.
fn kill_cause(reason: StopReason, quick: bool) -> &'static str {
    match reason {
        StopReason::StartupTimeout => "killed by procman after the startup timeout",
        StopReason::HeartbeatTimeout => "killed by procman after a heartbeat timeout",
        _ if quick => "killed by procman after the quick-stop grace",
        _ => "killed by procman after the graceful timeout",
    }
}

/// Like [`describe`], but a SIGKILL procman sent itself says why instead of
/// suspecting the OOM killer.
fn describe_exit(status: &WaitStatus, stop: Option<&Stop>) -> String {
    match (status, stop.and_then(|s| s.killed)) {
        (WaitStatus::Signaled(_, Signal::SIGKILL, _), Some(cause)) => cause.to_string(),
        _ => describe(status),
    }
}

fn exit_code(status: &WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(*code),
        _ => None,
    }
}

/// "exited with status 1", "killed by SIGKILL".
pub fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "exited cleanly".into(),
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => format!(
            "killed by {}{}{}",
            sig.as_str(),
            if *core { " (core dumped)" } else { "" },
            if *sig == Signal::SIGKILL {
                " (perhaps out of memory?)"
            } else {
                ""
            }
        ),
        other => format!("{other:?}"),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `WATCHDOG_USEC/2` when systemd's watchdog is on for procman.
fn systemd_watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_sentences() {
        let pid = Pid::from_raw(7);
        assert_eq!(describe(&WaitStatus::Exited(pid, 0)), "exited cleanly");
        assert_eq!(
            describe(&WaitStatus::Exited(pid, 3)),
            "exited with status 3"
        );
        assert_eq!(
            describe(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            "killed by SIGKILL (perhaps out of memory?)"
        );
    }

    #[test]
    fn a_sigkill_procman_sent_names_procman_not_the_oom_killer() {
        let pid = Pid::from_raw(7);
        let killed = WaitStatus::Signaled(pid, Signal::SIGKILL, false);
        let stop = |reason, killed| Stop {
            reason,
            kill_at: None,
            killed,
        };
        let table = [
            (
                stop(
                    StopReason::Shutdown,
                    Some(kill_cause(StopReason::Shutdown, false)),
                ),
                "killed by procman after the graceful timeout",
            ),
            (
                stop(
                    StopReason::Replaced,
                    Some(kill_cause(StopReason::Replaced, true)),
                ),
                "killed by procman after the quick-stop grace",
            ),
            (
                stop(
                    StopReason::HeartbeatTimeout,
                    Some(kill_cause(StopReason::HeartbeatTimeout, false)),
                ),
                "killed by procman after a heartbeat timeout",
            ),
            (
                stop(
                    StopReason::StartupTimeout,
                    Some(kill_cause(StopReason::StartupTimeout, false)),
                ),
                "killed by procman after the startup timeout",
            ),
            // Asked to stop, but the SIGKILL came from elsewhere.
            (
                stop(StopReason::Shutdown, None),
                "killed by SIGKILL (perhaps out of memory?)",
            ),
        ];
        for (s, want) in table {
            assert_eq!(describe_exit(&killed, Some(&s)), want);
        }
        assert_eq!(
            describe_exit(&killed, None),
            "killed by SIGKILL (perhaps out of memory?)"
        );
        let term = WaitStatus::Signaled(pid, Signal::SIGTERM, false);
        let s = stop(
            StopReason::Shutdown,
            Some(kill_cause(StopReason::Shutdown, false)),
        );
        assert_eq!(describe_exit(&term, Some(&s)), "killed by SIGTERM");
    }
}
