//! File-name and symlink-target encryption.
//!
//! A name is encrypted with AES-SIV (RFC 5297, 512-bit key derived from the DEK)
//! with the parent directory's 16-byte random id as associated data, so the same
//! name in two directories encrypts differently and a name moved to another
//! directory no longer authenticates. SIV is deterministic: lookups encrypt the
//! requested name and open the backing entry directly.
//!
//! Encoding: `base64url(tag ‖ ciphertext)` without padding (alphabet `A–Z a–z 0–9
//! - _`: no `/`, no NUL, never a leading `.`). Plaintext names of up to 175 bytes
//! encode to at most 255 characters. Longer names (up to 255 bytes) are stored as
//! `kmfs.long.<base64url(SHA-256(encoded))>` (53 characters) with the full encoded
//! name in a sidecar file `kmfs.long.<hash>.name` in the same directory.
//!
//! Backing names starting with `kmfs.` are reserved for kmfs's own files; an
//! encoded name never starts that way.
//!
//! A symlink target is AES-SIV encrypted with the associated data
//! `["kmfs v2 symlink target", dir id, plaintext name]`: bound to the
//! directory and name of the link, so a backing symlink moved or swapped
//! with another does not decrypt. (Volumes of format version ≤ 2 hold
//! targets with the single AD item `"kmfs v1 symlink target"`, read until
//! a rekey migrates them.)

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::keys::{Secret, derive, labels};

/// Length of a directory id.
pub const DIR_ID_LEN: usize = 16;
/// The longest backing name we produce (the common limit of Linux filesystems).
pub const NAME_MAX: usize = 255;
/// Plaintext names longer than this use the long-name scheme.
pub const SHORT_NAME_MAX: usize = 175;
/// Prefix of every backing name that is kmfs's own.
pub const RESERVED_PREFIX: &str = "kmfs.";
/// Prefix of hashed long names.
pub const LONG_PREFIX: &str = "kmfs.long.";
/// Suffix of the sidecar file holding a long name's full encoding.
pub const LONG_SUFFIX: &str = ".name";
/// Longest symlink target accepted (its encoding must fit in PATH_MAX).
pub const SYMLINK_MAX: usize = 3000;

/// Associated data of symlink targets of format version ≤ 2 (not bound to
/// their place; read only until a volume is migrated).
const SYMLINK_AD_V1: &[u8] = b"kmfs v1 symlink target";
/// First associated-data item of a bound symlink target; the directory id
/// and the plaintext name of the link follow.
const SYMLINK_AD_V2: &[u8] = b"kmfs v2 symlink target";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("file name is empty, `.`/`..`, or contains `/` or NUL")]
    Invalid,
    #[error("file name is longer than 255 bytes")]
    TooLong,
    #[error("encrypted name does not decode or authenticate (corrupt or foreign entry)")]
    Corrupt,
}

/// A name as stored in the backing directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodedName {
    /// The encoded name itself is the backing name.
    Short(String),
    /// `backing` is the hashed name; `full` goes into the sidecar file.
    Long { backing: String, full: String },
}

impl EncodedName {
    /// The name of the backing directory entry.
    pub fn backing(&self) -> &str {
        match self {
            EncodedName::Short(s) => s,
            EncodedName::Long { backing, .. } => backing,
        }
    }
}

pub struct NameCipher {
    key: Secret,
}

