//! Many files under a low descriptor limit (issue 21): the daemon runs with
//! `prlimit --nofile=2048:2048` and without CAP_SYS_RESOURCE (so it cannot
//! raise the limit, as in many containers), and 100,000 files are created
//! across a tree through the mount, then — with the kernel's caches dropped
//! between phases, so it forgets and re-looks-up every inode — stat'ed,
//! read, renamed and removed. No operation may fail, and the daemon's open
//! descriptors (sampled from /proc/PID/fd throughout) stay under the limit.
//!
//! Before the inode table referenced inodes by file handle, every inode the
//! kernel cached held one descriptor, and creation failed with EMFILE near
//! file 2,000.

use crate::support::mount;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mount::{Volume, drop_caches};

const LIMIT: usize = 2048;
const DIRS: usize = 100;
const PER_DIR: usize = 1000;

fn content(d: usize, f: usize) -> Vec<u8> {
    format!("file {d}/{f}\n").into_bytes()
}

/// Runs `op(d)` for every directory index on two threads (the machine's
/// cores), failing on the first error with its path.
fn each_dir(op: impl Fn(usize) -> Result<(), String> + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let d = next.fetch_add(1, Ordering::Relaxed);
                        if d >= DIRS {
                            return Ok(());
                        }
                        op(d)?;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap().unwrap_or_else(|e: String| panic!("{e}"));
        }
    });
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn dir(mnt: &Path, d: usize) -> PathBuf {
    mnt.join(format!("d{d:03}"))
}

/// The daemon started under the low limit, unable to raise it.
fn mount_limited(vol: Volume) -> mount::Mounted {
    vol.mount_via(
        &[
            "prlimit",
            &format!("--nofile={LIMIT}:{LIMIT}"),
            "setpriv",
            "--bounding-set",
            "-sys_resource",
            "--inh-caps",
            "-sys_resource",
        ],
        &[],
    )
}

