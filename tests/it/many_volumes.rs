//! Many volumes on one host (issue 20): one volume per share, each with its
//! own config, mounted with the command the systemd template runs
//! (`kmfs mount --config /etc/kmfs/NAME.toml BACKING MOUNTPOINT`, a
//! daemonising mount; see systemd/kmfs@.service) — 5 volumes in the default
//! run, 50 with `KMFS_LONG_TESTS=1`. Checks each daemon's resident memory
//! (printed, with the total), that `kmfs status --json` answers for every
//! volume and `kmfs status --openmetrics` lists them all, and that
//! unmounting one (`umount MNT`, the unit's ExecStop) leaves the others
//! serving their files.

use crate::support::cli;
use crate::support::fault::long_tests;
use crate::support::netns::report;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cli::{KMFS, is_mounted, text};

struct Share {
    cfg: PathBuf,
    back: PathBuf,
    mnt: PathBuf,
    data: Vec<u8>,
}

/// Unmounts every share still mounted (lazily) on drop.
struct All(Vec<PathBuf>);
impl Drop for All {
    fn drop(&mut self) {
        for m in &self.0 {
            if is_mounted(m) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(m)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn kmfs_in(run: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(KMFS);
    for a in args {
        c.arg(a);
    }
    c.env("KMFS_RUNTIME_DIR", run)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn many_volumes_mount_report_memory_and_unmount_independently() {
    let n = if long_tests() { 50 } else { 5 };
    let tmp = tempfile::tempdir().unwrap();
    let etc = cli::private_dir(tmp.path().join("etc"));
    let run = cli::private_dir(tmp.path().join("run"));
    let mut shares = Vec::new();
    for i in 0..n {
        let key = etc.join(format!("share{i}.key"));
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).unwrap();
        std::fs::write(&key, k).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = etc.join(format!("share{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "provider = \"keyfile\"\n[volume]\nname = \"share{i}\"\n[keyfile]\npath = \"{}\"\n[log]\nsyslog = false\nfile = \"{}\"\naudit_file = \"{}\"\n",
                key.display(),
                etc.join(format!("share{i}.log")).display(),
                etc.join(format!("share{i}-audit.csv")).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let back = tmp.path().join(format!("cipher/share{i}"));
        let mnt = tmp.path().join(format!("plain/share{i}"));
        std::fs::create_dir_all(&back).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let o = kmfs_in(&run, &[&"init", &"--config", &cfg, &back]);
        assert!(o.status.success(), "init share{i}: {}", text(&o));
        shares.push(Share {
            cfg,
            back,
            mnt,
            data: (0..10_000 + i * 977).map(|b| (b * 7 + i) as u8).collect(),
        });
    }
    let _all = All(shares.iter().map(|s| s.mnt.clone()).collect());
    // What kmfs@shareN.service runs: ExecStart=kmfs mount --config ... BACK MNT.
    let t = Instant::now();
    for (i, s) in shares.iter().enumerate() {
        let o = kmfs_in(&run, &[&"mount", &"--config", &s.cfg, &s.back, &s.mnt]);
        assert!(o.status.success(), "mount share{i}: {}", text(&o));
        assert!(is_mounted(&s.mnt));
        std::fs::write(s.mnt.join("file"), &s.data).unwrap();
    }
    let mount_all = t.elapsed();

    // Each daemon's pid (from its status), memory, and the status listings.
    let mut ids = Vec::new();
    let mut rss = Vec::new();
    for (i, s) in shares.iter().enumerate() {
        let o = kmfs_in(&run, &[&"status", &"--json", &s.mnt]);
        assert!(o.status.success(), "status share{i}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let id = v["volume_id"].as_str().unwrap().to_string();
        let pid = v["daemon"]["pid"]
            .as_u64()
            .or_else(|| v["pid"].as_u64())
            .unwrap_or_else(|| panic!("no pid in status: {v}")) as u32;
        rss.push(vm_rss_kib(pid));
        ids.push(id);
    }
    let total: u64 = rss.iter().sum();
    report(format!(
        "MANY VOLUMES: {n} daemons mounted in {} ms; VmRSS total {} KiB ({:.1} MiB), per daemon min {} / max {} / mean {} KiB",
        mount_all.as_millis(),
        total,
        total as f64 / 1024.0,
        rss.iter().min().unwrap(),
        rss.iter().max().unwrap(),
        total / n as u64
    ));
    let om = kmfs_in(&run, &[&"status", &"--openmetrics"]);
    assert!(om.status.success(), "{}", text(&om));
    let om = String::from_utf8_lossy(&om.stdout).into_owned();
    let listed = |om: &str, id: &str| {
        om.lines()
            .any(|l| l.starts_with("kmfs_volume_info{") && l.contains(&format!("volume=\"{id}\"")))
    };
    for id in &ids {
        assert!(listed(&om, id), "{id} missing from --openmetrics:\n{om}");
    }
    assert_eq!(
        om.lines()
            .filter(|l| l.starts_with("kmfs_volume_info{"))
            .count(),
        n,
        "{om}"
    );

    // Unmount one (the unit's ExecStop=/bin/umount MNT); the others go on.
    let gone = &shares[0];
    let o = Command::new("umount").arg(&gone.mnt).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let om = kmfs_in(&run, &[&"status", &"--openmetrics"]);
        let om = String::from_utf8_lossy(&om.stdout).into_owned();
        if !listed(&om, &ids[0]) {
            for id in &ids[1..] {
                assert!(listed(&om, id), "{id} missing after one unmount:\n{om}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "share0 still listed:\n{om}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(&gone.mnt));
    for (i, s) in shares.iter().enumerate().skip(1) {
        assert!(is_mounted(&s.mnt), "share{i} went away");
        assert_eq!(
            std::fs::read(s.mnt.join("file")).unwrap(),
            s.data,
            "share{i} differs"
        );
        let o = kmfs_in(&run, &[&"status", &"--json", &s.mnt]);
        assert!(o.status.success(), "status share{i}: {}", text(&o));
    }
    // The unmounted one remounts with its own config, its file intact.
    let o = kmfs_in(
        &run,
        &[&"mount", &"--config", &gone.cfg, &gone.back, &gone.mnt],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(gone.mnt.join("file")).unwrap(), gone.data);
    for s in &shares {
        let o = Command::new("umount").arg(&s.mnt).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
}
