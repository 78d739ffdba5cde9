//! What the workers run ([`WorkerKind`]): the choice between a command and
//! uvicorn workers for an APP (`worker_kind`), the uvicorn workers' options
//! ([`UvicornOptions`], `uvicorn_options`), and the programs they exec, resolved up front like
//! execvp would (`find_program`) or, for the Python interpreter, from the
//! activated virtualenv, procman's own install or PATH (`default_python`).
//! Like the rest of `config`, it only reads (PATH, the file system) and
//! reports a bad value before anything starts.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::values::{parse_duration, validate_app};
use super::{belongs, invalid, Environment};
use crate::cli::{Class, Cli, OPTIONS};
use crate::error::{Error, Result};

/// The worker class names gunicorn command lines use for uvicorn workers.
pub const UVICORN_CLASSES: &[&str] = &[
    "uvicorn.workers.UvicornWorker",
    "uvicorn_worker.UvicornWorker",
    "uvicorn",
];

/// `-k granian`: granian's HTTP server in procman's workers.
pub const GRANIAN_CLASS: &str = "granian";

/// The HTTP server inside a Python worker: both run through the same
/// bootstrap (listeners, import, sd_notify, zygote); only `serve` differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Uvicorn,
    /// `-k granian` (granian's private worker API, its version checked at
    /// boot by the bootstrap).
    Granian,
}

impl Server {
    /// The name the bootstrap reads (its config key `server`) and logs show.
    pub fn name(self) -> &'static str {
        match self {
            Server::Uvicorn => "uvicorn",
            Server::Granian => "granian",
        }
    }
}

/// What the granian class cannot honour: given, each is refused with one
/// line naming the option and the class, never ignored. (Option, why.)
const NOT_WITH_GRANIAN: &[(&str, &str)] = &[
    (
        "limit-concurrency",
        "granian queues requests past its backpressure instead of answering 503",
    ),
    ("keep-alive", "granian has no keep-alive timeout to set"),
    ("http", "granian has its own HTTP implementation"),
];

/// What kind of worker procman runs.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerKind {
    /// `-- COMMAND [ARG]...`: any program taking its sockets at fd 3...
    Command {
        /// The resolved executable (absolute, or relative to `--chdir`).
        program: PathBuf,
        /// argv as given, argv[0] included.
        argv: Vec<String>,
    },
    /// `APP`: a Python app served by uvicorn through the embedded bootstrap.
    Uvicorn(Box<UvicornOptions>),
}

/// Options of the uvicorn worker class (and of `-k granian`, which shares them).
#[derive(Debug, Clone, PartialEq)]
pub struct UvicornOptions {
    /// uvicorn, or granian (`-k granian`).
    pub server: Server,
    /// `module:attribute`.
    pub app: String,
    /// The interpreter that runs the bootstrap.
    pub python: PathBuf,
    /// APP is a factory to call.
    pub factory: bool,
    pub keyfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    /// uvicorn's timeout_keep_alive.
    pub keep_alive: u64,
    /// uvicorn's limit_concurrency.
    pub limit_concurrency: Option<u64>,
    /// Trust X-Forwarded-For/Proto (on unless `--no-proxy-headers`).
    pub proxy_headers: bool,
    /// Who is trusted with them (besides a unix socket's peer).
    pub forwarded_allow_ips: String,
    /// `-n/--name`: the name in process titles.
    pub proc_name: String,
    /// ASGI root_path.
    pub root_path: String,
    /// auto|on|off.
    pub lifespan: String,
    /// auto|asgi3|asgi2|wsgi.
    pub interface: String,
    /// auto|h11|httptools.
    pub http: String,
    /// auto|asyncio|uvloop.
    pub event_loop: String,
    /// uvicorn's access log.
    pub access_log: bool,
    /// Recycle after this many requests (0 = off).
    pub max_requests: u64,
    /// Random extra 0..jitter requests per worker.
    pub max_requests_jitter: u64,
    /// Fork workers from a zygote that imported the app once.
    pub preload: bool,
    /// Without --preload: fork workers from a base zygote that imported
    /// Python and uvicorn but not the app (`--no-zygote` turns it off).
    pub zygote: bool,
}

