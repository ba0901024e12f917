//! Extended attributes.
//!
//! * `system.posix_acl_access` and `system.posix_acl_default` pass through to
//!   the backing inode **in clear**. ACLs are permission metadata, not content
//!   (like mode bits and owners, which the backing filesystem also sees), and
//!   passing them through lets the backing filesystem keep the mode in step
//!   with the ACL and apply default ACLs when kmfs creates entries, so
//!   `rsync -A`, `tar --acls`, `setfacl` and inheritance behave as on ext4.
//!   The kernel enforces them (FUSE_POSIX_ACL with default_permissions).
//! * Every other name (`user.*`, `trusted.*`, `security.*`) is stored
//!   encrypted: the backing attribute is `user.kmfs.<base64url(HMAC-SHA256(
//!   name key, name))>` and its value is `1 ‖ nonce(12) ‖ AES-256-GCM(metadata
//!   key, nonce, len(name) ‖ name ‖ value, aad = "kmfs xattr v1" ‖ backing
//!   name)`. Attribute names are hidden too (listxattr decrypts the values), and
//!   a value cannot be moved to another attribute name undetected.
//! * Other `system.*` names are not supported (EOPNOTSUPP); backing attributes
//!   not written by kmfs are not shown.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;
use sha2::Sha256;

use crate::crypto::keys::{Secret, derive};

pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
pub const BACKING_PREFIX: &[u8] = b"user.kmfs.";
const AAD_PREFIX: &[u8] = b"kmfs xattr v1";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// How a user-visible attribute name is stored.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    /// Stored under the same name, value in clear (POSIX ACLs).
    Clear(Vec<u8>),
    /// Stored encrypted under this backing name.
    Encrypted(Vec<u8>),
}

pub struct XattrCipher {
    value_key: Secret,
    name_key: Secret,
}

#[derive(Debug, PartialEq, Eq)]
pub enum XattrError {
    /// A namespace kmfs does not store (EOPNOTSUPP).
    Unsupported,
    /// Empty or over-long name (EINVAL / ERANGE).
    Invalid,
}

impl XattrCipher {
    pub fn new(metadata: &Secret) -> XattrCipher {
        XattrCipher {
            value_key: Secret::from_slice(metadata.as_bytes()),
            name_key: derive(metadata, b"kmfs xattr", b"xattr name hmac v1", 32),
        }
    }

    pub fn map_name(&self, name: &[u8]) -> Result<Mapped, XattrError> {
        if name.is_empty() || name.len() > 255 || name.contains(&0) {
            return Err(XattrError::Invalid);
        }
        if name == ACL_ACCESS || name == ACL_DEFAULT {
            return Ok(Mapped::Clear(name.to_vec()));
        }
        if name.starts_with(b"system.") {
            return Err(XattrError::Unsupported);
        }
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(self.name_key.as_bytes())
            .expect("HMAC takes any key length");
        m.update(name);
        let tag = m.finalize().into_bytes();
        let mut b = BACKING_PREFIX.to_vec();
        b.extend_from_slice(URL_SAFE_NO_PAD.encode(&tag[..24]).as_bytes());
        Ok(Mapped::Encrypted(b))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(self.value_key.as_bytes()).expect("metadata key is 32 bytes")
    }

    fn aad(backing: &[u8]) -> Vec<u8> {
        let mut a = AAD_PREFIX.to_vec();
        a.extend_from_slice(backing);
        a
    }

    pub fn seal(&self, backing: &[u8], name: &[u8], value: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let mut msg = Vec::with_capacity(1 + name.len() + value.len());
        msg.push(name.len() as u8);
        msg.extend_from_slice(name);
        msg.extend_from_slice(value);
        let ct = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &msg,
                    aad: &Self::aad(backing),
                },
            )
            .map_err(|_| std::io::Error::other("AES-GCM encryption failed"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a stored value: `(name, value)`, or `None` if it does not
    /// authenticate.
    pub fn open(&self, backing: &[u8], blob: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        if blob.len() < 1 + NONCE_LEN + 16 || blob[0] != VERSION {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = blob[1..1 + NONCE_LEN].try_into().ok()?;
        let pt = self
            .cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &blob[1 + NONCE_LEN..],
                    aad: &Self::aad(backing),
                },
            )
            .ok()?;
        let n = *pt.first()? as usize;
        if pt.len() < 1 + n {
            return None;
        }
        Some((pt[1..1 + n].to_vec(), pt[1 + n..].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> XattrCipher {
        XattrCipher::new(&Secret::from_slice(&[5u8; 32]))
    }

    #[test]
    fn names_map_deterministically_and_acls_pass() {
        let c = c();
        let a = c.map_name(b"user.comment").unwrap();
        assert_eq!(a, c.map_name(b"user.comment").unwrap());
        assert_ne!(a, c.map_name(b"user.Comment").unwrap());
        let Mapped::Encrypted(b) = a else { panic!() };
        assert!(b.starts_with(BACKING_PREFIX));
        assert!(!String::from_utf8_lossy(&b).contains("comment"));
        assert_eq!(
            c.map_name(ACL_ACCESS).unwrap(),
            Mapped::Clear(ACL_ACCESS.to_vec())
        );
        assert_eq!(c.map_name(b"system.foo"), Err(XattrError::Unsupported));
        assert_eq!(c.map_name(b""), Err(XattrError::Invalid));
    }

    #[test]
    fn values_roundtrip_and_are_bound_to_the_name() {
        let c = c();
        let Mapped::Encrypted(b) = c.map_name(b"user.x").unwrap() else {
            panic!()
        };
        let blob = c.seal(&b, b"user.x", b"secret value").unwrap();
        assert!(!blob.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            c.open(&b, &blob),
            Some((b"user.x".to_vec(), b"secret value".to_vec()))
        );
        assert_eq!(c.open(b"user.kmfs.other", &blob), None);
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(c.open(&b, &bad), None);
        for junk in [&b""[..], b"\x01", &[1u8; 28][..]] {
            assert_eq!(c.open(&b, junk), None);
        }
        let empty = c.seal(&b, b"user.x", b"").unwrap();
        assert_eq!(c.open(&b, &empty), Some((b"user.x".to_vec(), vec![])));
    }
}
