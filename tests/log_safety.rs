//! The log and what procman prints are the operator's, not the workers'
//! (issue 24, item 5).
//!
//! Item 5: what a worker sends (`STATUS=`, `ERRNO=`, `X_PROCMAN_ERROR`,
//! `X_PROCMAN_RECYCLE`, a traceback) reaches the text log and the control
//! client escaped: no raw control character, no line that passes for one of
//! procman's, each traceback line marked as that worker's.
//!
//! Tests that need root say so and return early without it.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

/// A line of procman's text log starts like this one (any time, any pid).
const FORGED_TIME: &str = "[2026-01-01T00:00:00.000000Z]";

/// The characters no printed text of procman's may hold raw: controls
/// other than the newline ending a line (ESC, CR, BEL, DEL, C1).
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| c.is_control() && c != '\n')
        .collect()
}

/// Hostile text: clears the screen, sets the terminal title, returns the
/// carriage and writes what looks like a line of procman's.
fn hostile(what: &str) -> String {
    format!("\x1b[2J\x1b]0;owned\x07\r{FORGED_TIME} [1] [INFO] forged {what}\u{9b}31m\x7f")
}

/// A stdlib-only command worker that sends `now` (one datagram each) to
/// NOTIFY_SOCKET, then `once` if no earlier worker of this test did, then
/// runs `then` (Python statements). Its own stderr is closed first: it
/// shares procman's, which the tests read.
fn notifying_worker(dir: &Path, now: &[String], once: &[String], then: &str) -> Vec<String> {
    let script = dir.join("hostile_worker.py");
    let messages = dir.join("messages.json");
    std::fs::write(
        &messages,
        serde_json::json!({"now": now, "once": once, "marker": dir.join("sent-once")}).to_string(),
    )
    .expect("write messages");
    std::fs::write(
        &script,
        format!(
            r#"import json, os, socket, sys, time
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
with open({path:?}) as f:
    todo = json.load(f)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for m in todo["now"]:
    s.sendto(m.encode(), addr)
if todo["once"] and not os.path.exists(todo["marker"]):
    open(todo["marker"], "w").close()
    for m in todo["once"]:
        s.sendto(m.encode(), addr)
{then}
"#,
            path = messages.display().to_string()
        ),
    )
    .expect("write worker");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    vec![
        python3().display().to_string(),
        script.display().to_string(),
    ]
}

// ---- item 5: worker text cannot forge log lines or drive the terminal ----

#[test]
fn worker_text_in_the_text_log_is_escaped_and_its_traceback_marked() {
    let start = Start::new("log-forge", &["-w", "1", "--ready", "notify"]);
    let traceback = format!(
        "Traceback (most recent call last):\n  File \"app.py\", line 1\n{FORGED_TIME} [1] [INFO] forged traceback line\r\n\x1b[31mRuntimeError: boom"
    );
    let messages = vec![
        format!("STATUS={}", hostile("status")),
        format!("ERRNO={}", hostile("errno")),
        format!("X_PROCMAN_ERROR={}", hostile("error")),
        format!(
            "X_PROCMAN_TRACEBACK={}",
            serde_json::to_string(&traceback).expect("json")
        ),
    ];
    let command = notifying_worker(start.dir(), &messages, &[], "sys.exit(1)");
    let mut h = start.args(["--"]).args(&command).spawn();
    h.check(
        h.wait_log("could not load the app", BOOT),
        "the traceback was logged",
    );
    h.signal(Signal::SIGTERM);
    h.wait_exit(BOOT);
    let log = h.log_text();
    let raw = raw_controls(&log);
    h.check(
        raw.is_empty(),
        &format!("raw control characters in the text log: {raw:?}"),
    );
    h.check(
        !log.lines().any(|l| l.starts_with(FORGED_TIME)),
        "a worker's text started a line that passes for procman's",
    );
    for what in ["status", "errno"] {
        h.check(
            log.lines().any(|l| {
                l.starts_with('[')
                    && l.contains(&format!("forged {what}"))
                    && l.contains("\\x1b[2J")
                    && l.contains("\\r")
            }),
            &format!("the {what} is logged, escaped, on procman's line"),
        );
    }
    let pid = failed_worker(&log);
    let marker = format!("  worker {pid} traceback | ");
    h.check(
        log.lines()
            .any(|l| l.starts_with(&marker) && l.ends_with("forged traceback line")),
        &format!("each traceback line is marked as worker {pid}'s"),
    );
    h.check(
        log.lines()
            .any(|l| l.starts_with(&marker) && l.ends_with("\\x1b[31mRuntimeError: boom")),
        "the traceback's last line, escaped",
    );
}

