//! The mount root's owner and mode, kept apart from the backing root's.
//!
//! The backing root must be root's alone (mode 0700, docs/SECURITY.md), but
//! the mount's root directory is what users and Samba see, and its owner and
//! mode are the administrator's to choose. They live in the backing root's
//! attribute `trusted.kmfs.root` (12 bytes: mode, uid, gid as big-endian
//! u32; only root can read or write `trusted.*`). `kmfs init` writes 0755
//! root:root; `chmod`/`chown` of the mount root change the attribute, never
//! the backing root. Without it (volumes made before, or a backing
//! filesystem without `trusted.*` attributes) the backing root's own owner
//! and mode are shown and changed, as before.

use std::os::fd::BorrowedFd;
use std::sync::RwLock;

use crate::sync::RwLockExt;
use crate::sys;

pub const ROOT_ATTR: &std::ffi::CStr = c"trusted.kmfs.root";

/// Mode (permission bits), uid, gid shown for the mount root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootAttrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl RootAttrs {
    pub const DEFAULT: RootAttrs = RootAttrs {
        mode: 0o755,
        uid: 0,
        gid: 0,
    };

    pub fn encode(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&(self.mode & 0o7777).to_be_bytes());
        b[4..8].copy_from_slice(&self.uid.to_be_bytes());
        b[8..].copy_from_slice(&self.gid.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<RootAttrs> {
        let b: &[u8; 12] = b.try_into().ok()?;
        let n = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (n(0) <= 0o7777).then(|| RootAttrs {
            mode: n(0),
            uid: n(4),
            gid: n(8),
        })
    }

    /// Reads the attribute of the backing root `fd`; `None` if it has none
    /// (or a damaged one, logged).
    pub fn load(fd: BorrowedFd<'_>) -> Option<RootAttrs> {
        let v = sys::getxattr(fd, ROOT_ATTR).ok()?;
        let a = RootAttrs::decode(&v);
        if a.is_none() {
            log::error!(
                "op=root_attrs path={} error=\"trusted.kmfs.root is damaged; showing the backing root's own mode\"",
                sys::fd_path(fd)
            );
        }
        a
    }

    pub fn store(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        sys::setxattr(fd, ROOT_ATTR, &self.encode(), 0)
    }
}

/// The filesystem's copy of the mount root's attributes.
pub struct Root {
    attrs: RwLock<Option<RootAttrs>>,
}

impl Root {
    pub fn load(fd: BorrowedFd<'_>) -> Root {
        Root {
            attrs: RwLock::new(RootAttrs::load(fd)),
        }
    }

    /// The attributes to show, if kept apart from the backing root.
    pub fn get(&self) -> Option<RootAttrs> {
        *self.attrs.read_locked()
    }

    /// Applies a chmod/chown of the mount root: `Ok(true)` if kept apart
    /// (stored), `Ok(false)` if the backing root itself must change.
    pub fn set(
        &self,
        fd: BorrowedFd<'_>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> std::io::Result<bool> {
        let mut g = self.attrs.write_locked();
        let Some(cur) = *g else {
            return Ok(false);
        };
        let new = RootAttrs {
            mode: mode.map_or(cur.mode, |m| m & 0o7777),
            uid: uid.unwrap_or(cur.uid),
            gid: gid.unwrap_or(cur.gid),
        };
        new.store(fd)?;
        *g = Some(new);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_reject_damage() {
        let a = RootAttrs {
            mode: 0o1777,
            uid: 1000,
            gid: 100,
        };
        assert_eq!(RootAttrs::decode(&a.encode()), Some(a));
        assert_eq!(RootAttrs::decode(&[0u8; 11]), None);
        let mut bad = a.encode();
        bad[0] = 0xff;
        assert_eq!(RootAttrs::decode(&bad), None);
    }
}
