//! Key versions as token object labels: version 1 of KEK `NAME` is labelled
//! `NAME`, version `N >= 2` `NAME.vN`; the key's CKA_ID (in hex) is its
//! `uid`. Finding a version, listing the versions present, and generating
//! the next one inside the token.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::error::{OpResult, rv_of};
use super::{KEK_LEN, KIND, NEW_ID_LEN, Pkcs11Mode, Pkcs11Provider};
use crate::kms::{KekRef, KmsError};

/// A key object found on the token.
pub(super) struct FoundKey {
    pub(super) handle: ObjectHandle,
    pub(super) id: Vec<u8>,
}

pub(super) use crate::hex::{decode as unhex, encode as hex};

/// The token object label of version `version` of KEK `name`.
pub fn version_label(name: &str, version: u32) -> String {
    if version == 1 {
        name.to_string()
    } else {
        format!("{name}.v{version}")
    }
}

/// The version `label` holds for KEK `name`, if it is one of its labels.
pub fn label_version(name: &str, label: &str) -> Option<u32> {
    if label == name {
        return Some(1);
    }
    let digits = label.strip_prefix(name)?.strip_prefix(".v")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse::<u32>().ok().filter(|v| *v >= 2)
}

pub(super) fn check_key_name(name: &str) -> Result<(), KmsError> {
    if name.is_empty() {
        return Err(KmsError::Config(
            "pkcs11: key_label must not be empty".into(),
        ));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(KmsError::Config(format!(
            "pkcs11: key label {name:?} contains control characters"
        )));
    }
    if let Some((base, _)) = name.rsplit_once(".v")
        && label_version(base, name).is_some()
    {
        return Err(KmsError::Config(format!(
            "pkcs11: key label \"{name}\" ends in .v<number>, which kmfs uses for key versions; use \"{base}\" with key_version instead"
        )));
    }
    Ok(())
}

impl Pkcs11Provider {
    /// Finds version `version` of KEK `name` (with CKA_ID `uid` if not empty).
    pub(super) fn find_key(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        uid: &str,
    ) -> OpResult<FoundKey> {
        let r = self.find_key_inner(s, name, version, uid);
        self.audited("locate", name, Some(version), r)
    }

