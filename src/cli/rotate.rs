//! `kmfs rotate-kek` and `kmfs status`: find the volume behind a mountpoint or
//! backing directory, then talk to its daemon over the control socket — or,
//! for `rotate-kek` on an unmounted volume, rotate directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::{CliError, KeySource};
use crate::control::{self, ControlError, Request};
use crate::exitcode;
use crate::rotation::{self, RotateRequest};
use crate::volume::lock::VolumeLock;
use crate::volume::{self, hex};

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// Key source, needed only for an unmounted volume (the daemon has its own).
    #[command(flatten)]
    pub keys: KeySource,
    /// Rotate to the key with this name (created if missing) instead of a new
    /// version of the current key.
    #[arg(long, value_name = "NAME")]
    pub new_key: Option<String>,
    /// Development provider: rotate to this key file.
    #[arg(long, value_name = "PATH")]
    pub new_keyfile: Option<PathBuf>,
    /// Revoke the old KEK on the key manager after a successful rotation.
    #[arg(long)]
    pub revoke_old: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The mountpoint of a mounted volume, or a backing directory.
    pub target: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long, conflicts_with_all = ["openmetrics", "prometheus"])]
    pub json: bool,
    /// Print the counters in the OpenMetrics text format (of every mounted
    /// volume when no target is given).
    #[arg(long, conflicts_with = "prometheus")]
    pub openmetrics: bool,
    /// The same counters in the Prometheus text format, for node_exporter's
    /// textfile collector.
    #[arg(long)]
    pub prometheus: bool,
    /// The mountpoint of a mounted volume, or a backing directory (optional
    /// with --openmetrics/--prometheus).
    #[arg(required_unless_present_any = ["openmetrics", "prometheus"])]
    pub target: Option<PathBuf>,
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// The volume id behind `target`: a backing directory (has a header), or the
/// mountpoint of a running daemon (found by asking each control socket).
pub(super) fn resolve(target: &Path) -> Result<(String, bool), CliError> {
    if volume::header::header_path(target).exists() {
        let (h, _) = volume::read_header(target)?;
        let id = hex(&h.volume_id);
        let mounted = control::socket_path(&id).exists();
        return Ok((id, mounted));
    }
    let want = std::fs::canonicalize(target)
        .map_err(|e| CliError::other(exitcode::MOUNT, format!("{}: {e}", target.display())))?;
    if let Ok(entries) = std::fs::read_dir(control::runtime_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".sock") else {
                continue;
            };
            if let Ok(st) = control::request(id, &Request::Status, Duration::from_secs(5))
                && st["mountpoint"].as_str().map(Path::new) == Some(want.as_path())
            {
                return Ok((id.to_string(), true));
            }
        }
    }
    Err(CliError::other(
        exitcode::CONTROL,
        format!(
            "{} is neither a kmfs backing directory nor the mountpoint of a running kmfs daemon",
            target.display()
        ),
    ))
}

/// A control-socket failure as a command-line error: a refusal by the daemon
/// keeps the class it carries (the same exit code as offline), anything else
/// is a control-socket problem.
pub(super) fn control_err(e: ControlError) -> CliError {
    let code = match e {
        ControlError::Refused { code, .. } => code,
        _ => exitcode::CONTROL,
    };
    CliError::other(code, e.to_string())
}

fn print_rotation(v: &serde_json::Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let k = |x: &serde_json::Value| {
        format!(
            "{} version {} (uid {})",
            x["name"].as_str().unwrap_or("?"),
            x["version"],
            x["uid"].as_str().filter(|s| !s.is_empty()).unwrap_or("-")
        )
    };
    println!(
        "volume {}: rotated from {} to {}; previous header saved as {}{}",
        v["volume_id"].as_str().unwrap_or("?"),
        k(&v["old_kek"]),
        k(&v["new_kek"]),
        v["backup"].as_str().unwrap_or("?"),
        if v["revoked_old"] == true {
            "; old key revoked"
        } else {
            ""
        }
    );
}

