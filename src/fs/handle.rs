//! Open file and directory handles.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::inode::Inode;
use crate::sync::MutexExt;

/// An open regular file: the backing file opened read-write (reads need it
/// for read-modify-write anyway) or read-only on a read-only mount.
pub struct OpenFile {
    pub inode: Arc<Inode>,
    pub file: File,
    pub append: bool,
    writable: bool,
}

impl OpenFile {
    /// A handle opened with `flags`; counts itself among the inode's writers
    /// while it lives if it may write.
    pub fn new(inode: Arc<Inode>, file: File, flags: i32) -> OpenFile {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writable {
            inode
                .writers
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        OpenFile {
            inode,
            file,
            append: flags & libc::O_APPEND != 0,
            writable,
        }
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if self.writable {
            self.inode
                .writers
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// One entry of a directory listing snapshot.
#[derive(Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub backing: CString,
    /// The backing inode number (readdir maps it to a node id).
    pub ino: u64,
    pub kind: fuser::FileType,
}

/// An open directory: a snapshot of its entries, taken at opendir and again
/// whenever the listing restarts at offset 0 after a first pass (rewinddir).
pub struct OpenDir {
    pub inode: Arc<Inode>,
    pub entries: Mutex<Vec<DirEntry>>,
    /// The snapshot is opendir's and no listing has started from it yet: the
    /// first read at offset 0 uses it instead of listing the directory again.
    pub fresh: std::sync::atomic::AtomicBool,
}

impl OpenDir {
    pub fn new(inode: Arc<Inode>, entries: Vec<DirEntry>) -> OpenDir {
        OpenDir {
            inode,
            entries: Mutex::new(entries),
            fresh: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Whether a listing starting at offset 0 must take a new snapshot (true
    /// except for the first one after opendir).
    pub fn restarts(&self) -> bool {
        !self.fresh.swap(false, Ordering::AcqRel)
    }
}

pub struct Handles<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Handles<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.map.locked()
    }

    pub fn insert(&self, v: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(fh, Arc::new(v));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.lock().get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.lock().remove(&fh)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
