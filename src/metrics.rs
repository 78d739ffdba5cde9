//! `--metrics`: `GET /metrics`, `/healthz` and `/readyz` over a minimal
//! HTTP/1.1, served from the master's own loop by [`crate::serve`].
//!
//! Only what a scraper or a Kubernetes probe sends is understood: a
//! request line and headers (a body is never read), one request per
//! connection (`Connection: close`). `/healthz` is 200 while the master
//! runs (it answers, so it runs); `/readyz` is 200 when a worker is ready
//! and no stop has begun, else 503, from the master's worker table alone
//! (no snapshot, no /proc); `/metrics` is the exposition text, encoded by
//! `prometheus-client` from a [`Snapshot`] and the histograms the master
//! keeps.
//!
//! Two text formats, by the request's `Accept`: OpenMetrics when it offers
//! `application/openmetrics-text` (Prometheus does), else the classic
//! Prometheus text format 0.0.4 (curl, Python's `prometheus_client.parser`,
//! older scrapers). They differ in how a counter is named: OpenMetrics's
//! `# TYPE` names the family (`procman_worker_restarts`) and its samples
//! add `_total`; the classic format's `# TYPE` names the sample itself
//! (`procman_worker_restarts_total`), and a classic parser given the
//! OpenMetrics form sees the samples as untyped.

use std::collections::BTreeMap;

use prometheus_client::encoding::{prometheus_text, text};
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

/// A whole request, as far as it matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub route: Route,
    /// `HEAD`: the answer without its body.
    pub head_only: bool,
    /// The client accepts OpenMetrics.
    pub openmetrics: bool,
}

/// The exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Prometheus,
}

const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Frames an HTTP request: incomplete until the blank line ending the
/// headers; then the request, or an error answer.
pub fn frame(bytes: &[u8]) -> Result<Option<Request>, Vec<u8>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Tolerate bare LF line ends (some hand-written probes).
        bytes.windows(2).position(|w| w == b"\n\n")
    }) else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.lines();
    let line = lines.next().unwrap_or("");
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
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept") && offers_openmetrics(value)
        })
    });
    Ok(Some(Request {
        route,
        head_only,
        openmetrics,
    }))
}

/// Whether an `Accept` value lists `application/openmetrics-text` with a
/// quality above 0.
fn offers_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut params = range.split(';').map(str::trim);
        let kind = params.next().unwrap_or("");
        kind.eq_ignore_ascii_case("application/openmetrics-text")
            && !params.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// The framing function for [`crate::serve::Server::service`]: answers
