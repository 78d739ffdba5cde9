//! A worker row as the state description carries it across the exec,
//! and back: states and stop reasons by name, every instant relative to
//! when the state was written ([`crate::upgrade::rel`] / [`abs`]), so the
//! new image's clock (the same monotonic clock) puts each deadline where
//! it was.

use std::time::Instant;

use nix::unistd::Pid;

use crate::upgrade::{abs, rel, WorkerRecord};
use crate::workers::{Active, Stop, StopReason, Worker, WorkerState};

fn reason_name(r: StopReason) -> &'static str {
    match r {
        StopReason::Shutdown => "shutdown",
        StopReason::Replaced => "replaced",
        StopReason::Excess => "excess",
        StopReason::HeartbeatTimeout => "heartbeat-timeout",
        StopReason::StartupTimeout => "startup-timeout",
        StopReason::ReloadAborted => "reload-aborted",
    }
}

fn reason_of(name: &str) -> StopReason {
    match name {
        "shutdown" => StopReason::Shutdown,
        "excess" => StopReason::Excess,
        "heartbeat-timeout" => StopReason::HeartbeatTimeout,
        "startup-timeout" => StopReason::StartupTimeout,
        "reload-aborted" => StopReason::ReloadAborted,
        _ => StopReason::Replaced,
    }
}

pub(super) fn record(w: &Worker, now: Instant) -> WorkerRecord {
    let r = |at: Instant| rel(at, now);
    let mut rec = WorkerRecord {
        pid: w.pid.as_raw(),
        slot: w.slot,
        generation: w.generation,
        state: String::new(),
        deadline_ms: None,
        stable_at_ms: None,
        recycle: None,
        draining: false,
        retire_at_ms: None,
        samples_over_memory: 0,
        lowered_from: None,
        boosted_from: None,
        boost_until_ms: None,
        stop_reason: None,
        kill_at_ms: None,
        killed_quick: None,
        started_ms: r(w.started_at),
        ready_ms: w.ready_at.map(r),
        heartbeat_ms: w.last_heartbeat.map(r),
        reported_error: w.reported_error.clone(),
        reported_traceback: w.reported_traceback.clone(),
    };
    let active = match &w.state {
        WorkerState::Starting {
            deadline,
            stable_at,
            active,
        } => {
            rec.state = "starting".into();
            rec.deadline_ms = Some(r(*deadline));
            rec.stable_at_ms = stable_at.map(r);
            Some(active)
        }
        WorkerState::Ready(active) => {
            rec.state = "ready".into();
            Some(active)
        }
        WorkerState::Stopping(stop) => {
            rec.state = "stopping".into();
            rec.stop_reason = Some(reason_name(stop.reason).into());
            rec.kill_at_ms = stop.kill_at.map(r);
            rec.killed_quick = stop
                .killed
                .map(|k| k == super::super::exits::kill_cause(stop.reason, true));
            None
        }
    };
    if let Some(a) = active {
        rec.recycle = a.recycle.clone();
        rec.draining = a.draining;
        rec.retire_at_ms = a.retire_at.map(r);
        rec.samples_over_memory = a.samples_over_memory;
        rec.lowered_from = a.lowered_from;
        rec.boosted_from = a.boosted.map(|b| b.back_to);
        rec.boost_until_ms = a.boosted.map(|b| r(b.until));
    }
    rec
}

pub(super) fn worker(rec: &WorkerRecord, now: Instant) -> Worker {
    let a = |ms: i64| abs(ms, now);
    let active = Active {
        recycle: rec.recycle.clone(),
        draining: rec.draining,
        retire_at: rec.retire_at_ms.map(a),
        samples_over_memory: rec.samples_over_memory,
        lowered_from: rec.lowered_from,
        boosted: rec.boosted_from.map(|back_to| crate::workers::Boosted {
            back_to,
            until: rec.boost_until_ms.map_or(now, a),
        }),
    };
    let state = match rec.state.as_str() {
        "starting" => WorkerState::Starting {
            deadline: rec.deadline_ms.map_or(now, a),
            stable_at: rec.stable_at_ms.map(a),
            active,
        },
        "stopping" => {
            let reason = reason_of(rec.stop_reason.as_deref().unwrap_or(""));
            WorkerState::Stopping(Stop {
                reason,
                kill_at: rec.kill_at_ms.map(a),
                killed: rec
                    .killed_quick
                    .map(|q| super::super::exits::kill_cause(reason, q)),
            })
        }
        _ => WorkerState::Ready(active),
    };
    Worker {
        pid: Pid::from_raw(rec.pid),
        slot: rec.slot,
        generation: rec.generation,
        state,
        started_at: a(rec.started_ms),
        ready_at: rec.ready_ms.map(a),
        last_heartbeat: rec.heartbeat_ms.map(a),
        reported_error: rec.reported_error.clone(),
        reported_traceback: rec.reported_traceback.clone(),
        // Read again when it next becomes ready; a ready worker's OOM
        // verdict says "perhaps" until then.
        own_cgroup: None,
        // Given again by the new image (`Master::reshare`).
        share: crate::workers::Share::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_worker_row_survives_its_description() {
        let now = Instant::now();
        let mut w = Worker::new(Pid::from_raw(42), 3, 7, now, Duration::from_secs(30));
        w.become_ready(now + Duration::from_secs(1));
        w.last_heartbeat = Some(now + Duration::from_secs(2));
        let later = now + Duration::from_secs(5);
        let back = worker(&record(&w, later), later);
        assert_eq!((back.pid, back.slot, back.generation), (w.pid, 3, 7));
        assert_eq!(back.state, w.state);
        assert_eq!(back.ready_at, w.ready_at);
        assert_eq!(back.last_heartbeat, w.last_heartbeat);
        let mut s = w.clone();
        s.state = WorkerState::Stopping(Stop {
            reason: StopReason::Excess,
            kill_at: Some(later + Duration::from_secs(3)),
            killed: None,
        });
        assert_eq!(worker(&record(&s, later), later).state, s.state);
    }
}
