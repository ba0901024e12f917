//! Where the bytes of an encrypted file go (docs/FORMAT.md, "File contents").
//!
//! A backing file is `header (40 bytes) ‖ ciphertext`, and the ciphertext is
//! exactly as long as the plaintext, so the plaintext size is always
//! `backing size − 40` (0 for a backing file shorter than the header). The
//! plaintext is cut into XTS data units:
//!
//! * unit `i` covers plaintext bytes `[4096·i, 4096·(i+1))`;
//! * the last unit is whatever remains, if that is at least 16 bytes;
//! * a remainder of 1–15 bytes after at least one full block joins the block
//!   before it (one unit of 4097–4111 bytes, using XTS ciphertext stealing);
//! * a file of 1–15 bytes has one "tiny" unit: the 16 bytes that end at the end
//!   of the file, i.e. the last `16 − size` bytes of the header's steal area
//!   followed by the data.
//!
//! So XTS never sees fewer than 16 bytes and no plaintext size needs storing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::crypto::content::{BLOCK, FileId};

/// Length of the per-file header.
pub const HEADER_LEN: u64 = 40;
/// Magic at the start of every non-empty backing file.
pub const MAGIC: &[u8; 4] = b"KMFC";
/// Current per-file header version.
pub const FILE_VERSION: u16 = 1;
/// Offset of the 16-byte steal area inside the header.
pub const STEAL_OFFSET: u64 = 24;

const B: u64 = BLOCK as u64;
const MIN_UNIT: u64 = 16;

/// Plaintext size of a file whose backing file is `backing_len` bytes.
pub fn plain_size(backing_len: u64) -> u64 {
    backing_len.saturating_sub(HEADER_LEN)
}

/// The data units of a file of a given plaintext size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
}

/// One data unit: its index (the tweak offset) and plaintext byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unit {
    pub index: u64,
    pub start: u64,
    pub end: u64,
}

impl Layout {
    pub fn new(size: u64) -> Layout {
        Layout { size }
    }

    /// Whether the file is 1–15 bytes long and so uses the tiny unit.
    pub fn is_tiny(&self) -> bool {
        self.size > 0 && self.size < MIN_UNIT
    }

    /// Number of data units (the tiny unit counts as one).
    pub fn unit_count(&self) -> u64 {
        if self.size == 0 {
            return 0;
        }
        let n = self.size / B;
        let r = self.size % B;
        // A remainder of 1–15 bytes joins the last whole block.
        if r == 0 || (r < MIN_UNIT && n > 0) {
            n
        } else {
            n + 1
        }
    }

    /// The unit with index `i` (must be < unit_count).
    pub fn unit(&self, i: u64) -> Unit {
        let count = self.unit_count();
        debug_assert!(i < count);
        let start = i * B;
        let end = if i + 1 == count { self.size } else { start + B };
        Unit {
            index: i,
            start,
            end,
        }
    }

    /// The unit containing plaintext offset `off` (< size).
    pub fn unit_at(&self, off: u64) -> Unit {
        let i = (off / B).min(self.unit_count().saturating_sub(1));
        self.unit(i)
    }

    /// The units overlapping `[start, end)` (clipped to the file), as one span:
    /// (first unit's start, last unit's end, first index).
    pub fn span(&self, start: u64, end: u64) -> Option<(u64, u64, u64)> {
        let end = end.min(self.size);
        if start >= end {
            return None;
        }
        let a = self.unit_at(start);
        let b = self.unit_at(end - 1);
        Some((a.start, b.end, a.index))
    }
}

/// Offset of the 2-byte DEK generation inside the header.
pub const GENERATION_OFFSET: u64 = 6;

/// The per-file header: magic, version, DEK generation, random file id,
/// steal area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Which of the volume's DEK generations encrypts this file's contents.
    pub generation: u16,
    pub file_id: FileId,
    /// Bytes 24..40: the steal area (ciphertext of a tiny file lives partly here).
    pub steal: [u8; 16],
}

#[derive(Debug, thiserror::Error)]
pub enum FileHeaderError {
    #[error("not a kmfs file (bad magic)")]
    BadMagic,
    #[error("file format version {0} is not supported (this kmfs reads version {FILE_VERSION})")]
    Version(u16),
    #[error("file header is truncated")]
    Truncated,
}

