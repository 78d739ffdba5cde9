//! File-system steps that stay safe when procman runs as root in
//! directories other users can write to (the pidfile's directory, a unix
//! socket's directory, a shared `/tmp`).
//!
//! Rules kept here:
//! * a path is never followed into a file someone else planted: new files
//!   are created `O_EXCL|O_NOFOLLOW` under unpredictable names, and
//!   ownership is changed through a descriptor opened `O_PATH|O_NOFOLLOW`
//!   after checking it is still the kind of file procman made and still
//!   procman's (`fchownat(fd, "", AT_EMPTY_PATH)`), never by path;
//! * a file procman made is removed at exit only while the path still names
//!   the same inode (device and inode number recorded when it was made):
//!   another process may have replaced it meanwhile, and that one is not
//!   procman's to remove. Between the check and `unlink` a process that can
//!   write to the directory could still swap the file; such a process could
//!   remove it anyway, so nothing is given away.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// An inode's identity: what a path must still name for procman to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of a file whose metadata procman holds.
    pub fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// What `path` names now, without following a final symlink.
    pub fn at(path: &Path) -> Option<FileId> {
        std::fs::symlink_metadata(path).ok().map(|m| FileId::of(&m))
    }
}

/// Removes `path` only if it still names `id` (see the module notes).
pub fn remove_if_same(path: &Path, id: FileId) {
    if FileId::at(path) == Some(id) {
        let _ = std::fs::remove_file(path);
    }
}

/// The kinds of file procman hands over to the worker user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A unix socket file (a `--bind unix:` socket, the notify socket).
    Socket,
    /// A directory (the notify directory).
    Directory,
}

/// Opens a file procman just made, as an `O_PATH` handle that does not
/// follow a final symlink, and checks it is still what procman made: the
/// expected kind, owned by procman's effective user. A symlink or another
/// user's file put in its place is refused, never followed.
pub fn open_own(path: &Path, kind: Kind) -> io::Result<(File, FileId)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    let right_kind = match kind {
        Kind::Socket => std::os::unix::fs::FileTypeExt::is_socket(&ft),
        Kind::Directory => ft.is_dir(),
    };
    let euid = nix::unistd::geteuid().as_raw();
    if !right_kind || meta.uid() != euid {
        return Err(io::Error::other(format!(
            "{} was replaced by another file (refusing to touch it)",
            path.display()
        )));
    }
    Ok((file, FileId::of(&meta)))
}

/// Gives the file behind a descriptor from [`open_own`] to `uid:gid`.
pub fn chown_fd(file: &File, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call (borrowed from
    // `file`), the path is a valid NUL-terminated empty string, and
    // AT_EMPTY_PATH makes the call act on the fd itself (an O_PATH fd
    // is accepted), so no path is resolved.
    let rc = unsafe {
        libc::fchownat(
            file.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sixteen unpredictable lowercase letters and digits, for names others
/// must not be able to plant in advance.
pub fn random_token() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    // SAFETY: the buffer is valid for writes of its length.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // No entropy source (very old kernel, seccomp): fall back to the
        // clock. Names then become guessable, but every file made with
        // them is created O_EXCL|O_NOFOLLOW, so a planted name only makes
        // creation fail; it never redirects a write.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (nanos >> ((i % 8) * 8)) as u8 ^ (std::process::id() >> (i % 4)) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("procman-safefs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn a_socket_swapped_for_a_symlink_is_never_chowned_through() {
        let d = dir("swap");
        let victim = d.join("victim");
        std::fs::write(&victim, "x").expect("write");
        let path = d.join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (own, id) = open_own(&path, Kind::Socket).expect("our socket");
        assert_eq!(FileId::at(&path), Some(id));
        drop(own);
        // Someone swaps the socket file for a symlink to another file.
        // (Moved, not deleted: a deleted inode's number may be reused at
        // once, and the recorded identity must stay unique.)
        std::fs::rename(&path, d.join("moved.sock")).expect("move away");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        let err = open_own(&path, Kind::Socket).expect_err("a symlink is refused");
        assert!(err.to_string().contains("replaced"), "{err}");
        // A regular file in its place is refused too.
        std::fs::remove_file(&path).expect("unlink");
        std::fs::write(&path, "y").expect("write");
        assert!(open_own(&path, Kind::Socket).is_err());
        // And removal at exit leaves what is not the recorded inode.
        remove_if_same(&path, id);
        assert!(path.exists(), "a file procman did not make was removed");
        drop(listener);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn chown_acts_on_the_descriptor() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = dir("chown");
        let path = d.join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (own, _) = open_own(&path, Kind::Socket).expect("our socket");
        chown_fd(&own, 65534, 65534).expect("fchownat");
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        drop(listener);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn tokens_differ_and_are_plain() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    }
}
