//! The integration-test harness: starts the real procman binary with real
//! workers, waits by polling with deadlines, and cleans up on drop.
//!
//! Every test gets its own temp dir and binds port 0 (procman logs the
//! port it got). On drop the harness SIGKILLs procman and every process
//! that descends from it, and reaps them: the test process is made a child
//! subreaper, so orphaned workers are re-parented to it and can be waited
//! for, leaving no zombie behind whatever PID 1 does.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// procman under test.
pub const PROCMAN: &str = env!("CARGO_BIN_EXE_procman");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter of the test venv (fastapi + uvicorn). Fails with
/// a how-to when it is missing, instead of skipping silently.
pub fn venv_python() -> PathBuf {
    let p = repo().join(".venv/bin/python");
    assert!(
        p.exists(),
        "the test virtualenv is missing: run scripts/test (it creates .venv from examples/fastapi/requirements.txt)"
    );
    p
}

/// A Python with fastapi + uvicorn that `nobody` can execute (for tests
/// with `-u nobody`): `.venv-system`, made by scripts/test from Debian's
/// /usr/bin/python3, since `.venv`'s interpreter lives under /root (0700).
/// Fails with a how-to when it is missing or `nobody` cannot reach it.
pub fn system_venv_python() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let venv = repo().join(".venv-system");
    let p = venv.join("bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test (it creates it with /usr/bin/python3 -m venv and examples/fastapi/requirements.txt)",
        venv.display()
    );
    for dir in venv.ancestors() {
        let mode = std::fs::metadata(dir).expect("stat").permissions().mode();
        assert!(
            mode & 0o005 == 0o005,
            "nobody cannot traverse {} (mode {:o}): tests with -u nobody need every directory above {} to be world-readable and searchable (chmod 755)",
            dir.display(),
            mode & 0o7777,
            venv.display()
        );
    }
    let real = std::fs::canonicalize(&p).expect("resolve the venv's python");
    let mode = std::fs::metadata(&real).expect("stat").permissions().mode();
    assert!(
        mode & 0o001 != 0,
        "{} is not executable by nobody",
        real.display()
    );
    p
}

/// A plain python3 for stdlib-only test workers.
pub fn python3() -> PathBuf {
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The stdlib-only command-class test worker.
pub fn notify_worker() -> Vec<String> {
    vec![
        python3().display().to_string(),
        repo()
            .join("tests/workers/notify_worker.py")
            .display()
            .to_string(),
    ]
}

/// The std-only example worker (built by cargo for integration tests).
pub fn hello() -> String {
    let exe = PathBuf::from(PROCMAN);
    let dir = exe.parent().expect("target dir");
    dir.join("examples/hello").display().to_string()
}

/// A fresh temp dir for one test, removed when dropped (also when the test
/// fails: nothing of a test run may remain).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Hands the directory over to an owner that removes it itself.
    pub fn keep(self) -> PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh temp dir for one test.
pub fn temp_dir(name: &str) -> TempDir {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("procman-test-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// The directory of this process's own cgroup for `controller`, and
/// whether it is cgroup v1's: v1, the controller's own hierarchy; v2, the
/// unified one where `controller` is enabled for children. None where
/// neither holds (a test that needs a cgroup then says SKIP).
pub fn own_cgroup_dir(controller: &str) -> Option<(PathBuf, bool)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == controller) {
            Some((
                PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}")),
                true,
            ))
        } else if controllers.is_empty() {
            let dir = PathBuf::from(format!("/sys/fs/cgroup{path}"));
            let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
            enabled
                .split_whitespace()
                .any(|c| c == controller)
                .then_some((dir, false))
        } else {
            None
        }
    })
}

/// Polls `cond` until it returns Some or the deadline passes.
pub fn wait_for<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes this test process a child subreaper (once per process).
fn become_subreaper() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if !DONE.swap(true, Ordering::SeqCst) {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
}

