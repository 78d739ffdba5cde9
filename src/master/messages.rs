//! Notifications from workers (sd_notify datagrams on the master's
//! socket): attributed to a worker by the sender's credentials (the
//! worker itself or one of its descendants), then handled as events; and
//! when the master reads them (the pace; how much at a time is in
//! `inbox.rs`).
//!
//! Lazy heartbeats. Every ready worker sends `WATCHDOG=1` 3 times per
//! `--timeout`; an idle master that woke for each would wake 3 times per
//! worker per timeout for nothing. So the socket is in the poll set only
//! while a notification may need an answer at once
//! ([`crate::policy::notify_pace`]): while a worker is starting or
//! stopping, during a reload, when no worker sends heartbeats (nothing to
//! batch), when the workers are too many for the socket's queue, or once
//! the queue was found crowded (and while a read left datagrams in it,
//! inbox.rs). Otherwise the
//! master reads it (non-blocking, one bounded batch) at every wake-up for any
//! reason (before reaping, before a deadline is acted on, before a status
//! or metrics answer is built: the loop reads it right after `poll`), and
//! at the latest one drain period after the previous read (the deadline
//! `Due::DrainNotifications`, e.g. every 2 × timeout/3; see
//! [`crate::policy::drain_period`] for how the queue limit sizes it).
//!
//! Each kind of message, and what reading it up to one period late does:
//! * `WATCHDOG=1`: nothing. It counts from its send time (the kernel's
//!   timestamp), so a worker's heartbeat deadline is still its last
//!   heartbeat + `--timeout`; when that deadline passes, the loop has just
//!   read the socket, so a worker is only timed out after a read showed no
//!   fresh heartbeat.
//! * `READY=1`, `EXTEND_TIMEOUT_USEC`: only acted on while the worker is
//!   starting or stopping, when the socket is polled.
//! * `X_PROCMAN_ERROR`, `X_PROCMAN_TRACEBACK`: sent before a worker (or a
//!   zygote) fails; its exit wakes the master, which reads the socket
//!   before reaping, so they are still attributed.
//! * `STOPPING=1` from a ready worker leaving on its own: its replacement
//!   starts up to one period later, or at its exit if that comes first.
//!   A worker that was told to stop is already stopping (polled).
//! * `WATCHDOG=trigger`: the abort comes up to one period late. It is the
//!   worker's "count me as timed out": a worker that fell silent instead
//!   would be aborted a whole `--timeout` later, which the period is
//!   shorter than.
//! * `X_PROCMAN_RECYCLE`: the replacement starts up to one period later;
//!   the worker keeps serving meanwhile, as it does until it is replaced.
//!   procman's bootstrap sends it to the urgent socket instead, which is
//!   always polled (urgent.rs).
//! * `STATUS=`, `ERRNO=`: logged up to one period late.
//! * `RELOADING=1`, `MAINPID=` and anything else: ignored anyway.

use std::time::Instant;

use nix::unistd::Pid;
use tracing::{debug, info, warn};

use super::lifecycle::mark_ready;
use super::{Event, Master};
use crate::notify::{Datagram, Message};
use crate::policy::{self, Pace};
use crate::procfs;
use crate::workers::{Stop, WorkerState};

impl Master {
    /// Reads one batch from the notify socket (until it is empty or the
    /// batch full), handling each datagram as it is read.
    pub(super) fn drain_notifications(&mut self, now: Instant) {
        let mut batch = self.notify.begin();
        while let Some((datagram, sent)) = self.notify.next(&mut batch, now) {
            self.dispatch_datagram(datagram, sent, now);
        }
        self.notify.end(batch, now);
    }

    /// How the notify socket is read now (see the module's comment).
    pub(super) fn notify_pace(&self) -> Pace {
        policy::notify_pace(
            &self.table,
            self.reload.is_some(),
            self.settings.cfg.timeout,
            self.notify.receiver().queue_limit(),
            self.notify.crowded(),
        )
    }

    /// Fixes the pace of the coming wait; returns whether to poll the
    /// socket.
    pub(super) fn pace_notifications(&mut self) -> bool {
        let pace = self.notify_pace();
        if self.notify.set_pace(pace) {
            match pace {
                Pace::Poll => debug!(
                    event = "notify-pace",
                    pace = "poll",
                    "Reading notifications as they arrive"
                ),
                Pace::Drain(period) => debug!(
                    event = "notify-pace",
                    pace = "lazy",
                    period_s = period.as_secs_f64(),
                    "All workers ready: reading notifications every {:.1}s or at any wake-up",
                    period.as_secs_f64()
                ),
            }
        }
        // Datagrams left after a full batch: the next pass reads on at
        // once (the socket is readable), with every other event in its poll.
        pace == Pace::Poll || self.notify.backlog()
    }

