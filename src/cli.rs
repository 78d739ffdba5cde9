//! The command line as clap sees it: raw values only.
//!
//! Every option is kept as the text the user typed (or the environment or
//! the config file supplied), so that one place, `config.rs`, validates all
//! of them with the same messages whatever their source. Nothing here has a
//! side effect. Each option's long name is also its config-file key and,
//! upper-cased with `-` → `_` and a `PROCMAN_` prefix, its environment
//! variable. A command-line value is never split: `-e KEY=a,b` is one
//! value. Only the list variables `PROCMAN_BIND` and `PROCMAN_ENV` hold
//! several values, comma-separated; `layers.rs` splits them.

use clap::{ArgAction, Parser};
use serde::{Deserialize, Serialize};

/// Examples printed at the end of `--help`.
const EXAMPLES: &str = "\
Examples:
  Serve a FastAPI app with 4 uvicorn workers (drop-in for gunicorn -k uvicorn_worker.UvicornWorker):
    procman app:main --workers 4 --bind 0.0.0.0:80
  Run any server that takes its sockets by the systemd convention (LISTEN_FDS, fd 3...):
    procman --workers 4 --bind :8000 -- ./server --flag
  Under systemd (Type=notify, ExecReload=/bin/kill -HUP $MAINPID):
    ExecStart=/usr/local/bin/procman -c /etc/app/procman.toml

Signals: TERM graceful stop, INT/QUIT quick stop, HUP rolling reload, TTIN/TTOU one worker
more/fewer, USR1 reopen the log file and forward to workers.
Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error,
3 workers failed to boot, 4 the app could not be imported.";

/// procman's raw command line.
#[derive(Parser, Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
#[command(
    name = "procman",
    version,
    about = "A pre-fork process manager: binds the sockets, forks N workers that inherit them, keeps them healthy.",
    after_help = EXAMPLES,
    override_usage = "procman [OPTIONS] APP\n       procman [OPTIONS] -- COMMAND [ARG]...",
    max_term_width = 100,
    args_override_self = true
)]
pub struct Cli {
    /// The Python app to serve with uvicorn workers, as module:attribute (e.g. app:main).
    #[arg(value_name = "APP", env = "PROCMAN_APP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,

    /// The command to run as each worker (after --); it gets its sockets at fd 3...
    #[arg(last = true, value_name = "COMMAND")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,

    // ---- Binding ----
    /// Address to listen on: HOST:PORT, :PORT, [V6]:PORT, unix:PATH or fd://N; repeatable (PROCMAN_BIND: a comma-separated list, \, for a comma). [default: 127.0.0.1:8000, or 0.0.0.0:$PORT]
    #[arg(
        short = 'b',
        long,
        value_name = "ADDR",
        env = "PROCMAN_BIND",
        help_heading = "Binding"
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bind: Vec<String>,

    /// One SO_REUSEPORT socket per worker (the kernel spreads connections) instead of one shared socket.
    #[arg(long, action = ArgAction::SetTrue, env = "PROCMAN_REUSE_PORT", help_heading = "Binding")]
    #[serde(skip_serializing_if = "is_false")]
    pub reuse_port: bool,

    /// Listen backlog. [default: 2048]
    #[arg(
        long,
        value_name = "N",
        env = "PROCMAN_BACKLOG",
        allow_negative_numbers = true,
        help_heading = "Binding"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<String>,

    // ---- Workers ----
    /// Number of workers, or auto (the CPUs this process may use). [default: $WEB_CONCURRENCY, else 1]
    #[arg(
        short = 'w',
        long,
        value_name = "N|auto",
        env = "PROCMAN_WORKERS",
        allow_negative_numbers = true,
        help_heading = "Workers"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<String>,

    /// Worker class, for gunicorn command lines: uvicorn.workers.UvicornWorker or uvicorn_worker.UvicornWorker.
    #[arg(
        short = 'k',
        long,
        value_name = "CLASS",
        env = "PROCMAN_WORKER_CLASS",
        help_heading = "Workers"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_class: Option<String>,

    /// Command workers are ready once exec succeeded and they stayed alive for --ready-after (exec), or when they send READY=1 (notify). [default: exec]
    #[arg(
        long,
        value_name = "exec|notify",
        env = "PROCMAN_READY",
        help_heading = "Workers"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// With --ready exec: how long a command worker must stay alive after exec to count as ready (dying sooner is a failed boot); 0 = ready at exec. [default: 1s]
    #[arg(
        long,
        value_name = "DUR",
        env = "PROCMAN_READY_AFTER",
        help_heading = "Workers"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_after: Option<String>,

    /// Signal that asks a command worker to stop gracefully. [default: TERM]
    #[arg(
        long,
        value_name = "SIG",
        env = "PROCMAN_STOP_SIGNAL",
        help_heading = "Workers"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,

    /// Python interpreter for uvicorn workers. [default: $VIRTUAL_ENV/bin/python, else python3]
    #[arg(
        long,
        value_name = "PATH",
        env = "PROCMAN_PYTHON",
        help_heading = "Workers"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,

