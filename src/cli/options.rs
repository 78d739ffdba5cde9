//! The option table: every option of procman declared once, in [`OPTIONS`].
//!
//! An entry holds the option's name (the long option, the config-file key
//! and, upper-cased with `-` → `_` and a `PROCMAN_` prefix, its environment
//! variable), its place on the command line, its value's type, its default
//! (as text, parsed by the option's one parser in `config.rs`), the worker
//! class it applies to, whether a reload may change it, its `--help` line,
//! and the key under which its resolved value is handed to the uvicorn
//! bootstrap, if it is. Everything else is derived from this table: clap's
//! arguments and `--help` (`cli.rs`), the config file's keys and their
//! types and `--print-config` (`layers.rs`), the refusals of an option
//! given to the other worker class (`config.rs`), the restart-only warnings
//! of a reload, and the JSON object the bootstrap reads
//! (`classes/uvicorn.rs`). This file holds only declarations: no parsing,
//! no side effect.

/// The type of an option's value: how clap collects it (once, repeated, a
/// flag) and what a config-file key must hold. Each names what it accepts
/// in the file's error messages; a value of another type is an error
/// naming the key, the line and the expected type, never reinterpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text only (paths, names, choices).
    Text,
    /// A whole number, or text (`workers` also takes "auto").
    Whole,
    /// A number of seconds (whole or not), or text with a unit.
    Duration,
    /// A number of bytes, or text with a unit.
    Size,
    /// A name or a number (user, group, signal).
    NameOrNumber,
    /// An octal mask: text, or a TOML octal literal such as 0o022.
    Umask,
    /// true or false; given on the command line as a bare flag.
    Flag,
    /// A list of text items, repeatable (in a file a single text is a list
    /// of one).
    List,
    /// `env`: repeatable NAME=VALUE; in a file a table of NAME = value, or a
    /// list of "NAME=VALUE".
    Env,
}

/// Which workers an option applies to. Giving an option of the other class
/// is a usage error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Both.
    Any,
    /// Uvicorn workers (an APP).
    Uvicorn,
    /// Command workers; the text says why uvicorn workers do not need it.
    Command(&'static str),
}

/// Whether a reload (HUP) may change an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The new value is used by the next generation.
    Reloadable,
    /// Fixed at start (it acts on procman itself, or on what it set up once);
    /// a reload warns and keeps the value in force.
    RestartOnly,
}

/// Where an option sits on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// `--name VALUE` (and maybe `-x VALUE`).
    Named,
    /// The first positional argument (APP).
    Positional,
    /// Everything after `--` (COMMAND).
    Trailing,
}

/// One option, declared once.
#[derive(Debug, Clone, Copy)]
pub struct OptionDef {
    /// The long option, the config-file key, the clap id.
    pub name: &'static str,
    /// The short option, if any.
    pub short: Option<char>,
    /// Other long names the command line accepts (gunicorn's spelling).
    pub aliases: &'static [&'static str],
    /// Where it sits on the command line.
    pub place: Place,
    /// The value's placeholder in `--help`.
    pub value_name: &'static str,
    /// The value's type.
    pub kind: Kind,
    /// The default, as text parsed by the option's own parser in
    /// `config.rs`; `--help` and `--print-config` show it.
    pub default: Option<&'static str>,
    /// What `--help` shows as the default when it is more than a value
    /// (taken from the environment, computed).
    pub default_help: Option<&'static str>,
    /// Which workers it applies to.
    pub applies_to: Class,
    /// Whether a reload may change it.
    pub reload: Reload,
    /// Its `--help` section.
    pub heading: &'static str,
    /// Its `--help` line, without the default.
    pub help: &'static str,
    /// Whether `PROCMAN_<NAME>` sets it.
    pub env: bool,
    /// Whether a config file may set it.
    pub in_file: bool,
    /// The key under which the uvicorn bootstrap receives the option's
    /// resolved value (in `PROCMAN_APP_CONFIG`), if it does. The object is
    /// built from these keys alone (`classes/uvicorn.rs`, which also says
    /// which values the master computes itself); the bootstrap keeps no
    /// default of its own.
    pub bootstrap: Option<&'static str>,
}

