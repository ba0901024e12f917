//! Crash safety: the mount daemon is killed with SIGKILL at a random moment
//! while several writers stream data through the mount (with fsync at known
//! points), the dead mount is detached, the volume is remounted, and then:
//!
//! * everything acknowledged by fsync reads back intact (append streams up to
//!   their last fsync, overwritten ranges of a fixed-size file, whole small
//!   files created and fsynced one after another);
//! * what was written but not acknowledged is at worst short or zero-filled:
//!   every byte past the last fsync is the byte that was written or zero —
//!   with one documented exception (docs/FORMAT.md 6.4): SIGKILL can cut the
//!   daemon's pwrite at a page boundary of the backing file, which tears at
//!   most one unit per file, and only its last three XTS blocks (unit
//!   offsets 4032..4096) may then be garbage; bytes of an overwritten file are
//!   the old or the new value, never anything else;
//! * files nobody was writing (written before, including every unit shape:
//!   tiny, merged tail, whole blocks) and every file of earlier iterations are
//!   untouched.
//!
//! The same volume goes through all iterations, so damage accumulates if there
//! is any. The default run does 10 iterations (well under 30 s); set
//! `KMFS_LONG_TESTS=1` for 200 iterations, `KMFS_CRASH_ITERATIONS=N` for N, and
//! `KMFS_CRASH_SEED=S` to replay a run (the seed is printed).

use crate::support::fault;
use crate::support::mount;
use crate::support::rng::Rng;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fault::Daemon;
use mount::{Volume, pattern};

/// Small deterministic generator for sizes and kill points.
/// A write size: mostly odd sizes around unit boundaries, some large.
fn write_size(rng: &mut Rng) -> usize {
    match rng.below(4) {
        0 => 1 + rng.below(40) as usize,
        1 => 4096 * (1 + rng.below(4) as usize) + rng.below(33) as usize - 16,
        2 => 1 + rng.below(70_000) as usize,
        _ => 1 + rng.below(1 << 20) as usize,
    }
}

/// Shared state of one writer: what it has been acknowledged.
#[derive(Default)]
struct Progress {
    /// Append streams: bytes covered by the last successful fsync.
    synced: u64,
    /// Append streams: end of the furthest write attempted.
    attempted: u64,
    /// Overwriter: byte ranges acknowledged by fsync (written with the new
    /// version).
    synced_ranges: Vec<(u64, u64)>,
    /// Small files: highest index whose file was created, written and fsynced.
    files_done: Option<u64>,
    /// An error seen before the kill (a failure of its own).
    early_error: Option<String>,
}

type Shared = Arc<Mutex<Progress>>;

/// Length of the pattern an append stream repeats (not a multiple of 4096).
const STREAM_PERIOD: usize = (8 << 20) + 4099;
const OVERWRITE_LEN: usize = (2 << 20) + 1234;

fn small_len(n: u64) -> usize {
    [0, 1, 15, 16, 17, 4095, 4096, 4097, 4111, 4112, 9000][n as usize % 11] + (n as usize / 11) % 3
}

fn record_err(p: &Shared, killed: &AtomicBool, what: String) {
    if !killed.load(Ordering::SeqCst) {
        p.lock().unwrap().early_error = Some(what);
    }
}

/// `n` bytes of the endless stream that repeats `data`, from position `pos`.
fn stream_bytes(data: &[u8], pos: usize, n: usize) -> Vec<u8> {
    (pos..pos + n).map(|i| data[i % data.len()]).collect()
}

