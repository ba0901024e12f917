//! Real FUSE mounts of `kmfs mount`: every POSIX operation through the mount,
//! checked against what an ordinary filesystem does, and the backing directory
//! checked for leaked plaintext.

use crate::support::mount;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use mount::{Volume, all_files, getx, listx, pattern, setx};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn data_roundtrip_at_unit_boundaries() {
    let m = Volume::create(false).mount();
    let sizes = [
        0usize,
        1,
        15,
        16,
        17,
        4095,
        4096,
        4097,
        4111,
        4112,
        8192 + 7,
        (1 << 20) + 3,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        let data = pattern(i as u64 + 1, n);
        let p = m.p(&format!("f{n}"));
        fs::write(&p, &data).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), n as u64, "size {n}");
        assert_eq!(fs::read(&p).unwrap(), data, "content {n}");
        // Backing file: header + exactly as many bytes.
    }
    // Partial overwrites inside and across units, then read back at odd offsets.
    let p = m.p("f4111");
    let mut model = pattern(9, 4111);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    for (off, len) in [(0usize, 1usize), (4090, 10), (4100, 11), (17, 4000)] {
        let d = pattern((off * 7 + len) as u64, len);
        f.write_all_at(&d, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&d);
    }
    drop(f);
    let mut got = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    // Bytes never overwritten come from the first write (seed 9 only if that
    // was the original content): rebuild the model from the original file.
    let orig = pattern(
        sizes.iter().position(|&s| s == 4111).unwrap() as u64 + 1,
        4111,
    );
    let mut expect = orig;
    for (off, len) in [(0usize, 1usize), (4090, 10), (4100, 11), (17, 4000)] {
        expect[off..off + len].copy_from_slice(&pattern((off * 7 + len) as u64, len));
    }
    let _ = model;
    assert_eq!(got, expect);
    let f = File::open(&p).unwrap();
    let mut b = [0u8; 20];
    let n = f.read_at(&mut b, 4100).unwrap();
    assert_eq!(n, 11);
    assert_eq!(&b[..11], &expect[4100..]);
}

#[test]
fn sparse_files_read_zeros_and_stay_sparse() {
    let m = Volume::create(false).mount();
    let p = m.p("sparse");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let big = (1u64 << 30) + 12345; // > 1 GiB
    f.write_all_at(b"tail data", big).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    drop(f);
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), big + 9);
    assert!(md.blocks() < 1024, "blocks {}", md.blocks());
    let f = File::open(&p).unwrap();
    let mut b = vec![1u8; 8192];
    f.read_exact_at(&mut b, 1 << 29).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let mut t = [0u8; 13];
    let n = f.read_at(&mut t, big - 4).unwrap();
    assert_eq!(n, 13);
    assert_eq!(&t, b"\0\0\0\0tail data");
    let mut h = [0u8; 8];
    f.read_exact_at(&mut h, 0).unwrap();
    assert_eq!(&h, b"head\0\0\0\0");
    // SEEK_DATA / SEEK_HOLE: a hole right after the head, data near the end.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert!(hole > 0 && (hole as u64) < (1 << 20), "hole at {hole}");
    // SAFETY: as above.
    let data = unsafe { libc::lseek(fd, 1 << 20, libc::SEEK_DATA) };
    assert!(
        data as u64 <= big && data as u64 > (1 << 29),
        "data at {data}"
    );
    // Backing file is sparse as well.
    let bmd = all_files(m.backing())
        .into_iter()
        .map(|p| fs::symlink_metadata(&p).unwrap())
        .find(|md| md.len() == big + 9 + 40)
        .expect("backing file of the sparse file");
    assert!(bmd.blocks() < 1024);
}

#[test]
fn append_truncate_and_o_trunc() {
    let m = Volume::create(false).mount();
    let p = m.p("log");
    fs::write(&p, b"0123456789abcdef0").unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"XY").unwrap();
    f.write_all(&pattern(1, 5000)).unwrap();
    drop(f);
    let mut expect = b"0123456789abcdef0XY".to_vec();
    expect.extend_from_slice(&pattern(1, 5000));
    assert_eq!(fs::read(&p).unwrap(), expect);
    // Truncate down (into a tiny file), up (hole), and to unit boundaries.
    for n in [4100u64, 4096, 4097, 10, 0, 3, 20000, 5] {
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(n).unwrap();
        drop(f);
        expect.resize(n as usize, 0);
        assert_eq!(fs::read(&p).unwrap(), expect, "after truncate to {n}");
    }
    // truncate(2) by path, without an open file.
    let cp = c(&p);
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::truncate(cp.as_ptr(), 4200) }, 0);
    expect.resize(4200, 0);
    assert_eq!(fs::read(&p).unwrap(), expect);
    // O_TRUNC
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(b"new").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"new");
    // O_EXCL on an existing file.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
}

