//! The header side of a rekey, each step logged and audited: adding the new
//! DEK generation (start) and removing the old ones (end), with the header
//! backups in the backing directory that would still hold them.

use std::path::Path;
use std::sync::Mutex;

use super::Throttle;
use super::error::{RetireError, StartError};
use super::state::RekeyState;
use crate::audit::{self, AuditRecord, Outcome};
use crate::kms::KeyProvider;
use crate::sync::MutexExt;
use crate::volume::header::{self, VolumeHeader};
use crate::volume::{Volume, VolumeError, now_secs};

fn audit_step(vol: &Volume, op: &str, generation: u16, result: Result<(), &str>) {
    let k = &vol.header.kek;
    let reason = match result {
        Ok(()) => format!("volume={} generation={generation}", vol.id_hex()),
        Err(e) => format!("volume={} generation={generation} {e}", vol.id_hex()),
    };
    audit::record(&AuditRecord::new(
        op,
        &k.provider,
        &k.name,
        Some(k.version),
        Outcome::of(&result),
        &reason,
    ));
}

/// Starts a rekey of `vol`: a new DEK generation becomes the active one and
/// the state file is written. If the header already holds more than one
/// generation but no state file (a start interrupted after the header
/// swap), the rekey to the active generation is taken up again instead.
/// Returns the state and the old generations.
pub fn start(
    vol: &mut Volume,
    provider: &dyn KeyProvider,
    throttle: Throttle,
) -> Result<(RekeyState, Vec<u16>), StartError> {
    let backing = vol.backing.clone();
    if let Some(st) = RekeyState::load(&backing).map_err(StartError::State)? {
        return Err(StartError::InProgress(st.target));
    }
    let target = if vol.header.generations.len() > 1 {
        vol.header.active
    } else {
        log::info!("op=rekey_start volume={} result=start", vol.id_hex());
        match vol.add_generation(provider) {
            Ok(g) => {
                audit_step(vol, "rekey_new_generation", g, Ok(()));
                log::info!(
                    "op=rekey_new_generation volume={} generation={g} result=ok",
                    vol.id_hex()
                );
                g
            }
            Err(e) => {
                let g = vol.header.active.saturating_add(1);
                audit_step(vol, "rekey_new_generation", g, Err(&e.to_string()));
                return Err(StartError::NewGeneration(e));
            }
        }
    };
    let st = RekeyState {
        target,
        started: now_secs(),
        paused: false,
        throttle,
        files_done: 0,
        bytes_done: 0,
    };
    st.store(&backing).map_err(StartError::StoreState)?;
    Ok((st, old_generations(&vol.header, target)))
}

/// The generations of `h` other than `target`.
pub fn old_generations(h: &VolumeHeader, target: u16) -> Vec<u16> {
    h.generations
        .iter()
        .map(|g| g.generation)
        .filter(|g| *g != target)
        .collect()
}

/// Ends a rekey: removes every generation but `keep` from the header, then
/// the backups in the backing directory that hold a removed one. The key
/// manager's proof (an unwrap of `keep`) is obtained without holding the
/// volume's lock, so `status` keeps answering while a key manager hangs.
pub fn retire(
    volume: &Mutex<Volume>,
    provider: &dyn KeyProvider,
    keep: u16,
) -> Result<Vec<u16>, RetireError> {
    let lock = || volume.locked();
    let fail = |e: VolumeError| {
        audit_step(&lock(), "rekey_retire", keep, Err(&e.to_string()));
        RetireError { keep, source: e }
    };
    let (kek, wrapped, aad) = lock().retire_proof_request(keep).map_err(fail)?;
    let proof = provider
        .unwrap(&kek, &wrapped, &aad)
        .map_err(|e| fail(e.into()))?;
    let mut vol = lock();
    let removed = match vol.retire_generations(keep, &kek, &proof) {
        Ok(r) => r,
        Err(e) => {
            drop(vol);
            return Err(fail(e));
        }
    };
    audit_step(&vol, "rekey_retire", keep, Ok(()));
    log::info!(
        "op=rekey_retire volume={} kept={keep} removed={removed:?} result=ok",
        vol.id_hex()
    );
    clean_backups(&vol.backing, keep);
    Ok(removed)
}

/// `kmfs.volume.bak` becomes a copy of the current header; dated backups
/// holding any generation but `keep` are deleted (each logged).
fn clean_backups(backing: &Path, keep: u16) {
    match header::read_file(&header::header_path(backing)) {
        Ok(cur) => {
            if let Err(e) = header::replace_backup(backing, &cur) {
                log::warn!("op=rekey_backup result=fail error=\"{e}\"");
            }
        }
        Err(e) => log::warn!("op=rekey_backup result=fail error=\"{e}\""),
    }
    let Ok(rd) = std::fs::read_dir(backing) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("kmfs.volume.") && name.ends_with(".bak"))
            || name == header::BACKUP_FILE
        {
            continue;
        }
        let p = e.path();
        let stale = match header::read_file(&p).and_then(|b| VolumeHeader::decode(&b, &p)) {
            Ok(h) => h.generations.iter().any(|g| g.generation != keep),
            Err(_) => false,
        };
        if stale {
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!(
                    "op=rekey_backup path={} result=removed reason=\"holds a retired key generation\"",
                    p.display()
                ),
                Err(e) => log::warn!(
                    "op=rekey_backup path={} result=fail error=\"{e}\"",
                    p.display()
                ),
            }
        }
    }
}
