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

mod entries;
mod walk;

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