#[test]
fn rename_link_symlink_and_special_files() {
    let m = Volume::create(false).mount();
    fs::write(m.p("a"), b"AAAA").unwrap();
    fs::write(m.p("b"), b"BBBBBBBB").unwrap();
    fs::rename(m.p("a"), m.p("b")).unwrap();
    assert!(!m.p("a").exists());
    assert_eq!(fs::read(m.p("b")).unwrap(), b"AAAA");
    // Across directories, with a long name.
    fs::create_dir(m.p("d1")).unwrap();
    let long = "n".repeat(255);
    fs::rename(m.p("b"), m.p(&format!("d1/{long}"))).unwrap();
    assert_eq!(fs::read(m.p(&format!("d1/{long}"))).unwrap(), b"AAAA");
    fs::rename(m.p(&format!("d1/{long}")), m.p("short")).unwrap();
    assert_eq!(fs::read_dir(m.p("d1")).unwrap().count(), 0);
    // Directory rename keeps children readable; rename over an empty dir.
    fs::write(m.p("d1/child"), b"kid").unwrap();
    fs::create_dir(m.p("empty")).unwrap();
    fs::rename(m.p("d1"), m.p("empty")).unwrap();
    assert_eq!(fs::read(m.p("empty/child")).unwrap(), b"kid");
    fs::create_dir(m.p("full")).unwrap();
    fs::write(m.p("full/x"), b"").unwrap();
    assert_eq!(
        errno(fs::rename(m.p("empty"), m.p("full"))),
        libc::ENOTEMPTY
    );
    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    fs::write(m.p("x"), b"xx").unwrap();
    fs::write(m.p("y"), b"yyy").unwrap();
    let (cx, cy) = (c(&m.p("x")), c(&m.p("y")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cx.as_ptr(),
            libc::AT_FDCWD,
            cy.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cx.as_ptr(),
            libc::AT_FDCWD,
            cy.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(fs::read(m.p("x")).unwrap(), b"yyy");
    assert_eq!(fs::read(m.p("y")).unwrap(), b"xx");

    // Hard links share content and inode.
    fs::write(m.p("orig"), pattern(3, 9000)).unwrap();
    fs::hard_link(m.p("orig"), m.p("empty/link")).unwrap();
    let (a, b) = (
        fs::metadata(m.p("orig")).unwrap(),
        fs::metadata(m.p("empty/link")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    OpenOptions::new()
        .write(true)
        .open(m.p("empty/link"))
        .unwrap()
        .write_all_at(b"via link", 100)
        .unwrap();
    let mut expect = pattern(3, 9000);
    expect[100..108].copy_from_slice(b"via link");
    assert_eq!(fs::read(m.p("orig")).unwrap(), expect);
    fs::remove_file(m.p("orig")).unwrap();
    assert_eq!(fs::read(m.p("empty/link")).unwrap(), expect);
    assert_eq!(fs::metadata(m.p("empty/link")).unwrap().nlink(), 1);

    // Symlinks: target round-trips, size is the target length, not stored in clear.
    let target = "../some where/secret-target-name";
    std::os::unix::fs::symlink(target, m.p("sl")).unwrap();
    assert_eq!(fs::read_link(m.p("sl")).unwrap().to_str().unwrap(), target);
    assert_eq!(
        fs::symlink_metadata(m.p("sl")).unwrap().len(),
        target.len() as u64
    );
    std::os::unix::fs::symlink("short", m.p("rel")).unwrap();
    assert_eq!(fs::read(m.p("rel")).unwrap(), b"AAAA");
    for p in all_files(m.backing()) {
        if let Ok(t) = fs::read_link(&p) {
            assert!(!t.to_string_lossy().contains("secret"), "{t:?}");
        }
    }
    // FIFO and socket via mknod.
    let fifo = c(&m.p("fifo"));
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let md = fs::symlink_metadata(m.p("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&md.file_type()));
    assert_eq!(md.mode() & 0o777, 0o640);
    let _sock = std::os::unix::net::UnixListener::bind(m.p("sock")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::symlink_metadata(m.p("sock")).unwrap().file_type()
    ));
    // unlink removes long-name sidecars too.
    fs::write(m.p(&long), b"l").unwrap();
    fs::remove_file(m.p(&long)).unwrap();
    let leftovers: Vec<_> = fs::read_dir(m.backing())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kmfs.long."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn directories_with_many_entries_and_long_names() {
    let m = Volume::create(false).mount();
    fs::create_dir(m.p("big")).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for i in 0..1000 {
        let n = if i % 10 == 0 {
            format!("{i:04}-{}", "x".repeat(250))
        } else {
            format!("entry-{i}")
        };
        fs::write(m.p(&format!("big/{n}")), i.to_string()).unwrap();
        names.insert(n);
    }
    let listed: std::collections::BTreeSet<String> = fs::read_dir(m.p("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, names);
    let n255 = format!("0010-{}", "x".repeat(250));
    assert_eq!(n255.len(), 255);
    assert_eq!(
        fs::read_to_string(m.p(&format!("big/{n255}"))).unwrap(),
        "10"
    );
    // 256 bytes is too long.
    assert_eq!(
        errno(fs::write(m.p(&"y".repeat(256)), b"")),
        libc::ENAMETOOLONG
    );
    // `ls -l` (readdirplus) sees sizes.
    let out = Command::new("ls")
        .arg("-la")
        .arg(m.p("big"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1003);
    // rmdir: non-empty refused, empty works (the backing dir id does not count).
    assert_eq!(errno(fs::remove_dir(m.p("big"))), libc::ENOTEMPTY);
    for n in &names {
        fs::remove_file(m.p(&format!("big/{n}"))).unwrap();
    }
    fs::remove_dir(m.p("big")).unwrap();
    assert!(!m.p("big").exists());
    // Nested directories and mkdir of an existing name.
    fs::create_dir_all(m.p("a/b/c/d")).unwrap();
    assert_eq!(errno(fs::create_dir(m.p("a/b"))), libc::EEXIST);
    fs::write(m.p("a/b/c/d/f"), b"deep").unwrap();
    assert_eq!(fs::read(m.p("a/b/c/d/f")).unwrap(), b"deep");
    // Only the root's own files besides the encrypted entries.
    let root: Vec<String> = fs::read_dir(m.backing())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(root.iter().all(|n| !n.contains("entry") && n != "a"));
    assert!(!root.iter().any(|n| n.starts_with("kmfs.tmp.")));
}

#[test]
fn xattrs_are_encrypted_and_acls_work() {
    let m = Volume::create(false).mount();
    let f = m.p("file");
    fs::write(&f, b"x").unwrap();
    assert_eq!(setx(&f, "user.comment", b"TOPSECRETVALUE"), 0);
    assert_eq!(setx(&f, "user.empty", b""), 0);
    let big = pattern(5, 3000);
    assert_eq!(setx(&f, "user.big", &big), 0);
    assert_eq!(getx(&f, "user.comment").unwrap(), b"TOPSECRETVALUE");
    assert_eq!(getx(&f, "user.empty").unwrap(), b"");
    assert_eq!(getx(&f, "user.big").unwrap(), big);
    assert_eq!(getx(&f, "user.none"), Err(libc::ENODATA));
    assert_eq!(listx(&f), vec!["user.big", "user.comment", "user.empty"]);
    // Replace, remove.
    assert_eq!(setx(&f, "user.comment", b"v2"), 0);
    assert_eq!(getx(&f, "user.comment").unwrap(), b"v2");
    let (cp, cn) = (c(&f), CString::new("user.empty").unwrap());
    // SAFETY: valid C strings.
    assert_eq!(unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) }, 0);
    assert_eq!(listx(&f), vec!["user.big", "user.comment"]);
    // On directories too.
    fs::create_dir(m.p("dir")).unwrap();
    assert_eq!(setx(&m.p("dir"), "user.d", b"dirval"), 0);
    assert_eq!(getx(&m.p("dir"), "user.d").unwrap(), b"dirval");
    // Backing attributes reveal neither names nor values.
    for p in all_files(m.backing()) {
        let out = Command::new("getfattr")
            .args(["-d", "-m", "-", "--absolute-names"])
            .arg(&p)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(!s.contains("comment") && !s.contains("dirval"), "{s}");
    }
    // POSIX ACLs: set, read back, enforced by the kernel, inherited.
    let st = Command::new("setfacl")
        .args(["-m", "u:nobody:r", "-m", "d:u:nobody:rw"])
        .arg(m.p("dir"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("getfacl")
        .arg("-c")
        .arg(m.p("dir"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("user:nobody:r--"), "{s}");
    assert!(s.contains("default:user:nobody:rw-"), "{s}");
    fs::write(m.p("dir/inherits"), b"").unwrap();
    let out = Command::new("getfacl")
        .arg("-c")
        .arg(m.p("dir/inherits"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("user:nobody:rw-"), "{s}");
}

#[test]
fn chmod_chown_utimens_and_statfs() {
    let m = Volume::create(false).mount();
    let p = m.p("f");
    fs::write(&p, b"data").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4751);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    std::os::unix::fs::lchown(&p, Some(0), None).unwrap();
    // utimens with specific times, UTIME_OMIT and UTIME_NOW.
    let cp = c(&p);
    let t = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_200_000_000,
            tv_nsec: 5,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), t.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_200_000_000, 5));
    let t2 = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), t2.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(&p).unwrap();
    assert!(md.atime() > 1_600_000_000);
    assert_eq!(md.mtime(), 1_200_000_000);
    // Files created by another user belong to that user.
    let dir = m.p("shared");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    drop(m);
}

#[test]
fn other_users_get_ownership_and_permission_checks() {
    let m = Volume::create(false).mount_with(&["-o", "allow_other"]);
    let dir = m.p("shared");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.p("rootonly"), b"secret").unwrap();
    fs::set_permissions(m.p("rootonly"), fs::Permissions::from_mode(0o600)).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 022; echo hi > {0}/mine && mkdir {0}/sub && ln -s x {0}/lnk && ! cat {1} 2>/dev/null",
            dir.display(),
            m.p("rootonly").display()
        ))
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success());
    for n in ["mine", "sub", "lnk"] {
        let md = fs::symlink_metadata(dir.join(n)).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534), "{n}");
    }
    assert_eq!(
        fs::metadata(dir.join("mine")).unwrap().mode() & 0o777,
        0o644
    );
    assert_eq!(fs::metadata(dir.join("sub")).unwrap().mode() & 0o777, 0o755);
}

