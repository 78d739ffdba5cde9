//! Giving back the master's start-up code: once every worker of the first
//! generation is ready, the master drops its mappings of the pages of its
//! own executable that it only read (`madvise(MADV_DONTNEED)`).
//!
//! Why: the kernel maps a binary's pages on first use and, with fault-
//! around, 64 KiB at a time, so parsing the command line, binding, the
//! first spawns and logging leave most of procman's code resident (about
//! 2 MiB of a release build), counted whole in the master's RSS and PSS:
//! no other process maps it. The supervision loop needs a small part of
//! it. Dropped, a page is mapped again from the page cache the next time
//! it runs (a minor fault); nothing is read from disk while the file stays
//! cached.
//!
//! Invariant: only a mapping of procman's own executable that is
//! read-only and has no anonymous page is dropped. Such a mapping holds
//! exactly the file's content: code is never written, and the kernel
//! refuses any write to a running executable (`ETXTBSY`); a replaced
//! binary is a new file, while the mapping keeps the old one. The
//! relocated read-only data (`RELRO`, written by the loader before it was
//! made read-only) has anonymous pages: it is left alone, since dropping
//! those would bring back the unrelocated file content.

use std::io;
use std::path::Path;

/// One mapping of `/proc/self/smaps`: its range, permissions, file and
/// how many of its pages are anonymous.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    anonymous_kb: Option<u64>,
}

/// The mappings of an smaps text.
fn mappings(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Anonymous:") {
            if let Some(m) = out.last_mut() {
                m.anonymous_kb = kb.trim().trim_end_matches("kB").trim().parse().ok();
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        else {
            continue;
        };
        // offset, device, inode, then the path (which may hold spaces).
        let path = fields.skip(3).collect::<Vec<_>>().join(" ");
        out.push(Mapping {
            start,
            end,
            perms: perms.to_string(),
            path,
            anonymous_kb: None,
        });
    }
    out
}

/// The mappings that may be dropped: `exe`'s, read-only, private, with
/// no anonymous page (see the module's invariant).
fn droppable<'a>(all: &'a [Mapping], exe: &str) -> impl Iterator<Item = &'a Mapping> + 'a {
    let exe = exe.to_string();
    all.iter().filter(move |m| {
        m.path == exe
            && !m.perms.contains('w')
            && m.perms.ends_with('p')
            && m.anonymous_kb == Some(0)
    })
}

/// Drops the master's mappings of its executable's read-only pages;
/// returns how many bytes of address space were dropped.
pub fn startup_code() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    drop_in(&smaps, &exe)
}

fn drop_in(smaps: &str, exe: &Path) -> io::Result<usize> {
    let Some(exe) = exe.to_str() else {
        return Ok(0);
    };
    let all = mappings(smaps);
    let mut dropped = 0;
    for m in droppable(&all, exe) {
        let len = m.end - m.start;
        // SAFETY: the range is one whole mapping of this process's
        // executable, read from its own smaps a moment ago; the loader
        // made those mappings once and nothing changes them later. It is
        // private, read-only and has no anonymous page, so MADV_DONTNEED
        // only drops page-table entries, and the next access (by any
        // thread) maps the same file content again (the module's
        // invariant). No memory Rust owns is touched.
        let r = unsafe { libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if r == 0 {
            dropped += len;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55fa37d64000-55fa37e04000 r--p 00000000 fe:00 5335680                    /opt/procman
Size:                640 kB
Anonymous:             0 kB
55fa37e04000-55fa38018000 r-xp 000a0000 fe:00 5335680                    /opt/procman
Size:               2128 kB
Anonymous:             0 kB
55fa38018000-55fa3802e000 r--p 002b4000 fe:00 5335680                    /opt/procman
Size:                 88 kB
Anonymous:            88 kB
55fa3802e000-55fa38030000 rw-p 002ca000 fe:00 5335680                    /opt/procman
Size:                  8 kB
Anonymous:             8 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:00 1234                       /usr/lib/libc.so.6
Size:               1024 kB
Anonymous:             0 kB
7f0000200000-7f0000201000 r-xp 00000000 fe:00 99                         /opt/procman (deleted)
Size:                  4 kB
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_read_only_pages_without_anonymous_ones_are_dropped() {
        let all = mappings(SMAPS);
        assert_eq!(all.len(), 6);
        let got: Vec<(usize, &str)> = droppable(&all, "/opt/procman")
            .map(|m| (m.start, m.perms.as_str()))
            .collect();
        // The code and the first read-only data; not the relocated data
        // (anonymous pages), not the writable data, not a library, not
        // another file named alike.
        assert_eq!(
            got,
            vec![(0x55fa37d64000, "r--p"), (0x55fa37e04000, "r-xp")]
        );
    }

    #[test]
    fn a_mapping_whose_anonymous_count_is_unknown_is_kept() {
        let text = "55fa37e04000-55fa38018000 r-xp 000a0000 fe:00 5 /opt/procman\nSize: 4 kB\n";
        assert_eq!(droppable(&mappings(text), "/opt/procman").count(), 0);
    }

    #[test]
    fn dropping_this_test_binarys_code_keeps_it_running() {
        // The real thing, on this process: its code and read-only data are
        // dropped, then run again (this very function, formatting, the
        // allocator), mapped back from the file.
        let dropped = startup_code().expect("read own smaps");
        assert!(dropped > 0, "something of the test binary was dropped");
        let again = format!("{:?}", mappings(SMAPS));
        assert!(again.contains("r-xp"));
    }
}
