//! The rekey of everything that is not file contents: the names in a
//! directory (with their long-name sidecars), symlink targets, and extended
//! attributes (docs/FORMAT.md 7.4).
//!
//! A directory is done in one go while the filesystem holds off every name
//! operation in it: a journal record first, then each entry renamed from its
//! old encoding to the new one, symlinks re-created with their targets
//! encrypted anew, and last the directory id rewritten with the new
//! generation. Each step can be repeated, so recovery after a crash simply
//! runs the directory again (an entry already on the new generation is told
//! apart by AES-SIV: it decrypts with the new key).
//!
//! Symlink targets and attribute values are rewritten in the form bound to
//! their owner (docs/FORMAT.md 8) whenever they are not already bound under
//! the new generation, so a rekey of a volume of format version ≤ 2 leaves
//! nothing unbound, and its end stores the header as version 3.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::journal::{FileRef, Journal, Record};
use crate::crypto::names::{self, DIR_ID_LEN, EncodedName};
use crate::crypto::xattr::{self, Mapped, NO_OWNER, OWNER_LEN, XattrCipher};
use crate::sys;
use crate::volume::backing::BackingKind;
use crate::volume::layout::FileHeader;
use crate::volume::{GenKeys, dirid, internal};

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?
        .into())
}

/// The plaintext of encoded name `full` in directory `id`, and the
/// generation that decrypts it (`keys` holds every generation).
fn decrypt_any(
    keys: &[(u16, Arc<GenKeys>)],
    id: &[u8; DIR_ID_LEN],
    full: &str,
) -> Option<(u16, Vec<u8>)> {
    keys.iter()
        .find_map(|(g, k)| k.names.decrypt(id, full).ok().map(|n| (*g, n)))
}

/// Moves the names in backing directory `dir` (and the targets of its
/// symlinks) to generation `to`. Returns the directory's id and `to`.
/// `keys` holds every generation; `ino` and `rel` identify the directory in
/// the journal.
pub fn rekey_dir(
    dir: &Path,
    rel: &Path,
    keys: &[(u16, Arc<GenKeys>)],
    to: u16,
    unbound_ok: bool,
    journal: &mut Journal,
) -> io::Result<([u8; DIR_ID_LEN], u16)> {
    let dfd = open_dir(dir)?;
    let (id, from) = dirid::read_at(dfd.as_fd())?;
    // With the names already on `to`, only symlink targets may be left to
    // bind (a volume migrated by a rekey an older kmfs began).
    let renaming = from != to;
    let to_keys = keys_for(keys, to)?;
    if renaming {
        let mut rec = Record {
            seq: 0,
            file: FileRef {
                ino: std::fs::metadata(dir)?.ino(),
                file_id: id,
                path: rel.to_path_buf(),
            },
            from,
            to,
            next_unit: 0,
            complete: false,
            writes: Vec::new(),
            directory: true,
        };
        journal.commit(&mut rec)?;
    }
    let mut symlinks = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let b = name.as_bytes();
        let kind = BackingKind::classify(b);
        if kind.is_own() || kind == BackingKind::LostFound {
            continue; // dir id, sidecars, temporaries; the root's lost+found
        }
        let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        if !renaming && !is_link {
            continue;
        }
        let full = if names::is_long(b) {
            match internal::read_sidecar(dfd.as_fd(), b) {
                Ok(c) => c,
                Err(err) => {
                    log::error!(
                        "op=rekey_names path={} error=\"{err}\" result=skip",
                        dir.join(&name).display()
                    );
                    continue;
                }
            }
        } else {
            String::from_utf8_lossy(b).into_owned()
        };
        let Some((g, plain)) = decrypt_any(keys, &id, &full) else {
            log::error!(
                "op=rekey_names path={} error=\"name does not decrypt\" result=skip",
                dir.join(&name).display()
            );
            continue;
        };
        let current = cstr(b)?;
        let placed = if g == to || !renaming {
            current
        } else {
            let new = to_keys
                .names
                .encrypt(&id, &plain)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let new_name = cstr(new.backing().as_bytes())?;
            if let EncodedName::Long { backing, full } = &new {
                let side = cstr(names::long_sidecar(backing).as_bytes())?;
                internal::write_sidecar(dfd.as_fd(), &side, full)?;
            }
            sys::renameat2(
                dfd.as_fd(),
                &current,
                dfd.as_fd(),
                &new_name,
                libc::RENAME_NOREPLACE,
            )?;
            if names::is_long(b) {
                let old_side = cstr(names::long_sidecar(&String::from_utf8_lossy(b)).as_bytes())?;
                let _ = sys::unlinkat(dfd.as_fd(), &old_side, 0);
            }
            new_name
        };
        if is_link {
            symlinks.push((placed, plain));
        }
    }
    for (l, plain) in &symlinks {
        let place = LinkPlace {
            dir_id: id,
            name: plain,
        };
        rekey_symlink(dfd.as_fd(), l, &place, keys, &to_keys, unbound_ok)?;
    }
    if renaming {
        dirid::write(dir, &id, to)?;
        journal.idle()?;
    }
    Ok((id, to))
}

