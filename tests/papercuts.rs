//! Paper cuts from real apps (issue 18): a WSGI app served without
//! `--interface wsgi`, one traceback for a broken import however many
//! workers boot, a lifespan shutdown that fits in the stop budget, worker
//! output in `--log-file`, and the wording of a few log lines.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// `procman --check-config ...` from tests/apps: (code, stdout, stderr).
fn check_config(args: &[&str]) -> (i32, String, String) {
    let args: Vec<&str> = std::iter::once("--check-config")
        .chain(args.iter().copied())
        .collect();
    run_procman(&args, &[], &apps_dir())
}

/// procman serving `app` from tests/apps with the test venv's Python.
fn uvicorn(name: &str, app: &str, extra: &[&str]) -> Start {
    let python = venv_python();
    Start::new(name, &[app, "--python", python.to_str().expect("utf8")])
        .args(["--chdir", apps_dir().to_str().expect("utf8")])
        .args(extra.iter().copied())
}

// ---- item 1: WSGI detection ----

#[test]
fn a_wsgi_app_without_interface_wsgi_is_served_as_wsgi_and_says_so() {
    for app in ["wsgi_app:app", "wsgi_class_app:app"] {
        let mut h = uvicorn("wsgi-auto", app, &["-w", "1"]).spawn();
        // wait_workers needs a 200 with the pid as body: a 500 never counts.
        let pids = h.wait_workers(1, BOOT);
        assert_eq!(pids.len(), 1, "{app}");
        let log = h.log_text();
        h.check(
            log.contains(&format!("serving {app} as WSGI"))
                && log.contains("pass --interface wsgi"),
            &format!("{app}: the detection is logged with the option to pass"),
        );
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "{app}");
    }
}

