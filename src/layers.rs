//! The configuration layers: built-in defaults < config file < environment
//! (`PROCMAN_<LONG_NAME>`, `WEB_CONCURRENCY`, `PORT`) < command line, merged
//! into one raw [`Cli`], with the source of every value remembered.
//!
//! clap already merges the command line over `PROCMAN_*` variables; this
//! module adds `WEB_CONCURRENCY` and `PORT`, then fills whatever is still
//! unset from the TOML file. The file is checked key by key against clap's
//! own option list, so its keys are exactly the long option names, and each
//! error names the file, the key and the line. Validation of the values
//! themselves stays in `config.rs`; [`Layered::annotate`] adds where a bad
//! value came from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches};

use crate::cli::Cli;
use crate::config::Environment;
use crate::error::{os_reason, Error, Result};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The command line.
    CommandLine,
    /// An environment variable.
    Environment(String),
    /// A config file line.
    File {
        /// The file.
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
    /// The merged options.
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

/// How a key is written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Text,
    List,
    Flag,
}

/// Keys that make no sense inside a config file.
const NOT_IN_FILE: &[&str] = &["config", "check-config", "print-config", "help", "version"];

/// Every option's (key, clap id, env var, shape), from clap's definitions.
fn keys() -> Vec<(String, String, Option<String>, Shape)> {
    Cli::command()
        .get_arguments()
        .map(|a| {
            let key = a
                .get_long()
                .map(str::to_string)
                .unwrap_or_else(|| a.get_id().to_string());
            let shape = match a.get_action() {
                ArgAction::SetTrue => Shape::Flag,
                ArgAction::Append => Shape::List,
                _ if a.is_positional() && a.get_id() == "command" => Shape::List,
                _ => Shape::Text,
            };
            let env = a.get_env().map(|e| e.to_string_lossy().to_string());
            (key, a.get_id().to_string(), env, shape)
        })
        .collect()
}

/// Parses the command line, then layers the environment and the file.
pub fn load(args: impl IntoIterator<Item = OsString>, env: &Environment) -> Result<Parsed> {
    let matches = match Cli::command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => return clap_outcome(e),
    };
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| Error::usage(one_line(&e)))?;
    let mut sources = BTreeMap::new();
    for (key, id, var, _) in keys() {
        match matches.value_source(&id) {
            Some(clap::parser::ValueSource::CommandLine) => {
                sources.insert(key, Source::CommandLine);
            }
            Some(clap::parser::ValueSource::EnvVariable) => {
                sources.insert(key, Source::Environment(var.unwrap_or_default()));
            }
            _ => {}
        }
    }
    if cli.workers.is_none() {
        if let Some(n) = &env.web_concurrency {
            cli.workers = Some(n.clone());
            sources.insert(
                "workers".into(),
                Source::Environment("WEB_CONCURRENCY".into()),
            );
        }
    }
    if cli.bind.is_empty() {
        if let Some(port) = &env.port {
            cli.bind = vec![format!("0.0.0.0:{port}")];
            sources.insert("bind".into(), Source::Environment("PORT".into()));
        }
    }
    let mut layered = Layered { cli, sources };
    if let Some(path) = layered.cli.config.clone() {
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
        let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
            toml::from_str(&text).map_err(|e| {
                let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(0);
                Error::usage(format!(
                    "{}, line {line}: invalid TOML: {}",
                    path.display(),
                    e.message().trim()
                ))
            })?;
        let known = keys();
        let mut current = toml::Table::try_from(&self.cli)
            .map_err(|e| Error::usage(format!("internal: cannot merge options: {e}")))?;
        for (key, value) in table {
            let line = line_of(&text, key.span().start);
            let key = key.into_inner();
            let at = |why: String| Error::usage(format!("{}, line {line}: {why}", path.display()));
            if NOT_IN_FILE.contains(&key.as_str()) {
                return Err(at(format!("'{key}' cannot be set in a config file")));
            }
            let Some((_, _, _, shape)) = known.iter().find(|(k, ..)| *k == key) else {
                return Err(at(format!(
                    "unknown key '{key}' (keys are the long option names, e.g. workers, bind, timeout)"
                )));
            };
            let value = canonical(&key, *shape, value.into_inner()).map_err(at)?;
            if current.contains_key(&key) {
                continue; // the environment or the command line wins
            }
            current.insert(key.clone(), value);
            self.sources.insert(
                key,
                Source::File {
                    path: path.to_path_buf(),
                    line,
                },
            );
        }
        let config = self.cli.config.clone();
        let (check, print) = (self.cli.check_config, self.cli.print_config);
        self.cli = current.try_into().map_err(|e: toml::de::Error| {
            Error::usage(format!("{}: {}", path.display(), e.message()))
        })?;
        self.cli.config = config;
        self.cli.check_config = check;
        self.cli.print_config = print;
        Ok(())
    }

    /// Adds the source of the offending value to a validation error that
    /// names an option (`… for '--workers': …`).
    pub fn annotate(&self, err: Error) -> Error {
        let Error::Usage(msg) = &err else { return err };
        let named = self.sources.iter().find(|(key, _)| {
            msg.contains(&format!("for '--{key}'"))
                || (key.as_str() == "app" && msg.contains("APP '"))
        });
        match named {
            Some((_, Source::File { path, line })) => {
                Error::usage(format!("{}, line {line}: {msg}", path.display()))
            }
            Some((_, Source::Environment(var))) => Error::usage(format!("{msg} (from {var})")),
            _ => err,
        }
    }

    /// The effective options as a TOML config file, with the source of every
    /// value that is not a default as a comment. Feeding it back with -c
    /// gives the same configuration.
    pub fn render_toml(&self) -> String {
        let table = toml::Table::try_from(&self.cli).unwrap_or_default();
        let mut out = String::from("# procman configuration, as procman --print-config sees it\n");
        for (key, _, _, _) in keys() {
            if NOT_IN_FILE.contains(&key.as_str()) {
                continue;
            }
            match table.get(&key) {
                Some(value) => {
                    let mut one = toml::Table::new();
                    one.insert(key.clone(), value.clone());
                    let line = toml::to_string(&one).unwrap_or_default();
                    let line = line.trim_end();
                    match self.sources.get(&key) {
                        Some(src) => out.push_str(&format!("{line}  # {src}\n")),
                        None => out.push_str(&format!("{line}\n")),
                    }
                }
                None => {
                    if let Some(default) = default_of(&key) {
                        out.push_str(&format!("# {key} = {default}  (default)\n"));
                    }
                }
            }
        }
        out
    }
}

