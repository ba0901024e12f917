//! Data re-encryption (rekey) on real mounts with the key-file provider:
//! online while writers and readers run, across a SIGKILL of the daemon
//! (the next mount resumes), pause/resume, and offline on a backing
//! directory. Each test checks every byte through the mount, that every
//! backing file's header names the new generation, and that the old
//! generation is gone from the volume header and its backups.
//!
//! Fault variants (disk full, key-server outage) are in fault_rekey.rs.

use crate::support::cli;
use crate::support::fault;
use crate::support::mount;
use crate::support::rekey::generation_counts;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cli::{kmfs, ok, text};
use fault::Daemon;
use mount::{Volume, drop_caches, pattern};

/// Plaintext size of file `i` of the test tree: empty, tiny, around unit
/// boundaries, a few tens of KiB, and a few files over one journal chunk.
fn size_of(i: usize) -> usize {
    match i % 11 {
        0 => 0,
        1 => 1 + i % 15,
        2 => 4096,
        3 => 4097 + i % 15,
        4 => 16,
        5..=8 => 1000 + (i * 7919) % 60_000,
        9 => 100_000 + i % 4096,
        _ if i % 200 == 10 => (1 << 20) + 3 * 4096 + 5,
        _ => 20_000,
    }
}

/// Names, symlinks and extended attributes of the test tree: a symlink and
/// an attribute in every directory, an attribute on every 10th file.
fn meta_of(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<(PathBuf, String)> {
    let mut m: Vec<(PathBuf, String)> = Vec::new();
    for (i, p) in files.keys().enumerate() {
        let dir = p.parent().unwrap().to_path_buf();
        if !m.iter().any(|(d, _)| *d == dir) {
            m.push((dir.clone(), format!("dir {}", dir.display())));
        }
        if i % 10 == 0 {
            m.push((p.clone(), format!("file {i}")));
        }
    }
    m.push((root.to_path_buf(), "root".into()));
    m
}

fn set_meta(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, v) in meta_of(root, files) {
        assert_eq!(
            mount::setx(&p, "user.rekey", v.as_bytes()),
            0,
            "{}",
            p.display()
        );
        if p.is_dir() && p != root {
            let l = p.join("link-to-parent");
            if !l.exists() {
                std::os::unix::fs::symlink(format!("../target of {}", p.display()), &l).unwrap();
            }
        }
    }
}

/// Every attribute and symlink target reads back (through the mount).
fn verify_meta(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) {
    for (p, v) in meta_of(root, files) {
        assert_eq!(
            mount::getx(&p, "user.rekey").map_err(|e| format!("{}: errno {e}", p.display())),
            Ok(v.into_bytes())
        );
        if p.is_dir() && p != root {
            let t = std::fs::read_link(p.join("link-to-parent")).unwrap();
            assert_eq!(t, PathBuf::from(format!("../target of {}", p.display())));
        }
    }
}

/// Writes `n` files in a small tree below `root`; returns path → content.
fn populate(root: &Path, n: usize) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..n {
        let dir = root
            .join(format!("d{}", i % 13))
            .join(format!("e{}", i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        // Every 50th name is long enough for the long-name scheme.
        let name = if i % 50 == 0 {
            format!("{}-{i}", "long".repeat(50))
        } else {
            format!("f{i}")
        };
        let data = pattern(i as u64, size_of(i));
        std::fs::write(dir.join(&name), &data).unwrap();
        files.insert(dir.join(name), data);
    }
    set_meta(root, &files);
    files
}

fn verify(files: &BTreeMap<PathBuf, Vec<u8>>, root_now: &Path, root_then: &Path) {
    for (p, want) in files {
        let p = root_now.join(p.strip_prefix(root_then).unwrap());
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(got == *want, "{} changed", p.display());
    }
}

fn header_json(backing: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(kmfs(&[&"header", &"dump", &"--json", &backing]))).unwrap()
}

fn status(mnt: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(kmfs(&[&"rekey", &"--status", &"--json", &mnt]))).unwrap()
}

