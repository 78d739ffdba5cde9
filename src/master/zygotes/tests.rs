//! The zygotes' bookkeeping, without processes: made-up pids, real
//! channels (to read what the master sent), verifiers that say yes or no.

use super::*;

#[test]
fn three_failures_in_a_row_mean_cold_starts_and_restarts_back_off() {
    let now = Instant::now();
    let mut z = Zygotes::default();
    assert_eq!(z.failed(now), None);
    assert!(z.may_start(), "the first restart is at once");
    assert_eq!(z.failed(now), None);
    assert!(!z.may_start(), "the second waits");
    let at = now + Duration::from_secs(1);
    assert_eq!(
        z.deadlines(Duration::from_secs(60)),
        vec![(at, Due::ZygoteBackoffOver)]
    );
    z.backoff_over();
    assert!(z.may_start());
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
    assert!(z.may_start());
    assert_eq!(z.failed(now), None);
    assert_eq!(z.failed(now), None);
    assert!(!z.cold(), "the count started over");
}

/// A zygote of `generation` (a made-up pid; nothing is signalled) and
/// the zygote's end of its channel, to read what the master sent.
fn zygote(pid: i32, generation: u64, now: Instant) -> (Zygote, std::os::fd::OwnedFd) {
    let (master_end, zygote_end) = crate::zygote::channel().expect("socketpair");
    let z = Zygote::new(Pid::from_raw(pid), generation, master_end, now);
    (z, zygote_end)
}

/// What the master sent on a channel, one message per datagram.
fn sent(fd: &std::os::fd::OwnedFd) -> Vec<serde_json::Value> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        out.push(serde_json::from_slice(&buf[..n]).expect("json"));
    }
    out
}

/// A verifier that accepts every pid, recording what it was asked.
fn trusting(
    seen: &std::cell::RefCell<Vec<(i64, u64)>>,
) -> impl Fn(i64, &Expected) -> Result<ChildPid, String> + '_ {
    move |pid, expected| {
        seen.borrow_mut().push((pid, expected.not_before));
        ChildPid::new(pid as i32).ok_or_else(|| "not a child".to_string())
    }
}

fn refusing(_: i64, _: &Expected) -> Result<ChildPid, String> {
    Err("pid 5 is not the master's child".into())
}

const UIDS: [u32; 4] = [0; 4];

/// Nothing is known to the master but its zygotes.
fn unknown(_: i32) -> Option<&'static str> {
    None
}

/// A reply to slot `slot` naming `pid`, sent by `pid` itself.
fn reply(slot: usize, pid: i32) -> FromZygote {
    FromZygote::Spawned {
        slot,
        pid: pid.into(),
        sender: Some(pid),
    }
}

#[test]
fn a_ready_zygote_of_the_generation_serves_one_request_at_a_time() {
    let now = Instant::now();
    let mut zs = Zygotes::default();
    let (z, theirs) = zygote(100, 2, now);
    zs.add(z);
    let zpid = Pid::from_raw(100);
    assert_eq!(zs.ask(0, 2, None, &[], now), Ok(()));
    assert!(sent(&theirs).is_empty(), "still starting: not asked");
    assert_eq!(
        zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown),
        Heard::Ready {
            generation: 2,
            started_at: now
        }
    );
    assert_eq!(
        zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown),
        Heard::Dropped("unexpected")
    );
    assert_eq!(zs.ask(0, 1, None, &[], now), Ok(()));
    assert!(sent(&theirs).is_empty(), "not the generation's zygote");
    assert_eq!(zs.ask(3, 2, Some(1), &[], now), Ok(()));
    let got = sent(&theirs);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["spawn"]["slot"], 3);
    assert_eq!(got[0]["spawn"]["env"]["PROCMAN_WORKER_ID"], "3");
    assert_eq!(got[0]["spawn"]["env"]["PROCMAN_GENERATION"], "2");
    assert_eq!(
        got[0]["spawn"]["env"]["PROCMAN_CPU"], "1",
        "--cpu-affinity's CPU"
    );
    let reply_by = now + crate::zygote::SPAWN_REPLY;
    assert!(zs
        .deadlines(Duration::from_secs(60))
        .contains(&(reply_by, Due::ZygoteSpawnTimeout(zpid))));
    // A base zygote under --reload gets longer (it imports between requests).
    zs.get_mut(zpid).expect("known").reply_within = crate::zygote::SPAWN_REPLY_LEARNING;
    assert!(zs.deadlines(Duration::from_secs(60)).contains(&(
        now + crate::zygote::SPAWN_REPLY_LEARNING,
        Due::ZygoteSpawnTimeout(zpid)
    )));
    zs.get_mut(zpid).expect("known").reply_within = crate::zygote::SPAWN_REPLY;
    assert_eq!(zs.ask(4, 2, None, &[], now), Ok(()));
    assert!(sent(&theirs).is_empty(), "one request in flight at a time");

    // The awaited reply: verified against the request, then adopted.
    let seen = std::cell::RefCell::new(Vec::new());
    let Heard::Adopt { worker, pending } =
        zs.hear(zpid, reply(3, 500), UIDS, trusting(&seen), unknown)
    else {
        panic!("not adopted");
    };
    assert_eq!(worker.as_raw(), 500);
    assert_eq!((pending.slot, pending.generation), (3, 2));
    assert_eq!(seen.borrow().last(), Some(&(500, pending.not_before)));
    assert!(zs.deadlines(Duration::from_secs(60)).is_empty(), "answered");
    assert_eq!(
        zs.hear(zpid, reply(3, 501), UIDS, trusting(&seen), unknown),
        Heard::Unasked {
            stray: ChildPid::new(501).expect("pid")
        },
        "a reply to no request, from a fresh child of the master: a stray"
    );
    assert_eq!(zs.ask(4, 2, None, &[], now), Ok(()));
    assert_eq!(sent(&theirs).len(), 1, "the next request goes out");
}

