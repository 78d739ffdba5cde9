//! The control socket (`--control-socket PATH`) and its client, the
//! `procman status|reload|scale|stop|upgrade` subcommands.
//!
//! A unix socket, mode 0600, owned by the user procman runs as; a peer of
//! another uid (root excepted) is refused even if the file's mode was
//! widened. The protocol is one JSON object per line each way, one request
//! per connection:
//!
//! * `{"cmd": "status"}` → `{"ok": true, "status": {…}}`
//! * `{"cmd": "reload"}` → once the reload ended: `{"ok": true}` or
//!   `{"ok": false, "error": "…"}`
//! * `{"cmd": "scale", "workers": N}` → `{"ok": true, "workers": N}`
//! * `{"cmd": "stop", "quick": false}` → `{"ok": true}` (the stop has begun)
//! * `{"cmd": "upgrade", "binary": "/usr/bin/procman"}` (`binary` optional)
//!   → from the new image, once it runs: `{"ok": true, "pid": P,
//!   "version": "…", "from": "…", "workers": N}`, or at once
//!   `{"ok": false, "error": "…"}` (the pre-flight's reason; nothing changed)
//!
//! A malformed request is answered `{"ok": false, "error": "…"}`. The
//! master serves it from its loop through [`crate::serve`]; the client is
//! a separate short-lived process and may block, with a timeout.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::serve::Stream;

/// A request to the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    Reload,
    Scale(usize),
    Stop {
        quick: bool,
    },
    /// Re-exec in place (`binary`: an absolute path; else where procman
    /// was started from).
    Upgrade {
        binary: Option<String>,
    },
}

/// Parses one request line.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let cmd = v.get("cmd").and_then(Value::as_str).ok_or("no \"cmd\"")?;
    match cmd {
        "status" => Ok(Request::Status),
        "reload" => Ok(Request::Reload),
        "scale" => {
            let n = v
                .get("workers")
                .and_then(Value::as_u64)
                .ok_or("scale needs \"workers\": a whole number")?;
            if n == 0 || n > 10_000 {
                return Err(format!("workers {n}: must be 1 to 10000"));
            }
            Ok(Request::Scale(n as usize))
        }
        "stop" => Ok(Request::Stop {
            quick: v.get("quick").and_then(Value::as_bool).unwrap_or(false),
        }),
        "upgrade" => match v.get("binary") {
            None | Some(Value::Null) => Ok(Request::Upgrade { binary: None }),
            Some(Value::String(p)) if p.starts_with('/') && p.len() < 4096 => {
                Ok(Request::Upgrade {
                    binary: Some(p.clone()),
                })
            }
            Some(_) => Err("upgrade's \"binary\" must be an absolute path".into()),
        },
        other => Err(format!("unknown cmd {other:?}")),
    }
}