/// Checks a plaintext name coming from the kernel.
pub fn validate(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(NameError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    Ok(())
}

/// Whether a backing name has the prefix kmfs keeps for itself (which
/// file it is: `volume::backing::BackingKind::classify`).
pub fn is_reserved(backing_name: &[u8]) -> bool {
    backing_name.starts_with(RESERVED_PREFIX.as_bytes())
}

/// The sidecar file name for a hashed long name.
pub fn long_sidecar(backing: &str) -> String {
    format!("{backing}{LONG_SUFFIX}")
}

/// The hashed backing name for a full encoded name.
pub fn long_backing(full: &str) -> String {
    format!(
        "{LONG_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(Sha256::digest(full.as_bytes()))
    )
}

/// Whether a backing name is a hashed long name (not its sidecar).
pub fn is_long(backing_name: &[u8]) -> bool {
    backing_name.starts_with(LONG_PREFIX.as_bytes())
        && !backing_name.ends_with(LONG_SUFFIX.as_bytes())
}

impl NameCipher {
    pub fn new(dek: &Secret, volume_id: &[u8; 16]) -> NameCipher {
        NameCipher::from_key(derive(dek, volume_id, labels::NAMES_SIV, 64))
    }

    /// A cipher with the 64-byte AES-SIV key `key` (from the metadata key set).
    pub fn from_key(key: Secret) -> NameCipher {
        assert_eq!(key.len(), 64, "AES-256-SIV takes a 64-byte key");
        NameCipher { key }
    }

    fn siv(&self) -> Aes256Siv {
        Aes256Siv::new_from_slice(self.key.as_bytes()).expect("derived SIV key is 64 bytes")
    }

    /// Encrypts `name` for the directory `dir_id`.
    pub fn encrypt(
        &self,
        dir_id: &[u8; DIR_ID_LEN],
        name: &[u8],
    ) -> Result<EncodedName, NameError> {
        validate(name)?;
        let ct = self
            .siv()
            .encrypt([dir_id.as_slice()], name)
            .map_err(|_| NameError::Invalid)?;
        let full = URL_SAFE_NO_PAD.encode(ct);
        if full.len() <= NAME_MAX {
            Ok(EncodedName::Short(full))
        } else {
            Ok(EncodedName::Long {
                backing: long_backing(&full),
                full,
            })
        }
    }

    /// Decrypts an encoded name (the short backing name, or a long name's sidecar
    /// content) found in directory `dir_id`.
    pub fn decrypt(&self, dir_id: &[u8; DIR_ID_LEN], encoded: &str) -> Result<Vec<u8>, NameError> {
        let ct = URL_SAFE_NO_PAD
            .decode(encoded.trim_end())
            .map_err(|_| NameError::Corrupt)?;
        let name = self
            .siv()
            .decrypt([dir_id.as_slice()], &ct)
            .map_err(|_| NameError::Corrupt)?;
        validate(&name).map_err(|_| NameError::Corrupt)?;
        Ok(name)
    }

    /// Encrypts a symlink target into a string for the backing symlink
    /// named `name` (plaintext) in the directory `dir_id` (zeros on a
    /// plaintext-names volume).
    pub fn encrypt_symlink(
        &self,
        dir_id: &[u8; DIR_ID_LEN],
        name: &[u8],
        target: &[u8],
    ) -> Result<String, NameError> {
        check_target(target)?;
        let ct = self
            .siv()
            .encrypt([SYMLINK_AD_V2, dir_id.as_slice(), name], target)
            .map_err(|_| NameError::Invalid)?;
        Ok(URL_SAFE_NO_PAD.encode(ct))
    }

    /// Decrypts the target of the backing symlink named `name` in directory
    /// `dir_id`.
    pub fn decrypt_symlink(
        &self,
        dir_id: &[u8; DIR_ID_LEN],
        name: &[u8],
        encoded: &[u8],
    ) -> Result<Vec<u8>, NameError> {
        let ct = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| NameError::Corrupt)?;
        self.siv()
            .decrypt([SYMLINK_AD_V2, dir_id.as_slice(), name], &ct)
            .map_err(|_| NameError::Corrupt)
    }

    /// The unbound target encoding of format version ≤ 2. Only for tests and
    /// fixtures of old volumes: kmfs never writes it.
    #[doc(hidden)]
    pub fn encrypt_symlink_unbound(&self, target: &[u8]) -> Result<String, NameError> {
        check_target(target)?;
        let ct = self
            .siv()
            .encrypt([SYMLINK_AD_V1], target)
            .map_err(|_| NameError::Invalid)?;
        Ok(URL_SAFE_NO_PAD.encode(ct))
    }

    /// Decrypts an unbound target (format version ≤ 2).
    pub fn decrypt_symlink_unbound(&self, encoded: &[u8]) -> Result<Vec<u8>, NameError> {
        let ct = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| NameError::Corrupt)?;
        self.siv()
            .decrypt([SYMLINK_AD_V1], &ct)
            .map_err(|_| NameError::Corrupt)
    }
}

