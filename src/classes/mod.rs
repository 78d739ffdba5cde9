//! How a worker is launched: the program, its argv and the environment its
//! class adds. The master adds the protocol variables (sockets, notify,
//! identity) the same way for every class.

pub mod command;
pub mod uvicorn;

use std::path::PathBuf;

use crate::config::{Config, WorkerKind};

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