fn wait_phase(mnt: &Path, want: &[&str], timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(mnt);
        if want.iter().any(|w| s["phase"] == *w) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "rekey never reached {want:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts the end state: one generation `g` in the header, in every file
/// and every directory id, no rekey state or journal left, no backup holding
/// another one, and `kmfs check` (which decrypts every name and symlink
/// target with the header's keys) finds nothing.
fn assert_all_on(vol: &Volume, g: u64) {
    let backing = &vol.backing;
    for p in mount::all_files(backing) {
        if p.file_name().is_some_and(|n| n == "kmfs.dirid") {
            let b = std::fs::read(&p).unwrap();
            let dg = if b.len() == 18 {
                u16::from_be_bytes([b[16], b[17]])
            } else {
                0
            };
            assert_eq!(dg as u64, g, "{} names are on generation {dg}", p.display());
        }
    }
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &backing]);
    assert!(
        o.status.success() && text(&o).contains("0 errors, 0 warnings, 0 leftovers"),
        "kmfs check after the rekey:\n{}",
        text(&o)
    );
    let h = header_json(backing);
    assert_eq!(h["active_generation"], g, "{h}");
    let gens: Vec<u64> = h["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, vec![g], "{h}");
    let by_gen = generation_counts(backing);
    assert_eq!(
        by_gen.keys().copied().collect::<Vec<_>>(),
        vec![g as u16],
        "{by_gen:?}"
    );
    assert!(!backing.join("kmfs.rekey").exists());
    assert!(!backing.join("kmfs.rekey.journal").exists());
    // Header backups that held generation 0 (kmfs.volume.bak before the
    // end, dated rotation backups) are gone; the plain backup is current.
    let live = std::fs::read(backing.join("kmfs.volume")).unwrap();
    for e in std::fs::read_dir(backing).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("kmfs.volume.") && name.ends_with(".bak") {
            assert_eq!(name, "kmfs.volume.bak", "backup {name} left behind");
            assert!(
                std::fs::read(e.path()).unwrap() == live,
                "stale kmfs.volume.bak"
            );
        }
    }
}

#[test]
fn rekey_while_writers_and_readers_run_then_remount() {
    let vol = Volume::create(false);
    // A KEK rotation first, so a dated header backup with generation 0 exists.
    let mut d = Daemon::mount(&vol);
    let root = vol.mnt.clone();
    let files = populate(&root, 1100);
    let new_key = vol.dir.path().join("keys/new");
    std::fs::write(&new_key, [0x5au8; 32]).unwrap();
    std::fs::set_permissions(
        &new_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    ok(kmfs(&[&"rotate-kek", &"--new-keyfile", &new_key, &root]));
    // Later mounts use the key file the volume now needs.
    std::fs::copy(&new_key, &vol.key).unwrap();
    assert_eq!(
        generation_counts(&vol.backing)
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![0]
    );

    // Foreground load: writers create, rewrite and rename their own files;
    // readers re-read the static tree. Any I/O error or mismatch fails.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let (stop, errors) = (stop.clone(), errors.clone());
        let dir = root.join(format!("w{w}"));
        std::fs::create_dir(&dir).unwrap();
        workers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 30 {
                let data = pattern(w << 32 | n, 1000 + (n as usize * 4099) % 200_000);
                let p = dir.join(format!("f{}", n % 40));
                let r = std::fs::write(&p, &data).and_then(|_| std::fs::read(&p));
                match r {
                    Ok(b) if b == data => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if n.is_multiple_of(7) {
                    let _ = std::fs::rename(&p, dir.join(format!("r{}", n % 5)));
                }
                n += 1;
            }
            n
        }));
    }
    {
        let (stop, errors) = (stop.clone(), errors.clone());
        let files = files.clone();
        let root = root.clone();
        workers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (p, want) in files.iter().step_by(17) {
                    match std::fs::read(root.join(p.strip_prefix(&root).unwrap())) {
                        Ok(b) if b == *want => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
            }
            n
        }));
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = ok(kmfs(&[&"rekey", &"--cpu", &"100", &root]));
    assert!(started.contains("key generation 1"), "{started}");
    // A second start while it runs only changes the throttle.
    ok(kmfs(&[&"rekey", &"--cpu", &"100", &root]));
    let done = wait_phase(&root, &["done"], Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert!(w.join().unwrap() > 0);
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "I/O errors or mismatches during the rekey"
    );
    assert!(done["files_done"].as_u64().unwrap() >= 1000, "{done}");
    assert_eq!(done["files_skipped"], 0);
    verify(&files, &root, &root);
    let st: serde_json::Value =
        serde_json::from_str(&ok(kmfs(&[&"status", &"--json", &root]))).unwrap();
    assert_eq!(st["key_generations"], serde_json::json!([1]));
    assert_eq!(st["io"]["errors"], 0);
    let audit = d.log_text();
    assert!(!audit.contains("panicked"), "{audit}");
    d.unmount();
    assert_all_on(&vol, 1);
    // Remount: only generation 1 exists, every byte still reads back.
    let mut d = Daemon::mount(&vol);
    verify(&files, &root, &root);
    verify_meta(&root, &files);
    d.unmount();
}

