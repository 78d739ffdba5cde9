//! The CPU priority (nice value) of a worker's process group: read it,
//! lower it, set it back. The two system calls procman makes about
//! scheduling, kept at the edge; when to call them is the master's
//! (`master/boost.rs` for a booting worker, `master/reload.rs` for the
//! workers a reload replaces) and by how much is policy's.
//!
//! Why the process *group*: on Linux a nice value belongs to a thread, and
//! `setpriority(PRIO_PROCESS, pid)` changes only the thread whose id is
//! `pid`. A uvicorn worker has more threads (the thread pool that runs
//! synchronous endpoints) and may have children; `PRIO_PGRP` reaches every
//! thread of every process in the group, and each worker leads its own group
//! (`workers.rs`: its pid is its process group id).
//!
//! Why the *autogroup* too: each worker leads a session of its own, and
//! with `kernel.sched_autogroup_enabled` (the default of many kernels) the
//! scheduler first shares the CPU fairly among sessions' autogroups, by each
//! autogroup's own nice value, and only then among the threads of one
//! autogroup by theirs. A nice value set on a worker's threads alone then
//! changes nothing against the other workers (each its own autogroup), so
//! [`set_group`] sets the worker's autogroup too (`/proc/PID/autogroup`),
//! to the same value plus the worker's share: the offset that makes all
//! of procman's workers together weigh as one session
//! (`policy::autogroup_share`), as any other program's processes do, and
//! not one session each. Only for a process that leads its session: the
//! autogroup of any other is its session leader's, which may be procman's.
//! Where there are no autogroups (the file is missing, or the task is in a
//! cgroup of its own, as under systemd, where the autogroup is not used)
//! the write is harmless or skipped; one that is refused (the file is the
//! worker user's, and procman may lack `CAP_DAC_OVERRIDE`) is said at debug
//! level and does not fail the nice value already set; one the kernel's
//! rate limit refuses ([`Autogroup::Busy`]) is the caller's to try again.
//!
//! Lowering a priority needs no privilege for one's own processes;
//! raising it back needs `CAP_SYS_NICE` (or an `RLIMIT_NICE` that allows
//! it), which is why a caller must be ready for [`set_group`] to fail with
//! `EACCES`.

use std::io;

use nix::errno::Errno;
use nix::unistd::Pid;

/// The nice value of process group `pgid`: that of its highest-priority
/// thread, as `getpriority(2)` reports for a group.
pub fn of_group(pgid: Pid) -> io::Result<i32> {
    // getpriority may legitimately return -1: errno tells an error apart,
    // so it is cleared first.
    Errno::clear();
    // SAFETY: getpriority takes two integers and touches no memory of ours.
    let nice = unsafe { libc::getpriority(libc::PRIO_PGRP as _, pgid.as_raw() as libc::id_t) };
    if nice == -1 && Errno::last_raw() != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(nice)
}

/// procman's own nice value (that of the calling thread: the master has
/// one). What a worker is raised to and lowered to is computed from it,
/// never read from the worker's group, whose members the worker chooses.
pub fn own() -> io::Result<i32> {
    Errno::clear();
    // SAFETY: as in `of_group`; `who` 0 is the calling thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS as _, 0) };
    if nice == -1 && Errno::last_raw() != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(nice)
}

/// What became of a worker's autogroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autogroup {
    /// Set to the value asked.
    Set,
    /// Nothing to set: the kernel keeps no autogroups, the process leads
    /// no session, or it is gone.
    Absent,
    /// The kernel refused for now: without `CAP_SYS_ADMIN` it allows one
    /// autogroup change a tenth of a second, machine-wide (`EAGAIN`).
    Busy,
    /// Refused otherwise (said at debug level).
    Refused,
}

/// How long the kernel makes a caller without `CAP_SYS_ADMIN` wait between
/// two autogroup changes (a tenth of a second), with a margin.
pub const AUTOGROUP_RATE: std::time::Duration = std::time::Duration::from_millis(110);

/// Sets every thread of process group `pgid` to `nice`, and, when `pgid`
/// leads its session, that session's autogroup to `nice + offset` (see the
/// module's comment; `offset` is the worker's share,
/// `policy::autogroup_share`).
pub fn set_group(pgid: Pid, nice: i32, offset: i32) -> io::Result<Autogroup> {
    // SAFETY: setpriority takes three integers and touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PGRP as _, pgid.as_raw() as libc::id_t, nice) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(set_autogroup(pgid, nice.saturating_add(offset)))
}

/// Sets the autogroup of the session `leader` leads to `nice` (clamped to
/// -20..=19). Nothing to do when `leader` leads no session (its autogroup
/// is another session's: never touched) or the kernel keeps no autogroups.
/// Best effort: the file belongs to the worker's user, and procman may
/// hold CAP_SYS_NICE without CAP_DAC_OVERRIDE (the example systemd unit),
/// which makes it unwritable; there, in a cgroup of its own, the service
/// has no autogroup that counts anyway. A refusal is said at debug level.
pub fn set_autogroup(leader: Pid, nice: i32) -> Autogroup {
    // A session leader cannot leave its session: once this holds, the
    // file below names the leader's own autogroup for as long as it lives.
    if nix::unistd::getsid(Some(leader)) != Ok(leader) {
        return Autogroup::Absent;
    }
    let nice = nice.clamp(-20, 19);
    let path = format!("/proc/{}/autogroup", leader.as_raw());
    match std::fs::write(&path, nice.to_string()) {
        Ok(()) => Autogroup::Set,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Autogroup::Absent,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Autogroup::Busy,
        Err(e) => {
            tracing::debug!("cannot set the autogroup of worker {leader} to nice {nice}: {e}");
            Autogroup::Refused
        }
    }
}

