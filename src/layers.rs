//! The configuration layers: built-in defaults < config file < environment
//! (`PROCMAN_<LONG_NAME>`, `WEB_CONCURRENCY`, `PORT`) < command line, merged
//! into one raw [`Cli`], with the source of every value remembered.
//!
//! clap already merges the command line over `PROCMAN_*` variables; this
//! module adds `WEB_CONCURRENCY` and `PORT`, then fills whatever is still
//! unset from the TOML file. The file is checked key by key against the
//! option table (`cli::OPTIONS`), so its keys are exactly the long option
//! names, typed as the table says, and each error names the file, the key
//! and the line. Validation of the values
//! themselves stays in `config.rs`; [`Layered::annotate`] adds where a bad
//! value came from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::{def, Cli, Kind, Raw, Reload, OPTIONS};
use crate::config::{Config, Environment};
use crate::error::{os_reason, Error, Result};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    Environment(String),
    /// A config file line.
    File {
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::CommandLine => f.write_str("command line"),
            Source::Environment(var) => write!(f, "environment {var}"),
            Source::File { path, line } => write!(f, "{}, line {line}", path.display()),
        }
    }
}

/// The merged raw options and their sources, keyed by long option name.
#[derive(Debug, Clone)]
pub struct Layered {
    pub cli: Cli,
    /// Where each set option came from.
    pub sources: BTreeMap<String, Source>,
}

/// What the command line asks for.
pub enum Parsed {
    /// Run (or check, or print) with these options.
    Run(Box<Layered>),
    /// --help or --version was printed.
    Printed,
}

/// Keys that are not options but that a file must not name either.
const NOT_IN_FILE: &[&str] = &["help", "version"];

/// Parses and validates the whole configuration (command line, environment,
/// file). `None` when --help or --version was printed. Used at start and
/// again by HUP.
pub fn load_config(args: &[OsString]) -> Result<Option<(Config, Layered)>> {
    let env = Environment::from_process();
    let layered = match load(args.iter().cloned(), &env)? {
        Parsed::Run(l) => *l,
        Parsed::Printed => return Ok(None),
    };
    let cfg = Config::from_cli(&layered.cli, &env).map_err(|e| layered.annotate(e))?;
    Ok(Some((cfg, layered)))
}

/// For a reload (HUP): parses and validates the whole configuration again,
/// but every restart-only option (`Reload::RestartOnly` in the table) keeps
/// its value in force, `in_force`. Returns the configuration and the names
/// of the restart-only options whose new value was set aside.
pub fn reload_config(args: &[OsString], in_force: &Cli) -> Result<(Config, Vec<&'static str>)> {
    let env = Environment::from_process();
    let mut layered = match load(args.iter().cloned(), &env)? {
        Parsed::Run(l) => *l,
        Parsed::Printed => return Err(Error::usage("--help or --version on reload")),
    };
    let mut set_aside = Vec::new();
    for o in OPTIONS.iter().filter(|o| o.reload == Reload::RestartOnly) {
        if layered.cli.raw(o.name) != in_force.raw(o.name) {
            set_aside.push(o.name);
            layered.cli.set_raw(o.name, in_force.raw(o.name).cloned());
            layered.sources.remove(o.name);
        }
    }
    let cfg = Config::from_cli(&layered.cli, &env).map_err(|e| layered.annotate(e))?;
    Ok((cfg, set_aside))
}