fn appender(path: PathBuf, data: Arc<Vec<u8>>, seed: u64, p: Shared, killed: Arc<AtomicBool>) {
    let mut rng = Rng(seed | 1);
    let mut f = match OpenOptions::new().create_new(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => return record_err(&p, &killed, format!("create {}: {e}", path.display())),
    };
    let mut pos = 0usize;
    let mut since_sync = 0;
    // Runs until the daemon dies under it.
    loop {
        let n = write_size(&mut rng);
        let chunk = stream_bytes(&data, pos, n);
        p.lock().unwrap().attempted = (pos + n) as u64;
        if let Err(e) = f.write_all(&chunk) {
            return record_err(&p, &killed, format!("write {}: {e}", path.display()));
        }
        pos += n;
        since_sync += 1;
        if since_sync > rng.below(4) {
            since_sync = 0;
            if let Err(e) = f.sync_all() {
                return record_err(&p, &killed, format!("fsync {}: {e}", path.display()));
            }
            p.lock().unwrap().synced = pos as u64;
        }
    }
}

fn overwriter(path: PathBuf, new: Arc<Vec<u8>>, seed: u64, p: Shared, killed: Arc<AtomicBool>) {
    let mut rng = Rng(seed | 1);
    let f = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) => return record_err(&p, &killed, format!("open {}: {e}", path.display())),
    };
    let mut pending = Vec::new();
    loop {
        let len = write_size(&mut rng).min(OVERWRITE_LEN);
        let off = rng.below((OVERWRITE_LEN - len + 1) as u64) as usize;
        if let Err(e) = f.write_all_at(&new[off..off + len], off as u64) {
            return record_err(&p, &killed, format!("pwrite {}: {e}", path.display()));
        }
        pending.push((off as u64, (off + len) as u64));
        if rng.below(3) == 0 {
            if let Err(e) = f.sync_data() {
                return record_err(&p, &killed, format!("fdatasync {}: {e}", path.display()));
            }
            p.lock().unwrap().synced_ranges.append(&mut pending);
        }
    }
}

fn small_files(dir: PathBuf, p: Shared, killed: Arc<AtomicBool>) {
    for n in 0u64.. {
        let path = dir.join(format!("s{n}"));
        let r = (|| {
            let mut f = File::create(&path)?;
            f.write_all(&pattern(n + 7, small_len(n)))?;
            f.sync_all()
        })();
        if let Err(e) = r {
            return record_err(&p, &killed, format!("small file {}: {e}", path.display()));
        }
        p.lock().unwrap().files_done = Some(n);
    }
}

/// Checks an append stream after the crash; returns the number of torn units.
fn check_stream(path: &Path, data: &[u8], pr: &Progress) -> Result<usize, String> {
    let got = match std::fs::read(path) {
        Ok(g) => g,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && pr.synced == 0 => return Ok(0),
        Err(e) => return Err(format!("{}: read after crash: {e}", path.display())),
    };
    let (synced, attempted) = (pr.synced as usize, pr.attempted as usize);
    if got.len() < synced || got.len() > attempted.max(synced) {
        return Err(format!(
            "{}: size {} outside [fsynced {synced}, attempted {attempted}]",
            path.display(),
            got.len()
        ));
    }
    let want = |i: usize| data[i % data.len()];
    if let Some(i) = (0..synced).find(|&i| got[i] != want(i)) {
        return Err(format!(
            "{}: fsynced byte {i} (unit {}) differs (fsynced {synced}, size {})",
            path.display(),
            i / 4096,
            got.len()
        ));
    }
    // Past the fsync point: the written byte or zero, except in a unit torn
    // by the kill (FORMAT.md 6.4): SIGKILL can stop the daemon's pwrite at a
    // page boundary of the backing file, which lies 4056 bytes into a unit;
    // then only that unit's last three XTS blocks (plaintext offsets
    // 4032..4096 of the unit) can be garbage.
    let mut torn = std::collections::BTreeSet::new();
    for i in synced..got.len() {
        if got[i] != want(i) && got[i] != 0 {
            if i % 4096 < 4032 {
                let bad = (i..got.len())
                    .filter(|&j| got[j] != want(j) && got[j] != 0)
                    .count();
                return Err(format!(
                    "{}: unacknowledged byte {i} (unit {}, offset {} in it) is neither the written byte nor zero ({bad} such bytes; fsynced {synced}, attempted {attempted}, size {})",
                    path.display(),
                    i / 4096,
                    i % 4096,
                    got.len()
                ));
            }
            torn.insert(i / 4096);
        }
    }
    if torn.len() > 1 {
        return Err(format!(
            "{}: {} torn units {torn:?} (at most one pwrite is cut by a kill)",
            path.display(),
            torn.len()
        ));
    }
    Ok(torn.len())
}

