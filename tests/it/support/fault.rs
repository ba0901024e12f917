//! Helpers for the fault tests: a mount daemon that can be SIGKILLed and
//! remounted (unlike `mount::Mounted`, which expects a clean exit), a small
//! tmpfs that is unmounted on drop, and the daemon's peak RSS.
//!
//! Used together with `support/mount.rs` (the test crate declares both as
//! `mod mount;` and `mod fault;`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::mount::{KMFS, Volume, is_mounted};

/// Whether a long variant was asked for (`KMFS_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var("KMFS_LONG_TESTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A `kmfs mount -f` daemon running in the background.
pub struct Daemon {
    child: Option<Child>,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

fn stamp() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

impl Daemon {
    /// Mounts a key-file volume (`kmfs mount --keyfile K -f BACKING MNT`).
    pub fn mount(vol: &Volume) -> Daemon {
        let args: Vec<OsString> = vec![
            "mount".into(),
            "--keyfile".into(),
            vol.key.clone().into(),
            "-f".into(),
            vol.backing.clone().into(),
            vol.mnt.clone().into(),
        ];
        Daemon::spawn(&args, &vol.mnt, vol.dir.path())
    }

    /// `kmfs init --create-kek --config CFG BACK`, then a foreground mount of
    /// BACK on `mnt` with the same config (logs in `logdir`).
    pub fn init_and_mount(cfg: &Path, back: &Path, mnt: &Path, logdir: &Path) -> Daemon {
        std::fs::create_dir_all(back).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        let o = Command::new(KMFS)
            .args(["init", "--create-kek", "--config"])
            .arg(cfg)
            .arg(back)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kmfs init: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Daemon::mount_config(cfg, back, mnt, logdir)
    }

    /// `kmfs mount --config CFG -f BACK MNT` (logs in `logdir`).
    pub fn mount_config(cfg: &Path, back: &Path, mnt: &Path, logdir: &Path) -> Daemon {
        let args: Vec<OsString> = vec![
            "mount".into(),
            "--config".into(),
            cfg.into(),
            "-f".into(),
            back.into(),
            mnt.into(),
        ];
        Daemon::spawn(&args, mnt, logdir)
    }

    /// Runs `kmfs ARGS` (a foreground mount of `mnt`), logging stderr to a file
    /// in `logdir`, and waits until the mount is live.
    pub fn spawn(args: &[OsString], mnt: &Path, logdir: &Path) -> Daemon {
        let log = logdir.join(format!("daemon-{}.log", stamp()));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(KMFS)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(mnt) {
            if let Some(st) = d.try_wait() {
                panic!(
                    "kmfs mount exited with {st} before the mount was live:\n{}",
                    d.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount not live after 20 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Peak resident set size of the daemon in KiB (VmHWM), if it is running.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// SIGKILLs the daemon, reaps it and detaches the dead mount (after
    /// SIGKILL the mount answers "Transport endpoint is not connected").
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
        detach(&self.mnt);
    }

    /// Clean unmount; returns the daemon's exit status.
    pub fn unmount(&mut self) -> Option<ExitStatus> {
        // Without a daemon (killed) there is nothing of ours mounted: a mount
        // at `mnt` now belongs to a successor.
        self.child.as_ref()?;
        if is_mounted(&self.mnt) {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                detach(&self.mnt);
            }
        }
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Lazily detaches whatever is mounted at `mnt` (dead FUSE mounts included).
pub fn detach(mnt: &Path) {
    for _ in 0..50 {
        if !is_mounted(mnt) {
            return;
        }
        let ok = Command::new("fusermount3")
            .arg("-uz")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(mnt).status();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} is still mounted", mnt.display());
}

/// A tmpfs of a fixed size mounted over a directory; unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "8m") at `path`, keeping what `path`
    /// held (copied in after mounting).
    pub fn over(path: &Path, size: &str) -> Tmpfs {
        let saved = path.with_extension("saved");
        let st = Command::new("cp")
            .arg("-a")
            .arg(path)
            .arg(&saved)
            .status()
            .unwrap();
        assert!(st.success());
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("kmfs-test-tmpfs")
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs failed (tests run as root)");
        let st = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::remove_dir_all(&saved).unwrap();
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
