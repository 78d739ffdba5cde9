//! Recycling (memory, lifetime) without losing capacity, `--workers auto`
//! and `--reuse-port`.

mod util;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use util::*;

const BOOT: Duration = Duration::from_secs(60);

fn fastapi(name: &str, extra: &[&str]) -> Start {
    let python = venv_python();
    let dir: PathBuf = repo().join("examples/fastapi");
    Start::new(
        name,
        &[
            "app:main",
            "--no-access-log",
            "--python",
            python.to_str().expect("utf8"),
        ],
    )
    .args(["--chdir", dir.to_str().expect("utf8")])
    .args(extra.iter().copied())
    .json()
}

/// Seconds from an event's `timestamp` (RFC 3339, UTC) within the day.
fn event_time(e: &serde_json::Value) -> Option<f64> {
    let t = e["timestamp"]
        .as_str()?
        .split('T')
        .nth(1)?
        .split('Z')
        .next()?;
    let mut p = t.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let s: f64 = p.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

#[test]
fn a_worker_above_the_memory_limit_is_recycled_without_losing_capacity() {
    let mut h = fastapi(
        "memory",
        &[
            "-w",
            "2",
            "--max-worker-memory",
            "150MiB",
            "--memory-check-interval",
            "0.5",
        ],
    )
    .spawn();
    let before = h.wait_workers(2, BOOT);
    let load = Load::start(h.addr(), 2, 20_000, Duration::from_secs(60));
    let (status, body) = http_get(h.addr(), "/alloc?mb=200").expect("alloc");
    assert_eq!(status, 200, "{body}");
    let hog = json_pid(&body).expect("pid");
    h.expect_event("recycling", BOOT, "the hog is recycled", |e| {
        worker_of(e) == hog && e["reason"] == "memory"
    });
    let gone = wait_for(BOOT, || (!alive(hog)).then_some(()));
    h.check(gone.is_some(), "the hog exited");
    load.wait_more(50, BOOT);
    let report = load.finish();
    h.check_none_failed(&report);
    // The warning the operator reads names the worker and the limit.
    let line = h
        .messages()
        .into_iter()
        .find(|l| l.contains("above --max-worker-memory"))
        .expect("memory line");
    h.check(
        line.contains(&format!("Worker {hog} ")) && line.contains("150.0 MiB"),
        &line,
    );
    let other = before.iter().find(|p| **p != hog).expect("other worker");
    assert!(alive(*other), "the other worker was untouched");
    assert_eq!(h.count_events("recycling", |_| true), 1, "{}", h.log_text());
}

#[test]
fn a_short_memory_spike_is_not_punished() {
    let mut h = fastapi(
        "spike",
        &[
            "-w",
            "1",
            "--max-worker-memory",
            "150MiB",
            "--memory-check-interval",
            "1",
        ],
    )
    .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let (status, _) = http_get(h.addr(), "/alloc?mb=200").expect("alloc");
    assert_eq!(status, 200);
    let (status, _) = http_get(h.addr(), "/free").expect("free");
    assert_eq!(status, 200);
    // Nothing happens to wait for: the test is that the worker is still
    // the same several sampling periods later.
    std::thread::sleep(Duration::from_secs(5));
    assert!(alive(pid));
    h.check(
        !h.has_event("recycling", |_| true),
        "no recycle for a spike",
    );
}

#[test]
fn workers_past_their_lifetime_recycle_one_at_a_time_spread_by_jitter() {
    let mut h = Start::new(
        "lifetime",
        &[
            "-w",
            "3",
            "--max-worker-lifetime",
            "2",
            "--max-worker-lifetime-jitter",
            "2",
            "--",
        ],
    )
    .json()
    .args(notify_worker())
    .spawn();
    let first = h.wait_workers(3, BOOT);
    let load = Load::start(h.addr(), 2, 50_000, Duration::from_secs(60));
    let all_replaced = wait_for(BOOT, || first.iter().all(|p| !alive(*p)).then_some(()));
    let report = load.finish();
    h.check(all_replaced.is_some(), "every original worker recycled");
    h.check_none_failed(&report);
    // One at a time: each recycle's old worker is stopped before the next
    // recycle begins.
    let events = h.events();
    let mut in_progress: Option<i32> = None;
    let mut recycled = Vec::new();
    for e in &events {
        if e["event"] == "recycling" {
            let pid = worker_of(e);
            h.check(
                in_progress.is_none(),
                &format!("overlapping recycles at: {e}"),
            );
            if first.contains(&pid) {
                recycled.push(pid);
            }
            in_progress = Some(pid);
        } else if e["event"] == "stopping" && in_progress == Some(worker_of(e)) {
            in_progress = None;
        }
    }
    assert_eq!(recycled.len(), 3, "{}", h.log_text());
    // Spread by the jitter: the three recycles did not all happen together.
    let recycles = h.events_named("recycling");
    let times: Vec<f64> = recycles.iter().filter_map(event_time).collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    h.check(
        spread > 0.05,
        &format!("recycles spread over the jitter window ({spread:.3}s)"),
    );
    h.check(
        recycles.iter().all(|e| e["reason"] == "lifetime"),
        "reason: lifetime",
    );
}

#[test]
fn workers_auto_follows_the_affinity_mask() {
    let mut h = Start::new("auto", &["-w", "auto"])
        .json()
        .args(["--".to_string(), hello()])
        .spawn_with("taskset", &["-c", "0", PROCMAN]);
    h.wait_workers(1, BOOT);
    // Once the whole generation is ready, every worker it has was started.
    h.expect_event("all-ready", BOOT, "ready", |_| true);
    h.check(
        h.count_events("booting", |_| true) == 1,
        "one worker for one CPU",
    );
    // What the operator reads: where the count came from.
    h.check(
        h.messages()
            .iter()
            .any(|m| m.contains("Starting 1 worker (auto: 1 (CPUs in the affinity mask)):")),
        "the count is explained",
    );
    // taskset execs procman (same pid): one worker below it.
    let inner = descendants_of(h.pid);
    assert_eq!(inner.len(), 1, "one worker: {inner:?}");
}

#[test]
fn reuse_port_gives_each_worker_its_own_listener_and_spreads_connections() {
    let mut h = Start::new("reuseport", &["-w", "4", "--reuse-port", "--", &hello()])
        .json()
        .spawn();
    let pids = h.wait_workers(4, BOOT);
    let sockets: BTreeSet<String> = pids
        .iter()
        .map(|p| {
            std::fs::read_link(format!("/proc/{p}/fd/3"))
                .expect("fd 3")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(sockets.len(), 4, "one socket per worker: {sockets:?}");
    // The master holds no listening socket on that port: its own only
    // reserves the address.
    let mut seen = BTreeSet::new();
    let addr = h.addr();
    for _ in 0..400 {
        if let Ok((200, body)) = http_get(addr, "/") {
            seen.insert(body.trim().to_string());
        }
        if seen.len() == 4 {
            break;
        }
    }
    assert_eq!(seen.len(), 4, "a burst reached every worker: {seen:?}");
    h.check(
        h.has_event("listening", |e| e["reuse_port"] == true),
        "logged",
    );
}

#[test]
fn reuse_port_connections_queued_for_a_killed_worker_are_answered_by_its_replacement() {
    // The master keeps each slot's SO_REUSEPORT socket (as nginx's master
    // keeps its `reuseport` sockets across worker restarts): connections
    // the kernel queued on it while its worker could not accept wait for
    // the slot's next worker instead of being reset with the worker's
    // copy. Independent of net.ipv4.tcp_migrate_req: with one worker
    // there is no other listener to migrate them to.
    let mut h = Start::new(
        "reuseport-queue",
        &["-w", "1", "--reuse-port", "--", &hello()],
    )
    .json()
    .spawn();
    let first = h.wait_workers(1, BOOT);
    let victim = *first.iter().next().expect("a worker");
    let stopped = nix::unistd::Pid::from_raw(victim);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    // connect() returns once the kernel queued the connection on the
    // listening socket; the worker, stopped, accepts none of them.
    let addr = h.addr();
    let mut queued: Vec<std::net::TcpStream> = (0..4)
        .map(|i| {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect #{i}: {e}"));
            s.set_read_timeout(Some(BOOT)).expect("timeout");
            std::io::Write::write_all(
                &mut s,
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            .expect("send the request");
            s
        })
        .collect();
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    let replacement = wait_for(BOOT, || {
        let now = h.wait_workers(1, BOOT);
        (!now.contains(&victim)).then_some(now)
    })
    .expect("a replacement worker");
    for (i, s) in queued.iter_mut().enumerate() {
        let mut reply = String::new();
        let read = std::io::Read::read_to_string(s, &mut reply);
        assert!(
            read.is_ok() && reply.starts_with("HTTP/1.1 200"),
            "queued connection #{i}: {read:?} {reply:?} (replacement {replacement:?})"
        );
    }
}

/// How many listening TCP sockets on 127.0.0.1:`port` process `pid` holds
/// (its slot sockets, for a `--reuse-port` master: the socket that only
/// reserves the address does not listen).
fn listening_on(pid: i32, port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    let inodes: BTreeSet<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|s| format!("socket:[{s}]")))
                .flatten()
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| inodes.contains(&l.to_string_lossy().to_string()))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn reuse_port_slot_sockets_go_with_their_slot_on_ttou_and_come_back_on_ttin() {
    let mut h = Start::new(
        "reuseport-scale",
        &["-w", "2", "--reuse-port", "--", &hello()],
    )
    .json()
    .spawn();
    h.wait_workers(2, BOOT);
    let (master, port) = (h.pid, h.port());
    assert_eq!(listening_on(master, port), 2, "one socket per slot");
    h.signal(nix::sys::signal::Signal::SIGTTOU);
    let one = wait_for(BOOT, || (h.children().len() == 1).then_some(()));
    h.check(one.is_some(), "TTOU: 1 worker");
    // Slot 1 is no longer wanted: its socket is not kept for a worker
    // that will not come (connections would wait in it for nothing).
    assert_eq!(listening_on(master, port), 1, "slot 1's socket is closed");
    h.signal(nix::sys::signal::Signal::SIGTTIN);
    h.wait_workers(2, BOOT);
    assert_eq!(listening_on(master, port), 2, "slot 1 has a socket again");
}

#[test]
fn reuse_port_a_slot_waiting_out_its_backoff_gives_up_its_socket() {
    // Slot 1's worker dies at once, every time (PROCMAN_WORKER_ID is its
    // slot): it respawns with a growing backoff, during which the
    // connections the kernel would queue on its socket have no worker to
    // wait for, so the master closes its copy; slot 0 keeps serving.
    let script = format!("[ \"$PROCMAN_WORKER_ID\" = 1 ] && exit 1; exec {}", hello());
    let mut h = Start::new(
        "reuseport-backoff",
        &["-w", "2", "--reuse-port", "--", "sh", "-c", &script],
    )
    .json()
    .spawn();
    h.wait_workers(1, BOOT);
    let (master, port) = (h.pid, h.port());
    let gave_up = wait_for(BOOT, || {
        (h.count_events("boot-failed", |e| e["slot"] == 1) >= 2 && listening_on(master, port) == 1)
            .then_some(())
    });
    h.check(
        gave_up.is_some(),
        "slot 1 in backoff holds no socket (slot 0 keeps its own)",
    );
    let (status, _) = http_get(h.addr(), "/").expect("slot 0 answers");
    assert_eq!(status, 200);
}

#[test]
fn reuse_port_a_stop_closes_the_masters_slot_sockets_at_once() {
    // No worker will accept from a slot socket once procman stops: the
    // master closes its copies at once, so that new connections are not
    // queued on them while the workers drain (a draining worker closes
    // its own copy; the last close refuses them).
    let start = Start::new("reuseport-stop", &["-w", "1", "--reuse-port"]).json();
    let (start, ready) = slow_stopping_worker(start);
    let mut h = start.spawn();
    wait_slow_stopper(&h, &ready, BOOT);
    let (master, port) = (h.pid, h.port());
    let worker = *h.children().first().expect("the worker");
    assert_eq!(listening_on(master, port), 1, "slot 0's socket");
    h.signal(nix::sys::signal::Signal::SIGTERM);
    // The worker's stop takes 2 s (its helper asks for more time).
    let closed = wait_for(BOOT, || {
        (alive(worker) && alive(master) && listening_on(master, port) == 0).then_some(())
    });
    h.check(
        closed.is_some(),
        "the master closed its slot socket while the worker drained",
    );
    assert_eq!(h.exit_code(BOOT), 0);
}
