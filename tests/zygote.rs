//! Performance by default for the uvicorn class: a base zygote (uvicorn
//! imported once, the app imported by each forked worker) and a bound on
//! how many workers boot at once.

mod util;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// The most workers the master had booting at once, from its own events in
/// order: `booting` adds one, `ready` or an exit before ready removes it.
fn most_booting_at_once(h: &Harness) -> usize {
    let mut booting = std::collections::BTreeSet::new();
    let mut most = 0;
    for e in h.events() {
        let Some(pid) = e["worker"].as_i64() else {
            continue;
        };
        match e["event"].as_str() {
            Some("booting") => {
                booting.insert(pid);
            }
            Some(_) => {
                booting.remove(&pid);
            }
            None => {}
        }
        most = most.max(booting.len());
    }
    most
}

/// procman running tests/apps/import_pid.py with 2 workers, all ready.
fn two_import_pid_workers(name: &str) -> Harness {
    let h = uvicorn(name, &apps_dir(), "import_pid:main", &["-w", "2"])
        .json()
        .spawn();
    h.check(
        h.wait_event("all-ready", BOOT, |_| true).is_some(),
        "all ready",
    );
    h
}

#[test]
fn with_two_cpus_no_more_than_two_of_eight_workers_boot_at_once() {
    let h = uvicorn("boot-limit", &fastapi_dir(), "app:main", &["-w", "8"]).json();
    let mut h = h.spawn_with("taskset", &["-c", "0,1", PROCMAN]);
    let all = h.wait_event("all-ready", BOOT, |_| true);
    h.check(all.is_some(), "all 8 ready");
    h.check(h.events_named("booting").len() == 8, "eight workers booted");
    let most = most_booting_at_once(&h);
    h.check(
        most == 2,
        &format!("{most} workers booting at once, want 2"),
    );
    // A reload boots its workers two at a time too.
    h.signal(Signal::SIGHUP);
    let done = h.wait_event("reload-done", BOOT, |e| e["generation"] == 2);
    h.check(done.is_some(), "reload done");
    let most = most_booting_at_once(&h);
    h.check(most == 2, &format!("{most} booting at once in the reload"));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The pids of the workers of `generation` that said they were ready.
fn ready_pids(h: &Harness, generation: u64) -> Vec<i32> {
    h.events_named("ready")
        .iter()
        .filter(|e| e["generation"] == generation)
        .filter_map(|e| Some(e["worker"].as_i64()? as i32))
        .collect()
}

/// The zygote each worker of `generation` was forked from (`None`: a cold
/// start), from the `booting` events.
fn forked_from(h: &Harness, generation: u64) -> Vec<Option<i32>> {
    h.events_named("booting")
        .iter()
        .filter(|e| e["generation"] == generation)
        .map(|e| e["zygote"].as_i64().map(|z| z as i32))
        .collect()
}

/// Asks `/imported` until every pid of `pids` answered; checks that each
/// imported the app itself.
fn check_imported_by_each(h: &Harness, pids: &[i32]) {
    let addr = h.addr();
    let mut seen = std::collections::BTreeMap::new();
    let all = wait_for(BOOT, || {
        let (_, body) = http_get(addr, "/imported").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        seen.insert(v["pid"].as_i64()? as i32, v["imported_in"].as_i64()? as i32);
        pids.iter().all(|p| seen.contains_key(p)).then_some(())
    });
    h.check(all.is_some(), &format!("every worker answered: {seen:?}"));
    for (pid, imported_in) in &seen {
        h.check(
            pid == imported_in,
            &format!("worker {pid} imported the app itself, not {imported_in}"),
        );
    }
}

/// Every worker of generation 1 started cold and imported the app itself;
/// then a clean stop.
fn check_cold_generation_then_stop(mut h: Harness) {
    h.check(
        forked_from(&h, 1).iter().all(Option::is_none),
        "cold starts",
    );
    check_imported_by_each(&h, &ready_pids(&h, 1));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn default_workers_are_forked_from_a_base_zygote_and_import_the_app_themselves() {
    let mut h = two_import_pid_workers("base-zygote");
    let zygotes = zygote_pids(&h);
    h.check(zygotes.len() == 1, "one base zygote");
    let zygote = zygotes[0];
    h.check(
        cmdline(zygote).starts_with("procman: zygote"),
        &format!("the zygote's title: {:?}", cmdline(zygote)),
    );
    h.check(
        stat(zygote).is_some_and(|s| s.ppid == h.pid),
        "the zygote is the master's child",
    );
    let workers = ready_pids(&h, 1);
    h.check(workers.len() == 2, "two workers ready");
    let zygote_exe = std::fs::read_link(format!("/proc/{zygote}/exe")).expect("zygote exe");
    for w in &workers {
        h.check(
            stat(*w).is_some_and(|s| s.ppid == h.pid),
            "a worker is the master's child",
        );
        let exe = std::fs::read_link(format!("/proc/{w}/exe")).expect("worker exe");
        h.check(exe == zygote_exe, "the worker runs the zygote's python");
    }
    let from = forked_from(&h, 1);
    h.check(
        from.len() == 2 && from.iter().all(|z| *z == Some(zygote)),
        &format!("both forked from the base zygote: {from:?}"),
    );
    check_imported_by_each(&h, &workers);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    h.check(!alive(zygote), "the zygote is gone");
}

#[test]
fn no_zygote_gives_cold_workers() {
    let args = ["-w", "2", "--no-zygote"];
    let h = uvicorn("no-zygote", &apps_dir(), "import_pid:main", &args)
        .json()
        .spawn();
    h.check(
        h.wait_event("all-ready", BOOT, |_| true).is_some(),
        "all ready",
    );
    h.check(zygote_pids(&h).is_empty(), "no zygote");
    let titles: Vec<String> = h.children().into_iter().map(cmdline).collect();
    h.check(
        !titles.iter().any(|t| t.starts_with("procman: zygote")),
        &format!("no zygote among the children: {titles:?}"),
    );
    check_cold_generation_then_stop(h);
}

#[test]
fn hup_starts_a_new_base_zygote_for_the_new_generation() {
    let mut h = two_import_pid_workers("base-hup");
    let first = zygote_pids(&h);
    h.check(first.len() == 1, "one zygote");
    h.signal(Signal::SIGHUP);
    let done = h.wait_event("reload-done", BOOT, |e| e["generation"] == 2);
    h.check(done.is_some(), "reload done");
    let zygotes = zygote_pids(&h);
    h.check(
        zygotes.len() == 2 && zygotes[1] != zygotes[0],
        &format!("a new zygote: {zygotes:?}"),
    );
    let second = forked_from(&h, 2);
    h.check(
        second.len() == 2 && second.iter().all(|z| *z == Some(zygotes[1])),
        &format!("generation 2 comes from the new zygote: {second:?}"),
    );
    // The old one exits once its last worker is gone.
    let old = zygotes[0];
    h.expect_event("zygote-exited", BOOT, "the old zygote exited", |e| {
        e["zygote"] == old && e["reason"] == "stopped"
    });
    check_imported_by_each(&h, &ready_pids(&h, 2));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn a_base_zygote_that_cannot_start_means_cold_workers_and_is_logged() {
    let dir = temp_dir("base-broken");
    // An interpreter that refuses zygote mode and runs anything else.
    let wrapper = dir.join("python");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$PROCMAN_APP_CONFIG\" in *'\"mode\":\"zygote\"'*) echo no zygote here >&2; exit 3;; esac\nexec {} \"$@\"\n",
            venv_python().display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let h = Start::new(
        "base-broken",
        &[
            "import_pid:main",
            "--python",
            wrapper.to_str().expect("utf8"),
            "--no-access-log",
            "--log-format",
            "json",
            "-w",
            "2",
        ],
    )
    .args(["--chdir", apps_dir().to_str().expect("utf8")])
    .spawn();
    h.check(
        h.wait_event("all-ready", BOOT, |_| true).is_some(),
        "all ready, cold",
    );
    h.check(
        h.has_event("zygote-cold", |e| e["reason"] == "base-failed"),
        "the fallback is logged",
    );
    check_cold_generation_then_stop(h);
}

/// The standard-library modules tests/apps/runtime_app.py found already
/// imported when its import began, in the one worker of a procman started
/// with `extra`; also asks that worker to be the base zygote's or a cold one.
fn preloaded(name: &str, extra: &[&str]) -> serde_json::Value {
    preloaded_in(name, &apps_dir(), extra)
}

/// `preloaded`, serving runtime_app.py from `dir`.
fn preloaded_in(name: &str, dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut h = one_worker_in(name, dir, "runtime_app:main", extra);
    let forked = forked_from(&h, 1);
    let want_forked = !extra.contains(&"--no-zygote");
    h.check(
        forked.len() == 1 && forked[0].is_some() == want_forked,
        &format!("forked from a zygote: {forked:?}, want {want_forked}"),
    );
    let (status, body) = http_get(h.addr(), "/").unwrap_or_default();
    h.check(status == 200, &format!("the app answered: {status} {body}"));
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    v["preloaded"].clone()
}

#[test]
fn a_forked_worker_finds_pythons_runtime_imported_and_a_cold_worker_does_not() {
    // The base zygote imports the standard library's common modules
    // (RUNTIME_MODULES in the bootstrap) before forking: its workers only
    // import the app and its packages. A cold worker imports them itself,
    // so the probe can tell the two apart.
    let forked = preloaded("runtime-forked", &[]);
    for module in ["decimal", "email.parser", "zoneinfo", "hashlib"] {
        assert_eq!(
            forked[module], true,
            "{module} imported by the base zygote: {forked}"
        );
    }
    let cold = preloaded("runtime-cold", &["--no-zygote"]);
    for module in ["decimal", "email.parser", "zoneinfo", "hashlib"] {
        assert_eq!(
            cold[module], false,
            "{module} not imported before a cold worker's app: {cold}"
        );
    }
}

#[test]
fn a_module_of_the_app_directory_that_shadows_the_standard_library_is_not_preloaded() {
    // The app's directory comes first on sys.path: its decimal.py is what
    // `import decimal` means for this app. The base zygote must neither run
    // it (app code) nor import the standard one in its place.
    let dir = temp_dir("runtime-shadow");
    std::fs::copy(
        apps_dir().join("runtime_app.py"),
        dir.join("runtime_app.py"),
    )
    .expect("copy");
    std::fs::write(
        dir.join("decimal.py"),
        "raise SystemExit('the app directory\\'s decimal.py was imported')\n",
    )
    .expect("decimal.py");
    let seen = preloaded_in("runtime-shadow", &dir, &[]);
    assert_eq!(seen["decimal"], false, "decimal left to the worker: {seen}");
    assert_eq!(seen["email.parser"], true, "the rest preloaded: {seen}");
}