use std::os::unix::process::CommandExt;

#[test]
fn backing_directory_holds_no_plaintext() {
    let m = Volume::create(false).mount();
    let marker = b"PLAINTEXT-MARKER-7f3a9c";
    let mut content = Vec::new();
    for _ in 0..500 {
        content.extend_from_slice(marker);
    }
    fs::create_dir(m.p("Confidential-Dir")).unwrap();
    fs::write(m.p("Confidential-Dir/secret-report.txt"), &content).unwrap();
    fs::write(m.p("tiny-secret"), b"PLAINTEXT-MA").unwrap();
    fs::write(m.p(&format!("{}-longname", "Q".repeat(200))), marker).unwrap();
    let out = Command::new("sync").status().unwrap();
    assert!(out.success());
    for p in all_files(m.backing()) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        for bad in ["Confidential", "secret", "tiny", "QQQQ", "longname"] {
            assert!(!name.contains(bad), "backing name {name}");
        }
        if p.is_file() {
            let data = fs::read(&p).unwrap();
            assert!(
                !data.windows(12).any(|w| w == &marker[..12]),
                "plaintext in {}",
                p.display()
            );
        }
    }
}

#[test]
fn damaged_files_give_eio_and_others_stay_readable() {
    let m = Volume::create(false).mount();
    fs::write(m.p("good"), pattern(1, 10000)).unwrap();
    fs::write(m.p("flip"), pattern(2, 10000)).unwrap();
    fs::write(m.p("nohdr"), pattern(3, 100)).unwrap();
    fs::write(m.p("short"), pattern(4, 9000)).unwrap();
    // kmfs inode numbers carry the backing one in their low 32 bits
    // (the generation in the high ones: src/fs/export.rs).
    let ino = |n: &str| fs::metadata(m.p(n)).unwrap().ino() & 0xffff_ffff;
    let find = |i: u64| {
        all_files(m.backing())
            .into_iter()
            .find(|p| fs::symlink_metadata(p).unwrap().ino() == i)
            .unwrap()
    };
    let (flip, nohdr, short) = (find(ino("flip")), find(ino("nohdr")), find(ino("short")));
    // Flip a byte in the second unit's ciphertext.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&flip)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 40 + 4096 + 10).unwrap();
    f.write_all_at(&[b[0] ^ 0x55], 40 + 4096 + 10).unwrap();
    // Damage a header's magic.
    let f = OpenOptions::new().write(true).open(&nohdr).unwrap();
    f.write_all_at(b"XXXX", 0).unwrap();
    // Cut a file in the middle of a unit.
    OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(40 + 5000)
        .unwrap();
    // Drop caches so the kernel asks the daemon again.
    mount::drop_caches();
    let read = |n: &str| {
        let mut v = Vec::new();
        File::open(m.p(n)).and_then(|mut f| f.read_to_end(&mut v))
    };
    // XTS is not authenticated: a flipped ciphertext byte garbles exactly its
    // 16-byte cipher block and nothing else.
    let got = fs::read(m.p("flip")).unwrap();
    let orig = pattern(2, 10000);
    assert_eq!(got.len(), orig.len());
    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != orig[i]).collect();
    assert!(!diff.is_empty());
    assert!(diff.iter().all(|&i| (4096..4112).contains(&i)), "{diff:?}");
    // A damaged per-file header: EIO for that file only.
    assert_eq!(errno(read("nohdr")), libc::EIO);
    // A cut file has the size of what is left and reads without failing.
    assert_eq!(fs::metadata(m.p("short")).unwrap().len(), 5000);
    let cut = read("short").unwrap();
    assert_eq!(cut, 5000);
    assert_eq!(fs::read(m.p("good")).unwrap(), pattern(1, 10000));
    // A corrupt backing name is skipped in listings, others remain.
    fs::write(m.backing().join("not-a-valid-name"), b"").unwrap();
    let names: Vec<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&"good".to_string()));
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(m.daemon_log().contains("path="));
}