impl FileHeader {
    /// A fresh header for DEK generation `generation`, with a random file id
    /// and random steal area.
    pub fn generate(generation: u16) -> io::Result<FileHeader> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(io::Error::other)?;
        let mut file_id = [0u8; 16];
        let mut steal = [0u8; 16];
        file_id.copy_from_slice(&bytes[..16]);
        steal.copy_from_slice(&bytes[16..]);
        Ok(FileHeader {
            generation,
            file_id,
            steal,
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&FILE_VERSION.to_be_bytes());
        b[6..8].copy_from_slice(&self.generation.to_be_bytes());
        b[8..24].copy_from_slice(&self.file_id);
        b[24..40].copy_from_slice(&self.steal);
        b
    }

    pub fn parse(b: &[u8]) -> Result<FileHeader, FileHeaderError> {
        if b.len() < HEADER_LEN as usize {
            return Err(FileHeaderError::Truncated);
        }
        if &b[..4] != MAGIC {
            return Err(FileHeaderError::BadMagic);
        }
        let v = u16::from_be_bytes([b[4], b[5]]);
        if v != FILE_VERSION {
            return Err(FileHeaderError::Version(v));
        }
        let generation = u16::from_be_bytes([b[6], b[7]]);
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[8..24]);
        let mut steal = [0u8; 16];
        steal.copy_from_slice(&b[24..40]);
        Ok(FileHeader {
            generation,
            file_id,
            steal,
        })
    }

    /// Reads the header of a backing file; `Ok(None)` if the file has none yet
    /// (shorter than the header: empty, or a header write that never completed).
    pub fn read_from(file: &File) -> io::Result<Option<FileHeader>> {
        let mut b = [0u8; HEADER_LEN as usize];
        let n = read_full_at(file, &mut b, 0)?;
        if n < b.len() {
            return Ok(None);
        }
        FileHeader::parse(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// `pread` until `buf` is full or end of file; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unit_shapes() {
        assert_eq!(Layout::new(0).unit_count(), 0);
        assert!(Layout::new(5).is_tiny());
        assert_eq!(
            Layout::new(16).unit(0),
            Unit {
                index: 0,
                start: 0,
                end: 16
            }
        );
        assert_eq!(Layout::new(4096).unit_count(), 1);
        let l = Layout::new(4096 + 5);
        assert_eq!(l.unit_count(), 1);
        assert_eq!(
            l.unit(0),
            Unit {
                index: 0,
                start: 0,
                end: 4101
            }
        );
        let l = Layout::new(8192 + 16);
        assert_eq!(l.unit_count(), 3);
        assert_eq!(
            l.unit(2),
            Unit {
                index: 2,
                start: 8192,
                end: 8208
            }
        );
        assert_eq!(l.span(100, 8200), Some((0, 8208, 0)));
        assert_eq!(l.span(9000, 9999), None);
    }

    proptest! {
        #[test]
        fn units_tile_the_file_and_are_xts_sized(size in 0u64..200_000) {
            let l = Layout::new(size);
            let mut pos = 0;
            for i in 0..l.unit_count() {
                let u = l.unit(i);
                prop_assert_eq!(u.start, pos);
                let len = u.end - u.start;
                prop_assert!(len >= 16 || l.is_tiny());
                prop_assert!(len <= 4096 + 15);
                pos = u.end;
            }
            prop_assert_eq!(pos, size);
            if size > 0 {
                let off = size / 2;
                let u = l.unit_at(off);
                prop_assert!(u.start <= off && off < u.end);
            }
        }

        #[test]
        fn header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FileHeader::parse(&bytes);
        }
    }

    #[test]
    fn header_roundtrip_and_errors() {
        let h = FileHeader::generate(0).unwrap();
        assert_eq!(FileHeader::parse(&h.to_bytes()).unwrap(), h);
        let mut b = h.to_bytes();
        b[0] = b'X';
        assert!(matches!(
            FileHeader::parse(&b),
            Err(FileHeaderError::BadMagic)
        ));
        let mut b = h.to_bytes();
        b[5] = 9;
        assert!(matches!(
            FileHeader::parse(&b),
            Err(FileHeaderError::Version(9))
        ));
        assert!(matches!(
            FileHeader::parse(&b[..39]),
            Err(FileHeaderError::Truncated)
        ));
    }
}
