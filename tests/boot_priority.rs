//! A booting worker runs at a raised CPU priority until it is ready: a
//! crashed worker's replacement (or a reload's new generation) imports its
//! app ahead of the busy serving workers, then serves at procman's priority
//! like every other worker. Raising a priority needs CAP_SYS_NICE; without
//! it workers boot at procman's priority and nothing else changes.
//!
//! A worker's nice value is read from /proc/PID/stat while it is held in
//! its boot (it waits for a file before it reports READY=1), and again
//! once it is ready.

mod util;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// A command worker that stays booting until `go` exists, then serves and
/// sends READY=1 (`--ready notify`).
fn held_until(go: &Path) -> Vec<String> {
    let mut worker = notify_worker();
    let program = worker.remove(0);
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "while [ ! -e '{}' ]; do sleep 0.05; done; exec '{program}' '{}'",
            go.display(),
            worker.join("' '")
        ),
    ]
}

/// procman with one held command worker, JSON logs.
fn held_start(name: &str, extra: &[&str]) -> (Start, std::path::PathBuf) {
    let start = Start::new(name, &["-w", "1", "--ready", "notify"])
        .args(extra.iter().copied())
        .json();
    let go = start.dir().join("go");
    let start = start.args(["--"]).args(held_until(&go));
    (start, go)
}

/// The pid of the next worker that logs `booting` after the first `skip`.
fn next_booting(h: &Harness, skip: usize) -> i32 {
    let e = h.expect_events("booting", skip + 1, BOOT, "a worker booting", |_| true);
    worker_of(&e[skip])
}

/// Waits until `pid` logged `ready`.
fn wait_ready(h: &Harness, pid: i32) {
    h.expect_event("ready", BOOT, &format!("worker {pid} ready"), |e| {
        worker_of(e) == pid
    });
}

/// Worker `pid`, held in its boot, is at nice `booting`; once `go` exists
/// and it is ready, at nice `serving`.
fn boots_then_serves(h: &Harness, pid: i32, go: &Path, booting: i32, serving: i32, who: &str) {
    h.check(
        nice_of(pid) == Some(booting),
        &format!("{who} {pid} boots at nice {booting}: {:?}", nice_of(pid)),
    );
    // With autogroups (one per session, so one per worker), the CPU is
    // shared by the autogroups' nice values first: the boost must reach
    // the worker's autogroup, or it changes nothing against the others.
    h.check(
        autogroup_nice_of(pid).is_none_or(|n| n == booting),
        &format!(
            "{who} {pid}'s autogroup boots at nice {booting}: {:?}",
            autogroup_nice_of(pid)
        ),
    );
    std::fs::write(go, "").expect("go");
    wait_ready(h, pid);
    h.check(
        nice_of(pid) == Some(serving),
        &format!(
            "ready, {who} {pid} serves at nice {serving}: {:?}",
            nice_of(pid)
        ),
    );
    h.check(
        autogroup_nice_of(pid).is_none_or(|n| n == serving),
        &format!(
            "ready, {who} {pid}'s autogroup serves at nice {serving}: {:?}",
            autogroup_nice_of(pid)
        ),
    );
}

/// The first worker boots at nice `booting` and serves at `serving`; then,
/// killed with SIGKILL, its replacement (held in its boot again) does the
/// same.
fn first_and_replacement(h: &Harness, go: &Path, booting: i32, serving: i32) {
    let first = next_booting(h, 0);
    boots_then_serves(h, first, go, booting, serving, "the first worker");
    std::fs::remove_file(go).expect("hold the next boot");
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill -9");
    let second = next_booting(h, 1);
    boots_then_serves(h, second, go, booting, serving, "its replacement");
}

#[test]
fn a_booting_worker_runs_at_a_raised_priority_until_it_is_ready() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE; the test below covers the unprivileged case");
        return;
    }
    let (start, go) = held_start("boot-nice", &[]);
    let h = start.spawn();
    let base = nice_of(h.pid).expect("procman's nice value");
    // The replacement after a crash boots raised too, while nothing else
    // serves; and is back at procman's priority once ready.
    first_and_replacement(&h, &go, booting_nice(base), base);
}

