//! The one error type that reaches `main`, and the exit code each kind maps to.
//!
//! Every failure procman reports ends up here as a sentence that already
//! names the value and the problem; `main` prints it once, prefixed with
//! `procman: error:`, and exits with [`Error::exit_code`]. The codes are the
//! contract of DESIGN.md §5.

use std::fmt;

/// A failure that ends procman, with the exit code it implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bad command line, environment or config file: exit 2.
    Usage(String),
    /// A usage error that belongs to one option (a bad value, an option
    /// that does not apply or needs another): exit 2. It names the option
    /// (its long name), so that `layers.rs` can add where the value came
    /// from without reading the message.
    Invalid {
        /// The option's long name.
        option: &'static str,
        /// The whole message.
        msg: String,
    },
    /// A runtime failure (cannot bind, pidfile held, pre-start failed): exit 1.
    Runtime(String),
    /// Workers failed to boot: exit 3.
    BootFailed(String),
    /// The app could not be imported: exit 4.
    AppImport(String),
}

impl Error {
    /// The process exit status for this error (DESIGN.md §5).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Runtime(_) => 1,
            Error::Usage(_) | Error::Invalid { .. } => 2,
            Error::BootFailed(_) => 3,
            Error::AppImport(_) => 4,
        }
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    pub fn runtime(msg: impl Into<String>) -> Self {
        Error::Runtime(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m)
            | Error::Invalid { msg: m, .. }
            | Error::Runtime(m)
            | Error::BootFailed(m)
            | Error::AppImport(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Renders an OS error the way people read them: "Permission denied", not
/// "EACCES: Permission denied (os error 13)".
pub fn os_reason(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(Error::runtime("x").exit_code(), 1);
        assert_eq!(Error::usage("x").exit_code(), 2);
        assert_eq!(Error::BootFailed("x".into()).exit_code(), 3);
        assert_eq!(Error::AppImport("x".into()).exit_code(), 4);
    }

    #[test]
    fn os_errors_read_as_sentences() {
        let e = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(os_reason(&e), "Permission denied");
    }
}
