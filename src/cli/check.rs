//! `kmfs check BACKING_DIR`: the offline consistency check (see
//! [`crate::check`]), read-only unless `--repair`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use super::{CliError, KeySource};
use crate::check::{self, Severity};
use crate::exitcode;
use crate::volume;
use crate::volume::lock::{self, VolumeLock};

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub keys: KeySource,
    /// Remove what interrupted operations left behind (temporary files,
    /// half-created directories, orphaned long-name sidecars, torn file
    /// headers) and finish an interrupted rekey file. Never touches data.
    #[arg(long)]
    pub repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The backing directory (with --repair: of an unmounted volume).
    pub backing_dir: PathBuf,
}

pub fn run(a: CheckArgs) -> Result<(), CliError> {
    let backing = &a.backing_dir;
    if !volume::header::header_path(backing).exists() {
        // Let read_header produce the usual "no volume header" message.
        volume::read_header(backing)?;
    }
    // --repair writes: one writer, so not while the volume is mounted (here
    // or on another host) or another command changes it. A read-only check
    // runs beside a writer, and says so.
    let _lock = if a.repair {
        Some(VolumeLock::acquire(backing, "check-repair")?)
    } else {
        if let Ok(Some(holder)) = lock::holder(backing) {
            eprintln!(
                "note: volume {} is in use by a writer ({holder}); findings may include operations in progress",
                backing.display()
            );
        }
        None
    };
    let (cfg, provider) = a.keys.open(Some(backing))?;
    let vol = super::open_volume(backing, cfg.as_ref(), provider.as_ref())?;
    let bar = if std::io::stderr().is_terminal() && !a.json {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message("checking");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = check::check(&vol, a.repair, &mut |n| {
        bar.set_message(format!("{n} entries checked"));
        bar.tick();
    });
    bar.finish_and_clear();
    let errors = report.count(Severity::Error);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for f in &report.findings {
            println!("{}", check::line(f));
        }
        if let Some(g) = report.rekey_in_progress {
            println!(
                "note: a rekey to key generation {g} is in progress; it continues at the next mount or kmfs rekey"
            );
        }
        println!(
            "volume {}: {} directories, {} files ({} bytes), {} symlinks, {} other: {} errors, {} warnings, {} leftovers{}",
            vol.id_hex(),
            report.directories,
            report.files,
            report.bytes,
            report.symlinks,
            report.other,
            errors,
            report.count(Severity::Warning),
            report.count(Severity::Leftover),
            if a.repair { " (repair run)" } else { "" }
        );
    }
    if errors > 0 {
        return Err(CliError::other(
            exitcode::CHECK,
            format!(
                "kmfs check found {errors} error(s) in {}",
                backing.display()
            ),
        ));
    }
    Ok(())
}
