//! Online KEK rotation on a mounted volume: the daemon rotates over its control
//! socket while writers and readers keep going; no I/O error, every byte
//! verifies afterwards, after remount, and with only the new KEK. Also `kmfs
//! status`, and that a second daemon for the same volume is refused.

use crate::support::cli;
use cli::{KMFS, kmfs, ok};

use crate::support::mount;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mount::{Volume, pattern};

#[test]
fn rotate_while_writing_then_remount_with_only_the_new_key() {
    let m = Volume::create(false).mount();
    let new_key = m.vol().dir.path().join("keys/new");
    std::fs::write(&new_key, [0x5au8; 32]).unwrap();
    std::fs::set_permissions(&new_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // status before
    let st: serde_json::Value =
        serde_json::from_str(&ok(kmfs(&[&"status", &"--json", &m.mnt()]))).unwrap();
    assert_eq!(st["kek"]["version"], 1);
    assert_eq!(st["provider"], "keyfile");
    let old_name = st["kek"]["name"].as_str().unwrap().to_string();

    // Writers and readers run during the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let stop = stop.clone();
        let dir = m.p(&format!("w{w}"));
        std::fs::create_dir(&dir).unwrap();
        workers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 20 {
                let data = pattern(w * 1000 + n, 10_000 + (n as usize * 4099) % 300_000);
                let p = dir.join(format!("f{n}"));
                std::fs::write(&p, &data).expect("write during rotation");
                let back = std::fs::read(&p).expect("read during rotation");
                assert!(back == data, "data mismatch in {}", p.display());
                n += 1;
            }
            n
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = ok(kmfs(&[&"rotate-kek", &"--new-keyfile", &new_key, &m.mnt()]));
    assert!(out.contains("rotated from"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u64> = workers
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect();

    let st: serde_json::Value =
        serde_json::from_str(&ok(kmfs(&[&"status", &"--json", &m.backing()]))).unwrap();
    assert_eq!(st["kek"]["name"], new_key.display().to_string());
    assert_eq!(st["rotations"], 1);
    assert!(st["io"]["writes"].as_u64().unwrap() > 0);
    assert_eq!(st["io"]["errors"], 0);
    let human = ok(kmfs(&[&"status", &m.mnt()]));
    assert!(
        human.contains("mounted since:") && human.contains("last rotation:"),
        "{human}"
    );

    // A second daemon for the same volume is refused, naming the reason.
    let other = m.vol().dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = Command::new(KMFS)
        .args(["mount", "--keyfile"])
        .arg(&new_key)
        .arg(m.backing())
        .arg(&other)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is in use by another writer"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Unmount; the old key no longer opens the volume, the new one does, and
    // every file written before, during and after the rotation verifies.
    let vol = m.unmount();
    let o = vol.mount_cmd(&[]);
    assert!(
        !o.status.success(),
        "old KEK must not unlock the rotated volume"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong key-encryption key"));
    std::fs::copy(&new_key, &vol.key).unwrap();
    let m = vol.mount();
    for (w, n) in counts.iter().enumerate() {
        for i in 0..*n {
            let data = pattern(w as u64 * 1000 + i, 10_000 + (i as usize * 4099) % 300_000);
            assert!(
                std::fs::read(m.p(&format!("w{w}/f{i}"))).unwrap() == data,
                "w{w}/f{i}"
            );
        }
    }
    let hdr = ok(kmfs(&[&"header", &"dump", &m.backing()]));
    assert!(
        hdr.contains("rotation history: 1 entries") && hdr.contains(&old_name),
        "{hdr}"
    );
}

#[test]
fn status_of_an_unmounted_volume_says_so() {
    let v = Volume::create(false);
    let o = kmfs(&[&"status", &v.backing]);
    assert_eq!(o.status.code(), Some(19));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not mounted"));
    // Offline rotation of an unmounted volume works from the backing directory.
    let new_key = v.dir.path().join("keys/new");
    std::fs::write(&new_key, [0x33u8; 32]).unwrap();
    std::fs::set_permissions(&new_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = ok(kmfs(&[
        &"rotate-kek",
        &"--keyfile",
        &v.key,
        &"--new-keyfile",
        &new_key,
        &v.backing,
    ]));
    assert!(out.contains("rotated from"), "{out}");
}
