//! Bad input from the backing store, on a real mount: proptest picks a
//! mutation of the backing files of a freshly written directory — per-file
//! header, ciphertext, length, an encrypted name, a dir-id file, a long-name
//! sidecar, a symlink target, an encrypted xattr value — remounts (so nothing
//! comes from the kernel's caches) and runs every operation on the damaged
//! directory: readdir, stat, read, write, readlink, getxattr/listxattr.
//! Each may fail (EIO and friends) but:
//!
//! * the daemon never panics, never dies and answers every request (each
//!   operation runs under a deadline);
//! * a damaged file header (magic, version) reads as EIO, never as data;
//! * files in other directories still read back intact after every case;
//! * the daemon's log has no panic.
//!
//! A second property mutates the volume header (bytes, length) and runs
//! `kmfs header dump` and `kmfs mount`: a clean one-line error, never a panic.
//!
//! CI: 40 + 24 cases (< 30 s); `KMFS_LONG_TESTS=1`: 400 + 200.
//! In-process decoders have their own property tests (src/volume/header.rs,
//! src/volume/layout.rs, src/crypto/names.rs); this drives them through the
//! filesystem.

use crate::support::fault;
use crate::support::mount;

use std::cell::RefCell;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use fault::Daemon;
use mount::{KMFS, Volume, pattern};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

#[derive(Clone, Copy, Debug)]
enum Target {
    Small,
    Mid,
    Big,
}

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR a byte of a file's 40-byte header.
    Header(Target, usize, u8),
    /// XOR a byte of a file's ciphertext (offset relative to its end of header).
    Cipher(Target, usize, u8),
    /// Set the backing length (cut or extend with zeros).
    Length(Target, usize),
    /// Rename a file's backing entry to another string.
    Name(Target, String),
    /// Change a character of a file's backing name.
    NameChar(Target, usize, u8),
    /// Damage the dir-id file of the directory (0) or its subdirectory (1).
    DirId(u8, DirIdDamage),
    /// Damage the long-name sidecar.
    Sidecar(SidecarDamage),
    /// Replace the encrypted symlink target.
    Symlink(String),
    /// XOR a byte of the encrypted xattr value on `mid`.
    Xattr(usize, u8),
}

#[derive(Clone, Debug)]
enum DirIdDamage {
    Xor(usize, u8),
    Cut(usize),
    Delete,
    Grow,
}

#[derive(Clone, Debug)]
enum SidecarDamage {
    Xor(usize, u8),
    Cut(usize),
    Delete,
    Replace(String),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![Just(Target::Small), Just(Target::Mid), Just(Target::Big)]
}

fn name_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{1,60}",
        "[A-Za-z0-9_-]{200,255}",
        "kmfs\\.long\\.[A-Za-z0-9_-]{0,60}",
        "[ -~]{1,40}".prop_filter("no slash", |s| !s.contains('/') && s != "." && s != ".."),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let xor = 1u8..=255;
    prop_oneof![
        3 => (target(), 0usize..40, xor.clone()).prop_map(|(t, o, x)| Mutation::Header(t, o, x)),
        2 => (target(), 0usize..80_000, xor.clone()).prop_map(|(t, o, x)| Mutation::Cipher(t, o, x)),
        2 => (target(), 0usize..80_000).prop_map(|(t, n)| Mutation::Length(t, n)),
        2 => (target(), name_string()).prop_map(|(t, s)| Mutation::Name(t, s)),
        2 => (target(), 0usize..300, 0x21u8..0x7f).prop_filter("no slash", |(_, _, c)| *c != b'/').prop_map(|(t, i, c)| Mutation::NameChar(t, i, c)),
        2 => (0u8..2, prop_oneof![
            (0usize..16, xor.clone()).prop_map(|(o, x)| DirIdDamage::Xor(o, x)),
            (0usize..16).prop_map(DirIdDamage::Cut),
            Just(DirIdDamage::Delete),
            Just(DirIdDamage::Grow),
        ]).prop_map(|(w, d)| Mutation::DirId(w, d)),
        2 => prop_oneof![
            (0usize..400, xor.clone()).prop_map(|(o, x)| SidecarDamage::Xor(o, x)),
            (0usize..400).prop_map(SidecarDamage::Cut),
            Just(SidecarDamage::Delete),
            name_string().prop_map(SidecarDamage::Replace),
        ].prop_map(Mutation::Sidecar),
        1 => "[ -~]{0,300}".prop_map(Mutation::Symlink),
        1 => (0usize..400, xor).prop_map(|(o, x)| Mutation::Xattr(o, x)),
    ]
}

