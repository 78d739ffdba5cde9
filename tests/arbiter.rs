//! The arbiter with command workers: binding, spawning, supervision,
//! signals and stop. Each test is one behaviour, on the real binary.

mod util;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(20);

fn hello_args(workers: &str) -> Vec<String> {
    vec!["-w".into(), workers.into(), "--".into(), hello()]
}

#[test]
fn distinct_worker_pids_answer() {
    let mut h = Start::new("distinct", &[])
        .json()
        .args(hello_args("3"))
        .spawn();
    let pids = h.wait_workers(3, BOOT);
    assert_eq!(pids.len(), 3);
    h.expect_event("all-ready", BOOT, "all 3 ready", |_| true);
    h.check(
        h.has_event("booting", |e| {
            e["slot"] == 2 && pids.contains(&worker_of(e))
        }),
        "slot 2 booted one of the workers that answered",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    for p in pids {
        assert!(!alive(p), "worker {p} outlived procman");
    }
}

#[test]
fn killed_worker_is_replaced_and_no_connection_is_refused() {
    let mut h = Start::new("kill9", &[])
        .json()
        .args(hello_args("2"))
        .spawn();
    let before = h.wait_workers(2, BOOT);
    // Ready (past the stability window): its death is a crash, not a
    // failed boot.
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    let load = Load::start(h.addr(), 4, 5000, Duration::from_secs(20));
    wait_for(BOOT, || (load.done() > 50).then_some(()));
    let victim = *before.iter().next().expect("a worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill -9");
    let replaced = wait_for(BOOT, || {
        load.pids()
            .iter()
            .any(|p| !before.contains(p))
            .then_some(())
    });
    let report = load.finish();
    h.check(replaced.is_some(), "a new pid answered after kill -9");
    // SIGKILL can cut the requests the victim itself was serving (at most
    // one per client thread); what must never happen is a refused connect:
    // the listening socket stays open through the respawn.
    let refused: Vec<_> = report
        .failures
        .iter()
        .filter(|f| f.starts_with("connect"))
        .collect();
    h.check(
        refused.is_empty() && report.failures.len() <= 4,
        &format!("failed requests: {:?} of {}", report.failures, report.ok),
    );
    h.expect_event(
        "exited",
        BOOT,
        "death logged as a crash (a kill procman did not make)",
        |e| worker_of(e) == victim && e["reason"] == "crash",
    );
    assert!(h.zombies().is_empty());
}

#[test]
fn term_lets_an_in_flight_request_complete() {
    let mut h = Start::new("term-inflight", &["-w", "1", "--"])
        .json()
        .args(notify_worker())
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let idle_fds = idle_fd_count(pid);
    let addr = h.addr();
    let slow = std::thread::spawn(move || {
        http_request(addr, "GET", "/slow?s=2", None, Duration::from_secs(20))
    });
    // The request is in flight once the worker holds one more fd (the
    // accepted connection).
    let accepted = wait_for(BOOT, || (open_fds(pid).len() > idle_fds).then_some(()));
    h.check(accepted.is_some(), "the slow request reached the worker");
    let t0 = Instant::now();
    h.signal(Signal::SIGTERM);
    let result = slow.join().expect("client thread");
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    let (status, body) = result.expect("slow request completes");
    assert_eq!(status, 200);
    assert_eq!(body.trim(), pid.to_string());
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "procman waited for the drain"
    );
    h.check(
        h.has_event("shutdown", |e| e["quick"] == false),
        "a graceful stop",
    );
}

#[test]
fn worker_ignoring_term_is_killed_at_the_graceful_timeout() {
    let mut h = Start::new("ignore-term", &["-w", "1", "--graceful-timeout", "1", "--"])
        .json()
        .args(notify_worker())
        .args(["--ignore-term"])
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let t0 = Instant::now();
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed too early: {took:?}"
    );
    h.check(
        h.has_event("killing", |e| worker_of(e) == pid),
        "kill logged",
    );
    h.check(
        h.has_event("exited", |e| {
            worker_of(e) == pid && e["reason"] == "shutdown"
        }),
        "the exit is the shutdown's",
    );
    // What the operator reads: procman says it killed the worker itself;
    // the OOM killer is suspected only for a SIGKILL procman did not send.
    let messages = h.messages().join("\n");
    h.check(
        messages.contains("exited: killed by procman after the graceful timeout"),
        "the kill is named as procman's",
    );
    h.check(
        !messages.contains("perhaps out of memory"),
        "no OOM suspicion for procman's own kill",
    );
    assert!(!alive(pid));
}

