//! Documented forms of options that no other test reached: `--metrics`
//! on a unix socket, the control client finding its socket through
//! `PROCMAN_CONTROL_SOCKET`, `stop --quick` from the client, and the
//! config-file key `no-zygote = true`. Each would fail if the form were
//! parsed but not wired.

mod util;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(20);
const PROCMAN: &str = env!("CARGO_BIN_EXE_procman");

/// `GET path` over a unix socket; the status code of the answer.
fn unix_get(path: &std::path::Path, what: &str) -> Option<u16> {
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {what} HTTP/1.1\r\nHost: procman\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn metrics_on_a_unix_socket_answers_the_probes_and_is_removed_at_exit() {
    let dir = temp_dir("metrics-unix");
    let sock = dir.join("metrics.sock");
    let spec = format!("unix:{}", sock.display());
    let mut h = Start::new("metrics-unix", &["--metrics", &spec, "--"])
        .args([hello()])
        .spawn();
    h.wait_workers(1, BOOT);
    let ready = wait_for(BOOT, || {
        (unix_get(&sock, "/readyz") == Some(200)).then_some(())
    });
    h.check(ready.is_some(), "/readyz is 200 over the unix socket");
    h.check(unix_get(&sock, "/healthz") == Some(200), "/healthz is 200");
    h.check(
        unix_get(&sock, "/nothing-here") == Some(404),
        "unknown path is 404",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    h.check(!sock.exists(), "the metrics socket file is removed at exit");
}

#[test]
fn the_client_finds_the_socket_in_procman_control_socket_and_stops_quickly() {
    let dir = temp_dir("control-env");
    let sock = dir.join("control.sock");
    let sock_s = sock.to_str().expect("utf8");
    let mut h = Start::new(
        "control-env",
        &["-w", "2", "--control-socket", sock_s, "--"],
    )
    .json()
    .args([hello()])
    .spawn();
    let pids = h.wait_workers(2, BOOT);
    let client = |args: &[&str]| {
        Command::new(PROCMAN)
            .args(args)
            .env("PROCMAN_CONTROL_SOCKET", sock_s)
            .output()
            .expect("run the client")
    };
    let out = client(&["status", "--json"]);
    h.check(
        out.status.success(),
        &format!("status: {}", String::from_utf8_lossy(&out.stderr)),
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let listed: std::collections::BTreeSet<i32> = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
        .collect();
    h.check(
        listed == pids,
        &format!("status lists {listed:?}, serving {pids:?}"),
    );
    let out = client(&["stop", "--quick"]);
    h.check(
        out.status.success(),
        &format!("stop --quick: {}", String::from_utf8_lossy(&out.stderr)),
    );
    assert_eq!(h.exit_code(BOOT), 0);
    h.check(
        h.has_event("shutdown", |e| e["quick"] == true),
        "the client's --quick made it a quick stop",
    );
}

#[test]
fn no_zygote_in_the_config_file_gives_cold_workers() {
    let dir = temp_dir("no-zygote-file");
    let cfg = dir.join("procman.toml");
    std::fs::write(&cfg, "no-zygote = true\nworkers = 1\n").expect("config");
    let python = venv_python();
    let app_dir = repo().join("examples/fastapi");
    let mut h = Start::new(
        "no-zygote-file",
        &[
            "app:main",
            "-c",
            cfg.to_str().expect("utf8"),
            "--python",
            python.to_str().expect("utf8"),
            "--chdir",
            app_dir.to_str().expect("utf8"),
            "--log-format",
            "json",
        ],
    )
    .spawn();
    h.check(
        h.wait_event("all-ready", BOOT, |_| true).is_some(),
        "all ready",
    );
    let zygotes: Vec<i32> = h
        .children()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| c.starts_with(b"procman: zygote"))
                .unwrap_or(false)
        })
        .collect();
    h.check(zygotes.is_empty(), &format!("no zygote, found {zygotes:?}"));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
