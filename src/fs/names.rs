//! Plaintext directory entries ↔ backing entries.
//!
//! Encrypted-names mode: a name is AES-SIV encrypted under the parent
//! directory's id (`kmfs.dirid`, cached per directory inode). Names whose
//! encoding is too long for one backing name live under `kmfs.long.<hash>`
//! with the full encoding in the sidecar `kmfs.long.<hash>.name`. Sidecars
//! belong to *names*, not files: they are written before the entry appears
//! and removed after it goes.
//!
//! Plaintext-names mode: backing names are the plaintext names; names with the
//! reserved `kmfs.` prefix are refused (EPERM), so they never collide with
//! kmfs's own files.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;

use fuser::Errno;

use super::inode::{Inode, LinkPlace};
use crate::crypto::names::{
    self as cn, DIR_ID_LEN, EncodedName, NameError, is_long, is_reserved, long_sidecar,
};
use crate::rekey::metadata::LinkPlace as LinkPlace2;
use crate::sys;
use crate::volume::{GenKeys, VolumeView};
use crate::volume::{dirid, internal};

/// Where a plaintext name lives in its backing directory.
#[derive(Debug, Clone)]
pub struct BackingName {
    pub name: CString,
    /// For long names: the sidecar name and its content.
    pub long: Option<(CString, String)>,
}

/// One directory entry as the user sees it.
pub struct ListedEntry {
    pub name: OsString,
    pub backing: CString,
    pub d_ino: u64,
    pub kind: fuser::FileType,
}

pub struct Names {
    vol: Arc<VolumeView>,
    plaintext: bool,
}

fn name_errno(e: NameError) -> Errno {
    match e {
        NameError::Invalid => Errno::EINVAL,
        NameError::TooLong => Errno::ENAMETOOLONG,
        NameError::Corrupt => Errno::EIO,
    }
}

impl Names {
    pub fn new(vol: Arc<VolumeView>) -> Names {
        let plaintext = vol.plaintext_names;
        Names { vol, plaintext }
    }

    pub fn plaintext(&self) -> bool {
        self.plaintext
    }

    /// The directory id of `dir` and the generation of its names (cached).
    /// EIO if it is missing or damaged.
    pub fn dir_key(&self, dir: &Inode) -> Result<([u8; DIR_ID_LEN], u16), Errno> {
        if let Some(k) = dir.cached_dir_key() {
            return Ok(k);
        }
        match dirid::read_at(dir.fd()?.as_fd()) {
            Ok(k) => {
                dir.cache_dir_key(k);
                Ok(k)
            }
            Err(e) => {
                log::error!(
                    "op=dirid path={} error=\"{}\" result=eio",
                    dir.path_for_log(),
                    e
                );
                Err(Errno::EIO)
            }
        }
    }

    /// The backing entry for plaintext `name` in `dir`.
    pub fn encode(&self, dir: &Inode, name: &OsStr) -> Result<BackingName, Errno> {
        let b = name.as_bytes();
        cn::validate(b).map_err(name_errno)?;
        if self.plaintext {
            if is_reserved(b) {
                return Err(Errno::EPERM);
            }
            return Ok(BackingName {
                name: sys::cstr(b).map_err(Errno::from)?,
                long: None,
            });
        }
        let (id, g) = self.dir_key(dir)?;
        match self
            .keys(dir, g)?
            .names
            .encrypt(&id, b)
            .map_err(name_errno)?
        {
            EncodedName::Short(s) => Ok(BackingName {
                name: sys::cstr(s.as_bytes()).map_err(Errno::from)?,
                long: None,
            }),
            EncodedName::Long { backing, full } => Ok(BackingName {
                name: sys::cstr(backing.as_bytes()).map_err(Errno::from)?,
                long: Some((
                    sys::cstr(long_sidecar(&backing).as_bytes()).map_err(Errno::from)?,
                    full,
                )),
            }),
        }
    }

    /// The keys of generation `g`, which names in `dir` use; EIO (logged) if
    /// the volume header does not hold it.
    fn keys(&self, dir: &Inode, g: u16) -> Result<Arc<GenKeys>, Errno> {
        self.vol.keys.generations.get(g).ok_or_else(|| {
            log::error!(
                "op=names path={} error=\"names use key generation {g}, which the volume header does not hold\" result=eio",
                dir.path_for_log()
            );
            Errno::EIO
        })
    }

    /// Writes the sidecar of a long name (idempotent: same name, same content).
    pub fn write_sidecar(&self, dir: &Inode, b: &BackingName) -> io::Result<()> {
        let Some((side, full)) = &b.long else {
            return Ok(());
        };
        internal::write_sidecar(dir.fd_io()?.as_fd(), side, full)
    }

    /// Removes the sidecar of a long name that no longer exists.
    pub fn remove_sidecar(&self, dir: &Inode, b: &BackingName) {
        if let Some((side, _)) = &b.long
            && let Ok(fd) = dir.fd()
            && let Err(e) = sys::unlinkat(fd.as_fd(), side, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::warn!(
                "op=remove_sidecar path={}/{} error=\"{e}\"",
                dir.path_for_log(),
                side.to_string_lossy()
            );
        }
    }

