//! The command line as clap sees it, and the raw values of every option.
//!
//! The options themselves are declared once, in the table of
//! `cli/options.rs` ([`OPTIONS`]); this file derives clap's arguments and
//! `--help` from it (one argument per entry: long and short names, the
//! `PROCMAN_*` variable, the default shown, the help heading) and keeps
//! what was given as [`Cli`].
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

pub mod gunicorn;
mod options;

pub use options::{def, Class, Kind, OptionDef, Place, Reload, OPTIONS};

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

impl OptionDef {
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
            Place::Named => {
                arg = arg
                    .long(self.name)
                    .visible_aliases(self.aliases.iter().copied())
                    .help_heading(self.heading)
            }
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
    fn clap_accepts_every_definition() {
        Cli::command().debug_assert();
    }

    #[test]
    fn definitions_are_consistent() {
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
    fn bootstrap_keys_are_unique_and_never_for_command_workers() {
        let mut keys: Vec<&str> = OPTIONS.iter().filter_map(|o| o.bootstrap).collect();
        let marked = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), marked, "two options share a bootstrap key");
        for o in OPTIONS.iter().filter(|o| o.bootstrap.is_some()) {
            assert!(
                !matches!(o.applies_to, Class::Command(_)),
                "{}: a command-worker option handed to the uvicorn bootstrap",
                o.name
            );
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
