//! `kmfs keyserver check`: each configured key server checked on its own.

use std::time::Instant;

use serde::Serialize;

use super::KmipProvider;
use super::client::{self, Conn, OpFail, ServerEndpoint};
use super::messages::{self, Operation, enums};
use crate::kms::KmsError;

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

impl KmipProvider {
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
}
