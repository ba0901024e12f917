//! The private append-only files shared by the chained log and the audit
//! CSV. A leaf module: it depends on nothing else in the crate.

use std::fs;
use std::io;
use std::path::Path;

/// Opens `path` for appending (and reading, if `read`), creating it with mode
/// 0600 and its directory with 0750; tightens a wider existing file to 0600
/// (log lines and audit rows may name files and keys) and refuses anything
/// that is not a regular file. Shared by the chained log and the audit CSV.
pub fn open_private_append(path: &Path, read: bool) -> io::Result<fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
    }
    let file = fs::OpenOptions::new()
        .read(read)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}