/// A running procman.
pub struct Harness {
    /// This test's directory.
    pub dir: PathBuf,
    /// procman's stderr.
    pub log: PathBuf,
    /// The child process.
    pub child: Option<Child>,
    /// procman's pid.
    pub pid: i32,
    args: Vec<String>,
    exit: Option<ExitStatus>,
    /// Whether procman logs JSON (its lifecycle events can be read).
    json: bool,
}

/// How to start procman.
pub struct Start {
    args: Vec<String>,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    env_remove: Vec<String>,
    dir: PathBuf,
    cwd: Option<PathBuf>,
    default_bind: bool,
    json: bool,
    inherit: Vec<(std::os::fd::RawFd, std::os::fd::RawFd)>,
}

impl Start {
    /// procman with these arguments; `-b 127.0.0.1:0` is added unless a
    /// bind is given.
    pub fn new(name: &str, args: &[&str]) -> Start {
        Start {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            env_remove: Vec::new(),
            dir: temp_dir(name).keep(),
            cwd: None,
            default_bind: true,
            json: false,
            inherit: Vec::new(),
        }
    }

    /// `--log-format json` (put before the test's own arguments, so also
    /// before a `--` and its command): the lifecycle events the test waits
    /// for with [`Harness::wait_event`].
    pub fn json(mut self) -> Start {
        self.json = true;
        self
    }

