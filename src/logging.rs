//! The master's log: one line per event, written synchronously to stderr
//! or to `--log-file` (appended; USR1 reopens it for logrotate).
//!
//! No background writer thread: a thread in the master would make fork
//! unsafe. Lines are short and written whole with one `write(2)`.
//!
//! With `--log-file`, workers get the open file as their stderr (fd 2; their
//! stdout stays the master's), and a uvicorn worker's bootstrap writes its
//! lines in this text format. On USR1 the master reopens the path first,
//! then forwards USR1 (to ready uvicorn workers): the bootstrap reopens the
//! same path onto its fd 2, as the workers' own user (the master never
//! opens it on their behalf). A command worker keeps the fd it was given.
//!
//! The master (root, often) opens the file in a directory the workers'
//! user may be able to write to, so a worker may have put anything at the
//! path by the next USR1. The file is opened relative to a descriptor of
//! its directory taken at start, never following a symlink, and kept only
//! if it is a regular file with one link and, when root runs `--user`
//! workers, owned by root or by that user ([`crate::safefs::Dir`]). At
//! start a refused file ends procman (exit 1, a runtime failure like a
//! held pidfile); at USR1 the old file stays open and one warning says why.
//!
//! Under systemd (stderr is the journal, or `--log-format journal`), the
//! events go to the journal natively instead, with their priority and
//! fields (journal.rs).
//!
//! Text: `[2026-11-27T09:40:00.123456Z] [4242] [INFO] Booting worker 2 with pid 4243`
//! JSON: `{"timestamp":"…","level":"INFO","pid":4242,"message":"…","event":"booting","worker":4243,"slot":2,"generation":1}`
//!
//! What a worker sends (`STATUS=`, an error, a recycle reason) is part of
//! some messages: in text lines every control character is escaped
//! ([`crate::escape::text`]), so a line is always one line and cannot move
//! the operator's terminal; a traceback (the `traceback` field) follows its
//! line, each of its lines marked `  worker PID traceback | `, so none can
//! pass for one of procman's lines. JSON lines are escaped by the encoder
//! (and [`crate::escape::json`] for what it leaves); there the traceback
//! stays part of the message, after a newline.
//!
//! Lifecycle lines carry a stable `event` (listed in the README's JSON log
//! section: booting, ready, exited, boot-failed, stopping, killing,
//! recycling, all-ready, reloading, reload-done, reload-failed, shutdown,
//! the zygote's and a few more) with the worker's pid, slot and generation
//! where there is one: JSON readers (and the tests) match on those, not on
//! the wording.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogFormat, LogLevel};
use crate::error::{os_reason, Error, Result};
use crate::escape;
use crate::identity::Credentials;
use crate::safefs::Dir;

/// `--log-file`: where it is and the open file.
struct LogFile {
    /// As given, for messages.
    path: PathBuf,
    /// Its directory, opened at start.
    dir: Dir,
    /// Its name in `dir`.
    name: OsString,
    /// The owners allowed (root and the workers' user, when root runs
    /// `--user` workers); any owner when `None`.
    owners: Option<(u32, String)>,
    file: File,
}

/// Where log lines go: stderr, or a file that USR1 reopens.
static SINK: Mutex<Option<LogFile>> = Mutex::new(None);

/// Writes to the current sink.
#[derive(Clone, Copy)]
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match SINK.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some(log) => log.file.write_all(buf).map(|_| buf.len()),
                None => std::io::stderr().write_all(buf).map(|_| buf.len()),
            },
            Err(_) => std::io::stderr().write_all(buf).map(|_| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        Sink
    }
}

