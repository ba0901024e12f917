//! `kmfs keyserver check`: try every configured key server and report each.

use std::path::PathBuf;

use clap::Subcommand;

use super::CliError;
use crate::config::VolumeConfig;
use crate::exitcode;

#[derive(Subcommand, Debug)]
pub enum KeyserverCommand {
    /// Connect to every key server in the config (TLS, KMIP version, key state)
    /// and report each; exit 0 only if all are healthy.
    Check {
        /// Volume configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: KeyserverCommand) -> Result<(), CliError> {
    let KeyserverCommand::Check { config, json } = cmd;
    let cfg = VolumeConfig::load(&config)?;
    super::start_logging(Some(&cfg))?;
    let provider = cfg.kmip_provider()?;
    let checks = provider.check()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).unwrap_or_default()
        );
    } else {
        for c in &checks {
            println!("{c}");
        }
    }
    let bad = checks.iter().filter(|c| !c.ok()).count();
    if bad > 0 {
        return Err(CliError::other(
            exitcode::KEY_SERVER,
            format!("{bad} of {} key servers failed the check", checks.len()),
        ));
    }
    Ok(())
}