#[test]
fn fallocate_extends_and_keeps_data() {
    let m = Volume::create(false).mount();
    let p = m.p("fa");
    fs::write(&p, b"hello").unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: fallocate on an open descriptor.
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 100_000) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 100_000);
    let mut expect = b"hello".to_vec();
    expect.resize(100_000, 0);
    assert_eq!(fs::read(&p).unwrap(), expect);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 200_000) },
        0
    );
    assert_eq!(f.metadata().unwrap().len(), 100_000);
    // SAFETY: as above.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    // Punching holes is supported (tests/it/fs_fallocate.rs covers it).
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    expect[..5].fill(0);
    let mut g = f.try_clone().unwrap();
    g.seek(SeekFrom::Start(99_998)).unwrap();
    g.write_all(b"END").unwrap();
    expect.truncate(99_998);
    expect.extend_from_slice(b"END");
    assert_eq!(fs::read(&p).unwrap(), expect);
}

#[test]
fn plaintext_names_volume_works_and_refuses_reserved_names() {
    let m = Volume::create(true).mount();
    fs::create_dir(m.p("docs")).unwrap();
    fs::write(m.p("docs/readme"), b"content").unwrap();
    assert!(m.backing().join("docs/readme").exists());
    assert_eq!(fs::read(m.p("docs/readme")).unwrap(), b"content");
    assert_ne!(
        fs::read(m.backing().join("docs/readme")).unwrap(),
        b"content"
    );
    assert_eq!(errno(fs::write(m.p("kmfs.volume"), b"x")), libc::EPERM);
    let names: Vec<_> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["docs".to_string()]);
    fs::remove_file(m.p("docs/readme")).unwrap();
    fs::remove_dir(m.p("docs")).unwrap();
}

