//! The notify socket as the master reads it: when (the pace, see
//! messages.rs), how much at a time, what was discarded.
//!
//! Bounded intake. Any process of the workers' user can send to the
//! socket, as fast as it likes. The master reads one bounded batch at a
//! time ([`crate::policy::NOTIFY_BATCH_DATAGRAMS`] datagrams or
//! [`crate::policy::NOTIFY_BATCH_BYTES`] bytes), handling each datagram as
//! it is read (one reused buffer; at most [`crate::notify::MAX_LINES`]
//! lines each), then goes back to signals, reaping and the endpoints;
//! while the queue still holds datagrams after a batch, the socket is in
//! the poll set whatever the pace, so the next pass comes at once and
//! still sees every other ready descriptor. What is discarded (malformed
//! or truncated datagrams, lines past the cap, passed descriptors,
//! senders that are no worker) is counted by reason
//! (`procman_notify_dropped_total`) and said in one warning at most every
//! [`crate::policy::NOTIFY_DROP_WARNING_EVERY`], naming the latest
//! sender's pid and uid.
//!
//! The price of bounded reads: under a flood, what a worker sent just
//! before it exited (`X_PROCMAN_ERROR`) may still be queued behind the
//! flood when it is reaped, and is then no longer attributed to it.

use std::collections::BTreeMap;
use std::time::Instant;

use tracing::{info, warn};

use crate::notify::{Datagram, Discard, Receipt, Receiver};
use crate::policy::{self, Pace};

/// The notify socket and when it was read.
pub(super) struct Inbox {
    receiver: Receiver,
    /// The end of the previous read (for the pace's deadline).
    last_read: Instant,
    /// The end of the last read that left the queue empty: every datagram
    /// queued now was sent after it.
    emptied: Instant,
    /// The last batch was full: datagrams are left in the queue.
    backlog: bool,
    /// The pace of the last wait.
    pace: Pace,
    /// The socket was out of the poll set since the previous read: this
    /// read shows how full the queue grew unwatched.
    unwatched: bool,
    /// Datagrams read since an unwatched period, until the queue was
    /// found empty (over several batches if one is not enough).
    since_unwatched: Option<usize>,
    /// A read after an unwatched period found the queue fuller than the
    /// period allows: polled from then on.
    crowded: bool,
    drops: Drops,
}

/// One batch being read.
pub(super) struct Batch {
    datagrams: usize,
    bytes: usize,
    /// The queue was found empty.
    emptied: bool,
}

/// What was discarded, and when it was last said.
struct Drops {
    counts: BTreeMap<Discard, u64>,
    /// Discarded since the last warning.
    unsaid: u64,
    warned: Option<Instant>,
}

impl Drops {
    fn new() -> Drops {
        Drops {
            counts: Discard::ALL.iter().map(|d| (*d, 0)).collect(),
            unsaid: 0,
            warned: None,
        }
    }

    /// Counts `n` of `what` from `sender`; warns at most once per
    /// [`policy::NOTIFY_DROP_WARNING_EVERY`], never per datagram.
    fn count(&mut self, what: Discard, n: usize, sender: Option<(i32, u32)>, now: Instant) {
        *self.counts.entry(what).or_default() += n as u64;
        self.unsaid += n as u64;
        let due = self.warned.is_none_or(|at| {
            now.saturating_duration_since(at) >= policy::NOTIFY_DROP_WARNING_EVERY
        });
        if !due {
            return;
        }
        let (pid, uid) = sender.map_or((None, None), |(p, u)| (Some(p), Some(u)));
        let from = match sender {
            Some((p, u)) => format!("pid {p}, uid {u}"),
            None => "a sender the kernel did not name".to_string(),
        };
        warn!(
            event = "notify-dropped",
            reason = what.as_str(),
            process = pid,
            uid,
            dropped = self.unsaid,
            "Dropped {} from the notify socket since the last such warning; the latest: {} ({}) from {from}; counted in procman_notify_dropped_total, said at most every {}s",
            self.unsaid,
            what.as_str(),
            n,
            policy::NOTIFY_DROP_WARNING_EVERY.as_secs()
        );
        self.unsaid = 0;
        self.warned = Some(now);
    }
}

impl Inbox {
    pub(super) fn new(receiver: Receiver, now: Instant) -> Inbox {
        Inbox {
            receiver,
            last_read: now,
            emptied: now,
            backlog: false,
            pace: Pace::Poll,
            unwatched: false,
            since_unwatched: None,
            crowded: false,
            drops: Drops::new(),
        }
    }

    pub(super) fn receiver(&self) -> &Receiver {
        &self.receiver
    }

    pub(super) fn crowded(&self) -> bool {
        self.crowded
    }

    /// The last batch left datagrams in the queue.
    pub(super) fn backlog(&self) -> bool {
        self.backlog
    }

    /// What was discarded so far, by reason (for `/metrics`).
    pub(super) fn dropped(&self) -> BTreeMap<String, u64> {
        self.drops
            .counts
            .iter()
            .map(|(d, n)| (d.as_str().to_string(), *n))
            .collect()
    }

    /// Counts what a sender that is no worker sent.
    pub(super) fn not_a_worker(&mut self, d: &Datagram, now: Instant) {
        self.drops
            .count(Discard::NotAWorker, 1, Some((d.pid, d.uid)), now);
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
        self.unwatched |= pace != Pace::Poll && !self.backlog;
        changed
    }

