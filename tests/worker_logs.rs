//! Worker log lines in the master's format: with `--log-format json` every
//! line procman and its uvicorn workers write to stderr is one JSON object
//! (the master's keys, plus slot and generation from a worker), and the
//! app's `print`s to stdout are left alone.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

#[test]
fn with_log_format_json_every_stderr_line_of_a_serving_uvicorn_worker_is_json() {
    let python = venv_python();
    let apps = repo().join("tests/apps");
    let start = Start::new(
        "worker-json-logs",
        &[
            "logging_app:main",
            "--python",
            python.to_str().expect("utf8"),
            "--log-format",
            "json",
            "-w",
            "1",
        ],
    )
    .args(["--chdir", apps.to_str().expect("utf8")]);
    let stdout = start.dir().join("stdout.log");
    // stderr is the harness's log; stdout (the app's prints) goes apart.
    let redirect = format!("exec \"$0\" \"$@\" >{}", stdout.display());
    let mut h = start.spawn_with("sh", &["-c", &redirect, PROCMAN]);
    h.check(
        h.wait_event("all-ready", BOOT, |_| true).is_some(),
        "the worker is ready",
    );
    let addr = h.addr();
    h.check(
        http_get(addr, "/hello").is_ok_and(|(status, _)| status == 200),
        "GET /hello answers 200",
    );
    h.check(
        http_get(addr, "/boom").is_ok_and(|(status, _)| status == 500),
        "GET /boom answers 500",
    );
    h.check(
        h.wait_log("GET /boom", BOOT),
        "the access log line of /boom",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());

    let text = h.log_text();
    let mut lines = Vec::new();
    for line in text.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => lines.push(v),
            _ => panic!("a stderr line is not a JSON object: {line:?}\n{text}"),
        }
    }
    for v in &lines {
        for key in ["timestamp", "level", "pid", "message"] {
            h.check(v.get(key).is_some(), &format!("{key} in {v}"));
        }
    }
    let master = i64::from(h.pid);
    let worker: Vec<&Value> = lines.iter().filter(|v| v["pid"] != master).collect();
    for v in &worker {
        h.check(
            v["slot"] == 0 && v["generation"] == 1,
            &format!("slot 0 and generation 1 in {v}"),
        );
    }
    let has = |what: &str| {
        worker
            .iter()
            .any(|v| v["message"].as_str().is_some_and(|m| m.contains(what)))
    };
    h.check(has("Started server process"), "uvicorn's start-up line");
    h.check(has("\"GET /hello HTTP/1.1\" 200"), "the access log");
    h.check(
        has("handled /hello"),
        "the app's logging record (its basicConfig)",
    );
    h.check(has("a warning at import"), "the app's warning");
    h.check(has("Finished server process"), "uvicorn's shutdown line");
    // A traceback is one field of its line, not more lines.
    h.check(
        worker.iter().any(|v| {
            v["exc"]
                .as_str()
                .is_some_and(|e| e.contains("ZeroDivisionError: boom in the app"))
        }),
        "the app's exception as the exc field",
    );
    let printed = std::fs::read_to_string(&stdout).unwrap_or_default();
    h.check(
        printed == "a print from the app\n",
        &format!("the app's print untouched on stdout: {printed:?}"),
    );
}
