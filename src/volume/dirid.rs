//! Directory ids: every backing directory of a volume with encrypted names holds a
//! file `kmfs.dirid` with 16 random bytes, followed by the key generation its
//! names are encrypted with (2 bytes, big-endian; absent = generation 0).
//! Names in the directory are encrypted with that id as associated data, so
//! renaming a directory never re-encrypts its children, and an entry copied
//! into another directory does not decrypt there.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use super::internal;

use crate::crypto::names::DIR_ID_LEN;

pub const DIRID_FILE: &str = "kmfs.dirid";
const DIRID_TMP: &str = "kmfs.dirid.tmp";

/// A directory id and the key generation of the names under it.
pub type DirKey = ([u8; DIR_ID_LEN], u16);

/// A fresh random directory id.
pub fn generate() -> io::Result<[u8; DIR_ID_LEN]> {
    let mut id = [0u8; DIR_ID_LEN];
    getrandom::fill(&mut id).map_err(io::Error::other)?;
    Ok(id)
}

/// Writes a new id for names of generation `generation` into directory
/// `dir` durably and returns it.
pub fn create(dir: &Path, generation: u16) -> io::Result<[u8; DIR_ID_LEN]> {
    let id = generate()?;
    write(dir, &id, generation)?;
    Ok(id)
}

/// The bytes of a `kmfs.dirid` file.
pub fn encode(id: &[u8; DIR_ID_LEN], generation: u16) -> Vec<u8> {
    let mut b = id.to_vec();
    if generation != 0 {
        b.extend_from_slice(&generation.to_be_bytes());
    }
    b
}

/// Writes `id` (names of generation `generation`) as the directory id of
/// `dir` ([`super::atomic::write`], read-only).
pub fn write(dir: &Path, id: &[u8; DIR_ID_LEN], generation: u16) -> io::Result<()> {
    super::atomic::write(dir, DIRID_TMP, DIRID_FILE, &encode(id, generation), 0o444)
        .map_err(|e| e.source)
}

/// Parses the bytes of a `kmfs.dirid` file: (id, generation).
pub fn decode(b: &[u8]) -> Option<([u8; DIR_ID_LEN], u16)> {
    let id: [u8; DIR_ID_LEN] = b.get(..DIR_ID_LEN)?.try_into().ok()?;
    match b.len() {
        DIR_ID_LEN => Some((id, 0)),
        n if n == DIR_ID_LEN + 2 => Some((id, u16::from_be_bytes([b[16], b[17]]))),
        _ => None,
    }
}

/// Reads the id of directory `dir` and the generation of its names.
pub fn read(dir: &Path) -> io::Result<([u8; DIR_ID_LEN], u16)> {
    let fd = internal::open_dir(dir)?;
    read_at(fd.as_fd()).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

/// Reads the id of the directory open as `dir` (any descriptor, `O_PATH`
/// included) and the generation of its names. The file is read as untrusted
/// input ([`internal::read`]): a symlink, FIFO, device or oversized file is
/// refused, never followed or waited on.
pub fn read_at(dir: BorrowedFd<'_>) -> io::Result<([u8; DIR_ID_LEN], u16)> {
    let b = internal::read(dir, c"kmfs.dirid", internal::limits::DIRID)
        .map_err(|e| io::Error::new(e.kind(), format!("{DIRID_FILE}: {e}")))?;
    decode(&b).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{DIRID_FILE}: directory id is {} bytes, expected {DIR_ID_LEN} or {}",
                b.len(),
                DIR_ID_LEN + 2
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_read_and_reject_damaged() {
        let d = tempfile::tempdir().unwrap();
        let id = create(d.path(), 0).unwrap();
        assert_eq!(read(d.path()).unwrap(), (id, 0));
        assert_eq!(std::fs::read(d.path().join(DIRID_FILE)).unwrap().len(), 16);
        write(d.path(), &id, 7).unwrap();
        assert_eq!(read(d.path()).unwrap(), (id, 7));
        std::fs::remove_file(d.path().join(DIRID_FILE)).unwrap();
        std::fs::write(d.path().join(DIRID_FILE), b"short").unwrap();
        let e = read(d.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        std::fs::remove_file(d.path().join(DIRID_FILE)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join(DIRID_FILE)).unwrap();
        let e = read(d.path()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}
