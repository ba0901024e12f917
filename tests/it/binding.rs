//! Extended-attribute values and symlink targets are bound to their owner
//! (issue 15, finding 3; docs/FORMAT.md 8), on real mounts with the keyfile
//! provider: a value copied onto another backing file, or a symlink target
//! swapped or moved, no longer reads; renames of symlinks keep their target;
//! a volume of format version 2 (unbound values and targets) still mounts
//! and reads, and `kmfs rekey` migrates it to version 3, after which
//! unbound ones are rejected.

use crate::support::cli::{kmfs, text};
use crate::support::mount;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kmfs::crypto::xattr::{BACKING_PREFIX, Mapped, XattrCipher};
use kmfs::kms::keyfile::KeyfileProvider;
use kmfs::volume::{self, Volume as Vol, dirid};
use mount::{Volume, getx, listx, setx};

/// The backing attributes `user.kmfs.*` of backing inode `p` (not a
/// symlink), name → value.
fn backing_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let f = File::open(p).unwrap();
    let raw = kmfs::sys::listxattr(f.as_fd()).unwrap();
    raw.split(|&b| b == 0)
        .filter(|n| n.starts_with(BACKING_PREFIX))
        .map(|n| {
            let v = kmfs::sys::getxattr(f.as_fd(), &CString::new(n).unwrap()).unwrap();
            (n.to_vec(), v)
        })
        .collect()
}

fn set_backing_xattr(p: &Path, name: &[u8], v: &[u8]) {
    let f = File::open(p).unwrap();
    kmfs::sys::setxattr(f.as_fd(), &CString::new(name).unwrap(), v, 0).unwrap();
}

fn clear_backing_xattrs(p: &Path) {
    let f = File::open(p).unwrap();
    for (n, _) in backing_xattrs(p) {
        kmfs::sys::removexattr(f.as_fd(), &CString::new(n).unwrap()).unwrap();
    }
}

/// The unlocked volume (library), for planting fixtures in the backing
/// directory as an older kmfs or an attacker would.
fn open(vol: &Volume) -> Vol {
    let p = KeyfileProvider::open(&vol.key, None).unwrap();
    Vol::open(&vol.backing, &p).unwrap()
}

/// The backing path of plaintext path `rel` (components below the root) on
/// an encrypted-names volume (short names only).
fn backing_of(v: &Vol, rel: &str) -> PathBuf {
    let (_, k) = v.keys.generations.active_keys();
    let mut p = v.backing.clone();
    for c in rel.split('/') {
        let (id, _) = dirid::read(&p).unwrap();
        p = p.join(k.names.encrypt(&id, c.as_bytes()).unwrap().backing());
    }
    p
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

/// A file capability (VFS_CAP_REVISION_2, effective, CAP_NET_ADMIN): what
/// the kernel accepts as `security.capability`.
fn cap_blob() -> Vec<u8> {
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u32 << 12).to_le_bytes());
    v.extend_from_slice(&[0u8; 12]);
    v
}

