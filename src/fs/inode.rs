//! The inode table: FUSE node ids ↔ backing inodes.
//!
//! Node ids are derived from the backing inode number and generation
//! (`export.rs`), so they are stable across remounts and daemon restarts
//! and name the backing inode on their own (NFS export); `stat` shows
//! them as inode numbers. The backing root is node 1. Hard links (same
//! backing device and inode number) share one entry.
//!
//! An entry reaches its backing inode by one of two kinds of reference
//! (docs/ARCHITECTURE.md, "The inode table"):
//!
//! * a **file handle** (`name_to_handle_at`) — the normal case. The entry
//!   keeps an `O_PATH` descriptor only while it is among the most recently
//!   used ones ([`FdCache`], sized from the daemon's descriptor limit); an
//!   evicted entry is reopened with `open_by_handle_at`. So the number of
//!   inodes the kernel may cache is bounded by memory, not by the
//!   open-file limit. A handle names one inode for its whole life (the
//!   filesystem's generation number is in it), so a reused inode number is
//!   recognised as a new file.
//! * a **pinned descriptor** — the backing root, and every inode when the
//!   backing filesystem gives no handles (or the daemon may not open them:
//!   CAP_DAC_READ_SEARCH). Then each cached inode holds one descriptor, as
//!   before, and the log says so once.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use fuser::{Errno, FileType};

use super::export::{self, Ids};
pub use super::fd_cache::{FdCache, note_fd_exhaustion};
use crate::crypto::names::DIR_ID_LEN;
use crate::sync::MutexExt;
use crate::sys::{self, FileHandle};
use crate::volume::layout::FileHeader;

pub const ROOT: u64 = export::ROOT;

/// A descriptor of an inode's backing inode, valid while this value lives
/// (the inode table may evict its own copy meanwhile).
pub struct NodeFd(Arc<OwnedFd>);

impl AsFd for NodeFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

pub struct Inode {
    pub ino: u64,
    /// The file handle, taken when the descriptor is first evicted (most
    /// entries are forgotten before that); `Some(None)` pins the entry: the
    /// root, or an inode without a usable handle.
    pub(super) handle: OnceLock<Option<FileHandle>>,
    /// The open `O_PATH` descriptor, if the entry has one now.
    pub(super) fd: Mutex<Option<Arc<OwnedFd>>>,
    /// Used since the cache last looked (second-chance eviction).
    pub(super) used: AtomicBool,
    pub(super) cache: Arc<FdCache>,
    me: Weak<Inode>,
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
    /// Whether the backing inode holds extended attributes kmfs shows
    /// (`xattr.rs`: unknown, none or some), learned at the first query.
    pub xattrs: AtomicU8,
}

/// Where a symlink is: what its target is bound to.
pub type LinkPlace = ([u8; DIR_ID_LEN], Vec<u8>);

impl Inode {
    /// A descriptor of the backing inode: the entry's own while it has one,
    /// otherwise reopened by file handle (ESTALE once the inode is gone).
    pub fn fd(&self) -> Result<NodeFd, Errno> {
        self.used.store(true, Ordering::Relaxed);
        if let Some(fd) = &*self.fd.locked() {
            return Ok(NodeFd(fd.clone()));
        }
        let Some(Some(h)) = self.handle.get() else {
            // Only an entry with a handle loses its descriptor.
            return Err(Errno::ESTALE);
        };
        let fd = Arc::new(self.cache.reopen(h)?);
        self.install(fd.clone());
        Ok(NodeFd(fd))
    }

    /// [`Inode::fd`] for code that speaks `io::Error`.
    pub fn fd_io(&self) -> std::io::Result<NodeFd> {
        self.fd()
            .map_err(|e| std::io::Error::from_raw_os_error(e.code()))
    }

    /// Opens the backing inode for I/O (`flags` as for open(2)). When the
    /// daemon is out of descriptors, closes half of the cached ones and
    /// tries once more.
    pub fn reopen(&self, flags: libc::c_int) -> std::io::Result<std::fs::File> {
        self.cache
            .making_room(|| sys::reopen(self.fd_io()?.as_fd(), flags))
    }

    /// Opens the entry `name` of this directory as an `O_PATH` descriptor
    /// (not following a symlink), making room as [`Inode::reopen`] does.
    pub fn open_child(&self, name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
        self.cache
            .making_room(|| sys::open_path(self.fd_io()?.as_fd(), name))
    }

    /// The backing path, for log messages.
    pub fn path_for_log(&self) -> String {
        match self.fd() {
            Ok(fd) => sys::fd_path(fd.as_fd()),
            Err(_) => format!("inode:{}", self.ino),
        }
    }

    /// Gives an evicted entry a descriptor again (from a reopen, or a lookup
    /// that found the same inode by name).
    fn install(&self, fd: Arc<OwnedFd>) {
        {
            let mut slot = self.fd.locked();
            if slot.is_some() {
                return;
            }
            *slot = Some(fd);
        }
        self.cache.admit(self.me.clone());
    }

