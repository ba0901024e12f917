//! The `[pkcs11]` section of a volume config and reading the user PIN.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::credfile;
use crate::crypto::keys::Secret;
use crate::kms::KmsError;

/// Upper bound for a PIN file (PINs are short; refuse to read a huge file).
const MAX_PIN_LEN: u64 = 4096;

/// How the KEK is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pkcs11Mode {
    /// AES-GCM inside the token; the KEK never leaves it (default).
    #[default]
    Wrap,
    /// Fetch an extractable KEK and use it locally (only when configured).
    Extract,
}

impl Pkcs11Mode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Pkcs11Mode::Wrap => "wrap",
            Pkcs11Mode::Extract => "extract",
        }
    }
}

/// The `[pkcs11]` section of a volume config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Absolute path of the PKCS#11 module (shared library). Required.
    pub module: PathBuf,
    /// Token label (exactly one of `token_label` and `slot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_label: Option<String>,
    /// Slot id (exactly one of `token_label` and `slot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// File holding the user PIN (owned by root, mode 0600 or stricter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    /// Name of a systemd credential holding the PIN (`$CREDENTIALS_DIRECTORY/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_credential: Option<String>,
    /// Label of the KEK (its version 1).
    pub key_label: String,
    /// KEK version for new wraps; default: the newest on the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// `wrap` (default) or `extract`.
    #[serde(default)]
    pub mode: Pkcs11Mode,
}

/// Reads the PIN from `pin_file` or the systemd credential.
pub(super) fn read_pin(cfg: &Pkcs11Config) -> Result<Secret, KmsError> {
    let (path, what) = match (&cfg.pin_file, &cfg.pin_credential) {
        (Some(p), None) => (p.clone(), "HSM PIN file"),
        (None, Some(name)) => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(KmsError::Config(format!(
                    "pkcs11: pin_credential {name:?} is not a valid credential name"
                )));
            }
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                KmsError::Config(format!(
                    "pkcs11: pin_credential \"{name}\" is configured but $CREDENTIALS_DIRECTORY is not set (run kmfs from a systemd unit with LoadCredential={name}:... or use pin_file)"
                ))
            })?;
            (PathBuf::from(dir).join(name), "HSM PIN credential")
        }
        (Some(_), Some(_)) => {
            return Err(KmsError::Config(
                "pkcs11: set either pin_file or pin_credential, not both".into(),
            ));
        }
        (None, None) => {
            return Err(KmsError::Config(
                "pkcs11: no PIN configured: set pin_file or pin_credential".into(),
            ));
        }
    };
    credfile::check_private(&path, what).map_err(|e| KmsError::Config(e.to_string()))?;
    let shown = path.display();
    let len = std::fs::metadata(&path)
        .map_err(|e| KmsError::Config(format!("cannot read {what} {shown}: {e}")))?
        .len();
    if len > MAX_PIN_LEN {
        return Err(KmsError::Config(format!(
            "{what} {shown} is {len} bytes long; it must hold only the PIN"
        )));
    }
    let raw = Secret::from_vec(
        std::fs::read(&path)
            .map_err(|e| KmsError::Config(format!("cannot read {what} {shown}: {e}")))?,
    );
    let bytes = raw.as_bytes();
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    if end == 0 {
        return Err(KmsError::Config(format!("{what} {shown} is empty")));
    }
    Ok(Secret::from_slice(&bytes[..end]))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::kms::pkcs11::Pkcs11Provider;

    #[test]
    fn config_parses_and_refuses_unknown_fields() {
        let c: Pkcs11Config = toml::from_str(
            r#"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token_label = "kmfs"
            pin_file = "/etc/kmfs/pin"
            key_label = "vol1-kek"
            "#,
        )
        .unwrap();
        assert_eq!(c.mode, Pkcs11Mode::Wrap);
        assert_eq!(c.key_version, None);
        let back: Pkcs11Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let c: Pkcs11Config = toml::from_str(
            "module = \"/m.so\"\nslot = 3\npin_credential = \"pin\"\nkey_label = \"k\"\nkey_version = 2\nmode = \"extract\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.slot, c.key_version, c.mode),
            (Some(3), Some(2), Pkcs11Mode::Extract)
        );
        let e = toml::from_str::<Pkcs11Config>(
            "module = \"/m.so\"\ntoken_label = \"t\"\npin_file = \"/p\"\nkey_label = \"k\"\npin = \"1234\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("pin"), "{e}");
        assert!(
            toml::from_str::<Pkcs11Config>("token_label = \"t\"\nkey_label = \"k\"\n").is_err(),
            "module is required"
        );
        assert!(
            toml::from_str::<Pkcs11Config>(
                "module = \"/m.so\"\ntoken_label = \"t\"\npin_file = \"/p\"\nkey_label = \"k\"\nmode = \"copy\"\n"
            )
            .is_err()
        );
    }

    fn cfg() -> Pkcs11Config {
        Pkcs11Config {
            module: "/nonexistent/libpkcs11.so".into(),
            token_label: Some("t".into()),
            slot: None,
            pin_file: Some("/nonexistent/pin".into()),
            pin_credential: None,
            key_label: "k".into(),
            key_version: None,
            mode: Pkcs11Mode::Wrap,
        }
    }

    #[test]
    fn config_errors_are_clear() {
        let msg = |c: &Pkcs11Config| Pkcs11Provider::from_config(c).err().unwrap().to_string();
        let mut c = cfg();
        c.slot = Some(1);
        assert!(msg(&c).contains("exactly one of token_label and slot"));
        let mut c = cfg();
        c.pin_credential = Some("x".into());
        assert!(msg(&c).contains("exactly one of pin_file and pin_credential"));
        let mut c = cfg();
        c.key_version = Some(0);
        assert!(msg(&c).contains("key_version"));
        let m = msg(&cfg());
        assert!(
            m.contains("HSM PIN file") && m.contains("/nonexistent/pin"),
            "{m}"
        );

        let d = tempfile::tempdir().unwrap();
        let pin = d.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = cfg();
        c.pin_file = Some(pin.clone());
        let m = msg(&c);
        assert!(m.contains("/nonexistent/libpkcs11.so"), "{m}");
        c.module = "relative/lib.so".into();
        assert!(msg(&c).contains("absolute"));

        std::fs::write(&pin, "\n").unwrap();
        let mut c = cfg();
        c.pin_file = Some(pin);
        assert!(msg(&c).contains("empty"));
    }
}
