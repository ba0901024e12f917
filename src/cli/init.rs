//! `kmfs init`: create a volume.

use std::path::PathBuf;

use clap::Args;

use super::{CliError, KeySource};
use crate::volume::{InitOptions, Volume};

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

pub fn run(a: InitArgs) -> Result<(), CliError> {
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
    let vol = Volume::init(&a.backing_dir, provider.as_ref(), &opts)?;
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