pub fn run_rotate(a: RotateArgs) -> Result<(), CliError> {
    let (id, mounted) = resolve(&a.target)?;
    let req = RotateRequest {
        new_key: a.new_key.clone(),
        revoke_old: a.revoke_old,
        new_keyfile: a
            .new_keyfile
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    };
    if mounted {
        let r = control::request(
            &id,
            &Request::RotateKek {
                new_key: req.new_key.clone(),
                revoke_old: req.revoke_old,
                new_keyfile: req.new_keyfile.clone(),
            },
            TIMEOUT,
        );
        match r {
            Ok(v) => {
                print_rotation(&v, a.json);
                return Ok(());
            }
            // A stale socket of a dead daemon: fall through to offline rotation.
            Err(ControlError::NotRunning { .. }) => {}
            Err(e) => return Err(control_err(e)),
        }
    }
    // Offline: the target must be the backing directory.
    let backing = &a.target;
    if !volume::header::header_path(backing).exists() {
        return Err(CliError::other(
            exitcode::CONTROL,
            format!("{} is not a kmfs backing directory", backing.display()),
        ));
    }
    let _lock = VolumeLock::acquire(backing, "rotate-kek")?;
    let (cfg, provider) = a.keys.open(Some(backing))?;
    let mut vol = super::open_volume(backing, cfg.as_ref(), provider.as_ref())?;
    let report = match &req.new_keyfile {
        Some(p) => {
            let newp = crate::kms::keyfile::KeyfileProvider::open(p, Some(backing))?;
            rotation::rotate(&mut vol, &newp, &req, true)
        }
        None => rotation::rotate(&mut vol, provider.as_ref(), &req, false),
    }
    .map_err(|e| CliError::other(exitcode::for_rotate(&e), e.to_string()))?;
    print_rotation(&serde_json::to_value(report).unwrap_or_default(), a.json);
    Ok(())
}

fn time(t: &serde_json::Value) -> String {
    t.as_u64()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t as i64).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

/// The status answers of every daemon with a socket in the runtime
/// directory (stale sockets are skipped).
fn all_statuses() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(control::runtime_dir()) else {
        return out;
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".sock")
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    for id in ids {
        if let Ok(v) = control::request(&id, &Request::Status, Duration::from_secs(5)) {
            out.push(v);
        }
    }
    out
}

pub fn run_status(a: StatusArgs) -> Result<(), CliError> {
    if a.openmetrics || a.prometheus {
        let format = if a.openmetrics {
            super::metrics::Format::OpenMetrics
        } else {
            super::metrics::Format::Prometheus
        };
        let volumes = match &a.target {
            None => all_statuses(),
            Some(t) => {
                let (id, _) = resolve(t)?;
                vec![
                    control::request(&id, &Request::Status, Duration::from_secs(10))
                        .map_err(control_err)?,
                ]
            }
        };
        print!("{}", super::metrics::render(&volumes, format));
        return Ok(());
    }
    let Some(target) = &a.target else {
        return Err(CliError::other(
            exitcode::USAGE,
            "status: give a mountpoint or backing directory",
        ));
    };
    let (id, _) = resolve(target)?;
    let v = match control::request(&id, &Request::Status, Duration::from_secs(10)) {
        Ok(v) => v,
        Err(ControlError::NotRunning { .. }) => {
            return Err(CliError::other(
                exitcode::CONTROL,
                format!("volume {id} is not mounted (no kmfs daemon serves it)"),
            ));
        }
        Err(e) => return Err(control_err(e)),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let kek = &v["kek"];
    println!("volume id:      {}", v["volume_id"].as_str().unwrap_or("?"));
    println!(
        "backing dir:    {}",
        v["backing_dir"].as_str().unwrap_or("?")
    );
    println!(
        "mountpoint:     {}",
        v["mountpoint"].as_str().unwrap_or("?")
    );
    println!("mounted since:  {}", time(&v["mounted_since"]));
    println!("daemon pid:     {}", v["pid"]);
    println!("provider:       {}", v["provider"].as_str().unwrap_or("?"));
    println!(
        "key server:     {}",
        v["key_server"].as_str().unwrap_or("?")
    );
    println!(
        "KEK:            {} version {} (uid {})",
        kek["name"].as_str().unwrap_or("?"),
        kek["version"],
        kek["uid"].as_str().filter(|s| !s.is_empty()).unwrap_or("-")
    );
    println!("last rotation:  {}", time(&v["last_rotation"]));
    println!(
        "key generations: {} (active {})",
        v["key_generations"], v["active_generation"]
    );
    let rk = &v["rekey"];
    if rk["phase"] != "idle" {
        println!(
            "rekey:          {}, {} of {} files{}",
            rk["phase"].as_str().unwrap_or("?"),
            rk["files_done"],
            rk["files_total"],
            rk["message"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
    }
    let io = &v["io"];
    println!(
        "I/O:            {} reads ({} bytes), {} writes ({} bytes), {} errors",
        io["reads"], io["bytes_read"], io["writes"], io["bytes_written"], io["errors"]
    );
    Ok(())
}
