//! Node ids that outlive the kernel's inode cache and the daemon: what an
//! NFS export of the mount (and `open_by_handle_at` on it) needs.
//!
//! The kernel's file handle for a FUSE inode is its node id and the
//! generation we gave it. To open a handle whose inode it has forgotten
//! (after memory pressure, or after the daemon restarted), the kernel sends
//! LOOKUP of "." in that node id — and nothing else. So the node id alone
//! must name the backing inode. kmfs derives it from the backing
//! filesystem's own file handle, which holds the inode number and the
//! filesystem's generation number of the inode:
//!
//! ```text
//! node id = generation << 32 | inode number      (inode number < 2^32, ≠ 0)
//! ```
//!
//! The layout of the backing handle (where the inode number and the
//! generation sit in its bytes) is learned at mount from handles of inodes
//! whose numbers we know, and used only if it explains all of them: ext4
//! (8 bytes: inode, generation), tmpfs (12: generation, inode low, inode
//! high) and xfs with 32-bit inodes fit. On other filesystems (btrfs,
//! overlayfs, or when handles are unusable) node ids are the backing inode
//! numbers, as before, and handles stay valid only while the daemon still
//! knows the inode.
//!
//! Ids that cannot be derived (a clash, another mount below the backing
//! root) are *synthetic*: a counter in the high 32 bits and zero in the low
//! ones, a value no derived id takes (inode number 0 does not exist). They
//! go out with this daemon's random *epoch* as the FUSE generation, so a
//! handle minted by an earlier daemon never opens whatever a later one gave
//! the same synthetic id.
//!
//! A handle from the outside (an NFS client can forge one) is untrusted: a
//! node id resolved by handle must be a backing inode inside the volume and
//! not one of its own files (`InodeTable::resolve` checks; docs/SECURITY.md).

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::{Errno, FileAttr, FileType};

use super::inode::Inode;
use super::{KmfsFs, R};
use crate::sys::{self, FileHandle};
use crate::volume::layout::{HEADER_LEN, MAGIC};

pub const ROOT: u64 = 1;
const LOW: u64 = 0xffff_ffff;

/// Where the inode number and the generation sit in the backing
/// filesystem's file handles (little-endian 32-bit words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandleLayout {
    kind: libc::c_int,
    len: usize,
    ino_lo: usize,
    ino_hi: Option<usize>,
    generation: usize,
}

/// The candidate layouts of an 8- or 12-byte handle.
fn candidates(kind: libc::c_int, len: usize) -> Vec<HandleLayout> {
    let l = |ino_lo, ino_hi, generation| HandleLayout {
        kind,
        len,
        ino_lo,
        ino_hi,
        generation,
    };
    match len {
        8 => vec![l(0, None, 4), l(4, None, 0)],
        12 => vec![l(0, Some(4), 8), l(4, Some(8), 0)],
        _ => Vec::new(),
    }
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl HandleLayout {
    /// The one layout that explains every sample (a handle and the inode
    /// number it belongs to), if there is exactly one.
    pub fn learn(samples: &[(FileHandle, u64)]) -> Option<HandleLayout> {
        let (first, _) = samples.first()?;
        let fits: Vec<HandleLayout> = candidates(first.kind(), first.bytes().len())
            .into_iter()
            .filter(|l| samples.iter().all(|(h, ino)| l.decode(h) == Some(*ino)))
            .collect();
        match fits.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    fn fits(&self, h: &FileHandle) -> bool {
        h.kind() == self.kind && h.bytes().len() == self.len
    }

    /// The inode number a handle names (with the generation in `split`).
    fn decode(&self, h: &FileHandle) -> Option<u64> {
        self.split(h).map(|(ino, _)| ino)
    }

    /// The inode number and generation a handle holds.
    pub fn split(&self, h: &FileHandle) -> Option<(u64, u32)> {
        if !self.fits(h) {
            return None;
        }
        let b = h.bytes();
        let hi = self.ino_hi.map_or(0, |at| word(b, at));
        let ino = u64::from(hi) << 32 | u64::from(word(b, self.ino_lo));
        Some((ino, word(b, self.generation)))
    }

    /// The handle of inode `ino` with generation `generation`.
    pub fn join(&self, ino: u64, generation: u32) -> FileHandle {
        let mut b = vec![0u8; self.len];
        b[self.ino_lo..self.ino_lo + 4].copy_from_slice(&(ino as u32).to_le_bytes());
        if let Some(at) = self.ino_hi {
            b[at..at + 4].copy_from_slice(&((ino >> 32) as u32).to_le_bytes());
        }
        b[self.generation..self.generation + 4].copy_from_slice(&generation.to_le_bytes());
        FileHandle::from_parts(self.kind, &b)
    }
}

/// The node id derived from a backing inode number and generation, where
/// one can be (see the module comment).
pub fn derived(ino: u64, generation: u32) -> Option<u64> {
    if ino == 0 || ino > LOW {
        return None;
    }
    let id = u64::from(generation) << 32 | ino;
    (id != ROOT).then_some(id)
}

/// The backing inode number and generation a derived node id stands for.
pub fn underived(id: u64) -> Option<(u64, u32)> {
    let ino = id & LOW;
    (ino != 0 && id != ROOT).then_some((ino, (id >> 32) as u32))
}

/// A node id that is the backing inode number itself (no usable layout).
pub fn plain(ino: u64) -> Option<u64> {
    (ino & LOW != 0 && ino != ROOT).then_some(ino)
}

/// The `n`th synthetic node id (n ≥ 1).
pub fn synthetic(n: u64) -> u64 {
    n << 32
}

pub fn is_synthetic(id: u64) -> bool {
    id & LOW == 0
}

/// A random non-zero generation for this daemon's synthetic ids.
pub fn new_epoch() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b).max(1)
}

