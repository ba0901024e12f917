//! The `pkcs11` provider: the KEK lives in an HSM token reached through the
//! token's PKCS#11 module (the `cryptoki` crate).
//!
//! # Configuration (`[pkcs11]` in the volume config)
//!
//! ```toml
//! [pkcs11]
//! module = "/usr/lib/x86_64-linux-gnu/vendor-pkcs11.so"  # absolute, required
//! token_label = "kmfs"              # or: slot = 3   (exactly one of them)
//! pin_file = "/etc/kmfs/hsm.pin"    # or: pin_credential = "hsm-pin" (systemd credential)
//! key_label = "vol1-kek"            # KEK label (version 1)
//! # key_version = 2                 # default: the newest version on the token
//! # mode = "wrap"                   # default; "extract" only for HSMs without AES-GCM
//! ```
//!
//! # Key versions
//!
//! Version 1 of KEK `NAME` is the secret key labelled exactly `NAME` (as an
//! administrator creates it with `pkcs11-tool --keygen --label NAME ...`);
//! version `N >= 2` is the key labelled `NAME.vN`. `create_kek(None)` generates
//! the next free version inside the token. A KEK's `uid` is its CKA_ID in hex
//! (empty if the key has none; keys made by kmfs get 16 random bytes): the
//! volume header records it, and a key found under the right label but with
//! another CKA_ID is refused, so a replaced key is reported as such rather than
//! as a "wrong key". Labels ending in `.v<digits>` are refused as KEK names.
//!
//! # Modes
//!
//! - `wrap` (default): `CKM_AES_GCM` encryption/decryption inside the token with
//!   a sensitive, private, non-extractable AES-256 key. Every wrap uses a fresh
//!   12-byte IV from the OS CSPRNG (never the token's, and SoftHSM would accept
//!   any length) and a 16-byte tag; the caller's `aad` is the GCM AAD. A
//!   failed tag check is [`KmsError::WrongKey`]; SoftHSM reports it as
//!   CKR_GENERAL_ERROR (other tokens as CKR_ENCRYPTED_DATA_INVALID), so those
//!   codes from C_Decrypt count as a wrong key or tampered blob. GCM rather
//!   than CKM_AES_KEY_WRAP_PAD because it binds `aad` (the volume id), which
//!   key wrap cannot.
//! - `extract`: reads an extractable, non-sensitive KEK's CKA_VALUE into a
//!   [`Secret`] and runs AES-256-GCM locally, then drops (zeroizes) the key.
//!   The value is read with a direct `C_GetAttributeValue` into locked memory,
//!   so no unzeroized copy is left on the heap. The key's CKA_ENCRYPT /
//!   CKA_DECRYPT flags are honoured here too. In this mode `create_kek`
//!   generates extractable, non-sensitive keys (the mode cannot use others).
//!
//! Both modes write the same blob, `0x01 ‖ IV (12) ‖ ciphertext ‖ tag (16)`, so
//! a volume can move between them when the key allows it.
//!
//! # Revocation
//!
//! Keys are never destroyed. `revoke` clears CKA_ENCRYPT, CKA_DECRYPT,
//! CKA_WRAP and CKA_UNWRAP on the key object: it can no longer wrap or unwrap
//! (like a Deactivated KMIP key), but it stays on the token, and an HSM
//! administrator can set the flags again (C_SetAttributeValue) to recover old
//! header backups.
//!
//! # Threads and processes
//!
//! A module is loaded and `C_Initialize`d once per process (a registry keyed by
//! its canonical path; it is never finalised, because other providers in the
//! process may share it). Each provider keeps one logged-in read/write session
//! behind a mutex (cryptoki sessions are `Send` but not `Sync`); operations take
//! microseconds, so serialising them costs nothing measurable. Creating or
//! revoking a key excludes every other PKCS#11 operation of the process for
//! its duration (SoftHSM 2.6 otherwise races object creation against
//! concurrent searches). A session lost to the token (closed, logged out,
//! token removed) is reopened once automatically. PKCS#11 state does not survive `fork`: create the provider in
//! the process that uses it (after daemonising).
//!
//! Login state in PKCS#11 is per process and token: if another session of this
//! process is already logged in to the token, `C_Login` answers
//! CKR_USER_ALREADY_LOGGED_IN and the PIN is not checked again.
//!
//! Every HSM operation (login, locate, create, wrap, unwrap, get, random,
//! revoke) is recorded with [`crate::audit::record`], successful or not; the
//! `server` field is the token label and `key` the KEK label.
//!
//! # Layout
//!
//! `config` (the `[pkcs11]` section, the PIN), `module` (loading the module,
//! finding the token), `session` (login, reopening, retries), `labels` (key
//! versions as labels: find, list, generate), `error` (the operation error,
//! CKR_ names), `ffi` (every raw call and `unsafe` block); this file holds the
//! provider and its wrap/unwrap.

