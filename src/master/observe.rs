//! What the master tells about itself, from its own loop: the metrics
//! endpoint (`--metrics`) and the control socket (`--control-socket`),
//! both non-blocking [`Server`]s polled with the master's other fds and
//! serviced once per iteration; the status snapshot they read; the exit
//! reason of each reaped worker (counted, and logged as `reason`); and the
//! reload results a `procman reload` waits for.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use serde_json::json;
use tracing::info;

use super::{Event, Master, MasterState};
use crate::config::Config;
use crate::control::{self, Request};
use crate::error::{Error, Result};
use crate::serve::{Framed, Server};
use crate::signals::MasterSignal;
use crate::status::{self, ExitReason, Observed, OomVerdict, Snapshot, WorkerStatus};
use crate::workers::{StopReason, Table, Worker, WorkerState};

/// How long a metrics or control client has to send its request and read
/// the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoints and the record they report from.
pub(super) struct Endpoints {
    metrics: Option<Server>,
    control: Option<Server>,
    /// Control connections waiting for the current reload's result.
    reload_waiters: Vec<u64>,
    reload_started: Option<Instant>,
    /// Workers stopped for recycling, and why (the reason outlives the
    /// worker's active state).
    recycled: BTreeMap<Pid, ExitReason>,
    /// The control connection whose request is being handled (a reload
    /// rejected at once answers it alone when another reload goes on).
    asking: Option<u64>,
    /// Answers decided outside a service pass (a reload's end).
    replies: Vec<(u64, Vec<u8>)>,
    started: Instant,
    pub(super) observed: Observed,
    /// The workers' memory, read from /proc at most once a second (a
    /// snapshot is taken through `&self`, from inside a service pass).
    memory: std::cell::RefCell<status::MemoryCache>,
    /// A `procman upgrade` taken on in a service pass, carried out after
    /// it: the connection and the binary asked for.
    upgrade_asked: Option<(Option<u64>, Option<String>)>,
    /// In-place upgrades this master went through.
    pub(super) upgrades: u64,
}

impl Endpoints {
    /// Binds what the configuration asks for (nothing by default).
    pub(super) fn bind(cfg: &Config) -> Result<Endpoints> {
        let open = |name: &str, addr: Option<&str>, mode: u32| -> Result<Option<Server>> {
            let Some(addr) = addr.filter(|a| !a.is_empty()) else {
                return Ok(None);
            };
            Server::bind(addr, mode, CLIENT_TIMEOUT)
                .map(Some)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidInput => {
                        Error::usage(format!("--{name} {addr}: not HOST:PORT or unix:PATH ({e})"))
                    }
                    _ => Error::runtime(format!("--{name} {addr}: cannot listen: {e}")),
                })
        };
        let control = match cfg.options.text("control-socket") {
            Some(p) => open("control-socket", Some(&format!("unix:{p}")), 0o600)?,
            None => None,
        };
        // The metrics endpoint is read-only: a unix socket for it may be
        // read by the group (a scraper's sidecar).
        let metrics = open("metrics", cfg.options.text("metrics"), 0o660)?;
        if let Some(s) = &metrics {
            match s.address() {
                unix if unix.starts_with("unix:") => {
                    info!("Serving metrics at: {unix} (GET /metrics)")
                }
                tcp => info!("Serving metrics at: http://{tcp}/metrics"),
            }
        }
        if let Some(s) = &control {
            info!("Control socket at: {}", s.address());
        }
        Ok(Endpoints {
            metrics,
            control,
            reload_waiters: Vec::new(),
            reload_started: None,
            replies: Vec::new(),
            asking: None,
            recycled: BTreeMap::new(),
            started: Instant::now(),
            observed: Observed::default(),
            memory: Default::default(),
            upgrade_asked: None,
            upgrades: 0,
        })
    }

    /// The endpoints an earlier image described (`upgrade`): the same
    /// listening sockets, not bound again.
    pub(super) fn adopt(
        state: &crate::upgrade::State,
        now: Instant,
    ) -> std::result::Result<Endpoints, String> {
        let server = |r: &crate::upgrade::EndpointRecord| -> Server {
            // SAFETY: the caller checked the descriptor is open; the state
            // names it as this endpoint's listener, owned by nothing else.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r.fd) };
            let listen = match &r.unix {
                Some((path, dev, ino)) => crate::serve::Listen::Unix(
                    fd.into(),
                    path.clone(),
                    crate::safefs::FileId::from_parts(*dev, *ino),
                ),
                None => crate::serve::Listen::Tcp(fd.into()),
            };
            Server::new(listen, CLIENT_TIMEOUT)
        };
        Ok(Endpoints {
            metrics: state.metrics.as_ref().map(server),
            control: state.control.as_ref().map(server),
            reload_waiters: Vec::new(),
            reload_started: None,
            replies: Vec::new(),
            asking: None,
            recycled: BTreeMap::new(),
            started: crate::upgrade::abs(state.started_ms, now),
            observed: Observed::default(),
            memory: Default::default(),
            upgrade_asked: None,
            upgrades: 0,
        })
    }

    /// The control socket's and the metrics endpoint's descriptions.
    pub(super) fn records(
        &self,
    ) -> (
        Option<crate::upgrade::EndpointRecord>,
        Option<crate::upgrade::EndpointRecord>,
    ) {
        (
            self.control.as_ref().map(Server::record),
            self.metrics.as_ref().map(Server::record),
        )
    }

    /// When this master started (its first image).
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// A worker is being stopped to be recycled, for `why`.
    pub(super) fn note_recycle(&mut self, pid: Pid, why: &str) {
        self.recycled.insert(pid, ExitReason::of_recycle(why));
    }

    /// The fds to poll: `(fd, wants output)`.
    pub(super) fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, bool)> {
        let mut out = Vec::new();
        for s in [&self.metrics, &self.control].into_iter().flatten() {
            out.extend(s.poll_fds());
        }
        out
    }

    /// When a connection is due to be closed.
    pub(super) fn deadline(&self) -> Option<Instant> {
        [&self.metrics, &self.control]
            .into_iter()
            .flatten()
            .filter_map(Server::deadline)
            .min()
    }
}

