//! The master's log: one line per event on stderr, written synchronously.
//!
//! No background writer thread (a thread would make fork unsafe); lines are
//! short and stderr is unbuffered, so a synchronous write costs little.
//! Format: `[2026-11-27T09:40:00.123456Z] [4242] [INFO] Booting worker 2 with pid 4243`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogLevel;

/// gunicorn-like single-line format with the master's pid.
struct Line {
    pid: u32,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "[")?;
        SystemTime.format_time(&mut writer)?;
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        write!(writer, "] [{}] [{level}] ", self.pid)?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global logger. Idempotent enough for tests: a second call
/// is ignored.
pub fn init(level: LogLevel) {
    let filter = match level {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .event_format(Line {
            pid: std::process::id(),
        })
        .try_init();
}

/// USR1: reopen the log file. The log goes to stderr, which procman does
/// not own, so there is nothing to reopen.
pub fn reopen() {}
