//! The `keyfile` provider: the KEK is 32 raw bytes in a local file.
//!
//! For development and tests only. It warns on every use, refuses a key file that
//! is readable by group/others or lies inside the backing directory (where it
//! would sit beside the data it protects), and wraps with AES-256-GCM.
//!
//! Wrapped blob: the shared format of [`super::blob`], sealed locally.

use std::path::{Path, PathBuf};

use super::{KekRef, KeyProvider, KmsError, blob};
use crate::credfile;
use crate::crypto::keys::Secret;

/// The KEK length in a key file.
pub const KEY_LEN: usize = 32;

pub struct KeyfileProvider {
    path: PathBuf,
    kek: Secret,
}

fn warn(path: &Path) {
    let msg = format!(
        "WARNING: using the development keyfile provider ({}): the key-encryption key sits on this machine; use kmip or pkcs11 in production",
        path.display()
    );
    static PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // The logger shows warnings on a terminal itself when it has no syslog.
    if !crate::logging::warnings_reach_stderr()
        && !PRINTED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        eprintln!("kmfs: {msg}");
    }
    log::warn!(
        "{}",
        crate::logging::kv(&[
            ("op", "keyfile_warning"),
            ("key", &path.display().to_string()),
            (
                "msg",
                "development key file: the key-encryption key sits on this machine; use kmip or pkcs11 in production"
            ),
        ])
    );
}

impl KeyfileProvider {
    /// Opens the key file at `path` after checking its permissions and that it is
    /// not inside `backing_dir`.
    pub fn open(path: &Path, backing_dir: Option<&Path>) -> Result<KeyfileProvider, KmsError> {
        credfile::check_private(path, "key file").map_err(|e| KmsError::Config(e.to_string()))?;
        let canon = std::fs::canonicalize(path).map_err(|e| {
            KmsError::Config(format!("cannot resolve key file {}: {e}", path.display()))
        })?;
        if let Some(b) = backing_dir
            && let Ok(bc) = std::fs::canonicalize(b)
            && canon.starts_with(&bc)
        {
            return Err(KmsError::Config(format!(
                "key file {} lies inside the backing directory {}; keep keys away from the data they protect",
                path.display(),
                b.display()
            )));
        }
        let bytes = std::fs::read(&canon).map_err(|e| {
            KmsError::Config(format!("cannot read key file {}: {e}", path.display()))
        })?;
        let kek = Secret::from_vec(bytes);
        if kek.len() != KEY_LEN {
            return Err(KmsError::Config(format!(
                "key file {} holds {} bytes; it must hold exactly {KEY_LEN} raw random bytes (e.g. head -c 32 /dev/urandom > FILE)",
                path.display(),
                kek.len()
            )));
        }
        warn(path);
        Ok(KeyfileProvider { path: canon, kek })
    }

    fn check_ref(&self, kek: &KekRef) -> Result<(), KmsError> {
        if kek.provider != "keyfile" {
            return Err(KmsError::Config(format!(
                "the volume's key is held by the {} provider ({kek}), but a key file was given",
                kek.provider
            )));
        }
        Ok(())
    }
}

impl KeyProvider for KeyfileProvider {
    fn kind(&self) -> &'static str {
        "keyfile"
    }

    fn describe(&self) -> String {
        format!("keyfile {}", self.path.display())
    }

    fn current_kek(&self) -> Result<KekRef, KmsError> {
        Ok(KekRef {
            provider: "keyfile".into(),
            name: self.path.display().to_string(),
            uid: String::new(),
            version: 1,
        })
    }

    fn wrap(&self, kek: &KekRef, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        self.check_ref(kek)?;
        warn(&self.path);
        blob::seal(&self.kek, &blob::fresh_iv()?, dek, aad)
    }

    fn unwrap(&self, kek: &KekRef, wrapped: &[u8], aad: &[u8]) -> Result<Secret, KmsError> {
        self.check_ref(kek)?;
        warn(&self.path);
        blob::open(&self.kek, wrapped, aad)?
            .map_err(|_| KmsError::WrongKey(format!("key file {}", self.path.display())))
    }

    fn random(&self, len: usize) -> Result<Secret, KmsError> {
        Secret::random(len).map_err(|e| KmsError::Config(format!("random generator failed: {e}")))
    }

    fn create_kek(&self, _name: Option<&str>) -> Result<KekRef, KmsError> {
        Err(KmsError::Unsupported {
            provider: "keyfile",
            op: "create a new KEK (write a new key file and pass it instead)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn write_key(dir: &Path, byte: u8) -> PathBuf {
        let p = dir.join(format!("kek{byte}"));
        std::fs::write(&p, [byte; KEY_LEN]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn wrap_unwrap_roundtrip_and_aad_binding() {
        let d = tempfile::tempdir().unwrap();
        let p = KeyfileProvider::open(&write_key(d.path(), 1), None).unwrap();
        let kek = p.current_kek().unwrap();
        let dek = Secret::from_slice(&[9u8; 32]);
        let blob = p.wrap(&kek, &dek, b"vol-a").unwrap();
        assert!(!blob.windows(32).any(|w| w == [9u8; 32]));
        assert!(p.unwrap(&kek, &blob, b"vol-a").unwrap().ct_eq(&dek));
        assert!(matches!(
            p.unwrap(&kek, &blob, b"vol-b"),
            Err(KmsError::WrongKey(_))
        ));
    }

    #[test]
    fn wrong_key_is_reported_as_wrong_key() {
        let d = tempfile::tempdir().unwrap();
        let a = KeyfileProvider::open(&write_key(d.path(), 1), None).unwrap();
        let b = KeyfileProvider::open(&write_key(d.path(), 2), None).unwrap();
        let dek = Secret::from_slice(&[5u8; 32]);
        let blob = a.wrap(&a.current_kek().unwrap(), &dek, b"v").unwrap();
        let e = b
            .unwrap(&b.current_kek().unwrap(), &blob, b"v")
            .unwrap_err();
        assert!(matches!(e, KmsError::WrongKey(_)), "{e}");
        let mut tampered = blob.clone();
        tampered[20] ^= 1;
        assert!(matches!(
            a.unwrap(&a.current_kek().unwrap(), &tampered, b"v"),
            Err(KmsError::WrongKey(_))
        ));
        assert!(matches!(
            a.unwrap(&a.current_kek().unwrap(), &blob[..10], b"v"),
            Err(KmsError::WrongKey(_))
        ));
    }

    #[test]
    fn refuses_loose_permissions_wrong_length_and_key_inside_backing_dir() {
        let d = tempfile::tempdir().unwrap();
        let p = write_key(d.path(), 3);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyfileProvider::open(&p, None).err().unwrap().to_string();
        assert!(e.contains("0644") && e.contains("key file"), "{e}");

        let short = d.path().join("short");
        std::fs::write(&short, [1u8; 16]).unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = KeyfileProvider::open(&short, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("16 bytes"), "{e}");

        let inside = write_key(d.path(), 4);
        let e = KeyfileProvider::open(&inside, Some(d.path()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("inside the backing directory"), "{e}");
    }
}
