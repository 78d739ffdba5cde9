//! The metrics endpoint and the control socket on the real binary:
//! `/healthz`, `/readyz` and `/metrics` (parsed by Python's
//! prometheus_client) with hostile clients connected while supervision goes
//! on; the control socket's mode, owner and refusal of other users;
//! `procman status` against the real processes through TTIN/TTOU, a
//! kill -9, a reload and `procman scale`; `procman reload`'s exit status.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(20);
const PROCMAN: &str = env!("CARGO_BIN_EXE_procman");

/// The metrics address procman logged.
fn metrics_addr(h: &Harness) -> SocketAddr {
    let found = wait_for(BOOT, || {
        h.log_text().lines().find_map(|l| {
            let rest = l.split("Serving metrics at: http://").nth(1)?;
            rest.split("/metrics").next()?.parse::<SocketAddr>().ok()
        })
    });
    match found {
        Some(a) => a,
        None => panic!("no metrics address in the log\n{}", h.log_text()),
    }
}

/// `procman ARGS…` as a client; its output.
fn client(args: &[&str]) -> Output {
    Command::new(PROCMAN)
        .args(args)
        .output()
        .expect("run procman client")
}

/// `procman status --json`, parsed.
fn status(sock: &Path) -> serde_json::Value {
    let out = client(&[
        "status",
        "--json",
        "--control-socket",
        sock.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn status_pids(s: &serde_json::Value) -> BTreeSet<i32> {
    s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["pid"].as_i64().expect("pid") as i32)
        .collect()
}

/// Waits until the status lists exactly the master's children, all ready,
/// `n` of them; returns the status.
fn wait_status_matches(h: &Harness, sock: &Path, n: usize) -> serde_json::Value {
    let found = wait_for(BOOT, || {
        let s = status(sock);
        let kids: BTreeSet<i32> = h.children().into_iter().collect();
        let ready = s["workers"]
            .as_array()?
            .iter()
            .all(|w| w["state"] == "ready");
        (ready && kids.len() == n && status_pids(&s) == kids).then_some(s)
    });
    match found {
        Some(s) => s,
        None => {
            h.check(false, &format!("status never matched {n} ready children"));
            unreachable!()
        }
    }
}

/// The samples of /metrics (asked for as a plain GET, as Prometheus's
/// classic text format) as parsed by Python's prometheus_client text
/// parser: `name{labels}` → value, labels sorted. Every sample must parse
/// with its family's type: a counter whose `# TYPE` line does not name its
/// `_total` sample comes out of that parser as an untyped singleton.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
families = list(text_string_to_metric_families(text))
types = {s.name: f.type for f in families for s in f.samples}
assert types.get("procman_worker_restarts_total") == "counter", types
assert types.get("procman_reloads_total") == "counter", types
assert types.get("procman_reload_duration_seconds_bucket") == "histogram", types
assert types.get("procman_worker_time_to_ready_seconds_count") == "histogram", types
untyped = sorted(n for n, t in types.items() if t in ("untyped", "unknown"))
assert not untyped, untyped
for f in families:
    for s in f.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    python_check(script, &body)
}

/// GET /metrics asking for OpenMetrics (as Prometheus does): the answer's
/// content type and body, which Python's OpenMetrics parser must accept
/// with the counter and histogram types.
fn scrape_openmetrics(addr: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    )
    .expect("write");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
types = {f.name: f.type for f in text_string_to_metric_families(sys.stdin.read())}
assert types["procman_worker_restarts"] == "counter", types
assert types["procman_reload_duration_seconds"] == "histogram", types
"#;
    python_check(script, body);
}

