//! What procman makes for others to use: the unix socket files (their
//! mode, `--socket-mode` narrowed by an explicit `--umask`, and group,
//! `--socket-group`) and the log (`--log-file PATH|-`, gunicorn's
//! `--error-logfile` and `--access-logfile`). Like the rest of `config`,
//! it only reads and reports a bad value before anything starts.

use std::path::{Path, PathBuf};

use super::values::parse_umask;
use super::{belongs, invalid};
use crate::cli::Cli;
use crate::error::Result;

/// The mode and the group of unix socket files.
pub(super) fn socket_file(cli: &Cli, umask: u32) -> Result<(u32, Option<u32>)> {
    let socket_mode = {
        let v = cli.value("socket-mode");
        let mode = parse_umask(v).ok_or_else(|| {
            invalid(
                "socket-mode",
                v,
                "expected an octal mode from 0 to 0o777, e.g. 0o660",
            )
        })?;
        // An explicit --umask still narrows it, as it did the socket
        // file before --socket-mode existed.
        if cli.is_set("umask") {
            mode & !umask
        } else {
            mode
        }
    };
    let socket_group = match cli.text("socket-group") {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|gr| gr.gid.as_raw())
                .ok_or_else(|| invalid("socket-group", g, "no such group"))?,
        }),
    };
    Ok((socket_mode, socket_group))
}

/// The log file (`None`: stderr), checked with `--access-logfile`.
pub(super) fn log_file(cli: &Cli) -> Result<Option<PathBuf>> {
    // "-" is stderr, as in gunicorn (--log-file -, --error-logfile -).
    let log_file = cli
        .text("log-file")
        .filter(|f| *f != "-")
        .map(PathBuf::from);
    if let Some(a) = cli.text("access-logfile") {
        if a != "-" && cli.text("log-file") != Some(a) {
            return Err(invalid(
                "access-logfile",
                a,
                "procman writes uvicorn's access log into its own log: give '-' (stderr) or the same PATH as --log-file/--error-logfile, or --no-access-log for none",
            ));
        }
        if cli.flag("no-access-log") {
            return Err(belongs(
                "access-logfile",
                "'--access-logfile' and '--no-access-log' contradict each other; give one",
            ));
        }
    }
    if let Some(f) = &log_file {
        let dir = f
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(invalid(
                "log-file",
                &f.display().to_string(),
                "its directory does not exist",
            ));
        }
    }
    Ok(log_file)
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;

    /// (socket file mode, owner for fchownat) of a command line.
    fn socket(args: &[&str]) -> (u32, Option<(u32, u32)>) {
        let mut all = args.to_vec();
        all.extend(["--", "true"]);
        let opts = config(&all)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .bind_options();
        (0o777 & !opts.umask, opts.owner)
    }

    #[test]
    fn the_socket_file_mode_is_0666_unless_set_and_an_explicit_umask_narrows_it() {
        assert_eq!(socket(&[]), (0o666, None));
        assert_eq!(socket(&["--socket-mode", "0o660"]).0, 0o660);
        assert_eq!(socket(&["--socket-mode", "600"]).0, 0o600);
        assert_eq!(socket(&["--umask", "0o077"]).0, 0o600);
        assert_eq!(socket(&["--umask", "0o002"]).0, 0o664);
        // The group alone: the owner stays (u32::MAX: unchanged).
        assert_eq!(socket(&["--socket-group", "33"]).1, Some((u32::MAX, 33)));
        for (args, want) in [
            (
                &["--socket-mode", "0o1777"][..],
                "invalid value '0o1777' for '--socket-mode'",
            ),
            (
                &["--socket-group", "no-such-group-h7"][..],
                "'no-such-group-h7' for '--socket-group': no such group",
            ),
        ] {
            let mut all = args.to_vec();
            all.extend(["--", "true"]);
            let err = config(&all).expect_err("refused");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn log_file_dash_is_stderr_and_access_logfile_goes_with_it() {
        let log = |args: &[&str]| {
            let mut all = vec!["--python", "sh"];
            all.extend_from_slice(args);
            all.push("app:main");
            config(&all).map(|c| c.log_file)
        };
        assert_eq!(log(&["--log-file", "-"]).expect("stderr"), None);
        assert_eq!(log(&["--error-logfile", "-"]).expect("stderr"), None);
        assert!(log(&["--access-logfile", "-", "--log-file", "-"]).is_ok());
        assert!(log(&["--access-logfile", "a.log", "--log-file", "a.log"]).is_ok());
        let err = log(&["--access-logfile", "a.log"]).expect_err("a path of its own");
        assert!(
            err.to_string().contains("'a.log' for '--access-logfile'"),
            "{err}"
        );
        let err = log(&["--access-logfile", "-", "--no-access-log"]).expect_err("both");
        assert!(err.to_string().contains("contradict"), "{err}");
    }
}