    /// Adds arguments.
    pub fn args<S: AsRef<str>>(mut self, more: impl IntoIterator<Item = S>) -> Start {
        self.args
            .extend(more.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// Sets an environment variable for procman.
    pub fn env(mut self, k: &str, v: &str) -> Start {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Sets an environment variable for procman, as bytes (not UTF-8).
    pub fn env_os(mut self, k: &[u8], v: &[u8]) -> Start {
        use std::os::unix::ffi::OsStrExt;
        self.env.push((
            std::ffi::OsStr::from_bytes(k).to_owned(),
            std::ffi::OsStr::from_bytes(v).to_owned(),
        ));
        self
    }

    /// Removes an environment variable for procman.
    pub fn env_remove(mut self, k: &str) -> Start {
        self.env_remove.push(k.into());
        self
    }

    /// procman's working directory.
    pub fn cwd(mut self, dir: &Path) -> Start {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// procman inherits `fd` (open in the test) as fd number `at`, as an
    /// open descriptor procman did not create (the caller keeps `fd` open
    /// until procman has started).
    pub fn inherit_fd(mut self, fd: std::os::fd::RawFd, at: std::os::fd::RawFd) -> Start {
        self.inherit.push((fd, at));
        self
    }

    /// Do not add the default bind.
    pub fn no_default_bind(mut self) -> Start {
        self.default_bind = false;
        self
    }

    /// The test dir (to write files before starting).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts procman.
    pub fn spawn(self) -> Harness {
        self.spawn_with(PROCMAN, &[])
    }

    /// Starts `program` with `pre_args` before procman's arguments (e.g.
    /// `unshare ... procman`); the harness then supervises that program.
    pub fn spawn_with(self, program: &str, pre_args: &[&str]) -> Harness {
        become_subreaper();
        let log = self.dir.join("procman.log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let stdout = stderr.try_clone().expect("dup log");
        let mut args = Vec::new();
        let has_bind = self
            .args
            .iter()
            .any(|a| a == "-b" || a == "--bind" || a.starts_with("--bind="));
        if self.default_bind && !has_bind {
            args.extend(["-b".to_string(), "127.0.0.1:0".to_string()]);
        }
        if self.json {
            args.extend(["--log-format".to_string(), "json".to_string()]);
        }
        args.extend(self.args.iter().cloned());
        let all: Vec<&str> = pre_args
            .iter()
            .copied()
            .chain(args.iter().map(String::as_str))
            .collect();
        let json = self.json
            || all.windows(2).any(|a| a == ["--log-format", "json"])
            || all.contains(&"--log-format=json");
        let mut cmd = Command::new(program);
        cmd.args(pre_args)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .current_dir(self.cwd.as_deref().unwrap_or(&self.dir));
        clean_env(&mut cmd);
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        cmd.env("RUNTIME_DIRECTORY", &self.dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // procman sees exactly the descriptors a test hands it: what the
        // test process itself has open without CLOEXEC (a `flock` lock at
        // fd 3 when the suite runs under it, say) would otherwise look
        // like an inherited descriptor to procman and its fd:// checks.
        let inherit = self.inherit.clone();
        let mut keep: Vec<libc::c_uint> =
            inherit.iter().map(|&(_, at)| at as libc::c_uint).collect();
        keep.sort_unstable();
        // SAFETY: between fork and exec only dup2, fcntl and close_range
        // run (async-signal-safe); nothing is allocated (both vectors were
        // built before the fork).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for &(fd, at) in &inherit {
                    if libc::dup2(fd, at) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // dup2 onto the same number keeps FD_CLOEXEC.
                    if fd == at {
                        libc::fcntl(at, libc::F_SETFD, 0);
                    }
                }
                let mut first: libc::c_uint = 3;
                for &at in &keep {
                    if at > first {
                        libc::close_range(first, at - 1, 0);
                    }
                    first = first.max(at + 1);
                }
                libc::close_range(first, libc::c_uint::MAX, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start procman");
        let pid = child.id() as i32;
        Harness {
            dir: self.dir,
            log,
            child: Some(child),
            pid,
            args,
            exit: None,
            json,
        }
    }
}

impl Harness {
    /// Takes over a procman started some other way (e.g. through a wrapper
    /// that execs it).
    pub fn adopt(dir: PathBuf, log: PathBuf, child: Child, pid: i32) -> Harness {
        become_subreaper();
        Harness {
            dir,
            log,
            child: Some(child),
            pid,
            args: Vec::new(),
            exit: None,
            json: false,
        }
    }

    /// The same, for a procman started with `--log-format json`.
    pub fn adopt_json(dir: PathBuf, log: PathBuf, child: Child, pid: i32) -> Harness {
        let mut h = Harness::adopt(dir, log, child, pid);
        h.json = true;
        h
    }

    /// Starts procman with `args` (plus `-b 127.0.0.1:0`).
    pub fn start(name: &str, args: &[&str]) -> Harness {
        Start::new(name, args).spawn()
    }

    /// procman's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_for(timeout, || self.log_text().contains(needle).then_some(())).is_some()
    }

    /// Counts lines of the log containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The lifecycle events logged so far: the JSON lines that carry an
    /// `event` field, in order. Needs `--log-format json` ([`Start::json`]):
    /// without it no event could ever be seen, and a test waiting for none
    /// could not fail, so this panics instead.
    pub fn events(&self) -> Vec<serde_json::Value> {
        assert!(
            self.json,
            "events need procman started with --log-format json (Start::json)"
        );
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("event").is_some())
            .collect()
    }

    /// The events named `name` (the README's table under *Lifecycle
    /// events*: booting, ready, exited, boot-failed, stopping, killing,
    /// recycling, all-ready, reloading, reload-done, reload-failed,
    /// shutdown, zygote-starting, ...).
    pub fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|v| v["event"] == name)
            .collect()
    }

    /// How many events named `name` satisfy `pred`.
    pub fn count_events(&self, name: &str, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.events_named(name).iter().filter(|v| pred(v)).count()
    }

    /// Whether an event named `name` satisfying `pred` was logged.
    pub fn has_event(&self, name: &str, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
        self.count_events(name, pred) > 0
    }

    /// The position among all events of the first one named `name` that
    /// satisfies `pred` (to check the order of two events).
    pub fn event_index(
        &self,
        name: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<usize> {
        self.events()
            .iter()
            .position(|v| v["event"] == name && pred(v))
    }

    /// Waits for an event named `name` for which `pred` holds; returns it.
    pub fn wait_event(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        wait_for(timeout, || {
            self.events_named(name).into_iter().find(|v| pred(v))
        })
    }

    /// Waits for an event named `name` for which `pred` holds; fails the
    /// test with the log (saying `what`) when none comes in time.
    #[track_caller]
    pub fn expect_event(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        match self.wait_event(name, timeout, pred) {
            Some(v) => v,
            None => panic!(
                "{what}: no '{name}' event within {timeout:?}\n--- procman {:?} log ---\n{}",
                self.args,
                self.log_text()
            ),
        }
    }

    /// Waits until `n` events named `name` satisfy `pred`; fails the test
    /// with the log (saying `what`) otherwise. Returns them.
    #[track_caller]
    pub fn expect_events(
        &self,
        name: &str,
        n: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let got = wait_for(timeout, || {
            let found: Vec<_> = self
                .events_named(name)
                .into_iter()
                .filter(|v| pred(v))
                .collect();
            (found.len() >= n).then_some(found)
        });
        match got {
            Some(v) => v,
            None => panic!(
                "{what}: fewer than {n} '{name}' events within {timeout:?}\n--- procman {:?} log ---\n{}",
                self.args,
                self.log_text()
            ),
        }
    }

    /// The text of each log line: a JSON line's `message` (its `exc` after
    /// it, for a traceback), any other line as it is. For the tests whose
    /// subject is the wording an operator reads.
    pub fn messages(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(v) if v["message"].is_string() => {
                    let mut m = v["message"].as_str().unwrap_or_default().to_string();
                    if let Some(exc) = v["exc"].as_str() {
                        m.push('\n');
                        m.push_str(exc);
                    }
                    m
                }
                _ => l.to_string(),
            })
            .collect()
    }

    /// Panics with the log when `cond` is false.
    #[track_caller]
    pub fn check(&self, cond: bool, what: &str) {
        if !cond {
            panic!(
                "{what}\n--- procman {:?} log ---\n{}",
                self.args,
                self.log_text()
            );
        }
    }

    /// Fails the test, with the log, if any request of `report` failed.
    #[track_caller]
    pub fn check_none_failed(&self, report: &LoadReport) {
        self.check(
            report.failures.is_empty(),
            &format!("failed requests: {:?} of {}", report.failures, report.ok),
        );
    }

    /// The TCP port of the first listener, from the log (its `listening`
    /// event with `--log-format json`).
    pub fn port(&self) -> u16 {
        let found = wait_for(Duration::from_secs(10), || {
            if self.json {
                return self.events_named("listening").iter().find_map(|e| {
                    let addr = e["address"].as_str()?.strip_prefix("http://")?;
                    addr.parse::<SocketAddr>().ok().map(|a| a.port())
                });
            }
            self.log_text().lines().find_map(|l| {
                let rest = l.split("Listening at: http://").nth(1)?;
                let addr = rest.split_whitespace().next()?;
                addr.parse::<SocketAddr>().ok().map(|a| a.port())
            })
        });
        match found {
            Some(p) => p,
            None => panic!("procman did not log a TCP listener\n{}", self.log_text()),
        }
    }

    /// 127.0.0.1:port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The master's direct children (its workers and zygotes).
    pub fn children(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for (pid, stat) in all_stats() {
            if stat.ppid == self.pid {
                out.push(pid);
            }
        }
        out.sort();
        out
    }

    /// Every live process that descends from procman.
    pub fn descendants(&self) -> Vec<i32> {
        descendants_of(self.pid)
    }

    /// Waits until `n` distinct worker pids have answered GET /pid;
    /// returns them.
    pub fn wait_workers(&mut self, n: usize, timeout: Duration) -> BTreeSet<i32> {
        let port = self.port();
        self.wait_workers_on(port, n, timeout)
    }

    /// Same as [`Harness::wait_workers`] on a given port of 127.0.0.1.
    pub fn wait_workers_on(&mut self, port: u16, n: usize, timeout: Duration) -> BTreeSet<i32> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut pids = BTreeSet::new();
        let ok = wait_for(timeout, || {
            if let Ok((200, body)) = http_get(addr, "/pid") {
                if let Ok(p) = body.trim().parse::<i32>() {
                    pids.insert(p);
                }
            }
            // Only pids that are still our workers count.
            let kids: BTreeSet<i32> = self.children().into_iter().collect();
            pids.retain(|p| kids.contains(p));
            (pids.len() >= n && kids.len() >= n).then_some(())
        });
        self.check(
            ok.is_some(),
            &format!("{n} distinct workers did not answer in {timeout:?} (got {pids:?})"),
        );
        pids
    }

