//! The urgent notify socket: a second sd_notify socket, always in the
//! master's poll set, for the few messages a worker needs acted on now
//! while the master reads heartbeats in batches (messages.rs leaves the
//! main socket out of the poll set then).
//!
//! Workers get its path as `PROCMAN_URGENT_SOCKET`, next to
//! `NOTIFY_SOCKET`. procman's bootstrap sends `X_PROCMAN_RECYCLE` there
//! (`--max-requests`), which otherwise waited for the next batched read,
//! up to 2 × `--timeout`/3 (the worker meanwhile served requests far past
//! its limit). Heartbeats still go to `NOTIFY_SOCKET`, so an idle master
//! wakes no more often than before: a worker sends here once per recycle.
//!
//! The socket is made exactly like the main one ([`Receiver::create`]: a
//! private 0700 directory, handed to the workers' user, the sender known by
//! its credentials), and what it carries is the same protocol, attributed
//! and handled the same way ([`Master::dispatch_datagram`]): a message is
//! never worth less for arriving here. A worker that sends heartbeats here
//! only wakes the master for each, as it could by flooding the main socket
//! while that is polled. It is read through an [`Inbox`] like the main
//! socket, so in the same bounded batches (datagrams, bytes and lines per
//! datagram, passed descriptors refused or handed to the closer), with what
//! it discards counted; a batch that leaves datagrams queued leaves the
//! socket readable, so the next `poll` returns at once, with every other
//! event in it.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::Instant;

use std::collections::BTreeMap;

use super::inbox::Inbox;
use super::Master;
use crate::error::Result;
use crate::identity::Credentials;
use crate::notify::Receiver;

/// The environment variable that names the socket to a worker.
pub(super) const ENV: &str = "PROCMAN_URGENT_SOCKET";

/// The urgent socket.
pub(super) struct Urgent {
    inbox: Inbox,
}

impl Urgent {
    pub(super) fn create(owner: Option<&Credentials>, now: Instant) -> Result<Urgent> {
        Ok(Urgent {
            inbox: Inbox::new(Receiver::create(owner)?, now),
        })
    }

    /// The socket an earlier image described (`upgrade`).
    pub(super) fn adopt(
        r: &crate::upgrade::SocketRecord,
        fd: std::os::fd::OwnedFd,
        dir_fd: std::os::fd::OwnedFd,
    ) -> std::result::Result<Urgent, String> {
        Ok(Urgent {
            inbox: Inbox::new(Receiver::adopt(r, fd, dir_fd)?, Instant::now()),
        })
    }

    /// The receiver, to describe it (`upgrade`).
    pub(super) fn receiver(&self) -> &Receiver {
        self.inbox.receiver()
    }

    /// Its path, for [`ENV`].
    pub(super) fn path(&self) -> &Path {
        self.inbox.receiver().path()
    }

    /// What it discarded so far, by reason (added to the main socket's in
    /// `/metrics`).
    pub(super) fn dropped(&self) -> BTreeMap<String, u64> {
        self.inbox.dropped()
    }

    /// For the poll set: always in it.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.inbox.receiver().fd()
    }
}

impl Master {
    /// Reads one bounded batch of the urgent socket and handles each
    /// datagram as it is read. Polled, it is read as datagrams arrive: each
    /// counts as sent now.
    pub(super) fn read_urgent(&mut self, now: Instant) {
        let mut batch = self.urgent.inbox.begin();
        while let Some((datagram, _)) = self.urgent.inbox.next(&mut batch, now) {
            self.dispatch_datagram(datagram, now, now);
        }
        self.urgent.inbox.end(batch, now);
    }
}