#[test]
fn ready_workers_killed_from_outside_right_after_start_are_respawned() {
    // Ready at exec, all within milliseconds (a worker that survived a
    // stability window would already have stayed up).
    let mut h = Start::new("outside-kill", &["--ready-after", "0"])
        .json()
        .args(hello_args("5"))
        .spawn();
    h.expect_event("all-ready", BOOT, "all 5 ready", |_| true);
    let first: Vec<i32> = h.children().into_iter().filter(|p| alive(*p)).collect();
    h.check(first.len() == 5, &format!("5 workers: {first:?}"));
    // An operator (or the OOM killer) kills them one after another, well
    // within a second of their start: a crash, not a failed boot.
    for p in &first {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL).expect("kill -9");
    }
    let verdict = wait_for(BOOT, || {
        if h.has_event("boot-failed", |_| true) {
            return Some(false);
        }
        let fresh: Vec<i32> = h
            .children()
            .into_iter()
            .filter(|p| alive(*p) && !first.contains(p))
            .collect();
        (fresh.len() == 5).then_some(true)
    });
    h.check(
        verdict == Some(true),
        "every slot was refilled, no failed boot",
    );
    let running = h.wait_exit(Duration::ZERO).is_none();
    h.check(running, "procman keeps running");
    h.check(
        h.count_events("exited", |e| {
            first.contains(&worker_of(e)) && e["reason"] == "crash"
        }) == 5,
        "each death is logged as a crash",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn usr1_leaves_command_workers_alone() {
    // hello keeps USR1's default action (terminate): forwarding it would
    // restart every worker at each log rotation.
    let mut h = Start::new("usr1-command", &[])
        .json()
        .args(hello_args("2"))
        .spawn();
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    let before = h.children();
    h.signal(Signal::SIGUSR1);
    h.expect_event("log-reopened", BOOT, "USR1 handled", |_| true);
    // A worker that got USR1 would be gone within milliseconds.
    let died = wait_for(Duration::from_secs(1), || {
        before.iter().find(|p| !alive(**p)).copied()
    });
    h.check(died.is_none(), &format!("worker {died:?} died of USR1"));
    h.check(h.children() == before, "the same workers serve");
    h.check(!h.has_event("exited", |_| true), "no worker exited");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn int_is_a_quick_stop() {
    let mut h = Start::new("int", &["-w", "2", "--graceful-timeout", "60", "--"])
        .json()
        .args(notify_worker())
        .args(["--ignore-term"])
        .spawn();
    h.wait_workers(2, BOOT);
    let t0 = Instant::now();
    h.signal(Signal::SIGINT);
    assert_eq!(h.exit_code(BOOT), 0);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "quick stop took {took:?}");
    h.check(
        h.has_event("shutdown", |e| e["quick"] == true),
        "a quick stop",
    );
}

#[test]
fn a_second_term_turns_a_graceful_stop_quick() {
    let mut h = Start::new("term-term", &["-w", "1", "--graceful-timeout", "60", "--"])
        .json()
        .args(notify_worker())
        .args(["--ignore-term"])
        .spawn();
    h.wait_workers(1, BOOT);
    h.signal(Signal::SIGTERM);
    h.expect_event("shutdown", BOOT, "graceful first", |e| e["quick"] == false);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(Duration::from_secs(15)), 0);
    h.check(
        h.has_event("shutdown", |e| {
            e["quick"] == true && e["reason"] == "second-signal"
        }),
        "escalation logged",
    );
}

