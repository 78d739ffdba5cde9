//! Pure decisions: which workers to start and stop, which deadlines are
//! due, how long a crashing slot waits. No system calls and no clock
//! reads: every function takes the worker table (and `now` where time
//! matters) and returns what should happen, so each rule is unit-tested as
//! a table.
//!
//! The model: the master wants `target` *fresh* workers (of the required
//! generation, not marked for recycling). Workers that are not fresh are
//! *outdated*; each is kept only while it is needed for capacity, i.e. until
//! enough fresh workers are ready. That one rule gives rolling reloads,
//! recycling and scaling down without a separate state machine for each.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::workers::{StopReason, Table, Worker, WorkerState};

/// A death within this long after becoming ready (or before ready) is a
/// failed start: it feeds the slot's backoff and the boot-failure count.
pub const QUICK_DEATH: Duration = Duration::from_secs(1);

/// Consecutive failed boots, before any worker ever stayed up, after which
/// procman gives up with exit 3.
pub const MAX_BOOT_FAILURES: u32 = 5;

/// How long SIGKILL follows SIGABRT for a worker that timed out.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Consecutive samples above --max-worker-memory before a recycle.
pub const MEMORY_SAMPLES: u32 = 3;

/// How long a quick stop lets workers drain.
pub const QUICK_STOP_GRACE: Duration = Duration::from_secs(2);

/// How much a reload lowers the CPU priority of the workers it replaces
/// (added to their nice value). At 10 a booting worker gets about nine
/// times the CPU of an outgoing one (kernel weights 1024 and 110) while
/// both want it; the outgoing ones still serve whenever a CPU is free.
pub const RELOAD_NICE_STEP: i32 = 10;

/// The lowest priority there is: nice 19.
pub const NICEST: i32 = 19;

/// The nice value an outgoing worker at `nice` is lowered to; `None` if it
/// cannot go lower.
pub fn lowered_nice(nice: i32) -> Option<i32> {
    let to = nice.saturating_add(RELOAD_NICE_STEP).min(NICEST);
    (to > nice).then_some(to)
}

/// How much a booting worker's CPU priority is raised above the master's
/// until it is ready (subtracted from its nice value). At 5 a booting
/// worker weighs about three serving ones (kernel weights 3121 and 1024):
/// on a busy machine a replacement's import, CPU-bound, is not one share
/// among every serving worker, so lost capacity comes back sooner.
pub const BOOT_NICE_BOOST: i32 = 5;

/// The highest priority there is: nice -20.
pub const LEAST_NICE: i32 = -20;

/// The nice value a worker booting at `nice` is raised to; `None` if it
/// cannot go higher.
pub fn boosted_nice(nice: i32) -> Option<i32> {
    let to = nice.saturating_sub(BOOT_NICE_BOOST).max(LEAST_NICE);
    (to < nice).then_some(to)
}

/// The kernel's CPU weight of nice 0 to 19 (`sched_prio_to_weight`):
/// each step weighs about 1.25 times less.
const NICE_WEIGHTS: [u32; 20] = [
    1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
];

/// How much nicer than procman's own session each of `workers` workers'
/// autogroups is, so that together they weigh about as one session: the
/// nice value whose weight, `workers` times, is nearest nice 0's (4 workers:
/// 6, 4 x 272 = 1088 against 1024). Each worker leads a session, so an
/// autogroup, of its own; without this, N workers would take N shares
/// of the CPU against every other session where autogroups decide.
pub fn autogroup_share(workers: usize) -> i32 {
    let n = workers.max(1) as u64;
    let miss = |w: &u32| (u64::from(*w) * n).abs_diff(u64::from(NICE_WEIGHTS[0]));
    (0..NICE_WEIGHTS.len())
        .min_by_key(|&i| miss(&NICE_WEIGHTS[i]))
        .unwrap_or(0) as i32
}

/// The workers a reload to `generation` should lower: active, older, and
/// not lowered already (a reload superseding another lowers only the
/// workers the first one did not).
pub fn to_lower(table: &Table, generation: u64) -> Vec<Pid> {
    table
        .iter()
        .filter(|w| w.generation < generation)
        .filter(|w| w.active().is_some_and(|a| a.lowered_from.is_none()))
        .map(|w| w.pid)
        .collect()
}

