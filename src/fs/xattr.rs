//! Extended attributes: names and values sealed with the attribute cipher of
//! a key generation (see [`crate::crypto::xattr`]); ACLs and other clear
//! names pass through. During a rekey an attribute may exist under an older
//! generation too: reads try every generation, writes replace the older copy.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{Errno, INodeNo, ReplyXattr};

use super::attr::Caller;
use super::inode::Inode;
use super::{KmfsFs, R};
use crate::crypto::xattr::{self, Mapped, XattrCipher, XattrError};
use crate::sync::{MutexExt, RwLockExt};
use crate::sys;
use crate::volume::GenKeys;

/// The answer to getxattr/listxattr.
pub(super) enum XattrReply {
    /// The caller asked for the size only.
    Size(u32),
    Data(Vec<u8>),
}

impl XattrReply {
    /// The answer for a caller with room for `size` bytes (0 asks for the
    /// size); ERANGE if the value does not fit.
    pub(super) fn fit(v: Vec<u8>, size: u32) -> R<XattrReply> {
        if size == 0 {
            Ok(XattrReply::Size(v.len() as u32))
        } else if v.len() > size as usize {
            Err(Errno::ERANGE)
        } else {
            Ok(XattrReply::Data(v))
        }
    }

    pub(super) fn send(self, reply: ReplyXattr) {
        match self {
            XattrReply::Size(n) => reply.size(n),
            XattrReply::Data(v) => reply.data(&v),
        }
    }
}

/// `Inode::xattrs`: not known yet, none that kmfs shows, some.
const XATTRS_NONE: u8 = 1;
const XATTRS_SOME: u8 = 2;

/// Notes in `inode` whether the backing attribute list `raw` holds any that
/// kmfs shows; returns true if none.
fn note_xattrs(inode: &Inode, raw: &[u8]) -> bool {
    let none = !raw
        .split(|&c| c == 0)
        .any(|n| !n.is_empty() && XattrCipher::is_shown(n));
    let state = if none { XATTRS_NONE } else { XATTRS_SOME };
    inode.xattrs.store(state, Ordering::Release);
    none
}

fn xattr_errno(e: XattrError) -> Errno {
    match e {
        XattrError::Unsupported => Errno::EOPNOTSUPP,
        XattrError::Invalid => Errno::ERANGE,
    }
}

impl KmfsFs {
    /// The attribute ciphers of every key generation, the active one first.
    pub(super) fn xattr_ciphers(&self) -> Vec<(u16, Arc<XattrCipher>)> {
        self.vol
            .keys
            .generations
            .all()
            .into_iter()
            .map(|(g, k)| (g, self.xattr_cipher_for(g, &k)))
            .collect()
    }

    /// The attribute cipher of generation `g` (keys `k`), made once.
    pub(super) fn xattr_cipher_for(&self, g: u16, k: &GenKeys) -> Arc<XattrCipher> {
        let mut cache = self.xattrs.locked();
        if let Some((_, c)) = cache.iter().find(|(x, _)| *x == g) {
            return c.clone();
        }
        let c = Arc::new(XattrCipher::new(&k.metadata));
        cache.push((g, c.clone()));
        c
    }

    pub(super) fn xattr_name(c: &XattrCipher, name: &OsStr) -> R<Mapped> {
        c.map_name(name.as_bytes()).map_err(xattr_errno)
    }

    /// Whether the backing inode holds no attribute kmfs shows: known after
    /// the first query, which lists the backing attributes (one system call,
    /// as the getxattr it replaces) instead of asking for one. `ls -l` asks
    /// every file for `security.selinux` and its ACL; on a file with
    /// neither, the second question needs no system call, and no name is
    /// hashed. Only this daemon changes the backing attributes, under the
    /// inode's `io` lock, which the caller holds: `do_setxattr` marks the
    /// inode as having some (a rekey only rewrites attributes that exist,
    /// and a default ACL is applied when an inode is made, before its first
    /// query).
    fn holds_no_xattrs(&self, inode: &Inode) -> R<bool> {
        match inode.xattrs.load(Ordering::Acquire) {
            XATTRS_NONE => return Ok(true),
            XATTRS_SOME => return Ok(false),
            _ => {}
        }
        let none = match sys::listxattr(inode.fd()?.as_fd()) {
            Ok(raw) => note_xattrs(inode, &raw),
            Err(_) => {
                // Let the query itself meet the error (and ask no more).
                inode.xattrs.store(XATTRS_SOME, Ordering::Release);
                false
            }
        };
        Ok(none)
    }

