//! Worker notifications: readiness, heartbeats, startup and heartbeat
//! timeouts, and the receiver's defences (credentials, passed fds).

mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(20);

/// `sh -c` that runs the test worker with `when` args if the environment
/// variable `var` is `value`, else with `otherwise`; exec keeps the pid.
fn switch(var: &str, value: &str, when: &str, otherwise: &str) -> Vec<String> {
    let w = notify_worker().join(" ");
    vec![
        "sh".into(),
        "-c".into(),
        format!("if [ \"${var}\" = {value} ]; then exec {w} {when}; else exec {w} {otherwise}; fi"),
    ]
}

/// The test worker with `slot0` args in slot 0 and `others` elsewhere.
fn per_slot(slot0: &str, others: &str) -> Vec<String> {
    switch("PROCMAN_WORKER_ID", "0", slot0, others)
}

/// The test worker with `first` args in generation 1 and `later` after.
fn per_generation(first: &str, later: &str) -> Vec<String> {
    switch("PROCMAN_GENERATION", "1", first, later)
}

/// procman's notify socket: the only `procman-*/notify.sock` in the
/// runtime directory the harness gives it (the directory's name is
/// unpredictable by design).
fn notify_socket(h: &Harness) -> PathBuf {
    let found = wait_for(Duration::from_secs(30), || {
        std::fs::read_dir(&h.dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("procman-"))
            .map(|e| e.path().join("notify.sock"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| panic!("no notify socket in {}", h.dir.display()))
}

/// Seconds from an event's `timestamp` (RFC 3339, UTC) within the day.
fn event_time(e: &serde_json::Value) -> Option<f64> {
    let ts = e["timestamp"].as_str()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

#[test]
fn readiness_gates_the_ready_log() {
    let h = Start::new("ready-gate", &["--ready", "notify", "--"])
        .json()
        .args(notify_worker())
        .args(["--ready-after", "1.5"])
        .spawn();
    let ready = h.expect_event("ready", BOOT, "ready", |_| true);
    let ready = event_time(&ready).expect("ready time");
    let boot = h
        .events_named("booting")
        .first()
        .and_then(event_time)
        .expect("boot time");
    h.check(
        ready - boot >= 1.4,
        &format!("ready {:.2}s after boot, before READY=1", ready - boot),
    );
}

#[test]
fn hup_stops_an_old_worker_only_once_its_replacement_is_ready() {
    let mut h = Start::new("hup-gated", &["--ready", "notify", "-w", "1", "--"])
        .json()
        .args(notify_worker())
        .args(["--ready-after", "1"])
        .spawn();
    let old = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "reload finished", |_| true);
    // The master logs in the order it decides: the replacement's ready
    // comes before the old worker's stop.
    let stopped = h
        .event_index("stopping", |e| {
            worker_of(e) == old && e["reason"] == "replaced"
        })
        .expect("old stopped");
    let new_ready = h
        .event_index("ready", |e| e["generation"] == 2 && worker_of(e) != old)
        .expect("new ready");
    h.check(
        new_ready < stopped,
        "old worker stopped before its replacement was ready",
    );
}

#[test]
fn never_ready_worker_is_killed_at_the_startup_timeout_and_procman_exits_3() {
    let t0 = Instant::now();
    let mut h = Start::new(
        "never-ready",
        &["--ready", "notify", "--startup-timeout", "1", "--"],
    )
    .json()
    .args(notify_worker())
    .args(["--never-ready"])
    .spawn();
    assert_eq!(h.exit_code(Duration::from_secs(30)), 3, "{}", h.log_text());
    h.check(
        h.has_event("stopping", |e| e["reason"] == "startup-timeout"),
        "startup timeout logged",
    );
    h.check(!h.has_event("ready", |_| true), "never counted as ready");
    h.check(
        t0.elapsed() < Duration::from_secs(25),
        "gave up in bounded time",
    );
}

#[test]
fn a_replacement_that_never_becomes_ready_leaves_the_old_worker_serving() {
    // The first worker gets all the time an interpreter may need to start
    // on a loaded machine; only the replacement, which never becomes ready
    // anyway, gets the short timeout (HUP re-reads the config file).
    let start = Start::new("reload-fails", &[]).json();
    let file = start.dir().join("procman.toml");
    std::fs::write(&file, "startup-timeout = '60s'\n").expect("config");
    let mut h = start
        .args(["-c", file.to_str().expect("utf-8 path")])
        .args(["--ready", "notify", "--"])
        .args(per_generation("", "--never-ready"))
        .spawn();
    let old = h.wait_workers(1, BOOT);
    std::fs::write(&file, "startup-timeout = '1s'\n").expect("config");
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-failed", BOOT, "reload failure reported", |e| {
        e["generation"] == 2
    });
    h.check(
        h.has_event("stopping", |e| {
            e["generation"] == 2 && e["reason"] == "startup-timeout"
        }),
        "the replacement was killed at its startup timeout",
    );
    let still = h.wait_workers(1, BOOT);
    assert_eq!(old, still, "the old worker keeps serving");
    assert!(
        h.wait_exit(Duration::from_millis(300)).is_none(),
        "procman keeps running"
    );
}

#[test]
fn silent_worker_is_aborted_and_replaced_while_the_others_are_untouched() {
    let mut h = Start::new("silent", &["-w", "2", "-t", "2", "--"])
        .json()
        .args(per_slot(
            "--heartbeat 0.3 --silent-after 0.5",
            "--heartbeat 0.3",
        ))
        .spawn();
    let first = h.wait_workers(2, BOOT);
    let stop = h.expect_event("stopping", BOOT, "timeout logged", |e| {
        e["reason"] == "timeout"
    });
    h.check(stop["slot"] == 0, &format!("slot 0 timed out: {stop}"));
    let victim = worker_of(&stop);
    // How long it was silent is said only in the message, for the operator.
    let line = stop["message"].as_str().unwrap_or_default().to_string();
    h.check(
        line.contains("timed out after 2s"),
        &format!("timed out after 2 s of silence: {line}"),
    );
    let exit = h.expect_event("exited", BOOT, "aborted", |e| {
        worker_of(e) == victim && e["reason"] == "timeout"
    });
    // SIGABRT ended it (not the SIGKILL that follows a second later).
    h.check(
        exit["message"]
            .as_str()
            .is_some_and(|m| m.contains("killed by SIGABRT")),
        &format!("ended by SIGABRT: {exit}"),
    );
    let now: BTreeSet<i32> = h.wait_workers(2, BOOT);
    let survivors: Vec<_> = first.intersection(&now).collect();
    assert_eq!(
        survivors.len(),
        1,
        "slot 1 kept its pid: {first:?} -> {now:?}"
    );
    // How late the abort came after the deadline (reported in the notes).
    let hb_deadline_late = line
        .split("timed out after ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse::<f64>().ok());
    eprintln!("timeout fired at silence = {hb_deadline_late:?}s for -t 2");
}

#[test]
fn watchdog_trigger_counts_as_a_timeout() {
    // A ready worker's notifications are read at least every 2 × timeout/3
    // (here 2 s): WATCHDOG=trigger is acted on by then.
    let mut h = Start::new("trigger", &["-w", "1", "-t", "3", "--"])
        .json()
        .args(per_slot("--watchdog-trigger-after 0.5", ""))
        .spawn();
    let first = h.wait_workers(1, BOOT);
    h.expect_event("stopping", BOOT, "trigger handled", |e| {
        first.contains(&worker_of(e)) && e["reason"] == "watchdog-trigger"
    });
    h.expect_event("exited", BOOT, "counted as a timeout", |e| {
        first.contains(&worker_of(e)) && e["reason"] == "timeout"
    });
}

/// `systemd-notify` (a C program: it starts in milliseconds, where a
/// Python interpreter on a loaded machine can take more than a second).
fn systemd_notify() -> String {
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("systemd-notify"))
        .find(|p| p.exists());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!("systemd-notify is missing: run scripts/test (it installs systemd)"),
    }
}

