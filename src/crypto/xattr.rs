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
//!   name key, name))>` and its value is `2 ‖ nonce(12) ‖ AES-256-GCM(metadata
//!   key, nonce, len(name) ‖ name ‖ value, aad = "kmfs xattr v2" ‖ backing
//!   name ‖ owner id)`. The owner id (16 bytes) is the file id of a regular
//!   file, the directory id of a directory on an encrypted-names volume, and
//!   zero otherwise, so a value copied to another file's backing inode does
//!   not authenticate there. Attribute names are hidden too (listxattr
//!   decrypts the values), and a value cannot be moved to another attribute
//!   name undetected.
//! * Version 1 values (`1 ‖ nonce ‖ GCM(..., aad = "kmfs xattr v1" ‖ backing
//!   name)`, bound to the name only) are what volumes of format version ≤ 2
//!   hold; they are read only while the volume header says so
//!   (docs/FORMAT.md 8), and a rekey rewrites them as version 2.
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
const AAD_V1: &[u8] = b"kmfs xattr v1";
const AAD_V2: &[u8] = b"kmfs xattr v2";
/// Value blob bound to the attribute name only (format version ≤ 2).
const VERSION_1: u8 = 1;
/// Value blob bound to the attribute name and the owner id.
const VERSION_2: u8 = 2;
const NONCE_LEN: usize = 12;
/// Length of the owner id a version 2 value is bound to.
pub const OWNER_LEN: usize = 16;
/// The owner id of inodes that have none of their own (special files,
/// directories of plaintext-names volumes).
pub const NO_OWNER: [u8; OWNER_LEN] = [0; OWNER_LEN];

