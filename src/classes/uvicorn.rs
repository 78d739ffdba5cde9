//! The uvicorn class: `<python> -c <loader> "procman [app]"`, where the
//! loader runs the bootstrap, a Python file shipped inside the binary. It
//! takes the listeners from `LISTEN_FDS`, imports the app, runs uvicorn and
//! speaks sd_notify back (READY=1 after startup, WATCHDOG=1 from the event
//! loop).
//!
//! The options reach it as one JSON object in `PROCMAN_APP_CONFIG`
//! ([`app_config`]: a key for each option the table in `cli/options.rs`
//! marks for the bootstrap, with its resolved value, plus the few values
//! the master computes, [`COMPUTED_KEYS`]; the bootstrap keeps no defaults
//! and refuses an object that lacks a key). The source itself (70 KB) is in
//! neither the environment nor the command line, where `ps eww` and
//! `/proc/PID/environ` would show it for the process's whole life (taking a
//! variable out of `os.environ` does not change what the kernel shows): the
//! master writes it once into a sealed memfd ([`bootstrap_fd`]), each
//! child it execs gets that fd (after its listeners, and after a zygote's
//! channel) and its number in `PROCMAN_BOOTSTRAP_FD`, and the loader reads
//! it with `pread` (the fd's offset is shared by every child) and closes it
//! before the bootstrap runs. An fd, not a file: nothing to clean up, and
//! a `--user` worker reads it whatever the permissions of any directory.
//! The command line stays short (`ps`, `top`, `/proc/PID/cmdline`), and the
//! bootstrap then rewrites its title to name its role, e.g.
//! `procman: worker 2 gen 1 [app:main]`. The source is compiled under the
//! name `<procman-bootstrap>` (not `-c`'s `<string>`), so that a traceback
//! says where a frame comes from.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::Launch;
use crate::cli::OPTIONS;
use crate::config::{Config, UvicornOptions};

/// The bootstrap's source, embedded at build time.
pub const BOOTSTRAP: &str = include_str!("bootstrap.py");

/// The environment variable that carries the options.
pub const CONFIG_VAR: &str = "PROCMAN_APP_CONFIG";

/// The environment variable that names the fd holding the bootstrap's
/// source ([`bootstrap_fd`]).
pub const FD_VAR: &str = "PROCMAN_BOOTSTRAP_FD";

/// `python -c LOADER TITLE`: the loader drops the title from `sys.argv`
/// (leaving `sys.argv == ["-c"]`, as plain `-c` would), reads the source
/// from the fd `PROCMAN_BOOTSTRAP_FD` names (from offset 0, whatever the
/// shared offset), closes it and takes the variable out of the environment
/// (so neither the app nor its subprocesses see either), and runs the
/// source in `__main__` under its own file name.
const LOADER: &str = "import os, sys; del sys.argv[1:]; \
                      exec(compile((lambda fd: (os.pread(fd, os.fstat(fd).st_size, 0), os.close(fd))[0])\
                      (int(os.environ.pop('PROCMAN_BOOTSTRAP_FD'))), '<procman-bootstrap>', 'exec'))";

/// The bootstrap's argv under `python` (without the program name). The last
/// argument is only a title for `ps` until the bootstrap writes its own.
pub fn bootstrap_args(app: &str) -> [String; 3] {
    ["-c".into(), LOADER.into(), format!("procman [{app}]")]
}