/// Finding 3: encrypted attribute values copied from one backing file onto
/// another (a user who can read the backing store takes the file
/// capability of a file they cannot change and puts it on their own file)
/// do not authenticate on the other file. Fails before the fix: the copied
/// `user.secret` and `security.capability` read back on B.
#[test]
fn attribute_values_copied_to_another_file_do_not_authenticate() {
    let m = Volume::create(false).mount();
    fs::write(m.p("a"), b"file A").unwrap();
    fs::write(m.p("b"), b"file B").unwrap();
    fs::create_dir(m.p("d1")).unwrap();
    fs::create_dir(m.p("d2")).unwrap();
    assert_eq!(setx(&m.p("a"), "user.secret", b"top secret"), 0);
    assert_eq!(setx(&m.p("a"), "security.capability", &cap_blob()), 0);
    assert_eq!(setx(&m.p("d1"), "user.dir", b"dir value"), 0);
    assert_eq!(getx(&m.p("a"), "security.capability").unwrap(), cap_blob());
    let vol = m.unmount();

    let v = open(&vol);
    let (ba, bb) = (backing_of(&v, "a"), backing_of(&v, "b"));
    let from_a = backing_xattrs(&ba);
    assert_eq!(from_a.len(), 2);
    for (n, val) in &from_a {
        set_backing_xattr(&bb, n, val);
    }
    for (n, val) in backing_xattrs(&backing_of(&v, "d1")) {
        set_backing_xattr(&backing_of(&v, "d2"), &n, &val);
    }
    drop(v);

    let m = vol.mount();
    assert_eq!(getx(&m.p("a"), "user.secret").unwrap(), b"top secret");
    assert_eq!(getx(&m.p("a"), "security.capability").unwrap(), cap_blob());
    assert_eq!(getx(&m.p("d1"), "user.dir").unwrap(), b"dir value");
    assert_eq!(getx(&m.p("b"), "user.secret"), Err(libc::EIO));
    assert_eq!(getx(&m.p("b"), "security.capability"), Err(libc::EIO));
    assert_eq!(getx(&m.p("d2"), "user.dir"), Err(libc::EIO));
    assert!(listx(&m.p("b")).is_empty(), "{:?}", listx(&m.p("b")));
    assert!(listx(&m.p("d2")).is_empty());
    assert_eq!(fs::read(m.p("b")).unwrap(), b"file B");
    assert!(m.daemon_log().contains("does not authenticate"));
    let vol = m.unmount();
    // kmfs check names them.
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert_eq!(t.matches("copied from another file").count(), 3, "{t}");
}

/// A setxattr on a file without a header (made by mknod, 0 bytes) writes
/// the header first, so the value has a file id to be bound to; the file
/// still reads empty and takes writes.
#[test]
fn attributes_on_an_empty_file_without_a_header() {
    let m = Volume::create(false).mount();
    let e = CString::new(m.p("e").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mknod(e.as_ptr(), libc::S_IFREG | 0o644, 0) },
        0
    );
    assert_eq!(setx(&m.p("e"), "user.x", b"on empty"), 0);
    assert_eq!(getx(&m.p("e"), "user.x").unwrap(), b"on empty");
    assert_eq!(fs::metadata(m.p("e")).unwrap().len(), 0);
    fs::write(m.p("e"), b"now data").unwrap();
    assert_eq!(getx(&m.p("e"), "user.x").unwrap(), b"on empty");
    let vol = m.unmount();
    let m = vol.mount();
    assert_eq!(getx(&m.p("e"), "user.x").unwrap(), b"on empty");
    assert_eq!(fs::read(m.p("e")).unwrap(), b"now data");
}

/// Finding 3: symlink targets swapped between two backing symlinks, or
/// moved in from another directory, give EIO. Fails before the fix:
/// readlink returns the other link's target.
#[test]
fn symlink_targets_swapped_or_moved_give_eio() {
    let m = Volume::create(false).mount();
    fs::create_dir(m.p("d")).unwrap();
    std::os::unix::fs::symlink("/target/one", m.p("t1")).unwrap();
    std::os::unix::fs::symlink("/target/two", m.p("t2")).unwrap();
    std::os::unix::fs::symlink("/target/three", m.p("d/t3")).unwrap();
    std::os::unix::fs::symlink("/target/four", m.p("t4")).unwrap();
    let vol = m.unmount();

    let v = open(&vol);
    let (b1, b2, b3) = (
        backing_of(&v, "t1"),
        backing_of(&v, "t2"),
        backing_of(&v, "d/t3"),
    );
    let (s1, s2, s3) = (
        fs::read_link(&b1).unwrap(),
        fs::read_link(&b2).unwrap(),
        fs::read_link(&b3).unwrap(),
    );
    fs::remove_file(&b1).unwrap();
    fs::remove_file(&b2).unwrap();
    std::os::unix::fs::symlink(&s2, &b1).unwrap();
    std::os::unix::fs::symlink(&s3, &b2).unwrap();
    // And a whole backing symlink moved from d/ to the root under t4's name.
    let b4 = backing_of(&v, "t4");
    fs::remove_file(&b4).unwrap();
    fs::rename(&b3, &b4).unwrap();
    let _ = s1;
    drop(v);

    let m = vol.mount();
    assert_eq!(errno_of(fs::read_link(m.p("t1"))), libc::EIO);
    assert_eq!(errno_of(fs::read_link(m.p("t2"))), libc::EIO);
    assert_eq!(errno_of(fs::read_link(m.p("t4"))), libc::EIO);
    assert!(m.daemon_log().contains("op=readlink"));
    let vol = m.unmount();
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    let t = text(&o);
    assert_eq!(
        t.matches("moved or copied from elsewhere").count(),
        3,
        "{t}"
    );
}

