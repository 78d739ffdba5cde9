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
    .json()
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
    h.check(zygote_pids(&h).len() == 1, "one zygote");
    let zygote = zygote_pids(&h)[0];
    h.check(
        h.count_events("booting", |e| {
            e["zygote"] == zygote && pids.contains(&worker_of(e))
        }) == 3,
        "three forks, from the zygote",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
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
    h.expect_event("zygote-exited", BOOT, "zygote death noticed", |e| {
        e["zygote"] == zygote && e["reason"] == "died"
    });
    let second = wait_for(BOOT, || zygote_pids(&h).get(1).copied()).expect("a new zygote");
    h.expect_event("zygote-ready", BOOT, "new zygote ready", |e| {
        e["zygote"] == second
    });
    for p in &before {
        assert!(alive(*p), "worker {p} untouched");
    }
    // A later respawn forks from the new zygote.
    let victim = *before.iter().next().expect("worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    h.expect_event("booting", BOOT, "respawned from the new zygote", |e| {
        e["zygote"] == second
    });
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
        (h.has_event("reload-done", |e| e["generation"] == 2)
            && old.iter().all(|p| !kids.contains(p)))
        .then_some(())
    });
    load.wait_more(100, BOOT);
    let report = load.finish();
    h.check(done.is_some(), "reload finished");
    h.check_none_failed(&report);
    assert_eq!(version(&h).as_deref(), Some("2"), "new code serves");
    let first = zygote_pids(&h)[0];
    h.expect_event(
        "zygote-exited",
        BOOT,
        "the old zygote exited with its generation",
        |e| e["zygote"] == first && e["generation"] == 1 && e["reason"] == "stopped",
    );
    h.check(!alive(first), "the old zygote is gone");
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
    let failed = h.expect_event("reload-failed", BOOT, "reload reported failed", |e| {
        e["generation"] == 2
    });
    // What the operator reads: the Python error.
    h.check(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("broken deploy")),
        &format!("names the Python error: {failed}"),
    );
    let still = h.wait_workers(2, BOOT);
    assert_eq!(old, still);
    assert_eq!(version(&h).as_deref(), Some("1"));
    // A respawn after the failed reload still works (from the old zygote).
    let victim = *old.iter().next().expect("worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    let replaced = wait_for(BOOT, || {
        let kids: BTreeSet<i32> = h.children().into_iter().collect();
        (!kids.contains(&victim)
            && h.count_events("booting", |e| e["zygote"].is_i64() && e["generation"] == 1) >= 3)
            .then_some(())
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
    // A warning the operator must read: its wording is the behaviour.
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
    h.expect_event("all-ready", BOOT, "every READY=1 arrived", |e| {
        e["generation"] == 1
    });
    h.check(h.count_events("ready", |_| true) == 8, "eight ready");
    let old = h.wait_workers(8, BOOT);
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "the reload completes", |_| true);
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
    .json()
}

#[test]
fn a_zygote_that_cannot_fork_is_given_up_for_cold_workers() {
    let mut h = hostile("pre-nofork", "error", "2").spawn();
    h.wait_workers(2, Duration::from_secs(30));
    h.check(
        h.has_event("zygote-cold", |e| e["reason"] == "failures"),
        "cold fallback logged",
    );
    // Each zygote answered a spawn with an error: counted as a failure,
    // backed off, and given up after the third.
    let zygotes = zygote_pids(&h);
    h.check(
        zygotes.len() == 3,
        &format!("{zygotes:?} zygotes started, want 3"),
    );
    for z in &zygotes {
        h.check(
            h.count_events("zygote-spawn-failed", |e| e["zygote"] == *z) == 1,
            &format!("one failed spawn for zygote {z}"),
        );
    }
    h.check(
        !h.has_event("booting", |e| e["zygote"].is_i64()),
        "no worker forked",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_spawn_reply_that_comes_too_late_leaves_no_unsupervised_worker() {
    let mut h = hostile("pre-slowfork", "slow", "1").spawn();
    h.expect_event(
        "zygote-cold",
        Duration::from_secs(40),
        "cold fallback after the zygotes that did not answer in time",
        |e| e["reason"] == "failures",
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
    h.expect_event(
        "zygote-ready",
        BOOT,
        "zygote ready (the spawn request follows at once)",
        |_| true,
    );
    h.signal(Signal::SIGTTIN);
    h.expect_event("scaled", BOOT, "TTIN handled", |e| e["workers"] == 2);
    h.expect_event("zygote-spawn-failed", BOOT, "the request timed out", |_| {
        true
    });
    let ttin = h
        .event_index("scaled", |e| e["workers"] == 2)
        .unwrap_or(usize::MAX);
    let gave_up = h
        .event_index("zygote-spawn-failed", |_| true)
        .unwrap_or(usize::MAX);
    // Only a timeout can fail this zygote's spawn (it answers, late).
    h.check(
        h.messages()
            .iter()
            .any(|m| m.contains("did not answer a spawn request")),
        "the failure was the timeout",
    );
    h.check(
        ttin < gave_up,
        "TTIN was handled while the spawn reply was awaited, not after",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