impl OptionDef {
    /// Its environment variable, `PROCMAN_<NAME>`.
    pub fn env_var(&self) -> Option<String> {
        self.env
            .then(|| format!("PROCMAN_{}", self.name.to_uppercase().replace('-', "_")))
    }
}

/// The defaults every entry starts from.
const BASE: OptionDef = OptionDef {
    name: "",
    short: None,
    aliases: &[],
    place: Place::Named,
    value_name: "",
    kind: Kind::Text,
    default: None,
    default_help: None,
    applies_to: Class::Any,
    reload: Reload::Reloadable,
    heading: "",
    help: "",
    env: true,
    in_file: true,
    bootstrap: None,
};

/// Every option, in `--help` order (grouped by topic).
pub static OPTIONS: &[OptionDef] = &[
    OptionDef {
        name: "app",
        place: Place::Positional,
        value_name: "APP",
        help: "The Python app to serve with uvicorn workers, as module:attribute (e.g. app:main).",
        bootstrap: Some("app"),
        ..BASE
    },
    OptionDef {
        name: "command",
        place: Place::Trailing,
        value_name: "COMMAND",
        kind: Kind::List,
        help: "The command to run as each worker (after --); it gets its sockets at fd 3...",
        env: false,
        ..BASE
    },
    // ---- Binding ----
    OptionDef {
        name: "bind",
        short: Some('b'),
        value_name: "ADDR",
        kind: Kind::List,
        default: Some("127.0.0.1:8000"),
        default_help: Some("127.0.0.1:8000, or 0.0.0.0:$PORT"),
        heading: "Binding",
        help: "Address to listen on: HOST:PORT, :PORT, [V6]:PORT, unix:PATH or fd://N; repeatable (PROCMAN_BIND: a comma-separated list, \\, for a comma).",
        ..BASE
    },
    OptionDef {
        name: "reuse-port",
        kind: Kind::Flag,
        reload: Reload::RestartOnly,
        heading: "Binding",
        help: "One SO_REUSEPORT socket per worker slot, kept by the master for the slot's next worker (the kernel spreads connections), instead of one shared socket.",
        ..BASE
    },
    OptionDef {
        name: "backlog",
        value_name: "N",
        kind: Kind::Whole,
        default: Some("2048"),
        heading: "Binding",
        help: "Listen backlog.",
        // asyncio calls listen() again on the shared socket when it starts
        // serving, which would reset the backlog to its own default.
        bootstrap: Some("backlog"),
        ..BASE
    },
    OptionDef {
        name: "socket-mode",
        value_name: "MODE",
        kind: Kind::Umask,
        default: Some("0o666"),
        heading: "Binding",
        help: "Mode of unix socket files, octal, as given (an explicit --umask narrows it); 0o666 lets a proxy running as another user (nginx's www-data) connect, as to 127.0.0.1.",
        ..BASE
    },
    OptionDef {
        name: "socket-group",
        value_name: "GROUP",
        kind: Kind::NameOrNumber,
        default_help: Some("--user's group, else unchanged"),
        heading: "Binding",
        help: "Group of unix socket files (name or number), e.g. www-data with --socket-mode 0o660.",
        ..BASE
    },
    // ---- Workers ----
    OptionDef {
        name: "workers",
        short: Some('w'),
        value_name: "N|auto",
        kind: Kind::Whole,
        default: Some("1"),
        default_help: Some("$WEB_CONCURRENCY, else 1"),
        heading: "Workers",
        help: "Number of workers, or auto (the CPUs this process may use).",
        ..BASE
    },
    OptionDef {
        name: "worker-class",
        short: Some('k'),
        value_name: "CLASS",
        applies_to: Class::Uvicorn,
        heading: "Workers",
        help: "Worker class: uvicorn.workers.UvicornWorker or uvicorn_worker.UvicornWorker (gunicorn command lines; uvicorn), or granian (granian's HTTP server in procman's workers; pip install 'procman[granian]').",
        ..BASE
    },
    OptionDef {
        name: "ready",
        value_name: "exec|notify",
        default: Some("exec"),
        applies_to: Class::Command("uvicorn workers always report readiness themselves"),
        heading: "Workers",
        help: "Command workers are ready once exec succeeded and they stayed alive for --ready-after (exec), or when they send READY=1 (notify).",
        ..BASE
    },
    OptionDef {
        name: "ready-after",
        value_name: "DUR",
        kind: Kind::Duration,
        default: Some("1s"),
        // With uvicorn or --ready notify: refused in config.rs, which
        // names the value and both cases.
        heading: "Workers",
        help: "With --ready exec: how long a command worker must stay alive after exec to count as ready (dying sooner is a failed boot); 0 = ready at exec.",
        ..BASE
    },
    OptionDef {
        name: "stop-signal",
        value_name: "SIG",
        kind: Kind::NameOrNumber,
        default: Some("TERM"),
        applies_to: Class::Command("uvicorn workers drain on TERM"),
        heading: "Workers",
        help: "Signal that asks a command worker to stop gracefully.",
        ..BASE
    },
    OptionDef {
        name: "python",
        value_name: "PATH",
        default_help: Some(
            "$VIRTUAL_ENV/bin/python, else the python3 or python beside procman (a pip-installed procman uses its own environment), else python3",
        ),
        applies_to: Class::Uvicorn,
        heading: "Workers",
        help: "Python interpreter for uvicorn workers.",
        ..BASE
    },
    OptionDef {
        name: "preload",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Workers",
        help: "Uvicorn workers are forked from a zygote that imported the app once (shared memory, fast respawns).",
        ..BASE
    },
    OptionDef {
        name: "no-zygote",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Workers",
        help: "Start every uvicorn worker as a new interpreter, without the base zygote that has Python and uvicorn already imported (each worker imports the app itself either way).",
        ..BASE
    },
    OptionDef {
        name: "cpu-affinity",
        value_name: "MODE",
        default: Some("off"),
        heading: "Workers",
        help: "Pin each worker to one CPU: auto puts worker slot i (and every thread it starts) on the i-th CPU procman may use, round robin; off leaves placement to the kernel.",
        ..BASE
    },
    OptionDef {
        name: "no-boot-boost",
        kind: Kind::Flag,
        heading: "Workers",
        help: "Boot workers at procman's CPU priority: do not raise a booting worker's priority (by 5 nice steps above procman's, until it is ready or its startup deadline) even where procman may (CAP_SYS_NICE).",
        ..BASE
    },
    // ---- Timeouts ----
    OptionDef {
        name: "timeout",
        short: Some('t'),
        value_name: "SECS",
        kind: Kind::Duration,
        default: Some("30"),
        heading: "Timeouts",
        help: "A ready worker silent (no heartbeat) this long is aborted and replaced; 0 = off.",
        ..BASE
    },
    OptionDef {
        name: "startup-timeout",
        value_name: "SECS",
        kind: Kind::Duration,
        default: Some("60"),
        heading: "Timeouts",
        help: "A worker not ready by then is killed; counts as a boot failure.",
        ..BASE
    },
    OptionDef {
        name: "graceful-timeout",
        value_name: "SECS",
        kind: Kind::Duration,
        default: Some("30"),
        heading: "Timeouts",
        help: "How long stopping workers may drain before SIGKILL.",
        ..BASE
    },
    // ---- Recycling ----
    OptionDef {
        name: "max-requests",
        value_name: "N",
        kind: Kind::Whole,
        default: Some("0"),
        applies_to: Class::Uvicorn,
        heading: "Recycling",
        help: "Uvicorn workers: recycle a worker after N requests; 0 = off.",
        bootstrap: Some("max_requests"),
        ..BASE
    },
    OptionDef {
        name: "max-requests-jitter",
        value_name: "N",
        kind: Kind::Whole,
        default: Some("0"),
        applies_to: Class::Uvicorn,
        heading: "Recycling",
        help: "Add a random 0..N to each worker's --max-requests.",
        bootstrap: Some("max_requests_jitter"),
        ..BASE
    },
    OptionDef {
        name: "max-worker-memory",
        value_name: "SIZE",
        kind: Kind::Size,
        heading: "Recycling",
        help: "Recycle a worker whose memory (RSS of its process group) stays above SIZE (e.g. 512MiB, 1G) for 3 samples in a row.",
        ..BASE
    },
    OptionDef {
        name: "memory-check-interval",
        value_name: "DUR",
        kind: Kind::Duration,
        default: Some("5s"),
        heading: "Recycling",
        help: "How often worker memory is sampled for --max-worker-memory.",
        ..BASE
    },
    OptionDef {
        name: "max-worker-lifetime",
        value_name: "DUR",
        kind: Kind::Duration,
        heading: "Recycling",
        help: "Recycle workers older than DUR (e.g. 30m, 6h).",
        ..BASE
    },
    OptionDef {
        name: "max-worker-lifetime-jitter",
        value_name: "DUR",
        kind: Kind::Duration,
        heading: "Recycling",
        help: "Add a random 0..DUR to each worker's --max-worker-lifetime, so workers do not all recycle together.",
        ..BASE
    },
    // ---- Process ----
    OptionDef {
        name: "pre-start",
        value_name: "CMD",
        kind: Kind::List,
        heading: "Process",
        help: "Run `sh -c CMD` once before any worker starts; repeatable, in order; a failure aborts.",
        ..BASE
    },
    OptionDef {
        name: "user",
        short: Some('u'),
        value_name: "USER",
        kind: Kind::NameOrNumber,
        reload: Reload::RestartOnly,
        heading: "Process",
        help: "Run workers as this user (name or number), after binding.",
        ..BASE
    },
    OptionDef {
        name: "group",
        short: Some('g'),
        value_name: "GROUP",
        kind: Kind::NameOrNumber,
        reload: Reload::RestartOnly,
        heading: "Process",
        help: "Run workers with this group (name or number), after binding.",
        ..BASE
    },
    OptionDef {
        name: "umask",
        short: Some('m'),
        value_name: "MASK",
        kind: Kind::Umask,
        default: Some("0o022"),
        heading: "Process",
        help: "Umask for workers, octal; when given, it also narrows --socket-mode.",
        ..BASE
    },
    OptionDef {
        name: "pid",
        short: Some('p'),
        value_name: "FILE",
        reload: Reload::RestartOnly,
        heading: "Process",
        help: "Write procman's pid to FILE (refused if a live procman owns it).",
        ..BASE
    },
    OptionDef {
        name: "chdir",
        value_name: "DIR",
        default_help: Some("current"),
        heading: "Process",
        help: "Working directory of workers (and sys.path[0] for APP).",
        ..BASE
    },
    OptionDef {
        name: "env",
        short: Some('e'),
        value_name: "KEY=VALUE",
        kind: Kind::Env,
        heading: "Process",
        help: "Extra environment for workers, KEY=VALUE (the value as typed, commas included); repeatable (PROCMAN_ENV: a comma-separated list, \\, for a comma).",
        ..BASE
    },
    OptionDef {
        name: "name",
        short: Some('n'),
        value_name: "NAME",
        default_help: Some("APP, or the command's name"),
        heading: "Process",
        help: "Name shown in uvicorn workers' process titles (procman: worker 0 gen 1 [NAME]) and as the name label of procman_info in /metrics (gunicorn's -n).",
        bootstrap: Some("proc_name"),
        ..BASE
    },
    // ---- Uvicorn ----
    OptionDef {
        name: "factory",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "APP names a factory: call it to get the app.",
        bootstrap: Some("factory"),
        ..BASE
    },
    OptionDef {
        name: "keyfile",
        value_name: "FILE",
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "TLS private key file (HTTPS served by uvicorn).",
        // Resolved against --chdir, where workers run.
        bootstrap: Some("ssl_keyfile"),
        ..BASE
    },
    OptionDef {
        name: "certfile",
        value_name: "FILE",
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "TLS certificate file.",
        // Resolved against --chdir, where workers run.
        bootstrap: Some("ssl_certfile"),
        ..BASE
    },
    OptionDef {
        name: "keep-alive",
        value_name: "SECS",
        kind: Kind::Duration,
        default: Some("5"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Close keep-alive connections idle this long.",
        bootstrap: Some("keep_alive"),
        ..BASE
    },
    OptionDef {
        name: "limit-concurrency",
        value_name: "N",
        kind: Kind::Whole,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Answer 503 beyond this many concurrent connections or tasks per worker.",
        bootstrap: Some("limit_concurrency"),
        ..BASE
    },
    OptionDef {
        name: "proxy-headers",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Trust X-Forwarded-Proto/For from --forwarded-allow-ips and unix-socket peers: the default, accepted for uvicorn command lines.",
        bootstrap: Some("proxy_headers"),
        ..BASE
    },
    OptionDef {
        name: "no-proxy-headers",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Ignore X-Forwarded-Proto/For from everyone.",
        ..BASE
    },
    OptionDef {
        name: "forwarded-allow-ips",
        value_name: "IPS",
        // uvicorn's and gunicorn's default ($FORWARDED_ALLOW_IPS: layers.rs).
        default: Some("127.0.0.1,::1"),
        default_help: Some("$FORWARDED_ALLOW_IPS, else 127.0.0.1,::1"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Comma-separated IPs or networks trusted for proxy headers ('*': everyone); a peer of a unix socket is always trusted.",
        bootstrap: Some("forwarded_allow_ips"),
        ..BASE
    },
    OptionDef {
        name: "root-path",
        value_name: "PATH",
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "ASGI root_path for apps mounted below a prefix.",
        bootstrap: Some("root_path"),
        ..BASE
    },
    OptionDef {
        name: "lifespan",
        value_name: "auto|on|off",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Lifespan handling: auto, on or off.",
        bootstrap: Some("lifespan"),
        ..BASE
    },
    OptionDef {
        name: "interface",
        value_name: "KIND",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "App interface: auto, asgi3, asgi2 or wsgi.",
        bootstrap: Some("interface"),
        ..BASE
    },
    OptionDef {
        name: "http",
        value_name: "IMPL",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "HTTP implementation: auto, h11 or httptools.",
        bootstrap: Some("http"),
        ..BASE
    },
    OptionDef {
        name: "loop",
        value_name: "LOOP",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Event loop: auto, asyncio or uvloop.",
        bootstrap: Some("loop"),
        ..BASE
    },
    OptionDef {
        name: "no-access-log",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Turn off uvicorn's per-request access log.",
        // Resolved as uvicorn's access_log: true unless this flag is on.
        bootstrap: Some("access_log"),
        ..BASE
    },
    // ---- Logging ----
    OptionDef {
        name: "log-level",
        value_name: "LEVEL",
        default: Some("info"),
        reload: Reload::RestartOnly,
        heading: "Logging",
        help: "Master's log level: error, warn, info, debug, trace (also passed to uvicorn).",
        // Resolved under uvicorn's name for the level (warn → warning).
        bootstrap: Some("log_level"),
        ..BASE
    },
    OptionDef {
        name: "log-format",
        value_name: "text|json|journal",
        default: Some("text"),
        reload: Reload::RestartOnly,
        heading: "Logging",
        help: "Master's log format: text, json (one object per line) or journal (native systemd journal entries; the default for text when stderr is the journal).",
        bootstrap: Some("log_format"),
        ..BASE
    },
    OptionDef {
        name: "log-file",
        aliases: &["error-logfile"],
        value_name: "PATH|-",
        reload: Reload::RestartOnly,
        heading: "Logging",
        help: "Append the master's log (and the workers' output) to PATH instead of stderr; USR1 reopens it (logrotate); - is stderr.",
        ..BASE
    },
    OptionDef {
        name: "access-logfile",
        value_name: "-|PATH",
        applies_to: Class::Uvicorn,
        heading: "Logging",
        help: "gunicorn's access log: - (or the --log-file PATH) is uvicorn's access log in procman's log, which is on without this option too (--no-access-log turns it off).",
        ..BASE
    },
    // ---- Control ----
    OptionDef {
        name: "control-socket",
        value_name: "PATH",
        reload: Reload::RestartOnly,
        heading: "Control",
        help: "Listen for `procman status|reload|scale|stop|upgrade` on a unix socket at PATH (mode 0600); off by default.",
        ..BASE
    },
    OptionDef {
        name: "upgrade-binary",
        value_name: "PATH",
        reload: Reload::Reloadable,
        heading: "Control",
        help: "The binary USR2 and `procman upgrade` (without BINARY) re-exec in place; default: the path procman was started from, looked up again at each upgrade.",
        ..BASE
    },
    OptionDef {
        name: "metrics",
        value_name: "HOST:PORT|unix:PATH",
        reload: Reload::RestartOnly,
        heading: "Control",
        help: "Serve GET /metrics (Prometheus), /healthz and /readyz on this address; off by default.",
        ..BASE
    },
    // ---- Config ----
    // ---- Development ----
    OptionDef {
        name: "reload",
        kind: Kind::Flag,
        reload: Reload::RestartOnly,
        heading: "Development",
        help: "Watch the source files (inotify) and reload, as on HUP, after a change: readiness-gated, all-or-nothing (a broken edit keeps the workers serving). For development.",
        ..BASE
    },
    OptionDef {
        name: "reload-dir",
        value_name: "DIR",
        kind: Kind::List,
        default_help: Some("--chdir, else the current directory"),
        reload: Reload::RestartOnly,
        heading: "Development",
        help: "With --reload: a directory to watch, recursively, instead of the default; repeatable (PROCMAN_RELOAD_DIR: a comma-separated list).",
        ..BASE
    },
    OptionDef {
        name: "reload-include",
        value_name: "GLOB",
        kind: Kind::List,
        default_help: Some("*.py"),
        reload: Reload::RestartOnly,
        heading: "Development",
        help: "With --reload: files whose name matches GLOB count too (a GLOB with a / matches the path below the watched directory); repeatable.",
        ..BASE
    },
    OptionDef {
        name: "reload-exclude",
        value_name: "GLOB",
        kind: Kind::List,
        default_help: Some(".git, __pycache__, .venv, venv (and any directory holding pyvenv.cfg), node_modules, .*.swp, *~, .#*, 4913"),
        reload: Reload::RestartOnly,
        heading: "Development",
        help: "With --reload: files, and directories, whose name matches GLOB never count (added to the defaults); repeatable.",
        ..BASE
    },
    OptionDef {
        name: "config",
        short: Some('c'),
        value_name: "FILE",
        heading: "Config",
        help: "TOML file whose keys are the long option names (workers = 4, bind = [\":8000\"]); HUP re-reads it.",
        in_file: false,
        ..BASE
    },
    OptionDef {
        name: "check-config",
        kind: Kind::Flag,
        heading: "Config",
        help: "Validate the configuration (and import the APP once), then exit.",
        env: false,
        in_file: false,
        ..BASE
    },
    OptionDef {
        name: "print-config",
        kind: Kind::Flag,
        heading: "Config",
        help: "Print the effective configuration as TOML, with where each value came from, then exit.",
        env: false,
        in_file: false,
        ..BASE
    },
];

/// The definition of option `name`.
pub fn def(name: &str) -> Option<&'static OptionDef> {
    OPTIONS.iter().find(|o| o.name == name)
}
