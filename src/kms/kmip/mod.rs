//! The `kmip` key provider: the KEK lives on a KMIP 1.4 key manager reached over
//! mutual TLS, with failover across several key servers.
//!
//! # Modes
//! * `wrap` (default): the DEK is wrapped and unwrapped by the key manager with
//!   KMIP Encrypt/Decrypt in AES-256-GCM (tag length 16, the caller's `aad` as
//!   Authenticated Encryption Additional Data, a fresh 12-byte IV from the OS
//!   CSPRNG). The KEK never leaves the key manager.
//! * `get`: for servers without Encrypt/Decrypt. The KEK is fetched with Get (Raw
//!   format) into a [`Secret`], used locally for AES-256-GCM and dropped
//!   (zeroized) at once.
//!
//! Both modes produce the same blob, `0x01 ‖ IV (12) ‖ ciphertext ‖ tag (16)`,
//! which is plain AES-256-GCM under the KEK; a volume wrapped in one mode can be
//! unwrapped in the other. Tags that are not exactly 16 bytes are refused (some
//! servers, PyKMIP among them, accept shorter tags).
//!
//! # Key names and versions
//! KMIP 1.x has no portable notion of key versions (ReKey is optional and
//! PyKMIP lacks it; custom attributes are not searchable everywhere), so each
//! KEK version is its own AES-256 key object, told apart by its Name attribute:
//!
//! | version | KMIP Name        |
//! |---------|------------------|
//! | 1       | `vol1-kek`       |
//! | N ≥ 2   | `vol1-kek#N`     |
//!
//! Version 1 is the bare name, so a key an administrator created by hand under
//! that name is used as is. Names therefore must not contain `#`. Locate by Name
//! works on every KMIP server. Without `key_version` in the config, the current
//! version is the highest N for which `name#N` exists (versions are contiguous:
//! `create_kek(None)` always creates N+1). The header stores name, version and
//! the Unique Identifier; unwrap uses the UID and, if a server does not know it
//! (a restored or separately provisioned server), falls back to Locate by the
//! versioned name on that server. When several objects carry the same name, the
//! first one the server lists is used (PyKMIP lists the newest first).
//! Configured with `key_uid` only, the key is that object and its version is
//! `key_version` (default 1); rotation then needs `create_kek(Some(name))`.
//!
//! # Random numbers
//! `random` asks for KMIP RNG Retrieve (KMIP 1.3+). PyKMIP 0.10 does not
//! implement it; then, in `wrap` mode, the key manager's randomness is taken as
//! the AES-GCM encryption of zero bytes under the KEK with an IV the server
//! chooses (the ciphertext is the keystream `AES(KEK, server IV ‖ counter)`, which
//! nobody without the KEK can predict). If that is impossible too (get mode, no
//! KEK yet) the bytes come from the OS CSPRNG alone, and the audit trail says so.
//! [`crate::kms::generate_dek`] always XORs the result with the OS CSPRNG.
//!
//! # Errors
//! `PERMISSION_DENIED` → [`KmsError::AccessDenied`]; unknown key or a key that is
//! not Active (revoked) → [`KmsError::KeyNotFound`]; GCM authentication failure
//! on Decrypt → [`KmsError::WrongKey`]; every server failed →
//! [`KmsError::Unreachable`] naming each server and why (or
//! [`KmsError::AccessDenied`] when they all refused our authentication).
//! Every operation is recorded with [`crate::audit::record`]; no record or
//! message ever holds key material, wrapped keys or hashes of keys.
//!
//! # Layout
//! `ttlv.rs` codec, `messages/` requests and responses, `client.rs` mutual-TLS
//! connections and failover, `config.rs` the `[kmip]` section, `ops.rs` the
//! operations on one connection (locate, versions, state, create, get),
//! `check.rs` `kmfs keyserver check`; this file holds the provider.