/// The sealed memfd holding [`BOOTSTRAP`], made once (by the master, before
/// any fork) and kept open: CLOEXEC in the master; a child gets it through
/// its plan's fds ([`with_bootstrap`]).
pub fn bootstrap_fd() -> std::io::Result<RawFd> {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = FD.get() {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it only
    // creates a descriptor, which is owned right below.
    let raw = unsafe {
        libc::memfd_create(
            c"procman-bootstrap".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, BOOTSTRAP.as_bytes())?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we own, with flags only.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = FD.get_or_init(|| OwnedFd::from(file));
    Ok(fd.as_raw_fd())
}

/// One variable of a child's environment.
pub type EnvVar = (std::ffi::OsString, std::ffi::OsString);

/// A uvicorn child's environment and fds (at 3.. in the child) plus the
/// bootstrap's fd after them and the variable naming its number there.
pub fn with_bootstrap(env: &[EnvVar], fds: &[RawFd]) -> std::io::Result<(Vec<EnvVar>, Vec<RawFd>)> {
    let fd = bootstrap_fd()?;
    let mut env: Vec<_> = env.iter().filter(|(k, _)| k != FD_VAR).cloned().collect();
    env.push((FD_VAR.into(), (3 + fds.len()).to_string().into()));
    let mut fds = fds.to_vec();
    fds.push(fd);
    Ok((env, fds))
}

/// Runs the bootstrap under the configured interpreter.
pub fn launch(opts: &UvicornOptions, cfg: &Config) -> Launch {
    let python = opts.python.display().to_string();
    let mut argv = vec![python];
    argv.extend(bootstrap_args(&opts.app));
    Launch {
        program: opts.python.clone(),
        argv,
        env: vec![(
            CONFIG_VAR.into(),
            app_config(opts, cfg, Mode::Worker).to_string(),
        )],
    }
}

/// What the master keeps of `--graceful-timeout` for the end of a uvicorn
/// worker's stop, after its drain: 2 s, or half the timeout below 4 s.
const STOP_RESERVE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long uvicorn lets requests (and streams) finish on TERM, counted
/// from the moment the worker receives the signal: `--graceful-timeout`
/// less 2 s (less half of it below 4 s). The reserve is for what follows
/// the drain before the master's SIGKILL at the full timeout: cancelling
/// what is left, the lifespan shutdown (closing a database pool: 0.5 s
/// fits with a wide margin from 4 s on), and the interpreter's exit. The
/// bootstrap counts its wait for accepted requests to arrive into the
/// drain, not into the reserve.
pub fn uvicorn_drain(graceful: std::time::Duration) -> std::time::Duration {
    graceful.saturating_sub((graceful / 2).min(STOP_RESERVE))
}

/// What the bootstrap is started as; the master decides it, no option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Imports the app and serves it.
    Worker,
    /// `--check-config`: imports the app once and exits.
    Check,
    /// Forks workers on request: `import_app` (`--preload`) imports the app
    /// once for all of them; the base zygote only imports Python's runtime
    /// and uvicorn, and each worker imports the app itself.
    Zygote { import_app: bool },
}

/// The keys of the values the master computes itself rather than taking an
/// option's value as it is: the bootstrap's mode, whether it imports the
/// app, uvicorn's drain time (less than `--graceful-timeout`, see
/// [`uvicorn_drain`]), the log file as an absolute path and the server
/// (uvicorn, or granian for `-k granian`), and, for the base zygote under
/// `--reload`, the app's trees ([`crate::config::WatchConfig::app_trees`]).
/// Every other key comes from the option table
/// ([`crate::cli::OptionDef::bootstrap`]).
pub const COMPUTED_KEYS: [&str; 6] = [
    "mode",
    "import_app",
    "graceful_timeout",
    "log_file",
    "server",
    "app_trees",
];

/// The JSON object the bootstrap reads: one key per option the table marks
/// for the bootstrap, holding its resolved value, plus [`COMPUTED_KEYS`].
/// Every key is always present (an unset option is `null`): the bootstrap
/// has no defaults and refuses an object that lacks one.
pub fn app_config(opts: &UvicornOptions, cfg: &Config, mode: Mode) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    for o in OPTIONS {
        if let Some(key) = o.bootstrap {
            let value = resolved(o.name, opts, cfg);
            debug_assert!(value.is_some(), "--{} has no resolved value", o.name);
            object.insert(key.into(), value.unwrap_or_default());
        }
    }
    let (mode, import_app) = match mode {
        Mode::Worker => ("worker", true),
        Mode::Check => ("check", true),
        Mode::Zygote { import_app } => ("zygote", import_app),
    };
    let computed = [
        ("mode", mode.into()),
        ("import_app", import_app.into()),
        (
            "graceful_timeout",
            uvicorn_drain(cfg.graceful_timeout).as_secs_f64().into(),
        ),
        // Absolute: workers run in --chdir; they reopen it by path on USR1.
        (
            "log_file",
            cfg.log_file
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                .as_deref()
                .map(path_text)
                .into(),
        ),
        // uvicorn or granian (-k granian): which server the bootstrap runs.
        ("server", opts.server.name().into()),
        (
            "app_trees",
            cfg.watch
                .as_ref()
                .filter(|_| mode == "zygote" && !import_app)
                .map(|w| w.app_trees(cfg.chdir.as_deref()))
                .unwrap_or_default()
                .into(),
        ),
    ];
    debug_assert!(computed.iter().map(|(k, _)| *k).eq(COMPUTED_KEYS));
    for (key, value) in computed {
        object.insert(key.into(), value);
    }
    serde_json::Value::Object(object)
}

