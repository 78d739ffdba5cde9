//! The policy's tables for how the notify socket is read (its drain
//! period, when it is polled, a crowded queue) and for the CPU priorities
//! of booting and outgoing workers.

use super::*;

#[test]
fn drain_period_table() {
    let s = Duration::from_secs;
    // (workers, --timeout, queue limit) -> period, or None: poll.
    let table: &[(usize, Option<Duration>, usize, Option<Duration>)] = &[
        // The kernel's default queue of 10: a budget of 5 heartbeats.
        (0, Some(s(30)), 10, Some(s(20))),
        (1, Some(s(30)), 10, Some(s(20))),
        (2, Some(s(30)), 10, Some(s(20))),
        (3, Some(s(30)), 10, Some(s(10))),
        (4, Some(s(30)), 10, Some(s(10))),
        (5, Some(s(30)), 10, Some(s(10))),
        (6, Some(s(30)), 10, None),
        (16, Some(s(30)), 10, None),
        (4, Some(s(2)), 10, Some(Duration::from_nanos(666_666_666))),
        // systemd's 512: a budget of 256.
        (16, Some(s(30)), 512, Some(s(20))),
        (128, Some(s(30)), 512, Some(s(20))),
        (129, Some(s(30)), 512, Some(s(10))),
        (256, Some(s(30)), 512, Some(s(10))),
        (257, Some(s(30)), 512, None),
        (4, Some(s(300)), 512, Some(s(200))),
        // No heartbeats: nothing to save.
        (4, None, 512, None),
        // A queue too small for any batch.
        (1, Some(s(30)), 1, None),
    ];
    for (workers, timeout, limit, want) in table {
        assert_eq!(
            drain_period(*workers, *timeout, *limit),
            *want,
            "{workers} workers, --timeout {timeout:?}, queue {limit}"
        );
    }
}

#[test]
fn the_notify_socket_is_polled_while_an_answer_may_be_due() {
    let now = t0();
    let t = Some(Duration::from_secs(30));
    let lazy = Pace::Drain(Duration::from_secs(20));
    let ready = || {
        let mut w = worker(10, 0, 1, Ready, 5000, now);
        w.last_heartbeat = Some(now);
        w
    };
    let silent = worker(13, 2, 1, Ready, 5000, now);
    // (name, workers, reloading, crowded) -> pace.
    let cases: Vec<(&str, Vec<Worker>, bool, bool, Pace)> = vec![
        ("all ready: lazy", vec![ready()], false, false, lazy),
        (
            "all ready, one never beat: lazy",
            vec![ready(), silent.clone()],
            false,
            false,
            Pace::Drain(Duration::from_secs(20)),
        ),
        (
            "no heartbeats at all: nothing to batch",
            vec![silent.clone()],
            false,
            false,
            Pace::Poll,
        ),
        (
            "no workers: nothing to batch",
            vec![],
            false,
            false,
            Pace::Poll,
        ),
        (
            "one starting (READY=1, EXTEND_TIMEOUT_USEC)",
            vec![ready(), worker(11, 1, 1, Starting, 10, now)],
            false,
            false,
            Pace::Poll,
        ),
        (
            "one stopping (EXTEND_TIMEOUT_USEC)",
            vec![ready(), worker(12, 1, 1, Stopping, 10, now)],
            false,
            false,
            Pace::Poll,
        ),
        ("a reload", vec![ready()], true, false, Pace::Poll),
        (
            "the queue was found crowded",
            vec![ready()],
            false,
            true,
            Pace::Poll,
        ),
    ];
    for (name, rows, reloading, crowded, want) in cases {
        let got = notify_pace(&table(rows), reloading, t, 10, crowded);
        assert_eq!(got, want, "{name}");
    }
    // Too many workers for the queue: polled even when all are ready.
    let many: Vec<Worker> = (0..6)
        .map(|i| {
            let mut w = worker(10 + i, i as usize, 1, Ready, 5000, now);
            w.last_heartbeat = Some(now);
            w
        })
        .collect();
    assert_eq!(notify_pace(&table(many), false, t, 10, false), Pace::Poll);
    assert_eq!(
        notify_pace(&table(vec![ready()]), false, None, 10, false),
        Pace::Poll
    );
}

#[test]
fn a_queue_fuller_than_the_budget_is_crowded() {
    assert!(!crowded(5, 10));
    assert!(crowded(6, 10));
    assert!(!crowded(256, 512));
    assert!(crowded(257, 512));
}

#[test]
fn an_outgoing_worker_is_lowered_by_the_step_up_to_the_lowest_priority() {
    for (nice, want) in [
        (0, Some(10)),
        (-5, Some(5)),
        (5, Some(15)),
        (12, Some(19)),
        (18, Some(19)),
        (19, None),
    ] {
        assert_eq!(lowered_nice(nice), want, "nice {nice}");
    }
}

#[test]
fn a_booting_worker_is_raised_by_the_boost_up_to_the_highest_priority() {
    for (nice, want) in [
        (0, Some(-5)),
        (10, Some(5)),
        (-5, Some(-10)),
        (-17, Some(-20)),
        (-20, None),
        (19, Some(14)),
    ] {
        assert_eq!(boosted_nice(nice), want, "nice {nice}");
    }
}

#[test]
fn a_reload_lowers_the_older_active_workers_not_yet_lowered() {
    let now = t0();
    let lowered = |mut w: Worker| {
        if let Some(a) = w.active_mut() {
            a.lowered_from = Some(0);
        }
        w
    };
    let rows = vec![
        worker(10, 0, 1, Ready, 5000, now),    // older, serving: lowered
        worker(11, 1, 1, Starting, 100, now),  // older, starting: lowered
        worker(12, 2, 1, Stopping, 5000, now), // stopping: left alone
        lowered(worker(13, 3, 1, Ready, 5000, now)), // lowered already
        worker(20, 0, 2, Ready, 100, now),     // the new generation
        lowered(worker(30, 1, 3, Ready, 100, now)), // newer (a failed reload's)
    ];
    let t = table(rows);
    let pids = |v: Vec<Pid>| v.into_iter().map(Pid::as_raw).collect::<Vec<_>>();
    let mut got = pids(to_lower(&t, 2));
    got.sort();
    assert_eq!(got, vec![10, 11]);
    // Superseded by generation 3: generation 2's serving worker too.
    let mut got = pids(to_lower(&t, 3));
    got.sort();
    assert_eq!(got, vec![10, 11, 20]);
    // A failed reload back to generation 1: the lowered workers of 1 and
    // older go back; a newer generation's are being replaced anyway.
    let back: Vec<(i32, i32)> = to_restore(&t, 1)
        .into_iter()
        .map(|(p, n)| (p.as_raw(), n))
        .collect();
    assert_eq!(back, vec![(13, 0)]);
}

#[test]
fn workers_autogroups_together_weigh_about_as_one_session() {
    for (workers, want) in [
        (0, 0),
        (1, 0),
        (2, 3),
        (3, 5),
        (4, 6),
        (8, 9),
        (16, 12),
        (32, 16),
        (64, 19),
        (1000, 19),
    ] {
        assert_eq!(autogroup_share(workers), want, "{workers} workers");
    }
}