#[test]
fn a_worker_forked_from_the_zygote_boots_at_a_raised_priority_until_it_is_ready() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE");
        return;
    }
    // The app's import waits for `go`: the worker is forked (the zygote has
    // imported uvicorn) and is still booting.
    let dir = temp_dir("boot-nice-zygote");
    let go = dir.join("go");
    std::fs::write(
        dir.join("held.py"),
        format!(
            "import os, time\n\
             while not os.path.exists({go:?}):\n    time.sleep(0.05)\n\
             async def app(scope, receive, send):\n    pass\n",
            go = go.display().to_string()
        ),
    )
    .expect("app");
    let h = uvicorn("boot-nice-zygote", &dir, "held:app", &["-w", "1"])
        .json()
        .spawn();
    let base = nice_of(h.pid).expect("procman's nice value");
    let boost = booting_nice(base);
    let booting = h.expect_event("booting", BOOT, "a forked worker booting", |e| {
        e["zygote"].is_i64()
    });
    let pid = worker_of(&booting);
    let zygote = booting["zygote"].as_i64().unwrap_or(0) as i32;
    h.check(
        nice_of(zygote) == Some(base),
        &format!("its zygote stays at nice {base}: {:?}", nice_of(zygote)),
    );
    boots_then_serves(&h, pid, &go, boost, base, "the forked worker");
}

#[test]
fn without_cap_sys_nice_workers_boot_at_procmans_priority() {
    // CAP_SYS_NICE dropped from the bounding set before procman starts, so
    // root's exec does not get it: the first attempt is refused.
    let (start, go) = held_start("boot-nice-unprivileged", &["--log-level", "debug"]);
    let h = start.spawn_with("setpriv", &["--bounding-set=-sys_nice", "--", PROCMAN]);
    let base = nice_of(h.pid).expect("procman's nice value");
    first_and_replacement(&h, &go, base, base);
    // Said once, at debug level, and not tried again for the replacement.
    let refused: Vec<String> = h
        .messages()
        .into_iter()
        .filter(|m| m.contains("needs CAP_SYS_NICE"))
        .collect();
    h.check(
        refused.len() == 1,
        &format!("the refusal said once for two boots: {refused:?}"),
    );
}

#[test]
fn a_reload_lowers_a_worker_still_booting_from_procmans_priority_not_its_raised_one() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE");
        return;
    }
    let (start, go) = held_start("boot-nice-reload", &[]);
    let h = start.spawn();
    let base = nice_of(h.pid).expect("procman's nice value");
    let lowered = (base + 10).min(19);
    let first = next_booting(&h, 0);
    h.check(
        nice_of(first) == Some(booting_nice(base)),
        &format!("it boots raised: {:?}", nice_of(first)),
    );
    // A reload while it still boots: it is outgoing now, lowered by the
    // reload's step from where it was before its boost (the reload then
    // stops it at once: a worker not ready yet is no capacity to keep).
    h.signal(Signal::SIGHUP);
    h.expect_event(
        "priority-lowered",
        BOOT,
        "the booting worker lowered",
        |e| e["workers"] == 1 && e["from"] == base && e["to"] == lowered,
    );
    std::fs::write(&go, "").expect("go");
    h.expect_event("reload-done", BOOT, "reload done", |e| e["generation"] == 2);
    let replacement = next_booting(&h, 1);
    h.check(
        nice_of(replacement) == Some(base),
        &format!(
            "its replacement serves at nice {base}: {:?}",
            nice_of(replacement)
        ),
    );
}

/// A command worker held in its boot until `go` exists (as [`held_until`]),
/// that first runs `before` (shell) each time it starts.
fn held_after(go: &Path, before: &str) -> Vec<String> {
    let mut worker = notify_worker();
    let program = worker.remove(0);
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{before}\nwhile [ ! -e '{}' ]; do sleep 0.05; done; exec '{program}' '{}'",
            go.display(),
            worker.join("' '")
        ),
    ]
}

