//! Walking the backing tree for a rekey: kmfs's own files skipped
//! ([`BackingKind::is_own`]), files
//! opened only as the inode the walk saw, a journal record's file found again.

use super::*;
use crate::volume::backing::BackingKind;

/// Every user entry below `backing` and the root itself, as (relative
/// path, metadata), symlinks not followed. A directory is reported before it
/// is listed, so whatever `f` renames in it is listed under its new names.
pub(super) fn walk_all(
    backing: &Path,
    f: &mut dyn FnMut(&Path, &std::fs::Metadata) -> Result<(), RekeyError>,
) -> Result<(), RekeyError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = backing.join(&rel);
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => f(&rel, &md)?,
            _ => continue,
        }
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RekeyError::at("cannot list", dir, e)),
        };
        for ent in rd {
            let Ok(ent) = ent else { continue };
            let name = ent.file_name();
            if BackingKind::classify(name.as_bytes()).is_own() {
                continue;
            }
            let Ok(md) = ent.metadata() else { continue };
            let child = rel.join(&name);
            if md.is_dir() {
                stack.push(child);
            } else {
                f(&child, &md)?;
            }
        }
    }
    Ok(())
}

/// Every regular user file below `backing` (see [`walk_all`]).
pub(super) fn walk(
    backing: &Path,
    f: &mut dyn FnMut(&Path, &std::fs::Metadata) -> Result<(), RekeyError>,
) -> Result<(), RekeyError> {
    walk_all(backing, &mut |rel, md| {
        if md.is_file() { f(rel, md) } else { Ok(()) }
    })
}

/// Opens the regular file at `path` for re-encryption: never through a
/// symlink, never a FIFO or device, and only if it is still the inode `md`
/// describes (what the walk examined).
pub(super) fn open_scanned(path: &Path, md: &std::fs::Metadata) -> io::Result<File> {
    let f = internal::open_path(path, libc::O_RDWR, u64::MAX)?;
    let st = crate::sys::fstat(std::os::fd::AsFd::as_fd(&f))?;
    if (st.st_dev, st.st_ino) != (md.dev(), md.ino()) {
        return Err(io::Error::other(
            "the file was replaced since the walk examined it",
        ));
    }
    Ok(f)
}

/// The generation of the backing file at `path`: `None` if it has no header
/// yet (empty) or is not a kmfs file.
pub(super) fn file_generation(path: &Path) -> io::Result<Option<u16>> {
    let f = internal::open_path(path, libc::O_RDONLY, u64::MAX)?;
    Ok(FileHeader::read_from(&f)
        .ok()
        .flatten()
        .map(|h| h.generation))
}

/// Finds the file of a journal record: at its recorded path if that still
/// holds the same inode and file id, else anywhere below `backing`.
pub fn locate(backing: &Path, r: &FileRef) -> Option<PathBuf> {
    let matches = |p: &Path| -> bool {
        let Ok(f) = internal::open_path(p, libc::O_RDONLY, u64::MAX) else {
            return false;
        };
        let ino = f.metadata().map(|m| m.ino()).unwrap_or(0);
        ino == r.ino
            && FileHeader::read_from(&f)
                .ok()
                .flatten()
                .is_some_and(|h| h.file_id == r.file_id)
    };
    let direct = backing.join(&r.path);
    if matches(&direct) {
        return Some(direct);
    }
    let mut found = None;
    let _ = walk(backing, &mut |rel, md| {
        if found.is_none() && md.ino() == r.ino && matches(&backing.join(rel)) {
            found = Some(backing.join(rel));
        }
        Ok(())
    });
    found
}
