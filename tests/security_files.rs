//! Security of the files, sockets and descriptors a root procman touches
//! (issue 12, items 3-6): planted symlinks are never followed, a live
//! socket is never taken over, `--user` workers always reach the notify
//! socket, and `fd://N` never names a descriptor procman owns.
//!
//! The attacks are real: the planting steps run as `nobody` (setpriv), and
//! procman's pid is known before it starts (a shell waits on a FIFO, then
//! execs procman), so names derived from it can be planted in advance.
//! Tests that need root say so and return early without it.

mod util;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: this test needs root");
    }
    root
}

/// Runs a command as nobody (and nobody's group), for planting steps.
fn as_nobody(args: &[&str]) {
    let status = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(args)
        .status()
        .expect("setpriv (util-linux)");
    assert!(status.success(), "as nobody: {args:?}: {status}");
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

/// `start`'s test dir, made 0755 so that nobody can reach what the test
/// puts in it.
fn traversable_dir(start: &Start) -> PathBuf {
    let dir = start.dir().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn mkdir(path: &Path, mode: u32) {
    std::fs::create_dir(path).expect("mkdir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A copy of `hello` that nobody can execute (the repository's target dir
/// may sit under a 0700 home).
fn hello_for_nobody(dir: &Path) -> String {
    let exe = dir.join("hello");
    std::fs::copy(hello(), &exe).expect("copy hello");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    exe.display().to_string()
}

/// procman started by a shell that waits on a FIFO before it execs
/// procman: the harness knows procman's pid before procman runs.
struct Gate(PathBuf);

impl Gate {
    fn spawn(start: Start) -> (Harness, Gate) {
        let fifo = start.dir().join("gate");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let start = start.env("GATE", fifo.to_str().expect("utf8"));
        let h = start.spawn_with(
            "sh",
            &["-c", "read _ < \"$GATE\"; exec \"$0\" \"$@\"", PROCMAN],
        );
        (h, Gate(fifo))
    }

    /// Lets procman start (waits for the shell to open the FIFO).
    fn open(self) {
        let opened = wait_for(BOOT, || {
            // Non-blocking: ENXIO until the shell has the reading end.
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0)
                .ok()
        });
        let mut w = opened.expect("the gate shell opened its FIFO");
        w.write_all(b"go\n").expect("open the gate");
    }
}

fn stop(h: &mut Harness) {
    h.signal(Signal::SIGTERM);
    let code = h.exit_code(BOOT);
    h.check(code == 0, &format!("clean stop, got exit {code}"));
}

// ---- item 3: no symlink planted by someone else is followed ----

#[test]
fn pidfile_is_never_written_through_a_symlink_planted_by_nobody() {
    if !is_root() {
        return;
    }
    let start = Start::new("pid-symlink", &["-w", "1"]);
    let dir = traversable_dir(&start);
    // The pidfile's directory belongs to the app user (as /run/app often
    // does); a root-only file lies elsewhere.
    let run = dir.join("run");
    mkdir(&run, 0o755);
    chown(&run, NOBODY);
    let victim = dir.join("victim");
    std::fs::write(&victim, "root only\n").expect("write");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let pidfile = run.join("app.pid");
    let start = start.args(["--pid", pidfile.to_str().expect("utf8"), "--", &hello()]);
    let (mut h, gate) = Gate::spawn(start);
    // nobody plants the names a root procman with this pid would write
    // through: its temp file and the pidfile itself.
    let victim_s = victim.to_str().expect("utf8");
    for name in [format!(".app.pid.{}.tmp", h.pid), "app.pid".to_string()] {
        let link = run.join(name);
        as_nobody(&["ln", "-s", victim_s, link.to_str().expect("utf8")]);
    }
    gate.open();
    let pid = h.pid.to_string();
    let written = wait_for(BOOT, || {
        let text = std::fs::read_to_string(&pidfile).ok()?;
        (text.trim() == pid).then_some(())
    });
    h.check(written.is_some(), "the pidfile names procman");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root only\n",
        "root wrote through a symlink planted by nobody"
    );
    let meta = std::fs::symlink_metadata(&pidfile).expect("pidfile");
    assert!(meta.file_type().is_file(), "the pidfile is a regular file");
    assert_eq!(meta.uid(), 0, "the pidfile is root's");
    stop(&mut h);
    assert!(
        !pidfile.exists(),
        "procman removes the pidfile it wrote at exit"
    );
}

#[test]
fn notify_dir_of_another_procman_with_our_pid_is_left_alone() {
    // Another PID namespace's procman had our pid and uses the same /tmp.
    let start = Start::new("notify-shared", &["-w", "1", "--", &hello()]).json();
    let base = start.dir().join("shared");
    mkdir(&base, 0o755);
    let start = start.env("RUNTIME_DIRECTORY", base.to_str().expect("utf8"));
    let (mut h, gate) = Gate::spawn(start);
    let theirs = base.join(format!("procman-{}", h.pid));
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::write(theirs.join("notify.sock"), "theirs").expect("write");
    gate.open();
    h.expect_event("all-ready", BOOT, "the worker became ready", |_| true);
    // Ours are elsewhere in the same base, with names nobody can predict:
    // the notify socket's and the urgent socket's (master/urgent.rs).
    let ours: Vec<PathBuf> = std::fs::read_dir(&base)
        .expect("read base")
        .flatten()
        .map(|e| e.path())
        .filter(|p| *p != theirs)
        .collect();
    h.check(
        ours.len() == 2 && ours.iter().all(|d| d.join("notify.sock").exists()),
        &format!("two notify dirs of our own in the base: {ours:?}"),
    );
    stop(&mut h);
    assert_eq!(
        std::fs::read_to_string(theirs.join("notify.sock")).ok(),
        Some("theirs".to_string()),
        "the other procman's directory was removed"
    );
    for dir in &ours {
        assert!(
            !dir.exists(),
            "our own notify dir {dir:?} is removed at exit"
        );
    }
}

// ---- item 4: a live socket is never taken over ----

#[test]
fn a_live_root_socket_is_not_taken_over_by_a_non_root_procman() {
    if !is_root() {
        return;
    }
    let start = Start::new("live-socket", &["-w", "1"])
        .no_default_bind()
        .json();
    let dir = traversable_dir(&start);
    // A directory nobody may write in (so nobody could unlink the socket),
    // holding a live socket of root's that nobody cannot connect to.
    let shared = dir.join("shared");
    mkdir(&shared, 0o755);
    chown(&shared, NOBODY);
    let path = shared.join("app.sock");
    let live = UnixListener::bind(&path).expect("root's server");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let inode = std::fs::metadata(&path).expect("socket").ino();
    let exe = hello_for_nobody(&dir);
    let unix = format!("unix:{}", path.display());
    let mut h = start
        .env("RUNTIME_DIRECTORY", shared.to_str().expect("utf8"))
        .args(["-b", &unix, "--", &exe])
        .spawn_with(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                PROCMAN,
            ],
        );
    // Either it gives up (right) or it takes the path over and serves.
    let outcome = wait_for(BOOT, || {
        if h.has_event("listening", |_| true) {
            return Some(None);
        }
        h.wait_exit(Duration::ZERO).map(Some)
    });
    let code = outcome.flatten().and_then(|s| s.code());
    h.check(
        code == Some(1),
        "procman exits 1 instead of taking over the path",
    );
    // The error the operator reads.
    let log = h.log_text();
    h.check(
        log.contains(&path.display().to_string()) && log.contains("Permission denied"),
        "the error names the path and the reason",
    );
    assert_eq!(
        std::fs::metadata(&path)
            .expect("socket file still there")
            .ino(),
        inode,
        "root's socket file was replaced"
    );
    UnixStream::connect(&path).expect("root's server still reachable");
    drop(live);
}

#[test]
fn a_socket_file_replaced_by_another_server_is_not_unlinked_at_exit() {
    let start = Start::new("sock-replaced", &["-w", "1"])
        .no_default_bind()
        .json();
    let path = start.dir().join("app.sock");
    let unix = format!("unix:{}", path.display());
    let mut h = start.args(["-b", &unix, "--", &hello()]).spawn();
    h.expect_event("all-ready", BOOT, "the worker became ready", |_| true);
    // An operator moved procman's socket away and started another server
    // at the path; procman's exit must not unlink it. (Moved, not
    // deleted: a deleted inode's number may be reused at once.)
    std::fs::rename(&path, h.dir.join("moved.sock")).expect("move away");
    let other = UnixListener::bind(&path).expect("another server");
    stop(&mut h);
    h.check(
        path.exists(),
        "the other server's socket file is still there",
    );
    UnixStream::connect(&path).expect("the other server is reachable");
    drop(other);
}

// ---- item 5: --user workers can always reach the notify socket ----

#[test]
fn workers_of_user_reach_the_notify_socket_when_the_runtime_dir_is_private() {
    if !is_root() {
        return;
    }
    let start = Start::new("notify-private", &["-u", "nobody", "--ready", "notify"]).json();
    let dir = traversable_dir(&start);
    // Like root's /run/user/0: 0700, so nobody cannot traverse it.
    let private = dir.join("private");
    mkdir(&private, 0o700);
    let tmp = dir.join("tmp");
    mkdir(&tmp, 0o1777);
    let worker = repo().join("tests/workers/notify_worker.py");
    let mut h = start
        .env("RUNTIME_DIRECTORY", private.to_str().expect("utf8"))
        .env("XDG_RUNTIME_DIR", private.to_str().expect("utf8"))
        .env("TMPDIR", tmp.to_str().expect("utf8"))
        .args([
            "-w",
            "1",
            "--",
            "/usr/bin/python3",
            worker.to_str().expect("utf8"),
        ])
        .spawn();
    // procman itself heard READY=1 (the test worker serves even when its
    // notification cannot be delivered).
    h.expect_event(
        "all-ready",
        BOOT,
        "the worker's READY=1 reached procman",
        |_| true,
    );
    let pids = h.wait_workers(1, BOOT);
    let pid = *pids.iter().next().expect("a worker");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let notify = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).to_string()))
        .expect("NOTIFY_SOCKET");
    h.check(
        notify.starts_with(&tmp),
        &format!("the notify socket {notify:?} is under the reachable TMPDIR"),
    );
    stop(&mut h);
    assert!(
        std::fs::read_dir(&tmp).expect("tmp").next().is_none(),
        "the notify dir is removed at exit"
    );
}

