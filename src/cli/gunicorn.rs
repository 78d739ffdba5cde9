//! gunicorn's command line, for users migrating from it: the table of
//! gunicorn options procman does not have ([`GUNICORN_ONLY`]), each with
//! what procman offers instead, and [`refusal`], which finds one on a
//! command line before clap does, so that the user reads one line naming
//! it as a gunicorn option instead of clap's bare "unexpected argument".
//!
//! The gunicorn options procman honours are ordinary entries of the option
//! table (`cli/options.rs`), under gunicorn's spelling where it differs
//! (`--error-logfile` is an alias of `--log-file`, `-n/--name`,
//! `--access-logfile`). The README's "Migrating from gunicorn" table is
//! checked against both tables by this file's tests.

use super::{Kind, Place, OPTIONS};

/// A gunicorn option procman does not have.
#[derive(Debug, Clone, Copy)]
pub struct GunicornOnly {
    /// Its spellings (`--daemon`, `-D`).
    pub flags: &'static [&'static str],
    /// Whether it takes a value (`--threads 4`).
    pub value: bool,
    /// What procman offers instead.
    pub instead: &'static str,
}

const fn only(flags: &'static [&'static str], value: bool, instead: &'static str) -> GunicornOnly {
    GunicornOnly {
        flags,
        value,
        instead,
    }
}

const LOGS: &str =
    "procman formats every line itself: --log-level, --log-format text|json, --log-file PATH|-";
const TLS: &str = "procman hands --keyfile and --certfile to uvicorn; for other TLS settings terminate TLS in a proxy";
const LIMITS: &str = "uvicorn's HTTP parser (--http h11|httptools) applies its own limits; put a proxy in front to set yours";

/// Every gunicorn option procman refuses, with what it offers instead.
pub static GUNICORN_ONLY: &[GunicornOnly] = &[
    only(&["--threads"], true, "uvicorn workers serve concurrently on one event loop; scale with -w/--workers"),
    only(&["--worker-connections"], true, "--limit-concurrency N (uvicorn answers 503 beyond N per worker)"),
    only(&["--statsd-host", "--statsd-prefix", "--dogstatsd-tags"], true, "--metrics HOST:PORT serves Prometheus metrics"),
    only(&["--proxy-protocol"], false, "not supported: let the proxy send X-Forwarded-For (honoured from --forwarded-allow-ips and unix-socket peers)"),
    only(&["--proxy-allow-from"], true, "--forwarded-allow-ips (proxy headers, not the PROXY protocol)"),
    only(&["--log-config", "--log-config-dict", "--log-config-json", "--logger-class"], true, LOGS),
    only(&["--access-logformat"], true, "uvicorn's access log has its own format; --no-access-log turns it off"),
    only(&["--log-syslog"], false, "procman logs to stderr (journald keeps it under systemd) or --log-file"),
    only(&["--log-syslog-to", "--log-syslog-prefix", "--log-syslog-facility"], true, "procman logs to stderr (journald keeps it under systemd) or --log-file"),
    only(&["--disable-redirect-access-to-syslog"], false, "procman logs to stderr or --log-file, never to syslog"),
    only(&["--capture-output", "--enable-stdio-inheritance", "-R"], false, "workers' output already goes to procman's stderr or --log-file"),
    only(&["--limit-request-line", "--limit-request-fields", "--limit-request-field_size"], true, LIMITS),
    only(&["--daemon", "-D"], false, "procman stays in the foreground: run it under systemd (examples/systemd) or in a container"),
    only(&["--reload-engine"], true, "procman's --reload always uses inotify, from the master's own loop (no thread, no polling)"),
    only(&["--reload-extra-file"], true, "--reload-include GLOB (files to watch besides *.py) or --reload-dir DIR"),
    only(&["--worker-tmp-dir"], true, "procman's heartbeat is a notify socket, not a file: nothing to set"),
    only(&["--tmp-upload-dir"], true, "uploads are the app's business under uvicorn"),
    only(&["--no-sendfile"], false, "uvicorn does not use sendfile"),
    only(&["--pythonpath"], true, "--chdir DIR (sys.path[0]), or -e PYTHONPATH=DIR"),
    only(&["--paste", "--paster"], true, "name the app as module:attribute (ASGI, or WSGI with --interface wsgi)"),
    only(&["--initgroups"], false, "procman always sets the --user's supplementary groups"),
    only(&["--spew"], false, "not supported: use python -X or a tracer"),
    only(&["--ssl-version", "--cert-reqs", "--ca-certs", "--ciphers"], true, TLS),
    only(&["--suppress-ragged-eofs", "--do-handshake-on-connect"], false, TLS),
    only(&["--header-map"], true, "uvicorn passes headers as they came; let the proxy drop ambiguous ones"),
];

