//! procman's entry point: parse, run, and print the one error (if any)
//! with the exit code it maps to (0 clean, 1 runtime, 2 usage, 3 boot
//! failure, 4 app import failure).

use std::process::ExitCode;

fn main() -> ExitCode {
    match procman::startup::run(std::env::args_os()) {
        Ok(code) => code,
        Err(err) => {
            // One line, whatever the cause's own text looks like.
            let text = err.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            // The cause may quote a worker (an app import error): shown
            // escaped, it cannot drive the terminal.
            eprintln!(
                "procman: error: {}",
                procman::escape::text(&line.join("; "))
            );
            ExitCode::from(err.exit_code())
        }
    }
}
