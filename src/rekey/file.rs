//! Re-encrypting one backing file in place, from one DEK generation to
//! another, chunk by chunk through the journal (see [`super::journal`]).
//!
//! The caller holds the file against the filesystem's own I/O for each
//! call. [`Reencryption::some`] may stop after a time budget with the file split
//! between the generations at a unit boundary (the frontier); it then
//! commits a journal record that names only the frontier, so that the
//! chunk records before it are never applied again over writes the
//! filesystem makes once it serves the file again (below the frontier with
//! the new generation, above it with the old one). A crash in the middle is
//! finished by [`finish_pending`] before the file is served again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::journal::{CHUNK_UNITS, FileRef, Journal, Record};
use crate::crypto::content::ContentCipher;
use crate::volume::layout::{
    FileHeader, GENERATION_OFFSET, HEADER_LEN, Layout, plain_size, read_full_at,
};

/// The ciphers of a re-encryption.
pub struct Step<'a> {
    pub from_gen: u16,
    pub from: &'a ContentCipher,
    pub to_gen: u16,
    pub to: &'a ContentCipher,
}

/// What went wrong, and whether the file was left half re-encrypted (then
/// only [`finish_pending`] may touch it before it is served again).
#[derive(Debug)]
pub struct FileError {
    pub error: io::Error,
    pub mixed: bool,
}

fn apply(file: &File, writes: &[(u64, Vec<u8>)]) -> io::Result<()> {
    for (off, data) in writes {
        file.write_all_at(data, *off)?;
    }
    file.sync_data()
}

fn crypto_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// How much one call of [`Reencryption::some`] may do before it returns with
/// the file split (it always does at least one chunk).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub time: Duration,
    /// Plaintext bytes.
    pub bytes: u64,
}

/// How far [`Reencryption::some`] got.
#[derive(Debug)]
pub enum Progress {
    /// The file is on the new generation: its new header.
    Done(FileHeader),
    /// Units below this one are on the new generation, the rest (and a tiny
    /// unit) on the old; the journal's pending record says so.
    Partial(u64),
}

/// Re-encrypts `file` (header `hd`, opened read-write) from unit `start` on,
/// and returns its new header. `progress` is told the plaintext bytes done.
pub fn reencrypt(
    file: &File,
    hd: &FileHeader,
    step: &Step<'_>,
    start: u64,
    fref: &FileRef,
    journal: &mut Journal,
    progress: &mut dyn FnMut(u64),
) -> Result<FileHeader, FileError> {
    let job = Reencryption {
        file,
        header: hd,
        step,
        fref,
        journal,
        progress,
    };
    match job.some(start, None)? {
        Progress::Done(h) => Ok(h),
        Progress::Partial(_) => unreachable!("no time budget: runs to the end"),
    }
}

/// The re-encryption of one file (header `header`, opened read-write)
/// through the journal; `progress` is told the plaintext bytes done.
pub struct Reencryption<'a> {
    pub file: &'a File,
    pub header: &'a FileHeader,
    pub step: &'a Step<'a>,
    pub fref: &'a FileRef,
    pub journal: &'a mut Journal,
    pub progress: &'a mut dyn FnMut(u64),
}

impl Reencryption<'_> {
    /// Re-encrypts from unit `start` on; with a `budget`, stops once it is
    /// used up after a chunk (never inside one) and returns the frontier.
    /// The file's size is read afresh: between calls the filesystem may
    /// have grown or cut it.
    pub fn some(self, start: u64, budget: Option<Budget>) -> Result<Progress, FileError> {
        let mut run = Run {
            job: self,
            committed: start > 0,
        };
        let r = run.run(start, budget);
        r.map_err(|error| FileError {
            error,
            mixed: run.committed,
        })
    }
}

/// A [`Reencryption`] under way.
struct Run<'a> {
    job: Reencryption<'a>,
    /// A record that changes the file was committed: an error now leaves
    /// it half re-encrypted.
    committed: bool,
}

