//! The volume header file `kmfs.volume` in the backing directory's root
//! (docs/FORMAT.md, "Volume header").
//!
//! It holds the format version, volume id, cipher suite, block size, which KEK
//! wraps the keys, one wrapped DEK per key generation (more than one only
//! while a rekey runs) and which one is active, and the rotation history.
//! Nothing in it is secret. A SHA-256 checksum detects accidental damage
//! without any key; an HMAC-SHA256 keyed from the active generation's DEK
//! authenticates every field once it is unwrapped. Version 1 headers (one
//! DEK) are still read; the next header update writes version 2. Version 3
//! has the layout of version 2 and says that every extended-attribute value
//! and symlink target is bound to its owner; a version 1 or 2 header is
//! written back as version 2 until a rekey has bound them all. It is replaced
//! atomically (temporary file, fsync, rename, fsync of
//! the directory, [`atomic::write`]) and the previous version is kept as
//! `kmfs.volume.bak`.

use std::io;
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::atomic;
use crate::be::Cursor;
use crate::crypto::keys::{Secret, derive, labels};
use crate::kms::KekRef;

/// File name of the header in the backing root.
pub const HEADER_FILE: &str = "kmfs.volume";
/// The previous header, kept on every update.
pub const BACKUP_FILE: &str = "kmfs.volume.bak";
const TMP_FILE: &str = "kmfs.volume.tmp";
const BACKUP_TMP_FILE: &str = "kmfs.volume.bak.tmp";

pub const MAGIC: &[u8; 8] = b"kmfs-vol";
/// The header format version this build writes for new and migrated
/// volumes: extended-attribute values and symlink targets are bound to their
/// owner (docs/FORMAT.md 8). It also reads versions 1 and 2.
pub const VERSION: u16 = 3;
/// Format version 2: DEK generations; attribute values and symlink targets
/// of such a volume may still be in the unbound form. A header of version
/// ≤ 2 is written back as version 2 until a rekey completes the migration.
pub const VERSION_2: u16 = 2;
/// The first format version: a single DEK from which every subkey is derived.
pub const VERSION_1: u16 = 1;
/// The first version whose attribute values and symlink targets are all
/// bound to their owner (unbound ones are rejected).
pub const VERSION_BOUND: u16 = 3;
/// Cipher suite 1: AES-256-XTS contents (4 KiB units), AES-256-SIV names,
/// HKDF-SHA256 subkeys, HMAC-SHA256 header authentication.
pub const SUITE_XTS_SIV_V1: u16 = 1;
/// Header flag: file names are stored in plain text.
pub const FLAG_PLAINTEXT_NAMES: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_PLAINTEXT_NAMES;
/// Upper bound on a header file's size; anything bigger is not ours.
pub const MAX_LEN: usize = 1 << 20;
const FIXED_LEN: usize = 54;
const TRAILER_LEN: usize = 64;

/// AAD bound to every wrap of this volume's DEK generation `generation`.
/// Generation 0 keeps the version 1 AAD, so a version 1 header's wrapped DEK
/// moves into a version 2 header unchanged.
pub fn dek_aad(volume_id: &[u8; 16], generation: u16) -> Vec<u8> {
    let mut aad = if generation == 0 {
        b"kmfs v1 dek ".to_vec()
    } else {
        b"kmfs v2 dek ".to_vec()
    };
    aad.extend_from_slice(volume_id);
    if generation != 0 {
        aad.extend_from_slice(&generation.to_be_bytes());
    }
    aad
}

/// One key generation: a DEK wrapped by the header's KEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DekGeneration {
    pub generation: u16,
    /// When it was created (Unix seconds).
    pub created: u64,
    pub wrapped: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationEntry {
    /// When this KEK stopped being the current one (Unix seconds).
    pub retired_at: u64,
    pub kek: KekRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeHeader {
    pub flags: u16,
    pub suite: u16,
    pub block_size: u32,
    pub volume_id: [u8; 16],
    pub created: u64,
    pub updated: u64,
    pub kek: KekRef,
    /// The generation new files, directories, symlinks and attributes get.
    pub active: u16,
    /// Every DEK generation a file may still use, in increasing order.
    pub generations: Vec<DekGeneration>,
    pub history: Vec<RotationEntry>,
    /// The format version the header was read in, or is to be written in:
    /// [`VERSION`] for new and migrated volumes; a lower one is written as
    /// [`VERSION_2`] (see [`VolumeHeader::stored_version`]).
    pub version: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error(
        "{0}: no volume header (kmfs.volume) found; is this a kmfs backing directory? (create one with kmfs init)"
    )]
    Missing(PathBuf),
    #[error("{path}: cannot {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{0}: not a kmfs volume header (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "{path}: volume format version {found} is newer than this kmfs supports ({VERSION}); upgrade kmfs to open it"
    )]
    FutureVersion { path: PathBuf, found: u16 },
    #[error("{path}: volume format version {found} is not supported")]
    UnsupportedVersion { path: PathBuf, found: u16 },
    #[error("{0}: volume header is truncated")]
    Truncated(PathBuf),
    #[error(
        "{0}: volume header is damaged (checksum mismatch); restore it with kmfs header restore"
    )]
    Checksum(PathBuf),
    #[error("{path}: volume header is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{0}: volume header failed authentication: it was modified, or belongs to another key")]
    BadMac(PathBuf),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&b[..n]);
}

