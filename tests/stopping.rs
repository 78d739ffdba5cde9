//! How a uvicorn worker stops, observed without timing anything: it
//! notices a stop signal at once (not at its main loop's next 0.1 s tick),
//! and an idle worker drains without sleeping for a fixed time (uvicorn's
//! own shutdown sleeps 0.1 s, whatever there is to wait for).
//! tests/apps/stop_app.py watches from inside the worker.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

#[test]
fn a_stop_signal_wakes_the_workers_main_loop_at_once() {
    // The worker signals itself from a request and then yields to the event
    // loop: its shutdown must begin within a few loop iterations. Waiting
    // for the main loop's next tick instead takes up to 0.1 s, far more
    // than 50 iterations of an otherwise idle loop.
    for (name, extra) in [
        ("wake-uvloop", &[][..]),
        ("wake-asyncio", &["--loop", "asyncio"][..]),
    ] {
        let mut h = one_worker_in(name, &apps_dir(), "stop_app:app", extra);
        let (status, body) =
            http_request(h.addr(), "GET", "/stop-self", None, BOOT).unwrap_or_default();
        h.check(
            status == 200,
            &format!("{name}: answered while stopping: {status} {body}"),
        );
        let v: Value = serde_json::from_str(&body).expect("JSON");
        h.check(
            v["yields"].as_i64().is_some_and(|n| n <= 10),
            &format!("{name}: the shutdown began within a few loop iterations of the signal: {v}"),
        );
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0);
    }
}

#[test]
fn an_idle_worker_drains_without_a_fixed_sleep() {
    let dir = temp_dir("drain-idle");
    let report = dir.join("report");
    let report_env = format!("STOP_REPORT={}", report.display());
    for (name, extra) in [
        ("drain-uvloop", &[][..]),
        ("drain-asyncio", &["--loop", "asyncio"][..]),
    ] {
        let mut args = vec!["-e", report_env.as_str()];
        args.extend_from_slice(extra);
        let mut h = one_worker_in(name, &apps_dir(), "stop_app:app", &args);
        let pid = *h.wait_workers(1, BOOT).iter().next().expect("a worker");
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0);
        let path = format!("{}.{pid}", report.display());
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        h.check(
            v["timed_sleeps"].as_array().is_some_and(Vec::is_empty),
            &format!(
                "{name}: no sleep with a delay once the shutdown began (caller, delay): {text:?}"
            ),
        );
    }
}
