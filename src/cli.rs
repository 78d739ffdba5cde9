//! The command line as clap sees it: the option table and the raw values.
//!
//! Every option is declared once, in [`OPTIONS`]: its name (the long
//! option, the config-file key and, upper-cased with `-` → `_` and a
//! `PROCMAN_` prefix, its environment variable), its value's type, its
//! default, the worker class it applies to, whether a reload may change it,
//! and its help. clap's arguments and `--help`, the config file's keys and
//! their types (`layers.rs`), `--print-config`'s defaults, the "applies to
//! uvicorn workers" refusals and the restart-only warnings of a reload are
//! all derived from that table; `config.rs` parses each value (the default
//! too, from the same text) with one parser.
//!
//! Every value is kept as the text the user typed (or the environment or
//! the config file supplied), so that one place, `config.rs`, validates all
//! of them with the same messages whatever their source. Nothing here has a
//! side effect. A command-line value is never split: `-e KEY=a,b` is one
//! value. Only the list variables `PROCMAN_BIND` and `PROCMAN_ENV` hold
//! several values, comma-separated; `layers.rs` splits them.

use std::collections::BTreeMap;
use std::ffi::OsString;

use clap::{Arg, ArgAction, ArgMatches, Command};

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
3 workers failed to boot, 4 the app could not be imported.
Also: procman completions bash|zsh|fish (a completion script), procman man (the man page).";

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
}

impl OptionDef {
    /// Its environment variable, `PROCMAN_<NAME>`.
    pub fn env_var(&self) -> Option<String> {
        self.env
            .then(|| format!("PROCMAN_{}", self.name.to_uppercase().replace('-', "_")))
    }

    /// The `--help` line: the help and its default.
    fn help_line(&self) -> String {
        match self.default_help.or(self.default) {
            Some(d) => format!("{} [default: {d}]", self.help),
            // As clap's own convention: no full stop after a lone sentence.
            None if self.help.ends_with("..") => self.help.to_string(),
            None => self.help.strip_suffix('.').unwrap_or(self.help).to_string(),
        }
    }

    /// The clap argument.
    fn arg(&self) -> Arg {
        let mut arg = Arg::new(self.name)
            .help(self.help_line())
            .value_name(self.value_name)
            .action(match self.kind {
                Kind::Flag => ArgAction::SetTrue,
                Kind::List | Kind::Env => ArgAction::Append,
                _ => ArgAction::Set,
            });
        match self.place {
            Place::Named => arg = arg.long(self.name).help_heading(self.heading),
            Place::Positional => {}
            Place::Trailing => arg = arg.last(true).num_args(1..),
        }
        if let Some(c) = self.short {
            arg = arg.short(c);
        }
        if let Some(var) = self.env_var() {
            arg = arg.env(var);
        }
        if matches!(self.kind, Kind::Whole | Kind::Duration) {
            // So that -1 reaches config.rs, which names the option and
            // the problem, instead of being taken for a flag.
            arg = arg.allow_negative_numbers(true);
        }
        arg
    }
}

/// The defaults every entry starts from.
const BASE: OptionDef = OptionDef {
    name: "",
    short: None,
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
};