#[test]
fn ttin_and_ttou_change_the_worker_count() {
    let mut h = Start::new("ttin", &[]).json().args(hello_args("2")).spawn();
    let first = h.wait_workers(2, BOOT);
    h.signal(Signal::SIGTTIN);
    let three = wait_for(BOOT, || (h.children().len() == 3).then_some(()));
    h.check(three.is_some(), "TTIN: 3 workers");
    h.wait_workers(3, BOOT);
    h.signal(Signal::SIGTTOU);
    let two = wait_for(BOOT, || (h.children().len() == 2).then_some(()));
    h.check(two.is_some(), "TTOU: back to 2 workers");
    // The oldest went first.
    let oldest_gone = first.iter().filter(|p| !alive(**p)).count();
    h.check(
        oldest_gone == 1,
        "TTOU stopped one of the original (oldest) workers",
    );
    h.signal(Signal::SIGTTOU);
    h.signal(Signal::SIGTTOU);
    let one = wait_for(BOOT, || (h.children().len() == 1).then_some(()));
    h.check(one.is_some(), "down to 1");
    // The two TTOUs above may have been one signal by the time procman
    // read them (a pending signal is not queued twice): count from here.
    let floor = |e: &serde_json::Value| e["reason"] == "floor" && e["workers"] == 1;
    let before = h.count_events("scaled", floor);
    h.signal(Signal::SIGTTOU);
    h.expect_events("scaled", before + 1, BOOT, "floor of one", floor);
    assert_eq!(h.children().len(), 1);
}

#[test]
fn hup_replaces_every_worker_without_failed_requests() {
    let mut h = Start::new("hup", &["-w", "3", "--"])
        .json()
        .args(notify_worker())
        .spawn();
    let old = h.wait_workers(3, BOOT);
    let load = Load::start(h.addr(), 4, 20_000, Duration::from_secs(30));
    wait_for(BOOT, || (load.done() > 50).then_some(()));
    h.signal(Signal::SIGHUP);
    let renewed = wait_for(BOOT, || {
        let kids: BTreeSet<i32> = h.children().into_iter().collect();
        (kids.len() == 3
            && kids.is_disjoint(&old)
            && h.has_event("reload-done", |e| e["generation"] == 2))
        .then_some(kids)
    });
    // Keep the load going a little past the switch.
    load.wait_more(100, BOOT);
    let report = load.finish();
    h.check(renewed.is_some(), "all workers replaced after HUP");
    h.check(
        report.failures.is_empty(),
        &format!(
            "failed requests during reload: {:?} (ok {})",
            report.failures, report.ok
        ),
    );
    let new = renewed.expect("checked");
    h.check(
        report.pids.iter().any(|p| new.contains(p)),
        "the new generation answered",
    );
    h.check(
        h.count_events("ready", |e| {
            e["generation"] == 2 && new.contains(&worker_of(e))
        }) == 3,
        "the new workers are generation 2",
    );
}

#[test]
fn false_exits_3_quickly_with_a_clear_message() {
    let t0 = Instant::now();
    let mut h = Start::new("false", &["--", "false"]).json().spawn();
    let code = h.exit_code(Duration::from_secs(20));
    assert_eq!(code, 3, "{}", h.log_text());
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    // The last line and the reason are what the operator reads.
    let log = h.log_text();
    h.check(
        log.contains("procman: error: workers failed to boot"),
        "final message",
    );
    h.check(
        h.messages()
            .iter()
            .any(|m| m.contains("exited with status 1")),
        "the worker's exit status",
    );
    h.check(
        h.count_events("booting", |_| true) == 5,
        "exactly 5 attempts",
    );
    h.check(
        h.count_events("boot-failed", |_| true) == 5,
        "each a failed boot",
    );
}

#[test]
fn master_sigkill_leaves_no_worker_and_frees_the_port() {
    let mut h = Start::new("master-kill", &[]).args(hello_args("3")).spawn();
    let pids = h.wait_workers(3, BOOT);
    let port = h.port();
    h.signal(Signal::SIGKILL);
    h.wait_exit(BOOT);
    let gone = wait_for(BOOT, || pids.iter().all(|p| !alive(*p)).then_some(()));
    assert!(gone.is_some(), "workers survived the master: {pids:?}");
    let rebind = wait_for(BOOT, || {
        TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).ok()
    });
    assert!(rebind.is_some(), "port {port} still held");
}