    /// Sends a signal to procman.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// Waits for procman to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let child = self.child.as_mut()?;
        let status = wait_for(timeout, || child.try_wait().ok().flatten());
        self.exit = status;
        status
    }

    /// Waits for procman to exit and returns its exit code.
    #[track_caller]
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait_exit(timeout);
        match status.and_then(|s| s.code()) {
            Some(c) => c,
            None => panic!(
                "procman did not exit with a code within {timeout:?} ({status:?})\n{}",
                self.log_text()
            ),
        }
    }

    /// Zombie children of procman right now (should always be none).
    pub fn zombies(&self) -> Vec<i32> {
        all_stats()
            .into_iter()
            .filter(|(_, s)| s.ppid == self.pid && s.state == 'Z')
            .map(|(p, _)| p)
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Freeze procman first so it cannot start anything new, then list
        // what descends from it: those pids are alive (or zombies), so they
        // cannot have been reused by an unrelated process. Pids seen earlier
        // in the test are never signalled blindly: they may be reused.
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if running {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGSTOP);
        }
        let doomed: BTreeSet<i32> = self.descendants().into_iter().collect();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in &doomed {
            let _ = nix::sys::signal::killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // Orphans were re-parented to us (we are a subreaper): reap them.
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in doomed {
            loop {
                match nix::sys::wait::waitpid(
                    Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                ) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
        }
        // The log was printed by `check` on failure; nothing may remain.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fields of /proc/PID/stat the harness uses.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// Process state letter.
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Nice value (of its main thread).
    pub nice: i32,
}

/// Parses /proc/PID/stat.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        nice: f.get(16)?.parse().ok()?,
    })
}

