//! What procman tells its own systemd beyond READY/RELOADING/STOPPING
//! (issue 26, items 2 and 4), against a fake NOTIFY_SOCKET: STATUS= is
//! never stale (starting, reloading, stopping, a failed reload's reason
//! until the next success), and a worker's EXTEND_TIMEOUT_USEC reaches
//! systemd while it waits for a start, a reload or a stop, never longer
//! than the worker asked.

mod util;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

/// `systemd-notify` (starts in milliseconds, unlike a Python interpreter).
fn systemd_notify() -> String {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("systemd-notify"))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
        .expect("systemd-notify is missing: run scripts/test (it installs systemd)")
}

/// Every `EXTEND_TIMEOUT_USEC=` value in `msgs`.
fn extensions(msgs: &[String]) -> Vec<u64> {
    msgs.iter()
        .flat_map(|m| m.lines())
        .filter_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .map(|v| v.parse().expect("a number of microseconds"))
        .collect()
}

/// Every `STATUS=` text in `msgs`, in order.
fn statuses(msgs: &[String]) -> Vec<String> {
    msgs.iter()
        .flat_map(|m| m.lines())
        .filter_map(|l| l.strip_prefix("STATUS="))
        .map(str::to_string)
        .collect()
}

#[test]
fn while_starting_status_counts_ready_workers_and_a_workers_extension_reaches_systemd() {
    let dir = temp_dir("sd-starting");
    let path = dir.join("notify");
    let mut fake = FakeSystemd::at(&path);
    // Each worker asks for 30 s more at once (past --startup-timeout 1)
    // and is ready after 2 s.
    let script = format!(
        "{} --no-block EXTEND_TIMEOUT_USEC=30000000 & exec {} --ready-after 2",
        systemd_notify(),
        notify_worker().join(" ")
    );
    let mut h = Start::new(
        "sd-starting",
        &[
            "--ready",
            "notify",
            "-w",
            "2",
            "--startup-timeout",
            "1",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .json()
    .env("NOTIFY_SOCKET", path.to_str().expect("utf8"))
    .spawn();
    let ready = fake.wait("READY=1", 0);
    h.check(ready.is_some(), &format!("READY=1 sent: {:?}", fake.got));
    let before = &fake.got[..ready.unwrap_or(0)];
    let shown = statuses(before);
    h.check(
        shown.iter().any(|s| s == "starting: 0/2 workers ready"),
        &format!("a STATUS while starting, before READY=1: {shown:?}"),
    );
    let ext = extensions(before);
    h.check(
        !ext.is_empty() && ext.iter().all(|&e| e > 0 && e <= 30_000_000),
        &format!("the workers' extension forwarded, never more than asked: {ext:?}"),
    );
    h.check(
        statuses(&fake.got[ready.unwrap_or(0)..])
            .first()
            .is_some_and(|s| s == "2/2 workers ready, generation 1"),
        &format!("READY=1's status: {:?}", fake.got),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn while_stopping_status_counts_draining_workers_and_a_workers_extension_reaches_systemd() {
    let dir = temp_dir("sd-stopping");
    let path = dir.join("notify");
    let mut fake = FakeSystemd::at(&path);
    let start = Start::new("sd-stopping", &[]).json();
    let (start, ready) = slow_stopping_worker(start);
    let mut h = start
        .env("NOTIFY_SOCKET", path.to_str().expect("utf8"))
        .spawn();
    wait_slow_stopper(&h, &ready, BOOT);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let stopping = fake.wait("STOPPING=1", 0).expect("STOPPING=1");
    fake.pump();
    let after = &fake.got[stopping..];
    let shown = statuses(after);
    h.check(
        shown.iter().any(|s| s == "stopping: draining 1 worker"),
        &format!("a STATUS while draining: {shown:?}"),
    );
    h.check(
        !shown.iter().any(|s| s.contains("workers ready")),
        &format!("no ready count once stopping: {shown:?}"),
    );
    let ext = extensions(after);
    h.check(
        !ext.is_empty() && ext.iter().all(|&e| e > 0 && e <= 60_000_000),
        &format!("the worker's extension forwarded, never more than asked: {ext:?}"),
    );
}

fn write_config(file: &Path, command: &[String]) {
    let list: Vec<String> = command.iter().map(|c| format!("{c:?}")).collect();
    std::fs::write(
        file,
        format!("workers = 2\ncommand = [{}]\n", list.join(", ")),
    )
    .expect("write config");
}

#[test]
fn reload_status_counts_the_new_generation_and_a_failure_is_shown_until_the_next_success() {
    let dir = temp_dir("sd-reload");
    let path = dir.join("notify");
    let mut fake = FakeSystemd::at(&path);
    let start = Start::new("sd-reload", &["--ready", "notify"]).json();
    let file = start.dir().join("procman.toml");
    let mut command = notify_worker();
    command.extend(["--ready-after".to_string(), "1".to_string()]);
    write_config(&file, &command);
    let mut h = start
        .args(["-c", file.to_str().expect("utf8")])
        .env("NOTIFY_SOCKET", path.to_str().expect("utf8"))
        .spawn();
    let ready = fake.wait("READY=1", 0).expect("READY=1");
    h.signal(Signal::SIGHUP);
    let reloading = fake.wait("RELOADING=1", ready + 1).expect("RELOADING=1");
    let done = fake.wait("READY=1", reloading + 1);
    h.check(done.is_some(), "the reload ended");
    let shown = statuses(&fake.got[reloading..=done.unwrap_or(reloading)]);
    h.check(
        shown
            .iter()
            .any(|s| s == "reloading to generation 2: 0/2 ready"),
        &format!("a STATUS while reloading: {shown:?}"),
    );
    // A broken configuration: the reload fails, and says so until the
    // next one succeeds, whatever else changes meanwhile.
    std::fs::write(&file, "workers = [").expect("break config");
    h.signal(Signal::SIGHUP);
    let failed = fake.wait("reload failed", reloading + 1);
    h.check(failed.is_some(), &format!("failure shown: {:?}", fake.got));
    h.signal(Signal::SIGTTIN);
    let scaled = fake.wait("3/3", failed.unwrap_or(0) + 1);
    h.check(
        scaled.is_some_and(|i| fake.got[i].contains("failed")),
        &format!(
            "a later status still shows the failed reload: {:?}",
            fake.got
        ),
    );
    write_config(&file, &command);
    h.signal(Signal::SIGHUP);
    let again = fake.wait("RELOADING=1", scaled.unwrap_or(0) + 1);
    let ok = fake.wait("READY=1", again.unwrap_or(0) + 1);
    h.check(
        ok.is_some_and(|i| !fake.got[i].contains("failed")),
        &format!("a successful reload clears it: {:?}", fake.got),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn while_reloading_a_new_workers_extension_reaches_systemd() {
    let dir = temp_dir("sd-reload-extend");
    let path = dir.join("notify");
    let mut fake = FakeSystemd::at(&path);
    // Generation 1 is ready at once; later ones ask for 20 s more first.
    let w = notify_worker().join(" ");
    let script = format!(
        "if [ \"$PROCMAN_GENERATION\" = 1 ]; then exec {w} --ready-after 0.2; fi; \
         {} --no-block EXTEND_TIMEOUT_USEC=20000000 & exec {w} --ready-after 2",
        systemd_notify()
    );
    let mut h = Start::new(
        "sd-reload-extend",
        &["--ready", "notify", "-w", "2", "--", "sh", "-c", &script],
    )
    .json()
    .env("NOTIFY_SOCKET", path.to_str().expect("utf8"))
    .spawn();
    let ready = fake.wait("READY=1", 0).expect("READY=1");
    h.check(
        extensions(&fake.got[..ready]).is_empty(),
        "nothing asked while booting",
    );
    h.signal(Signal::SIGHUP);
    let reloading = fake.wait("RELOADING=1", ready + 1).expect("RELOADING=1");
    let done = fake.wait("READY=1", reloading + 1);
    h.check(done.is_some(), "the reload ended");
    let ext = extensions(&fake.got[reloading..done.unwrap_or(reloading)]);
    h.check(
        !ext.is_empty() && ext.iter().all(|&e| e > 0 && e <= 20_000_000),
        &format!("the new workers' extension forwarded during the reload: {ext:?}"),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