/// How this mount gives out node ids, and what it accepts back.
pub struct Ids {
    /// The backing handles' layout, if learned: ids are derived.
    layout: Option<HandleLayout>,
    /// The FUSE generation of synthetic ids.
    epoch: u32,
    /// The backing directory is the root of its filesystem, so every
    /// inode a handle can reach on it belongs to the volume.
    whole_fs: bool,
    /// The backing root, and its own files (kmfs.volume, kmfs.lock…),
    /// which are never served by handle.
    root: (u64, u64),
    internal: Vec<(u64, u64)>,
}

/// The volume's own files in the backing root.
const INTERNAL: [&std::ffi::CStr; 6] = [
    c"kmfs.volume",
    c"kmfs.lock",
    c"kmfs.dirid",
    c"kmfs.volume.bak",
    c"kmfs.rekey",
    c"kmfs.rekey.journal",
];

/// Enough levels for any real tree; a deeper walk is refused.
const MAX_DEPTH: usize = 4096;

impl Ids {
    /// Learns the id scheme from the backing root `root` (`st`); `handle`
    /// takes the handle of an inode on the backing filesystem, `mount_id`
    /// is the backing mount's id if handles are usable.
    pub fn learn(
        root: BorrowedFd<'_>,
        st: &libc::stat,
        mount_id: Option<libc::c_int>,
        handle: impl Fn(BorrowedFd<'_>) -> Option<FileHandle>,
    ) -> Ids {
        let mut samples = Vec::new();
        let mut internal = Vec::new();
        if let Some(h) = handle(root) {
            samples.push((h, st.st_ino));
        }
        for name in INTERNAL {
            let Ok(fd) = sys::open_path(root, name) else {
                continue;
            };
            let Ok(s) = sys::fstat(fd.as_fd()) else {
                continue;
            };
            internal.push((s.st_dev, s.st_ino));
            if s.st_dev == st.st_dev
                && let Some(h) = handle(fd.as_fd())
            {
                samples.push((h, s.st_ino));
            }
        }
        let layout = mount_id.and_then(|_| HandleLayout::learn(&samples));
        let mount_root = sys::fstatat(root, c"..", libc::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|p| p.st_dev != st.st_dev || p.st_ino == st.st_ino);
        let whole_fs = mount_root && mount_id.is_some_and(sys::mount_shows_whole_fs);
        let ids = Ids {
            layout,
            epoch: new_epoch(),
            whole_fs,
            root: (st.st_dev, st.st_ino),
            internal,
        };
        ids.log();
        ids
    }

    fn log(&self) {
        let handles = if self.layout.is_some() {
            "stable"
        } else {
            "volatile"
        };
        let files = if self.whole_fs {
            "all"
        } else {
            "directories-only"
        };
        log::info!(
            "op=export handles={handles} by_handle={files} note=\"{}\"",
            match (self.layout.is_some(), self.whole_fs) {
                (false, _) =>
                    "the backing filesystem's handles have an unknown layout: NFS file handles stay valid only while the daemon still knows the inode",
                (true, false) =>
                    "the backing directory is not the root of its filesystem: a forgotten file is not reopened from an NFS file handle (directories are); give the volume its own filesystem for full NFS export",
                (true, true) => "NFS file handles survive cache eviction and daemon restarts",
            }
        );
    }

    /// The node id for a new entry of backing inode `ino` on device `dev`
    /// whose handle is `h`, or `None` for a synthetic one.
    pub fn id_for(&self, dev: u64, ino: u64, h: Option<&FileHandle>) -> Option<u64> {
        if dev != self.root.0 {
            return None;
        }
        match &self.layout {
            Some(l) => match l.split(h?)? {
                (i, g) if i == ino => derived(i, g),
                _ => None,
            },
            None => plain(ino),
        }
    }

    /// The FUSE generation that goes out with node id `id`.
    pub fn generation(&self, id: u64) -> u64 {
        if is_synthetic(id) {
            u64::from(self.epoch)
        } else {
            0
        }
    }

    /// The backing handle and inode number a derived node id stands for.
    pub fn handle_of(&self, id: u64) -> Option<(FileHandle, u64)> {
        let (ino, g) = underived(id)?;
        Some((self.layout?.join(ino, g), ino))
    }

    /// Whether the backing inode `fd` (`st`), reached by a handle from
    /// outside, may be served: inside the volume and not one of its own
    /// files. Directories are followed up to the backing root; other files
    /// have no way up, so they are served only when the backing filesystem
    /// holds nothing but the volume. Symlinks never are: their targets are
    /// bound to the name they were reached by (docs/FORMAT.md 8.3), so the
    /// kernel must look them up by name again.
    pub fn inside(&self, fd: BorrowedFd<'_>, st: &libc::stat) -> bool {
        if st.st_dev != self.root.0 || self.internal.contains(&(st.st_dev, st.st_ino)) {
            return false;
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => self.below_root(fd, st),
            libc::S_IFLNK => false,
            libc::S_IFREG => self.whole_fs && is_content_file(fd, st),
            _ => self.whole_fs,
        }
    }

    fn below_root(&self, fd: BorrowedFd<'_>, st: &libc::stat) -> bool {
        let mut key = (st.st_dev, st.st_ino);
        let mut cur = None;
        for _ in 0..MAX_DEPTH {
            if key == self.root {
                return true;
            }
            let at = cur
                .as_ref()
                .map_or(fd, |f: &std::os::fd::OwnedFd| f.as_fd());
            let Ok(up) = sys::openat(
                at,
                c"..",
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY,
                0,
            ) else {
                return false;
            };
            let Ok(s) = sys::fstat(up.as_fd()) else {
                return false;
            };
            if (s.st_dev, s.st_ino) == key {
                return false; // the top of the filesystem
            }
            key = (s.st_dev, s.st_ino);
            cur = Some(up);
        }
        false
    }
}

impl KmfsFs {
    /// LOOKUP of "." in node `id`: how the kernel reopens a file handle
    /// whose inode it no longer caches (NFS export, open_by_handle_at).
    pub(super) fn lookup_self(&self, id: u64) -> R<(Arc<Inode>, FileAttr)> {
        let inode = match self.inodes.take(id) {
            Some(inode) => inode,
            None => {
                let (fd, st) = self.inodes.open_by_id(id)?;
                if !self.inodes.ids().inside(fd.as_fd(), &st) {
                    return Err(Errno::ESTALE);
                }
                let inode = self.inodes.lookup(fd, &st);
                if inode.ino != id {
                    // Its id is taken by another entry: not this handle's.
                    self.inodes.forget(inode.ino, 1);
                    return Err(Errno::ESTALE);
                }
                inode
            }
        };
        self.referenced(inode)
    }