    /// Uvicorn workers are forked from a zygote that imported the app once (shared memory, fast respawns).
    #[arg(long, action = ArgAction::SetTrue, env = "PROCMAN_PRELOAD", help_heading = "Workers")]
    #[serde(skip_serializing_if = "is_false")]
    pub preload: bool,

    // ---- Timeouts ----
    /// A ready worker silent (no heartbeat) this long is aborted and replaced; 0 = off. [default: 30]
    #[arg(
        short = 't',
        long,
        value_name = "SECS",
        env = "PROCMAN_TIMEOUT",
        allow_negative_numbers = true,
        help_heading = "Timeouts"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,

    /// A worker not ready by then is killed; counts as a boot failure. [default: 60]
    #[arg(
        long,
        value_name = "SECS",
        env = "PROCMAN_STARTUP_TIMEOUT",
        allow_negative_numbers = true,
        help_heading = "Timeouts"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<String>,

    /// How long stopping workers may drain before SIGKILL. [default: 30]
    #[arg(
        long,
        value_name = "SECS",
        env = "PROCMAN_GRACEFUL_TIMEOUT",
        allow_negative_numbers = true,
        help_heading = "Timeouts"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graceful_timeout: Option<String>,

    // ---- Recycling ----
    /// Uvicorn workers: recycle a worker after N requests; 0 = off. [default: 0]
    #[arg(
        long,
        value_name = "N",
        env = "PROCMAN_MAX_REQUESTS",
        allow_negative_numbers = true,
        help_heading = "Recycling"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<String>,

    /// Add a random 0..N to each worker's --max-requests. [default: 0]
    #[arg(
        long,
        value_name = "N",
        env = "PROCMAN_MAX_REQUESTS_JITTER",
        allow_negative_numbers = true,
        help_heading = "Recycling"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_jitter: Option<String>,

    /// Recycle a worker whose memory (RSS of its process group) stays above SIZE (e.g. 512MiB, 1G) for 3 samples in a row.
    #[arg(
        long,
        value_name = "SIZE",
        env = "PROCMAN_MAX_WORKER_MEMORY",
        help_heading = "Recycling"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_worker_memory: Option<String>,

    /// How often worker memory is sampled for --max-worker-memory. [default: 5s]
    #[arg(
        long,
        value_name = "DUR",
        env = "PROCMAN_MEMORY_CHECK_INTERVAL",
        help_heading = "Recycling"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_check_interval: Option<String>,

    /// Recycle workers older than DUR (e.g. 30m, 6h).
    #[arg(
        long,
        value_name = "DUR",
        env = "PROCMAN_MAX_WORKER_LIFETIME",
        help_heading = "Recycling"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_worker_lifetime: Option<String>,

    /// Add a random 0..DUR to each worker's --max-worker-lifetime, so workers do not all recycle together.
    #[arg(
        long,
        value_name = "DUR",
        env = "PROCMAN_MAX_WORKER_LIFETIME_JITTER",
        help_heading = "Recycling"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_worker_lifetime_jitter: Option<String>,

    // ---- Process ----
    /// Run `sh -c CMD` once before any worker starts; repeatable, in order; a failure aborts.
    #[arg(
        long,
        value_name = "CMD",
        env = "PROCMAN_PRE_START",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pre_start: Vec<String>,

    /// Run workers as this user (name or number), after binding.
    #[arg(
        short = 'u',
        long,
        value_name = "USER",
        env = "PROCMAN_USER",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,

    /// Run workers with this group (name or number), after binding.
    #[arg(
        short = 'g',
        long,
        value_name = "GROUP",
        env = "PROCMAN_GROUP",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,

    /// Umask for workers and unix socket files, octal. [default: 0o022]
    #[arg(
        short = 'm',
        long,
        value_name = "MASK",
        env = "PROCMAN_UMASK",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub umask: Option<String>,

    /// Write procman's pid to FILE (refused if a live procman owns it).
    #[arg(
        short = 'p',
        long = "pid",
        value_name = "FILE",
        env = "PROCMAN_PID",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Option::is_none", rename = "pid")]
    pub pidfile: Option<String>,

    /// Working directory of workers (and sys.path[0] for APP). [default: current]
    #[arg(
        long,
        value_name = "DIR",
        env = "PROCMAN_CHDIR",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chdir: Option<String>,

    /// Extra environment for workers, KEY=VALUE (the value as typed, commas included); repeatable (PROCMAN_ENV: a comma-separated list, \, for a comma).
    #[arg(
        short = 'e',
        long,
        value_name = "KEY=VALUE",
        env = "PROCMAN_ENV",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,

    // ---- Uvicorn ----
    /// APP names a factory: call it to get the app.
    #[arg(long, action = ArgAction::SetTrue, env = "PROCMAN_FACTORY", help_heading = "Uvicorn")]
    #[serde(skip_serializing_if = "is_false")]
    pub factory: bool,

