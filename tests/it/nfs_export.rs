//! NFS export (issue 16): file handles of a kmfs mount, as the kernel's NFS
//! server uses them. A handle is taken with `name_to_handle_at` on the
//! mount; the kernel's caches are dropped (so it forgets the inode, and the
//! daemon with it) or the daemon is restarted; `open_by_handle_at` must then
//! reach the same file, which the kernel asks the daemon for by LOOKUP of
//! "." in the handle's node id. Before node ids were derived from backing
//! handles (and without FUSE_EXPORT_SUPPORT), every reopen gave ESTALE.
//!
//! Handles from outside are untrusted: a forged handle naming a directory
//! outside the volume, or the volume's own header file, must give ESTALE.

use crate::support::mount::{Volume, drop_caches};

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MAX: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct Handle {
    bytes: libc::c_uint,
    kind: libc::c_int,
    f: [u8; MAX],
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// name_to_handle_at(2) of `p` (not following a symlink).
fn handle_of(p: &Path) -> Handle {
    let mut h = Handle {
        bytes: MAX as libc::c_uint,
        kind: 0,
        f: [0; MAX],
    };
    let mut mount_id = 0;
    let c = cpath(p);
    // SAFETY: `h` is a file_handle with room for MAX bytes; `c` is a C string.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            (&raw mut h).cast(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    h
}

/// open_by_handle_at(2) on the filesystem of `mount`.
fn open_handle(mount: &Path, h: &Handle, flags: libc::c_int) -> io::Result<File> {
    let m = File::open(mount)?;
    let mut copy = *h;
    // SAFETY: `copy` is a valid file_handle; the result is a new descriptor.
    let fd = unsafe { libc::open_by_handle_at(m.as_raw_fd(), (&raw mut copy).cast(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn read(f: &mut File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn estale(r: io::Result<File>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::ESTALE))
}

/// A tmpfs mounted on a directory, unmounted when dropped.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub(crate) fn mount(on: &Path) -> Tmpfs {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "kmfs-export-test"])
            .arg(on)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs on {}", on.display());
        Tmpfs(on.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A FUSE handle (fuse_encode_fh: node id high and low words, generation;
/// type 0x81) naming node id `id`.
fn fuse_handle(id: u64, generation: u32) -> Handle {
    let mut h = Handle {
        bytes: 12,
        kind: 0x81,
        f: [0; MAX],
    };
    for (i, w) in [(id >> 32) as u32, id as u32, generation]
        .iter()
        .enumerate()
    {
        h.f[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    h
}

/// The node id kmfs derives for backing path `p` (docs/FORMAT.md has no
/// part in it: it is the id scheme of src/fs/export.rs), from its backing
/// handle; `None` where the layout is not ext4's or tmpfs's.
fn derived_id(p: &Path) -> Option<u64> {
    let h = handle_of(p);
    let ino = std::fs::symlink_metadata(p).unwrap().ino();
    let w = |i: usize| u32::from_le_bytes(h.f[i * 4..i * 4 + 4].try_into().unwrap());
    let (i, g) = match h.bytes {
        8 => (u64::from(w(0)), w(1)),
        12 => (u64::from(w(2)) << 32 | u64::from(w(1)), w(0)),
        _ => return None,
    };
    (i == ino).then_some(u64::from(g) << 32 | i)
}

#[test]
fn file_handles_survive_cache_drops_and_daemon_restarts() {
    let mut fs = None;
    let vol = Volume::create_on(false, |b| fs = Some(Tmpfs::mount(b)));
    let _fs = fs;
    let m = vol.mount();
    std::fs::create_dir_all(m.p("dir/sub")).unwrap();
    std::fs::write(m.p("dir/sub/file"), b"through a handle\n").unwrap();
    std::fs::hard_link(m.p("dir/sub/file"), m.p("link")).unwrap();
    let ino = std::fs::metadata(m.p("dir/sub/file")).unwrap().ino();
    let (hf, hd, hl) = (
        handle_of(&m.p("dir/sub/file")),
        handle_of(&m.p("dir/sub")),
        handle_of(&m.p("link")),
    );
    assert_eq!(hf.f[..12], hl.f[..12], "hard links share a handle");

    drop_caches();
    let mut f = open_handle(m.mnt(), &hf, libc::O_RDONLY).expect("file handle after a cache drop");
    assert_eq!(read(&mut f), b"through a handle\n");
    drop(f);
    let d = open_handle(m.mnt(), &hd, libc::O_RDONLY | libc::O_DIRECTORY)
        .expect("directory handle after a cache drop");
    assert_eq!(
        d.metadata().unwrap().ino(),
        std::fs::metadata(m.p("dir/sub")).unwrap().ino()
    );
    drop(d);

    // A new daemon knows nothing of the old one's inodes.
    let m = m.unmount().mount();
    assert_eq!(
        std::fs::metadata(m.p("dir/sub/file")).unwrap().ino(),
        ino,
        "stable inode numbers"
    );
    drop_caches();
    let mut f = open_handle(m.mnt(), &hf, libc::O_RDWR).expect("file handle after a restart");
    assert_eq!(read(&mut f), b"through a handle\n");
    drop(f);
    let d = open_handle(m.mnt(), &hd, libc::O_RDONLY | libc::O_DIRECTORY)
        .expect("directory handle after a restart");
    let names: Vec<_> = std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["file"],
        "the directory reopened by handle lists its entries"
    );
    drop(d);

    // The volume's own header is not a file of the volume.
    let header = derived_id(&m.backing().join("kmfs.volume")).expect("tmpfs handle layout");
    drop_caches();
    assert!(estale(open_handle(
        m.mnt(),
        &fuse_handle(header, 0),
        libc::O_RDONLY
    )));

    // A removed file's handle is stale, also after its inode is forgotten.
    std::fs::remove_file(m.p("dir/sub/file")).unwrap();
    std::fs::remove_file(m.p("link")).unwrap();
    drop_caches();
    assert!(estale(open_handle(m.mnt(), &hf, libc::O_RDONLY)));
    m.unmount();
}

#[test]
fn on_a_shared_filesystem_only_directories_reopen_by_handle() {
    let vol = Volume::create(false);
    let outside = vol.dir.path().join("keys");
    let m = vol.mount();
    std::fs::create_dir(m.p("d")).unwrap();
    std::fs::write(m.p("d/f"), b"x").unwrap();
    let (hd, hf) = (handle_of(&m.p("d")), handle_of(&m.p("d/f")));
    let m = m.unmount().mount();
    drop_caches();
    let d = open_handle(m.mnt(), &hd, libc::O_RDONLY | libc::O_DIRECTORY);
    assert!(d.is_ok(), "directory handle after a restart: {:?}", d.err());
    drop(d);
    // The backing directory shares its filesystem: a file reached by a
    // handle alone could be anywhere on it, so it is refused.
    assert!(estale(open_handle(m.mnt(), &hf, libc::O_RDONLY)));
    assert!(m.daemon_log().contains("op=export"), "{}", m.daemon_log());
    // A directory outside the backing directory, named by a forged handle.
    match derived_id(&outside) {
        Some(id) => {
            let r = open_handle(
                m.mnt(),
                &fuse_handle(id, 0),
                libc::O_RDONLY | libc::O_DIRECTORY,
            );
            assert!(
                estale(r),
                "a forged handle reached a directory outside the volume"
            );
        }
        None => crate::support::skip("backing handles of an unknown layout"),
    }
    // And a name lookup still works for the file.
    assert_eq!(std::fs::read(m.p("d/f")).unwrap(), b"x");
    m.unmount();
}
