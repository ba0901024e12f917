//! fallocate(2) through a real mount (issue 16): punching holes and zeroing
//! ranges inside one unit, across units, over whole units (the backing file
//! gives the space back) and at the end of a file; zero range extending the
//! size or not; the modes kmfs refuses (collapse, insert); a backing
//! filesystem that cannot punch (ramfs) answering EOPNOTSUPP with the file
//! unchanged; and util-linux's `fallocate -p` / `--dig-holes` as a user
//! would run them. The volumes use plaintext names so that the backing file
//! of `mnt/NAME` is `back/NAME`; the backing directory lives on the test
//! machine's temporary directory (ext4 here) unless a test mounts another
//! filesystem over it.

use crate::support::cli::{kmfs, ok};
use crate::support::mount::{Mounted, Volume, drop_caches, pattern};
use crate::support::rekey::backing_generations;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// fallocate(2) on `f`; the errno on failure.
fn falloc(f: &File, mode: i32, off: u64, len: u64) -> Result<(), i32> {
    // SAFETY: plain integer arguments on a descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    }
}

fn rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// A file of `len` pattern bytes at `p`, returned with its contents.
fn filled(p: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(seed, len);
    fs::write(p, &data).unwrap();
    data
}

/// Applies fallocate to both the file in the mount and the model; the file
/// must then read back as the model (through a fresh descriptor and through
/// `f`) with the model's size.
fn check(f: &File, p: &Path, model: &mut Vec<u8>, mode: i32, off: u64, len: u64) {
    falloc(f, mode, off, len).unwrap_or_else(|e| panic!("fallocate {mode:#x} {off}+{len}: {e}"));
    let end = (off + len) as usize;
    if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > model.len() {
        model.resize(end, 0);
    }
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
        let e = end.min(model.len());
        if (off as usize) < e {
            model[off as usize..e].fill(0);
        }
    }
    let what = format!("after fallocate {mode:#x} {off}+{len}");
    assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "{what}");
    let mut got = vec![0u8; model.len() + 100];
    let n = f.read_at(&mut got, 0).unwrap();
    assert!(got[..n] == model[..], "{what}: read through the same fd");
    assert!(
        fs::read(p).unwrap() == *model,
        "{what}: read through a new fd"
    );
    // And from kmfs, not the kernel's page cache.
    f.sync_all().unwrap();
    drop_caches();
    assert!(
        fs::read(p).unwrap() == *model,
        "{what}: read with a cold cache"
    );
}

/// Backing blocks (st_blocks, 512-byte units) of `mnt/name` after an fsync.
fn backing_blocks(m: &Mounted, f: &File, name: &str) -> u64 {
    f.sync_all().unwrap();
    fs::metadata(m.backing().join(name)).unwrap().blocks()
}