/// A helper the first worker leaves behind (in a process group of its own,
/// so that it outlives its worker's group): whenever the file `join` names
/// a pid it has not tried yet, it tries to join that process group (as the
/// issue's helper did with each new worker's group, to be read as the
/// group's priority) and writes `joined-PID`: "joined", or the error.
const JOINING_HELPER: &str = "import os, time
os.setpgid(0, 0)
tried = set()
end = time.monotonic() + 120
while time.monotonic() < end:
    try:
        target = int(open('join').read())
    except (OSError, ValueError):
        target = 0
    if target and target not in tried:
        tried.add(target)
        try:
            os.setpgid(0, target)
            result = 'joined'
        except OSError as e:
            result = e.strerror
        with open(f'joined-{target}.tmp', 'w') as f:
            f.write(result)
        os.rename(f'joined-{target}.tmp', f'joined-{target}')
    time.sleep(0.02)
";

#[test]
fn a_helper_of_an_earlier_worker_cannot_join_a_booting_workers_group() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE");
        return;
    }
    let start = Start::new("boot-nice-farm", &["-w", "1", "--ready", "notify"]).json();
    let dir = start.dir().to_path_buf();
    let go = dir.join("go");
    std::fs::write(dir.join("helper.py"), JOINING_HELPER).expect("helper");
    let before = format!(
        "[ -e started ] || {{ touch started; '{}' helper.py & }}",
        python3().display()
    );
    let h = start.args(["--"]).args(held_after(&go, &before)).spawn();
    let base = nice_of(h.pid).expect("procman's nice value");
    let first = next_booting(&h, 0);
    boots_then_serves(&h, first, &go, booting_nice(base), base, "the first worker");
    std::fs::remove_file(&go).expect("hold the next boot");
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill -9");
    let second = next_booting(&h, 1);
    // The helper (forked by the first worker, so in its session) tries to
    // join the second worker's group while it boots.
    std::fs::write(dir.join("join"), second.to_string()).expect("join");
    let answer = dir.join(format!("joined-{second}"));
    let result = wait_for(BOOT, || std::fs::read_to_string(&answer).ok());
    h.check(
        result.as_deref().is_some_and(|r| r != "joined"),
        &format!("a process outside worker {second}'s session could join its group: {result:?}"),
    );
    boots_then_serves(&h, second, &go, booting_nice(base), base, "its replacement");
}

#[test]
fn every_worker_leads_a_session_of_its_own() {
    let (start, go) = held_start("own-session", &[]);
    let h = start.spawn();
    let pid = next_booting(&h, 0);
    let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).map(|s| s.as_raw());
    std::fs::write(&go, "").expect("go");
    wait_ready(&h, pid);
    let procman = nix::unistd::getsid(Some(Pid::from_raw(h.pid))).map(|s| s.as_raw());
    h.check(
        sid == Ok(pid),
        &format!("worker {pid} leads its session: getsid = {sid:?} (procman's: {procman:?})"),
    );
    // Its group is still its pid: the master signals the group.
    let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).map(|s| s.as_raw());
    h.check(pgid == Ok(pid), &format!("its group: {pgid:?}"));
}

#[test]
fn a_worker_forked_from_the_zygote_leads_a_session_of_its_own() {
    let dir = temp_dir("own-session-zygote");
    std::fs::write(
        dir.join("plain.py"),
        "async def app(scope, receive, send):\n    pass\n",
    )
    .expect("app");
    let h = uvicorn("own-session-zygote", &dir, "plain:app", &["-w", "1"])
        .json()
        .spawn();
    let booting = h.expect_event("booting", BOOT, "a forked worker booting", |e| {
        e["zygote"].is_i64()
    });
    let pid = worker_of(&booting);
    wait_ready(&h, pid);
    let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).map(|s| s.as_raw());
    let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).map(|s| s.as_raw());
    h.check(
        sid == Ok(pid) && pgid == Ok(pid),
        &format!("forked worker {pid}: session {sid:?}, group {pgid:?}"),
    );
}

