//! `kmfs mount`: being written (issue 3).

use std::path::PathBuf;

use clap::Args;

use super::{CliError, KeySource};
use crate::exitcode;

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub keys: KeySource,
    /// Stay in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Mount options, comma-separated (config=FILE, keyfile=PATH, allow_other, ro, ...).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    pub backing_dir: PathBuf,
    pub mountpoint: PathBuf,
}

pub fn run(_a: MountArgs) -> Result<(), CliError> {
    Err(CliError::other(
        exitcode::MOUNT,
        "mounting is not available in this build",
    ))
}
