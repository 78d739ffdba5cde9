//! `--metrics`: `GET /metrics`, `/healthz` and `/readyz` over a minimal
//! HTTP/1.1, served from the master's own loop by [`crate::serve`].
//!
//! Only what a scraper or a Kubernetes probe sends is understood: a
//! request line and headers (a body is never read), one request per
//! connection (`Connection: close`). `/healthz` is 200 while the master
//! runs (it answers, so it runs); `/readyz` is 200 when a worker is ready
//! and no stop has begun, else 503; `/metrics` is the exposition text,
//! encoded by `prometheus-client` from a [`Snapshot`] and the
//! histograms the master keeps.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::serve::Framed;
use crate::status::{Observed, Snapshot};

type Labels = Vec<(String, String)>;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Healthz,
    Readyz,
}

/// Frames an HTTP request: incomplete until the blank line ending the
/// headers; then the route, or an error answer.
pub fn frame(bytes: &[u8]) -> Result<Option<(Route, bool)>, Vec<u8>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Tolerate bare LF line ends (some hand-written probes).
        bytes.windows(2).position(|w| w == b"\n\n")
    }) else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(response(405, "text/plain", b"method not allowed\n", false)),
    };
    let path = target.split('?').next().unwrap_or("");
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        _ => return Err(response(404, "text/plain", b"not found\n", head_only)),
    };
    Ok(Some((route, head_only)))
}

/// The framing function for [`crate::serve::Server::service`]: answers
/// a whole request from `snapshot` (built only for `/metrics` and
/// `/readyz`, lazily).
pub fn answer(
    bytes: &[u8],
    snapshot: &mut dyn FnMut() -> Snapshot,
    observed: &Observed,
    stopping: bool,
) -> Framed {
    match frame(bytes) {
        Ok(None) => Framed::Incomplete,
        Err(reply) => Framed::Reply(reply),
        Ok(Some((route, head))) => Framed::Reply(match route {
            Route::Healthz => response(200, "text/plain", b"ok\n", head),
            Route::Readyz => {
                // A stop answers 503 at once, without a snapshot.
                if !stopping && snapshot().is_ready() {
                    response(200, "text/plain", b"ready\n", head)
                } else {
                    response(503, "text/plain", b"not ready\n", head)
                }
            }
            Route::Metrics => {
                let text = render(&snapshot(), observed);
                response(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text.as_bytes(),
                    head,
                )
            }
        }),
    }
}

fn response(code: u16, kind: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A counter family with one label, one series per entry of `counts`.
fn counters(label: &str, counts: &BTreeMap<String, u64>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in counts {
        family.get_or_create(&labels(&[(label, value)])).inc_by(*n);
    }
    family
}

/// The exposition text of a snapshot.
pub fn render(s: &Snapshot, observed: &Observed) -> String {
    let mut r = Registry::default();

    let workers = Family::<Labels, Gauge>::default();
    for state in ["starting", "ready", "stopping"] {
        let n = s.workers.iter().filter(|w| w.state == state).count();
        workers
            .get_or_create(&labels(&[("state", state)]))
            .set(n as i64);
    }
    r.register("procman_workers", "Workers by state", workers);

    let target = Gauge::<i64>::default();
    target.set(s.target as i64);
    r.register("procman_workers_target", "Workers asked for", target);

    let generation = Gauge::<i64>::default();
    generation.set(s.generation as i64);
    r.register("procman_generation", "Current generation", generation);

    r.register(
        "procman_worker_restarts",
        "Worker exits by reason",
        counters("reason", &s.restarts),
    );
    r.register(
        "procman_reloads",
        "Reloads by result",
        counters("result", &s.reloads),
    );

    r.register(
        "procman_reload_duration_seconds",
        "Time from a reload's start to its end",
        observed.reload_duration.clone(),
    );
    r.register(
        "procman_worker_time_to_ready_seconds",
        "Time from a worker's fork to its readiness",
        observed.time_to_ready.clone(),
    );

    let memory = Family::<Labels, Gauge>::default();
    for w in &s.workers {
        let slot = w.slot.to_string();
        for (kind, v) in [("rss", w.rss_bytes), ("uss", w.uss_bytes)] {
            if let Some(v) = v {
                memory
                    .get_or_create(&labels(&[("slot", &slot), ("kind", kind)]))
                    .set(v as i64);
            }
        }
    }
    r.register(
        "procman_worker_memory_bytes",
        "Memory of each worker's process group",
        memory,
    );

    let queue = Family::<Labels, Gauge>::default();
    for (bind, n) in &s.listen_queue {
        queue
            .get_or_create(&labels(&[("bind", bind)]))
            .set(*n as i64);
    }
    r.register(
        "procman_listen_queue_depth",
        "Connections waiting in each listener's accept queue",
        queue,
    );

    let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    uptime.set(s.uptime_s);
    r.register(
        "procman_uptime_seconds",
        "Time since the master started",
        uptime,
    );

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_by_the_blank_line() {
        assert_eq!(frame(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(
            frame(b"GET /readyz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Some((Route::Readyz, false)))
        );
        assert_eq!(
            frame(b"HEAD /healthz HTTP/1.0\n\n"),
            Ok(Some((Route::Healthz, true)))
        );
        let nf = frame(b"GET /nope HTTP/1.1\r\n\r\n").expect_err("404");
        assert!(nf.starts_with(b"HTTP/1.1 404 "));
        let bad = frame(b"POST /metrics HTTP/1.1\r\n\r\n").expect_err("405");
        assert!(bad.starts_with(b"HTTP/1.1 405 "));
    }
}