/// Every process's stat.
pub fn all_stats() -> BTreeMap<i32, Stat> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some(s) = stat(pid) {
                    out.insert(pid, s);
                }
            }
        }
    }
    out
}

/// Live (non-zombie) descendants of `root`.
pub fn descendants_of(root: i32) -> Vec<i32> {
    let stats = all_stats();
    let mut out = Vec::new();
    for (&pid, _) in stats.iter() {
        let mut cur = pid;
        for _ in 0..64 {
            match stats.get(&cur) {
                Some(s) if s.ppid == root => {
                    out.push(pid);
                    break;
                }
                Some(s) if s.ppid > 1 => cur = s.ppid,
                _ => break,
            }
        }
    }
    out
}

/// Whether `pid` sleeps in poll(2) with no timeout: for the master, that
/// nothing is due and only an event (a signal, a notification) can wake
/// it. Read from /proc/PID/syscall: the syscall number, then its arguments.
pub fn idle_in_poll(pid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return false;
    };
    let f: Vec<&str> = text.split_whitespace().collect();
    // poll(fds, nfds, timeout = -1) or ppoll(fds, nfds, timeout = NULL, ..).
    let (poll, ppoll): (Option<&str>, &str) = if cfg!(target_arch = "x86_64") {
        (Some("7"), "271")
    } else {
        (None, "73")
    };
    match (f.first(), f.get(3)) {
        (Some(n), Some(t)) if Some(*n) == poll => *t == "0xffffffff",
        (Some(n), Some(t)) if *n == ppoll => *t == "0x0",
        _ => false,
    }
}

/// The nice value of `pid`'s autogroup (`/autogroup-N nice V`), if the
/// kernel keeps autogroups.
pub fn autogroup_nice_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/autogroup")).ok()?;
    text.split_whitespace().last()?.parse().ok()
}

/// A process's nice value.
pub fn nice_of(pid: i32) -> Option<i32> {
    stat(pid).map(|s| s.nice)
}

