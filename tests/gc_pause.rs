//! The bootstrap pauses the cyclic garbage collector's automatic trigger
//! while a worker (or the `--preload` zygote) imports the app, and gives
//! back afterwards whatever the app chose: the saved thresholds if the app
//! left them alone, its own thresholds or `gc.disable()` if it set them. Its
//! own imports and a zygote's warm-up run paused too.

mod util;

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// The test venv's default thresholds (700, 10, 10 on CPython 3.11).
fn default_threshold() -> Value {
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import gc, json; print(json.dumps(gc.get_threshold()))",
        ])
        .output()
        .expect("run the venv's python");
    serde_json::from_slice(&out.stdout).expect("thresholds as JSON")
}

/// procman serving tests/apps/gc_app.py with 2 workers, JSON logs, all ready.
fn gc_app(name: &str, extra: &[&str]) -> Harness {
    let h = uvicorn(name, &apps_dir(), "gc_app:main", &["-w", "2"])
        .args(["--log-format", "json"])
        .args(extra.iter().copied())
        .spawn();
    h.check(
        h.wait_event("all-ready", BOOT, |_| true).is_some(),
        "all ready",
    );
    h
}

/// What each of the 2 workers reports: (at import, now), keyed by pid.
fn reports(h: &Harness) -> Vec<(Value, Value)> {
    let mut seen = std::collections::BTreeMap::new();
    let found = wait_for(Duration::from_secs(20), || {
        let (status, body) = http_get(h.addr(), "/").ok()?;
        if status == 200 {
            let v: Value = serde_json::from_str(&body).ok()?;
            seen.insert(
                v["pid"].as_i64()?,
                (v["at_import"].clone(), v["now"].clone()),
            );
        }
        (seen.len() == 2).then_some(())
    });
    h.check(found.is_some(), &format!("both workers answered: {seen:?}"));
    seen.into_values().collect()
}

fn stop(mut h: Harness) {
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

fn check_paused_then_restored(h: &Harness) {
    let default = default_threshold();
    for (at_import, now) in reports(h) {
        h.check(
            at_import["threshold"][0] == 0,
            &format!("the automatic trigger is paused during the import: {at_import}"),
        );
        h.check(
            now["threshold"] == default && now["enabled"] == true,
            &format!("the thresholds are back once the app runs: {now}, want {default}"),
        );
    }
}

#[test]
fn the_collector_is_paused_while_a_forked_worker_imports_the_app_and_restored_after() {
    let h = gc_app("gc-zygote", &[]);
    check_paused_then_restored(&h);
    stop(h);
}

#[test]
fn the_collector_is_paused_while_a_cold_worker_imports_the_app_and_restored_after() {
    let h = gc_app("gc-cold", &["--no-zygote"]);
    check_paused_then_restored(&h);
    stop(h);
}

#[test]
fn the_collector_is_paused_while_the_preload_zygote_imports_the_app_and_restored_after() {
    let h = gc_app("gc-preload", &["--preload"]);
    check_paused_then_restored(&h);
    stop(h);
}

#[test]
fn an_app_that_turns_the_collector_off_or_tunes_it_at_import_keeps_its_choice() {
    let default = default_threshold();
    let h = gc_app("gc-disable", &["-e", "GC_APP_CHOICE=disable"]);
    for (_, now) in reports(&h) {
        h.check(
            now["enabled"] == false && now["threshold"] == default,
            &format!("gc.disable() at import survives, thresholds restored: {now}"),
        );
    }
    stop(h);
    let h = gc_app("gc-threshold", &["-e", "GC_APP_CHOICE=threshold"]);
    for (_, now) in reports(&h) {
        h.check(
            now["threshold"] == serde_json::json!([5000, 20, 20]) && now["enabled"] == true,
            &format!("the app's own thresholds survive: {now}"),
        );
    }
    stop(h);
}

/// The young-generation collections a bare interpreter of the test venv has
/// run by the time its first line of code runs (its own start-up).
fn collections_at_start() -> i64 {
    let out = Command::new(venv_python())
        .args(["-c", "import gc; print(gc.get_stats()[0]['collections'])"])
        .output()
        .expect("run the venv's python");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count")
}

/// What tests/apps/runtime_app.py saw at import in the one worker of a
/// procman started with `extra`.
fn runtime_report(name: &str, extra: &[&str]) -> Value {
    let h = one_worker_in(name, &apps_dir(), "runtime_app:main", extra);
    let (status, body) = http_get(h.addr(), "/").unwrap_or_default();
    h.check(status == 200, &format!("the app answered: {status} {body}"));
    let report: Value = serde_json::from_str(&body).expect("JSON");
    stop(h);
    report
}

#[test]
fn the_bootstrap_and_the_zygotes_import_uvicorn_with_the_collector_paused() {
    // What ran before the app's first line, in a worker forked from the base
    // zygote (it inherits the zygote's count), in the --preload zygote and
    // in a cold worker: the bootstrap's imports and the zygote's warm-up
    // (uvicorn, its protocols, its event loop) allocate far past the
    // threshold, so with the collector running they trigger dozens of young
    // collections; paused, none beyond the interpreter's own start-up.
    let bare = collections_at_start();
    for (name, extra) in [
        ("paused-base", &[][..]),
        ("paused-preload", &["--preload"][..]),
        ("paused-cold", &["--no-zygote"][..]),
    ] {
        let report = runtime_report(name, extra);
        let young = report["young_collections"].as_i64().expect("a count");
        assert!(
            young <= bare + 10,
            "{name}: {young} young collections before the app's import; \
             a bare interpreter has run {bare} by its first line"
        );
    }
}