/// Parses the command line, then layers the environment and the file.
pub fn load(args: impl IntoIterator<Item = OsString>, env: &Environment) -> Result<Parsed> {
    let args: Vec<OsString> = args.into_iter().collect();
    // Options are text; clap would only say "invalid UTF-8 was detected"
    // without saying where.
    for (i, arg) in args.iter().enumerate().skip(1) {
        if arg.to_str().is_none() {
            return Err(Error::usage(format!(
                "argument {i} ('{}') is not valid UTF-8",
                arg.to_string_lossy()
            )));
        }
    }
    for var in OPTIONS.iter().filter_map(|o| o.env_var()) {
        if let Some(v) = std::env::var_os(&var).filter(|v| v.to_str().is_none()) {
            return Err(Error::usage(format!(
                "{var} ('{}') is not valid UTF-8",
                v.to_string_lossy()
            )));
        }
    }
    let matches = match Cli::command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => return clap_outcome(e),
    };
    let mut cli = Cli::from_matches(&matches);
    let mut sources = BTreeMap::new();
    for o in OPTIONS {
        match matches.value_source(o.name) {
            Some(clap::parser::ValueSource::CommandLine) => {
                sources.insert(o.name.to_string(), Source::CommandLine);
            }
            Some(clap::parser::ValueSource::EnvVariable) => {
                let var = o.env_var().unwrap_or_default();
                // clap hands a list variable over as one value; only these
                // variables are lists (a command-line value is never split).
                if LIST_VARIABLES.contains(&o.name) {
                    let items = split_list(&var, &cli.list(o.name).concat())?;
                    cli.set_list(o.name, items);
                }
                sources.insert(o.name.to_string(), Source::Environment(var));
            }
            _ => {}
        }
    }
    if !cli.is_set("workers") {
        if let Some(n) = &env.web_concurrency {
            cli.set_text("workers", n.clone());
            sources.insert(
                "workers".into(),
                Source::Environment("WEB_CONCURRENCY".into()),
            );
        }
    }
    if !cli.is_set("bind") {
        if let Some(port) = &env.port {
            cli.set_list("bind", vec![format!("0.0.0.0:{port}")]);
            sources.insert("bind".into(), Source::Environment("PORT".into()));
        }
    }
    let mut layered = Layered { cli, sources };
    if let Some(path) = layered.cli.text("config").map(str::to_string) {
        layered.apply_file(Path::new(&path))?;
    }
    Ok(Parsed::Run(Box::new(layered)))
}

/// --help and --version print and succeed; anything else is one line.
fn clap_outcome(e: clap::Error) -> Result<Parsed> {
    use clap::error::ErrorKind::*;
    match e.kind() {
        DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            Ok(Parsed::Printed)
        }
        _ => Err(Error::usage(format!(
            "{} (see procman --help)",
            one_line(&e)
        ))),
    }
}

fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid command line")
        .trim()
        .trim_start_matches("error: ")
        .to_string()
}

/// The options whose environment variable holds a comma-separated list
/// (`PROCMAN_BIND`, `PROCMAN_ENV`); `PROCMAN_PRE_START` is one command.
const LIST_VARIABLES: &[&str] = &["bind", "env"];

/// Splits a list variable (`PROCMAN_BIND`, `PROCMAN_ENV`): items are
/// separated by `,`; `\,` is a comma inside an item and `\\` a backslash.
/// Any other backslash is an error, so that no value changes silently.
pub fn split_list(var: &str, value: &str) -> Result<Vec<String>> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => items.push(std::mem::take(&mut item)),
            '\\' => match chars.next() {
                Some(e @ (',' | '\\')) => item.push(e),
                other => {
                    let after = other.map_or("the end".to_string(), |c| format!("'{c}'"));
                    return Err(Error::usage(format!(
                        "invalid {var}: a backslash before {after}; in this comma-separated list write \\, for a comma and \\\\ for a backslash"
                    )));
                }
            },
            c => item.push(c),
        }
    }
    items.push(item);
    Ok(items)
}

