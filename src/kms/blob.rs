//! The wrapped-DEK blob shared by every provider, and AES-256-GCM with a KEK
//! held locally (key file, KMIP `get` mode, PKCS#11 `extract` mode):
//!
//! `0x01 ‖ IV (12) ‖ AES-256-GCM ciphertext ‖ tag (16)`
//!
//! Server-side (KMIP Encrypt) and in-token (PKCS#11 CKM_AES_GCM) wraps produce
//! the same bytes, so a volume wrapped one way unwraps the other way.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use super::KmsError;
use crate::crypto::keys::Secret;

pub const VERSION: u8 = 1;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Why a blob did not open.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Too short or an unknown format byte.
    Malformed,
    /// The GCM tag does not verify: wrong KEK, wrong AAD or tampered blob.
    Auth,
}

/// A fresh 12-byte IV from the OS CSPRNG.
pub fn fresh_iv() -> Result<[u8; IV_LEN], KmsError> {
    let mut iv = [0u8; IV_LEN];
    getrandom::fill(&mut iv)
        .map_err(|e| KmsError::Config(format!("operating system random generator failed: {e}")))?;
    Ok(iv)
}

/// `VERSION ‖ iv ‖ ciphertext-and-tag`.
pub fn encode(iv: &[u8], ct_and_tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + iv.len() + ct_and_tag.len());
    out.push(VERSION);
    out.extend_from_slice(iv);
    out.extend_from_slice(ct_and_tag);
    out
}

/// Splits a blob into (IV, ciphertext-and-tag); `None` if it is malformed.
pub fn parse(wrapped: &[u8]) -> Option<(&[u8], &[u8])> {
    if wrapped.len() < 1 + IV_LEN + TAG_LEN || wrapped[0] != VERSION {
        return None;
    }
    Some(wrapped[1..].split_at(IV_LEN))
}

fn cipher(kek: &Secret) -> Result<Aes256Gcm, KmsError> {
    Aes256Gcm::new_from_slice(kek.as_bytes())
        .map_err(|_| KmsError::Protocol("the KEK is not an AES-256 key".into()))
}

/// Wraps `dek` under a locally held `kek` with the given IV.
pub fn seal(
    kek: &Secret,
    iv: &[u8; IV_LEN],
    dek: &Secret,
    aad: &[u8],
) -> Result<Vec<u8>, KmsError> {
    let ct = cipher(kek)?
        .encrypt(
            &Nonce::from(*iv),
            Payload {
                msg: dek.as_bytes(),
                aad,
            },
        )
        .map_err(|_| KmsError::Protocol("AES-GCM wrap failed".into()))?;
    Ok(encode(iv, &ct))
}

/// Reverses [`seal`].
pub fn open(
    kek: &Secret,
    wrapped: &[u8],
    aad: &[u8],
) -> Result<Result<Secret, OpenError>, KmsError> {
    let Some((iv, ct)) = parse(wrapped) else {
        return Ok(Err(OpenError::Malformed));
    };
    let nonce = Nonce::try_from(iv).map_err(|_| KmsError::Protocol("IV length".into()))?;
    Ok(cipher(kek)?
        .decrypt(&nonce, Payload { msg: ct, aad })
        .map(Secret::from_vec)
        .map_err(|_| OpenError::Auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_failures() {
        let kek = Secret::from_slice(&[1u8; 32]);
        let dek = Secret::from_slice(&[2u8; 32]);
        let iv = fresh_iv().unwrap();
        let b = seal(&kek, &iv, &dek, b"aad").unwrap();
        assert_eq!(b.len(), 1 + IV_LEN + 32 + TAG_LEN);
        assert!(open(&kek, &b, b"aad").unwrap().unwrap().ct_eq(&dek));
        assert_eq!(
            open(&kek, &b, b"other").unwrap().unwrap_err(),
            OpenError::Auth
        );
        let other = Secret::from_slice(&[3u8; 32]);
        assert_eq!(
            open(&other, &b, b"aad").unwrap().unwrap_err(),
            OpenError::Auth
        );
        assert_eq!(
            open(&kek, &b[..20], b"aad").unwrap().unwrap_err(),
            OpenError::Malformed
        );
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(
            open(&kek, &v2, b"aad").unwrap().unwrap_err(),
            OpenError::Malformed
        );
    }
}