#[test]
fn no_notify_base_reachable_by_the_user_is_a_clear_error() {
    if !is_root() {
        return;
    }
    let start = Start::new("notify-none", &["-u", "nobody", "-w", "1"]).json();
    let dir = start.dir().to_path_buf();
    let private = dir.join("private");
    mkdir(&private, 0o700);
    let p = private.to_str().expect("utf8");
    let mut h = start
        .env("RUNTIME_DIRECTORY", p)
        .env("XDG_RUNTIME_DIR", p)
        .env("TMPDIR", p)
        .args(["--", &hello()])
        .spawn();
    let code = h.wait_exit(BOOT).and_then(|s| s.code());
    h.check(code == Some(1), "procman exits 1 at start");
    // The error the operator reads names the directory and the user.
    let log = h.log_text();
    h.check(
        log.contains(p) && log.contains("nobody"),
        "one line names the directory and the user",
    );
    h.check(!h.has_event("listening", |_| true), "nothing was bound");
}

// ---- item 6: fd://N never names a descriptor procman owns ----

fn config(file: &Path, binds: &[String]) {
    let binds = binds
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        file,
        format!(
            "workers = 1\nbind = [{binds}]\ncommand = [\"{}\"]\n",
            hello()
        ),
    )
    .expect("write config");
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The fd of `pid` that holds the TCP listener on 127.0.0.1:`port`.
fn listener_fd(pid: i32, port: u16) -> Option<i32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(9).map(|s| s.to_string()))
            .flatten()
    })?;
    let want = format!("socket:[{inode}]");
    open_fds(pid).into_iter().find(|fd| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .is_ok_and(|l| l.to_string_lossy() == want)
    })
}