/// The inverse of [`split_list`] (for a list of at least one item): items
/// joined with `,`, each comma and backslash escaped.
pub fn join_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| i.replace('\\', "\\\\").replace(',', "\\,"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Layered {
    /// Fills every option still unset from the TOML file.
    pub fn apply_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::usage(format!(
                "cannot read config file {}: {}",
                path.display(),
                os_reason(&e)
            ))
        })?;
        self.apply_text(&text, path)
    }

    /// Fills every option still unset from `text`, the content of the TOML
    /// file at `path` (named in messages).
    pub fn apply_text(&mut self, text: &str, path: &Path) -> Result<()> {
        let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
            toml::from_str(text).map_err(|e| {
                let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
                Error::usage(format!(
                    "{}, line {line}: invalid TOML: {}",
                    path.display(),
                    e.message().trim()
                ))
            })?;
        for (key, value) in table {
            let line = line_of(text, key.span().start);
            let key = key.into_inner();
            let at = |why: String| Error::usage(format!("{}, line {line}: {why}", path.display()));
            let option = def(&key).filter(|o| o.in_file);
            if NOT_IN_FILE.contains(&key.as_str()) || (def(&key).is_some() && option.is_none()) {
                return Err(at(format!("'{key}' cannot be set in a config file")));
            }
            let Some(option) = option else {
                return Err(at(format!(
                    "unknown key '{key}' (keys are the long option names, e.g. workers, bind, timeout)"
                )));
            };
            let raw = text.get(value.span()).unwrap_or_default();
            let value = canonical(&key, option.kind, value.into_inner(), raw).map_err(at)?;
            if self.cli.is_set(option.name) {
                continue; // the environment or the command line wins
            }
            self.cli.set_raw(option.name, value);
            self.sources.insert(
                key,
                Source::File {
                    path: path.to_path_buf(),
                    line,
                },
            );
        }
        Ok(())
    }

    /// Adds the source of the offending value to a validation error about
    /// one option (the error carries the option's name).
    pub fn annotate(&self, err: Error) -> Error {
        let Error::Invalid { option, msg } = &err else {
            return err;
        };
        match self.sources.get(*option) {
            Some(Source::File { path, line }) => {
                Error::usage(format!("{}, line {line}: {msg}", path.display()))
            }
            Some(Source::Environment(var)) => Error::usage(format!("{msg} (from {var})")),
            _ => err,
        }
    }

    /// The effective options as a TOML config file, with the source of every
    /// value that is not a default as a comment. Feeding it back with -c
    /// gives the same configuration.
    pub fn render_toml(&self) -> String {
        let mut out = String::from("# procman configuration, as procman --print-config sees it\n");
        for o in OPTIONS.iter().filter(|o| o.in_file) {
            let value = match self.cli.raw(o.name) {
                Some(Raw::Text(s)) => toml::Value::String(s.clone()),
                Some(Raw::List(v)) => {
                    toml::Value::Array(v.iter().cloned().map(toml::Value::String).collect())
                }
                Some(Raw::On) => toml::Value::Boolean(true),
                None => {
                    if let Some(default) = o.default {
                        let shown = match (o.kind, default.parse::<i64>()) {
                            (Kind::List, _) => format!("[{default:?}]"),
                            (_, Ok(n)) => n.to_string(),
                            (_, Err(_)) => format!("{default:?}"),
                        };
                        out.push_str(&format!("# {} = {shown}  (default)\n", o.name));
                    }
                    continue;
                }
            };
            let mut one = toml::Table::new();
            one.insert(o.name.to_string(), value);
            let line = toml::to_string(&one).unwrap_or_default();
            let line = line.trim_end();
            match self.sources.get(o.name) {
                Some(src) => out.push_str(&format!("{line}  # {src}\n")),
                None => out.push_str(&format!("{line}\n")),
            }
        }
        out
    }
}

/// What a key of this type must be, for messages.
fn expected(key: &str, ty: Kind) -> String {
    match ty {
        Kind::Text => "a string".into(),
        Kind::Whole if key == "workers" => "a whole number or \"auto\"".into(),
        Kind::Whole => "a whole number".into(),
        Kind::Duration => "a duration: a number of seconds, or a string such as \"30s\"".into(),
        Kind::Size => "a size: a number of bytes, or a string such as \"512MiB\"".into(),
        Kind::NameOrNumber => "a name or a number".into(),
        Kind::Umask => "an octal mask such as \"0o022\" or 0o022".into(),
        Kind::Flag => "true or false".into(),
        Kind::List if key == "bind" => {
            "an address or a list of addresses (strings, e.g. [\":8000\"])".into()
        }
        Kind::List if key == "command" => {
            "a list of strings (the program and its arguments)".into()
        }
        Kind::List => "a string or a list of strings".into(),
        Kind::Env => "a table of NAME = \"value\" (or a list of \"NAME=VALUE\" strings)".into(),
    }
}