/// The resolved value of option `name`, as the bootstrap reads it under the
/// option's key; `None` for an option the table does not mark for the
/// bootstrap. The values are the validated ones of `config.rs`, never the
/// raw text.
fn resolved(name: &str, opts: &UvicornOptions, cfg: &Config) -> Option<serde_json::Value> {
    let file = |p: &Option<PathBuf>| p.as_deref().map(path_text).into();
    Some(match name {
        "app" => opts.app.clone().into(),
        "factory" => opts.factory.into(),
        "keyfile" => file(&opts.keyfile),
        "certfile" => file(&opts.certfile),
        "keep-alive" => opts.keep_alive.into(),
        "limit-concurrency" => opts.limit_concurrency.into(),
        "proxy-headers" => opts.proxy_headers.into(),
        "forwarded-allow-ips" => opts.forwarded_allow_ips.clone().into(),
        "name" => opts.proc_name.clone().into(),
        "root-path" => opts.root_path.clone().into(),
        "lifespan" => opts.lifespan.clone().into(),
        "interface" => opts.interface.clone().into(),
        "http" => opts.http.clone().into(),
        "loop" => opts.event_loop.clone().into(),
        "no-access-log" => opts.access_log.into(),
        "max-requests" => opts.max_requests.into(),
        "max-requests-jitter" => opts.max_requests_jitter.into(),
        "backlog" => cfg.backlog.into(),
        "log-level" => cfg.log_level.uvicorn_name().into(),
        // Worker lines in the master's format (slot and generation come
        // from PROCMAN_WORKER_ID and PROCMAN_GENERATION).
        // "journal" also when stderr was found to be the journal.
        "log-format" => if crate::journal::active() {
            "journal"
        } else {
            cfg.log_format.name()
        }
        .into(),
        _ => return None,
    })
}

