//! Binding of extended-attribute values and symlink targets to their owner
//! (docs/FORMAT.md 8).
//!
//! * An encrypted attribute value is bound to its inode's owner id: the
//!   file id of a regular file (a file without a header gets one before its
//!   first attribute, as before its first write), the directory id of a
//!   directory on an encrypted-names volume, zeros otherwise.
//! * A symlink target is bound to the link's directory id and plaintext
//!   name, noted on the inode at every lookup by name. So a rename re-creates
//!   the link: the target is encrypted for the new place into a new backing
//!   symlink under a reserved temporary name in the destination directory
//!   (owner and times copied), that is renamed onto the destination with the
//!   caller's flags, and the old name is unlinked last. A crash in between
//!   leaves the old name, or both names, each with a target that reads; a
//!   leftover temporary is ignored and `kmfs check --repair` removes it. The
//!   kernel keeps seeing one inode: its node id is moved to the new backing
//!   inode ([`super::inode::InodeTable::rebind`]). `RENAME_EXCHANGE` with a
//!   symlink on either side whose place changes re-creates each such link
//!   for the other place (not atomic as a whole, docs/FORMAT.md 8.3);
//!   `RENAME_WHITEOUT` of one leaves the backing filesystem's whiteout under
//!   the old name. A hard link to a symlink is refused (EPERM):
//!   a second name cannot carry the same binding.
//! * While the volume header is older than format version 3, unbound
//!   values and targets are read too (a rekey binds them); bound ones are
//!   always written.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use fuser::{Errno, FileType};

use super::inode::{Inode, LinkPlace};
use super::names::BackingName;
use super::{KmfsFs, R};
use crate::crypto::xattr::{NO_OWNER, OWNER_LEN};
use crate::sys;
use crate::volume::layout::FileHeader;

/// The two places of a rename: the old directory, backing name and name,
/// and the new ones.
#[derive(Clone, Copy)]
pub(super) struct RenameEnds<'a> {
    pub p: &'a Inode,
    pub ob: &'a BackingName,
    pub name: &'a OsStr,
    pub np: &'a Inode,
    pub nb: &'a BackingName,
    pub newname: &'a OsStr,
}

impl KmfsFs {
    /// Logs once at mount if the volume still accepts unbound attribute
    /// values and symlink targets.
    pub(super) fn warn_if_unbound(&self) {
        if self.vol.keys.unbound_ok() {
            log::warn!(
                "op=mount volume={} error=\"volume format version is older than 3: extended-attribute values and symlink targets may not be bound to their files yet, so a value copied between backing files is still accepted; run kmfs rekey to bind them (docs/FORMAT.md 8)\"",
                self.vol.id_hex()
            );
        }
    }

    /// The owner id the encrypted attributes of `inode` are bound to. For a
    /// regular file without a complete header: with `create` (setxattr, the
    /// inode's I/O lock held for writing) the header is written now; else
    /// `None` (no bound value can belong to it).
    pub(super) fn xattr_owner(&self, inode: &Inode, create: bool) -> R<Option<[u8; OWNER_LEN]>> {
        match inode.kind {
            FileType::RegularFile => {
                if let Some(h) = inode.cached_header() {
                    return Ok(Some(h.file_id));
                }
                if create {
                    let file = inode.reopen(libc::O_RDWR).map_err(Errno::from)?;
                    return Ok(Some(self.ensure_header(inode, &file, "setxattr")?.file_id));
                }
                let file = inode.reopen(libc::O_RDONLY).map_err(Errno::from)?;
                match FileHeader::read_from(&file) {
                    Ok(Some(h)) => {
                        inode.cache_header(h.clone());
                        Ok(Some(h.file_id))
                    }
                    Ok(None) => Ok(None),
                    Err(e) => {
                        log::error!(
                            "op=getxattr path={} error=\"damaged file header: {e}\"",
                            inode.path_for_log()
                        );
                        Ok(None)
                    }
                }
            }
            FileType::Directory if !self.names.plaintext() => {
                Ok(Some(self.names.dir_key(inode)?.0))
            }
            _ => Ok(Some(NO_OWNER)),
        }
    }

    /// Notes where a looked-up symlink is (its target is bound to it).
    pub(super) fn note_link(&self, inode: &Inode, parent: &Inode, name: &OsStr) {
        if inode.kind == FileType::Symlink
            && let Ok(place) = self.names.link_place(parent, name.as_bytes())
        {
            inode.set_link_place(place);
        }
    }

