//! The on-disk format and opening a volume: volume header, per-file layout,
//! block I/O, directory ids.
//!
//! [`Volume::init`] creates a volume in an empty backing directory;
//! [`Volume::open`] reads its header, has the key provider unwrap the DEK,
//! authenticates the header and derives the subkeys the filesystem needs.

pub mod atomic;
pub mod backing;
pub mod content;
pub mod dirid;
pub mod header;
pub mod internal;
pub mod layout;
pub mod lock;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crypto::content::ContentCipher;
use crate::crypto::keys::Secret;
use crate::crypto::names::NameCipher;
use crate::kms::{KekRef, KeyProvider, KmsError, generate_dek};
use crate::sync::{MutexExt, RwLockExt};
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
        "{backing} holds volume {found}, but {config} is for volume {expected}: wrong backing directory, or its header was swapped"
    )]
    WrongVolume {
        backing: PathBuf,
        found: String,
        expected: String,
        config: String,
    },
    #[error(
        "the header of {backing} names key-encryption key {found:?}, but {config} names {expected:?}: a foreign header, or the KEK was rotated to a new name (then set it in the config)"
    )]
    WrongKek {
        backing: PathBuf,
        found: String,
        expected: String,
        config: String,
    },
    #[error(
        "the volume's key is held by the {header} provider ({kek}), but the {given} provider was configured"
    )]
    ProviderMismatch {
        header: String,
        kek: String,
        given: &'static str,
    },
}

/// What the administrator's config says the volume must be: checked against
/// the header before any key is unwrapped, so a backing directory swapped
/// for another volume (or a header pointing at another KEK) is refused.
#[derive(Clone, Debug, Default)]
pub struct Pin {
    pub volume_id: Option<[u8; 16]>,
    /// The KEK's name (KMIP Name, PKCS#11 label) the config names.
    pub kek_name: Option<String>,
    /// The config file, for messages.
    pub config: Option<PathBuf>,
}

impl Pin {
    /// Checks the header `hdr` of `backing` against the pin.
    pub fn check(&self, backing: &Path, hdr: &VolumeHeader) -> Result<(), VolumeError> {
        let config = self
            .config
            .as_ref()
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| "the config".into());
        if let Some(id) = &self.volume_id
            && *id != hdr.volume_id
        {
            return Err(VolumeError::WrongVolume {
                backing: backing.to_path_buf(),
                found: hex(&hdr.volume_id),
                expected: hex(id),
                config,
            });
        }
        if let Some(name) = &self.kek_name
            && *name != hdr.kek.name
        {
            return Err(VolumeError::WrongKek {
                backing: backing.to_path_buf(),
                found: hdr.kek.name.clone(),
                expected: name.clone(),
                config,
            });
        }
        Ok(())
    }
}

/// Options chosen when a volume is created.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Keep file names in plain text (no name encryption).
    pub plaintext_names: bool,
}

/// The keys of one DEK generation: everything a file, a directory's names,
/// a symlink target or an extended attribute is encrypted with. A rekey moves
/// all of them from one generation to the next.
pub struct GenKeys {
    pub content: ContentCipher,
    pub names: NameCipher,
    /// Key for extended-attribute values (AES-256-GCM); the attribute-name
    /// key derives from it.
    pub metadata: Secret,
}

impl GenKeys {
    /// The keys of a DEK, for unit tests elsewhere in the crate.
    #[cfg(test)]
    pub(crate) fn for_test(dek: &Secret, volume_id: &[u8; 16]) -> GenKeys {
        GenKeys::derive(dek, volume_id)
    }

    fn derive(dek: &Secret, volume_id: &[u8; 16]) -> GenKeys {
        use crate::crypto::keys::{derive, labels};
        GenKeys {
            content: ContentCipher::new(dek, volume_id),
            names: NameCipher::new(dek, volume_id),
            metadata: derive(dek, volume_id, labels::METADATA_GCM, 32),
        }
    }
}

/// The keys of every DEK generation the volume holds, and which one new
/// files, directories, symlinks and attributes get. A rekey adds a
/// generation while mounted; keys of retired generations stay in memory
/// until unmount, for files that were unlinked while open and so were out of
/// the rekey's reach.
pub struct Generations {
    inner: RwLock<GenInner>,
    /// [`Self::with_active`] calls running, by the generation they hold;
    /// `released` is signalled as each ends. Kept apart from `inner` so that
    /// no I/O runs under `inner` and a [`Self::barrier`] never holds up
    /// lookups of keys.
    holds: Mutex<Vec<(u16, usize)>>,
    released: Condvar,
}

/// One running [`Generations::with_active`]: counted until dropped (also on
/// a panic in its closure).
struct Hold<'a> {
    gens: &'a Generations,
    generation: u16,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut h = self.gens.holds.locked();
        if let Some(e) = h.iter_mut().find(|(g, _)| *g == self.generation) {
            e.1 -= 1;
        }
        h.retain(|(_, n)| *n > 0);
        drop(h);
        self.gens.released.notify_all();
    }
}

