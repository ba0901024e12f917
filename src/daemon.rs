//! The mount daemon's view of its volume, served over the control socket:
//! `status` and online `rotate-kek`. It owns the unlocked [`Volume`] and the key
//! provider; the filesystem layer holds only the derived keys (which rotation
//! never changes) and shares its I/O counters.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use crate::control::ControlHandler;
use crate::kms::KeyProvider;
use crate::kms::keyfile::KeyfileProvider;
use crate::rotation::{self, RotateRequest};
use crate::volume::{Volume, now_secs};

/// I/O counters of a mounted volume (updated by the filesystem layer).
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

impl IoStats {
    pub fn read(&self, bytes: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn wrote(&self, bytes: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "reads": self.reads.load(Ordering::Relaxed),
            "writes": self.writes.load(Ordering::Relaxed),
            "bytes_read": self.bytes_read.load(Ordering::Relaxed),
            "bytes_written": self.bytes_written.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
}

/// The control handler of one mounted volume.
pub struct VolumeControl {
    volume: Mutex<Volume>,
    provider: Box<dyn KeyProvider>,
    mountpoint: PathBuf,
    mounted_since: u64,
    stats: std::sync::Arc<IoStats>,
}

impl VolumeControl {
    pub fn new(
        volume: Volume,
        provider: Box<dyn KeyProvider>,
        mountpoint: PathBuf,
        stats: std::sync::Arc<IoStats>,
    ) -> VolumeControl {
        VolumeControl {
            volume: Mutex::new(volume),
            provider,
            mountpoint,
            mounted_since: now_secs(),
            stats,
        }
    }
}

fn kek_json(k: &crate::kms::KekRef) -> serde_json::Value {
    json!({"provider": k.provider, "name": k.name, "uid": k.uid, "version": k.version})
}

impl ControlHandler for VolumeControl {
    fn status(&self) -> serde_json::Value {
        let vol = self.volume.lock().unwrap_or_else(|p| p.into_inner());
        let h = &vol.header;
        json!({
            "volume_id": vol.id_hex(),
            "backing_dir": vol.backing,
            "mountpoint": self.mountpoint,
            "provider": h.kek.provider,
            "key_server": self.provider.describe(),
            "kek": kek_json(&h.kek),
            "last_rotation": h.history.last().map(|r| r.retired_at),
            "rotations": h.history.len(),
            "header_updated": h.updated,
            "mounted_since": self.mounted_since,
            "pid": std::process::id(),
            "io": self.stats.to_json(),
        })
    }

    fn rotate(&self, req: &RotateRequest) -> Result<serde_json::Value, String> {
        let mut vol = self.volume.lock().unwrap_or_else(|p| p.into_inner());
        let report = match &req.new_keyfile {
            Some(path) => {
                let p =
                    KeyfileProvider::open(path, Some(&vol.backing)).map_err(|e| e.to_string())?;
                rotation::rotate(&mut vol, &p, req, true)
            }
            None => rotation::rotate(&mut vol, self.provider.as_ref(), req, false),
        }
        .map_err(|e| e.to_string())?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    }
}
