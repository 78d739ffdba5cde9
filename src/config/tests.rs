//! Tests of `config`.

use super::*;

pub(super) fn env() -> Environment {
    Environment {
        path: std::env::var_os("PATH"),
        euid: 1000,
        ..Environment::default()
    }
}

pub(super) fn config(args: &[&str]) -> Result<Config> {
    let mut argv = vec!["procman"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| Error::usage(e.to_string()))?;
    Config::from_cli(&cli, &env())
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = config(&["--", "true"]).expect("valid");
    assert_eq!(c.workers, 1);
    assert_eq!(c.backlog, 2048);
    assert_eq!(c.binds, [BindSpec::parse("127.0.0.1:8000").expect("spec")]);
    assert_eq!(c.timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.startup_timeout, Duration::from_secs(60));
    assert_eq!(c.graceful_timeout, Duration::from_secs(30));
    assert_eq!(c.stop_signal, Signal::SIGTERM);
    assert_eq!(c.umask, 0o022);
    assert_eq!(c.ready, ReadyMode::Exec);
    assert_eq!(c.ready_after, Duration::from_secs(1));
    let c = config(&["--ready-after", "250ms", "--", "true"]).expect("valid");
    assert_eq!(c.ready_after, Duration::from_millis(250));
}

#[test]
fn bad_values_name_the_flag_and_the_value() {
    let table: &[(&[&str], &str)] = &[
        (&["-w", "0", "--", "true"], "'0' for '--workers'"),
        (&["-w", "abc", "--", "true"], "'abc' for '--workers'"),
        (&["-b", ":99999", "--", "true"], "'--bind'"),
        (&["-t", "soon", "--", "true"], "'soon' for '--timeout'"),
        (
            &["--stop-signal", "NOPE", "--", "true"],
            "'NOPE' for '--stop-signal'",
        ),
        (&["--umask", "999", "--", "true"], "'999' for '--umask'"),
        (&["-e", "NOEQUALS", "--", "true"], "'NOEQUALS' for '--env'"),
        (
            &["--chdir", "/no/such/dir", "--", "true"],
            "'/no/such/dir' for '--chdir'",
        ),
        (&["--ready", "soon", "--", "true"], "'soon' for '--ready'"),
        (
            &["--ready-after", "soon", "--", "true"],
            "'soon' for '--ready-after'",
        ),
        (
            &["--ready-after", "2", "--startup-timeout", "2", "--", "true"],
            "shorter than --startup-timeout",
        ),
        (
            &["--ready", "notify", "--ready-after", "2", "--", "true"],
            "'--ready-after 2' applies to command workers with '--ready exec'",
        ),
        (
            &["--ready-after", "2", "app:main"],
            "'--ready-after 2' applies to command workers",
        ),
        (&["--backlog", "-1", "--", "true"], "'--backlog'"),
        (&["appmain"], "invalid APP 'appmain'"),
        (&["app:main", "--", "true"], "both an APP"),
        (&[], "nothing to run"),
        (&["--", "/no/such/program"], "cannot find COMMAND"),
        (
            &["--max-requests", "5", "--", "true"],
            "'--max-requests' applies to uvicorn",
        ),
        (&["-k", "sync", "app:main"], "'sync' for '--worker-class'"),
    ];
    for (args, want) in table {
        let err = config(args).expect_err(&format!("{args:?}"));
        assert_eq!(err.exit_code(), 2, "{args:?}");
        assert!(err.to_string().contains(want), "{args:?}: {err}");
    }
}

proptest::proptest! {
    #[test]
    fn log_level_parser_never_panics(text in proptest::prelude::any::<String>()) {
        let _ = parse_log_level(&text);
    }
}