const LONG: &str = "a-rather-long-file-name-that-needs-the-long-name-scheme-because-its-encryption-does-not-fit-into-two-hundred-and-fifty-five-characters-of-base64-so-it-gets-a-hashed-entry-and-a-sidecar-file-xxxxxxxxxxxxxxxxxxxx";

fn contents(t: Target) -> Vec<u8> {
    match t {
        Target::Small => pattern(1, 10),
        Target::Mid => pattern(2, 5000),
        Target::Big => pattern(3, 70_000),
    }
}

const ALL: [(Target, &str); 3] = [
    (Target::Small, "small"),
    (Target::Mid, "mid"),
    (Target::Big, "big"),
];

fn setxattr(p: &Path, name: &str, v: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Names and values of the backing xattrs of `p`.
fn backing_xattrs(p: &Path) -> Vec<(CString, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let name = CString::new(s).unwrap();
            let mut v = vec![0u8; 4096];
            // SAFETY: as above.
            let k = unsafe {
                libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len())
            };
            v.truncate(k.max(0) as usize);
            (name, v)
        })
        .collect()
}

struct State {
    vol: Volume,
    daemon: Option<Daemon>,
    n: usize,
}

impl State {
    fn remount(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            assert!(d.alive(), "daemon died:\n{}", d.log_text());
            let log = d.log_text();
            let st = d.unmount();
            assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
            assert!(
                st.is_some_and(|s| s.success()),
                "daemon exit {st:?}:\n{log}"
            );
        }
        self.daemon = Some(Daemon::mount(&self.vol));
    }
}

/// The backing directory of the mount directory `name`, found as the entry
/// that appeared in the backing root when it was created.
fn new_entry(before: &[PathBuf], dir: &Path) -> PathBuf {
    let now = list(dir);
    let mut added: Vec<_> = now.into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(added.len(), 1, "{added:?}");
    added.pop().unwrap()
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Runs `f` on another thread; a hang is a failure.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: no answer within 20 s (daemon hung?)"))
}

