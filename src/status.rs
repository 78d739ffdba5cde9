//! What the master reports about itself: a status snapshot (for `procman
//! status` and `/metrics`), the exit reasons it counts, and the counters
//! and histograms it keeps between snapshots.
//!
//! The master fills a [`Snapshot`] when asked (the memory of each worker's
//! process group, read from /proc at most once a second: a
//! [`MemoryCache`]); [`Observed`] is the running record
//! (restarts per slot and per reason, reload results, durations) the
//! master updates as events happen. Nothing here does I/O except the
//! memory scan and the cgroup OOM counter.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

/// Why a worker's process ended, as counted in
/// `procman_worker_restarts_total{reason}` and logged as `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// Died on its own (exit or a signal procman did not send).
    Crash,
    /// Killed by the kernel's OOM killer.
    OomKill,
    /// No heartbeat or not ready in time.
    Timeout,
    /// Recycled after --max-requests.
    MaxRequests,
    /// Recycled above --max-worker-memory.
    Memory,
    /// Recycled at --max-worker-lifetime.
    Lifetime,
    /// Replaced by a reload (or part of a failed one).
    Reload,
    /// One worker too many (TTOU, `procman scale`).
    Scale,
    /// procman stopped.
    Shutdown,
}

impl ExitReason {
    /// Every reason, in label order.
    pub const ALL: [ExitReason; 9] = [
        ExitReason::Crash,
        ExitReason::OomKill,
        ExitReason::Timeout,
        ExitReason::MaxRequests,
        ExitReason::Memory,
        ExitReason::Lifetime,
        ExitReason::Reload,
        ExitReason::Scale,
        ExitReason::Shutdown,
    ];

    /// Its label: `crash`, `oom_kill`…
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Crash => "crash",
            ExitReason::OomKill => "oom_kill",
            ExitReason::Timeout => "timeout",
            ExitReason::MaxRequests => "max_requests",
            ExitReason::Memory => "memory",
            ExitReason::Lifetime => "lifetime",
            ExitReason::Reload => "reload",
            ExitReason::Scale => "scale",
            ExitReason::Shutdown => "shutdown",
        }
    }

    /// The reason of a recycle, from the text the master logged for it
    /// ("lifetime reached…", "memory … above …", "reload failed: …" for a
    /// worker whose priority a failed reload cannot give back, or what the worker said
    /// when it asked: its request limit).
    pub fn of_recycle(why: &str) -> ExitReason {
        if why.starts_with("lifetime") {
            ExitReason::Lifetime
        } else if why.starts_with("memory") {
            ExitReason::Memory
        } else if why.starts_with("reload") {
            ExitReason::Reload
        } else {
            ExitReason::MaxRequests
        }
    }
}

/// One worker in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    /// `starting`, `ready` or `stopping`.
    pub state: String,
    pub age_s: f64,
    pub rss_bytes: Option<u64>,
    pub uss_bytes: Option<u64>,
    pub heartbeat_age_s: Option<f64>,
    /// Restarts of its slot so far.
    pub restarts: u64,
    /// How the slot's previous worker ended, if one did.
    pub last_exit: Option<String>,
}

/// The master at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub pid: i32,
    /// `-n/--name`, else the APP or the command's name.
    #[serde(default)]
    pub name: String,
    pub version: String,
    pub uptime_s: f64,
    pub generation: u64,
    /// `booting`, `running` or `stopping`.
    pub state: String,
    pub target: usize,
    /// `in progress`, or the last reload's result (`ok`, or why it
    /// failed), or null if none was asked for.
    pub reload: Option<String>,
    pub workers: Vec<WorkerStatus>,
    /// Restarts per reason since start.
    pub restarts: BTreeMap<String, u64>,
    /// Reloads per result (`ok`, `failed`).
    pub reloads: BTreeMap<String, u64>,
    /// Accept queue length per bind address (TCP listeners).
    pub listen_queue: Vec<(String, u64)>,
    /// What the notify socket discarded, by reason.
    #[serde(default)]
    pub notify_dropped: BTreeMap<String, u64>,
    /// Messages dropped from zygotes' channels, by reason (`oversized`,
    /// `unreadable`, `unexpected`).
    #[serde(default)]
    pub zygote_drops: BTreeMap<String, u64>,
}