fn check_target(target: &[u8]) -> Result<(), NameError> {
    if target.is_empty() || target.contains(&0) {
        return Err(NameError::Invalid);
    }
    if target.len() > SYMLINK_MAX {
        return Err(NameError::TooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> NameCipher {
        NameCipher::new(&Secret::from_slice(&[8u8; 32]), &[1u8; 16])
    }

    /// RFC 5297 A.1 known-answer test through the same crate and key layout we
    /// use (CMAC key ‖ CTR key), to pin the name cipher's primitive.
    #[test]
    fn aes_siv_rfc5297_a1() {
        use aes_siv::siv::Aes128Siv;
        let key: Vec<u8> = hex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
        let ad = hex("101112131415161718191a1b1c1d1e1f2021222324252627");
        let pt = hex("112233445566778899aabbccddee");
        let mut siv = Aes128Siv::new_from_slice(&key).unwrap();
        let ct = siv.encrypt([ad.as_slice()], &pt).unwrap();
        assert_eq!(
            ct,
            hex("85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c")
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn roundtrip_deterministic_and_bound_to_directory() {
        let c = cipher();
        let a = c.encrypt(&[1; 16], b"report.pdf").unwrap();
        assert_eq!(a, c.encrypt(&[1; 16], b"report.pdf").unwrap());
        let b = c.encrypt(&[2; 16], b"report.pdf").unwrap();
        assert_ne!(a, b);
        assert_eq!(c.decrypt(&[1; 16], a.backing()).unwrap(), b"report.pdf");
        assert_eq!(c.decrypt(&[2; 16], a.backing()), Err(NameError::Corrupt));
    }

    #[test]
    fn encoding_is_safe_for_backing_filesystems() {
        let c = cipher();
        for len in 1..=255usize {
            let name: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let enc = c.encrypt(&[3; 16], &name).unwrap();
            let b = enc.backing();
            assert!(b.len() <= NAME_MAX, "len {len}");
            assert!(!b.contains('/') && !b.contains('\0'));
            assert_eq!(
                len <= SHORT_NAME_MAX,
                matches!(enc, EncodedName::Short(_)),
                "len {len}"
            );
            match &enc {
                EncodedName::Short(s) => {
                    assert!(!is_reserved(s.as_bytes()));
                    assert_eq!(c.decrypt(&[3; 16], s).unwrap(), name);
                }
                EncodedName::Long { backing, full } => {
                    assert!(is_long(backing.as_bytes()));
                    assert!(long_sidecar(backing).len() <= NAME_MAX);
                    assert_eq!(&long_backing(full), backing);
                    assert_eq!(c.decrypt(&[3; 16], full).unwrap(), name);
                }
            }
        }
    }

    #[test]
    fn invalid_names_are_refused() {
        let c = cipher();
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(c.encrypt(&[0; 16], bad), Err(NameError::Invalid));
        }
        assert_eq!(c.encrypt(&[0; 16], &[b'x'; 256]), Err(NameError::TooLong));
    }

    #[test]
    fn tampered_or_garbage_names_are_corrupt_not_panics() {
        let c = cipher();
        let enc = c.encrypt(&[1; 16], b"hello").unwrap();
        let mut s = enc.backing().to_string().into_bytes();
        s[3] = if s[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            c.decrypt(&[1; 16], std::str::from_utf8(&s).unwrap()),
            Err(NameError::Corrupt)
        );
        for g in [
            "",
            "A",
            "!!!",
            "kmfs.volume",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(c.decrypt(&[1; 16], g), Err(NameError::Corrupt));
        }
    }

    #[test]
    fn symlink_targets_roundtrip_and_are_bound_to_directory_and_name() {
        let c = cipher();
        let (d1, d2) = ([1u8; 16], [2u8; 16]);
        let e = c
            .encrypt_symlink(&d1, b"link", b"../some/where else")
            .unwrap();
        assert!(!e.contains('/'));
        assert_eq!(
            c.decrypt_symlink(&d1, b"link", e.as_bytes()).unwrap(),
            b"../some/where else"
        );
        // Moved to another directory, renamed, or read as an old target.
        assert_eq!(
            c.decrypt_symlink(&d2, b"link", e.as_bytes()),
            Err(NameError::Corrupt)
        );
        assert_eq!(
            c.decrypt_symlink(&d1, b"other", e.as_bytes()),
            Err(NameError::Corrupt)
        );
        assert_eq!(
            c.decrypt_symlink_unbound(e.as_bytes()),
            Err(NameError::Corrupt)
        );
        // Same target, other places: other encodings.
        assert_ne!(
            c.encrypt_symlink(&d2, b"link", b"../some/where else")
                .unwrap(),
            e
        );
        assert_eq!(
            c.decrypt_symlink(&d1, b"link", b"zz"),
            Err(NameError::Corrupt)
        );
        assert_eq!(
            c.encrypt_symlink(&d1, b"link", &[b'a'; SYMLINK_MAX + 1]),
            Err(NameError::TooLong)
        );
        assert_eq!(
            c.encrypt_symlink(&d1, b"link", b""),
            Err(NameError::Invalid)
        );
    }

    /// Unbound targets (format version ≤ 2) still decrypt as such, and never
    /// as bound ones.
    #[test]
    fn unbound_symlink_targets_of_old_volumes() {
        let c = cipher();
        let e = c.encrypt_symlink_unbound(b"/etc/passwd").unwrap();
        assert_eq!(
            c.decrypt_symlink_unbound(e.as_bytes()).unwrap(),
            b"/etc/passwd"
        );
        assert_eq!(
            c.decrypt_symlink(&[0u8; 16], b"", e.as_bytes()),
            Err(NameError::Corrupt)
        );
    }

    /// Pins the bound target format: AES-SIV (RFC 5297) over the target
    /// with the AD vector [label, dir id, name], base64url without padding.
    #[test]
    fn bound_symlink_target_layout_matches_the_format_document() {
        let key = [7u8; 64];
        let c = NameCipher::from_key(Secret::from_slice(&key));
        let mut siv = Aes256Siv::new_from_slice(&key).unwrap();
        let ct = siv
            .encrypt(
                [&b"kmfs v2 symlink target"[..], &[4u8; 16][..], &b"ln"[..]],
                b"t",
            )
            .unwrap();
        assert_eq!(
            c.encrypt_symlink(&[4u8; 16], b"ln", b"t").unwrap(),
            URL_SAFE_NO_PAD.encode(ct)
        );
    }
}
