//! One pass of a rekey over the tree, the metadata of one inode, the final
//! sweep, and keeping a half re-encrypted file held until it completes.

use super::*;

impl Rekey {
    /// One walk over the tree, re-encrypting every file not on `target`.
    pub(super) fn pass(
        &self,
        keys: &VolumeKeys,
        gate: &dyn FileGate,
        journal: &mut Journal,
        target: u16,
    ) -> Result<(), RekeyError> {
        let mut pacer = Pacer::new();
        let run_start = Instant::now();
        let mut run_bytes = 0u64;
        let mut last_persist = Instant::now();
        let all = keys.generations.all();
        let xciphers = metadata::xattr_ciphers(&all);
        walk_all(&self.backing, &mut |rel, md| {
            if self.checkpoint()? {
                pacer = Pacer::new();
            }
            self.metadata_step(keys, gate, journal, target, &all, &xciphers, rel, md)?;
            if !md.is_file() {
                return Ok(());
            }
            let path = self.backing.join(rel);
            let g = match file_generation(&path) {
                Ok(Some(g)) if g != target => g,
                _ => return Ok(()),
            };
            let all = ciphers(keys, &[g, target]);
            let Some(step) = step_for(&all, g, target) else {
                log::error!(
                    "op=rekey path={} error=\"file uses key generation {g}, which the volume header does not hold\" result=skip",
                    rel.display()
                );
                self.status_mut().files_skipped += 1;
                return Ok(());
            };
            let fref = FileRef {
                ino: md.ino(),
                file_id: [0; 16],
                path: rel.to_path_buf(),
            };
            // The file goes in batches of about BATCH_TIME, each under the
            // gate; in between, the filesystem serves it split at the
            // frontier, and the throttle, pause and stop apply.
            let mut next = 0u64;
            let mut file_id: Option<[u8; 16]> = None;
            loop {
                let t0 = Instant::now();
                let mut done_bytes = 0u64;
                let mut outcome = None;
                // With a byte rate, a batch is a quarter second's worth, so
                // the pauses between batches stay short.
                let budget = file::Budget {
                    time: BATCH_TIME,
                    bytes: self
                        .status()
                        .throttle
                        .rate_mb
                        .map_or(u64::MAX, |r| (r * 250_000.0) as u64),
                };
                let r = gate.exclusive(&path, md, &mut || {
                    let f = open_scanned(&path, md)?;
                    // Under the gate: the header may have changed since the
                    // walk (or the last batch) read it.
                    let hd = match FileHeader::read_from(&f) {
                        Ok(Some(h))
                            if h.generation == g && file_id.is_none_or(|id| id == h.file_id) =>
                        {
                            h
                        }
                        _ => {
                            outcome = Some(false);
                            return Ok(None);
                        }
                    };
                    if file_id.is_none() {
                        // A run stopped half way through this file (its
                        // frontier still published) goes on from there.
                        if let Some(f) = gate.frontier(&hd.file_id)
                            && f.to == target
                        {
                            next = f.next_unit;
                        }
                        file_id = Some(hd.file_id);
                    }
                    let fref = FileRef {
                        file_id: hd.file_id,
                        ..fref.clone()
                    };
                    let r = file::reencrypt_some(
                        &f,
                        &hd,
                        &step,
                        next,
                        &fref,
                        journal,
                        &mut |n| done_bytes += n,
                        Some(budget),
                    );
                    match r {
                        Ok(file::Progress::Partial(n)) => {
                            next = n;
                            gate.set_frontier(
                                &hd.file_id,
                                Some(Frontier {
                                    next_unit: n,
                                    to: target,
                                }),
                            );
                            Ok(None)
                        }
                        Ok(file::Progress::Done(h)) => {
                            gate.set_frontier(&hd.file_id, None);
                            outcome = Some(true);
                            Ok(Some(h))
                        }
                        Err(e) if !e.mixed => Err(e.error),
                        Err(e) => {
                            let h = self.finish_in_place(&f, &step, journal, e.error)?;
                            gate.set_frontier(&hd.file_id, None);
                            outcome = Some(true);
                            Ok(Some(h))
                        }
                    }
                });
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound && next == 0 => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Moved away half done: the journal knows it; the
                        // next attempt finds it by inode and id.
                        return Err(RekeyError::Moved(rel.to_path_buf()));
                    }
                    Err(e) => {
                        return Err(RekeyError::at("cannot re-encrypt", rel, e));
                    }
                }
                if outcome == Some(false)
                    && let Some(id) = file_id
                {
                    // Replaced or gone since the last batch.
                    gate.set_frontier(&id, None);
                }
                run_bytes += done_bytes;
                {
                    let mut s = self.status_mut();
                    s.bytes_done += done_bytes;
                    if outcome == Some(true) {
                        s.files_done += 1;
                    }
                    let secs = run_start.elapsed().as_secs_f64();
                    if secs > 0.0 {
                        s.bytes_per_sec = run_bytes as f64 / secs;
                    }
                    let left = s.bytes_total.saturating_sub(s.bytes_done);
                    s.eta_secs =
                        (s.bytes_per_sec > 0.0).then(|| (left as f64 / s.bytes_per_sec) as u64);
                }
                if last_persist.elapsed() > Duration::from_secs(2) {
                    self.persist();
                    last_persist = Instant::now();
                }
                let throttle = self.status().throttle;
                let rest = pacer.rest(&throttle, t0.elapsed(), done_bytes);
                if !rest.is_zero() {
                    let until = Instant::now() + rest.min(Duration::from_secs(5));
                    while Instant::now() < until
                        && !self.stopped()
                        && !self.shared.paused.load(Ordering::Relaxed)
                    {
                        nap(&self.shared, until - Instant::now());
                    }
                }
                if outcome.is_some() {
                    break;
                }
                // Half way through the file: a pause waits here (the file
                // stays split and served), a stop leaves it to the journal.
                if self.checkpoint()? {
                    pacer = Pacer::new();
                }
            }
            Ok(())
        })?;
        self.persist();
        Ok(())
    }

    /// Names (or symlink targets) of a directory and the attributes of any
    /// inode, moved to `target` if they are not on it yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn metadata_step(
        &self,
        keys: &VolumeKeys,
        gate: &dyn FileGate,
        journal: &mut Journal,
        target: u16,
        all: &[(u16, Arc<GenKeys>)],
        xciphers: &[(u16, crate::crypto::xattr::XattrCipher)],
        rel: &Path,
        md: &std::fs::Metadata,
    ) -> Result<(), RekeyError> {
        let path = self.backing.join(rel);
        if keys.generations.get(target).is_none() {
            return Err(RekeyError::NoKeys(target));
        }
        let fail = |what: &'static str, e: io::Error| -> Result<(), RekeyError> {
            if e.kind() == io::ErrorKind::NotFound {
                Ok(()) // gone or replaced since the walk saw it
            } else {
                Err(RekeyError::at(what, &path, e))
            }
        };
        let unbound_ok = keys.unbound_ok();
        if md.is_dir() {
            let behind =
                metadata::symlinks_behind(&path, all, target, self.plaintext_names, unbound_ok)
                    || (!self.plaintext_names
                        && dirid::read(&path)
                            .map(|(_, g)| g != target)
                            .unwrap_or(false));
            if behind {
                let r = gate.exclusive_names(&path, md, &mut || {
                    if self.plaintext_names {
                        metadata::rekey_symlinks(&path, all, target, unbound_ok).map(|_| None)
                    } else {
                        metadata::rekey_dir(&path, rel, all, target, unbound_ok, journal).map(Some)
                    }
                });
                if let Err(e) = r {
                    fail("cannot re-encrypt the names of", e)?;
                }
            }
        }
        if !md.file_type().is_symlink()
            && metadata::xattrs_behind(
                &path,
                md,
                xciphers,
                target,
                self.plaintext_names,
                unbound_ok,
            )
            .unwrap_or(false)
        {
            let r = gate.exclusive(&path, md, &mut || {
                metadata::rekey_xattrs(
                    &path,
                    md,
                    xciphers,
                    target,
                    self.plaintext_names,
                    unbound_ok,
                )
            });
            if let Err(e) = r {
                fail("cannot re-encrypt the attributes of", e)?;
            }
        }
        Ok(())
    }

    /// What is still on another generation: files, directory names,
    /// symlink targets, attributes (the final sweep).
    pub(super) fn left_behind(&self, keys: &VolumeKeys, target: u16) -> Result<u64, RekeyError> {
        if keys.generations.get(target).is_none() {
            return Err(RekeyError::NoKeys(target));
        }
        let all = keys.generations.all();
        let xciphers = metadata::xattr_ciphers(&all);
        let unbound_ok = keys.unbound_ok();
        let mut left = 0u64;
        walk_all(&self.backing, &mut |rel, md| {
            let path = self.backing.join(rel);
            let behind = if md.is_file() {
                matches!(file_generation(&path), Ok(Some(g)) if g != target && keys.generations.get(g).is_some())
            } else if md.is_dir() {
                if self.plaintext_names {
                    false
                } else {
                    dirid::read(&path)
                        .map(|(_, g)| g != target)
                        .unwrap_or(false)
                }
            } else if md.file_type().is_symlink() {
                !metadata::symlink_on(&path, &all, target, self.plaintext_names, unbound_ok)
            } else {
                false
            };
            let xattrs = !md.file_type().is_symlink()
                && metadata::xattrs_behind(
                    &path,
                    md,
                    &xciphers,
                    target,
                    self.plaintext_names,
                    unbound_ok,
                )
                .unwrap_or(false);
            if behind || xattrs {
                log::debug!("op=rekey_sweep path={} result=behind", rel.display());
                left += 1;
            }
            Ok(())
        })?;
        Ok(left)
    }

    /// A file was left half re-encrypted by an error: keep it held and
    /// retry from the journal until it completes, or until stopped (then the
    /// journal finishes it before the next mount serves it).
    pub(super) fn finish_in_place(
        &self,
        f: &File,
        step: &Step<'_>,
        journal: &mut Journal,
        first: io::Error,
    ) -> io::Result<FileHeader> {
        let mut err = first;
        let mut backoff = Duration::from_millis(500);
        loop {
            let msg = format!("{err} (a file is held until its re-encryption completes)");
            log::warn!("op=rekey result=wait error=\"{msg}\"");
            {
                let mut s = self.status_mut();
                s.phase = Phase::Waiting;
                s.message = msg;
            }
            if self.stopped() {
                return Err(err);
            }
            nap(&self.shared, backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
            let pending: Option<Record> = match Journal::pending(&self.backing) {
                Ok(p) => p,
                Err(e) => {
                    err = e;
                    continue;
                }
            };
            let Some(rec) = pending else {
                return Err(io::Error::other("the rekey journal lost its record"));
            };
            match file::finish_pending(f, &rec, step, journal) {
                Ok(h) => {
                    self.status_mut().phase = Phase::Running;
                    return Ok(h);
                }
                Err(e) => err = e,
            }
        }
    }
}
