//! How many CPUs this process may really use, for `--workers auto`, and
//! which ones, for `--cpu-affinity auto`.
//!
//! The count is the smaller of the scheduler affinity mask (taskset, cpuset
//! cgroups) and the cgroup v2 CPU quota (`cpu.max`, rounded up), never below
//! one. Containers usually limit by quota, not by mask, so reading only
//! `nproc` would start far too many workers there. A quota does not say
//! which CPUs, so pinning uses the mask alone.

use std::path::Path;

/// The usable CPU count and a sentence saying where it came from.
pub fn available() -> (usize, String) {
    let mask = affinity_count();
    let quota = cgroup_quota(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup"));
    combine(mask, quota)
}

/// Pure combination of the two limits (unit-tested).
pub fn combine(mask: Option<usize>, quota: Option<f64>) -> (usize, String) {
    let mask_n = mask.unwrap_or(1).max(1);
    match quota {
        Some(q) if (q.ceil() as usize) < mask_n => {
            let n = (q.ceil() as usize).max(1);
            (
                n,
                format!("{n} (cgroup cpu.max quota {q:.2} CPUs, affinity mask {mask_n})"),
            )
        }
        _ => (mask_n, format!("{mask_n} (CPUs in the affinity mask)")),
    }
}

fn affinity_count() -> Option<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let n = (0..nix::sched::CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .count();
    Some(n)
}

/// Reads `cpu.max` ("max 100000" or "150000 100000") of this process's
/// cgroup v2 and returns the quota in CPUs, if one is set.
fn cgroup_quota(self_cgroup: &Path, root: &Path) -> Option<f64> {
    use std::os::unix::ffi::OsStrExt;
    // Bytes: a cgroup is a directory, and its name need not be UTF-8.
    let bytes = std::fs::read(self_cgroup).ok()?;
    let rel = bytes
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"0::"))?;
    let rel = rel.strip_prefix(b"/").unwrap_or(rel);
    let mut dir = root.join(std::ffi::OsStr::from_bytes(rel));
    // A limit set on any ancestor applies too; take the tightest.
    let mut best: Option<f64> = None;
    loop {
        if let Some(q) = std::fs::read_to_string(dir.join("cpu.max"))
            .ok()
            .and_then(|s| parse_cpu_max(&s))
        {
            best = Some(best.map_or(q, |b: f64| b.min(q)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            break;
        }
    }
    best
}

/// Parses the content of `cpu.max`.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next()?.parse().ok()?;
    if quota == "max" || !(period.is_finite() && period > 0.0) {
        return None;
    }
    // Only a finite, positive quota is a limit ("nan" or "-1" are not).
    let cpus = quota.parse::<f64>().ok()? / period;
    (cpus.is_finite() && cpus > 0.0).then_some(cpus)
}

/// The CPUs in this process's affinity mask, in order (empty if the mask
/// cannot be read).
pub fn allowed() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// The CPU of worker slot `slot` under `--cpu-affinity auto`: the slots
/// take the allowed CPUs in turn, so N workers on N CPUs get one each and
/// more workers share them evenly. `None` without any allowed CPU.
pub fn for_slot(allowed: &[usize], slot: usize) -> Option<usize> {
    (!allowed.is_empty()).then(|| allowed[slot % allowed.len()])
}

/// Where `--cpu-affinity auto` puts worker `slot` now. The slot's CPU
/// comes from the mask procman started with (`start`), so a slot keeps its
/// CPU across respawns; one that has left procman's mask since (`now`: a
/// cpuset shrank) would refuse the worker: `Err(cpu)`, and the worker is
/// not pinned. An unreadable mask (`now` empty) changes nothing.
pub fn for_slot_now(start: &[usize], now: &[usize], slot: usize) -> Result<Option<usize>, usize> {
    match for_slot(start, slot) {
        Some(cpu) if !now.is_empty() && !now.contains(&cpu) => Err(cpu),
        cpu => Ok(cpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slots_cpu_taken_away_since_start_is_not_pinned_to() {
        // (mask at start, mask now, slot, where the slot's worker goes)
        type Row = (
            &'static [usize],
            &'static [usize],
            usize,
            Result<Option<usize>, usize>,
        );
        let table: &[Row] = &[
            (&[0, 1], &[0, 1], 1, Ok(Some(1))),
            (&[0, 1], &[0], 0, Ok(Some(0))),
            (&[0, 1], &[0], 1, Err(1)),
            (&[0, 1], &[0], 3, Err(1)),
            (&[0, 1], &[], 1, Ok(Some(1))),
            (&[], &[0, 1], 1, Ok(None)),
            (&[2, 5], &[5, 7], 0, Err(2)),
            (&[2, 5], &[5, 7], 1, Ok(Some(5))),
        ];
        for &(start, now, slot, want) in table {
            assert_eq!(
                for_slot_now(start, now, slot),
                want,
                "start {start:?}, now {now:?}, slot {slot}"
            );
        }
    }

    #[test]
    fn slots_take_the_allowed_cpus_in_turn() {
        let table: &[(&[usize], usize, Option<usize>)] = &[
            (&[0, 1], 0, Some(0)),
            (&[0, 1], 1, Some(1)),
            (&[0, 1], 2, Some(0)),
            (&[0, 1], 3, Some(1)),
            (&[2, 5, 7], 4, Some(5)),
            (&[3], 9, Some(3)),
            (&[], 0, None),
        ];
        for &(allowed, slot, want) in table {
            assert_eq!(for_slot(allowed, slot), want, "{allowed:?} slot {slot}");
        }
    }

    #[test]
    fn cpu_max_parses() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        for bad in ["nan 100000", "-5 100000", "inf 1", "1 0", "1 nan"] {
            assert_eq!(parse_cpu_max(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_cgroup_whose_name_is_not_utf8_is_read() {
        use std::os::unix::ffi::OsStrExt;
        let base = std::env::temp_dir().join(format!("procman-cpus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("cgroup");
        let group = root.join(std::ffi::OsStr::from_bytes(b"app\xff.slice"));
        std::fs::create_dir_all(&group).expect("mkdir");
        std::fs::write(group.join("cpu.max"), "250000 100000\n").expect("cpu.max");
        let own = base.join("self-cgroup");
        std::fs::write(&own, b"0::/app\xff.slice\n").expect("cgroup");
        let quota = cgroup_quota(&own, &root);
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(quota, Some(2.5));
    }

    #[test]
    fn the_tighter_limit_wins_and_quota_rounds_up() {
        assert_eq!(combine(Some(8), None).0, 8);
        assert_eq!(combine(Some(8), Some(1.5)).0, 2);
        assert_eq!(combine(Some(2), Some(4.0)).0, 2);
        assert_eq!(combine(Some(4), Some(0.1)).0, 1);
        assert_eq!(combine(None, None).0, 1);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn any_cpu_max_gives_at_least_one_worker(
            text in prop_oneof![
                any::<String>(),
                (any::<f64>(), any::<f64>()).prop_map(|(q, p)| format!("{q} {p}")),
                (any::<i64>(), any::<i64>()).prop_map(|(q, p)| format!("{q} {p}")),
            ],
            mask in prop::option::of(0usize..4096),
        ) {
            let quota = parse_cpu_max(&text);
            if let Some(q) = quota {
                prop_assert!(q.is_finite() && q > 0.0, "{}", q);
            }
            let (n, _) = combine(mask, quota);
            prop_assert!(n >= 1 && n <= mask.unwrap_or(1).max(1));
        }
    }
}
