//! Reading `/proc`: process parents, groups and sessions (to attribute
//! notifications from a worker's helpers), memory per process group (for
//! `--max-worker-memory`), a process's owner and start time (to verify a
//! pid the zygote reports before the master ever signals it), and a
//! process's memory cgroup (to attribute a SIGKILL to the OOM killer).
//!
//! What the master reads of its workers' groups costs what procman runs,
//! not what the host runs: a group's members are found among the master's
//! own descendants ([`members`]: every worker is its child, every helper a
//! worker's descendant, and an orphaned helper is re-parented to the
//! master, a child subreaper), by the kernel's per-thread `children` lists,
//! never by reading the stat file of every process on the host. Only a
//! kernel without those lists (`CONFIG_PROC_CHILDREN`) falls back to the
//! whole of `/proc`.
//!
//! Everything here tolerates processes vanishing mid-read: a missing or
//! half-parsed file means "not there".

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The fields of `/proc/PID/stat` procman uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: i32,
    pub pgrp: i32,
    /// Its session id: a worker leads its own session, which only its
    /// descendants can be in.
    pub session: i32,
    /// Resident set size in pages.
    pub rss_pages: u64,
    /// When it was created, in clock ticks since boot (field 22).
    pub start_ticks: u64,
}

/// Parses the content of `/proc/PID/stat`. It is bytes, not text: the
/// command name in it is whatever the process named itself.
pub fn parse_stat(bytes: &[u8]) -> Option<Stat> {
    // The command name may contain spaces, parentheses and any byte: the
    // fields that follow start after the last ')'. Field 3 (state) is
    // index 0 here.
    let close = bytes.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(bytes.get(close + 1..)?).ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// The real, effective, saved and filesystem uids from the `Uid:` line of
/// `/proc/PID/status`.
pub fn parse_uids(status: &str) -> Option<[u32; 4]> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    let mut out = [0u32; 4];
    for slot in out.iter_mut() {
        *slot = ids.next()??;
    }
    Some(out)
}

/// The uids of one process (see [`parse_uids`]).
pub fn uids(pid: i32) -> Option<[u32; 4]> {
    // Bytes, not text: the Name: line holds the process's own name, which
    // need not be UTF-8 (the Uid: line always is).
    parse_uids(&String::from_utf8_lossy(
        &std::fs::read(format!("/proc/{pid}/status")).ok()?,
    ))
}

/// Now, in the unit of [`Stat::start_ticks`]: the kernel reports a start
/// time as CLOCK_BOOTTIME at fork, truncated to clock ticks, so a process
/// created at or after this instant has `start_ticks >= boot_ticks_now()`.
pub fn boot_ticks_now() -> u64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100) as u64;
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => {
            let ns = t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128;
            (ns * hz as u128 / 1_000_000_000) as u64
        }
        // Cannot happen on Linux; 0 makes the start-time check accept any
        // process, and the other checks still apply.
        Err(_) => 0,
    }
}

/// `/proc/PID/stat` of one process.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read(format!("/proc/{pid}/stat")).ok()?)
}

/// Resident memory in bytes of the process groups of the master's
/// descendants (see [`members`]), summed over each group's members (a
/// worker and the helpers it started).
pub fn rss_by_group() -> HashMap<i32, u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut out: HashMap<i32, u64> = HashMap::new();
    for s in members().into_iter().filter_map(stat) {
        *out.entry(s.pgrp).or_default() += s.rss_pages * page;
    }
    out
}

/// At most this many processes are listed by [`descendants`] (a bound on
/// what a fork bomb among the workers can make the master read).
pub const MAX_DESCENDANTS: usize = 65_536;

/// The processes that may belong to a worker's group: this process's
/// descendants, or, on a kernel that does not list a thread's children,
/// every process in /proc.
pub fn members() -> Vec<i32> {
    let me = std::process::id() as i32;
    match descendants(me) {
        Some(mut pids) => {
            pids.retain(|&p| p != me);
            pids
        }
        None => pids().collect(),
    }
}

/// `root` and its descendants, from the kernel's lists of each thread's
/// children (`/proc/PID/task/TID/children`), at most [`MAX_DESCENDANTS`];
/// `None` when the kernel has no such lists. A process created or
/// re-parented during the walk may be missed (the kernel does not promise
/// more), which is fine for what reads it: memory figures.
pub fn descendants(root: i32) -> Option<Vec<i32>> {
    let me = std::process::id();
    if !std::path::Path::new(&format!("/proc/self/task/{me}/children")).exists() {
        return None; // a kernel without CONFIG_PROC_CHILDREN
    }
    if !std::path::Path::new(&format!("/proc/{root}")).exists() {
        return Some(Vec::new());
    }
    let mut out = vec![root];
    let mut seen = std::collections::HashSet::from([root]);
    let mut next = 0;
    while next < out.len() && out.len() < MAX_DESCENDANTS {
        let pid = out[next];
        next += 1;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        for task in tasks.into_iter().flatten().flatten() {
            let Ok(list) = std::fs::read(task.path().join("children")) else {
                continue;
            };
            let children = String::from_utf8_lossy(&list);
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if out.len() < MAX_DESCENDANTS && seen.insert(child) {
                    out.push(child);
                }
            }
        }
    }
    Some(out)
}