    /// The plaintext target of symlink `inode`; EIO (logged) if it does not
    /// authenticate at its place.
    pub(super) fn read_target(&self, inode: &Inode) -> R<Vec<u8>> {
        let stored = sys::readlink_fd(inode.fd()?.as_fd()).map_err(Errno::from)?;
        let Some(place) = inode.link_place() else {
            log::error!(
                "op=readlink path={} error=\"symlink reached without a lookup by name\" result=eio",
                inode.path_for_log()
            );
            return Err(Errno::EIO);
        };
        self.names.decrypt_target(&place, &stored).map_err(|e| {
            // A symlink a rekey has re-created since the kernel looked it
            // up: this backing inode is gone, and its old (unbound) target
            // may no longer be accepted. ESTALE makes readlink(2) look the
            // name up again (LOOKUP_REVAL), which finds the new one.
            if inode
                .fd()
                .is_ok_and(|fd| sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_nlink == 0))
            {
                log::debug!("op=readlink path={} result=estale", inode.path_for_log());
                return Errno::ESTALE;
            }
            log::error!(
                "op=readlink path={} error=\"{e}\" result=eio",
                inode.path_for_log()
            );
            Errno::EIO
        })
    }

    /// Whether renaming an entry of type `mode` from `(p, name)` to
    /// `(np, newname)` changes what it is bound to (only symlinks are bound
    /// to their place).
    pub(super) fn rebinds(
        &self,
        mode: u32,
        p: &Inode,
        name: &OsStr,
        np: &Inode,
        newname: &OsStr,
    ) -> bool {
        mode & libc::S_IFMT == libc::S_IFLNK
            && !(self.names.plaintext() && name == newname)
            && !(p.ino == np.ino && name == newname)
    }

    /// Re-creates symlink `ob` of `p` (plaintext `name`) bound to `(np,
    /// newname)`, under a reserved temporary name in `np`. Returns that name,
    /// the old link's `stat` and the new place.
    fn recreate_link(
        &self,
        p: &Inode,
        ob: &BackingName,
        name: &OsStr,
        np: &Inode,
        newname: &OsStr,
    ) -> R<(CString, libc::stat, LinkPlace)> {
        let npfd = np.fd()?;
        let lfd = p.open_child(&ob.name).map_err(Errno::from)?;
        let st = sys::fstat(lfd.as_fd()).map_err(Errno::from)?;
        let stored = sys::readlink_fd(lfd.as_fd()).map_err(Errno::from)?;
        let old_place = self.names.link_place(p, name.as_bytes())?;
        let target = self
            .names
            .decrypt_target(&old_place, &stored)
            .map_err(|e| {
                log::error!(
                    "op=rename path={} error=\"{e}\" result=eio",
                    sys::fd_path(lfd.as_fd())
                );
                Errno::EIO
            })?;
        let new_place: LinkPlace = self.names.link_place(np, newname.as_bytes())?;
        // Encrypted and created under one hold of the active generation, so
        // a rekey's final sweep (after a barrier) sees it.
        let tmp = self.vol.keys.generations.with_active(|_, k| {
            let new = self.names.encrypt_target(k, &new_place, &target)?;
            crate::rekey::metadata::symlink_like(npfd.as_fd(), &new, &st)
                .map_err(|e| self.fail("rename", np, e))
        })?;
        Ok((tmp, st, new_place))
    }

    /// Moves the kernel's node of the old link `old` to the link now at
    /// `nb` of `np`.
    fn rebind_link(&self, old: &libc::stat, np: &Inode, nb: &BackingName, place: LinkPlace) {
        if let Ok(fd) = np.open_child(&nb.name)
            && let Ok(nst) = sys::fstat(fd.as_fd())
        {
            self.inodes
                .rebind((old.st_dev, old.st_ino), fd, &nst, place);
        }
    }

    /// Renames symlink `ob` of `p` (plaintext `name`) to `nb` of `np`
    /// (plaintext `newname`) by re-creating it bound to its new place (see
    /// the module docs). `flags` is 0 or `RENAME_NOREPLACE`; with `whiteout`
    /// the old name becomes a whiteout (the backing filesystem's, left by
    /// moving the old link to a temporary name with `RENAME_WHITEOUT`)
    /// instead of going; `target_existed` says whether `nb` existed (its
    /// sidecar then stays on failure). The names locks of both directories
    /// are held.
    pub(super) fn rename_symlink(
        &self,
        ends: RenameEnds<'_>,
        flags: u32,
        whiteout: bool,
        target_existed: bool,
    ) -> R<()> {
        let RenameEnds {
            p,
            ob,
            name,
            np,
            nb,
            newname,
        } = ends;
        let pfd = p.fd()?;
        let npfd = np.fd()?;
        let (tmp, st, new_place) = self.recreate_link(p, ob, name, np, newname)?;
        let cleanup = |tmp: &CStr| {
            let _ = sys::unlinkat(npfd.as_fd(), tmp, 0);
        };
        if let Err(e) = self.names.write_sidecar(np, nb) {
            cleanup(&tmp);
            return Err(self.fail("rename", np, e));
        }
        if let Err(e) = sys::renameat2(npfd.as_fd(), &tmp, npfd.as_fd(), &nb.name, flags) {
            cleanup(&tmp);
            if !target_existed {
                self.names.remove_sidecar(np, nb);
            }
            return Err(Errno::from(e));
        }
        // The new name is in place: the old one goes (or turns into a
        // whiteout, which keeps a long name's sidecar).
        let gone = if whiteout {
            tmp_name().and_then(|t| {
                sys::renameat2(
                    pfd.as_fd(),
                    &ob.name,
                    pfd.as_fd(),
                    &t,
                    libc::RENAME_WHITEOUT,
                )?;
                sys::unlinkat(pfd.as_fd(), &t, 0)
            })
        } else {
            sys::unlinkat(pfd.as_fd(), &ob.name, 0).map(|()| self.names.remove_sidecar(p, ob))
        };
        if let Err(e) = gone {
            log::warn!(
                "op=rename path={} error=\"old name of a re-created symlink not removed: {e}\"",
                p.path_for_log()
            );
        }
        self.rebind_link(&st, np, nb, new_place);
        Ok(())
    }

    /// `RENAME_EXCHANGE` of `ob` of `p` (plaintext `name`) and `nb` of `np`
    /// (plaintext `newname`), where the first (`rebind_a`) or the second
    /// (`rebind_b`) or both are symlinks bound to their place. Each such
    /// link is re-created for the other place under a temporary name first.
    /// With two links, each new one then replaces the old link at its
    /// place; with one link, the backing entries are exchanged and the new
    /// link replaces the old one that landed at the other place. Both names
    /// exist throughout; a crash in between can leave one name with a link
    /// bound to the other place (its target then does not read) and
    /// temporaries (removed by `kmfs check --repair`).
    pub(super) fn exchange_symlinks(
        &self,
        ends: RenameEnds<'_>,
        rebind_a: bool,
        rebind_b: bool,
    ) -> R<()> {
        let RenameEnds {
            p,
            ob,
            name,
            np,
            nb,
            newname,
        } = ends;
        let pfd = p.fd()?;
        let npfd = np.fd()?;
        // The link from `ob`, re-created for `nb` in `np`.
        let a = if rebind_a {
            Some(self.recreate_link(p, ob, name, np, newname)?)
        } else {
            None
        };
        let b = if rebind_b {
            match self.recreate_link(np, nb, newname, p, name) {
                Ok(b) => Some(b),
                Err(e) => {
                    if let Some((t, ..)) = &a {
                        let _ = sys::unlinkat(npfd.as_fd(), t, 0);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        let cleanup = || {
            if let Some((t, ..)) = &a {
                let _ = sys::unlinkat(npfd.as_fd(), t, 0);
            }
            if let Some((t, ..)) = &b {
                let _ = sys::unlinkat(pfd.as_fd(), t, 0);
            }
        };
        if (a.is_none() || b.is_none())
            && let Err(e) = sys::renameat2(
                pfd.as_fd(),
                &ob.name,
                npfd.as_fd(),
                &nb.name,
                libc::RENAME_EXCHANGE,
            )
        {
            cleanup();
            return Err(Errno::from(e));
        }
        if let Some((t, st, place)) = a {
            sys::renameat2(npfd.as_fd(), &t, npfd.as_fd(), &nb.name, 0).map_err(|e| {
                let _ = sys::unlinkat(npfd.as_fd(), &t, 0);
                if let Some((t, ..)) = &b {
                    let _ = sys::unlinkat(pfd.as_fd(), t, 0);
                }
                self.fail("rename", np, e)
            })?;
            self.rebind_link(&st, np, nb, place);
        }
        if let Some((t, st, place)) = b {
            sys::renameat2(pfd.as_fd(), &t, pfd.as_fd(), &ob.name, 0).map_err(|e| {
                let _ = sys::unlinkat(pfd.as_fd(), &t, 0);
                self.fail("rename", p, e)
            })?;
            self.rebind_link(&st, p, ob, place);
        }
        Ok(())
    }
}

/// A fresh reserved temporary name (`kmfs.tmp.<random>`, ignored in
/// listings and removed by `kmfs check --repair` if left over).
fn tmp_name() -> std::io::Result<CString> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(std::io::Error::other)?;
    sys::cstr(format!("kmfs.tmp.{}", crate::volume::hex(&rnd)).as_bytes())
}
