//! The config-file layer: reading a TOML file into the raw options
//! ([`Layered::apply_file`]), checking each key against the option table
//! (its type, as `cli::OPTIONS` says) and bringing its value into the form
//! the command line gives (`canonical`), with every error naming the file,
//! the key and the line; and the inverse, the effective options printed as
//! such a file for --print-config ([`Layered::render_toml`]).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Layered, Source};
use crate::cli::{def, Kind, Raw, OPTIONS};
use crate::error::{os_reason, Error, Result};

/// Keys that are not options but that a file must not name either.
const NOT_IN_FILE: &[&str] = &["help", "version"];

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
        // A list of strings, for a list or for an environment's NAME=VALUE entries.
        (Kind::List | Kind::Env, V::Array(items)) => items
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
    use super::super::tests::{load_args, write};
    use super::*;

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
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::cli::Cli;
    use proptest::prelude::*;

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
        #![proptest_config(crate::testing::proptest_cases(256))]

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
    }
}