/// After a failed reload, the workers that keep serving (of `generation`
/// or older) and whose priority it lowered, with their nice value before.
pub fn to_restore(table: &Table, generation: u64) -> Vec<(Pid, i32)> {
    table
        .iter()
        .filter(|w| w.generation <= generation)
        .filter_map(|w| Some((w.pid, w.active()?.lowered_from?)))
        .collect()
}

/// Backoff state of one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    /// Consecutive failed starts in this slot.
    pub failures: u32,
    /// No spawn into this slot before then.
    pub next_spawn_at: Option<Instant>,
}

/// The wait before respawning after the n-th consecutive failed start:
/// at once the first time, then 1 s growing ×1.5 up to 30 s.
pub fn backoff_delay(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let secs = 1.5f64.powi(failures.saturating_sub(2).min(64) as i32);
    Duration::from_secs_f64(secs.min(30.0))
}

/// Whether a worker that died after being ready for `ready_for` (None:
/// never ready) failed to start.
pub fn is_failed_start(ready_for: Option<Duration>) -> bool {
    ready_for.is_none_or(|d| d < QUICK_DEATH)
}

/// Updates a slot's backoff after a death and returns it.
pub fn after_death(prev: Backoff, failed_start: bool, now: Instant) -> Backoff {
    let failures = if failed_start { prev.failures + 1 } else { 0 };
    let delay = backoff_delay(failures);
    Backoff {
        failures,
        next_spawn_at: (!delay.is_zero()).then(|| now + delay),
    }
}

/// What the master wants: how many fresh workers, of which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Goal {
    /// Number of workers.
    pub target: usize,
    /// Workers older than this are outdated.
    pub required_generation: u64,
    /// At most this many fresh workers starting at once (the CPUs procman
    /// may use): with more, N boots would share the CPUs and every worker
    /// would be ready only after all of them, instead of the first ones
    /// after one boot.
    pub max_booting: usize,
}

/// A change to the set of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a worker in this slot.
    Spawn { slot: usize },
    /// Ask a worker to stop gracefully.
    Stop { pid: Pid, reason: StopReason },
}

// The deadline vocabulary lives with the table (workers.rs), the lower
// layer, whose rows compute their own deadlines; re-exported here, where
// the loop meets it.
pub use crate::workers::Due;

/// The passed deadlines (in the order given) and the earliest one still
/// ahead.
pub fn split_due(deadlines: &[(Instant, Due)], now: Instant) -> (Vec<Due>, Option<Instant>) {
    let passed = deadlines
        .iter()
        .filter(|(at, _)| *at <= now)
        .map(|(_, d)| *d)
        .collect();
    let ahead = deadlines
        .iter()
        .map(|(at, _)| *at)
        .filter(|at| *at > now)
        .min();
    (passed, ahead)
}

/// Every worker's deadline.
pub fn worker_deadlines(table: &Table, timeout: Option<Duration>) -> Vec<(Instant, Due)> {
    table.iter().filter_map(|w| w.deadline(timeout)).collect()
}

/// When each backed-off slot may be filled again.
pub fn backoff_deadlines(backoff: &BTreeMap<usize, Backoff>) -> Vec<(Instant, Due)> {
    backoff
        .iter()
        .filter_map(|(slot, b)| Some((b.next_spawn_at?, Due::BackoffOver(*slot))))
        .collect()
}

/// Fresh: active, of the required generation, not marked for recycling
/// and not leaving on its own (STOPPING=1). Exactly that generation: after
/// a failed reload, workers of the newer one are outdated too, replaced by
/// the previous generation like a reload in reverse.
pub fn is_fresh(w: &Worker, goal: &Goal) -> bool {
    w.generation == goal.required_generation
        && w.active()
            .is_some_and(|a| a.recycle.is_none() && !a.draining)
}

