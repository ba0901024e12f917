//! The per-volume TOML configuration (config/kmfs.toml is the annotated example).
//!
//! ```toml
//! provider = "keyfile"          # keyfile | kmip | pkcs11
//! [volume]
//! name = "vol1"
//! plaintext_names = false
//! [keyfile]
//! path = "/etc/kmfs/vol1.key"
//! [log]
//! level = "basic"
//! ```
//!
//! Unknown fields are errors (a typo must not silently change behaviour), and the
//! file itself must pass the credential-file permission checks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::credfile;
use crate::kms::keyfile::KeyfileProvider;
use crate::kms::kmip::{KmipConfig, KmipProvider};
use crate::kms::pkcs11::{Pkcs11Config, Pkcs11Provider};
use crate::kms::{KeyProvider, KmsError};
use crate::logging::LoggingConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Permissions(#[from] credfile::CredFileError),
    #[error("cannot read volume config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error(
        "volume config {path}: provider is \"{provider}\" but there is no [{provider}] section"
    )]
    MissingSection {
        path: PathBuf,
        provider: &'static str,
    },
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Keyfile,
    Kmip,
    Pkcs11,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    /// Name used in logs, the audit trail and the systemd instance.
    #[serde(default)]
    pub name: Option<String>,
    /// Keep file names in plain text (set at init; later changes are ignored).
    #[serde(default)]
    pub plaintext_names: bool,
    /// The volume id (32 hex digits, `kmfs init` writes it): every command
    /// refuses a backing directory whose header names another volume, before
    /// any key is unwrapped.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyfileSection {
    pub path: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSection {
    #[serde(default)]
    pub allow_other: bool,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub provider: ProviderKind,
    #[serde(default)]
    pub volume: VolumeSection,
    #[serde(default)]
    pub keyfile: Option<KeyfileSection>,
    #[serde(default)]
    pub kmip: Option<KmipConfig>,
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Config>,
    #[serde(default)]
    pub log: LoggingConfig,
    #[serde(default)]
    pub mount: MountSection,
    #[serde(skip)]
    pub path: PathBuf,
}

impl VolumeConfig {
    /// Loads and validates a config file (permissions first).
    pub fn load(path: &Path) -> Result<VolumeConfig, ConfigError> {
        credfile::check_private(path, "volume config")?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        VolumeConfig::parse(&text, path)
    }

