//! The mount daemon's view of its volume, served over the control socket:
//! `status`, online `rotate-kek` and `rekey`. It owns the unlocked [`Volume`]
//! and the key provider; the filesystem layer holds only the derived keys
//! (which rotation never changes; a rekey adds a content generation) and
//! shares its I/O counters. A rekey runs on its own thread, through the
//! filesystem's [`FileGate`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::json;

use crate::control::{ControlHandler, Failure, RekeyAction};
use crate::exitcode;
use crate::fs::stats::IoStats;
use crate::kms::KeyProvider;
use crate::kms::keyfile::KeyfileProvider;
use crate::rekey::state::RekeyState;
use crate::rekey::{self, FileGate, Rekey, RekeyHost, generations};
use crate::rotation::{self, RotateRequest};
use crate::sync::{MutexExt, RwLockExt};
use crate::volume::{Volume, now_secs};

/// The volume and its key provider, shared by the control handler and the
/// rekey thread (which needs them to retire old generations at the end).
struct Owner {
    volume: Mutex<Volume>,
    /// Replaced only by a rotation to a new development key file.
    provider: std::sync::RwLock<Arc<dyn KeyProvider>>,
}

impl Owner {
    fn volume(&self) -> std::sync::MutexGuard<'_, Volume> {
        self.volume.locked()
    }

    fn provider(&self) -> Arc<dyn KeyProvider> {
        self.provider.read_locked().clone()
    }
}

impl RekeyHost for Owner {
    fn retire(&self, keep: u16) -> Result<Vec<u16>, rekey::RetireError> {
        generations::retire(&self.volume, self.provider().as_ref(), keep)
    }
}