/// Every operation on the damaged directory; returns a summary of outcomes.
fn exercise(dir: PathBuf) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |what: &str, r: Result<String, std::io::Error>| {
        out.push(match r {
            Ok(s) => format!("{what}: ok {s}"),
            Err(e) => format!("{what}: {}", e.raw_os_error().unwrap_or(-1)),
        })
    };
    let names: Vec<std::ffi::OsString> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
        Err(e) => {
            note("readdir", Err(e));
            Vec::new()
        }
    };
    let mut all: Vec<std::ffi::OsString> = names.clone();
    for n in ["small", "mid", "big", LONG, "sub", "link"] {
        all.push(n.into());
    }
    for n in all {
        let p = dir.join(&n);
        let label = n.to_string_lossy().chars().take(12).collect::<String>();
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.is_file() => {
                note(
                    &format!("read {label}"),
                    std::fs::read(&p).map(|d| d.len().to_string()),
                );
                let c = CString::new(p.as_os_str().as_bytes()).unwrap();
                let mut buf = vec![0u8; 1024];
                // SAFETY: valid C string and buffer.
                let k = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), 1024) };
                let _ = k;
                // SAFETY: as above.
                let k = unsafe {
                    libc::lgetxattr(
                        c.as_ptr(),
                        c"user.k".as_ptr(),
                        buf.as_mut_ptr().cast(),
                        1024,
                    )
                };
                note(
                    &format!("getxattr {label}"),
                    if k < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(k.to_string())
                    },
                );
                let w = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"more"));
                note(&format!("append {label}"), w.map(|()| String::new()));
            }
            Ok(md) if md.file_type().is_symlink() => {
                note(
                    &format!("readlink {label}"),
                    std::fs::read_link(&p).map(|t| t.display().to_string()),
                );
            }
            Ok(md) if md.is_dir() => {
                let r = std::fs::read_dir(&p).map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| std::fs::read(e.path()).map(|d| d.len()).unwrap_or(0))
                        .sum::<usize>()
                        .to_string()
                });
                note(&format!("subdir {label}"), r);
                note(
                    &format!("create in {label}"),
                    std::fs::write(p.join("new"), b"n").map(|()| String::new()),
                );
            }
            Ok(md) => note(&format!("stat {label}"), Ok(format!("{:o}", md.mode()))),
            Err(e) => note(&format!("stat {label}"), Err(e)),
        }
    }
    note(
        "create",
        std::fs::write(dir.join("created"), b"c").map(|()| String::new()),
    );
    out
}

fn apply(
    m: &Mutation,
    bdir: &Path,
    files: &[(Target, PathBuf)],
    sub: &Path,
    long: &Path,
    link: &Path,
    mid: &Path,
) {
    let file = |t: Target| {
        files
            .iter()
            .find(|(x, _)| {
                matches!(
                    (x, t),
                    (Target::Small, Target::Small)
                        | (Target::Mid, Target::Mid)
                        | (Target::Big, Target::Big)
                )
            })
            .unwrap()
            .1
            .clone()
    };
    let xor_at = |p: &Path, off: usize, x: u8| {
        let mut d = std::fs::read(p).unwrap();
        if !d.is_empty() {
            let i = off % d.len();
            d[i] ^= x;
            std::fs::write(p, d).unwrap();
        }
    };
    match m {
        Mutation::Header(t, o, x) => xor_at(&file(*t), *o, *x),
        Mutation::Cipher(t, o, x) => {
            let p = file(*t);
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            xor_at(&p, 40 + o % (len - 40).max(1), *x)
        }
        Mutation::Length(t, n) => {
            let p = file(*t);
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(*n as u64).unwrap();
        }
        Mutation::Name(t, s) => {
            let p = file(*t);
            let _ = std::fs::rename(&p, bdir.join(s));
        }
        Mutation::NameChar(t, i, c) => {
            let p = file(*t);
            let mut name = p.file_name().unwrap().as_bytes().to_vec();
            let k = i % name.len();
            name[k] = *c;
            let _ = std::fs::rename(&p, bdir.join(std::ffi::OsStr::from_bytes(&name)));
        }
        Mutation::DirId(w, d) => {
            let p = if *w == 0 {
                bdir.join("kmfs.dirid")
            } else {
                sub.join("kmfs.dirid")
            };
            let mut perm = std::fs::metadata(&p).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
            std::fs::set_permissions(&p, perm).unwrap();
            match d {
                DirIdDamage::Xor(o, x) => xor_at(&p, *o, *x),
                DirIdDamage::Cut(n) => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(*n as u64)
                    .unwrap(),
                DirIdDamage::Delete => std::fs::remove_file(&p).unwrap(),
                DirIdDamage::Grow => {
                    let mut v = std::fs::read(&p).unwrap();
                    v.push(0);
                    std::fs::write(&p, v).unwrap();
                }
            }
        }
        Mutation::Sidecar(d) => {
            let mut side = long.as_os_str().to_owned();
            side.push(".name");
            let side = PathBuf::from(side);
            match d {
                SidecarDamage::Xor(o, x) => xor_at(&side, *o, *x),
                SidecarDamage::Cut(n) => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&side)
                    .unwrap()
                    .set_len(*n as u64)
                    .unwrap(),
                SidecarDamage::Delete => std::fs::remove_file(&side).unwrap(),
                SidecarDamage::Replace(s) => std::fs::write(&side, s).unwrap(),
            }
        }
        Mutation::Symlink(s) => {
            std::fs::remove_file(link).unwrap();
            if s.is_empty() {
                std::fs::write(link, b"").unwrap();
            } else {
                std::os::unix::fs::symlink(s, link).unwrap();
            }
        }
        Mutation::Xattr(o, x) => {
            let c = CString::new(mid.as_os_str().as_bytes()).unwrap();
            for (name, mut v) in backing_xattrs(mid) {
                if v.is_empty() {
                    continue;
                }
                let i = o % v.len();
                v[i] ^= x;
                // SAFETY: valid C strings and buffer.
                unsafe {
                    libc::lsetxattr(c.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                };
            }
        }
    }
}

