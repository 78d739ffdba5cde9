//! In-place upgrade (issue 28): USR2 and `procman upgrade` re-exec procman
//! with the same pid, keeping every worker; a binary that does not answer
//! its pre-flight positively changes nothing.

mod util;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

fn client(args: &[&str]) -> Output {
    Command::new(PROCMAN)
        .args(args)
        .output()
        .expect("run procman client")
}

fn upgrade(sock: &Path, binary: Option<&str>) -> Output {
    let mut args = vec!["upgrade", "--control-socket", sock.to_str().expect("utf8")];
    args.extend(binary);
    client(&args)
}

/// procman with 2 hello workers and a control socket.
fn start(name: &str, env: &[(&str, &str)]) -> (Harness, PathBuf, BTreeSet<i32>) {
    let mut s = Start::new(name, &["-w", "2"]);
    let sock = s.dir().join("ctl");
    s = s.args([
        "--control-socket",
        sock.to_str().expect("utf8"),
        "--",
        &hello(),
    ]);
    for (k, v) in env {
        s = s.env(k, v);
    }
    let mut h = s.spawn();
    let workers = h.wait_workers(2, BOOT);
    (h, sock, workers)
}

fn serves(h: &Harness) -> bool {
    matches!(http_get(h.addr(), "/"), Ok((200, _)))
}

#[test]
fn usr2_keeps_the_pid_and_every_worker_and_they_keep_serving() {
    let s = Start::new("upgrade-usr2", &["-w", "2"]);
    let sock = s.dir().join("ctl");
    let pidfile = s.dir().join("procman.pid");
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .args([
            "--metrics",
            "127.0.0.1:0",
            "--pid",
            pidfile.to_str().expect("utf8"),
        ])
        .args(["--", &hello()])
        .spawn();
    let workers = h.wait_workers(2, BOOT);
    let metrics = wait_for(BOOT, || {
        let log = h.log_text();
        let at = log.find("Serving metrics at: http://")? + "Serving metrics at: http://".len();
        log[at..]
            .split('/')
            .next()?
            .parse::<std::net::SocketAddr>()
            .ok()
    })
    .expect("metrics address");
    assert!(serves(&h), "serves before");
    h.signal(Signal::SIGUSR2);
    h.check(
        h.wait_log("Upgraded in place", BOOT),
        "the new image logs that it took over",
    );
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    assert!(alive(h.pid), "same pid");
    assert!(serves(&h), "serves after");
    // The endpoints came along: metrics answer, a client upgrade works.
    assert!(
        matches!(http_get(metrics, "/healthz"), Ok((200, _))),
        "metrics"
    );
    let out = upgrade(&sock, None);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("pid {}", h.pid)), "{text}");
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    assert_eq!(h.count_log("Upgraded in place"), 2);
    let pid_text = std::fs::read_to_string(&pidfile).expect("pidfile");
    assert_eq!(pid_text.trim(), h.pid.to_string());
    // A HUP afterwards rolls the workers, on the adopted listeners.
    h.signal(Signal::SIGHUP);
    h.check(
        wait_for(BOOT, || {
            let now: BTreeSet<i32> = h.children().into_iter().collect();
            (now.len() == 2 && now.is_disjoint(&workers)).then_some(())
        })
        .is_some(),
        "a HUP after the upgrade replaced both workers",
    );
    assert!(serves(&h), "serves after the reload");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    assert!(
        !pidfile.exists(),
        "the new image removed the pidfile at exit"
    );
}