#[test]
fn sigkill_mid_rekey_resumes_at_the_next_mount_and_pause_survives_it() {
    let vol = Volume::create(false);
    let mut d = Daemon::mount(&vol);
    let root = vol.mnt.clone();
    let files = populate(&root, 400);
    // Slow enough to be caught in the middle.
    ok(kmfs(&[&"rekey", &"--rate", &"1", &root]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&root);
        if s["files_done"].as_u64().unwrap_or(0) >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill9();
    let mid = generation_counts(&vol.backing);
    assert!(mid.contains_key(&0) && mid.contains_key(&1), "{mid:?}");
    assert!(vol.backing.join("kmfs.rekey").exists());

    // The next mount resumes by itself; pause it, remount, still paused.
    let mut d = Daemon::mount(&vol);
    verify(&files, &root, &root);
    let s = ok(kmfs(&[&"rekey", &"--pause", &"--json", &root]));
    assert!(
        s.contains("\"paused\"") || s.contains("\"running\"") || s.contains("\"scanning\""),
        "{s}"
    );
    wait_phase(&root, &["paused"], Duration::from_secs(20));
    d.unmount();
    let mut d = Daemon::mount(&vol);
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&root);
    assert_eq!(s["phase"], "paused", "{s}");
    let before = s["files_done"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        status(&root)["files_done"].as_u64().unwrap(),
        before,
        "paused but moving"
    );
    // Resume at full speed and finish.
    ok(kmfs(&[&"rekey", &"--resume", &root]));
    ok(kmfs(&[
        &"rekey", &"--rate", &"1000", &"--cpu", &"100", &root,
    ]));
    let out = ok(kmfs(&[&"rekey", &"--status", &"--wait", &root]));
    assert!(out.contains("done"), "{out}");
    verify(&files, &root, &root);
    d.unmount();
    assert_all_on(&vol, 1);
    let d = Daemon::mount(&vol);
    verify(&files, &root, &root);
    verify_meta(&root, &files);
    drop(d);
}

/// Reads `path` through the mount (cache dropped first).
fn read_cold(path: &Path) -> Vec<u8> {
    drop_caches();
    std::fs::read(path).unwrap()
}

