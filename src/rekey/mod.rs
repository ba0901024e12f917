//! Data re-encryption ("rekey"): moving every file of a volume to a new DEK
//! generation, online in the mount daemon or offline on a backing directory.
//!
//! The order of things:
//! 1. the caller adds the new generation to the volume header (it becomes
//!    the one new files are written with) and writes the state file;
//! 2. [`Rekey::run`] walks the backing tree and re-encrypts, in place and
//!    through the journal, every file whose header names another generation
//!    ([`file::reencrypt`]), each while the filesystem holds off its own I/O
//!    on that file ([`FileGate`]);
//! 3. a sweep with renames and links held off proves no file is left on an
//!    old generation;
//! 4. the host removes the old generations from the header, after the key
//!    manager proves it can still unwrap the new one ([`RekeyHost::retire`]).
//!
//! Progress lives in the files themselves (each header names its
//! generation), so a restart simply walks again and skips what is done; the
//! state file only carries the target, the throttle, pause and counters.
//! Errors (disk full, key manager down) make the rekey wait and retry with a
//! clear status; they never leave a file half re-encrypted for the
//! filesystem to see.

mod error;
pub mod file;
pub mod generations;
pub mod journal;
pub mod metadata;
mod pass;
mod recover;
pub mod state;
mod walk;

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::crypto::names::DIR_ID_LEN;
use crate::sync::MutexExt;
use crate::volume::layout::FileHeader;
use crate::volume::{GenKeys, VolumeKeys, dirid, internal};
pub use error::{RekeyError, RetireError, StartError, ThrottleError};
use file::Step;
use journal::{FileRef, Journal, Record};
pub use recover::recover;
use recover::{ciphers, step_for};
use state::RekeyState;
pub use walk::locate;
use walk::{file_generation, open_scanned, walk, walk_all};

/// A file half way through its re-encryption while it is served: units
/// below `next_unit` are on generation `to`, the others (and a tiny file's
/// only unit) still on the generation its header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontier {
    pub next_unit: u64,
    pub to: u16,
}

/// How long one batch of a file's re-encryption holds the file's I/O.
const BATCH_TIME: Duration = Duration::from_millis(50);

/// How the filesystem lets the rekey work on a file it may be serving.
pub trait FileGate: Send + Sync {
    /// Runs `work` on the backing file at `path` (stat `md`) while the
    /// filesystem does no I/O on it, then installs the header `work` returns
    /// as that file's header.
    fn exclusive(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<FileHeader>>,
    ) -> io::Result<()>;

    /// Runs `work` on backing directory `path` (stat `md`) while the
    /// filesystem does no name operation in it, then installs the directory
    /// id and names generation `work` returns as that directory's.
    fn exclusive_names(
        &self,
        path: &Path,
        md: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<([u8; DIR_ID_LEN], u16)>>,
    ) -> io::Result<()>;

    /// Runs `f` so that what it saw holds as if no rename or link had moved
    /// a file between directories meanwhile. `f` may run more than once
    /// (the filesystem first tries without holding renames off).
    fn moves_frozen(&self, f: &mut dyn FnMut());

    /// Publishes where the file with id `file_id` is split between two
    /// generations (`None`: it is not, any more). Called from inside
    /// [`Self::exclusive`]'s `work`, so the filesystem's next read or write
    /// of the file sees the frontier that matches its contents.
    fn set_frontier(&self, _file_id: &[u8; 16], _frontier: Option<Frontier>) {}

    /// The frontier published for `file_id`, if the file is split.
    fn frontier(&self, _file_id: &[u8; 16]) -> Option<Frontier> {
        None
    }
}

/// The gate of an unmounted volume: nobody else does I/O.
pub struct Offline;

impl FileGate for Offline {
    fn exclusive(
        &self,
        _: &Path,
        _: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<FileHeader>>,
    ) -> io::Result<()> {
        work().map(drop)
    }
    fn exclusive_names(
        &self,
        _: &Path,
        _: &std::fs::Metadata,
        work: &mut dyn FnMut() -> io::Result<Option<([u8; DIR_ID_LEN], u16)>>,
    ) -> io::Result<()> {
        work().map(drop)
    }
    fn moves_frozen(&self, f: &mut dyn FnMut()) {
        f()
    }
}

