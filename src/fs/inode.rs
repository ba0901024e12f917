//! The inode table: FUSE node ids ↔ backing inodes.
//!
//! Every inode the kernel knows is held open as an `O_PATH` descriptor, so it
//! stays reachable across renames, and hard links (same backing device and
//! inode number) share one entry. The FUSE node id is the backing inode
//! number, so `stat` shows stable inode numbers across remounts (tar and rsync
//! rely on them for hard-link detection); the backing root is node 1, and a
//! backing inode that would clash (inode number 1, or another device below the
//! backing directory) gets a synthetic id from the top of the range. While an
//! entry exists, its descriptor pins the backing inode, so the backing
//! filesystem cannot reuse that number for another file.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};

use fuser::FileType;

use crate::crypto::names::DIR_ID_LEN;
use crate::sync::MutexExt;
use crate::volume::layout::FileHeader;

pub const ROOT: u64 = 1;
const SYNTHETIC_BASE: u64 = 1 << 62;

pub struct Inode {
    pub ino: u64,
    fd: OwnedFd,
    pub kind: FileType,
    /// Directory id and the key generation of the names in it
    /// (encrypted-names mode), read on first use; a rekey changes the
    /// generation while holding `names` for writing.
    dir_key: Mutex<Option<([u8; DIR_ID_LEN], u16)>>,
    /// Held shared by every operation that encodes or decodes names in this
    /// directory, exclusively by a rekey re-encrypting them.
    pub names: RwLock<()>,
    /// Per-file header, cached once read or written. Only a rekey changes it
    /// (its DEK generation), holding `io` for writing.
    header: Mutex<Option<FileHeader>>,
    /// Serialises writes/truncates of this file; reads share it.
    pub io: RwLock<()>,
    /// Open handles that may write (see `handle::OpenFile`).
    pub writers: AtomicUsize,
    /// A symlink's place (its directory's id, zeros on a plaintext-names
    /// volume, and its plaintext name), which its target is bound to; noted
    /// at every lookup by name.
    link: Mutex<Option<LinkPlace>>,
}

/// Where a symlink is: what its target is bound to.
pub type LinkPlace = ([u8; DIR_ID_LEN], Vec<u8>);

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The cached directory id and names generation.
    pub fn cached_dir_key(&self) -> Option<([u8; DIR_ID_LEN], u16)> {
        *self.dir_key.locked()
    }

    pub fn cache_dir_key(&self, k: ([u8; DIR_ID_LEN], u16)) {
        *self.dir_key.locked() = Some(k);
    }

    /// The cached per-file header, if read or written before.
    pub fn cached_header(&self) -> Option<FileHeader> {
        self.header.locked().clone()
    }

    pub fn cache_header(&self, h: FileHeader) {
        *self.header.locked() = Some(h);
    }

    /// The symlink's place, as last looked up.
    pub fn link_place(&self) -> Option<LinkPlace> {
        self.link.locked().clone()
    }

    pub fn set_link_place(&self, place: LinkPlace) {
        *self.link.locked() = Some(place);
    }

    fn new(ino: u64, fd: OwnedFd, kind: FileType) -> Inode {
        Inode {
            ino,
            fd,
            kind,
            dir_key: Mutex::new(None),
            names: RwLock::new(()),
            header: Mutex::new(None),
            io: RwLock::new(()),
            writers: AtomicUsize::new(0),
            link: Mutex::new(None),
        }
    }
}

pub fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

struct Entry {
    inode: Arc<Inode>,
    nlookup: u64,
    key: (u64, u64),
}

struct Tables {
    by_ino: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
    next_synthetic: u64,
    root_dev: u64,
}