#[test]
fn check_config_names_interface_wsgi_for_a_wsgi_app() {
    let python = venv_python();
    let py = python.to_str().expect("utf8");
    let (code, out, err) = check_config(&["--python", py, "wsgi_class_app:app"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("wsgi_class_app:app as WSGI") && err.contains("--interface wsgi"),
        "{out}{err}"
    );
    // An ASGI app or an explicit --interface says nothing about it.
    for args in [
        &["--python", py, "lifespan_stream:app"][..],
        &["--python", py, "wsgi_app:app", "--interface", "wsgi"][..],
    ] {
        let (code, out, err) = check_config(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert!(!err.contains("WSGI"), "{args:?}: {out}{err}");
    }
}

// ---- item 2: one traceback ----

/// Lines of `text` that start with `prefix`.
fn lines_starting(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

#[test]
fn a_broken_import_with_four_workers_prints_one_traceback_and_one_last_line() {
    for (app, last) in [
        ("raises_on_import:main", "RuntimeError: boom at import"),
        (
            "factory_app:mian",
            "AttributeError: module 'factory_app' has no attribute 'mian'",
        ),
    ] {
        let mut h = uvicorn("one-traceback", app, &["-w", "4"]).spawn();
        assert_eq!(h.exit_code(BOOT), 4, "{}", h.log_text());
        let log = h.log_text();
        // Once, as a line of the worker's traceback (marked as such: none
        // of its lines may pass for one of procman's).
        h.check(
            log.lines()
                .filter(|l| {
                    l.starts_with("  worker ") && l.ends_with(&format!(" traceback | {last}"))
                })
                .count()
                == 1
                && lines_starting(&log, last) == 0,
            &format!("{app}: the exception is shown once"),
        );
        if app.starts_with("raises") {
            h.check(
                log.matches("Traceback (most recent call last)").count() == 1,
                "one traceback",
            );
        }
        h.check(
            lines_starting(&log, "procman: error: ") == 1
                && log.trim_end().lines().last().is_some_and(|l| {
                    l == format!("procman: error: Failed to load application '{app}': {last}")
                }),
            &format!("{app}: one last line naming the error"),
        );
        h.check(
            !log.contains("procman: Failed to load"),
            "the workers do not print their own last line",
        );
    }
}

// ---- item 4: the stop budget leaves room for the lifespan shutdown ----

#[test]
fn a_half_second_lifespan_shutdown_completes_within_a_4s_graceful_timeout_5_times() {
    for round in 0..5 {
        let start = uvicorn(
            "lifespan-budget",
            "lifespan_stream:app",
            &["-w", "1", "--graceful-timeout", "4", "--no-access-log"],
        )
        .json();
        // The app writes its marker into this test's own directory.
        let dir = start.dir().to_str().expect("utf8").to_string();
        let mut h = start.env("MARKER_DIR", &dir).spawn();
        let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
        // A stream in flight: its first line (the pid) has arrived.
        let mut stream = TcpStream::connect(h.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        stream
            .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(&format!("{pid}\n")) {
            let n = stream.read(&mut buf).expect("stream reads");
            h.check(n > 0, "the stream started");
            got.extend_from_slice(&buf[..n]);
        }
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "round {round}: {}", h.log_text());
        let exit = h.expect_event("exited", BOOT, "the worker exited", |e| worker_of(e) == pid);
        // How it ended (status 0, no signal) is said in the message.
        h.check(
            exit["message"]
                .as_str()
                .is_some_and(|m| m.contains("exited cleanly")),
            &format!("round {round}: the worker ended on its own, not by SIGKILL: {exit}"),
        );
        h.check(!h.has_event("killing", |_| true), "no SIGKILL");
        h.check(
            h.dir.join(format!("shutdown-{pid}")).exists(),
            &format!("round {round}: the lifespan shutdown completed"),
        );
    }
}

// ---- item 5: worker output in --log-file ----

/// A `[time] [pid] [LEVEL] ` prefix, as the master writes it.
fn master_format(line: &str) -> bool {
    let mut parts = line.splitn(4, "] ");
    let (Some(time), Some(pid), Some(level)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    time.starts_with("[20")
        && time.ends_with('Z')
        && pid
            .strip_prefix('[')
            .is_some_and(|p| p.parse::<u32>().is_ok())
        && matches!(level, "[INFO" | "[WARNING" | "[ERROR" | "[DEBUG" | "[TRACE")
}

fn file_lines_with(path: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn log_file_gets_the_workers_lines_in_the_masters_format_and_follows_usr1() {
    let start = uvicorn("log-file", "lifespan_stream:app", &["-w", "1"]);
    let file = start.dir().join("procman-file.log");
    let mut h = start
        .args(["--log-file", file.to_str().expect("utf8")])
        .spawn();
    // The port is in the file now, not on stderr.
    let port = wait_for(BOOT, || {
        std::fs::read_to_string(&file).ok()?.lines().find_map(|l| {
            let rest = l.split("Listening at: http://").nth(1)?;
            rest.split_whitespace()
                .next()?
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.port())
        })
    })
    .expect("the master logs its listener to the file");
    let pid = *h
        .wait_workers_on(port, 1, BOOT)
        .iter()
        .next()
        .expect("worker");
    let worker_line = |path: &Path, needle: &str| {
        let path = path.to_path_buf();
        let needle = needle.to_string();
        wait_for(Duration::from_secs(20), move || {
            file_lines_with(&path, &needle)
                .into_iter()
                .find(|l| l.contains(&format!("[{pid}]")))
        })
    };
    for needle in ["Application startup complete", "\"GET /pid HTTP/1.1\" 200"] {
        let line = worker_line(&file, needle);
        h.check(
            line.as_ref().is_some_and(|l| master_format(l)),
            &format!(
                "{needle:?} is in the log file in the master's format: {line:?}\n{}",
                std::fs::read_to_string(&file).unwrap_or_default()
            ),
        );
    }
    // A request traceback is in the file too, without bootstrap frames.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let _ = http_get(addr, "/boom");
    h.check(
        worker_line(&file, "Exception in ASGI application").is_some()
            && wait_for(Duration::from_secs(20), || {
                (!file_lines_with(&file, "RuntimeError: boom in a request").is_empty())
                    .then_some(())
            })
            .is_some(),
        "the request's traceback is in the file",
    );
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    h.check(
        !text.contains("File \"<string>\"") && !text.contains("<procman-bootstrap>"),
        &format!("no bootstrap frame in the app's traceback:\n{text}"),
    );
    // The app's own prints go to stdout (procman's, here the harness log).
    let _ = http_get(addr, "/print");
    h.check(
        h.wait_log("printed by the app", BOOT),
        "the app's stdout is untouched",
    );
    h.check(
        file_lines_with(&file, "printed by the app").is_empty(),
        "the app's stdout is not in the log file",
    );
    // logrotate: move the file away, USR1, and new lines land in the new file.
    let rotated = h.dir.join("procman-file.log.1");
    std::fs::rename(&file, &rotated).expect("rotate");
    h.signal(Signal::SIGUSR1);
    h.check(
        wait_for(Duration::from_secs(20), || {
            (!file_lines_with(&file, "Reopened the log").is_empty()).then_some(())
        })
        .is_some(),
        "the master reopened the file",
    );
    let moved = wait_for(Duration::from_secs(20), || {
        let _ = http_get(addr, "/pid?after-rotation");
        file_lines_with(&file, "GET /pid?after-rotation")
            .into_iter()
            .find(|l| l.contains(&format!("[{pid}]")))
    });
    h.check(
        moved.is_some(),
        &format!(
            "the worker's access log follows the reopened file\nnew:\n{}\nold:\n{}",
            std::fs::read_to_string(&file).unwrap_or_default(),
            std::fs::read_to_string(&rotated).unwrap_or_default()
        ),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

// ---- item 6: wording ----

#[test]
fn one_worker_is_one_worker() {
    let mut h = Start::new("wording-one", &["-w", "1", "--", &hello()]).spawn();
    h.check(h.wait_log("All 1 worker ready", BOOT), "singular");
    h.check(!h.log_text().contains("1 workers"), "no '1 workers'");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_failed_reload_does_not_promise_a_retry() {
    let w = notify_worker().join(" ");
    let script = format!(
        "if [ \"$PROCMAN_GENERATION\" = 1 ]; then exec {w}; else exec {w} --exit-code 1; fi"
    );
    let mut h = Start::new(
        "wording-reload",
        &["--ready", "notify", "--", "sh", "-c", &script],
    )
    .json()
    .spawn();
    let old = h.wait_workers(1, BOOT);
    h.signal(Signal::SIGHUP);
    let failed = h.expect_event("reload-failed", BOOT, "reload failure reported", |e| {
        e["generation"] == 2
    });
    assert_eq!(h.wait_workers(1, BOOT), old, "the old worker keeps serving");
    // The reload's failure says why: the new worker's failed boot.
    h.check(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("of the new generation failed to boot")),
        &format!("the failed boot is reported: {failed}"),
    );
    // The wording under test: no message promises a retry.
    h.check(
        !h.messages().iter().any(|m| m.contains("retrying")),
        "nothing retries",
    );
    h.check(
        h.count_events("booting", |e| e["generation"] == 2) == 1,
        "nothing was retried",
    );
}

#[test]
fn preloaded_workers_report_their_real_boot_time() {
    let mut h = uvicorn(
        "wording-preload",
        "lifespan_stream:app",
        &["-w", "4", "--preload", "--no-access-log"],
    )
    .json()
    .spawn();
    h.wait_workers(4, BOOT);
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    // The boot time is said in the ready event's message.
    let times: Vec<String> = h
        .events_named("ready")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect();
    h.check(times.len() == 4, "four ready events");
    h.check(
        times
            .iter()
            .all(|m| m.contains(" ready in ") && !m.ends_with("ready in 0.000s")),
        &format!("measured from the spawn request, not 0.000s: {times:?}"),
    );
}

#[test]
fn app_tracebacks_name_the_bootstrap_and_hide_its_frames() {
    let mut h = uvicorn("wording-traceback", "lifespan_stream:app", &["-w", "1"]).spawn();
    h.wait_workers(1, BOOT);
    let (status, _) = http_get(h.addr(), "/boom").expect("GET /boom");
    assert_eq!(status, 500);
    h.check(
        h.wait_log("RuntimeError: boom in a request", BOOT),
        "the traceback is logged",
    );
    let log = h.log_text();
    h.check(!log.contains("File \"<string>\""), "no anonymous frames");
    h.check(
        !log.contains("in wrapped") && !log.contains("<procman-bootstrap>"),
        "the bootstrap's frames are kept out of the app's traceback",
    );
}
