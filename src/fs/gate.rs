//! The filesystem's side of a rekey ([`crate::rekey::FileGate`]): the
//! re-encryption of a file runs under the same per-inode lock as the
//! filesystem's own reads and writes of it, and the final sweep runs while
//! renames and links wait.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, RwLock};

use super::inode::{Inode, InodeTable};
use crate::crypto::names::DIR_ID_LEN;
use crate::rekey::FileGate;
use crate::sys;
use crate::volume::layout::FileHeader;

pub struct FsGate {
    pub(super) inodes: Arc<InodeTable>,
    pub(super) moves: Arc<RwLock<()>>,
}

impl FsGate {
    /// The inode-table entry of the backing inode at `path` (one reference
    /// taken: the caller forgets it), the same one the kernel's lookups get,
    /// so both sides share its locks. ENOENT if `path` is no longer the
    /// inode the walk saw (`md`): the next pass finds the new one.
    fn entry(&self, path: &Path, md: &std::fs::Metadata) -> io::Result<Arc<Inode>> {
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(path)?
            .into();
        let st = sys::fstat(fd.as_fd())?;
        if st.st_ino != md.ino() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(self.inodes.lookup(fd, &st))
    }
}

impl FileGate for FsGate {
    fn exclusive(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<FileHeader>>,
    ) -> io::Result<()> {
        let inode = self.entry(path, md)?;
        let r = {
            let _g = inode.io.write().unwrap_or_else(|p| p.into_inner());
            let r = work();
            if let Ok(Some(h)) = &r {
                inode.cache_header(h.clone());
            }
            r
        };
        self.inodes.forget(inode.ino, 1);
        r.map(drop)
    }

    fn exclusive_names(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<([u8; DIR_ID_LEN], u16)>>,
    ) -> io::Result<()> {
        let inode = self.entry(path, md)?;
        let r = {
            let _g = inode.names.write().unwrap_or_else(|p| p.into_inner());
            let r = work();
            if let Ok(Some(k)) = &r {
                inode.cache_dir_key(*k);
            }
            r
        };
        self.inodes.forget(inode.ino, 1);
        r.map(drop)
    }

    fn moves_frozen(&self, f: &mut dyn FnMut()) {
        let _g = self.moves.write().unwrap_or_else(|p| p.into_inner());
        f()
    }
}
