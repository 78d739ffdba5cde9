//! procman as its users install it: the Python package (pip from the
//! checkout, and the wheel into a virtualenv with no Rust toolchain), the
//! shell completions and the man page.
//!
//! The release wheel is built once per suite run by scripts/test (maturin,
//! into target/wheels), with the wheels of the example's requirements and of
//! maturin downloaded into target/packaging/wheelhouse, so that these tests
//! install offline. A missing or stale wheel fails here with a how-to; it
//! never lets a test pass without having run.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use util::*;

/// Where scripts/test puts the wheel.
const WHEELS: &str = "target/packaging/dist";
/// Where scripts/test puts the wheels to install offline.
const WHEELHOUSE: &str = "target/packaging/wheelhouse";
/// The interpreter a new user makes a virtualenv with.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// A PATH without the Rust toolchain (~/.cargo/bin) and without any
/// virtualenv: what procman finds there is the system's python3, which has
/// neither fastapi nor uvicorn.
const PLAIN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The wheel scripts/test built for this version of procman. Fails (with
/// what to run) when it is missing, or older than the sources it is built
/// from: a test of a stale wheel would test old code.
fn wheel() -> PathBuf {
    let dir = repo().join(WHEELS);
    let prefix = format!("procman-{}-", env!("CARGO_PKG_VERSION"));
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .collect();
    let [wheel] = &found[..] else {
        panic!(
            "expected one procman wheel {prefix}*.whl in {}, found {found:?}: scripts/test builds it \
             (maturin build --release --out {WHEELS})",
            dir.display()
        );
    };
    let built = modified(wheel);
    let mut sources = vec![
        repo().join("Cargo.toml"),
        repo().join("Cargo.lock"),
        repo().join("pyproject.toml"),
    ];
    sources.extend(files_under(&repo().join("src")));
    for source in sources {
        assert!(
            modified(&source) <= built,
            "{} is older than {}: rebuild it with scripts/test",
            wheel.display(),
            source.display()
        );
    }
    wheel.clone()
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn wheelhouse() -> PathBuf {
    let dir = repo().join(WHEELHOUSE);
    assert!(
        dir.join(".complete").exists(),
        "{} is missing: scripts/test downloads the example's requirements and maturin there",
        dir.display()
    );
    dir
}

/// Runs a command to completion; fails the test with its output if it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command with a new user's environment: no virtualenv activated, no
/// Rust toolchain on PATH, pip offline with the local wheelhouse.
fn plain(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("VIRTUAL_ENV")
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env("PATH", PLAIN_PATH)
        .env("PIP_NO_INDEX", "1")
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_FIND_LINKS", wheelhouse());
    cmd
}

/// `python3 -m venv DIR`, as a new user makes one.
fn fresh_venv(dir: &Path) -> PathBuf {
    run(plain(SYSTEM_PYTHON).arg("-m").arg("venv").arg(dir));
    dir.to_path_buf()
}

#[test]
fn installed_from_the_checkout_into_a_virtualenv_it_serves_with_that_virtualenv() {
    // pip builds procman from the checkout with maturin (cargo reuses the
    // release build scripts/test made for the wheel, so this only links).
    wheel();
    let start = Start::new("pip-checkout", &["app:main", "-w", "2"]);
    let venv = fresh_venv(&start.dir().join("v"));
    run(plain(venv.join("bin/pip"))
        .args(["install", "-q", "fastapi", "uvicorn"])
        .arg(repo())
        // cargo, for the build only; the run below has no toolchain.
        .env("PATH", std::env::var_os("PATH").unwrap_or_default()));
    let procman = venv.join("bin/procman");
    assert!(procman.is_file(), "pip installed no {}", procman.display());

    // cd app && ../v/bin/procman app:main -w 2: no --python, no VIRTUAL_ENV,
    // and the python3 on PATH cannot import uvicorn.
    let app = start.dir().join("app");
    std::fs::create_dir(&app).expect("mkdir app");
    std::fs::copy(repo().join("examples/fastapi/app.py"), app.join("app.py"))
        .expect("copy the example app");
    let mut h = start
        .cwd(&app)
        .env_remove("VIRTUAL_ENV")
        .env("PATH", PLAIN_PATH)
        .spawn_with(procman.to_str().expect("utf-8 path"), &[]);
    h.wait_workers(2, Duration::from_secs(60));
    // Serving at all needs the virtualenv (the python3 on PATH has no
    // uvicorn); the log names the interpreter procman chose.
    let python = venv.join("bin/python3").display().to_string();
    h.check(
        h.log_text().contains(&format!("(uvicorn, {python})")),
        &format!("workers run {python}"),
    );
    let (status, body) = http_get(h.addr(), "/").expect("GET /");
    h.check(status == 200 && body.contains("\"pid\""), &body);
    h.signal(nix::sys::signal::Signal::SIGTERM);
    let code = h.exit_code(Duration::from_secs(30));
    h.check(code == 0, &format!("exit code {code}"));
}

#[test]
fn the_wheel_installs_into_a_virtualenv_without_rust_and_runs() {
    let wheel = wheel();
    let dir = temp_dir("wheel");
    let venv = fresh_venv(&dir.join("v"));
    run(plain(venv.join("bin/pip"))
        .args(["install", "-q"])
        .arg(&wheel));
    let procman = venv.join("bin/procman");
    let version = run(plain(&procman).arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("procman {}", env!("CARGO_PKG_VERSION"))
    );
    // The wheel gives access to the completions and the man page too.
    let bash = run(plain(&procman).args(["completions", "bash"]));
    assert!(String::from_utf8_lossy(&bash.stdout).contains("complete -F _procman"));
    let man = run(plain(&procman).arg("man"));
    assert!(String::from_utf8_lossy(&man.stdout).starts_with(".ie \\n(.g"));

    // The package's metadata is Cargo.toml's.
    let metadata = run(plain(venv.join("bin/python")).args([
        "-c",
        "import importlib.metadata as m, json, sys\n\
         md = m.metadata('procman')\n\
         keys = ['Version', 'Summary', 'License', 'Project-URL']\n\
         json.dump({k: md.get_all(k) or [] for k in keys}, sys.stdout)",
    ]));
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).expect("metadata as JSON");
    let field = |name: &str| -> Vec<String> {
        metadata[name]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(field("Version"), [env!("CARGO_PKG_VERSION")], "{metadata}");
    assert_eq!(
        field("Summary"),
        [env!("CARGO_PKG_DESCRIPTION")],
        "{metadata}"
    );
    assert_eq!(field("License"), [env!("CARGO_PKG_LICENSE")], "{metadata}");
    let urls = field("Project-URL");
    for url in [env!("CARGO_PKG_REPOSITORY"), env!("CARGO_PKG_HOMEPAGE")] {
        assert!(
            url.is_empty() || urls.iter().any(|u| u.ends_with(url)),
            "{url} not among {urls:?}"
        );
    }
}

#[test]
fn bash_loads_the_completions() {
    let dir = temp_dir("bash-completions");
    let script = dir.join("procman.bash");
    let out = run(Command::new(PROCMAN).args(["completions", "bash"]));
    std::fs::write(&script, &out.stdout).expect("write script");
    let out = run(Command::new("bash")
        .arg("--norc")
        .arg("-c")
        .arg("source \"$1\" && complete -p procman")
        .arg("bash")
        .arg(&script));
    let registered = String::from_utf8_lossy(&out.stdout);
    assert!(
        registered.contains("-F _procman procman"),
        "complete -p procman: {registered}"
    );
    // The function completes an option of --help.
    let out = run(Command::new("bash")
        .arg("--norc")
        .arg("-c")
        .arg(
            "source \"$1\" && COMP_WORDS=(procman --graceful) COMP_CWORD=1 && \
         _procman procman --graceful procman && echo \"${COMPREPLY[@]}\"",
        )
        .arg("bash")
        .arg(&script));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "--graceful-timeout"
    );
}

#[test]
fn the_man_page_renders() {
    let roff = run(Command::new(PROCMAN).arg("man")).stdout;
    let mut man = Command::new("man")
        .args(["-l", "-"])
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("man (apt-get install man-db)");
    {
        use std::io::Write;
        let mut stdin = man.stdin.take().expect("stdin");
        stdin.write_all(&roff).expect("feed man");
    }
    let out = man.wait_with_output().expect("man");
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    // man justifies and fills: compare with the spacing collapsed.
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "NAME",
        "procman - A pre-fork process manager",
        "--graceful-timeout <SECS>",
        "PROCMAN_WORKERS",
        "procman completions SHELL",
        "procman man",
        "Exit codes: 0 clean stop",
    ] {
        assert!(words.contains(needle), "{needle:?} not in:\n{text}");
    }
}

