//! Input from outside taken as what it is: environment bytes that are not
//! UTF-8 reach workers unchanged, command-line values are never split, and
//! every config-file key has a type.

mod util;

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn environment_bytes_that_are_not_utf8_reach_workers_and_pre_start_unchanged() {
    let start = Start::new("env-bytes", &[]);
    let dump = start.dir().join("env.json");
    let pre = start.dir().join("pre-start.bytes");
    let value: &[u8] = b"caf\xe9 \xff\xfe,end";
    let pre_start = format!("printf %s \"$PROCMAN_TEST_BYTES\" > {}", pre.display());
    let mut h = start
        .env_os(b"PROCMAN_TEST_BYTES", value)
        .env_os(b"PROCMAN_TEST_KEY_\xff", b"v")
        .args([
            "--pre-start",
            &pre_start,
            "-e",
            "COMMA=a,b",
            "-e",
            "TWO=x=y,z",
        ])
        .args(["--"])
        .args(notify_worker())
        .args(["--dump-env", dump.to_str().expect("utf8")])
        .spawn();
    h.wait_workers(1, BOOT);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).expect("dump")).expect("json");
    let bytes = &v["environb_hex"];
    h.check(
        bytes[hex(b"PROCMAN_TEST_BYTES")] == hex(value),
        &format!("the worker got the exact bytes: {bytes}"),
    );
    h.check(
        bytes[hex(b"PROCMAN_TEST_KEY_\xff")] == hex(b"v"),
        "a name that is not UTF-8 is passed on too",
    );
    h.check(
        v["COMMA"] == "a,b",
        &format!("-e COMMA=a,b is one variable: {v}"),
    );
    h.check(v["TWO"] == "x=y,z", &format!("-e TWO=x=y,z: {v}"));
    assert_eq!(std::fs::read(&pre).expect("pre-start output"), value);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
}

#[test]
fn only_list_variables_are_split_on_commas_with_an_escape() {
    let dir = temp_dir("commas");
    let print = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--print-config"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let (code, out, err) = run_procman(&all, env, &dir);
        assert_eq!(code, 0, "{args:?} {env:?}: {err}");
        out
    };
    let out = print(&["-e", "KEY=a,b", "-b", "unix:/tmp/procman-a,b.sock"], &[]);
    assert!(out.contains("env = [\"KEY=a,b\"]"), "{out}");
    assert!(
        out.contains("bind = [\"unix:/tmp/procman-a,b.sock\"]"),
        "{out}"
    );
    let out = print(
        &[],
        &[
            ("PROCMAN_ENV", r"A=1\,2,B=x\\y,C=3"),
            ("PROCMAN_BIND", r":9001,unix:/tmp/procman-c\,d.sock"),
        ],
    );
    assert!(
        out.contains(r#"env = ["A=1,2", 'B=x\y', "C=3"]  # environment PROCMAN_ENV"#),
        "{out}"
    );
    assert!(
        out.contains(
            r#"bind = [":9001", "unix:/tmp/procman-c,d.sock"]  # environment PROCMAN_BIND"#
        ),
        "{out}"
    );
    // A backslash before anything else is a mistake, not a character.
    let (code, _, err) = run_procman(&["--", "true"], &[("PROCMAN_ENV", r"A=\x")], &dir);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("PROCMAN_ENV"), "{err}");
}

#[test]
fn a_config_value_of_the_wrong_type_names_the_key_the_line_and_the_type() {
    let dir = temp_dir("typed-keys");
    // (file, what the one line must say after "FILE, line N: ")
    let table: &[(&str, &str)] = &[
        (
            "workers = 2\nbind = 5\n",
            "line 2: 'bind' must be an address or a list of addresses (strings, e.g. [\":8000\"]), not a number",
        ),
        ("bind = [8000]\n", "line 1: 'bind' must be an address or a list of addresses"),
        ("chdir = 5\n", "line 1: 'chdir' must be a string, not a number"),
        ("command = [\"sleep\", 5]\n", "line 1: 'command' must be a list of strings"),
        ("ready = true\n", "line 1: 'ready' must be a string, not a boolean"),
        ("umask = 22\n", "line 1: 'umask' must be an octal mask"),
        ("workers = 1.5\n", "line 1: 'workers' must be a whole number or \"auto\""),
        ("timeout = \"soon\"\n", "line 1: invalid value 'soon' for '--timeout'"),
    ];
    for (i, (text, want)) in table.iter().enumerate() {
        let file = dir.join(format!("t{i}.toml"));
        std::fs::write(&file, text).expect("write");
        let f = file.to_str().expect("utf8");
        let (code, _, err) = run_procman(&["-c", f, "--", "true"], &[], &dir);
        assert_eq!(code, 2, "{text:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{text:?}: {err}");
        assert!(
            err.contains(&format!("{f}, {want}")),
            "{text:?}: want {want:?} in {err}"
        );
    }
    // What looks like a number where a number belongs is taken.
    let file = dir.join("ok.toml");
    std::fs::write(
        &file,
        "workers = 2\ntimeout = 1.5\numask = 0o027\nstop-signal = 15\nenv = { N = 2 }\n",
    )
    .expect("write");
    let (code, out, err) = run_procman(
        &[
            "--print-config",
            "-c",
            file.to_str().expect("utf8"),
            "--",
            "true",
        ],
        &[],
        &dir,
    );
    assert_eq!(code, 0, "{err}");
    for want in [
        "workers = \"2\"",
        "timeout = \"1.5\"",
        "umask = \"0o27\"",
        "stop-signal = \"15\"",
        "env = [\"N=2\"]",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[test]
fn a_value_that_is_not_utf8_is_named_in_the_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = temp_dir("not-utf8");
    let bad = OsStr::from_bytes(b"4\xff");
    let cases: Vec<(Vec<&OsStr>, Option<&str>, &str)> = vec![
        (
            vec![OsStr::new("-w"), bad, OsStr::new("--"), OsStr::new("true")],
            None,
            "argument 2 ('4\u{fffd}') is not valid UTF-8",
        ),
        (
            vec![OsStr::new("--"), OsStr::new("true")],
            Some("PROCMAN_WORKERS"),
            "PROCMAN_WORKERS ('4\u{fffd}') is not valid UTF-8",
        ),
    ];
    for (args, var, want) in cases {
        let mut cmd = Command::new(PROCMAN);
        cmd.args(&args).current_dir(&*dir).stdin(Stdio::null());
        for (k, _) in std::env::vars_os() {
            if k.as_encoded_bytes().starts_with(b"PROCMAN_") {
                cmd.env_remove(k);
            }
        }
        if let Some(var) = var {
            cmd.env(var, bad);
        }
        let out = cmd.output().expect("run procman");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "want {want:?} in {err}");
    }
}
