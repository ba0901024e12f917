//! One pass of a rekey over the tree ([`Pass`]: each file in batches, the
//! metadata of each inode), the final sweep, and keeping a half
//! re-encrypted file held until it completes.

use super::*;

/// One walk over the tree, re-encrypting every file (and the names and
/// attributes of every inode) not on `target` yet.
pub(super) struct Pass<'a> {
    rekey: &'a Rekey,
    keys: &'a VolumeKeys,
    gate: &'a dyn FileGate,
    journal: &'a mut Journal,
    target: u16,
    /// Every generation's keys, and their attribute ciphers.
    all: Vec<(u16, Arc<GenKeys>)>,
    xciphers: Vec<(u16, crate::crypto::xattr::XattrCipher)>,
    pacer: Pacer,
    run_start: Instant,
    run_bytes: u64,
    last_persist: Instant,
}

/// One file of a pass, across its batches.
struct FileJob<'p> {
    path: PathBuf,
    rel: &'p Path,
    md: &'p std::fs::Metadata,
    /// The generation the walk saw the file on.
    from: u16,
    fref: FileRef,
    /// Units below this one are done.
    next: u64,
    /// The file's id, once the first batch read its header.
    file_id: Option<[u8; 16]>,
}

/// What one batch did: plaintext bytes, and whether the file is finished
/// (`Some(true)`), was left alone because it changed (`Some(false)`), or
/// goes on in the next batch (`None`).
struct BatchDone {
    bytes: u64,
    outcome: Option<bool>,
}

