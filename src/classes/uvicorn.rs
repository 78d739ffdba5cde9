//! The uvicorn class: `<python> -c <loader> "procman [app]"`, where the
//! loader runs the bootstrap, a Python file shipped inside the binary. It
//! takes the listeners from `LISTEN_FDS`, imports the app, runs uvicorn and
//! speaks sd_notify back (READY=1 after startup, WATCHDOG=1 from the event
//! loop).
//!
//! The options reach it as one JSON object in `PROCMAN_APP_CONFIG`, and the
//! source itself in `PROCMAN_BOOTSTRAP`, so no file is needed at run time and
//! the command line (`ps`, `top`, `/proc/PID/cmdline`) stays short: the
//! loader takes the variable out of the environment before the bootstrap
//! runs, and the bootstrap then rewrites its title to name its role, e.g.
//! `procman: worker 2 gen 1 [app:main]`. The source is compiled under the
//! name `<procman-bootstrap>` (not `-c`'s `<string>`), so that a traceback
//! says where a frame comes from.

use super::Launch;
use crate::config::{Config, UvicornOptions};

/// The bootstrap's source, embedded at build time.
pub const BOOTSTRAP: &str = include_str!("bootstrap.py");

/// The environment variable that carries the options.
pub const CONFIG_VAR: &str = "PROCMAN_APP_CONFIG";

/// The environment variable that carries the bootstrap's source.
pub const SOURCE_VAR: &str = "PROCMAN_BOOTSTRAP";

/// `python -c LOADER TITLE`: the loader drops the title from `sys.argv`
/// (leaving `sys.argv == ["-c"]`, as plain `-c` would), takes the source out
/// of the environment (so neither the app nor its subprocesses see it) and
/// runs it in `__main__` under its own file name. `os.environ.pop` also
/// unsets the C-level variable.
const LOADER: &str = "import os, sys; del sys.argv[1:]; \
                      exec(compile(os.environ.pop('PROCMAN_BOOTSTRAP'), '<procman-bootstrap>', 'exec'))";

/// The bootstrap's argv under `python` (without the program name). The last
/// argument is only a title for `ps` until the bootstrap writes its own.
pub fn bootstrap_args(app: &str) -> [String; 3] {
    ["-c".into(), LOADER.into(), format!("procman [{app}]")]
}

/// The variable that hands the source to the loader.
pub fn bootstrap_env() -> (String, String) {
    (SOURCE_VAR.into(), BOOTSTRAP.into())
}

/// Runs the bootstrap under the configured interpreter.
pub fn launch(opts: &UvicornOptions, cfg: &Config) -> Launch {
    let python = opts.python.display().to_string();
    let mut argv = vec![python];
    argv.extend(bootstrap_args(&opts.app));
    Launch {
        program: opts.python.clone(),
        argv,
        env: vec![
            (CONFIG_VAR.into(), app_config(opts, cfg).to_string()),
            bootstrap_env(),
        ],
    }
}

/// What the master keeps of `--graceful-timeout` for the end of a uvicorn
/// worker's stop, after its drain: 2 s, or half the timeout below 4 s.
const STOP_RESERVE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long uvicorn lets requests (and streams) finish on TERM, counted
/// from the moment the worker receives the signal: `--graceful-timeout`
/// less 2 s (less half of it below 4 s). The reserve is for what follows
/// the drain before the master's SIGKILL at the full timeout: cancelling
/// what is left, the lifespan shutdown (closing a database pool: 0.5 s
/// fits with a wide margin from 4 s on), and the interpreter's exit. The
/// bootstrap counts the time uvicorn takes to notice the stop and its own
/// sleeps into the drain, not into the reserve.
pub fn uvicorn_drain(graceful: std::time::Duration) -> std::time::Duration {
    graceful.saturating_sub((graceful / 2).min(STOP_RESERVE))
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
        // Absolute: workers run in --chdir; they reopen it by path on USR1.
        "log_file": cfg.log_file.as_ref().map(|p| {
            std::path::absolute(p).unwrap_or_else(|_| p.clone()).display().to_string()
        }),
        // Worker lines in the master's format (slot and generation come
        // from PROCMAN_WORKER_ID and PROCMAN_GENERATION).
        "log_format": match cfg.log_format {
            crate::config::LogFormat::Text => "text",
            crate::config::LogFormat::Json => "json",
        },
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
        let table = [
            (30_000, 28_000),
            (4_000, 2_000),
            (3_000, 1_500),
            (1_000, 500),
            (0, 0),
        ];
        for (graceful, drain) in table {
            assert_eq!(
                uvicorn_drain(Duration::from_millis(graceful)),
                Duration::from_millis(drain),
                "{graceful} ms"
            );
        }
    }
}
