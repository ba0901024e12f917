//! `kmfs check`: an offline consistency check of a backing directory
//! (SPEC section 6). Read-only unless asked to repair.
//!
//! It authenticates the header (the caller opened the [`Volume`]), then walks
//! the tree and checks what the filesystem relies on: every directory has its
//! id, every name decrypts in its directory, long names match their
//! sidecars, symlink targets decrypt, every file header parses and names a
//! key generation the header holds, and every encrypted extended attribute
//! of a file or directory authenticates with one of those generations. It also finds what crashes leave behind
//! (temporary files, half-created directories, orphaned sidecars, torn file
//! headers, a pending rekey journal record); `--repair` removes or finishes
//! those, and never touches anything it cannot prove is a leftover.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::crypto::names::{self, DIR_ID_LEN};
use crate::crypto::xattr::{Mapped, XattrCipher};
use crate::rekey;
use crate::volume::layout::{FileHeader, HEADER_LEN};
use crate::volume::{Volume, dirid, header};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Data or names that cannot be read: needs an administrator (restore
    /// from backup, or remove the damaged entry).
    Error,
    /// Something unusual that does not lose data.
    Warning,
    /// What an interrupted operation left behind; `--repair` handles it.
    Leftover,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Path relative to the backing directory.
    pub backing: PathBuf,
    /// The plaintext path, where the names above it decrypt.
    pub plain: Option<PathBuf>,
    pub what: String,
    /// What `--repair` did about it.
    pub repaired: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub other: u64,
    /// Plaintext bytes in regular files.
    pub bytes: u64,
    pub findings: Vec<Finding>,
    /// A rekey is in progress (its target generation).
    pub rekey_in_progress: Option<u16>,
}

impl Report {
    pub fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }
}

struct Checker<'a> {
    vol: &'a Volume,
    /// The attribute cipher of every generation the header holds.
    xciphers: Vec<(u16, XattrCipher)>,
    repair: bool,
    report: Report,
    progress: &'a mut dyn FnMut(u64),
    seen: u64,
}

/// Names in the backing root that belong to the volume itself.
fn is_root_file(name: &[u8]) -> bool {
    name == header::HEADER_FILE.as_bytes()
        || name == header::BACKUP_FILE.as_bytes()
        || (name.starts_with(b"kmfs.volume.") && name.ends_with(b".bak"))
        || name == rekey::state::STATE_FILE.as_bytes()
        || name == rekey::journal::JOURNAL_FILE.as_bytes()
        || name == b"lost+found"
}

/// Temporary files of atomic writes (header, backups, directory ids, rekey
/// state): a crash between create and rename leaves them.
fn is_temp_file(name: &[u8]) -> bool {
    name.starts_with(b"kmfs.") && name.ends_with(b".tmp")
}

