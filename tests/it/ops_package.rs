//! The Debian package, installed on this machine as an administrator would:
//! build it with cargo-deb (from the kmfs binary under test, staged by
//! scripts/stage-deb-assets.sh), `dpkg -i`, mount a volume with
//! `mount -t fuse.kmfs` through /usr/bin/kmfs, read `man kmfs` and
//! `man 5 kmfs.toml` non-interactively, then `dpkg -r` leaves nothing but
//! the configuration. The machine is put back as it was: the package purged,
//! a /usr/local/bin/kmfs (scripts/test.sh, tests/it/deploy.rs) moved back.

use crate::support::cli;
use cli::{KMFS, is_mounted, text};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LOCAL_KMFS: &str = "/usr/local/bin/kmfs";
const ASIDE: &str = "/usr/local/bin/kmfs.ops-package-test";

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn sh(cmd: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(cmd))
}

/// Puts the machine back: package purged, /usr/local/bin/kmfs restored.
struct Restore {
    mnt: Option<PathBuf>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(m) = &self.mnt
            && is_mounted(m)
        {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = Command::new("dpkg").args(["-P", "kmfs"]).output();
        if Path::new(ASIDE).exists() {
            let _ = std::fs::rename(ASIDE, LOCAL_KMFS);
        }
    }
}

fn cargo_deb_available() -> bool {
    let ok = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        crate::support::skip("cargo-deb is missing (scripts/install-deps.sh installs it)");
    }
    ok
}

#[test]
fn deb_installs_mounts_has_man_pages_and_removes_cleanly() {
    if !cargo_deb_available() {
        return;
    }
    // Installs and removes the package and moves /usr/local/bin/kmfs aside:
    // machine-wide.
    let _serial = crate::support::exclusive();
    let installed = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "kmfs"]));
    if String::from_utf8_lossy(&installed.stdout).contains("install ok installed") {
        panic!("a kmfs package is already installed here; remove it before this test");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kmfs_gen = env!("CARGO_BIN_EXE_kmfs-gen");
    let mut restore = Restore { mnt: None };
    if Path::new(LOCAL_KMFS).exists() {
        std::fs::rename(LOCAL_KMFS, ASIDE).unwrap();
    }

    // Build.
    let o = run(Command::new(root.join("scripts/stage-deb-assets.sh"))
        .arg(KMFS)
        .arg(kmfs_gen)
        .current_dir(root));
    assert!(o.status.success(), "{}", text(&o));
    let out_dir = tempfile::tempdir().unwrap();
    let o = run(Command::new("cargo")
        .args(["deb", "--no-build", "--no-strip", "--fast", "--output"])
        .arg(out_dir.path())
        .current_dir(root));
    assert!(o.status.success(), "{}", text(&o));
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");

    // Install.
    let o = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(o.status.success(), "{}", text(&o));
    let listed = String::from_utf8_lossy(&run(Command::new("dpkg").args(["-L", "kmfs"])).stdout)
        .into_owned();
    for want in [
        "/usr/bin/kmfs",
        "/lib/systemd/system/kmfs@.service",
        "/lib/systemd/system/kmfs-metrics.timer",
        "/etc/logrotate.d/kmfs",
        "/usr/share/doc/kmfs/examples/kmfs.toml",
        "/usr/share/bash-completion/completions/kmfs",
        "/usr/share/zsh/vendor-completions/_kmfs",
        "/usr/share/fish/vendor_completions.d/kmfs.fish",
    ] {
        assert!(listed.lines().any(|l| l == want), "{want} not in\n{listed}");
    }
    assert!(
        listed.contains("/usr/share/man/man8/kmfs-rotate-kek.8"),
        "{listed}"
    );
    assert!(
        listed.contains("/usr/share/man/man5/kmfs.toml.5"),
        "{listed}"
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/kmfs@.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/kmfs mount"), "{unit}");
    let v = run(Command::new("/usr/bin/kmfs").arg("--version"));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("on-disk format"),
        "{}",
        text(&v)
    );

    // mount -t fuse.kmfs right after install, with the system's PATH.
    let tmp = tempfile::tempdir().unwrap();
    let keys = cli::private_dir(tmp.path().join("keys"));
    let key = keys.join("key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let back = tmp.path().join("back");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let o = run(Command::new("/usr/bin/kmfs")
        .args(["init", "--keyfile"])
        .arg(&key)
        .arg(&back));
    assert!(o.status.success(), "{}", text(&o));
    restore.mnt = Some(mnt.clone());
    let o = run(Command::new("mount")
        .args(["-t", "fuse.kmfs"])
        .arg(&back)
        .arg(&mnt)
        .arg("-o")
        .arg(format!("keyfile={}", key.display()))
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ));
    assert!(o.status.success(), "{}", text(&o));
    assert!(is_mounted(&mnt));
    std::fs::write(mnt.join("hello"), b"from the package").unwrap();
    assert_eq!(
        std::fs::read(mnt.join("hello")).unwrap(),
        b"from the package"
    );
    let o = run(Command::new("umount").arg(&mnt));
    assert!(o.status.success(), "{}", text(&o));
    restore.mnt = None;

    // Man pages, non-interactively.
    for (page, want) in [
        ("kmfs", "rotate-kek"),
        ("kmfs-status", "openmetrics"),
        ("5 kmfs.toml", "anchor_interval_s"),
    ] {
        let o = sh(&format!("MANWIDTH=80 man -P cat {page} 2>&1"));
        let t = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success() && t.contains(want), "man {page}:\n{t}");
    }

    // Remove: only the configuration stays.
    let conffiles = String::from_utf8_lossy(
        &run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "kmfs"])).stdout,
    )
    .into_owned();
    assert!(conffiles.contains("/etc/logrotate.d/kmfs"), "{conffiles}");
    let o = run(Command::new("dpkg").args(["-r", "kmfs"]));
    assert!(o.status.success(), "{}", text(&o));
    let st = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "kmfs"]));
    assert_eq!(
        String::from_utf8_lossy(&st.stdout),
        "deinstall ok config-files",
        "{}",
        text(&st)
    );
    for f in listed.lines().filter(|l| l.starts_with('/')) {
        let p = Path::new(f);
        if p.is_dir() {
            continue; // shared directories (/usr/bin, ...) stay
        }
        if conffiles.contains(f) {
            assert!(p.exists(), "configuration {f} was removed");
        } else {
            assert!(!p.exists(), "{f} left behind by dpkg -r");
        }
    }
    drop(restore);
    assert!(
        !Path::new("/etc/logrotate.d/kmfs").exists(),
        "purge keeps config"
    );
}