#[test]
fn extend_timeout_pushes_the_startup_deadline_back() {
    // The request for more time must come before the 1 s deadline, so not
    // from the Python worker, whose interpreter may not even have started
    // by then: from systemd-notify, in the background of the worker's
    // shell, which then execs the worker (same pid). Its exit status is
    // never collected, so it stays a child of the worker (a zombie) and
    // procman can attribute its message whenever it reads it.
    let script = format!(
        "{} --no-block EXTEND_TIMEOUT_USEC=60000000 & exec {} --ready-after 2",
        systemd_notify(),
        notify_worker().join(" ")
    );
    let h = Start::new(
        "extend",
        &[
            "--ready",
            "notify",
            "--startup-timeout",
            "1",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .json()
    .spawn();
    h.expect_event("all-ready", BOOT, "became ready after 2s", |_| true);
    h.check(
        !h.has_event("stopping", |e| e["reason"] == "startup-timeout"),
        "not killed at 1s",
    );
}

#[test]
fn notifications_from_a_process_that_is_not_a_worker_are_ignored() {
    let mut h = Start::new("stray", &["--log-level", "debug", "-w", "1", "--"])
        .json()
        .args(notify_worker())
        .spawn();
    let before = h.wait_workers(1, BOOT);
    let sock = notify_socket(&h);
    let mut senders = Vec::new();
    for msg in ["WATCHDOG=trigger", "READY=1", "X_PROCMAN_RECYCLE=stray"] {
        let mut child = Command::new(python3())
            .arg(repo().join("tests/workers/send_notify.py"))
            .arg(&sock)
            .arg(msg)
            .spawn()
            .expect("send_notify");
        senders.push(child.id() as i64);
        assert!(child.wait().expect("wait").success());
    }
    // Each of the three was handled (and dropped) before looking for what
    // it must not have done.
    h.expect_events(
        "notify-dropped",
        3,
        BOOT,
        "stray messages dropped at debug",
        |e| e["process"].as_i64().is_some_and(|p| senders.contains(&p)),
    );
    let after = h.wait_workers(1, BOOT);
    assert_eq!(before, after);
    h.check(!h.has_event("stopping", |_| true), "no abort");
    h.check(
        !h.has_event("recycle-asked", |_| true) && !h.has_event("recycling", |_| true),
        "no recycle",
    );
}

#[test]
fn file_descriptors_passed_with_a_notification_are_closed() {
    let mut h = Start::new("passed-fds", &["-w", "1", "--"])
        .args(notify_worker())
        .spawn();
    h.wait_workers(1, BOOT);
    let before = open_fds(h.pid).len();
    let sock = notify_socket(&h);
    for _ in 0..20 {
        let out = Command::new(python3())
            .arg(repo().join("tests/workers/send_notify.py"))
            .arg(&sock)
            .arg("STATUS=hello")
            .arg("--with-fd")
            .output()
            .expect("send_notify");
        // Refused by the kernel where it has SO_PASSRIGHTS (EPERM), else
        // received and never left open (README, Security).
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("Operation not permitted"),
            "{err}"
        );
    }
    // The master handles datagrams as they come; give it a moment to drain.
    let settled = wait_for(BOOT, || (open_fds(h.pid).len() <= before).then_some(()));
    h.check(
        settled.is_some(),
        &format!("master fds grew: {before} -> {}", open_fds(h.pid).len()),
    );
}

#[test]
fn ready_sent_just_before_an_exit_is_still_attributed() {
    let mut h = Start::new("ready-exit", &["--ready", "notify", "--"])
        .json()
        .args(notify_worker())
        .args(["--exit-after-ready"])
        .spawn();
    assert_eq!(h.exit_code(Duration::from_secs(30)), 3);
    let booted = h.events_named("booting");
    h.check(!booted.is_empty(), "workers booted");
    for b in booted {
        let pid = worker_of(&b);
        h.check(
            h.has_event("ready", |e| worker_of(e) == pid && e["slot"] == 0),
            &format!("READY=1 of {pid} was attributed before its exit"),
        );
    }
}

#[test]
fn a_suspended_master_does_not_kill_healthy_workers_when_it_resumes() {
    let mut h = Start::new("sigstop", &["-w", "2", "-t", "2", "--"])
        .json()
        .args(notify_worker())
        .args(["--heartbeat", "0.5"])
        .spawn();
    let before = h.wait_workers(2, BOOT);
    h.signal(Signal::SIGSTOP);
    // The scenario itself: the master is frozen past the timeout.
    std::thread::sleep(Duration::from_secs(4));
    h.signal(Signal::SIGCONT);
    h.expect_event("suspended", BOOT, "suspension noticed", |_| true);
    // Nothing happens to wait for: the test is that nobody is killed in
    // the window of another timeout period.
    std::thread::sleep(Duration::from_secs(3));
    let after = h.wait_workers(2, BOOT);
    assert_eq!(before, after, "{}", h.log_text());
    h.check(
        !h.has_event("stopping", |e| e["reason"] == "timeout"),
        "no timeout kill",
    );
}

#[test]
fn healthy_idle_workers_are_never_timed_out_while_the_master_reads_heartbeats_lazily() {
    // Heartbeats every second (the test worker's WATCHDOG_USEC/2), a 2 s
    // timeout: the master reads them in batches once all are ready.
    let mut h = Start::new(
        "lazy",
        &["-w", "3", "-t", "2", "--log-level", "debug", "--"],
    )
    .json()
    .args(notify_worker())
    .spawn();
    let before = h.wait_workers(3, BOOT);
    h.expect_event(
        "notify-pace",
        BOOT,
        "all ready: the notify socket leaves the poll set",
        |e| e["pace"] == "lazy",
    );
    // The scenario: idle for three timeouts; nothing happens to wait for.
    std::thread::sleep(Duration::from_secs(6));
    let after = h.wait_workers(3, BOOT);
    assert_eq!(before, after, "{}", h.log_text());
    h.check(
        !h.has_event("stopping", |e| e["reason"] == "timeout"),
        "no healthy worker timed out",
    );
}

#[test]
fn exec_readiness_tolerates_workers_that_notify_anyway() {
    let mut h = Start::new("exec-notify", &["-w", "2", "--"])
        .json()
        .args(notify_worker())
        .spawn();
    h.wait_workers(2, BOOT);
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    // Each worker is marked ready once, at exec, and its READY=1 changes nothing.
    assert_eq!(h.count_events("ready", |_| true), 2, "{}", h.log_text());
}

#[test]
fn a_worker_that_says_it_is_stopping_gets_a_replacement() {
    let start = Start::new("draining", &[]).json();
    let marker = start.dir().join("said-stopping");
    let sender = format!(
        "{} {}",
        python3().display(),
        repo().join("tests/workers/send_notify.py").display()
    );
    let script = format!(
        "if [ ! -e {m} ]; then touch {m}; {sender} \"$NOTIFY_SOCKET\" STOPPING=1; fi; exec {w}",
        m = marker.display(),
        w = notify_worker().join(" ")
    );
    let mut h = start
        .args(["--log-level", "debug", "-w", "1", "--", "sh", "-c", &script])
        .spawn();
    let draining = h.expect_event(
        "draining",
        BOOT,
        "STOPPING=1 attributed (sent by a child of the worker)",
        |_| true,
    );
    let first = worker_of(&draining);
    h.check(
        h.events_named("booting").first().map(worker_of) == Some(first),
        "the first worker drains",
    );
    h.expect_event("stopping", BOOT, "the draining worker was replaced", |e| {
        worker_of(e) == first && e["reason"] == "replaced"
    });
    let now = h.wait_workers(1, BOOT);
    assert!(!now.contains(&first));
}

#[test]
fn extend_timeout_during_a_stop_pushes_the_kill_back() {
    // On TERM a helper of the worker asks for more time and takes 2 s:
    // past --graceful-timeout 1. The worker (the shell) waits for it.
    let start = Start::new("extend-stop", &[]).json();
    let (start, ready) = slow_stopping_worker(start);
    let mut h = start.spawn();
    wait_slow_stopper(&h, &ready, BOOT);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    // How it ended is said in the exit's message (status 0, no signal).
    let exit = h.expect_event("exited", BOOT, "the worker exited", |_| true);
    h.check(
        exit["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited cleanly")),
        &format!("the worker finished its stop: {exit}"),
    );
    h.check(
        !h.has_event("killing", |_| true),
        "no SIGKILL at the original deadline",
    );
}

