//! Performance by default for the uvicorn class: a base zygote (uvicorn
//! imported once, the app imported by each forked worker) and a bound on
//! how many workers boot at once.

mod util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

fn fastapi_dir() -> PathBuf {
    repo().join("examples/fastapi")
}

/// procman serving `app` from `dir` with the test venv's Python, JSON logs.
fn uvicorn(name: &str, dir: &Path, app: &str, extra: &[&str]) -> Start {
    let python = venv_python();
    Start::new(
        name,
        &[
            app,
            "--python",
            python.to_str().expect("utf8"),
            "--no-access-log",
            "--log-format",
            "json",
        ],
    )
    .args(["--chdir", dir.to_str().expect("utf8")])
    .args(extra.iter().copied())
}

/// The most workers the master had booting at once, from its own events in
/// order: `booting` adds one, `ready` or an exit before ready removes it.
fn most_booting_at_once(h: &Harness) -> usize {
    let mut booting = std::collections::BTreeSet::new();
    let mut most = 0;
    for e in h.events() {
        let Some(pid) = e["worker"].as_i64() else {
            continue;
        };
        match e["event"].as_str() {
            Some("booting") => {
                booting.insert(pid);
            }
            Some(_) => {
                booting.remove(&pid);
            }
            None => {}
        }
        most = most.max(booting.len());
    }
    most
}

#[test]
fn with_two_cpus_no_more_than_two_of_eight_workers_boot_at_once() {
    let h = uvicorn("boot-limit", &fastapi_dir(), "app:main", &["-w", "8"]);
    let mut h = h.spawn_with("taskset", &["-c", "0,1", PROCMAN]);
    let all = h.wait_event("all-ready", BOOT, |_| true);
    h.check(all.is_some(), "all 8 ready");
    h.check(h.events_named("booting").len() == 8, "eight workers booted");
    let most = most_booting_at_once(&h);
    h.check(
        most == 2,
        &format!("{most} workers booting at once, want 2"),
    );
    // A reload boots its workers two at a time too.
    h.signal(Signal::SIGHUP);
    let done = h.wait_event("reload-done", BOOT, |e| e["generation"] == 2);
    h.check(done.is_some(), "reload done");
    let most = most_booting_at_once(&h);
    h.check(most == 2, &format!("{most} booting at once in the reload"));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
