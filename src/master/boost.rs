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
//! Raising a priority needs `CAP_SYS_NICE` (root has it; a default Docker
//! container does not). Without it the first attempt fails with `EACCES`
//! or `EPERM`, that is said once at debug level, and workers boot at the
//! master's priority as before. Lowering back never needs a privilege.
//!
//! Invariant: a worker whose `Active::boosted_from` is set runs at a
//! raised priority and nothing else changed its nice value since; whoever
//! changes it next (readiness here, a reload's lowering) clears the field.

use std::io::ErrorKind;

use nix::unistd::Pid;
use tracing::debug;

use super::Master;
use crate::policy;
use crate::priority;
use crate::workers::Worker;

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
    /// Raises the priority of `w`, just forked and still starting.
    pub(super) fn boost_booting(&mut self, w: &mut Worker) {
        if self.boost == Boost::Denied || !w.is_starting() {
            return;
        }
        let pid = w.pid;
        let Some(from) = nice_of_worker(pid) else {
            return;
        };
        let Some(to) = policy::boosted_nice(from) else {
            return;
        };
        match priority::set_group(pid, to) {
            Ok(()) => {
                if let Some(a) = w.active_mut() {
                    a.boosted_from = Some(from);
                }
                debug!("Worker {pid} boots at nice {to} (from {from})");
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
}

/// The nice value of worker `pid` (of its process group), or `None`, said
/// at debug level, if it cannot be read (it is gone already).
pub(super) fn nice_of_worker(pid: Pid) -> Option<i32> {
    priority::of_group(pid)
        .map_err(|e| debug!("Cannot read the priority of worker {pid}: {e}"))
        .ok()
}

/// `w` is ready: if it booted at a raised priority, it goes back to the one
/// it had before. That only lowers a priority, so it needs no privilege. (A
/// reload that lowers a worker still booting takes `boosted_from` itself.)
pub(super) fn end_boost(w: &mut Worker) {
    let pid = w.pid;
    let Some(from) = w.active_mut().and_then(|a| a.boosted_from.take()) else {
        return;
    };
    if let Err(e) = priority::set_group(pid, from) {
        debug!("Cannot give worker {pid} its priority back (nice {from}): {e}");
    }
}