/// The keys of generation `to` among `keys`.
fn keys_for(keys: &[(u16, Arc<GenKeys>)], to: u16) -> io::Result<Arc<GenKeys>> {
    keys.iter()
        .find(|(g, _)| *g == to)
        .map(|(_, k)| k.clone())
        .ok_or_else(|| io::Error::other(format!("no keys for generation {to}")))
}

/// Where a symlink is: what its target is bound to (the directory id, zeros
/// on a plaintext-names volume, and the plaintext name).
pub struct LinkPlace<'a> {
    pub dir_id: [u8; DIR_ID_LEN],
    pub name: &'a [u8],
}

/// What a stored symlink target is, seen from generation `to`.
#[derive(Debug, PartialEq, Eq)]
pub enum TargetState {
    /// Bound to its place and encrypted with `to`: nothing to do.
    Done,
    /// Readable (bound with another generation, or unbound while those are
    /// accepted): this target is to be written bound under `to`.
    Behind(Vec<u8>),
    /// Does not decrypt at all (damaged, moved, or unbound on a migrated
    /// volume): left alone, and an error wherever it is read.
    Unreadable,
}

/// Decrypts a stored target found at `place`: bound, with any generation
/// (`keys`, the active one first), or unbound while `unbound_ok`.
/// `Some((generation, bound, target))`.
pub fn open_target(
    keys: &[(u16, Arc<GenKeys>)],
    place: &LinkPlace<'_>,
    stored: &[u8],
    unbound_ok: bool,
) -> Option<(u16, bool, Vec<u8>)> {
    keys.iter()
        .find_map(|(g, k)| {
            k.names
                .decrypt_symlink(&place.dir_id, place.name, stored)
                .ok()
                .map(|t| (*g, true, t))
        })
        .or_else(|| {
            if !unbound_ok {
                return None;
            }
            keys.iter().find_map(|(g, k)| {
                k.names
                    .decrypt_symlink_unbound(stored)
                    .ok()
                    .map(|t| (*g, false, t))
            })
        })
}

/// The state of stored target `stored` at `place` for generation `to`.
pub fn target_state(
    keys: &[(u16, Arc<GenKeys>)],
    place: &LinkPlace<'_>,
    stored: &[u8],
    to: u16,
    unbound_ok: bool,
) -> TargetState {
    match open_target(keys, place, stored, unbound_ok) {
        Some((g, true, _)) if g == to => TargetState::Done,
        Some((_, _, t)) => TargetState::Behind(t),
        None => TargetState::Unreadable,
    }
}

/// Re-encrypts the targets of the symlinks in `dir` (plain-text-names
/// volumes, whose directories have no names to move).
pub fn rekey_symlinks(
    dir: &Path,
    keys: &[(u16, Arc<GenKeys>)],
    to: u16,
    unbound_ok: bool,
) -> io::Result<()> {
    let to_keys = keys_for(keys, to)?;
    let dfd = open_dir(dir)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let n = e.file_name();
        if names::is_reserved(n.as_bytes()) {
            continue;
        }
        if e.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
            let place = LinkPlace {
                dir_id: [0; DIR_ID_LEN],
                name: n.as_bytes(),
            };
            rekey_symlink(
                dfd.as_fd(),
                &cstr(n.as_bytes())?,
                &place,
                keys,
                &to_keys,
                unbound_ok,
            )?;
        }
    }
    Ok(())
}

/// The place of the backing symlink at `path` (its directory's id and its
/// plaintext name), if its name decrypts; `plaintext` for plaintext-names
/// volumes. `None` for kmfs's own files and names that do not decrypt.
pub fn link_place_of(
    path: &Path,
    keys: &[(u16, Arc<GenKeys>)],
    plaintext: bool,
) -> Option<([u8; DIR_ID_LEN], Vec<u8>)> {
    let dir = path.parent()?;
    let b = path.file_name()?.as_bytes();
    if BackingKind::classify(b).is_own() {
        return None;
    }
    if plaintext {
        return Some(([0; DIR_ID_LEN], b.to_vec()));
    }
    let dfd = open_dir(dir).ok()?;
    let (id, _) = dirid::read_at(dfd.as_fd()).ok()?;
    let full = if names::is_long(b) {
        internal::read_sidecar(dfd.as_fd(), b).ok()?
    } else {
        std::str::from_utf8(b).ok()?.to_string()
    };
    let (_, plain) = decrypt_any(keys, &id, &full)?;
    Some((id, plain))
}