fn one_case(st: &RefCell<State>, m: &Mutation) -> Result<(), TestCaseError> {
    let mut s = st.borrow_mut();
    s.n += 1;
    let name = format!("c{}", s.n);
    let mnt = s.vol.mnt.clone();
    let back = s.vol.backing.clone();
    let before = list(&back);
    let dir = mnt.join(&name);
    std::fs::create_dir(&dir).unwrap();
    for (t, n) in ALL {
        std::fs::write(dir.join(n), contents(t)).unwrap();
    }
    std::fs::write(dir.join(LONG), b"long").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("some/target/path", dir.join("link")).unwrap();
    setxattr(&dir.join("mid"), "user.k", b"xattr value");
    let bdir = new_entry(&before, &back);

    // Identify the backing entries by kind and size.
    let mut files = Vec::new();
    let (mut sub, mut long, mut link) = (None, None, None);
    for p in list(&bdir) {
        let fname = p.file_name().unwrap().to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.file_type().is_symlink() {
            link = Some(p);
        } else if md.is_dir() {
            sub = Some(p);
        } else if fname.starts_with("kmfs.long.") && !fname.ends_with(".name") {
            long = Some(p);
        } else if !fname.starts_with("kmfs.") {
            let t = match md.len() {
                50 => Target::Small,
                5040 => Target::Mid,
                70_040 => Target::Big,
                other => panic!("unexpected backing file {fname} of {other} bytes"),
            };
            files.push((t, p));
        }
    }
    let (sub, long, link) = (sub.unwrap(), long.unwrap(), link.unwrap());
    let mid = files
        .iter()
        .find(|(t, _)| matches!(t, Target::Mid))
        .unwrap()
        .1
        .clone();

    // Unmount, damage, mount: nothing comes from the kernel's caches.
    s.daemon.take().map(|mut d| d.unmount());
    apply(m, &bdir, &files, &sub, &long, &link, &mid);
    s.remount();
    let d = dir.clone();
    let outcomes = bounded("operations on the damaged directory", move || exercise(d));

    // A damaged magic or version: that file reads as EIO.
    if let Mutation::Header(t, o, _) = m
        && *o < 6
    {
        let n = ALL
            .iter()
            .find(|(x, _)| std::mem::discriminant(x) == std::mem::discriminant(t))
            .unwrap()
            .1;
        let r = std::fs::read(dir.join(n));
        prop_assert!(
            r.as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EIO)),
            "damaged header of {n} read as {:?}",
            r.map(|d| d.len())
        );
    }

    // The daemon is alive and other directories are intact.
    let alive = s.daemon.as_mut().unwrap().alive();
    prop_assert!(
        alive,
        "daemon died after {m:?}:\n{}",
        s.daemon.as_ref().unwrap().log_text()
    );
    let ctl = mnt.join("control");
    for (t, n) in ALL {
        prop_assert_eq!(std::fs::read(ctl.join(n)).unwrap(), contents(t));
    }
    prop_assert_eq!(std::fs::read(ctl.join(LONG)).unwrap(), b"long");
    prop_assert_eq!(std::fs::read(ctl.join("sub/inner")).unwrap(), b"inner");
    let log = s.daemon.as_ref().unwrap().log_text();
    prop_assert!(!log.contains("panicked"), "{log}");
    if std::env::var("KMFS_FUZZ_VERBOSE").is_ok() {
        eprintln!("{m:?}: {outcomes:?}");
    }
    Ok(())
}

