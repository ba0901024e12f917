//! Opening kmfs's own files in the backing directory: the volume header and
//! its backups, directory ids, long-name sidecars, the rekey journal and
//! state file, the lock file.
//!
//! The backing directory is untrusted input (docs/SECURITY.md): whoever can
//! write it can put a symlink to `/dev/zero`, a FIFO, a directory or a huge
//! file under any of these names. Every open here is `openat` relative to a
//! directory descriptor with `O_NOFOLLOW | O_NONBLOCK` (a FIFO opens at once
//! instead of blocking, a symlink fails with `ELOOP`), then `fstat` must show
//! a regular file no larger than the caller's bound. Anything else is an
//! [`InternalFileError`] on that one file, which callers turn into EIO for
//! that entry with a log line; it never blocks a worker or exhausts memory.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::sync::MutexExt;
use crate::sys;

/// Upper bounds on the size of each kind of internal file.
pub mod limits {
    /// `kmfs.dirid`: 16-byte id + 2-byte generation.
    pub const DIRID: u64 = 64;
    /// `kmfs.long.*.name`: the base64 encoding of a 255-byte name is 362 bytes.
    pub const SIDECAR: u64 = 1024;
    /// `kmfs.rekey`: a small JSON object.
    pub const REKEY_STATE: u64 = 64 * 1024;
    /// `kmfs.lock`: one line naming the holder.
    pub const LOCK: u64 = 4096;
}

/// Why a volume-internal file was refused.
#[derive(Debug, thiserror::Error)]
pub enum InternalFileError {
    #[error("is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {size} bytes, more than the {max} such a file can have")]
    TooLarge { size: u64, max: u64 },
    #[error("is a symbolic link")]
    Symlink,
}

impl From<InternalFileError> for io::Error {
    fn from(e: InternalFileError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Whether `e` is a refusal of a hostile internal file (as opposed to, say,
/// the file not existing).
pub fn is_refusal(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<InternalFileError>().is_some())
}

/// The name of a file type for messages.
pub fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symbolic link",
        libc::S_IFIFO => "FIFO",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        _ => "file of unknown type",
    }
}

/// Checks that an open descriptor is a regular file of at most `max` bytes;
/// returns its size.
pub fn check_regular(fd: BorrowedFd<'_>, max: u64) -> io::Result<u64> {
    let st = sys::fstat(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(InternalFileError::NotRegular(kind_name(st.st_mode)).into());
    }
    let size = st.st_size as u64;
    if size > max {
        return Err(InternalFileError::TooLarge { size, max }.into());
    }
    Ok(size)
}

/// Opens `name` in `dir` with `flags` (plus `O_NOFOLLOW | O_NONBLOCK |
/// O_NOCTTY`) and checks it is a regular file of at most `max` bytes. A
/// refusal is logged and audited (once per file and kind of problem).
pub fn open(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, max: u64) -> io::Result<File> {
    open_unreported(dir, name, flags, max).inspect_err(|e| {
        if is_refusal(e) {
            report(dir, name, e);
        }
    })
}

/// Logs and audits a hostile internal file, once per path and problem (a
/// directory listed again and again must not flood the trail).
fn report(dir: BorrowedFd<'_>, name: &CStr, e: &io::Error) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let path = format!("{}/{}", sys::fd_path(dir), name.to_string_lossy());
    let what = e.to_string();
    {
        let mut seen = SEEN.locked();
        let seen = seen.get_or_insert_with(HashSet::new);
        if seen.len() > 10_000 || !seen.insert(format!("{path}\0{what}")) {
            return;
        }
    }
    log::error!(
        "{}",
        crate::logging::kv(&[
            ("op", "internal_file"),
            ("path", &path),
            ("error", &what),
            ("result", "refused"),
        ])
    );
    crate::audit::record(&crate::audit::AuditRecord::new(
        "internal_file_refused",
        "backing",
        &path,
        None,
        crate::audit::Outcome::Fail,
        &what,
    ));
}

fn open_unreported(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    max: u64,
) -> io::Result<File> {
    let fd = sys::openat(
        dir,
        name,
        flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            InternalFileError::Symlink.into()
        } else {
            e
        }
    })?;
    check_regular(fd.as_fd(), max)?;
    Ok(File::from(fd))
}

/// Reads the whole of `name` in `dir`, refusing anything but a regular file
/// of at most `max` bytes (a file that grows while it is read is cut at
/// `max + 1` bytes and refused).
pub fn read(dir: BorrowedFd<'_>, name: &CStr, max: u64) -> io::Result<Vec<u8>> {
    let f = open(dir, name, libc::O_RDONLY, max)?;
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(InternalFileError::TooLarge {
            size: buf.len() as u64,
            max,
        }
        .into());
    }
    Ok(buf)
}

