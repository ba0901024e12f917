//! The data path: open, read, write, truncate, fallocate, lseek and fsync of
//! regular files, and their 40-byte file headers (read, cached per inode,
//! written on the first write).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::{Errno, FileHandle, FileType, INodeNo, WriteFlags};

use super::attr::Caller;
use super::handle::OpenFile;
use super::inode::Inode;
use super::{KmfsFs, R};
use crate::crypto::content::Units;
use crate::sync::RwLockExt;
use crate::sys;
use crate::volume::GenKeys;
use crate::volume::content::{self, BackingFile, Release};
use crate::volume::layout::{FileHeader, HEADER_LEN, plain_size};

impl KmfsFs {
    pub(super) fn do_open(&self, ino: INodeNo, flags: i32) -> R<u64> {
        let inode = self.inode(ino)?;
        if inode.kind == FileType::Directory {
            return Err(Errno::EISDIR);
        }
        let file = self.open_backing(&inode, flags)?;
        if flags & libc::O_TRUNC != 0 && inode.kind == FileType::RegularFile {
            self.ro()?;
            self.truncate(&inode, None, 0)?;
        }
        Ok(self.files.insert(OpenFile::new(inode, file, flags)))
    }

    pub(super) fn open_backing(&self, inode: &Inode, flags: i32) -> R<File> {
        let want_write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if self.opts.read_only {
            if want_write {
                return Err(Errno::EROFS);
            }
            return self
                .reopen_atime(inode, libc::O_RDONLY)
                .map_err(Errno::from);
        }
        match self.reopen_atime(inode, libc::O_RDWR) {
            Ok(f) => Ok(f),
            Err(e) if !want_write => self
                .reopen_atime(inode, libc::O_RDONLY)
                .map_err(|_| Errno::from(e)),
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// Opens the backing file for I/O. The access time is the backing
    /// filesystem's, set by the daemon's reads: on a read-only or `noatime`
    /// mount they must not set it (O_NOATIME; refused with EPERM to a daemon
    /// that neither owns the file nor has CAP_FOWNER, which then reads as
    /// before).
    fn reopen_atime(&self, inode: &Inode, flags: i32) -> std::io::Result<File> {
        if self.opts.read_only || self.opts.noatime {
            match inode.reopen(flags | libc::O_NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                r => return r,
            }
        }
        inode.reopen(flags)
    }

    /// Header of a file; `None` if it has none yet (empty file). A damaged
    /// header is EIO, logged with the backing path.
    fn read_header(&self, inode: &Inode, file: &File, op: &str) -> R<Option<FileHeader>> {
        if let Some(hd) = inode.cached_header() {
            return Ok(Some(hd));
        }
        match FileHeader::read_from(file) {
            Ok(Some(hd)) => {
                inode.cache_header(hd.clone());
                Ok(Some(hd))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                log::error!(
                    "op={op} path={} error=\"damaged file header: {e}\" result=eio",
                    inode.path_for_log()
                );
                Err(Errno::EIO)
            }
        }
    }

    /// Header of a file about to be written (write lock held): written now if
    /// the file has none yet.
    pub(super) fn ensure_header(&self, inode: &Inode, file: &File, op: &str) -> R<FileHeader> {
        if let Some(hd) = self.read_header(inode, file, op)? {
            return Ok(hd);
        }
        // Generation and header write under one hold of the active
        // generation, so a rekey's final sweep (after a barrier) sees every
        // file created with an old one.
        let hd = self.vol.keys.generations.with_active(|g, _| {
            let hd = FileHeader::generate(g)?;
            file.write_all_at(&hd.to_bytes(), 0).map(|_| hd)
        });
        let hd = hd.map_err(|e| self.fail(op, inode, e))?;
        inode.cache_header(hd.clone());
        Ok(hd)
    }

    /// The content cipher of the DEK generation `hd` names; EIO (logged) if
    /// the volume header does not hold that generation.
    fn cipher(&self, inode: &Inode, hd: &FileHeader, op: &str) -> R<FileKeys> {
        let get = |g: u16| {
            self.vol.keys.generations.get(g).ok_or_else(|| {
                log::error!(
                    "op={op} path={} error=\"file uses key generation {g}, which the volume header does not hold\" result=eio",
                    inode.path_for_log(),
                );
                Errno::EIO
            })
        };
        let keys = get(hd.generation)?;
        let split = match self.splits.get(&hd.file_id) {
            Some(f) => Some((f.next_unit, get(f.to)?)),
            None => None,
        };
        Ok(FileKeys { keys, split })
    }

    /// Header and keys of an open file to read; `None` if it has no header
    /// yet (empty file).
    fn crypt_for_read(&self, h: &OpenFile, op: &str) -> R<Option<FileCrypt>> {
        let Some(header) = self.read_header(&h.inode, &h.file, op)? else {
            return Ok(None);
        };
        let keys = self.cipher(&h.inode, &header, op)?;
        Ok(Some(FileCrypt { header, keys }))
    }

    /// Header (written now if the file has none) and keys of a file about to
    /// be written (write lock held).
    fn crypt_for_write(&self, inode: &Inode, file: &File, op: &str) -> R<FileCrypt> {
        let header = self.ensure_header(inode, file, op)?;
        let keys = self.cipher(inode, &header, op)?;
        Ok(FileCrypt { header, keys })
    }

    fn file_size(file: &File) -> R<u64> {
        Ok(plain_size(file.metadata().map_err(Errno::from)?.len()))
    }

    pub(super) fn truncate(&self, inode: &Inode, fh: Option<FileHandle>, new_size: u64) -> R<()> {
        if inode.kind == FileType::Directory {
            return Err(Errno::EISDIR);
        }
        if inode.kind != FileType::RegularFile {
            return Err(Errno::EINVAL);
        }
        let held;
        let file = match fh.and_then(|f| self.files.get(f.0)) {
            Some(h) => {
                held = h;
                &held.file
            }
            None => &inode.reopen(libc::O_RDWR).map_err(Errno::from)?,
        };
        let _g = inode.io.write_locked();
        let size = Self::file_size(file)?;
        if new_size == size {
            return Ok(());
        }
        let crypt = self.crypt_for_write(inode, file, "truncate")?;
        crypt
            .on(file)
            .truncate(size, new_size)
            .map_err(|e| self.fail("truncate", inode, e))
    }

    /// Reads into this worker thread's reusable buffer and hands the plaintext
    /// to `reply` (no per-request allocation, no copy besides pread and the
    /// reply's write to /dev/fuse); counts the read or the error in the I/O
    /// counters.
    pub(super) fn do_read(
        &self,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: impl FnOnce(R<&[u8]>),
    ) {
        self.read_plain(fh, offset, size, |r| {
            match &r {
                Ok(d) => self.opts.stats.read(d.len()),
                Err(_) => self.opts.stats.error(),
            }
            reply(r)
        })
    }

    fn read_plain(&self, fh: FileHandle, offset: u64, size: u32, reply: impl FnOnce(R<&[u8]>)) {
        let h = match self.files.get(fh.0) {
            Some(h) => h,
            None => return reply(Err(Errno::EBADF)),
        };
        let _g = h.inode.io.read_locked();
        let fsize = match Self::file_size(&h.file) {
            Ok(s) => s,
            Err(e) => return reply(Err(e)),
        };
        if offset >= fsize {
            return reply(Ok(&[]));
        }
        let crypt = match self.crypt_for_read(&h, "read") {
            Ok(Some(c)) => c,
            Ok(None) => return reply(Ok(&[])),
            Err(e) => return reply(Err(e)),
        };
        IO_BUF.with_borrow_mut(|buf| {
            let r = match crypt
                .on(&h.file)
                .read_into(fsize, offset, size as usize, buf)
            {
                Ok(range) => Ok(&buf[range]),
                Err(e) => Err(self.fail("read", &h.inode, e)),
            };
            reply(r);
            trim_io_buf(buf);
        })
    }

    /// A write request: the data written, then set-id bits and capability
    /// cleared if the kernel asks (FUSE_WRITE_KILL_SUIDGID under
    /// FUSE_HANDLE_KILLPRIV_V2); counted in the I/O counters.
    pub(super) fn do_write(
        &self,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
        caller: Caller,
    ) -> R<u32> {
        let r = self.write_data(fh, offset, data);
        if r.is_ok()
            && self.killpriv
            && flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            && let Some(h) = self.files.get(fh.0)
        {
            self.kill_priv(&h.inode, Some(caller));
        }
        match &r {
            Ok(n) => self.opts.stats.wrote(*n as usize),
            Err(_) => self.opts.stats.error(),
        }
        r
    }

    /// copy_file_range inside the volume, done here: the plaintext goes
    /// from one file's decryption to the other's encryption in 1 MiB steps,
    /// never through the caller (or the kernel's page cache). Returns the
    /// bytes copied: short at the source's end, or when a later step fails
    /// after some were copied (as copy_file_range(2) allows).
    pub(super) fn do_copy_file_range(
        &self,
        fh_in: FileHandle,
        off_in: u64,
        fh_out: FileHandle,
        off_out: u64,
        len: u64,
    ) -> R<u32> {
        const STEP: u64 = 1 << 20;
        self.ro()?;
        // The reply counts in 32 bits; the caller asks again for the rest.
        let len = len.min(u64::from(u32::MAX) & !(STEP - 1));
        let mut chunk = Vec::new();
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(STEP) as u32;
            let mut got = Ok(0);
            self.read_plain(fh_in, off_in + done, want, |r| {
                got = r.map(|d| {
                    chunk.clear();
                    chunk.extend_from_slice(d);
                    d.len()
                })
            });
            let step = match got {
                Ok(0) => break,
                Ok(n) => self.write_data(fh_out, off_out + done, &chunk[..n]),
                Err(e) => Err(e),
            };
            match step {
                Ok(n) => {
                    self.opts.stats.read(n as usize);
                    self.opts.stats.wrote(n as usize);
                    done += u64::from(n);
                    if n < want {
                        break;
                    }
                }
                Err(e) if done == 0 => {
                    self.opts.stats.error();
                    return Err(e);
                }
                Err(_) => break,
            }
        }
        Ok(done as u32)
    }

    fn write_data(&self, fh: FileHandle, offset: u64, data: &[u8]) -> R<u32> {
        self.ro()?;
        let h = self.files.get(fh.0).ok_or(Errno::EBADF)?;
        let _g = h.inode.io.write_locked();
        let crypt = self.crypt_for_write(&h.inode, &h.file, "write")?;
        let size = Self::file_size(&h.file)?;
        // With the writeback cache the kernel resolves O_APPEND itself and
        // sends page writes at their real offsets.
        let off = if h.append && !self.writeback {
            size
        } else {
            offset
        };
        IO_BUF
            .with_borrow_mut(|buf| {
                let r = crypt.on(&h.file).write_with(size, off, data, buf);
                trim_io_buf(buf);
                r
            })
            .map_err(|e| self.fail("write", &h.inode, e))?;
        Ok(data.len() as u32)
    }

    pub(super) fn do_fallocate(
        &self,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        caller: Caller,
    ) -> R<()> {
        self.ro()?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let how = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => None,
            libc::FALLOC_FL_PUNCH_HOLE if keep => Some(Release::Punch),
            libc::FALLOC_FL_ZERO_RANGE => Some(Release::Zero),
            // PUNCH_HOLE without KEEP_SIZE (the VFS refuses it too),
            // COLLAPSE_RANGE and INSERT_RANGE (the kernel's FUSE module does
            // not pass them on; they would move units to other indexes, and
            // so other tweaks), UNSHARE_RANGE and whatever comes next.
            _ => return Err(Errno::EOPNOTSUPP),
        };
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let h = self.files.get(fh.0).ok_or(Errno::EBADF)?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let _g = h.inode.io.write_locked();
        match how {
            None => self.allocate(&h, offset, end, keep)?,
            Some(how) => self.zero_range(&h, offset, end, keep, how)?,
        }
        // fallocate modifies the file like a write: a caller without
        // CAP_FSETID (non-root here) loses the set-id bits (xfstests generic/683).
        if caller.uid != 0 {
            self.kill_priv(&h.inode, Some(caller));
        }
        Ok(())
    }

