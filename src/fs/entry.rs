//! Entries: create, mknod, symlink (and readlink), link, unlink and rename.
//! A long encrypted name's sidecar is written before the entry and removed
//! again when the entry could not be made or goes away.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{Errno, FileAttr, FileType, INodeNo, RenameFlags, Request};

use super::bind::RenameEnds;
use super::handle::OpenFile;
use super::inode::Inode;
use super::names::BackingName;
use super::{KmfsFs, R, read_lock};
use crate::sync::RwLockExt;
use crate::sys;
use crate::volume::dirid;

impl KmfsFs {
    pub(super) fn do_readlink(&self, ino: INodeNo) -> R<Vec<u8>> {
        let inode = self.inode(ino)?;
        self.read_target(&inode)
    }

    /// Registers a freshly created entry `b` of `parent`.
    pub(super) fn finish_new(
        &self,
        parent: &Inode,
        b: &BackingName,
        req: &Request,
        mode: u32,
    ) -> R<(Arc<Inode>, FileAttr)> {
        let fd = parent.open_child(&b.name).map_err(Errno::from)?;
        self.set_owner(parent, fd.as_fd(), req, mode);
        let st = sys::fstat(fd.as_fd()).map_err(Errno::from)?;
        let inode = self.inodes.lookup(fd, &st);
        let attr = self.attr(&inode, &st);
        Ok((inode, attr))
    }