#[test]
fn hundred_thousand_files_under_a_2048_descriptor_limit() {
    let vol = Volume::create(false);
    let m = mount_limited(vol);
    let pid = m.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    assert!(
        line.split_whitespace().nth(3) == Some("2048")
            && line.split_whitespace().nth(4) == Some("2048"),
        "the daemon must run with the low limit, not raise it: {line}"
    );

    // Sample the daemon's descriptors for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(fd_count(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mnt = m.mnt().to_path_buf();
    let t = Instant::now();
    each_dir(|d| {
        let dp = dir(&mnt, d);
        std::fs::create_dir(&dp).map_err(|e| format!("mkdir {}: {e}", dp.display()))?;
        for f in 0..PER_DIR {
            let p = dp.join(format!("f{f:04}"));
            std::fs::write(&p, content(d, f))
                .map_err(|e| format!("create {}: {e}", p.display()))?;
        }
        Ok(())
    });
    eprintln!(
        "created {} files in {:?}; daemon descriptors peak {}",
        DIRS * PER_DIR,
        t.elapsed(),
        peak.load(Ordering::Relaxed)
    );

    drop_caches();
    let t = Instant::now();
    each_dir(|d| {
        let dp = dir(&mnt, d);
        let mut n = 0;
        for e in std::fs::read_dir(&dp).map_err(|e| format!("readdir {}: {e}", dp.display()))? {
            let e = e.map_err(|e| format!("readdir {}: {e}", dp.display()))?;
            let md = e
                .metadata()
                .map_err(|x| format!("stat {:?}: {x}", e.path()))?;
            if !md.is_file() {
                return Err(format!("{:?} is not a file", e.path()));
            }
            n += 1;
        }
        if n != PER_DIR {
            return Err(format!("{} has {n} entries, not {PER_DIR}", dp.display()));
        }
        Ok(())
    });
    eprintln!("stat of every file, cold: {:?}", t.elapsed());

    drop_caches();
    let t = Instant::now();
    each_dir(|d| {
        let dp = dir(&mnt, d);
        for f in 0..PER_DIR {
            let p = dp.join(format!("f{f:04}"));
            let got = std::fs::read(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
            if got != content(d, f) {
                return Err(format!("{} reads back wrong", p.display()));
            }
        }
        Ok(())
    });
    eprintln!("read of every file, cold: {:?}", t.elapsed());

    drop_caches();
    let t = Instant::now();
    each_dir(|d| {
        let dp = dir(&mnt, d);
        // Into the next directory, so renames cross directories.
        let to = dir(&mnt, (d + 1) % DIRS);
        for f in 0..PER_DIR {
            let from = dp.join(format!("f{f:04}"));
            let dest = to.join(format!("r{d:03}-{f:04}"));
            std::fs::rename(&from, &dest)
                .map_err(|e| format!("rename {} → {}: {e}", from.display(), dest.display()))?;
        }
        Ok(())
    });
    eprintln!("rename of every file, cold: {:?}", t.elapsed());

    drop_caches();
    // Spot-check renamed contents with cold caches.
    for d in (0..DIRS).step_by(7) {
        for f in (0..PER_DIR).step_by(97) {
            let p = dir(&mnt, (d + 1) % DIRS).join(format!("r{d:03}-{f:04}"));
            assert_eq!(std::fs::read(&p).unwrap(), content(d, f), "{}", p.display());
        }
    }

    let t = Instant::now();
    each_dir(|d| {
        let dp = dir(&mnt, d);
        std::fs::remove_dir_all(&dp).map_err(|e| format!("rm -rf {}: {e}", dp.display()))
    });
    eprintln!("remove of every file: {:?}", t.elapsed());
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("daemon descriptors: peak {peak} of the limit {LIMIT}");
    assert!(
        peak < LIMIT,
        "the daemon's descriptors reached {peak} (limit {LIMIT})"
    );
    let log = m.daemon_log();
    assert!(
        !log.contains("op=fd_limit"),
        "the daemon ran out of descriptors:\n{log}"
    );
    m.unmount();
}

/// Files held open are real descriptors: when the application holds more
/// than the daemon can have, the next open fails with a clear EMFILE (the
/// cached descriptors are given up first), the daemon logs the cause once
/// with its limit, and opens work again once files are closed. The test
/// holds thousands of descriptors itself, so it runs in a process of its own
/// (other tests of this binary open files meanwhile).
#[test]
fn running_out_of_descriptors_is_a_clear_error_logged_once() {
    if !crate::support::in_own_process(
        "many_files::running_out_of_descriptors_is_a_clear_error_logged_once",
    ) {
        return;
    }
    let m = mount_limited(Volume::create(false));
    let d = m.p("held");
    std::fs::create_dir(&d).unwrap();
    const FILES: usize = 2 * LIMIT;
    for i in 0..FILES {
        std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
    }
    let mut held = Vec::new();
    let err = loop {
        assert!(
            held.len() < FILES,
            "{FILES} files held open on a daemon limited to {LIMIT}"
        );
        match std::fs::File::open(d.join(format!("f{}", held.len()))) {
            Ok(f) => held.push(f),
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    // The cache (three quarters of the limit after a reserve of 256) gave
    // up half of its descriptors for open files.
    let cache = (LIMIT - 256) / 4 * 3;
    assert!(
        held.len() > LIMIT - cache / 2 - 128,
        "only {} files could be opened (limit {LIMIT}, cache {cache})",
        held.len()
    );
    eprintln!("{} files held open before EMFILE", held.len());
    // A second failure is not logged again.
    assert!(std::fs::File::open(d.join("f0")).is_err());
    held.clear();
    for i in 0..100 {
        std::fs::read(d.join(format!("f{i}"))).unwrap();
    }
    let log = m.daemon_log();
    let lines: Vec<_> = log.lines().filter(|l| l.contains("op=fd_limit")).collect();
    assert_eq!(lines.len(), 1, "one op=fd_limit line expected:\n{log}");
    assert!(lines[0].contains("limit=2048"), "{}", lines[0]);
    m.unmount();
}
