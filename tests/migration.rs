//! Migrating from gunicorn and uvicorn (issue 25, items 3 and 4): their
//! command lines, their proxy-header defaults, a unix socket behind a
//! proxy. nginx itself is in tests/nginx.rs.

mod util;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);
const FORWARDED: &str = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n";

fn scope_tcp(h: &Harness, headers: &str) -> serde_json::Value {
    let s = std::net::TcpStream::connect(h.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    json_over(s, "/scope", headers)
}

fn scope_unix(path: &Path, headers: &str) -> serde_json::Value {
    let s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    json_over(s, "/scope", headers)
}

fn serve_scope(name: &str, extra: &[&str]) -> Harness {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(extra);
    let mut h = uvicorn(name, &apps_dir(), "scope_app:main", &args).spawn();
    h.wait_workers(1, BOOT);
    h
}

#[test]
fn proxy_headers_from_loopback_are_honoured_by_default_as_uvicorn_and_gunicorn_do() {
    let h = serve_scope("proxy-default", &[]);
    let v = scope_tcp(&h, FORWARDED);
    assert_eq!(v["client"], "203.0.113.7", "{v}");
    assert_eq!(v["scheme"], "https", "{v}");
    drop(h);
    // FORWARDED_ALLOW_IPS is their default's source too.
    let mut h = uvicorn("proxy-env", &apps_dir(), "scope_app:main", &["-w", "1"])
        .env("FORWARDED_ALLOW_IPS", "10.9.9.9")
        .spawn();
    h.wait_workers(1, BOOT);
    let v = scope_tcp(&h, FORWARDED);
    assert_eq!(v["client"], "127.0.0.1", "{v}");
    assert_eq!(v["scheme"], "http", "{v}");
    drop(h);
    // --no-proxy-headers: nobody is believed.
    let h = serve_scope("proxy-off", &["--no-proxy-headers"]);
    let v = scope_tcp(&h, FORWARDED);
    assert_eq!(v["client"], "127.0.0.1", "{v}");
    assert_eq!(v["scheme"], "http", "{v}");
}

#[test]
fn forwarded_allow_ips_alone_turns_proxy_headers_on() {
    let h = serve_scope("proxy-ips-alone", &["--forwarded-allow-ips", "127.0.0.1"]);
    let v = scope_tcp(&h, FORWARDED);
    assert_eq!(v["client"], "203.0.113.7", "{v}");
    assert_eq!(v["scheme"], "https", "{v}");
}

#[test]
fn a_unix_socket_peer_is_trusted_with_the_readmes_config() {
    let start = Start::new("proxy-unix", &[]).no_default_bind();
    let dir = start.dir().to_path_buf();
    let sock = dir.join("app.sock");
    let file = dir.join("procman.toml");
    // The README's example, as far as proxies go.
    std::fs::write(
        &file,
        format!(
            "app = \"scope_app:main\"\nchdir = \"{}\"\npython = \"{}\"\nworkers = 1\n\
             bind = [\"unix:{}\"]\nproxy-headers = true\nforwarded-allow-ips = \"127.0.0.1\"\n\
             no-access-log = true\n",
            apps_dir().display(),
            venv_python().display(),
            sock.display()
        ),
    )
    .expect("config");
    let h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    h.check(
        wait_for(BOOT, || {
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|s| json_over(s, "/scope", ""))
        })
        .is_some(),
        "serving on the unix socket",
    );
    let v = scope_unix(&sock, FORWARDED);
    assert_eq!(v["client"], "203.0.113.7", "{v}");
    assert_eq!(v["scheme"], "https", "{v}");
    // Without headers the app sees no client (uvicorn's None), not a
    // stand-in of procman's.
    let v = scope_unix(&sock, "");
    assert_eq!(v["client"], serde_json::Value::Null, "{v}");
    assert_eq!(v["scheme"], "http", "{v}");
}

#[test]
fn log_file_dash_is_stderr_as_in_gunicorn() {
    for flag in ["--log-file", "--error-logfile"] {
        let start = Start::new("log-dash", &[]);
        let dir = start.dir().to_path_buf();
        let mut h = start
            .cwd(&dir)
            .args([flag, "-", "-w", "1", "--", &hello()])
            .spawn();
        h.wait_workers(1, BOOT);
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
        assert!(!dir.join("-").exists(), "{flag} -: a file named '-'");
        assert!(
            h.log_text().contains("Listening at"),
            "{flag} -: the log is on stderr: {}",
            h.log_text()
        );
    }
}

#[test]
fn access_logfile_dash_is_accepted_and_a_path_is_refused_in_one_line() {
    let py = venv_python();
    let py = py.to_str().expect("utf8");
    let dir = apps_dir();
    let (code, out, err) = run_procman(
        &[
            "--check-config",
            "--python",
            py,
            "--access-logfile",
            "-",
            "--error-logfile",
            "-",
            "scope_app:main",
        ],
        &[],
        &dir,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("access log on\n") || out.contains("access log on)"),
        "{out}"
    );
    // Without the flag the access log is on too, which the first line says.
    let (code, out, err) = run_procman(
        &["--check-config", "--python", py, "scope_app:main"],
        &[],
        &dir,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("access log on (gunicorn's default is off: --no-access-log)"),
        "{out}"
    );
    let (code, _, err) = run_procman(
        &[
            "--check-config",
            "--python",
            py,
            "--access-logfile",
            "/tmp/access.log",
            "scope_app:main",
        ],
        &[],
        &dir,
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("'/tmp/access.log' for '--access-logfile'"),
        "{err}"
    );
}

