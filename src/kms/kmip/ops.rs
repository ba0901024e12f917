//! Operations on one connection: locating a key version by name, finding the
//! newest version, reading a key's state, creating and activating a version,
//! fetching a key (get mode), and falling back from UID to name.

use super::client::{Conn, Failure, OpFail};
use super::messages::{self, Operation, enums, reason};
use super::{KmipProvider, display_name, versioned_name};
use crate::crypto::keys::Secret;
use crate::kms::{KekRef, KmsError};

const KEK_LEN: usize = 32;
/// Highest version probed when looking for the newest one.
const MAX_VERSION: u32 = 100_000;

/// A KEK reference resolved on one server.
pub(super) struct Resolved {
    pub(super) uid: String,
    pub(super) version: u32,
}

impl KmipProvider {
    fn locate(&self, conn: &mut Conn, name: &str, version: u32) -> Result<Option<String>, Failure> {
        let vname = versioned_name(name, version);
        let res = conn
            .call(Operation::Locate, messages::locate_by_name(&vname))
            .and_then(|p| messages::parse_uids(&p).map_err(|e| Failure::Protocol(e.to_string())));
        match &res {
            Ok(uids) if uids.is_empty() => {
                conn.audit("locate", name, Some(version), Ok("not found"))
            }
            Ok(uids) if uids.len() == 1 => conn.audit(
                "locate",
                name,
                Some(version),
                Ok(&format!("uid {}", uids[0])),
            ),
            Ok(uids) => conn.audit(
                "locate",
                name,
                Some(version),
                Ok(&format!(
                    "{} objects named {vname:?}; using uid {}",
                    uids.len(),
                    uids[0]
                )),
            ),
            Err(f) => conn.audit("locate", name, Some(version), Err(&f.describe())),
        }
        Ok(res?.into_iter().next())
    }

    /// The newest version of `name` on this server, if any.
    pub(super) fn latest(&self, conn: &mut Conn, name: &str) -> Result<Option<Resolved>, Failure> {
        let Some(mut uid) = self.locate(conn, name, 1)? else {
            return Ok(None);
        };
        let mut version = 1;
        while version < MAX_VERSION {
            match self.locate(conn, name, version + 1)? {
                Some(u) => {
                    uid = u;
                    version += 1;
                }
                None => break,
            }
        }
        Ok(Some(Resolved { uid, version }))
    }

    /// The configured key on this server.
    pub(super) fn resolve_configured(&self, conn: &mut Conn) -> Result<Resolved, OpFail> {
        if let Some(uid) = &self.key_uid {
            return Ok(Resolved {
                uid: uid.clone(),
                version: self.key_version.unwrap_or(1),
            });
        }
        let Some(name) = &self.key_name else {
            return Err(OpFail::Fatal(KmsError::Config(
                "kmip: neither key_name nor key_uid is configured".into(),
            )));
        };
        let found = match self.key_version {
            Some(v) => self
                .locate(conn, name, v)?
                .map(|uid| Resolved { uid, version: v }),
            None => self.latest(conn, name)?,
        };
        found.ok_or_else(|| {
            OpFail::Fatal(KmsError::KeyNotFound(format!(
                "no key named {:?} on key server {}",
                versioned_name(name, self.key_version.unwrap_or(1)),
                conn.server.label()
            )))
        })
    }

    pub(super) fn state(&self, conn: &mut Conn, uid: &str, version: u32) -> Result<u32, Failure> {
        let key = self.audit_key();
        let res = conn
            .call(Operation::GetAttributes, messages::get_state(uid))
            .and_then(|p| {
                messages::parse_state(&p)
                    .map_err(|e| Failure::Protocol(e.to_string()))?
                    .ok_or_else(|| Failure::Protocol("Get Attributes returned no State".into()))
            });
        match &res {
            Ok(s) => conn.audit(
                "get_attributes",
                &key,
                Some(version),
                Ok(enums::state_name(*s)),
            ),
            Err(f) => conn.audit("get_attributes", &key, Some(version), Err(&f.describe())),
        }
        res
    }

    pub(super) fn activate(
        &self,
        conn: &mut Conn,
        name: &str,
        uid: &str,
        version: u32,
    ) -> Result<(), Failure> {
        let res = conn
            .call(Operation::Activate, messages::uid_only(uid))
            .map(|_| ());
        match &res {
            Ok(()) => conn.audit("activate", name, Some(version), Ok(&format!("uid {uid}"))),
            Err(f) => conn.audit("activate", name, Some(version), Err(&f.describe())),
        }
        res
    }

