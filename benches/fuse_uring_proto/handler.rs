//! The request handler both transports share: a passthrough of a backing
//! directory in the style of libfuse's passthrough_ll (one O_PATH descriptor
//! per inode, *at system calls, open files kept as raw descriptors in `fh`).
//!
//! `dispatch` receives the decoded in-header, the per-operation header and
//! one buffer that holds the request's names/data in `buf[..in_len]` and
//! receives the reply's arguments from `buf[0]` on: the classic transport
//! passes the tail of its read buffer, the io_uring transport the ring
//! entry's payload buffer, so neither copies data.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::proto::*;

/// What a request produced.
pub enum Outcome {
    /// Reply with this many bytes of arguments from the start of the buffer.
    Reply(usize),
    /// Reply with this (positive) errno.
    Error(i32),
    /// No reply (FORGET, BATCH_FORGET, INTERRUPT).
    None,
}

struct Inode {
    fd: OwnedFd,
    key: (u64, u64),
}

struct Table {
    next: u64,
    by_id: HashMap<u64, (Arc<Inode>, u64)>,
    by_key: HashMap<(u64, u64), u64>,
}

pub struct Fs {
    root: Arc<Inode>,
    table: Mutex<Table>,
    /// Entry and attribute timeout in seconds (passthrough_ll's default: 1).
    timeout: u64,
    max_write: u32,
    want_uring: bool,
    /// Set when the kernel offered FUSE_OVER_IO_URING and we accepted it.
    pub uring_accepted: AtomicBool,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// -1 from a system call becomes the errno.
fn check(ret: libc::c_int) -> Result<libc::c_int, i32> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

fn check_size(ret: isize) -> Result<usize, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as usize)
    }
}

fn cname(b: &[u8]) -> Result<CString, i32> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    CString::new(&b[..end]).map_err(|_| libc::EINVAL)
}