#[test]
fn extend_timeout_during_a_quick_stop_does_not_delay_the_kill() {
    // On the stop signal the worker asks for 60 s more and never exits: a
    // quick stop still kills it after its 2 s. The worker is already
    // running when it is asked to stop, so its request is not raced
    // against the 2 s by an interpreter's start-up.
    let mut worker = notify_worker();
    worker.extend(["--extend-on-term".to_string(), "60000000".into()]);
    let mut args = vec!["--graceful-timeout", "60", "--"];
    args.extend(worker.iter().map(String::as_str));
    let mut h = Start::new("extend-quick", &args).json().spawn();
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    h.signal(Signal::SIGINT);
    let status = h.wait_exit(Duration::from_secs(15));
    h.check(
        status.is_some(),
        "the extension delayed the quick stop's kill",
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    // Not a lifecycle event: the notice that the request was capped.
    h.check(
        h.messages()
            .iter()
            .any(|m| m.contains("more time to stop; a quick stop allows")),
        "the extension was received and capped",
    );
    h.check(
        h.has_event("killing", |_| true),
        "killed at the quick stop's deadline",
    );
}

#[test]
fn a_worker_killed_after_its_heartbeat_timeout_is_said_to_be_killed_by_procman() {
    // The worker ignores SIGABRT (inherited through exec), so the SIGKILL
    // a second later is what ends it: procman says it sent it.
    let worker = format!(
        "trap '' ABRT; exec {} --heartbeat 0.2 --silent-after 0.5",
        notify_worker().join(" ")
    );
    let h = Start::new(
        "hb-kill",
        &["-w", "1", "-t", "1", "--", "sh", "-c", &worker],
    )
    .json()
    .spawn();
    let exit = h.expect_event(
        "exited",
        BOOT,
        "the worker was killed after its timeout",
        |e| e["reason"] == "timeout",
    );
    h.check(
        h.has_event("killing", |e| worker_of(e) == worker_of(&exit)),
        "procman sent the SIGKILL",
    );
    // What the operator reads: the kill is procman's, not the OOM killer's.
    let message = exit["message"].as_str().unwrap_or_default();
    h.check(
        message.contains("exited after its timeout: killed by procman after a heartbeat timeout"),
        "the kill is named as procman's",
    );
    h.check(
        !h.messages()
            .iter()
            .any(|m| m.contains("perhaps out of memory")),
        "no OOM suspicion for procman's own kill",
    );
}

/// Forks a helper in a process group of its own and exits: the helper,
/// re-parented to procman (a child subreaper), is then neither in its
/// worker's process group nor below it; it sends a STATUS= and touches
/// `sent`, then waits (its /proc entry is read when the datagram is
/// attributed).
const ORPHANED_HELPER: &str = "import os, socket, time
parent = os.getpid()
if os.fork() == 0:
    os.setpgid(0, 0)
    while os.getppid() == parent:
        time.sleep(0.01)
    addr = os.environ['NOTIFY_SOCKET']
    addr = '\\0' + addr[1:] if addr.startswith('@') else addr
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'STATUS=from an orphaned helper', addr)
    open('sent', 'w').close()
    time.sleep(60)
os._exit(0)
";

#[test]
fn a_helper_that_left_its_workers_group_and_ancestry_is_attributed_by_its_session() {
    let start = Start::new("notify-session", &["-w", "1", "--ready", "notify"]).json();
    std::fs::write(start.dir().join("orphan.py"), ORPHANED_HELPER).expect("helper");
    let worker = notify_worker()
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        "'{}' orphan.py; while [ ! -e sent ]; do sleep 0.02; done; exec {worker}",
        python3().display()
    );
    let h = start.args(["--", "sh", "-c", &script]).spawn();
    let booting = h.expect_event("booting", BOOT, "the worker booting", |_| true);
    let pid = worker_of(&booting);
    // Sent while the worker still starts: the socket is read at once.
    h.check(
        h.wait_log(
            &format!("Worker {pid} (slot 0) status: from an orphaned helper"),
            BOOT,
        ),
        "the helper's STATUS= attributed to its worker",
    );
}