fn cases(ci: u32, long: u32) -> u32 {
    if fault::long_tests() { long } else { ci }
}

#[test]
fn damaged_backing_files_give_errors_not_crashes() {
    let vol = Volume::create(false);
    let daemon = Daemon::mount(&vol);
    let ctl = vol.mnt.join("control");
    std::fs::create_dir(&ctl).unwrap();
    for (t, n) in ALL {
        std::fs::write(ctl.join(n), contents(t)).unwrap();
    }
    std::fs::write(ctl.join(LONG), b"long").unwrap();
    std::fs::create_dir(ctl.join("sub")).unwrap();
    std::fs::write(ctl.join("sub/inner"), b"inner").unwrap();
    let st = RefCell::new(State {
        vol,
        daemon: Some(daemon),
        n: 0,
    });
    let mut runner = TestRunner::new(Config {
        cases: cases(40, 400),
        failure_persistence: None,
        ..Config::default()
    });
    let r = runner.run(&mutation(), |m| one_case(&st, &m));
    let mut s = st.into_inner();
    if let Some(mut d) = s.daemon.take() {
        let log = d.log_text();
        let ok = d.unmount().is_some_and(|x| x.success());
        assert!(ok && !log.contains("panicked"), "{log}");
    }
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn damaged_volume_header_gives_one_line_errors() {
    let vol = Volume::create(false);
    let hdr = vol.backing.join("kmfs.volume");
    let good = std::fs::read(&hdr).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: cases(24, 200),
        failure_persistence: None,
        ..Config::default()
    });
    let strat = prop_oneof![
        (0usize..4096, 1u8..=255).prop_map(|(o, x)| (Some((o, x)), None)),
        (0usize..600).prop_map(|n| (None, Some(n))),
    ];
    let r = runner.run(&strat, |(xor, cut)| {
        let mut h = good.clone();
        if let Some((o, x)) = xor {
            let i = o % h.len();
            h[i] ^= x;
        }
        if let Some(n) = cut {
            h.resize(n, 0);
        }
        std::fs::write(&hdr, &h).unwrap();
        for args in [&["header", "dump"][..], &["status"][..]] {
            let o = Command::new(KMFS)
                .args(args)
                .arg(&vol.backing)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            prop_assert!(!err.contains("panicked"), "{args:?}: {err}");
            prop_assert_ne!(o.status.code(), Some(101), "{:?}: {}", args, err);
            if !o.status.success() {
                prop_assert!(!err.trim().is_empty(), "{args:?}: no message");
            }
        }
        // Mounting: a clean refusal (the header's checksum and HMAC catch the
        // damage), or a mount from the backup copy.
        let o = vol.mount_cmd(&[]);
        let err = String::from_utf8_lossy(&o.stderr);
        prop_assert!(!err.contains("panicked"), "mount: {err}");
        prop_assert_ne!(o.status.code(), Some(101), "mount: {}", err);
        if o.status.success() {
            let _ = Command::new("fusermount3").arg("-u").arg(&vol.mnt).status();
            fault::detach(&vol.mnt);
        } else {
            prop_assert!(!err.trim().is_empty(), "mount: no message");
        }
        Ok(())
    });
    std::fs::write(&hdr, &good).unwrap();
    if let Err(e) = r {
        panic!("{e}");
    }
}