/// Whether a symlink in `dir` still has a readable target not bound under
/// `to` (`keys` holds every generation).
pub fn symlinks_behind(
    dir: &Path,
    keys: &[(u16, Arc<GenKeys>)],
    to: u16,
    plaintext: bool,
    unbound_ok: bool,
) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_type().map(|t| t.is_symlink()).unwrap_or(false)
                    && !symlink_on(&e.path(), keys, to, plaintext, unbound_ok)
            })
        })
        .unwrap_or(false)
}

/// Re-creates symlink `name` (at `place`) in `dfd` with its target bound and
/// encrypted by `to`, unless it already is (owner and times kept).
fn rekey_symlink(
    dfd: BorrowedFd<'_>,
    name: &CStr,
    place: &LinkPlace<'_>,
    keys: &[(u16, Arc<GenKeys>)],
    to: &GenKeys,
    unbound_ok: bool,
) -> io::Result<()> {
    let lfd = sys::open_path(dfd, name)?;
    let stored = sys::readlink_fd(lfd.as_fd())?;
    if to
        .names
        .decrypt_symlink(&place.dir_id, place.name, &stored)
        .is_ok()
    {
        return Ok(());
    }
    let Some((_, _, target)) = open_target(keys, place, &stored, unbound_ok) else {
        log::error!(
            "op=rekey_symlink path={}/{} error=\"target does not decrypt\" result=skip",
            sys::fd_path(dfd),
            name.to_string_lossy()
        );
        return Ok(());
    };
    let new = cstr(
        to.names
            .encrypt_symlink(&place.dir_id, place.name, &target)
            .map_err(|e| io::Error::other(e.to_string()))?
            .as_bytes(),
    )?;
    let st = sys::fstat(lfd.as_fd())?;
    let tmp = symlink_like(dfd, &new, &st)?;
    let r = sys::renameat2(dfd, &tmp, dfd, name, 0);
    if r.is_err() {
        let _ = sys::unlinkat(dfd, &tmp, 0);
    }
    r
}

/// Creates a symlink with the stored target `stored` in `dfd` under a fresh
/// reserved temporary name (`kmfs.tmp.<random>`), with the owner and times
/// of `st`; returns the name. Removed again if that fails.
pub fn symlink_like(dfd: BorrowedFd<'_>, stored: &CStr, st: &libc::stat) -> io::Result<CString> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(io::Error::other)?;
    let tmp = cstr(format!("kmfs.tmp.{}", crate::volume::hex(&rnd)).as_bytes())?;
    sys::symlinkat(stored, dfd, &tmp)?;
    let r = (|| {
        let tfd = sys::open_path(dfd, &tmp)?;
        sys::fchownat(tfd.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
        sys::utimensat_nofollow(
            dfd,
            &tmp,
            &[
                libc::timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec,
                },
                libc::timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec,
                },
            ],
        )
    })();
    match r {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = sys::unlinkat(dfd, &tmp, 0);
            Err(e)
        }
    }
}

/// The attribute ciphers of `keys`, in the same order.
pub fn xattr_ciphers(keys: &[(u16, Arc<GenKeys>)]) -> Vec<(u16, XattrCipher)> {
    keys.iter()
        .map(|(g, k)| (*g, XattrCipher::new(&k.metadata)))
        .collect()
}

/// The owner id the encrypted attributes of the backing inode at `path`
/// (`md`, not followed) are bound to: a regular file's file id (`None` if it
/// has no complete header yet), a directory's id on an encrypted-names
/// volume (`None` if unreadable), zeros otherwise.
pub fn owner_of(path: &Path, md: &std::fs::Metadata, plaintext: bool) -> Option<[u8; OWNER_LEN]> {
    if md.is_file() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .ok()?;
        FileHeader::read_from(&f).ok()?.map(|h| h.file_id)
    } else if md.is_dir() && !plaintext {
        dirid::read(path).ok().map(|(id, _)| id)
    } else {
        Some(NO_OWNER)
    }
}

/// Whether the inode at `path` (`md`) has an encrypted attribute that
/// authenticates but is not bound under `to`.
pub fn xattrs_behind(
    path: &Path,
    md: &std::fs::Metadata,
    ciphers: &[(u16, XattrCipher)],
    to: u16,
    plaintext: bool,
    unbound_ok: bool,
) -> io::Result<bool> {
    let owner = owner_of(path, md, plaintext);
    let mut behind = false;
    each_xattr(path, &mut |_, n, blob| {
        let done = ciphers
            .iter()
            .any(|(g, c)| *g == to && c.open(n, blob, owner.as_ref(), false).is_some());
        if !done
            && ciphers
                .iter()
                .any(|(_, c)| c.open(n, blob, owner.as_ref(), unbound_ok).is_some())
        {
            behind = true;
        }
        Ok(())
    })?;
    Ok(behind)
}

