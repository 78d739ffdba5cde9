//! The uvicorn class's promises, for every server an APP can run under:
//! each case below is one function taking the [`Class`], run for uvicorn
//! and for `-k granian` (granian's HTTP server in procman's workers) by
//! [`for_each_class!`] (test names `case::uvicorn`, `case::granian`).
//! The listeners are procman's in every form: TCP, a unix socket, IPv6,
//! `--reuse-port` and socket activation. Then what only `-k granian` has: its version check and its refusals.
//!
//! The granian class runs under target/granian-venv (the pinned granian of
//! scripts/test plus the example's requirements).

mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Uvicorn,
    Granian,
}

/// The virtualenv with the pinned granian (scripts/test makes it).
fn granian_python() -> PathBuf {
    let p = repo().join("target/granian-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test (it creates target/granian-venv with the pinned granian)",
        p.display()
    );
    p
}

impl Class {
    /// procman serving `app` from `dir` with this class, no access log.
    fn start(self, name: &str, dir: &Path, app: &str, extra: &[&str]) -> Start {
        self.start_logged(name, dir, app, &["--no-access-log"])
            .args(extra.iter().copied())
    }

    /// As [`Class::start`], with the access log as `extra` leaves it.
    fn start_logged(self, name: &str, dir: &Path, app: &str, extra: &[&str]) -> Start {
        let python = match self {
            Class::Uvicorn => venv_python(),
            Class::Granian => granian_python(),
        };
        let class: &[&str] = match self {
            Class::Uvicorn => &[],
            Class::Granian => &["-k", "granian"],
        };
        Start::new(name, class)
            .args(["--python", python.to_str().expect("utf8")])
            .args(["--chdir", dir.to_str().expect("utf8"), app])
            .args(extra.iter().copied())
    }

    fn name(self) -> &'static str {
        match self {
            Class::Uvicorn => "uvicorn",
            Class::Granian => "granian",
        }
    }
}

macro_rules! for_each_class {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn uvicorn() {
                super::$case(super::Class::Uvicorn)
            }
            #[test]
            fn granian() {
                super::$case(super::Class::Granian)
            }
        }
    )*};
}

for_each_class!(
    boots_serves_and_is_ready_only_when_answering,
    serves_wsgi_and_a_unix_socket,
    hup_replaces_every_worker_with_zero_failed_requests,
    reuse_port_hup_replaces_every_worker_with_zero_failed_requests,
    a_killed_worker_is_replaced,
    term_lets_an_in_flight_request_finish_then_exits_0,
    a_blocked_app_misses_its_heartbeat_and_is_replaced,
    an_exception_at_import_exits_4_with_one_traceback,
    lifespan_startup_failure_exits_3,
    max_requests_recycles_a_worker_without_failed_requests,
    workers_stopping_under_a_stream_of_new_connections_fail_no_request,
    workers_stopping_under_a_stream_of_unix_socket_connections_fail_no_request,
    https_with_a_self_signed_certificate,
    root_path_and_proxy_headers_reach_an_asgi_app,
    root_path_and_proxy_headers_reach_a_wsgi_app,
    a_quick_stop_does_not_wait_for_requests,
    usr1_leaves_ready_workers_serving,
    zygotes_fork_workers_and_start_no_thread,
    reuse_port_workers_each_serve_on_the_one_port,
    reuse_port_workers_stopping_under_a_stream_of_new_connections_fail_no_request,
    reuse_port_a_killed_workers_replacement_takes_its_slots_socket,
    reuse_port_with_preload_each_worker_serves_on_its_slots_socket,
    socket_activation_serves_on_the_inherited_socket,
    an_ipv6_loopback_bind_serves,
    an_apps_import_is_frozen_before_the_worker_serves,
    reload_serves_an_edited_app_file,
    an_upgrade_under_load_keeps_every_worker_and_fails_no_request,
    the_access_log_is_on_by_default_a_json_record_with_json_logs_and_off_when_asked,
    lifespan_state_reaches_requests_and_shutdown_runs_at_a_stop,
);

fn pid_of(reply: &(u16, String)) -> i32 {
    reply.1.trim().parse().expect("pid body")
}

/// The workers among procman's children (not the zygote).
fn workers(h: &Harness) -> BTreeSet<i32> {
    h.children()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"procman: worker"))
        })
        .collect()
}

