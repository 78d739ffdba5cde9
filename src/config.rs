//! The validated configuration: raw values from `cli.rs` (command line and
//! `PROCMAN_*` environment) merged over built-in defaults, checked and
//! resolved into typed values.
//!
//! Building a [`Config`] has no side effects: nothing is bound, spawned or
//! written. It reads only what it must to resolve names (PATH for the
//! command, the user database for `--user`, the CPU mask for `auto`), so a
//! bad value is reported before anything starts. Every error names the
//! option, the value and the problem, and is a usage error (exit 2).
//! The value parsers are in `config/values.rs`, what the workers run in
//! `config/workers.rs`, who they run as in `config/credentials.rs`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::bind::BindSpec;
use crate::cli::{Class, Cli, OPTIONS};
use crate::error::{Error, Result};
use crate::identity::Credentials;

mod credentials;
mod outputs;
mod values;
mod watch;
mod workers;

use credentials::credentials;
use values::{parse_duration, parse_env_pair, parse_signal, parse_size, parse_umask};
pub use watch::WatchConfig;
use workers::worker_kind;
pub use workers::{
    find_program, Server, UvicornOptions, WorkerKind, GRANIAN_CLASS, UVICORN_CLASSES,
};

/// When a command worker counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    /// When exec succeeded and the process stayed alive for
    /// `--ready-after`.
    Exec,
    /// When it sends READY=1 on NOTIFY_SOCKET.
    Notify,
}

/// The master's log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    /// The default.
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The name uvicorn uses for the same level.
    pub fn uvicorn_name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warning",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The master's log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
    /// Entries in the systemd journal (journal.rs).
    Journal,
}

impl LogFormat {
    /// Its name, as `--log-format` takes it.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journal => "journal",
        }
    }
}

/// The validated, resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kind: WorkerKind,
    /// Where to listen, in `--bind` order.
    pub binds: Vec<BindSpec>,
    /// Whether `--bind` was given (else `binds` is the default, which
    /// sockets inherited from systemd replace).
    pub binds_given: bool,
    /// listen(2) backlog.
    pub backlog: i32,
    pub workers: usize,
    /// Why that number (for the start-up log).
    pub workers_reason: String,
    /// Readiness of command workers (uvicorn workers always notify).
    pub ready: ReadyMode,
    /// `--ready exec`: how long a worker must stay alive after exec to be
    /// ready (zero: ready at exec).
    pub ready_after: Duration,
    /// Graceful stop signal for workers.
    pub stop_signal: Signal,
    /// Heartbeat timeout; `None` = off.
    pub timeout: Option<Duration>,
    /// Time allowed from spawn to ready.
    pub startup_timeout: Duration,
    /// Drain time before SIGKILL on a graceful stop.
    pub graceful_timeout: Duration,
    /// `sh -c` commands run once before the first worker.
    pub pre_start: Vec<String>,
    /// Privilege drop for workers.
    pub credentials: Option<Credentials>,
    /// `-n/--name`: in process titles and `procman_info`; the APP or
    /// the command's name when not given.
    pub name: String,
    /// umask for workers.
    pub umask: u32,
    /// Mode of unix socket files (`--socket-mode`, narrowed by an explicit
    /// `--umask`).
    pub socket_mode: u32,
    /// Group of unix socket files (`--socket-group`).
    pub socket_group: Option<u32>,
    pub pidfile: Option<PathBuf>,
    /// Workers' working directory.
    pub chdir: Option<PathBuf>,
    /// Extra worker environment.
    pub env: Vec<(String, String)>,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    /// The raw options this was resolved from (a reload compares the
    /// restart-only ones).
    pub options: Cli,
    /// Master log file (else stderr).
    pub log_file: Option<PathBuf>,
    /// One SO_REUSEPORT listener per worker for TCP binds.
    pub reuse_port: bool,
    /// Recycle a worker above this many bytes (3 samples in a row).
    pub max_worker_memory: Option<u64>,
    /// Sampling period for `max_worker_memory`.
    pub memory_check_interval: Duration,
    /// Recycle workers older than this (plus jitter).
    pub max_worker_lifetime: Option<Duration>,
    /// Random extra lifetime, drawn once per worker.
    pub max_worker_lifetime_jitter: Duration,
    /// Raise a booting worker's CPU priority where procman may
    /// (`--no-boot-boost` turns it off).
    pub boot_boost: bool,
    /// `--cpu-affinity auto`: each worker on one CPU, by slot.
    pub cpu_affinity: bool,
    /// `--reload`: what to watch.
    pub watch: Option<WatchConfig>,
}

