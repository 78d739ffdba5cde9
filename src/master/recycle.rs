//! Recycling in the master: which workers are due (lifetime, memory, or
//! their own request over the notify socket), queued and replaced one at a
//! time so capacity never drops.

use std::time::Instant;

use nix::unistd::Pid;

use tracing::{debug, info, warn};

use super::Master;
use crate::policy;
use crate::procfs;
use crate::workers::WorkerState;

impl Master {
    /// At most one recycle at a time: mark the next worker only when no
    /// marked worker is still serving.
    pub(super) fn start_next_recycle(&mut self) {
        let busy = self
            .table
            .iter()
            .any(|w| w.active().is_some_and(|a| a.recycle.is_some()));
        if busy {
            return;
        }
        while let Some((pid, why)) = self.recycle_queue.pop_front() {
            let Some(w) = self.table.get_mut(pid) else {
                continue;
            };
            let slot = w.slot;
            if let Some(a) = w.active_mut() {
                info!(
                    worker = pid.as_raw(),
                    slot, "Recycling worker {pid} (slot {slot}): {why}"
                );
                a.recycle = Some(why);
                return;
            }
        }
    }

    /// A worker reached its lifetime: it is queued for recycling (one at
    /// a time, by the queue).
    pub(super) fn retire(&mut self, pid: Pid, now: Instant) {
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        let age = now.saturating_duration_since(w.started_at).as_secs_f64();
        if w.active_mut().is_some_and(|a| a.retire_at.take().is_some()) {
            self.recycle_queue
                .push_back((pid, format!("lifetime reached ({age:.0}s old)")));
        }
    }

    /// Every --memory-check-interval (when it is due): a worker whose process group stays
    /// above --max-worker-memory for 3 samples in a row is recycled; a
    /// short spike is forgiven.
    pub(super) fn sample_memory(&mut self, now: Instant) {
        let Some(limit) = self.settings.cfg.max_worker_memory else {
            // A reload turned it off.
            self.next_memory_sample = None;
            return;
        };
        self.next_memory_sample = Some(now + self.settings.cfg.memory_check_interval);
        let rss = procfs::rss_by_group();
        for w in self.table.iter_mut() {
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
                    self.recycle_queue
                        .push_back((pid, format!("memory {} above {}", mib(used), mib(limit))));
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
pub(super) struct Random(u64);

impl Random {
    pub(super) fn seeded() -> Random {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Random(t ^ ((std::process::id() as u64) << 32) | 1)
    }

    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
