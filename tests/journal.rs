//! The master's log in the systemd journal (issue 26, item 1), against a
//! fake journal: a datagram socket this test binds, which procman is
//! pointed at with PROCMAN_JOURNAL_SOCKET, parsed by the native protocol.
//! The real journald is checked by tests/systemd_real.rs.

mod util;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

type Entry = BTreeMap<String, Vec<u8>>;

/// Parses one native-protocol datagram.
fn parse(mut d: &[u8]) -> Entry {
    let mut out = Entry::new();
    while !d.is_empty() {
        let nl = d
            .iter()
            .position(|&b| b == b'\n')
            .expect("a field ends in \\n");
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8(line[..eq].to_vec()).expect("name"),
                line[eq + 1..].to_vec(),
            );
            d = &d[nl + 1..];
        } else {
            let name = String::from_utf8(line.to_vec()).expect("name");
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().expect("8 bytes")) as usize;
            let value = d[nl + 9..nl + 9 + len].to_vec();
            assert_eq!(d[nl + 9 + len], b'\n', "a binary field ends in \\n");
            out.insert(name, value);
            d = &d[nl + 10 + len..];
        }
    }
    out
}

struct FakeJournal {
    sock: UnixDatagram,
    got: Vec<Entry>,
}

impl FakeJournal {
    fn at(path: &Path) -> FakeJournal {
        let sock = UnixDatagram::bind(path).expect("bind fake journal");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        FakeJournal {
            sock,
            got: Vec::new(),
        }
    }

    /// Waits for an entry that `pred` accepts.
    fn wait(&mut self, what: &str, pred: impl Fn(&Entry) -> bool) -> Entry {
        let deadline = Instant::now() + BOOT;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            if let Some(e) = self.got.iter().find(|e| pred(e)) {
                return e.clone();
            }
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got.push(parse(&buf[..n]));
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not in {:?}",
                self.shown()
            );
        }
    }

    fn shown(&self) -> Vec<BTreeMap<&str, String>> {
        self.got
            .iter()
            .map(|e| {
                e.iter()
                    .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).to_string()))
                    .collect()
            })
            .collect()
    }
}

fn field<'a>(e: &'a Entry, k: &str) -> &'a str {
    e.get(k)
        .map_or("", |v| std::str::from_utf8(v).unwrap_or(""))
}

/// A worker that reports a traceback and exits 1 (a failed import).
fn failing_worker(dir: &Path) -> Vec<String> {
    let script = dir.join("failing.py");
    std::fs::write(
        &script,
        r#"import json, os, socket, sys
tb = "Traceback (most recent call last):\n  File \"app.py\", line 1\nRuntimeError: boom"
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(("X_PROCMAN_TRACEBACK=" + json.dumps(tb)).encode(), os.environ["NOTIFY_SOCKET"])
sys.exit(1)
"#,
    )
    .expect("write worker");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    vec![
        python3().display().to_string(),
        script.display().to_string(),
    ]
}

#[test]
fn journal_entries_carry_priority_and_fields_and_a_traceback_is_one_entry() {
    let start = Start::new("journal", &["--log-format", "journal", "-w", "1"]);
    let path = start.dir().join("journal.sock");
    let mut journal = FakeJournal::at(&path);
    let failing = failing_worker(start.dir());
    let mut h = start
        .args(["--"])
        .args(&failing)
        .env("PROCMAN_JOURNAL_SOCKET", path.to_str().expect("utf8"))
        .spawn();
    let booting = journal.wait("a booting entry", |e| field(e, "EVENT") == "booting");
    h.check(
        field(&booting, "PRIORITY") == "6"
            && field(&booting, "SYSLOG_IDENTIFIER") == "procman"
            && field(&booting, "SLOT") == "0"
            && field(&booting, "GENERATION") == "1"
            && field(&booting, "WORKER").parse::<i32>().is_ok()
            && field(&booting, "MESSAGE").starts_with("Booting worker 0 with pid"),
        &format!("booting: {:?}", journal.shown()),
    );
    let tb = journal.wait("the traceback", |e| {
        field(e, "MESSAGE").contains("failed to boot")
    });
    h.check(
        field(&tb, "PRIORITY") == "3"
            && field(&tb, "MESSAGE").ends_with(
                "failed to boot:\nTraceback (most recent call last):\n  File \"app.py\", line 1\nRuntimeError: boom",
            ),
        &format!("the traceback, one error entry: {:?}", journal.shown()),
    );
    h.signal(Signal::SIGTERM);
    h.wait_exit(BOOT);
    h.check(
        !h.log_text().contains("could not load"),
        &format!("nothing on stderr: {}", h.log_text()),
    );
    h.check(
        journal
            .got
            .iter()
            .all(|e| !field(e, "MESSAGE").starts_with('[')),
        "no timestamp or pid in a message: the journal has them",
    );
}

#[test]
fn without_the_journal_socket_lines_go_to_stderr_with_their_priority() {
    let start = Start::new("journal-stream", &["--log-format", "journal", "-w", "1"]);
    let missing = start.dir().join("no-journal.sock");
    let failing = failing_worker(start.dir());
    let mut h = start
        .args(["--"])
        .args(&failing)
        .env("PROCMAN_JOURNAL_SOCKET", missing.to_str().expect("utf8"))
        .spawn();
    h.check(
        h.wait_log("failed to boot", BOOT),
        "the traceback was logged",
    );
    h.signal(Signal::SIGTERM);
    h.wait_exit(BOOT);
    let log = h.log_text();
    h.check(
        log.lines()
            .any(|l| l.starts_with("<6>Booting worker 0 with pid")),
        &format!("info at <6>: {log}"),
    );
    h.check(
        log.lines()
            .any(|l| l.starts_with("<3>") && l.ends_with("failed to boot:"))
            && log.lines().any(|l| l == "<3>RuntimeError: boom"),
        &format!("the error and its traceback at <3>: {log}"),
    );
}

#[test]
fn journal_with_a_log_file_is_refused_in_one_line() {
    let dir = temp_dir("journal-file");
    let out = std::process::Command::new(PROCMAN)
        .args(["--log-format", "journal", "--log-file"])
        .arg(dir.join("log"))
        .args(["--", "true"])
        .output()
        .expect("run procman");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.lines().count() == 1 && err.contains("--log-format journal"),
        "{err}"
    );
}

#[test]
fn a_uvicorn_workers_own_lines_are_journal_entries_attributed_to_it() {
    let start = uvicorn(
        "journal-worker",
        &fastapi_dir(),
        "app:main",
        &["--log-format", "journal", "-w", "1"],
    );
    let path = start.dir().join("journal.sock");
    let mut journal = FakeJournal::at(&path);
    let mut h = start
        .env("PROCMAN_JOURNAL_SOCKET", path.to_str().expect("utf8"))
        .spawn();
    let ready = journal.wait("the worker ready", |e| field(e, "EVENT") == "ready");
    let pid = field(&ready, "WORKER").to_string();
    // uvicorn's own "Application startup complete." from the worker.
    let own = journal.wait("a line of the worker's own", |e| {
        field(e, "WORKER") == pid && field(e, "LOGGER").starts_with("uvicorn")
    });
    h.check(
        field(&own, "PRIORITY") == "6"
            && field(&own, "SLOT") == "0"
            && field(&own, "GENERATION") == "1"
            && field(&own, "SYSLOG_IDENTIFIER") == "procman"
            && !field(&own, "MESSAGE").starts_with('['),
        &format!("the worker's line: {:?}", journal.shown()),
    );
    h.signal(Signal::SIGTERM);
    h.wait_exit(BOOT);
}
