//! File-content encryption: AES-256-XTS over the data units of one file, spread
//! over rayon worker threads when a request spans several units.
//!
//! The tweak of unit `i` of a file is `file_id + i (mod 2^128)`, with `file_id`
//! the 128-bit random identifier from the file's header (read little-endian). The
//! one special "tiny" unit of a file shorter than 16 bytes (see
//! `volume::layout`) uses unit index 2^64 − 1, which no ordinary unit reaches.
//! Two files therefore share a (key, tweak) pair only if their random ids lie
//! within 2^64 of each other: probability ≈ n² · 2^-64 for n files.

use rayon::prelude::*;

use super::keys::{Secret, derive, labels};
use super::xts::{AES_BLOCK, Xts256, XtsError};

/// Plaintext block size: the data-unit length of every unit but a file's last.
pub const BLOCK: usize = 4096;
/// Unit index used for the tiny unit of files shorter than 16 bytes.
pub const TINY_UNIT: u64 = u64::MAX;
/// Requests of at least this many units (128 KiB) are spread over rayon's
/// threads. `cargo bench --bench xts` prints the data behind it; on the 2-core
/// machine of the README's table, rayon/serial time per request was, for 8 /
/// 16 / 32 / 64 units: 1.01 / 0.75 / 0.63 / 0.57 on an idle machine (2 threads
/// scale 1.98x on 1 MiB) and 1.60 / 1.22 / 0.91 / 0.94 with the other core
/// busy (1.12x) — 32 is the smallest size that won in both. In the daemon the
/// other core is usually busy with the application, and below the threshold
/// parallelism comes from the FUSE worker threads serving concurrent requests
/// (readahead, writeback, other files). With the old threshold of 4, reading
/// small files spent ~10 % of the daemon's CPU in rayon's sched_yield.
const PARALLEL_MIN_UNITS: usize = 32;

/// The 16-byte random identifier of one file (from its per-file header).
pub type FileId = [u8; 16];

pub struct ContentCipher {
    xts: Xts256,
}

fn tweak(file_id: &FileId, unit: u64) -> u128 {
    u128::from_le_bytes(*file_id).wrapping_add(unit as u128)
}

impl ContentCipher {
    /// Derives the content key from the volume DEK (salted with the volume id).
    pub fn new(dek: &Secret, volume_id: &[u8; 16]) -> ContentCipher {
        let key = derive(dek, volume_id, labels::CONTENT_XTS, 64);
        ContentCipher {
            xts: Xts256::new(&key).expect("derived XTS key is 64 bytes"),
        }
    }

    /// Encrypts a run of consecutive units in place. `buf` starts at the start of
    /// unit `first`; every unit is [`BLOCK`] bytes except the last, which is what
    /// remains (16 ..= BLOCK + 15 bytes: a remainder shorter than 16 bytes belongs
    /// to the unit before it).
    pub fn encrypt_units(
        &self,
        file_id: &FileId,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), XtsError> {
        self.units(file_id, first, None, buf, true)
    }

    /// Encrypts plaintext `src` (a run of units as in [`Self::encrypt_units`])
    /// into `dst` of the same length, without copying it there first.
    pub fn encrypt_units_from(
        &self,
        file_id: &FileId,
        first: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), XtsError> {
        if src.len() != dst.len() {
            return Err(XtsError::LengthMismatch(src.len(), dst.len()));
        }
        self.units(file_id, first, Some(src), dst, true)
    }

    /// Decrypts a run of consecutive units in place (see [`Self::encrypt_units`]).
    /// A unit whose ciphertext is all zeros is a hole in a sparse backing file and
    /// decrypts to zeros.
    pub fn decrypt_units(
        &self,
        file_id: &FileId,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), XtsError> {
        self.units(file_id, first, None, buf, false)
    }

    /// Encrypts the 16-byte tiny unit of a file shorter than 16 bytes.
    pub fn encrypt_tiny(&self, file_id: &FileId, unit: &mut [u8; 16]) {
        self.xts
            .encrypt(unit, tweak(file_id, TINY_UNIT))
            .expect("16 bytes is a valid XTS unit");
    }

    /// Decrypts the tiny unit (see [`Self::encrypt_tiny`]).
    pub fn decrypt_tiny(&self, file_id: &FileId, unit: &mut [u8; 16]) {
        self.xts
            .decrypt(unit, tweak(file_id, TINY_UNIT))
            .expect("16 bytes is a valid XTS unit");
    }

    fn one(
        &self,
        file_id: &FileId,
        idx: u64,
        src: Option<&[u8]>,
        unit: &mut [u8],
        encrypt: bool,
    ) -> Result<(), XtsError> {
        let t = tweak(file_id, idx);
        if let Some(src) = src {
            self.xts.encrypt_from(src, unit, t)
        } else if encrypt {
            self.xts.encrypt(unit, t)
        } else if unit.iter().all(|&b| b == 0) {
            Ok(())
        } else {
            self.xts.decrypt(unit, t)
        }
    }

