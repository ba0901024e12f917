//! Directories: lookup, mkdir (made under a temporary name with its id, then
//! renamed into place), rmdir, and listing (opendir takes a snapshot,
//! readdir/readdirplus page through it).

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, INodeNo, ReplyDirectory, ReplyDirectoryPlus, Request,
};

use super::handle::{DirEntry, OpenDir};
use super::inode::Inode;
use super::{KmfsFs, R, read_lock};
use crate::crypto::names::DIR_ID_LEN;
use crate::sync::MutexExt;
use crate::sys;
use crate::volume::dirid;

impl KmfsFs {
    pub(super) fn do_opendir(&self, ino: INodeNo) -> R<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let entries = self.snapshot(&inode)?;
        Ok(self.dirs.insert(OpenDir::new(inode, entries)))
    }

    pub(super) fn do_readdir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> R<()> {
        let d = self.dirs.get(fh.0).ok_or(Errno::EBADF)?;
        if offset == 0 && d.restarts() {
            let fresh = self.snapshot(&d.inode)?;
            *d.entries.locked() = fresh;
        }
        let dfd = d.inode.fd()?;
        let dev = sys::fstat(dfd.as_fd()).map_err(Errno::from)?.st_dev;
        let entries = d.entries.locked();
        let mut i = offset;
        loop {
            let full = match i {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(ino, 2, FileType::Directory, ".."),
                _ => match entries.get((i - 2) as usize) {
                    Some(e) => {
                        let id = self.inodes.ino_for(dfd.as_fd(), &e.backing, dev, e.ino);
                        if id == u64::MAX
                            && sys::fstatat(dfd.as_fd(), &e.backing, libc::AT_SYMLINK_NOFOLLOW)
                                .is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT))
                        {
                            // Removed since the snapshot, and its node id is
                            // gone with it: left out, as readdirplus does
                            // (a stale entry must not show a made-up d_ino,
                            // xfstests generic/637).
                            false
                        } else {
                            reply.add(INodeNo(id), i + 1, e.kind, &e.name)
                        }
                    }
                    None => break,
                },
            };
            if full {
                break;
            }
            i += 1;
        }
        Ok(())
    }

    pub(super) fn do_fsyncdir(&self, ino: INodeNo) -> R<()> {
        let inode = self.inode(ino)?;
        inode
            .reopen(libc::O_RDONLY | libc::O_DIRECTORY)
            .and_then(|f| f.sync_all())
            .map_err(Errno::from)
    }

    /// Takes a kernel reference to the backing entry `backing` of `parent`.
    pub(super) fn lookup_backing(
        &self,
        parent: &Inode,
        backing: &CStr,
    ) -> R<(Arc<Inode>, FileAttr)> {
        let fd = parent.open_child(backing).map_err(Errno::from)?;
        self.lookup_opened(fd)
    }

    /// [`Self::lookup_backing`] for an entry the inode table is likely to
    /// hold already (a name the kernel looks up again, a listed entry it
    /// knows): one `fstatat`, and no open when the table holds the backing
    /// inode with an open descriptor (`InodeTable::take_live`); otherwise
    /// the entry is opened as `lookup_backing` does.
    ///
    /// The caller holds `parent`'s names lock, and the kernel holds the
    /// directory's lock shared for a lookup or a listing, which an unlink
    /// or rename in it takes exclusively: the name still names the inode
    /// `fstatat` saw when the table is asked. (A revalidating lookup holds
    /// no lock; an answer that is stale by then only makes the kernel drop
    /// its entry and look the name up again.)
    fn lookup_known(&self, parent: &Inode, backing: &CStr) -> R<(Arc<Inode>, FileAttr)> {
        let st = sys::fstatat(parent.fd()?.as_fd(), backing, libc::AT_SYMLINK_NOFOLLOW)
            .map_err(Errno::from)?;
        if let Some(inode) = self.inodes.take_live((st.st_dev, st.st_ino)) {
            let attr = self.attr(&inode, &st);
            return Ok((inode, attr));
        }
        self.lookup_backing(parent, backing)
    }

    /// Registers the entry opened as `fd` (an `O_PATH` descriptor).
    fn lookup_opened(&self, fd: OwnedFd) -> R<(Arc<Inode>, FileAttr)> {
        let st = sys::fstat(fd.as_fd()).map_err(Errno::from)?;
        let inode = self.inodes.lookup(fd, &st);
        let attr = self.attr(&inode, &st);
        Ok((inode, attr))
    }

    pub(super) fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> R<(Arc<Inode>, FileAttr)> {
        // Only the kernel's export operations ask for these (export.rs).
        match name.as_bytes() {
            b"." => return self.lookup_self(parent.0),
            b".." => return self.lookup_parent(parent.0),
            _ => {}
        }
        let parent = self.inode(parent)?;
        if parent.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let _n = read_lock(&parent.names);
        let b = match self.names.encode(&parent, name) {
            Ok(b) => b,
            // A reserved name cannot exist in plaintext-names mode.
            Err(e) if e == Errno::EPERM => return Err(Errno::ENOENT),
            Err(e) => return Err(e),
        };
        let (inode, attr) = self.lookup_known(&parent, &b.name)?;
        self.note_link(&inode, &parent, name);
        Ok((inode, attr))
    }

    pub(super) fn do_mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> R<(Arc<Inode>, FileAttr)> {
        self.ro()?;
        let parent = self.inode(parent)?;
        let pfd = parent.fd()?;
        let _n = read_lock(&parent.names);
        let b = self.names.encode(&parent, name)?;
        let perm = self.create_mode(&parent, mode, umask);
        if self.names.plaintext() {
            sys::mkdirat(pfd.as_fd(), &b.name, perm).map_err(Errno::from)?;
            return self.finish_new(&parent, &b, req, perm);
        }
        // Made under a reserved temporary name with its id, then renamed into
        // place, so no directory is ever visible without an id.
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|_| Errno::EIO)?;
        let tmp = sys::cstr(format!("kmfs.tmp.{}", crate::volume::hex(&rnd)).as_bytes())
            .map_err(Errno::from)?;
        sys::mkdirat(pfd.as_fd(), &tmp, perm).map_err(Errno::from)?;
        let cleanup = |fd: Option<&OwnedFd>| {
            if let Some(fd) = fd {
                let _ = sys::unlinkat(fd.as_fd(), c"kmfs.dirid", 0);
                let _ = sys::unlinkat(fd.as_fd(), c"kmfs.dirid.tmp", 0);
            }
            let _ = sys::unlinkat(pfd.as_fd(), &tmp, libc::AT_REMOVEDIR);
        };
        let tfd = match parent.open_child(&tmp) {
            Ok(f) => f,
            Err(e) => {
                cleanup(None);
                return Err(Errno::from(e));
            }
        };
        let tpath = sys::proc_path(tfd.as_raw_fd());
        // The new directory's names use the active generation (held, so a
        // rekey's final sweep sees it).
        let key = self.vol.keys.generations.with_active(|g, _| {
            dirid::create(Path::new(OsStr::from_bytes(tpath.as_bytes())), g).map(|id| (id, g))
        });
        let key: ([u8; DIR_ID_LEN], u16) = match key {
            Ok(k) => k,
            Err(e) => {
                cleanup(Some(&tfd));
                return Err(self.fail("mkdir", &parent, e));
            }
        };
        self.set_owner(&parent, tfd.as_fd(), req, perm);
        let placed = self.with_sidecar(&parent, &b, || {
            match sys::renameat2(
                pfd.as_fd(),
                &tmp,
                pfd.as_fd(),
                &b.name,
                libc::RENAME_NOREPLACE,
            ) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Backing filesystem without RENAME_NOREPLACE.
                    match sys::fstatat(pfd.as_fd(), &b.name, libc::AT_SYMLINK_NOFOLLOW) {
                        Ok(_) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                        Err(_) => sys::renameat2(pfd.as_fd(), &tmp, pfd.as_fd(), &b.name, 0),
                    }
                }
                r => r,
            }
        });
        if let Err(e) = placed {
            cleanup(Some(&tfd));
            return Err(e);
        }
        let st = sys::fstat(tfd.as_fd()).map_err(Errno::from)?;
        let inode = self.inodes.lookup(tfd, &st);
        inode.cache_dir_key(key);
        let attr = self.attr(&inode, &st);
        Ok((inode, attr))
    }

    /// Removes the bookkeeping of an empty backing directory so that the
    /// backing rmdir/rename-over can succeed; returns its id for restoring.
    pub(super) fn strip_empty_dir(
        &self,
        dir_fd: BorrowedFd<'_>,
    ) -> R<Option<([u8; DIR_ID_LEN], u16)>> {
        if !self.names.dir_is_empty(dir_fd)? {
            return Err(Errno::ENOTEMPTY);
        }
        if self.names.plaintext() {
            return Ok(None);
        }
        let p = sys::proc_path(dir_fd.as_raw_fd());
        let path = Path::new(OsStr::from_bytes(p.as_bytes()));
        let id = dirid::read(path).ok();
        let _ = sys::unlinkat(dir_fd, c"kmfs.dirid.tmp", 0);
        match sys::unlinkat(dir_fd, c"kmfs.dirid", 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(Errno::from(e)),
        }
        Ok(id)
    }

    pub(super) fn restore_dirid(
        &self,
        dir_fd: BorrowedFd<'_>,
        id: Option<([u8; DIR_ID_LEN], u16)>,
    ) {
        if let Some((id, g)) = id {
            let p = sys::proc_path(dir_fd.as_raw_fd());
            if let Err(e) = dirid::write(Path::new(OsStr::from_bytes(p.as_bytes())), &id, g) {
                log::error!(
                    "op=restore_dirid path={} error=\"{e}\"",
                    sys::fd_path(dir_fd)
                );
            }
        }
    }

    pub(super) fn do_rmdir(&self, parent: INodeNo, name: &OsStr) -> R<()> {
        self.ro()?;
        let parent = self.inode(parent)?;
        let pfd = parent.fd()?;
        let _n = read_lock(&parent.names);
        let b = self.names.encode(&parent, name)?;
        let cfd = parent.open_child(&b.name).map_err(Errno::from)?;
        let st = sys::fstat(cfd.as_fd()).map_err(Errno::from)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        // The directory's own names lock too (parent before child, as a
        // rekey never takes them the other way round): a rekey rewriting its
        // id, with a temporary file beside it for a moment, finishes first,
        // so the emptiness check and the removal see a settled directory.
        let child = self.inodes.by_backing(st.st_dev, st.st_ino);
        let _c = child.as_ref().map(|c| read_lock(&c.names));
        let id = self.strip_empty_dir(cfd.as_fd())?;
        if let Err(e) = sys::unlinkat(pfd.as_fd(), &b.name, libc::AT_REMOVEDIR) {
            self.restore_dirid(cfd.as_fd(), id);
            return Err(Errno::from(e));
        }
        self.names.remove_sidecar(&parent, &b);
        Ok(())
    }

    fn snapshot(&self, dir: &Inode) -> R<Vec<DirEntry>> {
        let list = {
            let _n = read_lock(&dir.names);
            self.names.list(dir)?
        };
        Ok(list
            .into_iter()
            .map(|e| DirEntry {
                ino: e.d_ino,
                name: e.name,
                backing: e.backing,
                kind: e.kind,
            })
            .collect())
    }

    /// A readdir snapshot entry looked up for readdirplus. A rekey may have
    /// renamed the backing entry since the snapshot: then its plaintext name
    /// is encoded again.
    fn lookup_listed(&self, dir: &Inode, dev: u64, e: &DirEntry) -> R<(Arc<Inode>, FileAttr)> {
        let _n = read_lock(&dir.names);
        // An entry the table holds open (a directory listed again, as rm -rf
        // and find do) costs one fstatat instead of an open, a stat and a
        // close.
        let known = self.inodes.by_backing(dev, e.ino).is_some();
        let first = if known {
            self.lookup_known(dir, &e.backing)
        } else {
            self.lookup_backing(dir, &e.backing)
        };
        let (inode, attr) = match first {
            Err(err) if err == Errno::ENOENT && !self.names.plaintext() => {
                let b = self.names.encode(dir, &e.name)?;
                self.lookup_backing(dir, &b.name)
            }
            r => r,
        }?;
        self.note_link(&inode, dir, &e.name);
        Ok((inode, attr))
    }

    pub(super) fn do_readdirplus(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> R<()> {
        let d = self.dirs.get(fh.0).ok_or(Errno::EBADF)?;
        if offset == 0 && d.restarts() {
            let fresh = self.snapshot(&d.inode)?;
            *d.entries.locked() = fresh;
        }
        let dst = sys::fstat(d.inode.fd()?.as_fd()).map_err(Errno::from)?;
        let dattr = self.attr(&d.inode, &dst);
        let ttl = self.opts.ttl;
        let mut i = offset;
        loop {
            let full = match i {
                0 => reply.add(ino, 1, ".", &ttl, &dattr, self.generation(ino.0)),
                1 => reply.add(ino, 2, "..", &ttl, &dattr, self.generation(ino.0)),
                _ => {
                    // Copied out: the listing's lock is a leaf (lookup_listed
                    // takes the names lock and the inode table).
                    let Some(e) = d.entries.locked().get((i - 2) as usize).cloned() else {
                        break;
                    };
                    let e = &e;
                    match self.lookup_listed(&d.inode, dst.st_dev, e) {
                        Ok((inode, attr)) => {
                            let full = reply.add(
                                INodeNo(inode.ino),
                                i + 1,
                                &e.name,
                                &ttl,
                                &attr,
                                self.generation(inode.ino),
                            );
                            if full {
                                self.inodes.forget(inode.ino, 1);
                            }
                            full
                        }
                        Err(_) => false,
                    }
                }
            };
            if full {
                break;
            }
            i += 1;
        }
        Ok(())
    }
}