fn boots_serves_and_is_ready_only_when_answering(class: Class) {
    let mut h = class
        .start("gr-boot", &fastapi_dir(), "app:main", &["-w", "2"])
        .json()
        .spawn();
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    // Ready means answering: the first request after it, no retry.
    let (status, body) = http_get(h.addr(), "/").expect("GET / right after ready");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let pids = workers(&h);
    assert!(
        pids.contains(&(v["pid"].as_i64().expect("pid") as i32)),
        "{body}"
    );
    assert_eq!(v["generation"], "1");
    let starting = format!("app:main ({}, ", class.name());
    h.check(
        h.messages().iter().any(|m| m.contains(&starting)),
        &format!("the first line names the server: {starting}"),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

fn serves_wsgi_and_a_unix_socket(class: Class) {
    let start = class.start("gr-wsgi", &apps_dir(), "wsgi_app:app", &["-w", "1"]);
    let sock = start.dir().join("app.sock");
    let unix = format!("unix:{}", sock.display());
    let mut h = start.args(["-b", "127.0.0.1:0", "-b", &unix]).spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let got = wait_for(BOOT, || http_get(h.addr(), "/").ok());
    assert_eq!(got.as_ref().map(pid_of), Some(pid), "{}", h.log_text());
    let over_unix = wait_for(BOOT, || {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", "--unix-socket"])
            .arg(&sock)
            .arg("http://localhost/")
            .output()
            .ok()?;
        (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
    });
    assert_eq!(
        over_unix.as_deref(),
        Some(pid.to_string().as_bytes()),
        "{}",
        h.log_text()
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

fn hup_replaces_every_worker_with_zero_failed_requests(class: Class) {
    hup_under_load_fails_no_request(class, "gr-hup", &[]);
}

/// The same with `--reuse-port`: each new worker takes its slot's socket,
/// on which the old one's queue waits.
fn reuse_port_hup_replaces_every_worker_with_zero_failed_requests(class: Class) {
    hup_under_load_fails_no_request(class, "gr-hupreuse", &["--reuse-port"]);
}

/// Two workers (and `extra`) under 4 clients; HUP: every worker is
/// replaced, the new generation serves, and no request failed.
fn hup_under_load_fails_no_request(class: Class, name: &str, extra: &[&str]) {
    let args: Vec<&str> = ["-w", "2"].iter().chain(extra).copied().collect();
    let mut h = class
        .start(name, &fastapi_dir(), "app:main", &args)
        .json()
        .spawn();
    let old = h.wait_workers(2, BOOT);
    let load = Load::start(h.addr(), 4, 20_000, Duration::from_secs(60));
    wait_for(BOOT, || (load.done() > 50).then_some(()));
    h.signal(Signal::SIGHUP);
    let renewed = wait_for(BOOT, || {
        let kids = workers(&h);
        (h.has_event("reload-done", |e| e["generation"] == 2)
            && kids.len() == 2
            && kids.is_disjoint(&old))
        .then_some(kids)
    });
    load.wait_more(100, BOOT);
    let report = load.finish();
    h.check(renewed.is_some(), "every worker replaced");
    h.check_none_failed(&report);
    let new = renewed.expect("checked");
    h.check(
        report.pids.iter().any(|p| new.contains(p)),
        "new generation served",
    );
}

/// `procman upgrade` (tests/upgrade.rs has the rest) under 4 clients,
/// three times: the same workers serve throughout, and none fails.
fn an_upgrade_under_load_keeps_every_worker_and_fails_no_request(class: Class) {
    let start = class.start("gr-upgrade", &fastapi_dir(), "app:main", &["-w", "2"]);
    let sock = start.dir().join("ctl");
    let mut h = start
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .spawn();
    let before = h.wait_workers(2, BOOT);
    let load = Load::start(h.addr(), 4, 20_000, Duration::from_secs(60));
    wait_for(BOOT, || (load.done() > 50).then_some(()));
    for i in 1..=3 {
        let out = std::process::Command::new(PROCMAN)
            .args(["upgrade", "--control-socket", sock.to_str().expect("utf8")])
            .output()
            .expect("run procman upgrade");
        h.check(out.status.success(), &format!("upgrade {i}: {out:?}"));
        load.wait_more(50, BOOT);
    }
    let report = load.finish();
    h.check_none_failed(&report);
    h.check(
        workers(&h) == before && report.pids == before,
        &format!(
            "the same workers served: {before:?}, now {:?}, served by {:?}",
            workers(&h),
            report.pids
        ),
    );
    h.check(
        h.count_log("Upgraded in place") == 3,
        "three upgrades logged",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

/// The access log: a line per request by default (uvicorn's default), a
/// JSON record naming the worker's logger with `--log-format json`, none
/// with `--no-access-log`.
fn the_access_log_is_on_by_default_a_json_record_with_json_logs_and_off_when_asked(class: Class) {
    let logger = format!("{}.access", class.name());
    let run = |name: &str, extra: &[&str], json: bool| {
        let mut start = class.start_logged(name, &apps_dir(), "scope_app:main", extra);
        if json {
            start = start.json();
        }
        let mut h = start.args(["-w", "1"]).spawn();
        h.wait_workers(1, BOOT);
        let (status, _) = http_get(h.addr(), "/scope?marker=1").expect("GET /scope");
        assert_eq!(status, 200);
        // A request after it: its line (or none) tells the first one's is written.
        let _ = http_get(h.addr(), "/pid");
        h
    };
    let mut text = run("gr-access-text", &[], false);
    text.check(
        text.wait_log("\"GET /scope", BOOT),
        "an access line for GET /scope",
    );
    text.signal(Signal::SIGTERM);
    assert_eq!(text.exit_code(BOOT), 0);
    let mut json = run("gr-access-json", &[], true);
    let record = wait_for(BOOT, || {
        json.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| {
                e["logger"] == logger.as_str()
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("GET /scope"))
            })
    });
    json.check(
        record.is_some(),
        &format!("a JSON record of GET /scope from {logger}"),
    );
    json.signal(Signal::SIGTERM);
    assert_eq!(json.exit_code(BOOT), 0);
    let mut silent = run("gr-access-off", &["--no-access-log"], false);
    silent.signal(Signal::SIGTERM);
    assert_eq!(silent.exit_code(BOOT), 0);
    // Served, and the workers have exited: no line will come any more.
    silent.check(
        !silent.log_text().contains("GET /scope"),
        "no access line with --no-access-log",
    );
}

/// A FastAPI lifespan: the state its startup yields reaches every request
/// (`request.state`), and its shutdown runs when the worker stops.
fn lifespan_state_reaches_requests_and_shutdown_runs_at_a_stop(class: Class) {
    let start = class.start(
        "gr-lifespan-state",
        &apps_dir(),
        "lifespan_state:main",
        &["-w", "1"],
    );
    let mark = start.dir().join("shutdown.txt");
    let mut h = start
        .args(["-e", &format!("LIFESPAN_MARK={}", mark.display())])
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("a worker");
    let v = json_of(h.addr(), "/state", "");
    h.check(
        v["pid"] == pid && v["started_in"] == pid,
        &format!("the startup's state, from worker {pid}: {v}"),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    let written = std::fs::read_to_string(&mark).unwrap_or_default();
    assert_eq!(written, format!("shutdown {pid}\n"), "{}", h.log_text());
}

fn a_killed_worker_is_replaced(class: Class) {
    let mut h = class
        .start("gr-kill", &fastapi_dir(), "app:main", &["-w", "2"])
        .json()
        .spawn();
    let pids = h.wait_workers(2, BOOT);
    let victim = *pids.iter().next().expect("worker");
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill -9");
    let replaced = wait_for(BOOT, || {
        let now = workers(&h);
        (now.len() == 2 && !now.contains(&victim)).then_some(now)
    });
    h.check(replaced.is_some(), "the killed worker was replaced");
    let new = replaced
        .expect("checked")
        .into_iter()
        .find(|p| !pids.contains(p))
        .expect("a new pid");
    let answered = wait_for(BOOT, || {
        http_get(h.addr(), "/pid").ok().filter(|r| pid_of(r) == new)
    });
    h.check(answered.is_some(), "the new worker answers");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

fn term_lets_an_in_flight_request_finish_then_exits_0(class: Class) {
    let mut h = class
        .start("gr-term", &fastapi_dir(), "app:main", &["-w", "1"])
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let idle = idle_fd_count(pid);
    let addr = h.addr();
    let slow = std::thread::spawn(move || {
        http_request(addr, "GET", "/slow?s=2", None, Duration::from_secs(30))
    });
    let accepted = wait_for(BOOT, || (open_fds(pid).len() > idle).then_some(()));
    h.check(accepted.is_some(), "request reached the worker");
    h.signal(Signal::SIGTERM);
    let reply = slow
        .join()
        .expect("thread")
        .expect("slow request completed");
    assert_eq!(reply.0, 200, "{}", reply.1);
    assert!(reply.1.contains("\"slept\":2"), "{}", reply.1);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

fn a_blocked_app_misses_its_heartbeat_and_is_replaced(class: Class) {
    let mut h = class
        .start(
            "gr-block",
            &fastapi_dir(),
            "app:main",
            &["-w", "2", "-t", "5"],
        )
        .json()
        .spawn();
    let pids = h.wait_workers(2, BOOT);
    let addr = h.addr();
    let blocked = std::thread::spawn(move || {
        http_request(addr, "GET", "/block?s=60", None, Duration::from_secs(30))
    });
    let abort = h.expect_event("stopping", Duration::from_secs(30), "abort", |e| {
        e["reason"] == "timeout"
    });
    let victim = worker_of(&abort);
    assert!(pids.contains(&victim), "{}", h.log_text());
    let other = *pids.iter().find(|p| **p != victim).expect("other");
    let seen_other = wait_for(Duration::from_secs(10), || {
        http_get(addr, "/pid").ok().filter(|r| pid_of(r) == other)
    });
    h.check(seen_other.is_some(), "the healthy worker kept answering");
    let replaced = h.wait_workers(2, BOOT);
    assert!(!replaced.contains(&victim));
    let _ = blocked.join();
}

fn an_exception_at_import_exits_4_with_one_traceback(class: Class) {
    let app = "raises_on_import:main";
    let mut h = class
        .start("gr-import", &apps_dir(), app, &["-w", "2"])
        .json()
        .spawn();
    assert_eq!(h.exit_code(BOOT), 4, "{}", h.log_text());
    let log = h.log_text();
    h.check(
        log.contains(&format!(
            "procman: error: Failed to load application '{app}': RuntimeError: boom at import"
        )),
        "the last line names the Python error",
    );
    h.check(
        log.matches("Traceback (most recent call last)").count() == 1,
        "one traceback",
    );
    h.check(h.count_events("booting", |_| true) <= 2, "no retry loop");
}

fn lifespan_startup_failure_exits_3(class: Class) {
    let mut h = class
        .start(
            "gr-lifespan",
            &apps_dir(),
            "lifespan_fail:main",
            &["-w", "1"],
        )
        .json()
        .spawn();
    assert_eq!(h.exit_code(BOOT), 3, "{}", h.log_text());
    h.check(h.count_events("booting", |_| true) == 1, "no retry loop");
    h.check(h.has_event("boot-failed", |_| true), "a failed boot");
}

fn max_requests_recycles_a_worker_without_failed_requests(class: Class) {
    let mut h = class
        .start(
            "gr-maxreq",
            &fastapi_dir(),
            "app:main",
            &["-w", "1", "--max-requests", "50"],
        )
        .json()
        .spawn();
    let first = h.wait_workers(1, BOOT);
    let load = Load::start(h.addr(), 2, 20_000, Duration::from_secs(60));
    let changed = wait_for(BOOT, || {
        load.pids().iter().any(|p| !first.contains(p)).then_some(())
    });
    let report = load.finish();
    h.check(
        changed.is_some(),
        "the worker pid changed after ~50 requests",
    );
    h.check_none_failed(&report);
    h.check(
        h.has_event("recycling", |e| {
            first.contains(&worker_of(e)) && e["reason"] == "max_requests"
        }),
        "recycled for its request count",
    );
    h.check(
        h.has_event("recycle-asked", |e| first.contains(&worker_of(e))),
        "recycle requested over notify",
    );
}

/// Each stop of a worker while new connections keep coming: whatever
/// connection the outgoing worker accepted is answered. Ten recycles at
/// `--max-requests 30` under four clients of one-request connections, each
/// sending its request 3 ms after connecting (as a client across a network
/// does): a granian worker that let granian stop at once closed the
/// connections it had just accepted unanswered ("empty reply").
fn workers_stopping_under_a_stream_of_new_connections_fail_no_request(class: Class) {
    recycles_under_a_stream_of_new_connections(class, "gr-stopstream", &[]);
}

/// The same with `--reuse-port`: a stopping worker's slot socket stays
/// with the master, and the connections queued on it are accepted by the
/// slot's next worker (whatever `net.ipv4.tcp_migrate_req` says).
fn reuse_port_workers_stopping_under_a_stream_of_new_connections_fail_no_request(class: Class) {
    recycles_under_a_stream_of_new_connections(class, "gr-stopreuse", &["--reuse-port"]);
}

/// [`RECYCLING`] workers (and `extra`) under four clients that send their
/// request [`PAUSE`] after connecting: [`ten_recycles_fail_no_request`].
fn recycles_under_a_stream_of_new_connections(class: Class, name: &str, extra: &[&str]) {
    let args: Vec<&str> = RECYCLING.iter().chain(extra).copied().collect();
    let mut h = class
        .start(name, &fastapi_dir(), "app:main", &args)
        .json()
        .spawn();
    h.wait_workers(2, BOOT);
    let load = Load::start_paced(h.addr(), 4, 1_000_000, Duration::from_secs(90), PAUSE);
    ten_recycles_fail_no_request(&h, load);
}

/// With `--reuse-port` a worker the zygote forks gets its slot's socket
/// from the master with the spawn request: a killed worker's replacement
/// takes the very socket it had (whose queue waited for it).
fn reuse_port_a_killed_workers_replacement_takes_its_slots_socket(class: Class) {
    let mut h = class
        .start(
            "gr-reuseslot",
            &fastapi_dir(),
            "app:main",
            &["-w", "1", "--reuse-port"],
        )
        .json()
        .spawn();
    let first = *h.wait_workers(1, BOOT).iter().next().expect("a worker");
    let socket_of = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/3")).ok();
    let before = socket_of(first).expect("fd 3");
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill -9");
    let next = wait_for(BOOT, || {
        let now = workers(&h);
        (now.len() == 1 && !now.contains(&first)).then_some(now)
    })
    .and_then(|w| w.into_iter().next())
    .expect("a replacement");
    // Once it answers, it has put its slot's socket in place; and the
    // master has logged its start (from the zygote's reply) by then, or
    // is about to.
    let answered = wait_for(BOOT, || {
        http_get(h.addr(), "/pid")
            .ok()
            .filter(|r| pid_of(r) == next)
    });
    h.check(answered.is_some(), "the replacement answers");
    assert_eq!(socket_of(next), Some(before), "the slot's socket");
    let both = wait_for(BOOT, || {
        (h.count_events("booting", |e| e["zygote"].is_i64()) == 2).then_some(())
    });
    h.check(both.is_some(), "both forked from the zygote");
}

/// `--preload`'s zygote (the app imported) passes the slots' sockets on
/// the same way.
fn reuse_port_with_preload_each_worker_serves_on_its_slots_socket(class: Class) {
    let mut h = class
        .start(
            "gr-reusepreload",
            &fastapi_dir(),
            "app:main",
            &["-w", "2", "--reuse-port", "--preload"],
        )
        .json()
        .spawn();
    let answered = h.wait_workers(2, BOOT);
    assert_eq!(answered, workers(&h), "{}", h.log_text());
    let sockets: BTreeSet<_> = answered
        .iter()
        .map(|p| std::fs::read_link(format!("/proc/{p}/fd/3")).expect("fd 3"))
        .collect();
    assert_eq!(sockets.len(), 2, "a socket of its own each: {sockets:?}");
    h.check(
        h.count_events("booting", |e| e["zygote"].is_i64()) == 2,
        "both forked from the preload zygote",
    );
}

/// The same on a unix socket, whose listener a stopping granian worker
/// leaves the same way (a closed door on its descriptor number).
fn workers_stopping_under_a_stream_of_unix_socket_connections_fail_no_request(class: Class) {
    let start = class.start("gr-stopunix", &fastapi_dir(), "app:main", RECYCLING);
    let sock = start.dir().join("app.sock");
    let unix = format!("unix:{}", sock.display());
    let h = start.args(["-b", &unix]).json().spawn();
    h.expect_events("ready", 2, BOOT, "two workers ready", |_| true);
    let load = Load::start_with(4, 1_000_000, Duration::from_secs(90), move || {
        unix_get_after(&sock, "/pid", PAUSE)
    });
    ten_recycles_fail_no_request(&h, load);
}

/// Two workers, each recycled after 30 requests.
const RECYCLING: &[&str] = &["-w", "2", "--max-requests", "30"];
/// How long after connecting the stop tests' clients send their request.
const PAUSE: Duration = Duration::from_millis(3);

/// Lets `load` run until ten workers were recycled and exited; then no
/// request may have failed.
fn ten_recycles_fail_no_request(h: &Harness, load: Load) {
    let stopped = wait_for(BOOT, || {
        (h.count_events("exited", |e| e["reason"] == "max_requests") >= 10).then_some(())
    });
    let report = load.finish();
    h.check(stopped.is_some(), "ten workers recycled and exited");
    h.check(
        report.failures.is_empty(),
        &format!(
            "failed: {} of {} ({:?})",
            report.failures.len(),
            report.ok + report.failures.len(),
            report.failures.iter().collect::<BTreeSet<_>>()
        ),
    );
}

fn https_with_a_self_signed_certificate(class: Class) {
    let start = class.start("gr-tls", &fastapi_dir(), "app:main", &["-w", "1"]);
    let key = start.dir().join("key.pem");
    let cert = start.dir().join("cert.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl)");
    assert!(st.success());
    let h = start
        .args(["--keyfile", key.to_str().expect("utf8")])
        .args(["--certfile", cert.to_str().expect("utf8")])
        .json()
        .spawn();
    let port = h.port();
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    let script = format!(
        "import ssl,urllib.request;c=ssl.create_default_context(cafile='{}');c.check_hostname=False;print(urllib.request.urlopen('https://127.0.0.1:{port}/pid',context=c,timeout=10).read().decode())",
        cert.display()
    );
    let out = std::process::Command::new(venv_python())
        .args(["-c", &script])
        .output()
        .expect("python");
    h.check(
        out.status.success(),
        &format!("HTTPS GET: {}", String::from_utf8_lossy(&out.stderr)),
    );
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(body.parse::<i32>().is_ok(), "pid over HTTPS: {body}");
}

fn a_quick_stop_does_not_wait_for_requests(class: Class) {
    let mut h = class
        .start(
            "gr-quick",
            &fastapi_dir(),
            "app:main",
            &["-w", "1", "--graceful-timeout", "120"],
        )
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let idle = idle_fd_count(pid);
    let addr = h.addr();
    let slow = std::thread::spawn(move || {
        http_request(addr, "GET", "/slow?s=90", None, Duration::from_secs(110))
    });
    let in_flight = wait_for(BOOT, || (open_fds(pid).len() > idle).then_some(()));
    h.check(in_flight.is_some(), "the slow request reached the worker");
    h.signal(Signal::SIGINT); // the master's quick stop: QUIT to the workers
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    // Ended before the request could finish (90 s > BOOT): it got no answer.
    let reply = slow.join().expect("thread");
    assert!(reply.is_err(), "the request was not waited for: {reply:?}");
}

fn usr1_leaves_ready_workers_serving(class: Class) {
    let mut h = class
        .start("gr-usr1", &fastapi_dir(), "app:main", &["-w", "2"])
        .json()
        .spawn();
    let pids = h.wait_workers(2, BOOT);
    h.signal(Signal::SIGUSR1);
    h.expect_event("log-reopened", BOOT, "USR1 handled", |_| true);
    // A worker whose USR1 disposition were the default would be gone.
    let seen = wait_for(BOOT, || {
        let answered: BTreeSet<i32> = (0..20)
            .filter_map(|_| http_get(h.addr(), "/pid").ok().map(|r| pid_of(&r)))
            .collect();
        (answered == pids).then_some(())
    });
    h.check(seen.is_some(), "both workers still answer");
    h.check(!h.has_event("exited", |_| true), "no worker exited");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

/// Threads of `pid` (the kernel's count: granian's runtime threads are not
/// Python's).
fn threads_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn zygotes_fork_workers_and_start_no_thread(class: Class) {
    for (name, extra) in [("gr-zygote", &[][..]), ("gr-preload", &["--preload"][..])] {
        let mut args = vec!["-w", "2"];
        args.extend_from_slice(extra);
        let mut h = class.start(name, &fastapi_dir(), "app:main", &args).spawn();
        let pids = h.wait_workers(2, BOOT);
        let zygotes: Vec<i32> = h
            .children()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with(b"procman: zygote"))
            })
            .collect();
        assert_eq!(zygotes.len(), 1, "{extra:?}: one zygote\n{}", h.log_text());
        // Forking is safe only from a single-threaded process.
        assert_eq!(threads_of(zygotes[0]), 1, "{extra:?}: the zygote's threads");
        let log = h.log_text();
        if extra.is_empty() {
            let base = format!(
                "(base: Python and {}; each worker imports app:main)",
                class.name()
            );
            h.check(
                log.contains(&base),
                &format!("the zygote's line says {base}"),
            );
        }
        for pid in &pids {
            h.check(
                log.contains(&format!("with pid {pid} (generation 1, forked from zygote")),
                &format!("{extra:?}: worker {pid} forked from the zygote"),
            );
        }
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0);
    }
}

fn reuse_port_workers_each_serve_on_the_one_port(class: Class) {
    let mut h = class
        .start(
            "gr-reuseport",
            &fastapi_dir(),
            "app:main",
            &["-w", "2", "--reuse-port"],
        )
        .json()
        .spawn();
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    h.check(
        h.has_event("listening", |e| e["reuse_port"] == true),
        "the listener is SO_REUSEPORT",
    );
    // Each worker has its own listener on the port: two distinct pids
    // answer there, and they are the two workers.
    let answered = h.wait_workers(2, BOOT);
    assert_eq!(answered, workers(&h), "{}", h.log_text());
    // Both forked from the base zygote, which passed each its slot's
    // socket: the zygote's own fd 3 only reserves the address.
    h.check(
        h.count_events("booting", |e| e["zygote"].is_i64()) == 2,
        "both workers forked from the zygote",
    );
    let sockets: BTreeSet<_> = answered
        .iter()
        .map(|p| std::fs::read_link(format!("/proc/{p}/fd/3")).expect("fd 3"))
        .collect();
    assert_eq!(sockets.len(), 2, "a socket of its own each: {sockets:?}");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

fn socket_activation_serves_on_the_inherited_socket(class: Class) {
    // As systemd does it: a listening socket at fd 3, LISTEN_FDS=1 and
    // LISTEN_PID procman's own pid (a shell sets it to its pid, then execs
    // procman: same pid).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let start = class
        .start("gr-activation", &fastapi_dir(), "app:main", &["-w", "2"])
        .no_default_bind()
        .json()
        .inherit_fd(std::os::fd::AsRawFd::as_raw_fd(&listener), 3)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web");
    let mut h = start.spawn_with(
        "sh",
        &[
            "-c",
            "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"",
            PROCMAN,
        ],
    );
    drop(listener); // procman has its own copy (fd 3)
    let answered = h.wait_workers_on(port, 2, BOOT);
    assert_eq!(answered, workers(&h), "{}", h.log_text());
    h.check(
        h.has_event("listening", |e| {
            e["name"] == "web" && e["inherited"] == true
        }),
        "the inherited socket is used",
    );
    h.check(
        h.count_events("listening", |_| true) == 1,
        "nothing else bound (no default 127.0.0.1:8000)",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

/// The app's import runs with the collector's trigger paused, so what it
/// made would all be young: the first collection after the worker is ready
/// would scan it (8-10 ms for the FastAPI example, every connection of the
/// worker stalled). The worker freezes it before it serves, as the zygotes
/// freeze their imports, whichever way the worker was started.
fn an_apps_import_is_frozen_before_the_worker_serves(class: Class) {
    for (name, extra) in [
        ("gc-frozen-base", &[][..]),
        ("gc-frozen-cold", &["--no-zygote"][..]),
        ("gc-frozen-preload", &["--preload"][..]),
    ] {
        let mut args = vec!["-w", "1"];
        args.extend_from_slice(extra);
        let mut h = class.start(name, &apps_dir(), "gc_app:main", &args).spawn();
        // gc_app answers every path with its report: the first is the wait.
        let v: serde_json::Value = wait_for(BOOT, || {
            let (status, body) = http_get(h.addr(), "/").ok()?;
            (status == 200).then(|| serde_json::from_str(&body).ok())?
        })
        .expect("an answer");
        let ballast = v["ballast"].as_i64().expect("ballast");
        let scanned = v["now"]["scanned"].as_i64().expect("scanned");
        let frozen = v["now"]["frozen"].as_i64().expect("frozen");
        h.check(
            frozen >= ballast && scanned < ballast / 2,
            &format!("{name}: the {ballast} objects the import kept are frozen: {v}"),
        );
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    }
}

fn an_ipv6_loopback_bind_serves(class: Class) {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback ([::1] cannot be bound)");
        return;
    }
    let mut h = class
        .start("gr-ipv6", &fastapi_dir(), "app:main", &["-w", "1"])
        .no_default_bind()
        .args(["-b", "[::1]:0"])
        .json()
        .spawn();
    let port = wait_for(BOOT, || {
        h.events_named("listening").iter().find_map(|e| {
            let a = e["address"].as_str()?.strip_prefix("http://[::1]:")?;
            a.parse::<u16>().ok()
        })
    })
    .unwrap_or_else(|| panic!("no [::1] listener\n{}", h.log_text()));
    let addr: std::net::SocketAddr = format!("[::1]:{port}").parse().expect("addr");
    let got = wait_for(BOOT, || http_get(addr, "/pid").ok());
    let pid = *workers(&h).iter().next().expect("a worker");
    assert_eq!(
        got.as_ref().map(pid_of),
        Some(pid),
        "GET /pid over [::1]: {got:?}\n{}",
        h.log_text()
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

/// Proxy headers off, trusted with --root-path, and from an untrusted peer:
/// what `app` (at `path`) reports as client, scheme and root path.
fn proxy_headers_and_root_path(class: Class, app: &str, path: &str) {
    let forwarded = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n";
    let run = |name: &str, extra: &[&str]| {
        let mut args = vec!["-w", "1"];
        args.extend_from_slice(extra);
        let mut h = class.start(name, &apps_dir(), app, &args).spawn();
        h.wait_workers(1, BOOT);
        let v = wait_for(BOOT, || {
            std::net::TcpStream::connect(h.addr()).ok()?;
            Some(json_of(h.addr(), path, forwarded))
        })
        .expect("an answer");
        (h, v)
    };
    let (_h, v) = run("gr-scope-plain", &["--no-proxy-headers"]);
    assert_eq!(
        v["client"], "127.0.0.1",
        "ignored with --no-proxy-headers: {v}"
    );
    assert_eq!(v["scheme"], "http", "{v}");
    assert_eq!(v["root_path"], "", "{v}");
    let (_h, v) = run(
        "gr-scope-proxy",
        &["--forwarded-allow-ips", "127.0.0.1", "--root-path", "/api"],
    );
    assert_eq!(v["client"], "203.0.113.7", "{v}");
    assert_eq!(v["scheme"], "https", "{v}");
    assert_eq!(v["root_path"], "/api", "{v}");
    // Each header alone, in any case, and neither (the path that skips
    // uvicorn's middleware): only what was sent changes.
    let (h, _) = run(
        "gr-scope-proxy-each",
        &["--forwarded-allow-ips", "127.0.0.1"],
    );
    let addr = h.addr();
    let v = json_of(addr, path, "x-FORWARDED-for: 203.0.113.9\r\n");
    assert_eq!(
        (&v["client"], &v["scheme"]),
        (&"203.0.113.9".into(), &"http".into()),
        "{v}"
    );
    let v = json_of(addr, path, "X-Forwarded-Proto: https\r\n");
    assert_eq!(
        (&v["client"], &v["scheme"]),
        (&"127.0.0.1".into(), &"https".into()),
        "{v}"
    );
    let v = json_of(addr, path, "X-Forwarded-Host: example.com\r\n");
    assert_eq!(
        (&v["client"], &v["scheme"]),
        (&"127.0.0.1".into(), &"http".into()),
        "{v}"
    );
    let (_h, v) = run("gr-scope-untrusted", &["--forwarded-allow-ips", "10.9.9.9"]);
    assert_eq!(v["client"], "127.0.0.1", "an untrusted proxy: {v}");
}

fn root_path_and_proxy_headers_reach_an_asgi_app(class: Class) {
    proxy_headers_and_root_path(class, "scope_app:main", "/scope");
}

fn root_path_and_proxy_headers_reach_a_wsgi_app(class: Class) {
    proxy_headers_and_root_path(class, "wsgi_scope_app:app", "/api/scope");
}

/// A plain ASGI app answering `version` to every request.
fn versioned_app(version: &str) -> String {
    format!(
        "VERSION = {version:?}\n\n\
         async def app(scope, receive, send):\n\
         \x20   if scope['type'] != 'http':\n\
         \x20       return\n\
         \x20   body = VERSION.encode()\n\
         \x20   await send({{'type': 'http.response.start', 'status': 200,\n\
         \x20               'headers': [(b'content-length', str(len(body)).encode())]}})\n\
         \x20   await send({{'type': 'http.response.body', 'body': body}})\n"
    )
}

/// `--reload` (tests/dev_reload.rs has the rest): an edit to the app's
/// file is served by the next generation, with either class.
fn reload_serves_an_edited_app_file(class: Class) {
    let dir = temp_dir("gr-dev-reload");
    let file = dir.join("app.py");
    std::fs::write(&file, versioned_app("v1")).expect("app.py");
    // No bytecode cache: two versions of one size written within a second
    // would be read from a stale .pyc (its check is the size and the mtime
    // in whole seconds).
    let args = ["-w", "1", "--reload", "-e", "PYTHONDONTWRITEBYTECODE=1"];
    let mut h = class.start("gr-dev-reload", &dir, "app:app", &args).spawn();
    let served = |h: &Harness, want: &str| {
        let addr = h.addr();
        wait_for(BOOT, || match http_get(addr, "/") {
            Ok((200, body)) if body == want => Some(()),
            _ => None,
        })
        .is_some()
    };
    h.check(served(&h, "v1"), "never served v1");
    std::fs::write(&file, versioned_app("v2")).expect("app.py, edited");
    h.check(served(&h, "v2"), "the edit was never served");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

/// A WebSocket connection to `path` (RFC 6455, written out here: the
/// handshake uses the RFC's own example key, whose accept value is known).
fn websocket_open(addr: std::net::SocketAddr, path: &str) -> Result<std::net::TcpStream, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("timeout: {e}"))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .map_err(|e| format!("handshake: {e}"))?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte)
            .map_err(|e| format!("read the handshake: {e}"))?;
        head.push(byte[0]);
        if head.len() > 8192 {
            return Err("an endless handshake".into());
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    // RFC 6455, 1.3: the example key's accept value.
    if !head.starts_with("http/1.1 101")
        || !head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=")
    {
        return Err(format!("not switched to WebSocket: {head:?}"));
    }
    Ok(s)
}

/// Sends `text` in one masked text frame; the text of the frame that answers.
fn websocket_echo(s: &mut std::net::TcpStream, text: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let payload = text.as_bytes();
    assert!(payload.len() < 126, "one short frame");
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame)
        .map_err(|e| format!("send a frame: {e}"))?;
    let mut h = [0u8; 2];
    s.read_exact(&mut h)
        .map_err(|e| format!("read a frame: {e}"))?;
    if h[0] != 0x81 || h[1] >= 126 {
        return Err(format!("not one short unmasked text frame: {h:02x?}"));
    }
    let mut answer = vec![0u8; usize::from(h[1])];
    s.read_exact(&mut answer)
        .map_err(|e| format!("read the payload: {e}"))?;
    String::from_utf8(answer).map_err(|e| e.to_string())
}

/// granian alone serves an app's WebSocket routes (its own implementation;
/// on by default there), so `-k granian` does too; an open one does not
/// hold a stop until the drain time is over. (The uvicorn class serves them
/// with the `websockets` or `wsproto` library installed, as uvicorn does;
/// the test venv has neither.)
#[test]
fn granian_serves_a_websocket_route_and_a_stop_closes_it() {
    use std::io::Read;
    let mut h = Class::Granian
        .start(
            "gr-websocket",
            &apps_dir(),
            "ws_app:main",
            &["-w", "1", "--graceful-timeout", "300"],
        )
        .spawn();
    h.wait_workers(1, BOOT);
    let mut ws = websocket_open(h.addr(), "/echo");
    let got = ws
        .as_mut()
        .map_err(|e| e.clone())
        .and_then(|s| websocket_echo(s, "hello"));
    h.check(
        got.as_deref() == Ok("echo: hello"),
        &format!("a WebSocket echo: {got:?}"),
    );
    // Still open: TERM closes it (end of stream, or a close frame first),
    // and procman exits long before the 300 s drain time.
    h.signal(Signal::SIGTERM);
    let mut rest = Vec::new();
    let end = ws.expect("open").read_to_end(&mut rest);
    h.check(
        end.is_ok() && rest.iter().all(|&b| b != 0x81),
        &format!("the WebSocket was closed: {end:?} after {rest:02x?}"),
    );
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

/// A package directory standing in for granian, first on PYTHONPATH: its
/// metadata says `version`; `api` is its granian/_granian.py (None: none).
fn fake_granian(dir: &Path, version: &str, api: Option<&str>) -> PathBuf {
    let root = dir.join("fake-granian");
    let info = root.join(format!("granian-{version}.dist-info"));
    std::fs::create_dir_all(&info).expect("mkdir dist-info");
    std::fs::write(
        info.join("METADATA"),
        format!("Metadata-Version: 2.1\nName: granian\nVersion: {version}\n"),
    )
    .expect("METADATA");
    let pkg = root.join("granian");
    std::fs::create_dir_all(&pkg).expect("mkdir granian");
    std::fs::write(
        pkg.join("__init__.py"),
        format!("__version__ = '{version}'\n"),
    )
    .expect("init");
    if let Some(api) = api {
        std::fs::write(pkg.join("_granian.py"), api).expect("_granian.py");
    }
    root
}

/// procman -k granian with a fake granian ahead of the real one: exit 4
/// and a last line saying `want`.
fn refused_granian(name: &str, version: &str, api: Option<&str>, want: &str) {
    let start = Class::Granian.start(name, &fastapi_dir(), "app:main", &["-w", "2"]);
    let fake = fake_granian(start.dir(), version, api);
    let mut h = start
        .env("PYTHONPATH", fake.to_str().expect("utf8"))
        .spawn();
    assert_eq!(h.exit_code(BOOT), 4, "{}", h.log_text());
    let log = h.log_text();
    let last = log.lines().last().unwrap_or_default().to_string();
    h.check(
        last.starts_with("procman: error: ") && last.contains(want),
        &format!("the last line says {want:?}: {last}"),
    );
    h.check(!log.contains("Traceback"), "no traceback");
    h.check(h.count_log(want) <= 3, "said by the workers, not in a loop");
}

/// A stopping granian worker leaves a TCP listener for a closed door made
/// in a temporary directory; where no directory takes a socket, the door
/// is an abstract name instead (README, *Stopping a granian worker*). Here
/// the app points Python's temporary directory at a path that cannot
/// exist, so every stop takes that way, and still no request may fail.
#[test]
fn without_a_usable_temporary_directory_stopping_workers_fail_no_request() {
    let start = Class::Granian.start("gr-notmp", &fastapi_dir(), "notmp_app:main", RECYCLING);
    std::fs::write(
        start.dir().join("notmp_app.py"),
        "import tempfile\n\
         tempfile.tempdir = '/proc/self/no-such-directory'\n\
         from app import main\n",
    )
    .expect("write notmp_app.py");
    let path = start.dir().to_str().expect("utf8").to_string();
    let h = start.env("PYTHONPATH", &path).json().spawn();
    h.expect_events("ready", 2, BOOT, "two workers ready", |_| true);
    let load = Load::start_paced(h.addr(), 4, 1_000_000, Duration::from_secs(90), PAUSE);
    ten_recycles_fail_no_request(&h, load);
}

#[test]
fn an_unsupported_granian_version_exits_4_naming_it_and_the_range() {
    refused_granian(
        "gr-version",
        "2.6.1",
        None,
        "granian 2.6.1 is installed, procman supports granian>=2.8.9,<2.9",
    );
}

#[test]
fn a_granian_whose_private_api_changed_exits_4_naming_it_and_the_range() {
    // A supported version number, but ASGIWorker takes other parameters.
    let api = "class ASGIWorker:\n    def __init__(self, worker_id, listener): pass\n\
               WSGIWorker = SocketHolder = WorkerSignal = ASGIWorker\n";
    refused_granian(
        "gr-shape",
        "2.8.9",
        Some(api),
        "granian 2.8.9's private worker API is not the expected one",
    );
}

#[test]
fn options_granian_cannot_honour_are_refused_in_one_line() {
    let python = granian_python();
    for (option, value) in [
        ("--limit-concurrency", "5"),
        ("--keep-alive", "7"),
        ("--http", "h11"),
    ] {
        let out = std::process::Command::new(PROCMAN)
            .args(["-k", "granian", "--python"])
            .arg(&python)
            .args([option, value, "app:main"])
            .current_dir(fastapi_dir())
            .output()
            .expect("runs procman");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{option}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{option}: {stderr}");
        assert!(
            lines[0].contains(&format!(
                "'{option}' is not supported by the granian worker class (-k granian)"
            )),
            "{option}: {stderr}"
        );
    }
}