mod config;
mod error;
mod ffi;
mod labels;
mod module;
mod session;

use std::path::PathBuf;
use std::sync::Mutex;

use cryptoki::context::Pkcs11 as Module;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use self::config::read_pin;
pub use self::config::{Pkcs11Config, Pkcs11Mode};
pub use self::error::rv_name;
use self::error::{OpError, OpResult, rv_of};
use self::ffi::{RawGet, raw_get_value};
use self::labels::{FoundKey, check_key_name, hex};
pub use self::labels::{label_version, version_label};
use self::module::{find_slot, load_module};
use super::blob::{self, IV_LEN, TAG_LEN, VERSION as BLOB_VERSION};
use super::{KekRef, KeyProvider, KmsError};
use crate::audit::{self, AuditRecord, Outcome};
use crate::crypto::keys::Secret;
use crate::sync::MutexExt;

const KIND: &str = "pkcs11";
/// AES-256.
const KEK_LEN: usize = 32;
/// Length of the CKA_ID kmfs gives the keys it generates.
const NEW_ID_LEN: usize = 16;
/// Upper bound for one `random` request (a DEK needs 32 bytes).
const MAX_RANDOM: usize = 1 << 20;

/// A KEK in a PKCS#11 token.
pub struct Pkcs11Provider {
    module_path: PathBuf,
    module: Module,
    slot: Slot,
    token: String,
    key_label: String,
    key_version: Option<u32>,
    mode: Pkcs11Mode,
    pin: Secret,
    session: Mutex<Option<Session>>,
}

impl Pkcs11Provider {
    /// Loads the module, finds the token, reads the PIN and logs in.
    pub fn from_config(cfg: &Pkcs11Config) -> Result<Pkcs11Provider, KmsError> {
        check_key_name(&cfg.key_label)?;
        if cfg.key_version == Some(0) {
            return Err(KmsError::Config("pkcs11: key_version starts at 1".into()));
        }
        // Check the configuration before touching the module or the PIN.
        if cfg.token_label.is_some() == cfg.slot.is_some() {
            return Err(KmsError::Config(
                "pkcs11: set exactly one of token_label and slot".into(),
            ));
        }
        if cfg.pin_file.is_some() == cfg.pin_credential.is_some() {
            return Err(KmsError::Config(
                "pkcs11: set exactly one of pin_file and pin_credential".into(),
            ));
        }
        let pin = read_pin(cfg)?;
        let module = load_module(&cfg.module)?;
        let (slot, token) = find_slot(&module, cfg)?;
        let p = Pkcs11Provider {
            module_path: cfg.module.clone(),
            module,
            slot,
            token,
            key_label: cfg.key_label.clone(),
            key_version: cfg.key_version,
            mode: cfg.mode,
            pin,
            session: Mutex::new(None),
        };
        // Log in now so a wrong PIN or a missing token shows up at start.
        let s = p.open_session()?;
        *p.session.locked() = Some(s);
        Ok(p)
    }

    /// The token label.
    pub fn token_label(&self) -> &str {
        &self.token
    }

    /// The configured mode.
    pub fn mode(&self) -> Pkcs11Mode {
        self.mode
    }

    fn where_(&self) -> String {
        format!(
            "token \"{}\" (PKCS#11 module {})",
            self.token,
            self.module_path.display()
        )
    }

