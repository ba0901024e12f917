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
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crypto::content::ContentCipher;
use crate::crypto::keys::Secret;
use crate::crypto::names::NameCipher;
use crate::kms::{KekRef, KeyProvider, KmsError, generate_dek};
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

/// The content ciphers of every DEK generation the volume holds, and which
/// one new files use. A rekey adds a generation while mounted; ciphers of
/// retired generations stay in memory until unmount, for files that were
/// unlinked while open and so were out of the rekey's reach.
pub struct ContentKeys {
    inner: RwLock<ContentInner>,
}

struct ContentInner {
    active: u16,
    ciphers: Vec<(u16, Arc<ContentCipher>)>,
}

impl ContentKeys {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, ContentInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ContentInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation new files are written with.
    pub fn active(&self) -> u16 {
        self.read().active
    }

    /// Runs `f` (which writes a new file's header) with the active
    /// generation, holding it: a [`Self::barrier`] waits for `f` to finish.
    pub fn with_active<R>(&self, f: impl FnOnce(u16) -> R) -> R {
        let g = self.read();
        f(g.active)
    }

    /// Waits until every [`Self::with_active`] that began before it has
    /// finished: after a generation switch, no header can still be written
    /// with the old active generation once this returns.
    pub fn barrier(&self) {
        drop(self.write());
    }

    /// The cipher of generation `g`, if this volume holds it.
    pub fn get(&self, g: u16) -> Option<Arc<ContentCipher>> {
        self.read()
            .ciphers
            .iter()
            .find(|(x, _)| *x == g)
            .map(|(_, c)| c.clone())
    }

    fn add(&self, g: u16, c: ContentCipher) {
        let mut w = self.write();
        if !w.ciphers.iter().any(|(x, _)| *x == g) {
            w.ciphers.push((g, Arc::new(c)));
        }
    }

    fn set_active(&self, g: u16) {
        self.write().active = g;
    }
}

/// The keys of an open volume, as the filesystem layer needs them.
pub struct VolumeKeys {
    pub content: ContentKeys,
    pub names: NameCipher,
    /// Key for extended-attribute values (AES-256-GCM).
    pub metadata: Secret,
}

/// What the filesystem layer needs of an unlocked volume. The keys are shared
/// without a lock around them; only the content generations change while
/// mounted (a rekey adds one), behind [`ContentKeys`]'s own lock. The
/// [`Volume`] itself stays with the daemon's control side.
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

/// Length of the metadata key set: names AES-SIV key (64) ‖ metadata
/// AES-256-GCM key (32) ‖ header HMAC key (32).
pub const META_LEN: usize = 128;

