//! Test harness for real FUSE mounts of the `kmfs` binary: a temporary
//! directory with `keys/` (0700, key file 0600), `back/` (the backing
//! directory, `kmfs init --keyfile`) and `mnt/`. `Mounted` runs
//! `kmfs mount --keyfile K -f back mnt` in the background, waits until the
//! mount is live, and unmounts and reaps the daemon on drop.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use super::cli::{KMFS, is_mounted};

/// A volume on disk: key, backing directory, mountpoint.
pub struct Volume {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub backing: PathBuf,
    pub mnt: PathBuf,
}

impl Volume {
    /// Creates and initialises a volume (encrypted names unless `plaintext`).
    pub fn create(plaintext: bool) -> Volume {
        Volume::create_on(plaintext, |_| {})
    }

    /// [`Volume::create`], with `prepare` run on the empty backing
    /// directory before `kmfs init` (e.g. to mount a filesystem there).
    pub fn create_on(plaintext: bool, prepare: impl FnOnce(&Path)) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        // Other users (tests that switch uid) must reach the mountpoint.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = keys.join("key");
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).unwrap();
        std::fs::write(&key, k).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let backing = dir.path().join("back");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        prepare(&backing);
        let mut c = Command::new(KMFS);
        c.arg("init").arg("--keyfile").arg(&key);
        if plaintext {
            c.arg("--plaintext-names");
        }
        let out = c.arg(&backing).output().unwrap();
        assert!(
            out.status.success(),
            "kmfs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Volume {
            dir,
            key,
            backing,
            mnt,
        }
    }

    /// Runs `kmfs mount` with extra arguments (not waiting, returns output) —
    /// for commands expected to fail or to daemonise.
    pub fn mount_cmd(&self, extra: &[&str]) -> Output {
        Command::new(KMFS)
            .arg("mount")
            .arg("--keyfile")
            .arg(&self.key)
            .args(extra)
            .arg(&self.backing)
            .arg(&self.mnt)
            .output()
            .unwrap()
    }

    /// Mounts in the foreground (background child) and waits until live.
    pub fn mount(self) -> Mounted {
        self.mount_with(&[])
    }

    pub fn mount_with(self, opts: &[&str]) -> Mounted {
        self.mount_via(&[], opts)
    }

    /// Mounts in the foreground with the daemon started through `wrapper`
    /// (a command that execs its arguments, e.g. `prlimit --nofile=N:N`),
    /// so the child's pid is the daemon's.
    pub fn mount_via(self, wrapper: &[&str], opts: &[&str]) -> Mounted {
        let log = self.dir.path().join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(KMFS);
                c
            }
            None => Command::new(KMFS),
        };
        let child = cmd
            .arg("mount")
            .arg("--keyfile")
            .arg(&self.key)
            .arg("-f")
            .args(opts)
            .arg(&self.backing)
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut m = Mounted {
            vol: Some(self),
            child: Some(child),
            log,
        };
        m.wait_live();
        m
    }
}

pub struct Mounted {
    vol: Option<Volume>,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Mounted {
    pub fn vol(&self) -> &Volume {
        self.vol.as_ref().unwrap()
    }
    pub fn mnt(&self) -> &Path {
        &self.vol().mnt
    }
    pub fn backing(&self) -> &Path {
        &self.vol().backing
    }
    /// A path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt().join(rel)
    }

    /// The daemon's pid (the foreground `kmfs mount` child).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mounted in the foreground").id()
    }

    pub fn daemon_log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn wait_live(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if is_mounted(self.mnt()) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "kmfs mount exited with {st} before the mount was live:\n{}",
                    self.daemon_log()
                );
            }
            if Instant::now() > deadline {
                panic!("mount not live after 20 s:\n{}", self.daemon_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts (fusermount3 -u, then lazy umount) and waits for the daemon.
    /// Returns the daemon's exit status.
    pub fn unmount_inner(&mut self) -> Option<std::process::ExitStatus> {
        let mnt = self.mnt().to_path_buf();
        if is_mounted(&mnt) {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&mnt)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
            }
        }
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts and gives the volume back (for remounting).
    pub fn unmount(mut self) -> Volume {
        let st = self.unmount_inner();
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon exit status {st:?}:\n{}",
            self.daemon_log()
        );
        self.vol.take().unwrap()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Waits for the daemon to exit by itself (after a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.vol.is_some() {
            self.unmount_inner();
        }
    }
}

/// Every regular file below `dir`, recursively (contents), for scanning the
/// backing directory.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out
}

pub use super::rng::pattern;

/// Drops the kernel's page, dentry and inode caches (as root), so the next
/// access goes through the daemon again. Machine-wide, but harmless to
/// tests running at the same time: they only get slower.
pub fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (needs root)");
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).unwrap()
}

/// setxattr(2) on `p`; 0 or the errno.
pub fn setx(p: &Path, name: &str, v: &[u8]) -> i32 {
    let (cp, cn) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::setxattr(cp.as_ptr(), cn.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

/// getxattr(2) on `p`: the value or the errno.
pub fn getx(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (cp, cn) = (cpath(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings; buf is writable.
    let r = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// listxattr(2) on `p`, sorted.
pub fn listx(p: &Path) -> Vec<String> {
    let cp = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string; buf is writable.
    let r = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0);
    buf.truncate(r as usize);
    let mut v: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}