    /// fallocate mode 0 or KEEP_SIZE (write lock held): the size extended as
    /// truncate does, then backing space preallocated (it reads back as
    /// zeros: all-zero ciphertext is a hole). A backing file system without
    /// fallocate is let through.
    fn allocate(&self, h: &OpenFile, offset: u64, end: u64, keep: bool) -> R<()> {
        let crypt = self.crypt_for_write(&h.inode, &h.file, "fallocate")?;
        let size = Self::file_size(&h.file)?;
        if !keep && end > size {
            crypt
                .on(&h.file)
                .truncate(size, end)
                .map_err(|e| self.fail("fallocate", &h.inode, e))?;
        }
        Self::preallocate(&h.file, offset, end)
    }

    /// Backing space for plaintext `[offset, end)`, the size kept; a backing
    /// file system without fallocate is let through.
    fn preallocate(file: &File, offset: u64, end: u64) -> R<()> {
        let mode = libc::FALLOC_FL_KEEP_SIZE;
        match sys::fallocate(file, mode, HEADER_LEN + offset, end - offset) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// FALLOC_FL_PUNCH_HOLE | KEEP_SIZE and FALLOC_FL_ZERO_RANGE (write lock
    /// held; docs/FORMAT.md 6.4.2). The backing file system must be able to
    /// punch holes (probed before anything changes, EOPNOTSUPP otherwise).
    /// A zero range without KEEP_SIZE first extends the size as truncate
    /// does; then whole units in the range are released on the backing file
    /// and the partial units at its edges re-encrypted with zeros (under the
    /// same keys and rekey frontier as a write); a zero range finally
    /// preallocates the range, as FALLOC_FL_ZERO_RANGE leaves it allocated.
    fn zero_range(&self, h: &OpenFile, offset: u64, end: u64, keep: bool, how: Release) -> R<()> {
        let fail = |e| self.fail("fallocate", &h.inode, e);
        content::probe_punch(&h.file).map_err(Errno::from)?;
        let mut size = Self::file_size(&h.file)?;
        if !keep && end > size {
            let crypt = self.crypt_for_write(&h.inode, &h.file, "fallocate")?;
            crypt.on(&h.file).truncate(size, end).map_err(fail)?;
            size = end;
        }
        if offset < size {
            let crypt = self.crypt_for_write(&h.inode, &h.file, "fallocate")?;
            IO_BUF
                .with_borrow_mut(|buf| {
                    let r = crypt.on(&h.file).zero(size, offset, end, how, buf);
                    trim_io_buf(buf);
                    r
                })
                .map_err(fail)?;
        }
        if how == Release::Zero {
            Self::preallocate(&h.file, offset, end)?;
        }
        Ok(())
    }

    pub(super) fn do_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> R<i64> {
        // With the writeback cache, while a handle may write the file the
        // kernel can hold dirty pages that the backing file does not show yet
        // (close writes them back first), so the backing file's holes are not
        // the file's holes. ENOSYS makes the kernel use its generic lseek (the
        // whole file is data, up to its own size), which is always correct;
        // it does so for the rest of this mount.
        if self.writeback
            && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE)
            && self
                .files
                .get(fh.0)
                .is_some_and(|h| h.inode.writers.load(std::sync::atomic::Ordering::Acquire) > 0)
        {
            return Err(Errno::ENOSYS);
        }
        let h = self.files.get(fh.0).ok_or(Errno::EBADF)?;
        let _g = h.inode.io.read_locked();
        let size = Self::file_size(&h.file)?;
        if offset < 0 {
            return Err(Errno::EINVAL);
        }
        let off = offset as u64;
        match whence {
            libc::SEEK_DATA | libc::SEEK_HOLE => {}
            libc::SEEK_SET => return Ok(offset),
            libc::SEEK_END => return Ok(size as i64 + offset),
            _ => return Err(Errno::EINVAL),
        }
        if off >= size {
            return Err(Errno::ENXIO);
        }
        let pos = match sys::lseek(&h.file, HEADER_LEN + off, whence) {
            Ok(p) => p.saturating_sub(HEADER_LEN).max(off),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && whence == libc::SEEK_HOLE => size,
            Err(e) => return Err(Errno::from(e)),
        };
        if whence == libc::SEEK_HOLE {
            Ok(pos.min(size) as i64)
        } else if pos >= size {
            Err(Errno::ENXIO)
        } else {
            Ok(pos as i64)
        }
    }