/// Whether this process has CAP_SYS_NICE in its effective set (bit 23 of
/// CapEff in /proc/self/status): then procman, started by it, may raise a
/// priority.
pub fn may_raise_priority() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 23) != 0)
}

/// The nice value a worker boots at when procman runs at `base`: raised by
/// 5 (up to -20) if procman may raise a priority, else `base`.
pub fn booting_nice(base: i32) -> i32 {
    if may_raise_priority() {
        (base - 5).max(-20)
    } else {
        base
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// One short-connection HTTP GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_request(addr, "GET", path, None, Duration::from_secs(5))
}

/// One short-connection HTTP request.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    http_request_after(addr, method, path, body, timeout, Duration::ZERO)
}

/// One short-connection HTTP request sent `pause` after the connection is
/// made (a client across a network, or busy: the server has accepted the
/// connection before its request arrives).
pub fn http_request_after(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
    pause: Duration,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {}", e.kind()))?;
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    exchange(&mut s, method, path, body)
}

/// One short-connection GET over the unix socket at `sock`, sent `pause`
/// after the connection is made.
pub fn unix_get_after(sock: &Path, path: &str, pause: Duration) -> Result<(u16, String), String> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("connect: {}", e.kind()))?;
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    exchange(&mut s, "GET", path, None)
}

/// Writes one request with `Connection: close` and reads the reply to its end.
fn exchange(
    s: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read: {}", e.kind()))?;
    if buf.is_empty() {
        return Err("empty reply".into());
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad reply: {text:?}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// Outcome of a bounded request loop.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Successful requests.
    pub ok: usize,
    /// Failures with their reason.
    pub failures: Vec<String>,
    /// The worker pids that answered.
    pub pids: BTreeSet<i32>,
}

/// A bounded loop of short connections from a few threads, to 127.0.0.1.
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts `threads` clients, each stopping after `max_requests` or
    /// `max_time`, whichever comes first.
    pub fn start(
        addr: SocketAddr,
        threads: usize,
        max_requests: usize,
        max_time: Duration,
    ) -> Load {
        Load::start_paced(addr, threads, max_requests, max_time, Duration::ZERO)
    }

    /// As [`Load::start`], each request sent `pause` after its connection
    /// is made ([`http_request_after`]).
    pub fn start_paced(
        addr: SocketAddr,
        threads: usize,
        max_requests: usize,
        max_time: Duration,
        pause: Duration,
    ) -> Load {
        Load::start_with(threads, max_requests, max_time, move || {
            http_request_after(addr, "GET", "/pid", None, Duration::from_secs(5), pause)
        })
    }

    /// As [`Load::start`], each request made by `request` (which answers
    /// the status and the body, or why it failed).
    pub fn start_with(
        threads: usize,
        max_requests: usize,
        max_time: Duration,
        request: impl Fn() -> Result<(u16, String), String> + Send + Sync + 'static,
    ) -> Load {
        let request = Arc::new(request);
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let deadline = Instant::now() + max_time;
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                let report = report.clone();
                let request = request.clone();
                std::thread::spawn(move || {
                    for _ in 0..max_requests {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                            break;
                        }
                        let r = request();
                        let mut rep = report.lock().expect("report lock");
                        match r {
                            Ok((200, body)) => {
                                rep.ok += 1;
                                if let Ok(p) = body.trim().parse::<i32>() {
                                    rep.pids.insert(p);
                                } else if let Some(p) = json_pid(&body) {
                                    rep.pids.insert(p);
                                }
                            }
                            Ok((code, _)) => rep.failures.push(format!("status {code}")),
                            Err(e) => rep.failures.push(e),
                        }
                        drop(rep);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            threads: handles,
        }
    }

    /// Requests done so far.
    pub fn done(&self) -> usize {
        let r = self.report.lock().expect("report lock");
        r.ok + r.failures.len()
    }

    /// Waits until `n` more requests than now are done (answered or
    /// failed), so that some ran after whatever the test just did.
    pub fn wait_more(&self, n: usize, timeout: Duration) {
        let target = self.done() + n;
        wait_for(timeout, || (self.done() >= target).then_some(()));
    }

    /// Pids seen so far.
    pub fn pids(&self) -> BTreeSet<i32> {
        self.report.lock().expect("report lock").pids.clone()
    }

    /// Stops the clients and returns the report.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let r = self.report.lock().expect("report lock");
        r.clone()
    }
}

