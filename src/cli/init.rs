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
    /// The empty directory that will hold the ciphertext.
    pub backing_dir: PathBuf,
}

pub fn run(a: InitArgs) -> Result<(), CliError> {
    let (cfg, provider) = a.keys.open(Some(&a.backing_dir))?;
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
