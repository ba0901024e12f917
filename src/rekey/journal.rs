//! The rekey journal `kmfs.rekey.journal` (docs/FORMAT.md, "Rekey journal").
//!
//! A file is re-encrypted in place, one chunk of units at a time. Before a
//! chunk's new ciphertext is written over the old, it is committed to the
//! journal (with `fdatasync`), so a crash in the middle of the overwrite —
//! which could leave a unit half old, half new — is repaired by writing the
//! chunk again from the journal. The record also says how far the file has
//! got ("units before `next_unit` are on the new generation"), so recovery can
//! finish the file.
//!
//! The journal has two fixed slots, written alternately, each record carrying
//! a sequence number and a SHA-256 over itself: a torn write of the newest
//! record leaves the previous one (already applied, so harmless to apply
//! again) as the latest valid record. An `idle` record ends a file. The file is
//! allocated in full when a rekey starts, so later commits need no free space.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::be::Cursor;
use crate::crypto::content::FileId;
use crate::volume::internal;

pub use crate::volume::backing::JOURNAL_FILE;
const MAGIC: &[u8; 4] = b"KMRJ";
const VERSION: u8 = 1;
const KIND_IDLE: u8 = 0;
const KIND_CHUNK: u8 = 1;
const KIND_DIR: u8 = 2;
/// Units per chunk: 1 MiB of data, plus a merged tail of up to 15 bytes.
pub const CHUNK_UNITS: u64 = 256;
/// Bytes reserved per slot: the largest chunk, its header write, the path and
/// the record's own fields.
pub const SLOT: u64 = (CHUNK_UNITS * 4096) + 16 * 1024;

/// Which file a record is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// Backing inode number (to find the file again if it was renamed).
    pub ino: u64,
    pub file_id: FileId,
    /// Path relative to the backing root when the file was started.
    pub path: PathBuf,
}

/// One journal record: the writes of one chunk of one file, or (with
/// `directory`) that the names of a directory are being moved to another
/// generation (`file.file_id` then holds the directory id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub file: FileRef,
    pub from: u16,
    pub to: u16,
    /// After the writes, units below this index are on generation `to`.
    pub next_unit: u64,
    /// The writes include the header's new generation: the file is done.
    pub complete: bool,
    /// (backing offset, bytes) — ciphertext and header bytes only.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// A directory record (no writes; recovery runs the directory again).
    pub directory: bool,
}

pub struct Journal {
    file: File,
    path: PathBuf,
    seq: u64,
}

fn encode(r: Option<&Record>, seq: u64) -> Vec<u8> {
    let kind = match r {
        None => KIND_IDLE,
        Some(r) if r.directory => KIND_DIR,
        Some(_) => KIND_CHUNK,
    };
    let mut b =
        Vec::with_capacity(64 + r.map_or(0, |r| r.writes.iter().map(|w| w.1.len() + 12).sum()));
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&[0u8; 4]); // length, patched below
    b.push(VERSION);
    b.push(kind);
    b.extend_from_slice(&seq.to_be_bytes());
    if let Some(r) = r {
        b.extend_from_slice(&r.file.ino.to_be_bytes());
        b.extend_from_slice(&r.file.file_id);
        b.extend_from_slice(&r.from.to_be_bytes());
        b.extend_from_slice(&r.to.to_be_bytes());
        b.extend_from_slice(&r.next_unit.to_be_bytes());
        b.push(r.complete as u8);
        let p = r.file.path.as_os_str().as_encoded_bytes();
        b.extend_from_slice(&(p.len() as u32).to_be_bytes());
        b.extend_from_slice(p);
        b.extend_from_slice(&(r.writes.len() as u32).to_be_bytes());
        for (off, data) in &r.writes {
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
        }
    }
    let total = (b.len() + 32) as u32;
    b[4..8].copy_from_slice(&total.to_be_bytes());
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    b
}

/// A slot's content: `None` if it holds no valid record (never written, or
/// torn). `Some((seq, None))` for an idle record.
fn decode(slot: &[u8]) -> Option<(u64, Option<Record>)> {
    if slot.len() < 8 || &slot[..4] != MAGIC {
        return None;
    }
    let total = u32::from_be_bytes(slot[4..8].try_into().ok()?) as usize;
    if !(50..=slot.len()).contains(&total) {
        return None;
    }
    let (body, sum) = slot[..total].split_at(total - 32);
    if Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let mut c = Cursor::new(body, 8);
    if c.u8()? != VERSION {
        return None;
    }
    let kind = c.u8()?;
    let seq = c.u64()?;
    if kind == KIND_IDLE {
        return Some((seq, None));
    }
    if kind != KIND_CHUNK && kind != KIND_DIR {
        return None;
    }
    let ino = c.u64()?;
    let file_id: FileId = c.take(16)?.try_into().ok()?;
    let from = c.u16()?;
    let to = c.u16()?;
    let next_unit = c.u64()?;
    let complete = c.u8()? != 0;
    let plen = c.u32()? as usize;
    let p = c.take(plen)?;
    // On Unix any byte string is a valid OsStr.
    let path = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p));
    let n = c.u32()? as usize;
    let mut writes = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let off = c.u64()?;
        let len = c.u32()? as usize;
        writes.push((off, c.take(len)?.to_vec()));
    }
    Some((
        seq,
        Some(Record {
            seq,
            file: FileRef { ino, file_id, path },
            from,
            to,
            next_unit,
            complete,
            writes,
            directory: kind == KIND_DIR,
        }),
    ))
}