/// a whole request. `/readyz` asks `ready` only (the worker table, no stop
/// begun); `/metrics` builds a `snapshot` (a scan of /proc), lazily.
pub fn answer(
    bytes: &[u8],
    ready: &mut dyn FnMut() -> bool,
    snapshot: &mut dyn FnMut() -> Snapshot,
    observed: &Observed,
) -> Framed {
    match frame(bytes) {
        Ok(None) => Framed::Incomplete,
        Err(reply) => Framed::Reply(reply),
        Ok(Some(req)) => Framed::Reply(match req.route {
            Route::Healthz => response(200, "text/plain", b"ok\n", req.head_only),
            Route::Readyz if ready() => response(200, "text/plain", b"ready\n", req.head_only),
            Route::Readyz => response(503, "text/plain", b"not ready\n", req.head_only),
            Route::Metrics => {
                let format = if req.openmetrics {
                    Format::OpenMetrics
                } else {
                    Format::Prometheus
                };
                let text = render(&snapshot(), observed, format);
                let kind = match format {
                    Format::OpenMetrics => OPENMETRICS_TYPE,
                    Format::Prometheus => prometheus_text::CONTENT_TYPE,
                };
                response(200, kind, text.as_bytes(), req.head_only)
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

/// The exposition text of a snapshot, in `format`.
pub fn render(s: &Snapshot, observed: &Observed, format: Format) -> String {
    let mut r = Registry::default();

    // A constant 1 whose labels say what this procman serves (-n/--name).
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&labels(&[("name", &s.name), ("version", &s.version)]))
        .set(1);
    r.register("procman_info", "What this procman serves", info);

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
        "procman_zygote_messages_dropped",
        "Messages dropped from zygotes' channels, by reason",
        counters("reason", &s.zygote_drops),
    );

    r.register(
        "procman_notify_dropped",
        "What the notify socket discarded, by reason (datagrams; lines for excess-lines, descriptors for descriptors)",
        counters("reason", &s.notify_dropped),
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
    let _ = match format {
        Format::OpenMetrics => text::encode(&mut out, &r),
        Format::Prometheus => prometheus_text::encode(&mut out, &r),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_by_the_blank_line() {
        let req = |route, head_only, openmetrics| {
            Ok(Some(Request {
                route,
                head_only,
                openmetrics,
            }))
        };
        assert_eq!(frame(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(
            frame(b"GET /readyz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            req(Route::Readyz, false, false)
        );
        assert_eq!(
            frame(b"HEAD /healthz HTTP/1.0\n\n"),
            req(Route::Healthz, true, false)
        );
        // Prometheus's own Accept.
        assert_eq!(
            frame(b"GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2\r\n\r\n"),
            req(Route::Metrics, false, true)
        );
        assert_eq!(
            frame(b"GET /metrics HTTP/1.1\r\nAccept: text/plain, application/openmetrics-text;q=0\r\n\r\n"),
            req(Route::Metrics, false, false)
        );
        let nf = frame(b"GET /nope HTTP/1.1\r\n\r\n").expect_err("404");
        assert!(nf.starts_with(b"HTTP/1.1 404 "));
        let bad = frame(b"POST /metrics HTTP/1.1\r\n\r\n").expect_err("405");
        assert!(bad.starts_with(b"HTTP/1.1 405 "));
    }

    fn snapshot_with_one_ready_worker() -> Snapshot {
        Snapshot {
            pid: 1,
            name: "shop-api".into(),
            version: "0".into(),
            uptime_s: 1.0,
            generation: 1,
            state: "running".into(),
            target: 1,
            reload: None,
            workers: vec![crate::status::WorkerStatus {
                slot: 0,
                pid: 2,
                generation: 1,
                state: "ready".into(),
                age_s: 1.0,
                rss_bytes: None,
                uss_bytes: None,
                heartbeat_age_s: None,
                restarts: 0,
                last_exit: None,
            }],
            restarts: BTreeMap::new(),
            reloads: BTreeMap::new(),
            listen_queue: Vec::new(),
            notify_dropped: BTreeMap::new(),
            zygote_drops: BTreeMap::from([("oversized".to_string(), 3)]),
        }
    }

    #[test]
    fn readyz_builds_no_snapshot() {
        let observed = Observed::default();
        let mut built = 0;
        let mut snapshot = || {
            built += 1;
            snapshot_with_one_ready_worker()
        };
        for (ready, code) in [(true, "200"), (false, "503")] {
            let answer = answer(
                b"GET /readyz HTTP/1.1\r\n\r\n",
                &mut || ready,
                &mut snapshot,
                &observed,
            );
            let want = format!("HTTP/1.1 {code} ");
            assert!(matches!(answer, Framed::Reply(r) if r.starts_with(want.as_bytes())));
        }
        assert_eq!(
            built, 0,
            "/readyz built a status snapshot (a scan of /proc)"
        );
    }

    #[test]
    fn counters_are_typed_on_their_sample_names_in_the_classic_format() {
        let observed = Observed::default();
        let mut snap = snapshot_with_one_ready_worker();
        snap.restarts.insert("crash".into(), 2);
        let classic = render(&snap, &observed, Format::Prometheus);
        assert!(
            classic.contains("# TYPE procman_worker_restarts_total counter\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"), "{classic}");
        assert!(
            classic.contains("procman_zygote_messages_dropped_total{reason=\"oversized\"} 3\n"),
            "{classic}"
        );
        let om = render(&snap, &observed, Format::OpenMetrics);
        assert!(
            om.contains("# TYPE procman_worker_restarts counter\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
