//! The policy's test tables: [`reconcile`] against worker tables of every
//! shape, backoff, deadlines and suspension, each rule as a table of cases;
//! the notify socket's pace and the priority steps in `tests/pace.rs`.

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
            name:
                "after a failed reload, a ready newer worker stays until its replacement is ready",
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
            name: "a recycled worker gets a replacement in its slot and stays until it is ready",
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
        let got = reconcile(&table(c.rows), &c.goal, &no_backoff);
        assert_eq!(got, c.want, "{}", c.name);
    }
}

#[test]
fn wanted_slots_table() {
    let now = t0();
    let mut recycled = worker(11, 1, 1, Ready, 5000, now);
    recycled.active_mut().expect("active").recycle = Some("max-requests".into());
    let cases: Vec<(&str, Vec<Worker>, Goal, Vec<usize>)> = vec![
        (
            "nothing yet: the slots to fill",
            vec![],
            goal(2, 1),
            vec![0, 1],
        ),
        (
            "TTOU stopped the oldest, in slot 0: slot 1 stays, slot 0 goes",
            vec![
                worker(10, 0, 1, Stopping, 900, now),
                worker(11, 1, 1, Ready, 100, now),
            ],
            goal(1, 1),
            vec![1],
        ),
        (
            "a dead worker's slot is refilled",
            vec![worker(10, 0, 1, Ready, 100, now)],
            goal(2, 1),
            vec![0, 1],
        ),
        (
            "a reload: the new generation takes the old one's slots",
            vec![
                worker(10, 0, 1, Ready, 900, now),
                worker(11, 1, 1, Ready, 900, now),
                worker(12, 0, 2, Starting, 10, now),
            ],
            goal(2, 2),
            vec![0, 1],
        ),
        (
            "a smaller reload: the old generation's extra slot goes",
            vec![
                worker(10, 0, 1, Ready, 900, now),
                worker(11, 1, 1, Ready, 900, now),
                worker(11, 2, 1, Ready, 900, now),
            ],
            goal(2, 2),
            vec![0, 1],
        ),
        (
            "a worker marked for recycling: its replacement takes its slot",
            vec![worker(10, 0, 1, Ready, 100, now), recycled],
            goal(2, 1),
            vec![0, 1],
        ),
    ];
    for (name, rows, goal, want) in cases {
        let got: Vec<usize> = wanted_slots(&table(rows), &goal).into_iter().collect();
        assert_eq!(got, want, "{name}");
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
    let got = reconcile(&Table::default(), &limited(8, 2), &none);
    assert_eq!(got, vec![spawn(0), spawn(1)], "two of eight at first");
    let rows = || {
        vec![
            worker(10, 0, 1, Ready, 50, now),
            worker(11, 1, 1, Starting, 50, now),
        ]
    };
    let got = reconcile(&table(rows()), &limited(8, 2), &none);
    assert_eq!(got, vec![spawn(2)], "one booting: one more");
    let mut full = rows();
    full.push(worker(12, 2, 1, Starting, 10, now));
    let got = reconcile(&table(full), &limited(8, 2), &none);
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
    let got = reconcile(&Table::default(), &limited(4, 1), &backoff);
    assert_eq!(got, vec![spawn(1)]);
    // An outdated worker still starting does not count.
    let old = vec![worker(20, 0, 0, Starting, 50, now)];
    let got = reconcile(&table(old), &limited(1, 1), &none);
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
    let got = reconcile(&Table::default(), &goal(2, 1), &backoff);
    assert_eq!(got, vec![spawn(1)]);
    assert_eq!(
        split_due(&backoff_deadlines(&backoff), now),
        (vec![], Some(later))
    );
    assert_eq!(
        split_due(&backoff_deadlines(&backoff), later),
        (vec![Due::BackoffOver(0)], None)
    );
    // Passed, the deadline is handled (as `Boot::backoff_over` does): only
    // then is the slot filled, whatever the clock says meanwhile.
    let got = reconcile(&Table::default(), &goal(2, 1), &backoff);
    assert_eq!(got, vec![spawn(1)], "not before its deadline was handled");
    if let Some(b) = backoff.get_mut(&0) {
        b.next_spawn_at = None;
    }
    let got = reconcile(&Table::default(), &goal(2, 1), &backoff);
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

// The notify socket's pace and the CPU priorities: tests/pace.rs.
mod pace;
