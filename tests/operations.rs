//! Operations: telling systemd, socket activation, PID 1, privilege drop,
//! pidfile, pre-start commands, --chdir and --env.

mod util;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

fn hello_args(workers: &str) -> Vec<String> {
    vec!["-w".into(), workers.into(), "--".into(), hello()]
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

fn systemd_sequence(mut fake: FakeSystemd, notify_socket: &str) {
    let mut h = Start::new("systemd", &["--ready", "notify", "-w", "2", "--"])
        .json()
        .args(notify_worker())
        .args(["--ready-after", "0.5"])
        .env("NOTIFY_SOCKET", notify_socket)
        .spawn();
    let ready = fake.wait("READY=1", 0);
    h.check(ready.is_some(), "READY=1 sent");
    // READY came only once both workers were ready.
    h.check(
        h.has_event("all-ready", |e| e["generation"] == 1),
        "workers ready before READY=1",
    );
    let first = &fake.got[ready.expect("ready")];
    h.check(
        first.contains("STATUS=2/2 workers ready, generation 1"),
        &format!("status with the count: {first:?}"),
    );
    h.wait_workers(2, BOOT);
    let before = monotonic_usec();
    h.signal(Signal::SIGHUP);
    let reloading = fake.wait("RELOADING=1", 0).expect("RELOADING=1");
    let after = monotonic_usec();
    let msg = fake.got[reloading].clone();
    let usec: u64 = msg
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC in the same datagram")
        .parse()
        .expect("number");
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );
    let ready2 = fake.wait("READY=1", reloading + 1);
    h.check(ready2.is_some(), "READY=1 after the reload");
    h.signal(Signal::SIGTERM);
    let stopping = fake.wait("STOPPING=1", reloading + 1);
    h.check(stopping.is_some(), "STOPPING=1");
    assert!(stopping > ready2);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn tells_systemd_ready_reloading_ready_stopping_over_a_path() {
    let dir = temp_dir("fake-systemd");
    let path = dir.join("notify");
    let fake = FakeSystemd::at(&path);
    systemd_sequence(fake, path.to_str().expect("utf8"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tells_systemd_over_an_abstract_socket() {
    let name = format!("procman-test-{}", std::process::id());
    let fake = FakeSystemd::abstract_name(&name);
    systemd_sequence(fake, &format!("@{name}"));
}

#[test]
fn sends_watchdog_pings_to_systemd_when_asked() {
    let dir = temp_dir("fake-watchdog");
    let path = dir.join("notify");
    let mut fake = FakeSystemd::at(&path);
    let _h = Start::new("watchdog", &[])
        .args(hello_args("1"))
        .env("NOTIFY_SOCKET", path.to_str().expect("utf8"))
        .env("WATCHDOG_USEC", "400000")
        .spawn();
    let first = fake.wait("WATCHDOG=1", 0).expect("first ping");
    assert!(fake.wait("WATCHDOG=1", first + 1).is_some(), "pings repeat");
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts procman the way systemd would for socket activation: a wrapper
/// binds, puts the socket at fd 3, sets LISTEN_FDS/LISTEN_PID to its own
/// pid and execs procman (same pid).
fn activated(name: &str, listen_pid: &str, extra: &[String]) -> (Harness, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let script = format!(
        "import os,socket,sys\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('127.0.0.1',{port}))\n\
         s.listen(64)\n\
         fd=s.detach()\n\
         fd!=3 and os.dup2(fd,3)\n\
         os.set_inheritable(3,True)\n\
         os.environ['LISTEN_FDS']='1'\n\
         os.environ['LISTEN_FDNAMES']='web'\n\
         os.environ['LISTEN_PID']=str(os.getpid()) if '{listen_pid}'=='self' else '{listen_pid}'\n\
         os.execv(sys.argv[1],sys.argv[1:])\n"
    );
    drop(listener);
    let mut args = vec!["-c".to_string(), script, PROCMAN.to_string()];
    args.extend(["--log-format".to_string(), "json".to_string()]);
    args.extend(extra.iter().cloned());
    let dir = temp_dir(name).keep();
    let log = dir.join("procman.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(python3())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .env("RUNTIME_DIRECTORY", &dir)
        .spawn()
        .expect("wrapper");
    let pid = child.id() as i32;
    (Harness::adopt_json(dir, log, child, pid), port)
}

#[test]
fn socket_activation_serves_on_the_inherited_socket_and_binds_nothing() {
    let mut extra = vec![
        "-w".to_string(),
        "2".into(),
        "--log-level".into(),
        "debug".into(),
        "--".into(),
    ];
    extra.extend(notify_worker());
    let (mut h, port) = activated("activation", "self", &extra);
    let pids = h.wait_workers_on(port, 2, BOOT);
    assert_eq!(pids.len(), 2);
    h.check(
        h.has_event("listening", |e| {
            e["name"] == "web" && e["inherited"] == true
        }),
        "the inherited socket is used",
    );
    h.check(
        h.count_events("listening", |_| true) == 1,
        "nothing else bound (no default 127.0.0.1:8000)",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_listen_pid_that_is_not_ours_is_ignored() {
    let dump_dir = temp_dir("wrong-pid-dump");
    let dump = dump_dir.join("env.json");
    let mut extra = vec!["-b".to_string(), "127.0.0.1:0".into(), "--".into()];
    extra.extend(notify_worker());
    extra.extend(["--dump-env".to_string(), dump.display().to_string()]);
    let (mut h, _port) = activated("wrong-pid", "1", &extra);
    h.wait_workers(1, BOOT);
    h.check(
        !h.has_event("listening", |e| e["inherited"] == true),
        "fd 3 not adopted",
    );
    h.check(
        h.has_event("listening", |e| e["inherited"] == false),
        "bound its own socket",
    );
    // The worker got only its own listener: the wrapper's fd 3 and the
    // foreign LISTEN_PID were not passed on.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).expect("dump")).expect("json");
    assert_eq!(v["fds"], serde_json::json!([0, 1, 2, 3]));
    assert_ne!(v["LISTEN_PID"], "1");
}

#[test]
fn as_pid_1_reaps_orphans_and_stops_cleanly() {
    let dir = temp_dir("pid1");
    let marker = dir.join("orphan.pid");
    // The worker double-forks a short-lived orphan, which is re-parented to
    // procman (PID 1 of the namespace), then serves.
    let worker = format!(
        "(sh -c 'echo $$ > {m}; sleep 1' &) ; exec {w}",
        m = marker.display(),
        w = notify_worker().join(" ")
    );
    let mut h = Start::new("pid1", &[]).no_default_bind().spawn_with(
        "unshare",
        &[
            "--pid",
            "--fork",
            "--mount-proc",
            PROCMAN,
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "-b",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            &worker,
        ],
    );
    let orphan: i64 = wait_for(BOOT, || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    })
    .expect("the orphan wrote its pid");
    let reaped = h.expect_event(
        "orphan-reaped",
        BOOT,
        "the orphan was reaped quietly",
        |e| e["process"] == orphan,
    );
    h.check(reaped["level"] == "DEBUG", "quietly: at debug level");
    h.check(
        h.events().iter().all(|e| e["pid"] == 1),
        "procman runs as PID 1",
    );
    // No zombie anywhere below unshare.
    for pid in h.descendants() {
        assert!(stat(pid).is_some_and(|s| s.state != 'Z'), "zombie {pid}");
    }
    // Stop: unshare forwards nothing, so signal procman (ns PID 1) directly.
    let inner = h
        .children()
        .first()
        .copied()
        .expect("procman inside unshare");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(inner), Signal::SIGTERM).expect("TERM");
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stop_signals_the_whole_process_group_of_each_worker() {
    let dir = temp_dir("pgroup");
    let helper_pid = dir.join("helper.pid");
    let worker = format!(
        "sleep 300 & echo $! > {p}; exec {w}",
        p = helper_pid.display(),
        w = notify_worker().join(" ")
    );
    let mut h = Start::new("pgroup", &["--", "sh", "-c", &worker]).spawn();
    h.wait_workers(1, BOOT);
    let helper: i32 = wait_for(BOOT, || {
        std::fs::read_to_string(&helper_pid)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .expect("helper pid");
    assert!(alive(helper));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let gone = wait_for(BOOT, || (!alive(helper)).then_some(()));
    assert!(gone.is_some(), "the worker's helper outlived the stop");
    let _ = std::fs::remove_dir_all(dir);
}

fn free_privileged_port() -> Option<u16> {
    (900..1024).find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

#[test]
fn user_drop_runs_workers_as_nobody_on_a_privileged_port() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (CI runs as root)");
    }
    let port = free_privileged_port().expect("a free port below 1024");
    let dir = temp_dir("user");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A copy of hello that nobody can reach and execute.
    let exe = dir.join("hello");
    std::fs::copy(hello(), &exe).expect("copy hello");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bind = format!("127.0.0.1:{port}");
    let sock = dir.join("app.sock");
    let unix = format!("unix:{}", sock.display());
    let mut h = Start::new(
        "user",
        &[
            "-b",
            &bind,
            "-b",
            &unix,
            "-u",
            "nobody",
            "-g",
            "daemon",
            "-w",
            "2",
            "--",
            exe.to_str().expect("utf8"),
        ],
    )
    .spawn();
    let pids = h.wait_workers(2, BOOT);
    // The unix socket file and the notify directory belong to the user.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&sock).expect("socket file").uid(), 65534);
    // The notify directory (unpredictable name) is found through a
    // worker's NOTIFY_SOCKET.
    let worker = *pids.iter().next().expect("a worker");
    let environ = std::fs::read(format!("/proc/{worker}/environ")).expect("environ");
    let notify = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| std::path::PathBuf::from(String::from_utf8_lossy(v).to_string()))
        .expect("NOTIFY_SOCKET in the worker's environment");
    let notify_dir = notify.parent().expect("notify dir");
    for path in [&notify, notify_dir] {
        let meta = std::fs::symlink_metadata(path).expect("notify dir and socket");
        assert_eq!((meta.uid(), meta.gid()), (65534, 1), "{}", path.display());
    }
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("Uid line");
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "65534"),
            "{uid}"
        );
        let gid = status
            .lines()
            .find(|l| l.starts_with("Gid:"))
            .expect("Gid line");
        assert!(
            gid.split_whitespace().skip(1).all(|g| g == "1"),
            "-g daemon: {gid}"
        );
        let groups = status
            .lines()
            .find(|l| l.starts_with("Groups:"))
            .expect("Groups line");
        assert!(
            !groups.split_whitespace().skip(1).any(|g| g == "0"),
            "root group kept: {groups}"
        );
    }
    // The master itself stays root (it must, to bind and to signal).
    let master = std::fs::read_to_string(format!("/proc/{}/status", h.pid)).expect("status");
    assert!(master
        .lines()
        .any(|l| l.starts_with("Uid:") && l.contains("\t0\t")));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn umask_applies_to_unix_socket_files_and_workers() {
    let mut start = Start::new("umask", &["-m", "0o077"]).no_default_bind();
    let sock = start.dir().join("app.sock");
    start = start.args(["-b".to_string(), format!("unix:{}", sock.display())]);
    let mut h = start.args(["--".to_string()]).args(notify_worker()).spawn();
    let made = wait_for(BOOT, || sock.exists().then_some(()));
    h.check(made.is_some(), "socket created");
    let mode = std::fs::metadata(&sock).expect("meta").permissions().mode() & 0o777;
    // --socket-mode's 0o666 narrowed by the explicit umask (execute bits
    // mean nothing on a socket; before --socket-mode it was 0777 & ~umask).
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Poll: a worker caught between fork and exec still shows the
    // master's umask.
    let umask_of = |pid: i32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|u| u.trim().to_string())
    };
    let seen = wait_for(BOOT, || {
        let pid = *h.children().first()?;
        (umask_of(pid).as_deref() == Some("0077")).then_some(())
    });
    h.check(seen.is_some(), "the worker runs with umask 0077");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn pidfile_is_written_refused_while_live_and_replaced_when_stale() {
    let dir = temp_dir("pidfile");
    let pidfile = dir.join("app.pid");
    let p = pidfile.to_str().expect("utf8");
    let mut first = Start::new("pid-a", &["-p", p])
        .args(hello_args("1"))
        .spawn();
    first.wait_workers(1, BOOT);
    let written: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(written, first.pid);
    // A second procman with the same pidfile refuses to start.
    let mut second = Start::new("pid-b", &["-p", p])
        .json()
        .args(hello_args("1"))
        .spawn();
    assert_eq!(second.exit_code(BOOT), 1);
    second.check(
        second
            .log_text()
            .contains(&format!("already running as pid {}", first.pid)),
        "names the live owner",
    );
    second.check(!second.has_event("booting", |_| true), "no worker started");
    first.signal(Signal::SIGTERM);
    assert_eq!(first.exit_code(BOOT), 0);
    assert!(!pidfile.exists(), "removed at exit");
    // A stale file (dead pid) is replaced.
    std::fs::write(&pidfile, "4194303\n").expect("stale");
    let mut third = Start::new("pid-c", &["-p", p])
        .args(hello_args("1"))
        .spawn();
    third.wait_workers(1, BOOT);
    let written: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(written, third.pid);
    drop(third);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn pre_start_commands_run_in_order_with_the_workers_environment() {
    let start = Start::new("prestart", &[]).json();
    let out = start.dir().join("pre.txt");
    let workdir = start.dir().join("work");
    std::fs::create_dir_all(&workdir).expect("mkdir");
    let o = out.display();
    let mut h = start
        .args([
            "--chdir",
            workdir.to_str().expect("utf8"),
            "-e",
            "STAGE=prod",
            "--pre-start",
            &format!("echo first $STAGE $(pwd) >> {o}"),
            "--pre-start",
            &format!("echo second >> {o}"),
        ])
        .args(hello_args("1"))
        .spawn();
    h.wait_workers(1, BOOT);
    let text = std::fs::read_to_string(&out).expect("pre-start output");
    assert_eq!(text, format!("first prod {}\nsecond\n", workdir.display()));
    // A worker can answer before the master has logged its spawn.
    h.expect_event("booting", BOOT, "boot logged", |_| true);
    h.check(
        h.count_events("pre-start", |_| true) == 2,
        "two pre-start commands",
    );
    let pre = h
        .event_index("pre-start", |e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("echo second"))
        })
        .expect("the second logged");
    let boot = h.event_index("booting", |_| true).expect("boot");
    assert!(pre < boot, "pre-start ran before the first worker");
    // Not re-run on HUP.
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "reloaded", |_| true);
    h.check(
        h.count_events("pre-start", |_| true) == 2,
        "no pre-start command on HUP",
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("out").lines().count(),
        2
    );
}

#[test]
fn a_failing_pre_start_command_stops_procman_before_any_worker() {
    let mut h = Start::new("prestart-fail", &["--pre-start", "exit 7"])
        .json()
        .args(hello_args("2"))
        .spawn();
    assert_eq!(h.exit_code(BOOT), 1);
    // The last line, for the operator: which command, how it ended.
    h.check(
        h.log_text()
            .contains("pre-start command 'exit 7' exited with status 7"),
        "names command and status",
    );
    h.check(h.has_event("pre-start", |_| true), "the command ran");
    h.check(!h.has_event("booting", |_| true), "no worker started");
}

#[test]
fn chdir_and_env_reach_the_workers() {
    let start = Start::new("chdir-env", &[]);
    let workdir = start.dir().join("app");
    std::fs::create_dir_all(&workdir).expect("mkdir");
    let dump = start.dir().join("env.json");
    let mut h = start
        .args([
            "--chdir",
            workdir.to_str().expect("utf8"),
            "-e",
            "COLOR=blue",
            "-e",
            "EMPTY=",
            "--",
        ])
        .args(notify_worker())
        .args(["--dump-env", dump.to_str().expect("utf8")])
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).expect("dump")).expect("json");
    assert_eq!(v["COLOR"], "blue");
    assert_eq!(v["EMPTY"], "");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    assert_eq!(cwd, workdir);
}