mod check;
mod client;
mod config;
pub mod messages;
mod ops;
pub mod ttlv;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub use self::check::ServerCheck;
use self::client::{Client, Failure, OpFail};
use self::config::validate_name;
pub use self::config::{KmipConfig, KmipMode, KmipServerConfig};
use self::messages::{GCM_TAG_LEN, Operation, enums, reason};
use super::{KekRef, KeyProvider, KmsError, blob};
use crate::crypto::keys::Secret;
use crate::sync::MutexExt;

/// The KMIP key provider.
pub struct KmipProvider {
    key_name: Option<String>,
    key_uid: Option<String>,
    key_version: Option<u32>,
    mode: KmipMode,
    client: Client,
    /// Set by `create_kek`: the KEK new wraps use from then on.
    current: Mutex<Option<KekRef>>,
    /// The servers answered RNG Retrieve with "not supported" once.
    rng_unsupported: AtomicBool,
}

/// The KMIP Name of `version` of key `name`.
pub fn versioned_name(name: &str, version: u32) -> String {
    if version <= 1 {
        name.to_string()
    } else {
        format!("{name}#{version}")
    }
}

impl KmipProvider {
    /// The name used in audit records for the configured key.
    fn audit_key(&self) -> String {
        self.key_name
            .clone()
            .or_else(|| self.key_uid.clone())
            .unwrap_or_default()
    }
}

fn display_name(kek: &KekRef) -> String {
    if kek.name.is_empty() {
        kek.uid.clone()
    } else {
        kek.name.clone()
    }
}

/// Splits a [`blob`] into (IV, ciphertext, tag); the server takes them apart.
fn parse_blob(wrapped: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (iv, ct_tag) = blob::parse(wrapped)?;
    if ct_tag.len() <= GCM_TAG_LEN {
        return None;
    }
    let (ct, tag) = ct_tag.split_at(ct_tag.len() - GCM_TAG_LEN);
    Some((iv, ct, tag))
}

fn encode_blob(iv: &[u8], ct: &[u8], tag: &[u8]) -> Vec<u8> {
    blob::encode(iv, &[ct, tag].concat())
}

