//! The log and what procman prints are the operator's, not the workers'
//! (issue 24, items 4 and 5).
//!
//! Item 4: a root procman opens `--log-file` without following a symlink,
//! in the directory it named at start, and keeps only a regular file with
//! one link (owned by root or the workers' user with `--user`): at start a
//! refused file is one line and exit 1; at USR1 the old file stays open and
//! one warning says why. The planting steps run as `nobody` (setpriv).
//!
//! Item 5: what a worker sends (`STATUS=`, `ERRNO=`, `X_PROCMAN_ERROR`,
//! `X_PROCMAN_RECYCLE`, a traceback) reaches the text log and the control
//! client escaped: no raw control character, no line that passes for one of
//! procman's, each traceback line marked as that worker's.
//!
//! Tests that need root say so and return early without it.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);
const NOBODY: u32 = 65534;

/// A line of procman's text log starts like this one (any time, any pid).
const FORGED_TIME: &str = "[2026-01-01T00:00:00.000000Z]";

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: this test needs root");
    }
    root
}

/// Runs a command as nobody (and nobody's group), for planting steps.
fn as_nobody(args: &[&str]) {
    let status = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(args)
        .status()
        .expect("setpriv (util-linux)");
    assert!(status.success(), "as nobody: {args:?}: {status}");
}

fn mkdir(path: &Path, mode: u32, owner: u32) {
    std::fs::create_dir(path).expect("mkdir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).expect("chown");
}

/// A copy of `hello` that nobody can execute.
fn hello_for_nobody(dir: &Path) -> String {
    let exe = dir.join("hello");
    std::fs::copy(hello(), &exe).expect("copy hello");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    exe.display().to_string()
}

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
        h.wait_log("failed to boot", BOOT),
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
        h.wait_log("failed to boot", BOOT),
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
            .any(|m| m.ends_with(&format!("failed to boot:\n{traceback}"))),
        "the traceback is the end of its message, as before",
    );
}