/// The parts of procman's own environment that configuration depends on,
/// gathered once so that validation is a pure function of its inputs.
/// (`WEB_CONCURRENCY` and `PORT` are configuration layers: `layers.rs`
/// folds them into the options, with their source.)
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `$WEB_CONCURRENCY`, for `layers.rs`.
    pub web_concurrency: Option<String>,
    /// `$PORT`, for `layers.rs`.
    pub port: Option<String>,
    /// `$PROCMAN_CMD_ARGS` (options as on the command line), for
    /// `layers.rs`.
    pub cmd_args: Option<String>,
    /// `$FORWARDED_ALLOW_IPS` (uvicorn's and gunicorn's default for
    /// `--forwarded-allow-ips`), for `layers.rs`.
    pub forwarded_allow_ips: Option<String>,
    /// `$VIRTUAL_ENV` (a path: any bytes).
    pub virtual_env: Option<OsString>,
    /// `$PATH` (directories: any bytes).
    pub path: Option<OsString>,
    /// The directory of procman's own executable: a procman installed
    /// into a virtualenv (or beside any interpreter) by pip finds that
    /// environment's `python` there.
    pub own_dir: Option<PathBuf>,
    /// procman's effective uid.
    pub euid: u32,
}

impl Environment {
    /// Reads the real process environment. Paths are kept as bytes; a
    /// `WEB_CONCURRENCY` or `PORT` that is not UTF-8 is kept with U+FFFD in
    /// place of the bad bytes, so that validation reports it (naming the
    /// variable) instead of ignoring it.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let text = |k: &str| var(k).map(|v| v.to_string_lossy().into_owned());
        Environment {
            web_concurrency: text("WEB_CONCURRENCY"),
            port: text("PORT"),
            forwarded_allow_ips: text("FORWARDED_ALLOW_IPS"),
            cmd_args: text("PROCMAN_CMD_ARGS"),
            virtual_env: var("VIRTUAL_ENV"),
            path: var("PATH"),
            // current_exe() reads /proc/self/exe: the real file, wherever a
            // symlink to procman was invoked from (a link in ~/bin to
            // venv/bin/procman still finds venv/bin). Only procman's own
            // path is resolved, never the interpreter's (see default_python).
            // After an upgrade replaced the file the kernel appends
            // " (deleted)" to the name, which leaves its directory intact.
            own_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf)),
            euid: nix::unistd::geteuid().as_raw(),
        }
    }
}

/// A bad value of option `flag`; the error carries the option, so that
/// `layers.rs` can say where the value came from.
fn invalid(flag: &'static str, value: &str, why: impl std::fmt::Display) -> Error {
    belongs(
        flag,
        format!("invalid value '{value}' for '--{flag}': {why}"),
    )
}

/// A usage error that belongs to option `flag` (it does not apply, or
/// needs another): carried with it, like a bad value, never found again by
/// reading the message.
fn belongs(flag: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        option: flag,
        msg: msg.into(),
    }
}