    /// LOOKUP of ".." in directory `id`: the kernel connecting a directory
    /// reopened by handle to its parents. The root is its own parent.
    pub(super) fn lookup_parent(&self, id: u64) -> R<(Arc<Inode>, FileAttr)> {
        let dir = self.inode(fuser::INodeNo(id))?;
        if dir.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let inode = if id == super::inode::ROOT {
            self.inodes.take(id).ok_or(Errno::ESTALE)?
        } else {
            let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY;
            let fd = sys::openat(dir.fd()?.as_fd(), c"..", flags, 0).map_err(Errno::from)?;
            let st = sys::fstat(fd.as_fd()).map_err(Errno::from)?;
            self.inodes.lookup(fd, &st)
        };
        self.referenced(inode)
    }

    /// The attributes of an entry the kernel now holds one more reference
    /// to; the reference is dropped again if they cannot be read.
    fn referenced(&self, inode: Arc<Inode>) -> R<(Arc<Inode>, FileAttr)> {
        match self.stat_attr(&inode) {
            Ok(attr) => Ok((inode, attr)),
            Err(e) => {
                self.inodes.forget(inode.ino, 1);
                Err(e)
            }
        }
    }
}

/// A regular file that is a volume file: empty, or starting with a
/// per-file header (docs/FORMAT.md 6.1). A directory id, a long-name
/// sidecar or a header is not.
fn is_content_file(fd: BorrowedFd<'_>, st: &libc::stat) -> bool {
    if st.st_size == 0 {
        return true;
    }
    if (st.st_size as u64) < HEADER_LEN {
        return false;
    }
    let Ok(f) = sys::reopen(fd, libc::O_RDONLY | libc::O_NONBLOCK) else {
        return false;
    };
    let mut m = [0u8; 4];
    f.read_exact_at(&mut m, 0).is_ok() && &m == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(kind: libc::c_int, words: &[u32]) -> FileHandle {
        let b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        FileHandle::from_parts(kind, &b)
    }

    #[test]
    fn ext4_and_tmpfs_layouts_are_learned_and_round_trip() {
        // ext4: inode, generation.
        let l = HandleLayout::learn(&[(h(1, &[2, 77]), 2), (h(1, &[12, 91]), 12)]).unwrap();
        assert_eq!(
            l.split(&h(1, &[5000, 0xdead_beef])),
            Some((5000, 0xdead_beef))
        );
        assert_eq!(l.join(5000, 0xdead_beef), h(1, &[5000, 0xdead_beef]));
        // tmpfs: generation, inode low, inode high.
        let l = HandleLayout::learn(&[(h(1, &[9, 1, 0]), 1), (h(1, &[3, 40, 0]), 40)]).unwrap();
        assert_eq!(l.split(&h(1, &[7, 41, 1])), Some(((1 << 32) + 41, 7)));
        assert_eq!(l.join(41, 7), h(1, &[7, 41, 0]));
        // Another type or length is not decoded.
        assert_eq!(l.split(&h(2, &[7, 41, 0])), None);
        assert_eq!(l.split(&h(1, &[7, 41])), None);
    }

    #[test]
    fn ambiguous_or_foreign_handles_teach_nothing() {
        // The generation equals the inode number: both layouts fit.
        assert_eq!(HandleLayout::learn(&[(h(1, &[5, 5]), 5)]), None);
        // A layout must explain every sample.
        assert_eq!(
            HandleLayout::learn(&[(h(1, &[2, 77]), 2), (h(1, &[91, 12]), 12)]),
            None
        );
        // btrfs-like 20-byte handles have no candidate.
        assert_eq!(HandleLayout::learn(&[(h(1, &[2, 0, 5, 0, 1]), 2)]), None);
        assert_eq!(HandleLayout::learn(&[]), None);
    }

    #[test]
    fn derived_ids_never_meet_synthetic_ones_or_the_root() {
        assert_eq!(derived(12, 0xabcd), Some(0xabcd_0000_000c));
        assert_eq!(underived(0xabcd_0000_000c), Some((12, 0xabcd)));
        assert_eq!(derived(1, 0), None, "that would be the root's id");
        assert_eq!(derived(0, 5), None);
        assert_eq!(
            derived(1 << 32, 5),
            None,
            "inode numbers of 33 bits or more"
        );
        assert!(is_synthetic(synthetic(3)));
        assert!(!is_synthetic(derived(12, 0).unwrap()));
        assert_eq!(underived(synthetic(3)), None);
        assert_eq!(plain(1 << 32), None);
        assert_eq!(plain(ROOT), None);
        assert_eq!(plain(77), Some(77));
    }
}
