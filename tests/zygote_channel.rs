//! The zygote's channel to the master is read like any untrusted input
//! (issue 24, items 2 and 6): app code in a `--preload` zygote that floods
//! the channel delays the master by one bounded batch at most, and what it
//! sends out of turn is dropped and counted, never logged one by one; a
//! reply adopts exactly the process that sent it, once.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// The metrics endpoint's address, from the log.
fn metrics_addr(h: &Harness) -> SocketAddr {
    let found = wait_for(BOOT, || {
        h.log_text().lines().find_map(|l| {
            let rest = l.split("Serving metrics at: http://").nth(1)?;
            rest.split("/metrics").next()?.parse::<SocketAddr>().ok()
        })
    });
    match found {
        Some(a) => a,
        None => panic!("no metrics address in the log\n{}", h.log_text()),
    }
}

/// The sum of a counter's samples (every label set), if it is exposed.
fn counter(addr: SocketAddr, name: &str) -> Option<u64> {
    let (status, body) = http_get(addr, "/metrics").ok()?;
    if status != 200 {
        return None;
    }
    let samples: Vec<u64> = body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Panics with what failed and the end of the log (a flooded log is
/// large: its lines are cut).
#[track_caller]
fn check_short(h: &Harness, cond: bool, what: &str) {
    if cond {
        return;
    }
    let text = h.log_text();
    let lines: Vec<&str> = text.lines().collect();
    let tail: Vec<String> = lines[lines.len().saturating_sub(40)..]
        .iter()
        .map(|l| l.chars().take(300).collect())
        .collect();
    panic!(
        "{what}\n--- the last {} of {} log lines, cut at 300 characters ---\n{}",
        tail.len(),
        lines.len(),
        tail.join("\n")
    );
}

/// The bound the master's memory must stay under during a flood.
const RSS_BOUND_KIB: u64 = 32 * 1024;

#[test]
fn a_zygote_flooding_its_channel_delays_nothing_and_what_it_sends_out_of_turn_is_dropped_and_counted(
) {
    let start = uvicorn(
        "zygote-flood",
        &apps_dir(),
        "zygote_flood:app",
        &["--preload", "-w", "2", "--metrics", "127.0.0.1:0"],
    )
    .json();
    // The flooders the app's import forked wait for this file.
    let go = start.dir().join("go");
    let mut h = start
        .env("ZYGOTE_FLOOD_GO", go.to_str().expect("utf8"))
        .env("ZYGOTE_FLOOD_NICE", "10")
        .spawn();
    h.wait_workers(2, BOOT);
    std::fs::write(&go, b"").expect("write go file");
    check_survives_flood(h, None);
}

/// The worker of the base zygote (no `--preload`) in slot 0 takes its
/// zygote's channel (tests/apps/base_zygote_flood.py: pidfd_getfd; it runs
/// as the zygote's user) and floods it.
#[test]
fn a_worker_flooding_its_base_zygotes_channel_delays_nothing() {
    let h = uvicorn(
        "base-zygote-flood",
        &apps_dir(),
        "base_zygote_flood:app",
        &["-w", "2", "--metrics", "127.0.0.1:0"],
    )
    .env("ZYGOTE_FLOOD_NICE", "10")
    .json()
    .spawn();
    check_survives_flood(h, Some(0));
}

/// A live, ready worker of a slot other than `spared` (the flooding one).
fn victim(h: &Harness, spared: Option<usize>) -> Option<i32> {
    let kids: BTreeSet<i32> = h.children().into_iter().collect();
    let ready: BTreeSet<i32> = h.events_named("ready").iter().map(worker_of).collect();
    h.events_named("ready")
        .iter()
        .rev()
        .filter(|e| spared.is_none_or(|s| e["slot"].as_u64() != Some(s as u64)))
        .map(worker_of)
        .find(|p| kids.contains(p) && ready.contains(p) && alive(*p))
}

/// While a flood goes on: what was dropped is counted (not logged), a
/// killed worker is reaped and replaced, `/healthz` answers, the master's
/// memory stays bounded, and TERM stops procman.
fn check_survives_flood(mut h: Harness, spared: Option<usize>) {
    let metrics = metrics_addr(&h);
    // Until the drops are counted, or (a master that logs each message)
    // the flood reaches the log: that log grows fast, so stop at once.
    let dropped = wait_for(BOOT, || {
        if h.count_log("FLOODMARK") > 0 {
            return Some(None);
        }
        counter(metrics, "procman_zygote_messages_dropped")
            .filter(|&n| n > 100)
            .map(Some)
    })
    .flatten();
    check_short(
        &h,
        dropped.is_some(),
        &format!(
            "the flood's messages are counted in procman_zygote_messages_dropped_total, \
             not logged ({} flooded lines in the log)",
            h.count_log("FLOODMARK")
        ),
    );

    // Supervision goes on during the flood: a killed worker is reaped and
    // replaced, the probes answer, and the master's memory stays bounded.
    for round in 0..3 {
        let victim = wait_for(BOOT, || victim(&h, spared));
        check_short(&h, victim.is_some(), "a worker to kill");
        let victim = victim.expect("checked above");
        let before = h.count_events("ready", |_| true);
        let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
        let replaced = wait_for(BOOT, || {
            let ready = h.count_events("ready", |_| true);
            let gone = !h.children().contains(&victim);
            (gone && ready > before).then_some(())
        });
        check_short(
            &h,
            replaced.is_some(),
            &format!("round {round}: the killed worker {victim} was reaped and replaced"),
        );
        let health = http_get(metrics, "/healthz");
        check_short(
            &h,
            matches!(health, Ok((200, _))),
            &format!("round {round}: /healthz answers during the flood: {health:?}"),
        );
        let rss = rss_kib(h.pid);
        check_short(
            &h,
            rss < RSS_BOUND_KIB,
            &format!("round {round}: the master's RSS {rss} KiB < {RSS_BOUND_KIB} KiB"),
        );
    }
    let still = counter(metrics, "procman_zygote_messages_dropped").unwrap_or(0);
    check_short(
        &h,
        still > dropped.unwrap_or(0),
        "the flood went on all along (more dropped)",
    );
    // Dropped messages are counted, not logged: their text never reaches
    // the log, and the drops are said in a few rate-limited lines.
    check_short(
        &h,
        h.count_log("FLOODMARK") == 0,
        &format!(
            "no flooded text in the log ({} lines)",
            h.count_log("FLOODMARK")
        ),
    );
    // Each line names the process that sent what was dropped (a flooder,
    // not the zygote whose channel it came on).
    let zygotes = zygote_pids(&h);
    check_short(
        &h,
        h.events_named("zygote-messages-dropped").iter().all(|e| {
            e["sender_pid"]
                .as_i64()
                .is_some_and(|p| !zygotes.contains(&(p as i32)))
        }),
        "the drop lines name the sender",
    );
    let said = h.count_events("zygote-messages-dropped", |_| true);
    check_short(
        &h,
        (1..=10).contains(&said),
        &format!("the drops are said once, then at most every 10 s: {said} lines"),
    );
    h.signal(Signal::SIGTERM);
    let code = h.exit_code(BOOT);
    check_short(&h, code == 0, &format!("TERM stops procman (exit {code})"));
}

/// Pids adopted for more than one slot: every `booting` event names the
/// pid the master adopted.
fn adopted_twice(h: &Harness) -> BTreeMap<i32, usize> {
    let mut seen = BTreeMap::new();
    for e in h.events_named("booting") {
        *seen.entry(worker_of(&e)).or_insert(0) += 1;
    }
    seen.retain(|_, n| *n > 1);
    seen
}

#[test]
fn a_zygote_naming_one_pid_for_two_slots_gets_it_adopted_once() {
    check_adopted_once(
        "zygote-twin",
        "twin_zygote:app",
        "TWINLIE",
        "is not the process that sent the reply",
    );
}

/// The same reply sent by the worker it names, already adopted
/// (tests/apps/twin_worker.py): the kernel vouches for the sender, which is
/// already a worker.
#[test]
fn a_worker_answering_for_another_slot_is_not_adopted_twice() {
    check_adopted_once(
        "worker-twin",
        "twin_worker:app",
        "TWINWORKER",
        "is already a worker",
    );
}

/// procman --preload -w 3 with `app`, which says `mark` when it reports a
/// pid for a second slot: each pid is adopted once, every slot gets a
/// worker, no fork serves unsupervised, and TERM stops procman; the
/// master refused the lie with `refused` in its reason.
fn check_adopted_once(name: &str, app: &str, mark: &str, refused: &str) {
    let mut h = uvicorn(
        name,
        &apps_dir(),
        app,
        &["--preload", "-w", "3", "--startup-timeout", "10"],
    )
    .json()
    .spawn();
    check_short(
        &h,
        h.wait_log(mark, BOOT),
        "one pid was reported for a second slot",
    );
    // Every slot ends up with a worker of its own, each adopted once.
    wait_for(BOOT, || {
        (h.events_named("booting").len() >= 3).then_some(())
    });
    check_short(
        &h,
        adopted_twice(&h).is_empty(),
        &format!(
            "a pid was adopted for two slots: {:?} ({} lies)",
            adopted_twice(&h),
            h.count_log(mark)
        ),
    );
    let pids = h.wait_workers(3, BOOT);
    check_short(
        &h,
        h.wait_log(refused, BOOT),
        &format!("the master refused it: {refused}"),
    );
    // No process the zygote forked serves unsupervised: every live child of
    // the master is a zygote or an adopted worker.
    let adopted: BTreeSet<i32> = h.events_named("booting").iter().map(worker_of).collect();
    let settled = wait_for(BOOT, || {
        let zygotes: BTreeSet<i32> = zygote_pids(&h).into_iter().collect();
        let stray: Vec<i32> = h
            .children()
            .into_iter()
            .filter(|p| alive(*p) && !zygotes.contains(p) && !adopted.contains(p))
            .collect();
        stray.is_empty().then_some(())
    });
    check_short(
        &h,
        settled.is_some(),
        "every forked process is supervised or gone",
    );
    check_short(
        &h,
        pids.is_subset(&adopted),
        "the answering workers were adopted",
    );
    h.signal(Signal::SIGTERM);
    let code = h.exit_code(BOOT);
    check_short(&h, code == 0, &format!("TERM stops procman (exit {code})"));
}
