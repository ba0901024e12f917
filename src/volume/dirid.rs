//! Directory ids: every backing directory of a volume with encrypted names holds a
//! file `kmfs.dirid` with 16 random bytes. Names in the directory are encrypted
//! with that id as associated data, so renaming a directory never re-encrypts its
//! children, and an entry copied into another directory does not decrypt there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::crypto::names::DIR_ID_LEN;

pub const DIRID_FILE: &str = "kmfs.dirid";
const DIRID_TMP: &str = "kmfs.dirid.tmp";

/// A fresh random directory id.
pub fn generate() -> io::Result<[u8; DIR_ID_LEN]> {
    let mut id = [0u8; DIR_ID_LEN];
    getrandom::fill(&mut id).map_err(io::Error::other)?;
    Ok(id)
}

/// Writes a new id into directory `dir` durably and returns it.
pub fn create(dir: &Path) -> io::Result<[u8; DIR_ID_LEN]> {
    let id = generate()?;
    write(dir, &id)?;
    Ok(id)
}

/// Writes `id` as the directory id of `dir` (temporary file, fsync, rename).
pub fn write(dir: &Path, id: &[u8; DIR_ID_LEN]) -> io::Result<()> {
    let tmp = dir.join(DIRID_TMP);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&tmp)?;
    f.write_all(id)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(DIRID_FILE))?;
    File::open(dir)?.sync_all()
}

/// Reads the id of directory `dir`.
pub fn read(dir: &Path) -> io::Result<[u8; DIR_ID_LEN]> {
    let b = fs::read(dir.join(DIRID_FILE))?;
    b.as_slice().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: directory id is {} bytes, expected {DIR_ID_LEN}",
                dir.join(DIRID_FILE).display(),
                b.len()
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
        let id = create(d.path()).unwrap();
        assert_eq!(read(d.path()).unwrap(), id);
        std::fs::remove_file(d.path().join(DIRID_FILE)).unwrap();
        std::fs::write(d.path().join(DIRID_FILE), b"short").unwrap();
        let e = read(d.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
