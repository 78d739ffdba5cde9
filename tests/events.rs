//! With `--log-format json`, lifecycle lines carry a stable `event` field
//! with the worker's pid, slot and generation: what tests (and log
//! readers) match on instead of the wording of the messages.

mod util;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

/// The worker pids of the events named `name` of `generation`.
fn pids(h: &Harness, name: &str, generation: u64) -> BTreeSet<i64> {
    h.events_named(name)
        .iter()
        .filter(|e| e["generation"] == generation)
        .filter_map(|e| e["worker"].as_i64())
        .collect()
}

#[test]
fn a_reload_and_a_stop_are_told_as_events_with_pid_slot_and_generation() {
    let mut worker = vec!["--ready".to_string(), "notify".into(), "--".into()];
    worker.extend(notify_worker());
    let mut args = vec!["-w", "2", "--log-format", "json"];
    args.extend(worker.iter().map(String::as_str));
    let mut h = Start::new("events", &args).spawn();
    let all = h.wait_event("all-ready", BOOT, |_| true);
    h.check(
        all.is_some_and(|e| e["generation"] == 1),
        "all-ready, generation 1",
    );
    let first = pids(&h, "booting", 1);
    h.check(first.len() == 2, "two workers booted in generation 1");
    h.check(pids(&h, "ready", 1) == first, "the same two said ready");
    let slots: BTreeSet<i64> = h
        .events_named("booting")
        .iter()
        .filter_map(|e| e["slot"].as_i64())
        .collect();
    h.check(slots == BTreeSet::from([0, 1]), "slots 0 and 1");

    h.signal(Signal::SIGHUP);
    h.check(
        h.wait_event("reloading", BOOT, |e| e["generation"] == 2)
            .is_some(),
        "reloading to generation 2",
    );
    h.check(
        h.wait_event("reload-done", BOOT, |e| e["generation"] == 2)
            .is_some(),
        "reload done",
    );
    let second = pids(&h, "ready", 2);
    h.check(second.len() == 2, "two workers of generation 2 ready");
    h.check(second.is_disjoint(&first), "new processes");
    // The old ones were stopped as replaced, and their exits told.
    let stopped: BTreeSet<i64> = h
        .events_named("stopping")
        .iter()
        .filter(|e| e["reason"] == "replaced")
        .filter_map(|e| e["worker"].as_i64())
        .collect();
    h.check(stopped == first, "generation 1 stopped as replaced");
    let gone = wait_for(BOOT, || (pids(&h, "exited", 1) == first).then_some(()));
    h.check(gone.is_some(), "generation 1 exited");

    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    h.check(
        !h.events_named("shutdown").is_empty(),
        "the shutdown is an event",
    );
    h.check(pids(&h, "exited", 2) == second, "generation 2 exited");
    // Every event line is a JSON object with a level and a message too.
    let events: Vec<Value> = h.events();
    h.check(
        events
            .iter()
            .all(|e| e["level"].is_string() && e["message"].is_string()),
        "events are ordinary log lines",
    );
}
