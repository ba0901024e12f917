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

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::journal::{FileRef, Journal, Record};
use crate::crypto::names::{self, DIR_ID_LEN, EncodedName};
use crate::crypto::xattr::{self, Mapped, XattrCipher};
use crate::sys;
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
    journal: &mut Journal,
) -> io::Result<([u8; DIR_ID_LEN], u16)> {
    let dfd = open_dir(dir)?;
    let (id, from) = dirid::read_at(dfd.as_fd())?;
    if from == to {
        return Ok((id, to));
    }
    let to_keys = keys_for(keys, to)?;
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
    let mut symlinks = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let b = name.as_bytes();
        if (names::is_reserved(b) && !names::is_long(b)) || b == b"lost+found" {
            continue; // dir id, sidecars, temporaries; the root's lost+found
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
        let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        let Some((g, plain)) = decrypt_any(keys, &id, &full) else {
            log::error!(
                "op=rekey_names path={} error=\"name does not decrypt\" result=skip",
                dir.join(&name).display()
            );
            continue;
        };
        let current = cstr(b)?;
        let placed = if g == to {
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
            symlinks.push(placed);
        }
    }
    for l in &symlinks {
        rekey_symlink(dfd.as_fd(), l, keys, &to_keys)?;
    }
    dirid::write(dir, &id, to)?;
    journal.idle()?;
    Ok((id, to))
}

/// The keys of generation `to` among `keys`.
fn keys_for(keys: &[(u16, Arc<GenKeys>)], to: u16) -> io::Result<Arc<GenKeys>> {
    keys.iter()
        .find(|(g, _)| *g == to)
        .map(|(_, k)| k.clone())
        .ok_or_else(|| io::Error::other(format!("no keys for generation {to}")))
}

/// Re-encrypts the targets of the symlinks in `dir` (plain-text-names
/// volumes, whose directories have no names to move).
pub fn rekey_symlinks(dir: &Path, keys: &[(u16, Arc<GenKeys>)], to: u16) -> io::Result<()> {
    let to_keys = keys_for(keys, to)?;
    let dfd = open_dir(dir)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
            rekey_symlink(
                dfd.as_fd(),
                &cstr(e.file_name().as_bytes())?,
                keys,
                &to_keys,
            )?;
        }
    }
    Ok(())
}

/// Whether a symlink in `dir` has a target not encrypted with `to`.
pub fn symlinks_behind(dir: &Path, all: &[(u16, Arc<GenKeys>)], to: u16) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_type().map(|t| t.is_symlink()).unwrap_or(false)
                    && symlink_behind(&e.path(), all, to)
            })
        })
        .unwrap_or(false)
}

/// Re-creates symlink `name` in `dfd` with its target encrypted by `to`, if
/// it is on another generation (owner and times kept).
fn rekey_symlink(
    dfd: BorrowedFd<'_>,
    name: &CStr,
    keys: &[(u16, Arc<GenKeys>)],
    to: &GenKeys,
) -> io::Result<()> {
    let lfd = sys::open_path(dfd, name)?;
    let stored = sys::readlink_fd(lfd.as_fd())?;
    if to.names.decrypt_symlink(&stored).is_ok() {
        return Ok(());
    }
    let Some(target) = keys
        .iter()
        .find_map(|(_, k)| k.names.decrypt_symlink(&stored).ok())
    else {
        log::error!("op=rekey_symlink error=\"target does not decrypt\" result=skip");
        return Ok(());
    };
    let st = sys::fstat(lfd.as_fd())?;
    let new = cstr(
        to.names
            .encrypt_symlink(&target)
            .map_err(|e| io::Error::other(e.to_string()))?
            .as_bytes(),
    )?;
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(io::Error::other)?;
    let tmp = cstr(format!("kmfs.tmp.{}", crate::volume::hex(&rnd)).as_bytes())?;
    sys::symlinkat(&new, dfd, &tmp)?;
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
        )?;
        sys::renameat2(dfd, &tmp, dfd, name, 0)
    })();
    if r.is_err() {
        let _ = sys::unlinkat(dfd, &tmp, 0);
    }
    r
}

/// The attribute ciphers of `keys`, in the same order.
pub fn xattr_ciphers(keys: &[(u16, Arc<GenKeys>)]) -> Vec<(u16, XattrCipher)> {
    keys.iter()
        .map(|(g, k)| (*g, XattrCipher::new(&k.metadata)))
        .collect()
}

