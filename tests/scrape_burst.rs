//! A burst of scrapes costs the master bounded passes (issue 24, item 8):
//! every scrape of a burst is answered, none evicted, and a worker killed
//! meanwhile is reaped and replaced as usual.
//!
//! Speed is bench/attack-scrape.py's business (no timed assertion here):
//! the burst is made deterministic by stopping the master (SIGSTOP) while
//! the requests and a worker's death queue up in the kernel, so that the
//! master finds all of them at once when it continues.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(30);
const BURST: usize = 128;

/// The metrics address procman logged.
fn metrics_addr(h: &Harness) -> SocketAddr {
    let found = wait_for(BOOT, || {
        h.log_text().lines().find_map(|l| {
            let rest = l.split("Serving metrics at: http://").nth(1)?;
            rest.split("/metrics").next()?.parse::<SocketAddr>().ok()
        })
    });
    found.unwrap_or_else(|| panic!("no metrics address in the log\n{}", h.log_text()))
}

/// Whether `bytes` is a whole `200 OK` answer (its body as long as it says).
fn whole_200(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    head.starts_with("HTTP/1.1 200") && length == Some(body.len())
}

#[test]
fn a_burst_of_scrapes_is_answered_in_full_and_a_worker_killed_meanwhile_is_replaced() {
    let mut h = Start::new("scrape-burst", &["--metrics", "127.0.0.1:0", "-w", "2"])
        .json()
        .args(["--", "sleep", "1000"])
        .spawn();
    h.expect_event("all-ready", BOOT, "both workers ready", |_| true);
    let addr = metrics_addr(&h);
    let workers = h.children();
    let victim = *workers.first().expect("a worker");
    let master = Pid::from_raw(h.pid);

    // The master stopped: the kernel completes each connection and queues
    // its request; the worker dies meanwhile.
    kill(master, Signal::SIGSTOP).expect("SIGSTOP");
    let sent: Vec<std::io::Result<TcpStream>> = (0..BURST)
        .map(|_| {
            let mut c = TcpStream::connect(addr)?;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            Ok(c)
        })
        .collect();
    let killed = kill(Pid::from_raw(victim), Signal::SIGKILL);
    let _ = kill(master, Signal::SIGCONT);
    killed.expect("SIGKILL the worker");

    let mut answered = 0;
    let mut failures = Vec::new();
    for (i, c) in sent.into_iter().enumerate() {
        let got = c.and_then(|mut c| {
            c.set_read_timeout(Some(BOOT))?;
            let mut out = Vec::new();
            c.read_to_end(&mut out)?;
            Ok(out)
        });
        match got {
            Ok(bytes) if whole_200(&bytes) => answered += 1,
            Ok(bytes) => failures.push(format!("#{i}: {} bytes, not a whole 200", bytes.len())),
            Err(e) => failures.push(format!("#{i}: {e}")),
        }
    }
    h.check(
        answered == BURST,
        &format!(
            "{answered} of {BURST} scrapes answered; first failures: {:?}",
            &failures[..failures.len().min(5)]
        ),
    );
    h.expect_event("exited", BOOT, "the killed worker was reaped", |e| {
        e["worker"] == victim
    });
    let ready_again = wait_for(BOOT, || {
        (h.count_events("ready", |_| true) >= 3).then_some(())
    });
    h.check(ready_again.is_some(), "the killed worker was replaced");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
