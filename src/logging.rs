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
//! same path onto its fd 2. A command worker keeps the fd it was given.
//!
//! Text: `[2026-11-27T09:40:00.123456Z] [4242] [INFO] Booting worker 2 with pid 4243`
//! JSON: `{"timestamp":"…","level":"INFO","pid":4242,"message":"…","event":"booting","worker":4243,"slot":2,"generation":1}`
//!
//! Lifecycle lines carry a stable `event` (listed in the README's JSON log
//! section: booting, ready, exited, boot-failed, stopping, killing,
//! recycling, all-ready, reloading, reload-done, reload-failed, shutdown,
//! the zygote's and a few more) with the worker's pid, slot and generation
//! where there is one: JSON readers (and the tests) match on those, not on
//! the wording.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::Write;
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

/// Where log lines go: stderr, or a file that USR1 reopens.
static SINK: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

/// Writes to the current sink.
#[derive(Clone, Copy)]
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match SINK.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some((_, file)) => file.write_all(buf).map(|_| buf.len()),
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

/// Collects an event's fields: the message and the rest.
#[derive(Default)]
struct Fields {
    message: String,
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
        if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("timestamp".into(), time.into());
            obj.insert("level".into(), level.into());
            obj.insert("pid".into(), self.pid.into());
            obj.insert("message".into(), fields.message.into());
            for (k, v) in fields.rest {
                obj.insert(k.into(), v);
            }
            let line = serde_json::Value::Object(obj).to_string();
            writeln!(writer, "{line}")
        } else {
            let mut line = format!("[{time}] [{}] [{level}] {}", self.pid, fields.message);
            // Fields that the message does not already say (`event`,
            // `reason` and the rest name what the message says, for JSON
            // readers; so does a value the message holds as a word).
            for (k, v) in fields
                .rest
                .iter()
                .filter(|(k, v)| !STRUCTURED.contains(k) && !says(&fields.message, v))
            {
                let _ = write!(line, " {k}={v}");
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

/// Installs the global logger: level, format, and destination.
pub fn init(level: LogLevel, format: LogFormat, file: Option<&Path>) -> Result<()> {
    if let Some(path) = file {
        let f = open(path)?;
        if let Ok(mut sink) = SINK.lock() {
            *sink = Some((path.to_path_buf(), f));
        }
    }
    let filter = match level {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(Sink)
        .event_format(Line {
            pid: std::process::id(),
            json: format == LogFormat::Json,
        })
        .try_init();
    Ok(())
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            Error::runtime(format!(
                "cannot open log file {}: {}",
                path.display(),
                os_reason(&e)
            ))
        })
}

/// The open `--log-file`, which workers get as their stderr (fd 2); `None`
/// when logging to stderr (workers then inherit the master's own).
pub fn file_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    let sink = SINK.lock().ok()?;
    sink.as_ref().map(|(_, file)| file.as_raw_fd())
}

/// USR1: reopen `--log-file` (after logrotate moved it away). A failure
/// keeps the old file and is reported in it.
pub fn reopen() {
    let Ok(mut sink) = SINK.lock() else { return };
    let Some((path, file)) = sink.as_mut() else {
        return;
    };
    match open(path) {
        Ok(f) => *file = f,
        Err(e) => {
            let _ = writeln!(file, "procman: cannot reopen the log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::says;
    use serde_json::json;

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
