//! `--preload`: workers forked from a zygote that imported the app once,
//! supervised by the master like any other.

mod util;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// A private copy of the FastAPI example, so a test can change its code.
fn app_copy(name: &str) -> TempDir {
    let dir = temp_dir(name);
    std::fs::copy(repo().join("examples/fastapi/app.py"), dir.join("app.py")).expect("copy app");
    dir
}

fn preload(name: &str, dir: &Path, extra: &[&str]) -> Start {
    let python = venv_python();
    Start::new(
        name,
        &[
            "app:main",
            "--preload",
            "--no-access-log",
            "--python",
            python.to_str().expect("utf8"),
        ],
    )
    .args(["--chdir", dir.to_str().expect("utf8")])
    .args(extra.iter().copied())
}

fn version(h: &Harness) -> Option<String> {
    let (status, body) = http_get(h.addr(), "/version").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| v["version"].as_str().unwrap_or("").to_string())
}

fn smaps(pid: i32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn forked_workers_answer_and_belong_to_the_master() {
    let dir = app_copy("pre-basic");
    let mut h = preload("pre-basic", &dir, &["-w", "3"]).spawn();
    let pids = h.wait_workers(3, BOOT);
    for pid in &pids {
        let st = stat(*pid).expect("stat");
        assert_eq!(st.ppid, h.pid, "worker {pid} is the master's child");
        assert_eq!(st.pgrp, *pid, "worker {pid} leads its own group");
    }
    h.check(h.count_log("forked from zygote") == 3, "three forks");
    h.check(zygote_pids(&h).len() == 1, "one zygote");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let zygote = zygote_pids(&h)[0];
    assert!(!alive(zygote), "zygote stopped");
    for pid in pids {
        assert!(!alive(pid));
    }
}

#[test]
fn a_killed_worker_is_replaced_by_a_fresh_fork_quickly() {
    let dir = app_copy("pre-respawn");
    let mut h = preload("pre-respawn", &dir, &["-w", "2"]).spawn();
    let before = h.wait_workers(2, BOOT);
    let victim = *before.iter().next().expect("worker");
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    let addr = h.addr();
    let new = wait_for(BOOT, || {
        let (_, body) = http_get(addr, "/pid").ok()?;
        let p: i32 = body.trim().parse().ok()?;
        (!before.contains(&p)).then_some(p)
    })
    .expect("a new pid answered");
    eprintln!(
        "respawn with --preload: new pid answered after {:?}",
        t0.elapsed()
    );
    assert_eq!(
        stat(new).expect("stat").ppid,
        h.pid,
        "the replacement's parent is the master"
    );
}

#[test]
fn workers_share_memory_with_the_zygote() {
    let dir = app_copy("pre-pss");
    let mut h = preload("pre-pss", &dir, &["-w", "2"]).spawn();
    let pids = h.wait_workers(2, BOOT);
    for pid in pids {
        let (rss, pss) = (smaps(pid, "Rss:"), smaps(pid, "Pss:"));
        eprintln!("worker {pid}: Rss {rss} kB, Pss {pss} kB");
        assert!(
            rss > 0 && pss * 10 < rss * 7,
            "PSS {pss} kB not well below RSS {rss} kB"
        );
    }
}

#[test]
fn an_import_error_in_the_zygote_exits_4() {
    let mut h = Start::new(
        "pre-import",
        &[
            "raises_on_import:main",
            "--preload",
            "--python",
            venv_python().to_str().expect("utf8"),
        ],
    )
    .args(["--chdir", repo().join("tests/apps").to_str().expect("utf8")])
    .spawn();
    assert_eq!(h.exit_code(BOOT), 4, "{}", h.log_text());
    h.check(
        h.log_text().contains("procman: error: Failed to load application 'raises_on_import:main': RuntimeError: boom at import"),
        "the Python error in the last line",
    );
}

#[test]
fn a_killed_zygote_is_restarted_and_workers_keep_serving() {
    let dir = app_copy("pre-zkill");
    let mut h = preload("pre-zkill", &dir, &["-w", "2"]).spawn();
    let before = h.wait_workers(2, BOOT);
    let zygote = zygote_pids(&h)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote), Signal::SIGKILL)
        .expect("kill zygote");
    h.check(h.wait_log("restarting it", BOOT), "zygote death noticed");
    let second = wait_for(BOOT, || zygote_pids(&h).get(1).copied()).expect("a new zygote");
    h.check(
        h.wait_log(&format!("Zygote {second} ready"), BOOT),
        "new zygote ready",
    );
    for p in &before {
        assert!(alive(*p), "worker {p} untouched");
    }
    // A later respawn forks from the new zygote.
    let victim = *before.iter().next().expect("worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    h.check(
        h.wait_log(&format!("forked from zygote {second})"), BOOT),
        "respawned from the new zygote",
    );
    h.wait_workers(2, BOOT);
}