#[test]
fn json_log_keeps_worker_text_as_one_escaped_value() {
    let start = Start::new("log-forge-json", &["-w", "1", "--ready", "notify"]).json();
    let traceback = format!("Traceback:\n{FORGED_TIME} [1] [INFO] forged\nRuntimeError: boom");
    let messages = vec![
        format!("STATUS={}", hostile("status")),
        format!(
            "X_PROCMAN_TRACEBACK={}",
            serde_json::to_string(&traceback).expect("json")
        ),
    ];
    let command = notifying_worker(start.dir(), &messages, &[], "sys.exit(1)");
    let mut h = start.args(["--"]).args(&command).spawn();
    h.check(
        h.wait_log("could not load the app", BOOT),
        "the traceback was logged",
    );
    h.signal(Signal::SIGTERM);
    h.wait_exit(BOOT);
    let log = h.log_text();
    let raw = raw_controls(&log);
    h.check(raw.is_empty(), &format!("raw controls: {raw:?}"));
    let messages = h.messages();
    h.check(
        messages.iter().any(|m| m.contains(&hostile("status"))),
        "the status, exactly, once the JSON is decoded",
    );
    h.check(
        messages
            .iter()
            .any(|m| m.ends_with(&format!("could not load the app:\n{traceback}"))),
        "the traceback is the end of its message, as before",
    );
}

/// The pid of the worker whose traceback was logged.
fn failed_worker(log: &str) -> i32 {
    log.lines()
        .find(|l| l.contains("could not load the app"))
        .and_then(|l| l.split("Worker ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or(0)
}

/// procman on a config file, with a control socket.
fn spawn_with_control(start: Start, file: &Path, sock: &Path) -> Harness {
    start
        .args([
            "-c",
            file.to_str().expect("utf8"),
            "--control-socket",
            sock.to_str().expect("utf8"),
        ])
        .spawn()
}

fn client(args: &[&str]) -> std::process::Output {
    Command::new(PROCMAN)
        .args(args)
        .output()
        .expect("run the client")
}

fn toml_list(items: &[String]) -> String {
    serde_json::to_string(items).expect("json")
}

#[test]
fn the_control_client_prints_worker_text_escaped() {
    let start = Start::new("control-forge", &[]);
    let file = start.dir().join("procman.toml");
    let sock = start.dir().join("ctl.sock");
    std::fs::write(&file, format!("workers = 1\ncommand = [\"{}\"]\n", hello())).expect("write");
    let bad = notifying_worker(
        start.dir(),
        &[format!("X_PROCMAN_ERROR={}", hostile("reload error"))],
        &[],
        "sys.exit(1)",
    );
    let mut h = spawn_with_control(start, &file, &sock);
    h.wait_workers(1, BOOT);
    std::fs::write(
        &file,
        format!(
            "workers = 1\nready-after = '10s'\ncommand = {}\n",
            toml_list(&bad)
        ),
    )
    .expect("write");
    let s = sock.to_str().expect("utf8");
    let out = client(&["reload", "--control-socket", s]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    h.check(
        out.status.code() == Some(1) && err.contains("forged reload error"),
        &format!("the reload failed, naming the worker's error: {out:?}"),
    );
    h.check(
        raw_controls(&err).is_empty() && err.lines().count() == 1,
        &format!("`procman reload` printed the error escaped, on one line: {err:?}"),
    );
    let out = client(&["status", "--control-socket", s]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    h.check(
        out.status.success() && table.contains("forged reload error"),
        &format!("status shows the failed reload: {out:?}"),
    );
    h.check(
        raw_controls(&table).is_empty() && !table.lines().any(|l| l.starts_with(FORGED_TIME)),
        &format!("`procman status` printed it escaped: {table:?}"),
    );
    let out = client(&["status", "--json", "--control-socket", s]);
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    h.check(
        raw_controls(&json).is_empty() && !json.contains('\u{9b}'),
        &format!("`procman status --json` has no raw C1 either: {json:?}"),
    );
    let value: serde_json::Value = serde_json::from_str(json.trim()).expect("still JSON");
    h.check(
        value["reload"]
            .as_str()
            .is_some_and(|r| r.contains(&hostile("reload error"))),
        "the JSON value is the worker's text, exactly",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_recycle_reason_is_logged_escaped() {
    let start = Start::new("recycle-forge", &["-w", "1", "--ready", "notify"]);
    let command = notifying_worker(
        start.dir(),
        &["READY=1".to_string()],
        &[format!("X_PROCMAN_RECYCLE={}", hostile("recycle"))],
        "while True:\n    time.sleep(1)",
    );
    let mut h = start.args(["--"]).args(&command).spawn();
    h.check(
        h.wait_log("asks to be recycled", BOOT),
        "the recycle request was logged",
    );
    h.signal(Signal::SIGTERM);
    h.wait_exit(BOOT);
    let log = h.log_text();
    let raw = raw_controls(&log);
    h.check(raw.is_empty(), &format!("raw controls: {raw:?}"));
    h.check(
        !log.lines().any(|l| l.starts_with(FORGED_TIME)),
        "a forged line",
    );
}
