//! The zygotes the master owns (`--preload`'s, or the base zygote) and
//! their bookkeeping: the current generation's zygote and older ones until
//! their workers are gone, which zygote serves a slot, the spawn request in
//! flight (one per zygote, with its deadline) and what its reply must be
//! verified against, the backoff of restarts, and the fall-back to cold
//! starts after repeated failures, and what a zygote sent out of turn
//! (dropped and counted). What the master does with it (spawning zygotes,
//! adopting workers, logging, a failed reload or boot) is in preload.rs.
//!
//! A reply adopts exactly the process that sent it, once: the kernel
//! names its sender (`SCM_CREDENTIALS`), the reply must name that same pid,
//! which must be a fresh child of the master with the workers' uids and not
//! already a worker, a zygote or a tracked group. App code in the zygote can
//! forge any text and fork anything, but it cannot send as a pid other than
//! its own process's (unless it runs as root, whose workers could kill the
//! master anyway), and a process the master already supervises is refused:
//! so no reply makes the master adopt a stranger, a zygote, or one process
//! for two slots. Of each zygote the master takes a few warnings while it
//! starts, one `ready`, one reply per request (and one late reply per
//! request it gave up on); anything else is dropped and counted.

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::debug;

use super::exits::signal_group;
use crate::config::Config;
use crate::pid::{ChildPid, Expected};
use crate::policy::{self, Backoff, Due};
use crate::zygote::{FromZygote, Pending, Sender, Zygote, ZygoteState};

/// After this many zygote failures in a row, workers start cold.
const FAILURES_BEFORE_COLD: u32 = 3;

/// The warnings taken from a starting zygote; more are dropped.
const MAX_WARNINGS: u32 = 4;

/// The master's zygotes.
#[derive(Debug, Default)]
pub(super) struct Zygotes {
    list: Vec<Zygote>,
    backoff: Backoff,
    cold: bool,
    drops: Drops,
}

/// How often the drops are said in the log, at most.
pub(super) const DROPS_SAID_EVERY: Duration = Duration::from_secs(10);

/// Messages dropped from zygotes' channels: counted by reason (a metric),
/// said in the log when the first one is dropped and then at most every
/// [`DROPS_SAID_EVERY`], never one line per message.
#[derive(Debug, Default)]
struct Drops {
    total: BTreeMap<&'static str, u64>,
    /// Dropped since the last line said so.
    unsaid: u64,
    said_at: Option<Instant>,
}

/// A line to log about dropped messages.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct DropsLine {
    /// Dropped since the last line (or since the start).
    pub dropped: u64,
    /// Dropped in all.
    pub total: u64,
    /// The reason of the drop that made this line due.
    pub why: &'static str,
    /// The zygote whose channel it came on.
    pub zygote: Pid,
    /// The process that sent it (the zygote, or any process holding its
    /// channel), if the kernel said.
    pub sender: Option<Sender>,
}

/// What a zygote's message means to the master, once the bookkeeping is
/// done.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Heard {
    /// Nothing to do (a late error, or the zygote is not known).
    Nothing,
    /// A message dropped unread or out of turn, with the reason (to be
    /// counted: [`Zygotes::dropped`]).
    Dropped(&'static str),
    /// A reply no request awaits, dropped (`unexpected`), whose sender is
    /// a fresh child of the master that nothing supervises (a fork of the
    /// zygote, say one whose request another process answered): it must
    /// not serve unsupervised, and may be killed.
    Unasked {
        stray: ChildPid,
    },
    /// It finished starting: it takes spawn requests from now on.
    Ready {
        generation: u64,
        started_at: Instant,
    },
    Warning(String),
    /// The request in flight failed (an error reply, a reported process it
    /// did not fork, its channel closed): the zygote is to be restarted.
    SpawnFailed {
        slot: usize,
        why: String,
        /// The process that sent a refused reply, when it is a fresh child
        /// of the master that nothing supervises (the zygote's fork): it
        /// must not serve, and may be killed.
        stray: Option<ChildPid>,
    },
    /// The reply to the request in flight, verified: a worker to supervise.
    Adopt {
        worker: ChildPid,
        pending: Pending,
    },
    /// A reply after the master gave up on the request, verified as a
    /// process the zygote forked: it is not supervised, so it must not serve.
    Late {
        worker: ChildPid,
        slot: usize,
    },
    /// A late reply naming a process the zygote did not fork: the zygote is
    /// broken, and nothing it named may be signalled.
    Untrusted {
        why: String,
        /// As for [`Heard::SpawnFailed`].
        stray: Option<ChildPid>,
    },
}