#[test]
fn hup_loads_new_code_with_zero_failed_requests() {
    let dir = app_copy("pre-hup");
    let mut h = preload("pre-hup", &dir, &["-w", "2"]).spawn();
    let old: BTreeSet<i32> = h.wait_workers(2, BOOT);
    assert_eq!(version(&h).as_deref(), Some("1"));
    let app = dir.join("app.py");
    let code = std::fs::read_to_string(&app).expect("read");
    std::fs::write(&app, code.replace("VERSION = \"1\"", "VERSION = \"2\"")).expect("write");
    let load = Load::start(h.addr(), 4, 30_000, Duration::from_secs(60));
    wait_for(BOOT, || (load.done() > 50).then_some(()));
    h.signal(Signal::SIGHUP);
    let done = wait_for(BOOT, || {
        let kids: BTreeSet<i32> = h.children().into_iter().collect();
        (h.log_text().contains("Reload done") && old.iter().all(|p| !kids.contains(p)))
            .then_some(())
    });
    let target = load.done() + 100;
    wait_for(BOOT, || (load.done() > target).then_some(()));
    let report = load.finish();
    h.check(done.is_some(), "reload finished");
    h.check(
        report.failures.is_empty(),
        &format!("failed: {:?} of {}", report.failures, report.ok),
    );
    assert_eq!(version(&h).as_deref(), Some("2"), "new code serves");
    let gone = wait_for(BOOT, || (!alive(zygote_pids(&h)[0])).then_some(()));
    h.check(gone.is_some(), "the old zygote exited with its generation");
}

#[test]
fn hup_with_broken_code_keeps_the_old_generation_serving() {
    let dir = app_copy("pre-broken");
    let mut h = preload("pre-broken", &dir, &["-w", "2"]).spawn();
    let old = h.wait_workers(2, BOOT);
    let app = dir.join("app.py");
    let code = std::fs::read_to_string(&app).expect("read");
    std::fs::write(&app, format!("raise RuntimeError('broken deploy')\n{code}")).expect("write");
    h.signal(Signal::SIGHUP);
    h.check(
        h.wait_log("Reload to generation 2 failed", BOOT),
        "reload reported failed",
    );
    h.check(
        h.log_text().contains("broken deploy"),
        "names the Python error",
    );
    let still = h.wait_workers(2, BOOT);
    assert_eq!(old, still);
    assert_eq!(version(&h).as_deref(), Some("1"));
    // A respawn after the failed reload still works (from the old zygote).
    let victim = *old.iter().next().expect("worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    let replaced = wait_for(BOOT, || {
        let kids: BTreeSet<i32> = h.children().into_iter().collect();
        (!kids.contains(&victim) && h.count_log("forked from zygote") >= 3).then_some(())
    });
    h.check(replaced.is_some(), "respawned after the failed reload");
    assert_eq!(version(&h).as_deref(), Some("1"));
}

#[test]
fn a_thread_started_at_import_time_is_warned_about() {
    let mut h = Start::new(
        "pre-thread",
        &[
            "threaded_app:main",
            "--preload",
            "--no-access-log",
            "--python",
            venv_python().to_str().expect("utf8"),
        ],
    )
    .args(["--chdir", repo().join("tests/apps").to_str().expect("utf8")])
    .spawn();
    h.wait_workers(1, BOOT);
    h.check(
        h.log_text().contains("threads do not survive fork"),
        "warning logged",
    );
}

#[test]
fn eight_forked_workers_are_all_seen_ready_and_reload() {
    // Eight workers forked in a burst send their READY=1 within
    // milliseconds: more datagrams than the notify queue holds (often 10).
    let dir = app_copy("pre-eight");
    let mut h = preload("pre-eight", &dir, &["-w", "8"]).spawn();
    h.check(
        h.wait_log("All 8 workers ready", BOOT),
        "every READY=1 arrived",
    );
    let old = h.wait_workers(8, BOOT);
    h.signal(Signal::SIGHUP);
    h.check(h.wait_log("Reload done", BOOT), "the reload completes");
    let new = h.wait_workers(8, BOOT);
    assert!(old.is_disjoint(&new), "every worker replaced");
}