struct GenInner {
    active: u16,
    keys: Vec<(u16, Arc<GenKeys>)>,
}

impl GenInner {
    fn active_keys(&self) -> Arc<GenKeys> {
        self.keys
            .iter()
            .find(|(g, _)| *g == self.active)
            .map(|(_, k)| k.clone())
            .expect("the active generation always has keys")
    }
}

impl Generations {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, GenInner> {
        self.inner.read_locked()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, GenInner> {
        self.inner.write_locked()
    }

    /// The generation new things are written with.
    pub fn active(&self) -> u16 {
        self.read().active
    }

    /// The active generation and its keys.
    pub fn active_keys(&self) -> (u16, Arc<GenKeys>) {
        let r = self.read();
        (r.active, r.active_keys())
    }

    /// Runs `f` (which writes something new: a file header, a directory id)
    /// with the active generation, holding it: a [`Self::barrier`] after a
    /// switch waits for `f` to finish. The generations' lock is not held
    /// while `f` runs (it may do I/O), so `f` may look keys up.
    pub fn with_active<R>(&self, f: impl FnOnce(u16, &GenKeys) -> R) -> R {
        let (generation, keys) = {
            let r = self.read();
            // Counted before the lock is released: a switch (which takes it
            // exclusively) comes either before this or after the count.
            let mut h = self.holds.locked();
            match h.iter_mut().find(|(g, _)| *g == r.active) {
                Some(e) => e.1 += 1,
                None => h.push((r.active, 1)),
            }
            (r.active, r.active_keys())
        };
        let _hold = Hold {
            gens: self,
            generation,
        };
        f(generation, &keys)
    }

