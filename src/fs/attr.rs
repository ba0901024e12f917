//! Attributes: `getattr`/`setattr`, the plaintext view of a backing `stat`,
//! the set-id rules (ownership and mode of new entries, clearing set-id bits
//! and capabilities under FUSE_HANDLE_KILLPRIV_V2) and time conversion.

use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileHandle, FileType, INodeNo, Request, TimeOrNow};

use super::inode::{self, Inode};
use super::{KmfsFs, R};
use crate::crypto::xattr::Mapped;
use crate::sys;
use crate::volume::layout::plain_size;

impl KmfsFs {
    pub(super) fn do_getattr(&self, ino: INodeNo) -> R<FileAttr> {
        let inode = self.inode(ino)?;
        self.stat_attr(&inode)
    }

    pub(super) fn attr(&self, inode: &Inode, st: &libc::stat) -> FileAttr {
        let kind = inode::kind_of(st.st_mode);
        let size = match kind {
            FileType::RegularFile => plain_size(st.st_size as u64),
            // base64url(16-byte SIV tag ‖ ciphertext as long as the target):
            // no need to decrypt (the target is bound to a place the inode
            // may not know yet).
            FileType::Symlink => (st.st_size as u64 * 3 / 4).saturating_sub(16),
            _ => st.st_size as u64,
        };
        let (perm, uid, gid) = match self.root.get().filter(|_| inode.ino == inode::ROOT) {
            Some(r) => (r.mode as u16, r.uid, r.gid),
            None => ((st.st_mode & 0o7777) as u16, st.st_uid, st.st_gid),
        };
        FileAttr {
            ino: INodeNo(inode.ino),
            size,
            blocks: plain_blocks(kind, st.st_blocks as u64, size),
            atime: ts(st.st_atime, st.st_atime_nsec),
            mtime: ts(st.st_mtime, st.st_mtime_nsec),
            ctime: ts(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: st.st_nlink as u32,
            uid,
            gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Drops the kernel's cached attributes of `ino` (no page is touched):
    /// for changes whose reply carries none (setxattr, removexattr, a
    /// write's set-id clearing) but which change what stat shows.
    pub(super) fn invalidate_attrs(&self, ino: u64) {
        if let Some(n) = self.opts.notifier.get() {
            let _ = n.inval_inode(INodeNo(ino), -1, 0);
        }
    }

    pub(super) fn stat_attr(&self, inode: &Inode) -> R<FileAttr> {
        let st = sys::fstat(inode.fd()?.as_fd()).map_err(Errno::from)?;
        Ok(self.attr(inode, &st))
    }

    /// Mode for a new entry: the caller's umask applies unless the backing
    /// parent has a default ACL (then the backing filesystem applies the ACL).
    pub(super) fn create_mode(&self, parent: &Inode, mode: u32, umask: u32) -> u32 {
        let has_default_acl = parent.fd().is_ok_and(|fd| {
            sys::getxattr(fd.as_fd(), c"system.posix_acl_default").is_ok_and(|v| !v.is_empty())
        });
        if has_default_acl {
            mode & 0o7777
        } else {
            mode & 0o7777 & !umask
        }
    }

    /// Gives a new entry to the caller (uid, and gid unless the directory is
    /// set-group-id), keeping set-id bits the chown would clear.
    pub(super) fn set_owner(&self, parent: &Inode, fd: BorrowedFd<'_>, req: &Request, mode: u32) {
        let pst = parent.fd().ok().and_then(|fd| sys::fstat(fd.as_fd()).ok());
        let gid = match pst {
            Some(p) if p.st_mode & libc::S_ISGID != 0 => None,
            _ => Some(req.gid()),
        };
        if req.uid() == 0 && gid.is_none_or(|g| g == 0) {
            return;
        }
        if let Err(e) = sys::fchownat(fd, Some(req.uid()), gid) {
            log::warn!("op=chown path={} error=\"{e}\"", sys::fd_path(fd));
        }
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0
            && let Ok(st) = sys::fstat(fd)
            && st.st_mode & libc::S_IFMT != libc::S_IFLNK
        {
            let _ = sys::chmod_fd(fd, mode & 0o7777);
        }
    }

    /// What the kernel leaves to us under FUSE_HANDLE_KILLPRIV_V2 after a
    /// write or truncate by a caller without CAP_FSETID, or a chown: clear
    /// S_ISUID, S_ISGID when group-executable, and the file capability.
    pub(super) fn kill_priv(&self, inode: &Inode, clear_mode: Option<Caller>) {
        if inode.kind != FileType::RegularFile {
            return;
        }
        let Ok(fd) = inode.fd() else { return };
        if let Some(caller) = clear_mode
            && let Ok(st) = sys::fstat(fd.as_fd())
        {
            // The kernel's rule (setattr_should_drop_sgid): set-gid goes with
            // group-execute, or when the caller is not in the file's group;
            // set-gid without group-execute is otherwise a locking marker.
            let mut kill = libc::S_ISUID;
            if st.st_mode & libc::S_IXGRP != 0 || !caller.in_group(st.st_gid) {
                kill |= libc::S_ISGID;
            }
            if st.st_mode & kill != 0
                && sys::chmod_fd(fd.as_fd(), st.st_mode & 0o7777 & !kill).is_ok()
            {
                // A write reply carries no attributes: drop the kernel's
                // cached mode.
                self.invalidate_attrs(inode.ino);
            }
        }
        for (_, c) in self.xattr_ciphers() {
            if let Ok(Mapped::Encrypted(b)) = c.map_name(b"security.capability")
                && let Ok(n) = sys::cstr(&b)
            {
                let _ = sys::removexattr(fd.as_fd(), &n);
            }
        }
    }

    /// After a caller set an access ACL: the kernel's rule
    /// (`posix_acl_update_mode`) drops set-gid when the caller is neither in
    /// the file's group nor privileged. The backing filesystem applied the
    /// ACL for the daemon (root), so it kept the bit; and fuser cannot take
    /// the kernel's FUSE_SETXATTR_ACL_KILL_SGID request (FUSE_SETXATTR_EXT).
    pub(super) fn acl_kill_sgid(&self, inode: &Inode, caller: Caller) {
        if caller.uid == 0 {
            return;
        }
        let Ok(fd) = inode.fd() else { return };
        if let Ok(st) = sys::fstat(fd.as_fd())
            && st.st_mode & libc::S_ISGID != 0
            && st.st_mode & libc::S_IFMT != libc::S_IFLNK
            && !caller.in_group(st.st_gid)
        {
            let _ = sys::chmod_fd(fd.as_fd(), st.st_mode & 0o7777 & !libc::S_ISGID);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
        caller: Caller,
    ) -> R<FileAttr> {
        let inode = self.inode(ino)?;
        if mode.is_some()
            || uid.is_some()
            || gid.is_some()
            || size.is_some()
            || atime.is_some()
            || mtime.is_some()
        {
            self.ro()?;
        }
        // The mount root's owner and mode are kept apart from the backing
        // root's (fs/root.rs): the backing root stays root's alone.
        let kept_apart = inode.ino == inode::ROOT
            && (mode.is_some() || uid.is_some() || gid.is_some())
            && self
                .root
                .set(inode.fd()?.as_fd(), mode, uid, gid)
                .map_err(Errno::from)?;
        let (mode, uid, gid) = if kept_apart {
            (None, None, None)
        } else {
            (mode, uid, gid)
        };
        if uid.is_some() || gid.is_some() {
            sys::fchownat(inode.fd()?.as_fd(), uid, gid).map_err(Errno::from)?;
            // The backing chown cleared the set-id bits; the capability is
            // one of our encrypted attributes.
            if self.killpriv {
                self.kill_priv(&inode, None);
            }
        }
        if let Some(m) = mode {
            if inode.kind == FileType::Symlink {
                return Err(Errno::EOPNOTSUPP);
            }
            sys::chmod_fd(inode.fd()?.as_fd(), m & 0o7777).map_err(Errno::from)?;
        }
        if let Some(s) = size {
            self.truncate(&inode, fh, s)?;
            // The kernel's FATTR_KILL_SUIDGID (caller without CAP_FSETID) is
            // not passed on by fuser: a non-root caller stands for it.
            if self.killpriv && caller.uid != 0 {
                self.kill_priv(&inode, Some(caller));
            }
        }
        if atime.is_some() || mtime.is_some() {
            if mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() {
                // With the writeback cache the kernel flushes its times after
                // every unlink (SETATTR of mtime and ctime, the mtime
                // unchanged): for a file with no name left whose times already
                // are the ones asked for, there is nothing to write (no name
                // to see a ctime by later, and an open file's times are the
                // kernel's while it is cached).
                let st = sys::fstat(inode.fd()?.as_fd()).map_err(Errno::from)?;
                if st.st_nlink == 0
                    && same_time(atime, st.st_atime, st.st_atime_nsec)
                    && same_time(mtime, st.st_mtime, st.st_mtime_nsec)
                {
                    return Ok(self.attr(&inode, &st));
                }
            }
            let t = [timespec(atime), timespec(mtime)];
            sys::utimens_fd(inode.fd()?.as_fd(), &t).map_err(Errno::from)?;
        }
        self.stat_attr(&inode)
    }
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::new(0, nsec)
    }
}

/// Whether setting the time to `t` would leave `(sec, nsec)` as it is
/// (`None` leaves it; `Now` changes it).
fn same_time(t: Option<TimeOrNow>, sec: i64, nsec: i64) -> bool {
    match t {
        None => true,
        Some(TimeOrNow::Now) => false,
        Some(t @ TimeOrNow::SpecificTime(_)) => {
            let ts = timespec(Some(t));
            ts.tv_sec == sec && ts.tv_nsec == nsec
        }
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as libc::time_t);
                let mut nsec = d.subsec_nanos() as libc::c_long;
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                libc::timespec {
                    tv_sec: sec,
                    tv_nsec: nsec,
                }
            }
        },
    }
}

/// Who sent a request, for the set-id rules that depend on the caller.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caller {
    pub(super) uid: u32,
    gid: u32,
    pid: u32,
}

impl Caller {
    pub(super) fn of(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    /// Whether the caller is a member of group `gid`.
    fn in_group(&self, gid: u32) -> bool {
        sys::pid_in_group(self.pid, self.gid, gid)
    }
}

/// `st_blocks` (512-byte sectors) as a local filesystem would show it for
/// the plaintext: 0 for an empty file, and never more than the file's whole
/// 4 KiB units, so neither the 40-byte file header (which makes the units
/// straddle backing blocks) nor kmfs's encrypted attributes spilling out of
/// the backing inode count; holes in the backing file stay uncounted.
pub(super) fn plain_blocks(kind: FileType, backing: u64, size: u64) -> u64 {
    if kind != FileType::RegularFile {
        return backing;
    }
    let units = size.div_ceil(4096);
    backing.min(units * 8)
}