    pub(super) fn begin(&self) -> Batch {
        Batch {
            datagrams: 0,
            bytes: 0,
            emptied: false,
        }
    }

    /// The next datagram of the batch to handle, with when it was sent:
    /// `now` less its age, but not before the queue was last found empty
    /// (a wall clock stepped forward meanwhile would age it too much).
    /// `None` once the batch is full or the queue empty.
    pub(super) fn next(&mut self, batch: &mut Batch, now: Instant) -> Option<(Datagram, Instant)> {
        loop {
            if policy::notify_batch_full(batch.datagrams, batch.bytes) {
                return None;
            }
            let Some(Receipt {
                bytes,
                sender,
                datagram,
                discarded,
            }) = self.receiver.receive()
            else {
                batch.emptied = true;
                return None;
            };
            batch.datagrams += 1;
            batch.bytes += bytes;
            for (what, n) in discarded {
                self.drops.count(what, n, sender, now);
            }
            if let Some(d) = datagram {
                let since = self.emptied;
                let sent = now.checked_sub(d.age).unwrap_or(since).max(since);
                return Some((d, sent.min(now)));
            }
        }
    }

    /// Ends a batch: the queue's fill after an unwatched period is judged
    /// (over as many batches as it takes to empty it).
    pub(super) fn end(&mut self, batch: Batch, now: Instant) {
        let limit = self.receiver.queue_limit();
        if std::mem::take(&mut self.unwatched) {
            self.since_unwatched = Some(0);
        }
        if let Some(seen) = &mut self.since_unwatched {
            *seen += batch.datagrams;
            let seen = *seen;
            if !self.crowded && policy::crowded(seen, limit) {
                self.crowded = true;
                info!(
                    event = "notify-pace",
                    pace = "poll",
                    "{seen} notifications were queued after an idle period (the queue holds {limit}): reading each as it arrives from now on",
                );
            }
            if self.crowded || batch.emptied {
                self.since_unwatched = None;
            }
        }
        self.last_read = now;
        self.backlog = !batch.emptied;
        if batch.emptied {
            self.emptied = now;
        }
    }

    /// Reads a whole batch at once (tests).
    #[cfg(test)]
    fn read(&mut self, now: Instant) -> Vec<(Datagram, Instant)> {
        let mut batch = self.begin();
        let got = std::iter::from_fn(|| self.next(&mut batch, now)).collect();
        self.end(batch, now);
        got
    }
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
    fn a_read_takes_one_bounded_batch_and_says_what_is_left() {
        let now = Instant::now();
        let (mut inbox, tx) = inbox(now);
        let path = tx.0.clone();
        let total = policy::NOTIFY_BATCH_DATAGRAMS + 10;
        // More than the queue holds: a thread keeps it full, as a flood
        // would, until all are sent.
        let sender = std::thread::spawn(move || {
            let tx = UnixDatagram::unbound().expect("socket");
            for _ in 0..total {
                tx.send_to(b"WATCHDOG=1", &path).expect("send");
            }
        });
        let mut batches = Vec::new();
        let mut read = 0;
        while read < total {
            let got = inbox.read(Instant::now()).len();
            assert!(got <= policy::NOTIFY_BATCH_DATAGRAMS, "a batch of {got}");
            if got == policy::NOTIFY_BATCH_DATAGRAMS {
                assert!(inbox.backlog(), "a full batch leaves the socket polled");
            }
            read += got;
            batches.push(got);
        }
        sender.join().expect("sender");
        assert_eq!(read, total, "every datagram, over {batches:?}");
        assert!(inbox.read(Instant::now()).is_empty());
        assert!(!inbox.backlog(), "an empty queue is no backlog");
        // Bytes bound a batch too: 6 datagrams of 60000 bytes take 2
        // (the fifth passes the bound).
        let big = vec![b'#'; 60_000];
        for _ in 0..6 {
            tx.send(&big).expect("send");
        }
        assert_eq!(inbox.read(Instant::now()).len(), 5);
        assert!(inbox.backlog(), "5 large datagrams fill a batch");
        assert_eq!(inbox.read(Instant::now()).len(), 1);
        assert!(!inbox.backlog());
    }

    #[test]
    fn discards_are_counted_and_warned_about_once_a_period() {
        let now = Instant::now();
        let (mut inbox, tx) = inbox(now);
        for _ in 0..3 {
            tx.send(b"WATCH\0DOG=1").expect("send");
            tx.send("READY=1\n".repeat(40).as_bytes()).expect("send");
        }
        assert_eq!(inbox.read(now).len(), 3, "the long ones are handled");
        let dropped = inbox.dropped();
        assert_eq!(dropped["malformed"], 3);
        assert_eq!(
            dropped["excess-lines"],
            3 * (40 - crate::notify::MAX_LINES as u64)
        );
        assert_eq!(dropped["descriptors"], 0);
        assert_eq!(
            inbox.drops.unsaid,
            3 + 3 * (40 - crate::notify::MAX_LINES as u64) - 1
        );
        assert_eq!(inbox.drops.warned, Some(now), "warned once");
        // A period later, the next discard is said with the ones before.
        let later = now + policy::NOTIFY_DROP_WARNING_EVERY;
        tx.send(b"WATCH\0DOG=1").expect("send");
        inbox.read(later);
        assert_eq!((inbox.drops.unsaid, inbox.drops.warned), (0, Some(later)));
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
