//! `kmfs mount` as a command: remounting, failures with clear messages,
//! daemonising only once the mount is live, unmounting on signals.

use crate::support::mount;

use std::fs;
use std::process::Command;
use std::time::Duration;

use mount::{KMFS, Volume, is_mounted, pattern};

fn last_line(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

#[test]
fn remount_reads_back_identical_data() {
    let m = Volume::create(false).mount();
    fs::create_dir_all(m.p("a/b")).unwrap();
    let long = "L".repeat(240);
    let files = [
        ("a/b/one", pattern(1, 70_000)),
        ("tiny", b"abc".to_vec()),
        (long.as_str(), pattern(2, 4097)),
        ("empty", Vec::new()),
    ];
    for (n, d) in &files {
        fs::write(m.p(n), d).unwrap();
    }
    std::os::unix::fs::symlink("a/b/one", m.p("sl")).unwrap();
    fs::hard_link(m.p("tiny"), m.p("a/tiny-link")).unwrap();
    let vol = m.unmount();
    assert!(!is_mounted(&vol.mnt));
    let m = vol.mount();
    for (n, d) in &files {
        assert_eq!(&fs::read(m.p(n)).unwrap(), d, "{n}");
    }
    assert_eq!(fs::read(m.p("sl")).unwrap(), files[0].1);
    assert_eq!(fs::read(m.p("a/tiny-link")).unwrap(), b"abc");
}

#[test]
fn wrong_key_bad_options_and_bad_mountpoint_fail_clearly() {
    let vol = Volume::create(false);
    // Wrong key.
    let other = vol.key.with_file_name("other");
    fs::write(&other, [7u8; 32]).unwrap();
    Command::new("chmod")
        .arg("600")
        .arg(&other)
        .status()
        .unwrap();
    for fg in [true, false] {
        let mut c = Command::new(KMFS);
        c.arg("mount").arg("--keyfile").arg(&other);
        if fg {
            c.arg("-f");
        }
        let o = c.arg(&vol.backing).arg(&vol.mnt).output().unwrap();
        assert!(!o.status.success());
        let l = last_line(&o);
        assert!(l.contains("wrong") || l.contains("unwrap"), "{l}");
        assert!(!is_mounted(&vol.mnt));
    }
    // Unknown option.
    let o = vol.mount_cmd(&["-o", "allow_other,frobnicate"]);
    assert!(!o.status.success());
    assert!(last_line(&o).contains("frobnicate"), "{}", last_line(&o));
    // Missing mountpoint.
    let o = Command::new(KMFS)
        .arg("mount")
        .arg("--keyfile")
        .arg(&vol.key)
        .arg(&vol.backing)
        .arg(vol.dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(last_line(&o).contains("nowhere"), "{}", last_line(&o));
    // Not a volume.
    let empty = vol.dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let o = Command::new(KMFS)
        .arg("mount")
        .arg("--keyfile")
        .arg(&vol.key)
        .arg(&empty)
        .arg(&vol.mnt)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!is_mounted(&vol.mnt));
}

#[test]
fn daemon_mode_returns_when_live_and_mount_fuse3_form_works() {
    let vol = Volume::create(false);
    // mount.fuse3's calling convention, daemonising (no -f).
    let o = Command::new(KMFS)
        .arg(&vol.backing)
        .arg(&vol.mnt)
        .arg("-o")
        .arg(format!(
            "keyfile={},_netdev,nofail,noatime",
            vol.key.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Live as soon as the command returned.
    assert!(is_mounted(&vol.mnt));
    fs::write(vol.mnt.join("f"), b"daemon").unwrap();
    assert_eq!(fs::read(vol.mnt.join("f")).unwrap(), b"daemon");
    let st = Command::new("umount").arg(&vol.mnt).status().unwrap();
    assert!(st.success());
    assert!(!is_mounted(&vol.mnt));
    // ro mount refuses writes but reads.
    let o = vol.mount_cmd(&["-o", "ro"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read(vol.mnt.join("f")).unwrap(), b"daemon");
    let e = fs::write(vol.mnt.join("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&vol.mnt)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    let mut vol = Volume::create(false);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut m = vol.mount();
        fs::write(m.p("x"), pattern(sig as u64, 100_000)).unwrap();
        m.signal(sig);
        let st = m.wait_exit(Duration::from_secs(10));
        assert!(
            st.is_some_and(|s| s.success()),
            "{st:?}\n{}",
            m.daemon_log()
        );
        assert!(!is_mounted(m.mnt()));
        vol = m.unmount();
    }
    let m = vol.mount();
    assert_eq!(
        fs::read(m.p("x")).unwrap(),
        pattern(libc::SIGINT as u64, 100_000)
    );
}