    /// Runs `make` to create entry `b` in `parent`, with the long-name sidecar
    /// written before and removed again if the entry could not be made.
    pub(super) fn with_sidecar(
        &self,
        parent: &Inode,
        b: &BackingName,
        make: impl FnOnce() -> io::Result<()>,
    ) -> R<()> {
        self.names
            .write_sidecar(parent, b)
            .map_err(|e| self.fail("sidecar", parent, e))?;
        match make() {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    self.names.remove_sidecar(parent, b);
                }
                Err(Errno::from(e))
            }
        }
    }

    pub(super) fn do_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> R<(Arc<Inode>, FileAttr)> {
        self.ro()?;
        let parent = self.inode(parent)?;
        let pfd = parent.fd()?;
        let b = self.names.encode(&parent, name)?;
        let perm = self.create_mode(&parent, mode, umask);
        let fmt = mode & libc::S_IFMT;
        self.with_sidecar(&parent, &b, || {
            if fmt == libc::S_IFREG || fmt == 0 {
                sys::openat(
                    pfd.as_fd(),
                    &b.name,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                    perm,
                )
                .map(drop)
            } else {
                sys::mknodat(pfd.as_fd(), &b.name, fmt | perm, rdev as u64)
            }
        })?;
        self.finish_new(&parent, &b, req, perm)
    }

    pub(super) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> R<(FileAttr, u64)> {
        self.ro()?;
        let parent = self.inode(parent)?;
        let pfd = parent.fd()?;
        let _n = read_lock(&parent.names);
        let b = self.names.encode(&parent, name)?;
        let perm = self.create_mode(&parent, mode, umask);
        let made = self.with_sidecar(&parent, &b, || {
            sys::openat(
                pfd.as_fd(),
                &b.name,
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
                perm,
            )
            .map(drop)
        });
        // The kernel sends CREATE only after its LOOKUP found nothing, so an
        // entry that exists now appeared in between (another client, or the
        // backing store). Opening it here would open it as root with the
        // caller's flags, past the permission check the kernel makes for an
        // ordinary open: EEXIST instead, even without O_EXCL (the caller
        // can retry its open, which then goes through the kernel's checks).
        made?;
        let (inode, _) = self.finish_new(&parent, &b, req, perm)?;
        let file = match self.open_backing(&inode, flags) {
            Ok(f) => f,
            Err(e) => {
                self.inodes.forget(inode.ino, 1);
                return Err(e);
            }
        };
        {
            let _g = inode.io.write_locked();
            if let Err(e) = self.ensure_header(&inode, &file, "create") {
                self.inodes.forget(inode.ino, 1);
                return Err(e);
            }
        }
        let attr = self.stat_attr(&inode)?;
        let fh = self.files.insert(OpenFile::new(inode, file, flags));
        Ok((attr, fh))
    }

    pub(super) fn do_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
    ) -> R<(Arc<Inode>, FileAttr)> {
        self.ro()?;
        let parent = self.inode(parent)?;
        let pfd = parent.fd()?;
        let _n = read_lock(&parent.names);
        let b = self.names.encode(&parent, link_name)?;
        let place = self.names.link_place(&parent, link_name.as_bytes())?;
        // Target encrypted (bound to the link's place, see `bind`) and stored
        // under one hold of the active generation.
        self.vol.keys.generations.with_active(|_, k| {
            let t = self
                .names
                .encrypt_target(k, &place, target.as_os_str().as_bytes())?;
            self.with_sidecar(&parent, &b, || sys::symlinkat(&t, pfd.as_fd(), &b.name))
        })?;
        let (inode, attr) = self.finish_new(&parent, &b, req, 0o777)?;
        inode.set_link_place(place);
        Ok((inode, attr))
    }

    pub(super) fn do_link(
        &self,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> R<(Arc<Inode>, FileAttr)> {
        self.ro()?;
        let _moves = self.moves.begin();
        let inode = self.inode(ino)?;
        if inode.kind == FileType::Symlink {
            // Its target is bound to its one name (see `bind`).
            return Err(Errno::EPERM);
        }
        let np = self.inode(newparent)?;
        let ifd = inode.fd()?;
        let npfd = np.fd()?;
        let _n = read_lock(&np.names);
        let b = self.names.encode(&np, newname)?;
        self.with_sidecar(&np, &b, || sys::link_fd(ifd.as_fd(), npfd.as_fd(), &b.name))?;
        self.lookup_backing(&np, &b.name)
    }

    pub(super) fn do_unlink(&self, parent: INodeNo, name: &OsStr) -> R<()> {
        self.ro()?;
        let parent = self.inode(parent)?;
        let pfd = parent.fd()?;
        let _n = read_lock(&parent.names);
        let b = self.names.encode(&parent, name)?;
        sys::unlinkat(pfd.as_fd(), &b.name, 0).map_err(Errno::from)?;
        self.names.remove_sidecar(&parent, &b);
        Ok(())
    }

    /// The order to take two directories' names locks in: `None` for one
    /// directory, `Some(true)` for `a` first. A parent goes before its
    /// child (as rmdir takes them), otherwise the lower node id first.
    fn names_order(&self, a: &Inode, b: &Inode) -> R<Option<bool>> {
        if a.ino == b.ino {
            return Ok(None);
        }
        let key = |st: libc::stat| (st.st_dev, st.st_ino);
        let afd = a.fd()?;
        let bfd = b.fd()?;
        let ast = key(sys::fstat(afd.as_fd()).map_err(Errno::from)?);
        let bst = key(sys::fstat(bfd.as_fd()).map_err(Errno::from)?);
        let parent_of = |fd: &super::inode::NodeFd| {
            sys::fstatat(fd.as_fd(), c"..", libc::AT_SYMLINK_NOFOLLOW)
                .ok()
                .map(key)
        };
        if parent_of(&bfd) == Some(ast) {
            return Ok(Some(true));
        }
        if parent_of(&afd) == Some(bst) {
            return Ok(Some(false));
        }
        Ok(Some(a.ino < b.ino))
    }

    pub(super) fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> R<()> {
        self.ro()?;
        // RENAME_WHITEOUT (overlayfs upper layers) is passed to the backing
        // rename: the backing filesystem leaves its whiteout, a 0/0
        // character device, under the old (encrypted) name, which reads back
        // as a whiteout under the old plaintext name.
        let whiteout = flags.contains(RenameFlags::RENAME_WHITEOUT);
        let _moves = self.moves.begin();
        let p = self.inode(parent)?;
        let np = self.inode(newparent)?;
        let npfd = np.fd()?;
        // Names locks in the one order (docs/ARCHITECTURE.md, "Locks").
        let (first, second) = match self.names_order(&p, &np)? {
            None => (&p, None),
            Some(true) => (&p, Some(&np)),
            Some(false) => (&np, Some(&p)),
        };
        let _n1 = read_lock(&first.names);
        let _n2 = second.map(|s| read_lock(&s.names));
        let ob = self.names.encode(&p, name)?;
        let nb = self.names.encode(&np, newname)?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let src = sys::fstatat(p.fd()?.as_fd(), &ob.name, libc::AT_SYMLINK_NOFOLLOW)
            .map_err(Errno::from)?;
        let mut stripped: Option<(std::os::fd::OwnedFd, Option<dirid::DirKey>)> = None;
        let target: Option<Arc<Inode>>;
        let mut target_names = None;
        let target_existed;
        match sys::fstatat(npfd.as_fd(), &nb.name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(tst) => {
                target_existed = true;
                if (tst.st_dev, tst.st_ino) == (src.st_dev, src.st_ino) && !exchange {
                    // Same inode (same entry or hard links): POSIX says do nothing.
                    if noreplace {
                        return Err(Errno::EEXIST);
                    }
                    return Ok(());
                }
                let both_dirs = tst.st_mode & libc::S_IFMT == libc::S_IFDIR
                    && src.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if both_dirs && !exchange && !noreplace {
                    // The replaced directory's names lock, after its
                    // parent's, as rmdir takes it.
                    target = self.inodes.by_backing(tst.st_dev, tst.st_ino);
                    target_names = target.as_deref().map(|t| read_lock(&t.names));
                    let tfd = np.open_child(&nb.name).map_err(Errno::from)?;
                    let id = self.strip_empty_dir(tfd.as_fd())?;
                    stripped = Some((tfd, id));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                target_existed = false;
                if exchange {
                    return Err(Errno::ENOENT);
                }
            }
            Err(e) => return Err(Errno::from(e)),
        }
        // Held until the rename is done.
        let _target_names = target_names;
        let ends = RenameEnds {
            p: &p,
            ob: &ob,
            name,
            np: &np,
            nb: &nb,
            newname,
        };
        if exchange {
            // A symlink is bound to its place: it cannot be exchanged
            // atomically into another one (see `bind`).
            let tst = sys::fstatat(npfd.as_fd(), &nb.name, libc::AT_SYMLINK_NOFOLLOW)
                .map_err(Errno::from)?;
            let a = self.rebinds(src.st_mode, &p, name, &np, newname);
            let b = self.rebinds(tst.st_mode, &np, newname, &p, name);
            if a || b {
                return self.exchange_symlinks(ends, a, b);
            }
        } else if self.rebinds(src.st_mode, &p, name, &np, newname) {
            let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
            return self.rename_symlink(ends, flags, whiteout, target_existed);
        }
        if !exchange {
            self.names
                .write_sidecar(&np, &nb)
                .map_err(|e| self.fail("rename", &np, e))?;
        }
        let r = sys::renameat2(
            p.fd()?.as_fd(),
            &ob.name,
            npfd.as_fd(),
            &nb.name,
            flags.bits(),
        );
        if let Err(e) = r {
            if let Some((tfd, id)) = stripped {
                self.restore_dirid(tfd.as_fd(), id);
            }
            if !exchange && !target_existed {
                self.names.remove_sidecar(&np, &nb);
            }
            return Err(Errno::from(e));
        }
        if !exchange && !whiteout {
            // (A whiteout keeps the old name, and a long one its sidecar.)
            self.names.remove_sidecar(&p, &ob);
        }
        Ok(())
    }
}