#[test]
fn a_reply_adopts_the_process_that_sent_it_once() {
    let now = Instant::now();
    let mut zs = Zygotes::default();
    let (z, _theirs) = zygote(100, 1, now);
    zs.add(z);
    let zpid = Pid::from_raw(100);
    zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown);
    let seen = std::cell::RefCell::new(Vec::new());
    let adopted = |p: i32| (p == 500).then_some("a worker");
    let failed = |why: &str, stray: Option<i32>| Heard::SpawnFailed {
        slot: 1,
        why: format!("it reported a worker it did not fork: {why}"),
        stray: stray.and_then(ChildPid::new),
    };
    let cases: Vec<(FromZygote, Heard)> = vec![
        // One pid for two slots: refused, whoever sends it.
        (reply(1, 500), failed("pid 500 is already a worker", None)),
        (
            FromZygote::Spawned {
                slot: 1,
                pid: 500,
                sender: Some(502),
            },
            failed(
                "pid 500 is not the process that sent the reply (pid 502 did)",
                Some(502),
            ),
        ),
        // The zygote itself, naming itself or its fork.
        (reply(1, 100), failed("pid 100 is already a zygote", None)),
        (
            FromZygote::Spawned {
                slot: 1,
                pid: 503,
                sender: Some(100),
            },
            failed(
                "pid 503 is not the process that sent the reply (pid 100 did)",
                None,
            ),
        ),
        (
            FromZygote::Spawned {
                slot: 1,
                pid: 503,
                sender: None,
            },
            failed(
                "pid 503 is not the process that sent the reply (an unknown process did)",
                None,
            ),
        ),
        // Its fork, answering for a slot it was not asked.
        (
            reply(7, 504),
            failed("pid 504 answered for slot 7, not for slot 1", Some(504)),
        ),
    ];
    for (message, want) in cases {
        zs.ask(1, 1, None, &[], now).expect("sent");
        let got = zs.hear(zpid, message.clone(), UIDS, trusting(&seen), adopted);
        assert_eq!(got, want, "{message:?}");
    }
    // A late reply (the request was given up on) is checked the same
    // way, once.
    zs.ask(1, 1, None, &[], now).expect("sent");
    assert_eq!(zs.take_request(zpid), Some(1));
    assert_eq!(
        zs.hear(zpid, reply(1, 500), UIDS, trusting(&seen), adopted),
        Heard::Untrusted {
            why: "pid 500 is already a worker".into(),
            stray: None
        }
    );
    assert_eq!(
        zs.hear(zpid, reply(1, 505), UIDS, trusting(&seen), adopted),
        Heard::Unasked {
            stray: ChildPid::new(505).expect("pid")
        },
        "one late reply per request given up on; a fresh fork that sends another is a stray"
    );
    assert_eq!(
        zs.hear(zpid, reply(1, 500), UIDS, trusting(&seen), adopted),
        Heard::Dropped("unexpected"),
        "a worker is never a stray"
    );
    assert_eq!(
        zs.hear(zpid, reply(1, 506), UIDS, refusing, adopted),
        Heard::Dropped("unexpected"),
        "nor a process that is not a fresh child of the master"
    );
}

