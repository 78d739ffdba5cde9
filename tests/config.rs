//! Configuration and operator experience: bad input, the config file and
//! its precedence, HUP re-reading it, --check-config, --print-config, logs.

mod util;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

#[test]
fn bad_input_gets_one_clear_line_and_the_documented_exit_code() {
    let dir = temp_dir("bad-input");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let syntax = write("syntax.toml", "workers = \n");
    let unknown = write("unknown.toml", "workers = 2\nwokers = 3\n");
    let wrong_type = write("type.toml", "timeout = [1]\n");
    let key = write("key.pem", "not really a key");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = format!("127.0.0.1:{}", taken.local_addr().expect("addr").port());
    // (args, environment, exit code, what the one line must say)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, i32, &'a str);
    let table: Vec<Case> = vec![
        (
            vec!["-b", "127.0.0.1:99999", "--", "true"],
            vec![],
            2,
            "port 99999 is out of range",
        ),
        (vec!["-b", "[::1", "--", "true"], vec![], 2, "missing ']'"),
        (
            vec!["-b", "::1:80", "--", "true"],
            vec![],
            2,
            "must be in brackets",
        ),
        (
            vec!["-b", "unix:", "--", "true"],
            vec![],
            2,
            "unix: needs a path",
        ),
        (
            vec!["-b", "fd://x", "--", "true"],
            vec![],
            2,
            "not a file descriptor number",
        ),
        (
            vec!["-b", "host:port", "--", "true"],
            vec![],
            2,
            "'port' is not a port number",
        ),
        (
            vec!["-w", "0", "--", "true"],
            vec![],
            2,
            "invalid value '0' for '--workers'",
        ),
        (
            vec!["-w", "-1", "--", "true"],
            vec![],
            2,
            "invalid value '-1' for '--workers'",
        ),
        (
            vec!["-w", "abc", "--", "true"],
            vec![],
            2,
            "invalid value 'abc' for '--workers'",
        ),
        (
            vec!["-t", "soon", "--", "true"],
            vec![],
            2,
            "invalid value 'soon' for '--timeout'",
        ),
        (
            vec!["--graceful-timeout", "-5", "--", "true"],
            vec![],
            2,
            "'--graceful-timeout'",
        ),
        (
            vec!["--startup-timeout", "0", "--", "true"],
            vec![],
            2,
            "must be above 0",
        ),
        (
            vec!["--max-worker-memory", "lots", "--", "true"],
            vec![],
            2,
            "'lots' for '--max-worker-memory'",
        ),
        (
            vec!["--max-worker-memory", "12XB", "--", "true"],
            vec![],
            2,
            "unknown unit",
        ),
        (
            vec!["--max-worker-lifetime", "5parsecs", "--", "true"],
            vec![],
            2,
            "'--max-worker-lifetime'",
        ),
        (
            vec!["--max-worker-lifetime-jitter", "5s", "--", "true"],
            vec![],
            2,
            "needs '--max-worker-lifetime'",
        ),
        (
            vec!["--stop-signal", "NOPE", "--", "true"],
            vec![],
            2,
            "'NOPE' for '--stop-signal'",
        ),
        (vec!["appmain"], vec![], 2, "invalid APP 'appmain'"),
        (vec!["app:main", "--", "true"], vec![], 2, "both an APP"),
        (vec![], vec![], 2, "nothing to run"),
        (
            vec!["-c", "/no/such/procman.toml", "--", "true"],
            vec![],
            2,
            "cannot read config file",
        ),
        (
            vec!["-c", &syntax, "--", "true"],
            vec![],
            2,
            "line 1: invalid TOML",
        ),
        (
            vec!["-c", &unknown, "--", "true"],
            vec![],
            2,
            "line 2: unknown key 'wokers'",
        ),
        (
            vec!["-c", &wrong_type, "--", "true"],
            vec![],
            2,
            "'timeout' must be a duration: a number of seconds, or a string such as \"30s\", not a list",
        ),
        (
            vec!["--max-requests", "5", "--", "true"],
            vec![],
            2,
            "applies to uvicorn workers",
        ),
        (
            vec!["--ready", "exec", "app:main"],
            vec![],
            2,
            "'--ready' applies to command workers",
        ),
        (
            vec!["--chdir", "/no/such/dir", "--", "true"],
            vec![],
            2,
            "no such directory",
        ),
        (
            vec!["-u", "no-such-user-procman", "--", "true"],
            vec![],
            2,
            "no such user",
        ),
        (
            vec!["-g", "no-such-group-procman", "--", "true"],
            vec![],
            2,
            "no such group",
        ),
        (
            vec!["--umask", "999", "--", "true"],
            vec![],
            2,
            "'999' for '--umask'",
        ),
        (
            vec!["-e", "NOEQUALS", "--", "true"],
            vec![],
            2,
            "expected KEY=VALUE",
        ),
        (
            vec!["--ready", "sometimes", "--", "true"],
            vec![],
            2,
            "'sometimes' for '--ready'",
        ),
        (
            vec!["--log-level", "loud", "--", "true"],
            vec![],
            2,
            "'loud' for '--log-level'",
        ),
        (
            vec!["--log-format", "xml", "--", "true"],
            vec![],
            2,
            "'xml' for '--log-format'",
        ),
        (
            vec!["--log-file", "/no/such/dir/p.log", "--", "true"],
            vec![],
            2,
            "its directory does not exist",
        ),
        (
            vec!["--backlog", "0", "--", "true"],
            vec![],
            2,
            "'0' for '--backlog'",
        ),
        (
            vec!["--lifespan", "maybe", "app:main"],
            vec![],
            2,
            "'maybe' for '--lifespan'",
        ),
        (
            vec!["--interface", "asgi4", "app:main"],
            vec![],
            2,
            "'asgi4' for '--interface'",
        ),
        (
            vec!["--limit-concurrency", "0", "app:main"],
            vec![],
            2,
            "must be above 0",
        ),
        (
            vec!["--keyfile", &key, "app:main"],
            vec![],
            2,
            "needs both '--keyfile' and '--certfile'",
        ),
        (
            vec!["-k", "sync", "app:main"],
            vec![],
            2,
            "'sync' for '--worker-class'",
        ),
        (
            vec!["--frobnicate", "--", "true"],
            vec![],
            2,
            "unexpected argument '--frobnicate'",
        ),
        (
            vec!["--", "no-such-program-procman"],
            vec![],
            2,
            "cannot find COMMAND",
        ),
        (
            vec!["--preload", "--", "true"],
            vec![],
            2,
            "'--preload' applies to uvicorn workers",
        ),
        (
            vec!["--", "true"],
            vec![("PORT", "http")],
            2,
            "'http' is not a port number (from PORT)",
        ),
        (
            vec!["--", "true"],
            vec![("WEB_CONCURRENCY", "zero")],
            2,
            "(from WEB_CONCURRENCY)",
        ),
        (
            vec!["--", "true"],
            vec![("PROCMAN_WORKERS", "many")],
            2,
            "(from PROCMAN_WORKERS)",
        ),
        (
            vec!["-b", &busy, "--", "true"],
            vec![],
            1,
            "Address already in use",
        ),
    ];
    assert!(table.len() >= 30);
    for (args, env, code, want) in &table {
        let (got, _stdout, stderr) = run_procman(args, env, &dir);
        assert_eq!(got, *code, "{args:?} {env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got: {stderr}");
        assert!(
            lines[0].starts_with("procman: error: "),
            "{args:?}: {stderr}"
        );
        assert!(
            lines[0].contains(want),
            "{args:?}: want {want:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
    }
    drop(taken);
    let _ = std::fs::remove_dir_all(dir);
}

fn printed(args: &[&str], env: &[(&str, &str)], cwd: &std::path::Path) -> String {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let (code, out, err) = run_procman(&all, env, cwd);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn file_environment_and_command_line_take_precedence_in_that_order() {
    let dir = temp_dir("precedence");
    let file = dir.join("p.toml");
    std::fs::write(&file, "workers = 2\ntimeout = 9\ncommand = [\"true\"]\n").expect("write");
    let f = file.to_str().expect("utf8");
    let only_file = printed(&["-c", f], &[], &dir);
    assert!(
        only_file.contains(&format!("workers = \"2\"  # {f}, line 1")),
        "{only_file}"
    );
    assert!(
        only_file.contains(&format!("timeout = \"9\"  # {f}, line 2")),
        "{only_file}"
    );
    let with_env = printed(
        &["-c", f],
        &[("PROCMAN_WORKERS", "3"), ("WEB_CONCURRENCY", "7")],
        &dir,
    );
    assert!(
        with_env.contains("workers = \"3\"  # environment PROCMAN_WORKERS"),
        "{with_env}"
    );
    let web = printed(&["-c", f], &[("WEB_CONCURRENCY", "7")], &dir);
    assert!(
        web.contains("workers = \"7\"  # environment WEB_CONCURRENCY"),
        "{web}"
    );
    let with_flag = printed(&["-c", f, "-w", "4"], &[("PROCMAN_WORKERS", "3")], &dir);
    assert!(
        with_flag.contains("workers = \"4\"  # command line"),
        "{with_flag}"
    );
    assert!(
        with_flag.contains("# backlog = 2048  (default)"),
        "{with_flag}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn printed_config_is_a_config_that_gives_the_same_result() {
    let dir = temp_dir("roundtrip");
    let file = dir.join("a.toml");
    std::fs::write(
        &file,
        "bind = [\":9100\", \"unix:/tmp/procman-rt.sock\"]\nenv = { A = \"1\" }\ncommand = [\"sh\", \"-c\", \"exit 0\"]\n",
    )
    .expect("write");
    let first = printed(
        &[
            "-c",
            file.to_str().expect("utf8"),
            "-t",
            "12",
            "--reuse-port",
        ],
        &[],
        &dir,
    );
    let again = dir.join("b.toml");
    std::fs::write(&again, &first).expect("write");
    let second = printed(&["-c", again.to_str().expect("utf8")], &[], &dir);
    let values = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split("  # ").next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(values(&first), values(&second), "{first}\n---\n{second}");
    let (code, _, err) = run_procman(
        &["--check-config", "-c", again.to_str().expect("utf8")],
        &[],
        &dir,
    );
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hup_applies_a_changed_worker_count_and_timeout_without_failed_requests() {
    let start = Start::new("hup-config", &[]).json();
    let file = start.dir().join("procman.toml");
    let command: Vec<String> = notify_worker();
    let write = |workers: u32, timeout: u32| {
        let cmd = command
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &file,
            format!("workers = {workers}\ntimeout = {timeout}\ncommand = [{cmd}]\n"),
        )
        .expect("write config");
    };
    write(2, 30);
    let mut h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    let old = h.wait_workers(2, BOOT);
    let load = Load::start(h.addr(), 4, 30_000, Duration::from_secs(60));
    wait_for(BOOT, || (load.done() > 50).then_some(()));
    write(3, 7);
    h.signal(Signal::SIGHUP);
    let renewed = wait_for(BOOT, || {
        let kids: BTreeSet<i32> = h.children().into_iter().collect();
        (h.has_event("reload-done", |e| e["generation"] == 2)
            && kids.len() == 3
            && kids.is_disjoint(&old))
        .then_some(kids)
    });
    load.wait_more(100, BOOT);
    let report = load.finish();
    h.check(renewed.is_some(), "3 new workers after HUP");
    h.check_none_failed(&report);
    for pid in renewed.expect("checked") {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let has = environ
            .split(|b| *b == 0)
            .any(|kv| kv == b"WATCHDOG_USEC=7000000");
        h.check(has, &format!("worker {pid} got the new timeout"));
    }
}

#[test]
fn hup_with_a_broken_config_keeps_serving_on_the_old_one() {
    let start = Start::new("hup-broken", &[]).json();
    let file = start.dir().join("procman.toml");
    std::fs::write(&file, format!("workers = 2\ncommand = [\"{}\"]\n", hello())).expect("write");
    let mut h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    let before = h.wait_workers(2, BOOT);
    for (i, broken) in ["workers = [oops\n", "workers = 0\n", "wokers = 2\n"]
        .iter()
        .enumerate()
    {
        std::fs::write(&file, format!("{broken}command = [\"{}\"]\n", hello())).expect("write");
        h.signal(Signal::SIGHUP);
        h.expect_events(
            "reload-failed",
            i + 1,
            BOOT,
            "reload failure logged",
            |_| true,
        );
        let after = h.wait_workers(2, BOOT);
        assert_eq!(before, after, "workers untouched");
    }
    // What the operator reads: the file and the line of the mistake.
    h.check(
        h.messages()
            .iter()
            .any(|m| m.contains(&format!("{}, line 1", file.display()))),
        "error names file and line",
    );
    h.check(!h.has_event("reloading", |_| true), "no rollout started");
}

#[test]
fn hup_binds_new_addresses_and_drops_removed_ones() {
    hup_moves_to_another_address("hup-bind", false);
}

/// With `--reuse-port` the master also holds each slot's socket on the
/// old address: a reload to another address closes them with it.
#[test]
fn hup_binds_new_addresses_and_drops_removed_ones_and_their_slot_sockets() {
    hup_moves_to_another_address("hup-bind-reuse", true);
}

/// procman on one address, then HUP to a config file naming another: the
/// new one serves, the old one is released.
fn hup_moves_to_another_address(name: &str, reuse_port: bool) {
    let extra = if reuse_port {
        "reuse-port = true\n"
    } else {
        ""
    };
    let start = Start::new(name, &[]).no_default_bind().json();
    let file = start.dir().join("procman.toml");
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (pa, pb) = (
        a.local_addr().expect("a").port(),
        b.local_addr().expect("b").port(),
    );
    drop((a, b));
    let cfg = |ports: &[u16]| {
        let binds = ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{extra}bind = [{binds}]\ncommand = [\"{}\"]\n", hello())
    };
    std::fs::write(&file, cfg(&[pa])).expect("write");
    let mut h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    h.wait_workers_on(pa, 1, BOOT);
    h.check(
        h.has_event("listening", |e| e["reuse_port"] == reuse_port),
        "the listener's layout",
    );
    std::fs::write(&file, cfg(&[pb])).expect("write");
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "reloaded", |_| true);
    h.check(
        h.has_event("listening", |e| {
            e["address"] == format!("http://127.0.0.1:{pb}")
        }),
        "the new address is listened on",
    );
    h.wait_workers_on(pb, 1, BOOT);
    let closed = wait_for(BOOT, || TcpListener::bind(("127.0.0.1", pa)).ok());
    h.check(closed.is_some(), "the removed address was released");
}

#[test]
fn check_config_imports_the_app_once() {
    let python = venv_python();
    let py = python.to_str().expect("utf8");
    let apps = repo().join("tests/apps");
    let (code, out, err) = run_procman(
        &[
            "--check-config",
            "--python",
            py,
            "factory_app:create_app",
            "--factory",
        ],
        &[],
        &apps,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"), "{out}");
    let (code, _, err) = run_procman(
        &["--check-config", "--python", py, "raises_on_import:main"],
        &[],
        &apps,
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("RuntimeError: boom at import"), "{err}");
    assert!(
        err.contains("procman: error: Failed to load application 'raises_on_import:main'"),
        "{err}"
    );
    // Nothing was bound or started: the default port is free to check.
    let (code, _, err) = run_procman(
        &["--check-config", "-b", "127.0.0.1:1", "--", "true"],
        &[],
        &apps,
    );
    assert_eq!(
        code, 0,
        "binds nothing (port 1 would need root and be busy otherwise): {err}"
    );
}

#[test]
fn json_logs_parse_line_by_line() {
    let start = Start::new("json", &[]);
    let log = start.dir().join("master.log");
    let mut h = start
        .args([
            "--log-format",
            "json",
            "--log-file",
            log.to_str().expect("utf8"),
            "-w",
            "2",
            "--",
            &hello(),
        ])
        .spawn();
    let port = wait_for(BOOT, || {
        events_in(&log).iter().find_map(|v| {
            let a = v["address"].as_str()?;
            a.strip_prefix("http://127.0.0.1:")?.parse::<u16>().ok()
        })
    })
    .expect("port in the json log");
    h.wait_workers_on(port, 2, BOOT);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let text = std::fs::read_to_string(&log).expect("log");
    let mut booted = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "message", "pid"] {
            assert!(v.get(key).is_some(), "{key} missing: {line}");
        }
        assert_eq!(v["pid"], h.pid);
        if v["event"] == "booting" {
            assert!(v["worker"].is_i64() && v["slot"].is_u64(), "{line}");
            booted += 1;
        }
    }
    assert_eq!(booted, 2);
}

#[test]
fn usr1_reopens_a_moved_log_file() {
    let start = Start::new("usr1", &[]).json();
    let log = start.dir().join("master.log");
    let rotated = start.dir().join("master.log.1");
    let events = start.dir().join("worker-events");
    let mut h = start
        .args(["--log-file", log.to_str().expect("utf8"), "-w", "1", "--"])
        .args(notify_worker())
        .args(["--log", events.to_str().expect("utf8")])
        .spawn();
    let has = |path: &std::path::Path, name: &str, workers: Option<u64>| {
        events_in(path)
            .iter()
            .any(|e| e["event"] == name && workers.is_none_or(|n| e["workers"] == n))
    };
    let ready = wait_for(BOOT, || has(&log, "all-ready", None).then_some(()));
    assert!(ready.is_some());
    // The worker logs `start` once its signal handlers are in place.
    let started = wait_for(BOOT, || {
        std::fs::read_to_string(&events)
            .ok()
            .filter(|t| t.contains(" start"))
    });
    assert!(started.is_some(), "the worker started");
    std::fs::rename(&log, &rotated).expect("rotate");
    h.signal(Signal::SIGUSR1);
    let reopened = wait_for(BOOT, || has(&log, "log-reopened", None).then_some(()));
    assert!(reopened.is_some(), "a new log file was written");
    h.signal(Signal::SIGTTIN);
    let more = wait_for(BOOT, || has(&log, "scaled", Some(2)).then_some(()));
    assert!(more.is_some());
    // USR1 is not forwarded to command workers (its default action would
    // end them); this one would have logged it.
    let worker_log = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(!worker_log.contains(" usr1"), "{worker_log}");
    assert!(
        has(&rotated, "all-ready", None) && !has(&rotated, "scaled", None),
        "new lines went to the new file"
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn help_groups_options_and_shows_examples_and_version() {
    let dir = temp_dir("help");
    let (code, out, _) = run_procman(&["--help"], &[], &dir);
    assert_eq!(code, 0);
    for heading in [
        "Binding:",
        "Workers:",
        "Timeouts:",
        "Recycling:",
        "Uvicorn:",
        "Process:",
        "Logging:",
        "Config:",
        "Examples:",
    ] {
        assert!(out.contains(heading), "{heading} missing from --help");
    }
    assert!(out.contains("[env: PROCMAN_WORKERS=]"), "env var shown");
    assert!(out.contains("procman app:main --workers 4 --bind 0.0.0.0:80"));
    let (code, out, _) = run_procman(&["--version"], &[], &dir);
    assert_eq!(code, 0);
    assert!(out.starts_with("procman "), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