impl Snapshot {
    /// The table `procman status` prints. Its text comes from the master's
    /// answer, and some of it from workers (a failed reload's reason):
    /// control characters are shown escaped, so that each row stays one
    /// line and the terminal is not driven ([`crate::escape::text`]).
    pub fn table(&self) -> String {
        use crate::escape::text;
        let mut out = format!(
            "procman {} pid {} up {} generation {} {} workers {}/{} ready{}\n",
            text(&self.version),
            self.pid,
            human(self.uptime_s),
            self.generation,
            text(&self.state),
            self.workers.iter().filter(|w| w.state == "ready").count(),
            self.target,
            match &self.reload {
                Some(r) => format!(", last reload: {}", text(r)),
                None => String::new(),
            }
        );
        out.push_str(&format!(
            "{:>4} {:>8} {:>4} {:<8} {:>8} {:>10} {:>10} {:>9} {:>8}  {}\n",
            "SLOT",
            "PID",
            "GEN",
            "STATE",
            "AGE",
            "RSS",
            "USS",
            "HEARTBEAT",
            "RESTARTS",
            "LAST EXIT"
        ));
        for w in &self.workers {
            out.push_str(&format!(
                "{:>4} {:>8} {:>4} {:<8} {:>8} {:>10} {:>10} {:>9} {:>8}  {}\n",
                w.slot,
                w.pid,
                w.generation,
                text(&w.state),
                human(w.age_s),
                w.rss_bytes.map(mib).unwrap_or_else(|| "-".into()),
                w.uss_bytes.map(mib).unwrap_or_else(|| "-".into()),
                w.heartbeat_age_s
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                w.restarts,
                text(w.last_exit.as_deref().unwrap_or("-")),
            ));
        }
        out
    }
}

fn human(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// What the master records as things happen.
#[derive(Debug)]
pub struct Observed {
    /// Per slot: restarts and the last exit (reason: description).
    pub slots: BTreeMap<usize, (u64, String)>,
    /// Per reason.
    pub restarts: BTreeMap<ExitReason, u64>,
    /// Reloads per result.
    pub reloads: BTreeMap<&'static str, u64>,
    /// The last reload's result, or "in progress".
    pub last_reload: Option<String>,
    pub reload_duration: Histogram,
    pub time_to_ready: Histogram,
    /// The cgroup's `oom_kill` count when last read.
    oom_kills: Option<u64>,
    /// procman's own memory cgroup.
    cgroup: Option<crate::procfs::MemoryCgroup>,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            slots: BTreeMap::new(),
            restarts: ExitReason::ALL.iter().map(|r| (*r, 0)).collect(),
            reloads: [("ok", 0), ("failed", 0)].into_iter().collect(),
            last_reload: None,
            reload_duration: Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            time_to_ready: Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            oom_kills: oom_kill_count(),
            cgroup: crate::procfs::memory_cgroup(None),
        }
    }
}

impl Observed {
    /// A worker of `slot` ended for `reason`, described by `how`.
    pub fn exited(&mut self, slot: usize, reason: ExitReason, how: &str) {
        *self.restarts.entry(reason).or_default() += 1;
        let e = self.slots.entry(slot).or_default();
        if reason != ExitReason::Shutdown && reason != ExitReason::Scale {
            e.0 += 1;
        }
        e.1 = format!("{}: {how}", reason.as_str());
    }

    /// A worker became ready `after` its fork.
    pub fn ready(&self, after: Duration) {
        self.time_to_ready.observe(after.as_secs_f64());
    }