/// Documented defaults, shown commented out by --print-config.
fn default_of(key: &str) -> Option<&'static str> {
    Some(match key {
        "workers" => "1",
        "bind" => "[\"127.0.0.1:8000\"]",
        "backlog" => "2048",
        "ready" => "\"exec\"",
        "ready-after" => "\"1s\"",
        "stop-signal" => "\"TERM\"",
        "timeout" => "30",
        "startup-timeout" => "60",
        "graceful-timeout" => "30",
        "max-requests" => "0",
        "max-requests-jitter" => "0",
        "memory-check-interval" => "\"5s\"",
        "umask" => "\"0o022\"",
        "keep-alive" => "5",
        "lifespan" => "\"auto\"",
        "interface" => "\"auto\"",
        "http" => "\"auto\"",
        "loop" => "\"auto\"",
        "log-level" => "\"info\"",
        "log-format" => "\"text\"",
        _ => return None,
    })
}

/// A file value in the form the options take: text for most keys (numbers
/// become their decimal text), arrays for repeatable ones, booleans for
/// flags. `env` may also be a table of KEY = "value".
fn canonical(
    key: &str,
    shape: Shape,
    value: toml::Value,
) -> std::result::Result<toml::Value, String> {
    use toml::Value as V;
    let scalar = |v: V| -> std::result::Result<String, String> {
        match v {
            V::String(s) => Ok(s),
            V::Integer(n) => Ok(n.to_string()),
            V::Float(f) => Ok(f.to_string()),
            other => Err(format!(
                "'{key}' must be a string or a number, not {}",
                kind(&other)
            )),
        }
    };
    match (shape, value) {
        (Shape::Flag, V::Boolean(b)) => Ok(V::Boolean(b)),
        (Shape::Flag, other) => Err(format!(
            "'{key}' must be true or false, not {}",
            kind(&other)
        )),
        (Shape::List, V::Table(t)) if key == "env" => t
            .into_iter()
            .map(|(k, v)| scalar(v).map(|v| V::String(format!("{k}={v}"))))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(V::Array),
        (Shape::List, V::Array(items)) => items
            .into_iter()
            .map(|v| scalar(v).map(V::String))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(V::Array),
        (Shape::List, v) => scalar(v).map(|s| V::Array(vec![V::String(s)])),
        (Shape::Text, v) => scalar(v).map(V::String),
    }
}

fn kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "a number",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
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
        assert_eq!(l.cli.workers.as_deref(), Some("2"));
        assert_eq!(l.sources["workers"], Source::CommandLine);
        assert_eq!(l.cli.bind, [":9000", "unix:/tmp/x.sock"]);
        assert_eq!(l.cli.timeout.as_deref(), Some("10"));
        assert!(l.cli.proxy_headers);
        assert_eq!(l.cli.env, ["A=1", "B=2"]);
        assert_eq!(l.cli.app.as_deref(), Some("app:main"));
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
                "line 1: 'workers' must be a string or a number, not a boolean",
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
            ("bind = [true]\n", "'bind' must be a string or a number"),
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
        assert_eq!(l.cli.workers.as_deref(), Some("3"));
        assert_eq!(l.cli.bind, ["0.0.0.0:9999"]);
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
        a.config = None;
        b.config = None;
        assert_eq!(
            toml::Table::try_from(&a).expect("ser"),
            toml::Table::try_from(&b).expect("ser")
        );
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
