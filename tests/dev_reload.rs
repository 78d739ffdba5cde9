//! `--reload` (issue 27): real files in a temporary app directory, real
//! edits (in place, by rename, in a new subdirectory, a burst), a real
//! client loop through them. The app is a plain ASGI callable answering
//! its module-level `VERSION` (from the module `VERSION_FROM` names), so a
//! response tells which code served it.

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// The app: `VERSION` answered to every request; lifespan supported.
fn app_source(version_line: &str) -> String {
    format!(
        r#"{version_line}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif m["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    if scope["type"] != "http":
        return
    body = VERSION.encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
"#
    )
}

fn version(v: &str) -> String {
    app_source(&format!("VERSION = {v:?}"))
}

/// A fresh app directory with `app.py` at version `v1`, removed when the
/// test drops it.
fn app_dir(name: &str) -> TempDir {
    let dir = temp_dir(name);
    std::fs::write(dir.join("app.py"), version("v1")).expect("app.py");
    dir
}

/// procman `--reload` serving `app:app` from `dir` with 2 workers, JSON
/// logs. Bytecode is not cached: two versions of the same size written
/// within one second would otherwise be read from a stale `.pyc` (Python
/// compares the source's size and its mtime in whole seconds).
fn start(name: &str, dir: &Path, extra: &[&str]) -> Harness {
    let mut args = vec!["-w", "2", "--reload", "-e", "PYTHONDONTWRITEBYTECODE=1"];
    args.extend_from_slice(extra);
    let h = uvicorn(name, dir, "app:app", &args).json().spawn();
    h.expect_event("all-ready", BOOT, "first generation", |_| true);
    h
}

/// Polls until the app answers `want`.
#[track_caller]
fn expect_served(h: &Harness, want: &str) {
    let addr = h.addr();
    let got = wait_for(BOOT, || match http_get(addr, "/") {
        Ok((200, body)) if body == want => Some(()),
        _ => None,
    });
    h.check(got.is_some(), &format!("never served {want:?}"));
}

