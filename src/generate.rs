//! `procman completions SHELL` and `procman man`: shell completion scripts
//! (clap_complete) and a roff man page (clap_mangen), both generated from
//! the very `Cli` definition that parses the command line and prints
//! `--help`, so none of the three can drift from the others.
//!
//! They are words in first position, not options, and they never collide
//! with an APP: an APP is always `module:attribute`, with a colon, so
//! `procman man` cannot mean an app, and `procman app:main` or
//! `procman -w 2 man:app` are never taken for these. Anything after
//! `procman` other than exactly these two words goes to the normal parser.

use std::ffi::OsString;
use std::io::Write;

use clap::{Arg, Command};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::{Error, Result};

/// What was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A completion script for this shell.
    Completions(Shell),
    /// The man page, in roff.
    Man,
    /// `--help` of one of the words: this text.
    Help(String),
}

/// The two words, as clap subcommands: their parser here and their
/// description in the man page and the completions are this one definition.
fn subcommands() -> [Command; 2] {
    [
        Command::new("completions")
            .about("Print a shell completion script (bash, zsh, fish, elvish or powershell)")
            .long_about(
                "Print a shell completion script, e.g.\n  \
                 procman completions bash > /etc/bash_completion.d/procman\n  \
                 procman completions zsh > \"${fpath[1]}/_procman\"\n  \
                 procman completions fish > ~/.config/fish/completions/procman.fish",
            )
            .arg(
                Arg::new("shell")
                    .value_name("SHELL")
                    .required(true)
                    .value_parser(clap::value_parser!(Shell)),
            ),
        Command::new("man")
            .about("Print the man page (roff): procman man | man -l -")
            .long_about(
                "Print the man page (roff): `procman man | man -l -` reads it, \
                 `procman man > /usr/local/share/man/man1/procman.1` installs it.",
            ),
    ]
}

/// The full command, as documented: the options of `Cli` plus the two
/// generator words.
fn documented() -> Command {
    Cli::command()
        .subcommands(subcommands())
        // APP and the words share the first position; only in the
        // documentation do both appear (parsing never sees this Command).
        .subcommand_negates_reqs(true)
        .args_conflicts_with_subcommands(true)
        .disable_help_subcommand(true)
}

/// The man page: clap_mangen's sections for the options, and a COMMANDS
/// section for the two words (clap_mangen would point to separate
/// procman-man(1) pages, which do not exist).
fn man_page(out: &mut Vec<u8>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    out.extend_from_slice(b".SH COMMANDS\n");
    for sub in subcommands() {
        let args: String = sub
            .get_positionals()
            .map(|a| {
                format!(
                    " \\fI{}\\fR",
                    roff_text(&a.get_value_names().unwrap_or_default().join(" "))
                )
            })
            .collect();
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        out.extend_from_slice(
            format!(
                ".TP\n\\fBprocman {}\\fR{args}\n{}\n",
                sub.get_name(),
                roff_lines(&about)
            )
            .as_bytes(),
        );
    }
    man.render_extra_section(out)?;
    man.render_version_section(out)
}

/// Text made safe for roff: backslashes escaped, `-` as a minus (so
/// options can be searched and copied), no line starting with a control
/// character.
fn roff_text(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

/// Several lines of text, kept as lines (`.br` between them).
fn roff_lines(text: &str) -> String {
    text.lines()
        .map(|l| format!("\\&{}", roff_text(l.trim())))
        .collect::<Vec<_>>()
        .join("\n.br\n")
}

/// `Some` when argv asks for completions or the man page (`Err` when it
/// does so wrongly, e.g. an unknown shell: a usage error).
pub fn requested(args: &[OsString]) -> Option<Result<Request>> {
    let word = args.get(1)?.to_str()?;
    let sub = subcommands().into_iter().find(|c| c.get_name() == word)?;
    let argv = std::iter::once(OsString::from(format!("procman {word}")))
        .chain(args.iter().skip(2).cloned());
    let parsed = sub.no_binary_name(false).try_get_matches_from(argv);
    Some(match parsed {
        Ok(m) => Ok(match m.try_get_one::<Shell>("shell") {
            Ok(Some(shell)) => Request::Completions(*shell),
            // `man` has no arguments (and `completions` requires its one).
            _ => Request::Man,
        }),
        // `procman man --help`: clap's help text is the answer.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            Ok(Request::Help(e.render().to_string()))
        }
        Err(e) => Err(Error::usage(format!(
            "{} (see procman {word} --help)",
            first_paragraph(&e.render().to_string())
        ))),
    })
}