    /// Create + Activate version `version` of `name`.
    pub(super) fn create(
        &self,
        conn: &mut Conn,
        name: &str,
        version: u32,
    ) -> Result<KekRef, Failure> {
        let vname = versioned_name(name, version);
        let res = conn
            .call(Operation::Create, messages::create_aes256(&vname))
            .and_then(|p| messages::parse_uid(&p).map_err(|e| Failure::Protocol(e.to_string())));
        match &res {
            Ok(uid) => conn.audit(
                "create",
                name,
                Some(version),
                Ok(&format!("AES-256 uid {uid} name {vname:?}")),
            ),
            Err(f) => conn.audit("create", name, Some(version), Err(&f.describe())),
        }
        let uid = res?;
        self.activate(conn, name, &uid, version)?;
        Ok(KekRef {
            provider: "kmip".into(),
            name: name.to_string(),
            uid,
            version,
        })
    }

    /// Refines a PERMISSION_DENIED on a key operation: a key that is not Active
    /// (revoked, destroyed, never activated) is reported as not usable.
    pub(super) fn explain_denied(
        &self,
        conn: &mut Conn,
        kek: &KekRef,
        uid: &str,
        f: Failure,
    ) -> OpFail {
        if f.reason() != Some(reason::PERMISSION_DENIED) {
            return f.into();
        }
        if let Ok(state) = self.state(conn, uid, kek.version)
            && state != enums::STATE_ACTIVE
        {
            return OpFail::Fatal(KmsError::KeyNotFound(format!(
                "{} version {} (uid {uid}) on key server {} is {}, not Active",
                display_name(kek),
                kek.version,
                conn.server.label(),
                enums::state_name(state)
            )));
        }
        f.into()
    }

    /// Runs `op` with the UID of `kek` on this server; if the server does not
    /// know that UID and the key has a name, locates it by name and retries.
    pub(super) fn with_uid<T>(
        &self,
        conn: &mut Conn,
        kek: &KekRef,
        mut op: impl FnMut(&Self, &mut Conn, &str) -> Result<T, OpFail>,
    ) -> Result<T, OpFail> {
        let by_name = |this: &Self, conn: &mut Conn| -> Result<String, OpFail> {
            this.locate(conn, &kek.name, kek.version)?.ok_or_else(|| {
                OpFail::Fatal(KmsError::KeyNotFound(format!(
                    "no key named {:?} on key server {}",
                    versioned_name(&kek.name, kek.version),
                    conn.server.label()
                )))
            })
        };
        if kek.uid.is_empty() {
            let uid = by_name(self, conn)?;
            return op(self, conn, &uid);
        }
        match op(self, conn, &kek.uid) {
            Err(OpFail::Server(f))
                if f.reason() == Some(reason::ITEM_NOT_FOUND) && !kek.name.is_empty() =>
            {
                let uid = by_name(self, conn)?;
                if uid == kek.uid {
                    return Err(f.into());
                }
                op(self, conn, &uid)
            }
            other => other,
        }
    }

    pub(super) fn get_key(
        &self,
        conn: &mut Conn,
        kek: &KekRef,
        uid: &str,
    ) -> Result<Secret, OpFail> {
        let name = display_name(kek);
        // Only an Active key may be used (as the server enforces in wrap mode).
        let state = self.state(conn, uid, kek.version)?;
        if state != enums::STATE_ACTIVE {
            let msg = format!(
                "{name} version {} (uid {uid}) on key server {} is {}, not Active",
                kek.version,
                conn.server.label(),
                enums::state_name(state)
            );
            conn.audit("get", &name, Some(kek.version), Err(&msg));
            return Err(OpFail::Fatal(KmsError::KeyNotFound(msg)));
        }
        let res = conn
            .call(Operation::Get, messages::get_raw(uid))
            .and_then(|p| {
                messages::parse_get_symmetric_key(&p).map_err(|e| Failure::Protocol(e.to_string()))
            });
        let key = match res {
            Ok(k) if k.len() == KEK_LEN => k,
            Ok(k) => {
                let msg = format!("the key is {} bits, not AES-256", k.len() * 8);
                conn.audit("get", &name, Some(kek.version), Err(&msg));
                return Err(OpFail::Fatal(KmsError::Protocol(format!(
                    "{name} (uid {uid}) on {}: {msg}",
                    conn.server.label()
                ))));
            }
            Err(f) => {
                conn.audit("get", &name, Some(kek.version), Err(&f.describe()));
                return Err(f.into());
            }
        };
        conn.audit("get", &name, Some(kek.version), Ok(&format!("uid {uid}")));
        Ok(key)
    }

    pub(super) fn check_ref(&self, kek: &KekRef) -> Result<(), KmsError> {
        if kek.provider != "kmip" {
            return Err(KmsError::Config(format!(
                "the volume's key is held by the {} provider ({kek}), but a KMIP key manager is configured",
                kek.provider
            )));
        }
        if kek.uid.is_empty() && kek.name.is_empty() {
            return Err(KmsError::Config(format!(
                "KEK reference {kek} has neither name nor UID"
            )));
        }
        Ok(())
    }
}