#[test]
fn a_killed_master_leaves_neither_zygote_nor_workers() {
    let dir = app_copy("pre-master-kill");
    let mut h = preload("pre-master-kill", &dir, &["-w", "2"]).spawn();
    let workers = h.wait_workers(2, BOOT);
    let zygote = zygote_pids(&h)[0];
    h.signal(Signal::SIGKILL);
    h.wait_exit(BOOT);
    let gone = wait_for(BOOT, || {
        (workers.iter().all(|p| !alive(*p)) && !alive(zygote)).then_some(())
    });
    assert!(
        gone.is_some(),
        "orphans: workers {workers:?}, zygote {zygote}"
    );
}

/// procman with --preload serving the hostile app (tests/apps/hostile_fork.py)
/// in the given mode.
fn hostile(name: &str, mode: &str, workers: &str) -> Start {
    let python = venv_python();
    Start::new(
        name,
        &[
            "hostile_fork:main",
            "--preload",
            "--no-access-log",
            "--python",
            python.to_str().expect("utf8"),
            "-w",
            workers,
            "--env",
            &format!("HOSTILE_FORK={mode}"),
        ],
    )
    .args(["--chdir", repo().join("tests/apps").to_str().expect("utf8")])
}

#[test]
fn a_zygote_that_cannot_fork_is_given_up_for_cold_workers() {
    let mut h = hostile("pre-nofork", "error", "2").spawn();
    h.wait_workers(2, Duration::from_secs(30));
    h.check(
        h.log_text().contains("new workers start cold"),
        "cold fallback logged",
    );
    // Each zygote answered a spawn with an error: counted as a failure,
    // backed off, and given up after the third.
    let zygotes = zygote_pids(&h).len();
    h.check(zygotes == 3, &format!("{zygotes} zygotes started, want 3"));
    h.check(
        h.count_log("could not fork a worker") == 3,
        "one failed spawn per zygote",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_spawn_reply_that_comes_too_late_leaves_no_unsupervised_worker() {
    let mut h = hostile("pre-slowfork", "slow", "1").spawn();
    h.check(
        h.wait_log("new workers start cold", Duration::from_secs(40)),
        "cold fallback after the zygotes that did not answer in time",
    );
    h.wait_workers(1, BOOT);
    // The workers forked for requests that timed out must not serve: once
    // they are gone only the cold worker is left (zygotes were killed).
    let only_one = wait_for(Duration::from_secs(10), || {
        let kids: Vec<i32> = h.children().into_iter().filter(|p| alive(*p)).collect();
        (kids.len() == 1).then_some(())
    });
    let kids: Vec<i32> = h.children().into_iter().filter(|p| alive(*p)).collect();
    h.check(
        only_one.is_some(),
        &format!("procman's children: {kids:?}, want only the cold worker"),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_master_awaiting_a_spawn_reply_still_handles_signals() {
    // The zygote answers a spawn only after 3 s. The master must not wait
    // for it: a TTIN sent meanwhile is handled at once, before the master
    // gives up on the reply (2 s after asking).
    let mut h = hostile("pre-async", "slow", "1").spawn();
    let zygote_ready = wait_for(BOOT, || {
        let log = h.log_text();
        let ready = log
            .lines()
            .any(|l| l.contains("] Zygote ") && l.contains(" ready in "));
        ready.then_some(())
    });
    h.check(
        zygote_ready.is_some(),
        "zygote ready (the spawn request follows at once)",
    );
    h.signal(Signal::SIGTTIN);
    h.check(h.wait_log("Workers: 1 -> 2", BOOT), "TTIN handled");
    h.check(
        h.wait_log("did not answer a spawn request", BOOT),
        "the request timed out",
    );
    let log = h.log_text();
    let ttin = log.find("Workers: 1 -> 2").unwrap_or(usize::MAX);
    let gave_up = log
        .find("did not answer a spawn request")
        .unwrap_or(usize::MAX);
    h.check(
        ttin < gave_up,
        "TTIN was handled while the spawn reply was awaited, not after",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