/// A file value in the form the options take (text, lists of text, a
/// flag on or off: `None`), checked against the key's type. `raw` is the
/// value as written in the file (to tell 0o022 from 18).
fn canonical(
    key: &str,
    ty: Kind,
    value: toml::Value,
    raw: &str,
) -> std::result::Result<Option<Raw>, String> {
    canonical_value(key, ty, value, raw).map(|v| match v {
        toml::Value::Boolean(true) => Some(Raw::On),
        toml::Value::Boolean(false) => None,
        toml::Value::Array(items) => Some(Raw::List(
            items
                .into_iter()
                .filter_map(|i| match i {
                    toml::Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
        )),
        toml::Value::String(s) => Some(Raw::Text(s)),
        _ => None,
    })
}

/// [`canonical`], as a TOML value of the option's form.
fn canonical_value(
    key: &str,
    ty: Kind,
    value: toml::Value,
    raw: &str,
) -> std::result::Result<toml::Value, String> {
    use toml::Value as V;
    let wrong = |v: &V| format!("'{key}' must be {}, not {}", expected(key, ty), kind(v));
    let text = |v: V| match v {
        V::String(s) => Ok(V::String(s)),
        other => Err(wrong(&other)),
    };
    match (ty, value) {
        (Kind::Flag, V::Boolean(b)) => Ok(V::Boolean(b)),
        (Kind::Whole | Kind::Size | Kind::NameOrNumber, V::Integer(n))
        | (Kind::Duration, V::Integer(n)) => Ok(V::String(n.to_string())),
        (Kind::Duration, V::Float(f)) => Ok(V::String(f.to_string())),
        (Kind::Umask, V::Integer(n)) if raw.trim_start().starts_with("0o") => {
            Ok(V::String(format!("{n:#o}")))
        }
        (Kind::List, V::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                V::String(s) => Ok(V::String(s)),
                other => Err(format!(
                    "'{key}' must be {}, not a list holding {}",
                    expected(key, ty),
                    kind(&other)
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(V::Array),
        (Kind::List, V::String(s)) => Ok(V::Array(vec![V::String(s)])),
        (Kind::Env, V::Table(t)) => t
            .into_iter()
            .map(|(name, v)| match v {
                V::String(s) => Ok(V::String(format!("{name}={s}"))),
                V::Integer(n) => Ok(V::String(format!("{name}={n}"))),
                V::Float(f) => Ok(V::String(format!("{name}={f}"))),
                V::Boolean(b) => Ok(V::String(format!("{name}={b}"))),
                other => Err(format!(
                    "'{key}' must be {}; '{name}' is {}",
                    expected(key, ty),
                    kind(&other)
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(V::Array),
        (Kind::Env, V::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                V::String(s) => Ok(V::String(s)),
                other => Err(format!(
                    "'{key}' must be {}, not a list holding {}",
                    expected(key, ty),
                    kind(&other)
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(V::Array),
        (Kind::Flag | Kind::List | Kind::Env, other) => Err(wrong(&other)),
        (_, v) => text(v),
    }
}

fn kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "a number",
        toml::Value::Float(_) => "a fractional number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// The 1-based line of a byte offset (counted in bytes: an offset that is
/// not on a character boundary cannot make this panic).
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment::default()
    }

    /// A config file in the temp dir, removed when dropped.
    struct Written(PathBuf);

    impl std::ops::Deref for Written {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Written {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write(name: &str, text: &str) -> Written {
        let p = std::env::temp_dir().join(format!("procman-layers-{}-{name}", std::process::id()));
        std::fs::write(&p, text).expect("write");
        Written(p)
    }

    fn load_args(args: &[&str]) -> Result<Layered> {
        let mut argv: Vec<OsString> = vec!["procman".into()];
        argv.extend(args.iter().map(OsString::from));
        match load(argv, &env())? {
            Parsed::Run(l) => Ok(*l),
            Parsed::Printed => panic!("printed"),
        }
    }

    #[test]
    fn file_fills_what_the_command_line_left_unset() {
        let p = write(
            "a.toml",
            "workers = 4\nbind = [\":9000\", \"unix:/tmp/x.sock\"]\ntimeout = 10\nproxy-headers = true\nenv = { A = \"1\", B = 2 }\napp = \"app:main\"\n",
        );
        let l = load_args(&["-c", p.to_str().expect("utf8"), "-w", "2"]).expect("loads");
        assert_eq!(l.cli.text("workers"), Some("2"));
        assert_eq!(l.sources["workers"], Source::CommandLine);
        assert_eq!(l.cli.list("bind"), [":9000", "unix:/tmp/x.sock"]);
        assert_eq!(l.cli.text("timeout"), Some("10"));
        assert!(l.cli.flag("proxy-headers"));
        assert_eq!(l.cli.list("env"), ["A=1", "B=2"]);
        assert_eq!(l.cli.text("app"), Some("app:main"));
        assert_eq!(
            l.sources["timeout"],
            Source::File {
                path: p.to_path_buf(),
                line: 3
            }
        );
    }

    #[test]
    fn file_errors_name_the_file_the_key_and_the_line() {
        let table: &[(&str, &str)] = &[
            ("workers = 2\nwokers = 3\n", "line 2: unknown key 'wokers'"),
            (
                "workers = true\n",
                "line 1: 'workers' must be a whole number or \"auto\", not a boolean",
            ),
            (
                "reuse-port = \"yes\"\n",
                "line 1: 'reuse-port' must be true or false",
            ),
            ("workers = \n", "line 1: invalid TOML"),
            (
                "config = \"x\"\n",
                "'config' cannot be set in a config file",
            ),
            (
                "bind = [true]\n",
                "'bind' must be an address or a list of addresses (strings, e.g. [\":8000\"]), not a list holding a boolean",
            ),
            ("bind = 5\n", "line 1: 'bind' must be an address or a list of addresses"),
            ("timeout = true\n", "line 1: 'timeout' must be a duration"),
            ("umask = 18\n", "line 1: 'umask' must be an octal mask"),
            ("env = { A = [1] }\n", "line 1: 'env' must be a table"),
            ("chdir = 1\n", "line 1: 'chdir' must be a string, not a number"),
        ];
        for (i, (text, want)) in table.iter().enumerate() {
            let p = write(&format!("bad{i}.toml"), text);
            let err = load_args(&["-c", p.to_str().expect("utf8")]).expect_err(text);
            assert_eq!(err.exit_code(), 2);
            let msg = err.to_string();
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(msg.contains(want), "{text:?}: {msg}");
        }
    }

    #[test]
    fn every_key_has_the_type_its_help_documents() {
        let types: BTreeMap<&str, Kind> = OPTIONS.iter().map(|o| (o.name, o.kind)).collect();
        let want: &[(&str, Kind)] = &[
            ("workers", Kind::Whole),
            ("backlog", Kind::Whole),
            ("limit-concurrency", Kind::Whole),
            ("timeout", Kind::Duration),
            ("keep-alive", Kind::Duration),
            ("max-worker-lifetime-jitter", Kind::Duration),
            ("memory-check-interval", Kind::Duration),
            ("max-worker-memory", Kind::Size),
            ("user", Kind::NameOrNumber),
            ("stop-signal", Kind::NameOrNumber),
            ("umask", Kind::Umask),
            ("bind", Kind::List),
            ("command", Kind::List),
            ("pre-start", Kind::List),
            ("env", Kind::Env),
            ("preload", Kind::Flag),
            ("app", Kind::Text),
            ("chdir", Kind::Text),
            ("ready", Kind::Text),
            ("log-level", Kind::Text),
        ];
        for (key, ty) in want {
            assert_eq!(types.get(*key), Some(ty), "{key}");
        }
        let durations = types.values().filter(|t| **t == Kind::Duration).count();
        assert!(durations >= 7, "{types:?}");
    }

    #[test]
    fn web_concurrency_and_port_fill_workers_and_bind() {
        let e = Environment {
            web_concurrency: Some("3".into()),
            port: Some("9999".into()),
            ..Environment::default()
        };
        let argv: Vec<OsString> = ["procman", "--", "true"]
            .iter()
            .map(OsString::from)
            .collect();
        let Parsed::Run(l) = load(argv.clone(), &e).expect("loads") else {
            panic!("printed")
        };
        assert_eq!(l.cli.text("workers"), Some("3"));
        assert_eq!(l.cli.list("bind"), ["0.0.0.0:9999"]);
        assert_eq!(
            l.sources["workers"],
            Source::Environment("WEB_CONCURRENCY".into())
        );
        assert_eq!(l.sources["bind"], Source::Environment("PORT".into()));
        let e = Environment {
            web_concurrency: Some("lots".into()),
            ..Environment::default()
        };
        let Parsed::Run(l) = load(argv, &e).expect("loads") else {
            panic!("printed")
        };
        let err = crate::config::Config::from_cli(&l.cli, &e).expect_err("bad WEB_CONCURRENCY");
        let msg = l.annotate(err).to_string();
        assert!(
            msg.contains("'lots' for '--workers'") && msg.ends_with("(from WEB_CONCURRENCY)"),
            "{msg}"
        );
    }

    #[test]
    fn a_reload_keeps_restart_only_options_and_names_them() {
        let in_force =
            Cli::try_parse_from(["procman", "--log-level", "debug", "--", "true"]).expect("parses");
        let args: Vec<OsString> = ["procman", "--log-level", "error", "-w", "3", "--", "true"]
            .iter()
            .map(OsString::from)
            .collect();
        let (cfg, set_aside) = reload_config(&args, &in_force).expect("loads");
        assert_eq!(set_aside, ["log-level"]);
        assert_eq!(cfg.log_level, crate::config::LogLevel::Debug);
        assert_eq!(cfg.workers, 3, "a reloadable option takes its new value");
        let restart_only: Vec<&str> = OPTIONS
            .iter()
            .filter(|o| o.reload == Reload::RestartOnly)
            .map(|o| o.name)
            .collect();
        assert_eq!(
            restart_only,
            [
                "reuse-port",
                "user",
                "group",
                "pid",
                "log-level",
                "log-format",
                "log-file",
                "control-socket",
                "metrics"
            ]
        );
    }

    #[test]
    fn a_missing_file_is_a_usage_error() {
        let err = load_args(&["-c", "/no/such/procman.toml"]).expect_err("missing");
        assert_eq!(err.exit_code(), 2);
        assert!(err
            .to_string()
            .contains("cannot read config file /no/such/procman.toml"));
    }

    #[test]
    fn printed_config_round_trips() {
        let p = write(
            "rt.toml",
            "workers = 3\nbind = [\":9001\"]\ncommand = [\"./server\", \"--flag\"]\n",
        );
        let l = load_args(&["-c", p.to_str().expect("utf8"), "-t", "7"]).expect("loads");
        let printed = l.render_toml();
        assert!(
            printed.contains("timeout = \"7\"  # command line"),
            "{printed}"
        );
        let again = write("rt2.toml", &printed);
        let l2 = load_args(&["-c", again.to_str().expect("utf8")]).expect("reloads");
        let mut a = l.cli.clone();
        let mut b = l2.cli.clone();
        a.set_raw("config", None);
        b.set_raw("config", None);
        assert_eq!(a, b);
    }

    #[test]
    fn bad_values_are_traced_to_their_source() {
        let p = write("src.toml", "\n\nworkers = \"many\"\n");
        let l = load_args(&["-c", p.to_str().expect("utf8"), "--", "true"]).expect("loads");
        let err = crate::config::Config::from_cli(&l.cli, &env()).expect_err("bad workers");
        let msg = l.annotate(err).to_string();
        assert!(
            msg.starts_with(&format!(
                "{}, line 3: invalid value 'many' for '--workers'",
                p.display()
            )),
            "{msg}"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn fresh() -> Layered {
        Layered {
            cli: Cli::default(),
            sources: BTreeMap::new(),
        }
    }

    /// A TOML value of any type, as text.
    fn toml_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
            Just("0o777".to_string()),
            Just("[1, \"a\", true]".to_string()),
            Just("{ A = 1, B = \"x\", C = [2] }".to_string()),
            Just("1979-05-27T07:32:00Z".to_string()),
            "[^\n]{0,20}",
        ]
    }

    /// Lines of `key = value` with real keys and values of every type.
    fn toml_like() -> impl Strategy<Value = String> {
        let key = prop::sample::select(OPTIONS.iter().map(|o| o.name).collect::<Vec<_>>());
        prop::collection::vec((key, toml_value()), 0..6).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect::<String>()
        })
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        prop::option::of(any::<String>())
    }

    proptest! {
        #![proptest_config(cases())]

        #[test]
        fn any_file_text_is_applied_or_refused_without_panic(
            text in prop_oneof![any::<String>(), toml_like()],
        ) {
            let _ = fresh().apply_text(&text, Path::new("/x.toml"));
        }

        #[test]
        fn printed_options_read_back_the_same(
            workers in opt_text(),
            timeout in opt_text(),
            umask in opt_text(),
            chdir in opt_text(),
            bind in prop::collection::vec(any::<String>(), 0..3),
            env in prop::collection::vec(any::<String>(), 0..3),
            command in prop::collection::vec(any::<String>(), 0..3),
            proxy_headers in any::<bool>(),
        ) {
            let mut l = fresh();
            for (name, value) in [("workers", workers), ("timeout", timeout), ("umask", umask), ("chdir", chdir)] {
                l.cli.set_raw(name, value.map(Raw::Text));
            }
            l.cli.set_list("bind", bind);
            l.cli.set_list("env", env);
            l.cli.set_list("command", command);
            l.cli.set_flag("proxy-headers", proxy_headers);
            let printed = l.render_toml();
            let mut again = fresh();
            again.apply_text(&printed, Path::new("/x.toml")).map_err(|e| {
                TestCaseError::fail(format!("{e}\n{printed}"))
            })?;
            prop_assert_eq!(&l.cli, &again.cli, "{}", printed);
        }

        #[test]
        fn list_variables_split_back_into_their_items(
            items in prop::collection::vec(any::<String>(), 1..5),
        ) {
            prop_assert_eq!(split_list("PROCMAN_ENV", &join_list(&items)), Ok(items));
        }

        #[test]
        fn any_list_variable_is_split_or_refused_without_panic(text in any::<String>()) {
            let _ = split_list("PROCMAN_ENV", &text);
        }
    }

    #[test]
    fn list_variables_have_a_documented_escape() {
        assert_eq!(
            split_list("V", r"A=1\,2,B=x\\y,,C"),
            Ok(vec![
                "A=1,2".into(),
                r"B=x\y".into(),
                String::new(),
                "C".into()
            ])
        );
        for bad in [r"A=\x", "A=\\"] {
            let err = split_list("PROCMAN_ENV", bad).expect_err(bad).to_string();
            assert!(err.starts_with("invalid PROCMAN_ENV: a backslash"), "{err}");
        }
    }
}
