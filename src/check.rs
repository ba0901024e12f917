//! `kmfs check`: an offline consistency check of a backing directory
//! (SPEC section 6). Read-only unless asked to repair.
//!
//! It authenticates the header (the caller opened the [`Volume`]), then walks
//! the tree and checks what the filesystem relies on: every directory has its
//! id, every name decrypts in its directory, long names match their
//! sidecars, symlink targets decrypt, every file header parses and names a
//! key generation the header holds, and every encrypted extended attribute
//! of a file or directory authenticates with one of those generations,
//! bound to its owner (and every symlink target bound to its place; on a
//! volume not yet migrated to format version 3 the unbound forms are
//! accepted and counted). It also finds what crashes leave behind
//! (temporary files, half-created directories, orphaned sidecars, torn file
//! headers, a pending rekey journal record); `--repair` removes or finishes
//! those, and never touches anything it cannot prove is a leftover.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::crypto::names::{self, DIR_ID_LEN};
use crate::crypto::xattr::{Mapped, NO_OWNER, OWNER_LEN, XattrCipher};
use crate::rekey;
use crate::sys;
use crate::volume::backing::BackingKind;
use crate::volume::layout::{FileHeader, HEADER_LEN};
use crate::volume::{Volume, dirid, header, internal};

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
    /// Unbound attribute values and symlink targets are accepted (format
    /// version ≤ 2); `unbound` counts them.
    unbound_ok: bool,
    unbound: u64,
    repair: bool,
    report: Report,
    progress: &'a mut dyn FnMut(u64),
    seen: u64,
    /// Every file id seen, with the first file (and its inode) that had it.
    file_ids: HashMap<[u8; 16], (PathBuf, (u64, u64))>,
}

/// A path that reaches the directory behind `fd` (and nothing else: the
/// walk never goes through a path the backing store could redirect).
fn fd_dir(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(sys::proc_path(fd.as_raw_fd()).as_bytes()))
}

/// (device, inode) of what the scan saw.
fn identity(md: &fs::Metadata) -> (u64, u64) {
    (md.dev(), md.ino())
}

/// Fails unless `fd` is still the inode the scan saw as `md`: a repair acts
/// only on what it examined, never on something put in its place meanwhile.
fn same_as_scanned(fd: BorrowedFd<'_>, md: &fs::Metadata) -> io::Result<()> {
    let st = sys::fstat(fd)?;
    if (st.st_dev, st.st_ino) == identity(md) {
        Ok(())
    } else {
        Err(io::Error::other(
            "the entry was replaced since it was examined; left alone",
        ))
    }
}

