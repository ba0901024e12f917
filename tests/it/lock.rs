//! One writer per volume (issue 15, finding 2): the lock file `kmfs.lock` in
//! the backing root. While a volume is mounted, a second mount (a second
//! mountpoint here, or "another host": a process that cannot see this host's
//! control sockets) and every offline command that writes are refused with
//! exit code 21 and a one-line message naming the daemon (host, pid, since),
//! and change nothing — not even a pending rekey journal, which a second
//! mount used to "recover" behind the live daemon's back. Read-only commands
//! work beside the daemon; after the unmount the lock is free; a lock file
//! that is a symlink or a FIFO is a clear error, never a hang.

use crate::support::cli;
use crate::support::fault;
use crate::support::mount;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cli::{is_mounted, text};
use fault::{Daemon, detach};
use mount::{KMFS, Volume};

const LOCKED: i32 = 21;

/// Environment variables for a command.
type Env<'a> = &'a [(&'a str, &'a Path)];

/// Runs `kmfs ARGS` with `env` set, killing it (and failing the test) if it
/// runs longer than 60 s: nothing here may hang.
fn run(args: &[&dyn AsRef<OsStr>], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(KMFS);
    for a in args {
        c.arg(a);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "kmfs {:?} still running after 60 s: {}",
                args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
                text(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every entry below `dir` (symlinks not followed): kind and contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let v = if md.is_dir() {
                stack.push(p.clone());
                ("dir".to_string(), Vec::new())
            } else if md.is_file() {
                ("file".to_string(), std::fs::read(&p).unwrap())
            } else if md.is_symlink() {
                (
                    "symlink".to_string(),
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                (format!("{:o}", md.permissions().mode()), Vec::new())
            };
            out.insert(rel, v);
        }
    }
    out
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Asserts a refusal by the lock: exit 21, and the command's one-line
/// message (`kmfs: ...`, the last line; a daemonising mount without a syslog
/// socket logs to stderr before it) names the daemon.
fn assert_locked(o: &Output, what: &str, pid: i32) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(LOCKED), "{what}: {}", text(o));
    let line = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        line.starts_with("kmfs: ")
            && line.contains("is in use by another writer")
            && line.contains(&format!("host={} ", hostname()))
            && line.contains(&format!("pid={pid} "))
            && line.contains("since=")
            && line.contains("command=mount"),
        "{what}: {err}"
    );
}

/// A volume with some content, mounted in the foreground (the daemon's pid is
/// the child's).
fn mounted_volume() -> (Volume, Daemon) {
    let vol = Volume::create(false);
    let d = Daemon::mount(&vol);
    std::fs::create_dir(vol.mnt.join("dir")).unwrap();
    std::fs::write(vol.mnt.join("dir/file"), vec![5u8; 300_000]).unwrap();
    std::fs::write(vol.mnt.join("small"), b"hello").unwrap();
    (vol, d)
}

/// A directory for a control-socket runtime dir of "another host": commands
/// run with it cannot find this host's daemon and go the offline way.
fn other_host(vol: &Volume) -> PathBuf {
    let p = vol.dir.path().join("other-host-run");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Unmounts `mnt` on drop (a second mount that should not have happened).
struct Detach(PathBuf);
impl Drop for Detach {
    fn drop(&mut self) {
        detach(&self.0);
    }
}

#[test]
fn a_second_mount_is_refused_and_changes_nothing() {
    let (vol, mut d) = mounted_volume();
    // A half-done rekey file as a crash would leave it: a pending journal
    // record. A second mount used to run recovery on it before noticing the
    // first daemon (here it names a file that is gone, so recovery marks the
    // journal idle: a visible change).
    {
        use kmfs::rekey::journal::{FileRef, Journal, Record};
        let mut j = Journal::open(&vol.backing).unwrap();
        let mut rec = Record {
            seq: 0,
            file: FileRef {
                ino: u64::MAX,
                file_id: [7u8; 16],
                path: PathBuf::from("gone"),
            },
            from: 0,
            to: 1,
            next_unit: 0,
            complete: false,
            writes: Vec::new(),
            directory: false,
        };
        j.commit(&mut rec).unwrap();
    }
    let before = snapshot(&vol.backing);
    let mnt2 = vol.dir.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let _guard = Detach(mnt2.clone());
    let other = other_host(&vol);
    // The same host (the daemon's control socket is visible), daemonising
    // and in the foreground; then "another host" (it is not).
    let cases: [(&str, &[&str], Env); 3] = [
        ("second mount", &[], &[]),
        ("second mount -f", &["-f"], &[]),
        (
            "mount from another host",
            &[],
            &[("KMFS_RUNTIME_DIR", other.as_path())],
        ),
    ];
    for (what, extra, env) in cases {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"mount", &"--keyfile", &vol.key];
        for e in extra {
            args.push(e);
        }
        args.push(&vol.backing);
        args.push(&mnt2);
        let o = run(&args, env);
        assert!(
            !is_mounted(&mnt2),
            "{what}: a second daemon serves the volume"
        );
        assert_locked(&o, what, d.pid());
        assert!(
            err_text(&o).contains(&format!("volume {} is in use", vol.backing.display()))
                && err_text(&o).contains("unmount it there first"),
            "{}",
            err_text(&o)
        );
        assert!(
            snapshot(&vol.backing) == before,
            "{what} changed the volume"
        );
    }
    // The first daemon is unharmed.
    assert_eq!(std::fs::read(vol.mnt.join("small")).unwrap(), b"hello");
    assert!(d.alive());
    d.unmount();
}

fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn b_offline_writers_are_refused_while_mounted() {
    let (vol, mut d) = mounted_volume();
    let b = &vol.backing;
    let k = &vol.key;
    let saved = vol.dir.path().join("header.saved");
    let o = run(&[&"header", &"backup", b, &saved], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let k2 = vol.dir.path().join("keys/key2");
    std::fs::write(&k2, [9u8; 32]).unwrap();
    std::fs::set_permissions(&k2, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = snapshot(b);
    let other = other_host(&vol);
    let elsewhere: &[(&str, &Path)] = &[("KMFS_RUNTIME_DIR", other.as_path())];
    let cases: Vec<(&str, Vec<&dyn AsRef<OsStr>>, Env)> = vec![
        (
            "check --repair",
            vec![&"check", &"--repair", &"--keyfile", k, b],
            &[],
        ),
        (
            "check --repair from another host",
            vec![&"check", &"--repair", &"--keyfile", k, b],
            elsewhere,
        ),
        (
            "header restore",
            vec![&"header", &"restore", &"--keyfile", k, b, &saved],
            &[],
        ),
        // Commands that would go through the daemon here, as on another host.
        (
            "offline rekey",
            vec![&"rekey", &"--keyfile", k, b],
            elsewhere,
        ),
        (
            "offline rekey --pause",
            vec![&"rekey", &"--pause", b],
            elsewhere,
        ),
        (
            "offline rotate-kek",
            vec![&"rotate-kek", &"--keyfile", k, &"--new-keyfile", &k2, b],
            elsewhere,
        ),
    ];
    for (what, args, env) in cases {
        let o = run(&args, env);
        assert_locked(&o, what, d.pid());
        assert!(
            err_text(&o).contains("unmount it there first"),
            "{}",
            err_text(&o)
        );
        assert!(snapshot(b) == before, "{what} changed the volume");
    }
    // init of another (empty) directory whose lock another writer holds.
    let empty = vol.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let held = kmfs::volume::lock::VolumeLock::acquire(&empty, "test-holder").unwrap();
    let o = run(&[&"init", &"--keyfile", k, &empty], &[]);
    assert_eq!(o.status.code(), Some(LOCKED), "{}", text(&o));
    assert!(
        err_text(&o).contains(&format!("pid={} ", std::process::id()))
            && err_text(&o).contains("command=test-holder"),
        "{}",
        err_text(&o)
    );
    let names: Vec<_> = std::fs::read_dir(&empty)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["kmfs.lock"], "init wrote while refused");
    drop(held);
    let o = run(&[&"init", &"--keyfile", k, &empty], &[]);
    assert!(
        o.status.success(),
        "init beside its own lock file: {}",
        text(&o)
    );
    assert!(d.alive());
    d.unmount();
}

#[test]
fn c_readers_work_while_mounted() {
    let (vol, mut d) = mounted_volume();
    let b = &vol.backing;
    let other = other_host(&vol);
    let saved = vol.dir.path().join("header.saved");
    let outs = [
        ("status", run(&[&"status", &vol.mnt], &[])),
        ("header dump", run(&[&"header", &"dump", b], &[])),
        (
            "header backup",
            run(&[&"header", &"backup", b, &saved], &[]),
        ),
        ("rekey --status", run(&[&"rekey", &"--status", b], &[])),
        (
            "offline rekey --status",
            run(
                &[&"rekey", &"--status", b],
                &[("KMFS_RUNTIME_DIR", other.as_path())],
            ),
        ),
    ];
    for (what, o) in outs {
        assert!(o.status.success(), "{what}: {}", text(&o));
    }
    let o = run(&[&"check", &"--keyfile", &vol.key, b], &[]);
    assert!(o.status.success(), "check: {}", text(&o));
    let out = text(&o);
    assert!(out.contains("0 errors, 0 warnings, 0 leftovers"), "{out}");
    assert!(
        out.contains("in use by a writer") && out.contains(&format!("pid={} ", d.pid())),
        "check names the writer beside it: {out}"
    );
    // The lock file is the volume's own: not listed in the mount.
    let names: Vec<_> = std::fs::read_dir(&vol.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("kmfs.")), "{names:?}");
    d.unmount();
}