fn put_kek(out: &mut Vec<u8>, k: &KekRef) {
    put_str(out, &k.provider);
    put_str(out, &k.name);
    put_str(out, &k.uid);
    out.extend_from_slice(&k.version.to_be_bytes());
}

/// A bounds-checked reader over the header bytes: a field that runs past
/// the end is named in the error.
struct Reader<'a>(Cursor<'a>);

fn past_end(what: &str) -> String {
    format!("{what} runs past the end")
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        self.0.take(n).ok_or_else(|| past_end(what))
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        self.0.u16().ok_or_else(|| past_end(what))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.0.u32().ok_or_else(|| past_end(what))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.0.u64().ok_or_else(|| past_end(what))
    }
    fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn kek(&mut self, what: &str) -> Result<KekRef, String> {
        Ok(KekRef {
            provider: self.str(what)?,
            name: self.str(what)?,
            uid: self.str(what)?,
            version: self.u32(what)?,
        })
    }
}

/// The header MAC key of a version 1 header, derived from its only DEK.
pub fn v1_mac_key(dek: &Secret, volume_id: &[u8; 16]) -> Secret {
    derive(dek, volume_id, labels::HEADER_MAC, 32)
}

fn hmac(key: &Secret, body: &[u8]) -> [u8; 32] {
    let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC takes any key length");
    m.update(body);
    m.finalize().into_bytes().into()
}

impl VolumeHeader {
    pub fn plaintext_names(&self) -> bool {
        self.flags & FLAG_PLAINTEXT_NAMES != 0
    }

    /// The version [`Self::encode`] writes: [`VERSION`] once the volume is
    /// migrated (attributes and symlink targets bound), else [`VERSION_2`].
    pub fn stored_version(&self) -> u16 {
        if self.version >= VERSION_BOUND {
            VERSION
        } else {
            VERSION_2
        }
    }

