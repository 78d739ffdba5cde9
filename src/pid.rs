//! The only pids the master signals: [`ChildPid`], which cannot hold a value
//! of 1 or less, and the checks a pid reported by the zygote must pass
//! before it becomes one.
//!
//! `kill(2)` gives small and negative pids a meaning of their own: 0 is the
//! caller's process group, -1 every process the caller may signal (for a
//! root master: the whole host), -N the group N, and 1 is init. A pid the
//! master forked itself is always > 1. A pid the zygote reports is not to
//! be trusted: the zygote runs the app's import-time code (as `--user`), so
//! it may report anything. Such a pid is accepted only if the process is
//! the master's child (so it cannot be reused by another process before
//! the master reaps it), belongs to the workers' user and was created after
//! the spawn request; the master treats a zygote that reports anything else
//! as broken, and signals nothing.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::procfs;

/// A pid the master may signal: always > 1 (never "my group", "everyone"
/// or init), and only made from a fork of the master or a verified report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChildPid(i32);

impl ChildPid {
    /// `None` for any value `kill(2)` would not read as one process.
    pub fn new(raw: i32) -> Option<ChildPid> {
        (raw > 1).then_some(ChildPid(raw))
    }

    pub fn as_raw(self) -> i32 {
        self.0
    }

    pub fn pid(self) -> Pid {
        Pid::from_raw(self.0)
    }

    /// Signals the process group led by this pid (a worker and the helpers
    /// it started); falls back to the pid if the group is already gone.
    pub fn signal_group(self, sig: Signal) {
        // Both arguments are > 1 by construction: killpg(N) is kill(-N) for
        // that one group, and kill(N) that one process.
        if killpg(self.pid(), sig).is_err() {
            let _ = kill(self.pid(), sig);
        }
    }
}

impl ChildPid {
    /// Whether the process group led by this pid still has a member, its
    /// leader reaped or not (a zombie not yet reaped counts: the number
    /// stays allocated, so it cannot name another group meanwhile).
    /// `kill(-pgid, 0)` fails with ESRCH once none is left; EPERM (only
    /// members the master may not signal) counts as empty, since nothing
    /// could be done about them.
    pub fn group_has_members(self) -> bool {
        killpg(self.pid(), None).is_ok()
    }

    /// Signals the process group only, never the pid alone: for a group
    /// whose leader was reaped (its pid may name another process by now).
    pub fn signal_group_only(self, sig: Signal) {
        let _ = killpg(self.pid(), sig);
    }
}

impl std::fmt::Display for ChildPid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a process reported by the zygote must be.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    /// Its parent: the master (the zygote's intermediate process exited,
    /// and the master is a child subreaper or PID 1).
    pub parent: i32,
    /// Its owner: real, effective, saved and filesystem uid (see
    /// [`workers_uids`]).
    pub uids: [u32; 4],
    /// Created no earlier than this, in [`procfs::boot_ticks_now`] units.
    pub not_before: u64,
}

/// Accepts a reported pid only if it is a process the master may signal
/// as a worker; the error names the value and what is wrong with it.
pub fn verify_reported(reported: i64, expected: &Expected) -> Result<ChildPid, String> {
    let pid = i32::try_from(reported)
        .ok()
        .and_then(ChildPid::new)
        .ok_or_else(|| format!("pid {reported} is not a single process"))?;
    let stat = procfs::stat(pid.0).ok_or_else(|| format!("pid {pid} does not exist"))?;
    if stat.ppid != expected.parent {
        return Err(format!(
            "pid {pid} is not the master's child (its parent is {})",
            stat.ppid
        ));
    }
    if stat.start_ticks < expected.not_before {
        return Err(format!(
            "pid {pid} was created before the spawn request (start time {} < {} ticks)",
            stat.start_ticks, expected.not_before
        ));
    }
    let uids = procfs::uids(pid.0).ok_or_else(|| format!("pid {pid} does not exist"))?;
    if uids != expected.uids {
        return Err(format!(
            "pid {pid} does not belong to the workers' user (uids {uids:?}, expected {:?})",
            expected.uids
        ));
    }
    Ok(pid)
}

/// The uids every worker has: `--user`'s in all four places, or without
/// it the master's own (a fork keeps them as they are).
pub fn workers_uids(user: Option<u32>) -> [u32; 4] {
    match user {
        Some(uid) => [uid; 4],
        None => {
            procfs::uids(std::process::id() as i32).unwrap_or([nix::unistd::getuid().as_raw(); 4])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_kill_reads_as_groups_or_everyone_are_not_pids() {
        for raw in [i32::MIN, -2, -1, 0, 1] {
            assert_eq!(ChildPid::new(raw), None, "{raw}");
        }
        assert_eq!(ChildPid::new(2).map(|p| p.pid().as_raw()), Some(2));
    }

    fn me_as_child() -> (std::process::Child, Expected) {
        let not_before = procfs::boot_ticks_now();
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let expected = Expected {
            parent: std::process::id() as i32,
            uids: workers_uids(None),
            not_before,
        };
        (child, expected)
    }

    #[test]
    fn a_fresh_child_of_ours_is_accepted() {
        let (mut child, expected) = me_as_child();
        let got = verify_reported(child.id() as i64, &expected);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(got.map(|p| p.pid().as_raw()), Ok(child.id() as i32));
    }

    #[test]
    fn anything_else_is_refused() {
        let (mut child, expected) = me_as_child();
        let pid = child.id() as i64;
        let cases = [
            (0, "not a single process"),
            (-1, "not a single process"),
            (1, "not a single process"),
            (i64::from(u32::MAX), "not a single process"),
            // init (or our pid-1 ancestor) is not our child.
            (
                i64::from(nix::unistd::getppid().as_raw()),
                "not the master's child",
            ),
        ];
        let mut results: Vec<(i64, Result<ChildPid, String>, &str)> = cases
            .iter()
            .map(|&(p, want)| (p, verify_reported(p, &expected), want))
            .collect();
        let older = Expected {
            not_before: u64::MAX,
            ..expected
        };
        results.push((pid, verify_reported(pid, &older), "created before"));
        let other_user = Expected {
            uids: workers_uids(Some(expected.uids[0] + 1)),
            ..expected
        };
        results.push((pid, verify_reported(pid, &other_user), "does not belong"));
        let _ = child.kill();
        let _ = child.wait();
        for (p, got, want) in results {
            match got {
                Err(e) => assert!(e.contains(want), "{p}: {e}"),
                Ok(_) => panic!("{p} was accepted"),
            }
        }
    }
}