/// What a reply must be, beside what `verify` checks.
struct Reply {
    /// The pid it names.
    pid: i64,
    /// Its sender, as the kernel says.
    sender: Option<i32>,
    /// The slot it answers, and the slot asked for (`None`: a late reply).
    slot: usize,
    asked: Option<usize>,
}

/// Whether the workers of `cfg` are forked from a zygote: `--preload`'s,
/// or the base zygote (the default; not with `--no-zygote`). With
/// `--reuse-port` each spawn request passes the slot's own sockets.
pub(super) fn wanted(cfg: &Config) -> bool {
    cfg.uvicorn().is_some_and(|u| u.preload || u.zygote)
}

/// Whether the zygote of `cfg` is the base one: uvicorn imported, not the
/// app (each worker imports it after the fork).
pub(super) fn is_base(cfg: &Config) -> bool {
    cfg.uvicorn().is_some_and(|u| !u.preload)
}

impl Zygotes {
    /// Whether workers start cold after repeated zygote failures.
    pub(super) fn cold(&self) -> bool {
        self.cold
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(super) fn add(&mut self, z: Zygote) {
        self.list.push(z);
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Zygote> {
        self.list.iter()
    }

    pub(super) fn get_mut(&mut self, pid: Pid) -> Option<&mut Zygote> {
        self.list.iter_mut().find(|z| z.pid == pid)
    }

    /// Asks the zygote of `generation` for a worker in `slot`. Nothing is
    /// sent while it is still starting (it is asked once it is ready: its
    /// channel wakes the loop) or while a request is in flight (asked again
    /// once the reply arrived). The worker joins the table when the reply
    /// arrives, an event like any other. `Err` names the zygote the request
    /// could not reach, and why.
    pub(super) fn ask(
        &mut self,
        slot: usize,
        generation: u64,
        cpu: Option<usize>,
        sockets: &[(usize, RawFd)],
        now: Instant,
    ) -> Result<(), (Pid, String)> {
        let Some(z) = self.ready(generation).filter(|z| z.pending.is_none()) else {
            return Ok(());
        };
        let env: Vec<(String, String)> = super::launch::worker_vars(slot, generation, cpu)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        z.request(slot, generation, &env, sockets, now)
            .map_err(|e| (z.pid, e))
    }

    /// Takes in message `m` of zygote `pid`: its state, the request in
    /// flight, and what a reported worker must be (`uids`, checked by
    /// `verify`: [`crate::pid::verify_reported`] but in tests; `known` says
    /// what a pid already is to the master: a worker, a tracked group).
    pub(super) fn hear(
        &mut self,
        pid: Pid,
        m: FromZygote,
        uids: [u32; 4],
        verify: impl Fn(i64, &Expected) -> Result<ChildPid, String>,
        known: impl Fn(i32) -> Option<&'static str>,
    ) -> Heard {
        let zygotes: Vec<i32> = self.list.iter().map(|z| z.pid.as_raw()).collect();
        let known = |p: i32| {
            if zygotes.contains(&p) {
                return Some("a zygote");
            }
            known(p)
        };
        let Some(z) = self.get_mut(pid) else {
            return Heard::Nothing;
        };
        let parent = std::process::id() as i32;
        match m {
            FromZygote::Unreadable(why) => Heard::Dropped(why),
            // The backoff is reset by a worker it forked, not here: a
            // zygote that imports fine but reports nonsense must still be
            // backed off and given up on.
            FromZygote::Ready if z.state == ZygoteState::Starting => {
                z.state = ZygoteState::Ready;
                Heard::Ready {
                    generation: z.generation,
                    started_at: z.started_at,
                }
            }
            FromZygote::Warning(w)
                if z.state == ZygoteState::Starting && z.warnings < MAX_WARNINGS =>
            {
                z.warnings += 1;
                Heard::Warning(w)
            }
            FromZygote::Ready | FromZygote::Warning(_) => Heard::Dropped("unexpected"),
            FromZygote::Error(why) => match z.pending.take() {
                Some(p) => Heard::SpawnFailed {
                    slot: p.slot,
                    why,
                    stray: None,
                },
                None if z.late > 0 => {
                    z.late -= 1;
                    debug!("Zygote {pid} answered a request given up on: {why}");
                    Heard::Nothing
                }
                None => Heard::Dropped("unexpected"),
            },
            // The reply to the request in flight: a worker only if it is
            // the process that sent it, forked since the request.
            FromZygote::Spawned { slot, pid, sender } if z.pending.is_some() => {
                let Some(pending) = z.pending.take() else {
                    return Heard::Nothing;
                };
                let expected = Expected {
                    parent,
                    uids,
                    not_before: pending.not_before,
                };
                let reply = Reply {
                    pid,
                    sender,
                    slot,
                    asked: Some(pending.slot),
                };
                match check_reply(&reply, &expected, &verify, &known) {
                    Ok(worker) => Heard::Adopt { worker, pending },
                    Err((e, stray)) => Heard::SpawnFailed {
                        slot: pending.slot,
                        why: format!("it reported a worker it did not fork: {e}"),
                        stray,
                    },
                }
            }
            // The reply to a request given up on: killed only if it is a
            // process the zygote forked since it started; a zygote that
            // reports anything else is broken.
            FromZygote::Spawned { slot, pid, sender } if z.late > 0 => {
                z.late -= 1;
                let expected = Expected {
                    parent,
                    uids,
                    not_before: z.started_ticks,
                };
                let reply = Reply {
                    pid,
                    sender,
                    slot,
                    asked: None,
                };
                match check_reply(&reply, &expected, &verify, &known) {
                    Ok(worker) => Heard::Late { worker, slot },
                    Err((why, stray)) => Heard::Untrusted { why, stray },
                }
            }
            FromZygote::Spawned { sender, .. } => {
                let expected = Expected {
                    parent,
                    uids,
                    not_before: z.started_ticks,
                };
                let stray = sender
                    .filter(|&s| known(s).is_none())
                    .and_then(|s| verify(i64::from(s), &expected).ok());
                match stray {
                    Some(stray) => Heard::Unasked { stray },
                    None => Heard::Dropped("unexpected"),
                }
            }
            // Its exit status (reaped soon) says what happened.
            FromZygote::Closed => {
                debug!("Zygote {pid} closed its channel");
                z.closed = true;
                match z.pending.take() {
                    Some(p) => Heard::SpawnFailed {
                        slot: p.slot,
                        why: "the zygote closed its channel".into(),
                        stray: None,
                    },
                    None => Heard::Nothing,
                }
            }
        }
    }

    /// Counts a message dropped from zygote `pid`'s channel; the line to
    /// log, if one is due (the first drop, then at most every
    /// [`DROPS_SAID_EVERY`]).
    pub(super) fn dropped(
        &mut self,
        pid: Pid,
        sender: Option<Sender>,
        why: &'static str,
        now: Instant,
    ) -> Option<DropsLine> {
        let d = &mut self.drops;
        *d.total.entry(why).or_insert(0) += 1;
        d.unsaid += 1;
        if d.said_at
            .is_some_and(|at| now.saturating_duration_since(at) < DROPS_SAID_EVERY)
        {
            return None;
        }
        d.said_at = Some(now);
        Some(DropsLine {
            dropped: std::mem::take(&mut d.unsaid),
            total: d.total.values().sum(),
            why,
            zygote: pid,
            sender,
        })
    }

    /// Messages dropped from zygotes' channels since the start, by reason.
    pub(super) fn drops(&self) -> &BTreeMap<&'static str, u64> {
        &self.drops.total
    }

    /// Gives up on zygote `pid`'s request in flight; returns its slot.
    /// Its reply may still come, once.
    pub(super) fn take_request(&mut self, pid: Pid) -> Option<usize> {
        let z = self.get_mut(pid)?;
        let slot = z.pending.take()?.slot;
        z.late += 1;
        Some(slot)
    }

    /// Whether zygote `pid` is still starting.
    pub(super) fn is_starting(&self, pid: Pid) -> bool {
        self.list
            .iter()
            .any(|z| z.pid == pid && z.state == ZygoteState::Starting)
    }

    /// The zygotes of generations other than `current` that are not
    /// stopping and whose generation has no worker left (`in_use`), as
    /// (pid, generation).
    pub(super) fn unused(&self, current: u64, in_use: impl Fn(u64) -> bool) -> Vec<(Pid, u64)> {
        self.list
            .iter()
            .filter(|z| z.generation != current && z.state != ZygoteState::Stopping)
            .filter(|z| !in_use(z.generation))
            .map(|z| (z.pid, z.generation))
            .collect()
    }

    /// Asks zygote `pid` to exit (SIGTERM: it has nothing to drain).
    pub(super) fn stop(&mut self, pid: Pid) {
        if let Some(z) = self
            .get_mut(pid)
            .filter(|z| z.state != ZygoteState::Stopping)
        {
            z.state = ZygoteState::Stopping;
            signal_group(z.pid, Signal::SIGTERM);
        }
    }

    /// Asks every zygote to exit.
    pub(super) fn stop_all(&mut self) {
        let pids: Vec<Pid> = self.list.iter().map(|z| z.pid).collect();
        for pid in pids {
            self.stop(pid);
        }
    }

    /// Kills zygote `pid` (found broken, out of time, or in the way of an
    /// upgrade), saying why in its exit line; true unless it was already
    /// stopping (then its failure was counted already).
    pub(super) fn kill(&mut self, pid: Pid, cause: &'static str) -> bool {
        let Some(z) = self
            .get_mut(pid)
            .filter(|z| z.state != ZygoteState::Stopping)
        else {
            return false;
        };
        z.state = ZygoteState::Stopping;
        z.kill_cause = Some(cause);
        signal_group(pid, Signal::SIGKILL);
        true
    }

    /// Takes a reaped zygote out.
    pub(super) fn remove(&mut self, pid: Pid) -> Option<Zygote> {
        let i = self.list.iter().position(|z| z.pid == pid)?;
        Some(self.list.swap_remove(i))
    }

    /// The zygote of `generation` that takes spawn requests, if any.
    pub(super) fn ready(&mut self, generation: u64) -> Option<&mut Zygote> {
        self.list
            .iter_mut()
            .find(|z| z.generation == generation && z.state == ZygoteState::Ready && !z.closed)
    }

    /// Whether a zygote of `generation` is starting or ready.
    pub(super) fn has(&self, generation: u64) -> bool {
        self.list
            .iter()
            .any(|z| z.generation == generation && z.state != ZygoteState::Stopping)
    }

    /// Whether a zygote awaits a reply on an open channel.
    pub(super) fn awaiting(&self) -> bool {
        self.list.iter().any(|z| z.pending.is_some() && !z.closed)
    }

    /// Whether a new zygote may start: no restart backoff pending (its
    /// end is a deadline, `Due::ZygoteBackoffOver`, which clears it).
    pub(super) fn may_start(&self) -> bool {
        self.backoff.next_spawn_at.is_none()
    }

    /// The channels still open, to poll.
    pub(super) fn channels(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.list.iter().filter(|z| !z.closed).map(|z| z.fd())
    }

    /// The messages waiting on the open channels, a bounded batch of each
    /// (see [`Zygote::drain`]).
    pub(super) fn drain(&self) -> Vec<(Pid, FromZygote, Option<Sender>)> {
        self.list
            .iter()
            .filter(|z| !z.closed)
            .flat_map(|z| z.drain().into_iter().map(move |(m, s)| (z.pid, m, s)))
            .collect()
    }

    /// Pending deadlines: a starting zygote must be ready within
    /// `startup_timeout`, a spawn request must be answered in time, and a
    /// restart waits for its backoff.
    pub(super) fn deadlines(&self, startup_timeout: Duration) -> Vec<(Instant, Due)> {
        let starting = self
            .list
            .iter()
            .filter(|z| z.state == ZygoteState::Starting)
            .map(|z| {
                (
                    z.started_at + startup_timeout,
                    Due::ZygoteStartTimeout(z.pid),
                )
            });
        let pending = self.list.iter().filter_map(|z| {
            let p = z.pending.as_ref()?;
            Some((p.deadline(z.reply_within), Due::ZygoteSpawnTimeout(z.pid)))
        });
        let restart = self
            .backoff
            .next_spawn_at
            .map(|at| (at, Due::ZygoteBackoffOver));
        starting.chain(pending).chain(restart).collect()
    }

    /// Gives zygotes a new chance (a new generation of the base zygote):
    /// no backoff, no cold starts.
    pub(super) fn warm_again(&mut self) {
        self.backoff = Backoff::default();
        self.cold = false;
    }

    /// Workers start cold from now on (a base zygote that could not
    /// start); true if they did not already.
    pub(super) fn go_cold(&mut self) -> bool {
        !std::mem::replace(&mut self.cold, true)
    }

    /// The restart backoff is over.
    pub(super) fn backoff_over(&mut self) {
        self.backoff.next_spawn_at = None;
    }

    /// A zygote forked a worker: restarts start over.
    pub(super) fn worked(&mut self) {
        self.backoff = Backoff::default();
    }

    /// A zygote failed: restarts back off. Returns the count when this
    /// failure makes workers start cold.
    pub(super) fn failed(&mut self, now: Instant) -> Option<u32> {
        self.backoff = policy::after_death(self.backoff, true, now);
        if self.backoff.failures >= FAILURES_BEFORE_COLD && !self.cold {
            self.cold = true;
            return Some(self.backoff.failures);
        }
        None
    }
}

/// A reply's worker, if the reply names the process that sent it, that
/// process is not `known` to the master already, it passes `verify`, and it
/// answers the slot asked for. Else why not, and the sender when it is a
/// fresh child of the master that nothing supervises (`stray`).
#[allow(clippy::type_complexity)]
fn check_reply(
    reply: &Reply,
    expected: &Expected,
    verify: &impl Fn(i64, &Expected) -> Result<ChildPid, String>,
    known: &impl Fn(i32) -> Option<&'static str>,
) -> Result<ChildPid, (String, Option<ChildPid>)> {
    let stray = |sender: Option<i32>| {
        let s = sender?;
        if known(s).is_some() {
            return None;
        }
        verify(i64::from(s), expected).ok()
    };
    let pid = reply.pid;
    let Some(sender) = reply.sender.filter(|&s| i64::from(s) == pid) else {
        let by = match reply.sender {
            Some(s) => format!("pid {s}"),
            None => "an unknown process".into(),
        };
        return Err((
            format!("pid {pid} is not the process that sent the reply ({by} did)"),
            stray(reply.sender),
        ));
    };
    if let Some(what) = known(sender) {
        return Err((format!("pid {pid} is already {what}"), None));
    }
    let worker = verify(pid, expected).map_err(|e| (e, None))?;
    match reply.asked {
        Some(asked) if asked != reply.slot => Err((
            format!(
                "pid {pid} answered for slot {}, not for slot {asked}",
                reply.slot
            ),
            Some(worker),
        )),
        _ => Ok(worker),
    }
}

#[cfg(test)]
mod tests;
