//! What the master waits for, and what a passed deadline does: every
//! part's pending deadlines as one list of data ([`Master::deadlines`]),
//! the earliest of them as the `poll` timeout ([`Master::next_wake`]), the
//! one poll set ([`Master::wait`]: the signal pipe, the urgent socket, the
//! notify socket while it is polled, the zygote channels, `--reload`'s
//! inotify descriptor, an upgrade's pre-flight and the endpoints), and the
//! event a passed deadline is ([`Master::on_due`]). Invariant: a deadline
//! is listed by the part that owns it and acted on only through `on_due`,
//! so none is computed twice; handling one removes it or moves it on.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::warn;

use super::groups::Kernel;
use super::{Master, MasterState};
use crate::policy::{self, Due};
use crate::workers::WorkerState;

impl Master {
    /// Every pending deadline of every part of the master, as data: the
    /// one list both the wake-up ([`Master::next_wake`]) and the event path
    /// ([`Master::on_due`]) read. Handling a passed deadline removes it or
    /// moves it on.
    pub(super) fn deadlines(&self) -> Vec<(Instant, Due)> {
        let mut out = policy::worker_deadlines(&self.table, self.settings.cfg.timeout);
        out.extend(
            self.notify
                .deadline()
                .map(|at| (at, Due::DrainNotifications)),
        );
        out.extend(self.groups.deadlines());
        out.extend(self.boost_deadlines());
        out.extend(self.systemd.deadline());
        if matches!(self.state, MasterState::Stopping { .. }) {
            return out;
        }
        out.extend(self.recycling.deadlines(&self.table));
        out.extend(self.boot.deadlines(&self.table));
        out.extend(self.zygote_deadlines());
        out.extend(self.autogroups_deadline());
        out.extend(
            self.changes
                .as_ref()
                .and_then(|c| c.deadline())
                .map(|at| (at, Due::ReloadChanges)),
        );
        out
    }

    pub(super) fn on_due(&mut self, due: Due, now: Instant) {
        match due {
            Due::Stable(pid) => self.stable(pid, now),
            Due::StartupTimeout(pid) => self.startup_timed_out(pid, now),
            Due::HeartbeatTimeout(pid) => self.heartbeat_timed_out(pid, now),
            Due::Kill(pid) => self.kill_overdue(pid, now),
            Due::Group(pgid) => self.groups.on_due(&Kernel, pgid, now),
            Due::BoostOver(pid) => self.boost_over(pid, now),
            Due::SystemdWatchdog => self.systemd.ping(now),
            Due::StayedUp(_) => self.boot.stayed_up(),
            Due::Retire(pid) => self.recycling.retire(&mut self.table, pid, now),
            Due::SampleMemory => self.recycling.sample_memory(
                &mut self.table,
                self.settings.cfg.max_worker_memory,
                self.settings.cfg.memory_check_interval,
                crate::procfs::rss_by_group,
                now,
            ),
            Due::BackoffOver(slot) => self.boot.backoff_over(slot),
            Due::ZygoteStartTimeout(pid) => self.zygote_start_timed_out(pid, now),
            Due::ZygoteBackoffOver => self.zygotes.backoff_over(),
            Due::ZygoteSpawnTimeout(pid) => self.zygote_spawn_timed_out(pid, now),
            Due::DrainNotifications => self.drain_notifications(now),
            Due::ReloadChanges => self.reload_changes(),
            Due::Autogroups => self.share_pending(now),
        }
    }

    pub(super) fn next_wake(&self) -> Option<Instant> {
        // The endpoints' connection deadlines only close connections: they
        // are not the master's events.
        self.deadlines()
            .into_iter()
            .map(|(at, _)| at)
            .chain(self.endpoints.deadline())
            .chain(self.upgrade_deadline())
            .min()
    }

    /// Sleeps in `poll` until an fd is ready or `timeout` passes; the
    /// notify socket is polled only if `listen`.
    pub(super) fn wait(&self, timeout: Option<Duration>, listen: bool) {
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
            PollFd::new(self.urgent.fd(), PollFlags::POLLIN),
        ];
        if listen {
            fds.push(PollFd::new(self.notify.receiver().fd(), PollFlags::POLLIN));
        }
        fds.extend(
            // Not a closed channel: its end-of-file would wake us forever.
            self.zygotes
                .channels()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
        );
        fds.extend(
            self.changes
                .as_ref()
                .map(|c| PollFd::new(c.fd(), PollFlags::POLLIN)),
        );
        fds.extend(
            self.upgrade_poll_fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
        );
        fds.extend(self.endpoints.poll_fds().into_iter().map(|(fd, out)| {
            PollFd::new(
                fd,
                if out {
                    PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                },
            )
        }));
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => warn!("poll failed: {}", e.desc()),
        }
    }

    /// After a suspension of the master, heartbeats that could not be
    /// received meanwhile are not held against the workers.
    pub(super) fn forgive_suspension(&mut self, late: Duration, now: Instant) {
        warn!(
            event = "suspended",
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
}
