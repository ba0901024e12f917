//! `kmfs init`: create a volume.

use std::path::PathBuf;

use clap::Args;

use super::{CliError, KeySource};
use crate::volume::lock::{LOCK_FILE, VolumeLock};
use crate::volume::{InitOptions, Volume, header};

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub keys: KeySource,
    /// Keep file names in plain text (default: encrypted names).
    #[arg(long)]
    pub plaintext_names: bool,
    /// Create (and activate) the configured KEK on the key manager if it does
    /// not exist yet; without this flag the KEK must already exist.
    #[arg(long)]
    pub create_kek: bool,
    /// The empty directory that will hold the ciphertext.
    pub backing_dir: PathBuf,
}

/// Whether `dir` could take a new volume: a directory without a header,
/// empty but for `lost+found` and the lock file. Only then does `init` take
/// the lock (creating `kmfs.lock`); otherwise [`Volume::init`] reports why
/// not and nothing is created.
fn could_init(dir: &std::path::Path) -> bool {
    dir.is_dir()
        && !header::header_path(dir).exists()
        && std::fs::read_dir(dir).is_ok_and(|mut rd| {
            rd.all(|e| e.is_ok_and(|e| e.file_name() == "lost+found" || e.file_name() == LOCK_FILE))
        })
}

pub fn run(a: InitArgs) -> Result<(), CliError> {
    // One writer: a concurrent init (or anything else) on the same directory
    // is refused before a key is created or a byte written.
    let lock = if could_init(&a.backing_dir) {
        Some(VolumeLock::acquire(&a.backing_dir, "init")?)
    } else {
        None
    };
    let r = init(&a);
    // A failed init leaves the directory as it found it.
    if r.is_err()
        && let Some(l) = lock
        && l.created()
    {
        l.remove();
    }
    r
}

fn init(a: &InitArgs) -> Result<(), CliError> {
    let (cfg, provider) = a.keys.open(Some(&a.backing_dir))?;
    if a.create_kek {
        match provider.current_kek() {
            Ok(k) => println!("using existing key-encryption key {k}"),
            Err(crate::kms::KmsError::KeyNotFound(_)) => {
                let k = provider.create_kek(None)?;
                println!("created key-encryption key {k}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let opts = InitOptions {
        plaintext_names: a.plaintext_names
            || cfg.as_ref().is_some_and(|c| c.volume.plaintext_names),
    };
    if let Some(id) = cfg.as_ref().and_then(|c| c.volume.id.as_deref()) {
        return Err(CliError::other(
            crate::exitcode::CONFIG,
            format!(
                "{} already names volume {id} ([volume] id); a config unlocks one volume: copy it for the new volume and remove the id line",
                cfg.as_ref()
                    .map(|c| c.path.display().to_string())
                    .unwrap_or_default()
            ),
        ));
    }
    restrict_backing_dir(&a.backing_dir)?;
    let vol = Volume::init(&a.backing_dir, provider.as_ref(), &opts)?;
    // The mount root shows 0755 root:root (chmod/chown it through the mount),
    // while the backing root stays 0700.
    let root_attrs = crate::volume::internal::open_dir(&a.backing_dir)
        .and_then(|fd| crate::fs::root::RootAttrs::DEFAULT.store(std::os::fd::AsFd::as_fd(&fd)));
    if let Err(e) = root_attrs {
        println!(
            "note: the backing filesystem keeps no trusted.* attributes ({e}): the mount root shows the backing root's mode 0700 until changed"
        );
    }
    if let Some(c) = &cfg {
        c.record_volume_id(&vol.id_hex()).map_err(|e| {
            CliError::other(
                crate::exitcode::CONFIG,
                format!(
                    "volume {} created, but writing its id into {} failed: {e}; add id = \"{}\" under [volume] by hand",
                    vol.id_hex(),
                    c.path.display(),
                    vol.id_hex()
                ),
            )
        })?;
    }
    log::info!(
        "op=init volume={} path={} key={} version={} result=ok",
        vol.id_hex(),
        a.backing_dir.display(),
        vol.header.kek.name,
        vol.header.kek.version
    );
    println!(
        "created volume {} in {} (key {})",
        vol.id_hex(),
        a.backing_dir.display(),
        vol.header.kek
    );
    Ok(())
}

/// Makes the (new, empty) backing directory root's alone: mode 0700, owned
/// by the user running kmfs; `mount` refuses anything more open
/// (docs/SECURITY.md).
fn restrict_backing_dir(dir: &std::path::Path) -> Result<(), CliError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fail = |e: std::io::Error| {
        CliError::other(
            crate::exitcode::BACKING_DIR,
            format!("backing directory {}: {e}", dir.display()),
        )
    };
    let md = std::fs::metadata(dir).map_err(fail)?;
    if !md.is_dir() {
        return Ok(()); // Volume::init says what is wrong
    }
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if md.uid() != uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(fail)?;
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        println!(
            "backing directory {}: mode {:04o} -> 0700 (only root may enter it)",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}