/// HUP with `fd://N` added must fail, change nothing, and leave procman
/// working (its signal pipe included: TTIN and TERM still act).
fn reload_rejects_fd(name: &str, pick: impl Fn(&Harness, u16) -> i32) {
    let start = Start::new(name, &[]).no_default_bind().json();
    let file = start.dir().join("procman.toml");
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    config(&file, std::slice::from_ref(&bind));
    let mut h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    let before = h.wait_workers_on(port, 1, BOOT);
    let n = pick(&h, port);
    let held = || std::fs::read_link(format!("/proc/{}/fd/{n}", h.pid)).ok();
    let before_fd = held();
    assert!(before_fd.is_some(), "procman holds fd {n}");
    config(&file, &[bind, format!("fd://{n}")]);
    h.signal(Signal::SIGHUP);
    let failed = h.expect_event("reload-failed", BOOT, "the reload is rejected", |_| true);
    // procman's descriptor is untouched: still open, still the same object
    // (closing the signal pipe made the master's poll loop spin).
    h.check(held() == before_fd, &format!("fd {n} is still procman's"));
    let busy = cpu_ticks(h.pid, Duration::from_secs(1));
    h.check(
        busy < 25,
        &format!("the idle master used {busy} ticks in 1 s"),
    );
    h.signal(Signal::SIGTTIN);
    h.expect_event("scaled", BOOT, "signals still reach the master", |e| {
        e["workers"] == 2
    });
    // The error the operator reads.
    h.check(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("fd {n} belongs to procman"))),
        &format!("the error says the fd is procman's: {failed}"),
    );
    h.check(
        !h.has_event("reloading", |_| true) && h.count_events("listening", |_| true) == 1,
        "nothing changed",
    );
    let served = h.wait_workers_on(port, 2, BOOT);
    assert!(served.is_superset(&before), "the first worker still serves");
    stop(&mut h);
}