#[test]
fn rsync_and_tar_roundtrip_with_acls_and_xattrs() {
    let m = Volume::create(false).mount();
    let src = m.vol().dir.path().join("src");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("sub/a.bin"), pattern(11, 300_000)).unwrap();
    fs::write(src.join("sub/deeper/tiny"), b"t").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("sub/a.bin", src.join("link")).unwrap();
    fs::hard_link(src.join("empty"), src.join("empty-hl")).unwrap();
    assert_eq!(setx(&src.join("sub/a.bin"), "user.tag", b"backup"), 0);
    let st = Command::new("setfacl")
        .args(["-m", "u:nobody:rx"])
        .arg(src.join("sub"))
        .status()
        .unwrap();
    assert!(st.success());
    // rsync -aHAX into the mount and back out again.
    let out = m.vol().dir.path().join("out");
    for (from, to) in [(src.clone(), m.p("r")), (m.p("r"), out.clone())] {
        let o = Command::new("rsync")
            .arg("-aHAX")
            .arg(format!("{}/", from.display()))
            .arg(&to)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let diff = Command::new("diff")
        .arg("-r")
        .arg(&src)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert_eq!(getx(&out.join("sub/a.bin"), "user.tag").unwrap(), b"backup");
    let acl = Command::new("getfacl")
        .arg("-c")
        .arg(out.join("sub"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&acl.stdout).contains("user:nobody:r-x"));
    assert_eq!(
        fs::metadata(out.join("empty")).unwrap().ino(),
        fs::metadata(out.join("empty-hl")).unwrap().ino()
    );
    // tar with xattrs and ACLs, from the mount, extracted elsewhere.
    let tarball = m.vol().dir.path().join("t.tar");
    let st = Command::new("tar")
        .args(["--xattrs", "--acls", "-cf"])
        .arg(&tarball)
        .arg("-C")
        .arg(m.p("r"))
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let x = m.vol().dir.path().join("x");
    fs::create_dir(&x).unwrap();
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=user.*", "--acls", "-xf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    let diff = Command::new("diff")
        .arg("-r")
        .arg(&src)
        .arg(&x)
        .output()
        .unwrap();
    assert!(diff.status.success());
    assert_eq!(getx(&x.join("sub/a.bin"), "user.tag").unwrap(), b"backup");
}

/// `fallocate -l LEN F` as uid and gid 65534 (nobody, nogroup).
fn fallocate_as_nobody(f: &Path, len: u64) {
    let st = Command::new("fallocate")
        .args(["-l", &len.to_string()])
        .arg(f)
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success(), "fallocate -l {len} {} as nobody", f.display());
}

/// fallocate by a caller without CAP_FSETID clears the set-id bits, as a
/// write does (xfstests generic/683).
#[test]
fn fallocate_by_non_root_clears_setid_bits() {
    let m = Volume::create(false).mount_with(&["-o", "allow_other"]);
    let dir = m.p("shared");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let f = dir.join("prog");
    fs::write(&f, b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o6775)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o6775);
    fallocate_as_nobody(&f, 65536);
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o0775);
    assert_eq!(fs::metadata(&f).unwrap().len(), 65536);

    // Set-gid without group-execute (the kernel's rule, generic/683): it
    // goes when the caller is not in the file's group, and stays when it is.
    for (name, group, after) in [("other", 12345, 0o0666), ("member", 65534, 0o2666)] {
        let f = dir.join(name);
        fs::write(&f, b"data").unwrap();
        std::os::unix::fs::chown(&f, Some(0), Some(group)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o2666)).unwrap();
        fallocate_as_nobody(&f, 8192);
        assert_eq!(
            fs::metadata(&f).unwrap().mode() & 0o7777,
            after,
            "{name}: file group {group}, caller group 65534"
        );
    }
}

/// Setting an access ACL by the owner when not in the file's group clears
/// set-gid, as the kernel's `posix_acl_update_mode` does on a local
/// filesystem (xfstests generic/375); a member keeps it.
#[test]
fn setfacl_by_non_member_clears_setgid() {
    let m = Volume::create(false).mount_with(&["-o", "allow_other"]);
    let dir = m.p("shared");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    for (name, dir_entry) in [("file", false), ("subdir", true)] {
        for (caller_gid, after) in [(65534, 0o2777), (12345, 0o0777)] {
            let f = dir.join(name);
            if dir_entry {
                fs::create_dir(&f).unwrap();
            } else {
                fs::write(&f, b"x").unwrap();
            }
            std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o2755)).unwrap();
            let st = Command::new("setfacl")
                .args(["-m", "u::rwx,g::rwx,o::rwx"])
                .arg(&f)
                .uid(65534)
                .gid(caller_gid)
                .status()
                .unwrap();
            assert!(st.success());
            assert_eq!(
                fs::metadata(&f).unwrap().mode() & 0o7777,
                after,
                "{name}: file group 65534, caller group {caller_gid}"
            );
            if dir_entry {
                fs::remove_dir(&f).unwrap();
            } else {
                fs::remove_file(&f).unwrap();
            }
        }
    }
}