impl Master {
    /// One pass over both endpoints: never blocks.
    pub(super) fn serve_endpoints(&mut self, now: Instant) {
        if let Some(mut server) = self.endpoints.metrics.take() {
            let mut ready = || is_ready(&self.table, &self.state);
            let mut snap = || self.snapshot(now);
            let observed = &self.endpoints.observed;
            // The closures borrow self; `observed` is a field of it too,
            // all read-only.
            server.service(now, |_, bytes, _| {
                crate::metrics::answer(bytes, &mut ready, &mut snap, observed)
            });
            self.endpoints.metrics = Some(server);
        }
        if let Some(mut server) = self.endpoints.control.take() {
            let mut asked: Vec<(u64, Request)> = Vec::new();
            server.service(now, |id, bytes, stream| {
                match control::frame(bytes, stream) {
                    Ok(None) => Framed::Incomplete,
                    Err(reply) => Framed::Reply(reply),
                    Ok(Some(request)) => {
                        asked.push((id, request));
                        Framed::Later
                    }
                }
            });
            for (id, request) in asked {
                if let Some(reply) = self.on_control(id, request, now) {
                    server.reply(id, reply, now);
                }
            }
            self.deliver_replies(&mut server, now);
            server.flush(now);
            self.endpoints.control = Some(server);
        }
        if let Some((id, binary)) = self.endpoints.upgrade_asked.take() {
            let reply = id.and_then(|id| self.endpoints.control.as_mut()?.take(id));
            self.upgrade(binary, reply, now);
        }
        self.tend_upgrade(now);
    }

    /// An upgrade was asked for (USR2: `id` None): carried out at the end
    /// of this round of the loop, once every event read so far is handled
    /// (a stop read with it wins). A second request meanwhile is refused.
    pub(super) fn ask_upgrade(&mut self, id: Option<u64>, binary: Option<String>) {
        if self.endpoints.upgrade_asked.is_some() {
            if let Some(id) = id {
                let busy = control::error("an upgrade is already under way");
                self.endpoints.replies.push((id, busy));
            }
            return;
        }
        self.endpoints.upgrade_asked = Some((id, binary));
    }

    /// Answers decided since the last pass (a reload's end; a stop ends
    /// every wait for a reload), written at once: called after each round
    /// of the loop's work as well, so an answer never waits for a wake-up.
    pub(super) fn flush_endpoints(&mut self, now: Instant) {
        if let Some(mut server) = self.endpoints.control.take() {
            self.deliver_replies(&mut server, now);
            server.flush(now);
            self.endpoints.control = Some(server);
        }
    }