fn path_text(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use crate::config::Environment;
    use serde_json::{json, Value};
    use std::collections::BTreeSet;
    use std::time::Duration;

    /// The resolved configuration of `procman [args] APP` (the interpreter
    /// is `sh`: it is only looked up, never run).
    fn config(app: &str, args: &[&str]) -> Config {
        let mut argv = vec!["procman", "--python", "sh"];
        argv.extend_from_slice(args);
        argv.push(app);
        let cli = Cli::try_parse_from(argv.iter().copied()).expect("parses");
        let env = Environment {
            path: std::env::var_os("PATH"),
            ..Environment::default()
        };
        Config::from_cli(&cli, &env).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    fn object(cfg: &Config, mode: Mode) -> serde_json::Map<String, Value> {
        let opts = cfg.uvicorn().expect("uvicorn class");
        match app_config(opts, cfg, mode) {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn marked() -> BTreeSet<&'static str> {
        OPTIONS.iter().filter_map(|o| o.bootstrap).collect()
    }

    #[test]
    fn every_marked_option_reaches_the_bootstrap_with_its_resolved_value() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let (key, cert) = (format!("{dir}/Cargo.toml"), format!("{dir}/README.md"));
        let tls = ["--keyfile", key.as_str(), "--certfile", cert.as_str()];
        // (option, APP, its arguments, the value the bootstrap receives)
        let table: &[(&str, &str, &[&str], Value)] = &[
            ("app", "pkg.mod:make", &[], json!("pkg.mod:make")),
            ("factory", "app:main", &["--factory"], json!(true)),
            // gunicorn's way to name a factory.
            ("factory", "app:make()", &[], json!(true)),
            ("keyfile", "app:main", &tls, json!(&key)),
            ("certfile", "app:main", &tls, json!(&cert)),
            ("keep-alive", "app:main", &["--keep-alive", "7s"], json!(7)),
            (
                "limit-concurrency",
                "app:main",
                &["--limit-concurrency", "9"],
                json!(9),
            ),
            // On by default, as in uvicorn and gunicorn.
            (
                "proxy-headers",
                "app:main",
                &["--no-proxy-headers"],
                json!(false),
            ),
            ("name", "app:main", &["-n", "shop"], json!("shop")),
            (
                "forwarded-allow-ips",
                "app:main",
                &["--forwarded-allow-ips", "10.0.0.1"],
                json!("10.0.0.1"),
            ),
            (
                "root-path",
                "app:main",
                &["--root-path", "/api"],
                json!("/api"),
            ),
            ("lifespan", "app:main", &["--lifespan", "off"], json!("off")),
            (
                "interface",
                "app:main",
                &["--interface", "wsgi"],
                json!("wsgi"),
            ),
            ("http", "app:main", &["--http", "h11"], json!("h11")),
            ("loop", "app:main", &["--loop", "asyncio"], json!("asyncio")),
            (
                "no-access-log",
                "app:main",
                &["--no-access-log"],
                json!(false),
            ),
            (
                "max-requests",
                "app:main",
                &["--max-requests", "100"],
                json!(100),
            ),
            (
                "max-requests-jitter",
                "app:main",
                &["--max-requests-jitter", "10"],
                json!(10),
            ),
            ("backlog", "app:main", &["--backlog", "64"], json!(64)),
            (
                "log-level",
                "app:main",
                &["--log-level", "warn"],
                json!("warning"),
            ),
            (
                "log-format",
                "app:main",
                &["--log-format", "json"],
                json!("json"),
            ),
        ];
        let covered: BTreeSet<&str> = table.iter().map(|row| row.0).collect();
        let marked_names: BTreeSet<&str> = OPTIONS
            .iter()
            .filter(|o| o.bootstrap.is_some())
            .map(|o| o.name)
            .collect();
        assert_eq!(
            covered, marked_names,
            "one row per option marked for the bootstrap"
        );
        let default = object(&config("app:main", &[]), Mode::Worker);
        for (name, app, args, want) in table {
            let key = crate::cli::def(name)
                .and_then(|o| o.bootstrap)
                .expect("marked");
            let got = object(&config(app, args), Mode::Worker);
            assert_eq!(got[key], *want, "--{name} under {key:?}");
            assert_ne!(
                default[key], *want,
                "--{name}: the row must change the value"
            );
        }
    }

    #[test]
    fn an_unset_option_reaches_the_bootstrap_as_its_default_in_the_table() {
        let default = object(&config("app:main", &[]), Mode::Worker);
        let mut with_defaults = 0;
        for o in OPTIONS.iter().filter(|o| o.bootstrap.is_some()) {
            let Some(text) = o.default else { continue };
            let given = object(
                &config("app:main", &[&format!("--{}", o.name), text]),
                Mode::Worker,
            );
            assert_eq!(given, default, "--{} {text}", o.name);
            with_defaults += 1;
        }
        assert!(
            with_defaults >= 7,
            "backlog, keep-alive, lifespan, ... have defaults"
        );
        // Unset options without a default are null (uvicorn's own default).
        for key in ["limit_concurrency", "ssl_keyfile", "log_file"] {
            assert_eq!(default[key], Value::Null, "{key}");
        }
    }

    #[test]
    fn the_object_holds_the_marked_and_the_computed_keys_and_nothing_else() {
        let marked = marked();
        let computed: BTreeSet<&str> = COMPUTED_KEYS.into_iter().collect();
        assert!(
            marked.is_disjoint(&computed),
            "a computed key is also an option's"
        );
        let want: BTreeSet<&str> = marked.union(&computed).copied().collect();
        let cfg = config(
            "app:main",
            &["--graceful-timeout", "10", "--log-file", "w.log"],
        );
        let modes = [
            (Mode::Worker, "worker", true),
            (Mode::Check, "check", true),
            (Mode::Zygote { import_app: true }, "zygote", true),
            (Mode::Zygote { import_app: false }, "zygote", false),
        ];
        for (mode, name, import_app) in modes {
            let got = object(&cfg, mode);
            let keys: BTreeSet<&str> = got.keys().map(String::as_str).collect();
            assert_eq!(keys, want, "{mode:?}");
            assert_eq!(got["mode"], json!(name));
            assert_eq!(got["import_app"], json!(import_app));
            // Computed by the master: the drain is 2 s less than the timeout,
            // and the log file absolute (workers run in --chdir).
            assert_eq!(got["graceful_timeout"], json!(8.0));
            let log = std::path::absolute("w.log").expect("absolute");
            assert_eq!(got["log_file"], json!(log.display().to_string()));
        }
    }

    #[test]
    fn only_the_base_zygote_under_reload_is_told_the_apps_trees() {
        let dir = std::env::current_dir()
            .expect("cwd")
            .canonicalize()
            .expect("resolves");
        let reload = config("app:main", &["--reload"]);
        let got = object(&reload, Mode::Zygote { import_app: false });
        assert_eq!(got["app_trees"], json!([path_text(&dir)]));
        for mode in [Mode::Worker, Mode::Check, Mode::Zygote { import_app: true }] {
            assert_eq!(object(&reload, mode)["app_trees"], json!([]), "{mode:?}");
        }
        let plain = config("app:main", &[]);
        let got = object(&plain, Mode::Zygote { import_app: false });
        assert_eq!(got["app_trees"], json!([]));
    }

    /// The quoted words after `marker` in `text` (`config["x"]`: marker
    /// `config[`).
    fn subscripts(text: &str, marker: &str) -> BTreeSet<String> {
        text.split(marker)
            .skip(1)
            .filter_map(|rest| {
                let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
                rest[1..].split(quote).next().map(str::to_string)
            })
            .collect()
    }

    #[test]
    fn the_bootstrap_requires_exactly_the_keys_it_is_sent_and_has_no_defaults() {
        let sent: BTreeSet<String> = object(&config("app:main", &[]), Mode::Worker)
            .keys()
            .cloned()
            .collect();
        // CONFIG_KEYS = ("a", "b", ...): what the bootstrap requires.
        let required = BOOTSTRAP
            .split_once("CONFIG_KEYS = (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(list, _)| {
                list.split(',')
                    .map(|k| k.trim().trim_matches('"').to_string())
                    .filter(|k| !k.is_empty())
                    .collect::<BTreeSet<String>>()
            })
            .expect("bootstrap.py defines CONFIG_KEYS = (...)");
        assert_eq!(
            required, sent,
            "CONFIG_KEYS in bootstrap.py and the keys sent"
        );
        let read = subscripts(BOOTSTRAP, "config[");
        assert_eq!(
            read, required,
            "the keys bootstrap.py reads and CONFIG_KEYS"
        );
        for default in ["config.get(", "defaults = {"] {
            assert!(!BOOTSTRAP.contains(default), "bootstrap.py: {default}");
        }
    }

    #[test]
    fn a_config_without_a_key_is_refused_in_one_line() {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        assert!(
            python.exists(),
            "the test virtualenv is missing: run scripts/test (it creates .venv)"
        );
        let app = "procman_no_such_module:app";
        let mut sent = object(&config(app, &[]), Mode::Check);
        sent.remove("keep_alive");
        // An inheritable copy of the bootstrap's fd (std's Command closes
        // no descriptor; this one is closed below, after the spawn).
        // SAFETY: dup of a descriptor this process owns; the copy is owned
        // right away.
        let copy = unsafe { libc::dup(bootstrap_fd().expect("memfd")) };
        assert!(copy >= 0, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: `copy` is a new descriptor nothing else owns.
        let copy = unsafe { OwnedFd::from_raw_fd(copy) };
        let mut child = std::process::Command::new(&python)
            .args(bootstrap_args(app))
            .env_clear()
            .env(CONFIG_VAR, Value::Object(sent).to_string())
            .env(FD_VAR, copy.as_raw_fd().to_string())
            .current_dir(std::env::temp_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("runs python");
        drop(copy);
        // It exits at once; a bootstrap that went on would be killed, not
        // waited for (its stderr is a line or two: the pipe cannot fill).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the bootstrap did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut stderr)
            .expect("read stderr");
        assert_eq!(status.code(), Some(3), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("procman: PROCMAN_APP_CONFIG") && lines[0].contains("keep_alive"),
            "{stderr}"
        );
    }

    #[test]
    fn uvicorn_drains_a_little_less_than_the_master_waits() {
        let table = [
            (30_000, 28_000),
            (4_000, 2_000),
            (3_000, 1_500),
            (1_000, 500),
            (0, 0),
        ];
        for (graceful, drain) in table {
            assert_eq!(
                uvicorn_drain(Duration::from_millis(graceful)),
                Duration::from_millis(drain),
                "{graceful} ms"
            );
        }
    }
}