/// clap's error without its usage and tip, on one line: the lines up to
/// the first blank one (the missing argument or the possible values follow
/// the first line).
fn first_paragraph(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    lines.join(" ").trim_start_matches("error: ").to_string()
}

/// The bytes to print for a request.
pub fn render(req: Request) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match req {
        Request::Completions(shell) => {
            clap_complete::generate(shell, &mut documented(), "procman", &mut out);
        }
        Request::Man => man_page(&mut out)
            .map_err(|e| Error::runtime(format!("cannot render the man page: {e}")))?,
        Request::Help(text) => out = text.into_bytes(),
    }
    Ok(out)
}

/// Prints a request on stdout. A closed pipe (`procman man | head`) is not
/// an error: the reader had what it wanted.
pub fn print(req: Request) -> Result<()> {
    let bytes = render(req)?;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::runtime(format!(
            "cannot write to stdout: {}",
            crate::error::os_reason(&e)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(args: &[&str]) -> Option<Result<Request>> {
        let argv: Vec<OsString> = std::iter::once("procman")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        requested(&argv)
    }

    #[test]
    fn the_words_count_only_first_and_never_take_an_app() {
        assert_eq!(request(&["man"]).map(|r| r.ok()), Some(Some(Request::Man)));
        assert_eq!(
            request(&["completions", "zsh"]).map(|r| r.ok()),
            Some(Some(Request::Completions(Shell::Zsh)))
        );
        // An APP always has a colon; a word elsewhere is the parser's.
        assert!(request(&["man:app"]).is_none());
        assert!(request(&["completions:main", "-w", "2"]).is_none());
        assert!(request(&["-w", "2", "man"]).is_none());
        assert!(request(&["app:main"]).is_none());
        assert!(request(&[]).is_none());
    }

    #[test]
    fn a_wrong_use_is_one_usage_line() {
        for (args, want) in [
            (&["completions"][..], "<SHELL>"),
            (&["completions", "tcsh"][..], "'tcsh'"),
            (&["man", "extra"][..], "'extra'"),
        ] {
            let err = request(args).expect("a request").expect_err("invalid");
            let msg = err.to_string();
            assert_eq!(err.exit_code(), 2, "{msg}");
            assert!(msg.contains(want) && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn completions_and_man_page_list_every_option_of_help() {
        let man = String::from_utf8(render(Request::Man).expect("man")).expect("utf-8");
        let shells = [Shell::Bash, Shell::Zsh, Shell::Fish];
        let scripts: Vec<String> = shells
            .iter()
            .map(|s| {
                String::from_utf8(render(Request::Completions(*s)).expect("script")).expect("utf-8")
            })
            .collect();
        let cli = Cli::command();
        let longs: Vec<&str> = cli.get_arguments().filter_map(|a| a.get_long()).collect();
        assert!(longs.len() > 40, "{longs:?}");
        for long in longs {
            assert!(
                man.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))),
                "man: --{long}"
            );
            for (shell, script) in shells.iter().zip(&scripts) {
                // fish lists long names without their dashes.
                assert!(script.contains(long), "{shell}: --{long}");
            }
        }
        assert!(man.contains(".SH COMMANDS") && man.contains("procman completions"));
        assert!(scripts[0].contains("completions") && scripts[0].contains(" man"));
    }
}
