//! `PROCMAN_CMD_ARGS`: options written as on the command line, in one
//! variable (what `GUNICORN_CMD_ARGS` is to gunicorn, under procman's own
//! name: a variable meant for gunicorn in an environment shared with it is
//! not read). The text is split as a shell would split words (spaces;
//! `'...'` and `"..."` quote, `\` escapes), parsed by the same clap command,
//! and each option it sets is taken unless the command line set it too:
//! command line > `PROCMAN_CMD_ARGS` > `PROCMAN_<NAME>` > file > defaults.
//! It holds options only (no APP, no `-- COMMAND`).

use std::collections::BTreeMap;

use clap::parser::ValueSource;
use clap::ArgMatches;

use super::{one_line, Source};
use crate::cli::{gunicorn, Cli, Place, OPTIONS};
use crate::error::{Error, Result};

const VAR: &str = "PROCMAN_CMD_ARGS";

/// Takes the options of `text` (the variable's value) that the command
/// line (`main`) did not set into `cli`, with their source.
pub(super) fn apply(
    text: &str,
    main: &ArgMatches,
    cli: &mut Cli,
    sources: &mut BTreeMap<String, Source>,
) -> Result<()> {
    let words = split(text).map_err(|why| Error::usage(format!("{VAR} ('{text}'): {why}")))?;
    let argv: Vec<String> = std::iter::once("procman".to_string())
        .chain(words)
        .collect();
    if let Some(line) = gunicorn::refusal(&argv) {
        return Err(Error::usage(format!("{VAR}: {line}")));
    }
    let m = Cli::command()
        .try_get_matches_from(&argv)
        .map_err(|e| Error::usage(format!("{VAR}: {}", one_line(&e))))?;
    let given = Cli::from_matches(&m);
    for o in OPTIONS {
        if m.value_source(o.name) != Some(ValueSource::CommandLine) {
            continue;
        }
        if o.place != Place::Named || !o.env {
            let what = match o.place {
                Place::Named => format!("'--{}'", o.name),
                _ => o.value_name.to_string(),
            };
            return Err(Error::usage(format!(
                "{VAR} holds options only; {what} belongs on the command line"
            )));
        }
        if main.value_source(o.name) == Some(ValueSource::CommandLine) {
            continue;
        }
        cli.set_raw(o.name, given.raw(o.name).cloned());
        sources.insert(o.name.to_string(), Source::Environment(VAR.into()));
    }
    Ok(())
}

/// Splits `text` into words as a POSIX shell would, without expansions.
fn split(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("a ' is not closed".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("a \" is not closed".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("a \" is not closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("it ends with a lone \\".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::super::{load, Parsed};
    use super::*;
    use crate::config::Environment;
    use std::ffi::OsString;

    #[test]
    fn words_split_as_a_shell_splits_them() {
        assert_eq!(
            split(r#" -w 4  -b 'unix:/run/a b.sock' --env "K=a \"b\"" x\ y '' "#).expect("splits"),
            [
                "-w",
                "4",
                "-b",
                "unix:/run/a b.sock",
                "--env",
                "K=a \"b\"",
                "x y",
                ""
            ]
        );
        for bad in ["'open", "\"open", "end\\"] {
            assert!(split(bad).is_err(), "{bad}");
        }
    }

    fn run(cmd_args: &str, args: &[&str]) -> Result<super::super::Layered> {
        let e = Environment {
            cmd_args: Some(cmd_args.into()),
            ..Environment::default()
        };
        let mut argv: Vec<OsString> = vec!["procman".into()];
        argv.extend(args.iter().map(OsString::from));
        match load(argv, &e)? {
            Parsed::Run(l) => Ok(*l),
            Parsed::Printed => panic!("printed"),
        }
    }

    #[test]
    fn its_options_count_unless_the_command_line_sets_them() {
        let l = run(
            "-w 3 --timeout 9 -b ':1'",
            &["--timeout", "5", "--", "true"],
        )
        .expect("loads");
        assert_eq!(l.cli.text("workers"), Some("3"));
        assert_eq!(l.sources["workers"], Source::Environment(VAR.into()));
        assert_eq!(l.cli.text("timeout"), Some("5"), "the command line wins");
        assert_eq!(l.sources["timeout"], Source::CommandLine);
        assert_eq!(l.cli.list("bind"), [":1"]);
        for (text, want) in [
            ("app:main", "options only; APP"),
            ("-- ./server", "options only; COMMAND"),
            ("--check-config", "'--check-config' belongs"),
            ("--threads 4", "gunicorn option"),
            ("--no-such", "unexpected argument"),
            ("-w '4", "is not closed"),
        ] {
            let err = run(text, &["--", "true"]).expect_err(text).to_string();
            assert!(err.contains(VAR) && err.contains(want), "{text}: {err}");
        }
    }
}