/// The pids of every process visible in /proc (its numeric entries);
/// empty when /proc cannot be read.
pub fn pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
}

/// A process's memory cgroup, as the files that count its OOM kills: cgroup
/// v1's `memory.oom_control` (memory controller) and v2's `memory.events`,
/// the first readable one counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryCgroup {
    counters: Vec<PathBuf>,
}

/// The memory cgroup named by the content of a `/proc/PID/cgroup` file,
/// under cgroupfs at `root`. Bytes, not text: a cgroup is a directory, and
/// its name need not be UTF-8 (read as text, one such name would hide the
/// whole file).
pub fn parse_memory_cgroup(bytes: &[u8], root: &Path) -> Option<MemoryCgroup> {
    let mut v1 = None;
    let mut v2 = None;
    for line in bytes.split(|&b| b == b'\n') {
        let mut parts = line.splitn(3, |&b| b == b':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let relative = OsStr::from_bytes(path.strip_prefix(b"/").unwrap_or(path));
        if controllers.split(|&b| b == b',').any(|c| c == b"memory") {
            v1 = Some(
                root.join("memory")
                    .join(relative)
                    .join("memory.oom_control"),
            );
        } else if id == b"0" && controllers.is_empty() {
            v2 = Some(root.join(relative).join("memory.events"));
        }
    }
    let counters: Vec<PathBuf> = v1.into_iter().chain(v2).collect();
    (!counters.is_empty()).then_some(MemoryCgroup { counters })
}

/// The memory cgroup of process `pid` (`None`: procman itself).
pub fn memory_cgroup(pid: Option<i32>) -> Option<MemoryCgroup> {
    let file = match pid {
        Some(pid) => format!("/proc/{pid}/cgroup"),
        None => "/proc/self/cgroup".to_string(),
    };
    parse_memory_cgroup(&std::fs::read(file).ok()?, Path::new("/sys/fs/cgroup"))
}

impl MemoryCgroup {
    /// Its `oom_kill` count, if a counter file is readable.
    pub fn oom_kills(&self) -> Option<u64> {
        self.counters
            .iter()
            .find_map(|file| parse_oom_kill(&String::from_utf8_lossy(&std::fs::read(file).ok()?)))
    }
}

/// The `oom_kill` line of a `memory.events` (or v1 `memory.oom_control`)
/// file.
pub fn parse_oom_kill(events: &str) -> Option<u64> {
    events.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == "oom_kill").then(|| it.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123 1000000 250 18446744073709551615";
        assert_eq!(
            parse_stat(line.as_bytes()),
            Some(Stat {
                ppid: 1,
                pgrp: 4242,
                session: 4242,
                rss_pages: 250,
                start_ticks: 123,
            })
        );
        assert_eq!(parse_stat(b"garbage"), None);
    }

    #[test]
    fn a_process_whose_name_is_not_utf8_is_still_read() {
        use std::os::unix::ffi::OsStrExt;
        // The kernel names a process after the file it executed, bytes and
        // all (a process may also rename itself with PR_SET_NAME).
        let dir = std::env::temp_dir().join(format!("procman-procfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let exe = dir.join(std::ffi::OsStr::from_bytes(b"w\xff\xfe(x) y"));
        let sleep = std::fs::canonicalize("/bin/sleep").expect("sleep");
        std::os::unix::fs::symlink(sleep, &exe).expect("symlink");
        let mut child = std::process::Command::new(&exe)
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
        let got = stat(pid);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(comm.starts_with(b"w\xff\xfe(x) y"), "{comm:?}");
        assert_eq!(got.map(|s| s.ppid), Some(std::process::id() as i32));
    }

    #[test]
    fn a_cgroup_whose_name_is_not_utf8_is_read() {
        let root = Path::new("/sys/fs/cgroup");
        // cgroup v2: the unified line.
        let got = parse_memory_cgroup(b"0::/app\xff.slice/w\n", root).expect("a v2 cgroup");
        let want = root.join(OsStr::from_bytes(b"app\xff.slice/w/memory.events"));
        assert_eq!(got.counters, vec![want]);
        // cgroup v1 (or hybrid): the memory controller's line first.
        let got = parse_memory_cgroup(b"9:name=systemd:/\n4:cpu,memory:/x\xfe\n0::/x\xfe\n", root)
            .expect("a v1 cgroup");
        assert_eq!(
            got.counters,
            vec![
                root.join(OsStr::from_bytes(b"memory/x\xfe/memory.oom_control")),
                root.join(OsStr::from_bytes(b"x\xfe/memory.events")),
            ]
        );
        // The root cgroup; and no memory cgroup at all.
        let got = parse_memory_cgroup(b"0::/\n", root).expect("the root");
        assert_eq!(got.counters, vec![root.join("memory.events")]);
        assert_eq!(parse_memory_cgroup(b"3:cpu:/a\n", root), None);
        assert_eq!(parse_memory_cgroup(b"", root), None);
    }

    #[test]
    fn an_oom_kill_count_is_read_from_a_cgroup_named_in_any_bytes() {
        let base = std::env::temp_dir().join(format!("procman-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join(OsStr::from_bytes(b"memory/app\xff"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .expect("counter");
        let got = parse_memory_cgroup(b"4:memory:/app\xff\n", &base).and_then(|c| c.oom_kills());
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(got, Some(3));
    }

    #[test]
    fn uid_lines_parse() {
        let status = "Name:\tsleep\nUid:\t65534\t65534\t0\t65534\nGid:\t1\t1\t1\t1\n";
        assert_eq!(parse_uids(status), Some([65534, 65534, 0, 65534]));
        assert_eq!(parse_uids("Uid:\t1\t2\n"), None);
        assert_eq!(parse_uids("Name:\tx\n"), None);
    }

    #[test]
    fn a_new_process_starts_at_or_after_now() {
        let before = boot_ticks_now();
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let st = stat(child.id() as i32).expect("stat of an unreaped child");
        let _ = child.wait();
        assert!(st.start_ticks >= before, "{} < {before}", st.start_ticks);
        let me = stat(std::process::id() as i32).expect("own stat");
        assert!(me.start_ticks <= boot_ticks_now());
    }

    #[test]
    fn descendants_are_children_and_their_children_and_nothing_else() {
        // A shell that starts a sleep (its child, our grandchild) and says
        // its pid once it has.
        use std::io::BufRead;
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        if let Some(out) = sh.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let grandchild: i32 = line.trim().parse().unwrap_or(0);
        let me = std::process::id() as i32;
        let found = descendants(me).expect("this kernel lists children");
        let in_members = members();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(grandchild),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = sh.kill();
        let _ = sh.wait();
        assert!(grandchild > 0, "{line:?}");
        assert_eq!(found.first(), Some(&me));
        assert!(found.contains(&(sh.id() as i32)), "{found:?}");
        assert!(found.contains(&grandchild), "{found:?}");
        assert!(!found.contains(&1), "init is no descendant: {found:?}");
        assert!(in_members.contains(&grandchild) && !in_members.contains(&me));
        assert_eq!(descendants(i32::MAX), Some(Vec::new()), "no such process");
    }

    #[test]
    fn the_group_of_a_child_has_memory() {
        // Our own group, as a worker's helper would share its worker's:
        // counted through the child, not through this process.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let me = nix::unistd::getpgrp().as_raw();
        // Polled: right after the spawn the child may not have run yet
        // (no page of its own).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut rss = 0;
        while rss == 0 && std::time::Instant::now() < end {
            rss = rss_by_group().get(&me).copied().unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(rss > 0, "no memory counted for the child's group");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A stat line as the kernel writes it (52 fields), for a process
    /// with this name (up to 15 bytes, any but NUL).
    fn stat_line(pid: i32, comm: &[u8], s: Stat) -> Vec<u8> {
        let Stat {
            ppid,
            pgrp,
            session,
            rss_pages,
            start_ticks,
        } = s;
        let mut line = format!("{pid} (").into_bytes();
        line.extend_from_slice(comm);
        line.extend_from_slice(
            format!(") S {ppid} {pgrp} {session} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start_ticks} 1000000 {rss_pages} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n")
                .as_bytes(),
        );
        line
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn any_bytes_are_parsed_or_refused_without_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            let _ = parse_stat(&bytes);
        }

        #[test]
        fn kernel_lines_parse_whatever_the_name(
            pid in 1..=i32::MAX,
            comm in prop::collection::vec(1u8..=255, 0..16),
            ppid in 0..=i32::MAX,
            pgrp in 0..=i32::MAX,
            session in 0..=i32::MAX,
            rss_pages in any::<u64>(),
            start_ticks in any::<u64>(),
        ) {
            let want = Stat { ppid, pgrp, session, rss_pages, start_ticks };
            prop_assert_eq!(parse_stat(&stat_line(pid, &comm, want)), Some(want));
        }

        #[test]
        fn any_status_text_is_parsed_or_refused_without_panic(text in any::<String>()) {
            let _ = parse_uids(&text);
        }
    }
}