/// The owner of the volume header: the daemon online, the CLI offline.
pub trait RekeyHost: Send + Sync {
    /// Removes every generation but `keep` from the header (after the key
    /// manager proves it unwraps `keep`), and the header backups that still
    /// hold a removed generation. Returns the generations removed.
    fn retire(&self, keep: u16) -> Result<Vec<u16>, RetireError>;
}

/// Throttle of a rekey. `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Throttle {
    /// Plaintext megabytes (10^6 bytes) per second.
    pub rate_mb: Option<f64>,
    /// Share of wall time the rekey may spend working, in percent (1–100).
    pub cpu: Option<u8>,
}

impl Throttle {
    /// The default: half of the time, no byte-rate limit.
    pub const DEFAULT: Throttle = Throttle {
        rate_mb: None,
        cpu: Some(50),
    };

    /// The largest byte rate accepted (1 TB/s: above any disk).
    pub const MAX_RATE_MB: f64 = 1e6;

    /// Checks values that came from the command line, the control socket or
    /// the state file in the backing directory.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        if let Some(r) = self.rate_mb
            && !(r.is_finite() && r > 0.0 && r <= Self::MAX_RATE_MB)
        {
            return Err(ThrottleError::Rate(r));
        }
        if let Some(c) = self.cpu
            && !(1..=100).contains(&c)
        {
            return Err(ThrottleError::Cpu(c));
        }
        Ok(())
    }

    /// Parses `--rate` (clap value parser).
    pub fn parse_rate(s: &str) -> Result<f64, ThrottleError> {
        let r: f64 = s
            .parse()
            .map_err(|_| ThrottleError::NotANumber(s.to_string()))?;
        Throttle {
            rate_mb: Some(r),
            cpu: None,
        }
        .validate()?;
        Ok(r)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Scanning,
    Running,
    Paused,
    /// Waiting to retry after an error (see `message`).
    Waiting,
    /// Checking that no file is left and retiring the old generations.
    Finishing,
    Done,
    Stopped,
}

/// What `kmfs rekey --status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub phase: Phase,
    pub target_generation: u16,
    pub old_generations: Vec<u16>,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Files that could not be re-encrypted (damaged header, unknown
    /// generation); already unreadable, they do not hold up retirement.
    pub files_skipped: u64,
    pub started: u64,
    pub finished: Option<u64>,
    pub throttle: Throttle,
    /// Plaintext bytes per second over the current run.
    pub bytes_per_sec: f64,
    pub eta_secs: Option<u64>,
    pub message: String,
}

struct Shared {
    status: Mutex<Status>,
    wake: Condvar,
    paused: AtomicBool,
    stop: AtomicBool,
}

/// A rekey in progress (or finished): the handle the daemon keeps.
#[derive(Clone)]
pub struct Rekey {
    shared: Arc<Shared>,
    backing: PathBuf,
    plaintext_names: bool,
}

/// Waits `d`, or less if woken (stop, pause, resume, throttle change).
fn nap(shared: &Shared, d: Duration) {
    let g = shared.status.locked();
    let _ = shared.wake.wait_timeout(g, d);
}

struct Pacer {
    start: Instant,
    busy: Duration,
    bytes: u64,
    /// The throttle the budget was counted under; a new one starts over
    /// (no credit saved up under a slower rate is spent in a burst).
    under: Option<Throttle>,
}

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            start: Instant::now(),
            busy: Duration::ZERO,
            bytes: 0,
            under: None,
        }
    }

    /// How long to rest after having worked `busy` and done `bytes` more.
    fn rest(&mut self, t: &Throttle, busy: Duration, bytes: u64) -> Duration {
        if self.under.is_some_and(|u| u != *t) {
            *self = Pacer::new();
        }
        self.under = Some(*t);
        self.busy += busy;
        self.bytes += bytes;
        let elapsed = self.start.elapsed();
        let mut want = Duration::ZERO;
        if let Some(mb) = t.rate_mb.filter(|r| *r > 0.0) {
            let secs = self.bytes as f64 / (mb * 1e6);
            want = want.max(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
        }
        if let Some(c) = t.cpu.filter(|c| (1..100).contains(c)) {
            want = want.max(self.busy.mul_f64(100.0 / c as f64));
        }
        want.saturating_sub(elapsed)
    }
}