/// Collects an event's fields: the message, a worker's traceback and the
/// rest.
#[derive(Default)]
struct Fields {
    message: String,
    traceback: Option<String>,
    rest: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.rest
                .push((field.name(), serde_json::Value::String(text)));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else if field.name() == TRACEBACK {
            self.traceback = Some(value.to_string());
        } else {
            self.rest.push((field.name(), value.into()));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.rest.push((field.name(), value.into()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.rest.push((field.name(), value.into()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.rest.push((field.name(), value.into()));
    }
}

/// The field of a worker's traceback (a `&str`): text lines show it after
/// the line, each of its lines marked; JSON lines append it to the message.
pub const TRACEBACK: &str = "traceback";

/// The fields of lifecycle events that the text of their message already
/// says: only JSON lines carry them as fields.
const STRUCTURED: &[&str] = &[
    "event",
    "reason",
    "worker",
    "slot",
    "generation",
    "zygote",
    "quick",
    "workers",
    "address",
    "superseded",
    "process",
    "name",
    "inherited",
    "reuse_port",
];

/// The line format.
struct Line {
    pid: u32,
    json: bool,
    /// Entries to the journal (see journal.rs), not lines.
    journal: bool,
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let level = level_name(event.metadata().level());
        if self.journal {
            // Escaped as in text lines; a traceback's lines follow the
            // message in the same entry.
            let mut message = escape::text(&fields.message).into_owned();
            for tb_line in fields
                .traceback
                .iter()
                .flat_map(|tb| tb.trim_end().split('\n'))
            {
                message.push('\n');
                message.push_str(&escape::text(tb_line.strip_suffix('\r').unwrap_or(tb_line)));
            }
            let entry = crate::journal::Entry {
                level: event.metadata().level(),
                message: &message,
                fields: &fields.rest,
            };
            return match crate::journal::send(&entry) {
                Ok(()) => Ok(()),
                Err(lines) => write!(writer, "{lines}"),
            };
        }
        if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("timestamp".into(), time.into());
            obj.insert("level".into(), level.into());
            obj.insert("pid".into(), self.pid.into());
            let message = match fields.traceback {
                Some(tb) => format!("{}\n{}", fields.message, tb.trim_end()),
                None => fields.message,
            };
            obj.insert("message".into(), message.into());
            for (k, v) in fields.rest {
                obj.insert(k.into(), v);
            }
            let line = escape::json(serde_json::Value::Object(obj).to_string());
            writeln!(writer, "{line}")
        } else {
            let mut line = format!(
                "[{time}] [{}] [{level}] {}",
                self.pid,
                escape::text(&fields.message)
            );
            // Fields that the message does not already say (`event`,
            // `reason` and the rest name what the message says, for JSON
            // readers; so does a value the message holds as a word).
            for (k, v) in fields
                .rest
                .iter()
                .filter(|(k, v)| !STRUCTURED.contains(k) && !says(&fields.message, v))
            {
                let _ = write!(line, " {k}={}", escape::text(&v.to_string()));
            }
            if let Some(tb) = &fields.traceback {
                let owner = fields
                    .rest
                    .iter()
                    .find(|(k, _)| *k == "worker" || *k == "zygote")
                    .map_or(String::from("worker"), |(k, v)| format!("{k} {v}"));
                for tb_line in tb.trim_end().split('\n') {
                    let tb_line = tb_line.strip_suffix('\r').unwrap_or(tb_line);
                    let _ = write!(line, "\n  {owner} traceback | {}", escape::text(tb_line));
                }
            }
            writeln!(writer, "{line}")
        }
    }
}

/// Whether `message` holds `value` as a whole word (not inside a longer
/// one): a field whose value the text already says is not repeated after
/// it in a text line ("… (nice 0 to 10) so that their replacements boot
/// first", not "… boot first from=0 to=10").
fn says(message: &str, value: &serde_json::Value) -> bool {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
    !text.is_empty()
        && message.match_indices(text.as_str()).any(|(at, _)| {
            !word(message[..at].chars().next_back())
                && !word(message[at + text.len()..].chars().next())
        })
}

/// Installs the global logger: level, format, and destination. With a
/// file, `workers` (the `--user` identity) decides whose files are kept
/// when procman runs as root.
pub fn init(
    level: LogLevel,
    format: LogFormat,
    file: Option<&Path>,
    workers: Option<&Credentials>,
) -> Result<()> {
    if let Some(path) = file {
        let log = open_at_start(path, workers).map_err(|why| {
            Error::runtime(format!("cannot open log file {}: {why}", path.display()))
        })?;
        if let Ok(mut sink) = SINK.lock() {
            *sink = Some(log);
        }
    }
    let filter = match level {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    };
    // Under systemd, text goes to the journal natively; JSON stays JSON.
    let journal = format == LogFormat::Journal
        || (format == LogFormat::Text && file.is_none() && crate::journal::stderr_is_journal());
    if journal {
        crate::journal::open();
    }
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(Sink)
        .event_format(Line {
            pid: std::process::id(),
            json: format == LogFormat::Json,
            journal,
        })
        .try_init();
    Ok(())
}

/// Takes the directory's descriptor and opens the file in it.
fn open_at_start(
    path: &Path,
    workers: Option<&Credentials>,
) -> std::result::Result<LogFile, String> {
    let name = path
        .file_name()
        .ok_or("it does not end in a file name")?
        .to_os_string();
    let parent = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = Dir::open(parent)
        .map_err(|e| format!("its directory {}: {}", parent.display(), os_reason(&e)))?;
    let owners = workers
        .filter(|_| nix::unistd::geteuid().is_root())
        .map(|c| (c.uid, c.user_name.clone()));
    let file = open_in(&dir, &name, owners.as_ref())?;
    Ok(LogFile {
        path: path.to_path_buf(),
        dir,
        name,
        owners,
        file,
    })
}

/// Opens the log file `name` in `dir` by the rules of the module notes.
fn open_in(
    dir: &Dir,
    name: &std::ffi::OsStr,
    owners: Option<&(u32, String)>,
) -> std::result::Result<File, String> {
    let (file, meta) = dir.open_append(name).map_err(|e| os_reason(&e))?;
    if let Some((uid, user)) = owners {
        if meta.uid() != 0 && meta.uid() != *uid {
            return Err(format!(
                "it belongs to uid {}, neither root nor the workers' user {user} (uid {uid})",
                meta.uid()
            ));
        }
    }
    Ok(file)
}

/// The open `--log-file`, which workers get as their stderr (fd 2); `None`
/// when logging to stderr (workers then inherit the master's own).
pub fn file_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    let sink = SINK.lock().ok()?;
    sink.as_ref().map(|log| log.file.as_raw_fd())
}

/// USR1: reopen `--log-file` (after logrotate moved it away), by the same
/// rules as at start, in the directory opened then. A refused or failed
/// open keeps the old file; the error says why, naming the path, for the
/// caller to log (the lock is not held then: logging takes it).
pub fn reopen() -> std::result::Result<(), String> {
    let Ok(mut sink) = SINK.lock() else {
        return Ok(());
    };
    let Some(log) = sink.as_mut() else {
        return Ok(());
    };
    match open_in(&log.dir, &log.name, log.owners.as_ref()) {
        Ok(f) => {
            log.file = f;
            Ok(())
        }
        Err(why) => Err(format!(
            "cannot reopen the log file {}: {why}; still writing to the one open before",
            log.path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// What the lines of `log` become in `json` or text format.
    fn formatted(json: bool, log: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(buffer.clone())
            .event_format(Line {
                pid: 42,
                json,
                journal: false,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = buffer.0.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    const HOSTILE: &str = "\u{1b}[2J\r[2026-01-01T00:00:00Z] [1] [INFO] forged\n\u{9b}x";

    fn log_all() {
        // A zygote's warning, a status, and a traceback as logged.
        tracing::warn!("Zygote 7: {HOSTILE}");
        tracing::info!(worker = 9, slot = 0, "Worker 9 (slot 0) status: {HOSTILE}");
        tracing::error!(
            worker = 9,
            slot = 0,
            traceback = format!("Traceback:\n{HOSTILE}").as_str(),
            "Worker 9 (slot 0) failed to boot:"
        );
    }

    #[test]
    fn text_lines_escape_what_workers_sent_and_mark_a_traceback() {
        let text = formatted(false, log_all);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            lines[0].starts_with('[')
                && lines[0].ends_with(
                    "Zygote 7: \\x1b[2J\\r[2026-01-01T00:00:00Z] [1] [INFO] forged\\n\\u{9b}x"
                ),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains("status: \\x1b[2J"), "{}", lines[1]);
        assert!(lines[2].ends_with("failed to boot:"), "{}", lines[2]);
        assert_eq!(lines[3], "  worker 9 traceback | Traceback:");
        assert!(
            lines[4].starts_with("  worker 9 traceback | \\x1b[2J\\r[2026"),
            "{}",
            lines[4]
        );
        assert_eq!(lines[5], "  worker 9 traceback | \\u{9b}x");
    }

    #[test]
    fn json_lines_keep_the_text_exactly_and_escape_it() {
        let json = formatted(true, log_all);
        assert!(json.is_ascii(), "{json:?}");
        let messages: Vec<String> = json
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                v["message"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0], format!("Zygote 7: {HOSTILE}"));
        assert_eq!(
            messages[2],
            format!("Worker 9 (slot 0) failed to boot:\nTraceback:\n{HOSTILE}")
        );
    }

    #[test]
    fn a_value_the_message_says_as_a_word_is_not_said_again() {
        let lowered = "Lowered the CPU priority of 2 outgoing workers (nice 0 to 10) so that their replacements boot first";
        assert!(says(lowered, &json!(0)), "from=0");
        assert!(says(lowered, &json!(10)), "to=10");
        // Not inside a longer word or number.
        assert!(!says(lowered, &json!(1)));
        assert!(!says("every 20.0s", &json!(20)));
        assert!(!says("boot in 0.5s", &json!(5)));
        assert!(says("cannot reach db.internal", &json!("db.internal")));
        assert!(!says("anything", &json!("")));
    }
}
