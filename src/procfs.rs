//! Reading `/proc`: process parents and groups (to attribute notifications
//! from a worker's helpers) and memory per process group (for
//! `--max-worker-memory`).
//!
//! Everything here tolerates processes vanishing mid-read: a missing or
//! half-parsed file means "not there".

use std::collections::HashMap;

/// The fields of `/proc/PID/stat` procman uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Parent pid.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Parses the content of `/proc/PID/stat`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may contain spaces and parentheses: the fields that
    // follow start after the last ')'. Field 3 (state) is index 0 here.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

/// `/proc/PID/stat` of one process.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Resident memory in bytes of every process group, summed over its
/// members (a worker and the helpers it started), from one scan of /proc.
pub fn rss_by_group() -> HashMap<i32, u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut out: HashMap<i32, u64> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(s) = stat(pid) {
            *out.entry(s.pgrp).or_default() += s.rss_pages * page;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123 1000000 250 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 1,
                pgrp: 4242,
                rss_pages: 250
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn our_own_group_has_memory() {
        let me = nix::unistd::getpgrp().as_raw();
        assert!(rss_by_group().get(&me).copied().unwrap_or(0) > 0);
    }
}