#[test]
fn a_factory_call_in_app_is_a_factory_as_gunicorn_reads_it() {
    let mut h = uvicorn(
        "factory-call",
        &apps_dir(),
        "factory_app:create_app()",
        &["-w", "1"],
    )
    .spawn();
    let pids = h.wait_workers(1, BOOT);
    assert_eq!(pids.len(), 1, "{}", h.log_text());
    // Arguments are not procman's business: one line, exit 2.
    let (code, _, err) = run_procman(
        &[
            "--check-config",
            "--python",
            "python3",
            "factory_app:create_app(debug=True)",
        ],
        &[],
        &apps_dir(),
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn gunicorn_flags_procman_has_no_use_for_are_named_in_one_line() {
    let cases: &[&[&str]] = &[
        &["--threads", "4"],
        &["--threads=4"],
        &["--worker-connections", "1000"],
        &["--statsd-host", "localhost:8125"],
        &["--proxy-protocol"],
        &["--log-config", "logging.conf"],
        &["--limit-request-line", "4094"],
        &["-D"],
        &["--daemon"],
        &["--reload-engine", "poll"],
        &["-c", "gunicorn.conf.py"],
        &["--config", "python:app.gunicorn_conf"],
    ];
    for flags in cases {
        let mut args = vec!["app:main"];
        args.extend_from_slice(flags);
        let (code, out, err) = run_procman(&args, &[], &apps_dir());
        assert_eq!(code, 2, "{flags:?}: {err}");
        assert!(out.is_empty(), "{flags:?}: {out}");
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{flags:?}: {err}");
        assert!(line.contains("gunicorn option"), "{flags:?}: {err}");
        assert!(!line.contains("unexpected argument"), "{flags:?}: {err}");
        let name = flags[0].split('=').next().expect("flag");
        assert!(line.contains(&format!("'{name}'")), "{flags:?}: {err}");
    }
    // After --, everything is the command's.
    let (code, _, err) = run_procman(
        &["--check-config", "--", &hello(), "--threads", "4"],
        &[],
        &apps_dir(),
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn name_is_in_the_workers_process_titles() {
    let mut h = uvicorn(
        "proc-name",
        &apps_dir(),
        "scope_app:main",
        &["-w", "1", "-n", "shop-api"],
    )
    .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let title = String::from_utf8_lossy(&cmdline);
    assert!(
        title.starts_with("procman: worker 0 gen 1 [shop-api]"),
        "{title:?}"
    );
}

fn unix_get(path: &Path, what: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {what} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn name_is_the_name_label_of_procman_info_in_metrics() {
    let start = Start::new("name-metrics", &[]);
    let metrics = start.dir().join("metrics.sock");
    let metrics_arg = format!("unix:{}", metrics.display());
    let mut h = start
        .args(["-n", "shop-api", "--metrics", &metrics_arg])
        .args(["-w", "1", "--", &hello()])
        .spawn();
    h.wait_workers(1, BOOT);
    let text = unix_get(&metrics, "/metrics");
    assert!(
        text.contains("procman_info{name=\"shop-api\",version=\""),
        "{text}"
    );
}

#[test]
fn the_socket_file_gets_the_mode_and_group_asked_for() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let start = Start::new("socket-mode", &[]).no_default_bind();
    let sock = start.dir().join("app.sock");
    let bind = format!("unix:{}", sock.display());
    let h = start
        .args([
            "-b",
            &bind,
            "--socket-mode",
            "0o660",
            "--socket-group",
            "www-data",
        ])
        .args(["-w", "1", "--", &hello()])
        .spawn();
    // The file appears at bind(2) and is handed to the group just after:
    // once a worker serves, procman has long finished with it.
    h.check(
        wait_for(BOOT, || std::fs::metadata(&sock).ok()).is_some(),
        "socket file",
    );
    h.check(h.wait_log("All 1 worker ready", BOOT), "ready");
    let meta = std::fs::metadata(&sock).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let www = nix::unistd::Group::from_name("www-data")
        .ok()
        .flatten()
        .expect("www-data (Debian's base system has it)");
    assert_eq!(meta.gid(), www.gid.as_raw());
}

#[test]
fn procman_cmd_args_holds_options_as_on_the_command_line() {
    let mut h = Start::new("cmd-args", &[])
        .env("PROCMAN_CMD_ARGS", "-w 2 --graceful-timeout '5'")
        .args(["--", &hello()])
        .spawn();
    let pids = h.wait_workers(2, BOOT);
    assert_eq!(pids.len(), 2, "{}", h.log_text());
    // A gunicorn option there is named as in argv, with the variable.
    let (code, _, err) = run_procman(
        &["--", &hello()],
        &[("PROCMAN_CMD_ARGS", "--threads 4")],
        &apps_dir(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("PROCMAN_CMD_ARGS: '--threads' is a gunicorn option"),
        "{err}"
    );
}
