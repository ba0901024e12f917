//! `kmfs header dump|backup|restore`: the volume header's non-secret fields and
//! copies of it.

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliError, KeySource};
use crate::exitcode;
use crate::volume::header::{self, VolumeHeader};
use crate::volume::lock::VolumeLock;
use crate::volume::{self, hex};

#[derive(Subcommand, Debug)]
pub enum HeaderCommand {
    /// Print the header's non-secret fields (no key needed).
    Dump {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        backing_dir: PathBuf,
    },
    /// Copy the header to FILE (it holds no secret in clear, but keep it safe).
    Backup { backing_dir: PathBuf, file: PathBuf },
    /// Replace the header with FILE after checking it unlocks the volume.
    Restore {
        #[command(flatten)]
        keys: KeySource,
        backing_dir: PathBuf,
        file: PathBuf,
    },
}

fn time(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

fn dump_text(h: &VolumeHeader) -> String {
    let mut s = String::new();
    s += &format!("format version:   {}\n", header::VERSION);
    s += &format!("volume id:        {}\n", hex(&h.volume_id));
    s += "cipher suite:     AES-256-XTS (4096-byte units), AES-256-SIV names, HKDF-SHA256\n";
    s += &format!("block size:       {}\n", h.block_size);
    s += &format!(
        "file names:       {}\n",
        if h.plaintext_names() {
            "plain text"
        } else {
            "encrypted"
        }
    );
    s += &format!("created:          {}\n", time(h.created));
    s += &format!("updated:          {}\n", time(h.updated));
    s += &format!("KEK provider:     {}\n", h.kek.provider);
    s += &format!("KEK name:         {}\n", h.kek.name);
    s += &format!(
        "KEK uid:          {}\n",
        if h.kek.uid.is_empty() {
            "-"
        } else {
            &h.kek.uid
        }
    );
    s += &format!("KEK version:      {}\n", h.kek.version);
    s += &format!("format version:   {}\n", h.version);
    s += &format!("active key gen:   {}\n", h.active);
    s += &format!("key generations:  {}\n", h.generations.len());
    for g in &h.generations {
        s += &format!(
            "  generation {:<5} created {}  wrapped DEK {} bytes\n",
            g.generation,
            time(g.created),
            g.wrapped.len()
        );
    }
    s += &format!("rotation history: {} entries\n", h.history.len());
    for r in &h.history {
        s += &format!("  retired {}  {}\n", time(r.retired_at), r.kek);
    }
    s
}

fn dump_json(h: &VolumeHeader) -> String {
    let kek = |k: &crate::kms::KekRef| serde_json::json!({"provider": k.provider, "name": k.name, "uid": k.uid, "version": k.version});
    let v = serde_json::json!({
        "format_version": h.version,
        "volume_id": hex(&h.volume_id),
        "cipher_suite": h.suite,
        "block_size": h.block_size,
        "plaintext_names": h.plaintext_names(),
        "created": h.created,
        "updated": h.updated,
        "kek": kek(&h.kek),
        "active_generation": h.active,
        "generations": h.generations.iter().map(|g| serde_json::json!({"generation": g.generation, "created": g.created, "wrapped_dek_len": g.wrapped.len()})).collect::<Vec<_>>(),
        "history": h.history.iter().map(|r| serde_json::json!({"retired_at": r.retired_at, "kek": kek(&r.kek)})).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

pub fn run(cmd: HeaderCommand) -> Result<(), CliError> {
    match cmd {
        HeaderCommand::Dump { json, backing_dir } => {
            let (h, _) = volume::read_header(&backing_dir)?;
            if json {
                println!("{}", dump_json(&h));
            } else {
                print!("{}", dump_text(&h));
            }
            Ok(())
        }
        HeaderCommand::Backup { backing_dir, file } => {
            let (h, bytes) = volume::read_header(&backing_dir)?;
            if file.exists() {
                return Err(CliError::other(
                    exitcode::OTHER,
                    format!("{} already exists; choose a new file name", file.display()),
                ));
            }
            let dir = file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let name = file
                .file_name()
                .ok_or_else(|| {
                    CliError::other(
                        exitcode::USAGE,
                        format!("{} is not a file name", file.display()),
                    )
                })?
                .to_string_lossy()
                .into_owned();
            volume::atomic::write(dir, &format!(".{name}.tmp"), &name, &bytes, 0o600)
                .map_err(|e| volume::VolumeError::from(header::HeaderError::from(e)))?;
            println!(
                "saved header of volume {} to {}",
                hex(&h.volume_id),
                file.display()
            );
            Ok(())
        }
        HeaderCommand::Restore {
            keys,
            backing_dir,
            file,
        } => {
            let _lock = VolumeLock::acquire(&backing_dir, "header-restore")?;
            let bytes = header::read_file(&file).map_err(volume::VolumeError::from)?;
            let candidate =
                VolumeHeader::decode(&bytes, &file).map_err(volume::VolumeError::from)?;
            let current = volume::read_header(&backing_dir).ok().map(|(h, _)| h);
            if let Some(current) = &current
                && current.volume_id == candidate.volume_id
                && let Some(g) = current
                    .generations
                    .iter()
                    .find(|g| candidate.generation(g.generation).is_none())
            {
                return Err(CliError::other(
                    exitcode::HEADER,
                    format!(
                        "{} lacks key generation {}, which files of this volume may use (the backup predates a rekey); refusing to restore",
                        file.display(),
                        g.generation
                    ),
                ));
            }
            if let Some(current) = &current
                && current.volume_id != candidate.volume_id
            {
                return Err(CliError::other(
                    exitcode::HEADER,
                    format!(
                        "{} belongs to volume {}, but {} holds volume {}; refusing to restore",
                        file.display(),
                        hex(&candidate.volume_id),
                        backing_dir.display(),
                        hex(&current.volume_id)
                    ),
                ));
            }
            // Prove the candidate unlocks before it replaces anything.
            let (cfg, provider) = keys.open(Some(&backing_dir))?;
            // The candidate must be the volume (and KEK) the config names.
            if let Some(c) = &cfg {
                c.pin().check(&backing_dir, &candidate)?;
            }
            drop(volume::unlock(
                &candidate,
                &bytes,
                provider.as_ref(),
                &file,
            )?);
            header::store(&backing_dir, &bytes).map_err(volume::VolumeError::from)?;
            let _ = super::open_volume(&backing_dir, cfg.as_ref(), provider.as_ref())?;
            log::info!(
                "op=header_restore volume={} path={} result=ok",
                hex(&candidate.volume_id),
                file.display()
            );
            println!(
                "restored header of volume {} from {} (previous header kept as {})",
                hex(&candidate.volume_id),
                file.display(),
                header::BACKUP_FILE
            );
            Ok(())
        }
    }
}