    /// Attributes a datagram to a worker by the sender's credentials:
    /// the worker itself or one of its descendants. Others are dropped.
    /// `sent`: when it was sent (a heartbeat counts from then).
    pub(super) fn dispatch_datagram(&mut self, d: Datagram, sent: Instant, now: Instant) {
        let sender = Pid::from_raw(d.pid);
        if let Some(z) = self.zygotes.get_mut(sender) {
            for m in d.messages {
                match m {
                    Message::Error(text) => z.reported_error = Some(text),
                    Message::Traceback(text) => z.reported_traceback = Some(text),
                    _ => {}
                }
            }
            return;
        }
        let worker = if self.table.get(sender).is_some() {
            Some(sender)
        } else {
            owning_worker(d.pid, |p| self.table.get(Pid::from_raw(p)).is_some()).map(Pid::from_raw)
        };
        // A worker forked by a zygote reports itself before it sends
        // anything here, but its report may still be queued on the channel.
        let worker = worker.or_else(|| self.awaited_worker(sender, now));
        let Some(worker) = worker else {
            self.notify.not_a_worker(&d, now);
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
                    sent,
                    message,
                },
                now,
            );
        }
    }

    pub(super) fn on_message(
        &mut self,
        pid: Pid,
        sender: i32,
        sent: Instant,
        message: Message,
        now: Instant,
    ) {
        let notify_ready = self.settings.class.notify_ready;
        let kill_limit = self.kill_limit;
        let asked = match message {
            Message::ExtendTimeout(d) => Some(d),
            _ => None,
        };
        let Some(w) = self.table.get_mut(pid) else {
            return;
        };
        match message {
            Message::Ready => {
                if w.is_starting() && notify_ready {
                    mark_ready(w, now, &self.endpoints.observed);
                }
            }
            // Its send time: read late, it still counts from then.
            Message::Heartbeat => {
                w.last_heartbeat = Some(w.last_heartbeat.map_or(sent, |t| t.max(sent)))
            }
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
        if let Some(asked) = asked {
            self.forward_extension(pid, asked, now);
        }
        if sender != pid.as_raw() {
            debug!("notification from {sender} attributed to worker {pid}");
        }
    }
}

/// The worker a non-worker sender belongs to: the worker whose session it
/// is in (each worker leads one, and only its descendants can be in it: a
/// process may leave for a session of its own, never join another), or
/// else its nearest ancestor that is a worker. Not its process group first:
/// a group can be joined from anywhere in its session, which before each
/// worker had a session of its own was procman's, shared by every worker.
fn owning_worker(pid: i32, is_worker: impl Fn(i32) -> bool) -> Option<i32> {
    owning_worker_by(pid, is_worker, procfs::stat)
}

/// [`owning_worker`], reading each process's stat with `stat`.
fn owning_worker_by(
    pid: i32,
    is_worker: impl Fn(i32) -> bool,
    stat: impl Fn(i32) -> Option<procfs::Stat>,
) -> Option<i32> {
    let mut current = pid;
    for _ in 0..32 {
        let procfs::Stat { ppid, session, .. } = stat(current)?;
        if current == pid && is_worker(session) {
            return Some(session);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A /proc of made-up processes: pid → (ppid, pgrp, session).
    fn fake_stat(procs: &[(i32, i32, i32, i32)]) -> impl Fn(i32) -> Option<procfs::Stat> + '_ {
        move |pid| {
            let &(_, ppid, pgrp, session) = procs.iter().find(|p| p.0 == pid)?;
            Some(procfs::Stat {
                ppid,
                pgrp,
                session,
                rss_pages: 0,
                start_ticks: 0,
            })
        }
    }

    #[test]
    fn a_sender_is_attributed_by_its_session_then_its_ancestry_not_its_group() {
        // Workers 100 and 200, each leading its session; master 1.
        let workers = |p: i32| p == 100 || p == 200;
        let procs = [
            (100, 1, 100, 100),
            (200, 1, 200, 200),
            // A descendant of worker 200 (its parent 250 is not a worker)
            // that sits in worker 100's process group: it is 200's.
            (250, 200, 200, 200),
            (300, 250, 100, 200),
            // A descendant of 200 that left for a session of its own: by
            // its ancestry.
            (400, 250, 400, 400),
            // Re-parented to the master, in a session of its own: nobody's.
            (500, 1, 100, 500),
        ];
        let owner = |pid| owning_worker_by(pid, workers, fake_stat(&procs));
        assert_eq!(owner(300), Some(200), "by its session, not its group");
        assert_eq!(owner(250), Some(200));
        assert_eq!(owner(400), Some(200), "by its ancestry");
        assert_eq!(owner(500), None, "its group is no claim");
        assert_eq!(owner(999), None, "gone");
    }
}
