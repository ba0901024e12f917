//! What a name in the backing directory is: one of kmfs's own files (see
//! docs/FORMAT.md) or a user entry. Every backing name kmfs keeps for
//! itself starts with `kmfs.` ([`names::RESERVED_PREFIX`]); an encoded user
//! name never does, and plain-text mode refuses the prefix. The one
//! exception is the hashed long name `kmfs.long.<hash>`, which is a user
//! entry.

use crate::crypto::names;

/// The rekey's journal, in the backing root.
pub const JOURNAL_FILE: &str = "kmfs.rekey.journal";
/// The rekey's state file, in the backing root.
pub const STATE_FILE: &str = "kmfs.rekey";
/// Prefix of a directory or symlink being created (renamed into place when
/// complete).
pub const TEMP_ENTRY_PREFIX: &str = "kmfs.tmp.";
/// Suffix of the temporary file of an atomic write (`kmfs.volume.tmp`,
/// `kmfs.dirid.tmp`, `kmfs.rekey.tmp`, ...).
pub const TEMP_SUFFIX: &str = ".tmp";
/// The directory `mkfs` leaves in the root of an ext filesystem.
pub const LOST_FOUND: &str = "lost+found";

/// The kind of a backing directory entry, by its name alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// `kmfs.volume` (root only).
    Header,
    /// `kmfs.volume.bak` or a dated `kmfs.volume.<when>.bak` (root only).
    HeaderBackup,
    /// `kmfs.dirid`, in every directory of a volume with encrypted names.
    DirId,
    /// `kmfs.rekey.journal` (root only).
    RekeyJournal,
    /// `kmfs.rekey` (root only).
    RekeyState,
    /// `kmfs.lock` (root only).
    Lock,
    /// `kmfs.long.<hash>`: a user entry with a long name.
    LongName,
    /// `kmfs.long.<hash>.name`: the sidecar of a long name.
    LongSidecar,
    /// `kmfs.tmp.<random>`: a directory or symlink being created.
    TempEntry,
    /// `kmfs.<...>.tmp`: the temporary file of an atomic write.
    Temp,
    /// Any other name starting with `kmfs.`.
    OtherReserved,
    /// `lost+found` (meaningful in the root only).
    LostFound,
    /// A user entry: an encoded name, or a plain-text one.
    User,
}

impl BackingKind {
    /// Classifies backing name `name`. Where patterns overlap, the first
    /// rule wins: exact names, then the long-name prefix, then the
    /// temporary-entry prefix, then the `.tmp` suffix, then dated backups.
    pub fn classify(name: &[u8]) -> BackingKind {
        use super::dirid::DIRID_FILE;
        use super::header::{BACKUP_FILE, HEADER_FILE};
        use super::lock::LOCK_FILE;
        let is = |s: &str| name == s.as_bytes();
        if !names::is_reserved(name) {
            return if is(LOST_FOUND) {
                BackingKind::LostFound
            } else {
                BackingKind::User
            };
        }
        if is(HEADER_FILE) {
            BackingKind::Header
        } else if is(BACKUP_FILE) {
            BackingKind::HeaderBackup
        } else if is(DIRID_FILE) {
            BackingKind::DirId
        } else if is(JOURNAL_FILE) {
            BackingKind::RekeyJournal
        } else if is(STATE_FILE) {
            BackingKind::RekeyState
        } else if is(LOCK_FILE) {
            BackingKind::Lock
        } else if name.starts_with(names::LONG_PREFIX.as_bytes()) {
            if name.ends_with(names::LONG_SUFFIX.as_bytes()) {
                BackingKind::LongSidecar
            } else {
                BackingKind::LongName
            }
        } else if name.starts_with(TEMP_ENTRY_PREFIX.as_bytes()) {
            BackingKind::TempEntry
        } else if name.ends_with(TEMP_SUFFIX.as_bytes()) {
            BackingKind::Temp
        } else if name.starts_with(b"kmfs.volume.") && name.ends_with(b".bak") {
            BackingKind::HeaderBackup
        } else {
            BackingKind::OtherReserved
        }
    }

    /// One of kmfs's own files (or temporaries), not a user entry: every
    /// `kmfs.` name but a long name. `lost+found` is not.
    pub fn is_own(self) -> bool {
        !matches!(
            self,
            BackingKind::User | BackingKind::LongName | BackingKind::LostFound
        )
    }

    /// A name that belongs to the volume itself when it is in the backing
    /// root (header and its backups, rekey journal and state, lock,
    /// `lost+found`).
    pub fn is_root_file(self) -> bool {
        matches!(
            self,
            BackingKind::Header
                | BackingKind::HeaderBackup
                | BackingKind::RekeyJournal
                | BackingKind::RekeyState
                | BackingKind::Lock
                | BackingKind::LostFound
        )
    }
}

#[cfg(test)]
mod tests {
    use super::BackingKind::{self, *};

    #[test]
    fn every_reserved_name_has_its_kind() {
        let k = |s: &str| BackingKind::classify(s.as_bytes());
        assert_eq!(k("kmfs.volume"), Header);
        assert_eq!(k("kmfs.volume.bak"), HeaderBackup);
        assert_eq!(k("kmfs.volume.20261122T214509Z.bak"), HeaderBackup);
        assert_eq!(k("kmfs.volume.tmp"), Temp);
        assert_eq!(k("kmfs.volume.bak.tmp"), Temp);
        assert_eq!(k("kmfs.dirid"), DirId);
        assert_eq!(k("kmfs.dirid.tmp"), Temp);
        assert_eq!(k("kmfs.rekey"), RekeyState);
        assert_eq!(k("kmfs.rekey.tmp"), Temp);
        assert_eq!(k("kmfs.rekey.journal"), RekeyJournal);
        assert_eq!(k("kmfs.lock"), Lock);
        assert_eq!(k("kmfs.long.abc"), LongName);
        assert_eq!(k("kmfs.long.abc.name"), LongSidecar);
        assert_eq!(k("kmfs.tmp.0123abcd"), TempEntry);
        assert_eq!(k("kmfs.other"), OtherReserved);
        assert_eq!(k("lost+found"), LostFound);
        assert_eq!(k("report.txt"), User);
        assert_eq!(k("report.tmp"), User);
        // Own files are skipped by walks; long names and lost+found are not.
        for own in [
            "kmfs.volume",
            "kmfs.rekey.journal",
            "kmfs.lock",
            "kmfs.dirid",
        ] {
            assert!(k(own).is_own(), "{own}");
        }
        assert!(k("kmfs.long.abc.name").is_own());
        assert!(!k("kmfs.long.abc").is_own());
        assert!(!k("lost+found").is_own());
        assert!(!k("report.txt").is_own());
        // Root files.
        assert!(k("kmfs.volume").is_root_file());
        assert!(k("kmfs.volume.20261122T214509Z.bak").is_root_file());
        assert!(k("kmfs.rekey.journal").is_root_file());
        assert!(k("kmfs.lock").is_root_file());
        assert!(!k("kmfs.volume.tmp").is_root_file());
        assert!(!k("kmfs.dirid").is_root_file());
    }
}
