//! Durable replacement of a small file in a directory: temporary file,
//! fsync, rename over the old one, fsync of the directory. At every instant
//! the file is either complete old or complete new contents. Used for the
//! volume header and its backups, directory ids, the rekey state file and
//! header copies saved by `kmfs header save`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A step of [`write`] failed: `what` on `path`.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {what}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

/// Writes `bytes` to `dir/name` durably through `dir/tmp_name` (removed on
/// failure), the new file with permission bits `mode`.
pub fn write(
    dir: &Path,
    tmp_name: &str,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<(), WriteError> {
    let err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| WriteError { path, what, source }
    };
    let tmp = dir.join(tmp_name);
    let dst = dir.join(name);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(&tmp, "create"))?;
    let res = f.write_all(bytes).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(err(&tmp, "write")(e));
    }
    if let Err(e) = fs::rename(&tmp, &dst) {
        let _ = fs::remove_file(&tmp);
        return Err(err(&dst, "replace")(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir, "sync the directory"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        super::write(d.path(), "f.tmp", "f", b"old contents", 0o600).unwrap();
        super::write(d.path(), "f.tmp", "f", b"new", 0o444).unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"new");
        let mode = std::fs::metadata(d.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        assert!(!d.path().join("f.tmp").exists());
        let e = super::write(&d.path().join("absent"), "f.tmp", "f", b"x", 0o600).unwrap_err();
        assert_eq!(e.what, "create");
        assert!(e.to_string().contains("cannot create"), "{e}");
    }
}