/// Opens a directory given by the administrator (or found by a walk) as a
/// descriptor for [`read`] and [`open`].
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = sys::cstr(dir.as_os_str().as_bytes())?;
    sys::openat(cwd(), &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// The current directory as a descriptor argument for `*at` calls.
fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a constant that every *at system call accepts in
    // place of a directory descriptor; it is never closed.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// [`read`] of `path`'s last component, relative to its parent directory.
pub fn read_path(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let (dir, name) = split(path)?;
    read(dir.as_fd(), &name, max)
}

/// [`open`] of `path`'s last component, relative to its parent directory.
pub fn open_path(path: &Path, flags: libc::c_int, max: u64) -> io::Result<File> {
    let (dir, name) = split(path)?;
    open(dir.as_fd(), &name, flags, max)
}

fn split(path: &Path) -> io::Result<(OwnedFd, std::ffi::CString)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((open_dir(parent)?, sys::cstr(name.as_bytes())?))
}

/// Creates or truncates `name` in `dir` for writing (mode `mode` if new),
/// refusing a symlink, FIFO, device or directory in its place.
pub fn create(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<File> {
    let fd = sys::openat(
        dir,
        name,
        libc::O_WRONLY
            | libc::O_CREAT
            | libc::O_TRUNC
            | libc::O_NOFOLLOW
            | libc::O_NONBLOCK
            | libc::O_NOCTTY,
        mode,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            InternalFileError::Symlink.into()
        } else {
            e
        }
    })?;
    check_regular(fd.as_fd(), u64::MAX)?;
    Ok(File::from(fd))
}

/// Writes the sidecar of long name `backing` in `dir` (idempotent).
pub fn write_sidecar(dir: BorrowedFd<'_>, side: &CStr, full: &str) -> io::Result<()> {
    use std::io::Write;
    create(dir, side, 0o444)?.write_all(full.as_bytes())
}

/// Why a long name's sidecar gives no name.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("long-name sidecar unreadable: {0}")]
    Unreadable(io::Error),
    #[error("long-name sidecar does not match the entry")]
    Mismatch,
}

/// The full encoded name of long-name entry `backing` in `dir`, read from
/// its sidecar (bounded, never followed) and checked against the entry's
/// hashed name.
pub fn read_sidecar(dir: BorrowedFd<'_>, backing: &[u8]) -> Result<String, SidecarError> {
    use crate::crypto::names::{long_backing, long_sidecar};
    let backing = std::str::from_utf8(backing).map_err(|_| SidecarError::Mismatch)?;
    let side = sys::cstr(long_sidecar(backing).as_bytes()).map_err(SidecarError::Unreadable)?;
    let b = read(dir, &side, limits::SIDECAR).map_err(SidecarError::Unreadable)?;
    let full = std::str::from_utf8(&b)
        .map_err(|_| SidecarError::Mismatch)?
        .trim_end();
    if long_backing(full) != backing {
        return Err(SidecarError::Mismatch);
    }
    Ok(full.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let fd = open_dir(d.path()).unwrap();
        (d, fd)
    }

    #[test]
    fn reads_a_small_regular_file() {
        let (d, fd) = dir();
        std::fs::write(d.path().join("f"), b"hello").unwrap();
        assert_eq!(read(fd.as_fd(), c"f", 16).unwrap(), b"hello");
        assert_eq!(read_path(&d.path().join("f"), 5).unwrap(), b"hello");
    }

    #[test]
    fn refuses_hostile_files_without_blocking() {
        let (d, fd) = dir();
        let t = Instant::now();
        std::os::unix::fs::symlink("/dev/zero", d.path().join("link")).unwrap();
        let e = read(fd.as_fd(), c"link", 16).unwrap_err();
        assert!(is_refusal(&e), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");

        nix::unistd::mkfifo(&d.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read(fd.as_fd(), c"fifo", 16).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");

        std::fs::create_dir(d.path().join("dir")).unwrap();
        let e = read(fd.as_fd(), c"dir", 16).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");

        std::fs::write(d.path().join("big"), vec![1u8; 17]).unwrap();
        let e = read(fd.as_fd(), c"big", 16).unwrap_err();
        assert!(e.to_string().contains("17 bytes"), "{e}");

        let e = read(fd.as_fd(), c"missing", 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!is_refusal(&e));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