/// The same sequence of punches and zeroings on a mount with and without the
/// kernel's writeback cache: inside one unit, across units, at the edges of
/// units, over a merged tail unit (4096 + 1–15 bytes), at and past EOF, and
/// on a tiny file (< 16 bytes).
fn punch_and_zero_sequence(m: &Mounted) {
    // 5 units, the last one merged with a 9-byte remainder (4105 bytes).
    let p = m.p("seq");
    let mut model = filled(&p, 4 * 4096 + 4096 + 9, 1);
    let f = rw(&p);
    check(&f, &p, &mut model, PUNCH, 5000, 100); // middle of unit 1
    check(&f, &p, &mut model, PUNCH, 3000, 6000); // units 0..=2, no whole one
    check(&f, &p, &mut model, PUNCH, 4096, 4096); // exactly unit 1
    check(&f, &p, &mut model, ZERO_KEEP, 8191, 2); // across a unit boundary
    check(&f, &p, &mut model, PUNCH, 16384 + 4100, 2); // inside the stolen tail
    check(&f, &p, &mut model, PUNCH, 16384 + 4104, 1); // the last byte
    check(&f, &p, &mut model, PUNCH, 16384, 50_000); // the merged unit whole, past EOF
    check(&f, &p, &mut model, PUNCH, 100_000, 4096); // entirely past EOF
    check(&f, &p, &mut model, ZERO_KEEP, 100_000, 4096); // idem, keeps the size
    // Data written after a punch still lands where it should.
    f.write_all_at(b"after", 4096 + 17).unwrap();
    model[4096 + 17..4096 + 22].copy_from_slice(b"after");
    check(&f, &p, &mut model, ZERO_KEEP, 4096 + 18, 1);

    // Punch and zero range change mtime and ctime, as writes do.
    for (mode, off, len) in [(PUNCH, 4096, 8192), (ZERO_KEEP, 10, 5), (ZERO, 30_000, 10)] {
        let before = fs::metadata(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        check(&f, &p, &mut model, mode, off, len);
        let after = fs::metadata(&p).unwrap();
        let t = |m: &fs::Metadata| (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
        let (b, a) = (t(&before), t(&after));
        assert!(
            (a.0, a.1) > (b.0, b.1),
            "mode {mode:#x}: mtime {b:?} -> {a:?}"
        );
        assert!(
            (a.2, a.3) > (b.2, b.3),
            "mode {mode:#x}: ctime {b:?} -> {a:?}"
        );
    }

    // Zero range extending the size: from inside the file and from past EOF.
    let p = m.p("grow");
    let mut model = filled(&p, 5000, 2);
    let f = rw(&p);
    check(&f, &p, &mut model, ZERO, 3000, 10_000);
    check(&f, &p, &mut model, ZERO, 20_000, 3); // hole in between, odd size
    check(&f, &p, &mut model, ZERO, 20_001, 8192 + 13);
    f.write_all_at(b"tail", 20_010).unwrap();
    model[20_010..20_014].copy_from_slice(b"tail");
    check(&f, &p, &mut model, ZERO_KEEP, 20_012, 100_000);
    check(&f, &p, &mut model, ZERO, 0, 1);

    // Tiny files: the 1–15 byte unit is rewritten, never a hole.
    let p = m.p("tiny");
    let mut model = filled(&p, 10, 3);
    let f = rw(&p);
    check(&f, &p, &mut model, PUNCH, 2, 3);
    check(&f, &p, &mut model, ZERO_KEEP, 9, 100);
    check(&f, &p, &mut model, ZERO, 12, 2); // still tiny (14 bytes)
    check(&f, &p, &mut model, ZERO, 14, 2); // 16 bytes: one ordinary unit
    check(&f, &p, &mut model, PUNCH, 0, 16);

    // An empty file: nothing to punch; zero range makes it that long.
    let p = m.p("empty");
    let mut model = Vec::new();
    File::create(&p).unwrap();
    let f = rw(&p);
    check(&f, &p, &mut model, PUNCH, 0, 4096);
    check(&f, &p, &mut model, ZERO_KEEP, 0, 4096);
    assert_eq!(f.metadata().unwrap().len(), 0);
    check(&f, &p, &mut model, ZERO, 100, 5000);
}

#[test]
fn punch_and_zero_range_with_writeback_cache() {
    let m = Volume::create(true).mount();
    punch_and_zero_sequence(&m);
    // Pages still dirty in the kernel (written, not flushed) are punched too.
    let p = m.p("dirty");
    let mut model = filled(&p, 3 * 4096, 4);
    let f = rw(&p);
    f.write_all_at(&[0xaa; 4096], 4096).unwrap();
    model[4096..8192].fill(0xaa);
    check(&f, &p, &mut model, PUNCH, 4000, 200);
    check(&f, &p, &mut model, ZERO_KEEP, 8000, 300);
}

#[test]
fn punch_and_zero_range_without_writeback_cache() {
    let m = Volume::create(true).mount_with(&["-o", "no_writeback"]);
    punch_and_zero_sequence(&m);
}

/// Whole units punched are given back by the backing file (its st_blocks
/// drops); a zero range over whole units keeps them allocated, as on ext4.
#[test]
fn punching_whole_units_frees_backing_space() {
    let m = Volume::create(true).mount();
    let p = m.p("big");
    let mut model = filled(&p, 256 * 4096, 5);
    let f = rw(&p);
    let before = backing_blocks(&m, &f, "big");
    assert!(before * 512 >= 256 * 4096, "{before} blocks before");
    // Units 10..200 whole, plus parts of units 9 and 200.
    check(&f, &p, &mut model, PUNCH, 9 * 4096 + 1, 191 * 4096);
    let after = backing_blocks(&m, &f, "big");
    assert!(
        (before - after) * 512 >= 189 * 4096,
        "190 whole units punched: backing st_blocks {before} -> {after}"
    );
    // Zero range: zeros, but the space stays (or becomes) allocated.
    check(&f, &p, &mut model, ZERO_KEEP, 20 * 4096, 100 * 4096);
    let zeroed = backing_blocks(&m, &f, "big");
    assert!(
        zeroed >= after + 99 * 8,
        "zero range allocates: backing st_blocks {after} -> {zeroed}"
    );
    // The backing file holds no plaintext zeros where data was: the edges
    // are ciphertext, the released units all-zero ciphertext.
    let back = fs::read(m.backing().join("big")).unwrap();
    assert_eq!(back.len(), 40 + model.len());
    assert!(back[40 + 10 * 4096..40 + 20 * 4096].iter().all(|&b| b == 0));
    assert!(back[40 + 9 * 4096..40 + 10 * 4096].iter().any(|&b| b != 0));
    drop(f);
    // Still the same after a remount (no cached state involved).
    let m = m.unmount().mount();
    assert!(fs::read(m.p("big")).unwrap() == model);
    // SEEK_HOLE (no writer open, so kmfs answers from the backing file's
    // holes) finds the punched units (on 4 KiB backing blocks, the first
    // block wholly inside them starts 40 bytes before unit 11).
    let g = File::open(m.p("big")).unwrap();
    // SAFETY: lseek on a descriptor we own.
    let h = unsafe { libc::lseek(g.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(
        (9 * 4096 + 1..200 * 4096).contains(&h),
        "SEEK_HOLE from 0 gave {h}"
    );
}

/// COLLAPSE_RANGE and INSERT_RANGE (the kernel's FUSE module refuses them
/// before kmfs sees them), PUNCH_HOLE without KEEP_SIZE and a zero length
/// fail without touching the file.
#[test]
fn unsupported_modes_leave_the_file_alone() {
    let m = Volume::create(true).mount();
    let p = m.p("f");
    let model = filled(&p, 8 * 4096, 6);
    let f = rw(&p);
    for (mode, want) in [
        (libc::FALLOC_FL_COLLAPSE_RANGE, libc::EOPNOTSUPP),
        (libc::FALLOC_FL_INSERT_RANGE, libc::EOPNOTSUPP),
        (libc::FALLOC_FL_PUNCH_HOLE, libc::EOPNOTSUPP),
        (
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE,
            libc::EOPNOTSUPP,
        ),
    ] {
        assert_eq!(falloc(&f, mode, 4096, 4096), Err(want), "mode {mode:#x}");
    }
    assert_eq!(falloc(&f, PUNCH, 0, 0), Err(libc::EINVAL));
    assert!(fs::read(&p).unwrap() == model);
}

/// A ramfs, mounted over a directory with what it held copied in; unmounted
/// on drop (after the kmfs mount above it, which is declared later).
struct Ramfs(PathBuf);

impl Ramfs {
    fn over(path: &Path) -> Ramfs {
        let saved = path.with_extension("saved");
        assert!(
            Command::new("cp")
                .arg("-a")
                .arg(path)
                .arg(&saved)
                .status()
                .unwrap()
                .success()
        );
        let st = Command::new("mount")
            .args(["-t", "ramfs", "-o", "mode=0700", "kmfs-test-ramfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t ramfs failed (tests run as root)");
        let st = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
        Ramfs(path.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// On a backing filesystem without hole punching (ramfs has no fallocate at
/// all) punch and zero range answer EOPNOTSUPP and change nothing, also
/// where only partial units (which kmfs could rewrite) are involved and
/// where a zero range would have extended the file.
#[test]
fn backing_without_punch_gives_eopnotsupp_and_no_damage() {
    let vol = Volume::create(true);
    let _ramfs = Ramfs::over(&vol.backing);
    let m = vol.mount();
    let p = m.p("f");
    let model = filled(&p, 5 * 4096 + 100, 7);
    let f = rw(&p);
    for (mode, off, len) in [
        (PUNCH, 4096, 8192),
        (PUNCH, 100, 10),
        (ZERO_KEEP, 4096, 8192),
        (ZERO_KEEP, 100, 10),
        (ZERO, 4096, 100_000),
        (ZERO, 100, 10),
    ] {
        assert_eq!(
            falloc(&f, mode, off, len),
            Err(libc::EOPNOTSUPP),
            "mode {mode:#x} {off}+{len}"
        );
        assert_eq!(f.metadata().unwrap().len(), model.len() as u64);
        assert!(fs::read(&p).unwrap() == model, "mode {mode:#x} {off}+{len}");
    }
    // Plain allocation still works (a backing filesystem without fallocate
    // is let through: the size grows, the data stays).
    assert_eq!(falloc(&f, 0, 0, 40_000), Ok(()));
    assert_eq!(f.metadata().unwrap().len(), 40_000);
    drop(f);
    let m = m.unmount().mount();
    let got = fs::read(m.p("f")).unwrap();
    assert!(got[..model.len()] == model[..] && got[model.len()..].iter().all(|&b| b == 0));
}

/// util-linux's fallocate through the mount: `-p` punches, `--dig-holes`
/// finds the zero runs and punches them (the contents stay the same, the
/// backing file shrinks).
#[test]
fn util_linux_fallocate_punch_and_dig_holes() {
    let m = Volume::create(true).mount();
    let p = m.p("u");
    let mut model = pattern(8, 512 * 1024);
    model[64 * 1024..448 * 1024].fill(0);
    fs::write(&p, &model).unwrap();
    let f = rw(&p);
    let before = backing_blocks(&m, &f, "u");
    let st = Command::new("fallocate")
        .arg("--dig-holes")
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success(), "fallocate --dig-holes");
    assert!(
        fs::read(&p).unwrap() == model,
        "--dig-holes changed the contents"
    );
    let after = backing_blocks(&m, &f, "u");
    assert!(
        (before - after) * 512 >= 300 * 1024,
        "--dig-holes freed too little: backing st_blocks {before} -> {after}"
    );
    let st = Command::new("fallocate")
        .args(["-p", "-o", "1000", "-l", "20000"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success(), "fallocate -p");
    model[1000..21_000].fill(0);
    assert!(fs::read(&p).unwrap() == model);
    assert_eq!(fs::metadata(&p).unwrap().len(), model.len() as u64);
}

fn rekey_status(mnt: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(kmfs(&[&"rekey", &"--status", &"--json", &mnt]))).unwrap()
}

/// The DEK generation the header of the volume's one user file names.
fn generation(m: &Mounted) -> u16 {
    let g = backing_generations(m.backing());
    assert_eq!(g.len(), 1, "{g:?}");
    g[0].1
}

/// While a paused rekey has a file split at its frontier (units below it on
/// the new key, above on the old), punches and zero ranges below, across
/// and above the frontier re-encrypt their edge units with the right key:
/// the file reads back right then, after the rekey finished, and after a
/// remount.
#[test]
fn punch_and_zero_while_a_rekey_has_the_file_split() {
    use std::time::{Duration, Instant};
    let m = Volume::create(true).mount();
    let mnt = m.mnt().to_path_buf();
    let p = m.p("big");
    let total = 8usize << 20;
    let mut model = filled(&p, total, 9);
    ok(kmfs(&[&"rekey", &"--rate", &"1", &mnt]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while rekey_status(&mnt)["bytes_done"].as_u64().unwrap_or(0) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "the rekey never started on the file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(kmfs(&[&"rekey", &"--pause", &mnt]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let s = rekey_status(&mnt);
        if s["phase"] == "paused" {
            break s["bytes_done"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "never paused: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        done < total as u64 * 3 / 4,
        "paused too late: {done} bytes done"
    );
    assert_eq!(generation(&m), 0, "the file is split");
    let f = rw(&p);
    check(&f, &p, &mut model, PUNCH, 1000, 300_000);
    check(&f, &p, &mut model, ZERO_KEEP, done - 50_001, 100_003);
    check(
        &f,
        &p,
        &mut model,
        PUNCH,
        done - 4096 * 3 - 5,
        4096 * 6 + 10,
    );
    check(&f, &p, &mut model, PUNCH, done + (1 << 20) + 7, 200_000);
    check(&f, &p, &mut model, ZERO, total as u64 - 10, 5000);
    drop(f);
    ok(kmfs(&[
        &"rekey", &"--rate", &"1000", &"--cpu", &"100", &mnt,
    ]));
    ok(kmfs(&[&"rekey", &"--resume", &mnt]));
    let out = ok(kmfs(&[&"rekey", &"--status", &"--wait", &mnt]));
    assert!(out.contains("done"), "{out}");
    drop_caches();
    assert!(fs::read(&p).unwrap() == model, "after the rekey");
    let m = m.unmount().mount();
    assert_eq!(generation(&m), 1);
    assert!(fs::read(m.p("big")).unwrap() == model, "after a remount");
}
