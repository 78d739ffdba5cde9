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
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::debug;

use super::exits::signal_group;
use crate::config::Config;
use crate::pid::{ChildPid, Expected};
use crate::policy::{self, Backoff, Due};
use crate::zygote::{FromZygote, Pending, Zygote, ZygoteState};

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
    /// The zygote that sent it.
    pub zygote: Pid,
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
/// or the base zygote (the default; not with `--no-zygote`, nor with
/// `--reuse-port`, whose workers each get their own sockets).
pub(super) fn wanted(cfg: &Config) -> bool {
    cfg.uvicorn()
        .is_some_and(|u| u.preload || (u.zygote && !cfg.reuse_port))
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
        now: Instant,
    ) -> Result<(), (Pid, String)> {
        let Some(z) = self.ready(generation).filter(|z| z.pending.is_none()) else {
            return Ok(());
        };
        let env = [
            ("PROCMAN_WORKER_ID".to_string(), slot.to_string()),
            ("PROCMAN_GENERATION".to_string(), generation.to_string()),
        ];
        z.request(slot, generation, &env, now)
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
            FromZygote::Spawned { .. } => Heard::Dropped("unexpected"),
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

    /// Kills zygote `pid`, found broken or out of time; true unless it was
    /// already stopping (then its failure was counted already).
    pub(super) fn kill(&mut self, pid: Pid) -> bool {
        let Some(z) = self
            .get_mut(pid)
            .filter(|z| z.state != ZygoteState::Stopping)
        else {
            return false;
        };
        z.state = ZygoteState::Stopping;
        signal_group(pid, Signal::SIGKILL);
        true
    }

    /// Takes a reaped zygote out.
    pub(super) fn remove(&mut self, pid: Pid) -> Option<Zygote> {
        let i = self.list.iter().position(|z| z.pid == pid)?;
        Some(self.list.swap_remove(i))
    }

    /// The zygote of `generation` that takes spawn requests, if any.
    fn ready(&mut self, generation: u64) -> Option<&mut Zygote> {
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
    pub(super) fn drain(&self) -> Vec<(Pid, FromZygote)> {
        self.list
            .iter()
            .filter(|z| !z.closed)
            .flat_map(|z| z.drain().into_iter().map(move |m| (z.pid, m)))
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
            Some((p.deadline(), Due::ZygoteSpawnTimeout(z.pid)))
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
mod tests {
    use super::*;

    #[test]
    fn three_failures_in_a_row_mean_cold_starts_and_restarts_back_off() {
        let now = Instant::now();
        let mut z = Zygotes::default();
        assert_eq!(z.failed(now), None);
        assert!(z.may_start(), "the first restart is at once");
        assert_eq!(z.failed(now), None);
        assert!(!z.may_start(), "the second waits");
        let at = now + Duration::from_secs(1);
        assert_eq!(
            z.deadlines(Duration::from_secs(60)),
            vec![(at, Due::ZygoteBackoffOver)]
        );
        z.backoff_over();
        assert!(z.may_start());
        assert!(z.deadlines(Duration::from_secs(60)).is_empty());
        assert_eq!(z.failed(now), Some(3));
        assert!(z.cold());
        assert_eq!(z.failed(now), None, "said once");
    }

    #[test]
    fn a_zygote_that_forks_a_worker_resets_the_backoff() {
        let now = Instant::now();
        let mut z = Zygotes::default();
        z.failed(now);
        z.failed(now);
        z.worked();
        assert!(z.may_start());
        assert_eq!(z.failed(now), None);
        assert_eq!(z.failed(now), None);
        assert!(!z.cold(), "the count started over");
    }

    /// A zygote of `generation` (a made-up pid; nothing is signalled) and
    /// the zygote's end of its channel, to read what the master sent.
    fn zygote(pid: i32, generation: u64, now: Instant) -> (Zygote, std::os::fd::OwnedFd) {
        let (master_end, zygote_end) = crate::zygote::channel().expect("socketpair");
        let z = Zygote::new(Pid::from_raw(pid), generation, master_end, now);
        (z, zygote_end)
    }

    /// What the master sent on a channel, one message per datagram.
    fn sent(fd: &std::os::fd::OwnedFd) -> Vec<serde_json::Value> {
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            out.push(serde_json::from_slice(&buf[..n]).expect("json"));
        }
        out
    }

    /// A verifier that accepts every pid, recording what it was asked.
    fn trusting(
        seen: &std::cell::RefCell<Vec<(i64, u64)>>,
    ) -> impl Fn(i64, &Expected) -> Result<ChildPid, String> + '_ {
        move |pid, expected| {
            seen.borrow_mut().push((pid, expected.not_before));
            ChildPid::new(pid as i32).ok_or_else(|| "not a child".to_string())
        }
    }

    fn refusing(_: i64, _: &Expected) -> Result<ChildPid, String> {
        Err("pid 5 is not the master's child".into())
    }

    const UIDS: [u32; 4] = [0; 4];

    /// Nothing is known to the master but its zygotes.
    fn unknown(_: i32) -> Option<&'static str> {
        None
    }

    /// A reply to slot `slot` naming `pid`, sent by `pid` itself.
    fn reply(slot: usize, pid: i32) -> FromZygote {
        FromZygote::Spawned {
            slot,
            pid: pid.into(),
            sender: Some(pid),
        }
    }

    #[test]
    fn a_ready_zygote_of_the_generation_serves_one_request_at_a_time() {
        let now = Instant::now();
        let mut zs = Zygotes::default();
        let (z, theirs) = zygote(100, 2, now);
        zs.add(z);
        let zpid = Pid::from_raw(100);
        assert_eq!(zs.ask(0, 2, now), Ok(()));
        assert!(sent(&theirs).is_empty(), "still starting: not asked");
        assert_eq!(
            zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown),
            Heard::Ready {
                generation: 2,
                started_at: now
            }
        );
        assert_eq!(
            zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown),
            Heard::Dropped("unexpected")
        );
        assert_eq!(zs.ask(0, 1, now), Ok(()));
        assert!(sent(&theirs).is_empty(), "not the generation's zygote");
        assert_eq!(zs.ask(3, 2, now), Ok(()));
        let got = sent(&theirs);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["spawn"]["slot"], 3);
        assert_eq!(got[0]["spawn"]["env"]["PROCMAN_WORKER_ID"], "3");
        assert_eq!(got[0]["spawn"]["env"]["PROCMAN_GENERATION"], "2");
        let reply_by = now + crate::zygote::SPAWN_REPLY;
        assert!(zs
            .deadlines(Duration::from_secs(60))
            .contains(&(reply_by, Due::ZygoteSpawnTimeout(zpid))));
        assert_eq!(zs.ask(4, 2, now), Ok(()));
        assert!(sent(&theirs).is_empty(), "one request in flight at a time");

        // The awaited reply: verified against the request, then adopted.
        let seen = std::cell::RefCell::new(Vec::new());
        let Heard::Adopt { worker, pending } =
            zs.hear(zpid, reply(3, 500), UIDS, trusting(&seen), unknown)
        else {
            panic!("not adopted");
        };
        assert_eq!(worker.as_raw(), 500);
        assert_eq!((pending.slot, pending.generation), (3, 2));
        assert_eq!(seen.borrow().last(), Some(&(500, pending.not_before)));
        assert!(zs.deadlines(Duration::from_secs(60)).is_empty(), "answered");
        assert_eq!(
            zs.hear(zpid, reply(3, 501), UIDS, trusting(&seen), unknown),
            Heard::Dropped("unexpected"),
            "a reply to no request"
        );
        assert_eq!(zs.ask(4, 2, now), Ok(()));
        assert_eq!(sent(&theirs).len(), 1, "the next request goes out");
    }

    #[test]
    fn a_reply_adopts_the_process_that_sent_it_once() {
        let now = Instant::now();
        let mut zs = Zygotes::default();
        let (z, _theirs) = zygote(100, 1, now);
        zs.add(z);
        let zpid = Pid::from_raw(100);
        zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown);
        let seen = std::cell::RefCell::new(Vec::new());
        let adopted = |p: i32| (p == 500).then_some("a worker");
        let failed = |why: &str, stray: Option<i32>| Heard::SpawnFailed {
            slot: 1,
            why: format!("it reported a worker it did not fork: {why}"),
            stray: stray.and_then(ChildPid::new),
        };
        let cases: Vec<(FromZygote, Heard)> = vec![
            // One pid for two slots: refused, whoever sends it.
            (reply(1, 500), failed("pid 500 is already a worker", None)),
            (
                FromZygote::Spawned {
                    slot: 1,
                    pid: 500,
                    sender: Some(502),
                },
                failed(
                    "pid 500 is not the process that sent the reply (pid 502 did)",
                    Some(502),
                ),
            ),
            // The zygote itself, naming itself or its fork.
            (reply(1, 100), failed("pid 100 is already a zygote", None)),
            (
                FromZygote::Spawned {
                    slot: 1,
                    pid: 503,
                    sender: Some(100),
                },
                failed(
                    "pid 503 is not the process that sent the reply (pid 100 did)",
                    None,
                ),
            ),
            (
                FromZygote::Spawned {
                    slot: 1,
                    pid: 503,
                    sender: None,
                },
                failed(
                    "pid 503 is not the process that sent the reply (an unknown process did)",
                    None,
                ),
            ),
            // Its fork, answering for a slot it was not asked.
            (
                reply(7, 504),
                failed("pid 504 answered for slot 7, not for slot 1", Some(504)),
            ),
        ];
        for (message, want) in cases {
            zs.ask(1, 1, now).expect("sent");
            let got = zs.hear(zpid, message.clone(), UIDS, trusting(&seen), adopted);
            assert_eq!(got, want, "{message:?}");
        }
        // A late reply (the request was given up on) is checked the same
        // way, once.
        zs.ask(1, 1, now).expect("sent");
        assert_eq!(zs.take_request(zpid), Some(1));
        assert_eq!(
            zs.hear(zpid, reply(1, 500), UIDS, trusting(&seen), adopted),
            Heard::Untrusted {
                why: "pid 500 is already a worker".into(),
                stray: None
            }
        );
        assert_eq!(
            zs.hear(zpid, reply(1, 505), UIDS, trusting(&seen), adopted),
            Heard::Dropped("unexpected"),
            "one late reply per request given up on"
        );
    }

    #[test]
    fn a_request_fails_on_an_error_an_untrusted_reply_or_a_closed_channel() {
        let now = Instant::now();
        let mut zs = Zygotes::default();
        let (z, _theirs) = zygote(200, 1, now);
        zs.add(z);
        let zpid = Pid::from_raw(200);
        zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown);

        assert_eq!(
            zs.hear(
                zpid,
                FromZygote::Error("boom".into()),
                UIDS,
                refusing,
                unknown
            ),
            Heard::Dropped("unexpected"),
            "no request in flight"
        );
        zs.ask(0, 1, now).expect("sent");
        assert_eq!(
            zs.hear(
                zpid,
                FromZygote::Error("boom".into()),
                UIDS,
                refusing,
                unknown
            ),
            Heard::SpawnFailed {
                slot: 0,
                why: "boom".into(),
                stray: None
            }
        );
        zs.ask(1, 1, now).expect("sent");
        assert_eq!(
            zs.hear(zpid, reply(1, 5), UIDS, refusing, unknown),
            Heard::SpawnFailed {
                slot: 1,
                why: "it reported a worker it did not fork: pid 5 is not the master's child".into(),
                stray: None
            }
        );
        zs.ask(2, 1, now).expect("sent");
        assert_eq!(zs.take_request(zpid), Some(2), "given up on (timed out)");
        assert_eq!(zs.take_request(zpid), None);
        assert_eq!(
            zs.hear(zpid, reply(2, 5), UIDS, refusing, unknown),
            Heard::Untrusted {
                why: "pid 5 is not the master's child".into(),
                stray: None
            },
            "a late reply naming a stranger"
        );
        zs.ask(2, 1, now).expect("sent");
        assert_eq!(
            zs.hear(zpid, FromZygote::Closed, UIDS, refusing, unknown),
            Heard::SpawnFailed {
                slot: 2,
                why: "the zygote closed its channel".into(),
                stray: None
            }
        );
        assert_eq!(zs.channels().count(), 0, "a closed channel is not polled");
        assert_eq!(zs.ask(3, 1, now), Ok(()), "nobody to ask");
        assert!(zs.deadlines(Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn what_a_zygote_sends_out_of_turn_is_dropped_counted_and_said_at_most_every_10_s() {
        let now = Instant::now();
        let mut zs = Zygotes::default();
        let (z, _theirs) = zygote(100, 1, now);
        zs.add(z);
        let zpid = Pid::from_raw(100);
        let warning = || FromZygote::Warning("threads".into());
        for _ in 0..MAX_WARNINGS {
            assert_eq!(
                zs.hear(zpid, warning(), UIDS, refusing, unknown),
                Heard::Warning("threads".into())
            );
        }
        assert_eq!(
            zs.hear(zpid, warning(), UIDS, refusing, unknown),
            Heard::Dropped("unexpected"),
            "a few warnings while it starts"
        );
        zs.hear(zpid, FromZygote::Ready, UIDS, refusing, unknown);
        assert_eq!(
            zs.hear(
                zpid,
                FromZygote::Unreadable("oversized"),
                UIDS,
                refusing,
                unknown
            ),
            Heard::Dropped("oversized")
        );
        let first = zs.dropped(zpid, "unexpected", now);
        assert_eq!(
            first,
            Some(DropsLine {
                dropped: 1,
                total: 1,
                why: "unexpected",
                zygote: zpid
            }),
            "the first drop is said at once"
        );
        for i in 0..1000 {
            let at = now + Duration::from_millis(i);
            assert_eq!(zs.dropped(zpid, "oversized", at), None, "counted, not said");
        }
        let later = now + DROPS_SAID_EVERY;
        assert_eq!(
            zs.dropped(zpid, "oversized", later),
            Some(DropsLine {
                dropped: 1001,
                total: 1002,
                why: "oversized",
                zygote: zpid
            })
        );
        assert_eq!(
            zs.drops(),
            &BTreeMap::from([("oversized", 1001), ("unexpected", 1)])
        );
    }

    #[test]
    fn a_starting_zygote_is_due_by_the_startup_timeout_and_old_ones_retire_when_unused() {
        let now = Instant::now();
        let mut zs = Zygotes::default();
        let (old, _a) = zygote(300, 1, now);
        let (new, _b) = zygote(301, 2, now);
        zs.add(old);
        zs.add(new);
        let timeout = Duration::from_secs(30);
        let mut got = zs.deadlines(timeout);
        got.sort_by_key(|(_, d)| format!("{d:?}"));
        assert_eq!(
            got,
            vec![
                (now + timeout, Due::ZygoteStartTimeout(Pid::from_raw(300))),
                (now + timeout, Due::ZygoteStartTimeout(Pid::from_raw(301))),
            ]
        );
        assert!(zs.is_starting(Pid::from_raw(301)));
        assert!(zs.has(1) && zs.has(2) && !zs.has(3));
        assert_eq!(zs.unused(2, |_| true), vec![]);
        assert_eq!(zs.unused(2, |g| g != 1), vec![(Pid::from_raw(300), 1)]);
        assert_eq!(
            zs.unused(2, |_| false),
            vec![(Pid::from_raw(300), 1)],
            "never the current one"
        );
    }
}
