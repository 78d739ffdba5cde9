//! Keep-alive clients during a drain (HUP, TERM): a client that reuses its
//! connection after a response that did not say `Connection: close` must
//! never find it closed. Real HTTP/1.1 clients, each holding one
//! connection, against uvicorn workers with each HTTP implementation.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// One response: its status, whether it said `Connection: close`, its body.
#[derive(Debug)]
struct Reply {
    status: u16,
    close: bool,
    body: String,
}

/// A keep-alive connection: requests are sent on it until a response says
/// `Connection: close`.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn, String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.set_write_timeout(Some(Duration::from_secs(30))).ok();
        Ok(Conn {
            reader: BufReader::new(s),
        })
    }

    fn send(&mut self, path: &str) -> Result<(), String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("write: {e}"))
    }

    /// The status line and headers: (status, says close, content length).
    fn head(&mut self) -> Result<(u16, bool, usize), String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("read status: {e}"))?;
        if n == 0 {
            return Err("closed before the response".into());
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let (mut close, mut length) = (false, 0);
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| format!("read header: {e}"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim().to_ascii_lowercase();
            match name.to_ascii_lowercase().as_str() {
                "connection" => close |= value.split(',').any(|t| t.trim() == "close"),
                "content-length" => length = value.parse().map_err(|_| "bad length")?,
                _ => {}
            }
        }
        Ok((status, close, length))
    }

    fn body(&mut self, length: usize) -> Result<String, String> {
        let mut body = vec![0; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn get(&mut self, path: &str) -> Result<Reply, String> {
        self.send(path)?;
        let (status, close, length) = self.head()?;
        let body = self.body(length)?;
        Ok(Reply {
            status,
            close,
            body,
        })
    }
}

#[derive(Debug, Default, Clone)]
struct Report {
    ok: usize,
    /// Responses that said `Connection: close`.
    closes: usize,
    /// Requests lost on a connection reused after a response that did
    /// not say `Connection: close`: never acceptable.
    reused_failures: Vec<String>,
    /// Requests lost on a fresh connection (acceptable only once procman
    /// itself is stopping and no longer serves).
    fresh_failures: Vec<String>,
}

/// `n` clients, each reusing one connection for back-to-back requests to
/// `path` until a response says `Connection: close`, then opening a new
/// one. A client stops when told, or after a fresh connection failed.
struct Clients {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(addr: SocketAddr, n: usize, path: &'static str) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let deadline = Instant::now() + Duration::from_secs(120);
        let threads = (0..n)
            .map(|_| {
                let (stop, report) = (stop.clone(), report.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<Conn> = None;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let reused = conn.is_some();
                        let result = match conn.take() {
                            Some(c) => Ok(c),
                            None => Conn::open(addr),
                        }
                        .and_then(|mut c| c.get(path).map(|r| (c, r)));
                        let mut rep = report.lock().expect("report");
                        match result {
                            Ok((c, reply)) if reply.status == 200 => {
                                rep.ok += 1;
                                if reply.close {
                                    rep.closes += 1;
                                } else {
                                    conn = Some(c);
                                }
                            }
                            Ok((_, reply)) => {
                                let e = format!("status {}: {}", reply.status, reply.body);
                                rep.fresh_failures.push(e);
                            }
                            Err(e) if reused => rep.reused_failures.push(e),
                            Err(e) => {
                                rep.fresh_failures.push(e);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        Clients {
            stop,
            report,
            threads,
        }
    }

    fn done(&self) -> usize {
        let r = self.report.lock().expect("report");
        r.ok + r.reused_failures.len() + r.fresh_failures.len()
    }

    fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let r = self.report.lock().expect("report");
        r.clone()
    }
}

fn keep_alive_app(name: &str, http: &str, workers: &str) -> Harness {
    uvicorn(
        name,
        &apps_dir(),
        "keep_alive_app:main",
        &["-w", workers, "--http", http],
    )
    .json()
    .spawn()
}

/// Four keep-alive clients doing 0.2 s requests through two reloads: none
/// fails, and the drains did tell some of them to close.
fn keep_alive_clients_across_two_hups(http: &str) {
    let mut h = keep_alive_app(&format!("ka-hup-{http}"), http, "2");
    h.wait_workers(2, BOOT);
    let clients = Clients::start(h.addr(), 4, "/slow?s=0.2");
    for generation in [2, 3] {
        let target = clients.done() + 20;
        h.check(
            wait_for(BOOT, || (clients.done() >= target).then_some(())).is_some(),
            "requests served before the reload",
        );
        h.signal(Signal::SIGHUP);
        h.expect_event("reload-done", BOOT, "reload done", |e| {
            e["generation"] == generation
        });
    }
    let target = clients.done() + 20;
    wait_for(BOOT, || (clients.done() >= target).then_some(()));
    let report = clients.finish();
    h.check(
        report.reused_failures.is_empty() && report.fresh_failures.is_empty(),
        &format!("failed requests ({} ok): {report:?}", report.ok),
    );
    h.check(
        report.closes > 0,
        &format!("no response said Connection: close: {report:?}"),
    );
}

#[test]
fn keep_alive_clients_lose_nothing_across_two_hups_with_h11() {
    keep_alive_clients_across_two_hups("h11");
}

#[test]
fn keep_alive_clients_lose_nothing_across_two_hups_with_httptools() {
    keep_alive_clients_across_two_hups("httptools");
}

/// The same clients while TTOU stops a worker and `--max-requests`
/// recycles others: the same drain, the same guarantee.
#[test]
fn keep_alive_clients_lose_nothing_through_ttou_and_recycling_with_h11() {
    let mut h = uvicorn(
        "ka-ttou-recycle",
        &apps_dir(),
        "keep_alive_app:main",
        &["-w", "3", "--http", "h11", "--max-requests", "40"],
    )
    .json()
    .spawn();
    h.wait_workers(3, BOOT);
    let clients = Clients::start(h.addr(), 4, "/slow?s=0.2");
    h.check(
        wait_for(BOOT, || (clients.done() >= 20).then_some(())).is_some(),
        "requests served before TTOU",
    );
    h.signal(Signal::SIGTTOU);
    let mut stopped = h.expect_events("stopping", 1, BOOT, "TTOU", |e| e["reason"] == "excess");
    stopped.extend(h.expect_events("stopping", 2, BOOT, "two recycles", |e| {
        e["reason"] == "replaced"
    }));
    for pid in stopped.iter().map(worker_of) {
        h.expect_event("exited", BOOT, "the stopped worker drained", |e| {
            worker_of(e) == pid
        });
    }
    let target = clients.done() + 20;
    wait_for(BOOT, || (clients.done() >= target).then_some(()));
    let report = clients.finish();
    h.check(
        report.reused_failures.is_empty() && report.fresh_failures.is_empty(),
        &format!("failed requests ({} ok): {report:?}", report.ok),
    );
    h.check(
        report.closes > 0,
        &format!("no response said Connection: close: {report:?}"),
    );
}

/// Four keep-alive clients through procman's TERM: every request sent on a
/// reused connection is answered (a connection is closed only after a
/// response that said so); once the workers are gone, fresh connections
/// fail, which ends each client.
fn keep_alive_clients_through_term(http: &str) {
    let mut h = keep_alive_app(&format!("ka-term-{http}"), http, "2");
    h.wait_workers(2, BOOT);
    let clients = Clients::start(h.addr(), 4, "/slow?s=0.2");
    h.check(
        wait_for(BOOT, || (clients.done() >= 20).then_some(())).is_some(),
        "requests served before the stop",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    let report = clients.finish();
    h.check(
        report.reused_failures.is_empty(),
        &format!("requests lost on a reused connection: {report:?}"),
    );
    h.check(
        report.closes > 0,
        &format!("no response said Connection: close: {report:?}"),
    );
}

#[test]
fn keep_alive_clients_lose_nothing_through_term_with_h11() {
    keep_alive_clients_through_term("h11");
}

#[test]
fn keep_alive_clients_lose_nothing_through_term_with_httptools() {
    keep_alive_clients_through_term("httptools");
}

/// A response whose headers went out (without `Connection: close`) before
/// the drain began and whose body comes after: the connection stays open
/// for the client's next request, which is answered with
/// `Connection: close`.
fn headers_before_the_drain(http: &str) {
    let mut h = keep_alive_app(&format!("ka-stream-{http}"), http, "1");
    h.wait_workers(1, BOOT);
    let mut conn = Conn::open(h.addr()).expect("connect");
    conn.send("/stream?s=3").expect("send");
    let (status, close, length) = conn.head().expect("headers");
    assert_eq!((status, close), (200, false), "{}", h.log_text());
    h.signal(Signal::SIGTERM);
    h.check(
        h.wait_log("Shutting down", BOOT),
        "the worker began to drain",
    );
    let body = conn.body(length).expect("the body, after the drain began");
    h.check(is_pid(&body), &format!("body {body:?}"));
    let next = conn.get("/pid");
    h.check(
        next.as_ref().is_ok_and(|r| r.status == 200 && r.close),
        &format!("the next request on the connection: {next:?}"),
    );
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}

fn is_pid(body: &str) -> bool {
    body.trim().parse::<i32>().is_ok()
}

#[test]
fn a_response_begun_before_the_drain_keeps_its_connection_for_one_more_request_with_h11() {
    headers_before_the_drain("h11");
}

#[test]
fn a_response_begun_before_the_drain_keeps_its_connection_for_one_more_request_with_httptools() {
    headers_before_the_drain("httptools");
}