/// Compares the set of workers with the goal. A backed-off slot is not
/// filled while its backoff is pending: the one place its end is computed
/// is [`backoff_deadlines`], whose `Due::BackoffOver` clears it.
pub fn reconcile(table: &Table, goal: &Goal, backoff: &BTreeMap<usize, Backoff>) -> Vec<Decision> {
    let mut decisions = Vec::new();

    let mut fresh: Vec<&Worker> = table.iter().filter(|w| is_fresh(w, goal)).collect();
    fresh.sort_by_key(|w| w.started_at);

    // Too few: fill the lowest free slots, unless a slot is backing off,
    // and no more at once than may boot together (the rest are started
    // as the booting ones become ready or die).
    let booting = fresh.iter().filter(|w| w.is_starting()).count();
    let mut may_boot = goal.max_booting.max(1).saturating_sub(booting);
    let mut used: BTreeSet<usize> = fresh.iter().map(|w| w.slot).collect();
    let mut missing = goal.target.saturating_sub(fresh.len());
    let mut slot = 0;
    while missing > 0 && may_boot > 0 {
        if used.insert(slot) {
            missing -= 1;
            if backoff.get(&slot).is_none_or(|b| b.next_spawn_at.is_none()) {
                may_boot -= 1;
                decisions.push(Decision::Spawn { slot });
            }
        }
        slot += 1;
    }

    // Too many (TTOU): the oldest go first.
    let excess = fresh.len().saturating_sub(goal.target);
    for w in fresh.iter().take(excess) {
        decisions.push(Decision::Stop {
            pid: w.pid,
            reason: StopReason::Excess,
        });
    }

    // Outdated workers stay only while needed for capacity.
    let fresh_ready = fresh.iter().skip(excess).filter(|w| w.is_ready()).count();
    let mut outdated: Vec<&Worker> = table
        .iter()
        .filter(|w| w.is_active() && !is_fresh(w, goal))
        .collect();
    outdated.sort_by_key(|w| w.started_at);
    let keep = goal.target.saturating_sub(fresh_ready);
    let ready_outdated = outdated.iter().filter(|w| w.is_ready()).count();
    let mut to_retire = ready_outdated.saturating_sub(keep);
    for w in outdated {
        let retire = match w.state {
            // A starting outdated worker adds no capacity.
            WorkerState::Starting { .. } => true,
            _ if to_retire > 0 => {
                to_retire -= 1;
                true
            }
            _ => false,
        };
        if retire {
            decisions.push(Decision::Stop {
                pid: w.pid,
                reason: StopReason::Replaced,
            });
        }
    }
    decisions
}

/// The slots that have, or will have once the goal is met, a fresh
/// worker: those of the fresh workers and the lowest free ones
/// [`reconcile`] fills. With `--reuse-port` the master keeps the listening
/// socket of these slots only: a slot that TTOU or a smaller reload left
/// empty gets no worker to accept from its socket.
pub fn wanted_slots(table: &Table, goal: &Goal) -> BTreeSet<usize> {
    let mut wanted: BTreeSet<usize> = table
        .iter()
        .filter(|w| is_fresh(w, goal))
        .map(|w| w.slot)
        .collect();
    let mut missing = goal.target.saturating_sub(wanted.len());
    let mut slot = 0;
    while missing > 0 {
        if wanted.insert(slot) {
            missing -= 1;
        }
        slot += 1;
    }
    wanted
}

/// Heartbeats a worker is assumed to send per `--timeout`: the uvicorn
/// bootstrap sends 3 (a lost one still leaves one in time); systemd's
/// advice for `WATCHDOG_USEC` is every half, i.e. 2. A worker that sends
/// more shows as a crowded queue ([`crowded`]).
pub const BEATS_PER_TIMEOUT: u32 = 3;

/// How the master reads the notify socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// In the poll set: each datagram is read as it arrives.
    Poll,
    /// Out of the poll set: read at every wake-up for any reason, and at
    /// the latest this long after the previous read.
    Drain(Duration),
}

/// How many datagrams an idle master lets pile up between two reads: half
/// the queue. The other half is for what is not a heartbeat (STATUS=, a
/// recycle request) and for a read that comes late on a loaded machine.
pub fn notify_budget(queue_limit: usize) -> usize {
    queue_limit / 2
}