#[test]
fn worker_holds_only_stdio_and_the_listeners() {
    let h_dir = temp_dir("fds-sock");
    let sock = h_dir.join("s.sock");
    let mut h = Start::new("fds", &["-b", "127.0.0.1:0", "-b"])
        .args([format!("unix:{}", sock.display())])
        .args(hello_args("2"))
        .spawn();
    let pids = h.wait_workers(2, BOOT);
    for pid in pids {
        // Less the signalfd hello opens itself to watch its stop signal.
        let inherited: Vec<i32> = open_fds(pid)
            .into_iter()
            .filter(|fd| {
                std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                    .map_or(true, |l| l.to_string_lossy() != "anon_inode:[signalfd]")
            })
            .collect();
        assert_eq!(inherited, vec![0, 1, 2, 3, 4], "worker {pid}");
    }
    let _ = std::fs::remove_dir_all(h_dir);
}

#[test]
fn workers_get_their_own_pid_and_identity_in_the_environment() {
    let dir = temp_dir("env");
    let dump = dir.join("env-$PROCMAN_WORKER_ID.json");
    let script = format!(
        "exec {} {} --dump-env {}",
        notify_worker()[0],
        notify_worker()[1],
        dump.display()
    );
    let mut h = Start::new(
        "env",
        &["-w", "2", "-e", "EXTRA=yes", "--", "sh", "-c", &script],
    )
    .env("NOTIFY_SOCKET", "/nonexistent/systemd.sock")
    .env("LISTEN_FDNAMES", "bogus")
    .spawn();
    let pids = h.wait_workers(2, BOOT);
    for slot in 0..2 {
        let path = dir.join(format!("env-{slot}.json"));
        let text = wait_for(BOOT, || std::fs::read_to_string(&path).ok()).expect("env dump");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let pid: i32 = v["LISTEN_PID"]
            .as_str()
            .expect("LISTEN_PID")
            .parse()
            .expect("number");
        assert!(pids.contains(&pid), "LISTEN_PID {pid} is a worker's pid");
        assert_eq!(v["LISTEN_FDS"], "1");
        assert_eq!(v["PROCMAN_WORKER_ID"], slot.to_string());
        assert_eq!(v["PROCMAN_GENERATION"], "1");
        assert_eq!(v["EXTRA"], "yes");
        assert_eq!(v["WATCHDOG_PID"], v["LISTEN_PID"]);
        assert_eq!(v["WATCHDOG_USEC"], "30000000");
        assert!(v["LISTEN_FDNAMES"]
            .as_str()
            .expect("names")
            .starts_with("tcp-127.0.0.1-"));
        let notify = v["NOTIFY_SOCKET"].as_str().expect("NOTIFY_SOCKET");
        assert_ne!(
            notify, "/nonexistent/systemd.sock",
            "procman's own NOTIFY_SOCKET leaked"
        );
        assert_eq!(v["fds"], serde_json::json!([0, 1, 2, 3]));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ipv6_bind_serves() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback on this machine; nothing to test");
        return;
    }
    let mut h = Start::new("v6", &["-b", "[::1]:0"])
        .json()
        .args(hello_args("1"))
        .spawn();
    let port = wait_for(BOOT, || {
        h.events_named("listening").iter().find_map(|e| {
            let a = e["address"].as_str()?.strip_prefix("http://")?;
            a.parse::<SocketAddr>().ok().map(|a| a.port())
        })
    })
    .expect("v6 port logged");
    let addr: SocketAddr = format!("[::1]:{port}").parse().expect("addr");
    let got = wait_for(BOOT, || http_get(addr, "/").ok());
    h.check(matches!(got, Some((200, _))), "GET over IPv6");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn unix_socket_bind_serves_and_is_removed_at_exit() {
    let dir = temp_dir("unix-sock");
    let sock = dir.join("app.sock");
    let bind = format!("unix:{}", sock.display());
    let mut h = Start::new("unix", &["-b", &bind, "--"])
        .args(notify_worker())
        .spawn();
    let reply = wait_for(BOOT, || unix_get(&sock).ok());
    h.check(
        reply.as_deref().is_some_and(|r| r.starts_with("HTTP/1.")),
        "GET over the unix socket",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    assert!(!sock.exists(), "socket file removed at exit");
    let _ = std::fs::remove_dir_all(dir);
}

fn unix_get(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn busy_port_exits_1_and_starts_no_worker() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let mut h = Start::new("busy", &["-b", &addr])
        .json()
        .args(hello_args("2"))
        .spawn();
    assert_eq!(h.exit_code(BOOT), 1);
    let log = h.log_text();
    assert!(
        log.contains(&format!(
            "procman: error: cannot bind {addr}: Address already in use"
        )),
        "{log}"
    );
    assert!(!h.has_event("booting", |_| true), "{log}");
}

#[test]
fn unknown_command_is_a_usage_error() {
    let mut h = Harness::start("nocmd", &["--", "no-such-program-procman-test"]);
    assert_eq!(h.exit_code(BOOT), 2);
    let log = h.log_text();
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    assert!(
        log.contains("cannot find COMMAND 'no-such-program-procman-test'"),
        "{log}"
    );
}

#[test]
fn exec_failure_is_logged_with_its_reason() {
    let dir = temp_dir("badexec");
    let script = dir.join("bad-interpreter");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut h = Start::new("badexec", &["--", script.to_str().expect("utf8")])
        .json()
        .spawn();
    assert_eq!(h.exit_code(Duration::from_secs(20)), 3);
    h.check(h.has_event("boot-failed", |_| true), "a failed boot");
    // The reason, as the operator reads it.
    let messages = h.messages().join("\n");
    h.check(
        messages.contains("cannot execute") && messages.contains("No such file or directory"),
        "exec errno logged",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn crash_loop_after_being_up_backs_off() {
    // Workers serve for 2.5 s then crash: the service was up, so procman
    // keeps it alive and respawns at once (no boot-failure exit). 2.5 s,
    // counted from the interpreter's start, is well past the 1 s stability
    // window counted from the spawn, also when the master is slow to wake.
    let mut h = Start::new("crashloop", &["-w", "1", "--"])
        .json()
        .args(notify_worker())
        .args(["--exit-after", "2.5", "--exit-code", "1"])
        .spawn();
    let first = h.wait_workers(1, BOOT);
    h.expect_event("exited", BOOT, "the crash", |e| {
        first.contains(&worker_of(e)) && e["reason"] == "crash"
    });
    h.expect_event("booting", BOOT, "respawned", |e| {
        e["slot"] == 0 && !first.contains(&worker_of(e))
    });
    h.check(!h.has_event("boot-failed", |_| true), "not a failed boot");
    h.wait_workers(1, BOOT);
    assert!(
        h.wait_exit(Duration::from_millis(200)).is_none(),
        "procman keeps running"
    );
    assert!(h.zombies().is_empty());
}

#[test]
fn an_idle_master_does_not_wake_up() {
    // No timeout, nothing due: the master should sleep in poll(2) until a
    // signal or a notification arrives.
    let mut h = Start::new("idle", &["-t", "0"])
        .json()
        .args(hello_args("2"))
        .spawn();
    h.wait_workers(2, BOOT);
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    // The master wakes once, a second after the first worker is ready, to
    // learn that the service has been up; after that nothing is due: it
    // sleeps in poll(2) without a timeout. Measure from then on.
    h.check(
        wait_for(BOOT, || idle_in_poll(h.pid).then_some(())).is_some(),
        "the master sleeps in poll(2) with no timeout",
    );
    let switches = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = switches(h.pid);
    std::thread::sleep(Duration::from_secs(2));
    let after = switches(h.pid);
    assert!(
        after - before <= 1,
        "the idle master woke {} times in 2 s",
        after - before
    );
}

#[test]
fn backlog_sets_the_listen_queue_length() {
    let mut h = Start::new("backlog", &["--backlog", "17"])
        .args(hello_args("1"))
        .spawn();
    h.wait_workers(1, BOOT);
    let port = h.port();
    assert_eq!(listen_backlog(port), ["17"]);
}
