//! The FUSE filesystem: the plaintext view of a volume.
//!
//! Design (see also the module docs of [`inode`], [`names`], [`crate::crypto::xattr`]):
//! * every known inode is an `O_PATH` descriptor into the backing directory;
//!   all operations are `*at` system calls relative to those descriptors;
//! * node ids are backing inode numbers (root = 1), hard links share one;
//! * the daemon runs as root with `default_permissions`, so the kernel checks
//!   permissions; new entries are chowned to the caller;
//! * requests are served by several fuser worker threads; a per-inode RwLock
//!   lets reads of one file run in parallel and serialises its writes and
//!   truncates (read-modify-write of partial units); multi-unit requests are
//!   encrypted/decrypted in parallel by rayon inside the content cipher;
//! * the kernel's writeback cache is on (unless read-only or disabled in
//!   [`FsOptions`]): writes land in the page cache and reach the daemon in
//!   large batches, the kernel resolves O_APPEND with its own size and may
//!   read partial pages first (backing files are always opened read-write);
//!   without it, O_APPEND writes are placed at the current size under the
//!   write lock. Attribute and entry timeouts are 1 s, max_write is 1 MiB;
//! * reads and writes decrypt/encrypt in a per-worker-thread buffer that is
//!   reused across requests; a write reads back only the partial units at
//!   its ends;
//! * fallocate: mode 0 and FALLOC_FL_KEEP_SIZE extend the plaintext size as
//!   truncate does, then preallocate backing space (it reads back as zeros:
//!   all-zero ciphertext units are holes); PUNCH_HOLE | KEEP_SIZE and
//!   ZERO_RANGE (± KEEP_SIZE) release the whole units of the range on the
//!   backing file and re-encrypt the partial units at its edges, EOPNOTSUPP
//!   where the backing filesystem cannot punch holes; COLLAPSE_RANGE and
//!   INSERT_RANGE return EOPNOTSUPP (the kernel does not pass them to FUSE);
//! * lseek SEEK_DATA/SEEK_HOLE map to the backing file's holes (shifted by the
//!   40-byte file header): a reported hole always reads as zeros;
//! * damaged headers, units, names: EIO for that file or entry, logged with the
//!   backing path, never a panic.
//!
//! Layout (as gocryptfs splits its `fusefrontend`): this file holds the
//! filesystem's state and a thin `impl Filesystem` that parses each request,
//! calls a `do_*` method and answers through `send`; the operations live in
//! `dir.rs` (lookup, mkdir, rmdir, listing), `entry.rs` (create, mknod,
//! symlink, link, unlink, rename), `file_io.rs` (open, read, write, truncate,
//! fallocate, lseek, file headers), `xattr.rs` (extended attributes) and
//! `attr.rs` (attributes, set-id rules, times); `stats.rs` holds the I/O
//! counters.

mod attr;
mod bind;
mod dir;
mod entry;
mod export;
mod fd_cache;
mod file_io;
pub mod gate;
pub mod handle;
pub mod inode;
pub mod names;
pub mod root;
pub mod stats;
mod xattr;

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::crypto::xattr::XattrCipher;
use crate::sync::RwLockExt;
use crate::sys;
use crate::volume::VolumeView;
use crate::volume::dirid;
use attr::Caller;
use handle::{Handles, OpenDir, OpenFile};
use inode::{Inode, InodeTable};
use names::Names;
use stats::IoStats;
use xattr::XattrReply;

/// Mount-time behaviour of the filesystem.
#[derive(Clone, Debug)]
pub struct FsOptions {
    pub read_only: bool,
    /// Attribute and entry cache timeout.
    pub ttl: Duration,
    /// I/O counters shown by `kmfs status`.
    pub stats: Arc<IoStats>,
    /// Do not ask for the kernel's writeback cache (every write goes through).
    pub no_writeback: bool,
    /// `noatime`: reads do not update the access time (with FUSE the
    /// daemon's backing reads set it, not the kernel).
    pub noatime: bool,
    /// The session's notifier, set by the mounter once the session exists
    /// (used to invalidate cached attributes the kernel cannot know changed).
    pub notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            read_only: false,
            ttl: Duration::from_secs(1),
            stats: Arc::default(),
            no_writeback: false,
            noatime: false,
            notifier: Arc::default(),
        }
    }
}

