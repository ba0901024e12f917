//! Deployment as an administrator does it: `mount -t fuse.kmfs` and fstab
//! lines (`mount -a`, `mount MNT`) against a volume whose KEK is on a real
//! PyKMIP server, and the mount helper's failure paths (key server down, bad
//! config path, loose config permissions, unknown option, missing mountpoint,
//! volume already mounted): non-zero exit with the reason, nothing left
//! mounted, no stray daemon. mount(8) → mount.fuse3 → `kmfs SRC MNT -o OPTS`
//! finds the kmfs under test first on PATH.

use crate::support::cli;
use cli::{KMFS, fstype, is_mounted, text};

use crate::support::pykmip;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn path_env() -> String {
    let dir = Path::new(KMFS).parent().unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn mount(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new("mount");
    for a in args {
        c.arg(a);
    }
    c.env("PATH", path_env()).output().unwrap()
}

fn umount(p: &Path) -> Output {
    Command::new("umount").arg(p).output().unwrap()
}

/// kmfs daemons whose command line names `backing`.
fn daemons_for(backing: &Path) -> Vec<u32> {
    let want = backing.display().to_string();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.first().is_some_and(|a| a.ends_with("kmfs")) && args.contains(&want) {
                v.push(pid);
            }
        }
    }
    v
}

fn wait_no_daemon(backing: &Path) {
    let t = Instant::now();
    while !daemons_for(backing).is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemons_for(backing).is_empty(),
        "stray kmfs daemon for {}",
        backing.display()
    );
}

struct Setup {
    tmp: tempfile::TempDir,
    cfg: PathBuf,
    back: PathBuf,
    mnt: PathBuf,
}

fn write_cfg(path: &Path, pki: &pykmip::Pki, port: u16, etc: &Path) {
    let t = format!(
        "provider = \"kmip\"\n[volume]\nname = \"deploy\"\n[log]\nsyslog = false\naudit_file = \"{audit}\"\n\
         [kmip]\nkey_name = \"deploy-kek\"\nconnect_timeout_ms = 1000\nread_timeout_ms = 3000\nretry_delay_ms = 50\nfailover_cycles = 1\n{servers}",
        audit = etc.join("audit.csv").display(),
        servers = pki.toml_server("km-deploy", port),
    );
    std::fs::write(path, t).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn setup(pki: &pykmip::Pki, port: u16) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let etc = cli::private_dir(tmp.path().join("etc"));
    let cfg = etc.join("deploy.toml");
    write_cfg(&cfg, pki, port, &etc);
    let back = tmp.path().join("cipher");
    let mnt = tmp.path().join("plain");
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let o = Command::new(KMFS)
        .args(["init", "--create-kek", "--config"])
        .arg(&cfg)
        .arg(&back)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    Setup {
        tmp,
        cfg,
        back,
        mnt,
    }
}

#[test]
fn mount_t_fuse_kmfs_fstab_and_failure_paths() {
    if !pykmip::available() {
        return;
    }
    // mount(8) finds mount.fuse3 and `kmfs` by PATH, which the package test
    // changes (dpkg -i, /usr/local/bin/kmfs moved aside).
    let _serial = crate::support::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
    let server = pykmip::PykmipServer::start(
        &pki,
        &pki.server,
        &tmp.path().join("km.db"),
        &tmp.path().join("km"),
    );
    let s = setup(&pki, server.port);
    let opt = format!("config={}", s.cfg.display());

    // mount -t fuse.kmfs: returns once live; write, read, unmount, daemon gone.
    let o = mount(&[&"-t", &"fuse.kmfs", &s.back, &s.mnt, &"-o", &opt]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        is_mounted(&s.mnt),
        "mount returned before the mount was live"
    );
    assert_eq!(
        fstype(&s.mnt).as_deref(),
        Some("fuse.kmfs"),
        "the mount table should name the type fstab uses"
    );
    std::fs::write(s.mnt.join("hello.txt"), b"through mount(8)").unwrap();
    assert_eq!(
        std::fs::read(s.mnt.join("hello.txt")).unwrap(),
        b"through mount(8)"
    );
    let o = umount(&s.mnt);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!is_mounted(&s.mnt));
    wait_no_daemon(&s.back);

    // The same volume already mounted elsewhere: refused before mounting.
    let o = mount(&[&"-t", &"fuse.kmfs", &s.back, &s.mnt, &"-o", &opt]);
    assert!(o.status.success(), "{}", text(&o));
    let mnt2 = s.tmp.path().join("plain2");
    std::fs::create_dir(&mnt2).unwrap();
    let o = mount(&[&"-t", &"fuse.kmfs", &s.back, &mnt2, &"-o", &opt]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is in use by another writer"),
        "{}",
        text(&o)
    );
    assert!(!is_mounted(&mnt2));
    assert!(umount(&s.mnt).status.success());
    wait_no_daemon(&s.back);

    // fstab: mount -a and mount MNT with an fstab file, mount.fuse3's own
    // options tolerated.
    let fstab = s.tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# kmfs test fstab\n{} {} fuse.kmfs {opt},_netdev,nofail,x-systemd.requires=network-online.target 0 0\n",
            s.back.display(),
            s.mnt.display()
        ),
    )
    .unwrap();
    let o = mount(&[&"-a", &"-T", &fstab]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(is_mounted(&s.mnt));
    assert_eq!(
        std::fs::read(s.mnt.join("hello.txt")).unwrap(),
        b"through mount(8)"
    );
    assert!(umount(&s.mnt).status.success());
    wait_no_daemon(&s.back);
    let o = mount(&[&"-T", &fstab, &s.mnt]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(is_mounted(&s.mnt));
    assert!(umount(&s.mnt).status.success());
    wait_no_daemon(&s.back);

    // Failure paths: each exits non-zero with the reason; nothing mounted.
    let check_fail = |o: Output, want: &[&str]| {
        assert!(!o.status.success(), "expected failure: {}", text(&o));
        let e = text(&o);
        for w in want {
            assert!(e.contains(w), "missing {w:?} in: {e}");
        }
        assert!(!is_mounted(&s.mnt), "left mounted");
        wait_no_daemon(&s.back);
    };
    check_fail(
        mount(&[
            &"-t",
            &"fuse.kmfs",
            &s.back,
            &s.mnt,
            &"-o",
            &format!("{opt},bogus_option"),
        ]),
        &["bogus_option"],
    );
    check_fail(
        mount(&[
            &"-t",
            &"fuse.kmfs",
            &s.back,
            &s.mnt,
            &"-o",
            &"config=/nonexistent/kmfs.toml",
        ]),
        &["/nonexistent/kmfs.toml"],
    );
    std::fs::set_permissions(&s.cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    check_fail(
        mount(&[&"-t", &"fuse.kmfs", &s.back, &s.mnt, &"-o", &opt]),
        &["0644", "chmod 600"],
    );
    std::fs::set_permissions(&s.cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let missing = s.tmp.path().join("no-such-dir");
    let o = mount(&[&"-t", &"fuse.kmfs", &s.back, &missing, &"-o", &opt]);
    assert!(!o.status.success());
    wait_no_daemon(&s.back);
    drop(server);
    check_fail(
        mount(&[&"-t", &"fuse.kmfs", &s.back, &s.mnt, &"-o", &opt]),
        &["km-deploy", "unreachable"],
    );
}