/// A worker held in its boot that asks for more time every half second
/// (EXTEND_TIMEOUT_USEC=5 s) until `go` exists.
fn extending_until(go: &Path) -> Vec<String> {
    let mut worker = notify_worker();
    let program = worker.remove(0);
    let script = format!(
        "import os, socket, time\n\
         addr = os.environ['NOTIFY_SOCKET']\n\
         addr = '\\0' + addr[1:] if addr.startswith('@') else addr\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         while not os.path.exists({go:?}):\n    \
             s.sendto(b'EXTEND_TIMEOUT_USEC=5000000', addr)\n    \
             time.sleep(0.5)\n\
         os.execv({program:?}, [{program:?}, {script:?}])\n",
        go = go.display().to_string(),
        script = worker.join(" "),
    );
    vec![python3().display().to_string(), "-c".into(), script]
}

#[test]
fn extending_the_startup_deadline_does_not_extend_the_boost() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE");
        return;
    }
    let start = Start::new(
        "boot-nice-extend",
        &["-w", "1", "--ready", "notify", "--startup-timeout", "3"],
    )
    .json();
    let go = start.dir().join("go");
    let h = start.args(["--"]).args(extending_until(&go)).spawn();
    let base = nice_of(h.pid).expect("procman's nice value");
    let pid = next_booting(&h, 0);
    h.check(
        nice_of(pid) == Some(booting_nice(base)),
        &format!("it boots raised: {:?}", nice_of(pid)),
    );
    // Past its startup deadline (3 s; it keeps extending it), it still
    // boots, but at procman's priority.
    let lowered = wait_for(Duration::from_secs(20), || {
        (nice_of(pid) == Some(base)).then_some(())
    });
    h.check(
        lowered.is_some(),
        &format!(
            "20 s after its boot began (startup deadline 3 s, extended), worker {pid} is at nice {:?}, procman at {base}",
            nice_of(pid)
        ),
    );
    h.check(
        alive(pid) && !h.has_event("ready", |_| true),
        "it was still booting (its extensions kept it)",
    );
    std::fs::write(&go, "").expect("go");
    wait_ready(&h, pid);
    h.check(
        nice_of(pid) == Some(base),
        &format!("ready at nice {base}: {:?}", nice_of(pid)),
    );
}

#[test]
fn no_boot_boost_keeps_booting_workers_at_procmans_priority() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE (without it nothing is raised anyway)");
        return;
    }
    // The flag, and the config file's key.
    for how in ["flag", "file"] {
        let (start, go) = match how {
            "flag" => held_start("no-boot-boost", &["--no-boot-boost"]),
            _ => {
                let (start, go) = held_start("no-boot-boost-file", &["-c", "procman.toml"]);
                std::fs::write(start.dir().join("procman.toml"), "no-boot-boost = true\n")
                    .expect("config");
                (start, go)
            }
        };
        let h = start.spawn();
        let base = nice_of(h.pid).expect("procman's nice value");
        first_and_replacement(&h, &go, base, base);
    }
}

#[test]
fn a_booting_worker_asked_to_stop_is_no_longer_raised() {
    if !may_raise_priority() {
        eprintln!("skipped: needs CAP_SYS_NICE");
        return;
    }
    // It ignores TERM, so it is still there, stopping, during the grace.
    let start = Start::new(
        "boot-nice-stop",
        &["-w", "1", "--ready", "notify", "--graceful-timeout", "60"],
    )
    .json();
    let go = start.dir().join("go");
    let h = start
        .args(["--"])
        .args(held_after(&go, "trap '' TERM"))
        .spawn();
    let base = nice_of(h.pid).expect("procman's nice value");
    let pid = next_booting(&h, 0);
    h.check(
        nice_of(pid) == Some(booting_nice(base)),
        &format!("it boots raised: {:?}", nice_of(pid)),
    );
    h.signal(Signal::SIGTERM);
    let lowered = wait_for(BOOT, || (nice_of(pid) == Some(base)).then_some(()));
    h.check(
        lowered.is_some() && alive(pid),
        &format!(
            "asked to stop, worker {pid} (alive: {}) is at nice {:?}, procman at {base}",
            alive(pid),
            nice_of(pid)
        ),
    );
}