impl Config {
    /// Validates and resolves the raw options.
    /// Every value is parsed by its option's parser; an option not set is
    /// parsed from its default's text in `cli::OPTIONS` (`Cli::value`).
    pub fn from_cli(cli: &Cli, env: &Environment) -> Result<Config> {
        let chdir = match cli.text("chdir") {
            None => None,
            Some(dir) => {
                let p = PathBuf::from(dir);
                if !p.is_dir() {
                    return Err(invalid("chdir", dir, "no such directory"));
                }
                Some(p)
            }
        };

        let kind = worker_kind(cli, env, chdir.as_deref())?;
        let name = workers::display_name(cli, &kind)?;
        let uvicorn = matches!(kind, WorkerKind::Uvicorn(_));
        let watch = watch::watch_config(cli, chdir.as_deref(), uvicorn)?;

        let binds = if cli.is_set("bind") {
            cli.list("bind")
                .iter()
                .map(|b| BindSpec::parse(b).map_err(|why| invalid("bind", b, why)))
                .collect::<Result<Vec<_>>>()?
        } else {
            let v = cli.value("bind");
            vec![BindSpec::parse(v).map_err(|why| invalid("bind", v, why))?]
        };

        let backlog = {
            let v = cli.value("backlog");
            match v.parse::<i32>() {
                Ok(n) if n > 0 => n,
                _ => return Err(invalid("backlog", v, "expected a positive whole number")),
            }
        };

        let (workers, workers_reason) = match cli.text("workers") {
            Some(v) => parse_workers("workers", v)?,
            None => (
                parse_workers("workers", cli.value("workers"))?.0,
                "default".to_string(),
            ),
        };

        let ready = match cli.value("ready") {
            "exec" => ReadyMode::Exec,
            "notify" => ReadyMode::Notify,
            v => return Err(invalid("ready", v, "expected 'exec' or 'notify'")),
        };
        if uvicorn {
            if let Some(err) = command_only(cli) {
                return Err(err);
            }
        }

        let stop_signal = {
            let v = cli.value("stop-signal");
            parse_signal(v).ok_or_else(|| {
                invalid(
                    "stop-signal",
                    v,
                    "not a signal name (e.g. TERM, INT, QUIT, USR1)",
                )
            })?
        };

        let duration = |flag: &'static str| -> Result<Duration> {
            let v = cli.value(flag);
            parse_duration(v).map_err(|why| invalid(flag, v, why))
        };
        let timeout = Some(duration("timeout")?).filter(|d| !d.is_zero());
        let startup_timeout = duration("startup-timeout")?;
        if startup_timeout.is_zero() {
            return Err(invalid(
                "startup-timeout",
                cli.value("startup-timeout"),
                "must be above 0",
            ));
        }
        let ready_after = duration("ready-after")?;
        if let Some(v) = cli.text("ready-after") {
            if uvicorn || ready == ReadyMode::Notify {
                return Err(belongs(
                    "ready-after",
                    format!("'--ready-after {v}' applies to command workers with '--ready exec'; workers that send READY=1 say themselves when they are ready"),
                ));
            }
            if ready_after >= startup_timeout {
                return Err(invalid(
                    "ready-after",
                    v,
                    "must be shorter than --startup-timeout",
                ));
            }
        }
        let graceful_timeout = duration("graceful-timeout")?;

        for cmd in cli.list("pre-start") {
            if cmd.trim().is_empty() {
                return Err(invalid("pre-start", cmd, "empty command"));
            }
        }

        let credentials = credentials(cli, env)?;

        let umask = {
            let v = cli.value("umask");
            parse_umask(v).ok_or_else(|| {
                invalid(
                    "umask",
                    v,
                    "expected an octal mask from 0 to 0o777, e.g. 0o022",
                )
            })?
        };

        let (socket_mode, socket_group) = outputs::socket_file(cli, umask)?;

        let env_pairs = cli
            .list("env")
            .iter()
            .map(|kv| parse_env_pair(kv).map_err(|why| invalid("env", kv, why)))
            .collect::<Result<Vec<_>>>()?;

        let log_level = {
            let v = cli.value("log-level");
            parse_log_level(v).ok_or_else(|| {
                invalid(
                    "log-level",
                    v,
                    "expected error, warning, info, debug or trace",
                )
            })?
        };

        let max_worker_memory = match cli.text("max-worker-memory") {
            None => None,
            Some(v) => Some(parse_size(v).map_err(|why| invalid("max-worker-memory", v, why))?),
        };
        let memory_check_interval = duration("memory-check-interval")?;
        if memory_check_interval < Duration::from_millis(100) {
            return Err(invalid(
                "memory-check-interval",
                cli.value("memory-check-interval"),
                "must be at least 100ms",
            ));
        }
        let max_worker_lifetime = match cli.text("max-worker-lifetime") {
            None => None,
            Some(v) => {
                let d = parse_duration(v).map_err(|why| invalid("max-worker-lifetime", v, why))?;
                if d < Duration::from_secs(1) {
                    return Err(invalid("max-worker-lifetime", v, "must be at least 1s"));
                }
                Some(d)
            }
        };
        let cpu_affinity = match cli.value("cpu-affinity") {
            "off" => false,
            "auto" => true,
            other => {
                return Err(invalid(
                    "cpu-affinity",
                    other,
                    "expected auto (each worker on one CPU, by slot) or off",
                ))
            }
        };
        let max_worker_lifetime_jitter = match cli.text("max-worker-lifetime-jitter") {
            None => Duration::ZERO,
            Some(v) => {
                parse_duration(v).map_err(|why| invalid("max-worker-lifetime-jitter", v, why))?
            }
        };
        if cli.is_set("max-worker-lifetime-jitter") && max_worker_lifetime.is_none() {
            return Err(belongs(
                "max-worker-lifetime-jitter",
                "'--max-worker-lifetime-jitter' needs '--max-worker-lifetime'",
            ));
        }
        if cli.is_set("memory-check-interval") && max_worker_memory.is_none() {
            return Err(belongs(
                "memory-check-interval",
                "'--memory-check-interval' needs '--max-worker-memory'",
            ));
        }