    fn key_where(&self, name: &str, version: u32) -> String {
        format!(
            "key \"{}\" (KEK {name} version {version}) on {}",
            version_label(name, version),
            self.where_()
        )
    }

    fn audit(&self, op: &str, key: &str, version: Option<u32>, res: Result<(), &str>) {
        audit::record(&AuditRecord::new(
            op,
            &self.token,
            key,
            version,
            Outcome::of(&res),
            res.err().unwrap_or_default(),
        ));
    }

    /// Audits the outcome of `r` and passes it on.
    fn audited<T>(&self, op: &str, key: &str, version: Option<u32>, r: OpResult<T>) -> OpResult<T> {
        match &r {
            Ok(_) => self.audit(op, key, version, Ok(())),
            Err(e) => self.audit(op, key, version, Err(&e.err.to_string())),
        }
        r
    }

    /// Reads the boolean attribute `t` of `h`.
    fn get_bool(
        &self,
        s: &Session,
        h: ObjectHandle,
        t: AttributeType,
        kw: &str,
    ) -> OpResult<Option<bool>> {
        let attrs = s.get_attributes(h, &[t]).map_err(|e| {
            self.ck_fail(
                &e,
                |m| KmsError::Protocol(format!("{kw}: {m}")),
                "C_GetAttributeValue",
            )
        })?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Sensitive(b)
            | Attribute::Extractable(b) => Some(b),
            _ => None,
        }))
    }

    /// Extract mode: the KEK's value in locked memory.
    /// `usage` is CKA_ENCRYPT (wrap) or CKA_DECRYPT (unwrap): the key's usage
    /// flags apply to local use too, so a revoked key stays unusable.
    fn extract(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        key: &FoundKey,
        usage: AttributeType,
    ) -> OpResult<Secret> {
        let r = self.extract_inner(s, name, version, key, usage);
        self.audited("get", name, Some(version), r)
    }

    fn extract_inner(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        key: &FoundKey,
        usage: AttributeType,
    ) -> OpResult<Secret> {
        let kw = self.key_where(name, version);
        if self.get_bool(s, key.handle, usage, &kw)? != Some(true) {
            let (op, flag) = if usage == AttributeType::Encrypt {
                ("encrypt", "CKA_ENCRYPT")
            } else {
                ("decrypt", "CKA_DECRYPT")
            };
            return Err(KmsError::KeyNotFound(format!(
                "{kw} may not {op} ({flag} is false: revoked?)"
            ))
            .into());
        }
        let sensitive = self.get_bool(s, key.handle, AttributeType::Sensitive, &kw)?;
        let extractable = self.get_bool(s, key.handle, AttributeType::Extractable, &kw)?;
        if sensitive != Some(false) || extractable != Some(true) {
            return Err(KmsError::Config(format!(
                "mode = \"extract\" needs an extractable, non-sensitive KEK, but {kw} has CKA_SENSITIVE={} CKA_EXTRACTABLE={}; use mode = \"wrap\" (recommended) or a key created for extraction",
                sensitive.map_or("?".into(), |b| b.to_string()),
                extractable.map_or("?".into(), |b| b.to_string()),
            ))
            .into());
        }
        let mut value = Secret::zeroed(KEK_LEN);
        let rv = raw_get_value(&self.module_path, s, key.handle, value.as_mut_bytes());
        match rv {
            Ok(n) if n == KEK_LEN => Ok(value),
            Ok(n) => Err(KmsError::KeyNotFound(format!(
                "{kw} is {n} bytes long; an AES-256 KEK must be {KEK_LEN}"
            ))
            .into()),
            Err(RawGet::Rv(rv)) => {
                let e = CkError::Pkcs11(rv, cryptoki::context::Function::GetAttributeValue);
                Err(self.ck_fail(
                    &e,
                    |m| {
                        KmsError::Config(format!(
                            "cannot read the value of {kw} in extract mode: {m}; the key is not extractable, use mode = \"wrap\""
                        ))
                    },
                    "C_GetAttributeValue",
                ))
            }
            Err(RawGet::NoSymbol(why)) => Err(KmsError::Unsupported {
                provider: KIND,
                op: why,
            }
            .into()),
        }
    }

    fn check_ref(&self, kek: &KekRef) -> Result<(), KmsError> {
        if kek.provider != KIND {
            return Err(KmsError::Config(format!(
                "the volume's key is held by the {} provider ({kek}), but a PKCS#11 token was configured",
                kek.provider
            )));
        }
        if kek.version == 0 {
            return Err(KmsError::Config(format!(
                "invalid KEK reference ({kek}): versions start at 1"
            )));
        }
        Ok(())
    }

    fn gcm_wrap_in_token(
        &self,
        s: &Session,
        kek: &KekRef,
        key: &FoundKey,
        dek: &Secret,
        aad: &[u8],
    ) -> OpResult<Vec<u8>> {
        let kw = self.key_where(&kek.name, kek.version);
        let iv = blob::fresh_iv()?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, ((TAG_LEN * 8) as u64).into())
            .map_err(|e| KmsError::Protocol(format!("AES-GCM parameters: {e}")))?;
        let ct = s
            .encrypt(&Mechanism::AesGcm(params), key.handle, dek.as_bytes())
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| {
                        gcm_refusal(&e, &kw, "encrypt", &m).unwrap_or_else(|| {
                            KmsError::Protocol(format!("wrapping with {kw}: {m}"))
                        })
                    },
                    "C_Encrypt",
                )
            })?;
        if ct.len() != dek.len() + TAG_LEN {
            return Err(KmsError::Protocol(format!(
                "wrapping with {kw}: the token returned {} bytes for a {}-byte key, expected {}",
                ct.len(),
                dek.len(),
                dek.len() + TAG_LEN
            ))
            .into());
        }
        Ok(blob::encode(&iv, &ct))
    }

    fn gcm_unwrap_in_token(
        &self,
        s: &Session,
        kek: &KekRef,
        key: &FoundKey,
        wrapped: &[u8],
        aad: &[u8],
    ) -> OpResult<Secret> {
        let kw = self.key_where(&kek.name, kek.version);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[1..1 + IV_LEN]);
        let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())
            .map_err(|e| KmsError::Protocol(format!("AES-GCM parameters: {e}")))?;
        let pt = s
            .decrypt(
                &Mechanism::AesGcm(params),
                key.handle,
                &wrapped[1 + IV_LEN..],
            )
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| match rv_of(&e) {
                        _ if let Some(refused) = gcm_refusal(&e, &kw, "decrypt", &m) => refused,
                        // A failed GCM tag check: SoftHSM answers
                        // CKR_ENCRYPTED_DATA_INVALID, other tokens the generic codes.
                        Some(
                            RvError::EncryptedDataInvalid
                            | RvError::EncryptedDataLenRange
                            | RvError::DataInvalid
                            | RvError::DataLenRange
                            | RvError::GeneralError
                            | RvError::FunctionFailed,
                        ) => KmsError::WrongKey(format!("{kw} ({m})")),
                        _ => KmsError::Protocol(format!("unwrapping with {kw}: {m}")),
                    },
                    "C_Decrypt",
                )
            })?;
        Ok(Secret::from_vec(pt))
    }
}