/// An unlocked volume.
pub struct Volume {
    pub backing: PathBuf,
    pub header: VolumeHeader,
    /// Shared with the filesystem layer.
    pub keys: Arc<VolumeKeys>,
    /// The metadata key set (see [`META_LEN`]); never changes.
    meta: Secret,
    /// The DEK of every generation in the header, in the header's order.
    deks: Vec<(u16, Secret)>,
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

/// The metadata key set of a volume whose first DEK is `dek0`. Volumes that
/// began as version 1 derive every subkey from their first DEK, so version 2
/// derives the metadata keys the same way once, then stores them wrapped:
/// names written under either version decrypt alike.
fn meta_from_dek0(dek0: &Secret, volume_id: &[u8; 16]) -> Secret {
    use crate::crypto::keys::{derive, labels};
    let mut m = Secret::zeroed(META_LEN);
    let parts = [
        derive(dek0, volume_id, labels::NAMES_SIV, 64),
        derive(dek0, volume_id, labels::METADATA_GCM, 32),
        derive(dek0, volume_id, labels::HEADER_MAC, 32),
    ];
    let mut at = 0;
    for p in &parts {
        m.as_mut_bytes()[at..at + p.len()].copy_from_slice(p.as_bytes());
        at += p.len();
    }
    m
}

fn mac_key_of(meta: &Secret) -> Secret {
    Secret::from_slice(&meta.as_bytes()[96..128])
}

fn derive_keys(
    meta: &Secret,
    deks: &[(u16, Secret)],
    active: u16,
    volume_id: &[u8; 16],
) -> Arc<VolumeKeys> {
    let ciphers = deks
        .iter()
        .map(|(g, d)| (*g, Arc::new(ContentCipher::new(d, volume_id))))
        .collect();
    Arc::new(VolumeKeys {
        content: ContentKeys {
            inner: RwLock::new(ContentInner { active, ciphers }),
        },
        names: NameCipher::from_key(Secret::from_slice(&meta.as_bytes()[..64])),
        metadata: Secret::from_slice(&meta.as_bytes()[64..96]),
    })
}

/// Wraps `key` under `kek` and proves the wrap by unwrapping it.
fn wrap_verified(
    provider: &dyn KeyProvider,
    kek: &KekRef,
    key: &Secret,
    aad: &[u8],
) -> Result<Vec<u8>, KmsError> {
    let wrapped = provider.wrap(kek, key, aad)?;
    let check = provider.unwrap(kek, &wrapped, aad)?;
    if !check.ct_eq(key) {
        return Err(KmsError::VerifyMismatch);
    }
    Ok(wrapped)
}

/// The keys of a header, unwrapped by `provider` and the header's MAC checked.
/// `bytes` are the exact bytes `hdr` was decoded from; `path` is for messages.
pub fn unlock(
    hdr: &VolumeHeader,
    bytes: &[u8],
    provider: &dyn KeyProvider,
    path: &Path,
) -> Result<(Secret, Vec<(u16, Secret)>), VolumeError> {
    let vid = &hdr.volume_id;
    if hdr.version == header::VERSION_1 {
        let g = &hdr.generations[0];
        let dek = provider.unwrap(&hdr.kek, &g.wrapped, &header::dek_aad(vid, 0))?;
        VolumeHeader::verify(bytes, &header::v1_mac_key(&dek, vid), path)?;
        return Ok((meta_from_dek0(&dek, vid), vec![(0, dek)]));
    }
    let meta = provider.unwrap(&hdr.kek, &hdr.wrapped_meta, &header::meta_aad(vid))?;
    if meta.len() != META_LEN {
        return Err(HeaderError::BadMac(path.to_path_buf()).into());
    }
    VolumeHeader::verify(bytes, &mac_key_of(&meta), path)?;
    let mut deks = Vec::with_capacity(hdr.generations.len());
    for g in &hdr.generations {
        let aad = header::dek_aad(vid, g.generation);
        deks.push((g.generation, provider.unwrap(&hdr.kek, &g.wrapped, &aad)?));
    }
    Ok((meta, deks))
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
        let meta = meta_from_dek0(&dek, &volume_id);
        // Prove every wrap before anything is written.
        let wrapped_dek = wrap_verified(provider, &kek, &dek, &header::dek_aad(&volume_id, 0))?;
        let wrapped_meta = wrap_verified(provider, &kek, &meta, &header::meta_aad(&volume_id))?;
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
            wrapped_meta,
            active: 0,
            generations: vec![header::DekGeneration {
                generation: 0,
                created: now,
                wrapped: wrapped_dek,
            }],
            history: Vec::new(),
            version: header::VERSION,
        };
        if !opts.plaintext_names {
            dirid::create(backing)
                .map_err(io_err(backing, "cannot write the root directory id"))?;
        }
        header::store(backing, &hdr.encode(&mac_key_of(&meta)))?;
        let deks = vec![(0, dek)];
        let keys = derive_keys(&meta, &deks, 0, &volume_id);
        Ok(Volume {
            backing: backing.to_path_buf(),
            header: hdr,
            keys,
            meta,
            deks,
        })
    }

    /// Opens the volume in `backing`: unwraps its keys with `provider`, checks
    /// the header's authentication tag and derives the subkeys.
    pub fn open(backing: &Path, provider: &dyn KeyProvider) -> Result<Volume, VolumeError> {
        let (hdr, bytes) = read_header(backing)?;
        if hdr.kek.provider != provider.kind() {
            return Err(VolumeError::ProviderMismatch {
                header: hdr.kek.provider.clone(),
                kek: hdr.kek.to_string(),
                given: provider.kind(),
            });
        }
        let (meta, deks) = unlock(&hdr, &bytes, provider, &header::header_path(backing))?;
        let keys = derive_keys(&meta, &deks, hdr.active, &hdr.volume_id);
        Ok(Volume {
            backing: backing.to_path_buf(),
            header: hdr,
            keys,
            meta,
            deks,
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

    /// Authenticates and stores a modified header (rotation, rekey).
    pub fn store_header(&mut self, hdr: VolumeHeader) -> Result<(), VolumeError> {
        header::store(&self.backing, &hdr.encode(&mac_key_of(&self.meta)))?;
        self.header = hdr;
        self.header.version = header::VERSION;
        Ok(())
    }

    /// The DEK of the active generation.
    pub fn dek(&self) -> &Secret {
        self.dek_of(self.header.active)
            .expect("the active generation is always unwrapped")
    }

    /// The DEK of generation `g`, if the header holds it.
    pub fn dek_of(&self, g: u16) -> Option<&Secret> {
        self.deks.iter().find(|(x, _)| *x == g).map(|(_, d)| d)
    }

    /// The metadata key set (for secret scans in tests).
    pub fn meta_keys(&self) -> &Secret {
        &self.meta
    }

    /// Wraps the metadata keys and every DEK generation under `kek`, each wrap
    /// verified by unwrapping it: what a header under `kek` needs.
    pub fn wrap_all(
        &self,
        provider: &dyn KeyProvider,
        kek: &KekRef,
    ) -> Result<(Vec<u8>, Vec<header::DekGeneration>), KmsError> {
        let vid = &self.header.volume_id;
        let meta = wrap_verified(provider, kek, &self.meta, &header::meta_aad(vid))?;
        let mut gens = Vec::with_capacity(self.header.generations.len());
        for g in &self.header.generations {
            let dek = self
                .dek_of(g.generation)
                .expect("every header generation is unwrapped");
            let aad = header::dek_aad(vid, g.generation);
            gens.push(header::DekGeneration {
                generation: g.generation,
                created: g.created,
                wrapped: wrap_verified(provider, kek, dek, &aad)?,
            });
        }
        Ok((meta, gens))
    }

    /// Adds a new DEK generation (from the key manager's randomness mixed with
    /// the OS's, wrapped by the current KEK and verified), makes it the active
    /// one for new files, and stores the header. Returns its number.
    pub fn add_generation(&mut self, provider: &dyn KeyProvider) -> Result<u16, VolumeError> {
        let next = self
            .header
            .generations
            .iter()
            .map(|g| g.generation)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| {
                VolumeError::Kms(KmsError::Config(
                    "the volume has used all 65536 key generations".into(),
                ))
            })?;
        let vid = self.header.volume_id;
        let kek = self.header.kek.clone();
        let dek = generate_dek(provider)?;
        let wrapped = wrap_verified(provider, &kek, &dek, &header::dek_aad(&vid, next))?;
        let mut hdr = self.header.clone();
        if hdr.wrapped_meta.is_empty() {
            // A version 1 header: its metadata keys get their own wrap now.
            hdr.wrapped_meta = wrap_verified(provider, &kek, &self.meta, &header::meta_aad(&vid))?;
        }
        let now = now_secs();
        hdr.generations.push(header::DekGeneration {
            generation: next,
            created: now,
            wrapped,
        });
        hdr.active = next;
        hdr.updated = now;
        self.store_header(hdr)?;
        self.keys.content.add(next, ContentCipher::new(&dek, &vid));
        self.keys.content.set_active(next);
        self.deks.push((next, dek));
        Ok(next)
    }

    /// What the key manager must unwrap to prove generation `keep` before
    /// the others are retired: the KEK reference, the wrapped DEK and its AAD.
    pub fn retire_proof_request(
        &self,
        keep: u16,
    ) -> Result<(KekRef, Vec<u8>, Vec<u8>), VolumeError> {
        let g = self.header.generation(keep).ok_or_else(|| {
            VolumeError::Kms(KmsError::Config(format!(
                "key generation {keep} is not in the volume header"
            )))
        })?;
        let aad = header::dek_aad(&self.header.volume_id, keep);
        Ok((self.header.kek.clone(), g.wrapped.clone(), aad))
    }

    /// Removes every generation but `keep` from the header. `proof` is what
    /// the key manager unwrapped for [`Self::retire_proof_request`] under
    /// `kek`; it must equal the DEK in use, and `kek` must still be the
    /// header's KEK. Returns the generations removed. In-memory ciphers stay
    /// until unmount.
    pub fn retire_generations(
        &mut self,
        keep: u16,
        kek: &KekRef,
        proof: &Secret,
    ) -> Result<Vec<u16>, VolumeError> {
        if &self.header.kek != kek {
            return Err(KmsError::Protocol(
                "the KEK changed while its unwrap was being checked; the next attempt uses the new one"
                    .into(),
            )
            .into());
        }
        if !self.dek_of(keep).is_some_and(|d| d.ct_eq(proof)) {
            return Err(KmsError::VerifyMismatch.into());
        }
        let removed: Vec<u16> = self
            .header
            .generations
            .iter()
            .map(|g| g.generation)
            .filter(|g| *g != keep)
            .collect();
        let mut hdr = self.header.clone();
        hdr.generations.retain(|g| g.generation == keep);
        hdr.active = keep;
        hdr.updated = now_secs();
        self.store_header(hdr)?;
        self.deks.retain(|(g, _)| *g == keep);
        Ok(removed)
    }
}

/// Lowercase hex of non-secret bytes (ids).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::keyfile::KeyfileProvider;
    use std::os::unix::fs::PermissionsExt;

    fn provider(dir: &Path) -> KeyfileProvider {
        let p = dir.join("kek");
        std::fs::write(&p, [4u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        KeyfileProvider::open(&p, None).unwrap()
    }

    /// A volume whose header is still version 1 opens with the same keys,
    /// and its first rekey step writes version 2 without changing names.
    #[test]
    fn a_version_1_volume_opens_and_upgrades_on_the_next_header_update() {
        let d = tempfile::tempdir().unwrap();
        let back = d.path().join("back");
        std::fs::create_dir(&back).unwrap();
        let p = provider(d.path());
        let v = Volume::init(&back, &p, &InitOptions::default()).unwrap();
        let name = v.keys.names.encrypt(&[1u8; 16], b"report.txt").unwrap();
        let dek0 = v.dek().clone();
        let mut v1 = v.header.clone();
        v1.version = header::VERSION_1;
        header::store(&back, &header::encode_v1(&v1, &dek0)).unwrap();

        let v = Volume::open(&back, &p).unwrap();
        assert_eq!(v.header.version, header::VERSION_1);
        assert!(v.dek().ct_eq(&dek0));
        assert_eq!(
            v.keys.names.encrypt(&[1u8; 16], b"report.txt").unwrap(),
            name
        );

        let mut v = v;
        let g = v.add_generation(&p).unwrap();
        assert_eq!(g, 1);
        let v2 = Volume::open(&back, &p).unwrap();
        assert_eq!(v2.header.version, header::VERSION);
        assert_eq!(v2.header.active, 1);
        assert_eq!(
            v2.keys.names.encrypt(&[1u8; 16], b"report.txt").unwrap(),
            name
        );
        assert!(v2.dek_of(0).unwrap().ct_eq(&dek0));
        assert!(!v2.dek().ct_eq(&dek0));

        // Retiring generation 0 leaves names and the new DEK as they were.
        let mut v2 = v2;
        let (kek, wrapped, aad) = v2.retire_proof_request(1).unwrap();
        let proof = p.unwrap(&kek, &wrapped, &aad).unwrap();
        let wrong = Secret::from_slice(&[0u8; 32]);
        assert!(v2.retire_generations(1, &kek, &wrong).is_err());
        assert_eq!(v2.header.generations.len(), 2);
        assert_eq!(v2.retire_generations(1, &kek, &proof).unwrap(), vec![0]);
        let v3 = Volume::open(&back, &p).unwrap();
        assert_eq!(v3.header.generations.len(), 1);
        assert!(v3.dek_of(0).is_none());
        assert_eq!(
            v3.keys.names.encrypt(&[1u8; 16], b"report.txt").unwrap(),
            name
        );
    }
}
