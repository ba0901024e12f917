//! KEK rotation: re-wrap the volume's DEK under a new KEK and swap the header.
//!
//! The same steps run offline (`kmfs rotate-kek BACKING`) and inside the mount
//! daemon (over the control socket), where the DEK is already in memory and I/O
//! goes on untouched — the DEK, and so every file, stays the same.
//!
//! 1. obtain the new KEK (a new version on the key manager / in the HSM, a named
//!    existing key, or another key file);
//! 2. wrap the DEK with it;
//! 3. verify: unwrap with the new KEK and compare with the DEK in memory;
//! 4. save a dated copy of the current header (`kmfs.volume.<UTC>.bak`);
//! 5. swap the header atomically, recording the old KEK in the history;
//! 6. only if asked: revoke the old KEK on the key manager.
//!
//! A failure in steps 1–4 changes nothing on disk; step 5 is one rename, so the
//! committed header always names a KEK that unwraps the DEK. The old KEK is never
//! destroyed.

use crate::audit::{self, AuditRecord, Outcome};
use crate::kms::{KekRef, KeyProvider, KmsError};
use crate::volume::header::{self, RotationEntry};
use crate::volume::{Volume, VolumeError, hex, now_secs};

/// What to rotate to.
#[derive(Clone, Debug, Default)]
pub struct RotateRequest {
    /// Use (or create) the key with this name instead of a new version of the
    /// current one.
    pub new_key: Option<String>,
    /// Revoke the old KEK on the key manager after the swap.
    pub revoke_old: bool,
    /// Development provider: rotate to this key file.
    pub new_keyfile: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RotateReport {
    pub volume_id: String,
    pub old_kek: KekRef,
    pub new_kek: KekRef,
    /// The dated copy of the header from before the rotation.
    pub backup: String,
    pub revoked_old: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("rotation failed at step \"{step}\": {source}; the volume still uses {old}")]
    Kms {
        step: &'static str,
        old: Box<KekRef>,
        source: KmsError,
    },
    #[error(
        "rotation failed: the new key-encryption key {new} did not unwrap the volume key it had just wrapped; the volume still uses {old}"
    )]
    VerifyFailed { old: Box<KekRef>, new: Box<KekRef> },
    #[error("rotation failed while writing the header: {source}; the volume still uses {old}")]
    Store {
        old: Box<KekRef>,
        source: Box<VolumeError>,
    },
    #[error(
        "rotation refused: the volume header on disk is damaged or was replaced behind the daemon: {source}; the volume still uses {old}"
    )]
    Header {
        old: Box<KekRef>,
        source: header::HeaderError,
    },
    #[error("the new key-encryption key is the current one ({0}); nothing to rotate")]
    SameKey(Box<KekRef>),
}

fn audit_step(vol: &Volume, op: &str, kek: &KekRef, result: Result<(), &str>) {
    let reason = match result {
        Ok(()) => format!("volume={}", vol.id_hex()),
        Err(e) => format!("volume={} {e}", vol.id_hex()),
    };
    audit::record(&AuditRecord::new(
        op,
        &kek.provider,
        &kek.name,
        Some(kek.version),
        Outcome::of(&result),
        &reason,
    ));
}