impl Rekey {
    /// A rekey to `state.target` from `old` generations, not yet running.
    /// `plaintext_names`: the volume keeps names in clear (no directory ids).
    pub fn new(backing: &Path, st: &RekeyState, old: Vec<u16>, plaintext_names: bool) -> Rekey {
        let status = Status {
            phase: if st.paused {
                Phase::Paused
            } else {
                Phase::Scanning
            },
            target_generation: st.target,
            old_generations: old,
            files_done: st.files_done,
            files_total: 0,
            bytes_done: st.bytes_done,
            bytes_total: 0,
            files_skipped: 0,
            started: st.started,
            finished: None,
            throttle: st.throttle,
            bytes_per_sec: 0.0,
            eta_secs: None,
            message: String::new(),
        };
        Rekey {
            shared: Arc::new(Shared {
                status: Mutex::new(status),
                wake: Condvar::new(),
                paused: AtomicBool::new(st.paused),
                stop: AtomicBool::new(false),
            }),
            backing: backing.to_path_buf(),
            plaintext_names,
        }
    }

    fn status_mut(&self) -> std::sync::MutexGuard<'_, Status> {
        self.shared.status.locked()
    }

    pub fn status(&self) -> Status {
        self.status_mut().clone()
    }

    fn persist(&self) {
        let s = self.status();
        let st = RekeyState {
            target: s.target_generation,
            started: s.started,
            paused: self.shared.paused.load(Ordering::Relaxed),
            throttle: s.throttle,
            files_done: s.files_done,
            bytes_done: s.bytes_done,
        };
        if let Err(e) = st.store(&self.backing) {
            log::warn!("op=rekey_state result=fail error=\"{e}\"");
        }
    }

    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Relaxed);
        self.persist();
        self.shared.wake.notify_all();
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Relaxed);
        self.persist();
        self.shared.wake.notify_all();
    }

    pub fn set_throttle(&self, t: Throttle) {
        self.status_mut().throttle = t;
        self.persist();
        self.shared.wake.notify_all();
    }

    /// Asks the worker to stop at the next safe point (unmount).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// Between files: honours stop and pause. Returns true if it paused.
    fn checkpoint(&self) -> Result<bool, RekeyError> {
        let mut paused = false;
        while self.shared.paused.load(Ordering::Relaxed) {
            if self.stopped() {
                return Err(RekeyError::Stopped);
            }
            if !paused {
                self.status_mut().phase = Phase::Paused;
                log::info!("op=rekey_pause result=ok");
                paused = true;
            }
            nap(&self.shared, Duration::from_millis(500));
        }
        if self.stopped() {
            return Err(RekeyError::Stopped);
        }
        if paused {
            log::info!("op=rekey_resume result=ok");
            self.status_mut().phase = Phase::Running;
        }
        Ok(paused)
    }

    /// Runs the rekey to its end (or until stopped). Errors make it wait
    /// and retry; only a stop ends it early.
    pub fn run(&self, keys: &VolumeKeys, gate: &dyn FileGate, host: &dyn RekeyHost) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let done_before = self.status().files_done;
            match self.attempt(keys, gate, host) {
                Ok(()) => return,
                Err(RekeyError::Stopped) => {
                    self.status_mut().phase = Phase::Stopped;
                    self.persist();
                    return;
                }
                Err(e) => {
                    let msg = e.to_string();
                    // An attempt that got somewhere starts the backoff over.
                    if self.status().files_done > done_before {
                        backoff = Duration::from_secs(1);
                    }
                    log::warn!(
                        "op=rekey result=wait error=\"{msg}\" retry_in={}s",
                        backoff.as_secs()
                    );
                    {
                        let mut s = self.status_mut();
                        s.phase = Phase::Waiting;
                        s.message = msg;
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.stopped() {
                        nap(&self.shared, until - Instant::now());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn attempt(
        &self,
        keys: &VolumeKeys,
        gate: &dyn FileGate,
        host: &dyn RekeyHost,
    ) -> Result<(), RekeyError> {
        let target = self.status().target_generation;
        if self.stopped() {
            return Err(RekeyError::Stopped);
        }
        // A file left half done by a crash first (its own journal handle).
        recover(&self.backing, keys, gate)?;
        let mut journal = Journal::open(&self.backing)
            .map_err(|e| RekeyError::io("cannot allocate the rekey journal", e))?;
        // Count what is left.
        {
            let mut s = self.status_mut();
            if s.phase != Phase::Paused {
                s.phase = Phase::Scanning;
            }
        }
        let (mut files, mut bytes) = (0u64, 0u64);
        walk(&self.backing, &mut |rel, md| {
            if let Ok(Some(g)) = file_generation(&self.backing.join(rel))
                && g != target
            {
                files += 1;
                bytes += md.len().saturating_sub(crate::volume::layout::HEADER_LEN);
            }
            Ok(())
        })?;
        {
            let mut s = self.status_mut();
            s.files_total = s.files_done + files;
            s.bytes_total = s.bytes_done + bytes;
            if s.phase != Phase::Paused {
                s.phase = Phase::Running;
            }
            s.message.clear();
        }
        loop {
            pass::Pass::new(self, keys, gate, &mut journal, target).run()?;
            // Sweep with moves held off: a file renamed from a directory not
            // yet visited into one already visited would otherwise be missed.
            self.status_mut().phase = Phase::Finishing;
            // A file created just as the generation switched may still be
            // writing its header with the old one: wait for it.
            keys.generations.barrier();
            let mut result = Ok(0);
            gate.moves_frozen(&mut || result = self.left_behind(keys, target));
            let left = result?;
            if left == 0 {
                break;
            }
            self.status_mut().phase = Phase::Running;
        }
        let removed = host.retire(target)?;
        drop(journal);
        Journal::remove(&self.backing)
            .map_err(|e| RekeyError::io("cannot remove the rekey journal", e))?;
        state::remove(&self.backing)
            .map_err(|e| RekeyError::io("cannot remove the rekey state file", e))?;
        let mut s = self.status_mut();
        s.phase = Phase::Done;
        s.finished = Some(crate::volume::now_secs());
        s.eta_secs = Some(0);
        s.message = format!(
            "every file is on key generation {target}; removed generation(s) {removed:?} from the header"
        );
        log::info!(
            "op=rekey_done generation={target} removed={removed:?} files={} bytes={} result=ok",
            s.files_done,
            s.bytes_done
        );
        Ok(())
    }
}

/// Spawns `rekey` on its own thread.
pub fn spawn(
    rekey: Rekey,
    keys: Arc<VolumeKeys>,
    gate: Arc<dyn FileGate>,
    host: Arc<dyn RekeyHost>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("kmfs-rekey".into())
        .spawn(move || rekey.run(&keys, gate.as_ref(), host.as_ref()))
        .expect("spawning the rekey thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_starts_over_when_the_throttle_changes() {
        let slow = Throttle {
            rate_mb: Some(1.0),
            cpu: None,
        };
        let fast = Throttle {
            rate_mb: Some(3.0),
            cpu: None,
        };
        let mut p = Pacer::new();
        p.rest(&slow, Duration::ZERO, 1_000_000);
        // Credit from a long time under the slow rate...
        p.start -= Duration::from_secs(100);
        // ...is not spent at the new rate: 3 MB at 3 MB/s rest about 1 s.
        let rest = p.rest(&fast, Duration::ZERO, 3_000_000);
        assert!(rest > Duration::from_millis(900), "{rest:?}");
    }

    #[test]
    fn pacer_holds_the_duty_cycle_and_rate() {
        let mut p = Pacer::new();
        let t = Throttle {
            rate_mb: None,
            cpu: Some(25),
        };
        let rest = p.rest(&t, Duration::from_millis(100), 0);
        assert!(rest >= Duration::from_millis(250), "{rest:?}");
        let mut p = Pacer::new();
        let t = Throttle {
            rate_mb: Some(10.0),
            cpu: None,
        };
        let rest = p.rest(&t, Duration::ZERO, 5_000_000);
        assert!(rest >= Duration::from_millis(400), "{rest:?}");
        let rest = Pacer::new().rest(&Throttle::default(), Duration::from_secs(1), 1 << 30);
        assert_eq!(rest, Duration::ZERO);
    }
}
