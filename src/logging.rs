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
use crate::escape;

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
            // readers).
            for (k, v) in fields.rest.iter().filter(|(k, _)| !STRUCTURED.contains(k)) {
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