/// With `-o noatime` (and on a read-only mount) reading a file leaves its
/// access time alone: the daemon's backing reads would set it otherwise
/// (xfstests generic/003, 120).
#[test]
fn noatime_mount_reads_leave_atime() {
    let vol = Volume::create(false);
    let m = vol.mount();
    let f = m.p("f");
    fs::write(&f, b"content").unwrap();
    let old = libc::timespec {
        tv_sec: 1_000_000_000,
        tv_nsec: 0,
    };
    let c = CString::new(f.as_os_str().as_bytes()).unwrap();
    let times = [
        old,
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let mut vol = m.unmount();
    for opts in [["-o", "noatime"], ["-o", "ro"]] {
        let m = vol.mount_with(&opts);
        assert_eq!(fs::read(m.p("f")).unwrap(), b"content");
        assert_eq!(
            fs::metadata(m.p("f")).unwrap().atime(),
            1_000_000_000,
            "{opts:?}"
        );
        vol = m.unmount();
    }
    // Without it the backing filesystem's rule applies (relatime: an
    // access time older than the modification time is updated).
    let m = vol.mount();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"content");
    assert!(fs::metadata(m.p("f")).unwrap().atime() > 1_000_000_000);
    m.unmount();
}

/// `st_blocks` describes the plaintext as ext4 would (Samba reports it as
/// the allocation size and compares it on a durable reconnect): 0 for an
/// empty file, one 4 KiB block for a small one, whole units for a full one,
/// never the 40-byte header's straddle nor kmfs's encrypted attributes —
/// and right after a setxattr, an open descriptor's fstat already shows
/// what a stat after close shows (the kernel's cached attributes are
/// dropped).
#[test]
fn st_blocks_describe_the_plaintext_and_stay_right_after_xattr_changes() {
    let m = Volume::create(false).mount();
    let empty = m.p("empty");
    File::create(&empty).unwrap();
    assert_eq!(fs::metadata(&empty).unwrap().blocks(), 0, "empty file");

    let small = m.p("small");
    fs::write(&small, b"hello").unwrap();
    File::open(&small).unwrap().sync_all().unwrap();
    assert_eq!(fs::metadata(&small).unwrap().blocks(), 8, "5-byte file");

    let full = m.p("full");
    fs::write(&full, vec![7u8; 3 * 4096]).unwrap();
    File::open(&full).unwrap().sync_all().unwrap();
    assert_eq!(
        fs::metadata(&full).unwrap().blocks(),
        24,
        "three whole units"
    );

    // An attribute big enough to leave the backing inode (ext4: a separate
    // xattr block), set through an open descriptor as smbd does with
    // user.DOSATTRIB.
    for p in [&empty, &small, &full] {
        let before = fs::metadata(p).unwrap().blocks();
        let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
        assert_eq!(setx(p, "user.DOSATTRIB", &vec![b'd'; 3000]), 0);
        let during = f.metadata().unwrap();
        drop(f);
        let after = fs::metadata(p).unwrap();
        assert_eq!(
            during.blocks(),
            after.blocks(),
            "{}: fstat vs stat",
            p.display()
        );
        assert_eq!(after.blocks(), before, "{}: xattr counted", p.display());
        assert_eq!(
            (during.ctime(), during.ctime_nsec()),
            (after.ctime(), after.ctime_nsec()),
            "{}: ctime",
            p.display()
        );
    }
    m.unmount();
}

/// copy_file_range(2) inside one volume (what `cp` uses by default) is done
/// by the daemon: contents at unaligned offsets, into the middle of an
/// existing file and past its end, short at the source's end, and a copy
/// larger than one daemon step; each compared with a model.
#[test]
fn copy_file_range_inside_the_volume() {
    use std::os::fd::AsRawFd;
    let m = Volume::create(false).mount();
    let src_data = pattern(31, 5 * 1024 * 1024 + 777);
    fs::write(m.p("src"), &src_data).unwrap();
    let mut model = pattern(32, 100_000);
    fs::write(m.p("dst"), &model).unwrap();
    let src = File::open(m.p("src")).unwrap();
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("dst"))
        .unwrap();
    let copy = |off_in: i64, off_out: i64, len: usize| -> isize {
        let (mut i, mut o) = (off_in, off_out);
        // SAFETY: valid descriptors and offset pointers for the call.
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut i, dst.as_raw_fd(), &mut o, len, 0) }
    };
    let mut apply = |off_in: usize, off_out: usize, n: usize| {
        if model.len() < off_out + n {
            model.resize(off_out + n, 0);
        }
        model[off_out..off_out + n].copy_from_slice(&src_data[off_in..off_in + n]);
    };
    // Inside the destination, unaligned.
    assert_eq!(copy(4097, 13, 50_000), 50_000);
    apply(4097, 13, 50_000);
    // Past the destination's end (a hole between), more than 1 MiB.
    let n = copy(12345, 300_000, 3 * 1024 * 1024) as usize;
    assert!(
        n > 0,
        "copy_file_range failed: {}",
        std::io::Error::last_os_error()
    );
    apply(12345, 300_000, n);
    // Short at the source's end, copying in as many calls as it takes.
    let mut off = 0;
    loop {
        let want = src_data.len() + 10 - (4 << 20) - off;
        let r = copy((4 << 20) as i64 + off as i64, 7_000_000 + off as i64, want);
        assert!(r >= 0, "{}", std::io::Error::last_os_error());
        if r == 0 {
            break;
        }
        apply((4 << 20) + off, 7_000_000 + off, r as usize);
        off += r as usize;
    }
    assert_eq!(off, src_data.len() - (4 << 20));
    dst.sync_all().unwrap();
    drop((src, dst));
    mount::drop_caches();
    assert!(
        fs::read(m.p("dst")).unwrap() == model,
        "copy_file_range contents"
    );
    // cp (which tries copy_file_range first) gives an equal file.
    let st = Command::new("cp")
        .arg(m.p("src"))
        .arg(m.p("cp"))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::read(m.p("cp")).unwrap() == src_data);
    m.unmount();
}