/// The token's refusals common to wrapping and unwrapping in it (`verb`:
/// "encrypt" or "decrypt"): the key may not do it, or the token lacks
/// AES-GCM.
fn gcm_refusal(e: &CkError, kw: &str, verb: &str, m: &str) -> Option<KmsError> {
    match rv_of(e) {
        Some(RvError::KeyFunctionNotPermitted) => Some(KmsError::KeyNotFound(format!(
            "{kw} may not {verb} (CKA_{} is false: revoked?): {m}",
            verb.to_uppercase()
        ))),
        Some(RvError::MechanismInvalid | RvError::MechanismParamInvalid) => {
            Some(KmsError::Unsupported {
                provider: KIND,
                op: "CKM_AES_GCM (the token lacks it: use mode = \"extract\" with an extractable key)",
            })
        }
        _ => None,
    }
}

/// Extract mode: AES-256-GCM with the fetched KEK, same blob as the token's.
fn local_wrap(kek: &Secret, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError> {
    blob::seal(kek, &blob::fresh_iv()?, dek, aad)
}

/// Reverses [`local_wrap`]; `wrapped` has been length-checked.
fn local_unwrap(kek: &Secret, wrapped: &[u8], aad: &[u8], kw: &str) -> Result<Secret, KmsError> {
    blob::open(kek, wrapped, aad)?.map_err(|e| match e {
        blob::OpenError::Auth => KmsError::WrongKey(format!("{kw} (AES-GCM tag mismatch)")),
        blob::OpenError::Malformed => KmsError::WrongKey(kw.to_string()),
    })
}

impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn describe(&self) -> String {
        format!(
            "pkcs11 {} key \"{}\"{} mode {}",
            self.where_(),
            self.key_label,
            self.key_version
                .map(|v| format!(" version {v}"))
                .unwrap_or_default(),
            self.mode.as_str()
        )
    }

    fn current_kek(&self) -> Result<KekRef, KmsError> {
        let name = self.key_label.clone();
        self.with_session(|s| {
            let version = match self.key_version {
                Some(v) => v,
                None => *self.versions(s, &name)?.last().ok_or_else(|| {
                    KmsError::KeyNotFound(format!(
                        "no secret key labelled \"{name}\" on {}; create it (kmfs init can) or with pkcs11-tool --keygen --key-type AES:32 --label {name} --sensitive --private --usage-decrypt --usage-wrap",
                        self.where_()
                    ))
                })?,
            };
            let key = self.find_key(s, &name, version, "")?;
            let kw = self.key_where(&name, version);
            if self.get_bool(s, key.handle, AttributeType::Encrypt, &kw)? == Some(false) {
                return Err(KmsError::KeyNotFound(format!(
                    "{kw} may not encrypt (CKA_ENCRYPT is false: revoked?)"
                ))
                .into());
            }
            Ok(KekRef {
                provider: KIND.into(),
                name: name.clone(),
                uid: hex(&key.id),
                version,
            })
        })
    }

    fn wrap(&self, kek: &KekRef, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        self.check_ref(kek)?;
        self.with_session(|s| {
            let key = self.find_key(s, &kek.name, kek.version, &kek.uid)?;
            let r = match self.mode {
                Pkcs11Mode::Wrap => self.gcm_wrap_in_token(s, kek, &key, dek, aad),
                Pkcs11Mode::Extract => {
                    let k =
                        self.extract(s, &kek.name, kek.version, &key, AttributeType::Encrypt)?;
                    local_wrap(&k, dek, aad).map_err(OpError::from)
                }
            };
            self.audited("wrap", &kek.name, Some(kek.version), r)
        })
    }

    fn unwrap(&self, kek: &KekRef, wrapped: &[u8], aad: &[u8]) -> Result<Secret, KmsError> {
        self.check_ref(kek)?;
        if wrapped.len() < 1 + IV_LEN + TAG_LEN || wrapped[0] != BLOB_VERSION {
            let e = KmsError::WrongKey(format!(
                "{} (the wrapped key is malformed: {} bytes, format {})",
                self.key_where(&kek.name, kek.version),
                wrapped.len(),
                wrapped.first().map_or("-".into(), |b| b.to_string())
            ));
            self.audit("unwrap", &kek.name, Some(kek.version), Err(&e.to_string()));
            return Err(e);
        }
        self.with_session(|s| {
            let key = self.find_key(s, &kek.name, kek.version, &kek.uid)?;
            let r = match self.mode {
                Pkcs11Mode::Wrap => self.gcm_unwrap_in_token(s, kek, &key, wrapped, aad),
                Pkcs11Mode::Extract => {
                    let k =
                        self.extract(s, &kek.name, kek.version, &key, AttributeType::Decrypt)?;
                    let kw = self.key_where(&kek.name, kek.version);
                    local_unwrap(&k, wrapped, aad, &kw).map_err(OpError::from)
                }
            };
            self.audited("unwrap", &kek.name, Some(kek.version), r)
        })
    }

    fn random(&self, len: usize) -> Result<Secret, KmsError> {
        if len > MAX_RANDOM {
            return Err(KmsError::Config(format!(
                "pkcs11: {len} random bytes requested; at most {MAX_RANDOM} per call"
            )));
        }
        let mut out = Secret::zeroed(len);
        if len == 0 {
            return Ok(out);
        }
        self.with_session(|s| {
            let r = s.generate_random_slice(out.as_mut_bytes()).map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| KmsError::Protocol(format!("random generator of {}: {m}", self.where_())),
                    "C_GenerateRandom",
                )
            });
            self.audited("random", "", None, r)
        })?;
        Ok(out)
    }

    fn create_kek(&self, name: Option<&str>) -> Result<KekRef, KmsError> {
        match name {
            Some(label) => {
                check_key_name(label)?;
                self.with_session_exclusive(|s| {
                    match self.find_key(s, label, 1, "") {
                        Ok(key) => {
                            return Ok(KekRef {
                                provider: KIND.into(),
                                name: label.into(),
                                uid: hex(&key.id),
                                version: 1,
                            });
                        }
                        Err(OpError {
                            err: KmsError::KeyNotFound(m),
                            ..
                        }) if m.starts_with("no secret key") => {}
                        Err(e) => return Err(e),
                    }
                    self.generate(s, label, 1)
                })
            }
            None => {
                let name = self.key_label.clone();
                self.with_session_exclusive(|s| {
                    let next = self
                        .versions(s, &name)?
                        .last()
                        .map_or(Some(1), |v| v.checked_add(1))
                        .ok_or_else(|| {
                            KmsError::Config(format!("KEK {name} has run out of version numbers"))
                        })?;
                    self.generate(s, &name, next)
                })
            }
        }
    }

    fn revoke(&self, kek: &KekRef) -> Result<(), KmsError> {
        self.check_ref(kek)?;
        self.with_session_exclusive(|s| {
            let key = self.find_key(s, &kek.name, kek.version, &kek.uid)?;
            let kw = self.key_where(&kek.name, kek.version);
            let r = s
                .update_attributes(
                    key.handle,
                    &[
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                    ],
                )
                .map_err(|e| {
                    self.ck_fail(
                        &e,
                        |m| match rv_of(&e) {
                            Some(RvError::AttributeReadOnly | RvError::ActionProhibited) => {
                                KmsError::Config(format!(
                                    "cannot revoke {kw}: the token does not let its usage flags be changed ({m})"
                                ))
                            }
                            _ => KmsError::Protocol(format!("cannot revoke {kw}: {m}")),
                        },
                        "C_SetAttributeValue",
                    )
                });
            self.audited("revoke", &kek.name, Some(kek.version), r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pkcs11Provider>();
    }

    #[test]
    fn gcm_refusals_name_the_operation_and_the_attribute() {
        use cryptoki::context::Function;
        let denied = CkError::Pkcs11(RvError::KeyFunctionNotPermitted, Function::Decrypt);
        let msg = gcm_refusal(&denied, "KEK k v2", "decrypt", "m")
            .unwrap()
            .to_string();
        assert!(
            msg.contains("KEK k v2 may not decrypt (CKA_DECRYPT is false: revoked?): m"),
            "{msg}"
        );
        let denied = CkError::Pkcs11(RvError::KeyFunctionNotPermitted, Function::Encrypt);
        let msg = gcm_refusal(&denied, "K", "encrypt", "m")
            .unwrap()
            .to_string();
        assert!(
            msg.contains("may not encrypt (CKA_ENCRYPT is false"),
            "{msg}"
        );
        let lacks = CkError::Pkcs11(RvError::MechanismInvalid, Function::Encrypt);
        assert!(matches!(
            gcm_refusal(&lacks, "K", "encrypt", "m"),
            Some(KmsError::Unsupported { .. })
        ));
        let other = CkError::Pkcs11(RvError::EncryptedDataInvalid, Function::Decrypt);
        assert!(gcm_refusal(&other, "K", "decrypt", "m").is_none());
    }
}
