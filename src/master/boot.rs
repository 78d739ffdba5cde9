//! Boot accounting: each slot's backoff after deaths, whether procman has
//! ever been up (a worker stayed ready for [`policy::QUICK_DEATH`]), and
//! the count of failed boots before that, which ends procman at
//! [`policy::MAX_BOOT_FAILURES`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::policy::{self, Backoff, Due};
use crate::workers::Table;

/// The boot state of the worker slots.
#[derive(Debug, Default)]
pub(super) struct Boot {
    backoff: BTreeMap<usize, Backoff>,
    ever_up: bool,
    failures: u32,
}

impl Boot {
    /// What an upgraded image keeps (`upgrade`): the slots' backoff starts over.
    pub(super) fn restore(ever_up: bool, failures: u32) -> Boot {
        Boot {
            backoff: BTreeMap::new(),
            ever_up,
            failures,
        }
    }

    /// Failed boots counted so far.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a worker ever stayed up: from then on a failed boot is
    /// retried with backoff, never fatal.
    pub(super) fn ever_up(&self) -> bool {
        self.ever_up
    }

    /// Each slot's backoff, for the policy.
    pub(super) fn backoff(&self) -> &BTreeMap<usize, Backoff> {
        &self.backoff
    }

    /// A worker stayed up: procman has been up, the count starts over.
    pub(super) fn stayed_up(&mut self) {
        self.ever_up = true;
        self.failures = 0;
    }

    /// A worker of `slot` died after being ready for `ready_for` (`None`:
    /// never ready). Returns the slot's backoff.
    pub(super) fn death(
        &mut self,
        slot: usize,
        ready_for: Option<Duration>,
        now: Instant,
    ) -> Backoff {
        // The same rule as the `StayedUp` deadline, for a worker reaped
        // before that deadline was handled.
        let failed_start = policy::is_failed_start(ready_for);
        if !failed_start {
            self.ever_up = true;
        }
        self.back_off(slot, failed_start, now)
    }

    /// A spawn into `slot` failed before there was a process (fork, a
    /// socket): the slot backs off like after a failed start.
    pub(super) fn spawn_failed(&mut self, slot: usize, now: Instant) {
        self.back_off(slot, true, now);
    }

    /// One more failed boot before procman was ever up; returns the count.
    pub(super) fn count_failure(&mut self) -> u32 {
        self.failures += 1;
        self.failures
    }

    /// When each backed-off slot may be filled again, and, until procman
    /// has been up, when each ready worker of `table` will have stayed up
    /// (learnt then, so that a later failure is judged correctly).
    pub(super) fn deadlines(&self, table: &Table) -> Vec<(Instant, Due)> {
        let mut out = policy::backoff_deadlines(&self.backoff);
        if !self.ever_up {
            out.extend(
                table.iter().filter(|w| w.is_active()).filter_map(|w| {
                    Some((w.ready_at? + policy::QUICK_DEATH, Due::StayedUp(w.pid)))
                }),
            );
        }
        out
    }

    pub(super) fn backoff_over(&mut self, slot: usize) {
        if let Some(b) = self.backoff.get_mut(&slot) {
            b.next_spawn_at = None;
        }
    }

    fn back_off(&mut self, slot: usize, failed_start: bool, now: Instant) -> Backoff {
        let prev = self.backoff.get(&slot).copied().unwrap_or_default();
        let next = policy::after_death(prev, failed_start, now);
        self.backoff.insert(slot, next);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_deaths_back_a_slot_off_and_a_worker_that_stayed_up_resets_it() {
        let now = Instant::now();
        let mut boot = Boot::default();
        assert_eq!(
            boot.death(0, None, now).next_spawn_at,
            None,
            "first: at once"
        );
        let b = boot.death(0, Some(Duration::from_millis(10)), now);
        assert_eq!(b.next_spawn_at, Some(now + Duration::from_secs(1)));
        assert!(!boot.ever_up());
        assert_eq!(
            boot.deadlines(&Table::default()),
            vec![(now + Duration::from_secs(1), Due::BackoffOver(0))]
        );
        boot.backoff_over(0);
        assert!(
            boot.deadlines(&Table::default()).is_empty(),
            "handled: no longer pending"
        );
        // Other slots are not affected.
        assert_eq!(boot.backoff().get(&1), None);
        // A worker that served long enough: up, and its slot starts over.
        let b = boot.death(0, Some(policy::QUICK_DEATH), now);
        assert_eq!(b, Backoff::default());
        assert!(boot.ever_up());
    }

    #[test]
    fn failed_boots_are_counted_until_a_worker_stays_up() {
        let now = Instant::now();
        let mut boot = Boot::default();
        assert_eq!(boot.count_failure(), 1);
        assert_eq!(boot.count_failure(), 2);
        boot.spawn_failed(3, now);
        boot.spawn_failed(3, now);
        assert!(
            boot.backoff()[&3].next_spawn_at.is_some(),
            "a failed fork backs off"
        );
        boot.stayed_up();
        assert!(boot.ever_up());
        assert_eq!(boot.count_failure(), 1, "the count started over");
    }

    #[test]
    fn a_ready_worker_is_due_to_have_stayed_up_until_procman_was_up() {
        use crate::workers::Worker;
        use nix::unistd::Pid;
        let now = Instant::now();
        let mut boot = Boot::default();
        let mut table = Table::default();
        let pid = Pid::from_raw(7);
        table.insert(Worker::new(pid, 0, 1, now, Duration::from_secs(60)));
        assert!(boot.deadlines(&table).is_empty(), "not ready: nothing due");
        if let Some(w) = table.get_mut(pid) {
            w.become_ready(now);
        }
        assert_eq!(
            boot.deadlines(&table),
            vec![(now + policy::QUICK_DEATH, Due::StayedUp(pid))]
        );
        boot.stayed_up();
        assert!(boot.deadlines(&table).is_empty(), "up: no longer asked");
    }
}
