//! Security of a root master: every process it starts as `--user` dies
//! with it (the parent-death signal survives the privilege drop), it never
//! signals a pid the zygote reports unless it can vouch for it, and
//! `--check-config` imports the app as `--user`.

mod util;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(60);
/// How soon after the master's death everything it started must be gone.
const WITHIN: Duration = Duration::from_secs(1);

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
}

/// A 0755 temp dir, so that `nobody` can reach what is in it.
fn open_dir(name: &str) -> TempDir {
    let dir = temp_dir(name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A copy of the hello example that `nobody` can execute.
fn hello_for_nobody(dir: &Path) -> String {
    let exe = dir.join("hello");
    std::fs::copy(hello(), &exe).expect("copy hello");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    exe.display().to_string()
}

fn uids(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|u| u.split_whitespace().collect::<Vec<_>>())
        })
        .unwrap_or_default()
        .join(" ")
}

/// Processes re-parented to this test (a child subreaper) when the master
/// died. Whatever is still ours when dropped is killed and reaped, so a
/// failing test leaves nothing behind; a pid that is no longer our child
/// is never signalled (it may have been reused).
struct Orphans(Vec<i32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        for &pid in &self.0 {
            if stat(pid).is_some_and(|s| s.ppid == me) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(pid), None);
            }
        }
    }
}

impl Orphans {
    /// Reaps those that end within `timeout`; returns the survivors.
    fn survivors_after(&self, timeout: Duration) -> Vec<i32> {
        let mut left: Vec<i32> = self.0.clone();
        wait_for(timeout, || {
            left.retain(|&pid| {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => true,
                    Ok(_) => false,
                    // Not our child (any more): gone unless still alive.
                    Err(_) => alive(pid),
                }
            });
            left.is_empty().then_some(())
        });
        left
    }
}

/// SIGKILLs the master and checks that each of `pids` and the port are
/// free within [`WITHIN`].
fn kill_master_and_expect_gone(h: &mut Harness, pids: Vec<i32>, port: Option<u16>) {
    let orphans = Orphans(pids.clone());
    h.signal(Signal::SIGKILL);
    let died = h.wait_exit(BOOT).is_some();
    h.check(died, "the master died");
    let survivors = orphans.survivors_after(WITHIN);
    let described: Vec<String> = survivors
        .iter()
        .map(|p| format!("{p} (uid {})", uids(*p)))
        .collect();
    h.check(
        survivors.is_empty(),
        &format!(
            "{} of {:?} outlived the SIGKILLed master by {WITHIN:?}: {described:?}",
            survivors.len(),
            pids
        ),
    );
    if let Some(port) = port {
        let free = wait_for(WITHIN, || TcpListener::bind(("127.0.0.1", port)).ok());
        h.check(free.is_some(), &format!("port {port} is bindable again"));
    }
}

#[test]
fn a_killed_master_takes_its_nobody_workers_with_it() {
    need_root();
    let dir = open_dir("pdeath-cmd");
    let exe = hello_for_nobody(&dir);
    let mut h = Start::new("pdeath-cmd", &["-u", "nobody", "-w", "2", "--", &exe]).spawn();
    let workers: Vec<i32> = h.wait_workers(2, BOOT).into_iter().collect();
    for &w in &workers {
        h.check(
            uids(w) == "65534 65534 65534 65534",
            "workers run as nobody",
        );
    }
    let port = h.port();
    kill_master_and_expect_gone(&mut h, workers, Some(port));
}

#[test]
fn a_killed_master_takes_its_nobody_pre_start_command_with_it() {
    need_root();
    let dir = open_dir("pdeath-pre");
    let exe = hello_for_nobody(&dir);
    let mut h = Start::new(
        "pdeath-pre",
        &["-u", "nobody", "--pre-start", "exec sleep 300", "--", &exe],
    )
    .spawn();
    let sleep = wait_for(BOOT, || {
        h.descendants().into_iter().find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
    });
    let Some(sleep) = sleep else {
        h.check(false, "the pre-start command runs");
        return;
    };
    h.check(
        uids(sleep) == "65534 65534 65534 65534",
        "the pre-start command runs as nobody",
    );
    kill_master_and_expect_gone(&mut h, vec![sleep], None);
}

