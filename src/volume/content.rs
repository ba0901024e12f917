//! Block I/O on one backing file: read, write and truncate plaintext ranges,
//! decrypting and re-encrypting whole data units (see [`super::layout`]).
//!
//! Callers serialise writes and truncates of one file (the filesystem layer holds
//! a per-inode write lock) and pass the file's header and current plaintext size.
//! When a file grows, the old last unit is re-encrypted in its new shape *before*
//! anything beyond it is written, so a crash in between leaves a file that is at
//! worst zero-filled at the tail, never one whose earlier units no longer decrypt.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::layout::{FileHeader, HEADER_LEN, Layout, read_full_at};
#[cfg(test)]
use crate::crypto::content::ContentCipher;
use crate::crypto::content::{BLOCK, Units};

/// `buf[..n]`, growing `buf` (zero-filled) only when it is too short; the
/// contents of the returned slice are whatever the buffer held before.
fn sized(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Free space on the backing file system above which growing writes skip
/// the fallocate reservation (see [`BackingFile::space_is_ample`]).
const AMPLE_FREE: u64 = 1 << 30;

/// Largest plaintext file size (leaves room for the header below i64::MAX).
pub const MAX_SIZE: u64 = (i64::MAX as u64) - HEADER_LEN - 4096;

/// How [`BackingFile::zero`] clears the whole units inside its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// FALLOC_FL_PUNCH_HOLE on the backing file: the units become holes.
    Punch,
    /// FALLOC_FL_ZERO_RANGE on the backing file, or a punched hole where the
    /// backing file system lacks it.
    Zero,
}

/// Plaintext zeros for the partial units at the edges of a zeroed range (an
/// edge lies inside one unit: at most 4111 bytes).
static ZEROS: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

/// `Ok` if the backing file system can punch holes in `file`, its error
/// (EOPNOTSUPP where it cannot) otherwise. The probe punches one byte at the
/// backing file's end, which holds no data, so it changes nothing.
pub fn probe_punch(file: &File) -> io::Result<()> {
    let len = file.metadata()?.len();
    crate::sys::fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        len,
        1,
    )
}

/// One backing file, opened read-write (or read-only for reads), with its keys
/// (two generations while a rekey is half way through it).
pub struct BackingFile<'a> {
    pub file: &'a File,
    pub cipher: Units<'a>,
    pub header: &'a FileHeader,
}