    /// Whether every attribute value and symlink target of the volume is
    /// bound to its owner, so unbound ones are to be rejected.
    pub fn bound(&self) -> bool {
        self.version >= VERSION_BOUND
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.stored_version().to_be_bytes());
        b.extend_from_slice(&[0u8; 4]); // total length, patched below
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.suite.to_be_bytes());
        b.extend_from_slice(&self.block_size.to_be_bytes());
        b.extend_from_slice(&self.volume_id);
        b.extend_from_slice(&self.created.to_be_bytes());
        b.extend_from_slice(&self.updated.to_be_bytes());
        debug_assert_eq!(b.len(), FIXED_LEN);
        put_kek(&mut b, &self.kek);
        b.extend_from_slice(&self.active.to_be_bytes());
        b.extend_from_slice(&(self.generations.len() as u16).to_be_bytes());
        for g in &self.generations {
            b.extend_from_slice(&g.generation.to_be_bytes());
            b.extend_from_slice(&g.created.to_be_bytes());
            b.extend_from_slice(&(g.wrapped.len() as u16).to_be_bytes());
            b.extend_from_slice(&g.wrapped);
        }
        b.extend_from_slice(&(self.history.len() as u16).to_be_bytes());
        for h in &self.history {
            b.extend_from_slice(&h.retired_at.to_be_bytes());
            put_kek(&mut b, &h.kek);
        }
        let total = (b.len() + TRAILER_LEN) as u32;
        b[10..14].copy_from_slice(&total.to_be_bytes());
        b
    }

    /// The generation entry `g`, if the header holds it.
    pub fn generation(&self, g: u16) -> Option<&DekGeneration> {
        self.generations.iter().find(|x| x.generation == g)
    }

    /// Serialises the header (in [`Self::stored_version`]), authenticated with
    /// the header MAC key `mac_key` (derived from the active generation's DEK).
    pub fn encode(&self, mac_key: &Secret) -> Vec<u8> {
        let mut b = self.body();
        let tag = hmac(mac_key, &b);
        b.extend_from_slice(&tag);
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        b
    }

    /// Parses and checksums a header. The HMAC is checked separately with
    /// [`VolumeHeader::verify`] once the DEK is known. `path` is for messages.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<VolumeHeader, HeaderError> {
        let p = || path.to_path_buf();
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(HeaderError::BadMagic(p()));
        }
        if bytes.len() < 14 {
            return Err(HeaderError::Truncated(p()));
        }
        let version = u16::from_be_bytes([bytes[8], bytes[9]]);
        if version > VERSION {
            return Err(HeaderError::FutureVersion {
                path: p(),
                found: version,
            });
        }
        if !(VERSION_1..=VERSION).contains(&version) {
            return Err(HeaderError::UnsupportedVersion {
                path: p(),
                found: version,
            });
        }
        let total = u32::from_be_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
        if !(FIXED_LEN + TRAILER_LEN..=MAX_LEN).contains(&total) {
            return Err(HeaderError::Malformed {
                path: p(),
                what: format!("length field {total} is out of range"),
            });
        }
        if bytes.len() < total {
            return Err(HeaderError::Truncated(p()));
        }
        if bytes.len() > total {
            return Err(HeaderError::Malformed {
                path: p(),
                what: format!("{} bytes of trailing data", bytes.len() - total),
            });
        }
        let (signed, sum) = bytes.split_at(total - 32);
        if Sha256::digest(signed).as_slice() != sum {
            return Err(HeaderError::Checksum(p()));
        }
        let body = &signed[..signed.len() - 32];
        let malformed = |what: String| HeaderError::Malformed { path: p(), what };
        let mut r = Reader(Cursor::new(body, 14));
        let flags = r.u16("flags").map_err(malformed)?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(malformed(format!("unknown flags {flags:#06x}")));
        }
        let suite = r.u16("cipher suite").map_err(malformed)?;
        if suite != SUITE_XTS_SIV_V1 {
            return Err(malformed(format!("unknown cipher suite {suite}")));
        }
        let block_size = r.u32("block size").map_err(malformed)?;
        if block_size != crate::crypto::content::BLOCK as u32 {
            return Err(malformed(format!("unsupported block size {block_size}")));
        }
        let volume_id: [u8; 16] = r
            .take(16, "volume id")
            .map_err(malformed)?
            .try_into()
            .expect("16 bytes");
        let created = r.u64("created").map_err(malformed)?;
        let updated = r.u64("updated").map_err(malformed)?;
        let kek = r.kek("KEK reference").map_err(malformed)?;
        let (active, generations) = if version == VERSION_1 {
            let n = r.u16("wrapped key").map_err(malformed)? as usize;
            let wrapped = r.take(n, "wrapped key").map_err(malformed)?.to_vec();
            let g = DekGeneration {
                generation: 0,
                created,
                wrapped,
            };
            (0, vec![g])
        } else {
            let active = r.u16("active generation").map_err(malformed)?;
            let count = r.u16("key generations").map_err(malformed)?;
            let mut gens: Vec<DekGeneration> = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let generation = r.u16("key generation").map_err(malformed)?;
                let created = r.u64("key generation").map_err(malformed)?;
                let n = r.u16("key generation").map_err(malformed)? as usize;
                let wrapped = r.take(n, "key generation").map_err(malformed)?.to_vec();
                if gens.last().is_some_and(|l| l.generation >= generation) {
                    return Err(malformed(format!(
                        "key generation {generation} is out of order"
                    )));
                }
                gens.push(DekGeneration {
                    generation,
                    created,
                    wrapped,
                });
            }
            if !gens.iter().any(|g| g.generation == active) {
                return Err(malformed(format!(
                    "the active key generation {active} is not in the header"
                )));
            }
            (active, gens)
        };
        let count = r.u16("rotation history").map_err(malformed)?;
        let mut history = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let retired_at = r.u64("rotation history").map_err(malformed)?;
            let kek = r.kek("rotation history").map_err(malformed)?;
            history.push(RotationEntry { retired_at, kek });
        }
        if r.0.pos() != body.len() {
            return Err(malformed(format!(
                "{} unexpected bytes before the trailer",
                body.len() - r.0.pos()
            )));
        }
        Ok(VolumeHeader {
            flags,
            suite,
            block_size,
            volume_id,
            created,
            updated,
            kek,
            active,
            generations,
            history,
            version,
        })
    }

    /// Checks the header's HMAC with the header MAC key. `bytes` are the exact
    /// bytes the header was decoded from.
    pub fn verify(bytes: &[u8], mac_key: &Secret, path: &Path) -> Result<(), HeaderError> {
        use subtle::ConstantTimeEq;
        if bytes.len() < TRAILER_LEN {
            return Err(HeaderError::Truncated(path.to_path_buf()));
        }
        let body = &bytes[..bytes.len() - TRAILER_LEN];
        let tag = &bytes[bytes.len() - TRAILER_LEN..bytes.len() - 32];
        let want = hmac(mac_key, body);
        if bool::from(want.ct_eq(tag)) {
            Ok(())
        } else {
            Err(HeaderError::BadMac(path.to_path_buf()))
        }
    }
}

