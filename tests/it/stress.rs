//! Load: many concurrent processes and threads doing mixed operations on one
//! mount for a bounded time, then: zero data errors, the daemon still alive
//! and unmounting cleanly, its peak RSS (VmHWM) reported and below a generous
//! bound, and every file the model knows reading back right after a remount.
//!
//! Running at the same time:
//! * fio (2 jobs × 2 processes) with `verify=crc32c`, `verify_fatal=1`,
//!   unaligned block sizes 512 B..256 KiB, random writes then verification;
//! * stress-ng (if installed; Debian package stress-ng) with file-system
//!   stressors: hdd with verify, dir, rename, dentry, filename, fallocate,
//!   readahead, lockf, xattr, fstat;
//! * 6 threads of our own, each with a reference model of its directory:
//!   create / overwrite at random offsets / append / truncate / rename /
//!   unlink / hard link / symlink / mkdir / xattr / readdir, every read
//!   compared with the model.
//!
//! The CI run lasts about 20 s; `KMFS_LONG_TESTS=1` runs 300 s
//! (`KMFS_STRESS_SECS=N` for N seconds).

use crate::support::fault;
use crate::support::mount;
use crate::support::rng::Rng;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fault::Daemon;
use mount::{Volume, pattern};

/// Peak RSS the daemon may reach (generous: it keeps no data cache; the
/// kernel's page cache is not counted).
const RSS_LIMIT_KIB: u64 = 512 * 1024;

fn secs() -> u64 {
    std::env::var("KMFS_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if fault::long_tests() { 300 } else { 20 })
}

/// One of our own workers: random operations on its directory, checked
/// against a model (file name → content).
fn worker(dir: PathBuf, seed: u64, until: Instant) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut rng = Rng(seed | 1);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let ctx = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let mut ops = 0u64;
    while Instant::now() < until {
        ops += 1;
        let name = format!("f{}", rng.below(24));
        let p = dir.join(&name);
        match rng.below(12) {
            0 | 1 => {
                let data = pattern(rng.next(), rng.below(300_000) as usize);
                std::fs::write(&p, &data).map_err(|e| ctx("write", &p, e))?;
                model.insert(name, data);
            }
            2 | 3 => {
                if let Some(cur) = model.get_mut(&name) {
                    let off = rng.below(cur.len() as u64 + 5000);
                    let data = pattern(rng.next(), 1 + rng.below(70_000) as usize);
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .map_err(|e| ctx("open", &p, e))?;
                    f.write_all_at(&data, off)
                        .map_err(|e| ctx("pwrite", &p, e))?;
                    let end = off as usize + data.len();
                    if cur.len() < end {
                        cur.resize(end, 0);
                    }
                    cur[off as usize..end].copy_from_slice(&data);
                }
            }
            4 => {
                if let Some(cur) = model.get_mut(&name) {
                    let data = pattern(rng.next(), rng.below(9000) as usize);
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&p)
                        .map_err(|e| ctx("open", &p, e))?;
                    f.write_all(&data).map_err(|e| ctx("append", &p, e))?;
                    cur.extend_from_slice(&data);
                }
            }
            5 => {
                if let Some(cur) = model.get_mut(&name) {
                    let n = rng.below(cur.len() as u64 * 2 + 100) as usize;
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .map_err(|e| ctx("open", &p, e))?;
                    f.set_len(n as u64).map_err(|e| ctx("truncate", &p, e))?;
                    cur.resize(n, 0);
                }
            }
            6 => {
                let to = format!("f{}", rng.below(24));
                if model.contains_key(&name) && to != name {
                    std::fs::rename(&p, dir.join(&to)).map_err(|e| ctx("rename", &p, e))?;
                    let v = model.remove(&name).unwrap();
                    model.insert(to, v);
                }
            }
            7 => {
                if model.remove(&name).is_some() {
                    std::fs::remove_file(&p).map_err(|e| ctx("unlink", &p, e))?;
                }
            }
            8 => {
                // A hard link and a symlink, read through both, then removed.
                if model.contains_key(&name) {
                    let l = dir.join("link");
                    let s = dir.join("sym");
                    std::fs::hard_link(&p, &l).map_err(|e| ctx("link", &p, e))?;
                    std::os::unix::fs::symlink(&name, &s).map_err(|e| ctx("symlink", &p, e))?;
                    for q in [&l, &s] {
                        let got = std::fs::read(q).map_err(|e| ctx("read", q, e))?;
                        if got != model[&name] {
                            return Err(format!("{} differs from {name}", q.display()));
                        }
                    }
                    std::fs::remove_file(&l).map_err(|e| ctx("unlink", &l, e))?;
                    std::fs::remove_file(&s).map_err(|e| ctx("unlink", &s, e))?;
                }
            }
            9 => {
                let d = dir.join("sub");
                std::fs::create_dir(&d).map_err(|e| ctx("mkdir", &d, e))?;
                let x = d.join(format!("x{}", rng.below(1000)));
                std::fs::write(&x, b"x").map_err(|e| ctx("write", &x, e))?;
                std::fs::remove_file(&x).map_err(|e| ctx("unlink", &x, e))?;
                std::fs::remove_dir(&d).map_err(|e| ctx("rmdir", &d, e))?;
            }
            10 => {
                if model.contains_key(&name) {
                    let v = pattern(rng.next(), rng.below(300) as usize);
                    xattr_roundtrip(&p, &v)?;
                }
            }
            _ => {
                let mut names: Vec<String> = std::fs::read_dir(&dir)
                    .map_err(|e| ctx("readdir", &dir, e))?
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                let want: Vec<&String> = model.keys().collect();
                if names.iter().collect::<Vec<_>>() != want {
                    return Err(format!(
                        "{}: listing {names:?} != model {want:?}",
                        dir.display()
                    ));
                }
            }
        }
        // Read back something after every operation.
        if let Some((n, want)) = model.iter().nth(rng.below(model.len() as u64) as usize) {
            let q = dir.join(n);
            let mut f = std::fs::File::open(&q).map_err(|e| ctx("open", &q, e))?;
            let mut got = Vec::new();
            f.read_to_end(&mut got).map_err(|e| ctx("read", &q, e))?;
            if &got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b);
                return Err(format!(
                    "{}: content differs (size {} vs {}, first difference {i:?}) after {ops} operations",
                    q.display(),
                    got.len(),
                    want.len()
                ));
            }
            if want.len() > 10 {
                let off = rng.below(want.len() as u64);
                f.seek(SeekFrom::Start(off)).unwrap();
                let mut b = [0u8; 1];
                f.read_exact(&mut b).map_err(|e| ctx("read", &q, e))?;
                if b[0] != want[off as usize] {
                    return Err(format!("{}: byte {off} differs", q.display()));
                }
            }
        }
    }
    Ok(model)
}

