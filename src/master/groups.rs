//! Process groups outliving their leader: [`Groups`] owns the groups of
//! reaped workers (or zygotes) that still have members (helpers that
//! ignored the stop signal, or outlived a crashed leader), until each is
//! empty. Orphaned members are re-parented to the master (a child
//! subreaper) and reaped by its loop; a group's number stays allocated
//! (cannot name another group) while any member, zombie or not, remains.
//!
//! Each group's SIGKILL and later looks are deadlines listed as data
//! ([`Groups::deadlines`]), acted on when they pass ([`Groups::on_due`]).
//! The two system calls a group needs (is it empty? SIGKILL it) go
//! through [`GroupEdge`], so what is due when is unit-tested without
//! processes.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::pid::ChildPid;
use crate::policy::Due;

/// How long the master waits for the members of a lingering process group
/// to disappear after their SIGKILL before it stops waiting (a process in
/// uninterruptible sleep, a zombie whose parent never reaps it).
pub(super) const GROUP_KILL_PATIENCE: Duration = Duration::from_secs(10);

/// How often a killed group that is not empty yet is looked at again: a
/// member that is not the master's child empties the group without a
/// SIGCHLD.
const LOOK_AGAIN: Duration = Duration::from_millis(100);

/// The system calls on a group whose leader was reaped.
pub(super) trait GroupEdge {
    /// Whether the group still has a member.
    fn has_members(&self, group: ChildPid) -> bool;
    /// SIGKILL to the group only, never to the pid alone (it may name
    /// another process by now).
    fn kill(&self, group: ChildPid);
}

/// The real system calls.
pub(super) struct Kernel;

impl GroupEdge for Kernel {
    fn has_members(&self, group: ChildPid) -> bool {
        group.group_has_members()
    }

    fn kill(&self, group: ChildPid) {
        group.signal_group_only(Signal::SIGKILL);
    }
}

/// One group whose leader was reaped.
#[derive(Debug)]
struct Lingering {
    pgid: ChildPid,
    /// "worker 123 (slot 0)", for the log.
    label: String,
    kill: GroupKill,
}

/// Where a lingering group's SIGKILL stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupKill {
    /// Due then.
    At(Instant),
    /// Sent; the group is looked at again at `look_at`, and no longer
    /// waited for from `give_up_at`.
    Sent {
        look_at: Instant,
        give_up_at: Instant,
    },
}

impl Lingering {
    /// The one place its next deadline is computed.
    fn deadline(&self) -> Instant {
        match self.kill {
            GroupKill::At(at) => at,
            GroupKill::Sent {
                look_at,
                give_up_at,
            } => look_at.min(give_up_at),
        }
    }

    /// Its deadline passed: SIGKILL, another look, or giving up. Returns
    /// whether it is still tracked. The caller checked it is not empty, so
    /// the number still names this group.
    fn due(&mut self, edge: &impl GroupEdge, now: Instant) -> bool {
        match self.kill {
            GroupKill::At(_) => {
                warn!(
                    "Killing what is left of the process group of {} (SIGKILL)",
                    self.label
                );
                edge.kill(self.pgid);
                self.kill = GroupKill::Sent {
                    look_at: now + LOOK_AGAIN,
                    give_up_at: now + GROUP_KILL_PATIENCE,
                };
                true
            }
            GroupKill::Sent { give_up_at, .. } if now >= give_up_at => {
                warn!(
                    "The process group of {} still has processes {:?} after SIGKILL; no longer waiting for them",
                    self.label, GROUP_KILL_PATIENCE
                );
                false
            }
            GroupKill::Sent {
                ref mut look_at, ..
            } => {
                *look_at = now + LOOK_AGAIN;
                true
            }
        }
    }
}

/// The lingering groups.
#[derive(Debug, Default)]
pub(super) struct Groups {
    list: Vec<Lingering>,
}