/// Called with (inode, backing attribute name, stored value).
pub(crate) type XattrVisit<'a> = dyn FnMut(BorrowedFd<'_>, &[u8], &[u8]) -> io::Result<()> + 'a;

/// Calls `f` for every encrypted attribute (`user.kmfs.*`) of the backing
/// inode at `path` (not followed if it is a symlink).
pub(crate) fn each_xattr(path: &Path, f: &mut XattrVisit<'_>) -> io::Result<()> {
    let fd: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?
        .into();
    let raw = match sys::listxattr(fd.as_fd()) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for n in raw.split(|&c| c == 0) {
        if !n.starts_with(xattr::BACKING_PREFIX) {
            continue;
        }
        let Ok(blob) = sys::getxattr(fd.as_fd(), &cstr(n)?) else {
            continue;
        };
        f(fd.as_fd(), n, &blob)?;
    }
    Ok(())
}

/// Re-encrypts the encrypted attributes of the inode at `path` (`md`) that
/// are not bound under generation `to` (`ciphers` holds every generation).
/// The new one is written before the old one goes, so a crash leaves at
/// worst both. A regular file without a header that has attributes to bind
/// gets one first (generation `to`, as a first write would), which is
/// returned for the filesystem's cache.
pub fn rekey_xattrs(
    path: &Path,
    md: &std::fs::Metadata,
    ciphers: &[(u16, XattrCipher)],
    to: u16,
    plaintext: bool,
    unbound_ok: bool,
) -> io::Result<Option<FileHeader>> {
    let Some((_, new_c)) = ciphers.iter().find(|(g, _)| *g == to) else {
        return Err(io::Error::other(format!("no keys for generation {to}")));
    };
    let mut owner = owner_of(path, md, plaintext);
    let mut written = None;
    if owner.is_none() && md.is_file() {
        // Only unbound values can be on a file without a header: give it
        // one, so they can be bound to its file id.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        if FileHeader::read_from(&f)?.is_none() && has_xattrs(path)? {
            let h = FileHeader::generate(to)?;
            std::os::unix::fs::FileExt::write_all_at(&f, &h.to_bytes(), 0)?;
            f.sync_data()?;
            owner = Some(h.file_id);
            written = Some(h);
        }
    }
    each_xattr(path, &mut |fd, n, blob| {
        if new_c.open(n, blob, owner.as_ref(), false).is_some() {
            return Ok(());
        }
        let Some(o) = ciphers
            .iter()
            .find_map(|(_, c)| c.open(n, blob, owner.as_ref(), unbound_ok))
        else {
            log::error!(
                "op=rekey_xattr path={} error=\"attribute does not authenticate\" result=skip",
                path.display()
            );
            return Ok(());
        };
        let Some(owner) = owner else {
            return Ok(());
        };
        let Ok(Mapped::Encrypted(nb)) = new_c.map_name(&o.name) else {
            return Ok(());
        };
        let nc = cstr(&nb)?;
        let same = nb.as_slice() == n;
        // Set since the rekey began (bound, under the new generation): that
        // wins. The same backing name (an unbound value of this generation)
        // is replaced in place.
        if same || sys::getxattr(fd, &nc).is_err() {
            let sealed = new_c.seal(&nb, &o.name, &o.value, &owner)?;
            sys::setxattr(fd, &nc, &sealed, 0)?;
        }
        if !same {
            sys::removexattr(fd, &cstr(n)?)?;
        }
        Ok(())
    })?;
    Ok(written)
}

/// Whether the inode at `path` has any encrypted attribute.
fn has_xattrs(path: &Path) -> io::Result<bool> {
    let mut any = false;
    each_xattr(path, &mut |_, _, _| {
        any = true;
        Ok(())
    })?;
    Ok(any)
}

/// Whether symlink `path` has a target that needs nothing from a rekey to
/// `to`: bound under `to`, or unreadable (nothing a rekey can do). `keys`
/// holds every generation.
pub fn symlink_on(
    path: &Path,
    keys: &[(u16, Arc<GenKeys>)],
    to: u16,
    plaintext: bool,
    unbound_ok: bool,
) -> bool {
    let Ok(t) = std::fs::read_link(path) else {
        return true;
    };
    let Some((dir_id, name)) = link_place_of(path, keys, plaintext) else {
        return true;
    };
    let place = LinkPlace {
        dir_id,
        name: &name,
    };
    !matches!(
        target_state(keys, &place, t.as_os_str().as_bytes(), to, unbound_ok),
        TargetState::Behind(_)
    )
}

#[cfg(test)]
mod tests;
