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

use super::inode::InodeTable;
use super::sys;
use crate::rekey::FileGate;
use crate::volume::layout::FileHeader;

pub struct FsGate {
    pub(super) inodes: Arc<InodeTable>,
    pub(super) moves: Arc<RwLock<()>>,
}

impl FileGate for FsGate {
    fn exclusive(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<FileHeader>>,
    ) -> io::Result<()> {
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(path)?
            .into();
        let st = sys::fstat(fd.as_fd())?;
        if st.st_ino != md.ino() {
            // Replaced since the walk saw it; the next pass finds the new file.
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        // The same entry the kernel's lookups get: one lock for both sides.
        let inode = self.inodes.lookup(fd, &st);
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

    fn moves_frozen(&self, f: &mut dyn FnMut()) {
        let _g = self.moves.write().unwrap_or_else(|p| p.into_inner());
        f()
    }
}