impl Checker<'_> {
    fn find(
        &mut self,
        severity: Severity,
        backing: &Path,
        plain: Option<&Path>,
        what: String,
    ) -> usize {
        self.report.findings.push(Finding {
            severity,
            backing: backing.to_path_buf(),
            plain: plain.map(Path::to_path_buf),
            what,
            repaired: None,
        });
        self.report.findings.len() - 1
    }

    fn repaired(&mut self, i: usize, r: io::Result<()>, done: &str) {
        self.report.findings[i].repaired = Some(match r {
            Ok(()) => done.to_string(),
            Err(e) => format!("repair failed: {e}"),
        });
    }

    fn tick(&mut self) {
        self.seen += 1;
        if self.seen.is_multiple_of(256) {
            (self.progress)(self.seen);
        }
    }

    /// Checks directory `rel` (plaintext path `plain`, if its names decrypt).
    fn dir(&mut self, rel: &Path, plain: Option<PathBuf>) {
        self.report.directories += 1;
        let abs = self.vol.backing.join(rel);
        let at_root = rel.as_os_str().is_empty();
        let encrypted = !self.vol.header.plaintext_names();
        let key: Option<([u8; DIR_ID_LEN], u16)> = if encrypted {
            match dirid::read(&abs) {
                Ok((id, g)) if self.vol.keys.generations.get(g).is_some() => Some((id, g)),
                Ok((_, g)) => {
                    self.find(
                        Severity::Error,
                        &rel.join(dirid::DIRID_FILE),
                        plain.as_deref(),
                        format!("the names in this directory use key generation {g}, which the volume header does not hold"),
                    );
                    None
                }
                Err(e) => {
                    self.find(
                        Severity::Error,
                        &rel.join(dirid::DIRID_FILE),
                        plain.as_deref(),
                        format!("directory id missing or damaged ({e}): the names in this directory cannot be decrypted"),
                    );
                    None
                }
            }
        } else {
            None
        };
        self.xattrs(rel, plain.as_deref());
        let mut entries: Vec<(OsString, fs::Metadata)> = match fs::read_dir(&abs) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| Some((e.file_name(), e.metadata().ok()?)))
                .collect(),
            Err(e) => {
                self.find(
                    Severity::Error,
                    rel,
                    plain.as_deref(),
                    format!("cannot list: {e}"),
                );
                return;
            }
        };
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let present: std::collections::HashSet<Vec<u8>> =
            entries.iter().map(|(n, _)| n.as_bytes().to_vec()).collect();
        for (name, md) in &entries {
            self.tick();
            let b = name.as_bytes();
            let brel = rel.join(name);
            if b == dirid::DIRID_FILE.as_bytes() || (at_root && is_root_file(b)) {
                continue;
            }
            if is_temp_file(b) && md.is_file() {
                let i = self.find(
                    Severity::Leftover,
                    &brel,
                    None,
                    "temporary file of an interrupted atomic write".into(),
                );
                if self.repair {
                    self.repaired(i, fs::remove_file(abs.join(name)), "removed");
                }
                continue;
            }
            if b.starts_with(b"kmfs.tmp.") && md.is_dir() {
                self.half_created_dir(&brel);
                continue;
            }
            if b.starts_with(names::LONG_PREFIX.as_bytes())
                && b.ends_with(names::LONG_SUFFIX.as_bytes())
            {
                let entry = &b[..b.len() - names::LONG_SUFFIX.len()];
                if !present.contains(entry) {
                    let i = self.find(
                        Severity::Leftover,
                        &brel,
                        None,
                        "long-name sidecar without its entry".into(),
                    );
                    if self.repair {
                        self.repaired(i, fs::remove_file(abs.join(name)), "removed");
                    }
                }
                continue;
            }
            // The plaintext name of this entry.
            let pname: Option<OsString> = if !encrypted {
                if names::is_reserved(b) {
                    self.find(Severity::Warning, &brel, None, "unknown kmfs file".into());
                    None
                } else {
                    Some(name.clone())
                }
            } else if let Some((id, g)) = key {
                self.decrypt_name(&abs, &brel, plain.as_deref(), &id, g, b)
            } else {
                None
            };
            let pchild = match (&plain, &pname) {
                (Some(p), Some(n)) => Some(p.join(n)),
                _ => None,
            };
            let ft = md.file_type();
            if ft.is_dir() {
                self.dir(&brel, pchild);
            } else if ft.is_file() {
                self.file(&brel, pchild.as_deref(), md);
            } else if ft.is_symlink() {
                self.symlink(&brel, pchild.as_deref());
            } else {
                self.report.other += 1;
            }
        }
    }

    /// The plaintext name of backing entry `b` in a directory with id `id`.
    fn decrypt_name(
        &mut self,
        abs: &Path,
        brel: &Path,
        parent: Option<&Path>,
        id: &[u8; DIR_ID_LEN],
        g: u16,
        b: &[u8],
    ) -> Option<OsString> {
        // The entry's own name is what is wrong: say which directory it is in.
        let inside = parent
            .map(|p| format!(" (in {})", p.display()))
            .unwrap_or_default();
        let plain: Option<&Path> = None;
        let s = std::str::from_utf8(b).ok();
        let full = if names::is_long(b) {
            let s = s?;
            match fs::read_to_string(abs.join(names::long_sidecar(s))) {
                Ok(c) if names::long_backing(c.trim_end()) == s => c.trim_end().to_string(),
                Ok(_) => {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        format!("long name's sidecar does not match the entry{inside}"),
                    );
                    return None;
                }
                Err(e) => {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        format!("long name's sidecar is missing ({e}){inside}"),
                    );
                    return None;
                }
            }
        } else if names::is_reserved(b) {
            self.find(
                Severity::Warning,
                brel,
                plain,
                format!("unknown kmfs file{inside}"),
            );
            return None;
        } else {
            match s {
                Some(s) => s.to_string(),
                None => {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        format!("name does not decrypt in this directory (not base64url){inside}"),
                    );
                    return None;
                }
            }
        };
        let keys = self.vol.keys.generations.get(g)?;
        match keys.names.decrypt(id, &full) {
            Ok(n) => Some(OsString::from_vec(n)),
            Err(_) => {
                self.find(
                    Severity::Error,
                    brel,
                    plain,
                    format!("name does not decrypt in this directory{inside}: moved here from another directory, or damaged; invisible through the mount"),
                );
                None
            }
        }
    }

    fn half_created_dir(&mut self, brel: &Path) {
        let abs = self.vol.backing.join(brel);
        let only_id = fs::read_dir(&abs)
            .map(|rd| rd.flatten().all(|e| e.file_name() == dirid::DIRID_FILE))
            .unwrap_or(false);
        if only_id {
            let i = self.find(
                Severity::Leftover,
                brel,
                None,
                "directory whose creation was interrupted (empty)".into(),
            );
            if self.repair {
                let r = fs::remove_file(abs.join(dirid::DIRID_FILE))
                    .or_else(|e| {
                        if e.kind() == io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .and_then(|_| fs::remove_dir(&abs));
                self.repaired(i, r, "removed");
            }
        } else {
            self.find(
                Severity::Warning,
                brel,
                None,
                "directory whose creation was interrupted, but it holds entries; left alone".into(),
            );
        }
    }

    fn file(&mut self, brel: &Path, plain: Option<&Path>, md: &fs::Metadata) {
        self.report.files += 1;
        self.xattrs(brel, plain);
        let len = md.len();
        if len == 0 {
            return;
        }
        let abs = self.vol.backing.join(brel);
        if len < HEADER_LEN {
            let i = self.find(
                Severity::Leftover,
                brel,
                plain,
                format!("file header incomplete ({len} of {HEADER_LEN} bytes; a crash while creating it): reads as empty"),
            );
            if self.repair {
                let r = fs::OpenOptions::new()
                    .write(true)
                    .open(&abs)
                    .and_then(|f| f.set_len(0));
                self.repaired(i, r, "truncated to empty");
            }
            return;
        }
        self.report.bytes += len - HEADER_LEN;
        let hd = fs::File::open(&abs).and_then(|f| FileHeader::read_from(&f));
        match hd {
            Ok(Some(h)) => {
                if self.vol.keys.generations.get(h.generation).is_none() {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        format!("file uses key generation {}, which the volume header does not hold: unreadable", h.generation),
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.find(
                    Severity::Error,
                    brel,
                    plain,
                    format!("damaged file header: {e}"),
                );
            }
        }
    }

    /// The encrypted extended attributes of the file or directory `brel`:
    /// each must authenticate (AES-GCM, bound to its backing name) with a
    /// generation the header holds. A name stored under two generations is
    /// what an interrupted rekey leaves; the next rekey removes the old one.
    fn xattrs(&mut self, brel: &Path, plain: Option<&Path>) {
        let mut bad: Vec<String> = Vec::new();
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let mut twice = 0;
        let ciphers = &self.xciphers;
        let r = rekey::metadata::each_xattr(&self.vol.backing.join(brel), &mut |_, n, blob| {
            let opened = ciphers.iter().find_map(|(_, c)| {
                let (name, _) = c.open(n, blob)?;
                // The value names the attribute it belongs to; the backing
                // name must be that name's encoding under the same key.
                (c.map_name(&name).ok()? == Mapped::Encrypted(n.to_vec())).then_some(name)
            });
            match opened {
                Some(name) if seen.contains(&name) => twice += 1,
                Some(name) => seen.push(name),
                None => bad.push(String::from_utf8_lossy(n).into_owned()),
            }
            Ok(())
        });
        if let Err(e) = r {
            self.find(
                Severity::Error,
                brel,
                plain,
                format!("cannot list extended attributes: {e}"),
            );
            return;
        }
        for n in bad {
            self.find(
                Severity::Error,
                brel,
                plain,
                format!("extended attribute {n} does not authenticate with any key generation the header holds (damaged or foreign): unreadable"),
            );
        }
        if twice > 0 {
            self.find(
                Severity::Warning,
                brel,
                plain,
                format!("{twice} extended attribute(s) stored under two key generations (an interrupted rekey); the copy on the newest generation is used and the next rekey removes the other"),
            );
        }
    }

    fn symlink(&mut self, brel: &Path, plain: Option<&Path>) {
        self.report.symlinks += 1;
        if self.vol.header.plaintext_names() {
            return;
        }
        match fs::read_link(self.vol.backing.join(brel)) {
            Ok(t) => {
                let stored = t.as_os_str().as_bytes();
                let ok = self
                    .vol
                    .keys
                    .generations
                    .all()
                    .iter()
                    .any(|(_, k)| k.names.decrypt_symlink(stored).is_ok());
                if !ok {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        "symlink target does not decrypt with any key generation the header holds"
                            .into(),
                    );
                }
            }
            Err(e) => {
                self.find(
                    Severity::Error,
                    brel,
                    plain,
                    format!("cannot read symlink: {e}"),
                );
            }
        }
    }
}

/// Checks the unlocked volume `vol` (unmounted). With `repair`, leftovers
/// are removed and a pending rekey record is finished. `progress` is called
/// with the number of entries seen so far.
pub fn check(vol: &Volume, repair: bool, progress: &mut dyn FnMut(u64)) -> Report {
    let mut c = Checker {
        vol,
        xciphers: rekey::metadata::xattr_ciphers(&vol.keys.generations.all()),
        repair,
        report: Report::default(),
        progress,
        seen: 0,
    };
    let backing = &vol.backing;
    // The header backup: a damaged one would fail a later restore.
    let bak = backing.join(header::BACKUP_FILE);
    if bak.exists() {
        let ok = header::read_file(&bak)
            .and_then(|b| header::VolumeHeader::decode(&b, &bak))
            .map(|h| h.volume_id == vol.header.volume_id);
        if !matches!(ok, Ok(true)) {
            let i = c.find(
                Severity::Warning,
                Path::new(header::BACKUP_FILE),
                None,
                "header backup is damaged or belongs to another volume".into(),
            );
            if repair {
                let r = header::read_file(&header::header_path(backing))
                    .and_then(|cur| header::replace_backup(backing, &cur))
                    .map_err(|e| io::Error::other(e.to_string()));
                c.repaired(i, r, "replaced with a copy of the current header");
            }
        }
    }
    match rekey::state::RekeyState::load(backing) {
        Ok(s) => c.report.rekey_in_progress = s.map(|s| s.target),
        Err(e) => {
            c.find(
                Severity::Warning,
                Path::new(rekey::state::STATE_FILE),
                None,
                e.to_string(),
            );
        }
    }
    match rekey::journal::Journal::pending(backing) {
        Ok(Some(rec)) => {
            let i = c.find(
                Severity::Leftover,
                &rec.file.path,
                None,
                "a rekey was interrupted while re-encrypting this file; it is finished from the journal before the next mount serves it".into(),
            );
            if repair {
                let r = rekey::recover(backing, &vol.keys, &rekey::Offline)
                    .map(drop)
                    .map_err(|e| io::Error::other(e.to_string()));
                c.repaired(i, r, "finished from the rekey journal");
            }
        }
        Ok(None) => {}
        Err(e) => {
            c.find(
                Severity::Error,
                Path::new(rekey::journal::JOURNAL_FILE),
                None,
                format!("cannot read the rekey journal: {e}"),
            );
        }
    }
    c.dir(Path::new(""), Some(PathBuf::from("/")));
    (c.progress)(c.seen);
    c.report
}

/// A finding as one line: severity, plaintext path (or backing path), what.
pub fn line(f: &Finding) -> String {
    let sev = match f.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Leftover => "leftover",
    };
    let place = match &f.plain {
        Some(p) => format!("{} (backing {})", p.display(), f.backing.display()),
        None => format!("backing {}", f.backing.display()),
    };
    let rep = f
        .repaired
        .as_ref()
        .map(|r| format!(" [{r}]"))
        .unwrap_or_default();
    format!("{sev}: {place}: {}{rep}", f.what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_temporary_names() {
        assert!(is_root_file(b"kmfs.volume"));
        assert!(is_root_file(b"kmfs.volume.20261122T214509Z.bak"));
        assert!(is_root_file(b"kmfs.rekey.journal"));
        assert!(!is_root_file(b"kmfs.volume.tmp"));
        assert!(is_temp_file(b"kmfs.volume.tmp"));
        assert!(is_temp_file(b"kmfs.dirid.tmp"));
        assert!(!is_temp_file(b"kmfs.dirid"));
        assert!(!is_temp_file(b"report.tmp"));
    }
}
