//! The `kmfs` command line (SPEC.md section 6): argument parsing with clap,
//! dispatch to one module per subcommand, and the mapping from typed errors to
//! one-line messages and exit codes.

pub mod check;
pub mod docs;
pub mod header;
pub mod init;
pub mod keyserver;
pub mod metrics;
pub mod mount;
pub mod rekey;
pub mod rotate;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, VolumeConfig};
use crate::exitcode;
use crate::kms::keyfile::KeyfileProvider;
use crate::kms::{KeyProvider, KmsError};
use crate::volume::VolumeError;
use crate::volume::lock::LockError;

/// `kmfs --version`: the program version and the on-disk format versions it
/// reads (the highest is the one `kmfs init` writes).
pub fn version_string() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        use crate::volume::header::{VERSION, VERSION_1};
        format!(
            "{} (on-disk format {VERSION}; reads formats {VERSION_1} to {VERSION})",
            env!("CARGO_PKG_VERSION")
        )
    })
}

#[derive(Parser, Debug)]
#[command(
    name = "kmfs",
    version = version_string(),
    about = "Transparent encrypted filesystem with keys on a KMIP key manager or HSM"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new volume in an empty backing directory.
    Init(init::InitArgs),
    /// Mount a volume (also reached as `kmfs BACKING MOUNTPOINT -o OPTS` from mount.fuse3).
    Mount(mount::MountArgs),
    /// Inspect, back up or restore the volume header.
    #[command(subcommand)]
    Header(header::HeaderCommand),
    /// Tamper-evident log files.
    #[command(subcommand)]
    Log(LogCommand),
    /// Rotate the key-encryption key (online through the daemon, or offline).
    RotateKek(rotate::RotateArgs),
    /// Status of a mounted volume.
    Status(rotate::StatusArgs),
    /// Re-encrypt every file with a new data key (online through the daemon,
    /// or offline), and follow, pause or resume it.
    Rekey(rekey::RekeyArgs),
    /// Offline consistency check of a backing directory (read-only unless --repair).
    Check(check::CheckArgs),
    /// Key-server health.
    #[command(subcommand)]
    Keyserver(keyserver::KeyserverCommand),
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Recompute a log file's hash chain; names the first broken line.
    Verify {
        /// The log file to check.
        file: PathBuf,
        /// An anchor `SERIAL:HASH` the file must reach (the daemon logs one to
        /// syslog every few minutes and at unmount as `op=log_anchor`): a
        /// file whose tail was cut ends before it.
        #[arg(long, value_name = "SERIAL:HASH")]
        expect: Option<String>,
    },
}

/// How the key provider is chosen: a volume config or, for development, a key file.
#[derive(Args, Debug, Clone, Default)]
pub struct KeySource {
    /// Volume configuration file (TOML).
    #[arg(long, value_name = "FILE", conflicts_with = "keyfile")]
    pub config: Option<PathBuf>,
    /// Development only: 32 raw key bytes, mode 0600, outside the backing directory.
    #[arg(long, value_name = "PATH")]
    pub keyfile: Option<PathBuf>,
}

/// A failure with the exit code of its class. Display is the one-line message.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{msg}")]
    Other { msg: String, code: i32 },
}

impl CliError {
    pub fn other(code: i32, msg: impl Into<String>) -> CliError {
        CliError::Other {
            msg: msg.into(),
            code,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => exitcode::CONFIG,
            CliError::Kms(k) => exitcode::for_kms(k),
            CliError::Volume(v) => exitcode::for_volume(v),
            CliError::Lock(LockError::Held { .. }) => exitcode::LOCKED,
            CliError::Lock(_) => exitcode::BACKING_DIR,
            CliError::Other { code, .. } => *code,
        }
    }
}

impl KeySource {
    /// Loads the config (if any) and builds the key provider.
    pub fn open(
        &self,
        backing: Option<&Path>,
    ) -> Result<(Option<VolumeConfig>, Box<dyn KeyProvider>), CliError> {
        match (&self.config, &self.keyfile) {
            (Some(c), _) => {
                let cfg = VolumeConfig::load(c)?;
                // Logging first, so the provider's own key-manager operations
                // are audited.
                start_logging(Some(&cfg))?;
                let p = cfg.provider(backing)?;
                Ok((Some(cfg), p))
            }
            (None, Some(k)) => Ok((None, Box::new(KeyfileProvider::open(k, backing)?))),
            (None, None) => Err(CliError::other(
                exitcode::USAGE,
                "no key source: pass --config FILE (or --keyfile PATH for development)",
            )),
        }
    }
}

