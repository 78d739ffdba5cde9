//! Issue 25, items 6 to 9: what the app is, detected right (an ASGI 3 app
//! whose call is a plain function; `--check-config` refuses what no server
//! can call); one traceback and a last line that says why for a lifespan
//! failure; with `--log-format json` every line is one JSON object; and
//! words that fit procman (no uvicorn line that is false here, no field
//! said twice, an interpreter `--user` cannot run named in one line, the
//! bootstrap's source in no worker's environment or command line).

mod util;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// procman serving `app` from tests/apps with the test venv's Python.
fn serve(name: &str, app: &str, extra: &[&str]) -> Start {
    uvicorn(name, &apps_dir(), app, extra)
}

/// `procman --check-config ... APP` from tests/apps: (code, stdout, stderr).
fn check_config(app: &str, extra: &[&str]) -> (i32, String, String) {
    let python = venv_python();
    let mut args = vec!["--check-config", "--python", python.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    args.push(app);
    run_procman(&args, &[], &apps_dir())
}

// ---- item 6: what the app is ----

#[test]
fn an_app_whose_plain_call_takes_scope_receive_send_is_served_as_asgi3() {
    for app in ["asgi3_sync_call:app", "asgi3_sync_call:function_app"] {
        let (code, out, err) = check_config(app, &[]);
        assert_eq!(code, 0, "{app}: {out}{err}");
        let mut h = serve("asgi3-sync", app, &["-w", "1"]).spawn();
        // A 500 (uvicorn's ASGI 2 guess) never counts as a worker.
        let pids = h.wait_workers(1, BOOT);
        h.check(pids.len() == 1, &format!("{app} answers 200"));
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "{app}");
    }
}

#[test]
fn check_config_refuses_an_app_no_server_can_call_and_says_why() {
    // (APP, extra arguments, what the line must say)
    let table: &[(&str, &[&str], &str)] = &[
        ("not_apps:settings", &[], "is not callable (a dict)"),
        (
            "not_apps:two_arguments",
            &[],
            "two_arguments(scope, receive)",
        ),
        ("not_apps:four_arguments", &[], "four_arguments(a, b, c, d)"),
        (
            "asgi3_sync_call:app",
            &["--interface", "wsgi"],
            "--interface wsgi",
        ),
        (
            "wsgi_app:app",
            &["--interface", "asgi3"],
            "--interface asgi3",
        ),
    ];
    for (app, extra, says) in table {
        let (code, out, err) = check_config(app, extra);
        assert_eq!(code, 4, "{app} {extra:?}: {out}{err}");
        assert!(!out.contains("configuration OK"), "{app}: {out}");
        // The reason, in the line that names the app; no traceback (the
        // import worked: there is none to show).
        assert!(
            err.lines().any(|l| l
                .starts_with(&format!("procman: Failed to load application '{app}': "))
                && l.contains(says)),
            "{app} {extra:?}: {err}"
        );
        assert!(!err.contains("Traceback"), "{app}: {err}");
    }
}

// ---- item 7: one traceback and a last line for a lifespan failure ----

#[test]
fn a_failed_lifespan_startup_with_three_workers_prints_one_traceback_and_says_why() {
    let mut h = serve("lifespan-once", "lifespan_fail:main", &["-w", "3"]).spawn();
    assert_eq!(h.exit_code(BOOT), 3, "{}", h.log_text());
    let log = h.log_text();
    let raised = "raise RuntimeError(\"database unreachable at startup\")";
    h.check(
        log.lines().filter(|l| l.contains(raised)).count() == 1,
        "the traceback is shown once",
    );
    h.check(
        !log.contains("Application startup failed. Exiting."),
        "no uvicorn line per worker",
    );
    let last = log
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    h.check(
        last == "procman: error: workers failed to boot: lifespan startup failed: RuntimeError: database unreachable at startup",
        &format!("the last line names the exception: {last:?}"),
    );
}

// ---- item 8: JSON means JSON ----

/// The log's lines that are not one JSON object.
fn not_json(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.is_object()))
        .map(str::to_string)
        .collect()
}

#[test]
fn with_json_logs_an_apps_own_logger_prints_warnings_and_tracebacks_are_json_lines() {
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            "json_noise:app",
            &["/noise", "/raise"],
            &[
                "Exception on request GET /noise",
                "late handler noise",
                "stderr noise",
                "partial line",
                "warning noise",
                "thread noise",
                "uncaught noise",
                "json_noise imported",
            ],
        ),
        (
            "json_noise_wsgi:app",
            &["/noise"],
            &["[falcon] GET /noise: Unhandled exception"],
        ),
    ];
    for (app, paths, said) in cases {
        let mut h = serve("json-noise", app, &["-w", "1"]).json().spawn();
        h.wait_workers(1, BOOT);
        for path in paths {
            let _ = http_get(h.addr(), path);
        }
        let last = said.last().copied().unwrap_or_default();
        h.check(
            wait_for(BOOT, || {
                let log = h.log_text();
                said.iter().all(|s| log.contains(s)).then_some(())
            })
            .is_some(),
            &format!("{app}: the noise reached the log ({last})"),
        );
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "{app}");
        let log = h.log_text();
        let bad = not_json(&log);
        h.check(
            bad.is_empty(),
            &format!("{app}: lines that are not JSON: {bad:#?}"),
        );
        // The app's loggers' tracebacks are records with a level and
        // `exc`, also through a handler added after the app started.
        for logger in ["noisy.app", "noisy.late"]
            .iter()
            .filter(|_| app.starts_with("json_noise:"))
        {
            h.check(
                log.lines().any(|l| {
                    serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                        v["logger"] == *logger
                            && v["level"] == "ERROR"
                            && v["exc"]
                                .as_str()
                                .is_some_and(|e| e.contains("ZeroDivisionError"))
                    })
                }),
                &format!("{logger}: one ERROR line with exc"),
            );
        }
    }
}

