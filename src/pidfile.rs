//! The pidfile: written atomically after binding, removed at exit, refused
//! while another live procman owns it.
//!
//! "Live procman" means the pid in the file exists and its command line is
//! procman's; a file naming a dead process, or a recycled pid now used by
//! something else, is stale and replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{os_reason, Error, Result};

/// A pidfile procman wrote; removed when dropped.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
}

impl Pidfile {
    /// Checks for a live owner, then writes our pid (temp file + rename,
    /// so a reader never sees a partial file).
    pub fn create(path: &Path) -> Result<Pidfile> {
        if let Some(pid) = read_pid(path) {
            if pid != std::process::id() && is_live_procman(pid) {
                return Err(Error::runtime(format!(
                    "cannot write pidfile {}: procman is already running as pid {pid}",
                    path.display()
                )));
            }
        }
        let fail = |e: std::io::Error| {
            Error::runtime(format!(
                "cannot write pidfile {}: {}",
                path.display(),
                os_reason(&e)
            ))
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("procman.pid"),
            std::process::id()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        writeln!(f, "{}", std::process::id()).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })?;
        Ok(Pidfile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Only remove the file if it still names us (an operator may have
        // started another procman with the same path meanwhile).
        if read_pid(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn is_live_procman(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let name = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(argv0))
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    name.starts_with("procman")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("procman-pidfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn written_then_removed() {
        let d = dir("basic");
        let p = d.join("app.pid");
        let f = Pidfile::create(&p).expect("create");
        assert_eq!(read_pid(&p), Some(std::process::id()));
        drop(f);
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_stale_file_is_replaced() {
        let d = dir("stale");
        let p = d.join("app.pid");
        // pid 1's command line is not procman's here, and a huge pid is dead.
        for stale in ["4194303", "1", "garbage"] {
            std::fs::write(&p, stale).expect("write");
            let f = Pidfile::create(&p).expect("stale replaced");
            assert_eq!(read_pid(&p), Some(std::process::id()));
            drop(f);
        }
        let _ = std::fs::remove_dir_all(d);
    }
}
