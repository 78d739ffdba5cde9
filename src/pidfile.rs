//! The pidfile: written atomically after binding, removed at exit, refused
//! while another live procman owns it.
//!
//! "Live procman" means the pid in the file exists and its command line is
//! procman's; a file naming a dead process, or a recycled pid now used by
//! something else, is stale and replaced.
//!
//! procman often writes it as root into a directory another user may write
//! to (`/run/app` owned by the app user). So the temporary file gets an
//! unpredictable name and is created `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted
//! symlink or file makes creation fail, it is never written through), then
//! renamed over the pidfile (rename replaces a symlink at the pidfile's
//! path, it does not follow it); the existing pidfile is read without
//! following a symlink; and at exit the file is removed only while the path
//! still names the inode procman wrote.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{os_reason, Error, Result};
use crate::safefs::{self, FileId};

/// A pidfile procman wrote; removed when dropped.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    id: FileId,
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
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("procman.pid");
        // A name taken by chance (or planted, if the entropy source is
        // missing) only fails creation: try a few fresh ones.
        let mut attempt = 0;
        let (tmp, mut f) = loop {
            let tmp = dir.join(format!(".{name}.{}.tmp", safefs::random_token()));
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp);
            match created {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1
                }
                Err(e) => return Err(fail(e)),
            }
        };
        let written = writeln!(f, "{}", std::process::id())
            .and_then(|_| f.sync_all())
            .and_then(|_| f.metadata());
        let id = match written {
            Ok(meta) => FileId::of(&meta),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(fail(e));
            }
        };
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            id,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Only the file procman wrote: an operator may have started another
        // procman with the same path meanwhile, or someone replaced it.
        safefs::remove_if_same(&self.path, self.id);
    }
}

/// The pid in an existing pidfile; a symlink is not followed (it is
/// nobody's pidfile, and rename replaces it).
fn read_pid(path: &Path) -> Option<u32> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
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
    fn a_replaced_file_is_left_at_exit_and_a_symlink_is_replaced() {
        let d = dir("replaced");
        let p = d.join("app.pid");
        let f = Pidfile::create(&p).expect("create");
        // Someone moved it away and put their own file at the path (with
        // our pid, even). (Moved, not deleted: a deleted inode's number
        // may be reused at once by the next file.)
        std::fs::rename(&p, d.join("moved")).expect("rename");
        std::fs::write(&p, format!("{}\n", std::process::id())).expect("write");
        drop(f);
        assert!(p.exists(), "a file procman did not write was removed");
        std::fs::remove_file(d.join("moved")).expect("unlink");
        // A symlink at the path is replaced, its target untouched.
        let target = d.join("target");
        std::fs::write(&target, "keep").expect("write");
        std::fs::remove_file(&p).expect("unlink");
        std::os::unix::fs::symlink(&target, &p).expect("symlink");
        let f = Pidfile::create(&p).expect("create over a symlink");
        assert!(std::fs::symlink_metadata(&p).expect("meta").is_file());
        assert_eq!(std::fs::read_to_string(&target).expect("target"), "keep");
        drop(f);
        let leftovers: Vec<_> = std::fs::read_dir(&d)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("target")]);
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
