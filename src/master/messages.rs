//! Notifications from workers (sd_notify datagrams on the master's
//! socket): attributed to a worker by the sender's credentials (the
//! worker itself or one of its descendants), then handled as events; and
//! when the master reads them ([`Inbox`]).
//!
//! Lazy heartbeats. Every ready worker sends `WATCHDOG=1` 3 times per
//! `--timeout`; an idle master that woke for each would wake 3 times per
//! worker per timeout for nothing. So the socket is in the poll set only
//! while a notification may need an answer at once
//! ([`crate::policy::notify_pace`]): while a worker is starting or
//! stopping, during a reload, when no worker sends heartbeats (nothing to
//! batch), when the workers are too many for the socket's queue, or once
//! the queue was found crowded. Otherwise the
//! master reads it (non-blocking, until empty) at every wake-up for any
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
//! * `STATUS=`, `ERRNO=`: logged up to one period late.
//! * `RELOADING=1`, `MAINPID=` and anything else: ignored anyway.

use std::time::Instant;

use nix::unistd::Pid;
use tracing::{debug, info, warn};

use super::lifecycle::mark_ready;
use super::{Event, Master};
use crate::notify::{Datagram, Message, Receiver};
use crate::policy::{self, Pace};
use crate::procfs;
use crate::workers::{Stop, WorkerState};

/// The notify socket and when it was read.
pub(super) struct Inbox {
    receiver: Receiver,
    /// The end of the previous read: nothing queued then is still queued,
    /// so every datagram read since was sent after it.
    last_read: Instant,
    /// The pace of the last wait.
    pace: Pace,
    /// The socket was out of the poll set since the previous read: this
    /// read shows how full the queue grew unwatched.
    unwatched: bool,
    /// A read after an unwatched period found the queue fuller than the
    /// period allows: polled from then on.
    crowded: bool,
}

impl Inbox {
    pub(super) fn new(receiver: Receiver, now: Instant) -> Inbox {
        Inbox {
            receiver,
            last_read: now,
            pace: Pace::Poll,
            unwatched: false,
            crowded: false,
        }
    }

    pub(super) fn receiver(&self) -> &Receiver {
        &self.receiver
    }

    pub(super) fn crowded(&self) -> bool {
        self.crowded
    }

    /// When the socket is due for a read while it is not polled: by the
    /// pace of the last wait ([`Inbox::set_pace`]), which is what left it
    /// unwatched, so the pace is decided once per wait.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self.pace {
            Pace::Poll => None,
            Pace::Drain(period) => Some(self.last_read + period),
        }
    }

    /// The pace the coming wait uses; returns whether it changed.
    pub(super) fn set_pace(&mut self, pace: Pace) -> bool {
        let changed = std::mem::discriminant(&pace) != std::mem::discriminant(&self.pace);
        self.pace = pace;
        self.unwatched |= pace != Pace::Poll;
        changed
    }

    /// Reads every queued datagram, each with when it was sent: `now` less
    /// its age, but not before the previous read (a wall clock stepped
    /// forward meanwhile would age it too much).
    fn read(&mut self, now: Instant) -> Vec<(Datagram, Instant)> {
        let drained = self.receiver.drain();
        let limit = self.receiver.queue_limit();
        let unwatched = std::mem::take(&mut self.unwatched);
        if unwatched && !self.crowded && policy::crowded(drained.received, limit) {
            self.crowded = true;
            info!(
                event = "notify-pace",
                pace = "poll",
                "{} notifications were queued after an idle period (the queue holds {limit}): reading each as it arrives from now on",
                drained.received
            );
        }
        let since = self.last_read;
        self.last_read = now;
        drained
            .datagrams
            .into_iter()
            .map(|d| {
                let sent = now.checked_sub(d.age).unwrap_or(since).max(since);
                (d, sent.min(now))
            })
            .collect()
    }
}

impl Master {
    /// Reads the notify socket until it is empty and handles what it held.
    pub(super) fn drain_notifications(&mut self, now: Instant) {
        for (datagram, sent) in self.notify.read(now) {
            self.dispatch_datagram(datagram, sent, now);
        }
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
        pace == Pace::Poll
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    use super::*;

    /// Sends each datagram from a socket of its own, as workers do: queued
    /// datagrams are charged to their sender's buffer, which one socket
    /// sending hundreds could fill before the queue limit (512 with
    /// systemd's setting).
    struct Sender(std::path::PathBuf);

    impl Sender {
        fn send(&self, payload: &[u8]) -> std::io::Result<usize> {
            UnixDatagram::unbound()?.send_to(payload, &self.0)
        }
    }

    fn inbox(now: Instant) -> (Inbox, Sender) {
        let rx = Receiver::create(None).expect("receiver");
        let tx = Sender(rx.path().to_path_buf());
        (Inbox::new(rx, now), tx)
    }

    #[test]
    fn a_datagram_is_dated_between_the_previous_read_and_this_one() {
        let start = Instant::now();
        let (mut inbox, tx) = inbox(start);
        tx.send(b"WATCHDOG=1").expect("send");
        let now = Instant::now();
        let read = inbox.read(now);
        assert_eq!(read.len(), 1);
        let sent = read[0].1;
        assert!(
            start <= sent && sent <= now,
            "{sent:?} not in [{start:?}, {now:?}]"
        );
        // The next read's datagrams are dated after this read.
        tx.send(b"WATCHDOG=1").expect("send");
        let later = Instant::now();
        let read = inbox.read(later);
        assert!(read[0].1 >= now && read[0].1 <= later);
    }

    #[test]
    fn a_crowded_queue_after_an_unwatched_period_means_polling_for_good() {
        let now = Instant::now();
        let (mut inbox, tx) = inbox(now);
        let limit = inbox.receiver().queue_limit();
        let budget = policy::notify_budget(limit);
        // Watched (polled): a full read says nothing about the pace.
        for _ in 0..=budget {
            tx.send(b"WATCHDOG=1").expect("send");
        }
        inbox.set_pace(Pace::Poll);
        inbox.read(now);
        assert!(!inbox.crowded(), "a polled socket is not judged");
        // Unwatched, within the budget: still lazy.
        inbox.set_pace(Pace::Drain(Duration::from_secs(20)));
        for _ in 0..budget {
            tx.send(b"WATCHDOG=1").expect("send");
        }
        inbox.read(now);
        assert!(!inbox.crowded(), "{budget} datagrams fit the budget");
        // Unwatched, beyond it: polled from then on.
        inbox.set_pace(Pace::Drain(Duration::from_secs(20)));
        for _ in 0..=budget {
            tx.send(b"WATCHDOG=1").expect("send");
        }
        inbox.read(now);
        assert!(
            inbox.crowded(),
            "{} datagrams exceed the budget",
            budget + 1
        );
    }
}