    fn find_key_inner(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        uid: &str,
    ) -> OpResult<FoundKey> {
        let label = version_label(name, version);
        let kw = self.key_where(name, version);
        let handles = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| KmsError::Protocol(format!("{kw}: {m}")),
                    "C_FindObjects",
                )
            })?;
        if handles.is_empty() {
            return Err(KmsError::KeyNotFound(format!(
                "no secret key labelled \"{label}\" (KEK {name} version {version}) on {}",
                self.where_()
            ))
            .into());
        }
        let want = if uid.is_empty() {
            None
        } else {
            Some(unhex(uid).ok_or_else(|| {
                KmsError::Config(format!(
                    "the volume header records CKA_ID {uid:?} for {kw}, which is not hex"
                ))
            })?)
        };
        let mut matching = Vec::new();
        let mut other_ids = Vec::new();
        for h in handles {
            let attrs = match s.get_attributes(h, &[AttributeType::Id, AttributeType::KeyType]) {
                Ok(a) => a,
                // Deleted (or still being created) since C_FindObjects.
                Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                Err(e) => {
                    return Err(self.ck_fail(
                        &e,
                        |m| KmsError::Protocol(format!("{kw}: {m}")),
                        "C_GetAttributeValue",
                    ));
                }
            };
            let mut id = Vec::new();
            let mut key_type = None;
            for a in attrs {
                match a {
                    Attribute::Id(v) => id = v,
                    Attribute::KeyType(t) => key_type = Some(t),
                    _ => {}
                }
            }
            if key_type != Some(KeyType::AES) {
                return Err(KmsError::KeyNotFound(format!("{kw} is not an AES key")).into());
            }
            match &want {
                Some(w) if *w != id => other_ids.push(hex(&id)),
                _ => matching.push(FoundKey { handle: h, id }),
            }
        }
        match matching.len() {
            1 => Ok(matching.remove(0)),
            0 => Err(KmsError::KeyNotFound(format!(
                "{kw} has CKA_ID {}, not {uid} as recorded in the volume header: the key was replaced",
                if other_ids.is_empty() {
                    "-".to_string()
                } else {
                    other_ids.join(", ")
                }
            ))
            .into()),
            n => Err(KmsError::KeyNotFound(format!(
                "{n} secret keys are labelled \"{label}\" on {}; give each KEK version a distinct label or CKA_ID",
                self.where_()
            ))
            .into()),
        }
    }

    /// All versions of KEK `name` present on the token, ascending.
    pub(super) fn versions(&self, s: &Session, name: &str) -> OpResult<Vec<u32>> {
        let r = (|| {
            let handles = s
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(|e| {
                    self.ck_fail(
                        &e,
                        |m| KmsError::Protocol(format!("listing keys on {}: {m}", self.where_())),
                        "C_FindObjects",
                    )
                })?;
            let mut out = Vec::new();
            for h in handles {
                let attrs = match s.get_attributes(h, &[AttributeType::Label]) {
                    Ok(a) => a,
                    // Another session (or process) deleted or is still
                    // creating this object: it is not one of ours to count.
                    Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                    Err(e) => {
                        return Err(self.ck_fail(
                            &e,
                            |m| {
                                KmsError::Protocol(format!(
                                    "listing keys on {}: {m}",
                                    self.where_()
                                ))
                            },
                            "C_GetAttributeValue",
                        ));
                    }
                };
                for a in attrs {
                    if let Attribute::Label(l) = a
                        && let Ok(l) = std::str::from_utf8(&l)
                        && let Some(v) = label_version(name, l)
                    {
                        out.push(v);
                    }
                }
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })();
        self.audited("locate", name, None, r)
    }

    /// Generates a KEK labelled `label` inside the token.
    pub(super) fn generate(&self, s: &Session, name: &str, version: u32) -> OpResult<KekRef> {
        let r = self.generate_inner(s, name, version);
        self.audited("create", name, Some(version), r)
    }

    fn generate_inner(&self, s: &Session, name: &str, version: u32) -> OpResult<KekRef> {
        let label = version_label(name, version);
        let kw = self.key_where(name, version);
        let mut id = [0u8; NEW_ID_LEN];
        getrandom::fill(&mut id).map_err(|e| {
            KmsError::Config(format!("operating system random generator failed: {e}"))
        })?;
        // Extract mode can only use a key it may read; wrap mode never reads it.
        let extractable = self.mode == Pkcs11Mode::Extract;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen((KEK_LEN as u64).into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(!extractable),
            Attribute::Extractable(extractable),
            Attribute::Modifiable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(label.into_bytes()),
            Attribute::Id(id.to_vec()),
        ];
        s.generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| match rv_of(&e) {
                        Some(RvError::UserNotLoggedIn | RvError::SessionReadOnly) => {
                            KmsError::AccessDenied(format!("cannot create {kw}: {m}"))
                        }
                        _ => KmsError::Protocol(format!("cannot create {kw}: {m}")),
                    },
                    "C_GenerateKey",
                )
            })?;
        Ok(KekRef {
            provider: KIND.into(),
            name: name.into(),
            uid: hex(&id),
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_labels_round_trip() {
        assert_eq!(version_label("kek", 1), "kek");
        assert_eq!(version_label("kek", 12), "kek.v12");
        for v in [1, 2, 9, 10, 4_000_000_000] {
            assert_eq!(label_version("kek", &version_label("kek", v)), Some(v));
        }
        for other in [
            "kek.v",
            "kek.v1",
            "kek.v01",
            "kek.vx",
            "kek2",
            "ke",
            "kek.v2a",
            "kek.v99999999999",
        ] {
            assert_eq!(label_version("kek", other), None, "{other}");
        }
        assert!(check_key_name("kek.v2").is_err());
        assert!(check_key_name("kek.v").is_ok());
        assert!(check_key_name("").is_err());
        assert!(check_key_name("vol1-kek").is_ok());
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é1"), None);
    }
}