    fn deliver_replies(&mut self, server: &mut Server, now: Instant) {
        if matches!(self.state, MasterState::Stopping { .. }) {
            for id in std::mem::take(&mut self.endpoints.reload_waiters) {
                server.reply(id, control::error("procman is stopping"), now);
            }
        }
        for (id, reply) in std::mem::take(&mut self.endpoints.replies) {
            server.reply(id, reply, now);
        }
    }

    /// A control request; `None` when the answer comes later (a reload).
    fn on_control(&mut self, id: u64, request: Request, now: Instant) -> Option<Vec<u8>> {
        let stopping = matches!(self.state, MasterState::Stopping { .. });
        match request {
            Request::Status => {
                let snap = self.snapshot(now);
                Some(control::line(json!({"ok": true, "status": snap})))
            }
            Request::Scale(_) | Request::Reload if stopping => {
                Some(control::error("procman is stopping"))
            }
            Request::Scale(n) => {
                let delta = n as isize - self.settings.target as isize;
                if delta != 0 {
                    self.scale(delta);
                }
                Some(control::line(
                    json!({"ok": true, "workers": self.settings.target}),
                ))
            }
            Request::Stop { quick } => {
                let sig = if quick {
                    MasterSignal::Interrupt
                } else {
                    MasterSignal::Terminate
                };
                self.handle(Event::Signal(sig), now);
                Some(control::line(json!({"ok": true})))
            }
            Request::Upgrade { .. } if stopping => Some(control::error("procman is stopping")),
            Request::Upgrade { binary } => {
                self.ask_upgrade(Some(id), binary);
                None
            }
            Request::Reload => {
                self.endpoints.reload_waiters.push(id);
                self.endpoints.asking = Some(id);
                self.handle(Event::Signal(MasterSignal::Reload), now);
                self.endpoints.asking = None;
                None
            }
        }
    }

    /// A reload began (HUP or `procman reload`).
    pub(super) fn reload_began(&mut self, now: Instant) {
        self.endpoints.reload_started = Some(now);
        self.endpoints.observed.last_reload = Some("in progress".into());
    }

    /// A reload ended: counted, timed, and told to whoever waits for it.
    pub(super) fn reload_ended(&mut self, result: std::result::Result<(), String>) {
        if let (Err(why), Some(_)) = (&result, &self.reload) {
            // A new configuration was rejected while an earlier reload
            // goes on: only who asked for this one hears of it; those
            // waiting for the earlier one keep waiting.
            *self.endpoints.observed.reloads.entry("failed").or_default() += 1;
            if let Some(id) = self.endpoints.asking {
                self.endpoints.reload_waiters.retain(|w| *w != id);
                self.endpoints.replies.push((id, control::error(why)));
            }
            return;
        }
        let took = self
            .endpoints
            .reload_started
            .take()
            .map_or(Duration::ZERO, |t| t.elapsed());
        let reply = match &result {
            Ok(()) => control::line(json!({"ok": true, "generation": self.generation})),
            Err(why) => control::error(why),
        };
        self.endpoints.observed.reload_done(result, took);
        for id in std::mem::take(&mut self.endpoints.reload_waiters) {
            self.endpoints.replies.push((id, reply.clone()));
        }
    }