/// `{"pid": 123, ...}` → 123.
pub fn json_pid(body: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("pid")?.as_i64().map(|p| p as i32)
}

/// The fds open in a process, as numbers.
pub fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    fds
}

/// A process's fd count at rest: the minimum over a few samples, so a
/// connection still closing from an earlier request is not counted.
pub fn idle_fd_count(pid: i32) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            open_fds(pid).len()
        })
        .min()
        .unwrap_or(0)
}

/// The backlog of the TCP listener on 127.0.0.1:`port`, as `ss` shows it
/// (for a listening socket, Send-Q is the backlog). One entry per socket.
pub fn listen_backlog(port: u16) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect()
}

/// The FastAPI example app's directory.
pub fn fastapi_dir() -> PathBuf {
    repo().join("examples/fastapi")
}

/// The test apps' directory (tests/apps).
pub fn apps_dir() -> PathBuf {
    repo().join("tests/apps")
}

/// procman serving `app` from `dir` with the test venv's Python, no access
/// log (it would drown the log the tests read).
pub fn uvicorn(name: &str, dir: &Path, app: &str, extra: &[&str]) -> Start {
    let python = venv_python();
    Start::new(
        name,
        &[
            app,
            "--python",
            python.to_str().expect("utf8"),
            "--no-access-log",
        ],
    )
    .args(["--chdir", dir.to_str().expect("utf8")])
    .args(extra.iter().copied())
}

/// procman serving one worker of `app` from `dir`, JSON logs, `extra`
/// arguments; returned once procman logged `all-ready`.
pub fn one_worker_in(name: &str, dir: &Path, app: &str, extra: &[&str]) -> Harness {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(extra);
    let h = uvicorn(name, dir, app, &args).json().spawn();
    h.check(
        h.wait_event("all-ready", Duration::from_secs(60), |_| true)
            .is_some(),
        "all ready",
    );
    h
}

/// Removes from `cmd`'s environment everything of the test process that
/// procman would read: the systemd and PaaS variables and every
/// `PROCMAN_*` (matched on bytes, so a non-UTF-8 name is removed too).
pub fn clean_env(cmd: &mut Command) {
    for k in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
        "WEB_CONCURRENCY",
        "PORT",
    ] {
        cmd.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.as_encoded_bytes().starts_with(b"PROCMAN_") {
            cmd.env_remove(k);
        }
    }
}

/// Runs procman to completion (it must exit on its own) in `cwd` with a
/// clean environment plus `env`; returns (exit code, stdout, stderr).
pub fn run_procman(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(PROCMAN);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    clean_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run procman");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The zygotes procman said it started, in order (their
/// `zygote-starting` events).
pub fn zygote_pids(h: &Harness) -> Vec<i32> {
    h.events_named("zygote-starting")
        .iter()
        .filter_map(|e| e["zygote"].as_i64().map(|p| p as i32))
        .collect()
}

/// The lifecycle events in a JSON log file (`--log-file` with
/// `--log-format json`), in order.
pub fn events_in(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_some())
        .collect()
}

/// An event's worker pid.
pub fn worker_of(e: &serde_json::Value) -> i32 {
    e["worker"].as_i64().unwrap_or(-1) as i32
}

/// `systemd-analyze verify` of procman.socket and procman.service in
/// `dir`: (success, stderr).
pub fn systemd_verify(dir: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "./procman.socket",
            "./procman.service",
        ])
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A fake systemd: a datagram socket that collects what procman sends to
/// NOTIFY_SOCKET.
pub struct FakeSystemd {
    pub sock: UnixDatagram,
    pub got: Vec<String>,
}