pub(super) fn worker_kind(
    cli: &Cli,
    env: &Environment,
    chdir: Option<&Path>,
) -> Result<WorkerKind> {
    if let Some(class) = cli.text("worker-class") {
        if !UVICORN_CLASSES.contains(&class) && class != GRANIAN_CLASS {
            return Err(invalid(
                "worker-class",
                class,
                "procman runs uvicorn workers for an APP (uvicorn.workers.UvicornWorker or uvicorn_worker.UvicornWorker), granian workers (granian) or any command after --",
            ));
        }
    }
    match (cli.text("app"), cli.list("command").is_empty()) {
        (Some(app), false) => Err(Error::usage(format!(
            "both an APP ('{app}') and a COMMAND ('{}') were given; use one: APP for uvicorn workers, or -- COMMAND",
            cli.list("command").join(" ")
        ))),
        (None, true) => Err(Error::usage(
            "nothing to run: give an APP (module:attribute, e.g. app:main) or a command after --, e.g. procman -- ./server",
        )),
        (None, false) => {
            let uvicorn_only = OPTIONS
                .iter()
                .find(|o| o.applies_to == Class::Uvicorn && cli.is_set(o.name));
            if let Some(o) = uvicorn_only {
                return Err(belongs(
                    o.name,
                    format!(
                        "'--{}' applies to uvicorn workers (an APP), not to a COMMAND",
                        o.name
                    ),
                ));
            }
            let argv = cli.list("command").to_vec();
            let program = find_program(&argv[0], env.path.as_deref(), chdir).map_err(|why| {
                Error::usage(format!("cannot find COMMAND '{}': {why}", argv[0]))
            })?;
            Ok(WorkerKind::Command { program, argv })
        }
        (Some(app), true) => uvicorn_options(cli, env, chdir, app).map(|u| WorkerKind::Uvicorn(Box::new(u))),
    }
}