    /// Waits until every [`Self::with_active`] holding a generation other
    /// than the active one has finished: after a generation switch, nothing
    /// can still be written with the old active generation once this
    /// returns.
    pub fn barrier(&self) {
        let active = self.active();
        let mut h = self.holds.locked();
        while h.iter().any(|(g, n)| *g != active && *n > 0) {
            h = self.released.wait(h).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The keys of generation `g`, if this volume holds them.
    pub fn get(&self, g: u16) -> Option<Arc<GenKeys>> {
        self.read()
            .keys
            .iter()
            .find(|(x, _)| *x == g)
            .map(|(_, k)| k.clone())
    }

    /// Every generation's keys, the active one first (for trial decryption
    /// of names and attributes whose generation is not recorded).
    pub fn all(&self) -> Vec<(u16, Arc<GenKeys>)> {
        let r = self.read();
        let mut v = r.keys.clone();
        v.sort_by_key(|(g, _)| *g != r.active);
        v
    }

    fn add(&self, g: u16, k: GenKeys) {
        let mut w = self.write();
        if !w.keys.iter().any(|(x, _)| *x == g) {
            w.keys.push((g, Arc::new(k)));
        }
    }

    fn set_active(&self, g: u16) {
        self.write().active = g;
    }
}

/// The keys of an open volume, as the filesystem layer needs them.
pub struct VolumeKeys {
    pub generations: Generations,
    /// The header is format version 3 or later: every extended-attribute
    /// value and symlink target is bound to its owner, and unbound ones are
    /// rejected. Until then both forms are read (bound ones are always
    /// written); the rekey that migrates the volume sets it.
    bound: std::sync::atomic::AtomicBool,
}

impl VolumeKeys {
    /// Whether unbound (format version ≤ 2) attribute values and symlink
    /// targets are still accepted when reading.
    pub fn unbound_ok(&self) -> bool {
        !self.bound.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_bound(&self, bound: bool) {
        self.bound
            .store(bound, std::sync::atomic::Ordering::Release);
    }
}

/// What the filesystem layer needs of an unlocked volume. The keys change
/// only when a rekey adds a generation, behind [`Generations`]'s own lock.
/// The [`Volume`] itself stays with the daemon's control side.
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
    /// Shared with the filesystem layer.
    pub keys: Arc<VolumeKeys>,
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

/// The header MAC key of generation `dek`.
fn mac_key(dek: &Secret, volume_id: &[u8; 16]) -> Secret {
    crate::crypto::keys::derive(dek, volume_id, crate::crypto::keys::labels::HEADER_MAC, 32)
}

fn derive_keys(
    deks: &[(u16, Secret)],
    active: u16,
    volume_id: &[u8; 16],
    bound: bool,
) -> Arc<VolumeKeys> {
    let keys = deks
        .iter()
        .map(|(g, d)| (*g, Arc::new(GenKeys::derive(d, volume_id))))
        .collect();
    Arc::new(VolumeKeys {
        generations: Generations {
            inner: RwLock::new(GenInner { active, keys }),
            holds: Mutex::new(Vec::new()),
            released: Condvar::new(),
        },
        bound: std::sync::atomic::AtomicBool::new(bound),
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

/// The DEKs of a header, unwrapped by `provider`, and the header's MAC
/// checked (keyed from the active generation). `bytes` are the exact bytes
/// `hdr` was decoded from; `path` is for messages.
pub fn unlock(
    hdr: &VolumeHeader,
    bytes: &[u8],
    provider: &dyn KeyProvider,
    path: &Path,
) -> Result<Vec<(u16, Secret)>, VolumeError> {
    let vid = &hdr.volume_id;
    let mut deks = Vec::with_capacity(hdr.generations.len());
    for g in &hdr.generations {
        let aad = header::dek_aad(vid, g.generation);
        deks.push((g.generation, provider.unwrap(&hdr.kek, &g.wrapped, &aad)?));
    }
    let active = deks
        .iter()
        .find(|(g, _)| *g == hdr.active)
        .map(|(_, d)| d)
        .expect("decode checked that the active generation is listed");
    VolumeHeader::verify(bytes, &mac_key(active, vid), path)?;
    Ok(deks)
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
        // `kmfs init` takes the volume lock before it gets here.
        if entries.any(|e| {
            e.map(|e| e.file_name() != "lost+found" && e.file_name() != lock::LOCK_FILE)
                .unwrap_or(true)
        }) {
            return Err(VolumeError::NotEmpty(backing.to_path_buf()));
        }
        let kek = provider.current_kek()?;
        let dek = generate_dek(provider)?;
        let mut volume_id = [0u8; 16];
        getrandom::fill(&mut volume_id)
            .map_err(|e| io_err(backing, "random generator failed")(std::io::Error::other(e)))?;
        // Prove the wrap before anything is written.
        let wrapped_dek = wrap_verified(provider, &kek, &dek, &header::dek_aad(&volume_id, 0))?;
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
            dirid::create(backing, 0)
                .map_err(io_err(backing, "cannot write the root directory id"))?;
        }
        header::store(backing, &hdr.encode(&mac_key(&dek, &volume_id)))?;
        let deks = vec![(0, dek)];
        let keys = derive_keys(&deks, 0, &volume_id, true);
        Ok(Volume {
            backing: backing.to_path_buf(),
            header: hdr,
            keys,
            deks,
        })
    }

    /// Opens the volume in `backing`: unwraps its keys with `provider`, checks
    /// the header's authentication tag and derives the subkeys.
    pub fn open(backing: &Path, provider: &dyn KeyProvider) -> Result<Volume, VolumeError> {
        Volume::open_pinned(backing, provider, &Pin::default())
    }

    /// [`Volume::open`], refusing a header that does not match `pin` before
    /// anything is unwrapped.
    pub fn open_pinned(
        backing: &Path,
        provider: &dyn KeyProvider,
        pin: &Pin,
    ) -> Result<Volume, VolumeError> {
        let (hdr, bytes) = read_header(backing)?;
        pin.check(backing, &hdr)?;
        if hdr.kek.provider != provider.kind() {
            return Err(VolumeError::ProviderMismatch {
                header: hdr.kek.provider.clone(),
                kek: hdr.kek.to_string(),
                given: provider.kind(),
            });
        }
        let deks = unlock(&hdr, &bytes, provider, &header::header_path(backing))?;
        let keys = derive_keys(&deks, hdr.active, &hdr.volume_id, hdr.bound());
        Ok(Volume {
            backing: backing.to_path_buf(),
            header: hdr,
            keys,
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

    /// Authenticates (with the MAC key of its active generation, whose DEK
    /// must be known) and stores a modified header (rotation, rekey).
    pub fn store_header(&mut self, hdr: VolumeHeader) -> Result<(), VolumeError> {
        let dek = self
            .dek_of(hdr.active)
            .expect("the active generation's DEK is known");
        header::store(&self.backing, &hdr.encode(&mac_key(dek, &hdr.volume_id)))?;
        self.header = hdr;
        self.header.version = self.header.stored_version();
        self.keys.set_bound(self.header.bound());
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

    /// Wraps every DEK generation under `kek`, each wrap verified by
    /// unwrapping it: what a header under `kek` needs.
    pub fn wrap_all(
        &self,
        provider: &dyn KeyProvider,
        kek: &KekRef,
    ) -> Result<Vec<header::DekGeneration>, KmsError> {
        let vid = &self.header.volume_id;
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
        Ok(gens)
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
        let now = now_secs();
        hdr.generations.push(header::DekGeneration {
            generation: next,
            created: now,
            wrapped,
        });
        hdr.active = next;
        hdr.updated = now;
        self.deks.push((next, dek));
        if let Err(e) = self.store_header(hdr) {
            self.deks.pop();
            return Err(e);
        }
        let dek = &self.deks.last().expect("just pushed").1;
        self.keys.generations.add(next, GenKeys::derive(dek, &vid));
        self.keys.generations.set_active(next);
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
    ///
    /// Called at the end of a rekey, which has rewritten every attribute
    /// value and symlink target in the bound form: the header is stored as
    /// format version 3, which completes the migration of an older volume
    /// (from then on unbound ones are rejected).
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
        hdr.version = header::VERSION;
        self.store_header(hdr)?;
        self.deks.retain(|(g, _)| *g == keep);
        Ok(removed)
    }
}

/// Lowercase hex of non-secret bytes (ids).
pub use crate::hex::encode as hex;

#[cfg(test)]
mod tests;