    fn is_evicted(&self) -> bool {
        self.fd.locked().is_none()
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

    /// A new entry holding `fd`; `pinned` keeps it open for good (the root).
    /// `taken` is its file handle if already taken (`None` inside: none).
    fn new(
        ino: u64,
        fd: OwnedFd,
        pinned: bool,
        kind: FileType,
        cache: &Arc<FdCache>,
        taken: Option<Option<FileHandle>>,
    ) -> Arc<Inode> {
        let handle = OnceLock::new();
        if pinned || cache.mount_id.is_none() {
            let _ = handle.set(None);
        } else if let Some(h) = taken {
            let _ = handle.set(h);
        }
        let evictable = !matches!(handle.get(), Some(None));
        let inode = Arc::new_cyclic(|me| Inode {
            ino,
            handle,
            fd: Mutex::new(Some(Arc::new(fd))),
            used: AtomicBool::new(true),
            cache: cache.clone(),
            me: me.clone(),
            kind,
            dir_key: Mutex::new(None),
            names: RwLock::new(()),
            header: Mutex::new(None),
            io: RwLock::new(()),
            writers: AtomicUsize::new(0),
            link: Mutex::new(None),
            xattrs: AtomicU8::new(0),
        });
        if evictable {
            cache.admit(Arc::downgrade(&inode));
        }
        inode
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
    /// Synthetic ids given out so far (`export::synthetic`).
    synthetic: u64,
}

pub struct InodeTable {
    t: Mutex<Tables>,
    cache: Arc<FdCache>,
    ids: Ids,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd, st: &libc::stat) -> InodeTable {
        let key = (st.st_dev, st.st_ino);
        let cache = Arc::new(FdCache::new(&root_fd));
        let ids = Ids::learn(root_fd.as_fd(), st, cache.mount_id, |fd| {
            cache.handle_for(fd)
        });
        let root = Inode::new(ROOT, root_fd, true, FileType::Directory, &cache, None);
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
                synthetic: 0,
            }),
            cache,
            ids,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.t.locked()
    }

    /// The descriptor cache (for status and tests).
    pub fn fd_cache(&self) -> &FdCache {
        &self.cache
    }

    /// The node id scheme (generations, handles, what may be served).
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.lock().by_ino.get(&ino).map(|e| e.inode.clone())
    }

    /// One more kernel reference to the entry `ino`, if the table has it.
    pub fn take(&self, ino: u64) -> Option<Arc<Inode>> {
        let mut t = self.lock();
        let e = t.by_ino.get_mut(&ino)?;
        e.nlookup += 1;
        Some(e.inode.clone())
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

    /// The node id readdir reports for the entry `name` of directory `dir`,
    /// backing inode `(dev, ino)` (no reference taken): the entry's if the
    /// kernel holds one, else the id a lookup would give it.
    pub fn ino_for(&self, dir: BorrowedFd<'_>, name: &std::ffi::CStr, dev: u64, ino: u64) -> u64 {
        if let Some(&i) = self.lock().by_key.get(&(dev, ino)) {
            return i;
        }
        let h = sys::name_to_handle_at(dir, name)
            .ok()
            .filter(|(_, m)| Some(*m) == self.cache.mount_id)
            .map(|(h, _)| h);
        // Not known yet and not derivable: lookup will assign an id.
        // Readdir ids are advisory.
        self.ids.id_for(dev, ino, h.as_ref()).unwrap_or(u64::MAX)
    }

    /// Opens, by its derived handle, the backing inode a node id names —
    /// for an id the table no longer has (the kernel reopening an NFS file
    /// handle). The caller checks what it found (`Ids::inside`).
    pub fn open_by_id(&self, id: u64) -> Result<(OwnedFd, libc::stat), Errno> {
        let (h, ino) = self.ids.handle_of(id).ok_or(Errno::ESTALE)?;
        let fd = self.cache.reopen(&h)?;
        let st = sys::fstat(fd.as_fd()).map_err(Errno::from)?;
        if st.st_ino != ino {
            return Err(Errno::ESTALE);
        }
        Ok((fd, st))
    }

    /// Registers one kernel reference (a lookup) to the backing inode behind
    /// `fd`, whose stat is `st`. Returns the shared entry.
    pub fn lookup(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        if let Some(inode) = self.take_live(key) {
            return inode;
        }
        // The handle (a system call, outside the table lock): the new
        // entry's id is derived from it, and it tells an evicted entry's
        // file from a new one that reuses its inode number.
        let handle = self.cache.handle_for(fd.as_fd());
        let mut t = self.lock();
        if let Some(&ino) = t.by_key.get(&key)
            && let Some(e) = t.by_ino.get_mut(&ino)
        {
            let same = match (e.inode.handle.get(), &handle) {
                // Its open descriptor pins the backing inode: the same file.
                _ if !e.inode.is_evicted() => true,
                (Some(Some(old)), Some(new)) => old == new,
                _ => false,
            };
            if same {
                e.nlookup += 1;
                let inode = e.inode.clone();
                drop(t);
                inode.install(Arc::new(fd));
                return inode;
            }
            // The inode number now belongs to another file: the old entry
            // stays (under its node id) until the kernel forgets it; the
            // new file gets its own.
            t.by_key.remove(&key);
        }
        let ino = match self.ids.id_for(st.st_dev, st.st_ino, handle.as_ref()) {
            Some(id) if !t.by_ino.contains_key(&id) => id,
            _ => {
                t.synthetic += 1;
                export::synthetic(t.synthetic)
            }
        };
        let inode = Inode::new(
            ino,
            fd,
            false,
            kind_of(st.st_mode),
            &self.cache,
            Some(handle),
        );
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

    /// One more reference to the entry of `key` if it holds a descriptor
    /// (which pins its backing inode, so it is the same file). `None` if
    /// unknown or evicted: the caller opens the entry and goes through
    /// [`InodeTable::lookup`] (a lookup that found `key` by `fstatat` needs
    /// no descriptor of its own otherwise).
    pub fn take_live(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        let mut t = self.lock();
        let ino = *t.by_key.get(&key)?;
        let e = t.by_ino.get_mut(&ino)?;
        if e.inode.is_evicted() {
            return None;
        }
        e.nlookup += 1;
        Some(e.inode.clone())
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
        let inode = Inode::new(ino, fd, false, kind_of(st.st_mode), &self.cache, None);
        inode.set_link_place(place);
        e.inode = inode;
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
            let entry = t.by_ino.remove(&ino);
            if t.by_key.get(&key) == Some(&ino) {
                t.by_key.remove(&key);
            }
            // Its descriptor is closed after the table lock is released
            // (rm -rf sends a FORGET per file, on every worker thread).
            drop(t);
            drop(entry);
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
        let fa = sys::open_path(r.fd().unwrap().as_fd(), c"a").unwrap();
        let sa = sys::fstat(fa.as_fd()).unwrap();
        let a = t.lookup(fa, &sa);
        let fb = sys::open_path(r.fd().unwrap().as_fd(), c"b").unwrap();
        let sb = sys::fstat(fb.as_fd()).unwrap();
        let b = t.lookup(fb, &sb);
        assert_eq!(a.ino, b.ino);
        assert_eq!(
            a.ino & 0xffff_ffff,
            sa.st_ino,
            "derived from the inode number"
        );
        assert_eq!(t.len(), 2);
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_some());
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_none());
        t.forget(ROOT, 10);
        assert!(t.get(ROOT).is_some());
    }

    fn table(dir: &std::path::Path) -> InodeTable {
        let root = std::fs::File::open(dir).unwrap();
        let rst = sys::fstat(root.as_fd()).unwrap();
        InodeTable::new(OwnedFd::from(root), &rst)
    }

    fn look(t: &InodeTable, name: &std::ffi::CStr) -> Arc<Inode> {
        let fd = t.root().open_child(name).unwrap();
        let st = sys::fstat(fd.as_fd()).unwrap();
        t.lookup(fd, &st)
    }

    #[test]
    fn evicted_entries_reopen_by_handle_and_follow_renames() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"x").unwrap();
        let t = table(d.path());
        let a = look(&t, c"a");
        assert_eq!(t.fd_cache().open_count(), 1);
        t.fd_cache().shrink(0);
        assert!(a.is_evicted(), "the cache let go of its descriptor");
        std::fs::rename(d.path().join("a"), d.path().join("moved")).unwrap();
        let fd = a.fd().expect("reopened by file handle");
        assert!(sys::fd_path(fd.as_fd()).ends_with("/moved"));
        assert!(!a.is_evicted());
        // The root is pinned: never evicted.
        t.fd_cache().shrink(0);
        assert!(!t.root().is_evicted());
    }

    #[test]
    fn a_reused_inode_number_is_a_new_entry() {
        let d = tempfile::tempdir().unwrap();
        let t = table(d.path());
        // Find an inode number the filesystem reuses (ext4 does at once).
        for i in 0..50 {
            std::fs::write(d.path().join("old"), b"old").unwrap();
            let old = look(&t, c"old");
            t.fd_cache().shrink(0);
            let old_ino = sys::fstat(old.fd().unwrap().as_fd()).unwrap().st_ino;
            t.fd_cache().shrink(0);
            std::fs::remove_file(d.path().join("old")).unwrap();
            std::fs::write(d.path().join("new"), b"new").unwrap();
            let new_ino = std::fs::metadata(d.path().join("new")).unwrap();
            let new_ino = std::os::unix::fs::MetadataExt::ino(&new_ino);
            if new_ino != old_ino {
                std::fs::remove_file(d.path().join("new")).unwrap();
                t.forget(old.ino, 1);
                continue;
            }
            let new = look(&t, c"new");
            assert_ne!(
                new.ino, old.ino,
                "round {i}: the new file got the old entry"
            );
            let fd = new.fd().unwrap();
            assert!(sys::fd_path(fd.as_fd()).ends_with("/new"));
            assert_eq!(old.fd().err(), Some(Errno::ESTALE), "the old file is gone");
            return;
        }
        eprintln!(
            "SKIPPED: the filesystem under {} never reused an inode number",
            d.path().display()
        );
    }
}