/// Writes `path` the way an editor that saves by rename does: a temporary
/// file beside it, then a rename over it.
fn rename_save(path: &Path, content: &str) {
    let tmp = path.with_extension("py.tmp~");
    std::fs::write(&tmp, content).expect("temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

#[test]
fn an_edit_and_a_rename_save_are_served_with_no_failed_request() {
    let dir = app_dir("dev-reload-edit");
    let h = start("dev-reload-edit", &dir, &["--metrics", "127.0.0.1:0"]);
    expect_served(&h, "v1");
    let load = Load::start(h.addr(), 2, 1_000_000, Duration::from_secs(300));
    std::fs::write(dir.join("app.py"), version("v2")).expect("edit");
    expect_served(&h, "v2");
    h.expect_events("reload-done", 1, BOOT, "first reload", |_| true);
    rename_save(&dir.join("app.py"), &version("v3"));
    expect_served(&h, "v3");
    h.expect_events("reload-done", 2, BOOT, "second reload", |_| true);
    std::fs::write(dir.join("app.py"), version("v4")).expect("edit");
    expect_served(&h, "v4");
    h.expect_events("reload-done", 3, BOOT, "third reload", |_| true);
    let report = load.finish();
    h.check(
        report.failures.is_empty() && report.ok > 0,
        &format!("failed requests through 3 saves: {report:?}"),
    );
    // The log names the file that changed.
    let changes = h.events_named("change-detected");
    h.check(changes.len() == 3, "one change-detected per save");
    for c in &changes {
        h.check(
            c["files"].as_str().is_some_and(|f| f.ends_with("/app.py")),
            &format!("the changed file is named: {c}"),
        );
    }
    h.check(h.events_named("reloading").len() == 3, "three reloads");
    // Only sources changed: the base zygote (Python and uvicorn, not the
    // app) of generation 1 forked every generation's workers.
    let zygotes = h.events_named("zygote-starting");
    h.check(
        zygotes.len() == 1,
        &format!("one base zygote for all 4 generations: {zygotes:?}"),
    );
    h.check(
        h.count_events("booting", |b| b["zygote"] == zygotes[0]["zygote"]) == 8,
        "every worker forked from it",
    );
    // The operator's view: the reloads counted, the last one's result.
    let metrics = metrics_addr(&h);
    let (_, body) = http_get(metrics, "/metrics").expect("GET /metrics");
    h.check(
        body.contains("procman_reloads_total{result=\"ok\"} 3"),
        &format!("3 reloads in /metrics:\n{body}"),
    );
}

/// The metrics address procman logged.
fn metrics_addr(h: &Harness) -> std::net::SocketAddr {
    let found = wait_for(BOOT, || {
        h.log_text().lines().find_map(|l| {
            let rest = l.split("Serving metrics at: http://").nth(1)?;
            rest.split("/metrics").next()?.parse().ok()
        })
    });
    h.check(found.is_some(), "a metrics address in the log");
    found.expect("checked")
}

#[test]
fn a_module_in_a_new_subdirectory_is_watched() {
    let dir = app_dir("dev-reload-subdir");
    let h = start("dev-reload-subdir", &dir, &[]);
    expect_served(&h, "v1");
    // The package appears after start, its files written at once (before
    // procman can have added its watch: the new directory is scanned).
    let pkg = dir.join("pkg");
    std::fs::create_dir(&pkg).expect("mkdir");
    std::fs::write(pkg.join("__init__.py"), "").expect("__init__");
    std::fs::write(pkg.join("mod.py"), "VERSION = 's1'\n").expect("mod");
    std::fs::write(
        dir.join("app.py"),
        app_source("from pkg.mod import VERSION"),
    )
    .expect("edit");
    expect_served(&h, "s1");
    // Only the new directory's file changes now.
    std::fs::write(pkg.join("mod.py"), "VERSION = 's2'\n").expect("mod");
    expect_served(&h, "s2");
    // Deleted and created again: still watched.
    std::fs::remove_dir_all(&pkg).expect("rm -r");
    std::fs::create_dir(&pkg).expect("mkdir again");
    std::fs::write(pkg.join("__init__.py"), "").expect("__init__");
    std::fs::write(pkg.join("mod.py"), "VERSION = 's3'\n").expect("mod");
    expect_served(&h, "s3");
    std::fs::write(pkg.join("mod.py"), "VERSION = 's4'\n").expect("mod");
    expect_served(&h, "s4");
}

#[test]
fn a_burst_of_500_writes_is_one_reload() {
    let dir = app_dir("dev-reload-burst");
    let pkg = dir.join("generated");
    std::fs::create_dir(&pkg).expect("mkdir");
    let h = start("dev-reload-burst", &dir, &[]);
    expect_served(&h, "v1");
    for i in 0..500 {
        std::fs::write(pkg.join(format!("m{i}.py")), format!("X = {i}\n")).expect("write");
    }
    std::fs::write(dir.join("app.py"), version("v2")).expect("edit");
    expect_served(&h, "v2");
    h.expect_events("reload-done", 1, BOOT, "the reload", |_| true);
    // Settled: well past the longest a change waits (2 s), nothing more.
    std::thread::sleep(Duration::from_secs(4));
    let changes = h.events_named("change-detected");
    h.check(
        changes.len() == 1 && h.events_named("reloading").len() == 1,
        "exactly one reload for the burst",
    );
    h.check(
        changes[0]["changes"].as_u64().is_some_and(|n| n >= 501),
        &format!("every change counted: {}", changes[0]),
    );
    h.check(
        h.messages()
            .iter()
            .any(|m| m.contains("more; reloading") && m.contains("Changed: ")),
        "the first files named, then a count",
    );
}

#[test]
fn a_broken_edit_keeps_serving_with_one_traceback_and_a_fix_is_served() {
    broken_edits_then_a_fix("dev-reload-broken", &[]);
}

#[test]
fn with_preload_a_broken_edit_keeps_serving_and_a_fix_is_served() {
    broken_edits_then_a_fix("dev-reload-broken-preload", &["--preload"]);
}

#[test]
fn without_a_zygote_a_broken_edit_keeps_serving_and_a_fix_is_served() {
    broken_edits_then_a_fix("dev-reload-broken-cold", &["--no-zygote"]);
}

/// Three broken edits (a syntax error, an exception at import, a failed
/// lifespan startup), each a failed reload with the old code serving and
/// its traceback logged once, then a fix, served; a client loop through it
/// all fails nothing.
fn broken_edits_then_a_fix(name: &str, extra: &[&str]) {
    let dir = app_dir(name);
    let h = start(name, &dir, extra);
    expect_served(&h, "v1");
    let load = Load::start(h.addr(), 2, 1_000_000, Duration::from_secs(300));
    std::fs::write(dir.join("app.py"), "VERSION = 'v2'\ndef broken(:\n").expect("edit");
    h.expect_event("reload-failed", BOOT, "a broken edit", |_| true);
    expect_served(&h, "v1");
    // An exception at import: the next change tries again.
    std::fs::write(
        dir.join("app.py"),
        "raise RuntimeError('no database at import')\n",
    )
    .expect("edit");
    h.expect_events("reload-failed", 2, BOOT, "an exception at import", |_| true);
    expect_served(&h, "v1");
    // A lifespan startup that fails.
    std::fs::write(
        dir.join("app.py"),
        "async def app(scope, receive, send):\n    await receive()\n    await send({'type': 'lifespan.startup.failed', 'message': 'cache unreachable'})\n",
    )
    .expect("edit");
    h.expect_events("reload-failed", 3, BOOT, "a lifespan failure", |_| true);
    expect_served(&h, "v1");
    std::fs::write(dir.join("app.py"), version("v3")).expect("fix");
    expect_served(&h, "v3");
    h.expect_events("reload-done", 1, BOOT, "the fix", |_| true);
    let report = load.finish();
    h.check(
        report.failures.is_empty() && report.ok > 0,
        &format!("failed requests through two broken edits: {report:?}"),
    );
    // One traceback per broken edit, not one per worker: its lines (the
    // source line Python quotes) appear once; the reload's failure says
    // the exception in one line.
    let messages = h.messages();
    let count = |needle: &str| messages.iter().filter(|m| m.contains(needle)).count();
    let syntax = count("def broken(:");
    let raised = count("raise RuntimeError('no database at import')");
    h.check(
        syntax == 1 && raised == 1,
        &format!("one traceback each (SyntaxError {syntax}, RuntimeError {raised})"),
    );
    // The base zygote forked every generation's workers, the failed ones'
    // and the fix's: given back after each failure, not replaced by a new
    // one that would know nothing of the app's third-party modules.
    if extra.is_empty() {
        let zygotes = zygote_pids(&h);
        h.check(
            zygotes.len() == 1,
            &format!("one base zygote through 3 failed reloads and a fix: {zygotes:?}"),
        );
        h.check(
            h.count_events("booting", |b| b["zygote"] == zygotes[0]) == 10,
            "all 10 workers (2 per generation) forked from it",
        );
    }
}

#[test]
fn excluded_files_trigger_nothing() {
    let dir = app_dir("dev-reload-excluded");
    for d in ["__pycache__", ".git", "node_modules", "env"] {
        std::fs::create_dir(dir.join(d)).expect("mkdir");
    }
    // A virtualenv by another name: found by its pyvenv.cfg.
    std::fs::write(dir.join("env/pyvenv.cfg"), "home = /usr\n").expect("pyvenv.cfg");
    let h = start(
        "dev-reload-excluded",
        &dir,
        &["--reload-exclude", "*_draft.py"],
    );
    expect_served(&h, "v1");
    for f in [
        ".app.py.swp",
        "app.py~",
        ".#app.py",
        "4913",
        "README.md",
        "notes_draft.py",
        "__pycache__/app.py",
        ".git/hook.py",
        "node_modules/x.py",
        "env/site.py",
    ] {
        std::fs::write(dir.join(f), "x = 1\n").expect(f);
    }
    // Well past the quiet period: had anything counted, it would have
    // reloaded alone. Then a real change, counted alone.
    std::thread::sleep(Duration::from_secs(3));
    h.check(
        h.events_named("change-detected").is_empty(),
        "excluded files changed nothing",
    );
    std::fs::write(dir.join("app.py"), version("v2")).expect("edit");
    expect_served(&h, "v2");
    let c = h.expect_event("change-detected", BOOT, "the real change", |_| true);
    h.check(
        c["changes"] == 1 && c["files"].as_str().is_some_and(|f| f.ends_with("/app.py")),
        &format!("only app.py counted: {c}"),
    );
}

#[test]
fn an_include_pattern_and_a_reload_dir_are_honoured() {
    let dir = app_dir("dev-reload-include");
    let templates = dir.join("templates");
    std::fs::create_dir(&templates).expect("mkdir");
    let other = temp_dir("dev-reload-include-other");
    // Only `templates` is watched (a --reload-dir replaces the default),
    // for *.html as well as *.py.
    let h = start(
        "dev-reload-include",
        &dir,
        &[
            "--reload-dir",
            templates.to_str().expect("utf8"),
            "--reload-dir",
            other.to_str().expect("utf8"),
            "--reload-include",
            "*.html",
        ],
    );
    expect_served(&h, "v1");
    std::fs::write(dir.join("app.py"), version("v2")).expect("edit");
    std::fs::write(other.join("ignored.txt"), "x").expect("txt");
    std::thread::sleep(Duration::from_secs(3));
    h.check(
        h.events_named("change-detected").is_empty(),
        "app.py is outside the watched directories",
    );
    std::fs::write(templates.join("index.html"), "<p>").expect("html");
    expect_served(&h, "v2");
}

#[test]
fn reload_with_a_command_needs_an_include() {
    let mut h = Start::new("dev-reload-command", &["--reload", "--", "sleep", "1000"]).spawn();
    let code = h.exit_code(Duration::from_secs(20));
    let log = h.log_text();
    h.check(code == 2, &format!("exit 2, got {code}"));
    h.check(
        log.lines().count() == 1 && log.contains("--reload-include"),
        "one line naming --reload-include",
    );
    let mut h = Start::new(
        "dev-reload-orphan",
        &["--reload-exclude", "*.tmp", "--", "sleep", "1000"],
    )
    .spawn();
    let code = h.exit_code(Duration::from_secs(20));
    h.check(
        code == 2 && h.log_text().contains("needs '--reload'"),
        "a --reload-* option without --reload is refused",
    );
}

/// The master's voluntary context switches: each is one sleep in poll(2)
/// that ended, i.e. one wake-up (as arbiter.rs's idle test counts them).
fn wake_ups(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_idle_watching_master_wakes_no_more_than_one_without_reload() {
    // Side by side, over the same two seconds: the same idle master (a
    // command, 2 workers, no heartbeat timeout) with and without --reload.
    // The watch adds a descriptor to poll(2), no timer: with --reload the
    // master wakes no more often than without. Slack of 1, as in
    // arbiter.rs's idle test: a wake-up the kernel or a stray signal causes
    // can land in either window (both are ~0 when all is well; a timer of
    // the watcher's own would add one per period, ~20 at 100 ms).
    let dir = temp_dir("dev-reload-idle");
    let common = ["-t", "0", "--chdir", dir.to_str().expect("utf8"), "-w", "2"];
    let mut watching = Start::new("dev-reload-idle", &common)
        .args(["--reload", "--reload-include", "*.txt", "--", &hello()])
        .json()
        .spawn();
    let mut plain = Start::new("dev-reload-idle-plain", &common)
        .args(["--", &hello()])
        .json()
        .spawn();
    for h in [&mut watching, &mut plain] {
        h.wait_workers(2, BOOT);
        h.expect_event("all-ready", BOOT, "ready", |_| true);
    }
    // Measured once nothing is due for the master without --reload (its
    // one wake-up a second after the first ready is behind it); the one
    // with --reload gets a while to get there too, but its count is what
    // the test compares, so a watcher that never sleeps without a timeout
    // fails on the count, below, not here.
    plain.check(
        wait_for(BOOT, || idle_in_poll(plain.pid).then_some(())).is_some(),
        "without --reload, the master sleeps in poll(2) with no timeout",
    );
    let idle_watching = wait_for(Duration::from_secs(10), || {
        idle_in_poll(watching.pid).then_some(())
    });
    let before = (wake_ups(watching.pid), wake_ups(plain.pid));
    std::thread::sleep(Duration::from_secs(2));
    let after = (wake_ups(watching.pid), wake_ups(plain.pid));
    let (with_reload, without) = (after.0 - before.0, after.1 - before.1);
    eprintln!("idle for 2 s: {with_reload} wake-ups with --reload, {without} without");
    watching.check(
        with_reload <= without + 1,
        &format!(
            "idle for 2 s, the master woke {with_reload} times with --reload, \
             {without} times without"
        ),
    );
    watching.check(
        idle_watching.is_some() || idle_in_poll(watching.pid),
        "with --reload, the master sleeps in poll(2) with no timeout",
    );
    // And the watch is there: a matching file reloads the command.
    std::fs::write(dir.join("routes.txt"), "x").expect("txt");
    let c = watching.expect_event("change-detected", BOOT, "a .txt change", |_| true);
    watching.check(
        c["files"]
            .as_str()
            .is_some_and(|f| f.ends_with("/routes.txt")),
        &format!("the file is named: {c}"),
    );
    watching.expect_event("reload-done", BOOT, "the command reloaded", |_| true);
    plain.check(
        !plain.has_event("change-detected", |_| true),
        "without --reload nothing is watched",
    );
}

#[test]
fn a_hup_during_a_change_triggered_reload_is_a_second_reload() {
    let dir = app_dir("dev-reload-hup");
    // A slow import: the change-triggered reload is still under way when
    // HUP arrives.
    let h = start("dev-reload-hup", &dir, &[]);
    expect_served(&h, "v1");
    std::fs::write(
        dir.join("app.py"),
        format!("import time\ntime.sleep(2)\n{}", version("v2")),
    )
    .expect("edit");
    h.expect_event("reloading", BOOT, "the change's reload", |_| true);
    h.signal(nix::sys::signal::Signal::SIGHUP);
    let s = h.expect_event("reload-superseded", BOOT, "HUP supersedes", |_| true);
    h.check(s["generation"] == 3, &format!("a second reload: {s}"));
    h.expect_event("reload-done", BOOT, "the second reload", |v| {
        v["generation"] == 3
    });
    expect_served(&h, "v2");
    // A HUP starts a new base zygote (a changed virtualenv is picked up).
    h.check(
        h.has_event("zygote-starting", |z| z["generation"] == 3),
        "a HUP's generation has its own base zygote",
    );
}

#[test]
fn out_of_inotify_watches_is_one_line_and_procman_keeps_serving() {
    // A user namespace of its own, whose inotify watch limit (the
    // per-namespace form of fs.inotify.max_user_watches) is 3: the tree has
    // 7 directories.
    let dir = temp_dir("dev-reload-enospc");
    std::fs::create_dir_all(dir.join("a/b/c/d/e/f")).expect("mkdir -p");
    let script = "echo 3 > /proc/sys/user/max_inotify_watches && exec \"$@\"";
    let start = Start::new(
        "dev-reload-enospc",
        &[
            "--reload",
            "--reload-include",
            "*.txt",
            "--chdir",
            dir.to_str().expect("utf8"),
            "-w",
            "1",
            "--",
            &hello(),
        ],
    )
    .json();
    let mut h = start.spawn_with(
        "unshare",
        &[
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            script,
            "sh",
            PROCMAN,
        ],
    );
    h.wait_workers(1, BOOT);
    h.expect_event("all-ready", BOOT, "serving despite the limit", |_| true);
    let said = h.messages();
    let said: Vec<&String> = said
        .iter()
        .filter(|m| m.contains("max_user_watches"))
        .collect();
    h.check(
        said.len() == 1 && said[0].contains("sysctl fs.inotify.max_user_watches="),
        &format!("one line naming the limit and how to raise it: {said:?}"),
    );
    // What could be watched still is: the top directory.
    std::fs::write(dir.join("routes.txt"), "x").expect("txt");
    h.expect_event("reload-done", BOOT, "a change where a watch exists", |_| {
        true
    });
}

/// A module whose import appends this process's pid to `log` (one line).
fn logging_module(log: &Path, body: &str) -> String {
    format!(
        "import os\nwith open({:?}, \"a\") as _f:\n    _f.write(f\"{{os.getpid()}}\\n\")\n{body}\n",
        log.to_str().expect("utf8")
    )
}

/// The pids logged in `log`, one a line.
fn pids_in(log: &Path) -> Vec<i32> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn the_base_zygote_imports_the_third_party_modules_and_never_the_apps_own() {
    let root = temp_dir("dev-reload-third-party");
    let (app, lib) = (root.join("app"), root.join("lib"));
    let needs_setup = root.join("needs_setup.pids");
    let (outside, inside, plugin, helper, aliased) = (
        root.join("outside.pids"),
        root.join("inside.pids"),
        root.join("plugin.pids"),
        root.join("helper.pids"),
        root.join("aliased.pids"),
    );
    std::fs::create_dir_all(app.join("mine")).expect("app dir");
    std::fs::create_dir_all(lib.join("thirdparty")).expect("lib dir");
    // Outside every watched tree, on PYTHONPATH: a third-party package.
    std::fs::write(
        lib.join("thirdparty/__init__.py"),
        logging_module(&outside, "PREFIX = 'tp-'"),
    )
    .expect("thirdparty");
    // Also outside, but it imports one of the app's own modules (a plugin
    // lookup): the zygote must not take it (nor the helper) from there.
    std::fs::write(
        lib.join("plugin.py"),
        logging_module(
            &plugin,
            "try:\n    import mine.helper as helper\nexcept ImportError:\n    helper = None",
        ),
    )
    .expect("plugin");
    // Also outside: a module that registers itself (the log line) and
    // then needs what the app sets up before importing it. Without that
    // (in the zygote) it fails half-way: never half-imported there.
    std::fs::write(
        lib.join("needs_setup.py"),
        logging_module(&needs_setup, "SETTING = os.environ['APP_CONFIGURED']"),
    )
    .expect("needs_setup");
    std::fs::write(app.join("mine/__init__.py"), "").expect("mine");
    std::fs::write(app.join("mine/helper.py"), logging_module(&helper, "")).expect("helper");
    // One of the app's own, imported through a symlink from outside (on
    // PYTHONPATH): still the app's.
    std::fs::create_dir_all(app.join("sub")).expect("sub");
    std::fs::write(app.join("sub/aliased.py"), logging_module(&aliased, "")).expect("aliased");
    std::os::unix::fs::symlink(app.join("sub"), root.join("alias")).expect("symlink");
    let inside_version = |v: &str| {
        logging_module(
            &inside,
            &format!("import thirdparty\nVERSION = thirdparty.PREFIX + {v:?}"),
        )
    };
    std::fs::write(app.join("mine/version.py"), inside_version("v1")).expect("version");
    std::fs::write(
        app.join("app.py"),
        app_source(
            "import os\nos.environ['APP_CONFIGURED'] = '1'\nimport needs_setup, plugin, aliased\nfrom mine.version import VERSION",
        ),
    )
    .expect("app.py");
    let pythonpath = format!(
        "PYTHONPATH={}:{}",
        lib.display(),
        root.join("alias").display()
    );
    let h = start("dev-reload-third-party", &app, &["-e", &pythonpath]);
    expect_served(&h, "tp-v1");
    let zygote = zygote_pids(&h)[0];
    // The zygote learns from its first workers, after their import: wait
    // for its own import of the third-party package.
    let learned = wait_for(BOOT, || pids_in(&outside).contains(&zygote).then_some(()));
    h.check(
        learned.is_some(),
        &format!(
            "the zygote {zygote} imported thirdparty: {:?}",
            pids_in(&outside)
        ),
    );
    // First by the zygote's probe (a child that tries the learned modules
    // and exits), then by the zygote itself.
    let first = pids_in(&outside);
    let workers: Vec<i32> = h.events_named("booting").iter().map(worker_of).collect();
    let probe = first
        .iter()
        .copied()
        .find(|p| *p != zygote && !workers.contains(p))
        .unwrap_or(-1);
    h.check(
        first.len() == 4 && first.contains(&zygote) && probe > 0,
        &format!(
            "thirdparty imported by the 2 cold workers {workers:?}, the probe, the zygote: {first:?}"
        ),
    );
    // Two edits of the app's own module: each is served.
    std::fs::write(app.join("mine/version.py"), inside_version("v2")).expect("edit");
    expect_served(&h, "tp-v2");
    h.expect_events("reload-done", 1, BOOT, "first reload", |_| true);
    std::fs::write(app.join("mine/version.py"), inside_version("v3")).expect("edit");
    expect_served(&h, "tp-v3");
    h.expect_events("reload-done", 2, BOOT, "second reload", |_| true);
    // The third-party package was not imported again by the 4 reloaded
    // workers: they found it in what the zygote holds.
    h.check(
        pids_in(&outside) == first,
        &format!(
            "thirdparty imported only by the first workers and the zygote: {:?}",
            pids_in(&outside)
        ),
    );
    // The app's own modules: imported by every worker (2 per generation),
    // never by the zygote.
    for (log, what) in [
        (&inside, "mine.version"),
        (&helper, "mine.helper"),
        (&aliased, "aliased (through a symlink)"),
    ] {
        let pids = pids_in(log);
        h.check(
            pids.len() == 6 && !pids.contains(&zygote) && !pids.contains(&probe),
            &format!(
                "{what} imported by each of the 6 workers, not the zygote {zygote} nor its probe {probe}: {pids:?}"
            ),
        );
    }
    // The plugin needed one of them: tried by the probe only (which
    // refused what it needed), never by the zygote, so each reloaded
    // worker imports it again.
    let setup_pids = pids_in(&needs_setup);
    h.check(
        setup_pids.len() == 7 && setup_pids.contains(&probe) && !setup_pids.contains(&zygote),
        &format!(
            "needs_setup imported by the 6 workers and (failing) the probe {probe}, not the zygote: {setup_pids:?}"
        ),
    );
    let plugin_pids = pids_in(&plugin);
    h.check(
        plugin_pids.len() == 7 && plugin_pids.contains(&probe) && !plugin_pids.contains(&zygote),
        &format!(
            "plugin imported by the 6 workers and the probe {probe}, not the zygote: {plugin_pids:?}"
        ),
    );
}

#[test]
fn a_third_party_module_starting_a_thread_in_the_zygote_is_said() {
    let root = temp_dir("dev-reload-thread");
    let (app, lib) = (root.join("app"), root.join("lib"));
    std::fs::create_dir_all(&app).expect("app dir");
    std::fs::create_dir_all(&lib).expect("lib dir");
    std::fs::write(
        lib.join("threader.py"),
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
    )
    .expect("threader");
    std::fs::write(
        app.join("app.py"),
        app_source("import threader\nVERSION = 'v1'"),
    )
    .expect("app.py");
    let pythonpath = format!("PYTHONPATH={}", lib.display());
    let h = start("dev-reload-thread", &app, &["-e", &pythonpath]);
    expect_served(&h, "v1");
    let zygote = zygote_pids(&h)[0];
    h.check(
        h.wait_log(
            &format!("zygote {zygote}: importing the app's third-party modules (--reload) started 1 threads"),
            BOOT,
        ),
        "the zygote says the thread its imports started",
    );
}

#[test]
fn a_watched_root_deleted_and_made_again_is_watched_again() {
    let dir = app_dir("dev-reload-root-again");
    let h = start("dev-reload-root-again", &dir, &[]);
    expect_served(&h, "v1");
    // The whole app directory goes (a tool that regenerates it): the
    // workers keep serving v1 (the reload its deletion caused fails).
    std::fs::remove_dir_all(&dir).expect("rm -r");
    h.check(
        h.wait_log("is gone; watching for it to come back", BOOT),
        "the root is awaited",
    );
    expect_served(&h, "v1");
    // Made again, its app already written: served.
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("app.py"), version("v2")).expect("app.py");
    expect_served(&h, "v2");
    h.check(
        h.wait_log("is back; watching it again", BOOT),
        "the root is watched again",
    );
    // And an edit after it is seen.
    std::fs::write(dir.join("app.py"), version("v3")).expect("edit");
    expect_served(&h, "v3");
}

#[test]
fn a_save_while_the_zygote_imports_a_slow_third_party_module_waits_for_it() {
    let root = temp_dir("dev-reload-slow-import");
    let (app, lib, slow) = (root.join("app"), root.join("lib"), root.join("slow.pids"));
    std::fs::create_dir_all(&app).expect("app dir");
    std::fs::create_dir_all(&lib).expect("lib dir");
    // Longer than the 2 s a zygote has to answer a spawn request.
    std::fs::write(
        lib.join("slowlib.py"),
        logging_module(&slow, "import time\ntime.sleep(4)"),
    )
    .expect("slowlib");
    std::fs::write(
        app.join("app.py"),
        app_source("import slowlib\nVERSION = 'v1'"),
    )
    .expect("app.py");
    let pythonpath = format!("PYTHONPATH={}", lib.display());
    let h = start("dev-reload-slow-import", &app, &["-e", &pythonpath]);
    expect_served(&h, "v1");
    let zygote = zygote_pids(&h)[0];
    // Its pid is logged when the zygote's own import begins (after the
    // probe's): it is busy for the next 4 s. A save now.
    let busy = wait_for(BOOT, || pids_in(&slow).contains(&zygote).then_some(()));
    h.check(busy.is_some(), "the zygote imports slowlib");
    std::fs::write(
        app.join("app.py"),
        app_source("import slowlib\nVERSION = 'v2'"),
    )
    .expect("edit");
    expect_served(&h, "v2");
    h.check(
        !h.has_event("zygote-spawn-failed", |_| true),
        "the request waited for the import: the zygote was not given up on",
    );
    h.check(
        zygote_pids(&h) == [zygote],
        "the same zygote forked the new workers",
    );
}
