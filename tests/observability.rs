//! Observability of uvicorn workers from the outside: a traceback in the
//! log before every heartbeat-timeout kill, and short process titles that
//! name the app (the bootstrap's source never on the command line).

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// The 1-based line of the example app's blocking call in /block.
fn blocking_line() -> usize {
    let src = std::fs::read_to_string(fastapi_dir().join("app.py")).expect("app.py");
    let lines: Vec<&str> = src.lines().collect();
    let def = lines
        .iter()
        .position(|l| l.starts_with("async def block("))
        .expect("async def block( in app.py");
    def + 1
        + lines[def..]
            .iter()
            .position(|l| l.trim() == "time.sleep(s)")
            .expect("time.sleep(s) in block()")
}

/// The line numbers of the log's `event` lines for which `pred` holds.
fn event_lines(log: &str, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<usize> {
    log.lines()
        .enumerate()
        .filter(|(_, l)| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v.get("event").is_some() && pred(&v))
        })
        .map(|(i, _)| i)
        .collect()
}

/// One procman with one worker and `-t 3`, blocked `tries` times in a row:
/// each time, the log between the master's `stopping` (timeout) event and
/// the `exited` one (the worker is replaced only after that) holds the
/// worker's traceback naming app.py and the blocking line (faulthandler's
/// plain text, also with `--log-format json`).
fn traceback_before_each_kill(name: &str, tries: usize) {
    let mut h = uvicorn(name, &fastapi_dir(), "app:main", &["-w", "1", "-t", "3"])
        .json()
        .spawn();
    let addr = h.addr();
    let want = format!("app.py\", line {} in block", blocking_line());
    for i in 1..=tries {
        // A fresh worker is ready (and heartbeating) before each try.
        h.wait_workers(1, BOOT);
        h.expect_events("ready", i, BOOT, &format!("try {i}: worker ready"), |_| {
            true
        });
        let blocked = std::thread::spawn(move || {
            http_request(addr, "GET", "/block?s=30", None, Duration::from_secs(40))
        });
        h.expect_events(
            "exited",
            i,
            Duration::from_secs(30),
            &format!("try {i}: the blocked worker was aborted and reaped"),
            |e| e["reason"] == "timeout",
        );
        let log = h.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let start = event_lines(&log, |e| {
            e["event"] == "stopping" && e["reason"] == "timeout"
        })
        .get(i - 1)
        .copied();
        let end = event_lines(&log, |e| e["event"] == "exited" && e["reason"] == "timeout")
            .get(i - 1)
            .copied();
        let between = match (start, end) {
            (Some(s), Some(e)) if s < e => lines[s..e].join("\n"),
            _ => String::new(),
        };
        h.check(
            between.contains(&want),
            &format!("try {i}: {want:?} logged between the abort and the exit"),
        );
        let _ = blocked.join();
    }
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

/// 10 tries in all, in two procmans side by side (the machine has 2 cores).
/// Both threads are joined before a failure is reported, so each one's
/// Harness is dropped (its procman killed) even when the other one failed.
#[test]
fn a_timed_out_worker_logs_the_blocking_line_before_it_is_killed() {
    let runs: Vec<_> = ["tb-a", "tb-b"]
        .into_iter()
        .map(|name| std::thread::spawn(move || traceback_before_each_kill(name, 5)))
        .collect();
    let results: Vec<_> = runs.into_iter().map(|t| t.join()).collect();
    for r in results {
        if let Err(panic) = r {
            std::panic::resume_unwind(panic);
        }
    }
}

fn cmdline(pid: i32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// A worker's view of itself: its argv and the bootstrap variable, if it leaked.
fn inside(h: &Harness) -> serde_json::Value {
    let (status, body) =
        http_request(h.addr(), "GET", "/inside", None, Duration::from_secs(10)).expect("GET");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

fn check_titles(h: &mut Harness, preload: bool) {
    let app = "introspect_app:main";
    let workers = h.wait_workers(2, BOOT);
    let mut slots = Vec::new();
    for &pid in &workers {
        let line = cmdline(pid);
        let text = String::from_utf8_lossy(&line).into_owned();
        h.check(
            line.len() < 200,
            &format!(
                "worker {pid}: a short command line, got {} bytes",
                line.len()
            ),
        );
        let slot = text
            .strip_prefix("procman: worker ")
            .and_then(|rest| rest.strip_suffix(&format!(" gen 1 [{app}]\0")))
            .and_then(|s| s.parse::<usize>().ok());
        h.check(
            slot.is_some(),
            &format!("worker {pid}: title {text:?} is `procman: worker S gen 1 [{app}]`"),
        );
        slots.extend(slot);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        h.check(comm.trim() == "procman: worker", &format!("comm {comm:?}"));
    }
    slots.sort();
    assert_eq!(slots, vec![0, 1]);
    let zygotes: Vec<i32> = h
        .children()
        .into_iter()
        .filter(|p| !workers.contains(p))
        .collect();
    if preload {
        h.check(zygotes.len() == 1, &format!("one zygote, got {zygotes:?}"));
        let text = String::from_utf8_lossy(&cmdline(zygotes[0])).into_owned();
        h.check(
            text == format!("procman: zygote gen 1 [{app}]\0"),
            &format!("zygote title {text:?}"),
        );
    }
    for _ in 0..4 {
        let v = inside(h);
        assert_eq!(v["argv"], serde_json::json!(["-c"]), "{v}");
        assert_eq!(v["leaked"], serde_json::json!([]), "{v}");
    }
}

#[test]
fn workers_show_short_titles_naming_the_app() {
    let mut h = uvicorn("titles", &apps_dir(), "introspect_app:main", &["-w", "2"]).spawn();
    check_titles(&mut h, false);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

#[test]
fn a_zygote_and_its_workers_show_short_titles_naming_the_app() {
    let mut h = uvicorn(
        "titles-pre",
        &apps_dir(),
        "introspect_app:main",
        &["-w", "2", "--preload"],
    )
    .spawn();
    check_titles(&mut h, true);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}
