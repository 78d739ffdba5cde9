//! Notifications from workers (sd_notify datagrams on the master's
//! socket): attributed to a worker by the sender's credentials (the
//! worker itself or one of its descendants), then handled as events.

use std::time::Instant;

use nix::unistd::Pid;
use tracing::{debug, info, warn};

use super::lifecycle::mark_ready;
use super::{Event, Master};
use crate::notify::{Datagram, Message};
use crate::procfs;
use crate::workers::{Stop, WorkerState};

impl Master {
    pub(super) fn drain_notifications(&mut self, now: Instant) {
        for datagram in self.notify.drain() {
            self.dispatch_datagram(datagram, now);
        }
    }

    /// Attributes a datagram to a worker by the sender's credentials:
    /// the worker itself or one of its descendants. Others are dropped.
    pub(super) fn dispatch_datagram(&mut self, d: Datagram, now: Instant) {
        let sender = Pid::from_raw(d.pid);
        if let Some(z) = self.zygotes.get_mut(sender) {
            for m in d.messages {
                if let Message::Error(text) = m {
                    z.reported_error = Some(text);
                }
            }
            return;
        }
        let worker = if self.table.get(sender).is_some() {
            Some(sender)
        } else {
            owning_worker(d.pid, |p| self.table.get(Pid::from_raw(p)).is_some()).map(Pid::from_raw)
        };
        let Some(worker) = worker else {
            debug!(
                event = "notify-dropped",
                process = d.pid,
                "Dropped a notification from pid {}, which is not a worker",
                d.pid
            );
            return;
        };
        for message in d.messages {
            self.handle(
                Event::Notified {
                    worker,
                    sender: d.pid,
                    message,
                },
                now,
            );
        }
    }

    pub(super) fn on_message(&mut self, pid: Pid, sender: i32, message: Message, now: Instant) {
        let notify_ready = self.settings.class.notify_ready;
        let kill_limit = self.kill_limit;
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        match message {
            Message::Ready => {
                if w.is_starting() && notify_ready {
                    mark_ready(w, now, &self.endpoints.observed);
                }
            }
            Message::Heartbeat => w.last_heartbeat = Some(now),
            Message::WatchdogTrigger => {
                if w.is_active() {
                    worker_event!(
                        warn,
                        "stopping",
                        reason = "watchdog-trigger",
                        w,
                        "Worker {pid} (slot {}) sent WATCHDOG=trigger; aborting",
                        w.slot
                    );
                    self.abort_worker(pid, now);
                }
            }
            Message::Status(s) => info!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Worker {pid} (slot {}) status: {s}",
                w.slot
            ),
            Message::Errno(e) => warn!(
                worker = pid.as_raw(),
                slot = w.slot,
                "Worker {pid} (slot {}) reported errno {e}",
                w.slot
            ),
            Message::ExtendTimeout(d) => match &mut w.state {
                WorkerState::Starting { deadline, .. } => {
                    *deadline = (*deadline).max(now + d);
                    debug!("Worker {pid} extended its startup deadline by {d:?}");
                }
                WorkerState::Stopping(Stop {
                    kill_at: Some(at), ..
                }) => {
                    let wanted = now + d;
                    match kill_limit {
                        // A quick stop is bounded: the worker keeps what it
                        // has, up to the quick stop's deadline.
                        Some(limit) if wanted > limit => {
                            *at = (*at).max(limit);
                            info!(
                                worker = pid.as_raw(),
                                slot = w.slot,
                                "Worker {pid} (slot {}) asked for {d:?} more time to stop; a quick stop allows {:.1}s more",
                                w.slot,
                                at.saturating_duration_since(now).as_secs_f64()
                            );
                        }
                        _ => *at = (*at).max(wanted),
                    }
                }
                _ => {}
            },
            Message::Stopping => {
                // Asked to stop already: it was never counted.
                if let Some(a) = w.active_mut() {
                    a.draining = true;
                    worker_event!(
                        debug,
                        "draining",
                        w,
                        "Worker {pid} (slot {}) is draining",
                        w.slot
                    );
                }
            }
            Message::Reloading => debug!("Worker {pid} sent RELOADING=1 (ignored)"),
            Message::Recycle(why) => {
                if w.active().is_some_and(|a| a.recycle.is_none()) && !self.recycling.is_queued(pid)
                {
                    worker_event!(
                        info,
                        "recycle-asked",
                        w,
                        "Worker {pid} (slot {}) asks to be recycled: {why}",
                        w.slot
                    );
                    self.recycling.ask(pid, why);
                }
            }
            Message::Error(text) => w.reported_error = Some(text),
            Message::Traceback(text) => w.reported_traceback = Some(text),
        }
        if sender != pid.as_raw() {
            debug!("notification from {sender} attributed to worker {pid}");
        }
    }
}

/// The worker a non-worker sender belongs to: the nearest ancestor that is
/// a worker, or else the worker whose process group it is in.
fn owning_worker(pid: i32, is_worker: impl Fn(i32) -> bool) -> Option<i32> {
    let mut current = pid;
    for _ in 0..32 {
        let procfs::Stat { ppid, pgrp, .. } = procfs::stat(current)?;
        if current == pid && is_worker(pgrp) {
            return Some(pgrp);
        }
        if is_worker(ppid) {
            return Some(ppid);
        }
        if ppid <= 1 {
            return None;
        }
        current = ppid;
    }
    None
}