/// Every entry of the backing tree whose name is a leftover temporary.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    mount::all_files(dir)
        .into_iter()
        .filter(|p| p.file_name().unwrap().as_bytes().starts_with(b"kmfs.tmp."))
        .collect()
}

fn rename2(a: &Path, b: &Path, flags: u32) -> i32 {
    let (ca, cb) = (
        CString::new(a.as_os_str().as_bytes()).unwrap(),
        CString::new(b.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

fn symlink_renames(plaintext: bool) {
    let m = Volume::create(plaintext).mount();
    let rl = |p: &str| fs::read_link(m.p(p)).map(|t| t.to_string_lossy().into_owned());
    fs::create_dir(m.p("d")).unwrap();
    std::os::unix::fs::symlink("../target one", m.p("l")).unwrap();
    let ino = fs::symlink_metadata(m.p("l")).unwrap().ino();
    // Same directory: same inode as the kernel sees it, target kept.
    fs::rename(m.p("l"), m.p("l2")).unwrap();
    assert_eq!(rl("l2").unwrap(), "../target one");
    assert_eq!(fs::symlink_metadata(m.p("l2")).unwrap().ino(), ino);
    assert_eq!(errno_of(fs::symlink_metadata(m.p("l"))), libc::ENOENT);
    // Into another directory, then under a long name, and back.
    fs::rename(m.p("l2"), m.p("d/l3")).unwrap();
    assert_eq!(rl("d/l3").unwrap(), "../target one");
    let long = format!("d/{}", "s".repeat(240));
    fs::rename(m.p("d/l3"), m.p(&long)).unwrap();
    assert_eq!(rl(&long).unwrap(), "../target one");
    fs::rename(m.p(&long), m.p("l")).unwrap();
    assert_eq!(rl("l").unwrap(), "../target one");
    // Over an existing file and over another symlink.
    fs::write(m.p("f"), b"file").unwrap();
    fs::rename(m.p("l"), m.p("f")).unwrap();
    assert_eq!(rl("f").unwrap(), "../target one");
    std::os::unix::fs::symlink("/other", m.p("o")).unwrap();
    fs::rename(m.p("f"), m.p("o")).unwrap();
    assert_eq!(rl("o").unwrap(), "../target one");
    // RENAME_NOREPLACE onto an existing name changes nothing.
    std::os::unix::fs::symlink("/third", m.p("t")).unwrap();
    assert_eq!(
        rename2(&m.p("o"), &m.p("t"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(rl("o").unwrap(), "../target one");
    assert_eq!(rl("t").unwrap(), "/third");
    // Onto a directory: EISDIR, as on any filesystem.
    assert_eq!(rename2(&m.p("o"), &m.p("d"), 0), libc::EISDIR);
    // RENAME_EXCHANGE with symlinks (xfstests generic/025): each link is
    // re-created for its new place, the kernel's inode goes along. Link and
    // file, link and link, link and directory across directories, and back.
    fs::write(m.p("g"), b"g").unwrap();
    let ino_o = fs::symlink_metadata(m.p("o")).unwrap().ino();
    let x = |a: &str, b: &str| rename2(&m.p(a), &m.p(b), libc::RENAME_EXCHANGE);
    assert_eq!(x("o", "g"), 0);
    assert_eq!(rl("g").unwrap(), "../target one");
    assert_eq!(fs::symlink_metadata(m.p("g")).unwrap().ino(), ino_o);
    assert_eq!(fs::read(m.p("o")).unwrap(), b"g");
    assert_eq!(x("g", "t"), 0);
    assert_eq!(rl("t").unwrap(), "../target one");
    assert_eq!(rl("g").unwrap(), "/third");
    fs::create_dir(m.p("d/sub")).unwrap();
    assert_eq!(x("t", "d/sub"), 0);
    assert_eq!(rl("d/sub").unwrap(), "../target one");
    assert!(fs::symlink_metadata(m.p("t")).unwrap().is_dir());
    assert_eq!(x("t", "d/sub"), 0);
    fs::remove_dir(m.p("d/sub")).unwrap();
    assert_eq!(x("t", "g"), 0);
    assert_eq!(x("g", "o"), 0);
    assert_eq!(rl("o").unwrap(), "../target one");
    assert_eq!(rl("t").unwrap(), "/third");
    assert_eq!(fs::read(m.p("g")).unwrap(), b"g");
    // RENAME_WHITEOUT of a symlink (generic/078): re-created at the new
    // place, a whiteout at the old one.
    std::os::unix::fs::symlink("wt", m.p("w")).unwrap();
    assert_eq!(rename2(&m.p("w"), &m.p("d/w2"), libc::RENAME_WHITEOUT), 0);
    assert_eq!(rl("d/w2").unwrap(), "wt");
    let wo = fs::symlink_metadata(m.p("w")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wo.file_type()) && wo.rdev() == 0);
    fs::remove_file(m.p("w")).unwrap();
    fs::remove_file(m.p("d/w2")).unwrap();
    // A hard link to a symlink: EPERM (one name, one binding).
    assert_eq!(errno_of(fs::hard_link(m.p("o"), m.p("o2"))), libc::EPERM);
    // Renaming the directory that holds a symlink keeps it readable.
    std::os::unix::fs::symlink("inside", m.p("d/in")).unwrap();
    fs::rename(m.p("d"), m.p("d2")).unwrap();
    assert_eq!(rl("d2/in").unwrap(), "inside");
    assert!(temporaries(m.backing()).is_empty());
    let vol = m.unmount();
    let m = vol.mount();
    assert_eq!(
        fs::read_link(m.p("o")).unwrap().to_string_lossy(),
        "../target one"
    );
    assert_eq!(fs::read_link(m.p("t")).unwrap().to_string_lossy(), "/third");
    assert_eq!(
        fs::read_link(m.p("d2/in")).unwrap().to_string_lossy(),
        "inside"
    );
    assert_eq!(
        fs::symlink_metadata(m.p("o")).unwrap().len(),
        "../target one".len() as u64
    );
    let mut names: Vec<String> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["d2", "g", "o", "t"]);
    let vol = m.unmount();
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn symlink_renames_keep_their_target() {
    symlink_renames(false);
}

#[test]
fn symlink_renames_keep_their_target_with_plaintext_names() {
    symlink_renames(true);
}

/// Makes the volume look as kmfs before format version 3 left it: header
/// version 2, every attribute value in the unbound version 1 form, every
/// symlink target unbound. `attrs` are (plaintext path, name, value),
/// `links` (plaintext path, target).
fn make_version_2(vol: &Volume, attrs: &[(&str, &str, &[u8])], links: &[(&str, &str)]) {
    let mut v = open(vol);
    let mut h = v.header.clone();
    h.version = volume::header::VERSION_2;
    v.store_header(h).unwrap();
    let (_, k) = v.keys.generations.active_keys();
    let xc = XattrCipher::new(&k.metadata);
    for (p, _, _) in attrs {
        clear_backing_xattrs(&backing_of(&v, p));
    }
    for (p, name, value) in attrs {
        let Mapped::Encrypted(b) = xc.map_name(name.as_bytes()).unwrap() else {
            panic!()
        };
        let blob = xc.seal_unbound(&b, name.as_bytes(), value).unwrap();
        set_backing_xattr(&backing_of(&v, p), &b, &blob);
    }
    for (p, target) in links {
        let b = backing_of(&v, p);
        fs::remove_file(&b).unwrap();
        let t = k.names.encrypt_symlink_unbound(target.as_bytes()).unwrap();
        std::os::unix::fs::symlink(t, &b).unwrap();
    }
}

fn header_version(vol: &Volume) -> u16 {
    volume::read_header(&vol.backing).unwrap().0.version
}

/// A volume of format version 2 (unbound values and targets, one value on
/// a file without a header) mounts and reads with a warning; new values are
/// written bound; an offline `kmfs rekey` binds everything and stores
/// version 3; from then on an unbound value or target planted in the
/// backing store is rejected.
#[test]
fn a_version_2_volume_mounts_and_a_rekey_migrates_it() {
    let m = Volume::create(false).mount();
    fs::write(m.p("f"), b"contents").unwrap();
    fs::write(m.p("e"), b"").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/g"), b"g").unwrap();
    std::os::unix::fs::symlink("/abs/target", m.p("l")).unwrap();
    std::os::unix::fs::symlink("rel", m.p("d/l2")).unwrap();
    let vol = m.unmount();
    let cap = cap_blob();
    let attrs: &[(&str, &str, &[u8])] = &[
        ("f", "user.a", b"one"),
        ("f", "security.capability", &cap),
        ("d", "user.b", b"two"),
        ("e", "user.c", b"three"),
    ];
    let links = [("l", "/abs/target"), ("d/l2", "rel")];
    make_version_2(&vol, attrs, &links);
    // `e` as an older kmfs or mknod left it: no header at all.
    fs::OpenOptions::new()
        .write(true)
        .open(backing_of(&open(&vol), "e"))
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(header_version(&vol), 2);

    let m = vol.mount();
    for (p, n, v) in attrs {
        assert_eq!(getx(&m.p(p), n).unwrap(), *v, "{p} {n}");
    }
    assert_eq!(listx(&m.p("f")), ["security.capability", "user.a"]);
    assert_eq!(
        fs::read_link(m.p("l")).unwrap().to_string_lossy(),
        "/abs/target"
    );
    assert_eq!(fs::read_link(m.p("d/l2")).unwrap().to_string_lossy(), "rel");
    assert!(
        m.daemon_log().contains("run kmfs rekey"),
        "{}",
        m.daemon_log()
    );
    // Written while not migrated: bound.
    assert_eq!(setx(&m.p("d/g"), "user.new", b"new"), 0);
    std::os::unix::fs::symlink("fresh", m.p("d/l3")).unwrap();
    let vol = m.unmount();
    let v = open(&vol);
    let (_, k) = v.keys.generations.active_keys();
    for (_, blob) in backing_xattrs(&backing_of(&v, "d/g")) {
        assert_eq!(blob[0], 2);
    }
    let (id, _) = dirid::read(&backing_of(&v, "d")).unwrap();
    let stored = fs::read_link(backing_of(&v, "d/l3")).unwrap();
    assert_eq!(
        k.names
            .decrypt_symlink(&id, b"l3", stored.as_os_str().as_bytes())
            .unwrap(),
        b"fresh"
    );
    drop(v);
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    assert!(
        text(&o).contains("6 extended-attribute value(s) and symlink target(s) are not bound"),
        "{}",
        text(&o)
    );

    let o = kmfs(&[
        &"rekey",
        &"--keyfile",
        &vol.key,
        &"--cpu",
        &"100",
        &vol.backing,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(header_version(&vol), 3);
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("not bound"), "{}", text(&o));

    let v = open(&vol);
    for p in ["f", "d", "e", "d/g"] {
        for (_, blob) in backing_xattrs(&backing_of(&v, p)) {
            assert_eq!(blob[0], 2, "{p}");
        }
    }
    assert_eq!(fs::metadata(backing_of(&v, "e")).unwrap().len(), 40);
    drop(v);
    let m = vol.mount();
    for (p, n, v) in attrs {
        assert_eq!(getx(&m.p(p), n).unwrap(), *v, "{p} {n}");
    }
    assert_eq!(getx(&m.p("d/g"), "user.new").unwrap(), b"new");
    assert_eq!(
        fs::read_link(m.p("l")).unwrap().to_string_lossy(),
        "/abs/target"
    );
    assert_eq!(fs::read_link(m.p("d/l2")).unwrap().to_string_lossy(), "rel");
    assert_eq!(
        fs::read_link(m.p("d/l3")).unwrap().to_string_lossy(),
        "fresh"
    );
    assert_eq!(fs::read(m.p("f")).unwrap(), b"contents");
    assert!(!m.daemon_log().contains("run kmfs rekey"));
    let vol = m.unmount();

    // Migrated: unbound forms planted now are rejected.
    make_version_2_forms_only(&vol, &[("f", "user.a", b"planted")], &[("l", "/planted")]);
    let m = vol.mount();
    assert_eq!(getx(&m.p("f"), "user.a"), Err(libc::EIO));
    assert!(!listx(&m.p("f")).contains(&"user.a".to_string()));
    assert_eq!(errno_of(fs::read_link(m.p("l"))), libc::EIO);
}

/// Plants unbound values and targets without touching the header version.
fn make_version_2_forms_only(vol: &Volume, attrs: &[(&str, &str, &[u8])], links: &[(&str, &str)]) {
    let v = open(vol);
    let (_, k) = v.keys.generations.active_keys();
    let xc = XattrCipher::new(&k.metadata);
    for (p, name, value) in attrs {
        let Mapped::Encrypted(b) = xc.map_name(name.as_bytes()).unwrap() else {
            panic!()
        };
        let blob = xc.seal_unbound(&b, name.as_bytes(), value).unwrap();
        set_backing_xattr(&backing_of(&v, p), &b, &blob);
    }
    for (p, target) in links {
        let b = backing_of(&v, p);
        fs::remove_file(&b).unwrap();
        let t = k.names.encrypt_symlink_unbound(target.as_bytes()).unwrap();
        std::os::unix::fs::symlink(t, &b).unwrap();
    }
}

/// The same migration by an online rekey of the mounted volume: reads go on
/// during and after it, the header becomes version 3 while mounted, and the
/// running daemon rejects unbound forms from then on.
#[test]
fn an_online_rekey_migrates_a_mounted_version_2_volume() {
    let m = Volume::create(false).mount();
    fs::write(m.p("f"), b"data").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    std::os::unix::fs::symlink("/abs/t", m.p("d/l")).unwrap();
    let vol = m.unmount();
    make_version_2(&vol, &[("f", "user.a", b"one")], &[("d/l", "/abs/t")]);
    let m = vol.mount();
    assert_eq!(getx(&m.p("f"), "user.a").unwrap(), b"one");
    assert_eq!(
        fs::read_link(m.p("d/l")).unwrap().to_string_lossy(),
        "/abs/t"
    );
    let o = kmfs(&[&"rekey", &"--cpu", &"100", &"--wait", &m.mnt()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(header_version(m.vol()), 3);
    assert_eq!(getx(&m.p("f"), "user.a").unwrap(), b"one");
    assert_eq!(
        fs::read_link(m.p("d/l")).unwrap().to_string_lossy(),
        "/abs/t"
    );
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    // Planted behind the running daemon's back: rejected at once.
    make_version_2_forms_only(m.vol(), &[("f", "user.a", b"planted")], &[]);
    assert_eq!(getx(&m.p("f"), "user.a"), Err(libc::EIO));
}