#[test]
fn a_request_fails_on_an_error_an_untrusted_reply_or_a_closed_channel() {
    let now = Instant::now();
    let mut zs = Zygotes::default();
    let (z, _theirs) = zygote(200, 1, now);
    zs.add(z);
    let zpid = Pid::from_raw(200);
    zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown);

    assert_eq!(
        zs.hear(
            zpid,
            FromZygote::Error("boom".into()),
            UIDS,
            refusing,
            unknown
        ),
        Heard::Dropped("unexpected"),
        "no request in flight"
    );
    zs.ask(0, 1, None, &[], now).expect("sent");
    assert_eq!(
        zs.hear(
            zpid,
            FromZygote::Error("boom".into()),
            UIDS,
            refusing,
            unknown
        ),
        Heard::SpawnFailed {
            slot: 0,
            why: "boom".into(),
            stray: None
        }
    );
    zs.ask(1, 1, None, &[], now).expect("sent");
    assert_eq!(
        zs.hear(zpid, reply(1, 5), UIDS, refusing, unknown),
        Heard::SpawnFailed {
            slot: 1,
            why: "it reported a worker it did not fork: pid 5 is not the master's child".into(),
            stray: None
        }
    );
    zs.ask(2, 1, None, &[], now).expect("sent");
    assert_eq!(zs.take_request(zpid), Some(2), "given up on (timed out)");
    assert_eq!(zs.take_request(zpid), None);
    assert_eq!(
        zs.hear(zpid, reply(2, 5), UIDS, refusing, unknown),
        Heard::Untrusted {
            why: "pid 5 is not the master's child".into(),
            stray: None
        },
        "a late reply naming a stranger"
    );
    zs.ask(2, 1, None, &[], now).expect("sent");
    assert_eq!(
        zs.hear(zpid, FromZygote::Closed, UIDS, refusing, unknown),
        Heard::SpawnFailed {
            slot: 2,
            why: "the zygote closed its channel".into(),
            stray: None
        }
    );
    assert_eq!(zs.channels().count(), 0, "a closed channel is not polled");
    assert_eq!(zs.ask(3, 1, None, &[], now), Ok(()), "nobody to ask");
    assert!(zs.deadlines(Duration::from_secs(60)).is_empty());
}

#[test]
fn what_a_zygote_sends_out_of_turn_is_dropped_counted_and_said_at_most_every_10_s() {
    let now = Instant::now();
    let mut zs = Zygotes::default();
    let (z, _theirs) = zygote(100, 1, now);
    zs.add(z);
    let zpid = Pid::from_raw(100);
    let warning = || FromZygote::Warning("threads".into());
    for _ in 0..MAX_WARNINGS {
        assert_eq!(
            zs.hear(zpid, warning(), UIDS, refusing, unknown),
            Heard::Warning("threads".into())
        );
    }
    assert_eq!(
        zs.hear(zpid, warning(), UIDS, refusing, unknown),
        Heard::Dropped("unexpected"),
        "a few warnings while it starts"
    );
    zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown);
    assert_eq!(
        zs.hear(
            zpid,
            FromZygote::Unreadable("oversized"),
            UIDS,
            refusing,
            unknown
        ),
        Heard::Dropped("oversized")
    );
    let first = zs.dropped(zpid, None, "unexpected", now);
    assert_eq!(
        first,
        Some(DropsLine {
            dropped: 1,
            total: 1,
            why: "unexpected",
            zygote: zpid,
            sender: None,
        }),
        "the first drop is said at once"
    );
    for i in 0..1000 {
        let at = now + Duration::from_millis(i);
        assert_eq!(
            zs.dropped(zpid, None, "oversized", at),
            None,
            "counted, not said"
        );
    }
    let later = now + DROPS_SAID_EVERY;
    let sender = Some(Sender {
        pid: 77,
        uid: 65534,
    });
    assert_eq!(
        zs.dropped(zpid, sender, "oversized", later),
        Some(DropsLine {
            dropped: 1001,
            total: 1002,
            why: "oversized",
            zygote: zpid,
            sender,
        })
    );
    assert_eq!(
        zs.drops(),
        &BTreeMap::from([("oversized", 1001), ("unexpected", 1)])
    );
}

#[test]
fn a_starting_zygote_is_due_by_the_startup_timeout_and_old_ones_retire_when_unused() {
    let now = Instant::now();
    let mut zs = Zygotes::default();
    let (old, _a) = zygote(300, 1, now);
    let (new, _b) = zygote(301, 2, now);
    zs.add(old);
    zs.add(new);
    let timeout = Duration::from_secs(30);
    let mut got = zs.deadlines(timeout);
    got.sort_by_key(|(_, d)| format!("{d:?}"));
    assert_eq!(
        got,
        vec![
            (now + timeout, Due::ZygoteStartTimeout(Pid::from_raw(300))),
            (now + timeout, Due::ZygoteStartTimeout(Pid::from_raw(301))),
        ]
    );
    assert!(zs.is_starting(Pid::from_raw(301)));
    assert!(zs.has(1) && zs.has(2) && !zs.has(3));
    assert_eq!(zs.unused(2, |_| true), vec![]);
    assert_eq!(zs.unused(2, |g| g != 1), vec![(Pid::from_raw(300), 1)]);
    assert_eq!(
        zs.unused(2, |_| false),
        vec![(Pid::from_raw(300), 1)],
        "never the current one"
    );
}
