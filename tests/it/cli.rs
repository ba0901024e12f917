//! The real `kmfs` binary: init, header dump/backup/restore, and bad input.
//! Every failure must be one line naming the problem, a non-zero exit code of
//! the right class, and no modification of anything.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::cli::kmfs;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("back")).unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::set_permissions(
            dir.path().join("keys"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let e = Env { dir };
        e.key("k", 1);
        e
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn key(&self, name: &str, byte: u8) -> PathBuf {
        let p = self.p(&format!("keys/{name}"));
        std::fs::write(&p, [byte; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
    fn back(&self) -> PathBuf {
        self.p("back")
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The failure message: the last stderr line (earlier lines may be the keyfile
/// provider's development warning).
fn err_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or("").to_string()
}

fn init(e: &Env) {
    let o = kmfs(&[&"init", &"--keyfile", &e.p("keys/k"), &e.back()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn init_then_dump_shows_non_secret_fields() {
    let e = Env::new();
    init(&e);
    let o = kmfs(&[&"header", &"dump", &e.back()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "volume id:",
        "AES-256-XTS",
        "KEK provider:     keyfile",
        "KEK version:      1",
        "file names:       encrypted",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let o = kmfs(&[&"header", &"dump", &"--json", &e.back()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kek"]["provider"], "keyfile");
    assert_eq!(v["block_size"], 4096);
    // The header never contains the key file's bytes or the raw DEK.
    let hdr = std::fs::read(e.back().join("kmfs.volume")).unwrap();
    assert!(!hdr.windows(32).any(|w| w == [1u8; 32]));
}

#[test]
fn init_refuses_non_empty_or_initialised_directories() {
    let e = Env::new();
    std::fs::write(e.back().join("data"), b"x").unwrap();
    let o = kmfs(&[&"init", &"--keyfile", &e.p("keys/k"), &e.back()]);
    assert_eq!(o.status.code(), Some(16));
    assert!(err_line(&o).contains("not empty"), "{}", stderr(&o));
    std::fs::remove_file(e.back().join("data")).unwrap();
    init(&e);
    let before = snapshot(&e.back());
    let o = kmfs(&[&"init", &"--keyfile", &e.p("keys/k"), &e.back()]);
    assert_eq!(o.status.code(), Some(16));
    assert!(err_line(&o).contains("already holds a kmfs volume"));
    assert_eq!(
        snapshot(&e.back()),
        before,
        "a refused init must not modify anything"
    );
}

#[test]
fn loose_key_file_permissions_are_refused_naming_the_file() {
    let e = Env::new();
    let k = e.p("keys/k");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = kmfs(&[&"init", &"--keyfile", &k, &e.back()]);
    assert_eq!(o.status.code(), Some(11));
    let line = err_line(&o);
    assert!(
        line.contains(&k.display().to_string()) && line.contains("0644"),
        "{line}"
    );
    assert!(
        std::fs::read_dir(e.back()).unwrap().next().is_none(),
        "nothing written"
    );
}

#[test]
fn key_file_inside_backing_dir_is_refused() {
    let e = Env::new();
    let inside = e.back().join("kek");
    std::fs::write(&inside, [7u8; 32]).unwrap();
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(e.back(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = kmfs(&[&"init", &"--keyfile", &inside, &e.back()]);
    assert_eq!(o.status.code(), Some(11));
    assert!(
        err_line(&o).contains("inside the backing directory"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn damaged_truncated_and_future_headers_give_one_line_errors() {
    let e = Env::new();
    init(&e);
    let path = e.back().join("kmfs.volume");
    let good = std::fs::read(&path).unwrap();

    let mut damaged = good.clone();
    damaged[60] ^= 0x40;
    std::fs::write(&path, &damaged).unwrap();
    let o = kmfs(&[&"header", &"dump", &e.back()]);
    assert_eq!(o.status.code(), Some(14));
    assert!(err_line(&o).contains("damaged"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let o = kmfs(&[&"header", &"dump", &e.back()]);
    assert_eq!(o.status.code(), Some(14));
    assert!(err_line(&o).contains("truncated"), "{}", stderr(&o));

    let mut future = good.clone();
    future[9] = 7;
    std::fs::write(&path, &future).unwrap();
    let o = kmfs(&[&"header", &"dump", &e.back()]);
    assert_eq!(o.status.code(), Some(15));
    assert!(
        err_line(&o).contains("version 7 is newer"),
        "{}",
        stderr(&o)
    );

    std::fs::remove_file(&path).unwrap();
    let o = kmfs(&[&"header", &"dump", &e.back()]);
    assert_eq!(o.status.code(), Some(14));
    assert!(err_line(&o).contains("no volume header"), "{}", stderr(&o));
}

#[test]
fn backup_and_restore_with_the_right_key_only() {
    let e = Env::new();
    init(&e);
    let bak = e.p("hdr.bak");
    let o = kmfs(&[&"header", &"backup", &e.back(), &bak]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Backing up over an existing file is refused.
    let o = kmfs(&[&"header", &"backup", &e.back(), &bak]);
    assert_ne!(o.status.code(), Some(0));

    // Damage the live header, then restore.
    let live = e.back().join("kmfs.volume");
    let good = std::fs::read(&live).unwrap();
    std::fs::write(&live, b"garbage").unwrap();

    let wrong = e.key("wrong", 2);
    let o = kmfs(&[&"header", &"restore", &"--keyfile", &wrong, &e.back(), &bak]);
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    assert!(
        err_line(&o).contains("wrong key-encryption key"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(&live).unwrap(),
        b"garbage",
        "failed restore changes nothing"
    );

    let o = kmfs(&[
        &"header",
        &"restore",
        &"--keyfile",
        &e.p("keys/k"),
        &e.back(),
        &bak,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&live).unwrap(), good);
    assert_eq!(
        std::fs::read(e.back().join("kmfs.volume.bak")).unwrap(),
        b"garbage"
    );
}

#[test]
fn restore_refuses_another_volumes_header() {
    let a = Env::new();
    init(&a);
    let b = Env::new();
    let o = kmfs(&[&"init", &"--keyfile", &b.p("keys/k"), &b.back()]);
    assert!(o.status.success());
    let o = kmfs(&[
        &"header",
        &"restore",
        &"--keyfile",
        &a.p("keys/k"),
        &a.back(),
        &b.back().join("kmfs.volume"),
    ]);
    assert_eq!(o.status.code(), Some(14));
    assert!(err_line(&o).contains("belongs to volume"), "{}", stderr(&o));
}

#[test]
fn config_errors_name_the_field_and_file() {
    let e = Env::new();
    let cfg = e.p("keys/vol.toml");
    let write = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write(&format!(
        "provider = \"keyfile\"\n[keyfile]\npath = \"{}\"\ncolour = 1\n",
        e.p("keys/k").display()
    ));
    let o = kmfs(&[&"init", &"--config", &cfg, &e.back()]);
    assert_eq!(o.status.code(), Some(10));
    let line = err_line(&o);
    assert!(
        line.contains("colour") && line.contains("vol.toml"),
        "{line}"
    );

    write("provider = \"keyfile\"\n");
    let o = kmfs(&[&"init", &"--config", &cfg, &e.back()]);
    assert_eq!(o.status.code(), Some(10));
    assert!(err_line(&o).contains("[keyfile]"), "{}", stderr(&o));

    write(&format!(
        "provider = \"keyfile\"\n[keyfile]\npath = \"{}\"\n",
        e.p("keys/k").display()
    ));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = kmfs(&[&"init", &"--config", &cfg, &e.back()]);
    assert_eq!(o.status.code(), Some(10));
    assert!(err_line(&o).contains("0640"), "{}", stderr(&o));

    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = kmfs(&[&"init", &"--config", &cfg, &e.back()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn no_key_source_is_a_usage_error() {
    let e = Env::new();
    let o = kmfs(&[&"init", &e.back()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o).contains("--config"), "{}", stderr(&o));
}
