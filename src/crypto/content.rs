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

/// How many whole [`BLOCK`] units come before the last unit of a run of
/// `len` ≥ 16 bytes: the last unit is what remains, 16 ..= BLOCK + 15 bytes
/// (a remainder shorter than 16 bytes belongs to the unit before it).
fn units_before_last(len: usize) -> usize {
    let full = len / BLOCK;
    if len.is_multiple_of(BLOCK) || len % BLOCK < AES_BLOCK {
        full.saturating_sub(1)
    } else {
        full
    }
}

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
        let full = units_before_last(buf.len());
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

/// The content cipher(s) of one file. A file being re-encrypted while it
/// is served is split: units below the rekey's frontier are already on the
/// new generation, the others (and the tiny unit) still on the old one.
#[derive(Clone, Copy)]
pub enum Units<'a> {
    One(&'a ContentCipher),
    Split {
        /// Units with index < `at`.
        below: &'a ContentCipher,
        /// Units with index ≥ `at`, and the tiny unit.
        above: &'a ContentCipher,
        at: u64,
    },
}

impl<'a> From<&'a ContentCipher> for Units<'a> {
    fn from(c: &'a ContentCipher) -> Units<'a> {
        Units::One(c)
    }
}

/// How a frontier falls on a run of units.
enum Cut<'a> {
    /// The whole run uses one cipher.
    All(&'a ContentCipher),
    /// `buf[..bytes]` (units `first..at`) uses `below`, the rest `above`.
    At {
        below: &'a ContentCipher,
        above: &'a ContentCipher,
        bytes: usize,
        at: u64,
    },
}

impl<'a> Units<'a> {
    /// Where the frontier falls on a run of `len` bytes of units from
    /// `first` (as in [`ContentCipher::encrypt_units`]: only the last unit
    /// may be short, so a cut is always a whole number of [`BLOCK`]s in).
    fn cut(&self, first: u64, len: usize) -> Cut<'a> {
        match *self {
            Units::One(c) => Cut::All(c),
            Units::Split { below, above, at } => {
                let last = first + units_before_last(len) as u64;
                if at <= first {
                    Cut::All(above)
                } else if at > last {
                    Cut::All(below)
                } else {
                    Cut::At {
                        below,
                        above,
                        bytes: (at - first) as usize * BLOCK,
                        at,
                    }
                }
            }
        }
    }

    /// `f(cipher, first unit, buffer)` on each side of the frontier.
    fn each(
        &self,
        first: u64,
        buf: &mut [u8],
        f: impl Fn(&ContentCipher, u64, &mut [u8]) -> Result<(), XtsError>,
    ) -> Result<(), XtsError> {
        match self.cut(first, buf.len()) {
            Cut::All(c) => f(c, first, buf),
            Cut::At {
                below,
                above,
                bytes,
                at,
            } => {
                let (lo, hi) = buf.split_at_mut(bytes);
                f(below, first, lo)?;
                f(above, at, hi)
            }
        }
    }

    pub fn encrypt_units(
        &self,
        file_id: &FileId,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), XtsError> {
        self.each(first, buf, |c, u, b| c.encrypt_units(file_id, u, b))
    }

    pub fn decrypt_units(
        &self,
        file_id: &FileId,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), XtsError> {
        self.each(first, buf, |c, u, b| c.decrypt_units(file_id, u, b))
    }

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
        match self.cut(first, dst.len()) {
            Cut::All(c) => c.encrypt_units_from(file_id, first, src, dst),
            Cut::At {
                below,
                above,
                bytes,
                at,
            } => {
                let (slo, shi) = src.split_at(bytes);
                let (dlo, dhi) = dst.split_at_mut(bytes);
                below.encrypt_units_from(file_id, first, slo, dlo)?;
                above.encrypt_units_from(file_id, at, shi, dhi)
            }
        }
    }

    /// The cipher of the tiny unit (its index is above every frontier).
    fn tiny(&self) -> &'a ContentCipher {
        match *self {
            Units::One(c) => c,
            Units::Split { above, .. } => above,
        }
    }

    pub fn encrypt_tiny(&self, file_id: &FileId, unit: &mut [u8; 16]) {
        self.tiny().encrypt_tiny(file_id, unit)
    }

    pub fn decrypt_tiny(&self, file_id: &FileId, unit: &mut [u8; 16]) {
        self.tiny().decrypt_tiny(file_id, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A split run equals encrypting each side with its own cipher, for a
    /// frontier before, inside (at every unit) and after the run, with a
    /// short last unit; in place and out of place agree; decryption inverts.
    #[test]
    fn split_units_use_the_cipher_of_each_side() {
        let old = ContentCipher::new(&Secret::from_slice(&[4u8; 32]), &[5u8; 16]);
        let new = ContentCipher::new(&Secret::from_slice(&[7u8; 32]), &[5u8; 16]);
        let id = [6u8; 16];
        // Five units; the last carries a 10-byte remainder (4106 bytes).
        let len = 5 * BLOCK + 10;
        let pt: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        for at in 0..=8u64 {
            let units10 = Units::Split {
                below: &new,
                above: &old,
                at: 10 + at,
            };
            // Reference: unit by unit (first = 10), each with its own cipher.
            let mut want = pt.clone();
            for (i, chunk) in [
                0..BLOCK,
                BLOCK..2 * BLOCK,
                2 * BLOCK..3 * BLOCK,
                3 * BLOCK..4 * BLOCK,
                4 * BLOCK..len,
            ]
            .into_iter()
            .enumerate()
            {
                let c = if 10 + (i as u64) < 10 + at {
                    &new
                } else {
                    &old
                };
                c.encrypt_units(&id, 10 + i as u64, &mut want[chunk])
                    .unwrap();
            }
            let mut got = pt.clone();
            units10.encrypt_units(&id, 10, &mut got).unwrap();
            assert!(got == want, "frontier at unit {}", 10 + at);
            let mut out = vec![0u8; len];
            units10.encrypt_units_from(&id, 10, &pt, &mut out).unwrap();
            assert!(out == want, "out of place, frontier at unit {}", 10 + at);
            units10.decrypt_units(&id, 10, &mut got).unwrap();
            assert!(got == pt, "decrypt, frontier at unit {}", 10 + at);
        }
        // The tiny unit belongs to the side above every frontier.
        let split = Units::Split {
            below: &new,
            above: &old,
            at: 3,
        };
        let mut a = [9u8; 16];
        let mut b = [9u8; 16];
        split.encrypt_tiny(&id, &mut a);
        old.encrypt_tiny(&id, &mut b);
        assert_eq!(a, b);
    }

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