#[test]
fn five_upgrades_under_a_client_loop_fail_no_request() {
    let (mut h, sock, workers) = start("upgrade-five", &[]);
    let addr = h.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let loop_ = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match http_get(addr, "/") {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    // A copy at another path: rollback is an upgrade to another binary.
    let copy = h.dir.join("procman-copy");
    std::fs::copy(PROCMAN, &copy).expect("copy");
    for i in 0..5 {
        let bin = (i % 2 == 1).then(|| copy.to_str().expect("utf8"));
        let out = upgrade(&sock, bin);
        assert!(out.status.success(), "upgrade {i}: {out:?}");
    }
    stop.store(true, Ordering::Relaxed);
    loop_.join().expect("client loop");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests: {ok} served, {failed} failed");
    assert_eq!(failed, 0, "{ok} served");
    assert!(ok > 0);
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    assert_eq!(h.count_log("Upgraded in place"), 5);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_worker_that_exits_in_the_window_is_reaped_and_replaced_by_the_new_image() {
    let (mut h, sock, workers) = start("upgrade-killed", &[]);
    let victim = *workers.iter().next().expect("a worker");
    // The window, forced: the new "binary" is a script that, when it is
    // exec'd as the new image (PROCMAN_UPGRADE_FD set; not in its
    // pre-flight), kills a worker before it becomes procman: the worker is
    // then a zombie the old image never saw, for the new image to handle.
    let new = script(
        &h.dir,
        "kills-then-procman",
        &format!("[ -n \"$PROCMAN_UPGRADE_FD\" ] && kill -KILL {victim}; exec {PROCMAN} \"$@\""),
    );
    let out = upgrade(&sock, Some(&new));
    assert!(out.status.success(), "{out:?}");
    let now = h.wait_workers(2, BOOT);
    assert!(!now.contains(&victim), "replaced: {now:?}");
    assert!(!h.children().contains(&victim), "reaped");
    assert!(h.zombies().is_empty(), "no zombie: {:?}", h.zombies());
    let log = h.log_text();
    let up = log.find("Upgraded in place").expect("upgraded");
    h.check(
        log[up..].contains(&format!("Worker {victim} ")),
        "the new image reports the worker's exit",
    );
    h.check(
        !log[..up].contains(&format!("Worker {victim} ")),
        "the old image did not see it",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn uvicorn_workers_serve_through_five_upgrades() {
    let s = uvicorn(
        "upgrade-uvicorn",
        &apps_dir(),
        "keep_alive_app:main",
        &["-w", "2"],
    );
    let sock = s.dir().join("ctl");
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .spawn();
    let workers = h.wait_workers(2, Duration::from_secs(60));
    let addr = h.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let loop_ = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match http_get(addr, "/slow?s=0") {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    for i in 0..5 {
        let out = upgrade(&sock, None);
        assert!(out.status.success(), "upgrade {i}: {out:?}");
    }
    stop.store(true, Ordering::Relaxed);
    loop_.join().expect("client loop");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests: {ok} served, {failed} failed");
    assert_eq!(failed, 0, "{ok} served");
    assert!(ok > 0);
    assert_eq!(
        h.children()
            .into_iter()
            .filter(|p| workers.contains(p))
            .count(),
        2
    );
    assert_eq!(h.count_log("Upgraded in place"), 5);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

/// A script at `dir/name`, 0755.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.display().to_string()
}

#[test]
fn a_failed_pre_flight_changes_nothing_and_says_why() {
    let (mut h, sock, workers) = start("upgrade-refused", &[]);
    let dir = h.dir.clone();
    let crashes = script(&dir, "crashes", "kill -SEGV $$");
    let lies = script(
        &dir,
        "lies",
        "echo '{\"magic\":\"something-else\",\"ok\":true}'  > /proc/self/fd/$PROCMAN_UPGRADE_CHECK",
    );
    let missing = dir.join("missing").display().to_string();
    // Root execs only what others cannot have changed.
    let writable = dir.join("procman-writable");
    std::fs::copy(PROCMAN, &writable).expect("copy");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let writable = writable.display().to_string();
    let cases = [
        (missing.as_str(), "cannot open"),
        ("/bin/true", "no pre-flight answer"),
        (crashes.as_str(), "no pre-flight answer (killed by SIGSEGV)"),
        (lies.as_str(), "not procman's"),
        (writable.as_str(), "writable by group or others (mode 777)"),
    ];
    for (bin, why) in cases {
        let out = upgrade(&sock, Some(bin));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bin}: {out:?}");
        assert!(err.contains(why), "{bin}: {err}");
    }
    h.check(
        wait_for(BOOT, || {
            (h.count_log("Upgrade refused") == cases.len()).then_some(())
        })
        .is_some(),
        "each refusal is logged",
    );
    assert_eq!(h.count_log("Upgraded in place"), 0);
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    assert!(serves(&h));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_binary_that_cannot_read_this_state_version_is_refused() {
    // The pre-flight is the real binary, told (debug builds only) to answer
    // as a version that reads only state version 1 (an older procman).
    let (mut h, sock, workers) = start("upgrade-version", &[("PROCMAN_TEST_UPGRADE_ACCEPTS", "1")]);
    let out = upgrade(&sock, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("reads state versions [1], not 2"), "{err}");
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_configuration_the_new_binary_refuses_stops_the_upgrade() {
    let s = Start::new("upgrade-config", &[]);
    let file = s.dir().join("procman.toml");
    let sock = s.dir().join("ctl");
    std::fs::write(&file, format!("workers = 2\ncommand = ['{}']\n", hello())).expect("write");
    let mut h = s
        .args(["-c", file.to_str().expect("utf8")])
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .spawn();
    let workers = h.wait_workers(2, BOOT);
    std::fs::write(&file, "workers = 'many'\n").expect("break it");
    let out = upgrade(&sock, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("refuses: the configuration is refused"),
        "{err}"
    );
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn an_upgrade_during_a_stop_is_refused_and_the_stop_completes() {
    let s = Start::new("upgrade-stop", &["-w", "1", "--graceful-timeout", "30"]);
    let sock = s.dir().join("ctl");
    // A worker that ignores TERM: the stop takes its graceful timeout.
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .args([
            "--",
            "sh",
            "-c",
            "trap '' TERM; while :; do sleep 0.2; done",
        ])
        .spawn();
    h.check(
        h.wait_log("All 1 worker ready", BOOT),
        "the worker is ready",
    );
    h.signal(Signal::SIGTERM);
    h.check(h.wait_log("Shutting down", BOOT), "stop began");
    let out = upgrade(&sock, None);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopping"), "{err}");
    h.signal(Signal::SIGUSR2);
    h.signal(Signal::SIGINT); // hurry: SIGKILL after the quick grace
    assert_eq!(h.exit_code(BOOT), 0);
    assert_eq!(h.count_log("Upgraded in place"), 0);
}

#[test]
fn under_systemd_an_upgrade_is_announced_as_a_reload() {
    let dir = temp_dir("upgrade-systemd");
    let notify = dir.join("notify");
    let mut systemd = FakeSystemd::at(&notify);
    let (mut h, sock, workers) = start(
        "upgrade-systemd",
        &[("NOTIFY_SOCKET", notify.to_str().expect("utf8"))],
    );
    let ready = systemd.wait("READY=1", 0).expect("READY=1 at start");
    let out = upgrade(&sock, None);
    assert!(out.status.success(), "{out:?}");
    let reloading = systemd.wait_all(&["RELOADING=1", "MONOTONIC_USEC="], ready + 1);
    h.check(
        reloading.is_some(),
        &format!("RELOADING=1 with MONOTONIC_USEC: {:?}", systemd.got),
    );
    let again = systemd.wait("READY=1", reloading.unwrap_or(0) + 1);
    h.check(
        again.is_some(),
        &format!("READY=1 from the new image: {:?}", systemd.got),
    );
    assert_eq!(
        h.children()
            .into_iter()
            .filter(|p| workers.contains(p))
            .count(),
        2
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn an_upgrade_during_a_reload_is_refused_until_the_reload_ended() {
    let s = Start::new("upgrade-reload", &[]);
    let file = s.dir().join("procman.toml");
    let sock = s.dir().join("ctl");
    // --ready-after 3s: a reload's new workers take 3 s to count as ready.
    let config = format!(
        "workers = 2\nready-after = '3s'\ncommand = ['{}']\n",
        hello()
    );
    std::fs::write(&file, &config).expect("write");
    let mut h = s
        .args(["-c", file.to_str().expect("utf8")])
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .json()
        .spawn();
    h.expect_event("all-ready", BOOT, "booted", |_| true);
    h.signal(Signal::SIGHUP);
    h.expect_event("reloading", BOOT, "the reload began", |_| true);
    let out = upgrade(&sock, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("a reload is in progress"), "{err}");
    h.expect_event("reload-done", BOOT, "the reload ended", |_| true);
    let out = upgrade(&sock, None);
    assert!(out.status.success(), "after the reload: {out:?}");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn the_new_image_still_reaps_orphans_as_a_subreaper() {
    // Each worker leaves an orphan (a sleep whose parent, a subshell, exits
    // at once): re-parented to procman, a child subreaper, which must reap
    // it after the upgrade too.
    let s = Start::new("upgrade-orphans", &["-w", "1"]);
    let sock = s.dir().join("ctl");
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .args(["--", "sh", "-c", &format!("(sleep 3 &); exec {}", hello())])
        .spawn();
    h.wait_workers(1, BOOT);
    let orphan = wait_for(BOOT, || {
        h.children().into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
    })
    .expect("the orphan is procman's child");
    let out = upgrade(&sock, None);
    assert!(out.status.success(), "{out:?}");
    h.check(
        wait_for(BOOT, || (!h.children().contains(&orphan)).then_some(())).is_some(),
        "the orphan exited and was reaped",
    );
    assert!(h.zombies().is_empty(), "no zombie: {:?}", h.zombies());
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_stop_requested_with_an_upgrade_stops() {
    let (mut h, _sock, _workers) = start("upgrade-then-stop", &[]);
    // Both arrive while procman cannot run: read together, the stop wins.
    kill(Pid::from_raw(h.pid), Signal::SIGSTOP).expect("stop procman");
    kill(Pid::from_raw(h.pid), Signal::SIGUSR2).expect("usr2");
    kill(Pid::from_raw(h.pid), Signal::SIGTERM).expect("term");
    kill(Pid::from_raw(h.pid), Signal::SIGCONT).expect("continue");
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    h.check(h.count_log("Upgraded in place") == 0, "no upgrade");
    h.check(
        h.wait_log("Upgrade refused: procman is stopping", BOOT),
        "the upgrade says why it did not happen",
    );
}

#[test]
fn the_master_goes_on_while_a_slow_pre_flight_runs() {
    let (mut h, sock, workers) = start("upgrade-slow-check", &[]);
    // A check that takes 3 s (then is procman's): meanwhile, the master
    // answers a status request and handles TTIN.
    let slow = script(&h.dir, "slow", &format!("sleep 3; exec {PROCMAN} \"$@\""));
    let sock2 = sock.clone();
    let upgrading = std::thread::spawn(move || upgrade(&sock2, Some(&slow)));
    h.check(
        h.wait_log("Upgrade: checking", BOOT),
        "the pre-flight began",
    );
    let status = client(&["status", "--control-socket", sock.to_str().expect("utf8")]);
    assert!(status.status.success(), "{status:?}");
    assert!(
        !upgrading.is_finished(),
        "status was answered during the pre-flight"
    );
    h.signal(Signal::SIGTTIN);
    h.check(
        h.wait_log("Workers: 2 -> 3", BOOT),
        "TTIN handled during the pre-flight",
    );
    let out = upgrading.join().expect("upgrade thread");
    assert!(out.status.success(), "{out:?}");
    let now: BTreeSet<i32> = h.wait_workers(3, BOOT);
    assert!(workers.is_subset(&now), "{workers:?} kept in {now:?}");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn usr2_execs_the_upgrade_binary_when_one_is_configured() {
    let dir = temp_dir("upgrade-binary-copy");
    let copy = dir.join("procman-next");
    std::fs::copy(PROCMAN, &copy).expect("copy");
    let copy = copy.to_str().expect("utf8").to_string();
    let mut h = Start::new("upgrade-binary", &["-w", "1", "--upgrade-binary", &copy])
        .args(["--", &hello()])
        .spawn();
    let workers = h.wait_workers(1, BOOT);
    h.signal(Signal::SIGUSR2);
    h.check(h.wait_log("Upgraded in place", BOOT), "upgraded");
    h.check(
        h.log_text().contains(&format!("Upgrade: checking {copy}")),
        "the configured binary was checked",
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", h.pid)).expect("exe");
    assert_eq!(exe.to_str(), Some(copy.as_str()), "and exec'd");
    assert_eq!(h.children().into_iter().collect::<BTreeSet<_>>(), workers);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn with_preload_the_new_image_starts_its_own_zygote_and_keeps_the_workers() {
    let s = uvicorn(
        "upgrade-preload",
        &apps_dir(),
        "keep_alive_app:main",
        &["-w", "1", "--preload"],
    );
    let sock = s.dir().join("ctl");
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .spawn();
    let workers = h.wait_workers(1, Duration::from_secs(60));
    let out = upgrade(&sock, None);
    assert!(out.status.success(), "{out:?}");
    assert!(serves(&h), "serves after");
    // A new worker comes from the new image's zygote.
    h.signal(Signal::SIGTTIN);
    let now = h.wait_workers(2, Duration::from_secs(60));
    assert!(workers.is_subset(&now), "{workers:?} kept in {now:?}");
    assert!(
        h.zombies().is_empty(),
        "the old zygote was reaped: {:?}",
        h.zombies()
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

/// The pre-flight passes but the exec itself fails (here: the binary takes
/// its own execute bits away while it answers, so `execveat` says EACCES).
/// The master already killed its zygotes for the new image: it must go on
/// as it was, say why, and start a new base zygote; the zygotes it killed
/// are neither reported as dead of unknown causes ("perhaps out of
/// memory?") nor counted as failures (three in a row would start every
/// later worker cold).
#[test]
fn an_exec_that_fails_after_a_passed_pre_flight_leaves_the_master_serving() {
    let s = uvicorn(
        "upgrade-exec-fails",
        &fastapi_dir(),
        "app:main",
        &["-w", "2"],
    )
    .json();
    let sock = s.dir().join("ctl");
    let dir = s.dir().to_path_buf();
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .spawn();
    let workers = h.wait_workers(2, BOOT);
    h.expect_events("zygote-ready", 1, BOOT, "a base zygote", |_| true);
    for attempt in 1..=3 {
        // $0 is /dev/fd/N (the checked descriptor): chmod follows it to
        // the file. Written again each time: it leaves itself 0644.
        let vanishing = script(
            &dir,
            "vanishing",
            &format!("chmod 0644 \"$0\"\nexec {PROCMAN} \"$@\""),
        );
        let out = upgrade(&sock, Some(&vanishing));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", h.log_text());
        assert!(err.contains("execveat failed"), "{err}");
        h.expect_events(
            "zygote-ready",
            attempt + 1,
            BOOT,
            "a new base zygote after the failed exec",
            |_| true,
        );
    }
    assert_eq!(h.count_log("Upgraded in place"), 0);
    let exits = h.events_named("zygote-exited");
    h.check(
        exits.len() == 3
            && exits.iter().all(|e| {
                e["reason"] == "stopped"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("killed by procman for the upgrade"))
            }),
        &format!("each killed zygote said stopped by procman for the upgrade: {exits:?}"),
    );
    h.check(
        !h.has_event("zygote-cold", |_| true),
        "no zygote failure counted",
    );
    // Same pid, same workers, serving; a worker killed now is replaced.
    assert_eq!(
        h.children()
            .into_iter()
            .filter(|p| workers.contains(p))
            .collect::<BTreeSet<_>>(),
        workers
    );
    assert!(serves(&h));
    let victim = *workers.iter().next().expect("a worker");
    let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
    let now = h.wait_workers(2, BOOT);
    assert!(!now.contains(&victim), "{now:?}");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

#[test]
fn reuse_port_slot_sockets_pass_to_the_new_image() {
    // The master keeps each slot's SO_REUSEPORT socket for the slot's next
    // worker (the connections queued on it wait for that worker): an
    // upgrade hands them on, so a worker the new image starts in a slot
    // takes over the very socket its predecessor had.
    let s = Start::new("upgrade-reuseport", &["-w", "1", "--reuse-port"]);
    let sock = s.dir().join("ctl");
    let mut h = s
        .args(["--control-socket", sock.to_str().expect("utf8")])
        .args(["--", &hello()])
        .spawn();
    let first = *h.wait_workers(1, BOOT).iter().next().expect("a worker");
    let socket_of = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/3")).ok();
    let before = socket_of(first).expect("the worker's listener at fd 3");
    let out = upgrade(&sock, None);
    assert!(out.status.success(), "{out:?}");
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill -9");
    let next = wait_for(BOOT, || {
        h.wait_workers(1, BOOT).into_iter().find(|p| *p != first)
    })
    .expect("a new worker");
    assert_eq!(
        socket_of(next),
        Some(before),
        "the new image's worker in slot 0 has the slot's socket"
    );
    assert!(serves(&h), "serves");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
