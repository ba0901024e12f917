//! Re-encrypting one backing file in place, from one DEK generation to
//! another, chunk by chunk through the journal (see [`super::journal`]).
//!
//! The caller holds the file against the filesystem's own I/O for the whole
//! call, so nobody ever sees a file whose units are on two generations; a
//! crash in the middle is finished by [`finish_pending`] before the file is
//! served again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
    let mut committed = start > 0;
    let r = run(
        file,
        hd,
        step,
        start,
        fref,
        journal,
        progress,
        &mut committed,
    );
    r.map_err(|error| FileError {
        error,
        mixed: committed,
    })
}

#[allow(clippy::too_many_arguments)]
fn run(
    file: &File,
    hd: &FileHeader,
    step: &Step<'_>,
    start: u64,
    fref: &FileRef,
    journal: &mut Journal,
    progress: &mut dyn FnMut(u64),
    committed: &mut bool,
) -> io::Result<FileHeader> {
    let size = plain_size(file.metadata()?.len());
    let layout = Layout::new(size);
    let fid = &hd.file_id;
    let gen_write = (GENERATION_OFFSET, step.to_gen.to_be_bytes().to_vec());
    let record = |writes: Vec<(u64, Vec<u8>)>, next_unit: u64, complete: bool| Record {
        seq: 0,
        file: fref.clone(),
        from: step.from_gen,
        to: step.to_gen,
        next_unit,
        complete,
        writes,
    };
    if size == 0 || layout.is_tiny() {
        let mut writes = vec![gen_write];
        if layout.is_tiny() {
            // The tiny unit: the last 16 − size bytes of the steal area and the data.
            let off = HEADER_LEN + size - 16;
            let mut unit = [0u8; 16];
            if read_full_at(file, &mut unit, off)? != 16 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while being re-encrypted",
                ));
            }
            step.from.decrypt_tiny(fid, &mut unit);
            step.to.encrypt_tiny(fid, &mut unit);
            writes.push((off, unit.to_vec()));
        }
        let mut r = record(writes, 1, true);
        journal.commit(&mut r)?;
        *committed = true;
        apply(file, &r.writes)?;
        progress(size);
    } else {
        let count = layout.unit_count();
        let mut u = start;
        let mut buf = Vec::new();
        while u < count {
            let end = (u + CHUNK_UNITS).min(count);
            let a = layout.unit(u).start;
            let b = layout.unit(end - 1).end;
            buf.clear();
            buf.resize((b - a) as usize, 0);
            // A short read (a sparse tail) leaves zeros: holes stay holes.
            read_full_at(file, &mut buf, HEADER_LEN + a)?;
            let holes: Vec<bool> = (u..end)
                .map(|i| {
                    let un = layout.unit(i);
                    buf[(un.start - a) as usize..(un.end - a) as usize]
                        .iter()
                        .all(|&x| x == 0)
                })
                .collect();
            step.from
                .decrypt_units(fid, u, &mut buf)
                .map_err(crypto_err)?;
            step.to
                .encrypt_units(fid, u, &mut buf)
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
            let complete = end == count;
            if complete {
                writes.push(gen_write.clone());
            }
            let mut r = record(writes, end, complete);
            journal.commit(&mut r)?;
            *committed = true;
            apply(file, &r.writes)?;
            progress(b - a);
            u = end;
        }
    }
    journal.idle()?;
    let mut new = hd.clone();
    new.generation = step.to_gen;
    Ok(new)
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
