//! A hostile sender on the notify socket (any process that can reach it:
//! a worker, or any process of the workers' user) cannot bloat or stall
//! the master: under a flood of the largest datagrams its memory stays
//! bounded, a killed worker is replaced, `/healthz` answers and TERM stops
//! procman; descriptors passed with lingering closes never freeze it.

mod util;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

/// The bound the README states for the master's resident memory under a
/// notify flood.
const RSS_BOUND_KIB: u64 = 16 * 1024;

/// The metrics address procman logged.
fn metrics_addr(h: &Harness) -> SocketAddr {
    let found = wait_for(BOOT, || {
        h.log_text().lines().find_map(|l| {
            let rest = l.split("Serving metrics at: http://").nth(1)?;
            rest.split("/metrics").next()?.parse::<SocketAddr>().ok()
        })
    });
    match found {
        Some(a) => a,
        None => panic!("no metrics address in the log\n{}", h.log_text()),
    }
}

/// NOTIFY_SOCKET as a worker received it.
fn notify_socket(worker: i32) -> PathBuf {
    let env = std::fs::read(format!("/proc/{worker}/environ")).expect("worker environ");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).to_string()))
        .expect("NOTIFY_SOCKET in the worker's environment")
}

fn vm_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Senders that keep the socket's queue full, until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Flood {
    /// `senders` threads, each sending `payload` in a loop (blocking
    /// sends: the queue is refilled the moment the master takes one).
    fn start(socket: PathBuf, senders: usize, payload: Vec<u8>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let payload = Arc::new(payload);
        let threads = (0..senders)
            .map(|_| {
                let (stop, payload, socket) = (stop.clone(), payload.clone(), socket.clone());
                std::thread::spawn(move || {
                    let Ok(tx) = UnixDatagram::unbound() else {
                        return 0;
                    };
                    // A blocked send wakes to look at `stop` now and then.
                    tx.set_write_timeout(Some(Duration::from_millis(200))).ok();
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if tx.send_to(&payload, &socket).is_ok() {
                            sent += 1;
                        }
                    }
                    sent
                })
            })
            .collect();
        Flood { stop, threads }
    }

    fn sent(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap_or(0)).sum()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Kills one worker and waits (polling, `within`) for its replacement.
fn replaced_within(h: &Harness, n: usize, within: Duration) -> bool {
    let victim = *h.children().first().expect("a worker");
    let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
    wait_for(within, || {
        let kids = h.children();
        (kids.len() == n && !kids.contains(&victim)).then_some(())
    })
    .is_some()
}

