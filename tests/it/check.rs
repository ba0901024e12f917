//! `kmfs check` on real volumes: a clean volume made through a mount passes;
//! each kind of damage and crash leftover made by hand in the backing
//! directory is reported with its own message; `--repair` removes the
//! leftovers and nothing else; `--repair` on a mounted volume is refused.

use crate::support::cli;
use crate::support::fault;
use crate::support::mount;

use std::path::{Path, PathBuf};

use cli::{kmfs, text};
use fault::Daemon;
use mount::{Volume, getx, listx, setx};

fn check(vol: &Volume, extra: &[&str]) -> (i32, String, serde_json::Value) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"check", &"--keyfile", &vol.key];
    for e in extra {
        args.push(e);
    }
    args.push(&vol.backing);
    let o = kmfs(&args);
    let human = text(&o);
    let mut jargs = args.clone();
    jargs.insert(1, &"--json");
    // --repair must not run twice: JSON only for read-only checks.
    let json = if extra.contains(&"--repair") {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&kmfs(&jargs).stdout).unwrap_or(serde_json::Value::Null)
    };
    (o.status.code().unwrap_or(-1), human, json)
}

fn count(j: &serde_json::Value, sev: &str) -> usize {
    j["findings"]
        .as_array()
        .map(|a| a.iter().filter(|f| f["severity"] == sev).count())
        .unwrap_or(usize::MAX)
}

/// The backing path of the only non-kmfs entry of `dir`.
fn only_entry(dir: &Path) -> PathBuf {
    let v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("kmfs."))
        .map(|e| e.path())
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v[0].clone()
}

