//! The backing directory as hostile input (docs/SECURITY.md, attacker 2):
//! symlinks to /dev/zero, FIFOs, directories, huge and truncated files under
//! kmfs's reserved names and in place of user files. A mount, `ls -lR`,
//! reading every file, a rekey and `kmfs check` must all finish in bounded
//! time, fail only on the hostile entries, and never panic. Every command
//! that touches the mount runs under `timeout -s KILL`, so a hang fails the
//! test instead of stalling the suite.

use crate::support::cli;
use crate::support::mount;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cli::{kmfs, text};
use mount::{Mounted, Volume, pattern};

/// Runs `cmd` with a hard deadline: the test fails (names the command) if
/// it does not finish in `secs` seconds.
fn bounded(secs: u64, cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let t = Instant::now();
    let o = Command::new("timeout")
        .arg("-s")
        .arg("KILL")
        .arg(secs.to_string())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .output()
        .unwrap();
    assert!(
        o.status.code().is_some() && t.elapsed() < Duration::from_secs(secs),
        "{what} did not finish within {secs} s (hung)"
    );
    o
}

/// `kmfs check [--repair]` of an unmounted volume, bounded in time.
fn check(secs: u64, vol: &Volume, repair: bool) -> Output {
    let mut c = Command::new(cli::KMFS);
    c.arg("check");
    if repair {
        c.arg("--repair");
    }
    bounded(secs, c.arg("--keyfile").arg(&vol.key).arg(&vol.backing))
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

fn replace_with_fifo(p: &Path) {
    std::fs::remove_file(p).unwrap();
    mkfifo(p);
}

fn replace_with_symlink(p: &Path, target: &str) {
    std::fs::remove_file(p).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

fn replace_with_big(p: &Path, len: u64) {
    std::fs::remove_file(p).unwrap();
    let f = std::fs::File::create(p).unwrap();
    f.set_len(len).unwrap();
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn name(p: &Path) -> &[u8] {
    p.file_name().unwrap().as_bytes()
}

/// The backing subdirectories of `dir` (encrypted names, not kmfs's own).
fn backing_subdirs(dir: &Path) -> Vec<PathBuf> {
    entries(dir)
        .into_iter()
        .filter(|p| p.is_dir() && !p.is_symlink() && !name(p).starts_with(b"kmfs."))
        .collect()
}

#[test]
fn hostile_sidecars_and_dir_ids_fail_one_entry_without_hanging() {
    let m = Volume::create(false).mount();
    let d = m.p("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("a.txt"), b"still readable").unwrap();
    for c in ["L", "M", "N"] {
        std::fs::write(d.join(c.repeat(200)), c.as_bytes()).unwrap();
    }
    for s in ["sub1", "sub2"] {
        std::fs::create_dir(d.join(s)).unwrap();
        std::fs::write(d.join(s).join("f"), b"x").unwrap();
    }
    let vol = m.unmount();

    let bd = backing_subdirs(&vol.backing).pop().unwrap();
    let sidecars: Vec<PathBuf> = entries(&bd)
        .into_iter()
        .filter(|p| name(p).starts_with(b"kmfs.long.") && name(p).ends_with(b".name"))
        .collect();
    assert_eq!(sidecars.len(), 3, "{:?}", entries(&bd));
    replace_with_fifo(&sidecars[0]);
    replace_with_symlink(&sidecars[1], "/dev/zero");
    replace_with_big(&sidecars[2], 64 << 20);
    let subs = backing_subdirs(&bd);
    assert_eq!(subs.len(), 2);
    replace_with_fifo(&subs[0].join("kmfs.dirid"));
    replace_with_symlink(&subs[1].join("kmfs.dirid"), "/dev/zero");

    let m = vol.mount();
    let ls = bounded(30, Command::new("ls").arg("-la").arg(m.p("d")));
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{}", text(&ls));
    assert!(
        listing.contains("a.txt") && listing.contains("sub1"),
        "{listing}"
    );
    for c in ["L", "M", "N"] {
        assert!(!listing.contains(&c.repeat(200)), "{listing}");
    }
    let cat = bounded(30, Command::new("cat").arg(m.p("d/a.txt")));
    assert_eq!(cat.stdout, b"still readable");
    for s in ["sub1", "sub2"] {
        let o = bounded(30, Command::new("ls").arg(m.p("d").join(s)));
        assert!(
            !o.status.success(),
            "listing {s} with a hostile id succeeded"
        );
        assert!(text(&o).contains("Input/output error"), "{s}: {}", text(&o));
    }
    // The mount as a whole still serves.
    std::fs::write(m.p("after"), b"ok").unwrap();
    assert_eq!(std::fs::read(m.p("after")).unwrap(), b"ok");
    let log = m.daemon_log();
    assert!(log.contains("FIFO"), "{log}");
    assert!(log.contains("symbolic link"), "{log}");
    let vol = m.unmount();

    let o = check(60, &vol, false);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(20), "{out}");
    assert!(
        out.contains("FIFO") && out.contains("symbolic link"),
        "{out}"
    );
    assert!(out.contains("more than the"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

/// Reads the plaintext file `p` through the mount if it is a regular file
/// there (a FIFO put in a user file's place is served as a FIFO, and opening
/// one waits for a writer, as any FIFO does): its content, or `None`.
fn read_regular(p: &Path) -> Option<Vec<u8>> {
    let st = bounded(30, Command::new("stat").arg("-c").arg("%F").arg(p));
    if String::from_utf8_lossy(&st.stdout).trim() != "regular file"
        && String::from_utf8_lossy(&st.stdout).trim() != "regular empty file"
    {
        return None;
    }
    let o = bounded(30, Command::new("cat").arg(p));
    o.status.success().then_some(o.stdout)
}

/// A small tree made through the mount: plaintext path → content.
fn populate(m: &Mounted) -> BTreeMap<String, Vec<u8>> {
    let mut model = BTreeMap::new();
    let mut seed = 7u64;
    for d in ["a", "a/b", "c", "c/d", "c/d/e"] {
        std::fs::create_dir(m.p(d)).unwrap();
    }
    for (i, dir) in ["", "a", "a/b", "c", "c/d", "c/d/e"].iter().enumerate() {
        for j in 0..6 {
            seed += 1;
            let n = if j == 5 {
                format!("{dir}/{}{i}", "long-name-".repeat(20))
            } else {
                format!("{dir}/f{i}{j}")
            };
            let len = [0usize, 5, 4096, 5000, 70_000, 17][j];
            let data = pattern(seed, len);
            std::fs::write(m.p(n.trim_start_matches('/')), &data).unwrap();
            model.insert(n.trim_start_matches('/').to_string(), data);
        }
        std::os::unix::fs::symlink(
            "some/target",
            m.p(format!("{dir}/ln{i}").trim_start_matches('/')),
        )
        .unwrap();
    }
    model
}

/// Plants hostile entries in every backing directory below `root`; returns
/// how many regular backing files were replaced (each one user file made
/// unreadable).
fn plant(root: &Path) -> Vec<PathBuf> {
    let mut replaced = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut k = 0usize;
    while let Some(dir) = stack.pop() {
        stack.extend(backing_subdirs(&dir));
        let files: Vec<PathBuf> = entries(&dir)
            .into_iter()
            .filter(|p| p.is_file() && !p.is_symlink() && !name(p).starts_with(b"kmfs."))
            .collect();
        // New hostile entries under names no user entry has.
        mkfifo(&dir.join(format!("AAAAAAAAAAAAAAAAAAAAAAAAAAAA{k}")));
        std::os::unix::fs::symlink(
            "/dev/zero",
            dir.join(format!("BBBBBBBBBBBBBBBBBBBBBBBB{k}")),
        )
        .unwrap();
        mkfifo(&dir.join("kmfs.dirid.tmp"));
        mkfifo(&dir.join(format!("kmfs.tmp.{k}")));
        std::fs::create_dir(dir.join(format!("kmfs.long.{k}.name"))).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join(format!("kmfs.long.zz{k}"))).unwrap();
        // And three user files replaced by hostile ones of the same name.
        if let [a, b, c, ..] = &files[..] {
            replace_with_symlink(a, "/dev/zero");
            replace_with_fifo(b);
            replace_with_big(c, 1 << 40); // a 1 TiB sparse file: garbage header
            replaced.extend([a.clone(), b.clone(), c.clone()]);
        }
        k += 1;
    }
    replaced
}

#[test]
fn hostile_tree_mount_list_read_rekey_and_check_finish() {
    let m = Volume::create(false).mount();
    let model = populate(&m);
    let vol = m.unmount();
    let replaced = plant(&vol.backing);
    assert!(replaced.len() >= 12);
    // Root-level copies of the header under backup names: wrong types.
    mkfifo(&vol.backing.join("kmfs.volume.20260101T000000Z.bak"));

    let m = vol.mount();
    let ls = bounded(60, Command::new("ls").arg("-lR").arg(m.mnt()));
    assert!(!String::from_utf8_lossy(&ls.stdout).is_empty());
    // Read every file of the model: each reads back exactly, or (only the
    // replaced ones) fails.
    let mut failed = 0;
    for (p, data) in &model {
        if read_regular(&m.p(p)).as_ref() != Some(data) {
            failed += 1;
        }
    }
    assert!(
        failed <= replaced.len(),
        "{failed} files failed to read, but only {} were replaced",
        replaced.len()
    );
    assert!(failed > 0, "no hostile replacement was noticed");
    // Nothing readable was changed by the hostile neighbours.
    assert!(model.len() - failed >= model.len() - replaced.len());

    // An online rekey walks the hostile tree and finishes.
    let o = bounded(30, Command::new(cli::KMFS).arg("rekey").arg(m.mnt()));
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = bounded(
            30,
            Command::new(cli::KMFS)
                .arg("rekey")
                .arg("--status")
                .arg("--json")
                .arg(m.mnt()),
        );
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        if s.contains("\"done\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rekey did not finish in 120 s: {s}\n{}",
            m.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Still the same readable files after the rekey.
    let mut failed_after = 0;
    for (p, data) in &model {
        if read_regular(&m.p(p)).as_ref() != Some(data) {
            failed_after += 1;
        }
    }
    assert_eq!(failed_after, failed);
    let log = m.daemon_log();
    assert!(!log.contains("panicked"), "{log}");
    let vol = m.unmount();

    let o = check(120, &vol, false);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(20), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    // --repair removes only leftovers and finishes too: every backing entry
    // that is not kmfs's own (hostile or not) is still there afterwards.
    let before = user_entries(&vol.backing);
    let o = check(120, &vol, true);
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    assert_eq!(
        user_entries(&vol.backing),
        before,
        "repair removed user entries"
    );
}

/// Every backing entry below `root` whose name is not reserved for kmfs.
fn user_entries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for p in entries(&d) {
            if name(&p).starts_with(b"kmfs.") {
                continue;
            }
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_root_files_are_refused_by_name_in_bounded_time() {
    // Each case: the file to damage, how, and a word the error must hold.
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 5] = [
        ("kmfs.volume", |p| replace_with_fifo(p), "FIFO"),
        (
            "kmfs.volume",
            |p| replace_with_symlink(p, "/dev/zero"),
            "symbolic link",
        ),
        ("kmfs.volume", |p| replace_with_big(p, 2 << 20), "bytes"),
        (
            "kmfs.rekey.journal",
            |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap(),
            "symbolic link",
        ),
        ("kmfs.rekey.journal", |p| mkfifo(p), "FIFO"),
    ];
    for (file, damage, word) in cases {
        let vol = Volume::create(false);
        damage(&vol.backing.join(file));
        let o = bounded(
            30,
            Command::new(cli::KMFS)
                .arg("mount")
                .arg("--keyfile")
                .arg(&vol.key)
                .arg(&vol.backing)
                .arg(&vol.mnt),
        );
        let out = text(&o);
        assert!(!o.status.success(), "{file}: mount succeeded: {out}");
        assert!(out.contains(word), "{file}: {out}");
        // The error is the last line, one line, naming the problem.
        let last = String::from_utf8_lossy(&o.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(
            last.starts_with("kmfs: ") && last.contains(word),
            "{file}: {out}"
        );
        assert!(!mount::is_mounted(&vol.mnt));
        let o = check(30, &vol, false);
        assert!(!o.status.success());
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
        let _ = kmfs(&[&"header", &"dump", &vol.backing]);
    }
}