    /// A reload ended: `Ok` or why it failed, after `took`.
    pub fn reload_done(&mut self, result: Result<(), String>, took: Duration) {
        let (key, text) = match result {
            Ok(()) => ("ok", "ok".to_string()),
            Err(why) => ("failed", format!("failed: {why}")),
        };
        *self.reloads.entry(key).or_default() += 1;
        self.reload_duration.observe(took.as_secs_f64());
        self.last_reload = Some(text);
    }

    /// A worker's own memory cgroup, with its OOM kill count now, if it is
    /// in one other than procman's.
    pub fn own_cgroup_of(&self, pid: i32) -> Option<(crate::procfs::MemoryCgroup, u64)> {
        let cgroup = crate::procfs::memory_cgroup(Some(pid))?;
        if self.cgroup.as_ref() == Some(&cgroup) {
            return None;
        }
        let count = cgroup.oom_kills()?;
        Some((cgroup, count))
    }

    /// Whether a worker's SIGKILL (one procman did not send) was the OOM
    /// killer's: `own` is its own cgroup, if it has one.
    pub fn oom_verdict(&mut self, own: Option<&(crate::procfs::MemoryCgroup, u64)>) -> OomVerdict {
        let procmans_rose = self.oom_killed_since();
        oom_verdict(
            own.map(|(c, before)| (*before, c.oom_kills())),
            procmans_rose,
        )
    }

    /// Whether the kernel's OOM killer killed something in procman's
    /// cgroup since the last call (cgroup v2 `memory.events`, `oom_kill`).
    /// Called when a worker died of a SIGKILL procman did not send.
    pub fn oom_killed_since(&mut self) -> bool {
        let now = oom_kill_count();
        let before = std::mem::replace(&mut self.oom_kills, now);
        matches!((before, now), (Some(b), Some(n)) if n > b)
    }
}

/// Whether a SIGKILL procman did not send was the OOM killer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomVerdict {
    No,
    /// The worker's own memory cgroup counted an OOM kill.
    Yes,
    /// procman's memory cgroup, which the worker shares with others,
    /// counted one: perhaps of this worker.
    Perhaps,
}

/// The verdict from the worker's own cgroup's counts (`(at ready, now)`;
/// `None` if it has none) and whether procman's cgroup's count rose. A
/// worker's own counter, where readable, decides alone.
pub fn oom_verdict(own: Option<(u64, Option<u64>)>, procmans_rose: bool) -> OomVerdict {
    match own {
        Some((before, Some(now))) if now > before => OomVerdict::Yes,
        Some((_, Some(_))) => OomVerdict::No,
        _ if procmans_rose => OomVerdict::Perhaps,
        _ => OomVerdict::No,
    }
}

/// The `oom_kill` count of procman's own memory cgroup, if readable: cgroup
/// v2's `memory.events` (which counts the subtree, where the workers are)
/// or, on a v1 (or hybrid) hierarchy, the memory controller's
/// `memory.oom_control` (which counts that cgroup's own processes).
pub fn oom_kill_count() -> Option<u64> {
    crate::procfs::memory_cgroup(None)?.oom_kills()
}

/// Resident and unique memory of the process groups `groups`, summed over
/// their members among the master's descendants ([`crate::procfs::members`]):
/// RSS and USS (private pages) from `smaps_rollup`, read only for members
/// of those groups.
pub fn memory_by_group(groups: &std::collections::BTreeSet<i32>) -> BTreeMap<i32, (u64, u64)> {
    memory_among(crate::procfs::members(), groups)
}

/// The same for one group, whose leader is `pgid`, among the leader's own
/// descendants: a worker started since the last full read.
pub fn memory_of_group(pgid: i32) -> Option<(u64, u64)> {
    let pids = crate::procfs::descendants(pgid).unwrap_or_else(|| vec![pgid]);
    memory_among(pids, &std::collections::BTreeSet::from([pgid])).remove(&pgid)
}

fn memory_among(
    pids: Vec<i32>,
    groups: &std::collections::BTreeSet<i32>,
) -> BTreeMap<i32, (u64, u64)> {
    let mut out: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for pid in pids {
        let Some(stat) = crate::procfs::stat(pid).filter(|s| groups.contains(&s.pgrp)) else {
            continue;
        };
        let (rss, uss) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .map(|s| parse_rollup(&s))
            .unwrap_or((0, 0));
        let e = out.entry(stat.pgrp).or_default();
        e.0 += rss;
        e.1 += uss;
    }
    out
}