/// Opens (unlocks) the volume in `backing`, pinned to what `cfg` names
/// (volume id, KEK); a config without an id gets a warning that says how
/// to pin it.
pub fn open_volume(
    backing: &Path,
    cfg: Option<&VolumeConfig>,
    provider: &dyn KeyProvider,
) -> Result<crate::volume::Volume, CliError> {
    let pin = cfg.map(VolumeConfig::pin).unwrap_or_default();
    let vol = crate::volume::Volume::open_pinned(backing, provider, &pin)?;
    if let Some(c) = cfg
        && pin.volume_id.is_none()
    {
        log::warn!(
            "op=config_pin config={} volume={} result=warn msg=\"the config does not pin the volume: add id = {} under [volume] so a swapped backing directory is refused\"",
            c.path.display(),
            vol.id_hex(),
            vol.id_hex()
        );
    }
    Ok(vol)
}

/// Starts logging and the audit trail as the volume config says. Without a
/// config (development key file) nothing is set up: messages go nowhere but the
/// command's own stderr line.
pub fn start_logging(cfg: Option<&VolumeConfig>) -> Result<(), CliError> {
    if let Some(cfg) = cfg {
        match crate::logging::init(&cfg.log, &cfg.volume_name()) {
            Ok(()) | Err(crate::logging::LoggingError::AlreadyInitialized) => {}
            Err(e) => {
                return Err(CliError::other(
                    exitcode::CONFIG,
                    format!("volume config {}: {e}", cfg.path.display()),
                ));
            }
        }
    }
    Ok(())
}

/// Rewrites mount.fuse3's calling convention `kmfs SRC MNT -o OPTS` into
/// `kmfs mount SRC MNT -o OPTS`; other argument lists pass through.
pub fn normalize_args(mut args: Vec<OsString>) -> Vec<OsString> {
    const SUBCOMMANDS: &[&str] = &[
        "init",
        "mount",
        "header",
        "log",
        "keyserver",
        "rotate-kek",
        "status",
        "rekey",
        "check",
        "help",
    ];
    if let Some(first) = args.get(1) {
        let s = first.to_string_lossy();
        if !s.starts_with('-') && !SUBCOMMANDS.contains(&s.as_ref()) {
            args.insert(1, OsString::from("mount"));
        }
    }
    args
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    // Every command but log verification may come to hold a key (a DEK, a
    // client key, a PIN): none may leave it in a core dump.
    if !matches!(cli.command, Command::Log(_)) {
        crate::crypto::keys::harden_process().map_err(|e| {
            CliError::other(exitcode::OTHER, format!("cannot disable core dumps: {e}"))
        })?;
    }
    match cli.command {
        Command::Init(a) => init::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Header(h) => header::run(h),
        Command::Keyserver(k) => keyserver::run(k),
        Command::RotateKek(a) => rotate::run_rotate(a),
        Command::Status(a) => rotate::run_status(a),
        Command::Rekey(a) => rekey::run(a),
        Command::Check(a) => check::run(a),
        Command::Log(LogCommand::Verify { file, expect }) => verify_log(&file, expect.as_deref()),
    }
}

/// `kmfs log verify FILE [--expect SERIAL:HASH]`.
fn verify_log(file: &Path, expect: Option<&str>) -> Result<(), CliError> {
    let fail = |e: crate::logging::VerifyError| {
        CliError::other(exitcode::LOG_VERIFY, format!("{}: {e}", file.display()))
    };
    let anchor = match expect {
        Some(a) => {
            let parsed = a
                .split_once(':')
                .and_then(|(s, h)| Some((s.trim().parse::<u64>().ok()?, h.trim())))
                .filter(|(_, h)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            match parsed {
                Some(p) => Some(p),
                None => {
                    return Err(CliError::other(
                        exitcode::USAGE,
                        format!(
                            "--expect {a:?}: expected SERIAL:HASH (a number, a colon and 64 hex digits)"
                        ),
                    ));
                }
            }
        }
        None => None,
    };
    let report = crate::logging::verify::verify_file(file).map_err(fail)?;
    if let Some((serial, hash)) = anchor {
        crate::logging::verify::check_anchor(file, serial, hash).map_err(fail)?;
    }
    match &report.last {
        Some((serial, hash)) => println!("{report}; last serial {serial} hash {hash}"),
        None => println!("{report}"),
    }
    if let Some((serial, _)) = anchor {
        println!("anchor serial {serial} found with its hash");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fuse3_form_is_rewritten() {
        let a: Vec<OsString> = ["kmfs", "/srv/c", "/srv/p", "-o", "config=/x"]
            .iter()
            .map(OsString::from)
            .collect();
        let n = normalize_args(a);
        assert_eq!(n[1], "mount");
        let cli = Cli::try_parse_from(n).unwrap();
        assert!(matches!(cli.command, Command::Mount(_)));
        let a: Vec<OsString> = ["kmfs", "header", "dump", "/srv/c"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(normalize_args(a.clone()), a);
    }
}
