//! The zygotes the master owns (`--preload`'s, or the base zygote): the current generation's
//! and older ones until their workers are gone, the backoff of restarts,
//! and the fall-back to cold starts after repeated failures. Their
//! deadlines are listed here; what the master does with their messages and
//! exits is in preload.rs.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::policy::{self, Backoff, Due};
use crate::zygote::{FromZygote, Zygote, ZygoteState};

/// After this many zygote failures in a row, workers start cold.
const FAILURES_BEFORE_COLD: u32 = 3;

/// The master's zygotes.
#[derive(Debug, Default)]
pub(super) struct Zygotes {
    list: Vec<Zygote>,
    backoff: Backoff,
    cold: bool,
}

impl Zygotes {
    /// Whether workers start cold after repeated zygote failures.
    pub(super) fn cold(&self) -> bool {
        self.cold
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(super) fn add(&mut self, z: Zygote) {
        self.list.push(z);
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Zygote> {
        self.list.iter()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Zygote> {
        self.list.iter_mut()
    }

    pub(super) fn get_mut(&mut self, pid: Pid) -> Option<&mut Zygote> {
        self.list.iter_mut().find(|z| z.pid == pid)
    }

    /// Takes a reaped zygote out.
    pub(super) fn remove(&mut self, pid: Pid) -> Option<Zygote> {
        let i = self.list.iter().position(|z| z.pid == pid)?;
        Some(self.list.swap_remove(i))
    }

    /// The zygote of `generation` that takes spawn requests, if any.
    pub(super) fn ready(&mut self, generation: u64) -> Option<&mut Zygote> {
        self.list
            .iter_mut()
            .find(|z| z.generation == generation && z.state == ZygoteState::Ready && !z.closed)
    }

    /// Whether a zygote of `generation` is starting or ready.
    pub(super) fn has(&self, generation: u64) -> bool {
        self.list
            .iter()
            .any(|z| z.generation == generation && z.state != ZygoteState::Stopping)
    }

    /// Whether a new zygote may start (its restart backoff is over).
    pub(super) fn may_start(&self, now: Instant) -> bool {
        self.backoff.next_spawn_at.is_none_or(|t| t <= now)
    }

    /// The channels still open, to poll.
    pub(super) fn channels(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.list.iter().filter(|z| !z.closed).map(|z| z.fd())
    }

    /// Every message waiting on an open channel.
    pub(super) fn drain(&self) -> Vec<(Pid, FromZygote)> {
        self.list
            .iter()
            .filter(|z| !z.closed)
            .flat_map(|z| z.drain().into_iter().map(move |m| (z.pid, m)))
            .collect()
    }

    /// Pending deadlines: a starting zygote must be ready within
    /// `startup_timeout`, a spawn request must be answered in time, and a
    /// restart waits for its backoff.
    pub(super) fn deadlines(&self, startup_timeout: Duration) -> Vec<(Instant, Due)> {
        let starting = self
            .list
            .iter()
            .filter(|z| z.state == ZygoteState::Starting)
            .map(|z| {
                (
                    z.started_at + startup_timeout,
                    Due::ZygoteStartTimeout(z.pid),
                )
            });
        let pending = self.list.iter().filter_map(|z| {
            let p = z.pending.as_ref()?;
            Some((p.deadline(), Due::ZygoteSpawnTimeout(z.pid)))
        });
        let restart = self
            .backoff
            .next_spawn_at
            .map(|at| (at, Due::ZygoteBackoffOver));
        starting.chain(pending).chain(restart).collect()
    }

    /// Gives zygotes a new chance (a new generation of the base zygote):
    /// no backoff, no cold starts.
    pub(super) fn warm_again(&mut self) {
        self.backoff = Backoff::default();
        self.cold = false;
    }

    /// Workers start cold from now on (a base zygote that could not
    /// start); true if they did not already.
    pub(super) fn go_cold(&mut self) -> bool {
        !std::mem::replace(&mut self.cold, true)
    }

    /// The restart backoff is over.
    pub(super) fn backoff_over(&mut self) {
        self.backoff.next_spawn_at = None;
    }

    /// A zygote forked a worker: restarts start over.
    pub(super) fn worked(&mut self) {
        self.backoff = Backoff::default();
    }

    /// A zygote failed: restarts back off. Returns the count when this
    /// failure makes workers start cold.
    pub(super) fn failed(&mut self, now: Instant) -> Option<u32> {
        self.backoff = policy::after_death(self.backoff, true, now);
        if self.backoff.failures >= FAILURES_BEFORE_COLD && !self.cold {
            self.cold = true;
            return Some(self.backoff.failures);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_in_a_row_mean_cold_starts_and_restarts_back_off() {
        let now = Instant::now();
        let mut z = Zygotes::default();
        assert_eq!(z.failed(now), None);
        assert!(z.may_start(now), "the first restart is at once");
        assert_eq!(z.failed(now), None);
        assert!(!z.may_start(now), "the second waits");
        let at = now + Duration::from_secs(1);
        assert_eq!(
            z.deadlines(Duration::from_secs(60)),
            vec![(at, Due::ZygoteBackoffOver)]
        );
        z.backoff_over();
        assert!(z.may_start(now));
        assert!(z.deadlines(Duration::from_secs(60)).is_empty());
        assert_eq!(z.failed(now), Some(3));
        assert!(z.cold());
        assert_eq!(z.failed(now), None, "said once");
    }

    #[test]
    fn a_zygote_that_forks_a_worker_resets_the_backoff() {
        let now = Instant::now();
        let mut z = Zygotes::default();
        z.failed(now);
        z.failed(now);
        z.worked();
        assert!(z.may_start(now));
        assert_eq!(z.failed(now), None);
        assert_eq!(z.failed(now), None);
        assert!(!z.cold(), "the count started over");
    }
}
