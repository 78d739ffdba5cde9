//! The CPU priority (nice value) of a worker's process group: read it,
//! lower it, set it back. The two system calls procman makes about
//! scheduling, kept at the edge; when to call them is the master's
//! (`master/reload.rs`) and by how much is policy's.
//!
//! Why the process *group*: on Linux a nice value belongs to a thread, and
//! `setpriority(PRIO_PROCESS, pid)` changes only the thread whose id is
//! `pid`. A uvicorn worker has more threads (the thread pool that runs
//! synchronous endpoints) and may have children; `PRIO_PGRP` reaches every
//! thread of every process in the group, and each worker leads its own group
//! (`workers.rs`: its pid is its process group id).
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

/// Sets every thread of process group `pgid` to `nice`.
pub fn set_group(pgid: Pid, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes three integers and touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PGRP as _, pgid.as_raw() as libc::id_t, nice) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_group_is_lowered_and_read_back() {
        // A child in its own process group, so that nothing else is touched.
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pgid = Pid::from_raw(child.id() as i32);
        let before = of_group(pgid).expect("read");
        let lowered = (before + 3).min(19);
        set_group(pgid, lowered).expect("lower");
        let after = of_group(pgid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(after.expect("read again"), lowered);
    }

    #[test]
    fn a_missing_group_is_an_error_not_a_value() {
        // Pid 0 as a group means "ours" to the kernel; a pid that cannot
        // exist (above pid_max's ceiling) names no group.
        let nobody = Pid::from_raw(i32::MAX);
        assert!(of_group(nobody).is_err());
        assert!(set_group(nobody, 10).is_err());
    }
}