impl Groups {
    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether group `pgid` is tracked.
    pub(super) fn tracks(&self, pgid: i32) -> bool {
        self.list.iter().any(|g| g.pgid.as_raw() == pgid)
    }

    /// Tracks group `pgid` until it is empty, if it has members; they get
    /// SIGKILL at `kill_at` (at once if that has passed).
    pub(super) fn add(
        &mut self,
        edge: &impl GroupEdge,
        pgid: ChildPid,
        label: String,
        kill_at: Instant,
        now: Instant,
    ) {
        if !edge.has_members(pgid) {
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
        self.list.push(Lingering {
            pgid,
            label,
            kill: GroupKill::At(kill_at),
        });
        if kill_at <= now {
            self.on_due(edge, pgid.pid(), now);
        }
    }

    /// Each group's next deadline: its SIGKILL, or (once sent) another look
    /// or the end of the patience.
    pub(super) fn deadlines(&self) -> impl Iterator<Item = (Instant, Due)> + '_ {
        self.list
            .iter()
            .map(|g| (g.deadline(), Due::Group(g.pgid.pid())))
    }

    /// Group `pgid`'s deadline passed: forgotten if it is empty, else
    /// SIGKILLed, looked at again, or given up on.
    pub(super) fn on_due(&mut self, edge: &impl GroupEdge, pgid: Pid, now: Instant) {
        let Some(i) = self.list.iter().position(|g| g.pgid.pid() == pgid) else {
            return;
        };
        let g = &mut self.list[i];
        if g.deadline() > now {
            return;
        }
        let tracked = if edge.has_members(g.pgid) {
            g.due(edge, now)
        } else {
            debug!("The process group of {} is empty", g.label);
            false
        };
        if !tracked {
            self.list.swap_remove(i);
        }
    }

    /// Forgets the groups that became empty (their last member was reaped,
    /// or exited without being the master's child).
    pub(super) fn forget_empty(&mut self, edge: &impl GroupEdge) {
        self.list.retain(|g| {
            let left = edge.has_members(g.pgid);
            if !left {
                debug!("The process group of {} is empty", g.label);
            }
            left
        });
    }