    pub(super) fn do_fsync(&self, fh: FileHandle, datasync: bool) -> R<()> {
        let h = self.files.get(fh.0).ok_or(Errno::EBADF)?;
        if datasync {
            h.file.sync_data()
        } else {
            h.file.sync_all()
        }
        .map_err(Errno::from)
    }
}

/// Largest request buffer a worker thread keeps between requests.
const IO_BUF_KEEP: usize = (1 << 20) + 2 * 4096;

thread_local! {
    /// Per worker thread: plaintext/ciphertext of the current read or write,
    /// reused so the data path does not allocate per request.
    static IO_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees an unusually large buffer (a request bigger than max_write can only
/// come from internal callers) so idle threads stay small.
fn trim_io_buf(buf: &mut Vec<u8>) {
    if buf.capacity() > IO_BUF_KEEP {
        *buf = Vec::new();
    }
}

/// The content keys of one file: those of its header's generation, and
/// while a rekey is half way through it, the new generation's below the
/// frontier.
struct FileKeys {
    keys: Arc<GenKeys>,
    split: Option<(u64, Arc<GenKeys>)>,
}

impl FileKeys {
    fn units(&self) -> Units<'_> {
        match &self.split {
            None => Units::One(&self.keys.content),
            Some((at, below)) => Units::Split {
                below: &below.content,
                above: &self.keys.content,
                at: *at,
            },
        }
    }
}

/// A file's header with the content keys it names: what reading or writing
/// its units needs.
struct FileCrypt {
    header: FileHeader,
    keys: FileKeys,
}

impl FileCrypt {
    /// The backing file `file` seen through this header and these keys (the
    /// one place the filesystem builds a [`BackingFile`]).
    fn on<'a>(&'a self, file: &'a File) -> BackingFile<'a> {
        BackingFile {
            file,
            cipher: self.keys.units(),
            header: &self.header,
        }
    }
}