/// The nice value of the autogroup of `pid`'s session, if the kernel keeps
/// autogroups (`/autogroup-N nice V`).
pub fn of_autogroup(pid: Pid) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{}/autogroup", pid.as_raw())).ok()?;
    text.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Field `n` after the command name of a /proc `stat` file (0: the state).
    fn stat_field(path: std::path::PathBuf, n: usize) -> Option<i32> {
        let text = std::fs::read_to_string(path).ok()?;
        let rest = &text[text.rfind(')')? + 1..];
        rest.split_whitespace().nth(n)?.parse().ok()
    }

    /// The pids of process group `pgid` (field 5 of /proc/PID/stat).
    fn group_members(pgid: i32) -> Vec<i32> {
        let proc = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        proc.filter(|e| stat_field(e.path().join("stat"), 2) == Some(pgid))
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// The nice value of every thread of every process in group `pgid`
    /// (field 19 of /proc/PID/task/TID/stat).
    fn thread_nices(pgid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for pid in group_members(pgid) {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
            for t in tasks.into_iter().flatten().flatten() {
                out.extend(stat_field(t.path().join("stat"), 16));
            }
        }
        out
    }

    #[test]
    fn every_thread_and_child_of_a_group_is_lowered_and_read_back() {
        // In its own process group, so that nothing else is touched: a
        // process with a second thread and a child. Python, because a
        // thread and a fork are one line each.
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut leader = Command::new("python3")
            .args([
                "-c",
                "import os, threading, time\n\
                 threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n\
                 pid = os.fork()\n\
                 pid or (time.sleep(30), os._exit(0))\n\
                 print('ready', flush=True)\n\
                 os.waitpid(pid, 0)",
            ])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let pgid = Pid::from_raw(leader.id() as i32);
        // It says so once it has its second thread and its child. Counting
        // threads in the group instead raced: `python3` may be a launcher
        // (pyenv's shim is a shell script) whose helper processes share the
        // group before the interpreter runs.
        let mut line = String::new();
        if let Some(out) = leader.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let before = of_group(pgid);
        let lowered = before.as_ref().map(|n| (n + 3).min(19)).unwrap_or(19);
        let set = set_group(pgid, lowered, 0);
        let after = of_group(pgid);
        let nices = thread_nices(pgid.as_raw());
        // The child first: its parent reaps it (no zombie left to init),
        // then exits; the leader is ours to reap.
        for pid in group_members(pgid.as_raw()) {
            if pid != pgid.as_raw() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
        let _ = leader.kill();
        let _ = leader.wait();
        assert_eq!(
            line.trim(),
            "ready",
            "python3 did not start its thread and child"
        );
        before.expect("read");
        set.expect("lower");
        assert_eq!(after.expect("read again"), lowered);
        // At least: 2 threads of the leader, 1 of its child (an interpreter
        // may start threads of its own).
        assert!(nices.len() >= 3, "threads in the group: {nices:?}");
        assert!(
            nices.iter().all(|n| *n == lowered),
            "all at {lowered}: {nices:?}"
        );
    }

    #[test]
    fn a_session_leaders_autogroup_gets_the_nice_value_too() {
        // A process leading a session of its own, as a worker does.
        let mut child = Command::new("setsid")
            .args(["--wait", "sleep", "30"])
            .spawn()
            .expect("setsid sleep");
        // setsid(1) forks when it is a group leader: find the sleeper, the
        // leader of a new session.
        let parent = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let leader = loop {
            let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                .unwrap_or_default();
            let found = kids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .chain(std::iter::once(parent))
                .map(Pid::from_raw)
                .find(|p| nix::unistd::getsid(Some(*p)) == Ok(*p));
            if let Some(p) = found {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "no session leader");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let before = of_autogroup(leader);
        let result = set_group(leader, 4, 3);
        let after = of_autogroup(leader);
        let own_after = of_autogroup(Pid::this());
        let _ = nix::sys::signal::kill(leader, nix::sys::signal::Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        result.expect("set_group");
        if before.is_none() {
            eprintln!("no autogroups on this kernel: nothing to check");
            return;
        }
        assert_eq!(
            after,
            Some(7),
            "the worker's autogroup follows its nice, plus its share"
        );
        assert_ne!(own_after, Some(7), "our own autogroup is left alone");
    }

    #[test]
    fn a_process_that_leads_no_session_leaves_its_sessions_autogroup_alone() {
        // In our session (the test's): its autogroup is not its own.
        // Its own group, so set_group has a group to reach.
        let mut child = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = Pid::from_raw(child.id() as i32);
        let ours = of_autogroup(Pid::this());
        let result = set_group(pid, 9, 0);
        let after = of_autogroup(Pid::this());
        let _ = child.kill();
        let _ = child.wait();
        result.expect("set_group");
        assert_eq!(
            after, ours,
            "the session's autogroup is not the child's to change"
        );
    }

    #[test]
    fn a_missing_group_is_an_error_not_a_value() {
        // Pid 0 as a group means "ours" to the kernel; a pid that cannot
        // exist (above pid_max's ceiling) names no group.
        let nobody = Pid::from_raw(i32::MAX);
        assert!(of_group(nobody).is_err());
        assert!(set_group(nobody, 10, 0).is_err());
    }
}