/// RENAME_WHITEOUT (overlayfs upper layers): the old name becomes a 0/0
/// character device, for short and long (sidecar) names, and the whiteout
/// can be removed again; then kmfs serves as an overlayfs upper layer:
/// deleting and renaming lower files leaves whiteouts that hide them.
#[test]
fn rename_whiteout_and_overlayfs_upper_layer() {
    let m = Volume::create(false).mount();
    let long = "w".repeat(200);
    for name in ["short", long.as_str()] {
        let from = m.p(name);
        let to = m.p(&format!("{}.moved", &name[..5]));
        fs::write(&from, b"data").unwrap();
        // SAFETY: valid C strings for the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c(&from).as_ptr(),
                libc::AT_FDCWD,
                c(&to).as_ptr(),
                libc::RENAME_WHITEOUT,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        let wo = fs::symlink_metadata(&from).unwrap();
        assert!(
            std::os::unix::fs::FileTypeExt::is_char_device(&wo.file_type()) && wo.rdev() == 0,
            "{name}: no whiteout left"
        );
        assert_eq!(fs::read(&to).unwrap(), b"data");
        fs::remove_file(&from).unwrap();
        fs::remove_file(&to).unwrap();
    }
    assert_eq!(fs::read_dir(m.mnt()).unwrap().count(), 0);
    // No sidecar or other leftover in the backing directory.
    let out = Command::new(mount::KMFS)
        .args(["check", "--keyfile"])
        .arg(&m.vol().key)
        .arg(m.backing())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    if !fs::read_to_string("/proc/filesystems")
        .unwrap()
        .contains("overlay")
    {
        crate::support::skip("no overlay filesystem in this kernel");
        return;
    }
    let lower = tempfile::tempdir().unwrap();
    fs::write(lower.path().join("gone"), b"lower").unwrap();
    fs::write(lower.path().join("moved"), b"lower2").unwrap();
    let merged = tempfile::tempdir().unwrap();
    fs::create_dir(m.p("upper")).unwrap();
    fs::create_dir(m.p("work")).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.path().display(),
        m.p("upper").display(),
        m.p("work").display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged.path())
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount with a kmfs upper layer");
    let mp = merged.path();
    fs::remove_file(mp.join("gone")).unwrap();
    fs::rename(mp.join("moved"), mp.join("renamed")).unwrap();
    fs::write(mp.join("new"), b"upper").unwrap();
    let mut names: Vec<_> = fs::read_dir(mp)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new", "renamed"]);
    assert_eq!(fs::read(mp.join("renamed")).unwrap(), b"lower2");
    assert!(Command::new("umount").arg(mp).status().unwrap().success());
    // The whiteouts are in the kmfs upper layer.
    for wo in ["gone", "moved"] {
        let md = fs::symlink_metadata(m.p(&format!("upper/{wo}"))).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &md.file_type()
        ));
    }
    m.unmount();
}

/// A listing read in small pieces while an entry is removed: the open
/// directory's later reads either leave the removed entry out or show it
/// with its own inode number, never a made-up one (xfstests generic/637).
#[test]
fn readdir_after_unlink_shows_no_made_up_inode() {
    let m = Volume::create(false).mount();
    let dir = m.p("d");
    fs::create_dir(&dir).unwrap();
    for n in 1..=100 {
        File::create(dir.join(n.to_string())).unwrap();
    }
    for victim in ["10", "50", "90"] {
        let st_ino = fs::metadata(dir.join(victim)).unwrap().ino();
        let d = File::open(&dir).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&d);
        let mut buf = vec![0u8; 200];
        let mut first = true;
        let mut seen = None;
        loop {
            // SAFETY: getdents64 writes at most buf.len() bytes into buf.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
            assert!(n >= 0, "{}", std::io::Error::last_os_error());
            if first {
                fs::remove_file(dir.join(victim)).unwrap();
                first = false;
            }
            if n == 0 {
                break;
            }
            let mut pos = 0usize;
            while pos < n as usize {
                // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, name.
                let ino = u64::from_ne_bytes(buf[pos..pos + 8].try_into().unwrap());
                let reclen = u16::from_ne_bytes(buf[pos + 16..pos + 18].try_into().unwrap());
                let name = &buf[pos + 19..pos + reclen as usize];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap()];
                if name == victim.as_bytes() {
                    seen = Some(ino);
                }
                pos += reclen as usize;
            }
        }
        if let Some(ino) = seen {
            assert_eq!(
                ino, st_ino,
                "{victim}: stale entry with another inode number"
            );
        }
    }
}