impl Run<'_> {
    /// A journal record for this file.
    fn record(&self, writes: Vec<(u64, Vec<u8>)>, next_unit: u64, complete: bool) -> Record {
        Record {
            seq: 0,
            file: self.job.fref.clone(),
            from: self.job.step.from_gen,
            to: self.job.step.to_gen,
            next_unit,
            complete,
            writes,
            directory: false,
        }
    }

    /// Commits `writes` to the journal, then makes them in the file.
    fn commit_apply(
        &mut self,
        writes: Vec<(u64, Vec<u8>)>,
        next_unit: u64,
        complete: bool,
    ) -> io::Result<()> {
        let mut r = self.record(writes, next_unit, complete);
        self.job.journal.commit(&mut r)?;
        self.committed = true;
        apply(self.job.file, &r.writes)
    }

    /// The write that names the new generation in the file header.
    fn generation_write(&self) -> (u64, Vec<u8>) {
        (
            GENERATION_OFFSET,
            self.job.step.to_gen.to_be_bytes().to_vec(),
        )
    }

    fn run(&mut self, start: u64, budget: Option<Budget>) -> io::Result<Progress> {
        let size = plain_size(self.job.file.metadata()?.len());
        let layout = Layout::new(size);
        if size == 0 || layout.is_tiny() {
            self.tiny(size, &layout)?;
        } else if let Some(frontier) = self.units(&layout, start, budget)? {
            return Ok(Progress::Partial(frontier));
        }
        self.job.journal.idle()?;
        let mut new = self.job.header.clone();
        new.generation = self.job.step.to_gen;
        Ok(Progress::Done(new))
    }

    /// An empty or tiny file: the header's generation and the tiny unit in
    /// one record.
    fn tiny(&mut self, size: u64, layout: &Layout) -> io::Result<()> {
        let mut writes = vec![self.generation_write()];
        if layout.is_tiny() {
            // The tiny unit: the last 16 − size bytes of the steal area and the data.
            let off = HEADER_LEN + size - 16;
            let mut unit = [0u8; 16];
            if read_full_at(self.job.file, &mut unit, off)? != 16 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while being re-encrypted",
                ));
            }
            let fid = &self.job.header.file_id;
            self.job.step.from.decrypt_tiny(fid, &mut unit);
            self.job.step.to.encrypt_tiny(fid, &mut unit);
            writes.push((off, unit.to_vec()));
        }
        self.commit_apply(writes, 1, true)?;
        (self.job.progress)(size);
        Ok(())
    }

    /// A file of whole units, chunk by chunk from `start`: `Some(frontier)`
    /// if the budget ran out first.
    fn units(
        &mut self,
        layout: &Layout,
        start: u64,
        budget: Option<Budget>,
    ) -> io::Result<Option<u64>> {
        let began = Instant::now();
        let mut bytes = 0u64;
        let count = layout.unit_count();
        let mut u = start;
        let mut buf = Vec::new();
        if u >= count {
            // Cut below the frontier since the last call: nothing is left
            // but the header's generation.
            self.commit_apply(vec![self.generation_write()], count, true)?;
        }
        while u < count {
            if budget.is_some_and(|b| u > start && (began.elapsed() >= b.time || bytes >= b.bytes))
            {
                // Out of time between chunks: the frontier goes into the
                // journal before the caller lets the filesystem in.
                let mut r = self.record(Vec::new(), u, false);
                self.job.journal.commit(&mut r)?;
                return Ok(Some(u));
            }
            let end = (u + CHUNK_UNITS).min(count);
            let done = self.chunk(layout, u, end, &mut buf)?;
            (self.job.progress)(done);
            bytes += done;
            u = end;
        }
        Ok(None)
    }

    /// Units `u..end` (of `count`), through `buf`; returns the plaintext
    /// bytes they hold.
    fn chunk(&mut self, layout: &Layout, u: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<u64> {
        let fid = &self.job.header.file_id;
        let a = layout.unit(u).start;
        let b = layout.unit(end - 1).end;
        buf.clear();
        buf.resize((b - a) as usize, 0);
        // A short read (a sparse tail) leaves zeros: holes stay holes.
        read_full_at(self.job.file, buf, HEADER_LEN + a)?;
        let holes: Vec<bool> = (u..end)
            .map(|i| {
                let un = layout.unit(i);
                buf[(un.start - a) as usize..(un.end - a) as usize]
                    .iter()
                    .all(|&x| x == 0)
            })
            .collect();
        self.job
            .step
            .from
            .decrypt_units(fid, u, buf)
            .map_err(crypto_err)?;
        self.job
            .step
            .to
            .encrypt_units(fid, u, buf)
            .map_err(crypto_err)?;
        // One write per run of units that are not holes.
        let mut writes = Vec::new();
        let mut i = u;
        while i < end {
            if holes[(i - u) as usize] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < end && !holes[(j - u) as usize] {
                j += 1;
            }
            let s = layout.unit(i).start;
            let e = layout.unit(j - 1).end;
            writes.push((
                HEADER_LEN + s,
                buf[(s - a) as usize..(e - a) as usize].to_vec(),
            ));
            i = j;
        }
        let complete = end == layout.unit_count();
        if complete {
            writes.push(self.generation_write());
        }
        self.commit_apply(writes, end, complete)?;
        Ok(b - a)
    }
}

