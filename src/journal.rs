//! The master's log written to the systemd journal natively, when stderr
//! is the journal (`JOURNAL_STREAM` names fd 2's device and inode) or
//! `--log-format journal` asks for it: each event is one journal entry
//! with its priority, its message (a worker's traceback stays part of it,
//! as one multi-line entry) and procman's structured fields as journal
//! fields, so `journalctl -u procman -p err` and `journalctl -u procman
//! EVENT=ready` work.
//!
//! The native protocol (`/run/systemd/journal/socket`, a datagram socket):
//! one datagram per entry, each field `NAME=value\n`, or `NAME\n`, the
//! value's length as a little-endian u64, the value and `\n` for a value
//! that holds a newline. Field names are uppercase letters, digits and
//! `_`, not starting with `_` (those are journald's own) or a digit:
//! procman's `event` is `EVENT`, `reuse_port` `REUSE_PORT`.
//!
//! Bounded, no thread: the socket is non-blocking, and an entry the
//! journal does not take at once (its queue is full, the socket is gone)
//! is written to stderr as a stream line instead, prefixed `<N>` with its
//! priority (journald reads that prefix on the stream systemd gave procman
//! as stderr). The same lines are the fallback when the native socket is
//! missing at start. The message is cut at [`MAX_MESSAGE`] bytes, so a
//! datagram stays far below a socket's default send buffer (systemd's
//! client would pass a larger entry in a sealed memfd; procman's lines
//! never need it).
//!
//! A uvicorn worker's bootstrap is told (`log_format` "journal") and
//! writes its loggers' lines (uvicorn's, procman's, Python's last resort)
//! the same way, with `WORKER` (its pid), `SLOT`, `GENERATION` and
//! `LOGGER`; journald knows it as the sender. What else workers write to
//! their stderr (print(), an app's own handlers, a command worker) is not
//! changed: they inherit the journal stream, whose lines journald
//! attributes to the unit, under procman's pid, at priority 6 (or that of
//! a `<N>` prefix they write).
//!
//! `PROCMAN_JOURNAL_SOCKET` replaces the socket's path: the tests point it
//! at a socket they read.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tracing::Level;

/// journald's native socket.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// The longest MESSAGE sent, in bytes.
pub const MAX_MESSAGE: usize = 48 * 1024;

/// The longest other field value, in bytes.
const MAX_VALUE: usize = 4096;

/// The connected native socket; `None` when the journal could not be
/// reached at start (stream lines then).
static JOURNAL: Mutex<Option<UnixDatagram>> = Mutex::new(None);

/// Whether the master's log goes to the journal (set once, by
/// [`open`]): uvicorn workers are told to write there too.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether the master's log goes to the journal.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Whether fd 2 is the journal stream systemd set up for procman.
pub fn stderr_is_journal() -> bool {
    let st = nix::sys::stat::fstat(2).ok();
    stream_matches(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        st.map(|s| (s.st_dev, s.st_ino)),
    )
}

/// `JOURNAL_STREAM` (`DEVICE:INODE`, decimal) names `stat`.
fn stream_matches(value: Option<&str>, stat: Option<(u64, u64)>) -> bool {
    let (Some(value), Some((dev, ino))) = (value, stat) else {
        return false;
    };
    let mut parts = value.splitn(2, ':');
    let dev_ok = parts.next().and_then(|d| d.parse::<u64>().ok()) == Some(dev);
    let ino_ok = parts.next().and_then(|i| i.parse::<u64>().ok()) == Some(ino);
    dev_ok && ino_ok
}

/// Connects to the native socket (or `PROCMAN_JOURNAL_SOCKET`). Without
/// it, entries become stream lines on stderr.
pub fn open() {
    ACTIVE.store(true, Ordering::Relaxed);
    let path = std::env::var_os("PROCMAN_JOURNAL_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SOCKET));
    let socket = UnixDatagram::unbound().and_then(|s| {
        s.connect(&path)?;
        s.set_nonblocking(true)?;
        Ok(s)
    });
    if let (Ok(socket), Ok(mut slot)) = (socket, JOURNAL.lock()) {
        *slot = Some(socket);
    }
}

/// syslog's priority for a level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `name` as a journal field name, if anything of it is left.
pub fn field_name(name: &str) -> Option<String> {
    let upper: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .collect();
    let upper = upper.trim_start_matches(|c: char| c == '_' || c.is_ascii_digit());
    (!upper.is_empty()).then(|| upper.chars().take(64).collect())
}

/// Appends one field in the native format.
pub fn append(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One entry: `message` (already escaped; lines after the first are a
/// traceback's), its level and the event's fields.
pub struct Entry<'a> {
    pub level: &'a Level,
    pub message: &'a str,
    pub fields: &'a [(&'static str, serde_json::Value)],
}