struct Running {
    rekey: Rekey,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The control handler of one mounted volume.
pub struct VolumeControl {
    owner: Arc<Owner>,
    mountpoint: PathBuf,
    mounted_since: u64,
    stats: Arc<IoStats>,
    read_only: bool,
    /// Set once the filesystem exists (a rekey needs it).
    gate: OnceLock<Arc<dyn FileGate>>,
    rekey: Mutex<Option<Running>>,
}

impl VolumeControl {
    pub fn new(
        volume: Volume,
        provider: Box<dyn KeyProvider>,
        mountpoint: PathBuf,
        stats: Arc<IoStats>,
        read_only: bool,
    ) -> VolumeControl {
        VolumeControl {
            owner: Arc::new(Owner {
                volume: Mutex::new(volume),
                provider: std::sync::RwLock::new(Arc::from(provider)),
            }),
            mountpoint,
            mounted_since: now_secs(),
            stats,
            read_only,
            gate: OnceLock::new(),
            rekey: Mutex::new(None),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.rekey.locked()
    }

    /// Connects the filesystem, and resumes a rekey the state file says is
    /// in progress (paused if it was paused).
    pub fn attach(&self, gate: Arc<dyn FileGate>) -> Result<(), String> {
        let _ = self.gate.set(gate);
        let backing = self.owner.volume().backing.clone();
        if self.read_only {
            return Ok(());
        }
        match RekeyState::load(&backing) {
            Ok(Some(st)) => {
                st.check_against(&self.owner.volume().header)
                    .map_err(|e| e.to_string())?;
                log::info!(
                    "op=rekey_resume generation={} paused={} result=start",
                    st.target,
                    st.paused
                );
                self.launch(st)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn launch(&self, st: RekeyState) -> Result<(), String> {
        let gate = self
            .gate
            .get()
            .cloned()
            .ok_or("the filesystem is not ready yet")?;
        let (backing, keys, old, plain) = {
            let v = self.owner.volume();
            let old = generations::old_generations(&v.header, st.target);
            (
                v.backing.clone(),
                v.keys.clone(),
                old,
                v.header.plaintext_names(),
            )
        };
        let r = Rekey::new(&backing, &st, old, plain);
        let host: Arc<dyn RekeyHost> = self.owner.clone();
        let thread = rekey::spawn(r.clone(), keys, gate, host);
        *self.running() = Some(Running {
            rekey: r,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Stops a running rekey at its next safe point and waits for it
    /// (unmount). Progress is kept; the next mount resumes.
    pub fn stop_rekey(&self) {
        let taken = self.running().as_mut().and_then(|r| {
            r.rekey.stop();
            r.thread.take()
        });
        if let Some(t) = taken {
            let _ = t.join();
        }
    }

    fn rekey_status(&self) -> serde_json::Value {
        match self.running().as_ref() {
            Some(r) => serde_json::to_value(r.rekey.status()).unwrap_or_default(),
            None => {
                let v = self.owner.volume();
                json!({
                    "phase": "idle",
                    "target_generation": v.header.active,
                    "old_generations": generations::old_generations(&v.header, v.header.active),
                })
            }
        }
    }
}

fn kek_json(k: &crate::kms::KekRef) -> serde_json::Value {
    json!({"provider": k.provider, "name": k.name, "uid": k.uid, "version": k.version})
}

impl ControlHandler for VolumeControl {
    fn status(&self) -> serde_json::Value {
        let rekey = self.rekey_status();
        let vol = self.owner.volume();
        let h = &vol.header;
        json!({
            "volume_id": vol.id_hex(),
            "backing_dir": vol.backing,
            "mountpoint": self.mountpoint,
            "provider": h.kek.provider,
            "key_server": self.owner.provider().describe(),
            "kek": kek_json(&h.kek),
            "last_rotation": h.history.last().map(|r| r.retired_at),
            "rotations": h.history.len(),
            "header_updated": h.updated,
            "mounted_since": self.mounted_since,
            "uptime_seconds": now_secs().saturating_sub(self.mounted_since),
            "key_server_counters": crate::audit::server_counters(),
            "pid": std::process::id(),
            "io": self.stats.to_json(),
            "key_generations": h.generations.iter().map(|g| g.generation).collect::<Vec<_>>(),
            "active_generation": h.active,
            "rekey": rekey,
        })
    }

    fn rotate(&self, req: &RotateRequest) -> Result<serde_json::Value, Failure> {
        let mut vol = self.owner.volume();
        let report = match &req.new_keyfile {
            Some(path) => {
                let p = KeyfileProvider::open(path, Some(&vol.backing))
                    .map_err(|e| Failure::new(exitcode::for_kms(&e), e.to_string()))?;
                let r = rotation::rotate(&mut vol, &p, req, true);
                if r.is_ok() {
                    // Later wraps (a rekey) must use the key file the header now names.
                    *self.owner.provider.write_locked() = Arc::new(p);
                }
                r
            }
            None => rotation::rotate(&mut vol, self.owner.provider().as_ref(), req, false),
        }
        .map_err(|e| Failure::new(exitcode::for_rotate(&e), e.to_string()))?;
        serde_json::to_value(report).map_err(|e| Failure::from(e.to_string()))
    }

    fn rekey(&self, action: RekeyAction) -> Result<serde_json::Value, Failure> {
        let active = self
            .running()
            .as_ref()
            .map(|r| r.rekey.clone())
            .filter(|r| !matches!(r.status().phase, rekey::Phase::Done | rekey::Phase::Stopped));
        match action {
            RekeyAction::Status => {}
            RekeyAction::Start(t) => {
                t.validate().map_err(|e| Failure::from(e.to_string()))?;
                if self.read_only {
                    return Err(Failure::new(
                        exitcode::USAGE,
                        "the volume is mounted read-only; a rekey needs it writable",
                    ));
                }
                match active {
                    // A second start changes the running rekey's throttle.
                    Some(r) => r.set_throttle(t),
                    None => {
                        let (st, _) = {
                            let mut v = self.owner.volume();
                            generations::start(&mut v, self.owner.provider().as_ref(), t)
                                .map_err(|e| Failure::from(e.to_string()))?
                        };
                        self.launch(st)?;
                    }
                }
            }
            RekeyAction::Pause | RekeyAction::Resume => {
                let r = active.ok_or("no rekey is in progress on this volume")?;
                if action == RekeyAction::Pause {
                    r.pause()
                } else {
                    r.resume()
                }
            }
        }
        Ok(self.rekey_status())
    }
}
