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

mod client;
pub mod messages;
pub mod ttlv;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::client::{Client, Conn, Failure, OpFail, Policy, ServerEndpoint, Timeouts};
use self::messages::{GCM_TAG_LEN, Operation, enums, reason};
use super::{KekRef, KeyProvider, KmsError, blob};
use crate::crypto::keys::Secret;

const KEK_LEN: usize = 32;
/// Highest version probed when looking for the newest one.
const MAX_VERSION: u32 = 100_000;

/// How the KEK is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmipMode {
    /// Encrypt/Decrypt on the key manager; the KEK never leaves it.
    #[default]
    Wrap,
    /// Get the KEK and wrap locally (servers without Encrypt/Decrypt).
    Get,
}

fn default_port() -> u16 {
    5696
}
fn default_connect_timeout() -> u64 {
    3000
}
fn default_read_timeout() -> u64 {
    5000
}
fn default_retry_delay() -> u64 {
    500
}
fn default_cycles() -> u32 {
    2
}

/// One key server (`[[kmip.server]]`). The first one listed is the primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmipServerConfig {
    /// Name used in logs, the audit trail and messages.
    pub name: String,
    /// Host name or IP address; the server certificate must be valid for it.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// PEM file with the CA certificate(s) that sign the server certificate.
    pub ca: PathBuf,
    /// PEM client certificate (chain) presented to the server.
    pub client_cert: PathBuf,
    /// PEM private key of the client certificate (must be private: mode 0600).
    pub client_key: PathBuf,
    /// Optional KMIP Credential user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the KMIP Credential password (must be private).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// The `[kmip]` section of a volume configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmipConfig {
    /// KEK name (found with Locate); see the module docs for versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// KEK Unique Identifier, instead of (or in addition to) the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_uid: Option<String>,
    /// KEK version; without it the newest version of `key_name` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default)]
    pub mode: KmipMode,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_read_timeout")]
    pub read_timeout_ms: u64,
    /// Pause before trying the next server after a failure.
    #[serde(default = "default_retry_delay")]
    pub retry_delay_ms: u64,
    /// How many times the whole server list is tried.
    #[serde(default = "default_cycles")]
    pub failover_cycles: u32,
    /// Key servers, primary first.
    #[serde(rename = "server", default)]
    pub servers: Vec<KmipServerConfig>,
}

/// Result of checking one key server (`kmfs keyserver check`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerCheck {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// IP address connected to.
    pub ip: Option<String>,
    /// TCP connect and TLS handshake succeeded.
    pub tls_ok: bool,
    /// Time for TCP connect + TLS handshake.
    pub connect_ms: Option<u64>,
    /// Protocol versions the server offers (Discover Versions), e.g. "1.4".
    pub kmip_versions: Vec<String>,
    /// Whether the server speaks KMIP 1.4, which kmfs uses.
    pub kmip_1_4: bool,
    /// Vendor identification (Query).
    pub vendor: Option<String>,
    /// Round-trip time of one Discover Versions request, in microseconds.
    pub rtt_us: Option<u64>,
    /// The configured KEK as resolved on this server ("name vN uid U").
    pub kek: Option<String>,
    /// KEK state name (Active, Deactivated, ...).
    pub kek_state: Option<String>,
    /// The first problem found, if any.
    pub error: Option<String>,
}

impl ServerCheck {
    /// Reachable, TLS and KMIP 1.4 fine, and the KEK (if configured) is Active.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

impl std::fmt::Display for ServerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}:{}) ip={} tls={} kmip=[{}] vendor={:?} rtt={} kek={} state={} result={}",
            self.name,
            self.host,
            self.port,
            self.ip.as_deref().unwrap_or("-"),
            if self.tls_ok { "ok" } else { "fail" },
            self.kmip_versions.join(","),
            self.vendor.as_deref().unwrap_or("-"),
            self.rtt_us
                .map(|u| format!("{:.1}ms", u as f64 / 1000.0))
                .unwrap_or("-".into()),
            self.kek.as_deref().unwrap_or("-"),
            self.kek_state.as_deref().unwrap_or("-"),
            match &self.error {
                None => "ok".to_string(),
                Some(e) => format!("FAIL: {e}"),
            }
        )
    }
}

/// A KEK reference resolved on one server.
struct Resolved {
    uid: String,
    version: u32,
}

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

fn ms(v: u64, what: &str) -> Result<Duration, KmsError> {
    if v == 0 || v > 600_000 {
        return Err(KmsError::Config(format!(
            "kmip {what} = {v} is out of range (1..=600000 ms)"
        )));
    }
    Ok(Duration::from_millis(v))
}

