//! In-place upgrade, the master's side (issue 28; the state format and the
//! pre-flight are in `crate::upgrade`).
//!
//! USR2 or `procman upgrade [PATH]`: the binary (PATH, else where procman
//! was started from, re-resolved now) is opened once and checked
//! ([`upgrade::open_binary`]), its pre-flight must answer positively, then
//! the master writes its state to a memfd, clears CLOEXEC on exactly the
//! descriptors the state names, and `execveat`s that same descriptor with
//! its own argv: same pid, so every worker stays its child and waitpid
//! keeps working. The new image ([`Master::adopt`]) skips binding and the
//! pre-start commands and continues the loop with the same table.
//!
//! The window: every handled signal is blocked before the exec. The mask
//! survives execve and a blocked signal stays pending, so a TERM or a CHLD
//! that arrives meanwhile is delivered once the new image has installed
//! its handlers and unblocked them (`Signals::install`); a worker that
//! exited meanwhile is a zombie the new loop reaps and replaces. A
//! `PR_SET_PDEATHSIG` set by a worker fires when its parent *thread* dies:
//! execve kills no thread of a single-threaded process (the thread group
//! leader keeps its tid), so it still points at procman. The child-
//! subreaper attribute is kept across execve (prctl(2)); the new image sets
//! it again anyway, as any start does.
//!
//! Not carried over (started afresh by the new image): zygotes (killed
//! before the exec; a new one starts as for a reload), the slots' restart
//! backoff, the metrics' counters, the memory sampling schedule.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::info;

use super::{Endpoints, Master, MasterState, Settings, SystemdLink};
use crate::bind::{BindSpec, Listener};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::safefs::FileId;
use crate::signals::Signals;
use crate::upgrade::{self, rel, ListenerRecord, State};
use crate::workers::Table;
use rows::{record, worker};

mod rows;

/// An upgrade whose pre-flight runs.
pub(super) struct Checking {
    run: upgrade::Preflight,
    bin: OwnedFd,
    argv: Vec<std::ffi::CString>,
    /// The `procman upgrade` connection, if a client asked.
    reply: Option<OwnedFd>,
}

/// Answers a `procman upgrade` connection with a failure.
fn refuse(reply: Option<OwnedFd>, why: &str) {
    tracing::warn!(event = "upgrade-failed", "Upgrade refused: {why}");
    if let Some(fd) = reply {
        let mut f = std::fs::File::from(fd);
        let _ = std::io::Write::write_all(&mut f, &crate::control::error(why));
    }
}

impl Master {
    /// Whether an upgrade may start (or, after its pre-flight, go on) now.
    fn may_upgrade(&self) -> std::result::Result<(), String> {
        if matches!(self.state, MasterState::Stopping { .. }) {
            return Err("procman is stopping".into());
        }
        if self.reload.is_some() {
            return Err("a reload is in progress; upgrade once it ended".into());
        }
        if !self.groups.is_empty() {
            return Err(
                "a stopped worker's process group is still being cleaned up; try again".into(),
            );
        }
        if self.zygotes.iter().any(|z| z.pending.is_some()) {
            return Err("a zygote is forking a worker; try again".into());
        }
        Ok(())
    }

    /// Begins an upgrade: the binary is opened and checked, and its
    /// pre-flight started (see [`Master::tend_upgrade`]). On failure,
    /// nothing changed: logged, and told to `reply` (the `procman upgrade`
    /// connection, taken out of the control server; the new image answers
    /// it on success).
    pub(super) fn upgrade(&mut self, binary: Option<String>, reply: Option<OwnedFd>, now: Instant) {
        match self.begin_upgrade(binary, now) {
            Ok((run, bin, argv)) => {
                self.checking = Some(Checking {
                    run,
                    bin,
                    argv,
                    reply,
                })
            }
            Err(why) => refuse(reply, &why),
        }
    }