    /// Units of `buf`, read from `src` (same length) when given; `src` is
    /// only given for encryption.
    fn units(
        &self,
        file_id: &FileId,
        first: u64,
        src: Option<&[u8]>,
        buf: &mut [u8],
        encrypt: bool,
    ) -> Result<(), XtsError> {
        if buf.len() < AES_BLOCK {
            return Err(XtsError::TooShort(buf.len()));
        }
        // Split off the last unit, which may be short or carry a < 16-byte tail.
        let mut full = buf.len() / BLOCK;
        if buf.len().is_multiple_of(BLOCK) || buf.len() % BLOCK < AES_BLOCK {
            full -= 1;
        }
        let (body, last) = buf.split_at_mut(full * BLOCK);
        let (src_body, src_last) = match src {
            Some(s) => {
                let (b, l) = s.split_at(full * BLOCK);
                (Some(b), Some(l))
            }
            None => (None, None),
        };
        let src_unit = |i: usize| src_body.map(|s| &s[i * BLOCK..(i + 1) * BLOCK]);
        if full >= PARALLEL_MIN_UNITS {
            body.par_chunks_mut(BLOCK)
                .enumerate()
                .try_for_each(|(i, u)| {
                    self.one(file_id, first + i as u64, src_unit(i), u, encrypt)
                })?;
        } else {
            for (i, u) in body.chunks_mut(BLOCK).enumerate() {
                self.one(file_id, first + i as u64, src_unit(i), u, encrypt)?;
            }
        }
        self.one(file_id, first + full as u64, src_last, last, encrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of place (from the request buffer) equals copy-then-encrypt, on
    /// both the serial and the parallel path and with a short last unit.
    #[test]
    fn encrypt_units_from_matches_in_place() {
        let c = ContentCipher::new(&Secret::from_slice(&[4u8; 32]), &[5u8; 16]);
        let id = [6u8; 16];
        for len in [16, 100, BLOCK, 3 * BLOCK + 20, 40 * BLOCK, 40 * BLOCK + 9] {
            let pt: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut inplace = pt.clone();
            c.encrypt_units(&id, 7, &mut inplace).unwrap();
            let mut out = vec![0u8; len];
            c.encrypt_units_from(&id, 7, &pt, &mut out).unwrap();
            assert_eq!(out, inplace, "len {len}");
        }
    }

    fn cipher() -> ContentCipher {
        ContentCipher::new(&Secret::from_slice(&[4u8; 32]), &[9u8; 16])
    }

    #[test]
    fn units_roundtrip_for_every_tail_length_class() {
        let c = cipher();
        let id = [1u8; 16];
        for len in [
            16,
            17,
            31,
            4095,
            4096,
            4097,
            4111,
            4112,
            8192,
            8200,
            5 * 4096 + 3,
            9 * 4096 + 100,
        ] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut buf = pt.clone();
            c.encrypt_units(&id, 3, &mut buf).unwrap();
            assert_ne!(buf, pt, "len {len}");
            c.decrypt_units(&id, 3, &mut buf).unwrap();
            assert_eq!(buf, pt, "len {len}");
        }
    }

    #[test]
    fn parallel_and_serial_paths_agree_unit_by_unit() {
        let c = cipher();
        let id = [2u8; 16];
        let n = PARALLEL_MIN_UNITS + 2;
        let pt = vec![0x5au8; n * BLOCK];
        let mut all = pt.clone();
        c.encrypt_units(&id, 10, &mut all).unwrap();
        for i in 0..n {
            let mut one = pt[i * BLOCK..(i + 1) * BLOCK].to_vec();
            c.encrypt_units(&id, 10 + i as u64, &mut one).unwrap();
            assert_eq!(one, all[i * BLOCK..(i + 1) * BLOCK]);
        }
        // Same plaintext in different units or files gives different ciphertext.
        assert_ne!(all[..BLOCK], all[BLOCK..2 * BLOCK]);
        let mut other = pt[..BLOCK].to_vec();
        c.encrypt_units(&[3u8; 16], 10, &mut other).unwrap();
        assert_ne!(other, all[..BLOCK]);
    }

    #[test]
    fn all_zero_ciphertext_is_a_hole() {
        let c = cipher();
        let mut buf = vec![0u8; 2 * BLOCK];
        c.decrypt_units(&[0u8; 16], 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn tiny_unit_roundtrip_and_distinct_tweak() {
        let c = cipher();
        let id = [7u8; 16];
        let mut a = *b"0123456789abcdef";
        c.encrypt_tiny(&id, &mut a);
        let mut b = *b"0123456789abcdef";
        c.encrypt_units(&id, 0, &mut b).unwrap();
        assert_ne!(a, b);
        c.decrypt_tiny(&id, &mut a);
        assert_eq!(&a, b"0123456789abcdef");
    }
}