    /// TLS private key file (HTTPS served by uvicorn).
    #[arg(
        long,
        value_name = "FILE",
        env = "PROCMAN_KEYFILE",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<String>,

    /// TLS certificate file.
    #[arg(
        long,
        value_name = "FILE",
        env = "PROCMAN_CERTFILE",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certfile: Option<String>,

    /// Close keep-alive connections idle this long. [default: 5]
    #[arg(
        long,
        value_name = "SECS",
        env = "PROCMAN_KEEP_ALIVE",
        allow_negative_numbers = true,
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<String>,

    /// Answer 503 beyond this many concurrent connections or tasks per worker.
    #[arg(
        long,
        value_name = "N",
        env = "PROCMAN_LIMIT_CONCURRENCY",
        allow_negative_numbers = true,
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_concurrency: Option<String>,

    /// Trust X-Forwarded-Proto/For from --forwarded-allow-ips.
    #[arg(long, action = ArgAction::SetTrue, env = "PROCMAN_PROXY_HEADERS", help_heading = "Uvicorn")]
    #[serde(skip_serializing_if = "is_false")]
    pub proxy_headers: bool,

    /// Comma-separated IPs trusted for proxy headers. [default: 127.0.0.1]
    #[arg(
        long,
        value_name = "IPS",
        env = "PROCMAN_FORWARDED_ALLOW_IPS",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_allow_ips: Option<String>,

    /// ASGI root_path for apps mounted below a prefix.
    #[arg(
        long,
        value_name = "PATH",
        env = "PROCMAN_ROOT_PATH",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_path: Option<String>,

    /// Lifespan handling: auto, on or off. [default: auto]
    #[arg(
        long,
        value_name = "auto|on|off",
        env = "PROCMAN_LIFESPAN",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifespan: Option<String>,

    /// App interface: auto, asgi3, asgi2 or wsgi. [default: auto]
    #[arg(
        long,
        value_name = "KIND",
        env = "PROCMAN_INTERFACE",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,

    /// HTTP implementation: auto, h11 or httptools. [default: auto]
    #[arg(
        long,
        value_name = "IMPL",
        env = "PROCMAN_HTTP",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,

    /// Event loop: auto, asyncio or uvloop. [default: auto]
    #[arg(
        long = "loop",
        value_name = "LOOP",
        env = "PROCMAN_LOOP",
        help_heading = "Uvicorn"
    )]
    #[serde(skip_serializing_if = "Option::is_none", rename = "loop")]
    pub event_loop: Option<String>,

    /// Turn off uvicorn's per-request access log.
    #[arg(long, action = ArgAction::SetTrue, env = "PROCMAN_NO_ACCESS_LOG", help_heading = "Uvicorn")]
    #[serde(skip_serializing_if = "is_false")]
    pub no_access_log: bool,

    // ---- Logging ----
    /// Master's log level: error, warn, info, debug, trace (also passed to uvicorn). [default: info]
    #[arg(
        long,
        value_name = "LEVEL",
        env = "PROCMAN_LOG_LEVEL",
        help_heading = "Logging"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,

    /// Master's log format: text or json (one object per line). [default: text]
    #[arg(
        long,
        value_name = "text|json",
        env = "PROCMAN_LOG_FORMAT",
        help_heading = "Logging"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,

    /// Append the master's log to PATH instead of stderr; USR1 reopens it (logrotate).
    #[arg(
        long,
        value_name = "PATH",
        env = "PROCMAN_LOG_FILE",
        help_heading = "Logging"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,

    // ---- Config ----
    /// TOML file whose keys are the long option names (workers = 4, bind = [":8000"]); HUP re-reads it.
    #[arg(
        short = 'c',
        long,
        value_name = "FILE",
        env = "PROCMAN_CONFIG",
        help_heading = "Config"
    )]
    #[serde(skip)]
    pub config: Option<String>,

    /// Validate the configuration (and import the APP once), then exit.
    #[arg(long, action = ArgAction::SetTrue, help_heading = "Config")]
    #[serde(skip)]
    pub check_config: bool,

    /// Print the effective configuration as TOML, with where each value came from, then exit.
    #[arg(long, action = ArgAction::SetTrue, help_heading = "Config")]
    #[serde(skip)]
    pub print_config: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn app_and_command_are_told_apart() {
        let cli = Cli::try_parse_from(["procman", "app:main", "-w", "4"]).expect("parses");
        assert_eq!(cli.app.as_deref(), Some("app:main"));
        assert!(cli.command.is_empty());
        let cli = Cli::try_parse_from(["procman", "-w", "2", "--", "./server", "--flag"])
            .expect("parses");
        assert_eq!(cli.app, None);
        assert_eq!(cli.command, ["./server", "--flag"]);
    }

    #[test]
    fn repeatable_options_keep_their_order() {
        let cli = Cli::try_parse_from(["procman", "-b", ":1", "-b", "unix:/x", "--", "true"])
            .expect("parses");
        assert_eq!(cli.bind, [":1", "unix:/x"]);
    }
}