/// Rotates `vol` to a new KEK from `provider` (the volume's own provider for
/// kmip/pkcs11; for key files, a provider opened on the new key file with
/// `new_from_provider = true`).
pub fn rotate(
    vol: &mut Volume,
    provider: &dyn KeyProvider,
    req: &RotateRequest,
    new_from_provider: bool,
) -> Result<RotateReport, RotateError> {
    let old = vol.header.kek.clone();
    let kms = |step: &'static str, old: &KekRef| {
        let old = Box::new(old.clone());
        move |source| RotateError::Kms { step, old, source }
    };
    log::info!(
        "op=rotate_start volume={} key={} version={}",
        vol.id_hex(),
        old.name,
        old.version
    );
    audit_step(vol, "rotate_start", &old, Ok(()));

    // 1. The new KEK.
    let new = if new_from_provider {
        provider.current_kek()
    } else {
        provider.create_kek(req.new_key.as_deref())
    };
    let new = match new {
        Ok(k) => k,
        Err(e) => {
            audit_step(vol, "rotate_new_kek", &old, Err(&e.to_string()));
            return Err(kms("obtain new KEK", &old)(e));
        }
    };
    if new == old {
        return Err(RotateError::SameKey(Box::new(new)));
    }
    audit_step(vol, "rotate_new_kek", &new, Ok(()));

    // 2. Wrap every DEK generation, 3. verify each.
    let generations = vol.wrap_all(provider, &new).map_err(|e| {
        audit_step(vol, "rotate_wrap", &new, Err(&e.to_string()));
        if matches!(e, KmsError::VerifyMismatch) {
            return RotateError::VerifyFailed {
                old: Box::new(old.clone()),
                new: Box::new(new.clone()),
            };
        }
        kms("wrap with new KEK", &old)(e)
    })?;
    audit_step(vol, "rotate_verify", &new, Ok(()));

    // 4. Dated backup of the current header, 5. atomic swap.
    let now = now_secs();
    let store_err = |old: &KekRef| {
        let old = Box::new(old.clone());
        move |source| RotateError::Store {
            old,
            source: Box::new(source),
        }
    };
    let hpath = header::header_path(&vol.backing);
    let current = header::read_file(&hpath)
        .map_err(VolumeError::from)
        .map_err(store_err(&old))?;
    // The copy must be a header (a mounted volume's file may have been
    // damaged or replaced since the mount): refuse as an offline open would.
    if let Err(source) = header::VolumeHeader::decode(&current, &hpath) {
        audit_step(vol, "rotate_backup", &old, Err(&source.to_string()));
        return Err(RotateError::Header {
            old: Box::new(old.clone()),
            source,
        });
    }
    let backup = save_dated_backup(&vol.backing, &current)
        .map_err(|source| VolumeError::Io {
            path: vol.backing.clone(),
            what: "save the dated header backup",
            source,
        })
        .map_err(store_err(&old))?;
    let mut hdr = vol.header.clone();
    hdr.history.push(RotationEntry {
        retired_at: now,
        kek: old.clone(),
    });
    hdr.kek = new.clone();
    hdr.generations = generations;
    hdr.updated = now;
    if let Err(e) = vol.store_header(hdr) {
        audit_step(vol, "rotate_commit", &new, Err(&e.to_string()));
        return Err(store_err(&old)(e));
    }
    audit_step(vol, "rotate_commit", &new, Ok(()));
    log::info!(
        "op=rotate_commit volume={} key={} version={} result=ok",
        vol.id_hex(),
        new.name,
        new.version
    );

    // 6. Revoke only on request; a failure here does not undo the rotation.
    let mut revoked_old = false;
    if req.revoke_old {
        match provider.revoke(&old) {
            Ok(()) => {
                revoked_old = true;
                audit_step(vol, "rotate_revoke_old", &old, Ok(()));
            }
            Err(e) => {
                audit_step(vol, "rotate_revoke_old", &old, Err(&e.to_string()));
                log::warn!(
                    "op=rotate_revoke_old volume={} key={} version={} result=fail error={:?}",
                    vol.id_hex(),
                    old.name,
                    old.version,
                    e.to_string()
                );
            }
        }
    }
    Ok(RotateReport {
        volume_id: hex(&vol.header.volume_id),
        old_kek: old,
        new_kek: new,
        backup,
        revoked_old,
    })
}