    /// Parses config text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<VolumeConfig, ConfigError> {
        let mut cfg: VolumeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.message().replace('\n', " "),
        })?;
        cfg.path = path.to_path_buf();
        let missing = |provider| ConfigError::MissingSection {
            path: path.to_path_buf(),
            provider,
        };
        match cfg.provider {
            ProviderKind::Keyfile if cfg.keyfile.is_none() => return Err(missing("keyfile")),
            ProviderKind::Kmip if cfg.kmip.is_none() => return Err(missing("kmip")),
            ProviderKind::Pkcs11 if cfg.pkcs11.is_none() => return Err(missing("pkcs11")),
            _ => {}
        }
        if let Some(id) = &cfg.volume.id
            && parse_volume_id(id).is_none()
        {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                msg: format!("[volume] id {id:?} is not 32 hexadecimal digits"),
            });
        }
        Ok(cfg)
    }

    /// What the config pins the volume to: its id, and the name of the KEK
    /// (KMIP key name, PKCS#11 label) where the config names one.
    pub fn pin(&self) -> crate::volume::Pin {
        crate::volume::Pin {
            volume_id: self.volume.id.as_deref().and_then(parse_volume_id),
            kek_name: match self.provider {
                ProviderKind::Kmip => self.kmip.as_ref().and_then(|k| k.key_name.clone()),
                ProviderKind::Pkcs11 => self.pkcs11.as_ref().map(|p| p.key_label.clone()),
                ProviderKind::Keyfile => None,
            },
            config: Some(self.path.clone()),
        }
    }

    /// Writes `id = "<volume id>"` into the `[volume]` section of the config
    /// file (`kmfs init`), keeping every other line as it is. Atomic
    /// (temporary file, fsync, rename), with the file's mode and owner.
    pub fn record_volume_id(&self, id_hex: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let text = std::fs::read_to_string(&self.path)?;
        let line =
            format!("id = \"{id_hex}\"  # written by kmfs init: the volume this config unlocks");
        let mut out = String::with_capacity(text.len() + line.len() + 12);
        let mut placed = false;
        for l in text.lines() {
            out.push_str(l);
            out.push('\n');
            if !placed && l.trim() == "[volume]" {
                out.push_str(&line);
                out.push('\n');
                placed = true;
            }
        }
        if !placed {
            out.push_str("\n[volume]\n");
            out.push_str(&line);
            out.push('\n');
        }
        // The result must still be a valid config naming this id.
        let check = VolumeConfig::parse(&out, &self.path)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if check.volume.id.as_deref() != Some(id_hex) {
            return Err(std::io::Error::other("could not place the volume id"));
        }
        let md = std::fs::metadata(&self.path)?;
        let tmp = self.path.with_extension("toml.kmfs-tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(md.mode() & 0o7777)
            .open(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::os::unix::fs::chown(&tmp, Some(md.uid()), Some(md.gid()))?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The volume name for logs: configured, or the config file's stem.
    pub fn volume_name(&self) -> String {
        self.volume.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "kmfs".into())
        })
    }

    /// Builds the configured key provider. `backing` lets the keyfile provider
    /// refuse a key stored beside the data.
    pub fn provider(&self, backing: Option<&Path>) -> Result<Box<dyn KeyProvider>, KmsError> {
        match self.provider {
            ProviderKind::Keyfile => {
                let k = self.keyfile.as_ref().expect("checked in parse");
                Ok(Box::new(KeyfileProvider::open(&k.path, backing)?))
            }
            ProviderKind::Kmip => Ok(Box::new(self.kmip_provider()?)),
            ProviderKind::Pkcs11 => {
                let p = self.pkcs11.as_ref().expect("checked in parse");
                Ok(Box::new(Pkcs11Provider::from_config(p)?))
            }
        }
    }

    /// The KMIP provider of a `provider = "kmip"` config (for `keyserver check`).
    pub fn kmip_provider(&self) -> Result<KmipProvider, KmsError> {
        match (&self.provider, &self.kmip) {
            (ProviderKind::Kmip, Some(k)) => KmipProvider::from_config(k),
            _ => Err(KmsError::Config(format!(
                "volume config {}: provider is not kmip; there are no key servers to check",
                self.path.display()
            ))),
        }
    }
}

/// A volume id written as 32 hex digits.
pub fn parse_volume_id(s: &str) -> Option<[u8; 16]> {
    crate::hex::decode(s.trim())?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<VolumeConfig, ConfigError> {
        VolumeConfig::parse(t, Path::new("/etc/kmfs/t.toml"))
    }

    /// The shipped annotated example must stay valid: every documented field
    /// exists, none is misspelt.
    #[test]
    fn annotated_example_parses_with_every_section() {
        let c = VolumeConfig::parse(include_str!("../config/kmfs.toml"), Path::new("kmfs.toml"))
            .unwrap();
        assert_eq!(c.volume_name(), "vol1");
        let k = c.kmip.expect("kmip section");
        assert_eq!(k.servers.len(), 2);
        assert!(c.pkcs11.is_some());
        assert!(c.keyfile.is_some());
        assert!(c.log.file.is_some());
    }

    #[test]
    fn minimal_keyfile_config() {
        let c = parse("provider = \"keyfile\"\n[keyfile]\npath = \"/k\"\n").unwrap();
        assert_eq!(c.provider, ProviderKind::Keyfile);
        assert_eq!(c.volume_name(), "t");
    }

    #[test]
    fn unknown_fields_and_missing_values_are_named() {
        let e = parse("provider = \"keyfile\"\nkeyfle = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keyfle") && e.contains("t.toml"), "{e}");
        let e = parse("[keyfile]\npath = \"/k\"\n").unwrap_err().to_string();
        assert!(e.contains("provider"), "{e}");
        let e = parse("provider = \"keyfile\"\n").unwrap_err().to_string();
        assert!(e.contains("[keyfile]"), "{e}");
        let e = parse("provider = \"vault\"\n").unwrap_err().to_string();
        assert!(e.contains("vault"), "{e}");
        let e = parse("provider = \"keyfile\"\n[keyfile]\npath = \"/k\"\n[volume]\nnmae = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nmae"), "{e}");
    }

    #[test]
    fn config_with_loose_permissions_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.toml");
        std::fs::write(&p, "provider = \"keyfile\"\n[keyfile]\npath = \"/k\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = VolumeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("volume config") && e.contains("0644"), "{e}");
    }
}
