//! How the master reads and says what happened to a child: exit statuses
//! as sentences, and who sent a SIGKILL; and the one way it signals a
//! child's process group.

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::error;

use crate::pid::ChildPid;
use crate::workers::{Stop, StopReason};

/// Signals a worker's whole process group (its helpers included); falls
/// back to the pid if the group is already gone. Every signal the master
/// sends to a child goes through [`ChildPid`], which cannot hold 0 (our own
/// group), -1 (every process) or 1 (init); such a value would be a bug.
pub(super) fn signal_group(pid: Pid, sig: Signal) {
    match ChildPid::new(pid.as_raw()) {
        Some(child) => child.signal_group(sig),
        None => error!("refusing to send {sig} to pid {pid}: not a single process"),
    }
}

/// What procman says when it SIGKILLs a worker itself, by why it stopped it.
pub(super) fn kill_cause(reason: StopReason, quick: bool) -> &'static str {
    match reason {
        StopReason::StartupTimeout => "killed by procman after the startup timeout",
        StopReason::HeartbeatTimeout => "killed by procman after a heartbeat timeout",
        _ if quick => "killed by procman after the quick-stop grace",
        _ => "killed by procman after the graceful timeout",
    }
}

/// Like [`describe`], but a SIGKILL procman sent itself says why instead of
/// suspecting the OOM killer.
pub(super) fn describe_exit(status: &WaitStatus, stop: Option<&Stop>) -> String {
    match (status, stop.and_then(|s| s.killed)) {
        (WaitStatus::Signaled(_, Signal::SIGKILL, _), Some(cause)) => cause.to_string(),
        _ => describe(status),
    }
}

pub(super) fn exit_code(status: &WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(*code),
        _ => None,
    }
}

/// "exited with status 1", "killed by SIGKILL".
pub fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "exited cleanly".into(),
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => format!(
            "killed by {}{}{}",
            sig.as_str(),
            if *core { " (core dumped)" } else { "" },
            if *sig == Signal::SIGKILL {
                " (perhaps out of memory?)"
            } else {
                ""
            }
        ),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::StopReason;

    #[test]
    fn exit_statuses_read_like_sentences() {
        let pid = Pid::from_raw(7);
        assert_eq!(describe(&WaitStatus::Exited(pid, 0)), "exited cleanly");
        assert_eq!(
            describe(&WaitStatus::Exited(pid, 3)),
            "exited with status 3"
        );
        assert_eq!(
            describe(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            "killed by SIGKILL (perhaps out of memory?)"
        );
    }

    #[test]
    fn a_sigkill_procman_sent_names_procman_not_the_oom_killer() {
        let pid = Pid::from_raw(7);
        let killed = WaitStatus::Signaled(pid, Signal::SIGKILL, false);
        let stop = |reason, killed| Stop {
            reason,
            kill_at: None,
            killed,
        };
        let table = [
            (
                stop(
                    StopReason::Shutdown,
                    Some(kill_cause(StopReason::Shutdown, false)),
                ),
                "killed by procman after the graceful timeout",
            ),
            (
                stop(
                    StopReason::Replaced,
                    Some(kill_cause(StopReason::Replaced, true)),
                ),
                "killed by procman after the quick-stop grace",
            ),
            (
                stop(
                    StopReason::HeartbeatTimeout,
                    Some(kill_cause(StopReason::HeartbeatTimeout, false)),
                ),
                "killed by procman after a heartbeat timeout",
            ),
            (
                stop(
                    StopReason::StartupTimeout,
                    Some(kill_cause(StopReason::StartupTimeout, false)),
                ),
                "killed by procman after the startup timeout",
            ),
            // Asked to stop, but the SIGKILL came from elsewhere.
            (
                stop(StopReason::Shutdown, None),
                "killed by SIGKILL (perhaps out of memory?)",
            ),
        ];
        for (s, want) in table {
            assert_eq!(describe_exit(&killed, Some(&s)), want);
        }
        assert_eq!(
            describe_exit(&killed, None),
            "killed by SIGKILL (perhaps out of memory?)"
        );
        let term = WaitStatus::Signaled(pid, Signal::SIGTERM, false);
        let s = stop(
            StopReason::Shutdown,
            Some(kill_cause(StopReason::Shutdown, false)),
        );
        assert_eq!(describe_exit(&term, Some(&s)), "killed by SIGTERM");
    }
}
