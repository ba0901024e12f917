//! Thin wrappers around the `*at` system calls the filesystem layer uses on the
//! backing directory. Every inode is held as an `O_PATH` descriptor, so all
//! operations are relative to descriptors, never to (racy) full paths.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_ssize(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A file name for a system call (no NUL inside).
pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: a path that reaches the inode behind `fd`, even an
/// `O_PATH` descriptor (a "magic link" that is never followed further).
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

pub fn empty() -> &'static CStr {
    c""
}

pub fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; openat returns a new descriptor we own.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` as an `O_PATH` handle without following a symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Opens the inode behind an `O_PATH` descriptor for I/O.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<File> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: `p` is a valid C string; open returns a new descriptor we own.
    let r = cvt(unsafe { libc::open(p.as_ptr(), (flags & !libc::O_NOFOLLOW) | libc::O_CLOEXEC) })?;
    // SAFETY: r was just returned by open and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(r) })
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory for one stat struct.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstat` that works on `O_PATH` descriptors.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    fstatat(fd, empty(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string; no memory is handed to the kernel otherwise.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, rdev) })
        .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags as libc::c_uint,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if flags == 0 || e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Hard-links the inode behind `fd` (any kind, via its /proc magic link) as
/// `new` in `new_dir`.
pub fn link_fd(fd: BorrowedFd<'_>, new_dir: BorrowedFd<'_>, new: &CStr) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Reads the target of the symlink held by an `O_PATH` descriptor.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` is writable for buf.len() bytes.
    let n = cvt_ssize(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Backing path of a descriptor, for log messages (ciphertext names only).
pub fn fd_path(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(std::ffi::OsStr::from_bytes(
        proc_path(fd.as_raw_fd()).as_bytes(),
    ))
    .map(|p| p.display().to_string())
    .unwrap_or_else(|_| format!("fd:{}", fd.as_raw_fd()))
}

pub fn fchownat(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: the empty path with AT_EMPTY_PATH names `fd` itself.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            u,
            g,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: valid C string.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: valid C string; `times` points to two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

/// Sets the times of entry `name` in `dir` itself (a symlink is not followed).
pub fn utimensat_nofollow(
    dir: BorrowedFd<'_>,
    name: &CStr,
    times: &[libc::timespec; 2],
) -> io::Result<()> {
    // SAFETY: valid C string; `times` points to two timespecs.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain integer arguments on a descriptor we own.
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

pub fn lseek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain integer arguments on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

pub fn fstatvfs(f: &File) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable for one statvfs struct.
    cvt(unsafe { libc::fstatvfs(f.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded and filled `st`.
    Ok(unsafe { st.assume_init() })
}

// Extended attributes, through the /proc magic link so they work for every
// inode kind held as O_PATH.

/// Most attribute values and lists fit: one system call instead of a size
/// query and a read.
const XATTR_FIRST_TRY: usize = 4096;

pub fn getxattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: `read_sized` passes a buffer writable for `len` bytes, or a
    // null pointer with `len` 0 (a size query); the strings are valid.
    read_sized(|buf, len| unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf, len) })
}

/// Reads a variable-sized value with `call(buffer, length)` (getxattr,
/// listxattr): a 4 KiB buffer first (most values and lists fit, one system
/// call); if that is too small, asks for the size and reads again, until
/// the value stops growing under us. The backing store is untrusted: a
/// size above the kernel's own limit for values and lists (64 KiB) is
/// refused (E2BIG) before anything is allocated, and a value that keeps
/// growing is given up (EIO) after a few tries.
fn read_sized(call: impl Fn(*mut libc::c_void, usize) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    const XATTR_MAX: usize = 64 * 1024; // XATTR_SIZE_MAX = XATTR_LIST_MAX
    const TRIES: usize = 4;
    let mut len = XATTR_FIRST_TRY;
    for _ in 0..TRIES {
        let mut buf = vec![0u8; len];
        match cvt_ssize(call(buf.as_mut_ptr().cast(), buf.len())) {
            Ok(m) => {
                buf.truncate(m.min(buf.len()));
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                len = cvt_ssize(call(std::ptr::null_mut(), 0))?;
                if len > XATTR_MAX {
                    return Err(io::Error::from_raw_os_error(libc::E2BIG));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EIO))
}

pub fn setxattr(
    fd: BorrowedFd<'_>,
    name: &CStr,
    value: &[u8],
    flags: libc::c_int,
) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: `value` is readable for value.len() bytes.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// The backing attribute names, NUL-separated as the kernel returns them.
pub fn listxattr(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: as in `getxattr`.
    read_sized(|buf, len| unsafe { libc::listxattr(p.as_ptr(), buf.cast(), len) })
}

/// Whether process `pid`, whose file-system gid is `fsgid`, is a member of
/// group `gid`: its fsgid or one of its supplementary groups (the `Groups:`
/// line of /proc/PID/status). When the process cannot be inspected (gone,
/// or /proc unreadable) the answer is no.
pub fn pid_in_group(pid: u32, fsgid: u32, gid: u32) -> bool {
    if fsgid == gid {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|g| g.parse::<u32>() == Ok(gid))
        })
}

/// Removes the file at `p`; one that is already gone is not an error.
pub fn remove_file_if_exists(p: &std::path::Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The most a file handle may hold (MAX_HANDLE_SZ in linux/exportfs.h).
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct HandleBuf {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A backing filesystem's file handle (`name_to_handle_at`): a stable
/// reference to an inode, valid across renames and process restarts, that
/// `open_by_handle_at` turns back into a descriptor without holding one open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHandle {
    kind: libc::c_int,
    bytes: Box<[u8]>,
}

impl FileHandle {
    /// A handle of type `kind` made of `bytes` (at most MAX_HANDLE_SZ).
    pub fn from_parts(kind: libc::c_int, bytes: &[u8]) -> FileHandle {
        FileHandle {
            kind,
            bytes: bytes[..bytes.len().min(MAX_HANDLE_SZ)].into(),
        }
    }

    /// The handle's opaque bytes and type, as the filesystem made them.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The handle's type (`FILEID_*` of the filesystem).
    pub fn kind(&self) -> libc::c_int {
        self.kind
    }

    /// Memory the handle takes beyond its own struct.
    pub fn heap_size(&self) -> usize {
        self.bytes.len()
    }
}

/// The file handle of the inode behind `fd` (which may be an `O_PATH`
/// descriptor), and the id of the mount it was found on.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(FileHandle, libc::c_int)> {
    handle_at(fd, empty(), libc::AT_EMPTY_PATH)
}

/// The file handle of the entry `name` of directory `dir` (a symlink is not
/// followed), and the id of its mount.
pub fn name_to_handle_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
) -> io::Result<(FileHandle, libc::c_int)> {
    handle_at(dir, name, 0)
}

fn handle_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
) -> io::Result<(FileHandle, libc::c_int)> {
    let mut buf = HandleBuf {
        handle_bytes: MAX_HANDLE_SZ as libc::c_uint,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a file_handle with room for `handle_bytes` bytes after
    // its header; `mount_id` is writable; `name` is a valid C string (the
    // empty one with AT_EMPTY_PATH names `dir` itself).
    cvt(unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            name.as_ptr(),
            (&raw mut buf).cast::<libc::file_handle>(),
            &mut mount_id,
            flags,
        )
    })?;
    let n = (buf.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok((
        FileHandle {
            kind: buf.handle_type,
            bytes: buf.f_handle[..n].into(),
        },
        mount_id,
    ))
}

/// Opens the inode a file handle names, on the filesystem of `mount_fd`.
/// Needs CAP_DAC_READ_SEARCH; fails with ESTALE once the inode is gone.
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    h: &FileHandle,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let mut buf = HandleBuf {
        handle_bytes: h.bytes.len() as libc::c_uint,
        handle_type: h.kind,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    buf.f_handle[..h.bytes.len()].copy_from_slice(&h.bytes);
    // SAFETY: `buf` is a valid file_handle whose `handle_bytes` bytes follow
    // its header; open_by_handle_at returns a new descriptor we own.
    let fd = cvt(unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            (&raw mut buf).cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just returned by open_by_handle_at and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the mount with id `mount_id` (as `name_to_handle_at` reports it)
/// mounts the root of its filesystem, not a subdirectory of it (a bind
/// mount): its root field in /proc/self/mountinfo is `/`.
pub fn mount_shows_whole_fs(mount_id: libc::c_int) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let id = mount_id.to_string();
    info.lines().any(|l| {
        let mut f = l.split(' ');
        f.next() == Some(id.as_str()) && f.nth(2) == Some("/")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    // The kernel never reports sizes like these for a real backing
    // filesystem; a hostile one (say, another FUSE filesystem) could.

    #[test]
    fn read_sized_refuses_sizes_above_the_kernel_limit() {
        let e = read_sized(|buf, _| {
            if buf.is_null() {
                1 << 40
            } else {
                set_errno(libc::ERANGE)
            }
        })
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::E2BIG));
    }

    #[test]
    fn read_sized_gives_up_on_a_value_that_keeps_growing() {
        let calls = Cell::new(0);
        let e = read_sized(|buf, len| {
            calls.set(calls.get() + 1);
            if buf.is_null() {
                (len + 8192) as libc::ssize_t
            } else {
                set_errno(libc::ERANGE)
            }
        })
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(calls.get() <= 8, "{} calls", calls.get());
    }

    #[test]
    fn read_sized_reads_past_the_first_try() {
        let v = read_sized(|buf, len| {
            if buf.is_null() {
                6000
            } else if len < 6000 {
                set_errno(libc::ERANGE)
            } else {
                // SAFETY: `buf` is writable for `len` ≥ 6000 bytes.
                unsafe { std::ptr::write_bytes(buf.cast::<u8>(), 7, 6000) };
                6000
            }
        })
        .unwrap();
        assert_eq!(v, vec![7u8; 6000]);
    }

    fn set_errno(e: libc::c_int) -> libc::ssize_t {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = e };
        -1
    }
}