#[test]
fn a_notify_flood_neither_bloats_nor_stalls_the_master() {
    let mut h = Start::new("notify-flood", &["--metrics", "127.0.0.1:0"])
        .args(["-w", "2", "--", &hello()])
        .spawn();
    let workers = h.wait_workers(2, BOOT);
    let addr = metrics_addr(&h);
    let socket = notify_socket(*workers.iter().next().expect("a worker"));
    let before = vm_rss_kib(h.pid).expect("master RSS");

    // As in issue 24: six senders, `WATCHDOG=1\n` x 5900 per datagram.
    let flood = Flood::start(socket, 6, b"WATCHDOG=1\n".repeat(5900));
    // Watch the master's memory while the flood goes on; stop at once
    // (failing) if it grows past the bound, not when the machine is out.
    let mut peak = before;
    let mut watch = |h: &Harness| {
        let rss = vm_rss_kib(h.pid).unwrap_or(0);
        peak = peak.max(rss);
        h.check(
            rss <= RSS_BOUND_KIB,
            &format!(
                "master RSS {rss} KiB > {RSS_BOUND_KIB} KiB under the flood (was {before} KiB)"
            ),
        );
    };
    for _ in 0..20 {
        watch(&h);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Supervision goes on: a killed worker is reaped and replaced (a
    // generous deadline: on a loaded machine a respawn can take a while).
    let replaced = replaced_within(&h, 2, BOOT);
    watch(&h);
    h.check(replaced, "a SIGKILLed worker was replaced during the flood");
    let health = http_get(addr, "/healthz");
    watch(&h);
    h.check(
        matches!(health, Ok((200, _))),
        &format!("/healthz during the flood: {health:?}"),
    );
    let metrics = http_get(addr, "/metrics");
    let body = metrics.map(|(_, b)| b).unwrap_or_default();
    let excess = body
        .lines()
        .find_map(|l| l.strip_prefix("procman_notify_dropped_total{reason=\"excess-lines\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    h.check(
        excess > 0.0,
        &format!("lines past the cap are counted:\n{body}"),
    );
    // TERM stops procman while the flood still goes on.
    h.signal(Signal::SIGTERM);
    let code = h.exit_code(BOOT);
    let sent = flood.sent();
    assert_eq!(code, 0, "TERM during the flood ({sent} datagrams sent)");
    let warnings = h.count_log("Dropped ");
    assert!(
        (1..=2).contains(&warnings),
        "one rate-limited warning, not one per datagram ({warnings} in {sent} datagrams)\n{}",
        h.log_text()
    );
    eprintln!("master RSS {before} KiB before, {peak} KiB at most; {sent} datagrams sent");
}

/// A TCP connection whose close lingers: its peer never reads, its send
/// buffer is full, `SO_LINGER=(1, secs)`.
fn lingering(peer: &TcpListener, secs: i32) -> TcpStream {
    let s = TcpStream::connect(peer.local_addr().expect("addr")).expect("connect");
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = [b'x'; 65536];
    while (&s).write(&chunk).is_ok() {}
    set_linger(&s, secs as u64);
    s
}

/// `SO_LINGER=(1, secs)`: a close with unsent data waits up to `secs`.
fn set_linger(s: &TcpStream, secs: u64) {
    socket2::SockRef::from(s)
        .set_linger(Some(std::time::Duration::from_secs(secs)))
        .expect("SO_LINGER");
}

#[test]
fn descriptors_passed_to_the_notify_socket_never_freeze_the_master() {
    let mut h = Start::new("notify-fds", &["--metrics", "127.0.0.1:0"])
        .args(["-w", "2", "--", &hello()])
        .spawn();
    let workers = h.wait_workers(2, BOOT);
    let addr = metrics_addr(&h);
    let socket = notify_socket(*workers.iter().next().expect("a worker"));

    // 4 sockets lingering 20 s each: a master that closes them itself is
    // frozen for up to 80 s. The deadlines below (20 s) are generous for a
    // loaded machine yet shorter than that freeze, so the test fails on a
    // master that does (this is not a measure of speed).
    const LINGER_S: i32 = 20;
    let within = Duration::from_secs(LINGER_S as u64);
    let peer = TcpListener::bind("127.0.0.1:0").expect("bind");
    let passed: Vec<TcpStream> = (0..4).map(|_| lingering(&peer, LINGER_S)).collect();
    let fds: Vec<i32> = passed.iter().map(|s| s.as_raw_fd()).collect();
    let tx = UnixDatagram::unbound().expect("socket");
    // The master is stopped while they are sent and our copies closed, so
    // that the last reference is the one the master receives: otherwise
    // the master could receive and close them first, and the lingering
    // close would be this test's.
    let master = Pid::from_raw(h.pid);
    kill(master, Signal::SIGSTOP).expect("SIGSTOP the master");
    let sent = nix::sys::socket::sendmsg(
        tx.as_raw_fd(),
        &[std::io::IoSlice::new(b"WATCHDOG=1")],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        Some(&nix::sys::socket::UnixAddr::new(&socket).expect("addr")),
    );
    // Refused (SO_PASSRIGHTS): our copies are the last, so ours must not
    // linger either. Passed: the in-flight message holds its own.
    if sent.is_err() {
        assert_eq!(sent, Err(nix::errno::Errno::EPERM), "refused as EPERM");
        for s in &passed {
            set_linger(s, 0);
        }
    }
    drop(passed);
    kill(master, Signal::SIGCONT).expect("SIGCONT the master");

    let health = wait_for(within, || {
        matches!(http_get(addr, "/healthz"), Ok((200, _))).then_some(())
    });
    h.check(
        health.is_some(),
        "/healthz answered after the descriptors were passed",
    );
    h.check(
        replaced_within(&h, 2, within),
        "a SIGKILLed worker was replaced after the descriptors were passed",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}