fn read_slot(file: &File, i: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; SLOT as usize];
    let n = crate::volume::layout::read_full_at(file, &mut buf, i * SLOT)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn path(backing: &Path) -> PathBuf {
    backing.join(JOURNAL_FILE)
}

impl Journal {
    /// Opens the journal of `backing`, creating and allocating it if needed.
    pub fn open(backing: &Path) -> io::Result<Journal> {
        let path = path(backing);
        // An existing journal must be a regular file of at most two slots,
        // opened without following a symlink; a new one is created
        // exclusively (O_EXCL), so nothing planted under the name is ever
        // written through.
        let file = match internal::open_path(&path, libc::O_RDWR, 2 * SLOT) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&path)?,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        // Reserve both slots now: a commit must never be the write that finds
        // the disk full.
        match nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            (2 * SLOT) as i64,
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EOPNOTSUPP) => file.set_len(2 * SLOT)?,
            Err(e) => return Err(e.into()),
        }
        let seq = Self::latest_in(&file)?.map_or(0, |(s, _)| s);
        Ok(Journal { file, path, seq })
    }

    /// The newest valid record of an existing journal, without creating one.
    pub fn pending(backing: &Path) -> io::Result<Option<Record>> {
        match internal::open_path(&path(backing), libc::O_RDONLY, 2 * SLOT) {
            Ok(f) => Ok(Self::latest_in(&f)?.and_then(|(_, r)| r)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn latest_in(file: &File) -> io::Result<Option<(u64, Option<Record>)>> {
        let a = decode(&read_slot(file, 0)?);
        let b = decode(&read_slot(file, 1)?);
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() as u64 > SLOT {
            return Err(io::Error::other(format!(
                "{}: a journal record of {} bytes does not fit a slot",
                self.path.display(),
                bytes.len()
            )));
        }
        let slot = (self.seq + 1) % 2;
        self.file.write_all_at(bytes, slot * SLOT)?;
        self.file.sync_data()?;
        self.seq += 1;
        Ok(())
    }

    /// Commits `r` durably (its `seq` is assigned here).
    pub fn commit(&mut self, r: &mut Record) -> io::Result<()> {
        r.seq = self.seq + 1;
        let bytes = encode(Some(r), r.seq);
        self.put(&bytes)
    }

    /// Records that no file is in progress.
    pub fn idle(&mut self) -> io::Result<()> {
        let bytes = encode(None, self.seq + 1);
        self.put(&bytes)
    }

    /// Removes the journal of `backing` (the rekey finished).
    pub fn remove(backing: &Path) -> io::Result<()> {
        crate::sys::remove_file_if_exists(&path(backing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> Record {
        Record {
            seq: 0,
            file: FileRef {
                ino: 77,
                file_id: [n as u8; 16],
                path: PathBuf::from("a/b"),
            },
            from: 0,
            to: 1,
            next_unit: n,
            complete: false,
            writes: vec![(40, vec![n as u8; 100]), (6, vec![0, 1])],
            directory: n == 3,
        }
    }

    #[test]
    fn newest_record_wins_and_a_torn_one_falls_back() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(Journal::pending(d.path()).unwrap(), None);
        let mut r1 = rec(1);
        j.commit(&mut r1).unwrap();
        let mut r2 = rec(2);
        j.commit(&mut r2).unwrap();
        assert_eq!(Journal::pending(d.path()).unwrap(), Some(r2.clone()));
        // Tear the newest record (slot of seq 2 = slot 0): r1 is the latest.
        let f = OpenOptions::new().write(true).open(path(d.path())).unwrap();
        f.write_all_at(&[0xff; 64], 40).unwrap();
        assert_eq!(Journal::pending(d.path()).unwrap(), Some(r1.clone()));
        // Reopening continues the sequence after the valid one.
        let mut j = Journal::open(d.path()).unwrap();
        j.idle().unwrap();
        assert_eq!(Journal::pending(d.path()).unwrap(), None);
        let mut r3 = rec(3);
        j.commit(&mut r3).unwrap();
        assert_eq!(Journal::pending(d.path()).unwrap().unwrap().next_unit, 3);
        Journal::remove(d.path()).unwrap();
        assert_eq!(Journal::pending(d.path()).unwrap(), None);
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        for n in [0usize, 7, 8, 60, 200] {
            let mut b = encode(Some(&rec(5)), 9);
            b.truncate(n.min(b.len()));
            assert!(decode(&b).is_none());
        }
        let mut b = encode(Some(&rec(5)), 9);
        b[30] ^= 1;
        assert!(decode(&b).is_none());
        assert!(decode(&encode(Some(&rec(5)), 9)).is_some());
    }
}