#[test]
fn a_missing_chdir_or_a_malformed_env_is_a_usage_error() {
    for (args, want) in [
        (
            vec!["--chdir", "/no/such/dir"],
            "'/no/such/dir' for '--chdir': no such directory",
        ),
        (vec!["-e", "1BAD=x"], "'1BAD=x' for '--env'"),
        (vec!["-e", "NOVALUE"], "expected KEY=VALUE"),
    ] {
        let mut h = Start::new("usage", &args).args(hello_args("1")).spawn();
        assert_eq!(h.exit_code(BOOT), 2, "{args:?}");
        h.check(h.log_text().contains(want), want);
    }
}

#[test]
fn stop_signal_is_what_command_workers_get_on_a_graceful_stop() {
    let start = Start::new("stop-signal", &[]).json();
    let got = start.dir().join("got");
    let trapped = start.dir().join("trapped");
    let script = format!(
        "trap 'echo usr2 > {g}; exit 0' USR2; trap 'echo term > {g}; exit 0' TERM; touch {t}; while :; do sleep 0.05; done",
        g = got.display(),
        t = trapped.display()
    );
    let mut h = start
        .args([
            "--stop-signal",
            "USR2",
            "--graceful-timeout",
            "30",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn();
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    // Stop only once the worker's traps are set.
    h.check(
        wait_for(BOOT, || trapped.exists().then_some(())).is_some(),
        "the worker set its traps",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let text = std::fs::read_to_string(&got).unwrap_or_default();
    assert_eq!(
        text.trim(),
        "usr2",
        "the worker got --stop-signal, not TERM"
    );
}

#[test]
fn the_example_systemd_units_are_valid() {
    // systemd's own parser, offline: unknown keys, bad values and missing
    // executables are reported on stderr.
    let dir = temp_dir("units");
    for unit in ["procman.service", "procman.socket"] {
        let text =
            std::fs::read_to_string(repo().join("examples/systemd").join(unit)).expect("unit");
        std::fs::write(
            dir.join(unit),
            text.replace("/usr/local/bin/procman", PROCMAN),
        )
        .expect("write");
    }
    let (ok, stderr) = systemd_verify(&dir);
    assert!(ok && stderr.trim().is_empty(), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `sh -c` script of a worker (notify_worker with `worker_args`) that first
/// starts a helper in its process group which ignores TERM and ABRT (a
/// background child inherits ignored signals, and exec keeps them
/// ignored); the helper's pid goes to `pid_file`.
fn worker_with_stubborn_helper(pid_file: &Path, worker_args: &str) -> String {
    format!(
        "trap '' TERM ABRT; sleep 1000 & echo $! > {p}; trap - TERM ABRT; exec {w} {worker_args}",
        p = pid_file.display(),
        w = notify_worker().join(" ")
    )
}

/// Live (non-zombie) processes of process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    all_stats()
        .into_iter()
        .filter(|(_, s)| s.pgrp == pgid && s.state != 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// Kills and reaps what is left of group `pgid` after procman exited (its
/// members were re-parented to this test process, a subreaper), so that a
/// failing test leaves nothing behind; returns what was left.
fn kill_leftovers(pgid: i32) -> Vec<i32> {
    let left = group_members(pgid);
    for p in &left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*p), None);
    }
    left
}

/// Starts procman with one such worker; returns the worker's pid (its
/// group) and the helper's pid.
fn start_with_stubborn_helper(name: &str, args: &[&str], worker_args: &str) -> (Harness, i32, i32) {
    let start = Start::new(name, args).json();
    let pid_file = start.dir().join("helper.pid");
    let script = worker_with_stubborn_helper(&pid_file, worker_args);
    let mut h = start.args(["--", "sh", "-c", &script]).spawn();
    let worker = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let helper: i32 = wait_for(BOOT, || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .expect("helper pid");
    h.check(
        group_members(worker).contains(&helper),
        "the helper is in the worker's process group",
    );
    (h, worker, helper)
}

/// Checks that nothing of `worker`'s process group outlived procman (and
/// kills what did, so the test leaves nothing behind).
fn check_no_leftovers(h: &Harness, worker: i32, helper: i32) {
    let left = kill_leftovers(worker);
    h.check(
        left.is_empty(),
        &format!(
            "processes of worker {worker}'s group outlived procman: {left:?} (helper {helper})"
        ),
    );
}

#[test]
fn a_graceful_stop_kills_a_helper_that_ignores_term_and_waits_for_it() {
    let (mut h, worker, helper) =
        start_with_stubborn_helper("linger-term", &["-w", "1", "--graceful-timeout", "1"], "");
    let t0 = Instant::now();
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    // Checked at once: procman itself waited until the group was empty.
    check_no_leftovers(&h, worker, helper);
    let took = t0.elapsed();
    h.check(
        took >= Duration::from_millis(900),
        &format!("the helper had until --graceful-timeout, procman exited after {took:?}"),
    );
}

#[test]
fn a_quick_stop_kills_a_helper_that_ignores_term() {
    let (mut h, worker, helper) =
        start_with_stubborn_helper("linger-int", &["-w", "1", "--graceful-timeout", "60"], "");
    h.signal(Signal::SIGINT);
    assert_eq!(h.exit_code(BOOT), 0);
    check_no_leftovers(&h, worker, helper);
}

#[test]
fn a_crashed_workers_helper_is_cleaned_up() {
    let (h, worker, helper) =
        start_with_stubborn_helper("linger-crash", &["-w", "1", "--graceful-timeout", "1"], "");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGKILL).expect("kill -9");
    let gone = wait_for(Duration::from_secs(10), || {
        group_members(worker).is_empty().then_some(())
    });
    h.check(
        gone.is_some(),
        &format!("helper {helper} of crashed worker {worker} still runs"),
    );
    // The replacement is spawned right after the group is killed, not
    // before: wait for it rather than look at the instant between.
    let replaced = wait_for(BOOT, || (h.children().len() == 1).then_some(()));
    h.check(replaced.is_some(), "the worker was replaced");
}

#[test]
fn a_timed_out_workers_helper_is_cleaned_up() {
    let (h, worker, helper) = start_with_stubborn_helper(
        "linger-timeout",
        &["-w", "1", "-t", "1", "--graceful-timeout", "1"],
        "--heartbeat 0.2 --silent-after 0.5",
    );
    h.expect_event("stopping", BOOT, "timeout logged", |e| {
        worker_of(e) == worker && e["reason"] == "timeout"
    });
    let gone = wait_for(Duration::from_secs(10), || {
        group_members(worker).is_empty().then_some(())
    });
    h.check(
        gone.is_some(),
        &format!("helper {helper} of timed-out worker {worker} still runs"),
    );
}
