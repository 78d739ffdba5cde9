//! How a worker is launched: the program, its argv and the environment its
//! class adds. The master adds the protocol variables (sockets, notify,
//! identity) the same way for every class.
//!
//! What the master must decide differently per class (its stop signals,
//! how readiness is known, which exits end procman during boot, whether
//! USR1 is forwarded) is a [`Behaviour`] value, so the master never
//! matches on the class.

pub mod command;
pub mod uvicorn;

use std::path::PathBuf;

use nix::sys::signal::Signal;

use crate::config::{Config, ReadyMode, WorkerKind};

/// What to exec for one worker of the configured class.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub program: PathBuf,
    /// argv, argv[0] included.
    pub argv: Vec<String>,
    /// Variables the class adds.
    pub env: Vec<(String, String)>,
}

/// The launch recipe for the configured worker class.
pub fn launch(cfg: &Config) -> Launch {
    match &cfg.kind {
        WorkerKind::Command { program, argv } => command::launch(program, argv),
        WorkerKind::Uvicorn(opts) => uvicorn::launch(opts, cfg),
    }
}

/// How the master treats workers of the configured class.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    /// Asks a worker to drain (a graceful stop).
    pub stop_signal: Signal,
    /// Asks a worker to exit now (a quick stop).
    pub quick_stop_signal: Signal,
    /// Ready when it says READY=1; otherwise when its exec succeeded and
    /// it stayed alive for --ready-after.
    pub notify_ready: bool,
    /// A ready worker reopens its logs on USR1 (forwarded by the master);
    /// otherwise USR1's default action would terminate it.
    pub reopens_logs_on_usr1: bool,
    /// The app a uvicorn worker imports (named when its import fails).
    pub app: Option<String>,
}

/// An exit during boot that ends procman at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalExit {
    /// The app could not be imported (exit 4 of the bootstrap).
    AppImport,
    /// The worker cannot boot, and retrying will not help (exit 3).
    BootFailed,
}

impl Behaviour {
    /// Whether a worker's exit `code` before it was ever ready ends procman.
    pub fn fatal_boot_exit(&self, code: i32) -> Option<FatalExit> {
        match (self.app.is_some(), code) {
            (true, 4) => Some(FatalExit::AppImport),
            (true, 3) => Some(FatalExit::BootFailed),
            _ => None,
        }
    }
}

/// The behaviour of the configured worker class.
pub fn behaviour(cfg: &Config) -> Behaviour {
    match &cfg.kind {
        // The bootstrap treats QUIT as "exit now", TERM as "drain".
        WorkerKind::Uvicorn(opts) => Behaviour {
            stop_signal: Signal::SIGTERM,
            quick_stop_signal: Signal::SIGQUIT,
            notify_ready: true,
            reopens_logs_on_usr1: true,
            app: Some(opts.app.clone()),
        },
        WorkerKind::Command { .. } => Behaviour {
            stop_signal: cfg.stop_signal,
            quick_stop_signal: cfg.stop_signal,
            notify_ready: cfg.ready == ReadyMode::Notify,
            reopens_logs_on_usr1: false,
            app: None,
        },
    }
}