    pub(super) fn do_getxattr(&self, ino: INodeNo, name: &OsStr) -> R<Vec<u8>> {
        let inode = self.inode(ino)?;
        let _g = inode.io.read_locked();
        XattrCipher::check_name(name.as_bytes()).map_err(xattr_errno)?;
        if self.holds_no_xattrs(&inode)? {
            return Err(absent(name));
        }
        let mut missing = absent(name);
        let unbound_ok = self.vol.keys.unbound_ok();
        let mut owner = None;
        // Stored under the generation it was written with: try each.
        for (_, c) in self.xattr_ciphers() {
            let b = match Self::xattr_name(&c, name)? {
                Mapped::Clear(n) => {
                    return sys::getxattr(
                        inode.fd()?.as_fd(),
                        &sys::cstr(&n).map_err(Errno::from)?,
                    )
                    .map_err(Errno::from);
                }
                Mapped::Encrypted(b) => b,
            };
            let blob =
                match sys::getxattr(inode.fd()?.as_fd(), &sys::cstr(&b).map_err(Errno::from)?) {
                    Ok(v) => v,
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
                    Err(e) => {
                        missing = Errno::from(e);
                        continue;
                    }
                };
            // Bound to the inode's owner id (see `bind`).
            if owner.is_none() {
                owner = Some(self.xattr_owner(&inode, false)?);
            }
            return match c.open(&b, &blob, owner.flatten().as_ref(), unbound_ok) {
                Some(o) if o.name == name.as_bytes() => Ok(o.value),
                _ => {
                    log::error!(
                        "op=getxattr path={} attr={} error=\"value does not authenticate\" result=eio",
                        inode.path_for_log(),
                        String::from_utf8_lossy(&b)
                    );
                    Err(Errno::EIO)
                }
            };
        }
        Err(missing)
    }