// ---- item 9: words that fit procman ----

#[test]
fn a_wsgi_worker_does_not_say_lifespan_appears_unsupported() {
    let mut h = serve("wsgi-lifespan", "wsgi_app:app", &["-w", "2"]).spawn();
    h.wait_workers(2, BOOT);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    h.check(
        !h.log_text().contains("appears unsupported"),
        "WSGI has no lifespan: nothing to say about it",
    );
}

#[test]
fn a_drain_does_not_tell_to_press_ctrl_c() {
    let mut h = uvicorn("no-ctrl-c", &fastapi_dir(), "app:main", &["-w", "1"]).spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let idle = idle_fd_count(pid);
    let addr = h.addr();
    let slow = std::thread::spawn(move || {
        http_request(addr, "GET", "/slow?s=2", None, Duration::from_secs(30))
    });
    let accepted = wait_for(BOOT, || (open_fds(pid).len() > idle).then_some(()));
    h.check(accepted.is_some(), "the request reached the worker");
    h.signal(Signal::SIGTERM);
    let reply = slow
        .join()
        .expect("thread")
        .expect("slow request completed");
    assert_eq!(reply.0, 200, "{}", reply.1);
    assert_eq!(h.exit_code(BOOT), 0);
    let log = h.log_text();
    h.check(
        log.contains("Waiting for 1 connection to close"),
        "the drain is said",
    );
    h.check(!log.contains("CTRL+C"), "no CTRL+C under procman");
}

/// A directory only root can enter, holding a link to a Python `nobody`
/// could run from elsewhere: through this path it cannot.
fn unreachable_python(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let private = dir.join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let link = private.join("python");
    std::os::unix::fs::symlink(system_venv_python(), &link).expect("symlink");
    link.display().to_string()
}

#[test]
fn an_interpreter_the_user_cannot_execute_is_one_line_naming_it_the_user_and_the_fix() {
    let dir = temp_dir("user-python");
    let python = unreachable_python(dir.as_ref());
    for extra in [&[][..], &["--preload"][..], &["--no-zygote"][..]] {
        let mut args = vec![
            "-b",
            "127.0.0.1:0",
            "-w",
            "2",
            "--user",
            "nobody",
            "--python",
            &python,
            "app:main",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = run_procman(&args, &[], &fastapi_dir());
        assert_eq!(code, 2, "{extra:?}: {out}{err}");
        let all = format!("{out}{err}");
        let lines: Vec<&str> = all.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{extra:?}: one line: {all}");
        let line = lines[0];
        assert!(
            line.contains(&python)
                && line.contains("'nobody'")
                && line.contains("cannot execute")
                && line.contains("--python"),
            "{extra:?}: names the interpreter, the user and the fix: {line}"
        );
    }
}

/// Whether pid's environment or command line holds the bootstrap's source
/// (or the variable that carried it), or it still has the memfd open.
fn holds_bootstrap(pid: i32) -> Option<String> {
    for file in ["environ", "cmdline"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for needle in ["PROCMAN_BOOTSTRAP=", "procman's uvicorn worker bootstrap"] {
            if text.contains(needle) {
                return Some(format!(
                    "/proc/{pid}/{file} holds {needle:?} ({} bytes)",
                    bytes.len()
                ));
            }
        }
    }
    // Nor is the descriptor it came through still open.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy().contains("procman-bootstrap") {
            return Some(format!("{} -> {}", fd.path().display(), target.display()));
        }
    }
    None
}

#[test]
fn the_bootstrap_source_is_in_no_environment_or_command_line() {
    let system = system_venv_python();
    let system = system.to_str().expect("utf8");
    let runs: [(&str, &[&str]); 4] = [
        ("base zygote", &[]),
        ("preload", &["--preload"]),
        ("cold", &["--no-zygote"]),
        ("user", &["--user", "nobody", "--python", system]),
    ];
    for (what, extra) in runs {
        let mut args = vec!["-w", "2"];
        args.extend_from_slice(extra);
        let mut h = uvicorn("no-source", &fastapi_dir(), "app:main", &args)
            .json()
            .spawn();
        let workers = h.wait_workers(2, BOOT);
        let zygotes = zygote_pids(&h);
        if what == "cold" {
            h.check(zygotes.is_empty(), "no zygote");
        } else {
            h.check(!zygotes.is_empty(), &format!("{what}: a zygote"));
        }
        for pid in workers.iter().chain(zygotes.iter()) {
            if let Some(found) = holds_bootstrap(*pid) {
                h.check(false, &format!("{what}: {found}"));
            }
        }
        h.signal(Signal::SIGTERM);
        assert_eq!(h.exit_code(BOOT), 0, "{what}");
    }
}

#[test]
fn a_text_line_does_not_repeat_the_values_its_message_says() {
    // The line of a reload's priority-lowered event says "(nice 0 to 10)";
    // its fields `from` and `to` are for JSON readers.
    let start = Start::new("text-fields", &[]);
    let file = start.dir().join("procman.toml");
    std::fs::write(&file, format!("workers = 1\ncommand = [{:?}]\n", hello())).expect("config");
    let mut h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    h.wait_workers(1, BOOT);
    h.signal(Signal::SIGHUP);
    let said = "so that their replacements boot first";
    h.check(
        h.wait_log(said, BOOT),
        "the reload lowered the outgoing worker",
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    let log = h.log_text();
    let line = log.lines().find(|l| l.contains(said)).unwrap_or_default();
    h.check(
        line.contains("(nice ") && !line.contains("from=") && !line.contains("to="),
        &format!("said once: {line}"),
    );
}
