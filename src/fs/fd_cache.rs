//! The bounded cache of open descriptors of handle-referenced inodes
//! (docs/ARCHITECTURE.md, "The inode table"): at most `capacity` entries
//! keep their `O_PATH` descriptor; beyond that the least recently used are
//! closed and reopen later by file handle. Sized from the descriptor limit.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Weak};

use fuser::Errno;

use super::inode::Inode;
use crate::sync::MutexExt;
use crate::sys::{self, FileHandle};

/// The bounded set of open descriptors of handle-referenced inodes: at most
/// `capacity` stay open; beyond that the least recently used are closed
/// (second chance: an entry used since the last pass stays one more round).
pub struct FdCache {
    /// A descriptor on the backing filesystem, for `open_by_handle_at`.
    mount_fd: Option<OwnedFd>,
    pub(super) mount_id: Option<libc::c_int>,
    capacity: usize,
    /// The limit the capacity was sized from, for messages.
    limit: u64,
    open: Mutex<VecDeque<Weak<Inode>>>,
}

/// What the daemon keeps for itself out of its descriptor limit: open
/// files, directory handles, the FUSE device, logs, sockets.
const RESERVED_FDS: u64 = 256;
const MIN_CACHED_FDS: usize = 16;
/// Beyond this many, keeping descriptors buys nothing measurable: a reopen
/// by handle is one system call.
const MAX_CACHED_FDS: usize = 1 << 16;

impl FdCache {
    /// A cache sized from the descriptor limit the process has now: three
    /// quarters of what is left after a reserve; the rest is for open files,
    /// which also get half of the cache when they need it (`making_room`).
    pub(super) fn new(root: &OwnedFd) -> FdCache {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let capacity = (limit.saturating_sub(RESERVED_FDS) / 4 * 3)
            .clamp(MIN_CACHED_FDS as u64, MAX_CACHED_FDS as u64) as usize;
        // open_by_handle_at wants a real descriptor on the filesystem, not
        // an O_PATH one.
        let (mount_fd, mount_id) =
            match sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY) {
                Ok(f) => {
                    let fd = OwnedFd::from(f);
                    let id = handles_usable(&fd);
                    (Some(fd), id)
                }
                Err(e) => {
                    log_no_handles(&format!("open of the backing root: {e}"));
                    (None, None)
                }
            };
        FdCache {
            mount_fd,
            mount_id,
            capacity,
            limit,
            open: Mutex::new(VecDeque::new()),
        }
    }

    /// The descriptor limit the cache was sized from, and its capacity.
    pub fn sizing(&self) -> (u64, usize) {
        (self.limit, self.capacity)
    }

    /// The file handle to keep for the inode behind `fd`, or `None` where
    /// it must be pinned (no handles here, or another filesystem).
    pub(super) fn handle_for(&self, fd: BorrowedFd<'_>) -> Option<FileHandle> {
        let id = self.mount_id?;
        match sys::name_to_handle(fd) {
            Ok((h, m)) if m == id => Some(h),
            Ok(_) => {
                note_once(
                    &PINNED_OTHER_MOUNT,
                    "a directory below the backing root is another mount; its inodes keep one open descriptor each",
                );
                None
            }
            Err(_) => None,
        }
    }

    pub(super) fn reopen(&self, h: &FileHandle) -> Result<OwnedFd, Errno> {
        let flags = libc::O_PATH | libc::O_NOFOLLOW;
        let Some(mount_fd) = &self.mount_fd else {
            return Err(Errno::ESTALE);
        };
        match sys::open_by_handle(mount_fd.as_fd(), h, flags) {
            Ok(fd) => Ok(fd),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                // Make room among our own descriptors and try once more.
                self.shrink(self.capacity / 2);
                sys::open_by_handle(mount_fd.as_fd(), h, flags).map_err(Errno::from)
            }
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// Runs `open`; if the process is out of descriptors, closes half of the
    /// cached ones and runs it once more.
    pub(super) fn making_room<T>(
        &self,
        open: impl Fn() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match open() {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                self.shrink(self.capacity / 2);
                open()
            }
            r => r,
        }
    }

    /// Notes a newly opened descriptor; evicts beyond the capacity.
    pub(super) fn admit(&self, inode: Weak<Inode>) {
        let mut q = self.open.locked();
        q.push_back(inode);
        if q.len() > self.capacity {
            evict(&mut q, self.capacity);
        }
    }

    /// Closes descriptors until at most `keep` stay open.
    pub(super) fn shrink(&self, keep: usize) {
        evict(&mut self.open.locked(), keep);
    }

    /// How many handle-referenced entries hold a descriptor now.
    pub fn open_count(&self) -> usize {
        self.open.locked().len()
    }
}

fn evict(q: &mut VecDeque<Weak<Inode>>, keep: usize) {
    // Each entry gets at most one second chance per call.
    let mut spared = 0;
    while q.len() > keep {
        let Some(w) = q.pop_front() else { break };
        let Some(inode) = w.upgrade() else { continue };
        if spared < q.len() && inode.used.swap(false, Ordering::Relaxed) {
            spared += 1;
            q.push_back(w);
            continue;
        }
        let mut slot = inode.fd.locked();
        let Some(fd) = slot.as_ref() else { continue };
        // The handle, taken now that it is needed (once per entry).
        let usable = inode
            .handle
            .get_or_init(|| inode.cache.handle_for(fd.as_fd()))
            .is_some();
        if usable {
            slot.take();
        }
        // Otherwise the entry keeps its descriptor for good, outside the
        // cache's count.
    }
}

/// Whether this process can use file handles on the backing filesystem:
/// the root's mount id if `name_to_handle_at` and `open_by_handle_at` work.
fn handles_usable(mount_fd: &OwnedFd) -> Option<libc::c_int> {
    let why = match sys::name_to_handle(mount_fd.as_fd()) {
        Ok((h, id)) => match sys::open_by_handle(mount_fd.as_fd(), &h, libc::O_PATH) {
            Ok(_) => return Some(id),
            Err(e) => format!("open_by_handle_at: {e}"),
        },
        Err(e) => format!("name_to_handle_at: {e}"),
    };
    log_no_handles(&why);
    None
}

fn log_no_handles(why: &str) {
    log::warn!(
        "op=inode_table refs=descriptors reason=\"{why}\" note=\"no file handles on the backing filesystem: every inode the kernel caches keeps one open descriptor, so the open-file limit bounds how many files can be in use\""
    );
}

static PINNED_OTHER_MOUNT: AtomicBool = AtomicBool::new(false);
static FD_EXHAUSTED: AtomicBool = AtomicBool::new(false);

fn note_once(flag: &AtomicBool, msg: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        log::warn!("op=inode_table note=\"{msg}\"");
    }
}

/// Called when a request failed with EMFILE or ENFILE: logs the cause once,
/// with the limit the daemon has.
pub fn note_fd_exhaustion(e: Errno) {
    if FD_EXHAUSTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let e = std::io::Error::from_raw_os_error(e.code());
    log::error!(
        "op=fd_limit error=\"{e}\" limit={limit} note=\"the daemon ran out of file descriptors; requests fail with this error until files are closed; raise LimitNOFILE in the unit (or ulimit -n) for this many open files\""
    );
}
