//! The master and the zygote give back the pages of read-only files that
//! only their start-up used: procman's own code once all workers are ready
//! (`src/shed.rs`), the libraries' code the zygote's imports touched
//! before it forks (OpenSSL's initialisation alone maps about 3 MiB).
//! Mapped only by that one process, those pages counted whole in its RSS
//! and PSS. Measured as the resident share of the mappings that may be
//! dropped (private, read-only, of a file, with no copy-on-write copy):
//! without the drop it is most of them (the master's code 80%, the
//! zygote's libraries 71%, debug build), with it what ran since.

mod util;

use std::time::Duration;

use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// Resident and total KiB of `pid`'s droppable mappings, of the file
/// `only` if given.
fn droppable(pid: i32, only: Option<&str>) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut rss, mut size) = (0, 0);
    let mut current: Option<(String, String)> = None;
    let (mut this_size, mut this_rss) = (0, 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = f.first() else { continue };
        if first.contains('-') && !first.contains(':') {
            let path = if f.len() > 5 {
                f[5..].join(" ")
            } else {
                String::new()
            };
            current = Some((f.get(1).copied().unwrap_or("").to_string(), path));
            continue;
        }
        let value: u64 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        match *first {
            "Size:" => this_size = value,
            "Rss:" => this_rss = value,
            "Anonymous:" => {
                let Some((perms, path)) = &current else {
                    continue;
                };
                let ok = path.starts_with('/')
                    && !perms.contains('w')
                    && perms.ends_with('p')
                    && value == 0
                    && only.is_none_or(|o| path == o);
                if ok {
                    rss += this_rss;
                    size += this_size;
                }
            }
            _ => {}
        }
    }
    (rss, size)
}

#[test]
fn the_master_drops_its_start_up_code_once_all_workers_are_ready() {
    let h = Start::new("shed-master", &["-w", "2", "--ready", "notify"])
        .json()
        .args(["--log-level", "debug", "--"])
        .args(notify_worker())
        .spawn();
    h.expect_event("all-ready", BOOT, "all workers ready", |_| true);
    // Said just after the drop: read only then.
    h.check(
        h.wait_log("of start-up code's mappings", BOOT),
        "the drop is said at debug level",
    );
    wait_sleeping(&h, h.pid);
    let exe = std::fs::read_link(format!("/proc/{}/exe", h.pid)).expect("procman's exe");
    let (rss, size) = droppable(h.pid, exe.to_str());
    h.check(size > 0, "procman's code is mapped");
    h.check(
        rss * 100 < size * 65,
        &format!("procman's code resident once idle: {rss} of {size} KiB"),
    );
}

#[test]
fn the_zygote_drops_the_library_pages_its_imports_touched() {
    let mut h = uvicorn("shed-zygote", &fastapi_dir(), "app:main", &["-w", "2"])
        .json()
        .spawn();
    h.wait_workers(2, BOOT);
    let zygote = zygote_pids(&h);
    let Some(&z) = zygote.first() else {
        panic!("no zygote: {zygote:?}");
    };
    wait_sleeping(&h, z);
    let (rss, size) = droppable(z, None);
    h.check(size > 0, "the zygote maps files");
    h.check(
        rss * 100 < size * 50,
        &format!("the zygote's read-only file pages resident: {rss} of {size} KiB"),
    );
    // And it still forks workers that serve: one more, after the drop.
    let before = h.wait_workers(2, BOOT);
    h.signal(nix::sys::signal::Signal::SIGTTIN);
    let after = h.wait_workers(3, BOOT);
    h.check(
        after.len() >= 3 && !after.is_subset(&before),
        &format!("a third worker forked after the drop serves: {after:?}"),
    );
}

/// Waits until `pid` sleeps (state S: the master in poll, the zygote
/// reading its channel), so what it maps is what it keeps while idle.
fn wait_sleeping(h: &Harness, pid: i32) {
    let idle = wait_for(BOOT, || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = s.rsplit(')').next()?.split_whitespace().next()?.to_string();
        (state == "S").then_some(())
    });
    h.check(idle.is_some(), &format!("{pid} asleep"));
}