fn validate_name(name: &str) -> Result<(), KmsError> {
    if name.trim().is_empty() || name.contains('#') || name.chars().any(char::is_control) {
        return Err(KmsError::Config(format!(
            "KMIP key name {name:?} is not valid: it must be non-empty and must not contain '#' (used for key versions) or control characters"
        )));
    }
    Ok(())
}

impl KmipProvider {
    /// Builds the provider: checks the configuration, loads certificates and
    /// keys (the client key and password files must be private). Does not
    /// contact any server.
    pub fn from_config(cfg: &KmipConfig) -> Result<KmipProvider, KmsError> {
        if cfg.servers.is_empty() {
            return Err(KmsError::Config(
                "kmip: no key server configured (add a [[kmip.server]] section)".into(),
            ));
        }
        if let Some(n) = &cfg.key_name {
            validate_name(n)?;
        }
        if cfg.key_uid.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return Err(KmsError::Config("kmip key_uid must not be empty".into()));
        }
        if cfg.key_version == Some(0) {
            return Err(KmsError::Config("kmip key_version starts at 1".into()));
        }
        if cfg.failover_cycles == 0 || cfg.failover_cycles > 100 {
            return Err(KmsError::Config(format!(
                "kmip failover_cycles = {} is out of range (1..=100)",
                cfg.failover_cycles
            )));
        }
        let policy = Policy {
            timeouts: Timeouts {
                connect: ms(cfg.connect_timeout_ms, "connect_timeout_ms")?,
                read: ms(cfg.read_timeout_ms, "read_timeout_ms")?,
            },
            retry_delay: if cfg.retry_delay_ms > 60_000 {
                return Err(KmsError::Config(
                    "kmip retry_delay_ms must be at most 60000".into(),
                ));
            } else {
                Duration::from_millis(cfg.retry_delay_ms)
            },
            cycles: cfg.failover_cycles,
        };
        let mut servers = Vec::new();
        for s in &cfg.servers {
            if servers.iter().any(|e: &ServerEndpoint| e.name == s.name) {
                return Err(KmsError::Config(format!(
                    "kmip: two key servers are named {:?}",
                    s.name
                )));
            }
            servers.push(ServerEndpoint::load(s)?);
        }
        Ok(KmipProvider {
            key_name: cfg.key_name.clone(),
            key_uid: cfg.key_uid.clone(),
            key_version: cfg.key_version,
            mode: cfg.mode,
            client: Client { servers, policy },
            current: Mutex::new(None),
            rng_unsupported: AtomicBool::new(false),
        })
    }

    /// The name used in audit records for the configured key.
    fn audit_key(&self) -> String {
        self.key_name
            .clone()
            .or_else(|| self.key_uid.clone())
            .unwrap_or_default()
    }

    /// Checks every configured server on its own (no failover): TCP + TLS,
    /// Discover Versions (round-trip time), Query (vendor) and, if a key is
    /// configured, that the KEK exists there and is Active.
    pub fn check(&self) -> Result<Vec<ServerCheck>, KmsError> {
        Ok(self
            .client
            .servers
            .iter()
            .map(|s| self.check_one(s))
            .collect())
    }

    fn check_one(&self, server: &ServerEndpoint) -> ServerCheck {
        let mut out = ServerCheck {
            name: server.name.clone(),
            host: server.host.clone(),
            port: server.port,
            ..Default::default()
        };
        let key = self.audit_key();
        let t0 = Instant::now();
        let mut conn = match Conn::open(server, self.client.policy.timeouts) {
            Ok(c) => c,
            Err((ip, f)) => {
                out.ip = ip.map(|i| i.to_string());
                out.error = Some(f.describe());
                client::record("check", Some(server), ip, &key, None, Err(&f.describe()));
                return out;
            }
        };
        out.ip = Some(conn.ip.to_string());
        out.tls_ok = true;
        out.connect_ms = Some(t0.elapsed().as_millis() as u64);
        let res = (|| -> Result<(), String> {
            let t1 = Instant::now();
            let p = conn
                .call(Operation::DiscoverVersions, messages::discover_versions())
                .map_err(|f| f.describe())?;
            out.rtt_us = Some(t1.elapsed().as_micros() as u64);
            out.kmip_versions = messages::parse_versions(&p).map_err(|e| e.to_string())?;
            out.kmip_1_4 = out.kmip_versions.iter().any(|v| v == "1.4");
            if let Ok(p) = conn.call(Operation::Query, messages::query_server_information()) {
                out.vendor = messages::parse_vendor(&p);
            }
            if !out.kmip_1_4 {
                return Err(format!(
                    "server does not offer KMIP 1.4 (offers {})",
                    out.kmip_versions.join(", ")
                ));
            }
            if self.key_name.is_some() || self.key_uid.is_some() {
                let r = self.resolve_configured(&mut conn).map_err(|e| match e {
                    OpFail::Server(f) => f.describe(),
                    OpFail::Fatal(e) => e.to_string(),
                })?;
                out.kek = Some(format!("{} v{} uid {}", key, r.version, r.uid));
                let state = self
                    .state(&mut conn, &r.uid, r.version)
                    .map_err(|f| f.describe())?;
                out.kek_state = Some(enums::state_name(state).to_string());
                if state != enums::STATE_ACTIVE {
                    return Err(format!(
                        "key {key} is {}, not Active",
                        enums::state_name(state)
                    ));
                }
            }
            Ok(())
        })();
        match res {
            Ok(()) => conn.audit(
                "check",
                &key,
                None,
                Ok(&format!("kmip {}", out.kmip_versions.join(","))),
            ),
            Err(e) => {
                conn.audit("check", &key, None, Err(&e));
                out.error = Some(e);
            }
        }
        out
    }

    // ---- operations on one connection ----

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
    fn latest(&self, conn: &mut Conn, name: &str) -> Result<Option<Resolved>, Failure> {
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
    fn resolve_configured(&self, conn: &mut Conn) -> Result<Resolved, OpFail> {
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

    fn state(&self, conn: &mut Conn, uid: &str, version: u32) -> Result<u32, Failure> {
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

    fn activate(
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
    fn create(&self, conn: &mut Conn, name: &str, version: u32) -> Result<KekRef, Failure> {
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
    fn explain_denied(&self, conn: &mut Conn, kek: &KekRef, uid: &str, f: Failure) -> OpFail {
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
    fn with_uid<T>(
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

    fn get_key(&self, conn: &mut Conn, kek: &KekRef, uid: &str) -> Result<Secret, OpFail> {
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

    fn check_ref(&self, kek: &KekRef) -> Result<(), KmsError> {
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
        if let Some(k) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
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
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(kek.clone());
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
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
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
    fn config_toml_shape_and_defaults() {
        let toml_text = r#"
            key_name = "vol1-kek"
            key_version = 2
            mode = "get"
            retry_delay_ms = 100
            [[server]]
            name = "km1"
            host = "127.0.0.1"
            ca = "/etc/kmfs/ca.pem"
            client_cert = "/etc/kmfs/client.pem"
            client_key = "/etc/kmfs/client.key"
            [[server]]
            name = "km2"
            host = "km2.example.com"
            port = 15696
            ca = "/etc/kmfs/ca.pem"
            client_cert = "/etc/kmfs/client.pem"
            client_key = "/etc/kmfs/client.key"
            username = "kmfs"
            password_file = "/etc/kmfs/kmip.pw"
        "#;
        let c: KmipConfig = toml::from_str(toml_text).unwrap();
        assert_eq!(c.mode, KmipMode::Get);
        assert_eq!(c.key_version, Some(2));
        assert_eq!(
            (
                c.connect_timeout_ms,
                c.read_timeout_ms,
                c.retry_delay_ms,
                c.failover_cycles
            ),
            (3000, 5000, 100, 2)
        );
        assert_eq!(c.servers[0].port, 5696);
        assert_eq!(c.servers[1].port, 15696);
        assert_eq!(c.servers[1].username.as_deref(), Some("kmfs"));
        let again: KmipConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);

        let e = toml::from_str::<KmipConfig>("key_name = \"a\"\nverify = false\n").unwrap_err();
        assert!(e.to_string().contains("verify"), "{e}");
        let e = toml::from_str::<KmipConfig>("mode = \"local\"\n").unwrap_err();
        assert!(e.to_string().contains("local"), "{e}");
    }

    #[test]
    fn config_validation_messages() {
        let mut c: KmipConfig = toml::from_str("key_name = \"k\"").unwrap();
        let e = KmipProvider::from_config(&c).err().unwrap().to_string();
        assert!(e.contains("no key server"), "{e}");
        c.servers.push(KmipServerConfig {
            name: "km1".into(),
            host: "127.0.0.1".into(),
            port: 5696,
            ca: "/nonexistent/ca.pem".into(),
            client_cert: "/nonexistent/c.pem".into(),
            client_key: "/nonexistent/c.key".into(),
            username: None,
            password_file: None,
        });
        let e = KmipProvider::from_config(&c).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        c.key_name = Some("bad#name".into());
        let e = KmipProvider::from_config(&c).err().unwrap().to_string();
        assert!(e.contains("'#'"), "{e}");
        c.key_name = Some("k".into());
        c.failover_cycles = 0;
        assert!(KmipProvider::from_config(&c).is_err());
    }

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
