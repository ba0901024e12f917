//! The filesystem's side of a rekey ([`crate::rekey::FileGate`]): the
//! re-encryption of a file runs under the same per-inode lock as the
//! filesystem's own reads and writes of it, and the final sweep runs while
//! renames and links wait.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use super::inode::{Inode, InodeTable};
use crate::crypto::names::DIR_ID_LEN;
use crate::rekey::{FileGate, Frontier};
use crate::sync::{MutexExt, RwLockExt};
use crate::sys;
use crate::volume::layout::FileHeader;

pub struct FsGate {
    pub(super) inodes: Arc<InodeTable>,
    pub(super) moves: Arc<Moves>,
    pub(super) splits: Arc<Splits>,
}

/// Renames and links: counted as they start and finish, so a rekey's final
/// sweep can run without stopping them and tell afterwards whether one ran
/// meanwhile; and the lock the sweep falls back to when they keep running.
#[derive(Default)]
pub struct Moves {
    lock: RwLock<()>,
    started: AtomicU64,
    finished: AtomicU64,
}

/// One rename or link in progress.
pub struct Move<'a> {
    _shared: RwLockReadGuard<'a, ()>,
    moves: &'a Moves,
}

impl Moves {
    /// Marks a rename or link as running until the returned value drops.
    pub fn begin(&self) -> Move<'_> {
        let shared = self.lock.read_locked();
        self.started.fetch_add(1, Ordering::SeqCst);
        Move {
            _shared: shared,
            moves: self,
        }
    }
}

impl Drop for Move<'_> {
    fn drop(&mut self) {
        self.moves.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Sweeps tried without the lock before renames are held off.
const UNLOCKED_SWEEPS: usize = 3;

/// Files a rekey has left half way (by file id), so reads and writes use
/// the right generation on each side of the frontier. Keyed by file id, not
/// inode, so the entry outlives the kernel forgetting the inode; a rekey
/// splits at most one file at a time.
#[derive(Default)]
pub struct Splits {
    /// Entries in `map`: the I/O path skips the lock while it is 0.
    count: AtomicUsize,
    map: Mutex<HashMap<[u8; 16], Frontier>>,
}

impl Splits {
    /// The frontier of the file with id `file_id`. Read under the file's
    /// I/O lock; the rekey changes it only while holding that lock
    /// exclusively, which orders the two.
    pub fn get(&self, file_id: &[u8; 16]) -> Option<Frontier> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.map.locked().get(file_id).copied()
    }

    pub fn set(&self, file_id: &[u8; 16], f: Option<Frontier>) {
        let mut map = self.map.locked();
        match f {
            Some(f) => {
                map.insert(*file_id, f);
            }
            None => {
                map.remove(file_id);
            }
        }
        self.count.store(map.len(), Ordering::Relaxed);
    }
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
            let _g = inode.io.write_locked();
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
            let _g = inode.names.write_locked();
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
        // Optimistic first: a sweep that began with no move running and
        // saw none start is as good as one with moves held off, and lets
        // renames go on meanwhile.
        for _ in 0..UNLOCKED_SWEEPS {
            let started = self.moves.started.load(Ordering::SeqCst);
            if self.moves.finished.load(Ordering::SeqCst) == started {
                f();
                if self.moves.started.load(Ordering::SeqCst) == started {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _g = self.moves.lock.write_locked();
        f()
    }

    fn set_frontier(&self, file_id: &[u8; 16], frontier: Option<Frontier>) {
        self.splits.set(file_id, frontier)
    }

    fn frontier(&self, file_id: &[u8; 16]) -> Option<Frontier> {
        self.splits.get(file_id)
    }
}