fn uvicorn_options(
    cli: &Cli,
    env: &Environment,
    chdir: Option<&Path>,
    app: &str,
) -> Result<UvicornOptions> {
    // `app:create_app()` names a factory to call, as gunicorn reads it.
    let (app, called) = match app.strip_suffix("()") {
        Some(name) => (name, true),
        None => (app, false),
    };
    validate_app(app).map_err(|why| Error::Invalid {
        option: "app",
        msg: if app.contains('(') {
            format!(
                "invalid APP '{app}': a factory is called without arguments (module:create_app() or --factory); read settings from the environment (-e) instead"
            )
        } else {
            format!("invalid APP '{app}': {why}")
        },
    })?;
    let server = match cli.text("worker-class") {
        Some(GRANIAN_CLASS) => Server::Granian,
        _ => Server::Uvicorn,
    };
    if server == Server::Granian {
        if let Some((o, why)) = NOT_WITH_GRANIAN.iter().find(|(o, _)| cli.is_set(o)) {
            return Err(belongs(
                o,
                format!("'--{o}' is not supported by the granian worker class (-k granian): {why}"),
            ));
        }
    }
    let python = match cli.text("python") {
        Some(p) => {
            find_program(p, env.path.as_deref(), None).map_err(|why| invalid("python", p, why))?
        }
        None => default_python(env).map_err(|why| {
            Error::usage(format!(
                "cannot find a Python interpreter for APP '{app}': python3 {why} (use --python PATH or activate a virtualenv)"
            ))
        })?,
    };
    // Workers exec the interpreter after changing to --chdir: a path given
    // relative to where procman started must not change meaning there.
    let python = std::path::absolute(&python).unwrap_or(python);
    let file = |flag: &'static str| -> Result<Option<PathBuf>> {
        match cli.text(flag) {
            None => Ok(None),
            Some(f) => {
                let p = match chdir {
                    Some(d) if Path::new(f).is_relative() => d.join(f),
                    _ => PathBuf::from(f),
                };
                if p.is_file() {
                    Ok(Some(p))
                } else {
                    Err(invalid(flag, f, "no such file"))
                }
            }
        }
    };
    let keyfile = file("keyfile")?;
    let certfile = file("certfile")?;
    if keyfile.is_some() != certfile.is_some() {
        // The error belongs to the one that was given.
        let given = if keyfile.is_some() {
            "keyfile"
        } else {
            "certfile"
        };
        return Err(belongs(
            given,
            "HTTPS needs both '--keyfile' and '--certfile'; only one was given",
        ));
    }
    let choice = |flag: &'static str, allowed: &[&str]| -> Result<String> {
        match cli.value(flag) {
            x if allowed.contains(&x) => Ok(x.to_string()),
            x => Err(invalid(
                flag,
                x,
                format!("expected one of {}", allowed.join(", ")),
            )),
        }
    };
    let count = |flag: &'static str, v: Option<&str>| -> Result<Option<u64>> {
        match v {
            None => Ok(None),
            Some(x) => x
                .parse::<u64>()
                .map(Some)
                .map_err(|_| invalid(flag, x, "expected a whole number, 0 or more")),
        }
    };
    let limit_concurrency = match count("limit-concurrency", cli.text("limit-concurrency"))? {
        Some(0) => {
            return Err(invalid(
                "limit-concurrency",
                "0",
                "must be above 0 (leave it out for no limit)",
            ))
        }
        other => other,
    };
    // On by default, as in uvicorn and gunicorn; --forwarded-allow-ips alone
    // means them too (gunicorn's reading).
    let proxy_headers = !cli.flag("no-proxy-headers");
    if !proxy_headers {
        if let Some(o) = ["proxy-headers", "forwarded-allow-ips"]
            .into_iter()
            .find(|o| cli.is_set(o))
        {
            return Err(belongs(
                o,
                format!("'--{o}' and '--no-proxy-headers' contradict each other; give one"),
            ));
        }
    }
    let keep_alive = {
        let v = cli.value("keep-alive");
        parse_duration(v)
            .map_err(|why| invalid("keep-alive", v, why))?
            .as_secs()
            .max(1)
    };
    Ok(UvicornOptions {
        server,
        app: app.to_string(),
        python,
        factory: cli.flag("factory") || called,
        keyfile,
        certfile,
        keep_alive,
        limit_concurrency,
        proxy_headers,
        forwarded_allow_ips: cli.value("forwarded-allow-ips").to_string(),
        proc_name: cli.text("name").unwrap_or(app).to_string(),
        root_path: cli.value("root-path").to_string(),
        lifespan: choice("lifespan", &["auto", "on", "off"])?,
        interface: choice("interface", &["auto", "asgi3", "asgi2", "wsgi"])?,
        http: choice("http", &["auto", "h11", "httptools"])?,
        event_loop: choice("loop", &["auto", "asyncio", "uvloop"])?,
        access_log: !cli.flag("no-access-log"),
        max_requests: count("max-requests", Some(cli.value("max-requests")))?.unwrap_or(0),
        max_requests_jitter: count(
            "max-requests-jitter",
            Some(cli.value("max-requests-jitter")),
        )?
        .unwrap_or(0),
        preload: cli.flag("preload"),
        zygote: !cli.flag("no-zygote"),
    })
}

/// `-n/--name`, else the APP, else the command's file name.
pub(super) fn display_name(cli: &Cli, kind: &WorkerKind) -> Result<String> {
    Ok(match (cli.text("name"), kind) {
        (Some(n), _) => {
            if n.is_empty() || n.chars().any(char::is_control) {
                return Err(invalid(
                    "name",
                    &n.escape_debug().to_string(),
                    "expected a non-empty name without control characters",
                ));
            }
            n.to_string()
        }
        (None, WorkerKind::Uvicorn(u)) => u.app.clone(),
        (None, WorkerKind::Command { argv, .. }) => argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
            .unwrap_or_default(),
    })
}

