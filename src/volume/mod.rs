//! The on-disk format and opening a volume: volume header, per-file layout,
//! block I/O, directory ids.
//!
//! [`Volume::init`] creates a volume in an empty backing directory;
//! [`Volume::open`] reads its header, has the key provider unwrap the DEK,
//! authenticates the header and derives the subkeys the filesystem needs.

pub mod content;
pub mod dirid;
pub mod header;
pub mod layout;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crypto::content::ContentCipher;
use crate::crypto::keys::Secret;
use crate::crypto::names::NameCipher;
use crate::kms::{KeyProvider, KmsError, generate_dek};
use header::{HeaderError, VolumeHeader};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0} already holds a kmfs volume")]
    AlreadyInitialized(PathBuf),
    #[error("{0} is not empty; kmfs init needs an empty backing directory")]
    NotEmpty(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "the volume's key is held by the {header} provider ({kek}), but the {given} provider was configured"
    )]
    ProviderMismatch {
        header: String,
        kek: String,
        given: &'static str,
    },
}

/// Options chosen when a volume is created.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Keep file names in plain text (no name encryption).
    pub plaintext_names: bool,
}

/// The keys of an open volume, as the filesystem layer needs them.
pub struct VolumeKeys {
    pub content: ContentCipher,
    pub names: NameCipher,
    /// Key for extended-attribute values (AES-256-GCM).
    pub metadata: Secret,
}

/// What the filesystem layer needs of an unlocked volume. None of it changes
/// while mounted (rotation re-wraps the DEK but keeps it), so it is shared
/// without locking; the [`Volume`] itself stays with the daemon's control side.
pub struct VolumeView {
    pub backing: PathBuf,
    pub plaintext_names: bool,
    pub keys: Arc<VolumeKeys>,
    id_hex: String,
}

impl VolumeView {
    pub fn id_hex(&self) -> &str {
        &self.id_hex
    }
}

/// An unlocked volume.
pub struct Volume {
    pub backing: PathBuf,
    pub header: VolumeHeader,
    /// Shared with the filesystem layer; rotation never changes them.
    pub keys: Arc<VolumeKeys>,
    dek: Secret,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { path, what, source }
}

fn derive_keys(dek: &Secret, volume_id: &[u8; 16]) -> Arc<VolumeKeys> {
    use crate::crypto::keys::{derive, labels};
    Arc::new(VolumeKeys {
        content: ContentCipher::new(dek, volume_id),
        names: NameCipher::new(dek, volume_id),
        metadata: derive(dek, volume_id, labels::METADATA_GCM, 32),
    })
}

/// Reads and checksums the header of `backing` without any key.
pub fn read_header(backing: &Path) -> Result<(VolumeHeader, Vec<u8>), VolumeError> {
    let path = header::header_path(backing);
    let bytes = header::read_file(&path)?;
    let h = VolumeHeader::decode(&bytes, &path)?;
    Ok((h, bytes))
}

impl Volume {
    /// Creates a new volume in the empty directory `backing`.
    pub fn init(
        backing: &Path,
        provider: &dyn KeyProvider,
        opts: &InitOptions,
    ) -> Result<Volume, VolumeError> {
        let md = std::fs::metadata(backing)
            .map_err(io_err(backing, "cannot open the backing directory"))?;
        if !md.is_dir() {
            return Err(VolumeError::NotADirectory(backing.to_path_buf()));
        }
        if header::header_path(backing).exists() {
            return Err(VolumeError::AlreadyInitialized(backing.to_path_buf()));
        }
        let mut entries = std::fs::read_dir(backing)
            .map_err(io_err(backing, "cannot list the backing directory"))?;
        if entries.any(|e| e.map(|e| e.file_name() != "lost+found").unwrap_or(true)) {
            return Err(VolumeError::NotEmpty(backing.to_path_buf()));
        }
        let kek = provider.current_kek()?;
        let dek = generate_dek(provider)?;
        let mut volume_id = [0u8; 16];
        getrandom::fill(&mut volume_id)
            .map_err(|e| io_err(backing, "random generator failed")(std::io::Error::other(e)))?;
        let wrapped_dek = provider.wrap(&kek, &dek, &header::dek_aad(&volume_id))?;
        // Prove the wrap before anything is written.
        let check = provider.unwrap(&kek, &wrapped_dek, &header::dek_aad(&volume_id))?;
        if !check.ct_eq(&dek) {
            return Err(KmsError::Protocol(
                "the key manager unwrapped a different key than it wrapped".into(),
            )
            .into());
        }
        let now = now_secs();
        let hdr = VolumeHeader {
            flags: if opts.plaintext_names {
                header::FLAG_PLAINTEXT_NAMES
            } else {
                0
            },
            suite: header::SUITE_XTS_SIV_V1,
            block_size: crate::crypto::content::BLOCK as u32,
            volume_id,
            created: now,
            updated: now,
            kek,
            wrapped_dek,
            history: Vec::new(),
        };
        if !opts.plaintext_names {
            dirid::create(backing)
                .map_err(io_err(backing, "cannot write the root directory id"))?;
        }
        header::store(backing, &hdr.encode(&dek))?;
        let keys = derive_keys(&dek, &volume_id);
        Ok(Volume {
            backing: backing.to_path_buf(),
            header: hdr,
            keys,
            dek,
        })
    }

    /// Opens the volume in `backing`: unwraps the DEK with `provider`, checks the
    /// header's authentication tag and derives the subkeys.
    pub fn open(backing: &Path, provider: &dyn KeyProvider) -> Result<Volume, VolumeError> {
        let (hdr, bytes) = read_header(backing)?;
        if hdr.kek.provider != provider.kind() {
            return Err(VolumeError::ProviderMismatch {
                header: hdr.kek.provider.clone(),
                kek: hdr.kek.to_string(),
                given: provider.kind(),
            });
        }
        let dek = provider.unwrap(&hdr.kek, &hdr.wrapped_dek, &header::dek_aad(&hdr.volume_id))?;
        VolumeHeader::verify(&bytes, &hdr.volume_id, &dek, &header::header_path(backing))?;
        let keys = derive_keys(&dek, &hdr.volume_id);
        Ok(Volume {
            backing: backing.to_path_buf(),
            header: hdr,
            keys,
            dek,
        })
    }

    /// The filesystem layer's share of this volume.
    pub fn view(&self) -> VolumeView {
        VolumeView {
            backing: self.backing.clone(),
            plaintext_names: self.header.plaintext_names(),
            keys: self.keys.clone(),
            id_hex: self.id_hex(),
        }
    }

    /// The volume id as lowercase hex.
    pub fn id_hex(&self) -> String {
        hex(&self.header.volume_id)
    }

    /// Re-authenticates and stores a modified header (used by rotation/restore).
    pub fn store_header(&mut self, hdr: VolumeHeader) -> Result<(), VolumeError> {
        header::store(&self.backing, &hdr.encode(&self.dek))?;
        self.header = hdr;
        Ok(())
    }

    /// The DEK, for re-wrapping under a new KEK during rotation.
    pub fn dek(&self) -> &Secret {
        &self.dek
    }
}

/// Lowercase hex of non-secret bytes (ids).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