/// Finishes the file of the journal's pending record `rec`: writes the
/// record's chunk again (it may have been torn), then re-encrypts the rest.
/// `file` must be the record's file (see [`super::locate`]).
pub fn finish_pending(
    file: &File,
    rec: &Record,
    step: &Step<'_>,
    journal: &mut Journal,
) -> io::Result<FileHeader> {
    apply(file, &rec.writes)?;
    let hd = FileHeader::read_from(file)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "file header vanished"))?;
    if rec.complete {
        journal.idle()?;
        return Ok(hd);
    }
    reencrypt(
        file,
        &hd,
        step,
        rec.next_unit,
        &rec.file,
        journal,
        &mut |_| {},
    )
    .map_err(|e| e.error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::Secret;
    use crate::volume::content::BackingFile;
    use std::fs::OpenOptions;

    fn cipher(b: u8) -> ContentCipher {
        ContentCipher::new(&Secret::from_slice(&[b; 32]), &[7u8; 16])
    }

    fn plain(file: &File, c: &ContentCipher) -> Vec<u8> {
        let hd = FileHeader::read_from(file).unwrap().unwrap();
        let size = plain_size(file.metadata().unwrap().len());
        BackingFile {
            file,
            cipher: c.into(),
            header: &hd,
        }
        .read(size, 0, size as usize)
        .unwrap()
    }

    /// A backing file of plaintext `data` on generation 0 (cipher `c`), with
    /// a hole from 1 MiB to 2 MiB when `sparse`.
    fn make(
        dir: &std::path::Path,
        name: &str,
        data: &[u8],
        c: &ContentCipher,
        sparse: bool,
    ) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap();
        let hd = FileHeader::generate(0).unwrap();
        f.write_all_at(&hd.to_bytes(), 0).unwrap();
        let bf = BackingFile {
            file: &f,
            cipher: c.into(),
            header: &hd,
        };
        if sparse {
            bf.write(0, 0, &data[..1 << 20]).unwrap();
            bf.truncate(1 << 20, 2 << 20).unwrap();
            bf.write(2 << 20, 2 << 20, &data[2 << 20..]).unwrap();
        } else {
            bf.write(0, 0, data).unwrap();
        }
        f
    }

    /// `make` of a non-sparse file "f", with its header and journal FileRef.
    fn make_f(
        dir: &std::path::Path,
        data: &[u8],
        c: &ContentCipher,
    ) -> (File, FileHeader, FileRef) {
        let f = make(dir, "f", data, c, false);
        let hd = FileHeader::read_from(&f).unwrap().unwrap();
        let fref = FileRef {
            ino: f.metadata().unwrap().ino(),
            file_id: hd.file_id,
            path: "f".into(),
        };
        (f, hd, fref)
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn every_shape_moves_to_the_new_generation_and_reads_the_same() {
        let d = tempfile::tempdir().unwrap();
        let (c0, c1) = (cipher(1), cipher(2));
        let step = Step {
            from_gen: 0,
            from: &c0,
            to_gen: 1,
            to: &c1,
        };
        let mut j = Journal::open(d.path()).unwrap();
        let sizes = [
            0usize,
            1,
            15,
            16,
            17,
            4095,
            4096,
            4097,
            4111,
            4112,
            300_000,
            (1 << 20) + 7,
            (3 << 20) + 5,
        ];
        for (k, &n) in sizes.iter().enumerate() {
            let want = data(n, k as u8);
            let f = make(d.path(), &format!("f{k}"), &want, &c0, false);
            let hd = FileHeader::read_from(&f).unwrap().unwrap();
            let fref = FileRef {
                ino: 1,
                file_id: hd.file_id,
                path: format!("f{k}").into(),
            };
            let new = reencrypt(&f, &hd, &step, 0, &fref, &mut j, &mut |_| {}).unwrap();
            assert_eq!(new.generation, 1);
            assert_eq!(FileHeader::read_from(&f).unwrap().unwrap().generation, 1);
            if n > 0 {
                assert_eq!(plain(&f, &c1), want, "size {n}");
                assert_ne!(
                    plain(&f, &c0),
                    want,
                    "size {n} still decrypts with the old key"
                );
            }
            assert_eq!(Journal::pending(d.path()).unwrap(), None);
        }
        // Holes stay holes (no blocks allocated, zeros read back).
        let want = {
            let mut v = data(3 << 20, 9);
            v[1 << 20..2 << 20].fill(0);
            v
        };
        let f = make(d.path(), "sparse", &want, &c0, true);
        let before = f.metadata().unwrap().blocks();
        let hd = FileHeader::read_from(&f).unwrap().unwrap();
        let fref = FileRef {
            ino: 1,
            file_id: hd.file_id,
            path: "sparse".into(),
        };
        reencrypt(&f, &hd, &step, 0, &fref, &mut j, &mut |_| {}).unwrap();
        assert_eq!(plain(&f, &c1), want);
        assert!(f.metadata().unwrap().blocks() <= before + 8);
    }

    /// What the filesystem does between batches: I/O through the split
    /// ciphers (new below the frontier, old above).
    fn split_io<'a>(
        f: &'a File,
        hd: &'a FileHeader,
        c0: &'a ContentCipher,
        c1: &'a ContentCipher,
        at: u64,
    ) -> BackingFile<'a> {
        BackingFile {
            file: f,
            cipher: crate::crypto::content::Units::Split {
                below: c1,
                above: c0,
                at,
            },
            header: hd,
        }
    }

    /// A file re-encrypted in batches while "the filesystem" reads, writes
    /// across the frontier, grows and cuts it in between: every read in
    /// between matches a byte model, and so does the result. Then the same
    /// with a crash after a batch and writes after it: recovery from the
    /// journal (a frontier-only record) must not put old chunk contents
    /// back over those writes.
    #[test]
    fn batches_leave_a_split_file_the_filesystem_can_serve() {
        let (c0, c1) = (cipher(1), cipher(2));
        let step = Step {
            from_gen: 0,
            from: &c0,
            to_gen: 1,
            to: &c1,
        };
        for crash in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let mut model = data((8 << 20) + 3000, 4);
            let (f, hd, fref) = make_f(d.path(), &model, &c0);
            let mut j = Journal::open(d.path()).unwrap();
            let mut next = 0;
            let mut round = 0u8;
            let mut crashed = false;
            loop {
                // A zero budget: one chunk per call.
                let job = Reencryption {
                    file: &f,
                    header: &hd,
                    step: &step,
                    fref: &fref,
                    journal: &mut j,
                    progress: &mut |_| {},
                };
                match job
                    .some(
                        next,
                        Some(Budget {
                            time: Duration::ZERO,
                            bytes: 0,
                        }),
                    )
                    .unwrap()
                {
                    Progress::Done(h) => {
                        assert_eq!(h.generation, 1);
                        break;
                    }
                    Progress::Partial(n) => {
                        assert!(n > next, "no progress from {next}");
                        next = n;
                    }
                }
                round += 1;
                let size = model.len() as u64;
                let io = split_io(&f, &hd, &c0, &c1, next);
                assert!(
                    io.read(size, 0, model.len()).unwrap() == model,
                    "read at frontier {next}"
                );
                // A write straddling the frontier, one far above it.
                let front = next * BLOCK_BYTES;
                let patch = vec![round; 9000];
                let at = front.saturating_sub(4000).min(size);
                let size = io.write(size, at, &patch).unwrap();
                let end =
                    (at as usize + patch.len()).min(model.len().max(at as usize + patch.len()));
                model.resize(model.len().max(end), 0);
                model[at as usize..end].copy_from_slice(&patch);
                let far = size - 100;
                let size = io.write(size, far, &[round; 50]).unwrap();
                model[far as usize..far as usize + 50].fill(round);
                assert_eq!(size, model.len() as u64);
                match round {
                    // Grow past the end, then cut back to below the frontier
                    // and grow again: units between are new, on either side.
                    2 => {
                        let size = io.write(size, size + 5000, b"tail").unwrap();
                        model.resize(model.len() + 5000, 0);
                        model.extend_from_slice(b"tail");
                        assert_eq!(size, model.len() as u64);
                    }
                    3 => {
                        let cut = front.saturating_sub(10_000).max(1);
                        io.truncate(size, cut).unwrap();
                        model.truncate(cut as usize);
                        let size = io.write(cut, cut, &vec![7u8; 300_000]).unwrap();
                        model.extend_from_slice(&vec![7u8; 300_000]);
                        assert_eq!(size, model.len() as u64);
                    }
                    _ => {}
                }
                if crash && round == 2 {
                    crashed = true;
                    // The daemon dies here. Recovery (before the next mount
                    // serves anything) works from the journal alone.
                    drop(j);
                    let rec = Journal::pending(d.path())
                        .unwrap()
                        .expect("a frontier record");
                    assert!(
                        rec.writes.is_empty() && !rec.complete,
                        "pending record has {} writes, complete {}",
                        rec.writes.len(),
                        rec.complete
                    );
                    assert_eq!(rec.next_unit, next);
                    let mut j2 = Journal::open(d.path()).unwrap();
                    let h = finish_pending(&f, &rec, &step, &mut j2).unwrap();
                    assert_eq!(h.generation, 1);
                    break;
                }
            }
            assert_eq!(crashed, crash, "the crash happened half way");
            assert!(crash || round >= 3, "only {round} batches");
            assert_eq!(FileHeader::read_from(&f).unwrap().unwrap().generation, 1);
            assert!(
                plain(&f, &c1) == model,
                "crash {crash}: contents after the rekey"
            );
            assert_eq!(Journal::pending(d.path()).unwrap(), None);
        }
    }

    const BLOCK_BYTES: u64 = crate::crypto::content::BLOCK as u64;

    use std::os::unix::fs::MetadataExt;

    /// A crash after `k` chunks, with the next chunk's overwrite torn: the
    /// journal's record finishes the file, whatever k and the tear.
    #[test]
    fn a_crash_mid_file_is_finished_from_the_journal() {
        let (c0, c1) = (cipher(1), cipher(2));
        let step = Step {
            from_gen: 0,
            from: &c0,
            to_gen: 1,
            to: &c1,
        };
        let want = data((4 << 20) + 4100, 3);
        for k in 1..=4u64 {
            for torn in [false, true] {
                let d = tempfile::tempdir().unwrap();
                let (f, hd, fref) = make_f(d.path(), &want, &c0);
                let mut j = Journal::open(d.path()).unwrap();
                // "Crash": stop right after chunk k was applied.
                let mut chunks = 0;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    reencrypt(&f, &hd, &step, 0, &fref, &mut j, &mut |_| {
                        chunks += 1;
                        if chunks == k {
                            panic!("crash");
                        }
                    })
                }));
                assert!(r.is_err());
                let rec = Journal::pending(d.path())
                    .unwrap()
                    .expect("a pending record");
                if torn {
                    // The overwrite of the record's chunk torn half way.
                    let (off, bytes) = &rec.writes[0];
                    f.write_all_at(&vec![0x55u8; bytes.len() / 2], *off)
                        .unwrap();
                }
                let path = crate::rekey::locate(d.path(), &rec.file).expect("found");
                assert_eq!(path, d.path().join("f"));
                let f2 = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let mut j = Journal::open(d.path()).unwrap();
                let h = finish_pending(&f2, &rec, &step, &mut j).unwrap();
                assert_eq!(h.generation, 1);
                assert_eq!(plain(&f2, &c1), want, "k={k} torn={torn}");
                assert_eq!(Journal::pending(d.path()).unwrap(), None);
            }
        }
    }
}