impl FakeSystemd {
    /// How long `wait` waits for a message.
    const WAIT: Duration = Duration::from_secs(30);

    pub fn at(path: &Path) -> FakeSystemd {
        let sock = UnixDatagram::bind(path).expect("bind fake systemd");
        FakeSystemd::on(sock)
    }

    pub fn abstract_name(name: &str) -> FakeSystemd {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        FakeSystemd::on(UnixDatagram::bind_addr(&addr).expect("bind abstract"))
    }

    fn on(sock: UnixDatagram) -> FakeSystemd {
        // A short timeout so `wait` re-checks its deadline.
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        FakeSystemd {
            sock,
            got: Vec::new(),
        }
    }

    /// Collects every datagram already queued.
    pub fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.got
                .push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }

    /// Waits for a datagram containing `needle` at or after index `from`;
    /// returns its index.
    pub fn wait(&mut self, needle: &str, from: usize) -> Option<usize> {
        self.wait_all(&[needle], from)
    }

    /// Waits for a datagram containing every needle at or after index
    /// `from`; returns its index.
    pub fn wait_all(&mut self, needles: &[&str], from: usize) -> Option<usize> {
        let deadline = Instant::now() + Self::WAIT;
        loop {
            self.pump();
            let found = self
                .got
                .iter()
                .skip(from)
                .position(|m| needles.iter().all(|n| m.contains(n)));
            if let Some(i) = found {
                return Some(from + i);
            }
            if Instant::now() > deadline {
                return None;
            }
        }
    }
}

/// A helper of a command worker that, on TERM (sent to the worker's whole
/// group), asks for 60 s more with `EXTEND_TIMEOUT_USEC` (to `NOTIFY_SOCKET`,
/// a path or an `@abstract` name) and takes 2 s to stop; it is ready for
/// that once it wrote `argv[1]`.
const SLOW_STOPPER: &str = "import os, signal, socket, sys, time
def stop(*_):
    addr = os.environ['NOTIFY_SOCKET']
    addr = '\\0' + addr[1:] if addr.startswith('@') else addr
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b'EXTEND_TIMEOUT_USEC=60000000', addr)
    time.sleep(2)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1] + '.tmp', 'w').close()
os.rename(sys.argv[1] + '.tmp', sys.argv[1])
while True:
    time.sleep(60)
";

/// `start` with `--graceful-timeout 1` and a command worker (a shell) whose
/// [`SLOW_STOPPER`] helper asks for more time on TERM and takes 2 s, past
/// the graceful timeout; the shell waits for it. Returns the file whose
/// existence says the helper is ready to be stopped.
pub fn slow_stopping_worker(start: Start) -> (Start, PathBuf) {
    let ready = start.dir().join("helper-ready");
    let script = format!(
        "trap 'wait; exit 0' TERM; {} -c \"$0\" {} & while :; do sleep 0.05; done",
        python3().display(),
        ready.display()
    );
    let start = start.args([
        "--graceful-timeout",
        "1",
        "--",
        "sh",
        "-c",
        &script,
        SLOW_STOPPER,
    ]);
    (start, ready)
}

/// Waits until the [`slow_stopping_worker`] is ready and its helper (whose
/// `ready` file says so) is ready to be stopped.
pub fn wait_slow_stopper(h: &Harness, ready: &Path, timeout: Duration) {
    h.expect_event("all-ready", timeout, "ready", |_| true);
    h.check(
        wait_for(timeout, || ready.exists().then_some(())).is_some(),
        "the helper is ready to be stopped",
    );
}

/// GET `path` with extra `headers` (each ending in CRLF) over `stream`, one
/// request then close; the response body parsed as JSON (what a test app
/// reports, e.g. its ASGI scope).
pub fn json_over(mut stream: impl Read + Write, path: &str, headers: &str) -> serde_json::Value {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// [`json_over`] a fresh TCP connection to `addr` (10 s read timeout).
pub fn json_of(addr: SocketAddr, path: &str, headers: &str) -> serde_json::Value {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    json_over(s, path, headers)
}