fn fstatat(dir: RawFd, name: &CString, flags: libc::c_int) -> Result<libc::stat, i32> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` is a valid out-pointer.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

fn stat_fd(fd: RawFd) -> Result<libc::stat, i32> {
    fstatat(
        fd,
        &CString::default(),
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
    )
}

/// The /proc/self/fd path that reopens an O_PATH descriptor.
fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

fn open_raw(path: &CString, flags: libc::c_int, mode: libc::mode_t) -> Result<RawFd, i32> {
    // SAFETY: `path` is NUL-terminated; the descriptor is owned by the caller.
    check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })
}

fn close(fd: u64) {
    // SAFETY: `fd` is a descriptor this handler opened and handed to the
    // kernel as `fh`; the kernel releases each fh exactly once.
    unsafe { libc::close(fd as RawFd) };
}

impl Fs {
    pub fn new(source: &str, max_write: u32, want_uring: bool) -> std::io::Result<Fs> {
        let path = CString::new(source)?;
        let fd = open_raw(&path, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(std::io::Error::from_raw_os_error)?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = stat_fd(fd.as_raw_fd()).map_err(std::io::Error::from_raw_os_error)?;
        Ok(Fs {
            root: Arc::new(Inode {
                fd,
                key: (st.st_dev, st.st_ino),
            }),
            table: Mutex::new(Table {
                next: 2,
                by_id: HashMap::new(),
                by_key: HashMap::new(),
            }),
            timeout: 1,
            max_write,
            want_uring,
            uring_accepted: AtomicBool::new(false),
        })
    }

    fn inode(&self, nodeid: u64) -> Result<Arc<Inode>, i32> {
        if nodeid == 1 {
            return Ok(self.root.clone());
        }
        let t = self.table.lock().map_err(|_| libc::EIO)?;
        t.by_id
            .get(&nodeid)
            .map(|(i, _)| i.clone())
            .ok_or(libc::ESTALE)
    }

    fn forget(&self, nodeid: u64, n: u64) {
        if nodeid == 1 {
            return;
        }
        let Ok(mut t) = self.table.lock() else { return };
        let gone = match t.by_id.get_mut(&nodeid) {
            Some((_, count)) => {
                *count = count.saturating_sub(n);
                *count == 0
            }
            None => false,
        };
        if gone && let Some((inode, _)) = t.by_id.remove(&nodeid) {
            t.by_key.remove(&inode.key);
        }
    }

    /// Looks `name` up in `parent`, takes a lookup reference and writes a
    /// fuse_entry_out.
    fn do_lookup(&self, parent: &Inode, name: &CString, w: &mut W<'_>) -> Result<(), i32> {
        let pfd = parent.fd.as_raw_fd();
        let st = fstatat(pfd, name, libc::AT_SYMLINK_NOFOLLOW)?;
        let key = (st.st_dev, st.st_ino);
        let mut t = self.table.lock().map_err(|_| libc::EIO)?;
        let id = if key == self.root.key {
            1
        } else if let Some(&id) = t.by_key.get(&key) {
            if let Some((_, n)) = t.by_id.get_mut(&id) {
                *n += 1;
            }
            id
        } else {
            drop(t);
            // SAFETY: `name` is NUL-terminated and `pfd` a live descriptor.
            let fd = check(unsafe {
                libc::openat(
                    pfd,
                    name.as_ptr(),
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            })?;
            // SAFETY: `fd` was just opened and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            t = self.table.lock().map_err(|_| libc::EIO)?;
            if let Some(&id) = t.by_key.get(&key) {
                // Another thread raced us to it; `fd` is dropped.
                if let Some((_, n)) = t.by_id.get_mut(&id) {
                    *n += 1;
                }
                id
            } else {
                let id = t.next;
                t.next += 1;
                t.by_id.insert(id, (Arc::new(Inode { fd, key }), 1));
                t.by_key.insert(key, id);
                id
            }
        };
        put_entry(w, id, &st, self.timeout).map_err(|_| libc::EIO)
    }

    pub fn dispatch(&self, h: &InHeader, op: &[u8], buf: &mut [u8], in_len: usize) -> Outcome {
        let r = match h.opcode {
            FORGET => {
                self.forget(h.nodeid, u64_at(op, 0));
                return Outcome::None;
            }
            BATCH_FORGET => {
                let count = (u32_at(op, 0) as usize).min(in_len / 16);
                for i in 0..count {
                    self.forget(u64_at(buf, i * 16), u64_at(buf, i * 16 + 8));
                }
                return Outcome::None;
            }
            INTERRUPT => return Outcome::None,
            _ => self.op(h, op, buf, in_len),
        };
        match r {
            Ok(n) => Outcome::Reply(n),
            Err(e) => Outcome::Error(e),
        }
    }

    fn op(&self, h: &InHeader, op: &[u8], buf: &mut [u8], in_len: usize) -> Result<usize, i32> {
        let data = buf.get(..in_len).ok_or(libc::EIO)?;
        match h.opcode {
            INIT => self.init(op, buf),
            DESTROY => Ok(0),
            LOOKUP => {
                let name = cname(data)?;
                let parent = self.inode(h.nodeid)?;
                let mut w = W::new(buf);
                self.do_lookup(&parent, &name, &mut w)?;
                Ok(w.pos)
            }
            GETATTR => {
                let st = if u32_at(op, 0) & 1 != 0 {
                    stat_fd(u64_at(op, 8) as RawFd)?
                } else {
                    stat_fd(self.inode(h.nodeid)?.fd.as_raw_fd())?
                };
                self.attr_reply(&st, buf)
            }
            SETATTR => self.setattr(h, op, buf),
            MKDIR => {
                let name = cname(data)?;
                let parent = self.inode(h.nodeid)?;
                let pfd = parent.fd.as_raw_fd();
                let mode = u32_at(op, 0) & !u32_at(op, 4);
                // SAFETY: `name` is NUL-terminated and `pfd` a live descriptor.
                check(unsafe { libc::mkdirat(pfd, name.as_ptr(), mode) })?;
                let mut w = W::new(buf);
                self.do_lookup(&parent, &name, &mut w)?;
                Ok(w.pos)
            }
            UNLINK | RMDIR => {
                let name = cname(data)?;
                let parent = self.inode(h.nodeid)?;
                let flags = if h.opcode == RMDIR {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                // SAFETY: `name` is NUL-terminated and the descriptor live.
                check(unsafe { libc::unlinkat(parent.fd.as_raw_fd(), name.as_ptr(), flags) })?;
                Ok(0)
            }
            OPEN | OPENDIR => {
                let inode = self.inode(h.nodeid)?;
                let mut flags = u32_at(op, 0) as libc::c_int & !libc::O_NOFOLLOW;
                if h.opcode == OPENDIR {
                    flags = libc::O_RDONLY | libc::O_DIRECTORY;
                }
                let fd = open_raw(&proc_path(inode.fd.as_raw_fd()), flags, 0)?;
                let mut w = W::new(buf);
                w.u64(fd as u64).map_err(|_| libc::EIO)?;
                w.u64(0).map_err(|_| libc::EIO)?; // open_flags, backing_id
                Ok(w.pos)
            }
            CREATE => {
                let name = cname(data)?;
                let parent = self.inode(h.nodeid)?;
                let flags = u32_at(op, 0) as libc::c_int | libc::O_CREAT | libc::O_CLOEXEC;
                let mode = u32_at(op, 4) & !u32_at(op, 8);
                // SAFETY: `name` is NUL-terminated and the descriptor live.
                let fd = check(unsafe {
                    libc::openat(parent.fd.as_raw_fd(), name.as_ptr(), flags, mode)
                })?;
                let mut w = W::new(buf);
                if let Err(e) = self.do_lookup(&parent, &name, &mut w) {
                    close(fd as u64);
                    return Err(e);
                }
                w.u64(fd as u64).map_err(|_| libc::EIO)?;
                w.u64(0).map_err(|_| libc::EIO)?;
                Ok(w.pos)
            }
            READ => {
                let (fh, off, size) = (u64_at(op, 0), u64_at(op, 8), u32_at(op, 16) as usize);
                let out = buf.get_mut(..size).ok_or(libc::EIO)?;
                // SAFETY: `out` is a writable buffer of `out.len()` bytes.
                check_size(unsafe {
                    libc::pread(fh as RawFd, out.as_mut_ptr().cast(), out.len(), off as i64)
                })
            }
            WRITE => {
                let (fh, off, size) = (u64_at(op, 0), u64_at(op, 8), u32_at(op, 16) as usize);
                let src = data.get(..size).ok_or(libc::EIO)?;
                // SAFETY: `src` is a readable buffer of `src.len()` bytes.
                let n = check_size(unsafe {
                    libc::pwrite(fh as RawFd, src.as_ptr().cast(), src.len(), off as i64)
                })?;
                let mut w = W::new(buf);
                w.u32(n as u32).map_err(|_| libc::EIO)?;
                w.u32(0).map_err(|_| libc::EIO)?;
                Ok(w.pos)
            }
            FLUSH => {
                // SAFETY: dup of the open descriptor `fh`; closing the copy
                // reports write-back errors as close(2) would.
                let fd = check(unsafe { libc::dup(u64_at(op, 0) as RawFd) })?;
                // SAFETY: `fd` is the duplicate just made.
                check(unsafe { libc::close(fd) })?;
                Ok(0)
            }
            FSYNC | FSYNCDIR => {
                let fd = u64_at(op, 0) as RawFd;
                // SAFETY: plain system calls on the descriptor the kernel named.
                check(unsafe {
                    if u32_at(op, 8) & 1 != 0 {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                })?;
                Ok(0)
            }
            RELEASE | RELEASEDIR => {
                close(u64_at(op, 0));
                Ok(0)
            }
            FALLOCATE => {
                let (fh, off, len, mode) =
                    (u64_at(op, 0), u64_at(op, 8), u64_at(op, 16), u32_at(op, 24));
                // SAFETY: plain system call on the descriptor the kernel named.
                check(unsafe {
                    libc::fallocate(fh as RawFd, mode as libc::c_int, off as i64, len as i64)
                })?;
                Ok(0)
            }
            READDIR | READDIRPLUS => self.readdir(h, op, buf),
            STATFS => {
                // SAFETY: an all-zero `statvfs` is a valid value of this C struct.
                let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
                // SAFETY: `s` is a valid out-pointer; the root descriptor is live.
                check(unsafe { libc::fstatvfs(self.root.fd.as_raw_fd(), &mut s) })?;
                let mut w = W::new(buf);
                let mut put = || -> Result<(), Overflow> {
                    w.u64(s.f_blocks)?;
                    w.u64(s.f_bfree)?;
                    w.u64(s.f_bavail)?;
                    w.u64(s.f_files)?;
                    w.u64(s.f_ffree)?;
                    w.u32(s.f_bsize as u32)?;
                    w.u32(s.f_namemax as u32)?;
                    w.u32(s.f_frsize as u32)?;
                    w.zeros(4 + 24)
                };
                put().map_err(|_| libc::EIO)?;
                Ok(w.pos)
            }
            // GETXATTR/LISTXATTR answered ENOSYS once: the kernel stops asking.
            _ => Err(libc::ENOSYS),
        }
    }

    fn attr_reply(&self, st: &libc::stat, buf: &mut [u8]) -> Result<usize, i32> {
        let mut w = W::new(buf);
        let mut put = || -> Result<(), Overflow> {
            w.u64(self.timeout)?;
            w.u32(0)?;
            w.u32(0)?;
            put_attr(&mut w, st)
        };
        put().map_err(|_| libc::EIO)?;
        Ok(w.pos)
    }

    fn init(&self, op: &[u8], buf: &mut [u8]) -> Result<usize, i32> {
        let (major, minor) = (u32_at(op, 0), u32_at(op, 4));
        if major != FUSE_KERNEL_VERSION {
            return Err(libc::EPROTO);
        }
        let mut offered = u64::from(u32_at(op, 12));
        if offered & FUSE_INIT_EXT != 0 {
            offered |= u64::from(u32_at(op, 16)) << 32;
        }
        let mut want = FUSE_ASYNC_READ
            | FUSE_BIG_WRITES
            | FUSE_DO_READDIRPLUS
            | FUSE_PARALLEL_DIROPS
            | FUSE_MAX_PAGES
            | FUSE_INIT_EXT;
        if self.want_uring && offered & FUSE_OVER_IO_URING != 0 {
            want |= FUSE_OVER_IO_URING;
            self.uring_accepted.store(true, Ordering::SeqCst);
        }
        let flags = want & offered;
        let max_pages = self.max_write.div_ceil(4096) as u16;
        let mut w = W::new(buf);
        let mut put = || -> Result<(), Overflow> {
            w.u32(FUSE_KERNEL_VERSION)?;
            w.u32(minor.min(FUSE_KERNEL_MINOR_VERSION))?;
            w.u32(u32_at(op, 8))?; // max_readahead: as offered
            w.u32(flags as u32)?;
            w.bytes(&64u16.to_le_bytes())?; // max_background
            w.bytes(&48u16.to_le_bytes())?; // congestion_threshold
            w.u32(self.max_write)?;
            w.u32(1)?; // time_gran
            w.bytes(&max_pages.to_le_bytes())?;
            w.bytes(&0u16.to_le_bytes())?; // map_alignment
            w.u32((flags >> 32) as u32)?;
            w.u32(0)?; // max_stack_depth
            w.zeros(2 + 22) // request_timeout, unused[11]
        };
        put().map_err(|_| libc::EIO)?;
        Ok(w.pos)
    }

    fn setattr(&self, h: &InHeader, op: &[u8], buf: &mut [u8]) -> Result<usize, i32> {
        let valid = u32_at(op, 0);
        let fh = (valid & FATTR_FH != 0).then(|| u64_at(op, 8) as RawFd);
        let inode = self.inode(h.nodeid)?;
        let path = proc_path(inode.fd.as_raw_fd());
        if valid & FATTR_MODE != 0 {
            let mode = u32_at(op, 68);
            // SAFETY: plain system calls; `path` is NUL-terminated.
            check(unsafe {
                match fh {
                    Some(fd) => libc::fchmod(fd, mode),
                    None => libc::chmod(path.as_ptr(), mode),
                }
            })?;
        }
        if valid & FATTR_SIZE != 0 {
            let size = u64_at(op, 16) as i64;
            // SAFETY: plain system calls; `path` is NUL-terminated.
            check(unsafe {
                match fh {
                    Some(fd) => libc::ftruncate(fd, size),
                    None => libc::truncate(path.as_ptr(), size),
                }
            })?;
        }
        if valid & (FATTR_ATIME | FATTR_MTIME) != 0 {
            let ts = |set: u32, now: u32, sec: usize, nsec: usize| {
                if valid & now != 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else if valid & set != 0 {
                    libc::timespec {
                        tv_sec: u64_at(op, sec) as i64,
                        tv_nsec: i64::from(u32_at(op, nsec)),
                    }
                } else {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                }
            };
            let times = [
                ts(FATTR_ATIME, FATTR_ATIME_NOW, 32, 56),
                ts(FATTR_MTIME, FATTR_MTIME_NOW, 40, 60),
            ];
            // SAFETY: `path` is NUL-terminated, `times` two valid timespecs.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })?;
        }
        let st = stat_fd(inode.fd.as_raw_fd())?;
        self.attr_reply(&st, buf)
    }

    /// READDIR / READDIRPLUS from the directory descriptor in `fh`: seek to
    /// the kernel's offset, read a batch with getdents64, emit what fits and
    /// take lookup references only for entries actually sent.
    fn readdir(&self, h: &InHeader, op: &[u8], buf: &mut [u8]) -> Result<usize, i32> {
        let plus = h.opcode == READDIRPLUS;
        let (fd, off, size) = (
            u64_at(op, 0) as RawFd,
            u64_at(op, 8),
            u32_at(op, 16) as usize,
        );
        let parent = if plus {
            Some(self.inode(h.nodeid)?)
        } else {
            None
        };
        let size = size.min(buf.len());
        let mut w = W::new(&mut buf[..size]);
        // SAFETY: plain system call on the directory descriptor in `fh`.
        if unsafe { libc::lseek(fd, off as i64, libc::SEEK_SET) } < 0 {
            return Err(errno());
        }
        let mut dents = [0u8; 4096];
        'outer: loop {
            // SAFETY: `dents` is a writable buffer of its length.
            let n =
                unsafe { libc::syscall(libc::SYS_getdents64, fd, dents.as_mut_ptr(), dents.len()) };
            if n < 0 {
                return Err(errno());
            }
            if n == 0 {
                break;
            }
            let mut p = 0usize;
            while p < n as usize {
                let ino = u64_at(&dents, p);
                let d_off = u64_at(&dents, p + 8);
                let reclen = usize::from(u16_at(&dents, p + 16));
                let Some(rec) = dents.get(p..p + reclen).filter(|r| r.len() > 19) else {
                    break 'outer; // malformed record: stop here
                };
                let dtype = rec[18];
                let name_bytes = &rec[19..];
                let name_len = name_bytes.iter().position(|&c| c == 0).unwrap_or(0);
                let name = &name_bytes[..name_len];
                let need = dirent_size(name.len()) + if plus { ENTRY_OUT } else { 0 };
                if w.pos + need > size {
                    // Full: the next request resumes from the last emitted entry.
                    break 'outer;
                }
                if let Some(parent) = &parent {
                    if name == b"." || name == b".." {
                        // Attributes only: nodeid 0 makes the kernel skip it.
                        let mut st: libc::stat =
                            // SAFETY: an all-zero `stat` is a valid value.
                            unsafe { std::mem::zeroed() };
                        st.st_ino = ino;
                        st.st_mode = u32::from(dtype) << 12;
                        put_entry(&mut w, 0, &st, 0).map_err(|_| libc::EIO)?;
                    } else {
                        let c = cname(name)?;
                        let start = w.pos;
                        if self.do_lookup(parent, &c, &mut w).is_err() {
                            // Vanished meanwhile: skip it.
                            w.pos = start;
                            p += reclen;
                            continue;
                        }
                    }
                }
                put_dirent(&mut w, ino, d_off, dtype, name).map_err(|_| libc::EIO)?;
                p += reclen;
            }
        }
        Ok(w.pos)
    }
}
