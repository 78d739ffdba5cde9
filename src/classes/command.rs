//! The command class: any program that takes its listening sockets by the
//! systemd convention (`LISTEN_FDS`, first socket at fd 3). procman adds
//! nothing of its own beyond the protocol variables every worker gets.

use std::path::Path;

use super::Launch;

/// Runs `argv` through the already-resolved `program`.
pub fn launch(program: &Path, argv: &[String]) -> Launch {
    Launch {
        program: program.to_path_buf(),
        argv: argv.to_vec(),
        env: Vec::new(),
    }
}
