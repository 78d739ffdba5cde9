//! `--max-requests`: a worker's recycle request is acted on when it is
//! sent, not at the master's next batched read of the notify socket.

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// Serves tests/apps/keep_alive_app.py with `python` from `dir` under
/// `--max-requests`, one worker; one client sends 0.1 s requests one after
/// the other until the master logs that it recycles the first worker.
/// Returns how many of them that worker had answered by then.
fn answered_until_recycled(name: &str, python: &Path, dir: &Path, extra: &[&str]) -> usize {
    let mut h = Start::new(
        name,
        &[
            "keep_alive_app:main",
            "--no-access-log",
            "--python",
            python.to_str().expect("utf8"),
            "--chdir",
            dir.to_str().expect("utf8"),
            "-w",
            "1",
            "--timeout",
            "30",
            "--log-level",
            "debug",
            "--max-requests",
            &LIMIT.to_string(),
        ],
    )
    .args(extra.iter().copied())
    .json()
    .spawn();
    let old = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    h.expect_event("notify-pace", BOOT, "heartbeats read in batches", |e| {
        e["pace"] == "lazy"
    });
    let addr = h.addr();
    let mut served_by_old = 0;
    let acted = wait_for(BOOT, || {
        match http_get(addr, "/slow?s=0.1") {
            Ok((200, body)) if body.trim() == old.to_string() => served_by_old += 1,
            Ok((200, _)) => {}
            other => panic!("request failed: {other:?}\n{}", h.log_text()),
        }
        h.has_event("recycling", |e| {
            worker_of(e) == old && e["reason"] == "max_requests"
        })
        .then_some(())
    });
    h.check(acted.is_some(), "the worker was recycled");
    eprintln!("{name}: the old worker answered {served_by_old} requests (limit {LIMIT})");
    h.check(
        served_by_old <= LIMIT + SLACK,
        &format!(
            "the old worker had answered {served_by_old} of this client's requests \
             (limit {LIMIT}) when the master acted on its recycle request"
        ),
    );
    served_by_old
}

const LIMIT: usize = 20;
// Each request takes at least 0.1 s (the app sleeps), and the one client
// sends them one after the other: so many requests answered by the old
// worker after it reached its limit are at least as many tenths of a
// second. The worker looks at its count at every 0.1 s tick of its main
// loop, then asks; SLACK allows about 1 s for that and for the master to
// act. The master reads heartbeats in batches here (one ready worker,
// --timeout 30: every 20 s), which is what the request used to wait for.
const SLACK: usize = 10;

#[test]
fn a_recycle_request_is_acted_on_at_once_while_heartbeats_stay_batched() {
    answered_until_recycled("max-requests-on-time", &venv_python(), &apps_dir(), &[]);
}

#[test]
fn a_nobody_workers_recycle_request_reaches_the_master_at_once_too() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: --user nobody cannot be tested");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("max-requests-nobody-app");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = dir.join("keep_alive_app.py");
    std::fs::copy(apps_dir().join("keep_alive_app.py"), &app).expect("copy app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    answered_until_recycled(
        "max-requests-nobody",
        &system_venv_python(),
        &dir,
        &["--user", "nobody"],
    );
}
