//! Key providers: where the key-encryption key (KEK) lives.
//!
//! The volume's data encryption key (DEK) is stored in the volume header only in
//! wrapped form. A [`KeyProvider`] wraps and unwraps it with a KEK that stays on a
//! key manager (KMIP), in an HSM (PKCS#11) or, for development, in a key file.
//! Nothing outside this module knows which provider is in use: the volume and
//! filesystem code see only this trait, like rustls's `CryptoProvider`.

pub mod blob;
pub mod keyfile;
pub mod kmip;
pub mod pkcs11;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::keys::Secret;

/// Identifies one KEK: which provider holds it, by which name/UID, which version.
/// Stored in the volume header and in its rotation history. Never secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekRef {
    /// Provider kind: `keyfile`, `kmip` or `pkcs11`.
    pub provider: String,
    /// Human name of the key (KMIP Name attribute, PKCS#11 label, key file path).
    pub name: String,
    /// Unique identifier on the key manager (KMIP UID, PKCS#11 CKA_ID in hex);
    /// empty when the provider has none.
    pub uid: String,
    /// Key version (1 for the first KEK; rotation creates higher versions).
    pub version: u32,
}

impl fmt::Display for KekRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "provider={} key={} uid={} version={}",
            self.provider,
            self.name,
            if self.uid.is_empty() { "-" } else { &self.uid },
            self.version
        )
    }
}

/// Failures of a key provider. Messages name the server, key or file concerned and
/// never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// No key server could be reached (after failover); the text lists each one.
    #[error("key manager unreachable: {0}")]
    Unreachable(String),
    /// The provider answered but refused us (certificate, credentials, permission).
    #[error("key manager refused access: {0}")]
    AccessDenied(String),
    /// The named KEK does not exist or is not usable (e.g. revoked).
    #[error("key not found or not usable: {0}")]
    KeyNotFound(String),
    /// Unwrapping failed authentication: wrong KEK or tampered wrapped key.
    #[error("cannot unwrap the volume key with {0}: wrong key-encryption key or tampered header")]
    WrongKey(String),
    /// A malformed or unexpected answer from the key manager.
    #[error("key manager protocol error: {0}")]
    Protocol(String),
    /// A wrap did not unwrap to the key that was wrapped.
    #[error("the key manager unwrapped a different key than it wrapped")]
    VerifyMismatch,
    /// The provider's configuration or a credential file is unusable.
    #[error("{0}")]
    Config(String),
    /// The requested operation is not offered by this provider.
    #[error("operation not supported by the {provider} provider: {op}")]
    Unsupported {
        provider: &'static str,
        op: &'static str,
    },
}

/// A source of KEKs. Implementations must be safe to share between threads.
pub trait KeyProvider: Send + Sync {
    /// Provider kind as stored in the header: `keyfile`, `kmip`, `pkcs11`.
    fn kind(&self) -> &'static str;

    /// A short description for logs and `status` (server names, token label...).
    fn describe(&self) -> String;

    /// The KEK this provider is configured to use for new wraps, resolved on the
    /// key manager if needed (e.g. Locate by name → UID and version).
    fn current_kek(&self) -> Result<KekRef, KmsError>;

    /// Wraps `dek` with the KEK `kek`. `aad` is bound to the wrap (volume id and
    /// format tag) so a wrapped key cannot be moved to another volume. Returns an
    /// opaque blob that only [`KeyProvider::unwrap`] understands.
    fn wrap(&self, kek: &KekRef, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError>;

    /// Reverses [`KeyProvider::wrap`]; fails with [`KmsError::WrongKey`] if the
    /// blob does not authenticate under `kek` and `aad`.
    fn unwrap(&self, kek: &KekRef, wrapped: &[u8], aad: &[u8]) -> Result<Secret, KmsError>;

    /// `len` random bytes from the key manager's or HSM's generator. Callers mix
    /// them with the OS CSPRNG (see [`generate_dek`]).
    fn random(&self, len: usize) -> Result<Secret, KmsError>;

    /// Creates (and activates) a new KEK for rotation: a new version of the
    /// current key, or the key named `name`. Returns its reference.
    fn create_kek(&self, name: Option<&str>) -> Result<KekRef, KmsError>;

    /// Revokes a retired KEK on the key manager. Only on explicit request.
    fn revoke(&self, kek: &KekRef) -> Result<(), KmsError> {
        let _ = kek;
        Err(KmsError::Unsupported {
            provider: self.kind(),
            op: "revoke",
        })
    }
}

/// A fresh DEK: the provider's random bytes XORed with the OS CSPRNG's, so the
/// key is unpredictable as long as either source is good.
pub fn generate_dek(provider: &dyn KeyProvider) -> Result<Secret, KmsError> {
    let len = crate::crypto::keys::DEK_LEN;
    let mut dek = Secret::random(len)
        .map_err(|e| KmsError::Config(format!("operating system random generator failed: {e}")))?;
    let theirs = provider.random(len)?;
    if theirs.len() != len {
        return Err(KmsError::Protocol(format!(
            "random generator returned {} bytes, expected {len}",
            theirs.len()
        )));
    }
    dek.xor_with(theirs.as_bytes());
    Ok(dek)
}