impl KeyProvider for KmipProvider {
    fn kind(&self) -> &'static str {
        "kmip"
    }

    fn describe(&self) -> String {
        let servers: Vec<String> = self.client.servers.iter().map(|s| s.label()).collect();
        format!(
            "kmip key={} mode={} servers={}",
            self.audit_key(),
            match self.mode {
                KmipMode::Wrap => "wrap",
                KmipMode::Get => "get",
            },
            servers.join(", ")
        )
    }

    fn current_kek(&self) -> Result<KekRef, KmsError> {
        if let Some(k) = self.current.locked().clone() {
            return Ok(k);
        }
        let key = self.audit_key();
        self.client.run("locate", &key, self.key_version, |conn| {
            let r = self.resolve_configured(conn)?;
            let kek = KekRef {
                provider: "kmip".into(),
                name: self.key_name.clone().unwrap_or_default(),
                uid: r.uid.clone(),
                version: r.version,
            };
            let state = self.state(conn, &r.uid, r.version)?;
            if state != enums::STATE_ACTIVE {
                return Err(OpFail::Fatal(KmsError::KeyNotFound(format!(
                    "{key} version {} (uid {}) on key server {} is {}, not Active",
                    r.version,
                    r.uid,
                    conn.server.label(),
                    enums::state_name(state)
                ))));
            }
            Ok(kek)
        })
    }

    fn wrap(&self, kek: &KekRef, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        self.check_ref(kek)?;
        let name = display_name(kek);
        let iv = blob::fresh_iv()?;
        match self.mode {
            KmipMode::Wrap => self.client.run("wrap", &name, Some(kek.version), |conn| {
                self.with_uid(conn, kek, |this, conn, uid| {
                    let res = conn.call(
                        Operation::Encrypt,
                        messages::encrypt_gcm(uid, dek.as_bytes(), Some(&iv), aad),
                    );
                    let out = match res.and_then(|p| {
                        messages::parse_encrypt(&p).map_err(|e| Failure::Protocol(e.to_string()))
                    }) {
                        Ok(o) => o,
                        Err(f) => {
                            conn.audit("wrap", &name, Some(kek.version), Err(&f.describe()));
                            return Err(this.explain_denied(conn, kek, uid, f));
                        }
                    };
                    let problem = match (&out.tag, &out.iv) {
                        (None, _) => Some("the server returned no authentication tag".to_string()),
                        (Some(t), _) if t.len() != GCM_TAG_LEN => Some(format!(
                            "the server returned a {}-byte tag; kmfs requires {GCM_TAG_LEN}",
                            t.len()
                        )),
                        (_, Some(v)) if v.as_slice() != iv => {
                            Some("the server used another IV than the one sent".into())
                        }
                        _ if out.data.len() != dek.len() => {
                            Some("ciphertext length differs from the key length".into())
                        }
                        _ => None,
                    };
                    if let Some(p) = problem {
                        conn.audit("wrap", &name, Some(kek.version), Err(&p));
                        return Err(Failure::Protocol(p).into());
                    }
                    conn.audit(
                        "wrap",
                        &name,
                        Some(kek.version),
                        Ok(&format!("uid {uid} AES-256-GCM")),
                    );
                    Ok(encode_blob(
                        &iv,
                        &out.data,
                        out.tag.as_deref().unwrap_or_default(),
                    ))
                })
            }),
            KmipMode::Get => {
                let key = self.client.run("get", &name, Some(kek.version), |conn| {
                    self.with_uid(conn, kek, |this, conn, uid| this.get_key(conn, kek, uid))
                })?;
                let sealed = blob::seal(&key, &iv, dek, aad)?;
                drop(key);
                client::record(
                    "wrap",
                    None,
                    None,
                    &name,
                    Some(kek.version),
                    Ok("local AES-256-GCM with the fetched KEK"),
                );
                Ok(sealed)
            }
        }
    }

    fn unwrap(&self, kek: &KekRef, wrapped: &[u8], aad: &[u8]) -> Result<Secret, KmsError> {
        self.check_ref(kek)?;
        let name = display_name(kek);
        let Some((iv, ct, tag)) = parse_blob(wrapped) else {
            client::record(
                "unwrap",
                None,
                None,
                &name,
                Some(kek.version),
                Err("malformed wrapped key"),
            );
            return Err(KmsError::WrongKey(format!(
                "{name} version {} (malformed wrapped key)",
                kek.version
            )));
        };
        match self.mode {
            KmipMode::Wrap => self.client.run("unwrap", &name, Some(kek.version), |conn| {
                self.with_uid(conn, kek, |this, conn, uid| {
                    let res = conn.call(
                        Operation::Decrypt,
                        messages::decrypt_gcm(uid, ct, iv, aad, tag),
                    );
                    match res.and_then(|p| {
                        messages::parse_data_secret(&p)
                            .map_err(|e| Failure::Protocol(e.to_string()))
                    }) {
                        Ok(dek) if dek.len() == ct.len() => {
                            conn.audit(
                                "unwrap",
                                &name,
                                Some(kek.version),
                                Ok(&format!("uid {uid} AES-256-GCM")),
                            );
                            Ok(dek)
                        }
                        Ok(_) => {
                            let msg = "plaintext length differs from the ciphertext length";
                            conn.audit("unwrap", &name, Some(kek.version), Err(msg));
                            Err(Failure::Protocol(msg.into()).into())
                        }
                        Err(f) => {
                            conn.audit("unwrap", &name, Some(kek.version), Err(&f.describe()));
                            if matches!(
                                f.reason(),
                                Some(reason::GENERAL_FAILURE | reason::CRYPTOGRAPHIC_FAILURE)
                            ) {
                                return Err(OpFail::Fatal(KmsError::WrongKey(format!(
                                    "{name} version {} (uid {uid}) on key server {} ({})",
                                    kek.version,
                                    conn.server.label(),
                                    f.describe()
                                ))));
                            }
                            Err(this.explain_denied(conn, kek, uid, f))
                        }
                    }
                })
            }),
            KmipMode::Get => {
                let key = self.client.run("get", &name, Some(kek.version), |conn| {
                    self.with_uid(conn, kek, |this, conn, uid| this.get_key(conn, kek, uid))
                })?;
                let opened = blob::open(&key, wrapped, aad)?;
                drop(key);
                match opened {
                    Ok(pt) => {
                        client::record(
                            "unwrap",
                            None,
                            None,
                            &name,
                            Some(kek.version),
                            Ok("local AES-256-GCM with the fetched KEK"),
                        );
                        Ok(pt)
                    }
                    Err(_) => {
                        client::record(
                            "unwrap",
                            None,
                            None,
                            &name,
                            Some(kek.version),
                            Err("AES-GCM authentication failed"),
                        );
                        Err(KmsError::WrongKey(format!(
                            "{name} version {}",
                            kek.version
                        )))
                    }
                }
            }
        }
    }

    fn random(&self, len: usize) -> Result<Secret, KmsError> {
        let key = self.audit_key();
        if !self.rng_unsupported.load(Ordering::Relaxed) {
            let r = self.client.run("random", &key, None, |conn| {
                match conn.call(Operation::RngRetrieve, messages::rng_retrieve(len)) {
                    Ok(p) => {
                        let data = messages::parse_data_secret(&p)
                            .map_err(|e| Failure::Protocol(e.to_string()))?;
                        if data.len() != len {
                            return Err(Failure::Protocol(format!(
                                "RNG Retrieve returned {} bytes, not {len}",
                                data.len()
                            ))
                            .into());
                        }
                        conn.audit("random", &key, None, Ok("RNG Retrieve"));
                        Ok(Some(data))
                    }
                    Err(f)
                        if matches!(
                            f.reason(),
                            Some(
                                reason::OPERATION_NOT_SUPPORTED
                                    | reason::FEATURE_NOT_SUPPORTED
                                    | reason::INVALID_MESSAGE
                            )
                        ) =>
                    {
                        conn.audit("random", &key, None, Err(&f.describe()));
                        Ok(None)
                    }
                    Err(f) => {
                        conn.audit("random", &key, None, Err(&f.describe()));
                        Err(f.into())
                    }
                }
            })?;
            if let Some(data) = r {
                return Ok(data);
            }
            self.rng_unsupported.store(true, Ordering::Relaxed);
        }
        // Fallback 1: keystream of AES-GCM under the KEK with a server-chosen IV.
        if self.mode == KmipMode::Wrap {
            match self.current_kek() {
                Ok(kek) => {
                    let zeros = Secret::zeroed(len);
                    return self.client.run("random", &key, Some(kek.version), |conn| {
                        self.with_uid(conn, &kek, |this, conn, uid| {
                            let res = conn
                                .call(Operation::Encrypt, messages::encrypt_gcm(uid, zeros.as_bytes(), None, b"kmfs random"))
                                .and_then(|p| messages::parse_encrypt(&p).map_err(|e| Failure::Protocol(e.to_string())));
                            match res {
                                Ok(out) if out.data.len() == len && out.iv.as_ref().is_some_and(|v| v.len() >= 12) => {
                                    conn.audit(
                                        "random",
                                        &key,
                                        Some(kek.version),
                                        Ok("no RNG Retrieve on the server; used AES-GCM keystream under the KEK with a server-chosen IV"),
                                    );
                                    Ok(Secret::from_vec(out.data))
                                }
                                Ok(_) => {
                                    let m = "Encrypt without IV returned no server IV or a wrong length";
                                    conn.audit("random", &key, Some(kek.version), Err(m));
                                    Err(Failure::Protocol(m.into()).into())
                                }
                                Err(f) => {
                                    conn.audit("random", &key, Some(kek.version), Err(&f.describe()));
                                    Err(this.explain_denied(conn, &kek, uid, f))
                                }
                            }
                        })
                    });
                }
                Err(KmsError::KeyNotFound(_)) | Err(KmsError::Config(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Fallback 2: the OS CSPRNG alone (generate_dek mixes in the OS CSPRNG anyway).
        client::record(
            "random",
            None,
            None,
            &key,
            None,
            Err(
                "the key manager offers no random generator (no RNG Retrieve, no usable KEK); using the OS CSPRNG only",
            ),
        );
        Secret::random(len)
            .map_err(|e| KmsError::Config(format!("operating system random generator failed: {e}")))
    }

    fn create_kek(&self, name: Option<&str>) -> Result<KekRef, KmsError> {
        let base = match name.or(self.key_name.as_deref()) {
            Some(n) => n.to_string(),
            None => {
                return Err(KmsError::Config(
                    "kmip: creating a new key version needs key_name in the configuration (or an explicit name)".into(),
                ));
            }
        };
        validate_name(&base)?;
        let kek = self.client.run("create", &base, None, |conn| {
            let latest = self.latest(conn, &base)?;
            match (name, latest) {
                // An explicit name that exists: use (and if needed activate) it.
                (Some(_), Some(r)) => {
                    let state = self.state(conn, &r.uid, r.version)?;
                    if state == enums::STATE_PRE_ACTIVE {
                        self.activate(conn, &base, &r.uid, r.version)?;
                    } else if state != enums::STATE_ACTIVE {
                        return Err(OpFail::Fatal(KmsError::KeyNotFound(format!(
                            "{base} version {} (uid {}) on key server {} is {}, not Active",
                            r.version,
                            r.uid,
                            conn.server.label(),
                            enums::state_name(state)
                        ))));
                    }
                    Ok(KekRef {
                        provider: "kmip".into(),
                        name: base.clone(),
                        uid: r.uid,
                        version: r.version,
                    })
                }
                (Some(_), None) => Ok(self.create(conn, &base, 1)?),
                (None, latest) => {
                    let next = latest.map(|r| r.version + 1).unwrap_or(1);
                    Ok(self.create(conn, &base, next)?)
                }
            }
        })?;
        *self.current.locked() = Some(kek.clone());
        Ok(kek)
    }

    fn revoke(&self, kek: &KekRef) -> Result<(), KmsError> {
        self.check_ref(kek)?;
        let name = display_name(kek);
        self.client
            .run("revoke", &name, Some(kek.version), |conn| {
                self.with_uid(conn, kek, |_, conn, uid| {
                    let res = conn
                        .call(Operation::Revoke, messages::revoke(uid))
                        .map(|_| ());
                    match &res {
                        Ok(()) => conn.audit(
                            "revoke",
                            &name,
                            Some(kek.version),
                            Ok(&format!("uid {uid} deactivated")),
                        ),
                        Err(f) => {
                            conn.audit("revoke", &name, Some(kek.version), Err(&f.describe()))
                        }
                    }
                    Ok(res?)
                })
            })?;
        let mut cur = self.current.locked();
        if cur.as_ref().is_some_and(|c| c.uid == kek.uid) {
            *cur = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        assert_eq!(versioned_name("vol1-kek", 1), "vol1-kek");
        assert_eq!(versioned_name("vol1-kek", 7), "vol1-kek#7");
    }

    #[test]
    fn blob_layout_is_standard_gcm_and_matches_server_vector() {
        // The captured PyKMIP Encrypt: key 00..1f, IV 00..0b, AAD "kmfs", 32 zero
        // bytes. Local AES-GCM (get mode) must give the same bytes as the server.
        let key: Vec<u8> = (0u8..32).collect();
        let iv: [u8; 12] = core::array::from_fn(|i| i as u8);
        let sealed = blob::seal(
            &Secret::from_slice(&key),
            &iv,
            &Secret::from_slice(&[0u8; 32]),
            b"kmfs",
        )
        .unwrap();
        let out = &sealed[1 + iv.len()..];
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "4702d61bc5e5c21b8d41978bb1e9786d83d68734f07b5f7c3867e5851d6900b20f17a25dfef4b0a200ae855ec0f99dda"
        );
        let b = encode_blob(&iv, &out[..32], &out[32..]);
        assert_eq!(b, sealed);
        let (piv, pct, ptag) = parse_blob(&b).unwrap();
        assert_eq!((piv, pct, ptag), (&iv[..], &out[..32], &out[32..]));
        assert!(parse_blob(&b[..28]).is_none());
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(parse_blob(&v2).is_none());
    }
}