    #[allow(clippy::type_complexity)]
    fn begin_upgrade(
        &mut self,
        binary: Option<String>,
        now: Instant,
    ) -> std::result::Result<(upgrade::Preflight, OwnedFd, Vec<std::ffi::CString>), String> {
        if self.checking.is_some() {
            return Err("an upgrade is already under way".into());
        }
        self.may_upgrade()?;
        let configured = self.settings.cfg.options.text("upgrade-binary");
        let path = match binary.as_deref().or(configured) {
            Some(p) => PathBuf::from(p),
            None => self
                .args
                .first()
                .and_then(|a| upgrade::started_from(a))
                .ok_or("cannot tell where procman was started from")?,
        };
        let bin = upgrade::open_binary(&path)?;
        let argv = upgrade::c_strings(self.args.iter().map(|a| a.as_bytes()))?;
        info!(event = "upgrade", binary = %path.display(), "Upgrade: checking {}", path.display());
        let run = upgrade::Preflight::start(&bin, &argv, now)?;
        Ok((run, bin, argv))
    }

    /// The pre-flight's descriptors, for the poll set.
    pub(super) fn upgrade_poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.checking
            .as_ref()
            .map_or_else(Vec::new, |c| c.run.poll_fds())
    }

    /// When the pre-flight is given up.
    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        self.checking.as_ref().map(|c| c.run.deadline)
    }

    /// The reap loop found `pid` exited: the pre-flight's check, if it is
    /// its pid (then it is no worker's business).
    pub(super) fn preflight_exited(&mut self, pid: Pid, status: WaitStatus) -> bool {
        match &mut self.checking {
            Some(c) if c.run.child() == pid => {
                c.run.exited(status);
                true
            }
            _ => false,
        }
    }

    /// Once per round of the loop, after every event read: the
    /// pre-flight's progress; once it answered positively, the exec.
    pub(super) fn tend_upgrade(&mut self, now: Instant) {
        let Some(c) = &mut self.checking else {
            return;
        };
        let Some(verdict) = c.run.poll(now) else {
            return;
        };
        let Some(c) = self.checking.take() else {
            return;
        };
        let answer = match verdict.and_then(|a| self.may_upgrade().map(|_| a)) {
            Ok(a) => a,
            Err(why) => return refuse(c.reply, &why),
        };
        info!(
            event = "upgrade",
            "Upgrade: pre-flight passed (procman {}); re-executing in place, keeping {} worker{}",
            answer.version,
            self.table.len(),
            super::plural(self.table.len())
        );
        let reply = c.reply.as_ref().map(AsRawFd::as_raw_fd);
        let why = self.hand_over(&c.bin, &c.argv, reply, now);
        refuse(c.reply, &why);
    }

    /// Blocks signals, writes the state and execs; returns only on failure
    /// (everything as it was), with the reason.
    fn hand_over(
        &mut self,
        bin: &OwnedFd,
        argv: &[std::ffi::CString],
        reply: Option<RawFd>,
        now: Instant,
    ) -> String {
        // From here to the exec, a signal stays pending (blocked), and the
        // mask and pending signals survive execve: the new image gets them
        // once its handlers are in place. What reached the self-pipe before
        // the block is drained now and handed over in the state.
        let mut handled = SigSet::empty();
        for (n, _) in crate::signals::HANDLED {
            if let Ok(s) = Signal::try_from(*n) {
                handled.add(s);
            }
        }
        let mut old = SigSet::empty();
        if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled), Some(&mut old)) {
            return format!("cannot block signals: {}", e.desc());
        }
        let caught = self.signals.drain();
        let unblock = |signals: &mut Signals| {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            for s in &caught {
                signals.hold(*s);
            }
        };
        if caught.iter().any(|s| s.is_stop()) {
            // The stop wins: handled by this image's loop next.
            unblock(&mut self.signals);
            return "a stop was requested".into();
        }
        // Zygotes are not carried over: the new image starts its own. Killed
        // as procman's own kills, so that if the exec fails this image
        // reports their exits as such (not as deaths, nor as failures that
        // would count towards starting workers cold) and starts a new one.
        let zygotes: Vec<Pid> = self.zygotes.iter().map(|z| z.pid).collect();
        for pid in zygotes {
            self.zygotes.kill(pid, "for the upgrade");
        }
        let mut state = self.describe(now, reply);
        state.signals = caught.iter().map(|s| s.number()).collect();
        state.binary_fd = Some(bin.as_raw_fd());
        let why = match upgrade::write_memfd(&state) {
            Ok(memfd) => self.exec(bin, argv, &state, &memfd),
            Err(why) => why,
        };
        unblock(&mut self.signals);
        why
    }

    /// Execs `bin` with the state on `memfd`; returns only on failure, with
    /// everything as it was.
    fn exec(
        &mut self,
        bin: &OwnedFd,
        argv: &[std::ffi::CString],
        state: &State,
        memfd: &OwnedFd,
    ) -> String {
        let env = match upgrade::environment((upgrade::STATE_ENV, memfd.as_raw_fd().to_string())) {
            Ok(e) => e,
            Err(why) => return why,
        };
        let mut fds = state.fds();
        fds.push(memfd.as_raw_fd());
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.systemd.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={monotonic}\nSTATUS=Upgrading in place"
        ));
        let cleared: std::result::Result<(), nix::errno::Errno> = fds
            .iter()
            .try_for_each(|fd| upgrade::set_cloexec(*fd, false));
        let why = match cleared {
            Err(e) => format!("cannot pass a descriptor on: {}", e.desc()),
            Ok(()) => {
                let err = nix::unistd::execveat(
                    Some(bin.as_raw_fd()),
                    c"",
                    argv,
                    &env,
                    nix::fcntl::AtFlags::AT_EMPTY_PATH,
                );
                format!(
                    "execveat failed: {}",
                    err.map_or_else(|e| e.desc(), |_| "returned")
                )
            }
        };
        for fd in &fds {
            let _ = upgrade::set_cloexec(*fd, true);
        }
        self.systemd
            .send(&format!("READY=1\nSTATUS={}", self.status_line()));
        why
    }

    /// The state description of this master.
    fn describe(&self, now: Instant, reply_fd: Option<RawFd>) -> State {
        let r = |at: Instant| rel(at, now);
        let workers = self.table.iter().map(|w| record(w, now)).collect();
        let listeners = self
            .settings
            .listeners
            .iter()
            .map(|l| ListenerRecord {
                fd: l.fd.as_raw_fd(),
                spec: l.spec.to_string(),
                name: l.name.clone(),
                display: l.display.clone(),
                unlink: l.unlink_at_exit.as_ref().map(|(p, id)| {
                    let (dev, ino) = id.parts();
                    (p.clone(), dev, ino)
                }),
                inherited: l.inherited,
                reuse_port: l.reuse_port,
                slots: l.slot_fds(),
            })
            .collect();
        let (control, metrics) = self.endpoints.records();
        State {
            state_version: upgrade::STATE_VERSION,
            procman_version: env!("CARGO_PKG_VERSION").into(),
            booting: self.state == MasterState::Booting,
            generation: self.generation,
            required_generation: self.required_generation,
            latest_generation: self.latest_generation,
            target: self.settings.target,
            ever_up: self.boot.ever_up(),
            boot_failures: self.boot.failures(),
            started_ms: r(self.endpoints.started()),
            upgrades: self.endpoints.upgrades,
            workers,
            listeners,
            notify: self.notify.receiver().record(),
            urgent: self.urgent.receiver().record(),
            control,
            metrics,
            reply_fd,
            signals: Vec::new(),
            binary_fd: None,
        }
    }

    /// The new image: a master around the state its old image left.
    pub fn adopt(
        cfg: Config,
        state: State,
        mut signals: Signals,
        args: Vec<std::ffi::OsString>,
    ) -> Result<Master> {
        let now = Instant::now();
        let bad = |why: String| Error::runtime(format!("cannot adopt the upgrade's state: {why}"));
        for fd in state.fds() {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
                .map_err(|_| bad(format!("descriptor {fd} is not open")))?;
            let _ = upgrade::set_cloexec(fd, true);
            crate::bind::forget_inherited(fd);
        }
        if let Some(fd) = state.binary_fd {
            // SAFETY: open (checked above): the binary's descriptor, kept
            // open only for the exec; owned by nothing here.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        // Signals the old image had taken from its pipe but not handled.
        for n in &state.signals {
            if let Some((_, s)) = crate::signals::HANDLED.iter().find(|(h, _)| h == n) {
                signals.hold(*s);
            }
        }
        let mut listeners = Vec::new();
        for l in &state.listeners {
            let spec = BindSpec::parse(&l.spec).map_err(&bad)?;
            listeners.push(Rc::new(Listener {
                spec,
                // SAFETY: open (checked above), and named by the state as
                // this listener's socket: nothing else here owns it.
                fd: unsafe { OwnedFd::from_raw_fd(l.fd) },
                name: l.name.clone(),
                display: l.display.clone(),
                unlink_at_exit: l
                    .unlink
                    .as_ref()
                    .map(|(p, dev, ino)| (p.clone(), FileId::from_parts(*dev, *ino))),
                inherited: l.inherited,
                reuse_port: l.reuse_port,
                slots: std::cell::RefCell::new(
                    l.slots
                        .iter()
                        // SAFETY: open (checked above), and named by the
                        // state as this slot's socket: nothing else here
                        // owns it.
                        .map(|&(slot, fd)| (slot, unsafe { OwnedFd::from_raw_fd(fd) }))
                        .collect(),
                ),
            }));
        }
        // SAFETY: each is open (checked above) and named by the state as
        // the notify sockets' descriptors: nothing else here owns them.
        let own = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
        let (n, u) = (&state.notify, &state.urgent);
        let notify = crate::notify::Receiver::adopt(n, own(n.fd), own(n.dir_fd)).map_err(&bad)?;
        let urgent = super::urgent::Urgent::adopt(u, own(u.fd), own(u.dir_fd)).map_err(&bad)?;
        let endpoints = Endpoints::adopt(&state, now).map_err(&bad)?;
        let mut table = Table::default();
        for w in &state.workers {
            table.insert(worker(w, now));
        }
        let cfg_watch = cfg.watch.clone();
        let mut settings = Settings::new(cfg, listeners);
        settings.target = state.target;
        let mut master = Master {
            settings,
            signals,
            notify: super::Inbox::new(notify, now),
            urgent,
            systemd: SystemdLink::from_env(now),
            table,
            boot: super::Boot::restore(state.ever_up, state.boot_failures),
            state: if state.booting {
                MasterState::Booting
            } else {
                MasterState::Running
            },
            generation: state.generation,
            required_generation: state.required_generation,
            reload: None,
            latest_generation: state.latest_generation,
            recycling: super::Recycling::new(),
            expected_wake: None,
            args,
            zygotes: super::Zygotes::default(),
            groups: super::Groups::default(),
            kill_limit: None,
            endpoints,
            boost: super::Boost::default(),
            upgraded: true,
            checking: None,
            autogroups_tried: now,
            changes: cfg_watch.as_ref().and_then(super::watch::Changes::start),
        };
        master.endpoints.upgrades = state.upgrades + 1;
        master.reshare();
        info!(
            event = "upgraded",
            from = %state.procman_version,
            workers = master.table.len(),
            "Upgraded in place: procman {} (was {}), pid {}, {} worker{} adopted, generation {}",
            env!("CARGO_PKG_VERSION"),
            state.procman_version,
            std::process::id(),
            master.table.len(),
            super::plural(master.table.len()),
            master.generation
        );
        if !state.booting {
            master
                .systemd
                .send(&format!("READY=1\nSTATUS={}", master.status_line()));
        }
        if let Some(fd) = state.reply_fd {
            // SAFETY: open (checked above), the `procman upgrade`
            // connection the state names; owned here alone.
            let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let line = crate::control::line(serde_json::json!({
                "ok": true,
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "from": state.procman_version,
                "workers": master.table.len(),
            }));
            let _ = std::io::Write::write_all(&mut f, &line);
        }
        Ok(master)
    }
}