/// One response line.
pub fn line(v: Value) -> Vec<u8> {
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// An error response.
pub fn error(why: &str) -> Vec<u8> {
    line(json!({"ok": false, "error": why}))
}

/// Frames a control connection's bytes: a request once a newline came,
/// refused if the peer is another user (root may always ask).
pub fn frame(bytes: &[u8], stream: &Stream) -> Result<Option<Request>, Vec<u8>> {
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_uid() {
        Some(uid) if uid == me || uid == 0 => {}
        _ => return Err(error("permission denied")),
    }
    parse(&bytes[..end]).map(Some).map_err(|e| error(&e))
}

// ---- the client ----

/// The subcommands, recognised in first position.
pub const SUBCOMMANDS: [&str; 5] = ["status", "reload", "scale", "stop", "upgrade"];

const USAGE: &str = "usage: procman status [--json] | reload | scale N | stop [--quick] | upgrade [BINARY]  (with --control-socket PATH or PROCMAN_CONTROL_SOCKET)";

/// Runs a subcommand (`args` after the program name, the subcommand
/// first). Exit codes: 0 done, 1 the master refused or failed (a reload
/// that failed), 2 usage, 3 no master answered.
pub fn run_client(args: &[String]) -> ExitCode {
    let mut socket = std::env::var("PROCMAN_CONTROL_SOCKET").ok();
    let mut json_out = false;
    let mut quick = false;
    let mut rest = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => json_out = true,
            "--quick" => quick = true,
            "--control-socket" => socket = it.next().cloned(),
            s if s.starts_with("--control-socket=") => {
                socket = Some(s["--control-socket=".len()..].to_string())
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s => rest.push(s.to_string()),
        }
    }
    let usage = |why: &str| {
        eprintln!("procman: error: {why}\n{USAGE}");
        ExitCode::from(2)
    };
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return usage("no control socket: give --control-socket PATH");
    };
    let request = match (args[0].as_str(), rest.as_slice()) {
        ("status", []) => json!({"cmd": "status"}),
        ("reload", []) => json!({"cmd": "reload"}),
        ("stop", []) => json!({"cmd": "stop", "quick": quick}),
        ("upgrade", []) => json!({"cmd": "upgrade"}),
        ("upgrade", [path]) => match std::path::absolute(path) {
            Ok(p) => json!({"cmd": "upgrade", "binary": p.to_string_lossy()}),
            Err(e) => return usage(&format!("upgrade {path}: {e}")),
        },
        ("scale", [n]) => match n.parse::<u64>() {
            Ok(n) if n >= 1 => json!({"cmd": "scale", "workers": n}),
            _ => {
                return usage(&format!(
                    "scale {n}: expected a whole number of workers, 1 or more"
                ))
            }
        },
        (_, extra) => return usage(&format!("unexpected argument(s): {}", extra.join(" "))),
    };
    // A reload waits for its generation to be ready: as long as the
    // startup timeout allows, so no short limit here.
    // An upgrade answers once the new image runs: after its pre-flight
    // (bounded, see upgrade.rs) and the exec.
    let timeout = if args[0] == "reload" {
        Duration::from_secs(3600)
    } else if args[0] == "upgrade" {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    };
    let reply = match ask(&socket, &request, timeout) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "{}procman: error: control socket {socket}: {e}",
                err_prefix()
            );
            return ExitCode::from(3);
        }
    };
    if reply.get("ok").and_then(Value::as_bool) != Some(true) {
        let why = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("refused");
        // The reason may quote a worker (its X_PROCMAN_ERROR).
        eprintln!(
            "{}procman: error: {} failed: {}",
            err_prefix(),
            args[0],
            crate::escape::text(why)
        );
        return ExitCode::from(1);
    }
    match args[0].as_str() {
        "status" => {
            let status = reply.get("status").cloned().unwrap_or(Value::Null);
            if json_out {
                println!("{}", crate::escape::json(status.to_string()));
            } else {
                match serde_json::from_value::<crate::status::Snapshot>(status) {
                    Ok(t) => print!("{}", t.table()),
                    Err(e) => {
                        eprintln!("procman: error: unexpected status: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
        }
        "reload" => println!("reload done: generation {}", reply["generation"]),
        "scale" => println!("workers: {}", reply["workers"]),
        "upgrade" => println!(
            "upgraded: procman {} (was {}), pid {}, {} workers kept",
            reply["version"].as_str().unwrap_or("?"),
            reply["from"].as_str().unwrap_or("?"),
            reply["pid"],
            reply["workers"]
        ),
        _ => println!("stopping"),
    }
    ExitCode::SUCCESS
}

/// `<3>` when stderr is the journal (the client as a unit's ExecReload=),
/// so that journald stores the error at priority err.
fn err_prefix() -> &'static str {
    if crate::journal::stderr_is_journal() {
        "<3>"
    } else {
        ""
    }
}

/// Sends one request and reads one response line.
pub fn ask(socket: &str, request: &Value, timeout: Duration) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&line(request.clone()))?;
    let mut reader = BufReader::new(s);
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse(br#"{"cmd":"scale","workers":3}"#),
            Ok(Request::Scale(3))
        );
        assert_eq!(
            parse(br#"{"cmd":"stop","quick":true}"#),
            Ok(Request::Stop { quick: true })
        );
        assert!(parse(br#"{"cmd":"scale","workers":0}"#).is_err());
        assert!(parse(br#"{"cmd":"fly"}"#)
            .expect_err("unknown")
            .contains("fly"));
        assert!(parse(b"nope").is_err());
    }
}