fn xattr_roundtrip(p: &Path, v: &[u8]) -> Result<(), String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = c"user.stress";
    // SAFETY: valid C strings and buffers.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r != 0 {
        return Err(format!(
            "setxattr {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    let mut buf = vec![0u8; 400];
    // SAFETY: as above.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 || &buf[..n as usize] != v {
        return Err(format!("getxattr {}: {n}", p.display()));
    }
    Ok(())
}

#[test]
fn mixed_load_from_many_processes() {
    let secs = secs();
    let vol = Volume::create(false);
    let mut d = Daemon::mount(&vol);
    let m = vol.mnt.clone();
    let until = Instant::now() + Duration::from_secs(secs);

    // fio with verification (its own processes).
    std::fs::create_dir(m.join("fio")).unwrap();
    let fio = Command::new("fio")
        .args([
            "--output-format=terse",
            "--ioengine=psync",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No verify-state files in the current directory.
            "--verify_state_save=0",
            "--bs_unaligned=1",
            "--bsrange=512-256k",
        ])
        .arg(format!("--directory={}", m.join("fio").display()))
        .arg(format!("--runtime={}", secs.saturating_sub(5).max(5)))
        .args([
            "--name=randw",
            "--rw=randwrite",
            "--size=24m",
            "--numjobs=2",
            "--fsync=7",
            "--name=seqw",
            "--rw=write",
            "--size=48m",
            "--numjobs=2",
            "--verify=sha256",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio is installed (Debian package fio)");

    // stress-ng's file-system stressors, if installed.
    let sng_dir = m.join("stress-ng");
    std::fs::create_dir(&sng_dir).unwrap();
    let sng = Command::new("stress-ng")
        .arg("--temp-path")
        .arg(&sng_dir)
        .args([
            "--hdd",
            "2",
            "--hdd-bytes",
            "8m",
            "--hdd-opts",
            "wr-rnd,rd-rnd",
            "--dir",
            "1",
            "--rename",
            "1",
            "--dentry",
            "1",
            "--filename",
            "1",
            "--fallocate",
            "1",
            "--readahead",
            "1",
            "--lockf",
            "1",
            "--xattr",
            "1",
            "--fstat",
            "1",
            "--verify",
            "--metrics-brief",
        ])
        .arg("--timeout")
        .arg(format!("{}s", secs.saturating_sub(3).max(3)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| eprintln!("note: stress-ng not run ({e}); apt-get install stress-ng"))
        .ok();

    // Our own workers.
    let workers: Vec<_> = (0..6u64)
        .map(|w| {
            let dir = m.join(format!("w{w}"));
            std::thread::spawn(move || (dir.clone(), worker(dir, 0x5eed + w * 7777, until)))
        })
        .collect();

    // Sample the daemon while the load runs.
    let mut peak = 0;
    while Instant::now() < until {
        assert!(d.alive(), "daemon died under load:\n{}", d.log_text());
        peak = peak.max(d.peak_rss_kib().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut models = Vec::new();
    let mut errors = Vec::new();
    for h in workers {
        let (dir, r) = h.join().expect("worker panicked");
        match r {
            Ok(model) => models.push((dir, model)),
            Err(e) => errors.push(e),
        }
    }
    let fio = fio.wait_with_output().unwrap();
    if !fio.status.success() {
        errors.push(format!(
            "fio failed ({}):\n{}\n{}",
            fio.status,
            String::from_utf8_lossy(&fio.stdout),
            String::from_utf8_lossy(&fio.stderr)
        ));
    }
    if let Some(s) = sng {
        let out = s.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("fail:") {
            errors.push(format!("stress-ng failed ({}):\n{text}", out.status));
        }
    }
    assert!(d.alive(), "daemon died under load:\n{}", d.log_text());
    peak = peak.max(d.peak_rss_kib().unwrap_or(0));
    let status = Command::new(mount::KMFS)
        .args(["status", "--json"])
        .arg(&m)
        .output()
        .unwrap();
    let io: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    eprintln!(
        "stress: {secs} s, daemon peak RSS {} MiB, io {}",
        peak / 1024,
        io["io"]
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        peak > 0 && peak < RSS_LIMIT_KIB,
        "daemon peak RSS {peak} KiB (limit {RSS_LIMIT_KIB})"
    );

    // Clean unmount, remount: the models still hold.
    let st = d.unmount();
    assert!(st.is_some_and(|s| s.success()), "{}", d.log_text());
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    let mut d = Daemon::mount(&vol);
    for (dir, model) in &models {
        for (name, want) in model {
            let got = std::fs::read(dir.join(name)).unwrap();
            assert!(
                &got == want,
                "{}/{name} differs after remount",
                dir.display()
            );
        }
    }
    d.unmount();
}

/// SEEK_DATA / SEEK_HOLE on a file with written data the kernel has not yet
/// sent to the daemon (writeback cache). stress-ng's seek stressor found that
/// the daemon answers from the backing file alone: ENXIO (no data) for a file
/// whose data is still in the kernel's page cache — a copy tool using
/// SEEK_DATA would skip that data.
#[test]
fn seek_data_sees_unflushed_writes() {
    use std::os::fd::AsRawFd;
    let vol = Volume::create(false);
    let _d = Daemon::mount(&vol);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(vol.mnt.join("f"))
        .unwrap();
    f.write_all_at(&[7u8; 512], 5 << 20).unwrap();
    // SAFETY: lseek on an open descriptor.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    let err = std::io::Error::last_os_error();
    assert!(
        (0..=(5 << 20)).contains(&data),
        "SEEK_DATA = {data} ({err})"
    );
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 5 << 20, libc::SEEK_HOLE) };
    assert!(hole >= (5 << 20) + 512, "SEEK_HOLE = {hole}");
}