    /// Why a reaped worker ended, and how, for the log; counted for its
    /// slot and reason.
    pub(super) fn record_exit(&mut self, w: &Worker, status: &WaitStatus) -> (ExitReason, String) {
        let killed_by_procman = w.stop().is_some_and(|s| s.killed.is_some());
        let reason = match w.stop().map(|s| s.reason) {
            Some(StopReason::Shutdown) => ExitReason::Shutdown,
            Some(StopReason::Excess) => ExitReason::Scale,
            Some(StopReason::HeartbeatTimeout | StopReason::StartupTimeout) => ExitReason::Timeout,
            Some(StopReason::ReloadAborted) => ExitReason::Reload,
            Some(StopReason::Replaced) => self
                .endpoints
                .recycled
                .get(&w.pid)
                .copied()
                .unwrap_or(ExitReason::Reload),
            None => ExitReason::Crash,
        };
        let sigkill = matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _));
        // Read the cgroups' counts at every SIGKILL procman did not send, so
        // that one OOM kill is attributed once.
        let oom = if sigkill && !killed_by_procman {
            self.endpoints.observed.oom_verdict(w.own_cgroup.as_ref())
        } else {
            OomVerdict::No
        };
        let (reason, how) = match oom {
            OomVerdict::Yes => (
                ExitReason::OomKill,
                "killed by the kernel's OOM killer (SIGKILL)".to_string(),
            ),
            OomVerdict::Perhaps => (
                ExitReason::OomKill,
                "killed by SIGKILL, perhaps by the kernel's OOM killer (it killed a process in procman's memory cgroup meanwhile)".to_string(),
            ),
            OomVerdict::No => (reason, super::exits::describe_exit(status, w.stop())),
        };
        self.endpoints.recycled.remove(&w.pid);
        self.endpoints.observed.exited(w.slot, reason, &how);
        (reason, how)
    }

    /// The master and its workers now, with each worker's RSS and USS
    /// (read from /proc at most once a second, see [`status::MemoryCache`])
    /// and each listener's queue: for `/metrics` and `procman status`,
    /// never for a probe.
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot {
        let groups: BTreeSet<i32> = self.table.iter().map(|w| w.pid.as_raw()).collect();
        let memory = self.endpoints.memory.borrow_mut().get(
            &groups,
            now,
            status::memory_by_group,
            status::memory_of_group,
        );
        let observed = &self.endpoints.observed;
        let workers = self
            .table
            .iter()
            .map(|w| {
                let mem = memory.get(&w.pid.as_raw());
                let slot = observed.slots.get(&w.slot);
                WorkerStatus {
                    slot: w.slot,
                    pid: w.pid.as_raw(),
                    generation: w.generation,
                    state: match w.state {
                        WorkerState::Starting { .. } => "starting",
                        WorkerState::Ready(_) => "ready",
                        WorkerState::Stopping(_) => "stopping",
                    }
                    .to_string(),
                    age_s: now.saturating_duration_since(w.started_at).as_secs_f64(),
                    rss_bytes: mem.map(|m| m.0),
                    uss_bytes: mem.map(|m| m.1),
                    heartbeat_age_s: w
                        .last_heartbeat
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    restarts: slot.map_or(0, |s| s.0),
                    last_exit: slot.map(|s| s.1.clone()),
                }
            })
            .collect();
        let listen_queue = self
            .settings
            .listeners
            .iter()
            .filter_map(|l| Some((l.display.clone(), status::listen_queue(l.fd.as_raw_fd())?)))
            .collect();
        Snapshot {
            pid: std::process::id() as i32,
            name: self.settings.cfg.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: now
                .saturating_duration_since(self.endpoints.started)
                .as_secs_f64(),
            generation: self.generation,
            state: match self.state {
                MasterState::Booting => "booting",
                MasterState::Running => "running",
                MasterState::Stopping { .. } => "stopping",
            }
            .to_string(),
            target: self.settings.target,
            reload: observed.last_reload.clone(),
            workers,
            restarts: observed
                .restarts
                .iter()
                .map(|(r, n)| (r.as_str().to_string(), *n))
                .collect(),
            reloads: observed
                .reloads
                .iter()
                .map(|(r, n)| (r.to_string(), *n))
                .collect(),
            listen_queue,
            notify_dropped: {
                let mut dropped = self.notify.dropped();
                for (reason, n) in self.urgent.dropped() {
                    *dropped.entry(reason).or_default() += n;
                }
                dropped
            },
            zygote_drops: self.zygote_drops(),
        }
    }
}

/// `/readyz`: at least one worker ready and no stop begun, read from the
/// worker table alone, so a probe every second costs nothing but its
/// answer.
fn is_ready(table: &Table, state: &MasterState) -> bool {
    !matches!(state, MasterState::Stopping { .. }) && table.ready_count() > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: i32, ready: bool) -> Worker {
        let now = Instant::now();
        let mut w = Worker::new(Pid::from_raw(pid), 0, 1, now, Duration::from_secs(30));
        if ready {
            w.become_ready(now);
        }
        w
    }

    #[test]
    fn ready_means_a_ready_worker_and_no_stop() {
        let mut table = Table::default();
        assert!(!is_ready(&table, &MasterState::Running), "no worker");
        table.insert(worker(100, false));
        assert!(!is_ready(&table, &MasterState::Booting), "only starting");
        table.insert(worker(101, true));
        assert!(is_ready(&table, &MasterState::Booting));
        assert!(is_ready(&table, &MasterState::Running));
        let stopping = MasterState::Stopping {
            quick: false,
            outcome: Ok(()),
        };
        assert!(!is_ready(&table, &stopping), "a stop began");
    }
}