/// Runs a Python `script` of the test virtualenv on `body`; its stdout
/// parsed as `key value` lines.
fn python_check(script: &str, body: &str) -> BTreeMap<String, f64> {
    let mut child = Command::new(venv_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Waits until /metrics reports `n` ready workers.
fn wait_ready_metric(h: &Harness, addr: SocketAddr, n: usize) {
    let want = format!("procman_workers{{state=\"ready\"}} {n}\n");
    let ok = wait_for(BOOT, || {
        matches!(http_get(addr, "/metrics"), Ok((200, body)) if body.contains(&want)).then_some(())
    });
    h.check(ok.is_some(), &format!("{n} workers ready in /metrics"));
}

/// Kills a worker with SIGKILL and waits for its replacement.
fn kill_one(h: &mut Harness, n: usize) {
    let victim = *h.children().first().expect("a worker");
    let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
    let ok = wait_for(BOOT, || {
        let kids = h.children();
        (kids.len() == n && !kids.contains(&victim)).then_some(())
    });
    h.check(ok.is_some(), "the killed worker was replaced");
}

/// Spawns `start` on config file `file` with its control socket at `sock`.
fn spawn_on(start: Start, file: &Path, sock: &Path) -> Harness {
    start
        .args([
            "-c",
            file.to_str().expect("utf8"),
            "--control-socket",
            sock.to_str().expect("utf8"),
        ])
        .spawn()
}

#[test]
fn metrics_and_probes_answer_while_hostile_clients_hang_on() {
    let mut h = Start::new("metrics-hostile", &["--metrics", "127.0.0.1:0"])
        .args(["-w", "2", "--", &hello()])
        .spawn();
    h.wait_workers(2, BOOT);
    let addr = metrics_addr(&h);
    let ready = wait_for(BOOT, || {
        matches!(http_get(addr, "/readyz"), Ok((200, _))).then_some(())
    });
    h.check(ready.is_some(), "/readyz 200 once workers are ready");

    // Hostile: many idle connections, one streaming endless headers.
    let idle: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    let flood = std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return 0;
        };
        s.set_write_timeout(Some(Duration::from_secs(3))).ok();
        let chunk = format!("GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n", "a".repeat(1000));
        let mut sent = 0;
        while sent < 1_000_000 {
            match s.write(chunk.as_bytes()) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });

    // Supervision goes on meanwhile, and the probes answer.
    for _ in 0..3 {
        kill_one(&mut h, 2);
        wait_ready_metric(&h, addr, 2);
        let t = Instant::now();
        let got = http_get(addr, "/healthz");
        h.check(
            matches!(got, Ok((200, _))),
            &format!("/healthz during the flood: {got:?}"),
        );
        h.check(
            t.elapsed() < Duration::from_secs(2),
            &format!("/healthz took {:?}", t.elapsed()),
        );
    }
    let _ = flood.join();
    drop(idle);

    scrape_openmetrics(addr);
    let m = scrape(addr);
    let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
    h.check(
        get("procman_worker_restarts_total{reason=crash}") == 3.0,
        &format!("3 crashes counted: {m:?}"),
    );
    h.check(
        get("procman_workers{state=ready}") == 2.0,
        &format!("2 ready workers: {m:?}"),
    );
    h.check(
        get("procman_worker_time_to_ready_seconds_count{}") >= 5.0,
        &format!("5 workers became ready: {m:?}"),
    );
    h.check(
        m.keys()
            .any(|k| k.starts_with("procman_worker_memory_bytes{kind=uss,slot=")),
        "USS per slot",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn readyz_turns_503_at_term_and_queue_depth_is_the_kernels() {
    // Workers that never accept and ignore TERM: connections wait in the
    // queue, and the stop lasts until the grace ends.
    let mut h = Start::new(
        "readyz-term",
        &[
            "--metrics",
            "127.0.0.1:0",
            "-w",
            "1",
            "--graceful-timeout",
            "5",
        ],
    )
    .args(["--", "sh", "-c", "trap '' TERM; exec sleep 1000"])
    .spawn();
    let addr = metrics_addr(&h);
    let ready = wait_for(BOOT, || {
        matches!(http_get(addr, "/readyz"), Ok((200, _))).then_some(())
    });
    h.check(ready.is_some(), "/readyz 200 once the worker is ready");
    let app = h.addr();
    let queued: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(app).expect("connect to the listener"))
        .collect();
    let m = scrape(addr);
    let depth = m
        .iter()
        .find(|(k, _)| k.starts_with("procman_listen_queue_depth{bind="))
        .map(|(_, v)| *v);
    h.check(depth == Some(5.0), &format!("queue depth 5: {m:?}"));
    drop(queued);

    let t = Instant::now();
    h.signal(Signal::SIGTERM);
    let flipped = wait_for(Duration::from_secs(2), || {
        matches!(http_get(addr, "/readyz"), Ok((503, _))).then(|| t.elapsed())
    });
    h.check(
        flipped.is_some_and(|d| d < Duration::from_millis(100)),
        &format!("/readyz 503 within 100 ms of TERM: {flipped:?}"),
    );
    h.check(
        matches!(http_get(addr, "/healthz"), Ok((200, _))),
        "/healthz still 200 while stopping",
    );
    h.signal(Signal::SIGINT);
    h.signal(Signal::SIGINT);
    h.exit_code(BOOT);
}

#[test]
fn control_socket_is_the_owners_and_status_follows_the_processes() {
    let start = Start::new("control", &["-w", "2"]);
    let sock = start.dir().join("ctl.sock");
    std::fs::set_permissions(start.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut h = start
        .args([
            "--control-socket",
            sock.to_str().expect("utf8"),
            "--",
            &hello(),
        ])
        .spawn();
    h.wait_workers(2, BOOT);
    let meta = std::fs::metadata(&sock).expect("socket file");
    h.check(meta.mode() & 0o777 == 0o600, "mode 0600");
    h.check(
        meta.uid() == nix::unistd::geteuid().as_raw(),
        "owned by procman's user",
    );
    let s = sock.to_str().expect("utf8");

    // Another user: refused by the file's mode, and by the peer check
    // if the mode is widened.
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
                PROCMAN,
            ])
            .args(args)
            .output()
            .expect("setpriv")
    };
    let out = as_nobody(&["status", "--control-socket", s]);
    h.check(
        out.status.code() == Some(3),
        &format!("nobody refused: {out:?}"),
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody(&["stop", "--control-socket", s]);
    h.check(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        &format!("nobody refused by the peer check: {out:?}"),
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // Status answers fast and matches the processes.
    let st = wait_status_matches(&h, &sock, 2);
    h.check(st["pid"] == h.pid, "the master's pid");
    kill_one(&mut h, 2);
    let st = wait_status_matches(&h, &sock, 2);
    let crashed: Vec<_> = st["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["restarts"] == 1)
        .collect();
    h.check(
        crashed.len() == 1
            && crashed[0]["last_exit"]
                .as_str()
                .is_some_and(|e| e.starts_with("crash: killed by SIGKILL")),
        &format!("the killed slot's restart and reason: {st}"),
    );
    h.signal(Signal::SIGTTIN);
    wait_status_matches(&h, &sock, 3);
    h.signal(Signal::SIGTTOU);
    wait_status_matches(&h, &sock, 2);
    let out = client(&["reload", "--control-socket", s]);
    h.check(
        out.status.success(),
        &format!("reload: {}", String::from_utf8_lossy(&out.stderr)),
    );
    let st = wait_status_matches(&h, &sock, 2);
    h.check(
        st["generation"] == 2
            && st["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .all(|w| w["generation"] == 2),
        &format!("generation 2 after the reload: {st}"),
    );
    let out = client(&["scale", "3", "--control-socket", s]);
    h.check(out.status.success(), "scale 3");
    wait_status_matches(&h, &sock, 3);
    let table = client(&["status", "--control-socket", s]);
    h.check(
        String::from_utf8_lossy(&table.stdout).contains("SLOT"),
        "the table",
    );
    let out = client(&["stop", "--control-socket", s]);
    h.check(out.status.success(), "stop");
    assert_eq!(h.exit_code(BOOT), 0);
    assert!(!sock.exists(), "the socket file is removed at exit");
}

#[test]
fn reload_reports_a_broken_config_with_a_failing_exit_status() {
    let start = Start::new("control-reload", &[]);
    let file = start.dir().join("procman.toml");
    let sock = start.dir().join("ctl.sock");
    std::fs::write(&file, format!("workers = 1\ncommand = [\"{}\"]\n", hello())).expect("write");
    let mut h = spawn_on(start, &file, &sock);
    h.wait_workers(1, BOOT);
    let s = sock.to_str().expect("utf8");
    let out = client(&["reload", "--control-socket", s]);
    h.check(
        out.status.success(),
        &format!("good reload: {}", String::from_utf8_lossy(&out.stderr)),
    );
    std::fs::write(&file, "workers = [nope\n").expect("write");
    let out = client(&["reload", "--control-socket", s]);
    let err = String::from_utf8_lossy(&out.stderr);
    h.check(
        out.status.code() == Some(1) && err.contains("reload failed"),
        &format!("broken reload: {out:?}"),
    );
    h.check(
        status(&sock)["reload"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed")),
        "status shows the failed reload",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

/// procman's memory cgroup (v1 or v2) with a child cgroup limited to
/// `limit` bytes for one test, or None where none can be made.
fn limited_cgroup(name: &str, limit: u64) -> Option<std::path::PathBuf> {
    limited_cgroup_named(name.as_bytes(), limit)
}

/// The same, named in any bytes.
fn limited_cgroup_named(name: &[u8], limit: u64) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let (base, v1) = own_cgroup_dir("memory")?;
    let limit_file = if v1 {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    let mut leaf = format!("procman-test-{}-", std::process::id()).into_bytes();
    leaf.extend_from_slice(name);
    let dir = Path::new(&base).join(std::ffi::OsStr::from_bytes(&leaf));
    std::fs::create_dir(&dir).ok()?;
    if std::fs::write(dir.join(limit_file), limit.to_string()).is_err() {
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    // No swap to escape to (v1 only; absent elsewhere).
    let _ = std::fs::write(dir.join("memory.swappiness"), "0");
    Some(dir)
}

#[test]
fn a_worker_killed_by_the_oom_killer_is_reported_as_such() {
    let Some(cg) = limited_cgroup("oom", 96 << 20) else {
        eprintln!("SKIP: cannot create a memory cgroup here");
        return;
    };
    // procman moves itself into the limited cgroup, then runs; its worker
    // becomes ready, then allocates past the limit.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
        cg.display()
    );
    let worker = "import time; time.sleep(1.5); x = b'x' * (400 << 20); time.sleep(100)";
    let mut h = Start::new(
        "oom",
        &[
            "-w",
            "1",
            "--log-format",
            "json",
            "--metrics",
            "127.0.0.1:0",
        ],
    )
    .args(["--", python3().to_str().expect("utf8"), "-c", worker])
    .spawn_with("sh", &["-c", &script, PROCMAN]);
    let exited = h.wait_event("exited", BOOT, |_| true);
    let addr = metrics_addr(&h);
    let m = scrape(addr);
    h.signal(Signal::SIGINT);
    h.exit_code(BOOT);
    let _ = wait_for(Duration::from_secs(5), || std::fs::remove_dir(&cg).ok());
    let exited = exited.expect("an exited event");
    // The worker shares procman's cgroup: its count rose, but the victim
    // may have been another process in it.
    assert_eq!(exited["reason"], "oom_kill", "{exited}");
    assert!(
        exited["message"]
            .as_str()
            .is_some_and(|m| m.contains("perhaps by the kernel's OOM killer")),
        "{exited}"
    );
    assert!(
        m["procman_worker_restarts_total{reason=oom_kill}"] >= 1.0,
        "{m:?}"
    );
}

/// Runs procman (one worker running `worker` in python, JSON logs) until
/// its worker's first exit; `cgroup`: the cgroup procman moves itself into
/// first, if any; `env`: more environment. Returns the `exited` event.
fn first_exit(
    name: &str,
    cgroup: Option<&Path>,
    env: &[(&[u8], &[u8])],
    worker: &str,
) -> serde_json::Value {
    use std::os::unix::ffi::OsStrExt;
    let mut start = Start::new(name, &["-w", "1", "--log-format", "json"]).args([
        "--",
        python3().to_str().expect("utf8"),
        "-c",
        worker,
    ]);
    for (k, v) in env {
        start = start.env_os(k, v);
    }
    let mut h = match cgroup {
        // The path through the environment: it may not be UTF-8.
        Some(cg) => start
            .env_os(b"PROCMAN_CG", cg.as_os_str().as_bytes())
            .spawn_with(
                "sh",
                &[
                    "-c",
                    "echo $$ > \"$PROCMAN_CG/cgroup.procs\" && exec \"$0\" \"$@\"",
                    PROCMAN,
                ],
            ),
        None => start.spawn(),
    };
    let exited = h.wait_event("exited", BOOT, |_| true);
    h.signal(Signal::SIGINT);
    h.exit_code(BOOT);
    exited.expect("an exited event")
}

/// A worker that allocates far more than 96 MiB once ready.
const GREEDY: &str = "import os, time\n\
    cg = os.environ.get('WORKER_CG')\n\
    cg and open(cg + '/cgroup.procs', 'w').write(str(os.getpid()))\n\
    time.sleep(1.5)\n\
    x = b'x' * (400 << 20)\n\
    time.sleep(100)\n";

#[test]
fn an_oom_kill_is_still_seen_in_a_cgroup_whose_name_is_not_utf8() {
    let Some(cg) = limited_cgroup_named(b"oom-\xff", 96 << 20) else {
        eprintln!("SKIP: cannot create a memory cgroup here");
        return;
    };
    let exited = first_exit("oom-bytes", Some(&cg), &[], GREEDY);
    let _ = wait_for(Duration::from_secs(5), || std::fs::remove_dir(&cg).ok());
    assert_eq!(exited["reason"], "oom_kill", "{exited}");
}

#[test]
fn a_worker_in_a_cgroup_of_its_own_is_known_for_sure_to_be_oom_killed() {
    use std::os::unix::ffi::OsStrExt;
    let Some(cg) = limited_cgroup("oom-own", 96 << 20) else {
        eprintln!("SKIP: cannot create a memory cgroup here");
        return;
    };
    // procman stays where it is; the worker moves itself into the limited
    // cgroup before it is ready.
    let exited = first_exit(
        "oom-own",
        None,
        &[(b"WORKER_CG", cg.as_os_str().as_bytes())],
        GREEDY,
    );
    let _ = wait_for(Duration::from_secs(5), || std::fs::remove_dir(&cg).ok());
    assert_eq!(exited["reason"], "oom_kill", "{exited}");
    assert!(
        exited["message"]
            .as_str()
            .is_some_and(|m| m.contains("killed by the kernel's OOM killer (SIGKILL)")),
        "{exited}"
    );
}

#[test]
fn heartbeat_timeouts_still_fire_while_metrics_clients_hang_on() {
    let mut h = Start::new(
        "metrics-heartbeat",
        &["--metrics", "127.0.0.1:0", "-w", "1", "-t", "2", "--"],
    )
    .json()
    .args(notify_worker())
    .args(["--heartbeat", "0.3", "--silent-after", "0.5"])
    .spawn();
    let addr = metrics_addr(&h);
    // Idle connections and one sending headers without end, held open
    // through the worker's silence.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").expect("write");
    let abort = h.expect_event(
        "stopping",
        BOOT,
        "the silent worker was aborted meanwhile",
        |e| e["reason"] == "timeout",
    );
    h.expect_event("exited", BOOT, "and reaped", |e| {
        worker_of(e) == worker_of(&abort) && e["reason"] == "timeout"
    });
    drop(idle);
    drop(slow);
    let m = scrape(addr);
    h.check(
        m.get("procman_worker_restarts_total{reason=timeout}")
            .is_some_and(|v| *v >= 1.0),
        &format!("the timeout counted: {m:?}"),
    );
    h.signal(Signal::SIGINT);
    h.exit_code(BOOT);
}

#[test]
fn a_rejected_reload_during_another_answers_only_who_asked() {
    let start = Start::new("control-reload-overlap", &[]).json();
    let file = start.dir().join("procman.toml");
    let sock = start.dir().join("ctl.sock");
    let good = format!(
        "workers = 1\nready-after = 2\ncommand = [\"{}\"]\n",
        hello()
    );
    std::fs::write(&file, &good).expect("write");
    let mut h = spawn_on(start, &file, &sock);
    h.wait_workers(1, BOOT);
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    let s = sock.to_str().expect("utf8").to_string();
    let first = Command::new(PROCMAN)
        .args(["reload", "--control-socket", &s])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("first reload");
    h.expect_event("reloading", BOOT, "the first reload began", |_| true);
    std::fs::write(&file, "workers = [nope\n").expect("write");
    let out = client(&["reload", "--control-socket", &s]);
    h.check(
        out.status.code() == Some(1),
        &format!("the broken reload fails: {out:?}"),
    );
    let first = first.wait_with_output().expect("first reload ends");
    h.check(
        first.status.success(),
        &format!("the first reload still succeeds: {first:?}"),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