pub struct KmfsFs {
    vol: Arc<VolumeView>,
    inodes: Arc<InodeTable>,
    /// Renames and links in flight (`gate::Moves`): a rekey's final sweep
    /// checks that none ran while it looked, or holds them off.
    moves: Arc<gate::Moves>,
    /// Files a running rekey has re-encrypted part of.
    splits: Arc<gate::Splits>,
    files: Handles<OpenFile>,
    dirs: Handles<OpenDir>,
    names: Names,
    /// Attribute ciphers per key generation, made on first use.
    xattrs: Mutex<Vec<(u16, Arc<XattrCipher>)>>,
    root_dir: File,
    /// The mount root's owner and mode, kept apart from the backing root's.
    root: root::Root,
    opts: FsOptions,
    /// The kernel's writeback cache is on (negotiated at init).
    writeback: bool,
    /// FUSE_HANDLE_KILLPRIV_V2 is on: the daemon clears set-id bits and
    /// capabilities (negotiated at init).
    killpriv: bool,
}

type R<T> = Result<T, Errno>;

/// A fuser reply that can carry an error (every kind can; fuser has no common
/// trait for it).
trait ErrorReply {
    fn error(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),* $(,)?) => {$(
        impl ErrorReply for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}

error_reply!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr,
);

/// Answers a request: a result through `ok`, an error as it is.
fn send<P: ErrorReply, T>(reply: P, r: R<T>, ok: impl FnOnce(P, T)) {
    match r {
        Ok(v) => ok(reply, v),
        Err(e) => {
            if e == Errno::EMFILE || e == Errno::ENFILE {
                inode::note_fd_exhaustion(e);
            }
            reply.error(e)
        }
    }
}

fn read_lock(l: &std::sync::RwLock<()>) -> std::sync::RwLockReadGuard<'_, ()> {
    l.read_locked()
}

fn is_crypto_error(e: &io::Error) -> bool {
    e.raw_os_error().is_none()
}

