//! `kmfs rekey`: move every file of a volume to a new DEK generation —
//! online through the mount daemon, or offline on a backing directory — and
//! follow, pause or resume it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;

use super::rotate::{control_err, resolve};
use super::{CliError, KeySource};
use crate::control::{self, ControlError, Request};
use crate::exitcode;
use crate::kms::KeyProvider;
use crate::rekey::state::RekeyState;
use crate::rekey::{self, Offline, Rekey, RekeyHost, Throttle, generations};
use crate::volume::lock::VolumeLock;
use crate::volume::{self, Volume};

#[derive(Args, Debug)]
pub struct RekeyArgs {
    /// Key source, needed only for an unmounted volume (the daemon has its own).
    #[command(flatten)]
    pub keys: KeySource,
    /// Limit the re-encryption to this many megabytes (10^6 bytes) per second.
    #[arg(long, value_name = "MB/s", value_parser = crate::rekey::Throttle::parse_rate)]
    pub rate: Option<f64>,
    /// Let the re-encryption work at most this share of the time, in percent
    /// (default 50; 100 is unthrottled).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub cpu: Option<u8>,
    /// Rotate the KEK first (a new key version on the key manager, every
    /// DEK generation re-wrapped under it), so header copies taken before
    /// this rekey need the old KEK version: revoke it afterwards
    /// (`kmfs rotate-kek --revoke-old` or on the key manager) to make them
    /// useless. Off by default: a DEK compromise does not imply a KEK one,
    /// and KEK versions belong to the key-manager owner.
    #[arg(long, conflicts_with_all = ["status", "pause", "resume"])]
    pub rotate_kek: bool,
    /// Show progress instead of starting (a live progress bar on a terminal).
    #[arg(long, conflicts_with_all = ["pause", "resume"])]
    pub status: bool,
    /// Pause the running rekey (kept across remounts until resumed).
    #[arg(long, conflicts_with = "resume")]
    pub pause: bool,
    /// Resume a paused rekey.
    #[arg(long)]
    pub resume: bool,
    /// With --status (or after starting): follow until the rekey finishes.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The mountpoint of a mounted volume, or a backing directory.
    pub target: PathBuf,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn human(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

fn print_status(v: &serde_json::Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let phase = v["phase"].as_str().unwrap_or("?");
    println!("rekey:          {phase}");
    println!("to generation:  {}", v["target_generation"]);
    println!("old generations: {}", v["old_generations"]);
    if phase == "idle" {
        return;
    }
    println!(
        "files:          {} of {} done{}",
        n("files_done"),
        n("files_total"),
        if n("files_skipped") > 0 {
            format!(", {} skipped (unreadable)", n("files_skipped"))
        } else {
            String::new()
        }
    );
    println!(
        "bytes:          {} of {}",
        human(n("bytes_done") as f64),
        human(n("bytes_total") as f64)
    );
    if let Some(r) = v["bytes_per_sec"].as_f64().filter(|r| *r > 0.0) {
        println!("speed:          {}/s", human(r));
    }
    if let Some(e) = v["eta_secs"].as_u64() {
        println!("ETA:            {e} s");
    }
    let t = &v["throttle"];
    println!(
        "throttle:       rate {}, time share {}",
        t["rate_mb"]
            .as_f64()
            .map(|r| format!("{r} MB/s"))
            .unwrap_or_else(|| "unlimited".into()),
        t["cpu"]
            .as_u64()
            .map(|c| format!("{c} %"))
            .unwrap_or_else(|| "100 %".into())
    );
    if let Some(m) = v["message"].as_str().filter(|m| !m.is_empty()) {
        println!("message:        {m}");
    }
}

fn finished(v: &serde_json::Value) -> bool {
    matches!(v["phase"].as_str(), Some("done" | "idle" | "stopped"))
}

/// Follows a rekey through `poll` until it finishes (or, on a terminal
/// without `wait`, until it pauses): a progress bar on a terminal, a line
/// per change otherwise.
fn follow(
    poll: &mut dyn FnMut() -> Result<serde_json::Value, CliError>,
    wait: bool,
) -> Result<serde_json::Value, CliError> {
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_phase = String::new();
    loop {
        let v = poll()?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let phase = v["phase"].as_str().unwrap_or("?").to_string();
        bar.set_length(n("bytes_total"));
        bar.set_position(n("bytes_done"));
        bar.set_message(format!(
            "{} of {} files, {phase}",
            n("files_done"),
            n("files_total")
        ));
        if !tty && phase != last_phase {
            eprintln!(
                "rekey: {phase}, {} of {} files{}",
                n("files_done"),
                n("files_total"),
                v["message"]
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            );
        }
        last_phase = phase.clone();
        if finished(&v) || (!wait && phase == "paused") {
            bar.finish_and_clear();
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn run(a: RekeyArgs) -> Result<(), CliError> {
    if a.rotate_kek {
        super::rotate::run_rotate(super::rotate::RotateArgs {
            keys: a.keys.clone(),
            new_key: None,
            new_keyfile: None,
            revoke_old: false,
            json: false,
            target: a.target.clone(),
        })?;
    }
    let (id, mounted) = resolve(&a.target)?;
    // A stale socket of a dead daemon: fall through to the offline rekey.
    if mounted && online(&a, &id)? {
        return Ok(());
    }
    offline(&a)
}

/// Talks to the daemon; `Ok(false)` if none answers.
fn online(a: &RekeyArgs, id: &str) -> Result<bool, CliError> {
    let ask = |req: &Request| control::request(id, req, TIMEOUT).map_err(control_err);
    let req = if a.status {
        Request::RekeyStatus
    } else if a.pause {
        Request::RekeyPause
    } else if a.resume {
        Request::RekeyResume
    } else {
        Request::Rekey {
            rate_mb: a.rate,
            cpu: a.cpu.or(Throttle::DEFAULT.cpu),
        }
    };
    let first = match control::request(id, &req, TIMEOUT) {
        Err(ControlError::NotRunning { .. }) => return Ok(false),
        r => r.map_err(control_err)?,
    };
    let mut poll = || ask(&Request::RekeyStatus);
    let follow_now = a.wait || (a.status && std::io::stderr().is_terminal() && !a.json);
    let v = if follow_now {
        follow(&mut poll, a.wait)?
    } else {
        first
    };
    if !a.json && !a.status && !a.wait && !a.pause && !a.resume {
        println!(
            "rekey of volume {id} to key generation {} is running in the daemon; follow it with: kmfs rekey --status {}",
            v["target_generation"],
            a.target.display()
        );
    }
    print_status(&v, a.json);
    Ok(true)
}

/// The volume and provider of an offline rekey.
struct OfflineHost {
    volume: Mutex<Volume>,
    provider: Box<dyn KeyProvider>,
}

impl RekeyHost for OfflineHost {
    fn retire(&self, keep: u16) -> Result<Vec<u16>, rekey::RetireError> {
        generations::retire(&self.volume, self.provider.as_ref(), keep)
    }
}

fn offline(a: &RekeyArgs) -> Result<(), CliError> {
    let backing: &Path = &a.target;
    if !volume::header::header_path(backing).exists() {
        return Err(CliError::other(
            exitcode::CONTROL,
            format!("{} is not a kmfs backing directory", backing.display()),
        ));
    }
    // Everything but --status writes (the state file, the files): one writer.
    let _lock = if a.status {
        None
    } else {
        let cmd = if a.pause {
            "rekey-pause"
        } else if a.resume {
            "rekey-resume"
        } else {
            "rekey"
        };
        Some(VolumeLock::acquire(backing, cmd)?)
    };
    let state = RekeyState::load(backing)
        .map_err(|e| CliError::other(exitcode::BACKING_DIR, e.to_string()))?;
    if a.status {
        let v = match &state {
            Some(st) => serde_json::json!({
                "phase": if st.paused { "paused" } else { "stopped" },
                "target_generation": st.target,
                "old_generations": [],
                "files_done": st.files_done,
                "bytes_done": st.bytes_done,
                "throttle": st.throttle,
                "message": "the volume is not mounted; continue with kmfs rekey BACKING_DIR or by mounting it",
            }),
            None => {
                serde_json::json!({"phase": "idle", "target_generation": volume::read_header(backing)?.0.active, "old_generations": []})
            }
        };
        print_status(&v, a.json);
        return Ok(());
    }
    if a.pause || a.resume {
        let mut st = state.ok_or_else(|| {
            CliError::other(exitcode::OTHER, "no rekey is in progress on this volume")
        })?;
        st.paused = a.pause;
        st.store(backing)
            .map_err(|e| CliError::other(exitcode::BACKING_DIR, e.to_string()))?;
        println!(
            "rekey {} (takes effect at the next mount or kmfs rekey {})",
            if a.pause { "paused" } else { "resumed" },
            backing.display()
        );
        return Ok(());
    }
    let (cfg, provider) = a.keys.open(Some(backing))?;
    let mut vol = super::open_volume(backing, cfg.as_ref(), provider.as_ref())?;
    rekey::recover(backing, &vol.keys, &Offline)
        .map_err(|e| CliError::other(exitcode::BACKING_DIR, format!("rekey recovery: {e}")))?;
    let throttle = Throttle {
        rate_mb: a.rate,
        cpu: a.cpu,
    };
    let (mut st, old) = match state {
        Some(st) => {
            st.check_against(&vol.header)
                .map_err(|e| CliError::other(exitcode::BACKING_DIR, e.to_string()))?;
            let old = generations::old_generations(&vol.header, st.target);
            (st, old)
        }
        None => generations::start(&mut vol, provider.as_ref(), throttle)
            .map_err(|e| CliError::other(exitcode::KEY_SERVER, e.to_string()))?,
    };
    // Offline, a paused rekey runs when asked to; the throttle given now wins.
    st.paused = false;
    st.throttle = throttle;
    let keys = vol.keys.clone();
    let r = Rekey::new(backing, &st, old, vol.header.plaintext_names());
    let host = Arc::new(OfflineHost {
        volume: Mutex::new(vol),
        provider,
    });
    let worker = {
        let r = r.clone();
        let keys = keys.clone();
        let host = host.clone();
        std::thread::spawn(move || r.run(&keys, &Offline, host.as_ref()))
    };
    let v = follow(
        &mut || Ok(serde_json::to_value(r.status()).unwrap_or_default()),
        true,
    );
    let _ = worker.join();
    let v = v?;
    print_status(&v, a.json);
    Ok(())
}