#[test]
fn a_killed_master_takes_its_nobody_zygote_and_forked_workers_with_it() {
    need_root();
    let python = system_venv_python();
    let dir = open_dir("pdeath-pre");
    let app = dir.join("app.py");
    std::fs::copy(repo().join("examples/fastapi/app.py"), &app).expect("copy app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut h = Start::new(
        "pdeath-zygote",
        &[
            "app:main",
            "--preload",
            "--no-access-log",
            "-u",
            "nobody",
            "-w",
            "2",
            "--python",
            python.to_str().expect("utf8"),
            "--chdir",
            dir.to_str().expect("utf8"),
        ],
    )
    .spawn();
    h.wait_workers(2, BOOT);
    // The workers and the zygote: every child of the master.
    let children = h.children();
    h.check(children.len() == 3, "two workers and a zygote");
    for &c in &children {
        h.check(
            uids(c) == "65534 65534 65534 65534",
            &format!("{c} runs as nobody"),
        );
    }
    let port = h.port();
    kill_master_and_expect_gone(&mut h, children, Some(port));
}

#[test]
fn check_config_imports_the_app_as_the_user() {
    need_root();
    let python = system_venv_python();
    let dir = open_dir("check-user");
    let app = dir.join("whoami_app.py");
    std::fs::write(
        &app,
        "import os, sys\n\
         print(f'imported with uids {os.getresuid()}', file=sys.stderr)\n\
         async def app(scope, receive, send):\n    pass\n",
    )
    .expect("write app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(PROCMAN)
        .args([
            "--check-config",
            "-u",
            "nobody",
            "--python",
            python.to_str().expect("utf8"),
            "--chdir",
            dir.to_str().expect("utf8"),
            "whoami_app:app",
        ])
        .env_remove("PORT")
        .env_remove("WEB_CONCURRENCY")
        .stdin(Stdio::null())
        .output()
        .expect("run procman");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("imported with uids (65534, 65534, 65534)"),
        "the app was imported as root, not as nobody: {err}"
    );
}

/// A `sleep` that belongs to the test (root), not to procman; killed and
/// reaped when dropped.
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(
            Command::new("sleep")
                .arg("300")
                .stdin(Stdio::null())
                .spawn()
                .expect("start sleep"),
        )
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// procman --preload with the lying app, whose zygote reports `lie` as
/// every worker's pid. Started in its own session (setsid), so that on a
/// master that signals pid 0 only the master's own group is hit.
fn lying_zygote(name: &str, lie: &str) -> Harness {
    let python = venv_python();
    Start::new(
        name,
        &[
            "lying_zygote:app",
            "--preload",
            "-w",
            "1",
            "--startup-timeout",
            "2",
            "--python",
            python.to_str().expect("utf8"),
            "--chdir",
            repo().join("tests/apps").to_str().expect("utf8"),
        ],
    )
    .env("LYING_ZYGOTE_PID", lie)
    .json()
    .spawn_with("setsid", &[PROCMAN])
}

/// Why each spawn failed, as the operator reads it.
const REJECTED: &str = "reported a worker it did not fork";

/// Whether the master gave up on the zygote: workers start cold.
fn gave_up(h: &Harness) -> bool {
    h.has_event("zygote-cold", |e| e["reason"] == "failures")
}

/// The lying zygote is restarted with backoff and given up on after three
/// tries: exactly three zygotes, three lies noticed, no worker from them.
fn check_backed_off(h: &Harness) {
    let failed = h.events_named("zygote-spawn-failed");
    h.check(
        failed.len() == 3
            && failed
                .iter()
                .all(|e| e["message"].as_str().is_some_and(|m| m.contains(REJECTED))),
        "three lies noticed",
    );
    h.check(zygote_pids(h).len() == 3, "three zygotes started");
    h.check(
        !h.has_event("booting", |e| e["zygote"].is_i64()),
        "no reported pid became a worker",
    );
    h.check(alive(h.pid), "the master lives on");
}

#[test]
fn a_zygote_naming_an_unrelated_process_gets_it_no_signal() {
    let bystander = Bystander::start();
    let victim = bystander.pid();
    let h = lying_zygote("lie-other", &victim.to_string());
    // The bystander must be alive all along, until the master gives up on
    // the zygote (third failure, after a backoff).
    let done = wait_for(BOOT, || (!alive(victim) || gave_up(&h)).then_some(()));
    h.check(
        alive(victim),
        &format!("the unrelated process {victim} was signalled"),
    );
    h.check(done.is_some(), "the master gave up on the lying zygote");
    check_backed_off(&h);
}

#[test]
fn a_zygote_naming_pid_0_does_not_make_the_master_signal_its_own_group() {
    let h = lying_zygote("lie-zero", "0");
    let done = wait_for(BOOT, || (!alive(h.pid) || gave_up(&h)).then_some(()));
    h.check(alive(h.pid), "the master lives on");
    h.check(done.is_some(), "the master gave up on the lying zygote");
    check_backed_off(&h);
}