/// Opens subdirectory `name` of `dir` without following a symlink.
fn open_subdir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    sys::openat(
        dir,
        &sys::cstr(name.as_bytes())?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )
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

    /// Checks directory `rel`, open as `dfd` (plaintext path `plain`, if
    /// its names decrypt).
    fn dir(&mut self, dfd: BorrowedFd<'_>, rel: &Path, plain: Option<PathBuf>) {
        self.report.directories += 1;
        let abs = fd_dir(dfd);
        let at_root = rel.as_os_str().is_empty();
        let encrypted = !self.vol.header.plaintext_names();
        let key: Option<([u8; DIR_ID_LEN], u16)> = if encrypted {
            match dirid::read_at(dfd) {
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
        let owner = if encrypted {
            key.map(|(id, _)| id)
        } else {
            Some(NO_OWNER)
        };
        // `abs` is a /proc/self/fd link: "." makes each_xattr (O_NOFOLLOW)
        // open the directory, not the link.
        self.xattrs(&abs.join("."), rel, plain.as_deref(), owner);
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
            let kind = BackingKind::classify(b);
            if kind == BackingKind::DirId || (at_root && kind.is_root_file()) {
                continue;
            }
            // Temporary files of atomic writes (header, backups, directory
            // ids, rekey state): a crash between create and rename leaves them.
            if kind == BackingKind::Temp && md.is_file() {
                let i = self.find(
                    Severity::Leftover,
                    &brel,
                    None,
                    "temporary file of an interrupted atomic write".into(),
                );
                if self.repair {
                    self.repaired(i, unlink(dfd, name, 0), "removed");
                }
                continue;
            }
            if kind == BackingKind::TempEntry && md.is_dir() {
                self.half_created_dir(dfd, name, &brel, md);
                continue;
            }
            if kind == BackingKind::TempEntry && md.file_type().is_symlink() {
                // A symlink re-created for a rename or a rekey, never renamed
                // into place: the entry it was for still has its own.
                let i = self.find(
                    Severity::Leftover,
                    &brel,
                    None,
                    "symlink whose re-creation was interrupted (a rename or rekey)".into(),
                );
                if self.repair {
                    self.repaired(i, unlink(dfd, name, 0), "removed");
                }
                continue;
            }
            if kind == BackingKind::LongSidecar {
                let entry = &b[..b.len() - names::LONG_SUFFIX.len()];
                if !present.contains(entry) {
                    let i = self.find(
                        Severity::Leftover,
                        &brel,
                        None,
                        "long-name sidecar without its entry".into(),
                    );
                    if self.repair {
                        self.repaired(i, unlink(dfd, name, 0), "removed");
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
                self.decrypt_name(dfd, &brel, plain.as_deref(), &id, g, b)
            } else {
                None
            };
            let pchild = match (&plain, &pname) {
                (Some(p), Some(n)) => Some(p.join(n)),
                _ => None,
            };
            let ft = md.file_type();
            if ft.is_dir() {
                match open_subdir(dfd, name).and_then(|c| same_as_scanned(c.as_fd(), md).map(|_| c))
                {
                    Ok(child) => self.dir(child.as_fd(), &brel, pchild),
                    Err(e) => {
                        self.find(
                            Severity::Error,
                            &brel,
                            pchild.as_deref(),
                            format!("cannot open directory: {e}"),
                        );
                    }
                }
            } else if ft.is_file() {
                self.file(dfd, name, &brel, pchild.as_deref(), md);
            } else if ft.is_symlink() {
                let place = match (&pname, key) {
                    (Some(n), Some((id, _))) => Some((id, n.as_bytes().to_vec())),
                    (Some(n), None) if !encrypted => {
                        Some(([0u8; DIR_ID_LEN], n.as_bytes().to_vec()))
                    }
                    _ => None,
                };
                self.symlink(&abs.join(name), &brel, pchild.as_deref(), place);
            } else {
                self.report.other += 1;
            }
        }
    }

    /// The plaintext name of backing entry `b` in a directory with id `id`.
    fn decrypt_name(
        &mut self,
        dfd: BorrowedFd<'_>,
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
            match internal::read_sidecar(dfd, b) {
                Ok(c) => c,
                Err(e @ internal::SidecarError::Mismatch) => {
                    self.find(Severity::Error, brel, plain, format!("{e}{inside}"));
                    return None;
                }
                Err(e) => {
                    self.find(Severity::Error, brel, plain, format!("{e}{inside}"));
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

    fn half_created_dir(
        &mut self,
        dfd: BorrowedFd<'_>,
        name: &OsStr,
        brel: &Path,
        md: &fs::Metadata,
    ) {
        let child = open_subdir(dfd, name).and_then(|c| same_as_scanned(c.as_fd(), md).map(|_| c));
        let only_id = child.as_ref().is_ok_and(|c| {
            fs::read_dir(fd_dir(c.as_fd()))
                .map(|rd| rd.flatten().all(|e| e.file_name() == dirid::DIRID_FILE))
                .unwrap_or(false)
        });
        if let (Ok(child), true) = (child, only_id) {
            let i = self.find(
                Severity::Leftover,
                brel,
                None,
                "directory whose creation was interrupted (empty)".into(),
            );
            if self.repair {
                let r = unlink(child.as_fd(), OsStr::new(dirid::DIRID_FILE), 0)
                    .or_else(|e| {
                        if e.kind() == io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .and_then(|_| unlink(dfd, name, libc::AT_REMOVEDIR));
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

    fn file(
        &mut self,
        dfd: BorrowedFd<'_>,
        name: &OsStr,
        brel: &Path,
        plain: Option<&Path>,
        md: &fs::Metadata,
    ) {
        self.report.files += 1;
        let at = fd_dir(dfd).join(name);
        let owner = rekey::metadata::owner_of(&at, md, self.vol.header.plaintext_names());
        self.xattrs(&at, brel, plain, owner);
        let len = md.len();
        if len == 0 {
            return;
        }
        let Ok(cname) = sys::cstr(name.as_bytes()) else {
            return;
        };
        if len < HEADER_LEN {
            let i = self.find(
                Severity::Leftover,
                brel,
                plain,
                format!("file header incomplete ({len} of {HEADER_LEN} bytes; a crash while creating it): reads as empty"),
            );
            if self.repair {
                // Only the file examined, and only while it is still torn.
                let r = internal::open(dfd, &cname, libc::O_WRONLY, HEADER_LEN - 1)
                    .and_then(|f| same_as_scanned(f.as_fd(), md).and_then(|_| f.set_len(0)));
                self.repaired(i, r, "truncated to empty");
            }
            return;
        }
        self.report.bytes += len - HEADER_LEN;
        let hd = internal::open(dfd, &cname, libc::O_RDONLY, u64::MAX).and_then(|f| {
            same_as_scanned(f.as_fd(), md)?;
            FileHeader::read_from(&f)
        });
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
                self.file_id(h.file_id, brel, plain, identity(md));
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

    /// Two backing files (not hard links of one) with the same file id: a
    /// copy of a backing file, e.g. restored beside its original. Both still
    /// read, but they share XTS tweaks, so an observer of both learns where
    /// they hold equal 16-byte blocks.
    fn file_id(&mut self, id: [u8; 16], brel: &Path, plain: Option<&Path>, ino: (u64, u64)) {
        match self.file_ids.get(&id) {
            Some((first, first_ino)) if *first_ino != ino => {
                let what = format!(
                    "has the same file id as backing {} (a copy of a backing file, e.g. restored beside its original): the two share encryption tweaks; copy it through the mount instead and remove this one",
                    first.display()
                );
                self.find(Severity::Warning, brel, plain, what);
            }
            Some(_) => {}
            None => {
                self.file_ids.insert(id, (brel.to_path_buf(), ino));
            }
        }
    }

    /// The encrypted extended attributes of the file or directory `brel`
    /// (at `at`), whose owner id is `owner`: each must authenticate
    /// (AES-GCM, bound to its backing name and owner; unbound ones only
    /// while the volume is not migrated) with a generation the header holds.
    /// A name stored under two generations is what an interrupted rekey
    /// leaves; the next rekey removes the old one.
    fn xattrs(
        &mut self,
        at: &Path,
        brel: &Path,
        plain: Option<&Path>,
        owner: Option<[u8; OWNER_LEN]>,
    ) {
        let mut bad: Vec<String> = Vec::new();
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let mut twice = 0;
        let mut unbound = 0;
        let ciphers = &self.xciphers;
        let unbound_ok = self.unbound_ok;
        let r = rekey::metadata::each_xattr(at, &mut |_, n, blob| {
            let opened = ciphers.iter().find_map(|(_, c)| {
                let o = c.open(n, blob, owner.as_ref(), unbound_ok)?;
                // The value names the attribute it belongs to; the backing
                // name must be that name's encoding under the same key.
                (c.map_name(&o.name).ok()? == Mapped::Encrypted(n.to_vec())).then_some(o)
            });
            match opened {
                Some(o) => {
                    if !o.bound {
                        unbound += 1;
                    }
                    if seen.contains(&o.name) {
                        twice += 1
                    } else {
                        seen.push(o.name)
                    }
                }
                None => bad.push(String::from_utf8_lossy(n).into_owned()),
            }
            Ok(())
        });
        self.unbound += unbound;
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
                format!("extended attribute {n} does not authenticate with any key generation the header holds, bound to this file (damaged, foreign, or copied from another file): unreadable"),
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

    /// Symlink `brel` (at `at`), whose target is bound to `place` (its
    /// directory id and plaintext name; `None` if its name does not decrypt,
    /// already reported).
    fn symlink(
        &mut self,
        at: &Path,
        brel: &Path,
        plain: Option<&Path>,
        place: Option<([u8; DIR_ID_LEN], Vec<u8>)>,
    ) {
        self.report.symlinks += 1;
        let Some((dir_id, name)) = place else {
            return;
        };
        match fs::read_link(at) {
            Ok(t) => {
                let stored = t.as_os_str().as_bytes();
                let place = rekey::metadata::LinkPlace {
                    dir_id,
                    name: &name,
                };
                let all = self.vol.keys.generations.all();
                match rekey::metadata::open_target(&all, &place, stored, self.unbound_ok) {
                    Some((_, bound, _)) => {
                        if !bound {
                            self.unbound += 1;
                        }
                    }
                    None => {
                        self.find(
                            Severity::Error,
                            brel,
                            plain,
                            "symlink target does not decrypt with any key generation the header holds, bound to this name and directory (damaged, or moved or copied from elsewhere): readlink fails"
                                .into(),
                        );
                    }
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
        unbound_ok: vol.keys.unbound_ok(),
        unbound: 0,
        repair,
        report: Report::default(),
        progress,
        seen: 0,
        file_ids: HashMap::new(),
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
        Ok(Some(s)) => {
            if let Err(e) = s.check_against(&vol.header) {
                c.find(
                    Severity::Error,
                    Path::new(rekey::state::STATE_FILE),
                    None,
                    e.to_string(),
                );
            }
            c.report.rekey_in_progress = Some(s.target);
        }
        Ok(None) => {}
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
    match internal::open_dir(backing) {
        Ok(root) => c.dir(root.as_fd(), Path::new(""), Some(PathBuf::from("/"))),
        Err(e) => {
            c.find(
                Severity::Error,
                Path::new(""),
                None,
                format!("cannot open the backing directory: {e}"),
            );
        }
    }
    if c.unbound > 0 {
        let n = c.unbound;
        c.find(
            Severity::Warning,
            Path::new(""),
            None,
            format!("{n} extended-attribute value(s) and symlink target(s) are not bound to their file or place yet (volume format version {}); kmfs rekey binds them and migrates the volume to version 3", vol.header.version),
        );
    }
    (c.progress)(c.seen);
    c.report
}

/// Removes `name` from `dir` (`unlinkat`; never follows a symlink).
fn unlink(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    sys::unlinkat(dir, &sys::cstr(name.as_bytes())?, flags)
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