pub struct InodeTable {
    t: Mutex<Tables>,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd, st: &libc::stat) -> InodeTable {
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new(Inode::new(ROOT, root_fd, FileType::Directory));
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT,
            Entry {
                inode: root,
                nlookup: 1,
                key,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT);
        InodeTable {
            t: Mutex::new(Tables {
                by_ino,
                by_key,
                next_synthetic: SYNTHETIC_BASE,
                root_dev: st.st_dev,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.t.locked()
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.lock().by_ino.get(&ino).map(|e| e.inode.clone())
    }

    pub fn root(&self) -> Arc<Inode> {
        self.get(ROOT).expect("the root is never forgotten")
    }

    /// The entry of the backing inode `(dev, ino)`, if the kernel holds one
    /// (no reference taken).
    pub fn by_backing(&self, dev: u64, ino: u64) -> Option<Arc<Inode>> {
        let t = self.lock();
        let i = t.by_key.get(&(dev, ino))?;
        t.by_ino.get(i).map(|e| e.inode.clone())
    }

    /// The node id for a backing inode as readdir reports it (no reference taken).
    pub fn ino_for(&self, dev: u64, ino: u64) -> u64 {
        let t = self.lock();
        if let Some(&i) = t.by_key.get(&(dev, ino)) {
            return i;
        }
        if dev == t.root_dev && ino != ROOT && ino < SYNTHETIC_BASE {
            ino
        } else {
            // Not known yet; lookup will assign an id. Readdir ids are advisory.
            u64::MAX
        }
    }

    /// Registers one kernel reference (a lookup) to the backing inode behind
    /// `fd`, whose stat is `st`. Returns the shared entry.
    pub fn lookup(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let mut t = self.lock();
        if let Some(&ino) = t.by_key.get(&key)
            && let Some(e) = t.by_ino.get_mut(&ino)
        {
            e.nlookup += 1;
            return e.inode.clone();
        }
        let ino = if st.st_dev == t.root_dev
            && st.st_ino != ROOT
            && st.st_ino < SYNTHETIC_BASE
            && !t.by_ino.contains_key(&st.st_ino)
        {
            st.st_ino
        } else {
            t.next_synthetic += 1;
            t.next_synthetic
        };
        let inode = Arc::new(Inode::new(ino, fd, kind_of(st.st_mode)));
        t.by_ino.insert(
            ino,
            Entry {
                inode: inode.clone(),
                nlookup: 1,
                key,
            },
        );
        t.by_key.insert(key, ino);
        inode
    }

    /// Points the entry of backing inode `old` (a symlink re-created under
    /// a new backing inode by a rename, which the kernel sees as the same
    /// inode) at the new backing inode behind `fd` (`st`), keeping its node
    /// id and references. Returns whether the kernel held an entry.
    pub fn rebind(&self, old: (u64, u64), fd: OwnedFd, st: &libc::stat, place: LinkPlace) -> bool {
        let key = (st.st_dev, st.st_ino);
        let mut t = self.lock();
        let Some(&ino) = t.by_key.get(&old) else {
            return false;
        };
        if t.by_key.contains_key(&key) {
            return false;
        }
        let Some(e) = t.by_ino.get_mut(&ino) else {
            return false;
        };
        let inode = Inode::new(ino, fd, kind_of(st.st_mode));
        inode.set_link_place(place);
        e.inode = Arc::new(inode);
        e.key = key;
        t.by_key.remove(&old);
        t.by_key.insert(key, ino);
        true
    }

    /// Drops `n` kernel references; the entry goes when none are left.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.lock();
        let gone = match t.by_ino.get_mut(&ino) {
            Some(e) => {
                e.nlookup = e.nlookup.saturating_sub(n);
                (e.nlookup == 0).then_some(e.key)
            }
            None => None,
        };
        if let Some(key) = gone {
            t.by_ino.remove(&ino);
            if t.by_key.get(&key) == Some(&ino) {
                t.by_key.remove(&key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;

    #[test]
    fn lookup_shares_hard_links_and_forget_drops() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"x").unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        let root = std::fs::File::open(d.path()).unwrap();
        let rst = sys::fstat(root.as_fd()).unwrap();
        let t = InodeTable::new(OwnedFd::from(root), &rst);
        let r = t.root();
        let fa = sys::open_path(r.fd(), c"a").unwrap();
        let sa = sys::fstat(fa.as_fd()).unwrap();
        let a = t.lookup(fa, &sa);
        let fb = sys::open_path(r.fd(), c"b").unwrap();
        let sb = sys::fstat(fb.as_fd()).unwrap();
        let b = t.lookup(fb, &sb);
        assert_eq!(a.ino, b.ino);
        assert_eq!(a.ino, sa.st_ino);
        assert_eq!(t.len(), 2);
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_some());
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_none());
        t.forget(ROOT, 10);
        assert!(t.get(ROOT).is_some());
    }
}