fn einval(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

impl BackingFile<'_> {
    /// Decrypts the units of `layout` covering `[start, end)` (end ≤ size) and
    /// returns exactly those plaintext bytes.
    fn read_plain(&self, layout: Layout, start: u64, end: u64) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        let r = self.read_plain_into(layout, start, end, &mut buf)?;
        buf.truncate(r.end);
        buf.drain(..r.start);
        Ok(buf)
    }

    /// Decrypts the units of `layout` covering `[start, end)` (end ≤ size) into
    /// `buf` (resized as needed, its capacity reused) and returns where in `buf`
    /// the bytes `[start, end)` are.
    fn read_plain_into(
        &self,
        layout: Layout,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<Range<usize>> {
        let Some((a, b, first)) = layout.span(start, end) else {
            return Ok(0..0);
        };
        let fid = &self.header.file_id;
        if layout.is_tiny() {
            let size = layout.size as usize;
            let mut unit = [0u8; 16];
            read_full_at(self.file, &mut unit, HEADER_LEN + layout.size - 16)?;
            self.cipher.decrypt_tiny(fid, &mut unit);
            buf.clear();
            buf.extend_from_slice(&unit[16 - size..][start as usize..end as usize]);
            return Ok(0..buf.len());
        }
        let n = (b - a) as usize;
        let dst = sized(buf, n);
        self.decrypt_at(a, first, dst)?;
        Ok((start - a) as usize..(end - a) as usize)
    }

    /// Reads the ciphertext of the units starting with unit `first` at
    /// plaintext offset `a` into `dst` (whole units) and decrypts it in place.
    fn decrypt_at(&self, a: u64, first: u64, dst: &mut [u8]) -> io::Result<()> {
        // A short read (file cut by a crash or concurrently) leaves zeros = hole.
        let got = read_full_at(self.file, dst, HEADER_LEN + a)?;
        dst[got..].fill(0);
        self.cipher
            .decrypt_units(&self.header.file_id, first, dst)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Reads up to `len` plaintext bytes at `off` from a file of plaintext size
    /// `size`.
    pub fn read(&self, size: u64, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = off.saturating_add(len as u64).min(size);
        if off >= end {
            return Ok(Vec::new());
        }
        self.read_plain(Layout::new(size), off, end)
    }

    /// Like [`Self::read`], but decrypts into `buf` (whose allocation is reused
    /// across calls) and returns the range of `buf` holding the bytes read.
    pub fn read_into(
        &self,
        size: u64,
        off: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<Range<usize>> {
        let end = off.saturating_add(len as u64).min(size);
        if off >= end {
            return Ok(0..0);
        }
        self.read_plain_into(Layout::new(size), off, end, buf)
    }

    /// Encrypts plaintext `data` = bytes `[a, a + data.len())` of a file of
    /// plaintext size `size` (a unit-aligned span of that layout) in place and
    /// writes it.
    fn write_span(&self, layout: Layout, a: u64, first: u64, data: &mut [u8]) -> io::Result<()> {
        let fid = &self.header.file_id;
        if layout.is_tiny() {
            let size = layout.size as usize;
            let mut unit = [0u8; 16];
            unit[16 - size..].copy_from_slice(data);
            self.cipher.encrypt_tiny(fid, &mut unit);
            return self.file.write_all_at(&unit, HEADER_LEN + layout.size - 16);
        }
        self.cipher
            .encrypt_units(fid, first, data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.file.write_all_at(data, HEADER_LEN + a)
    }

    /// Fills `plain` (= plaintext `[a, a + plain.len())` of the new layout) with
    /// the existing plaintext of `[s, e)` as laid out by `old` (e ≤ old size).
    /// When the old units covering `[s, e)` start at `s` and fit in `plain`,
    /// they are read and decrypted in place; otherwise through a copy.
    fn fill_existing(
        &self,
        old: Layout,
        a: u64,
        s: u64,
        e: u64,
        plain: &mut [u8],
    ) -> io::Result<()> {
        let Some((oa, ob, first)) = old.span(s, e) else {
            return Ok(());
        };
        let o = (s - a) as usize;
        if !old.is_tiny() && oa == s && ob - a <= plain.len() as u64 {
            return self.decrypt_at(oa, first, &mut plain[o..(ob - a) as usize]);
        }
        let existing = self.read_plain(old, s, e)?;
        plain[o..o + existing.len()].copy_from_slice(&existing);
        Ok(())
    }

    /// Re-encrypts the units of `new` covering `[start, end)`, taking existing
    /// plaintext from the file as laid out by `old`, then overlaying `patch` at
    /// `patch_off`. Only the parts of those units the patch does not cover are
    /// read back. `scratch` is a reusable buffer.
    fn rewrite(
        &self,
        old: Layout,
        new: Layout,
        start: u64,
        end: u64,
        patch: Option<(u64, &[u8])>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let Some((a, b, first)) = new.span(start, end) else {
            return Ok(());
        };
        // The patch covers whole units (an aligned write): encrypt straight
        // from it, with nothing to read back, copy in or zero first.
        if let Some((off, data)) = patch
            && off == a
            && data.len() as u64 == b - a
            && !new.is_tiny()
        {
            let out = sized(scratch, data.len());
            self.cipher
                .encrypt_units_from(&self.header.file_id, first, data, out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return self.file.write_all_at(out, HEADER_LEN + a);
        }
        let plain = sized(scratch, (b - a) as usize);
        let keep_end = b.min(old.size);
        // Plaintext beyond the old size reads as zeros.
        if keep_end < b {
            plain[(keep_end.max(a) - a) as usize..].fill(0);
        }
        if a < keep_end {
            match patch {
                Some((off, data)) => {
                    let (ps, pe) = (off, off + data.len() as u64);
                    let head = (a, ps.min(keep_end));
                    let tail = (pe.max(a), keep_end);
                    let need_head = head.0 < head.1;
                    let need_tail = tail.0 < tail.1;
                    // Both ends inside one unit: one read covers them.
                    if need_head && need_tail && tail.0 - head.1 < 2 * BLOCK as u64 {
                        self.fill_existing(old, a, a, keep_end, plain)?;
                    } else {
                        if need_head {
                            self.fill_existing(old, a, head.0, head.1, plain)?;
                        }
                        if need_tail {
                            self.fill_existing(old, a, tail.0, tail.1, plain)?;
                        }
                    }
                }
                None => self.fill_existing(old, a, a, keep_end, plain)?,
            }
        }
        if let Some((off, data)) = patch {
            let o = (off - a) as usize;
            plain[o..o + data.len()].copy_from_slice(data);
        }
        self.write_span(new, a, first, plain)
    }

    /// Re-encrypts the old last unit in the shape it has in a file grown to
    /// `new_size`, unless its shape does not change. Returns the span it covers.
    fn reshape_old_tail(&self, old: Layout, new: Layout) -> io::Result<Option<(u64, u64)>> {
        if old.size == 0 {
            return Ok(None);
        }
        let last = old.unit(old.unit_count() - 1);
        if !old.is_tiny() && new.unit_at(last.start) == last {
            return Ok(None);
        }
        let (a, b, _) = new
            .span(last.start, old.size)
            .expect("old tail lies inside the new size");
        Ok(Some((a, b)))
    }

    /// Writes `data` at plaintext offset `off` into a file of plaintext size
    /// `size`; returns the new size.
    pub fn write(&self, size: u64, off: u64, data: &[u8]) -> io::Result<u64> {
        self.write_with(size, off, data, &mut Vec::new())
    }

    /// Like [`Self::write`], with a reusable buffer for the re-encrypted units.
    pub fn write_with(
        &self,
        size: u64,
        off: u64,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> io::Result<u64> {
        if data.is_empty() {
            return Ok(size);
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let new_size = size.max(end);
        let old = Layout::new(size);
        let new = Layout::new(new_size);
        let (wa, wb, _) = new.span(off, end).expect("non-empty write");
        let tail = if new_size > size {
            self.reshape_old_tail(old, new)?
        } else {
            None
        };
        if new_size > size && !self.space_is_ample(new_size - size) {
            // Reserve the space first: on a nearly full disk the write then
            // fails with ENOSPC before anything changed, instead of a short
            // pwrite leaving a torn (undecryptable) unit at the end of the
            // file.
            self.reserve(wa, wb)?;
            if let Some((ta, tb)) = tail {
                self.reserve(ta, tb)?;
            }
        }
        let mut start = off;
        if let Some((ta, tb)) = tail {
            if tb < wa || ta > wb {
                // Disjoint from the write: make the grown tail valid first.
                self.rewrite(old, new, ta, tb, None, scratch)?;
            } else {
                // Adjacent or overlapping: one span covers both.
                start = ta.min(off);
            }
        }
        self.rewrite(old, new, start, end, Some((off, data)), scratch)?;
        Ok(new_size)
    }

    /// Whether the backing file system has so much free space that a write
    /// growing the file by `grow` bytes cannot run out of it: at least
    /// [`AMPLE_FREE`] plus 64 times the growth. Then [`Self::reserve`] is
    /// skipped; it costs a second pass over the new pages on tmpfs (which
    /// zeroes them) and a journal transaction on ext4. When in doubt (the
    /// statvfs fails), the answer is no.
    fn space_is_ample(&self, grow: u64) -> bool {
        match crate::sys::fstatvfs(self.file) {
            Ok(st) => {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                free >= AMPLE_FREE.saturating_add(grow.saturating_mul(64))
            }
            Err(_) => false,
        }
    }

    /// Allocates backing space for plaintext `[a, b)` without changing the
    /// file's size (FALLOC_FL_KEEP_SIZE). A backing file system without
    /// fallocate is let through.
    fn reserve(&self, a: u64, b: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain integer arguments on a descriptor we borrow.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                (HEADER_LEN + a) as libc::off_t,
                (b - a) as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
            _ => Err(e),
        }
    }

    /// Changes the plaintext size from `size` to `new_size`.
    pub fn truncate(&self, size: u64, new_size: u64) -> io::Result<()> {
        if new_size > MAX_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let old = Layout::new(size);
        let new = Layout::new(new_size);
        if new_size > size {
            if new.is_tiny() {
                // The tiny unit includes header bytes, so it is never a hole.
                self.file.set_len(HEADER_LEN + new_size)?;
                return self.rewrite(old, new, 0, new_size, None, &mut Vec::new());
            }
            if let Some((ta, tb)) = self.reshape_old_tail(old, new)? {
                self.rewrite(old, new, ta, tb, None, &mut Vec::new())?;
            }
            return self.file.set_len(HEADER_LEN + new_size);
        }
        if new_size == size {
            return Ok(());
        }
        if new_size == 0 {
            return self.file.set_len(HEADER_LEN);
        }
        // Shrinking: keep the plaintext of the new last unit, cut, re-encrypt it.
        let last = new.unit(new.unit_count() - 1);
        let unchanged = !new.is_tiny() && !old.is_tiny() && old.unit_at(last.start) == last;
        if unchanged {
            return self.file.set_len(HEADER_LEN + new_size);
        }
        let (keep_a, _, _) = new.span(last.start, new_size).expect("non-empty");
        let mut kept = self.read_plain(old, keep_a, new_size)?;
        self.file.set_len(HEADER_LEN + new_size)?;
        if kept.len() as u64 != new_size - keep_a {
            return Err(einval("short read while truncating"));
        }
        let first = new.unit_at(keep_a).index;
        self.write_span(new, keep_a, first, &mut kept)
    }

    /// Makes plaintext `[off, end)` of a file of plaintext size `size` read as
    /// zeros (`end` is clipped to `size`; the size never changes). The whole
    /// units inside the range are released on the backing file first, in one
    /// fallocate call (`how`), so they become all-zero ciphertext, which reads
    /// as zeros (a hole); then the partial units at its edges (and a tiny
    /// unit) are re-encrypted with zeros in the range, as a write of zeros
    /// would. Each unit is at every moment either its old ciphertext, zeros,
    /// or (during its one rewrite) as torn as a write can leave it.
    /// `scratch` is a reusable buffer.
    pub fn zero(
        &self,
        size: u64,
        off: u64,
        end: u64,
        how: Release,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let end = end.min(size);
        if off >= end {
            return Ok(());
        }
        let mut edge = |a: u64, b: u64| -> io::Result<()> {
            if a >= b {
                return Ok(());
            }
            self.write_with(size, a, &ZEROS[..(b - a) as usize], scratch)
                .map(drop)
        };
        let l = Layout::new(size);
        if l.is_tiny() {
            // The tiny unit holds header bytes: never a hole.
            return edge(off, end);
        }
        let first = l.unit_at(off);
        let last = l.unit_at(end - 1);
        let lo = if first.start == off {
            first.index
        } else {
            first.index + 1
        };
        let hi = if last.end == end {
            last.index + 1
        } else {
            last.index
        };
        if lo < hi {
            let (wa, wb) = (l.unit(lo).start, l.unit(hi - 1).end);
            self.release(wa, wb, how)?;
            edge(off, wa)?;
            edge(wb, end)
        } else if first == last {
            edge(off, end)
        } else {
            // Two neighbouring partial units.
            edge(off, first.end)?;
            edge(last.start, end)
        }
    }

    /// Turns the ciphertext of plaintext `[a, b)` (whole units) into zeros on
    /// the backing file without writing data: a punched hole, or a zeroed
    /// range. Where the backing file system has no FALLOC_FL_ZERO_RANGE
    /// (tmpfs) a zeroed range is punched (callers that want the space
    /// allocated preallocate it afterwards).
    fn release(&self, a: u64, b: u64, how: Release) -> io::Result<()> {
        let (off, len) = (HEADER_LEN + a, b - a);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if how == Release::Zero {
            let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match crate::sys::fallocate(self.file, zero, off, len) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                r => return r,
            }
        }
        crate::sys::fallocate(self.file, punch, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::Secret;
    use proptest::prelude::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        file: File,
        cipher: ContentCipher,
        header: FileHeader,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let header = FileHeader::generate(0).unwrap();
        file.write_all_at(&header.to_bytes(), 0).unwrap();
        Fixture {
            _dir: dir,
            file,
            cipher: ContentCipher::new(&Secret::from_slice(&[1u8; 32]), &[2u8; 16]),
            header,
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, Vec<u8>),
        Truncate(u64),
        /// Zero `[off, off + len)`, punching (true) or zeroing whole units.
        Zero(u64, u64, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..20_000, proptest::collection::vec(any::<u8>(), 1..9000)).prop_map(|(o, d)| Op::Write(o, d)),
            1 => (0u64..20_000).prop_map(Op::Truncate),
            1 => (0u64..40, proptest::collection::vec(any::<u8>(), 1..20)).prop_map(|(o, d)| Op::Write(o, d)),
            1 => (0u64..40).prop_map(Op::Truncate),
            2 => (0u64..20_000, 1u64..12_000, any::<bool>()).prop_map(|(o, l, p)| Op::Zero(o, l, p)),
            1 => (0u64..40, 1u64..20, any::<bool>()).prop_map(|(o, l, p)| Op::Zero(o, l, p)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random writes and truncates against a Vec<u8> model: contents, size and
        /// backing length always agree, and the backing file never holds the
        /// plaintext.
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec(op(), 1..12)) {
            let f = fixture();
            let bf = BackingFile { file: &f.file, cipher: (&f.cipher).into(), header: &f.header };
            let mut model: Vec<u8> = Vec::new();
            let mut size = 0u64;
            // Reused buffers start (and stay) dirty: nothing may leak from them.
            let mut scratch = vec![0xeeu8; 70_000];
            let mut rbuf = vec![0x77u8; 70_000];
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Write(off, data) if i % 2 == 0 => {
                        size = bf.write_with(size, off, &data, &mut scratch).unwrap();
                        let end = off as usize + data.len();
                        if model.len() < end { model.resize(end, 0); }
                        model[off as usize..end].copy_from_slice(&data);
                    }
                    Op::Write(off, data) => {
                        size = bf.write(size, off, &data).unwrap();
                        let end = off as usize + data.len();
                        if model.len() < end { model.resize(end, 0); }
                        model[off as usize..end].copy_from_slice(&data);
                    }
                    Op::Truncate(n) => {
                        bf.truncate(size, n).unwrap();
                        size = n;
                        model.resize(n as usize, 0);
                    }
                    Op::Zero(off, len, punch) => {
                        let how = if punch { Release::Punch } else { Release::Zero };
                        bf.zero(size, off, off + len, how, &mut scratch).unwrap();
                        let end = ((off + len) as usize).min(model.len());
                        if (off as usize) < end {
                            model[off as usize..end].fill(0);
                        }
                    }
                }
                prop_assert_eq!(size, model.len() as u64);
                prop_assert_eq!(f.file.metadata().unwrap().len(), HEADER_LEN + size);
                let got = bf.read(size, 0, size as usize + 10).unwrap();
                prop_assert_eq!(&got, &model);
                let r = bf.read_into(size, 0, size as usize + 10, &mut rbuf).unwrap();
                prop_assert_eq!(&rbuf[r], &model[..]);
            }
            // Partial reads at odd offsets.
            if size > 3 {
                let got = bf.read(size, 3, 5000).unwrap();
                prop_assert_eq!(&got[..], &model[3..model.len().min(5003)]);
                let r = bf.read_into(size, 3, 5000, &mut rbuf).unwrap();
                prop_assert_eq!(&rbuf[r], &model[3..model.len().min(5003)]);
            }
        }
    }

    /// Aligned appends and overwrites of whole units take the out-of-place
    /// path; the result must equal what a byte model says, also when the
    /// last unit is short or carries a < 16-byte remainder.
    #[test]
    fn aligned_whole_unit_writes_round_trip() {
        let f = fixture();
        let bf = BackingFile {
            file: &f.file,
            cipher: (&f.cipher).into(),
            header: &f.header,
        };
        let mut model = Vec::new();
        let mut size = 0;
        for (i, len) in [4096usize, 3 * 4096, 40 * 4096, 4096 + 7, 5]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            let off = size;
            size = bf.write(size, off, &data).unwrap();
            model.extend_from_slice(&data);
        }
        // Overwrite the first 8 units in place, unit-aligned.
        let patch = vec![0xc3u8; 8 * 4096];
        size = bf.write(size, 0, &patch).unwrap();
        model[..patch.len()].copy_from_slice(&patch);
        assert_eq!(size, model.len() as u64);
        assert_eq!(bf.read(size, 0, model.len()).unwrap(), model);
        // Ciphertext, not plaintext, on disk.
        let mut raw = vec![0u8; 4096];
        f.file.read_exact_at(&mut raw, HEADER_LEN).unwrap();
        assert_ne!(raw, patch[..4096]);
    }

    #[test]
    fn sparse_write_leaves_a_hole_that_reads_as_zeros() {
        let f = fixture();
        let bf = BackingFile {
            file: &f.file,
            cipher: (&f.cipher).into(),
            header: &f.header,
        };
        let size = bf.write(0, 10 * 4096 * 256, b"end").unwrap();
        let got = bf.read(size, 0, 4096).unwrap();
        assert!(got.iter().all(|&b| b == 0));
        assert_eq!(bf.read(size, size - 3, 3).unwrap(), b"end");
        use std::os::unix::fs::MetadataExt;
        let md = f.file.metadata().unwrap();
        assert!(
            md.blocks() * 512 < 1 << 20,
            "backing file should stay sparse"
        );
    }

    /// Zeroing whole units deallocates them on the backing file (holes), the
    /// partial units at the edges keep their other bytes, and the last unit
    /// (merged with a 1–15-byte remainder) can be released whole.
    #[test]
    fn zero_releases_whole_units_and_rewrites_edges() {
        use std::os::unix::fs::MetadataExt;
        let f = fixture();
        let bf = BackingFile {
            file: &f.file,
            cipher: (&f.cipher).into(),
            header: &f.header,
        };
        let mut model: Vec<u8> = (0..64 * 4096 + 7).map(|i| (i % 251 + 1) as u8).collect();
        let size = bf.write(0, 0, &model).unwrap();
        f.file.sync_all().unwrap();
        let before = f.file.metadata().unwrap().blocks();
        // From the middle of unit 2 to the middle of unit 60.
        bf.zero(
            size,
            2 * 4096 + 100,
            60 * 4096 + 5,
            Release::Punch,
            &mut Vec::new(),
        )
        .unwrap();
        model[2 * 4096 + 100..60 * 4096 + 5].fill(0);
        assert_eq!(bf.read(size, 0, model.len()).unwrap(), model);
        let after = f.file.metadata().unwrap().blocks();
        assert!(
            after * 512 <= before * 512 - 50 * 4096,
            "57 whole units punched: {before} -> {after} blocks"
        );
        // The merged last unit (4103 bytes) zeroed whole, then the first byte.
        bf.zero(size, 63 * 4096, size + 100, Release::Zero, &mut Vec::new())
            .unwrap();
        model[63 * 4096..].fill(0);
        bf.zero(size, 0, 1, Release::Punch, &mut Vec::new())
            .unwrap();
        model[0] = 0;
        assert_eq!(bf.read(size, 0, model.len()).unwrap(), model);
        assert_eq!(f.file.metadata().unwrap().len(), HEADER_LEN + size);
    }

    #[test]
    fn tiny_files_use_the_steal_area() {
        let f = fixture();
        let bf = BackingFile {
            file: &f.file,
            cipher: (&f.cipher).into(),
            header: &f.header,
        };
        let size = bf.write(0, 0, b"hi").unwrap();
        assert_eq!(size, 2);
        assert_eq!(f.file.metadata().unwrap().len(), HEADER_LEN + 2);
        assert_eq!(bf.read(size, 0, 100).unwrap(), b"hi");
        let mut raw = [0u8; 42];
        read_full_at(&f.file, &mut raw, 0).unwrap();
        assert_ne!(&raw[40..], b"hi");
        assert_eq!(
            &raw[8..24],
            &f.header.file_id,
            "file id is never overwritten"
        );
        // Growing past 16 bytes turns the data into an ordinary unit.
        let size = bf.write(size, 2, b" there, long enough").unwrap();
        assert_eq!(bf.read(size, 0, 100).unwrap(), b"hi there, long enough");
    }
}