impl<'a> Pass<'a> {
    pub(super) fn new(
        rekey: &'a Rekey,
        keys: &'a VolumeKeys,
        gate: &'a dyn FileGate,
        journal: &'a mut Journal,
        target: u16,
    ) -> Pass<'a> {
        let all = keys.generations.all();
        let xciphers = metadata::xattr_ciphers(&all);
        Pass {
            rekey,
            keys,
            gate,
            journal,
            target,
            all,
            xciphers,
            pacer: Pacer::new(),
            run_start: Instant::now(),
            run_bytes: 0,
            last_persist: Instant::now(),
        }
    }

    pub(super) fn run(mut self) -> Result<(), RekeyError> {
        let rekey = self.rekey;
        walk_all(&rekey.backing, &mut |rel, md| self.entry(rel, md))?;
        rekey.persist();
        Ok(())
    }

    /// Honours stop and pause; the pacer starts over after a pause.
    fn checkpoint(&mut self) -> Result<(), RekeyError> {
        if self.rekey.checkpoint()? {
            self.pacer = Pacer::new();
        }
        Ok(())
    }

    fn entry(&mut self, rel: &Path, md: &std::fs::Metadata) -> Result<(), RekeyError> {
        self.checkpoint()?;
        self.metadata(rel, md)?;
        if !md.is_file() {
            return Ok(());
        }
        let path = self.rekey.backing.join(rel);
        let g = match file_generation(&path) {
            Ok(Some(g)) if g != self.target => g,
            _ => return Ok(()),
        };
        let all = ciphers(self.keys, &[g, self.target]);
        let Some(step) = step_for(&all, g, self.target) else {
            log::error!(
                "op=rekey path={} error=\"file uses key generation {g}, which the volume header does not hold\" result=skip",
                rel.display()
            );
            self.rekey.status_mut().files_skipped += 1;
            return Ok(());
        };
        let mut job = FileJob {
            path,
            rel,
            md,
            from: g,
            fref: FileRef {
                ino: md.ino(),
                file_id: [0; 16],
                path: rel.to_path_buf(),
            },
            next: 0,
            file_id: None,
        };
        self.file(&mut job, &step)
    }

    /// The file goes in batches of about BATCH_TIME, each under the gate;
    /// in between, the filesystem serves it split at the frontier, and the
    /// throttle, pause and stop apply.
    fn file(&mut self, job: &mut FileJob<'_>, step: &Step<'_>) -> Result<(), RekeyError> {
        loop {
            let t0 = Instant::now();
            let Some(done) = self.batch(job, step)? else {
                return Ok(()); // gone before its first batch
            };
            if done.outcome == Some(false)
                && let Some(id) = job.file_id
            {
                // Replaced or gone since the last batch.
                self.gate.set_frontier(&id, None);
            }
            self.account(&done);
            self.rest(t0, done.bytes);
            if done.outcome.is_some() {
                return Ok(());
            }
            // Half way through the file: a pause waits here (the file
            // stays split and served), a stop leaves it to the journal.
            self.checkpoint()?;
        }
    }

    /// One batch of `job` under the gate; `None` if the file was gone
    /// before any of it was done.
    fn batch(
        &mut self,
        job: &mut FileJob<'_>,
        step: &Step<'_>,
    ) -> Result<Option<BatchDone>, RekeyError> {
        let (rekey, gate, target) = (self.rekey, self.gate, self.target);
        let journal = &mut *self.journal;
        let mut done = BatchDone {
            bytes: 0,
            outcome: None,
        };
        // With a byte rate, a batch is a quarter second's worth, so the
        // pauses between batches stay short.
        let budget = file::Budget {
            time: BATCH_TIME,
            bytes: rekey
                .status()
                .throttle
                .rate_mb
                .map_or(u64::MAX, |r| (r * 250_000.0) as u64),
        };
        let (path, md) = (job.path.clone(), job.md);
        let r = gate.exclusive(&path, md, &mut || {
            let f = open_scanned(&path, md)?;
            // Under the gate: the header may have changed since the walk
            // (or the last batch) read it.
            let hd = match FileHeader::read_from(&f) {
                Ok(Some(h))
                    if h.generation == job.from && job.file_id.is_none_or(|id| id == h.file_id) =>
                {
                    h
                }
                _ => {
                    done.outcome = Some(false);
                    return Ok(None);
                }
            };
            if job.file_id.is_none() {
                // A run stopped half way through this file (its frontier
                // still published) goes on from there.
                if let Some(f) = gate.frontier(&hd.file_id)
                    && f.to == target
                {
                    job.next = f.next_unit;
                }
                job.file_id = Some(hd.file_id);
            }
            let fref = FileRef {
                file_id: hd.file_id,
                ..job.fref.clone()
            };
            let r = file::Reencryption {
                file: &f,
                header: &hd,
                step,
                fref: &fref,
                journal,
                progress: &mut |n| done.bytes += n,
            }
            .some(job.next, Some(budget));
            match r {
                Ok(file::Progress::Partial(n)) => {
                    job.next = n;
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
                    done.outcome = Some(true);
                    Ok(Some(h))
                }
                Err(e) if !e.mixed => Err(e.error),
                Err(e) => {
                    let h = rekey.finish_in_place(&f, step, journal, e.error)?;
                    gate.set_frontier(&hd.file_id, None);
                    done.outcome = Some(true);
                    Ok(Some(h))
                }
            }
        });
        match r {
            Ok(()) => Ok(Some(done)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && job.next == 0 => Ok(None),
            // Moved away half done: the journal knows it; the next attempt
            // finds it by inode and id.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(RekeyError::Moved(job.rel.to_path_buf()))
            }
            Err(e) => Err(RekeyError::at("cannot re-encrypt", job.rel, e)),
        }
    }

    /// Counts a batch in the status (and the state file every 2 s).
    fn account(&mut self, done: &BatchDone) {
        self.run_bytes += done.bytes;
        {
            let mut s = self.rekey.status_mut();
            s.bytes_done += done.bytes;
            if done.outcome == Some(true) {
                s.files_done += 1;
            }
            let secs = self.run_start.elapsed().as_secs_f64();
            if secs > 0.0 {
                s.bytes_per_sec = self.run_bytes as f64 / secs;
            }
            let left = s.bytes_total.saturating_sub(s.bytes_done);
            s.eta_secs = (s.bytes_per_sec > 0.0).then(|| (left as f64 / s.bytes_per_sec) as u64);
        }
        if self.last_persist.elapsed() > Duration::from_secs(2) {
            self.rekey.persist();
            self.last_persist = Instant::now();
        }
    }

    /// Rests as the throttle asks after a batch begun at `t0` (at most 5 s,
    /// less if stopped or paused).
    fn rest(&mut self, t0: Instant, bytes: u64) {
        let rekey = self.rekey;
        let throttle = rekey.status().throttle;
        let rest = self.pacer.rest(&throttle, t0.elapsed(), bytes);
        if !rest.is_zero() {
            let until = Instant::now() + rest.min(Duration::from_secs(5));
            while Instant::now() < until
                && !rekey.stopped()
                && !rekey.shared.paused.load(Ordering::Relaxed)
            {
                nap(&rekey.shared, until - Instant::now());
            }
        }
    }

    /// Names (or symlink targets) of a directory and the attributes of any
    /// inode, moved to `target` if they are not on it yet.
    fn metadata(&mut self, rel: &Path, md: &std::fs::Metadata) -> Result<(), RekeyError> {
        let (rekey, gate, target) = (self.rekey, self.gate, self.target);
        let plaintext_names = rekey.plaintext_names;
        let all = &self.all;
        let xciphers = &self.xciphers;
        let journal = &mut *self.journal;
        let path = rekey.backing.join(rel);
        if self.keys.generations.get(target).is_none() {
            return Err(RekeyError::NoKeys(target));
        }
        let fail = |what: &'static str, e: io::Error| -> Result<(), RekeyError> {
            if e.kind() == io::ErrorKind::NotFound {
                Ok(()) // gone or replaced since the walk saw it
            } else {
                Err(RekeyError::at(what, &path, e))
            }
        };
        let unbound_ok = self.keys.unbound_ok();
        if md.is_dir() {
            let behind = metadata::symlinks_behind(&path, all, target, plaintext_names, unbound_ok)
                || (!plaintext_names
                    && dirid::read(&path)
                        .map(|(_, g)| g != target)
                        .unwrap_or(false));
            if behind {
                let r = gate.exclusive_names(&path, md, &mut || {
                    if plaintext_names {
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
            && metadata::xattrs_behind(&path, md, xciphers, target, plaintext_names, unbound_ok)
                .unwrap_or(false)
        {
            let r = gate.exclusive(&path, md, &mut || {
                metadata::rekey_xattrs(&path, md, xciphers, target, plaintext_names, unbound_ok)
            });
            if let Err(e) = r {
                fail("cannot re-encrypt the attributes of", e)?;
            }
        }
        Ok(())
    }
}

impl Rekey {
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