#[test]
fn clean_damaged_repaired_and_mounted() {
    let vol = Volume::create(false);
    let m = &vol.mnt;
    let mut d = Daemon::mount(&vol);
    std::fs::create_dir_all(m.join("a/b")).unwrap();
    std::fs::create_dir(m.join("c")).unwrap();
    std::fs::write(m.join("a/b/data"), vec![7u8; 100_000]).unwrap();
    std::fs::write(
        m.join("c/victim"),
        b"will be damaged, 40+ bytes of content here....",
    )
    .unwrap();
    std::fs::write(m.join("tiny"), b"hi").unwrap();
    std::fs::write(m.join("empty"), b"").unwrap();
    std::fs::write(m.join("L".repeat(220)), b"long name").unwrap();
    std::os::unix::fs::symlink("a/b/data", m.join("link")).unwrap();
    assert_eq!(setx(&m.join("a/b/data"), "user.tag", b"backup set 7"), 0);
    assert_eq!(setx(&m.join("c"), "user.owner", b"finance"), 0);
    std::fs::hard_link(m.join("tiny"), m.join("a/tiny2")).unwrap();
    nix::unistd::mkfifo(
        &m.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();

    // Mounted: --repair is refused (the daemon holds the volume's writer
    // lock, exit 21); a read-only check runs beside it.
    let (code, out, _) = check(&vol, &["--repair"]);
    assert_eq!(code, 21, "{out}");
    assert!(out.contains("is in use by another writer"), "{out}");
    let (code, out, _) = check(&vol, &[]);
    assert_eq!(code, 0, "{out}");
    d.unmount();

    // Clean.
    let (code, out, j) = check(&vol, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 errors, 0 warnings, 0 leftovers"), "{out}");
    assert_eq!(j["directories"], 4, "{j}");
    assert_eq!(j["files"], 6, "{j}");
    assert_eq!(j["symlinks"], 1, "{j}");
    assert_eq!(j["other"], 1, "{j}");

    // Damage, by hand in the backing directory.
    let b = &vol.backing;
    let dir_a = only_dir_with(b, "a");
    let dir_c = only_dir_with(b, "c");
    // (1) An entry copied into another directory: its name does not decrypt.
    let victim = only_entry(&dir_c);
    std::fs::copy(&victim, b.join(victim.file_name().unwrap())).unwrap();
    // (2) A damaged file header.
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] = b'X';
    std::fs::write(&victim, &bytes).unwrap();
    // (3) A directory without its id.
    let sub = std::fs::read_dir(&dir_a)
        .unwrap()
        .flatten()
        .find(|e| e.file_type().unwrap().is_dir())
        .unwrap()
        .path();
    let id = std::fs::read(sub.join("kmfs.dirid")).unwrap();
    std::fs::remove_file(sub.join("kmfs.dirid")).unwrap();
    // (4) Crash leftovers: a header temporary, a half-created directory, an
    // orphaned sidecar, a torn file header, a damaged header backup.
    std::fs::write(b.join("kmfs.volume.tmp"), b"partial").unwrap();
    std::fs::create_dir(b.join("kmfs.tmp.0123abcd")).unwrap();
    std::fs::write(b.join("kmfs.tmp.0123abcd/kmfs.dirid"), [1u8; 16]).unwrap();
    std::fs::write(dir_a.join("kmfs.long.orphan.name"), b"x").unwrap();
    // "empty" is the only top-level file whose backing file is a bare
    // 40-byte header; cut it to 10 bytes.
    let torn_src = std::fs::read_dir(b)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_type().unwrap().is_file()
                && !e.file_name().to_string_lossy().starts_with("kmfs.")
                && e.metadata().unwrap().len() == 40
        })
        .unwrap()
        .path();
    std::fs::write(&torn_src, [b'K'; 10]).unwrap();
    std::fs::write(b.join("kmfs.volume.bak"), b"not a header").unwrap();
    // (5) A damaged encrypted attribute value (on a/b/data).
    let data = only_entry(&sub);
    let attr: Vec<String> = listx(&data)
        .into_iter()
        .filter(|n| n.starts_with("user.kmfs."))
        .collect();
    assert_eq!(attr.len(), 1, "{attr:?}");
    let good = getx(&data, &attr[0]).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(setx(&data, &attr[0], &bad), 0);

    let (code, out, j) = check(&vol, &[]);
    assert_eq!(code, 20, "{out}");
    for want in [
        "name does not decrypt in this directory (in /)",
        "damaged file header: not a kmfs file",
        "directory id missing or damaged",
        "temporary file of an interrupted atomic write",
        "directory whose creation was interrupted (empty)",
        "long-name sidecar without its entry",
        "file header incomplete (10 of 40 bytes",
        "header backup is damaged",
        "does not authenticate with any key generation the header holds",
        "/c/victim",
        "/empty",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert_eq!(count(&j, "error"), 4, "{j:#}");
    assert_eq!(count(&j, "leftover"), 4, "{j:#}");
    assert_eq!(count(&j, "warning"), 1, "{j:#}");
    // Read-only by default: everything is still there.
    assert!(b.join("kmfs.volume.tmp").exists());
    assert_eq!(std::fs::metadata(&torn_src).unwrap().len(), 10);

    // Repair: leftovers go, errors stay (they need a person).
    let (code, out, _) = check(&vol, &["--repair"]);
    assert_eq!(code, 20, "{out}");
    assert!(
        out.contains("[removed]") && out.contains("[truncated to empty]"),
        "{out}"
    );
    assert!(!b.join("kmfs.volume.tmp").exists());
    assert!(!b.join("kmfs.tmp.0123abcd").exists());
    assert!(!dir_a.join("kmfs.long.orphan.name").exists());
    assert_eq!(std::fs::metadata(&torn_src).unwrap().len(), 0);
    assert_eq!(
        std::fs::read(b.join("kmfs.volume.bak")).unwrap(),
        std::fs::read(b.join("kmfs.volume")).unwrap()
    );
    let (_, _, j) = check(&vol, &[]);
    assert_eq!(count(&j, "error"), 4, "{j:#}");
    assert_eq!(
        getx(&data, &attr[0]).unwrap(),
        bad,
        "repair left the attribute alone"
    );
    assert_eq!(count(&j, "leftover") + count(&j, "warning"), 0, "{j:#}");

    // Undo the damage by hand: clean again, and the volume mounts and reads.
    std::fs::remove_file(b.join(victim.file_name().unwrap())).unwrap();
    std::fs::remove_file(&victim).unwrap();
    std::fs::write(sub.join("kmfs.dirid"), &id).unwrap();
    assert_eq!(setx(&data, &attr[0], &good), 0);
    let (code, out, _) = check(&vol, &[]);
    assert_eq!(code, 0, "{out}");
    let d = Daemon::mount(&vol);
    assert_eq!(
        std::fs::read(m.join("a/b/data")).unwrap(),
        vec![7u8; 100_000]
    );
    assert_eq!(std::fs::read(m.join("empty")).unwrap(), b"");
    assert_eq!(
        getx(&m.join("a/b/data"), "user.tag").unwrap(),
        b"backup set 7"
    );
    assert_eq!(getx(&m.join("c"), "user.owner").unwrap(), b"finance");
    drop(d);
}

/// The backing directory of top-level directory `name` ("a" holds a
/// subdirectory, "c" does not).
fn only_dir_with(b: &Path, name: &str) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(b)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let has_subdir = |d: &PathBuf| {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .any(|e| e.file_type().unwrap().is_dir())
    };
    dirs.into_iter()
        .find(|d| has_subdir(d) == (name == "a"))
        .unwrap()
}