/// Reads the raw bytes of a header file (bounded in size, never through a
/// symlink, never from a FIFO or device: [`super::internal::read_path`]).
pub fn read_file(path: &Path) -> Result<Vec<u8>, HeaderError> {
    super::internal::read_path(path, MAX_LEN as u64).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            HeaderError::Missing(path.to_path_buf())
        } else if super::internal::is_refusal(&e) {
            HeaderError::Malformed {
                path: path.to_path_buf(),
                what: format!("file {e}"),
            }
        } else {
            HeaderError::Io {
                path: path.to_path_buf(),
                what: "read the volume header",
                source: e,
            }
        }
    })
}

/// Path of the live header in a backing directory.
pub fn header_path(backing: &Path) -> PathBuf {
    backing.join(HEADER_FILE)
}

/// Writes `bytes` to `dir/name` durably (see [`atomic::write`]), readable
/// by its owner only.
fn write_atomic(dir: &Path, tmp_name: &str, name: &str, bytes: &[u8]) -> Result<(), HeaderError> {
    Ok(atomic::write(dir, tmp_name, name, bytes, 0o600)?)
}

impl From<atomic::WriteError> for HeaderError {
    fn from(e: atomic::WriteError) -> HeaderError {
        HeaderError::Io {
            path: e.path,
            what: e.what,
            source: e.source,
        }
    }
}

/// Replaces `kmfs.volume.bak` with `bytes` (after a rekey, so no backup in
/// the backing directory holds a retired key generation).
pub fn replace_backup(backing: &Path, bytes: &[u8]) -> Result<(), HeaderError> {
    write_atomic(backing, BACKUP_TMP_FILE, BACKUP_FILE, bytes)
}

/// Installs `bytes` as the live header of `backing`, first saving the current
/// header (if any) as `kmfs.volume.bak`. At every instant `kmfs.volume` is either
/// the complete old or the complete new header.
pub fn store(backing: &Path, bytes: &[u8]) -> Result<(), HeaderError> {
    let live = header_path(backing);
    match read_file(&live) {
        Ok(old) => write_atomic(backing, BACKUP_TMP_FILE, BACKUP_FILE, &old)?,
        Err(HeaderError::Missing(_)) => {}
        Err(e) => return Err(e),
    }
    write_atomic(backing, TMP_FILE, HEADER_FILE, bytes)
}

/// A version 1 header as kmfs wrote it before DEK generations: one wrapped
/// DEK (generation 0 of `h`), MAC keyed from it. Tests only.
#[cfg(test)]
pub(crate) fn encode_v1(h: &VolumeHeader, dek: &Secret) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION_1.to_be_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&h.flags.to_be_bytes());
    b.extend_from_slice(&h.suite.to_be_bytes());
    b.extend_from_slice(&h.block_size.to_be_bytes());
    b.extend_from_slice(&h.volume_id);
    b.extend_from_slice(&h.created.to_be_bytes());
    b.extend_from_slice(&h.updated.to_be_bytes());
    put_kek(&mut b, &h.kek);
    let w = &h.generations[0].wrapped;
    b.extend_from_slice(&(w.len() as u16).to_be_bytes());
    b.extend_from_slice(w);
    b.extend_from_slice(&0u16.to_be_bytes());
    let total = (b.len() + TRAILER_LEN) as u32;
    b[10..14].copy_from_slice(&total.to_be_bytes());
    let tag = hmac(&v1_mac_key(dek, &h.volume_id), &b);
    b.extend_from_slice(&tag);
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    b
}

#[cfg(test)]
mod tests;