/// An opened value: the attribute name, its value, and whether it was in
/// the bound (version 2) form.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    pub bound: bool,
}

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

    /// Whether `name` is one kmfs stores (the errors of [`Self::map_name`]),
    /// without computing its backing name.
    pub fn check_name(name: &[u8]) -> Result<(), XattrError> {
        if name.is_empty() || name.len() > 255 || name.contains(&0) {
            return Err(XattrError::Invalid);
        }
        if name != ACL_ACCESS && name != ACL_DEFAULT && name.starts_with(b"system.") {
            return Err(XattrError::Unsupported);
        }
        Ok(())
    }

    /// Whether the backing attribute `backing` is one kmfs shows (an ACL, or
    /// one of its encrypted attributes).
    pub fn is_shown(backing: &[u8]) -> bool {
        backing == ACL_ACCESS || backing == ACL_DEFAULT || backing.starts_with(BACKING_PREFIX)
    }

    pub fn map_name(&self, name: &[u8]) -> Result<Mapped, XattrError> {
        Self::check_name(name)?;
        if name == ACL_ACCESS || name == ACL_DEFAULT {
            return Ok(Mapped::Clear(name.to_vec()));
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

    fn aad(backing: &[u8], owner: Option<&[u8; OWNER_LEN]>) -> Vec<u8> {
        let mut a = match owner {
            Some(_) => AAD_V2.to_vec(),
            None => AAD_V1.to_vec(),
        };
        a.extend_from_slice(backing);
        if let Some(o) = owner {
            a.extend_from_slice(o);
        }
        a
    }

    /// Encrypts `value` of attribute `name` (stored as `backing`) of the
    /// inode whose owner id is `owner` (version 2 blob).
    pub fn seal(
        &self,
        backing: &[u8],
        name: &[u8],
        value: &[u8],
        owner: &[u8; OWNER_LEN],
    ) -> std::io::Result<Vec<u8>> {
        self.seal_as(backing, name, value, Some(owner))
    }

    /// The version 1 blob (bound to the name only) that volumes of format
    /// version ≤ 2 hold. Only for tests and fixtures of old volumes: kmfs
    /// never writes it.
    #[doc(hidden)]
    pub fn seal_unbound(
        &self,
        backing: &[u8],
        name: &[u8],
        value: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        self.seal_as(backing, name, value, None)
    }

    fn seal_as(
        &self,
        backing: &[u8],
        name: &[u8],
        value: &[u8],
        owner: Option<&[u8; OWNER_LEN]>,
    ) -> std::io::Result<Vec<u8>> {
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
                    aad: &Self::aad(backing, owner),
                },
            )
            .map_err(|_| std::io::Error::other("AES-GCM encryption failed"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(if owner.is_some() {
            VERSION_2
        } else {
            VERSION_1
        });
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a stored value of the inode whose owner id is `owner`
    /// (`None`: a regular file without a header, which no bound value can
    /// belong to). A version 1 (unbound) blob is accepted only with
    /// `unbound_ok` (a volume not yet migrated to format version 3).
    /// `None` if it does not authenticate.
    pub fn open(
        &self,
        backing: &[u8],
        blob: &[u8],
        owner: Option<&[u8; OWNER_LEN]>,
        unbound_ok: bool,
    ) -> Option<Opened> {
        if blob.len() < 1 + NONCE_LEN + 16 {
            return None;
        }
        let bound = match blob[0] {
            VERSION_2 => true,
            VERSION_1 if unbound_ok => false,
            _ => return None,
        };
        let owner = if bound { Some(owner?) } else { None };
        let nonce: [u8; NONCE_LEN] = blob[1..1 + NONCE_LEN].try_into().ok()?;
        let pt = self
            .cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &blob[1 + NONCE_LEN..],
                    aad: &Self::aad(backing, owner),
                },
            )
            .ok()?;
        let n = *pt.first()? as usize;
        if pt.len() < 1 + n {
            return None;
        }
        Some(Opened {
            name: pt[1..1 + n].to_vec(),
            value: pt[1 + n..].to_vec(),
            bound,
        })
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

    fn opened(name: &[u8], value: &[u8], bound: bool) -> Option<Opened> {
        Some(Opened {
            name: name.to_vec(),
            value: value.to_vec(),
            bound,
        })
    }

    #[test]
    fn values_roundtrip_and_are_bound_to_the_name_and_owner() {
        let c = c();
        let Mapped::Encrypted(b) = c.map_name(b"user.x").unwrap() else {
            panic!()
        };
        let (o1, o2) = ([1u8; 16], [2u8; 16]);
        let blob = c.seal(&b, b"user.x", b"secret value", &o1).unwrap();
        assert_eq!(blob[0], 2);
        assert!(!blob.windows(6).any(|w| w == b"secret"));
        for unbound_ok in [false, true] {
            assert_eq!(
                c.open(&b, &blob, Some(&o1), unbound_ok),
                opened(b"user.x", b"secret value", true)
            );
            // Another owner (the value copied to another file), no owner,
            // another attribute name: none authenticates.
            assert_eq!(c.open(&b, &blob, Some(&o2), unbound_ok), None);
            assert_eq!(c.open(&b, &blob, Some(&NO_OWNER), unbound_ok), None);
            assert_eq!(c.open(&b, &blob, None, unbound_ok), None);
            assert_eq!(
                c.open(b"user.kmfs.other", &blob, Some(&o1), unbound_ok),
                None
            );
        }
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(c.open(&b, &bad, Some(&o1), true), None);
        // The version byte is authenticated through the AAD prefix: a
        // bound blob relabelled as version 1 does not open either.
        let mut relabel = blob.clone();
        relabel[0] = 1;
        assert_eq!(c.open(&b, &relabel, Some(&o1), true), None);
        for junk in [&b""[..], b"\x01", b"\x02", &[1u8; 28][..], &[2u8; 28][..]] {
            assert_eq!(c.open(&b, junk, Some(&o1), true), None);
        }
        let empty = c.seal(&b, b"user.x", b"", &o1).unwrap();
        assert_eq!(
            c.open(&b, &empty, Some(&o1), false),
            opened(b"user.x", b"", true)
        );
    }

    /// Version 1 values (volumes of format version ≤ 2) open only while the
    /// volume accepts them, whatever the owner; they stay bound to the name.
    #[test]
    fn unbound_values_open_only_while_accepted() {
        let c = c();
        let Mapped::Encrypted(b) = c.map_name(b"security.capability").unwrap() else {
            panic!()
        };
        let blob = c.seal_unbound(&b, b"security.capability", b"cap").unwrap();
        assert_eq!(blob[0], 1);
        let want = opened(b"security.capability", b"cap", false);
        assert_eq!(c.open(&b, &blob, Some(&[7u8; 16]), true), want);
        assert_eq!(c.open(&b, &blob, None, true), want);
        assert_eq!(c.open(&b, &blob, Some(&[7u8; 16]), false), None);
        assert_eq!(c.open(b"user.kmfs.other", &blob, None, true), None);
    }

    /// Pins the version 2 layout: a value sealed here by hand (AES-256-GCM
    /// with the documented AAD) opens through the cipher, and one sealed by
    /// the cipher opens by hand.
    #[test]
    fn version_2_layout_matches_the_format_document() {
        let key = Secret::from_slice(&[5u8; 32]);
        let c = XattrCipher::new(&key);
        let Mapped::Encrypted(b) = c.map_name(b"user.k").unwrap() else {
            panic!()
        };
        let owner = [9u8; 16];
        let mut aad = b"kmfs xattr v2".to_vec();
        aad.extend_from_slice(&b);
        aad.extend_from_slice(&owner);
        let gcm = Aes256Gcm::new_from_slice(&[5u8; 32]).unwrap();
        let nonce = [3u8; 12];
        let mut msg = vec![6u8];
        msg.extend_from_slice(b"user.kvalue");
        let ct = gcm
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &msg,
                    aad: &aad,
                },
            )
            .unwrap();
        let mut blob = vec![2u8];
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        assert_eq!(
            c.open(&b, &blob, Some(&owner), false),
            opened(b"user.k", b"value", true)
        );
        let mine = c.seal(&b, b"user.k", b"value", &owner).unwrap();
        let pt = gcm
            .decrypt(
                &Nonce::from(<[u8; 12]>::try_from(&mine[1..13]).unwrap()),
                Payload {
                    msg: &mine[13..],
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(pt, msg);
    }
}
