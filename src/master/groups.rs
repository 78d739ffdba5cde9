//! Process groups outliving their leader: a reaped worker's (or zygote's)
//! group that still has members is tracked until it is empty, and its
//! members get SIGKILL at the worker's stop deadline.

use std::time::Instant;

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::{Master, MasterState};
use crate::pid::ChildPid;
use crate::policy;
use crate::workers::{GroupKill, Lingering, Stop, Worker};

impl Master {
    /// A worker's leader was reaped: if its process group still has
    /// members, they are SIGKILLed at the worker's stop deadline (at once on
    /// a quick stop, or if procman already sent SIGKILL); the group of a
    /// worker that died on its own gets the stop signal now and SIGKILL
    /// after the graceful timeout.
    pub(super) fn linger_after(&mut self, w: &Worker, now: Instant) {
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
                now + self.settings.cfg.graceful_timeout
            }
        };
        let label = format!("worker {} (slot {})", w.pid, w.slot);
        self.linger(group, label, kill_at, now);
    }

    /// Tracks group `pgid` until it is empty; its members get SIGKILL at
    /// `kill_at`.
    pub(super) fn linger(&mut self, pgid: ChildPid, label: String, kill_at: Instant, now: Instant) {
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
    pub(super) fn tend_groups(&mut self, now: Instant) {
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
}
