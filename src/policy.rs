//! Pure decisions: which workers to start and stop, which deadlines are
//! due, how long a crashing slot waits. No system calls and no clock
//! reads: every function takes `now` and the worker table and returns what
//! should happen, so each rule is unit-tested as a table.
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

/// How long the master waits for the members of a lingering process group
/// to disappear after their SIGKILL before it stops waiting (a process in
/// uninterruptible sleep, a zombie whose parent never reaps it).
pub const GROUP_KILL_PATIENCE: Duration = Duration::from_secs(10);

/// How long a quick stop lets workers drain.
pub const QUICK_STOP_GRACE: Duration = Duration::from_secs(2);

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
/// filled before its time ([`backoff_deadlines`] wakes the loop then).
pub fn reconcile(
    table: &Table,
    goal: &Goal,
    backoff: &BTreeMap<usize, Backoff>,
    now: Instant,
) -> Vec<Decision> {
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
            match backoff.get(&slot).and_then(|b| b.next_spawn_at) {
                Some(t) if t > now => {}
                _ => {
                    may_boot -= 1;
                    decisions.push(Decision::Spawn { slot });
                }
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

/// Whether the loop woke so late that the master must have been stopped
/// (SIGSTOP, a frozen VM): then deadlines measured meanwhile are not the
/// workers' fault.
pub fn was_suspended(expected: Option<Instant>, woke: Instant) -> Option<Duration> {
    let late = woke.saturating_duration_since(expected?);
    (late > Duration::from_secs(1)).then_some(late)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::{Active, Stop};

    fn t0() -> Instant {
        Instant::now()
    }

    fn worker(pid: i32, slot: usize, gen: u64, state: Stage, age_ms: u64, now: Instant) -> Worker {
        let started = now - Duration::from_millis(age_ms);
        let mut w = Worker::new(
            Pid::from_raw(pid),
            slot,
            gen,
            started,
            Duration::from_secs(60),
        );
        match state {
            Starting => {}
            Ready => {
                w.become_ready(started);
            }
            Stopping => {
                w.state = WorkerState::Stopping(Stop {
                    reason: StopReason::Excess,
                    kill_at: None,
                    killed: None,
                })
            }
        }
        w
    }

    /// The stage of a test worker (the data of each comes with it).
    #[derive(Clone, Copy)]
    enum Stage {
        Starting,
        Ready,
        Stopping,
    }

    fn table(rows: Vec<Worker>) -> Table {
        let mut t = Table::default();
        for r in rows {
            t.insert(r);
        }
        t
    }

    fn goal(target: usize, gen: u64) -> Goal {
        Goal {
            target,
            required_generation: gen,
            max_booting: usize::MAX,
        }
    }

    use Stage::{Ready, Starting, Stopping};

    fn spawn(slot: usize) -> Decision {
        Decision::Spawn { slot }
    }

    fn stop(pid: i32, reason: StopReason) -> Decision {
        Decision::Stop {
            pid: Pid::from_raw(pid),
            reason,
        }
    }

    #[test]
    fn backoff_grows_by_half_and_caps_at_thirty_seconds() {
        let table = [
            (0, 0.0),
            (1, 0.0),
            (2, 1.0),
            (3, 1.5),
            (4, 2.25),
            (5, 3.375),
            (20, 30.0),
            (1000, 30.0),
        ];
        for (failures, secs) in table {
            assert_eq!(
                backoff_delay(failures),
                Duration::from_secs_f64(secs),
                "{failures}"
            );
        }
    }

    #[test]
    fn deaths_feed_or_reset_the_backoff() {
        let now = t0();
        let b = after_death(Backoff::default(), true, now);
        assert_eq!(
            b,
            Backoff {
                failures: 1,
                next_spawn_at: None
            }
        );
        let b = after_death(b, true, now);
        assert_eq!(b.next_spawn_at, Some(now + Duration::from_secs(1)));
        let b = after_death(b, false, now);
        assert_eq!(b, Backoff::default());
        assert!(is_failed_start(None));
        assert!(is_failed_start(Some(Duration::from_millis(999))));
        assert!(!is_failed_start(Some(Duration::from_secs(1))));
    }

    #[test]
    fn reconcile_table() {
        let now = t0();
        struct Case {
            name: &'static str,
            rows: Vec<Worker>,
            goal: Goal,
            want: Vec<Decision>,
        }
        let mut recycled = worker(11, 0, 1, Ready, 5000, now);
        recycled.active_mut().expect("active").recycle = Some("max-requests".into());
        let mut draining_alone = worker(11, 0, 1, Ready, 5000, now);
        draining_alone.active_mut().expect("active").draining = true;
        let stopping = worker(12, 1, 1, Stopping, 9000, now);
        let cases = vec![
            Case {
                name: "empty start fills slots 0..n",
                rows: vec![],
                goal: goal(3, 1),
                want: vec![spawn(0), spawn(1), spawn(2)],
            },
            Case {
                name: "a dead slot is refilled, the lowest free one",
                rows: vec![
                    worker(10, 0, 1, Ready, 100, now),
                    worker(12, 2, 1, Ready, 100, now),
                ],
                goal: goal(3, 1),
                want: vec![spawn(1)],
            },
            Case {
                name: "steady state does nothing",
                rows: vec![
                    worker(10, 0, 1, Ready, 100, now),
                    worker(11, 1, 1, Starting, 10, now),
                ],
                goal: goal(2, 1),
                want: vec![],
            },
            Case {
                name: "TTOU stops the oldest",
                rows: vec![
                    worker(10, 0, 1, Ready, 100, now),
                    worker(11, 1, 1, Ready, 900, now),
                    worker(12, 2, 1, Ready, 500, now),
                ],
                goal: goal(2, 1),
                want: vec![stop(11, StopReason::Excess)],
            },
            Case {
                name: "reload starts a full new generation and keeps the old one",
                rows: vec![
                    worker(10, 0, 1, Ready, 100, now),
                    worker(11, 1, 1, Ready, 100, now),
                ],
                goal: goal(2, 2),
                want: vec![spawn(0), spawn(1)],
            },
            Case {
                name: "one new worker ready retires one old worker, the oldest",
                rows: vec![
                    worker(10, 0, 1, Ready, 900, now),
                    worker(11, 1, 1, Ready, 800, now),
                    worker(20, 0, 2, Ready, 50, now),
                    worker(21, 1, 2, Starting, 50, now),
                ],
                goal: goal(2, 2),
                want: vec![stop(10, StopReason::Replaced)],
            },
            Case {
                name: "all new ready retires all old",
                rows: vec![
                    worker(10, 0, 1, Ready, 900, now),
                    worker(11, 1, 1, Ready, 800, now),
                    worker(20, 0, 2, Ready, 50, now),
                    worker(21, 1, 2, Ready, 50, now),
                ],
                goal: goal(2, 2),
                want: vec![
                    stop(10, StopReason::Replaced),
                    stop(11, StopReason::Replaced),
                ],
            },
            Case {
                name: "after a failed reload, a ready newer worker stays until its replacement is ready",
                rows: vec![
                    worker(10, 0, 1, Ready, 900, now),
                    worker(20, 1, 2, Ready, 50, now),
                    worker(21, 0, 2, Starting, 50, now),
                ],
                goal: goal(2, 1),
                want: vec![spawn(1), stop(21, StopReason::Replaced)],
            },
            Case {
                name: "after a failed reload, a newer worker goes once the previous generation is back",
                rows: vec![
                    worker(10, 0, 1, Ready, 900, now),
                    worker(11, 1, 1, Ready, 10, now),
                    worker(20, 1, 2, Ready, 50, now),
                ],
                goal: goal(2, 1),
                want: vec![stop(20, StopReason::Replaced)],
            },
            Case {
                name: "an old worker still starting is stopped at once",
                rows: vec![worker(10, 0, 1, Starting, 50, now)],
                goal: goal(1, 2),
                want: vec![spawn(0), stop(10, StopReason::Replaced)],
            },
            Case {
                name:
                    "a recycled worker gets a replacement in its slot and stays until it is ready",
                rows: vec![recycled.clone(), worker(12, 1, 1, Ready, 100, now)],
                goal: goal(2, 1),
                want: vec![spawn(0)],
            },
            Case {
                name: "a recycled worker is stopped once its replacement is ready",
                rows: vec![
                    recycled.clone(),
                    worker(12, 1, 1, Ready, 100, now),
                    worker(13, 0, 1, Ready, 10, now),
                ],
                goal: goal(2, 1),
                want: vec![stop(11, StopReason::Replaced)],
            },
            Case {
                name: "a worker draining on its own gets a replacement in its slot",
                rows: vec![draining_alone.clone(), worker(12, 1, 1, Ready, 100, now)],
                goal: goal(2, 1),
                want: vec![spawn(0)],
            },
            Case {
                name: "stopping workers are ignored",
                rows: vec![stopping.clone()],
                goal: goal(1, 1),
                want: vec![spawn(0)],
            },
        ];
        let no_backoff = BTreeMap::new();
        for c in cases {
            let got = reconcile(&table(c.rows), &c.goal, &no_backoff, now);
            assert_eq!(got, c.want, "{}", c.name);
        }
    }

    #[test]
    fn no_more_workers_boot_at_once_than_allowed() {
        let now = t0();
        let limited = |target, max_booting| Goal {
            max_booting,
            ..goal(target, 1)
        };
        let none = BTreeMap::new();
        let got = reconcile(&Table::default(), &limited(8, 2), &none, now);
        assert_eq!(got, vec![spawn(0), spawn(1)], "two of eight at first");
        let rows = || {
            vec![
                worker(10, 0, 1, Ready, 50, now),
                worker(11, 1, 1, Starting, 50, now),
            ]
        };
        let got = reconcile(&table(rows()), &limited(8, 2), &none, now);
        assert_eq!(got, vec![spawn(2)], "one booting: one more");
        let mut full = rows();
        full.push(worker(12, 2, 1, Starting, 10, now));
        let got = reconcile(&table(full), &limited(8, 2), &none, now);
        assert!(got.is_empty(), "two booting: wait");
        // A backed-off slot does not use up the allowance.
        let mut backoff = BTreeMap::new();
        backoff.insert(
            0,
            Backoff {
                failures: 3,
                next_spawn_at: Some(now + Duration::from_secs(1)),
            },
        );
        let got = reconcile(&Table::default(), &limited(4, 1), &backoff, now);
        assert_eq!(got, vec![spawn(1)]);
        // An outdated worker still starting does not count.
        let old = vec![worker(20, 0, 0, Starting, 50, now)];
        let got = reconcile(&table(old), &limited(1, 1), &none, now);
        assert_eq!(got, vec![spawn(0), stop(20, StopReason::Replaced)]);
    }

    #[test]
    fn a_backed_off_slot_waits_and_sets_the_wake_up() {
        let now = t0();
        let later = now + Duration::from_millis(1500);
        let mut backoff = BTreeMap::new();
        backoff.insert(
            0,
            Backoff {
                failures: 3,
                next_spawn_at: Some(later),
            },
        );
        let got = reconcile(&Table::default(), &goal(2, 1), &backoff, now);
        assert_eq!(got, vec![spawn(1)]);
        assert_eq!(
            split_due(&backoff_deadlines(&backoff), now),
            (vec![], Some(later))
        );
        assert_eq!(
            split_due(&backoff_deadlines(&backoff), later),
            (vec![Due::BackoffOver(0)], None)
        );
        let got = reconcile(&Table::default(), &goal(2, 1), &backoff, later);
        assert_eq!(got, vec![spawn(0), spawn(1)]);
    }

    #[test]
    fn deadlines_table() {
        let now = t0();
        let limit = Some(Duration::from_secs(10));
        let mut late_start = worker(1, 0, 1, Starting, 0, now);
        late_start.state = WorkerState::Starting {
            deadline: now - Duration::from_millis(1),
            stable_at: None,
            active: Active::default(),
        };
        let mut silent = worker(2, 1, 1, Ready, 60_000, now);
        silent.last_heartbeat = Some(now - Duration::from_secs(11));
        let mut beating = worker(3, 2, 1, Ready, 60_000, now);
        beating.last_heartbeat = Some(now - Duration::from_secs(2));
        let never_beat = worker(4, 3, 1, Ready, 60_000, now);
        let mut draining = worker(5, 4, 1, Stopping, 1000, now);
        draining.state = WorkerState::Stopping(Stop {
            reason: StopReason::Shutdown,
            kill_at: Some(now),
            killed: None,
        });
        let killed = worker(6, 5, 1, Stopping, 1000, now);
        let t = table(vec![
            late_start, silent, beating, never_beat, draining, killed,
        ]);
        let (got, wake) = split_due(&worker_deadlines(&t, limit), now);
        assert_eq!(
            got,
            vec![
                Due::StartupTimeout(Pid::from_raw(1)),
                Due::HeartbeatTimeout(Pid::from_raw(2)),
                Due::Kill(Pid::from_raw(5)),
            ]
        );
        assert_eq!(
            wake,
            Some(now + Duration::from_secs(8)),
            "the beating worker's deadline"
        );
        let (got, _) = split_due(&worker_deadlines(&t, None), now);
        assert!(
            !got.contains(&Due::HeartbeatTimeout(Pid::from_raw(2))),
            "timeout 0 = off"
        );
    }

    #[test]
    fn an_exec_worker_is_ready_after_its_stability_window_not_before() {
        let now = t0();
        let mut w = worker(1, 0, 1, Starting, 100, now);
        let deadline = now + Duration::from_secs(60);
        w.state = WorkerState::Starting {
            deadline,
            stable_at: Some(now + Duration::from_millis(900)),
            active: Active::default(),
        };
        let t = table(vec![w.clone()]);
        let due = |t: &Table, now| split_due(&worker_deadlines(t, None), now);
        let (got, wake) = due(&t, now);
        assert!(got.is_empty(), "still in its window: {got:?}");
        assert_eq!(wake, Some(now + Duration::from_millis(900)));
        let (got, _) = due(&t, now + Duration::from_millis(900));
        assert_eq!(got, vec![Due::Stable(Pid::from_raw(1))]);
        // Both passed (a suspended master): ready, not also timed out.
        let (got, _) = due(&t, now + Duration::from_secs(120));
        assert_eq!(got, vec![Due::Stable(Pid::from_raw(1))]);
        // A window beyond the startup deadline never makes it ready.
        w.state = WorkerState::Starting {
            deadline,
            stable_at: Some(deadline + Duration::from_secs(1)),
            active: Active::default(),
        };
        let (got, _) = due(&table(vec![w]), now + Duration::from_secs(120));
        assert_eq!(got, vec![Due::StartupTimeout(Pid::from_raw(1))]);
    }

    #[test]
    fn suspension_is_a_late_wake_up_of_more_than_a_second() {
        let now = t0();
        assert_eq!(was_suspended(None, now), None);
        assert_eq!(
            was_suspended(Some(now), now + Duration::from_millis(300)),
            None
        );
        assert_eq!(
            was_suspended(Some(now), now + Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
    }
}