/// CPU time (clock ticks, usually 1/100 s) `pid` uses during `window`:
/// a measurement over a fixed window, not a wait for an event.
fn cpu_ticks(pid: i32, window: Duration) -> u64 {
    let ticks = || {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = text.rsplit(')').next().unwrap_or_default().to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime: fields 14 and 15, i.e. 12 and 13 after ')'.
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        n(11) + n(12)
    };
    let start = ticks();
    std::thread::sleep(window);
    ticks() - start
}

#[test]
fn reload_naming_procmans_own_fd_3_is_rejected() {
    reload_rejects_fd("reload-fd3", |h, _| {
        assert!(open_fds(h.pid).contains(&3), "procman has an fd 3");
        3
    });
}

#[test]
fn reload_naming_a_listener_in_use_is_rejected() {
    reload_rejects_fd("reload-fd-listener", |h, port| {
        listener_fd(h.pid, port).expect("the listener's fd in procman")
    });
}

#[test]
fn fd_bind_at_start_takes_only_an_inherited_listening_socket() {
    // An inherited listening socket at fd 7 is served.
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = inherited.local_addr().expect("addr").port();
    let mut h = Start::new("fd-inherited", &["-w", "1", "-b", "fd://7", "--", &hello()])
        .inherit_fd(inherited.as_raw_fd(), 7)
        .spawn();
    h.wait_workers_on(port, 1, Duration::from_secs(30));
    stop(&mut h);
    drop(inherited);
    // procman's own fd 3 (created before binding) is refused, and says so.
    let mut h = Start::new("fd-own", &["-w", "1", "-b", "fd://3", "--", &hello()]).spawn();
    let code = h.wait_exit(BOOT).and_then(|s| s.code());
    h.check(code == Some(1), "exit 1");
    h.check(
        h.log_text().contains("fd 3 belongs to procman"),
        "the error says the fd is procman's",
    );
}

#[test]
fn a_failed_reload_leaves_an_inherited_fd_free_for_the_next() {
    // procman inherits a listening socket at fd 7 that no bind uses yet.
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let fd_port = inherited.local_addr().expect("addr").port();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    let start = Start::new("reload-fd-back", &[])
        .no_default_bind()
        .json()
        .inherit_fd(inherited.as_raw_fd(), 7);
    let file = start.dir().join("procman.toml");
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    config(&file, std::slice::from_ref(&bind));
    let mut h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    h.wait_workers_on(port, 1, BOOT);
    drop(inherited);
    // fd://7 is taken, then a busy address fails the reload: nothing may
    // change, fd 7 included (it must not be closed on the way out).
    let busy_bind = format!("127.0.0.1:{busy_port}");
    config(&file, &["fd://7".into(), bind.clone(), busy_bind]);
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-failed", BOOT, "the reload is rejected", |_| true);
    drop(busy);
    // (First, so that hello, which serves only fd 3, serves it.)
    config(&file, &["fd://7".into(), bind]);
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "the next reload takes fd 7", |_| true);
    h.wait_workers_on(fd_port, 1, BOOT);
    stop(&mut h);
}