/// What `-c FILE` says when FILE is a gunicorn config (Python).
pub const PYTHON_CONFIG: &str = "gunicorn's config is Python; procman's -c reads TOML whose keys are the long option names (workers = 4, bind = [\":8000\"])";

/// The line for a command line that uses a gunicorn option procman does
/// not have (or `-c` with a Python file), if it does. Everything after
/// `--` is the command's; a value of one of procman's options is skipped.
pub fn refusal(args: &[String]) -> Option<String> {
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--" {
            return None;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        if let Some(g) = GUNICORN_ONLY.iter().find(|g| g.flags.contains(&name)) {
            return Some(format!(
                "'{name}' is a gunicorn option procman does not have: {} (README: Migrating from gunicorn)",
                g.instead
            ));
        }
        let Some(o) = procman_option(name) else {
            continue;
        };
        if o.kind == Kind::Flag {
            continue;
        }
        let value = match inline {
            Some(v) => Some(v),
            None => rest.next().map(String::as_str),
        };
        if o.name == "config" {
            if let Some(v) = value.filter(|v| v.ends_with(".py") || v.starts_with("python:")) {
                return Some(format!(
                    "'{name}' with a Python file ('{v}') is a gunicorn option procman does not have: {PYTHON_CONFIG} (README: Migrating from gunicorn)"
                ));
            }
        }
    }
    None
}

/// procman's option spelled `name` (`--long`, an alias, or `-s`).
fn procman_option(name: &str) -> Option<&'static super::OptionDef> {
    OPTIONS
        .iter()
        .filter(|o| o.place == Place::Named)
        .find(|o| match name.strip_prefix("--") {
            Some(long) => o.name == long || o.aliases.contains(&long),
            None => {
                let mut chars = name.chars();
                chars.next() == Some('-')
                    && chars.next().is_some_and(|c| Some(c) == o.short)
                    && chars.next().is_none()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("procman")
            .chain(a.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn no_gunicorn_only_flag_is_one_of_procmans() {
        for g in GUNICORN_ONLY {
            for f in g.flags {
                assert!(procman_option(f).is_none(), "{f} is procman's own");
            }
        }
    }

    #[test]
    fn a_gunicorn_flag_is_found_but_not_in_a_value_or_the_command() {
        assert!(refusal(&args(&["app:main", "--threads", "4"])).is_some());
        assert!(refusal(&args(&["--threads=4", "app:main"])).is_some());
        // -e's value, and the command after --, are not procman's.
        assert!(refusal(&args(&["-e", "--threads", "app:main"])).is_none());
        assert!(refusal(&args(&["--", "./server", "--threads", "4"])).is_none());
        let c = refusal(&args(&["-c", "gunicorn.conf.py", "app:main"])).expect("-c .py");
        assert!(c.contains("TOML"), "{c}");
        assert!(refusal(&args(&["-c", "procman.toml", "app:main"])).is_none());
    }

    /// The README's "Migrating from gunicorn" table: its rows, as
    /// (gunicorn's flags, procman's column).
    fn readme_rows() -> Vec<(Vec<String>, String)> {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("### Migrating from gunicorn")
            .expect("README: ### Migrating from gunicorn");
        readme[start..]
            .lines()
            .skip_while(|l| !l.starts_with("| gunicorn"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
                let flags = cells[0]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|f| f.split(' ').next().unwrap_or(f).to_string())
                    .collect();
                (flags, cells.get(1).unwrap_or(&"").trim().to_string())
            })
            .collect()
    }

    #[test]
    fn the_readme_table_names_every_gunicorn_only_flag_with_what_procman_says() {
        let rows = readme_rows();
        for g in GUNICORN_ONLY {
            let row = rows
                .iter()
                .find(|(flags, _)| flags.iter().any(|f| f == g.flags[0]));
            let Some((flags, said)) = row else {
                panic!("README table: no row for {}", g.flags[0]);
            };
            for f in g.flags {
                assert!(
                    flags.contains(&f.to_string()),
                    "README row of {}: {f}",
                    g.flags[0]
                );
            }
            assert!(
                said.contains(&g.instead.replace('|', "\\|")),
                "README row of {}: says {said:?}, procman says {:?}",
                g.flags[0],
                g.instead
            );
        }
    }

    #[test]
    fn every_flag_in_the_readme_table_is_procmans_or_refused_with_a_line() {
        let rows = readme_rows();
        assert!(rows.len() > 20, "{rows:?}");
        for (flags, _) in &rows {
            for f in flags.iter().filter(|f| f.starts_with('-')) {
                let known = procman_option(f).is_some()
                    || GUNICORN_ONLY.iter().any(|g| g.flags.contains(&f.as_str()));
                assert!(known, "README table: {f} is neither procman's nor refused");
            }
        }
    }
}
