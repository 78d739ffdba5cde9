//! Recycling: which workers are due (lifetime, memory, or their own
//! request over the notify socket), queued and replaced one at a time so
//! capacity never drops. [`Recycling`] owns the queue, the memory sampling
//! schedule and the lifetime jitter, and marks the workers of the table it
//! is given; the memory readings come from the caller.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::policy::{self, Due};
use crate::workers::{Table, WorkerState};

/// The recycling queue and schedule.
pub(super) struct Recycling {
    /// Workers to recycle, in order, with the reason.
    queue: VecDeque<(Pid, String)>,
    /// The next --max-worker-memory sample.
    next_sample: Option<Instant>,
    random: Random,
}

impl Recycling {
    pub(super) fn new() -> Recycling {
        Recycling {
            queue: VecDeque::new(),
            next_sample: None,
            random: Random::seeded(),
        }
    }

    /// Queues `pid` (unless it is queued already); returns whether it was.
    pub(super) fn ask(&mut self, pid: Pid, why: String) -> bool {
        if self.queue.iter().any(|(p, _)| *p == pid) {
            return false;
        }
        self.queue.push_back((pid, why));
        true
    }

    pub(super) fn is_queued(&self, pid: Pid) -> bool {
        self.queue.iter().any(|(p, _)| *p == pid)
    }

    fn next(&mut self) -> Option<(Pid, String)> {
        self.queue.pop_front()
    }

    /// A worker's lifetime: `life` plus up to `jitter`, so that workers
    /// started together are not all recycled together.
    pub(super) fn lifetime(&mut self, life: Duration, jitter: Duration) -> Duration {
        life + jitter.mul_f64(self.random.unit())
    }

    /// Samples memory every `interval` from `now` on, or no longer
    /// (`None`); an already scheduled sample stays.
    pub(super) fn sample_every(&mut self, interval: Option<Duration>, now: Instant) {
        match interval {
            None => self.next_sample = None,
            Some(i) if self.next_sample.is_none() => self.next_sample = Some(now + i),
            Some(_) => {}
        }
    }

    fn deadline(&self) -> Option<(Instant, Due)> {
        self.next_sample.map(|at| (at, Due::SampleMemory))
    }
}

impl Recycling {
    /// Recycling's deadlines: each worker's lifetime, the next memory
    /// sample.
    pub(super) fn deadlines(&self, table: &Table) -> Vec<(Instant, Due)> {
        let lifetimes = table
            .iter()
            .filter_map(|w| Some((w.active()?.retire_at?, Due::Retire(w.pid))));
        lifetimes.chain(self.deadline()).collect()
    }

    /// At most one recycle at a time: marks the next queued worker of
    /// `table` only when no marked worker is still serving.
    pub(super) fn start_next(&mut self, table: &mut Table) {
        let busy = table
            .iter()
            .any(|w| w.active().is_some_and(|a| a.recycle.is_some()));
        if busy {
            return;
        }
        while let Some((pid, why)) = self.next() {
            let Some(w) = table.get_mut(pid).filter(|w| w.is_active()) else {
                continue;
            };
            worker_event!(
                info,
                "recycling",
                reason = crate::status::ExitReason::of_recycle(&why).as_str(),
                w,
                "Recycling worker {pid} (slot {}): {why}",
                w.slot
            );
            if let Some(a) = w.active_mut() {
                a.recycle = Some(why);
            }
            return;
        }
    }

    /// Worker `pid` reached its lifetime: it is queued for recycling (one
    /// at a time, by the queue).
    pub(super) fn retire(&mut self, table: &mut Table, pid: Pid, now: Instant) {
        let Some(w) = table.get_mut(pid) else {
            return;
        };
        let age = now.saturating_duration_since(w.started_at).as_secs_f64();
        if w.active_mut().is_some_and(|a| a.retire_at.take().is_some()) {
            self.ask(pid, format!("lifetime reached ({age:.0}s old)"));
        }
    }

