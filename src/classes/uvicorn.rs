//! The uvicorn class: `<python> -c <bootstrap>`, where the bootstrap is a
//! Python file shipped inside the binary. It takes the listeners from
//! `LISTEN_FDS`, imports the app, runs uvicorn and speaks sd_notify back
//! (READY=1 after startup, WATCHDOG=1 from the event loop).
//!
//! The options reach it as one JSON object in `PROCMAN_APP_CONFIG`, so the
//! argv shown by `ps` stays short and no file is needed at run time.

use super::Launch;
use crate::config::{Config, UvicornOptions};

/// The bootstrap's source, embedded at build time.
pub const BOOTSTRAP: &str = include_str!("bootstrap.py");

/// The environment variable that carries the options.
pub const CONFIG_VAR: &str = "PROCMAN_APP_CONFIG";

/// Runs the bootstrap under the configured interpreter.
pub fn launch(opts: &UvicornOptions, cfg: &Config) -> Launch {
    let python = opts.python.display().to_string();
    Launch {
        program: opts.python.clone(),
        argv: vec![python, "-c".into(), BOOTSTRAP.into()],
        env: vec![(CONFIG_VAR.into(), app_config(opts, cfg).to_string())],
    }
}

/// How long uvicorn itself lets requests finish on TERM: a little less than
/// `--graceful-timeout`, so that it cancels what is left, closes the
/// connections and runs the lifespan shutdown before the master's SIGKILL
/// at the full timeout (up to 1 s of margin, at most half the timeout).
pub fn uvicorn_drain(graceful: std::time::Duration) -> std::time::Duration {
    graceful.saturating_sub((graceful / 2).min(std::time::Duration::from_secs(1)))
}

/// The JSON object the bootstrap reads.
pub fn app_config(opts: &UvicornOptions, cfg: &Config) -> serde_json::Value {
    serde_json::json!({
        "mode": "worker",
        "app": opts.app,
        "factory": opts.factory,
        "interface": opts.interface,
        "lifespan": opts.lifespan,
        "http": opts.http,
        "loop": opts.event_loop,
        "keep_alive": opts.keep_alive,
        "limit_concurrency": opts.limit_concurrency,
        "proxy_headers": opts.proxy_headers,
        "forwarded_allow_ips": opts.forwarded_allow_ips,
        "root_path": opts.root_path,
        "ssl_keyfile": opts.keyfile.as_ref().map(|p| p.display().to_string()),
        "ssl_certfile": opts.certfile.as_ref().map(|p| p.display().to_string()),
        "access_log": opts.access_log,
        "log_level": cfg.log_level.uvicorn_name(),
        "graceful_timeout": uvicorn_drain(cfg.graceful_timeout).as_secs_f64(),
        "max_requests": opts.max_requests,
        "max_requests_jitter": opts.max_requests_jitter,
        // asyncio calls listen() again on the shared socket when it starts
        // serving, which would reset --backlog to its own default.
        "backlog": cfg.backlog,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn uvicorn_drains_a_little_less_than_the_master_waits() {
        let table = [(30_000, 29_000), (3_000, 2_000), (1_000, 500), (0, 0)];
        for (graceful, drain) in table {
            assert_eq!(
                uvicorn_drain(Duration::from_millis(graceful)),
                Duration::from_millis(drain),
                "{graceful} ms"
            );
        }
    }
}