/// Resolves a program like execvp would, but up front. A name with a `/`
/// is taken as a path (relative to the workers' `--chdir`, where it will be
/// executed); a bare name is searched on PATH.
pub fn find_program(
    name: &str,
    path_var: Option<&OsStr>,
    chdir: Option<&Path>,
) -> std::result::Result<PathBuf, String> {
    if name.is_empty() {
        return Err("empty program name".into());
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        let on_disk = match chdir {
            Some(d) if p.is_relative() => d.join(&p),
            _ => p.clone(),
        };
        if !on_disk.exists() {
            return Err("no such file".into());
        }
        if !is_executable(&on_disk) {
            return Err("not an executable file".into());
        }
        return Ok(p);
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    path_var
        .as_bytes()
        .split(|&b| b == b':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(OsStr::from_bytes(d)).join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| "not found on PATH".to_string())
}

/// The interpreter for uvicorn workers when `--python` is not given, in
/// this order: `$VIRTUAL_ENV/bin/python` (an activated virtualenv), the
/// `python3` or `python` beside procman's own executable (the environment
/// pip installed procman into: a virtualenv's bin/, or /usr/local/bin of a
/// Python image), else `python3` from `PATH`.
///
/// The path beside procman is used as it is, not resolved: a virtualenv's
/// `bin/python` is a symlink to the base interpreter, and only when run
/// through the link does Python find the virtualenv's `pyvenv.cfg` and its
/// packages. `python3` is tried first because a `python` in a system bin/
/// may still be Python 2.
fn default_python(env: &Environment) -> std::result::Result<PathBuf, String> {
    let from_venv = env
        .virtual_env
        .as_ref()
        .map(|v| Path::new(v).join("bin/python"));
    let beside_procman = env
        .own_dir
        .iter()
        .flat_map(|d| [d.join("python3"), d.join("python")]);
    match from_venv
        .into_iter()
        .chain(beside_procman)
        .find(|p| is_executable(p))
    {
        Some(p) => Ok(p),
        None => find_program("python3", env.path.as_deref(), None),
    }
}

fn is_executable(p: &Path) -> bool {
    p.is_file() && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::super::Config;
    use super::*;

    #[test]
    fn proxy_headers_factory_calls_and_names_as_gunicorn_spells_them() {
        let uvicorn = |args: &[&str]| {
            let mut all = vec!["--python", "sh"];
            all.extend_from_slice(args);
            config(&all).map(|c| c.uvicorn().cloned().expect("uvicorn"))
        };
        let u = uvicorn(&["app:main"]).expect("valid");
        assert!(u.proxy_headers && !u.factory);
        assert_eq!(u.forwarded_allow_ips, "127.0.0.1,::1");
        assert_eq!(u.proc_name, "app:main");
        let u = uvicorn(&["pkg.app:create_app()", "-n", "shop"]).expect("valid");
        assert!(u.factory);
        assert_eq!(
            (u.app.as_str(), u.proc_name.as_str()),
            ("pkg.app:create_app", "shop")
        );
        assert!(
            !uvicorn(&["--no-proxy-headers", "app:main"])
                .expect("valid")
                .proxy_headers
        );
        for (args, want) in [
            (
                &[
                    "--no-proxy-headers",
                    "--forwarded-allow-ips",
                    "*",
                    "app:main",
                ][..],
                "'--forwarded-allow-ips' and '--no-proxy-headers' contradict",
            ),
            (&["app:create_app(1)"][..], "called without arguments"),
            (&["-n", "a\nb", "app:main"][..], "'a\\nb' for '--name'"),
            (&["-n", "", "app:main"][..], "'' for '--name'"),
        ] {
            let err = uvicorn(args).expect_err("refused");
            assert!(err.to_string().contains(want), "{args:?}: {err}");
        }
        let cmd = config(&["--", "/bin/true"]).expect("valid");
        assert_eq!(cmd.name, "true");
    }

    #[test]
    fn uvicorn_class_is_selected_by_app_and_accepts_gunicorn_spelling() {
        let c = config(&[
            "-k",
            "uvicorn.workers.UvicornWorker",
            "app:main",
            "--python",
            "sh",
        ])
        .expect("valid");
        let u = c.uvicorn().expect("uvicorn class");
        assert_eq!(u.app, "app:main");
    }

    #[test]
    fn granian_class_is_selected_by_k_and_refuses_what_it_cannot_honour() {
        let granian = |args: &[&str]| {
            let mut all = vec!["-k", "granian", "--python", "sh"];
            all.extend_from_slice(args);
            all.push("app:main");
            config(&all)
        };
        let c = granian(&[]).expect("valid");
        let u = c.uvicorn().expect("an APP");
        assert_eq!(u.server, Server::Granian);
        assert!(c.describe_workers().starts_with("app:main (granian, "));
        // What granian can do is accepted.
        for ok in [
            &["--root-path", "/api"][..],
            &["--interface", "wsgi"],
            &["--no-proxy-headers"],
            &["--no-access-log"],
            &["--lifespan", "off"],
            &["--loop", "asyncio"],
            &["--preload"],
            &["--max-requests", "100", "--max-requests-jitter", "10"],
        ] {
            granian(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let dir = env!("CARGO_MANIFEST_DIR");
        let cert = format!("{dir}/README.md");
        granian(&["--certfile", &cert, "--keyfile", &cert]).expect("TLS is passed to granian");
        for (args, option) in [
            (&["--limit-concurrency", "9"][..], "limit-concurrency"),
            (&["--keep-alive", "7"], "keep-alive"),
            (&["--http", "h11"], "http"),
        ] {
            let err = granian(args).expect_err("refused").to_string();
            let named = err.contains(&format!("'--{option}'"));
            assert!(
                named && err.contains("-k granian") && err.lines().count() == 1,
                "{args:?}: {err}"
            );
        }
        // The same options are the uvicorn class's.
        let u = config(&["--python", "sh", "--limit-concurrency", "9", "app:main"]).expect("valid");
        assert_eq!(u.uvicorn().expect("an APP").server, Server::Uvicorn);
    }

    #[test]
    fn the_granian_range_of_pyproject_is_the_one_the_bootstrap_accepts() {
        let pyproject = include_str!("../../pyproject.toml");
        let pinned = pyproject
            .lines()
            .find_map(|l| l.strip_prefix("granian = [\"granian"))
            .and_then(|rest| rest.strip_suffix("\"]"))
            .expect("pyproject.toml: granian = [\"granian...\"]");
        let bootstrap = crate::classes::uvicorn::BOOTSTRAP;
        assert!(
            bootstrap.contains(&format!("GRANIAN_RANGE = \"{pinned}\"")),
            "GRANIAN_RANGE in bootstrap.py is not {pinned:?}"
        );
        // The tuples the bootstrap compares with say the same range.
        assert_eq!(pinned, ">=2.8.9,<2.9");
        assert!(bootstrap.contains("GRANIAN_LOWEST, GRANIAN_BELOW = (2, 8, 9), (2, 9)"));
    }

    /// A scratch directory, removed when dropped (also when a test fails).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `dir/name` as an executable file.
    fn executable(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).expect("mkdir");
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[test]
    fn python_is_the_flag_then_virtual_env_then_beside_procman_then_python3() {
        let scratch = Scratch(
            std::env::temp_dir().join(format!("procman-config-python-{}", std::process::id())),
        );
        let root = &scratch.0;
        let flag = executable(&root.join("flag"), "python");
        let venv = root.join("activated");
        let activated = executable(&venv.join("bin"), "python");
        let installed = root.join("installed/bin");
        let beside = executable(&installed, "python");
        let on_path = executable(&root.join("path"), "python3");
        let python = |cli_python: Option<&Path>, env: &Environment| -> PathBuf {
            let mut argv = vec!["procman".to_string(), "app:main".to_string()];
            if let Some(p) = cli_python {
                argv.extend(["--python".to_string(), p.display().to_string()]);
            }
            let cli = Cli::try_parse_from(argv).expect("parses");
            let cfg = Config::from_cli(&cli, env).expect("valid");
            cfg.uvicorn().expect("uvicorn class").python.clone()
        };
        let mut env = Environment {
            path: Some(on_path.parent().expect("dir").as_os_str().to_owned()),
            virtual_env: Some(venv.clone().into_os_string()),
            own_dir: Some(installed.clone()),
            ..Environment::default()
        };
        assert_eq!(python(Some(&flag), &env), flag, "--python wins");
        assert_eq!(python(None, &env), activated, "then $VIRTUAL_ENV");
        env.virtual_env = None;
        assert_eq!(python(None, &env), beside, "then the python beside procman");
        // python3 is preferred beside procman: `python` may be Python 2.
        let beside3 = executable(&installed, "python3");
        assert_eq!(python(None, &env), beside3);
        env.own_dir = Some(root.join("cargo/bin"));
        assert_eq!(python(None, &env), on_path, "then python3 from PATH");
        // A VIRTUAL_ENV without an interpreter is passed over.
        env.virtual_env = Some(root.join("gone").into_os_string());
        env.own_dir = Some(installed);
        assert_eq!(python(None, &env), beside3);
    }
}