    pub(super) fn do_listxattr(&self, ino: INodeNo) -> R<Vec<u8>> {
        let inode = self.inode(ino)?;
        let _g = inode.io.read_locked();
        if inode.xattrs.load(Ordering::Acquire) == XATTRS_NONE {
            return Ok(Vec::new());
        }
        let ciphers = self.xattr_ciphers();
        let unbound_ok = self.vol.keys.unbound_ok();
        let owner = self.xattr_owner(&inode, false)?;
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let raw = match sys::listxattr(inode.fd()?.as_fd()) {
            Ok(r) => {
                note_xattrs(&inode, &r);
                r
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(Errno::from(e)),
        };
        let mut out = Vec::new();
        for n in raw.split(|&c| c == 0).filter(|n| !n.is_empty()) {
            if n == xattr::ACL_ACCESS || n == xattr::ACL_DEFAULT {
                out.extend_from_slice(n);
                out.push(0);
            } else if n.starts_with(xattr::BACKING_PREFIX) {
                let Ok(c) = sys::cstr(n) else { continue };
                let Ok(blob) = sys::getxattr(inode.fd()?.as_fd(), &c) else {
                    continue;
                };
                match ciphers
                    .iter()
                    .find_map(|(_, c)| c.open(n, &blob, owner.as_ref(), unbound_ok))
                    .map(|o| o.name)
                {
                    // During a rekey one attribute may briefly exist twice.
                    Some(name) if seen.contains(&name) => {}
                    Some(name) => {
                        out.extend_from_slice(&name);
                        out.push(0);
                        seen.push(name);
                    }
                    None => log::error!(
                        "op=listxattr path={} attr={} error=\"value does not authenticate\"",
                        inode.path_for_log(),
                        String::from_utf8_lossy(n)
                    ),
                }
            }
        }
        Ok(out)
    }

    pub(super) fn do_setxattr(
        &self,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: Caller,
    ) -> R<()> {
        self.ro()?;
        let inode = self.inode(ino)?;
        let _g = inode.io.write_locked();
        // Set before the attribute is written: even a failed write may have
        // left one.
        inode.xattrs.store(XATTRS_SOME, Ordering::Release);
        let ciphers = self.xattr_ciphers();
        // Bound to the inode's owner id (a file without a header gets one
        // now, see `bind`); not for the clear ACL names.
        let owner = match Self::xattr_name(&ciphers[0].1, name)? {
            Mapped::Clear(_) => None,
            Mapped::Encrypted(_) => self.xattr_owner(&inode, true)?,
        };
        // Sealed and stored under one hold of the active generation, so a
        // rekey's final sweep (after a barrier) sees it. No other lock of
        // the generations is taken inside.
        let r = self.vol.keys.generations.with_active(|g, k| {
            let active = self.xattr_cipher_for(g, k);
            match Self::xattr_name(&active, name)? {
                Mapped::Clear(n) => sys::setxattr(
                    inode.fd()?.as_fd(),
                    &sys::cstr(&n).map_err(Errno::from)?,
                    value,
                    flags,
                )
                .map_err(Errno::from),
                Mapped::Encrypted(b) => {
                    // The same attribute under an older generation (a
                    // rekey has not reached this inode yet) counts as
                    // existing, and goes once the new one is written.
                    let mut older = Vec::new();
                    for (og, c) in &ciphers {
                        if *og == g {
                            continue;
                        }
                        if let Ok(Mapped::Encrypted(o)) = c.map_name(name.as_bytes())
                            && let Ok(oc) = sys::cstr(&o)
                            && sys::getxattr(inode.fd()?.as_fd(), &oc).is_ok()
                        {
                            older.push(oc);
                        }
                    }
                    let mut flags = flags;
                    if !older.is_empty() {
                        if flags & libc::XATTR_CREATE != 0 {
                            return Err(Errno::EEXIST);
                        }
                        flags &= !libc::XATTR_REPLACE;
                    }
                    let owner = owner.ok_or(Errno::EIO)?;
                    let blob = active
                        .seal(&b, name.as_bytes(), value, &owner)
                        .map_err(Errno::from)?;
                    sys::setxattr(
                        inode.fd()?.as_fd(),
                        &sys::cstr(&b).map_err(Errno::from)?,
                        &blob,
                        flags,
                    )
                    .map_err(Errno::from)?;
                    for o in older {
                        let _ = sys::removexattr(inode.fd()?.as_fd(), &o);
                    }
                    Ok(())
                }
            }
        });
        if r.is_ok() && name.as_bytes() == b"system.posix_acl_access" {
            self.acl_kill_sgid(&inode, caller);
        }
        r
    }

    pub(super) fn do_removexattr(&self, ino: INodeNo, name: &OsStr) -> R<()> {
        self.ro()?;
        let inode = self.inode(ino)?;
        let _g = inode.io.write_locked();
        let mut result = Err(Errno::ENODATA);
        for (_, c) in self.xattr_ciphers() {
            let n = match Self::xattr_name(&c, name)? {
                Mapped::Clear(n) | Mapped::Encrypted(n) => n,
            };
            match sys::removexattr(inode.fd()?.as_fd(), &sys::cstr(&n).map_err(Errno::from)?) {
                Ok(()) => result = Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(Errno::from(e)),
            }
        }
        result
    }
}

/// The answer for an attribute the inode does not hold: ENODATA, except for
/// `security.selinux`, which is EOPNOTSUPP — what a filesystem without
/// labels answers. The query reaches kmfs only on hosts where no security
/// module owns the name (SELinux answers it from the kernel's own label), and
/// there GNU `ls -l` asks every file for it until a filesystem says it has
/// none: this halves `ls -l`'s round trips (docs/PERFORMANCE.md). A label
/// that is stored (`rsync -X`, `tar --selinux`) is still kept, listed and
/// returned.
fn absent(name: &OsStr) -> Errno {
    if name.as_bytes() == b"security.selinux" {
        Errno::EOPNOTSUPP
    } else {
        Errno::ENODATA
    }
}
