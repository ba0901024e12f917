//! Permission checks for files that hold secrets or decide where secrets go:
//! volume configs, key files, client private keys, HSM PIN files.
//!
//! Such a file must be a regular file owned by root (or by the user running kmfs),
//! with no permission bits for group or others, in a directory that only its
//! owner can write to. Anything else is refused with a message that names the
//! file, what is wrong and the command that fixes it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CredFileError {
    #[error("cannot read {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotRegular { what: &'static str, path: PathBuf },
    #[error(
        "{what} {path} has mode {mode:04o}, which lets group or others access it; run: chmod 600 {path}"
    )]
    LooseMode {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} has mode {mode:04o}, which lets group or others change it; run: chmod go-w {path}"
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("{what} {path} is owned by uid {uid}, not root; run: chown root: {path}")]
    WrongOwner {
        what: &'static str,
        path: PathBuf,
        uid: u32,
    },
    #[error(
        "directory {dir} holding {what} {path} is writable by group or others (mode {mode:04o}); run: chmod go-w {dir}"
    )]
    LooseDir {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error("directory {dir} holding {what} {path} is owned by uid {uid}, not root")]
    DirWrongOwner {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
    },
}

/// Why a backing directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum BackingDirError {
    #[error("cannot inspect backing directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "backing directory {path} has mode {mode:04o} (owner uid {uid}): users other than root can enter or change it; run: chown root: {path} && chmod 700 {path} (or mount with -o insecure_backing to accept it)"
    )]
    Open { path: PathBuf, mode: u32, uid: u32 },
    #[error(
        "directory {dir} above backing directory {path} is writable by group or others (mode {mode:04o}) without the sticky bit, so it can be swapped; run: chmod go-w {dir} (or mount with -o insecure_backing to accept it)"
    )]
    LooseParent {
        path: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
}

/// Checks that only root (or the user running kmfs) can enter or change the
/// backing directory `path`: owned by a trusted user, no group or other
/// permission bits, and no directory above it writable by others unless it
/// has the sticky bit (like /tmp), so it cannot be renamed away.
pub fn check_backing_dir(path: &Path) -> Result<(), BackingDirError> {
    let io = |source| BackingDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let abs = std::fs::canonicalize(path).map_err(io)?;
    let md = std::fs::metadata(&abs).map_err(io)?;
    let mode = md.mode() & 0o7777;
    if !trusted_uid(md.uid()) || mode & 0o077 != 0 {
        return Err(BackingDirError::Open {
            path: abs,
            mode,
            uid: md.uid(),
        });
    }
    let mut dir = abs.parent();
    while let Some(d) = dir {
        let dmd = std::fs::metadata(d).map_err(io)?;
        let dmode = dmd.mode() & 0o7777;
        if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
            return Err(BackingDirError::LooseParent {
                path: abs.clone(),
                dir: d.to_path_buf(),
                mode: dmode,
            });
        }
        dir = d.parent();
    }
    Ok(())
}

/// Checks a file that decides trust without being secret (a CA
/// certificate): a regular file owned by root (or the user running kmfs)
/// that nobody else can write, in a directory nobody else can write (unless
/// it has the sticky bit).
pub fn check_trusted(path: &Path, what: &'static str) -> Result<(), CredFileError> {
    let (mode, _) = owned_regular_file(path, what)?;
    if mode & 0o022 != 0 {
        return Err(CredFileError::Writable {
            what,
            path: path.to_path_buf(),
            mode,
        });
    }
    let abs = std::path::absolute(path).map_err(io_error(path, what))?;
    if let Some(dir) = abs.parent() {
        let dmode = std::fs::metadata(dir).map_err(io_error(path, what))?.mode() & 0o7777;
        if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
            return Err(CredFileError::LooseDir {
                what,
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                mode: dmode,
            });
        }
    }
    Ok(())
}

fn io_error(path: &Path, what: &'static str) -> impl Fn(std::io::Error) -> CredFileError {
    move |source| CredFileError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `path` must be a regular file owned by root or the user running kmfs:
/// its permission bits and metadata.
fn owned_regular_file(
    path: &Path,
    what: &'static str,
) -> Result<(u32, std::fs::Metadata), CredFileError> {
    let md = std::fs::metadata(path).map_err(io_error(path, what))?;
    if !md.is_file() {
        return Err(CredFileError::NotRegular {
            what,
            path: path.to_path_buf(),
        });
    }
    if !trusted_uid(md.uid()) {
        return Err(CredFileError::WrongOwner {
            what,
            path: path.to_path_buf(),
            uid: md.uid(),
        });
    }
    Ok((md.mode() & 0o7777, md))
}

fn trusted_uid(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Checks that `path` is a private regular file in a safely owned directory.
/// `what` names the file's role in messages ("key file", "volume config", ...).
pub fn check_private(path: &Path, what: &'static str) -> Result<(), CredFileError> {
    let io = io_error(path, what);
    let (mode, _) = owned_regular_file(path, what)?;
    if mode & 0o077 != 0 {
        return Err(CredFileError::LooseMode {
            what,
            path: path.to_path_buf(),
            mode,
        });
    }
    let abs = std::path::absolute(path).map_err(&io)?;
    if let Some(dir) = abs.parent() {
        let dmd = std::fs::metadata(dir).map_err(&io)?;
        let dmode = dmd.mode() & 0o7777;
        if !trusted_uid(dmd.uid()) {
            return Err(CredFileError::DirWrongOwner {
                what,
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                uid: dmd.uid(),
            });
        }
        if dmode & 0o022 != 0 {
            return Err(CredFileError::LooseDir {
                what,
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                mode: dmode,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join("secret");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn private_file_passes() {
        let d = tempfile::tempdir().unwrap();
        let p = file_with_mode(d.path(), 0o600);
        check_private(&p, "key file").unwrap();
        let p = file_with_mode(d.path(), 0o400);
        check_private(&p, "key file").unwrap();
    }

    #[test]
    fn group_or_world_readable_is_refused_with_fix() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644] {
            let p = file_with_mode(d.path(), mode);
            let e = check_private(&p, "key file").unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, CredFileError::LooseMode { .. }), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
    }

    #[test]
    fn world_writable_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = file_with_mode(d.path(), 0o600);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_private(&p, "key file").unwrap_err();
        assert!(matches!(e, CredFileError::LooseDir { .. }), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = check_private(Path::new("/nonexistent/kmfs/key"), "key file").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/kmfs/key"));
    }

    #[test]
    fn directory_is_not_a_key_file() {
        let d = tempfile::tempdir().unwrap();
        let e = check_private(d.path(), "key file").unwrap_err();
        assert!(matches!(e, CredFileError::NotRegular { .. }));
    }

    #[test]
    fn a_ca_certificate_others_can_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = file_with_mode(d.path(), 0o644);
        check_trusted(&p, "CA certificate").unwrap();
        for mode in [0o664, 0o646, 0o666] {
            let p = file_with_mode(d.path(), mode);
            let e = check_trusted(&p, "CA certificate").unwrap_err().to_string();
            assert!(
                e.contains("CA certificate") && e.contains("chmod go-w"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_backing_directory_others_can_enter_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("back");
        std::fs::create_dir(&b).unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_backing_dir(&b).unwrap();
        for mode in [0o750, 0o705, 0o755] {
            std::fs::set_permissions(&b, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_backing_dir(&b).unwrap_err().to_string();
            assert!(e.contains("chmod 700"), "{e}");
        }
    }
}