#[test]
fn d_after_unmount_the_lock_is_free() {
    let (vol, mut d) = mounted_volume();
    let b = &vol.backing;
    d.unmount();
    assert!(kmfs::volume::lock::holder(b).unwrap().is_none());
    let o = run(&[&"rekey", &"--keyfile", &vol.key, b], &[]);
    assert!(o.status.success(), "offline rekey: {}", text(&o));
    let o = run(&[&"check", &"--repair", &"--keyfile", &vol.key, b], &[]);
    assert!(o.status.success(), "check --repair: {}", text(&o));
    // The stale holder record of the last writer is no finding.
    assert!(
        text(&o).contains("0 errors, 0 warnings, 0 leftovers"),
        "{}",
        text(&o)
    );
    let mut d = Daemon::mount(&vol);
    let rec = std::fs::read_to_string(b.join("kmfs.lock")).unwrap();
    assert!(
        rec.starts_with(&format!("host={} pid={} ", hostname(), d.pid()))
            && rec.ends_with(" command=mount\n"),
        "{rec}"
    );
    assert_eq!(
        std::fs::read(vol.mnt.join("dir/file")).unwrap(),
        vec![5u8; 300_000]
    );
    d.unmount();
}

#[test]
fn e_a_lock_file_that_is_no_regular_file_is_a_clear_error() {
    let vol = Volume::create(false);
    let b = &vol.backing;
    let lock = b.join("kmfs.lock");
    let fifo =
        |p: &Path| nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let target = vol.dir.path().join("elsewhere");
    std::fs::write(&target, b"not a lock").unwrap();
    type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
    let kinds: [(&str, Plant); 3] = [
        (
            "is a symbolic link",
            Box::new(|p: &Path| std::os::unix::fs::symlink(&target, p).unwrap()),
        ),
        (
            "is a symbolic link",
            Box::new(|p: &Path| std::os::unix::fs::symlink("/nonexistent/x", p).unwrap()),
        ),
        ("is a FIFO", Box::new(fifo)),
    ];
    for (want, plant) in kinds {
        let _ = std::fs::remove_file(&lock);
        plant(&lock);
        for args in [
            vec![
                &"mount" as &dyn AsRef<OsStr>,
                &"--keyfile",
                &vol.key,
                b,
                &vol.mnt,
            ],
            vec![&"rekey", &"--keyfile", &vol.key, b],
            vec![&"check", &"--repair", &"--keyfile", &vol.key, b],
        ] {
            let o = run(&args, &[]);
            let err = err_text(&o);
            assert_eq!(o.status.code(), Some(16), "{want}: {}", text(&o));
            assert!(
                err.contains(&lock.display().to_string()) && err.contains(want),
                "{err}"
            );
            assert!(!is_mounted(&vol.mnt));
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"not a lock");
        assert!(!Path::new("/nonexistent/x").exists());
        // A read-only check is not held up by it.
        let o = run(&[&"check", &"--keyfile", &vol.key, b], &[]);
        assert!(o.status.success(), "{}", text(&o));
    }
    std::fs::remove_file(&lock).unwrap();
    let mut d = Daemon::mount(&vol);
    assert!(std::fs::symlink_metadata(&lock).unwrap().is_file());
    d.unmount();
}
