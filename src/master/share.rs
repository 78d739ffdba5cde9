//! The workers' share of the CPU where the kernel shares it among
//! sessions first (`kernel.sched_autogroup_enabled`, the default of many
//! kernels): all of procman's workers together weigh as one session, as
//! gunicorn's or granian's processes do, not one session each.
//!
//! Each worker leads a session of its own (`spawn/child.rs`, and the
//! bootstrap for a worker a zygote forks), so each has an autogroup of its
//! own, created at the default weight. Left there, N workers would take N
//! shares of the CPUs against everything else on the machine: a load
//! generator on the same host then starves (and measures latency that is
//! its own), an editor or a database next to a development server slows
//! down as workers are added. So each worker's autogroup is set, as soon
//! as it is forked, to its thread's nice value plus an offset
//! ([`Master::autogroup_offset`]): `policy::autogroup_share` of the worker
//! count, counted from procman's own session's autogroup. The boost and a
//! reload's lowering move a worker's autogroup with its nice value, by the
//! same offset (`priority::set_group`), so their effect among the workers
//! is the one they have without autogroups.
//!
//! Where autogroups do not count (a service in a cgroup of its own under
//! systemd, a container's cgroup with the CPU controller), the writes are
//! harmless; where the kernel keeps none, there is nothing to write.
//! Without `CAP_SYS_ADMIN` the kernel allows one autogroup change a tenth
//! of a second, machine-wide, and refuses the others with `EAGAIN`: a
//! refused worker stays `pending`, and [`Due::Autogroups`] tries again a
//! tenth of a second after the last try, one worker at a time, until none
//! is left. Invariant: a worker whose `share.pending` is clear has its
//! autogroup at its nice value plus `share.offset`, or has none that
//! procman may set.
//!
//! The priority changes of the boost (`boost.rs`) and of a reload
//! (`reload.rs`) go through [`set_priority`], and start from
//! [`procmans_nice`]: both live here, below those two, so the autogroup
//! follows every nice value procman sets.

use std::time::Instant;

use nix::unistd::Pid;
use tracing::debug;

use super::Master;
use crate::policy::{self, Due};
use crate::priority::{self, Autogroup};
use crate::workers::Worker;

impl Master {
    /// The offset from a worker's nice value to its autogroup's: its share
    /// of the current worker count, counted from procman's own session's
    /// autogroup (0 where there is none) rather than procman's nice value,
    /// which autogroups do not inherit.
    pub(super) fn autogroup_offset(&self) -> i32 {
        let share = policy::autogroup_share(self.settings.target);
        let session = priority::of_autogroup(Pid::this()).unwrap_or(0);
        let nice = procmans_nice().unwrap_or(0);
        share + session - nice
    }

    /// `w` was just forked, at procman's nice value: its autogroup gets its
    /// share now (the boost, if any, moves it on from there).
    pub(super) fn share_cpu(&mut self, w: &mut Worker, now: Instant) {
        w.share.offset = self.autogroup_offset();
        let nice = procmans_nice().unwrap_or(0);
        let outcome = priority::set_autogroup(w.pid, nice + w.share.offset);
        self.noted(w, outcome, now);
    }

    /// The worker count changed (scaling, a reload, an upgrade's adoption):
    /// every worker's autogroup is written again with the new offset.
    pub(super) fn reshare(&mut self) {
        let offset = self.autogroup_offset();
        for w in self.table.iter_mut() {
            w.share = crate::workers::Share {
                offset,
                pending: true,
            };
        }
    }

    /// Records what became of `w`'s autogroup: refused for now, it is tried
    /// again by [`Due::Autogroups`].
    pub(super) fn noted(&mut self, w: &mut Worker, outcome: Autogroup, now: Instant) {
        w.share.pending = outcome == Autogroup::Busy;
        if w.share.pending {
            self.autogroups_tried = now;
        }
    }

    /// When to try the pending autogroups again: a tenth of a second after
    /// the last refusal (so at once if that was longer ago). A time kept,
    /// never the clock read here: a deadline computed from `now` on every
    /// pass would never pass.
    pub(super) fn autogroups_deadline(&self) -> Option<(Instant, Due)> {
        self.table.iter().any(|w| w.share.pending).then(|| {
            (
                self.autogroups_tried + priority::AUTOGROUP_RATE,
                Due::Autogroups,
            )
        })
    }

    /// Writes the pending autogroups, each at its worker's current nice
    /// value plus its offset, until the kernel's rate limit refuses one.
    pub(super) fn share_pending(&mut self, now: Instant) {
        let pending: Vec<Pid> = self
            .table
            .iter()
            .filter(|w| w.share.pending)
            .map(|w| w.pid)
            .collect();
        for pid in pending {
            let Some(w) = self.table.get(pid) else {
                continue;
            };
            let offset = w.share.offset;
            let outcome = match priority::of_group(pid) {
                Ok(nice) => priority::set_autogroup(pid, nice + offset),
                Err(e) => {
                    debug!("Cannot read the priority of worker {pid}: {e}");
                    Autogroup::Absent
                }
            };
            if let Some(w) = self.table.get_mut(pid) {
                w.share.pending = outcome == Autogroup::Busy;
            }
            if outcome == Autogroup::Busy {
                self.autogroups_tried = now;
                return;
            }
        }
    }
}

/// Sets `w`'s process group to `nice` and its autogroup with its share;
/// whether the autogroup waits for the kernel's rate limit is recorded in
/// `w`, and [`Due::Autogroups`] comes a tenth of a second after the last
/// refusal the master saw (at once if none was that recent: then one try
/// more is refused, and its time is kept).
pub(super) fn set_priority(w: &mut Worker, nice: i32) -> std::io::Result<()> {
    let outcome = priority::set_group(w.pid, nice, w.share.offset)?;
    w.share.pending = outcome == Autogroup::Busy;
    Ok(())
}

/// procman's own nice value, or `None`, said at debug level, if it cannot
/// be read (it always can on Linux).
pub(super) fn procmans_nice() -> Option<i32> {
    priority::own()
        .map_err(|e| debug!("Cannot read procman's own priority: {e}"))
        .ok()
}