impl Entry<'_> {
    /// The datagram for the native socket.
    pub fn native(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.message.len() + 256);
        append(
            &mut buf,
            "MESSAGE",
            cut(self.message, MAX_MESSAGE).as_bytes(),
        );
        append(
            &mut buf,
            "PRIORITY",
            priority(self.level).to_string().as_bytes(),
        );
        append(&mut buf, "SYSLOG_IDENTIFIER", b"procman");
        for (k, v) in self.fields {
            let Some(name) = field_name(k) else { continue };
            if matches!(name.as_str(), "MESSAGE" | "PRIORITY" | "SYSLOG_IDENTIFIER") {
                continue;
            }
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            append(&mut buf, &name, cut(&text, MAX_VALUE).as_bytes());
        }
        buf
    }

    /// The stream fallback: each line prefixed with the priority.
    pub fn stream(&self) -> String {
        let p = priority(self.level);
        let mut out = String::new();
        for line in cut(self.message, MAX_MESSAGE).split('\n') {
            out.push_str(&format!("<{p}>{line}\n"));
        }
        out
    }
}

/// Sends `entry` natively; `Err` gives the stream lines to write instead.
pub fn send(entry: &Entry) -> Result<(), String> {
    let sent = match JOURNAL.lock() {
        Ok(guard) => match guard.as_ref() {
            Some(socket) => socket.send(&entry.native()).map(|_| ()),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        },
        Err(_) => Err(io::Error::from(io::ErrorKind::Other)),
    };
    sent.map_err(|_| entry.stream())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_fd_2s_device_and_inode() {
        let st = Some((64769, 1234));
        assert!(stream_matches(Some("64769:1234"), st));
        assert!(!stream_matches(Some("64769:1235"), st));
        assert!(!stream_matches(Some("1:1234"), st));
        assert!(!stream_matches(Some("64769"), st));
        assert!(!stream_matches(Some("x:y"), st));
        assert!(!stream_matches(None, st));
        assert!(!stream_matches(Some("64769:1234"), None));
    }

    #[test]
    fn field_names_are_journal_legal() {
        assert_eq!(field_name("event").as_deref(), Some("EVENT"));
        assert_eq!(field_name("reuse_port").as_deref(), Some("REUSE_PORT"));
        assert_eq!(field_name("a-b.c").as_deref(), Some("A_B_C"));
        assert_eq!(field_name("_x").as_deref(), Some("X"));
        assert_eq!(field_name("9lives").as_deref(), Some("LIVES"));
        assert_eq!(field_name("__"), None);
        assert_eq!(field_name(&"x".repeat(100)).map(|n| n.len()), Some(64));
    }

    #[test]
    fn native_entries_carry_priority_fields_and_multi_line_values_by_length() {
        let fields = vec![
            ("event", serde_json::Value::from("ready")),
            ("worker", serde_json::Value::from(75)),
        ];
        let e = Entry {
            level: &Level::ERROR,
            message: "failed to boot:\nTraceback\nboom",
            fields: &fields,
        };
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&30u64.to_le_bytes());
        want.extend_from_slice(b"failed to boot:\nTraceback\nboom\n");
        want.extend_from_slice(b"PRIORITY=3\nSYSLOG_IDENTIFIER=procman\nEVENT=ready\nWORKER=75\n");
        assert_eq!(e.native(), want);
        assert_eq!(e.stream(), "<3>failed to boot:\n<3>Traceback\n<3>boom\n");
    }

    #[test]
    fn a_huge_message_is_cut() {
        let long = "é".repeat(MAX_MESSAGE);
        let e = Entry {
            level: &Level::INFO,
            message: &long,
            fields: &[],
        };
        assert!(e.native().len() < MAX_MESSAGE + 100);
    }
}