        let v = cli.value("log-format");
        let Some(log_format) = [LogFormat::Text, LogFormat::Json, LogFormat::Journal]
            .into_iter()
            .find(|f| f.name() == v)
        else {
            return Err(invalid(
                "log-format",
                v,
                "expected 'text', 'json' or 'journal'",
            ));
        };
        let log_file = outputs::log_file(cli)?;
        if log_format == LogFormat::Journal && log_file.is_some() {
            return Err(belongs(
                "log-file",
                "'--log-format journal' writes to the journal, not to '--log-file'",
            ));
        }

        Ok(Config {
            log_format,
            log_file,
            reuse_port: cli.flag("reuse-port"),
            max_worker_memory,
            memory_check_interval,
            max_worker_lifetime,
            max_worker_lifetime_jitter,
            boot_boost: !cli.flag("no-boot-boost"),
            cpu_affinity,
            kind,
            name,
            binds_given: cli.is_set("bind"),
            binds,
            backlog,
            workers,
            workers_reason,
            ready,
            ready_after,
            stop_signal,
            timeout,
            startup_timeout,
            graceful_timeout,
            pre_start: cli.list("pre-start").to_vec(),
            credentials,
            umask,
            socket_mode,
            socket_group,
            pidfile: cli.text("pid").map(PathBuf::from),
            chdir,
            env: env_pairs,
            log_level,
            options: cli.clone(),
            watch,
        })
    }

    /// How listening sockets are made.
    pub fn bind_options(&self) -> crate::bind::BindOptions {
        crate::bind::BindOptions {
            backlog: self.backlog,
            // The socket file's mode is set through the umask at bind(2).
            umask: 0o777 & !self.socket_mode,
            reuse_port: self.reuse_port,
            // u32::MAX (-1): fchownat leaves that id as it is.
            owner: match (&self.credentials, self.socket_group) {
                (None, None) => None,
                (c, g) => Some((
                    c.as_ref().map_or(u32::MAX, |c| c.uid),
                    g.or(c.as_ref().map(|c| c.gid)).unwrap_or(u32::MAX),
                )),
            },
        }
    }

    /// The uvicorn options, when serving an APP.
    pub fn uvicorn(&self) -> Option<&UvicornOptions> {
        match &self.kind {
            WorkerKind::Uvicorn(u) => Some(u),
            WorkerKind::Command { .. } => None,
        }
    }

    /// A short description of what the workers run, for logs.
    pub fn describe_workers(&self) -> String {
        match &self.kind {
            WorkerKind::Command { argv, .. } => argv.join(" "),
            WorkerKind::Uvicorn(u) => format!(
                "{} ({}, {}), {}",
                u.app,
                u.server.name(),
                u.python.display(),
                match (u.access_log, self.options.is_set("access-logfile")) {
                    (false, _) => "no access log",
                    (true, true) => "access log on",
                    // gunicorn users expect none without --access-logfile.
                    (true, false) => "access log on (gunicorn's default is off: --no-access-log)",
                }
            ),
        }
    }
}

/// The first option of class [`Class::Command`] that is set, as the error
/// for uvicorn workers.
fn command_only(cli: &Cli) -> Option<Error> {
    OPTIONS.iter().find_map(|o| match o.applies_to {
        Class::Command(why) if cli.is_set(o.name) => Some(belongs(
            o.name,
            format!("'--{}' applies to command workers; {why}", o.name),
        )),
        _ => None,
    })
}

fn parse_workers(flag: &'static str, v: &str) -> Result<(usize, String)> {
    if v == "auto" {
        let (n, why) = crate::cpus::available();
        return Ok((n, format!("auto: {why}")));
    }
    match v.parse::<usize>() {
        Ok(n) if n >= 1 => Ok((n, "set".to_string())),
        Ok(_) => Err(invalid(flag, v, "at least 1 worker is needed")),
        Err(_) => Err(invalid(
            flag,
            v,
            "expected a positive whole number or 'auto'",
        )),
    }
}

fn parse_log_level(v: &str) -> Option<LogLevel> {
    Some(match v.to_ascii_lowercase().as_str() {
        "error" | "critical" => LogLevel::Error,
        "warn" | "warning" => LogLevel::Warn,
        "info" => LogLevel::Info,
        "debug" => LogLevel::Debug,
        "trace" => LogLevel::Trace,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