/// The pid of the worker whose traceback was logged.
fn failed_worker(log: &str) -> i32 {
    log.lines()
        .find(|l| l.contains("failed to boot"))
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

// ---- item 4: --log-file is safe as root ----

/// A test dir nobody can traverse, with `app/` (nobody's, where the log
/// is) and `rootonly/` (0700, root's).
fn log_dirs(start: &Start) -> (PathBuf, PathBuf) {
    let dir = start.dir().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = dir.join("app");
    mkdir(&app, 0o755, NOBODY);
    let rootonly = dir.join("rootonly");
    mkdir(&rootonly, 0o700, 0);
    (app, rootonly)
}

/// The JSON events in a log file.
fn events_in(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count_event(file: &Path, name: &str) -> usize {
    events_in(file)
        .iter()
        .filter(|v| v["event"] == name)
        .count()
}

/// Sends USR1 and waits until `file` holds `n` events `name`.
fn usr1_until(h: &Harness, file: &Path, name: &str, n: usize) -> bool {
    h.signal(Signal::SIGUSR1);
    wait_for(BOOT, || (count_event(file, name) >= n).then_some(())).is_some()
}

#[test]
fn usr1_never_follows_a_symlink_a_worker_planted_nor_keeps_a_wrong_file() {
    if !is_root() {
        return;
    }
    let start = Start::new("log-swap", &["-w", "1", "-u", "nobody"]).json();
    let (app, rootonly) = log_dirs(&start);
    let hello = hello_for_nobody(start.dir());
    let log = app.join("procman.log");
    let mut h = start
        .args(["--log-file", log.to_str().expect("utf8"), "--", &hello])
        .spawn();
    let ready = wait_for(BOOT, || (count_event(&log, "all-ready") > 0).then_some(()));
    h.check(ready.is_some(), "workers ready, logged to the file");

    // A process of the workers' uid swaps the log for a symlink into a
    // root-only directory.
    let old = app.join("old.log");
    let victim = rootonly.join("created-by-root");
    as_nobody(&[
        "mv",
        log.to_str().expect("utf8"),
        old.to_str().expect("utf8"),
    ]);
    as_nobody(&[
        "ln",
        "-s",
        victim.to_str().expect("utf8"),
        log.to_str().expect("utf8"),
    ]);
    h.signal(Signal::SIGUSR1);
    let handled = wait_for(BOOT, || {
        (count_event(&old, "log-reopen-failed") > 0 || victim.exists()).then_some(())
    });
    h.check(handled.is_some(), "USR1 was handled");
    h.check(
        !victim.exists(),
        "root created a file through the planted symlink",
    );
    let failed: Vec<serde_json::Value> = events_in(&old)
        .into_iter()
        .filter(|v| v["event"] == "log-reopen-failed")
        .collect();
    h.check(
        failed.len() == 1
            && failed[0]["level"] == "WARNING"
            && failed[0]["message"].as_str().is_some_and(|m| {
                m.contains(log.to_str().unwrap_or("?")) && m.contains("symbolic link")
            }),
        &format!("one warning in the old file naming the path and why: {failed:?}"),
    );

    // Other files that are not the log: each refused, the old file kept.
    std::fs::remove_file(&log).expect("unlink the symlink");
    let root_file = rootonly.join("secret");
    std::fs::write(&root_file, "root's\n").expect("write");
    std::fs::hard_link(&root_file, &log).expect("hard link");
    h.check(
        usr1_until(&h, &old, "log-reopen-failed", 2),
        "a hard link is refused",
    );
    std::fs::remove_file(&log).expect("unlink");
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    h.check(
        usr1_until(&h, &old, "log-reopen-failed", 3),
        "a FIFO is refused (and the open did not wait for a reader)",
    );
    std::fs::remove_file(&log).expect("unlink");
    std::fs::write(&log, "").expect("write");
    std::os::unix::fs::chown(&log, Some(1234), Some(1234)).expect("chown");
    h.check(
        usr1_until(&h, &old, "log-reopen-failed", 4),
        "a file of another user is refused",
    );
    let messages: Vec<String> = events_in(&old)
        .iter()
        .filter(|v| v["event"] == "log-reopen-failed")
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect();
    h.check(
        messages[1].contains("hard links")
            && messages[2].contains("FIFO")
            && messages[3].contains("uid 1234"),
        &format!("each refusal says why: {messages:?}"),
    );
    h.check(
        std::fs::read_to_string(&root_file).ok().as_deref() == Some("root's\n"),
        "nothing was written to the hard-linked file",
    );

    // The workers' user's own file is the log again.
    std::fs::remove_file(&log).expect("unlink");
    as_nobody(&["touch", log.to_str().expect("utf8")]);
    h.check(
        usr1_until(&h, &log, "log-reopened", 1),
        "a regular file of the workers' user is reopened",
    );
    h.signal(Signal::SIGTERM);
    let code = h.exit_code(BOOT);
    h.check(code == 0, &format!("clean stop, got exit {code}"));
}

/// procman started on `log` (with `--user nobody`): it must exit 1 at once
/// with one line naming the path and `why`.
fn refused_at_start(name: &str, plant: impl FnOnce(&Path, &Path), why: &str) {
    let start = Start::new(name, &["-w", "1", "-u", "nobody"]);
    let (app, rootonly) = log_dirs(&start);
    let hello = hello_for_nobody(start.dir());
    let log = app.join("procman.log");
    plant(&log, &rootonly);
    let mut h = start
        .args(["--log-file", log.to_str().expect("utf8"), "--", &hello])
        .spawn();
    let code = h.exit_code(BOOT);
    let text = h.log_text();
    h.check(
        code == 1,
        &format!("{name}: exit 1 (runtime), got {code}: {text}"),
    );
    let lines: Vec<&str> = text.lines().collect();
    h.check(
        lines.len() == 1
            && lines[0].starts_with("procman: error: cannot open log file ")
            && lines[0].contains(log.to_str().unwrap_or("?"))
            && lines[0].contains(why),
        &format!("{name}: one line naming the path and {why:?}: {text}"),
    );
}

#[test]
fn a_log_file_that_is_not_a_plain_file_of_root_or_the_user_is_refused_at_start() {
    if !is_root() {
        return;
    }
    refused_at_start(
        "log-start-symlink",
        |log, rootonly| {
            std::os::unix::fs::symlink(rootonly.join("x"), log).expect("symlink");
            // Nothing is created through it.
            assert!(!rootonly.join("x").exists());
        },
        "symbolic link",
    );
    refused_at_start(
        "log-start-fifo",
        |log, _| {
            nix::unistd::mkfifo(log, nix::sys::stat::Mode::from_bits_truncate(0o666))
                .expect("mkfifo")
        },
        "FIFO",
    );
    refused_at_start(
        "log-start-owner",
        |log, _| {
            std::fs::write(log, "").expect("write");
            std::os::unix::fs::chown(log, Some(1234), Some(1234)).expect("chown");
        },
        "belongs to uid 1234",
    );
    refused_at_start(
        "log-start-dir",
        |log, _| std::fs::create_dir(log).expect("mkdir"),
        "directory",
    );
}

#[test]
fn the_log_file_of_root_or_the_user_is_accepted_and_made_if_absent() {
    if !is_root() {
        return;
    }
    for (name, owner) in [
        ("log-new", None),
        ("log-root", Some(0)),
        ("log-user", Some(NOBODY)),
    ] {
        let start = Start::new(name, &["-w", "1", "-u", "nobody"]).json();
        let (app, _) = log_dirs(&start);
        let hello = hello_for_nobody(start.dir());
        let log = app.join("procman.log");
        if let Some(uid) = owner {
            std::fs::write(&log, "").expect("write");
            std::os::unix::fs::chown(&log, Some(uid), Some(uid)).expect("chown");
        }
        let mut h = start
            .args(["--log-file", log.to_str().expect("utf8"), "--", &hello])
            .spawn();
        let ready = wait_for(BOOT, || (count_event(&log, "all-ready") > 0).then_some(()));
        h.check(ready.is_some(), &format!("{name}: logging to the file"));
        let meta = std::fs::symlink_metadata(&log).expect("stat");
        h.check(
            meta.is_file() && meta.uid() == owner.unwrap_or(0),
            &format!("{name}: the file is kept as it was"),
        );
        h.signal(Signal::SIGTERM);
        let code = h.exit_code(BOOT);
        h.check(code == 0, &format!("clean stop, got exit {code}"));
    }
}
