//! procman under a real systemd as PID 1 (issue 26, item 6): one container
//! (systemd-nspawn, Debian bookworm's systemd 252, the root file system
//! scripts/systemd-root builds once into target/systemd-root, mounted with
//! a throw-away overlay), booted once for every check, in order:
//!
//! 1. a worker's EXTEND_TIMEOUT_USEC past `TimeoutStartSec=5` lets the
//!    start and a reload succeed, and `systemctl start` returns once every
//!    worker is ready (STATUS= says so at once);
//! 2. the journal holds procman's entries with their fields
//!    (`journalctl -u procman EVENT=ready`), and a uvicorn worker's own
//!    lines as entries of that worker;
//! 3. a socket-activated `systemctl restart` under a bounded client loop
//!    loses no request;
//! 4. `procman upgrade` through the control socket (issue 28, item 4),
//!    3 in a row under a client loop, loses no request; the unit's
//!    MainPID, invocation and workers stay the same and it ends
//!    active/running each time (RELOADING=1, then READY=1 from the new
//!    image); `journalctl EVENT=upgraded` has each; a refused pre-flight
//!    (`procman upgrade /bin/true`) exits 1 and changes none of that;
//! 5. `systemctl reload` to a broken app exits non-zero while the old
//!    workers keep answering, and `journalctl -p err` shows procman's
//!    error with its EVENT= field;
//! 6. `systemctl stop` leaves the unit's cgroup empty.
//!
//! The shipped unit and socket are installed as shipped, but with 2
//! workers (2 cores). A container that cannot boot fails the test in one
//! line. The container is powered off (killed past a deadline) and the
//! cgroup directories nspawn leaves on the host are removed, also when a
//! check fails. One test function, and a lock file: one container at a
//! time on a machine.

mod util;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// Generous: the machine is shared.
const LONG: Duration = Duration::from_secs(120);

fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Runs `cmd` with its output in files (no pipe to fill), killed past
/// `timeout`.
fn run_bounded(mut cmd: Command, dir: &Path, timeout: Duration) -> Output {
    let out_path = dir.join("cmd.out");
    let err_path = dir.join("cmd.err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("out file"))
        .stderr(File::create(&err_path).expect("err file"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Container {
    nspawn: Child,
    pid1: i32,
    dir: PathBuf,
}

/// The children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

impl Container {
    /// Boots the container; `Err` is one line saying why it did not.
    fn boot(root: &Path, dir: &Path) -> Result<Container, String> {
        let log = File::create(dir.join("nspawn.log")).map_err(|e| e.to_string())?;
        let nspawn = Command::new("systemd-nspawn")
            .args(["-b", "-D"])
            .arg(root)
            .args([
                "-M",
                "procman-test",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--volatile=overlay",
            ])
            .arg(format!("--bind-ro={PROCMAN}:/usr/local/bin/procman"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run systemd-nspawn: {e}"))?;
        let mut c = Container {
            nspawn,
            pid1: 0,
            dir: dir.to_path_buf(),
        };
        // The container's systemd: nspawn's child or grandchild.
        let found = wait_for(Duration::from_secs(60), || {
            let me = c.nspawn.id() as i32;
            children(me)
                .into_iter()
                .flat_map(|k| std::iter::once(k).chain(children(k)))
                .find(|&p| comm(p) == "systemd")
        });
        c.pid1 = found.ok_or_else(|| c.why_not("no systemd in the container after 60 s"))?;
        // Until its systemd answers (found early, it may not have set up
        // its bus yet), then until it finished booting.
        let mut last = String::new();
        let up = wait_for(LONG, || {
            let o = c.run(&["systemctl", "is-system-running", "--wait"], LONG);
            let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                return Some(());
            }
            last = text(&o).trim().to_string();
            std::thread::sleep(Duration::from_millis(500));
            None
        });
        if up.is_none() {
            return Err(c.why_not(&format!("systemctl is-system-running --wait: {last:?}")));
        }
        Ok(c)
    }

    fn why_not(&self, what: &str) -> String {
        let log = std::fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!(
            "the systemd container did not boot: {what}; nspawn said: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid1.to_string(), "-a"]).args(args);
        cmd
    }

    fn run(&self, args: &[&str], timeout: Duration) -> Output {
        run_bounded(self.command(args), &self.dir, timeout)
    }

    fn sh(&self, script: &str) -> Output {
        self.run(&["sh", "-c", script], LONG)
    }

    /// A path inside the container, from the host.
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.pid1))
    }

    fn write(&self, p: &str, content: &str) {
        std::fs::write(self.path(p), content).unwrap_or_else(|e| panic!("write {p}: {e}"));
    }

    fn show(&self, prop: &str) -> String {
        let o = self.run(
            &["systemctl", "show", "-p", prop, "--value", "procman"],
            LONG,
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `systemctl ARGS`: must succeed.
    fn systemctl(&self, args: &[&str]) {
        let mut all = vec!["systemctl"];
        all.extend(args);
        let o = self.run(&all, LONG);
        assert!(
            o.status.success(),
            "systemctl {}: {}\n{}",
            args.join(" "),
            text(&o),
            self.journal()
        );
    }

    fn journal(&self) -> String {
        text(&self.run(
            &["journalctl", "-u", "procman", "--no-pager", "-n", "60"],
            LONG,
        ))
    }

    fn curl(&self) -> Output {
        self.run(&["curl", "-sf", "-m", "30", "http://127.0.0.1:80/"], LONG)
    }

    /// The pids of procman's workers (`procman status --json`), sorted;
    /// each must be a child of `main_pid`.
    fn workers(&self, main_pid: &str) -> Vec<i32> {
        let o = self.run(
            &[
                "procman",
                "status",
                "--json",
                "--control-socket",
                "/run/procman/control.sock",
            ],
            LONG,
        );
        let status: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("procman status --json: {e}: {}", text(&o)));
        let mut pids: Vec<i32> = status["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["pid"].as_i64())
            .filter_map(|p| i32::try_from(p).ok())
            .collect();
        pids.sort_unstable();
        let ps = self.run(&["ps", "--ppid", main_pid, "-o", "pid="], LONG);
        let children: Vec<i32> = String::from_utf8_lossy(&ps.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert!(
            pids.iter().all(|p| children.contains(p)),
            "workers {pids:?} are not all children of {main_pid} ({children:?})"
        );
        pids
    }

    /// Waits until the unit is active/running (a reload announced by
    /// RELOADING=1 ended by READY=1); fails with the state it stayed in.
    /// The 60 s are less than the unit's TimeoutStartSec=90, past which
    /// systemd would end a reload that got no READY=1 by itself.
    fn settles_running(&self, when: &str) {
        let mut last = (String::new(), String::new());
        let done = wait_for(Duration::from_secs(60), || {
            last = (self.show("ActiveState"), self.show("SubState"));
            if last.0 == "active" && last.1 == "running" {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(100));
            None
        });
        assert!(
            done.is_some(),
            "{when}: the unit stayed {}/{}: {}",
            last.0,
            last.1,
            self.journal()
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.pid1 > 0 {
            let _ = self.run(&["systemctl", "poweroff"], Duration::from_secs(30));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                // Killing a PID namespace's init kills everything in it;
                // nspawn alone would leave the container running.
                if self.pid1 > 0 && comm(self.pid1) == "systemd" {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.pid1),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        remove_leftover_cgroups();
    }
}

/// nspawn leaves empty `payload` and `supervisor` cgroup directories in
/// this process's cgroup of each hierarchy: removed, deepest first (rmdir
/// only removes an empty cgroup).
fn remove_leftover_cgroups() {
    fn rmdir_tree(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c.trim_start_matches('/')),
            _ => continue,
        };
        let bases: Vec<PathBuf> = match controllers {
            "" => vec!["/sys/fs/cgroup/unified".into(), "/sys/fs/cgroup".into()],
            "name=systemd" => vec!["/sys/fs/cgroup/systemd".into()],
            _ => continue,
        };
        for base in bases {
            for name in ["payload", "supervisor"] {
                let dir = base.join(path).join(name);
                if dir.is_dir() {
                    rmdir_tree(&dir);
                }
            }
        }
    }
}

/// A command worker that asks for 4 s more every second for 8 s before
/// it is ready (uvicorn workers' apps do not see NOTIFY_SOCKET).
const EXTENDING: &str = "import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
addr = os.environ['NOTIFY_SOCKET']
addr = '\\0' + addr[1:] if addr.startswith('@') else addr
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for _ in range(8):
    s.sendto(b'EXTEND_TIMEOUT_USEC=4000000', addr)
    time.sleep(1)
s.sendto(b'READY=1', addr)
while True:
    time.sleep(60)
";

/// The shipped unit, with that worker and TimeoutStartSec=5.
const EXTEND_DROP_IN: &str = "[Service]
TimeoutStartSec=5
ExecStart=
ExecStart=/usr/local/bin/procman --workers 2 --ready notify --control-socket /run/procman/control.sock -- /usr/bin/python3 /srv/extending.py
";

/// Requests in a loop until `stop` exists (at most 120 s, 20000
/// requests); writes `{"ok": N, "fail": N, "errors": [...]}` to `out`.
const CLIENT: &str = "import json, os, sys, time, urllib.request
stop, out = sys.argv[1], sys.argv[2]
ok = fail = 0
errors = []
end = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < end and ok + fail < 20000:
    try:
        with urllib.request.urlopen('http://127.0.0.1:80/', timeout=30) as r:
            r.read()
        ok += 1
    except Exception as e:
        fail += 1
        errors.append(repr(e))
    with open(out + '.tmp', 'w') as f:
        json.dump({'ok': ok, 'fail': fail, 'errors': errors[:5]}, f)
    os.rename(out + '.tmp', out)
";

/// Runs `act` while CLIENT requests through procman, from 50 answers
/// before it to 200 after; returns the client's counts.
fn under_load(c: &Container, act: impl FnOnce()) -> serde_json::Value {
    c.write("/root/client.py", CLIENT);
    let _ = std::fs::remove_file(c.path("/root/stop"));
    let _ = std::fs::remove_file(c.path("/root/result.json"));
    let mut client = c
        .command(&[
            "python3",
            "/root/client.py",
            "/root/stop",
            "/root/result.json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    let counted = || -> Option<serde_json::Value> {
        let t = std::fs::read_to_string(c.path("/root/result.json")).ok()?;
        serde_json::from_str(&t).ok()
    };
    let ok_now = || counted().and_then(|v| v["ok"].as_u64()).unwrap_or(0);
    // Stops the client also when a check in `act` fails.
    struct Stop<'a>(&'a Container, &'a mut Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.path("/root/stop"), "");
            if wait_for(LONG, || self.1.try_wait().ok().flatten()).is_none() {
                let _ = self.1.kill();
                let _ = self.1.wait();
            }
        }
    }
    let stop = Stop(c, &mut client);
    wait_for(LONG, || (ok_now() >= 50).then_some(()))
        .unwrap_or_else(|| panic!("the client got no answers: {:?}", counted()));
    act();
    let after = ok_now();
    wait_for(LONG, || (ok_now() >= after + 200).then_some(()))
        .unwrap_or_else(|| panic!("no answers after it: {:?}", counted()));
    drop(stop);
    counted().expect("client result")
}

#[test]
fn procman_under_a_real_systemd() {
    let began = Instant::now();
    let root = repo_path("target/systemd-root");
    assert!(
        root.join(".complete").exists(),
        "the real-systemd suite cannot run: {} is missing (scripts/test builds it with scripts/systemd-root)",
        root.display()
    );
    // Two nspawns started this way would share the host's cgroup: one
    // container at a time on this machine, also across checkouts.
    let lock = File::create("/run/lock/procman-systemd-real.lock")
        .or_else(|_| File::create("/tmp/procman-systemd-real.lock"))
        .expect("lock file");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("cannot lock the container lock file: {e}"));
    let tmp = temp_dir("systemd-real");
    let c = Container::boot(&root, &tmp).unwrap_or_else(|why| panic!("{why}"));

    // The shipped units, with 2 workers.
    let unit = std::fs::read_to_string(repo_path("examples/systemd/procman.service"))
        .expect("unit")
        .replace("--workers 4", "--workers 2");
    c.write("/etc/systemd/system/procman.service", &unit);
    c.write(
        "/etc/systemd/system/procman.socket",
        &std::fs::read_to_string(repo_path("examples/systemd/procman.socket")).expect("socket"),
    );
    let drop_in = "/etc/systemd/system/procman.service.d/extend.conf";
    std::fs::create_dir_all(c.path("/etc/systemd/system/procman.service.d")).expect("mkdir");
    c.write(drop_in, EXTEND_DROP_IN);
    c.write("/srv/extending.py", EXTENDING);
    c.systemctl(&["daemon-reload"]);

    // 1a. Workers ready after 8 s, past TimeoutStartSec=5, asking for
    // more as they go: the start succeeds.
    c.systemctl(&["start", "procman.socket", "procman.service"]);
    assert_eq!(c.show("ActiveState"), "active");
    // The same for a reload (its job runs under TimeoutStartSec= too).
    c.systemctl(&["reload", "procman.service"]);
    assert_eq!(
        c.show("StatusText"),
        "2/2 workers ready, generation 2",
        "{}",
        c.journal()
    );
    c.systemctl(&["stop", "procman.service"]);
    std::fs::remove_file(c.path(drop_in)).expect("rm drop-in");
    c.systemctl(&["daemon-reload"]);

    // 1b. The shipped unit: start returns once every worker is ready.
    c.systemctl(&["start", "procman.service"]);
    assert_eq!(c.show("ActiveState"), "active");
    assert_eq!(
        c.show("StatusText"),
        "2/2 workers ready, generation 1",
        "{}",
        c.journal()
    );
    assert!(c.curl().status.success(), "{}", c.journal());
    // ExecReload='s way in: the control socket, root's alone.
    let sock = c.run(&["stat", "-c", "%a %U", "/run/procman/control.sock"], LONG);
    assert_eq!(text(&sock).trim(), "600 root");
    let app = std::fs::read_to_string(c.path("/srv/app/app.py")).expect("app.py");

    // 2. The journal has procman's events as fields.
    let ready = c.run(
        &["journalctl", "-u", "procman", "-o", "json", "EVENT=ready"],
        LONG,
    );
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&ready.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        entries.len() >= 2
            && entries.iter().all(|e| e["PRIORITY"] == "6"
                && e["GENERATION"]
                    .as_str()
                    .is_some_and(|g| g.parse::<u64>().is_ok())
                && e["SLOT"].is_string()
                && e["WORKER"].is_string()
                && e["SYSLOG_IDENTIFIER"] == "procman"
                && e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Worker "))),
        "journalctl EVENT=ready: {}",
        text(&ready)
    );

    // A uvicorn worker's own lines: entries of the worker (journald's
    // _PID is the sender), with its fields.
    let own = c.run(
        &[
            "journalctl",
            "-u",
            "procman",
            "-o",
            "json",
            "LOGGER=uvicorn.error",
        ],
        LONG,
    );
    let own: Vec<serde_json::Value> = String::from_utf8_lossy(&own.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        own.iter().any(|e| e["WORKER"].is_string()
            && e["_PID"] == e["WORKER"]
            && e["SLOT"].is_string()
            && e["PRIORITY"] == "6"
            && entries.iter().any(|r| r["WORKER"] == e["WORKER"])),
        "a worker's own lines, attributed to it: {own:?}"
    );

    // 3. A restart under a client loop: systemd holds the socket.
    let result = under_load(&c, || c.systemctl(&["restart", "procman.service"]));
    assert_eq!(
        result["fail"], 0,
        "requests lost across the restart: {result}"
    );
    println!("restart under load: {result}");

    // 4. In-place upgrades (issue 28, item 4), 3 in a row under a client
    // loop: systemd sees RELOADING=1 then READY=1 from the same MainPID,
    // the unit ends active/running (not reloading, not restarted), the
    // workers are the same processes, still procman's children.
    let step = Instant::now();
    let main_pid = c.show("MainPID");
    let invocation = c.show("InvocationID");
    let workers = c.workers(&main_pid);
    assert_eq!(workers.len(), 2, "workers before the upgrades: {workers:?}");
    let upgrade = [
        "procman",
        "upgrade",
        "--control-socket",
        "/run/procman/control.sock",
    ];
    let result = under_load(&c, || {
        for i in 1..=3 {
            let o = c.run(&upgrade, LONG);
            assert!(
                o.status.success(),
                "procman upgrade #{i}: {}\n{}",
                text(&o),
                c.journal()
            );
            assert!(
                text(&o).contains(&format!("pid {main_pid}, 2 workers kept")),
                "procman upgrade #{i}: {}",
                text(&o)
            );
            c.settles_running(&format!("after upgrade #{i}"));
        }
    });
    assert_eq!(
        result["fail"], 0,
        "requests lost across 3 upgrades: {result}"
    );
    println!("3 upgrades under load: {result}");
    assert_eq!(c.show("MainPID"), main_pid, "MainPID changed");
    assert_eq!(c.show("InvocationID"), invocation, "the unit was restarted");
    assert_eq!(c.workers(&main_pid), workers, "workers after the upgrades");
    let upgraded = c.run(
        &[
            "journalctl",
            "-u",
            "procman",
            "-o",
            "json",
            "EVENT=upgraded",
        ],
        LONG,
    );
    let upgraded: Vec<serde_json::Value> = String::from_utf8_lossy(&upgraded.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        upgraded.len() == 3
            && upgraded.iter().all(|e| e["_PID"] == main_pid.as_str()
                && e["PRIORITY"] == "6"
                && e["WORKERS"] == "2"
                && e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Upgraded in place: "))),
        "journalctl EVENT=upgraded: {upgraded:?}"
    );
    // A refused pre-flight (`/bin/true` gives no answer) changes nothing.
    let refused = c.run(
        &[
            "procman",
            "upgrade",
            "/bin/true",
            "--control-socket",
            "/run/procman/control.sock",
        ],
        LONG,
    );
    assert_eq!(
        refused.status.code(),
        Some(1),
        "procman upgrade /bin/true: {}",
        text(&refused)
    );
    assert!(
        text(&refused).contains("procman: error: upgrade failed: "),
        "procman upgrade /bin/true: {}",
        text(&refused)
    );
    c.settles_running("after a refused upgrade");
    assert_eq!(
        c.show("MainPID"),
        main_pid,
        "MainPID after a refused upgrade"
    );
    assert_eq!(c.show("InvocationID"), invocation);
    assert_eq!(
        c.workers(&main_pid),
        workers,
        "workers after a refused upgrade"
    );
    let warned = c.run(
        &[
            "journalctl",
            "-u",
            "procman",
            "-o",
            "json",
            "EVENT=upgrade-failed",
        ],
        LONG,
    );
    assert!(
        String::from_utf8_lossy(&warned.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["PRIORITY"] == "4"
                && e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Upgrade refused: "))),
        "journalctl EVENT=upgrade-failed: {}",
        text(&warned)
    );
    println!("upgrade step: {:.1} s", step.elapsed().as_secs_f64());

    // 5. A reload to a broken app fails; the old workers keep answering.
    c.write("/srv/app/app.py", "raise RuntimeError('broken deploy')\n");
    let reload = c.run(&["systemctl", "reload", "procman"], LONG);
    assert!(
        !reload.status.success(),
        "systemctl reload to a broken app succeeded: {}",
        c.journal()
    );
    assert!(
        c.curl().status.success(),
        "old workers answer: {}",
        c.journal()
    );
    assert_eq!(c.show("ActiveState"), "active");
    let status = c.show("StatusText");
    assert!(
        status.starts_with("reload to generation 2 failed:") && status.contains("broken deploy"),
        "{status}"
    );
    let errors = c.run(
        &["journalctl", "-u", "procman", "-p", "err", "-o", "json"],
        LONG,
    );
    let errors: Vec<serde_json::Value> = String::from_utf8_lossy(&errors.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e["EVENT"] == "reload-failed" && e["PRIORITY"] == "3"),
        "journalctl -p err: {errors:?}"
    );
    assert!(
        errors.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("failed to boot:\nTraceback")
                && m.ends_with("RuntimeError: broken deploy"))),
        "the traceback is one entry: {errors:?}"
    );
    assert!(
        errors.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.starts_with("procman: error: reload failed: "))),
        "systemctl reload's reason, from procman reload: {errors:?}"
    );
    c.write("/srv/app/app.py", &app);

    // 6. A stop leaves nothing behind.
    let cgroup = c.show("ControlGroup");
    c.systemctl(&["stop", "procman.service"]);
    assert_eq!(c.show("ActiveState"), "inactive");
    let left = c.sh(&format!(
        "for f in /sys/fs/cgroup{cgroup}/cgroup.procs /sys/fs/cgroup/*{cgroup}/cgroup.procs; do \
         [ -e \"$f\" ] && cat \"$f\"; done; ps -eo user=,comm= | grep -E '^www-data|procman' || true"
    ));
    assert!(
        text(&left).trim().is_empty(),
        "left after the stop: {}",
        text(&left)
    );
    drop(c);
    println!("real-systemd suite: {:.0} s", began.elapsed().as_secs_f64());
}
