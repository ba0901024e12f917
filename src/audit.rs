//! Audit trail of key-manager and HSM operations (SPEC.md section 4).
//!
//! Every provider operation — connect, locate, create, activate, wrap, unwrap,
//! get, revoke, failover, rotation steps — successful or failed, is reported here
//! with [`record`]. Never put key values, key hashes, wrapped keys or data in a
//! record.

/// One audited operation. Fields that do not apply stay empty / `None`.
#[derive(Clone, Debug, Default)]
pub struct AuditRecord {
    /// Operation: `connect`, `locate`, `create`, `activate`, `wrap`, `unwrap`,
    /// `get`, `revoke`, `random`, `failover`, `rotate_*`, ...
    pub op: String,
    /// Key server's configured name (or HSM token label, or key file path).
    pub server: String,
    /// Key server IP address as connected to (empty if never resolved).
    pub ip: String,
    pub port: Option<u16>,
    /// Key name (or UID when no name is known).
    pub key: String,
    pub version: Option<u32>,
    /// `ok` or `fail`.
    pub result: String,
    /// What the server returned (result reason / message), or our error text.
    pub reason: String,
}

/// Records one operation in the audit trail and the log.
pub fn record(rec: &AuditRecord) {
    let port = rec.port.map(|p| p.to_string()).unwrap_or_default();
    let version = rec.version.map(|v| v.to_string()).unwrap_or_default();
    let line = format!(
        "op={} server={} ip={} port={} key={} version={} result={} reason={:?}",
        rec.op, rec.server, rec.ip, port, rec.key, version, rec.result, rec.reason
    );
    if rec.result == "ok" {
        log::info!("{line}");
    } else {
        log::warn!("{line}");
    }
}