    /// The sample is due (every --memory-check-interval): a ready worker
    /// whose process group stays above `limit` (--max-worker-memory) for
    /// [`policy::MEMORY_SAMPLES`] samples in a row is queued; a short spike
    /// is forgiven. `read` gives each group's resident memory; it is not
    /// called once a reload turned the limit off.
    pub(super) fn sample_memory(
        &mut self,
        table: &mut Table,
        limit: Option<u64>,
        interval: Duration,
        read: impl FnOnce() -> HashMap<i32, u64>,
        now: Instant,
    ) {
        self.next_sample = None;
        let Some(limit) = limit else {
            return; // a reload turned it off
        };
        self.sample_every(Some(interval), now);
        let rss = read();
        for w in table.iter_mut() {
            let (pid, slot) = (w.pid, w.slot);
            let WorkerState::Ready(a) = &mut w.state else {
                continue;
            };
            let used = rss.get(&pid.as_raw()).copied().unwrap_or(0);
            if used <= limit {
                a.samples_over_memory = 0;
                continue;
            }
            a.samples_over_memory += 1;
            debug!(
                "Worker {pid} uses {} (sample {} above the limit)",
                mib(used),
                a.samples_over_memory
            );
            if a.samples_over_memory == policy::MEMORY_SAMPLES {
                warn!(
                    "Worker {pid} (slot {slot}) uses {}, above --max-worker-memory {} for {} samples; recycling",
                    mib(used),
                    mib(limit),
                    policy::MEMORY_SAMPLES
                );
                if a.recycle.is_none() {
                    self.ask(pid, format!("memory {} above {}", mib(used), mib(limit)));
                }
            }
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A small xorshift generator for recycling jitter: no need for a crate,
/// nor for cryptographic quality, only for workers not to agree.
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Random(t ^ ((std::process::id() as u64) << 32) | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_queued_once_and_memory_is_sampled_on_schedule() {
        let now = Instant::now();
        let mut r = Recycling::new();
        let pid = Pid::from_raw(9);
        assert!(r.ask(pid, "lifetime".into()));
        assert!(!r.ask(pid, "memory".into()), "already queued");
        assert!(r.is_queued(pid));
        assert_eq!(r.next(), Some((pid, "lifetime".to_string())));
        assert!(!r.is_queued(pid));
        assert_eq!(r.deadline(), None);
        let every = Duration::from_secs(5);
        r.sample_every(Some(every), now);
        r.sample_every(Some(every), now + every / 2);
        assert_eq!(r.deadline(), Some((now + every, Due::SampleMemory)), "kept");
        r.sample_every(None, now);
        assert_eq!(r.deadline(), None, "turned off");
    }

    #[test]
    fn lifetimes_are_jittered_within_their_bound() {
        let mut r = Recycling::new();
        let (life, jitter) = (Duration::from_secs(60), Duration::from_secs(10));
        let got: Vec<Duration> = (0..50).map(|_| r.lifetime(life, jitter)).collect();
        assert!(got.iter().all(|d| *d >= life && *d < life + jitter));
        assert!(got.windows(2).any(|w| w[0] != w[1]), "not all the same");
        assert_eq!(r.lifetime(life, Duration::ZERO), life);
    }

    fn ready_worker(table: &mut Table, pid: i32, slot: usize, now: Instant) -> Pid {
        let pid = Pid::from_raw(pid);
        let mut w = crate::workers::Worker::new(pid, slot, 1, now, Duration::from_secs(60));
        w.become_ready(now);
        table.insert(w);
        pid
    }

    fn marked(table: &Table) -> Vec<(Pid, String)> {
        table
            .iter()
            .filter_map(|w| Some((w.pid, w.active()?.recycle.clone()?)))
            .collect()
    }

    #[test]
    fn memory_above_the_limit_for_three_samples_in_a_row_recycles_a_spike_does_not() {
        let now = Instant::now();
        let every = Duration::from_secs(5);
        let mut r = Recycling::new();
        let mut table = Table::default();
        let big = ready_worker(&mut table, 10, 0, now);
        let spiky = ready_worker(&mut table, 11, 1, now);
        let mib = 1024 * 1024;
        let limit = Some(100 * mib);
        let readings = [
            [(10, 200 * mib), (11, 200 * mib)],
            [(10, 200 * mib), (11, 50 * mib)],
            [(10, 200 * mib), (11, 200 * mib)],
        ];
        for (i, reading) in readings.iter().enumerate() {
            let at = now + every * i as u32;
            r.sample_memory(
                &mut table,
                limit,
                every,
                || reading.iter().copied().collect(),
                at,
            );
            assert_eq!(
                r.deadline(),
                Some((at + every, Due::SampleMemory)),
                "rescheduled"
            );
        }
        assert!(r.is_queued(big), "three samples in a row");
        assert!(!r.is_queued(spiky), "the spike was forgiven");
        // Turned off by a reload: no reading, no next sample.
        r.sample_memory(&mut table, None, every, || panic!("read"), now);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn one_worker_is_recycled_at_a_time_and_a_lifetime_is_a_deadline() {
        let now = Instant::now();
        let mut r = Recycling::new();
        let mut table = Table::default();
        let a = ready_worker(&mut table, 20, 0, now);
        let b = ready_worker(&mut table, 21, 1, now);
        let life = now + Duration::from_secs(60);
        if let Some(w) = table.get_mut(a).and_then(|w| w.active_mut()) {
            w.retire_at = Some(life);
        }
        assert_eq!(r.deadlines(&table), vec![(life, Due::Retire(a))]);
        r.retire(&mut table, a, life);
        assert!(r.deadlines(&table).is_empty(), "handled: no longer pending");
        r.ask(b, "asked".into());
        r.start_next(&mut table);
        assert_eq!(
            marked(&table),
            vec![(a, "lifetime reached (60s old)".to_string())]
        );
        r.start_next(&mut table);
        assert_eq!(marked(&table).len(), 1, "one at a time");
        table.remove(a);
        r.start_next(&mut table);
        assert_eq!(marked(&table), vec![(b, "asked".to_string())]);
    }
}