/// Whether the inode at `path` has an encrypted attribute not on `to`.
pub fn xattrs_behind(path: &Path, ciphers: &[(u16, XattrCipher)], to: u16) -> io::Result<bool> {
    let mut behind = false;
    each_xattr(path, &mut |fd, n, blob| {
        // On an old generation: opens with another one, not with `to`. One
        // that opens with none (damaged or planted) is not behind: it is
        // unreadable either way and must not hold the rekey up forever.
        let opens = |g: u16| {
            ciphers
                .iter()
                .any(|(k, c)| *k == g && c.open(n, blob).is_some())
        };
        if !opens(to) && ciphers.iter().any(|(g, _)| *g != to && opens(*g)) {
            behind = true;
        }
        let _ = fd;
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

/// Re-encrypts the encrypted attributes of the inode at `path` that are not
/// on generation `to` (`ciphers` holds every generation). The new one is
/// written before the old one goes, so a crash leaves at worst both.
pub fn rekey_xattrs(path: &Path, ciphers: &[(u16, XattrCipher)], to: u16) -> io::Result<()> {
    let Some((_, new_c)) = ciphers.iter().find(|(g, _)| *g == to) else {
        return Err(io::Error::other(format!("no keys for generation {to}")));
    };
    each_xattr(path, &mut |fd, n, blob| {
        if new_c.open(n, blob).is_some() {
            return Ok(());
        }
        let Some((name, value)) = ciphers.iter().find_map(|(_, c)| c.open(n, blob)) else {
            log::error!(
                "op=rekey_xattr path={} error=\"attribute does not authenticate\" result=skip",
                path.display()
            );
            return Ok(());
        };
        let Ok(Mapped::Encrypted(nb)) = new_c.map_name(&name) else {
            return Ok(());
        };
        let nc = cstr(&nb)?;
        // Set since the rekey began (under the new generation): that wins.
        if sys::getxattr(fd, &nc).is_err() {
            let sealed = new_c.seal(&nb, &name, &value)?;
            sys::setxattr(fd, &nc, &sealed, 0)?;
        }
        sys::removexattr(fd, &cstr(n)?)
    })
}

/// Whether symlink `path`'s target is encrypted with `to`'s keys.
/// Whether the symlink at `path` is still on an old generation: its target
/// decrypts with one of `all` but not with `to`. One that decrypts with none
/// (damaged or planted) is not behind: it is unreadable either way, is
/// logged when met, and must not hold the rekey up forever.
pub fn symlink_behind(path: &Path, all: &[(u16, Arc<GenKeys>)], to: u16) -> bool {
    let Ok(t) = std::fs::read_link(path) else {
        return false;
    };
    let stored = OsStr::as_bytes(t.as_os_str());
    let on = |g: u16| {
        all.iter()
            .any(|(k, keys)| *k == g && keys.names.decrypt_symlink(stored).is_ok())
    };
    !on(to)
        && all
            .iter()
            .any(|(g, k)| *g != to && k.names.decrypt_symlink(stored).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::Secret;

    fn keys() -> Vec<(u16, Arc<GenKeys>)> {
        [(0u16, 1u8), (1, 2)]
            .iter()
            .map(|(g, b)| {
                let dek = Secret::from_slice(&[*b; 32]);
                (*g, Arc::new(GenKeys::for_test(&dek, &[3u8; 16])))
            })
            .collect()
    }

    fn names_in(dir: &Path, k: &GenKeys, id: &[u8; 16]) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().as_bytes().to_vec())
            .filter(|b| !names::is_reserved(b) || names::is_long(b))
            .map(|b| {
                let full = if names::is_long(&b) {
                    let side = names::long_sidecar(std::str::from_utf8(&b).unwrap());
                    std::fs::read_to_string(dir.join(side)).unwrap()
                } else {
                    String::from_utf8(b).unwrap()
                };
                k.names
                    .decrypt(id, &full)
                    .expect("decrypts with the new keys")
            })
            .collect();
        v.sort();
        v
    }

    /// A directory interrupted half way (some entries renamed, the id still
    /// on the old generation) is finished by running it again; symlink
    /// targets follow; nothing is lost or doubled.
    #[test]
    fn a_directory_pass_interrupted_half_way_finishes_on_a_rerun() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let ks = keys();
        let (k0, k1) = (&ks[0].1, &ks[1].1);
        let id = dirid::create(&dir, 0).unwrap();
        let mut want: Vec<Vec<u8>> = Vec::new();
        for i in 0..20 {
            let plain = if i % 5 == 0 {
                format!("{}{i}", "n".repeat(200)).into_bytes()
            } else {
                format!("entry-{i}").into_bytes()
            };
            match k0.names.encrypt(&id, &plain).unwrap() {
                EncodedName::Short(s) => std::fs::write(dir.join(s), b"x").unwrap(),
                EncodedName::Long { backing, full } => {
                    std::fs::write(dir.join(&backing), b"x").unwrap();
                    std::fs::write(dir.join(names::long_sidecar(&backing)), full).unwrap();
                }
            }
            want.push(plain);
        }
        let link = k0.names.encrypt(&id, b"a link").unwrap();
        let target = k0.names.encrypt_symlink(b"../somewhere").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(link.backing())).unwrap();
        want.push(b"a link".to_vec());
        want.sort();

        let mut j = Journal::open(d.path()).unwrap();
        // The whole pass, then the id put back: "crashed before the last step".
        rekey_dir(&dir, Path::new("d"), &ks, 1, &mut j).unwrap();
        dirid::write(&dir, &id, 0).unwrap();
        // And one entry moved back to the old name: "crashed half way".
        let one = k1.names.encrypt(&id, b"entry-3").unwrap();
        let back = k0.names.encrypt(&id, b"entry-3").unwrap();
        std::fs::rename(dir.join(one.backing()), dir.join(back.backing())).unwrap();

        assert_eq!(
            rekey_dir(&dir, Path::new("d"), &ks, 1, &mut j).unwrap(),
            (id, 1)
        );
        assert_eq!(dirid::read(&dir).unwrap(), (id, 1));
        assert_eq!(names_in(&dir, k1, &id), want);
        let l = k1.names.encrypt(&id, b"a link").unwrap();
        let t = std::fs::read_link(dir.join(l.backing())).unwrap();
        assert_eq!(
            k1.names.decrypt_symlink(t.as_os_str().as_bytes()).unwrap(),
            b"../somewhere"
        );
        // No sidecar is left without its entry.
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(entry) = n.strip_suffix(names::LONG_SUFFIX) {
                assert!(dir.join(entry).exists(), "orphan sidecar {n}");
            }
        }
        assert_eq!(Journal::pending(d.path()).unwrap(), None);
    }
}
