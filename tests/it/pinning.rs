//! What the administrator's config and the authenticated header say a
//! volume is, against what the backing store claims (docs/SECURITY.md,
//! attacker 2): a config pinned to its volume refuses another volume's
//! backing directory before any key is unwrapped; an unauthenticated rekey
//! state file that disagrees with the header, or carries values out of
//! range, is refused; a journal planted as a symlink is never written
//! through; two backing files sharing a file id are reported.

use crate::support::cli;
use crate::support::mount;
use crate::support::softhsm;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cli::{kmfs, private_dir, text};
use mount::Volume;

/// A keyfile-provider config for `key`, mode 0600 in a private directory.
fn config(dir: &Path, name: &str, key: &Path) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "provider = \"keyfile\"\n\n[volume]\nname = \"{name}\"\n\n[keyfile]\npath = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn backing(dir: &Path, name: &str) -> PathBuf {
    let b = dir.join(name);
    std::fs::create_dir(&b).unwrap();
    b
}

#[test]
fn init_pins_the_config_and_another_volume_is_refused_before_unwrap() {
    let t = tempfile::tempdir().unwrap();
    let keys = private_dir(t.path().join("keys"));
    let key = keys.join("k");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg_a = config(&keys, "a.toml", &key);
    let cfg_b = config(&keys, "b.toml", &key);
    let a = backing(t.path(), "a");
    let b = backing(t.path(), "b");
    let o = kmfs(&[&"init", &"--config", &cfg_a, &a]);
    assert!(o.status.success(), "{}", text(&o));
    let o = kmfs(&[&"init", &"--config", &cfg_b, &b]);
    assert!(o.status.success(), "{}", text(&o));
    let text_a = std::fs::read_to_string(&cfg_a).unwrap();
    assert!(text_a.contains("id = \""), "{text_a}");
    assert_eq!(
        std::fs::metadata(&cfg_a).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A pinned config is not reused for a new volume.
    let c = backing(t.path(), "c");
    let o = kmfs(&[&"init", &"--config", &cfg_a, &c]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(!c.join("kmfs.volume").exists());

    // Both volumes share the key (as two volumes behind one client
    // certificate would): only the pin tells them apart.
    let o = kmfs(&[&"check", &"--config", &cfg_a, &a]);
    assert!(o.status.success(), "{}", text(&o));
    let o = kmfs(&[&"check", &"--config", &cfg_a, &b]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(14), "{msg}");
    assert!(
        msg.contains("wrong backing directory, or its header was swapped"),
        "{msg}"
    );
    // Swapping the header itself is caught the same way.
    std::fs::copy(b.join("kmfs.volume"), a.join("kmfs.volume")).unwrap();
    let mnt = backing(t.path(), "mnt");
    let m = std::process::Command::new(cli::KMFS)
        .args(["mount", "--config"])
        .arg(&cfg_a)
        .arg(&a)
        .arg(&mnt)
        .output()
        .unwrap();
    assert_eq!(m.status.code(), Some(14), "{}", text(&m));
    assert!(!mount::is_mounted(&mnt));
}

#[test]
fn a_rekey_state_file_that_disagrees_with_the_header_is_refused() {
    let vol = Volume::create(false);
    let state = vol.backing.join("kmfs.rekey");
    std::fs::write(
        &state,
        r#"{"target":5,"started":0,"paused":false,"throttle":{"rate_mb":null,"cpu":50},"files_done":0,"bytes_done":0}"#,
    )
    .unwrap();
    let o = kmfs(&[&"rekey", &"--keyfile", &vol.key, &vol.backing]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(16), "{msg}");
    assert!(msg.contains("stale or forged"), "{msg}");
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    assert_eq!(o.status.code(), Some(20), "{}", text(&o));
    assert!(text(&o).contains("stale or forged"), "{}", text(&o));
    // Out-of-range values from the backing store are refused, not used
    // (a negative rate used to reach Duration::from_secs_f64 and panic).
    std::fs::write(
        &state,
        r#"{"target":0,"started":0,"paused":false,"throttle":{"rate_mb":-1.0,"cpu":50},"files_done":0,"bytes_done":0}"#,
    )
    .unwrap();
    let o = kmfs(&[&"rekey", &"--keyfile", &vol.key, &vol.backing]);
    let msg = text(&o);
    assert!(!o.status.success(), "{msg}");
    assert!(msg.contains("rate -1 MB/s is out of range"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
}

#[test]
fn rekey_rates_out_of_range_are_usage_errors() {
    let vol = Volume::create(false);
    for r in ["-1", "0", "NaN", "inf", "1e309", "x"] {
        let o = kmfs(&[
            &"rekey",
            &"--keyfile",
            &vol.key,
            &"--rate",
            &r,
            &vol.backing,
        ]);
        assert_eq!(o.status.code(), Some(2), "--rate {r}: {}", text(&o));
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
    }
}

#[test]
fn a_journal_planted_as_a_symlink_is_never_written_through() {
    let vol = Volume::create(false);
    let victim = vol.dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, vol.backing.join("kmfs.rekey.journal")).unwrap();
    let o = kmfs(&[&"rekey", &"--keyfile", &vol.key, &vol.backing]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("symbolic link"), "{}", text(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn two_backing_files_with_one_file_id_are_reported() {
    let m = Volume::create(true).mount();
    std::fs::write(m.p("a"), b"first file").unwrap();
    std::fs::write(m.p("b"), b"second file").unwrap();
    let vol = m.unmount();
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("same file id"), "{}", text(&o));
    // A backing file restored beside its original (plaintext names keep
    // the test simple: the copy's name is its own).
    std::fs::copy(vol.backing.join("a"), vol.backing.join("b")).unwrap();
    let o = kmfs(&[&"check", &"--keyfile", &vol.key, &vol.backing]);
    assert!(text(&o).contains("same file id"), "{}", text(&o));
}

/// Every command that can hold a key runs without core dumps (the mount
/// daemon always did; an offline rekey holds the DEK for as long), and a
/// key that cannot be locked in memory is said once, not silently.
#[test]
fn offline_commands_holding_keys_cannot_dump_core_and_say_when_memory_is_not_locked() {
    let m = Volume::create(false).mount();
    std::fs::write(m.p("big"), vec![7u8; 4 << 20]).unwrap();
    let vol = m.unmount();
    let mut child = std::process::Command::new(cli::KMFS)
        .args(["rekey", "--rate", "0.05", "--keyfile"])
        .arg(&vol.key)
        .arg(&vol.backing)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut core = None;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let l = std::fs::read_to_string(&limits).unwrap_or_default();
        if let Some(line) = l.lines().find(|l| l.starts_with("Max core file size")) {
            let v: Vec<&str> = line.split_whitespace().collect();
            core = Some((v[4].to_string(), v[5].to_string()));
            if core == Some(("0".into(), "0".into())) {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        core,
        Some(("0".into(), "0".into())),
        "offline rekey may dump core"
    );

    // Without CAP_IPC_LOCK and with no memlock allowance, mlock fails.
    let o = std::process::Command::new("prlimit")
        .args([
            "--memlock=0:0",
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
        ])
        .arg(cli::KMFS)
        .args(["check", "--keyfile"])
        .arg(&vol.key)
        .arg(&vol.backing)
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(
        out.matches("cannot lock").count(),
        1,
        "the mlock failure must be said exactly once: {out}"
    );
}

/// `kmfs rekey --rotate-kek` (real SoftHSM2 token): the KEK is rotated to a
/// new version before the new DEK generation, so a header copy taken
/// before needs the old KEK version; the old header backup still names it.
#[test]
fn rekey_with_rotate_kek_moves_the_volume_to_a_new_kek_version() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = softhsm::Hsm::for_processes();
    let t = tempfile::tempdir().unwrap();
    let etc = private_dir(t.path().join("etc"));
    let cfg = etc.join("vol.toml");
    std::fs::write(
        &cfg,
        format!(
            "provider = \"pkcs11\"\n[log]\nsyslog = false\naudit_file = \"{}\"\n{}",
            etc.join("audit.csv").display(),
            hsm.toml_section("pin-rekey-rotate")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let back = backing(t.path(), "back");
    let o = kmfs(&[&"init", &"--create-kek", &"--config", &cfg, &back]);
    assert!(o.status.success(), "{}", text(&o));
    let dump = |b: &Path| -> serde_json::Value {
        serde_json::from_slice(&kmfs(&[&"header", &"dump", &"--json", &b]).stdout).unwrap()
    };
    let before = dump(&back);
    let o = kmfs(&[&"rekey", &"--rotate-kek", &"--config", &cfg, &back]);
    assert!(o.status.success(), "{}", text(&o));
    let after = dump(&back);
    assert_eq!(before["kek"]["version"], 1, "{before}");
    assert_eq!(after["kek"]["version"], 2, "{after}");
    assert_eq!(after["kek"]["name"], "pin-rekey-rotate");
    assert_eq!(after["active_generation"], 1, "{after}");
    assert_eq!(after["generations"].as_array().unwrap().len(), 1, "{after}");
    // Without the flag a rekey keeps the KEK version.
    let o = kmfs(&[&"rekey", &"--config", &cfg, &back]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dump(&back)["kek"]["version"], 2);
}