/// `kmfs.volume.<UTC time to the microsecond>.bak`, e.g.
/// `kmfs.volume.20261122T213000.123456Z.bak`, for a time in microseconds since
/// the epoch. Names sort by time.
pub fn backup_name(micros: u64) -> String {
    let secs = (micros / 1_000_000) as i64;
    let d =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "kmfs.volume.{:04}{:02}{:02}T{:02}{:02}{:02}.{:06}Z.bak",
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute(),
        d.second(),
        micros % 1_000_000
    )
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Saves `bytes` under a dated backup name that no other file has: the copy is
/// written and synced as `<name>.tmp`, then hard-linked to `<name>` — link(2)
/// never replaces an existing file, so two rotations in the same microsecond
/// (or a clock stepped back) cannot overwrite a backup; on a collision the
/// next microsecond is tried. Returns the name.
pub fn save_dated_backup(backing: &std::path::Path, bytes: &[u8]) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut t = now_micros();
    for _ in 0..10_000 {
        let name = backup_name(t);
        let dst = backing.join(&name);
        let tmp = backing.join(format!("{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let res = f.write_all(bytes).and_then(|_| f.sync_all());
        drop(f);
        let linked = res.and_then(|_| std::fs::hard_link(&tmp, &dst));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                std::fs::File::open(backing)?.sync_all()?;
                return Ok(name);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                t = t.max(now_micros()) + 1;
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "no free name for the dated header backup",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::keyfile::KeyfileProvider;
    use crate::volume::InitOptions;
    use std::os::unix::fs::PermissionsExt;

    fn key(dir: &std::path::Path, name: &str, b: u8) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, [b; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn keyfile_rotation_swaps_header_keeps_dek_and_backup() {
        let d = tempfile::tempdir().unwrap();
        let back = d.path().join("back");
        std::fs::create_dir(&back).unwrap();
        let k1 = KeyfileProvider::open(&key(d.path(), "k1", 1), None).unwrap();
        let k2 = KeyfileProvider::open(&key(d.path(), "k2", 2), None).unwrap();
        let mut vol = Volume::init(&back, &k1, &InitOptions::default()).unwrap();
        let dek = vol.dek().clone();
        let rep = rotate(&mut vol, &k2, &RotateRequest::default(), true).unwrap();
        assert_eq!(rep.old_kek.name, k1.current_kek().unwrap().name);
        assert!(back.join(&rep.backup).exists());
        // Only the new key opens the volume now; the DEK is unchanged.
        let v2 = Volume::open(&back, &k2).unwrap();
        assert!(v2.dek().ct_eq(&dek));
        assert_eq!(v2.header.history.len(), 1);
        assert!(Volume::open(&back, &k1).is_err());
        // Rotating to the same key is refused and changes nothing.
        let mut v2 = v2;
        let before = std::fs::read(back.join("kmfs.volume")).unwrap();
        assert!(matches!(
            rotate(&mut v2, &k2, &RotateRequest::default(), true),
            Err(RotateError::SameKey(_))
        ));
        assert_eq!(std::fs::read(back.join("kmfs.volume")).unwrap(), before);
    }

    #[test]
    fn failure_to_obtain_a_new_kek_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let back = d.path().join("back");
        std::fs::create_dir(&back).unwrap();
        let k1 = KeyfileProvider::open(&key(d.path(), "k1", 1), None).unwrap();
        let mut vol = Volume::init(&back, &k1, &InitOptions::default()).unwrap();
        let before = std::fs::read(back.join("kmfs.volume")).unwrap();
        // The keyfile provider cannot create keys: step 1 fails.
        let e = rotate(&mut vol, &k1, &RotateRequest::default(), false).unwrap_err();
        assert!(e.to_string().contains("still uses"), "{e}");
        assert_eq!(std::fs::read(back.join("kmfs.volume")).unwrap(), before);
        Volume::open(&back, &k1).unwrap();
    }

    /// A provider whose unwrap returns a different key than it wrapped: a
    /// failure no real key manager can be made to produce on demand, so it is
    /// simulated here, beside the real-provider tests.
    struct Forgetful(KeyfileProvider);

    impl KeyProvider for Forgetful {
        fn kind(&self) -> &'static str {
            "keyfile"
        }
        fn describe(&self) -> String {
            "forgetful".into()
        }
        fn current_kek(&self) -> Result<KekRef, KmsError> {
            self.0.current_kek()
        }
        fn wrap(
            &self,
            k: &KekRef,
            dek: &crate::crypto::keys::Secret,
            aad: &[u8],
        ) -> Result<Vec<u8>, KmsError> {
            self.0.wrap(k, dek, aad)
        }
        fn unwrap(
            &self,
            _: &KekRef,
            _: &[u8],
            _: &[u8],
        ) -> Result<crate::crypto::keys::Secret, KmsError> {
            Ok(crate::crypto::keys::Secret::from_slice(&[0u8; 32]))
        }
        fn random(&self, n: usize) -> Result<crate::crypto::keys::Secret, KmsError> {
            self.0.random(n)
        }
        fn create_kek(&self, n: Option<&str>) -> Result<KekRef, KmsError> {
            self.0.create_kek(n)
        }
    }

    #[test]
    fn a_wrap_that_does_not_verify_is_never_committed() {
        let d = tempfile::tempdir().unwrap();
        let back = d.path().join("back");
        std::fs::create_dir(&back).unwrap();
        let k1 = KeyfileProvider::open(&key(d.path(), "k1", 1), None).unwrap();
        let mut vol = Volume::init(&back, &k1, &InitOptions::default()).unwrap();
        let before = std::fs::read(back.join("kmfs.volume")).unwrap();
        let bad = Forgetful(KeyfileProvider::open(&key(d.path(), "k2", 2), None).unwrap());
        let e = rotate(&mut vol, &bad, &RotateRequest::default(), true).unwrap_err();
        assert!(matches!(e, RotateError::VerifyFailed { .. }), "{e}");
        assert!(e.to_string().contains("still uses"));
        assert_eq!(std::fs::read(back.join("kmfs.volume")).unwrap(), before);
        Volume::open(&back, &k1).unwrap();
    }

    #[test]
    fn backup_names_sort_by_time() {
        assert_eq!(backup_name(0), "kmfs.volume.19700101T000000.000000Z.bak");
        assert_eq!(
            backup_name(1_700_000_000_000_042),
            "kmfs.volume.20231114T221320.000042Z.bak"
        );
        assert!(backup_name(1_800_000_000_000_000) > backup_name(1_700_000_000_999_999));
        assert!(backup_name(1_700_000_000_000_001) > backup_name(1_700_000_000_000_000));
    }

    #[test]
    fn dated_backups_never_overwrite_each_other() {
        let d = tempfile::tempdir().unwrap();
        // The same microsecond taken: the next free one is used.
        let names: Vec<String> = (0..50)
            .map(|i| save_dated_backup(d.path(), &[i as u8; 10]).unwrap())
            .collect();
        let mut uniq = names.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 50);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(std::fs::read(d.path().join(n)).unwrap(), vec![i as u8; 10]);
        }
        // No temporaries left.
        let left = std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(left, 50);
    }

    #[test]
    fn three_rotations_in_one_second_keep_three_backups() {
        let d = tempfile::tempdir().unwrap();
        let back = d.path().join("back");
        std::fs::create_dir(&back).unwrap();
        let ks: Vec<KeyfileProvider> = (1..=4)
            .map(|i| KeyfileProvider::open(&key(d.path(), &format!("k{i}"), i), None).unwrap())
            .collect();
        let mut vol = Volume::init(&back, &ks[0], &InitOptions::default()).unwrap();
        // Right after a second boundary: the three land in the same second.
        while now_micros() % 1_000_000 > 100_000 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut backups = Vec::new();
        for k in &ks[1..] {
            let r = rotate(&mut vol, k, &RotateRequest::default(), true).unwrap();
            backups.push((r.backup, r.old_kek));
        }
        let mut names: Vec<&String> = backups.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3, "{backups:?}");
        // Same second (the old one-second names would have collided).
        assert!(names.iter().all(|n| n[..27] == names[0][..27]), "{names:?}");
        for (name, old) in &backups {
            let b = header::read_file(&back.join(name)).unwrap();
            let h = header::VolumeHeader::decode(&b, &back.join(name)).unwrap();
            assert_eq!(&h.kek, old, "{name}");
        }
    }
}
