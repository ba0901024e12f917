//! The `[kmip]` section of a volume configuration and building the provider
//! from it.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::KmipProvider;
use super::client::{Client, Policy, ServerEndpoint, Timeouts};
use crate::kms::KmsError;

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

fn ms(v: u64, what: &str) -> Result<Duration, KmsError> {
    if v == 0 || v > 600_000 {
        return Err(KmsError::Config(format!(
            "kmip {what} = {v} is out of range (1..=600000 ms)"
        )));
    }
    Ok(Duration::from_millis(v))
}

pub(super) fn validate_name(name: &str) -> Result<(), KmsError> {
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
}
