//! Start-up: the signal state procman inherits from its parent, and
//! stopping procman while a `--pre-start` command runs.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

/// A parent that leaves TERM and CHLD blocked and TERM and HUP ignored,
/// then execs procman (same pid): what a careless shell, supervisor or
/// container runtime can do.
const CARELESS_PARENT: &str = "import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
os.execv(sys.argv[1], sys.argv[1:])
";

fn careless_parent(name: &str, workers: &str) -> Harness {
    let python = python3();
    Start::new(name, &["-w", workers, "--", &hello()])
        .json()
        .spawn_with(
            python.to_str().expect("utf-8 path"),
            &["-c", CARELESS_PARENT, PROCMAN],
        )
}

#[test]
fn term_stops_procman_even_if_its_parent_blocked_and_ignored_it() {
    let mut h = careless_parent("blocked-term", "2");
    let pids = h.wait_workers(2, BOOT);
    h.signal(Signal::SIGTERM);
    let code = h.wait_exit(BOOT).and_then(|s| s.code());
    h.check(code == Some(0), &format!("exit 0 after TERM, got {code:?}"));
    h.check(h.zombies().is_empty(), "no zombie");
    for p in pids {
        assert!(!alive(p), "worker {p} outlived procman");
    }
}

#[test]
fn a_killed_worker_is_respawned_even_if_the_parent_blocked_chld() {
    let mut h = careless_parent("blocked-chld", "1");
    let before = h.wait_workers(1, BOOT);
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    // Kill only once the master sleeps with nothing due, so that only
    // SIGCHLD can tell it (a wake-up for a deadline would reap anyway).
    h.check(
        wait_for(BOOT, || idle_in_poll(h.pid).then_some(())).is_some(),
        "the master went idle",
    );
    let victim = *before.iter().next().expect("a worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill -9");
    h.expect_event("exited", BOOT, "the killed worker was reaped", |e| {
        worker_of(e) == victim && e["reason"] == "crash"
    });
    let after = h.wait_workers(1, BOOT);
    h.check(!after.contains(&victim), "a new worker answers");
    h.check(h.zombies().is_empty(), "no zombie");
    // HUP, ignored by the parent, is procman's again: a reload.
    h.signal(Signal::SIGHUP);
    h.expect_event(
        "reloading",
        BOOT,
        "HUP reloads although the parent ignored it",
        |e| e["generation"] == 2,
    );
}

/// Reads a pid that a pre-start command wrote (atomically, with mv).
fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A pre-start command that starts a helper in the background, writes its
/// own pid and the helper's (`lead`, `helper`) once it is set up, and waits.
/// `setup` runs first (e.g. a trap).
fn pre_start_script(dir: &Path, setup: &str, helper: &str) -> String {
    let d = dir.display();
    format!(
        "{setup}{helper} & echo $! > {d}/helper.tmp; mv {d}/helper.tmp {d}/helper; \
         echo $$ > {d}/lead.tmp; mv {d}/lead.tmp {d}/lead; wait"
    )
}

/// Starts procman with the pre-start command `script`; returns it with the
/// pids the command reported once it was running.
fn with_pre_start(
    name: &str,
    script_for: impl Fn(&Path) -> String,
    extra: &[&str],
) -> (Harness, i32, i32) {
    let start = Start::new(name, &[]).json();
    let script = script_for(start.dir());
    let h = start
        .args(["--pre-start", &script])
        .args(extra)
        .args(["-w", "1", "--", &hello()])
        .spawn();
    let dir = h.dir.clone();
    let pids = wait_for(BOOT, || {
        Some((read_pid(&dir.join("lead"))?, read_pid(&dir.join("helper"))?))
    });
    let Some((lead, helper)) = pids else {
        panic!("the pre-start command did not start\n{}", h.log_text());
    };
    h.check(h.has_event("pre-start", |_| true), "running");
    (h, lead, helper)
}

/// procman exited 0 in time, started no worker, and the pre-start
/// command's processes are gone.
fn check_stopped_during_pre_start(h: &mut Harness, lead: i32, helper: i32, within: Duration) {
    let t0 = Instant::now();
    let code = h.wait_exit(within).and_then(|s| s.code());
    h.check(
        code == Some(0),
        &format!(
            "exit 0 within {within:?} of the stop, got {code:?} after {:?}",
            t0.elapsed()
        ),
    );
    h.check(!h.has_event("booting", |_| true), "no worker started");
    h.check(
        h.has_event("shutdown", |e| e["reason"] == "pre-start"),
        "the stop is logged",
    );
    for p in [lead, helper] {
        h.check(!alive(p), &format!("pre-start process {p} is gone"));
    }
}

#[test]
fn term_during_a_pre_start_command_stops_it_and_starts_no_worker() {
    let (mut h, lead, helper) = with_pre_start(
        "prestart-term",
        |d| pre_start_script(d, "", "sleep 1000"),
        &["--graceful-timeout", "60"],
    );
    h.signal(Signal::SIGTERM);
    // Well before the graceful timeout: the command was told, not killed.
    check_stopped_during_pre_start(&mut h, lead, helper, Duration::from_secs(20));
    h.check(!h.has_event("killing", |_| true), "no SIGKILL needed");
}

#[test]
fn int_during_a_pre_start_command_is_passed_on_to_it() {
    // The command is `sleep` itself (exec): a non-interactive shell's
    // background job would ignore INT.
    let (mut h, lead, _) = with_pre_start(
        "prestart-int",
        |d| {
            let d = d.display();
            format!(
                "echo $$ > {d}/helper.tmp; mv {d}/helper.tmp {d}/helper; \
                 echo $$ > {d}/lead.tmp; mv {d}/lead.tmp {d}/lead; exec sleep 1000"
            )
        },
        &["--graceful-timeout", "60"],
    );
    h.signal(Signal::SIGINT);
    check_stopped_during_pre_start(&mut h, lead, lead, Duration::from_secs(20));
    h.check(!h.has_event("killing", |_| true), "no SIGKILL needed");
}

#[test]
fn a_pre_start_command_ignoring_term_is_killed_at_the_graceful_timeout() {
    // Both the shell and its helper ignore TERM (an ignored signal stays
    // ignored in children).
    let (mut h, lead, helper) = with_pre_start(
        "prestart-kill",
        |d| pre_start_script(d, "trap '' TERM; ", "sleep 1000"),
        &["--graceful-timeout", "1"],
    );
    let t0 = Instant::now();
    h.signal(Signal::SIGTERM);
    check_stopped_during_pre_start(&mut h, lead, helper, BOOT);
    let took = t0.elapsed();
    h.check(
        took >= Duration::from_millis(900),
        &format!("killed before the graceful timeout: {took:?}"),
    );
    h.check(
        h.has_event("killing", |e| {
            e["reason"] == "pre-start" && e["process"] == lead
        }),
        "the SIGKILL is logged",
    );
}