/// How old the memory figures of a snapshot may be.
pub const MEMORY_MAX_AGE: Duration = Duration::from_secs(1);

/// The memory of the workers' groups, read at most once per
/// [`MEMORY_MAX_AGE`] however many snapshots are asked for (a burst of
/// scrapes costs one read). A group that was not there at the last read (a
/// worker started since) is read alone, from its leader, once.
#[derive(Debug, Default)]
pub struct MemoryCache {
    taken: Option<std::time::Instant>,
    by_group: BTreeMap<i32, Option<(u64, u64)>>,
}

impl MemoryCache {
    /// The memory of each of `groups` (absent: none of its processes could
    /// be read), from the figures read at most [`MEMORY_MAX_AGE`] before
    /// `now`; otherwise `all` reads every group afresh. A group the last
    /// read did not cover is read by `one`.
    pub fn get(
        &mut self,
        groups: &std::collections::BTreeSet<i32>,
        now: std::time::Instant,
        all: impl FnOnce(&std::collections::BTreeSet<i32>) -> BTreeMap<i32, (u64, u64)>,
        mut one: impl FnMut(i32) -> Option<(u64, u64)>,
    ) -> BTreeMap<i32, (u64, u64)> {
        let fresh = self
            .taken
            .is_some_and(|t| now.saturating_duration_since(t) < MEMORY_MAX_AGE);
        if !fresh {
            let read = all(groups);
            self.by_group = groups.iter().map(|g| (*g, read.get(g).copied())).collect();
            self.taken = Some(now);
        }
        // Forget the groups of reaped workers: the table is bounded, and
        // so is this.
        self.by_group.retain(|g, _| groups.contains(g));
        for g in groups {
            if !self.by_group.contains_key(g) {
                self.by_group.insert(*g, one(*g));
            }
        }
        self.by_group
            .iter()
            .filter_map(|(g, m)| Some((*g, (*m)?)))
            .collect()
    }
}

/// RSS and USS (Private_Clean + Private_Dirty) in bytes from
/// `smaps_rollup`.
pub fn parse_rollup(text: &str) -> (u64, u64) {
    let mut rss = 0;
    let mut uss = 0;
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(key), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(kb) = v.parse::<u64>() else { continue };
        match key {
            "Rss:" => rss += kb * 1024,
            "Private_Clean:" | "Private_Dirty:" => uss += kb * 1024,
            _ => {}
        }
    }
    (rss, uss)
}