/// Every option, in `--help` order (grouped by topic).
pub static OPTIONS: &[OptionDef] = &[
    OptionDef {
        name: "app",
        place: Place::Positional,
        value_name: "APP",
        help: "The Python app to serve with uvicorn workers, as module:attribute (e.g. app:main).",
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
        help: "One SO_REUSEPORT socket per worker (the kernel spreads connections) instead of one shared socket.",
        ..BASE
    },
    OptionDef {
        name: "backlog",
        value_name: "N",
        kind: Kind::Whole,
        default: Some("2048"),
        heading: "Binding",
        help: "Listen backlog.",
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
        help: "Worker class, for gunicorn command lines: uvicorn.workers.UvicornWorker or uvicorn_worker.UvicornWorker.",
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
        help: "Umask for workers and unix socket files, octal.",
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
    // ---- Uvicorn ----
    OptionDef {
        name: "factory",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "APP names a factory: call it to get the app.",
        ..BASE
    },
    OptionDef {
        name: "keyfile",
        value_name: "FILE",
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "TLS private key file (HTTPS served by uvicorn).",
        ..BASE
    },
    OptionDef {
        name: "certfile",
        value_name: "FILE",
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "TLS certificate file.",
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
        ..BASE
    },
    OptionDef {
        name: "limit-concurrency",
        value_name: "N",
        kind: Kind::Whole,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Answer 503 beyond this many concurrent connections or tasks per worker.",
        ..BASE
    },
    OptionDef {
        name: "proxy-headers",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Trust X-Forwarded-Proto/For from --forwarded-allow-ips.",
        ..BASE
    },
    OptionDef {
        name: "forwarded-allow-ips",
        value_name: "IPS",
        // uvicorn's own default, applied by uvicorn when unset.
        default_help: Some("127.0.0.1"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Comma-separated IPs trusted for proxy headers.",
        ..BASE
    },
    OptionDef {
        name: "root-path",
        value_name: "PATH",
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "ASGI root_path for apps mounted below a prefix.",
        ..BASE
    },
    OptionDef {
        name: "lifespan",
        value_name: "auto|on|off",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Lifespan handling: auto, on or off.",
        ..BASE
    },
    OptionDef {
        name: "interface",
        value_name: "KIND",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "App interface: auto, asgi3, asgi2 or wsgi.",
        ..BASE
    },
    OptionDef {
        name: "http",
        value_name: "IMPL",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "HTTP implementation: auto, h11 or httptools.",
        ..BASE
    },
    OptionDef {
        name: "loop",
        value_name: "LOOP",
        default: Some("auto"),
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Event loop: auto, asyncio or uvloop.",
        ..BASE
    },
    OptionDef {
        name: "no-access-log",
        kind: Kind::Flag,
        applies_to: Class::Uvicorn,
        heading: "Uvicorn",
        help: "Turn off uvicorn's per-request access log.",
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
        ..BASE
    },
    OptionDef {
        name: "log-format",
        value_name: "text|json",
        default: Some("text"),
        reload: Reload::RestartOnly,
        heading: "Logging",
        help: "Master's log format: text or json (one object per line).",
        ..BASE
    },
    OptionDef {
        name: "log-file",
        value_name: "PATH",
        reload: Reload::RestartOnly,
        heading: "Logging",
        help: "Append the master's log to PATH instead of stderr; USR1 reopens it (logrotate).",
        ..BASE
    },
    // ---- Control ----
    OptionDef {
        name: "control-socket",
        value_name: "PATH",
        reload: Reload::RestartOnly,
        heading: "Control",
        help: "Listen for `procman status|reload|scale|stop` on a unix socket at PATH (mode 0600); off by default.",
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

/// One option's raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    /// A single value, as text.
    Text(String),
    /// A repeatable option's values, in order.
    List(Vec<String>),
    /// A flag that is on (a flag that is off is not stored).
    On,
}

/// procman's raw options: the value of each option that was set, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cli {
    values: BTreeMap<&'static str, Raw>,
}

impl Cli {
    /// The clap command, with one argument per entry of [`OPTIONS`].
    pub fn command() -> Command {
        OPTIONS.iter().fold(
            Command::new("procman")
                .version(env!("CARGO_PKG_VERSION"))
                .about("A pre-fork process manager: binds the sockets, forks N workers that inherit them, keeps them healthy.")
                .after_help(EXAMPLES)
                .override_usage(
                    "procman [OPTIONS] APP\n       procman [OPTIONS] -- COMMAND [ARG]...",
                )
                .max_term_width(100)
                .args_override_self(true),
            |cmd, o| cmd.arg(o.arg()),
        )
    }

    /// The raw values clap matched (command line and `PROCMAN_*`).
    pub fn from_matches(m: &ArgMatches) -> Cli {
        let mut cli = Cli::default();
        for o in OPTIONS {
            match o.kind {
                Kind::Flag => cli.set_flag(o.name, m.get_flag(o.name)),
                Kind::List | Kind::Env => {
                    if let Some(v) = m.get_many::<String>(o.name) {
                        cli.set_list(o.name, v.cloned().collect());
                    }
                }
                _ => {
                    if let Some(v) = m.get_one::<String>(o.name) {
                        cli.set_text(o.name, v.clone());
                    }
                }
            }
        }
        cli
    }

    /// Parses a command line (for tests and tools; procman itself goes
    /// through `layers::load`).
    pub fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Ok(Cli::from_matches(
            &Cli::command().try_get_matches_from(args)?,
        ))
    }

    fn key(name: &str) -> &'static str {
        match def(name) {
            Some(o) => o.name,
            None => {
                debug_assert!(false, "no option named {name}");
                ""
            }
        }
    }

    /// The value of a single-valued option, if set.
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.values.get(Self::key(name)) {
            Some(Raw::Text(s)) => Some(s),
            _ => None,
        }
    }

    /// The value of a single-valued option, or its default's text (empty
    /// for an option without one).
    pub fn value(&self, name: &str) -> &str {
        self.text(name)
            .or_else(|| def(name).and_then(|o| o.default))
            .unwrap_or("")
    }

    /// The values of a repeatable option (empty if unset).
    pub fn list(&self, name: &str) -> &[String] {
        match self.values.get(Self::key(name)) {
            Some(Raw::List(v)) => v,
            _ => &[],
        }
    }

    /// Whether a flag is on.
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.values.get(Self::key(name)), Some(Raw::On))
    }

    /// Whether the option was set (a flag: is on; a list: is not empty).
    pub fn is_set(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }

    /// The raw value, if set.
    pub fn raw(&self, name: &str) -> Option<&Raw> {
        self.values.get(Self::key(name))
    }

    /// Sets (or, with `None`, unsets) the raw value.
    pub fn set_raw(&mut self, name: &str, raw: Option<Raw>) {
        let key = Self::key(name);
        match raw {
            Some(Raw::List(v)) if v.is_empty() => self.values.remove(key),
            Some(r) => self.values.insert(key, r),
            None => self.values.remove(key),
        };
    }

    /// Sets a single value.
    pub fn set_text(&mut self, name: &str, value: impl Into<String>) {
        self.set_raw(name, Some(Raw::Text(value.into())));
    }

    /// Sets a repeatable option's values (none: unset).
    pub fn set_list(&mut self, name: &str, values: Vec<String>) {
        self.set_raw(name, Some(Raw::List(values)));
    }

    /// Turns a flag on or off.
    pub fn set_flag(&mut self, name: &str, on: bool) {
        self.set_raw(name, on.then_some(Raw::On));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
        let mut names: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OPTIONS.len(), "an option is declared twice");
        for o in OPTIONS {
            assert!(!o.help.is_empty(), "{}: help", o.name);
            if o.place == Place::Named {
                assert!(!o.heading.is_empty(), "{}: help heading", o.name);
            }
            if o.kind == Kind::Flag {
                assert!(o.value_name.is_empty() && o.default.is_none(), "{}", o.name);
            } else {
                assert!(!o.value_name.is_empty(), "{}: value name", o.name);
            }
        }
    }

    #[test]
    fn app_and_command_are_told_apart() {
        let cli = Cli::try_parse_from(["procman", "app:main", "-w", "4"]).expect("parses");
        assert_eq!(cli.text("app"), Some("app:main"));
        assert!(cli.list("command").is_empty());
        let cli = Cli::try_parse_from(["procman", "-w", "2", "--", "./server", "--flag"])
            .expect("parses");
        assert_eq!(cli.text("app"), None);
        assert_eq!(cli.list("command"), ["./server", "--flag"]);
    }

    #[test]
    fn repeatable_options_keep_their_order() {
        let cli = Cli::try_parse_from(["procman", "-b", ":1", "-b", "unix:/x", "--", "true"])
            .expect("parses");
        assert_eq!(cli.list("bind"), [":1", "unix:/x"]);
    }

    #[test]
    fn help_shows_each_default_once_in_its_topic() {
        let help = Cli::command().render_help().to_string();
        for heading in [
            "Binding:",
            "Workers:",
            "Timeouts:",
            "Recycling:",
            "Process:",
        ] {
            assert!(help.contains(heading), "{heading}\n{help}");
        }
        assert!(help.contains("[default: 2048]"), "{help}");
        assert!(help.contains("[env: PROCMAN_BACKLOG="), "{help}");
        assert!(help.find("Binding:") < help.find("--backlog"));
        assert!(help.find("--backlog") < help.find("Workers:"));
    }
}