fn check_overwrite(path: &Path, old: &[u8], new: &[u8], pr: &Progress) -> Result<(), String> {
    let got = std::fs::read(path).map_err(|e| format!("{}: read: {e}", path.display()))?;
    if got.len() != old.len() {
        return Err(format!(
            "{}: size {} != {}",
            path.display(),
            got.len(),
            old.len()
        ));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != old[i] && got[i] != new[i]) {
        let bad = (0..got.len())
            .filter(|&j| got[j] != old[j] && got[j] != new[j])
            .count();
        return Err(format!(
            "{}: byte {i} (unit {}) is neither the old nor the new value ({bad} such bytes)",
            path.display(),
            i / 4096
        ));
    }
    for &(a, b) in &pr.synced_ranges {
        if let Some(i) = (a as usize..b as usize).find(|&i| got[i] != new[i]) {
            return Err(format!(
                "{}: byte {i} of fsynced range {a}..{b} lost its new value",
                path.display()
            ));
        }
    }
    Ok(())
}

fn check_small(dir: &Path, pr: &Progress) -> Result<(), String> {
    let done = pr.files_done.map_or(0, |n| n + 1);
    for n in 0..done {
        let path = dir.join(format!("s{n}"));
        let got = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if got != pattern(n + 7, small_len(n)) {
            return Err(format!("{}: fsynced small file differs", path.display()));
        }
    }
    // The one in progress: absent, or a prefix of its data, or zero-filled.
    let path = dir.join(format!("s{done}"));
    if let Ok(got) = std::fs::read(&path) {
        let want = pattern(done + 7, small_len(done));
        if got.len() > want.len() || got.iter().zip(&want).any(|(&g, &w)| g != w && g != 0) {
            return Err(format!(
                "{}: unacknowledged small file holds garbage ({} bytes)",
                path.display(),
                got.len()
            ));
        }
    }
    Ok(())
}

fn digest(data: &[u8]) -> u64 {
    // FNV-1a; enough to notice any change.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Every regular file below `root` with a digest of its content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (usize, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.insert(p, (data.len(), digest(&data)));
            }
        }
    }
    out
}

