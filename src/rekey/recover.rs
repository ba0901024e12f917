//! Finishing what a crash left in the rekey journal, before anything can
//! read the file or directory it names.

use super::*;

pub(super) fn step_for(keys: &[(u16, Arc<GenKeys>)], from: u16, to: u16) -> Option<Step<'_>> {
    let get = |g| keys.iter().find(|(x, _)| *x == g).map(|(_, c)| &c.content);
    Some(Step {
        from_gen: from,
        from: get(from)?,
        to_gen: to,
        to: get(to)?,
    })
}

pub(super) fn ciphers(keys: &VolumeKeys, gens: &[u16]) -> Vec<(u16, Arc<GenKeys>)> {
    gens.iter()
        .filter_map(|g| keys.generations.get(*g).map(|c| (*g, c)))
        .collect()
}

/// Finishes a file the journal says was in progress (after a crash), through
/// `gate`. Run before the filesystem serves the volume, and offline before
/// anything else. Returns the file's path if there was one.
pub fn recover(
    backing: &Path,
    keys: &VolumeKeys,
    gate: &dyn FileGate,
) -> Result<Option<PathBuf>, RekeyError> {
    let rec = Journal::pending(backing)
        .map_err(|e| RekeyError::io("cannot read the rekey journal", e))?;
    let Some(rec) = rec else { return Ok(None) };
    let mut journal =
        Journal::open(backing).map_err(|e| RekeyError::io("cannot open the rekey journal", e))?;
    if rec.directory {
        return recover_dir(backing, keys, gate, &rec, &mut journal);
    }
    let Some(path) = locate(backing, &rec.file) else {
        log::warn!(
            "op=rekey_recover path={} result=fail error=\"the file of the journal's last record is gone\"",
            rec.file.path.display()
        );
        journal
            .idle()
            .map_err(|e| RekeyError::io("cannot write the rekey journal", e))?;
        return Ok(None);
    };
    let all = ciphers(keys, &[rec.from, rec.to]);
    let step = step_for(&all, rec.from, rec.to).ok_or(RekeyError::JournalGenerations {
        from: rec.from,
        to: rec.to,
    })?;
    let md = std::fs::metadata(&path).map_err(|e| RekeyError::at("", &path, e))?;
    gate.exclusive(&path, &md, &mut || {
        let f = open_scanned(&path, &md)?;
        let h = file::finish_pending(&f, &rec, &step, &mut journal)?;
        gate.set_frontier(&rec.file.file_id, None);
        Ok(Some(h))
    })
    .map_err(|e| RekeyError::at("cannot finish", &path, e))?;
    log::info!(
        "op=rekey_recover path={} generation={} result=ok",
        rec.file.path.display(),
        rec.to
    );
    Ok(Some(rec.file.path))
}

/// Finishes the directory of a journal record (names being moved to
/// `rec.to`): found at its recorded path if its id matches, else anywhere by
/// inode number and id.
pub(super) fn recover_dir(
    backing: &Path,
    keys: &VolumeKeys,
    gate: &dyn FileGate,
    rec: &Record,
    journal: &mut Journal,
) -> Result<Option<PathBuf>, RekeyError> {
    let is_it = |p: &Path| dirid::read(p).is_ok_and(|(id, _)| id == rec.file.file_id);
    let mut found = Some(rec.file.path.clone()).filter(|p| is_it(&backing.join(p)));
    if found.is_none() {
        let _ = walk_all(backing, &mut |rel, md| {
            if found.is_none()
                && md.is_dir()
                && md.ino() == rec.file.ino
                && is_it(&backing.join(rel))
            {
                found = Some(rel.to_path_buf());
            }
            Ok(())
        });
    }
    let Some(rel) = found else {
        log::warn!(
            "op=rekey_recover path={} result=fail error=\"the directory of the journal's last record is gone\"",
            rec.file.path.display()
        );
        journal
            .idle()
            .map_err(|e| RekeyError::io("cannot write the rekey journal", e))?;
        return Ok(None);
    };
    let path = backing.join(&rel);
    let all = keys.generations.all();
    let md = std::fs::metadata(&path).map_err(|e| RekeyError::at("", &path, e))?;
    gate.exclusive_names(&path, &md, &mut || {
        metadata::rekey_dir(&path, &rel, &all, rec.to, keys.unbound_ok(), journal).map(Some)
    })
    .map_err(|e| RekeyError::at("cannot finish the names of", &path, e))?;
    log::info!(
        "op=rekey_recover path={} generation={} result=ok",
        rel.display(),
        rec.to
    );
    Ok(Some(rel))
}