/// A large file is re-encrypted in batches: in between, it is served split
/// between the two generations. While a slow rekey is half way through it,
/// it reads back intact, takes writes below and above the frontier and an
/// append; a pause mid-file survives an unmount (the journal keeps the
/// frontier) and the next mount finishes the file before serving it; the
/// end state is clean and every byte is what was written.
#[test]
fn a_large_file_is_served_while_it_is_rekeyed() {
    use std::os::unix::fs::FileExt;
    let vol = Volume::create(false);
    let mut d = Daemon::mount(&vol);
    let root = vol.mnt.clone();
    let big = root.join("big.img");
    let mut model = pattern(11, 24 << 20);
    std::fs::write(&big, &model).unwrap();
    std::fs::write(root.join("small"), b"small file").unwrap();
    let total = model.len() as u64;

    ok(kmfs(&[&"rekey", &"--rate", &"1", &root]));
    // Wait until the rekey is inside the big file: some of its bytes done,
    // most not (at 1 MB/s that lasts about 20 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&root);
        let done = s["bytes_done"].as_u64().unwrap_or(0);
        if done >= 2 << 20 && done < total / 2 {
            break;
        }
        assert!(
            done < total / 2 && Instant::now() < deadline,
            "never caught half way through the big file: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let big_backing = mount::all_files(&vol.backing)
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 20 << 20)
        .unwrap();
    let generation_of_big = || {
        let b = std::fs::read(&big_backing).unwrap();
        u16::from_be_bytes([b[6], b[7]])
    };
    assert_eq!(
        generation_of_big(),
        0,
        "the header names generation 0 while the file is split"
    );
    assert!(read_cold(&big) == model, "read while split");
    // Writes below the frontier, far above it, and an append.
    let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
    for (off, len, byte) in [
        (100u64, 9000usize, 0xa1u8),
        (20 << 20, 70_000, 0xb2),
        (total, 5000, 0xc3),
    ] {
        let patch = vec![byte; len];
        f.write_all_at(&patch, off).unwrap();
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&patch);
    }
    f.sync_all().unwrap();
    drop(f);
    assert!(read_cold(&big) == model, "read after writes while split");
    let s = status(&root);
    assert!(
        s["bytes_done"].as_u64().unwrap() < total / 2,
        "the rekey was not half way through the file any more: {s}"
    );

    // Concurrently, with the frontier moving (3 MB/s): a writer writes at
    // random places in the first 16 MiB (across the frontier as it goes
    // by), a reader re-reads the last 8 MiB cold and compares.
    ok(kmfs(&[&"rekey", &"--rate", &"3", &root]));
    let before = status(&root)["bytes_done"].as_u64().unwrap();
    let shared = Arc::new(std::sync::Mutex::new(model));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (shared, stop, big) = (shared.clone(), stop.clone(), big.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % ((16 << 20) - 65536)) as usize;
                let len = 1 + (x >> 40) as usize % 65536;
                let patch = vec![(x >> 32) as u8; len];
                let mut m = shared.lock().unwrap();
                f.write_all_at(&patch, off as u64).unwrap();
                m[off..off + len].copy_from_slice(&patch);
                n += 1;
            }
            n
        })
    };
    let reader = {
        let (stop, big) = (stop.clone(), big.clone());
        let tail = shared.lock().unwrap()[16 << 20..24 << 20].to_vec();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                let f = std::fs::File::open(&big).unwrap();
                // SAFETY: plain integer arguments on a descriptor we own.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                let mut buf = vec![0u8; 8 << 20];
                f.read_exact_at(&mut buf, 16 << 20).unwrap();
                assert!(buf == tail, "the untouched last 8 MiB changed while split");
                rounds += 1;
            }
            rounds
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (writes, reads) = (writer.join().unwrap(), reader.join().unwrap());
    assert!(writes > 10 && reads > 2, "{writes} writes, {reads} reads");
    let model = Arc::try_unwrap(shared).unwrap().into_inner().unwrap();
    let s = status(&root);
    let done = s["bytes_done"].as_u64().unwrap();
    assert!(
        done > before && done < total,
        "the frontier should have moved during the stress, not finished: {before} -> {s}"
    );
    std::fs::File::open(&big).unwrap().sync_all().unwrap();
    assert!(
        read_cold(&big) == model,
        "read after concurrent writes while split"
    );

    // Pause half way, unmount: the frontier is in the journal; the next
    // mount finishes the file before it serves it.
    ok(kmfs(&[&"rekey", &"--pause", &root]));
    wait_phase(&root, &["paused"], Duration::from_secs(20));
    d.unmount();
    assert!(vol.backing.join("kmfs.rekey.journal").exists());
    assert_eq!(generation_of_big(), 0);
    let mut d = Daemon::mount(&vol);
    assert_eq!(generation_of_big(), 1, "the mount finished the file first");
    assert!(read_cold(&big) == model, "read after the remount");
    assert_eq!(std::fs::read(root.join("small")).unwrap(), b"small file");
    // Full speed first (still paused: this only changes the throttle), then
    // resume; the other order could start a second rekey if this one ended
    // in between.
    ok(kmfs(&[
        &"rekey", &"--rate", &"1000", &"--cpu", &"100", &root,
    ]));
    assert_eq!(status(&root)["phase"], "paused");
    ok(kmfs(&[&"rekey", &"--resume", &root]));
    let out = ok(kmfs(&[&"rekey", &"--status", &"--wait", &root]));
    assert!(out.contains("done"), "{out}");
    d.unmount();
    assert_all_on(&vol, 1);
    let d = Daemon::mount(&vol);
    assert!(read_cold(&big) == model, "read after the rekey");
    drop(d);
}

#[test]
fn offline_rekey_twice_and_bad_requests() {
    let vol = Volume::create(true);
    let d = Daemon::mount(&vol);
    let root = vol.mnt.clone();
    let files = populate(&root, 150);
    // Nothing to pause while no rekey runs.
    let o = kmfs(&[&"rekey", &"--pause", &root]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no rekey is in progress"), "{}", text(&o));
    drop(d);
    // Offline needs the key; without it, a clear error.
    let o = kmfs(&[&"rekey", &vol.backing]);
    assert!(!o.status.success());
    let old_hdr = vol.dir.path().join("before-rekey.hdr");
    ok(kmfs(&[&"header", &"backup", &vol.backing, &old_hdr]));
    for g in 1..=2u64 {
        let out = ok(kmfs(&[
            &"rekey",
            &"--keyfile",
            &vol.key,
            &"--json",
            &vol.backing,
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["phase"], "done", "{v}");
        assert_eq!(v["target_generation"], g);
        assert_all_on(&vol, g);
    }
    // A header from before the rekey would leave every file unreadable.
    let o = kmfs(&[
        &"header",
        &"restore",
        &"--keyfile",
        &vol.key,
        &vol.backing,
        &old_hdr,
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("lacks key generation 2"), "{}", text(&o));
    let mut d = Daemon::mount(&vol);
    verify(&files, &root, &root);
    verify_meta(&root, &files);
    std::fs::write(root.join("after"), b"written on generation 2").unwrap();
    d.unmount();
    assert_eq!(
        generation_counts(&vol.backing)
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![2]
    );
}