/// The example unit's `[Service]` settings, with /usr/local/bin/procman
/// replaced by the procman under test, written into `dir` with the socket
/// unit.
fn example_units(dir: &Path) {
    let examples = repo().join("examples/systemd");
    for unit in ["procman.service", "procman.socket"] {
        let text = std::fs::read_to_string(examples.join(unit)).expect("unit");
        std::fs::write(
            dir.join(unit),
            text.replace("/usr/local/bin/procman", PROCMAN),
        )
        .expect("write unit");
    }
}

/// The value of `key=` in the example service unit (continued lines
/// joined).
fn unit_setting(key: &str) -> Option<String> {
    let text =
        std::fs::read_to_string(repo().join("examples/systemd/procman.service")).expect("unit");
    let text = text.replace("\\\n", " ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .map(str::to_string)
}

#[test]
fn the_shipped_unit_reloads_through_procman_reload_and_does_not_restart_a_broken_deploy() {
    // `systemctl reload` runs ExecReload= and fails when it fails: `procman
    // reload` waits for the reload's outcome through the control socket
    // the unit enables, so a reload to a broken app fails the job.
    let start = unit_setting("ExecStart").expect("ExecStart=");
    let reload = unit_setting("ExecReload").expect("ExecReload=");
    let socket = "/run/procman/control.sock";
    assert!(
        start.contains(&format!("--control-socket {socket}")),
        "ExecStart= enables the control socket: {start}"
    );
    assert_eq!(
        reload,
        format!("/usr/local/bin/procman reload --control-socket {socket}")
    );
    // No drop-in: Type=notify-reload (systemd >= 253) is not needed for a
    // reload that waits, and a drop-in resetting ExecReload= broke reloads
    // on older systemd, which ignores the type but applies the reset.
    assert!(
        !repo().join("examples/systemd/procman.service.d").exists(),
        "no drop-in is shipped"
    );
    // Exit 4 (the app cannot be imported) is a broken deploy: restarting
    // every RestartSec= cannot fix it.
    assert_eq!(unit_setting("Restart").as_deref(), Some("on-failure"));
    assert_eq!(
        unit_setting("RestartPreventExitStatus").as_deref(),
        Some("4")
    );
    let dir = temp_dir("units-reload");
    example_units(&dir);
    let (ok, stderr) = systemd_verify(&dir);
    assert!(ok && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn the_shipped_unit_asks_for_a_cpu_cgroup_of_its_own() {
    // Any CPUWeight= makes systemd turn the cpu controller on for the unit
    // (systemd.resource-control(5)); without one, a unit may stay in the
    // root cpu cgroup, where the kernel's autogroups make each worker, a
    // session leader, a scheduling group of its own (README, *Which worker
    // class*). 100 is the default weight: the unit gets no more CPU than
    // any other. The effect itself cannot be shown here: in the
    // real-systemd container the host's cpu hierarchy is read-only, and
    // the workers stay in its root cpu cgroup with or without the line.
    assert_eq!(unit_setting("CPUWeight").as_deref(), Some("100"));
}

/// What `systemd-analyze security` scored the example unit on the last
/// audit (README, systemd section): a change that weakens the hardening
/// fails here; one that strengthens it should lower this number.
const EXPOSURE: f64 = 4.1;

#[test]
fn the_example_unit_keeps_its_systemd_analyze_security_score() {
    let dir = temp_dir("security");
    example_units(&dir);
    let out = run(Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=yes",
            "--no-pager",
            "./procman.service",
        ])
        .current_dir(&dir));
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for procman.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    println!("systemd-analyze security procman.service: {score}");
    assert!(score <= EXPOSURE, "exposure {score} > {EXPOSURE}:\n{text}");
}

/// A free TCP port below 1024 on 127.0.0.1.
fn free_privileged_port() -> Option<u16> {
    (900..1024).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

#[test]
fn the_example_units_capabilities_are_all_procman_needs_with_user_workers() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
    // The unit's CapabilityBoundingSet= and NoNewPrivileges=, applied by
    // setpriv as systemd would: root with only these capabilities.
    let caps = unit_setting("CapabilityBoundingSet").expect("CapabilityBoundingSet=");
    let bounding: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(unit_setting("NoNewPrivileges").as_deref(), Some("yes"));
    let bounding = format!("--bounding-set=-all,{}", bounding.join(","));
    let python = system_venv_python();
    let port = free_privileged_port().expect("a free port below 1024");
    let bind = format!("127.0.0.1:{port}");
    let start = Start::new(
        "unit-caps",
        &[
            "--log-format",
            "json",
            "app:main",
            "-w",
            "2",
            "-u",
            "nobody",
            "--no-access-log",
            "-b",
            &bind,
        ],
    );
    // The test dir is RUNTIME_DIRECTORY (the notify directory goes there):
    // nobody must be able to traverse it, as systemd's RuntimeDirectoryMode.
    let dir = start.dir().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = dir.join("app.py");
    std::fs::copy(repo().join("examples/fastapi/app.py"), &app).expect("copy app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut h = start
        .args(["--python", python.to_str().expect("utf-8")])
        .args(["--chdir", dir.to_str().expect("utf-8")])
        .spawn_with(
            "setpriv",
            &["--no-new-privs", "--inh-caps=-all", &bounding, PROCMAN],
        );
    // Bound below 1024, workers as nobody that reported READY=1 through
    // the notify socket handed to them.
    let pids = h.wait_workers(2, Duration::from_secs(60));
    for pid in &pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        h.check(
            uid.split_whitespace().skip(1).all(|u| u == "65534"),
            &format!("worker {pid}: {uid}"),
        );
    }
    // A rolling reload (systemctl reload) and a stop work too. The reload
    // lowers the outgoing workers' priority: they run as nobody, so that
    // takes CAP_SYS_NICE (which also lets booting workers run raised).
    h.signal(nix::sys::signal::Signal::SIGHUP);
    h.expect_event(
        "priority-lowered",
        Duration::from_secs(60),
        "the outgoing workers lowered",
        |e| e["workers"] == 2,
    );
    h.expect_event(
        "reload-done",
        Duration::from_secs(60),
        "the reload completes",
        |e| e["generation"] == 2,
    );
    h.signal(nix::sys::signal::Signal::SIGTERM);
    let code = h.exit_code(Duration::from_secs(30));
    h.check(code == 0, &format!("exit code {code}"));
    // Every line is JSON (the workers' too), so each has a level.
    let loud: Vec<String> = h
        .log_text()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .map_or(true, |v| v["level"] == "WARNING" || v["level"] == "ERROR")
        })
        .map(str::to_string)
        .collect();
    h.check(
        loud.is_empty(),
        &format!("no warning or error with the unit's capabilities: {loud:?}"),
    );
}
