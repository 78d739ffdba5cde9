//! The configuration layers: built-in defaults < config file < environment
//! (`PROCMAN_<LONG_NAME>`, `WEB_CONCURRENCY`, `PORT`) < command line, merged
//! into one raw [`Cli`], with the source of every value remembered.
//! `FORWARDED_ALLOW_IPS` is a default of `--forwarded-allow-ips` (as in
//! uvicorn and gunicorn), below the file.
//!
//! clap already merges the command line over `PROCMAN_*` variables; this
//! module adds `WEB_CONCURRENCY` and `PORT`, then fills whatever is still
//! unset from the TOML file (`layers/file.rs`). The file is checked key by key against the
//! option table (`cli::OPTIONS`), so its keys are exactly the long option
//! names, typed as the table says, and each error names the file, the key
//! and the line. Validation of the values
//! themselves stays in `config.rs`; [`Layered::annotate`] adds where a bad
//! value came from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::{Cli, Reload, OPTIONS};
use crate::config::{Config, Environment};
use crate::error::{Error, Result};

mod cmd_args;
mod file;

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
    let variables = OPTIONS
        .iter()
        .filter_map(|o| o.env_var())
        .chain(["PROCMAN_CMD_ARGS".to_string()]);
    for var in variables {
        if let Some(v) = std::env::var_os(&var).filter(|v| v.to_str().is_none()) {
            return Err(Error::usage(format!(
                "{var} ('{}') is not valid UTF-8",
                v.to_string_lossy()
            )));
        }
    }
    // A gunicorn option procman does not have: one line saying what
    // procman offers instead, before clap's "unexpected argument".
    let text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Some(line) = crate::cli::gunicorn::refusal(&text) {
        return Err(Error::usage(line));
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
    if let Some(text) = &env.cmd_args {
        cmd_args::apply(text, &matches, &mut cli, &mut sources)?;
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
    // uvicorn's and gunicorn's default for --forwarded-allow-ips: below
    // the file, as it is below their own settings; for an APP only (a
    // COMMAND has no proxy headers to trust).
    if layered.cli.is_set("app")
        && !layered.cli.is_set("forwarded-allow-ips")
        && !layered.cli.flag("no-proxy-headers")
    {
        if let Some(ips) = &env.forwarded_allow_ips {
            layered.cli.set_text("forwarded-allow-ips", ips.clone());
            layered.sources.insert(
                "forwarded-allow-ips".into(),
                Source::Environment("FORWARDED_ALLOW_IPS".into()),
            );
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment::default()
    }

    /// A config file in the temp dir, removed when dropped.
    pub(super) struct Written(PathBuf);

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

    pub(super) fn write(name: &str, text: &str) -> Written {
        let p = std::env::temp_dir().join(format!("procman-layers-{}-{name}", std::process::id()));
        std::fs::write(&p, text).expect("write");
        Written(p)
    }

    pub(super) fn load_args(args: &[&str]) -> Result<Layered> {
        let mut argv: Vec<OsString> = vec!["procman".into()];
        argv.extend(args.iter().map(OsString::from));
        match load(argv, &env())? {
            Parsed::Run(l) => Ok(*l),
            Parsed::Printed => panic!("printed"),
        }
    }

    #[test]
    fn forwarded_allow_ips_variable_is_a_default_below_the_file_for_an_app_only() {
        let e = Environment {
            forwarded_allow_ips: Some("10.0.0.0/8".into()),
            ..Environment::default()
        };
        let run = |args: &[&str]| {
            let mut argv: Vec<OsString> = vec!["procman".into()];
            argv.extend(args.iter().map(OsString::from));
            match load(argv, &e).expect("loads") {
                Parsed::Run(l) => l,
                Parsed::Printed => panic!("printed"),
            }
        };
        let l = run(&["app:main"]);
        assert_eq!(l.cli.text("forwarded-allow-ips"), Some("10.0.0.0/8"));
        assert_eq!(
            l.sources["forwarded-allow-ips"],
            Source::Environment("FORWARDED_ALLOW_IPS".into())
        );
        let file = write("fwd.toml", "forwarded-allow-ips = \"192.0.2.1\"\n");
        let l = run(&["app:main", "-c", file.to_str().expect("utf8")]);
        assert_eq!(l.cli.text("forwarded-allow-ips"), Some("192.0.2.1"));
        // A command has no proxy headers; --no-proxy-headers wants none.
        assert!(!run(&["--", "true"]).cli.is_set("forwarded-allow-ips"));
        let l = run(&["--no-proxy-headers", "app:main"]);
        assert!(!l.cli.is_set("forwarded-allow-ips"));
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
                "metrics",
                "reload",
                "reload-dir",
                "reload-include",
                "reload-exclude"
            ]
        );
    }

    #[test]
    fn an_option_that_does_not_apply_is_traced_to_its_source() {
        // Each error belongs to one option, which came from the file: the
        // message names the file and the line, as for a bad value.
        let command: &[&str] = &["--", "true"];
        let app: &[&str] = &["--python", "sh", "app:main"];
        let table = [
            (
                "max-requests = 5",
                command,
                "'--max-requests' applies to uvicorn",
            ),
            ("ready = \"exec\"", app, "'--ready' applies to command"),
            (
                "max-worker-lifetime-jitter = \"5s\"",
                command,
                "'--max-worker-lifetime-jitter' needs",
            ),
            (
                "memory-check-interval = \"5s\"",
                command,
                "'--memory-check-interval' needs",
            ),
            ("ready-after = \"2s\"", app, "'--ready-after 2s' applies"),
            ("keyfile = \"Cargo.toml\"", app, "HTTPS needs both"),
        ];
        for (i, (line, run, want)) in table.into_iter().enumerate() {
            let p = write(&format!("applies-{i}.toml"), &format!("\n{line}\n"));
            let mut args = vec!["-c", p.to_str().expect("utf8")];
            args.extend_from_slice(run);
            let l = load_args(&args).expect("loads");
            let err = crate::config::Config::from_cli(&l.cli, &env()).expect_err(line);
            let msg = l.annotate(err).to_string();
            assert!(
                msg.starts_with(&format!("{}, line 2: {want}", p.display())),
                "{line}: {msg}"
            );
        }
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

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(256))]

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