/// How often an idle master must read the notify socket so that its queue
/// (`queue_limit` datagrams, `net.unix.max_dgram_qlen`) never fills with
/// the heartbeats of `workers` workers (`timeout`: `--timeout`); `None`
/// when it must read each datagram as it comes.
///
/// A worker beats every `timeout / BEATS_PER_TIMEOUT` (an interval) or
/// less often, so in a period of k intervals it sends at most k
/// heartbeats, and `workers * k` must stay within [`notify_budget`]. k is
/// at most 2: a healthy worker's last heartbeat read is at most one
/// interval old, so its own heartbeat deadline (a read too) comes about 2
/// intervals after a read, and a longer period would save nothing. Too
/// many workers for even k = 1 (more than 5 with the kernel's default of
/// 10; 256 with systemd's 512): poll. No `--timeout`: no heartbeats, so
/// nothing to save, poll.
pub fn drain_period(
    workers: usize,
    timeout: Option<Duration>,
    queue_limit: usize,
) -> Option<Duration> {
    let interval = timeout? / BEATS_PER_TIMEOUT;
    let k = (notify_budget(queue_limit) / workers.max(1)).min(2);
    (k > 0 && !interval.is_zero()).then(|| interval * k as u32)
}

/// Whether a notification may need an answer at once, so that each is read
/// as it arrives: while a worker starts (READY=1 ends its boot,
/// EXTEND_TIMEOUT_USEC moves its startup deadline) or stops
/// (EXTEND_TIMEOUT_USEC moves its SIGKILL), and while a reload goes on.
/// Ready workers send heartbeats, which carry their send time, and
/// messages a delay of one period does not harm (master/messages.rs).
pub fn notify_urgent(table: &Table, reloading: bool) -> bool {
    reloading || table.iter().any(|w| !w.is_ready())
}

/// The most notify datagrams the master reads in one batch (one pass of
/// its loop reads one batch, and one more before each reap and spawn).
/// Then it goes back to signals, reaping and the endpoints, and comes back
/// at once (the socket is polled while anything is left).
pub const NOTIFY_BATCH_DATAGRAMS: usize = 64;

/// The most payload bytes the master reads in one batch: 4 datagrams of
/// the largest size (a traceback), thousands of ordinary ones.
pub const NOTIFY_BATCH_BYTES: usize = 256 * 1024;

/// How often at most the master warns that it dropped notifications (what
/// was dropped meanwhile is counted, and said in the next warning).
pub const NOTIFY_DROP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Whether a batch that read `datagrams` datagrams and `bytes` bytes is
/// full: the rest waits for the next one.
pub fn notify_batch_full(datagrams: usize, bytes: usize) -> bool {
    datagrams >= NOTIFY_BATCH_DATAGRAMS || bytes >= NOTIFY_BATCH_BYTES
}

/// Whether a read after a period without polling found the queue fuller
/// than [`drain_period`] allows: the workers notify faster than assumed
/// (a command worker beating more often than 3 times a timeout).
pub fn crowded(received: usize, queue_limit: usize) -> bool {
    received > notify_budget(queue_limit)
}

/// The pace of the notify socket now: [`Pace::Poll`] when a notification
/// may need an answer at once ([`notify_urgent`]), when no worker sends
/// heartbeats (workers that do not speak sd_notify: no wake-up to save,
/// and a master with nothing due keeps sleeping without a timeout), when
/// the workers are too many for the queue ([`drain_period`]), or once the
/// queue was found crowded; otherwise drained every period.
pub fn notify_pace(
    table: &Table,
    reloading: bool,
    timeout: Option<Duration>,
    queue_limit: usize,
    was_crowded: bool,
) -> Pace {
    let beating = table.iter().any(|w| w.last_heartbeat.is_some());
    if was_crowded || !beating || notify_urgent(table, reloading) {
        return Pace::Poll;
    }
    drain_period(table.len(), timeout, queue_limit).map_or(Pace::Poll, Pace::Drain)
}

/// Whether the loop woke so late that the master must have been stopped
/// (SIGSTOP, a frozen VM): then deadlines measured meanwhile are not the
/// workers' fault.
pub fn was_suspended(expected: Option<Instant>, woke: Instant) -> Option<Duration> {
    let late = woke.saturating_duration_since(expected?);
    (late > Duration::from_secs(1)).then_some(late)
}

#[cfg(test)]
mod tests;