impl KmfsFs {
    /// Builds the filesystem for an unlocked volume. Checks that the backing
    /// root is a directory (and, with encrypted names, has its directory id).
    pub fn new(vol: Arc<VolumeView>, opts: FsOptions) -> io::Result<KmfsFs> {
        let root_dir = File::open(&vol.backing)?;
        let root_path = sys::openat(root_dir.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(root_path.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let inodes = Arc::new(InodeTable::new(root_path, &st));
        let names = Names::new(vol.clone());
        if !names.plaintext() {
            inodes.root().cache_dir_key(dirid::read(&vol.backing)?);
        }
        let xattrs = Mutex::new(Vec::new());
        let fs = KmfsFs {
            vol,
            inodes,
            moves: Arc::default(),
            splits: Arc::default(),
            files: Handles::default(),
            dirs: Handles::default(),
            names,
            xattrs,
            root: root::Root::load(std::os::fd::AsFd::as_fd(&root_dir)),
            root_dir,
            opts,
            writeback: false,
            killpriv: false,
        };
        fs.warn_if_unbound();
        Ok(fs)
    }

    /// The gate a rekey of this volume goes through while it is mounted.
    pub fn rekey_gate(&self) -> Arc<dyn crate::rekey::FileGate> {
        Arc::new(gate::FsGate {
            inodes: self.inodes.clone(),
            moves: self.moves.clone(),
            splits: self.splits.clone(),
        })
    }

    fn inode(&self, ino: INodeNo) -> R<Arc<Inode>> {
        self.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    fn ro(&self) -> R<()> {
        if self.opts.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Logs a damaged-data error and turns it into EIO; passes OS errors on.
    fn fail(&self, op: &str, inode: &Inode, e: io::Error) -> Errno {
        if is_crypto_error(&e) {
            log::error!(
                "op={op} path={} error=\"{e}\" result=eio",
                inode.path_for_log()
            );
            Errno::EIO
        } else {
            Errno::from(e)
        }
    }

    /// The FUSE generation of node id `ino` (`export::Ids::generation`).
    fn generation(&self, ino: u64) -> Generation {
        Generation(self.inodes.ids().generation(ino))
    }

    /// Answers a request that makes or finds an entry.
    fn reply_entry(&self, reply: ReplyEntry, r: R<(Arc<Inode>, FileAttr)>) {
        send(reply, r, |r, (_, attr)| {
            r.entry(&self.opts.ttl, &attr, self.generation(attr.ino.0))
        });
    }
}

impl Filesystem for KmfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_MAX_PAGES,
            // Node ids name backing inodes on their own (`export.rs`):
            // the kernel may reopen a file handle by LOOKUP of ".".
            InitFlags::FUSE_EXPORT_SUPPORT,
        ] {
            let _ = config.add_capabilities(cap);
        }
        // Writeback cache: the kernel keeps written pages and sends them in
        // large batches (and resolves O_APPEND with its own size). Its size
        // and mtime are then authoritative, which holds because the backing
        // directory is only changed through this mount.
        if !self.opts.read_only && !self.opts.no_writeback {
            self.writeback = config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
        }
        // We clear set-id bits and file capabilities on write, truncate and
        // chown ourselves (see `kill_priv`); in exchange the kernel marks the
        // superblock SB_NOSEC and stops asking for security.capability (one
        // GETXATTR round trip) before every write(2) and chown.
        if !self.opts.read_only {
            self.killpriv = config
                .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
                .is_ok();
        }
        Ok(())
    }

    fn destroy(&mut self) {
        log::info!(
            "op=destroy volume={} open_files={} inodes={}",
            self.vol.id_hex(),
            self.files.len(),
            self.inodes.len()
        );
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.reply_entry(reply, self.do_lookup(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        send(reply, self.do_getattr(ino), |r, a| {
            r.attr(&self.opts.ttl, &a)
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let caller = Caller::of(req);
        let r = self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh, caller);
        send(reply, r, |r, a| r.attr(&self.opts.ttl, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        send(reply, self.do_readlink(ino), |r, t| r.data(&t));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.do_mknod(req, parent, name, mode, umask, rdev);
        self.reply_entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.do_mkdir(req, parent, name, mode, umask);
        self.reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        send(reply, self.do_unlink(parent, name), |r, ()| r.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        send(reply, self.do_rmdir(parent, name), |r, ()| r.ok());
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.do_symlink(req, parent, link_name, target);
        self.reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.do_rename(parent, name, newparent, newname, flags);
        send(reply, r, |r, ()| r.ok());
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.do_link(ino, newparent, newname);
        self.reply_entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        send(reply, self.do_open(ino, flags.0), |r, fh| {
            r.opened(FileHandle(fh), FopenFlags::empty())
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.do_read(fh, offset, size, |r| send(reply, r, ReplyData::data));
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.do_write(fh, offset, data, write_flags, Caller::of(req));
        send(reply, r, ReplyWrite::written);
    }

    /// Nothing to do on close (writes are synchronous to the backing file and
    /// POSIX locks are the kernel's): ENOSYS makes the kernel stop sending
    /// FLUSH at all, one round trip less per close(2). With the writeback
    /// cache the kernel still writes dirty pages back before close returns.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        send(reply, self.do_fsync(fh, datasync), |r, ()| r.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        send(reply, self.do_opendir(ino), |r, fh| {
            r.opened(FileHandle(fh), FopenFlags::empty())
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.do_readdir(ino, fh, offset, &mut reply);
        send(reply, r, |r, ()| r.ok());
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.do_readdirplus(ino, fh, offset, &mut reply);
        send(reply, r, |r, ()| r.ok());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        send(reply, self.do_fsyncdir(ino), |r, ()| r.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = sys::fstatvfs(&self.root_dir).map_err(Errno::from);
        send(reply, r, |r, s| {
            r.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            )
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.do_setxattr(ino, name, value, flags, Caller::of(req));
        if r.is_ok() {
            // ctime, and the backing inode's blocks, changed.
            self.invalidate_attrs(ino.0);
        }
        send(reply, r, |r, ()| r.ok());
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self
            .do_getxattr(ino, name)
            .and_then(|v| XattrReply::fit(v, size));
        send(reply, r, |r, x| x.send(r));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self
            .do_listxattr(ino)
            .and_then(|v| XattrReply::fit(v, size));
        send(reply, r, |r, x| x.send(r));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.do_removexattr(ino, name);
        if r.is_ok() {
            self.invalidate_attrs(ino.0);
        }
        send(reply, r, |r, ()| r.ok());
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions (default_permissions); this only
        // answers whether the inode still exists.
        send(reply, self.inode(ino).map(drop), |r, ()| r.ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.do_create(req, parent, name, mode, umask, flags);
        send(reply, r, |r, (attr, fh)| {
            r.created(
                &self.opts.ttl,
                &attr,
                self.generation(attr.ino.0),
                FileHandle(fh),
                FopenFlags::empty(),
            )
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.do_fallocate(fh, offset, length, mode, Caller::of(req));
        send(reply, r, |r, ()| r.ok());
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = if flags.bits() != 0 {
            Err(Errno::EINVAL)
        } else {
            self.do_copy_file_range(fh_in, offset_in, fh_out, offset_out, len)
        };
        send(reply, r, |r, n| r.written(n));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        send(reply, self.do_lseek(fh, offset, whence), ReplyLseek::offset);
    }

    /// No ioctl is supported: terminal ioctls (TCGETS from isatty(3), which
    /// Python and many programs call on every open) and the FS_IOC_*FLAGS
    /// family get ENOTTY, the errno of a file that is not a terminal and of a
    /// filesystem without inode flags — answered quietly (debug level only)
    /// instead of fuser's default ENOSYS with a warning per call.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        log::debug!("op=ioctl ino={} cmd={cmd:#x} result=ENOTTY", ino.0);
        reply.error(Errno::ENOTTY);
    }
}