/// The accept queue length of a listening TCP socket, as the kernel
/// reports it: for a socket in LISTEN state, `TCP_INFO`'s `tcpi_unacked`
/// is the number of connections waiting to be accepted.
pub fn listen_queue(fd: std::os::fd::RawFd) -> Option<u64> {
    // SAFETY: tcp_info is plain old data; all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info and len are valid for writes of len bytes; the kernel
    // writes at most len bytes and updates len; a non-TCP fd fails.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // TCP_LISTEN is state 10.
    (rc == 0 && info.tcpi_state == 10).then_some(info.tcpi_unacked as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_is_the_oom_killers_for_sure_only_by_the_workers_own_cgroup() {
        use OomVerdict::*;
        // Its own cgroup counted one: sure, whatever procman's says.
        assert_eq!(oom_verdict(Some((1, Some(2))), false), Yes);
        assert_eq!(oom_verdict(Some((1, Some(2))), true), Yes);
        // Its own cgroup counted none: another process was the victim.
        assert_eq!(oom_verdict(Some((1, Some(1))), true), No);
        // Only procman's cgroup (shared), or its own is gone: perhaps.
        assert_eq!(oom_verdict(None, true), Perhaps);
        assert_eq!(oom_verdict(Some((1, None)), true), Perhaps);
        assert_eq!(oom_verdict(None, false), No);
        assert_eq!(oom_verdict(Some((1, None)), false), No);
    }

    #[test]
    fn memory_events_and_smaps_rollup_parse() {
        let events = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(crate::procfs::parse_oom_kill(events), Some(2));
        assert_eq!(crate::procfs::parse_oom_kill("low 0\n"), None);
        let rollup = "00400000-7ffd [rollup]\nRss:                1000 kB\nPss:  500 kB\nPrivate_Clean:  10 kB\nPrivate_Dirty:  30 kB\n";
        assert_eq!(parse_rollup(rollup), (1000 * 1024, 40 * 1024));
    }

    #[test]
    fn a_burst_of_snapshots_reads_proc_once_a_second() {
        use std::collections::BTreeSet;
        let mut cache = MemoryCache::default();
        let (mut alls, mut ones) = (0, 0);
        let t0 = std::time::Instant::now();
        let groups = BTreeSet::from([10, 20]);
        let mem = |groups: &BTreeSet<i32>| groups.iter().map(|g| (*g, (*g as u64, 1))).collect();
        // 128 scrapes in one pass, and more within the second.
        for i in 0..128u64 {
            let at = t0 + Duration::from_millis(i * 7);
            let got = cache.get(
                &groups,
                at,
                |g| {
                    alls += 1;
                    mem(g)
                },
                |_| {
                    ones += 1;
                    None
                },
            );
            assert_eq!(got, BTreeMap::from([(10, (10, 1)), (20, (20, 1))]));
        }
        assert_eq!((alls, ones), (1, 0), "one read of /proc for the burst");
        // A worker started since: read alone, once; a reaped one is gone.
        let later = BTreeSet::from([20, 30]);
        let at = t0 + Duration::from_millis(900);
        for _ in 0..3 {
            let got = cache.get(
                &later,
                at,
                |_| unreachable!(),
                |g| {
                    ones += 1;
                    Some((g as u64, 2))
                },
            );
            assert_eq!(got, BTreeMap::from([(20, (20, 1)), (30, (30, 2))]));
        }
        assert_eq!((alls, ones), (1, 1));
        // A second on, everything is read afresh, once.
        let at = t0 + MEMORY_MAX_AGE;
        cache.get(
            &later,
            at,
            |g| {
                alls += 1;
                mem(g)
            },
            |_| None,
        );
        assert_eq!(alls, 2);
    }

    #[test]
    fn recycle_reasons_are_told_apart() {
        assert_eq!(
            ExitReason::of_recycle("lifetime reached (30s old)"),
            ExitReason::Lifetime
        );
        assert_eq!(
            ExitReason::of_recycle("memory 300 MiB above 200 MiB"),
            ExitReason::Memory
        );
        assert_eq!(
            ExitReason::of_recycle("served 1000 requests"),
            ExitReason::MaxRequests
        );
    }

    #[test]
    fn the_queue_of_a_listener_is_what_waits_to_be_accepted() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert_eq!(listen_queue(l.as_raw_fd()), Some(0));
        let _a = std::net::TcpStream::connect(("127.0.0.1", port)).expect("c");
        let _b = std::net::TcpStream::connect(("127.0.0.1", port)).expect("c");
        assert_eq!(listen_queue(l.as_raw_fd()), Some(2));
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("c");
        assert_eq!(listen_queue(c.as_raw_fd()), None);
    }

    #[test]
    fn exits_count_per_slot_and_reason() {
        let mut o = Observed::default();
        o.exited(2, ExitReason::Crash, "killed by SIGKILL");
        o.exited(2, ExitReason::Crash, "exited with status 1");
        o.exited(1, ExitReason::Scale, "exited cleanly");
        assert_eq!(o.slots[&2].0, 2);
        assert_eq!(o.slots[&2].1, "crash: exited with status 1");
        assert_eq!(o.slots[&1].0, 0);
        assert_eq!(o.restarts[&ExitReason::Crash], 2);
    }
}