/// The daemon answers attribute queries of a file without attributes from
/// what it learned at the first one (`ls -l` asks every file for
/// `security.selinux` and its ACL; an absent label is EOPNOTSUPP, so ls
/// stops asking): attributes set afterwards, security ones and ACLs
/// included, are still found, listed and enforced.
#[test]
fn attributes_set_after_queries_that_found_none_are_found_and_enforced() {
    let m = Volume::create(false).mount_with(&["-o", "allow_other"]);
    let f = m.p("plain");
    fs::write(&f, b"readable by others").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    for _ in 0..2 {
        // No label: "not supported", as a filesystem without labels, so
        // `ls -l` stops asking; other absent attributes are ENODATA.
        assert_eq!(getx(&f, "security.selinux"), Err(libc::EOPNOTSUPP));
        assert_eq!(getx(&f, "security.capability"), Err(libc::ENODATA));
        assert_eq!(getx(&f, "system.posix_acl_access"), Err(libc::ENODATA));
        assert_eq!(getx(&f, "user.x"), Err(libc::ENODATA));
        assert_eq!(getx(&f, "system.other"), Err(libc::EOPNOTSUPP));
        assert!(listx(&f).is_empty());
    }
    assert_eq!(
        setx(&f, "security.selinux", b"system_u:object_r:etc_t:s0"),
        0
    );
    assert_eq!(
        getx(&f, "security.selinux").unwrap(),
        b"system_u:object_r:etc_t:s0"
    );
    assert_eq!(getx(&f, "user.x"), Err(libc::ENODATA));
    assert_eq!(listx(&f), vec!["security.selinux"]);
    // A file holding other attributes but no label: still "not supported".
    let u = m.p("user-attr-only");
    fs::write(&u, b"x").unwrap();
    assert_eq!(setx(&u, "user.x", b"1"), 0);
    assert_eq!(getx(&u, "security.selinux"), Err(libc::EOPNOTSUPP));
    assert_eq!(getx(&u, "security.capability"), Err(libc::ENODATA));

    // An ACL set after the queries found none is read back and enforced.
    let read_as_nobody = |p: &Path| {
        Command::new("cat")
            .arg(p)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
            .status
            .success()
    };
    let g = m.p("guarded");
    fs::write(&g, b"secret").unwrap();
    fs::set_permissions(&g, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(getx(&g, "system.posix_acl_access"), Err(libc::ENODATA));
    assert!(listx(&g).is_empty());
    assert!(read_as_nobody(&g), "mode 0644 lets others read");
    let st = Command::new("setfacl")
        .args(["-m", "u:nobody:---"])
        .arg(&g)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!read_as_nobody(&g), "the ACL denies nobody");
    assert!(getx(&g, "system.posix_acl_access").is_ok());
    assert_eq!(listx(&g), vec!["system.posix_acl_access"]);
    // Still so once the kernel has forgotten the inode.
    let st = Command::new("sh")
        .args(["-c", "echo 3 > /proc/sys/vm/drop_caches"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!read_as_nobody(&g), "the ACL still denies nobody");
    let out = Command::new("getfacl").arg("-c").arg(&g).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("user:nobody:---"));
    // Removing it gives the mode back.
    let st = Command::new("setfacl").arg("-b").arg(&g).status().unwrap();
    assert!(st.success());
    assert_eq!(getx(&g, "system.posix_acl_access"), Err(libc::ENODATA));
    assert!(read_as_nobody(&g));
}

/// A listing restarted with rewinddir shows entries made since opendir (the
/// first pass reuses opendir's snapshot, a restart takes a new one), and an
/// unlinked open file keeps the times set on it.
#[test]
fn rewinddir_sees_new_entries_and_an_unlinked_file_keeps_its_times() {
    let m = Volume::create(false).mount();
    let d = m.p("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("a"), b"a").unwrap();
    let cd = c(&d);
    // SAFETY: valid C string; the stream is closed below.
    let dir = unsafe { libc::opendir(cd.as_ptr()) };
    assert!(!dir.is_null());
    let names = |dir: *mut libc::DIR| {
        let mut v = Vec::new();
        loop {
            // SAFETY: `dir` is an open stream.
            let e = unsafe { libc::readdir(dir) };
            if e.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid entry with a C string name.
            let n = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
            let n = n.to_string_lossy().into_owned();
            if n != "." && n != ".." {
                v.push(n);
            }
        }
        v.sort();
        v
    };
    assert_eq!(names(dir), vec!["a"]);
    fs::write(d.join("b"), b"b").unwrap();
    // SAFETY: `dir` is an open stream.
    unsafe { libc::rewinddir(dir) };
    assert_eq!(names(dir), vec!["a", "b"]);
    // SAFETY: closes the stream opened above.
    unsafe { libc::closedir(dir) };

    let p = d.join("open-unlinked");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"data", 0).unwrap();
    fs::remove_file(&p).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
    for _ in 0..2 {
        f.set_modified(t).unwrap();
        let md = f.metadata().unwrap();
        assert_eq!(md.mtime(), 1_500_000_000);
        assert_eq!(md.nlink(), 0);
    }
    let t2 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    f.set_modified(t2).unwrap();
    assert_eq!(f.metadata().unwrap().mtime(), 1_600_000_000);
}