    /// Decodes one backing entry name of `dir`; `None` for kmfs's own files and
    /// for entries that do not decrypt (logged).
    fn decode(
        &self,
        dir: &Inode,
        id: &[u8; DIR_ID_LEN],
        keys: Option<&GenKeys>,
        backing: &[u8],
    ) -> Option<OsString> {
        if self.plaintext {
            if is_reserved(backing) {
                return None;
            }
            return Some(OsString::from_vec(backing.to_vec()));
        }
        let full = if is_long(backing) {
            match internal::read_sidecar(dir.fd().ok()?.as_fd(), backing) {
                Ok(full) => full,
                Err(e) => {
                    log::error!(
                        "op=readdir path={}/{} error=\"{e}\" result=skip",
                        dir.path_for_log(),
                        String::from_utf8_lossy(backing)
                    );
                    return None;
                }
            }
        } else if is_reserved(backing) {
            return None;
        } else {
            std::str::from_utf8(backing).ok()?.to_string()
        };
        match keys?.names.decrypt(id, &full) {
            Ok(n) => Some(OsString::from_vec(n)),
            Err(_) => {
                if !(dir.ino == super::inode::ROOT && backing == b"lost+found") {
                    log::error!(
                        "op=readdir path={}/{} error=\"name does not decrypt\"",
                        dir.path_for_log(),
                        String::from_utf8_lossy(backing)
                    );
                }
                None
            }
        }
    }

    /// All user-visible entries of `dir` (without `.` and `..`).
    pub fn list(&self, dir: &Inode) -> Result<Vec<ListedEntry>, Errno> {
        let (id, keys) = if self.plaintext {
            ([0u8; DIR_ID_LEN], None)
        } else {
            let (id, g) = self.dir_key(dir)?;
            (id, Some(self.keys(dir, g)?))
        };
        // The descriptor is held until read_dir has opened the directory:
        // a /proc path names a descriptor number, which the inode table
        // could otherwise close (evict) and the number be reused meanwhile.
        let dfd = dir.fd()?;
        let p = sys::proc_path(dfd.as_fd().as_raw_fd());
        let rd =
            std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes()))).map_err(Errno::from)?;
        drop(dfd);
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(Errno::from)?;
            let bname = e.file_name();
            if let Some(name) = self.decode(dir, &id, keys.as_deref(), bname.as_bytes()) {
                out.push(ListedEntry {
                    name,
                    backing: match CString::new(bname.into_vec()) {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                    d_ino: std::os::unix::fs::DirEntryExt::ino(&e),
                    kind: e
                        .file_type()
                        .ok()
                        .and_then(fuser::FileType::from_std)
                        .unwrap_or(fuser::FileType::RegularFile),
                });
            }
        }
        Ok(out)
    }

    /// Whether a backing directory holds nothing but kmfs's own bookkeeping.
    pub fn dir_is_empty(&self, dir_fd: std::os::fd::BorrowedFd<'_>) -> Result<bool, Errno> {
        let p = sys::proc_path(dir_fd.as_raw_fd());
        let rd =
            std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes()))).map_err(Errno::from)?;
        for e in rd {
            let e = e.map_err(Errno::from)?;
            let n = e.file_name();
            let n = n.as_bytes();
            if n == dirid::DIRID_FILE.as_bytes() || n == b"kmfs.dirid.tmp" {
                continue;
            }
            if !self.plaintext && is_long(n) {
                return Ok(false);
            }
            if !self.plaintext && is_reserved(n) && n.ends_with(cn::LONG_SUFFIX.as_bytes()) {
                // A stray sidecar without its entry does not make a directory non-empty.
                continue;
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// The symlink target as stored in the backing symlink at `place`,
    /// encrypted with the keys `k` (the active generation's) and bound to
    /// its place.
    pub fn encrypt_target(
        &self,
        k: &GenKeys,
        place: &LinkPlace,
        target: &[u8],
    ) -> Result<CString, Errno> {
        let s = k
            .names
            .encrypt_symlink(&place.0, &place.1, target)
            .map_err(name_errno)?;
        sys::cstr(s.as_bytes()).map_err(Errno::from)
    }

    /// A stored symlink target found at `place`, decrypted with whichever
    /// generation it was written with (the active one first; AES-SIV
    /// tells); in the unbound form of format version ≤ 2 only while the
    /// volume is not migrated.
    pub fn decrypt_target(&self, place: &LinkPlace, stored: &[u8]) -> Result<Vec<u8>, NameError> {
        let keys = self.vol.keys.generations.all();
        let place = LinkPlace2 {
            dir_id: place.0,
            name: &place.1,
        };
        crate::rekey::metadata::open_target(&keys, &place, stored, self.vol.keys.unbound_ok())
            .map(|(_, _, t)| t)
            .ok_or(NameError::Corrupt)
    }

    /// The place a symlink named `name` in `dir` is bound to.
    pub fn link_place(&self, dir: &Inode, name: &[u8]) -> Result<LinkPlace, Errno> {
        let id = if self.plaintext {
            [0u8; DIR_ID_LEN]
        } else {
            self.dir_key(dir)?.0
        };
        Ok((id, name.to_vec()))
    }
}
