//! A booting worker runs at a raised CPU priority until it is ready.
//!
//! A worker's boot (the app's import, for the uvicorn class) is CPU-bound,
//! and the workers already serving are busy exactly when a boot matters
//! most: a crashed worker's replacement, a reload's new generation, a
//! recycled worker's successor. At the same priority the boot gets one
//! share of the CPUs among every serving worker, so the capacity that was
//! lost comes back late. Raised by [`policy::BOOT_NICE_BOOST`] it gets the
//! CPU first; the serving workers keep whatever a boot leaves, and all of
//! them are at the master's priority again once it is ready.
//!
//! What a worker is raised to and goes back to is computed from procman's
//! own nice value, never read from the worker's process group: the group's
//! value is that of its highest-priority member, and a process that could
//! join the group before the read (a helper an earlier, raised worker left
//! behind) would otherwise be raised one step further at every respawn.
//! Each worker leads a session of its own (`spawn/child.rs`, and the
//! bootstrap for a worker a zygote forks), so no process outside it can
//! join its group at all. The boost ends when the worker is ready, when it
//! is asked to stop, or at its first startup deadline, whichever comes
//! first: `EXTEND_TIMEOUT_USEC` gives a worker more time to boot, not more
//! time at a raised priority ([`Due::BoostOver`]).
//!
//! Raising a priority needs `CAP_SYS_NICE` (root has it; a default Docker
//! container does not). Without it the first attempt fails with `EACCES`
//! or `EPERM`, that is said once at debug level, and workers boot at the
//! master's priority as before. Lowering back never needs a privilege.
//! `--no-boot-boost` turns it off without removing the capability.
//!
//! Invariant: a worker whose `Active::boosted` is set runs at a raised
//! priority and nothing else changed its nice value since; whoever
//! changes it next (readiness, a stop, the deadline, a reload's lowering)
//! clears the field.

use std::io::ErrorKind;
use std::time::Instant;

use nix::unistd::Pid;
use tracing::debug;

use super::share::{procmans_nice, set_priority};
use super::Master;
use crate::policy;
use crate::workers::{Boosted, Due, Worker, WorkerState};

/// Whether procman may raise a booting worker's priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Boost {
    /// Not known yet, or it worked.
    #[default]
    Allowed,
    /// The kernel refused once (no CAP_SYS_NICE): not tried again.
    Denied,
}

impl Master {
    /// Raises the priority of `w`, just forked and still starting, to one
    /// step above procman's own, until its startup deadline at the latest.
    pub(super) fn boost_booting(&mut self, w: &mut Worker) {
        if self.boost == Boost::Denied || !self.settings.cfg.boot_boost {
            return;
        }
        let WorkerState::Starting { deadline, .. } = w.state else {
            return;
        };
        let pid = w.pid;
        let Some(from) = procmans_nice() else {
            return;
        };
        let Some(to) = policy::boosted_nice(from) else {
            return;
        };
        match set_priority(w, to) {
            Ok(()) => {
                if let Some(a) = w.active_mut() {
                    a.boosted = Some(Boosted {
                        back_to: from,
                        until: deadline,
                    });
                }
                debug!("Worker {pid} boots at nice {to} (procman's is {from})");
            }
            // EACCES or EPERM: without CAP_SYS_NICE it would be refused
            // for every worker alike.
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                self.boost = Boost::Denied;
                debug!("Workers boot at the master's priority: raising one was refused ({e}; it needs CAP_SYS_NICE)");
            }
            Err(e) => debug!("Cannot raise the priority of worker {pid}: {e}"),
        }
    }

    /// Each boosted worker's boost deadline.
    pub(super) fn boost_deadlines(&self) -> impl Iterator<Item = (Instant, Due)> + '_ {
        self.table
            .iter()
            .filter_map(|w| Some((w.active()?.boosted?.until, Due::BoostOver(w.pid))))
    }

    /// Worker `pid`'s boost deadline passed: back to procman's priority,
    /// although it still boots.
    pub(super) fn boost_over(&mut self, pid: Pid, now: Instant) {
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        if w.active()
            .and_then(|a| a.boosted)
            .is_some_and(|b| b.until <= now)
        {
            debug!("Worker {pid} still boots after its startup deadline: no longer raised");
            end_boost(w);
        }
    }
}

/// `w` is ready, asked to stop, or out of its boost's time: if it booted
/// at a raised priority, it goes back to the one procman had when it was
/// raised. That only lowers a priority, so it needs no privilege. (A
/// reload that lowers a worker still booting takes `boosted` itself.)
pub(super) fn end_boost(w: &mut Worker) {
    let pid = w.pid;
    let Some(b) = w.active_mut().and_then(|a| a.boosted.take()) else {
        return;
    };
    if let Err(e) = set_priority(w, b.back_to) {
        debug!(
            "Cannot give worker {pid} its priority back (nice {}): {e}",
            b.back_to
        );
    }
}