    /// A stop's deadline: no SIGKILL still to come is later than `limit`.
    pub(super) fn kill_by(&mut self, limit: Instant) {
        for g in &mut self.list {
            if let GroupKill::At(at) = &mut g.kill {
                *at = (*at).min(limit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// Groups that have members, and the SIGKILLs sent, without processes.
    #[derive(Default)]
    struct Fake {
        alive: RefCell<BTreeSet<i32>>,
        killed: RefCell<Vec<i32>>,
    }

    impl Fake {
        fn with(groups: &[i32]) -> Fake {
            let fake = Fake::default();
            fake.alive.borrow_mut().extend(groups);
            fake
        }

        fn empty(&self, group: i32) {
            self.alive.borrow_mut().remove(&group);
        }

        fn killed(&self) -> Vec<i32> {
            self.killed.borrow().clone()
        }
    }

    impl GroupEdge for Fake {
        fn has_members(&self, group: ChildPid) -> bool {
            self.alive.borrow().contains(&group.as_raw())
        }

        fn kill(&self, group: ChildPid) {
            self.killed.borrow_mut().push(group.as_raw());
        }
    }

    fn pgid(n: i32) -> ChildPid {
        ChildPid::new(n).expect("a child pid")
    }

    /// Handles every passed deadline, as the master's loop does.
    fn run_due(groups: &mut Groups, edge: &Fake, now: Instant) {
        let passed: Vec<Due> = groups
            .deadlines()
            .filter(|(at, _)| *at <= now)
            .map(|(_, d)| d)
            .collect();
        for due in passed {
            let Due::Group(p) = due else {
                panic!("not a group's deadline: {due:?}")
            };
            groups.on_due(edge, p, now);
        }
    }

    #[test]
    fn an_empty_group_is_not_tracked() {
        let now = Instant::now();
        let edge = Fake::default();
        let mut groups = Groups::default();
        groups.add(&edge, pgid(10), "worker 10 (slot 0)".into(), now, now);
        assert!(groups.is_empty());
        assert!(edge.killed().is_empty());
    }

    #[test]
    fn a_group_is_killed_at_its_deadline_not_before_and_forgotten_once_empty() {
        let now = Instant::now();
        let grace = Duration::from_secs(30);
        let edge = Fake::with(&[10]);
        let mut groups = Groups::default();
        groups.add(
            &edge,
            pgid(10),
            "worker 10 (slot 0)".into(),
            now + grace,
            now,
        );
        assert_eq!(
            groups.deadlines().collect::<Vec<_>>(),
            vec![(now + grace, Due::Group(Pid::from_raw(10)))]
        );
        run_due(&mut groups, &edge, now + grace / 2);
        assert!(edge.killed().is_empty(), "not before its deadline");
        run_due(&mut groups, &edge, now + grace);
        assert_eq!(edge.killed(), vec![10]);
        // Killed: looked at again soon, since a member that is not the
        // master's child leaves without a SIGCHLD.
        let (at, _) = groups.deadlines().next().expect("still tracked");
        assert_eq!(at, now + grace + LOOK_AGAIN);
        edge.empty(10);
        groups.forget_empty(&edge);
        assert!(groups.is_empty());
        assert_eq!(edge.killed(), vec![10], "killed once");
    }

    #[test]
    fn a_group_that_survives_sigkill_is_looked_at_again_then_given_up() {
        let now = Instant::now();
        let edge = Fake::with(&[20]);
        let mut groups = Groups::default();
        // A deadline already passed (a quick stop, a zygote): killed at once.
        groups.add(&edge, pgid(20), "zygote 20".into(), now, now);
        assert_eq!(edge.killed(), vec![20]);
        let mut t = now;
        for _ in 0..3 {
            t += LOOK_AGAIN;
            run_due(&mut groups, &edge, t);
            let (at, _) = groups.deadlines().next().expect("still waited for");
            assert_eq!(at, t + LOOK_AGAIN);
        }
        run_due(&mut groups, &edge, now + GROUP_KILL_PATIENCE);
        assert!(groups.is_empty(), "no longer waited for");
        assert_eq!(edge.killed(), vec![20], "SIGKILL is not repeated");
    }

    #[test]
    fn a_group_emptied_by_its_deadline_is_forgotten_without_a_signal() {
        let now = Instant::now();
        let edge = Fake::with(&[30]);
        let mut groups = Groups::default();
        groups.add(
            &edge,
            pgid(30),
            "worker 30 (slot 1)".into(),
            now + LOOK_AGAIN,
            now,
        );
        edge.empty(30);
        run_due(&mut groups, &edge, now + LOOK_AGAIN);
        assert!(groups.is_empty());
        assert!(
            edge.killed().is_empty(),
            "an empty group is never signalled"
        );
    }

    #[test]
    fn a_stop_brings_every_pending_sigkill_forward() {
        let now = Instant::now();
        let edge = Fake::with(&[40, 41]);
        let mut groups = Groups::default();
        let late = now + Duration::from_secs(30);
        groups.add(&edge, pgid(40), "worker 40 (slot 0)".into(), late, now);
        groups.add(
            &edge,
            pgid(41),
            "worker 41 (slot 1)".into(),
            now + LOOK_AGAIN,
            now,
        );
        groups.kill_by(now + Duration::from_secs(2));
        let mut got: Vec<Instant> = groups.deadlines().map(|(at, _)| at).collect();
        got.sort();
        assert_eq!(got, vec![now + LOOK_AGAIN, now + Duration::from_secs(2)]);
        groups.kill_by(now);
        run_due(&mut groups, &edge, now);
        let mut killed = edge.killed();
        killed.sort();
        assert_eq!(killed, vec![40, 41]);
    }
}