#[test]
fn sigkill_during_writes_loses_only_unacknowledged_tails() {
    let iterations: u64 = std::env::var("KMFS_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if fault::long_tests() { 200 } else { 10 });
    let seed: u64 = std::env::var("KMFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            u64::from_le_bytes(b) | 1
        });
    eprintln!("crash test: {iterations} iterations, KMFS_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let vol = Volume::create(false);
    let mut d = Daemon::mount(&vol);

    // Files nobody writes during the crashes, one of each unit shape.
    let stat = vol.mnt.join("static");
    std::fs::create_dir(&stat).unwrap();
    for (i, len) in [
        0usize,
        5,
        15,
        16,
        4095,
        4096,
        4100,
        4111,
        4112,
        100_000,
        (1 << 20) + 3,
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = File::create(stat.join(format!("f{i}"))).unwrap();
        f.write_all(&pattern(1000 + i as u64, len)).unwrap();
        f.sync_all().unwrap();
    }
    let mut settled = snapshot(&vol.mnt);
    let streams: Vec<Arc<Vec<u8>>> = (0..3)
        .map(|k| Arc::new(pattern(seed ^ (k + 11), STREAM_PERIOD)))
        .collect();
    let old = pattern(seed ^ 99, OVERWRITE_LEN);
    let new = Arc::new(pattern(seed ^ 100, OVERWRITE_LEN));
    let mut failures = Vec::new();
    let mut torn_total = 0;

    for it in 0..iterations {
        let dir = vol.mnt.join(format!("it{it}"));
        std::fs::create_dir(&dir).unwrap();
        let ow = dir.join("over");
        {
            let mut f = File::create(&ow).unwrap();
            f.write_all(&old).unwrap();
            f.sync_all().unwrap();
        }
        let killed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut progress = Vec::new();
        for (k, data) in streams.iter().enumerate() {
            let p: Shared = Default::default();
            progress.push(p.clone());
            let (path, data, s, killed) = (
                dir.join(format!("a{k}")),
                data.clone(),
                rng.next(),
                killed.clone(),
            );
            threads.push(std::thread::spawn(move || {
                appender(path, data, s, p, killed)
            }));
        }
        let po: Shared = Default::default();
        {
            let (path, new, s, p, killed) = (
                ow.clone(),
                new.clone(),
                rng.next(),
                po.clone(),
                killed.clone(),
            );
            threads.push(std::thread::spawn(move || {
                overwriter(path, new, s, p, killed)
            }));
        }
        let ps: Shared = Default::default();
        {
            let (dir, p, killed) = (dir.clone(), ps.clone(), killed.clone());
            threads.push(std::thread::spawn(move || small_files(dir, p, killed)));
        }

        std::thread::sleep(Duration::from_millis(20 + rng.below(400)));
        killed.store(true, Ordering::SeqCst);
        d.kill9();
        for t in threads {
            t.join().expect("writer thread panicked");
        }
        d = Daemon::mount(&vol);

        let mut errs = Vec::new();
        for p in progress.iter().chain([&po, &ps]) {
            if let Some(e) = &p.lock().unwrap().early_error {
                errs.push(format!("error before the kill: {e}"));
            }
        }
        for (k, (data, p)) in streams.iter().zip(&progress).enumerate() {
            match check_stream(&dir.join(format!("a{k}")), data, &p.lock().unwrap()) {
                Ok(n) => torn_total += n,
                Err(e) => errs.push(e),
            }
        }
        if let Err(e) = check_overwrite(&ow, &old, &new, &po.lock().unwrap()) {
            errs.push(e);
        }
        if let Err(e) = check_small(&dir, &ps.lock().unwrap()) {
            errs.push(e);
        }
        // Everything settled before this iteration is unchanged.
        let now = snapshot(&vol.mnt);
        for (p, v) in &settled {
            if now.get(p) != Some(v) {
                errs.push(format!("{} changed or vanished", p.display()));
            }
        }
        let pr = progress
            .iter()
            .map(|p| p.lock().unwrap().synced)
            .collect::<Vec<_>>();
        eprintln!(
            "iteration {it}: fsynced stream bytes {pr:?}, small files {:?}, {} errors",
            ps.lock().unwrap().files_done,
            errs.len()
        );
        if !errs.is_empty() {
            failures.push(format!("iteration {it}:\n  {}", errs.join("\n  ")));
        }
        // The streams are large: drop them, and all but 20 small files (the
        // daemon holds a descriptor per inode the kernel caches, and the
        // descriptor limit here is 20000); the rest stays for later checks.
        let mut now = now;
        let small_done = ps.lock().unwrap().files_done.map_or(0, |n| n + 1);
        let extra = (0..streams.len())
            .map(|k| dir.join(format!("a{k}")))
            .chain((20..=small_done).map(|n| dir.join(format!("s{n}"))));
        for p in extra {
            let _ = std::fs::remove_file(&p);
            now.remove(&p);
        }
        settled = now;
    }

    eprintln!("{torn_total} unacknowledged units torn by the kills (FORMAT.md 6.4)");
    let st = d.unmount();
    let log = d.log_text();
    assert!(
        failures.is_empty(),
        "KMFS_CRASH_SEED={seed}: {} of {iterations} iterations failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        st.is_some_and(|s| s.success()),
        "daemon exit {st:?}:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    // The header survived every crash.
    let out = std::process::Command::new(mount::KMFS)
        .args(["header", "dump"])
        .arg(&vol.backing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
