//! Active/passive failover on shared storage (issue 20, docs/HA.md), with
//! real processes on two "hosts" — network namespaces with their own links
//! and host names (tests/it/support/netns.rs) — and one backing directory both
//! reach (the stand-in for a SAN LUN or an NFS export):
//!
//! * host A mounts and writes with fsync; host B's mount is refused with A
//!   named (host, pid) and changes nothing in the backing tree;
//! * A's daemon frozen (SIGSTOP, a hung server): B's mount with
//!   `lock_wait` waits, is refused and changes nothing — no steal from a
//!   holder that may wake up;
//! * A's daemon is SIGKILLed (a crashed server) in the middle of a data
//!   re-encryption; B's mount succeeds as soon as the lock is free, logs the
//!   takeover naming A, finishes the interrupted file and the rekey, and
//!   every byte A had fsync'd is there. The takeover time (kill → B's mount live) is printed;
//! * the lock is held but its named holder is gone (a descriptor that lived
//!   on in another process; another host whose NFS lease still holds it):
//!   the refusal says what holds it and what releases it, nothing is broken
//!   or stolen, and `-o lock_wait=SECONDS` takes over once the operator has
//!   fenced the holder.

use crate::support::{cli, mount, netns};

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::rng::pattern;
use cli::{is_mounted, text};
use mount::{KMFS, Volume};
use netns::{Host, Lab, report};

const LOCKED: i32 = 21;

/// Every entry below `dir`: kind, mode and contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let data = if md.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else if md.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.insert(
                p.strip_prefix(dir).unwrap().to_path_buf(),
                (md.mode(), data),
            );
        }
    }
    out
}

/// A foreground `kmfs mount` on a host, its stderr in a log file; killed
/// (SIGKILL) and its mount detached on drop.
struct HostMount {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl HostMount {
    /// Starts `kmfs mount --keyfile K -f [OPTS] BACK MNT` on `host` with its
    /// own control-socket directory `run` (another host's sockets are not
    /// visible), without waiting.
    fn start(host: &Host, vol: &Volume, mnt: &Path, run: &Path, opts: &[&str]) -> HostMount {
        std::fs::create_dir_all(mnt).unwrap();
        std::fs::create_dir_all(run).unwrap();
        let log = vol
            .dir
            .path()
            .join(format!("{}-{}.log", host.hostname, stamp()));
        let child = host
            .command(KMFS)
            .arg("mount")
            .arg("--keyfile")
            .arg(&vol.key)
            .arg("-f")
            .args(opts)
            .arg(&vol.backing)
            .arg(mnt)
            .env("KMFS_RUNTIME_DIR", run)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        HostMount {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log,
        }
    }

    /// Waits until the mount is live (panics if the daemon exits first).
    fn wait_live(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !is_mounted(&self.mnt) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kmfs mount exited with {st}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mount not live after {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's pid (nsenter, unshare and sh all exec into kmfs).
    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn unmount(&mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success());
        let mut c = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "daemon: {st}\n{}", self.log_text());
                return;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        self.kill9();
        detach(&self.mnt);
    }
}

fn detach(mnt: &Path) {
    for _ in 0..50 {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
    }
}

fn stamp() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A daemonising `kmfs mount --keyfile K [OPTS] BACK MNT` on `host`, as
/// systemd's `Type=forking` unit runs it: returns when the mount is live or
/// has failed. Killed after 60 s (nothing here may hang).
fn mount_on(host: &Host, vol: &Volume, mnt: &Path, run: &Path, opts: &[&str]) -> Output {
    std::fs::create_dir_all(mnt).unwrap();
    std::fs::create_dir_all(run).unwrap();
    let child = host
        .command(KMFS)
        .arg("mount")
        .arg("--keyfile")
        .arg(&vol.key)
        .args(opts)
        .arg(&vol.backing)
        .arg(mnt)
        .env("KMFS_RUNTIME_DIR", run)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(60))
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "still running after {limit:?}: {}",
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The one-line message of a failed command (its last stderr line).
fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_host_b_is_refused_while_a_writes_and_takes_over_after_a_crash() {
    if !netns::available() {
        return;
    }
    let mut lab = Lab::new();
    let host_a = lab.host("hostA");
    let host_b = lab.host("hostB");
    let vol = Volume::create(false);
    let (run_a, run_b) = (vol.dir.path().join("run-a"), vol.dir.path().join("run-b"));
    let mnt_b = vol.dir.path().join("mnt-b");
    let mut a = HostMount::start(&host_a, &vol, &vol.mnt, &run_a, &[]);
    a.wait_live(Duration::from_secs(20));

    // A writes; every file is fsync'd (and the directory, for the names).
    let mut written = Vec::new();
    std::fs::create_dir(vol.mnt.join("share")).unwrap();
    for i in 0..24u64 {
        let p = format!("share/f{i}");
        let data = pattern(i, 1 + (i as usize * 37_813) % 400_000);
        let mut f = std::fs::File::create(vol.mnt.join(&p)).unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        f.sync_all().unwrap();
        written.push((p, data));
    }
    // A big one, so that the rekey below spends seconds inside one file.
    let big = pattern(99, 6 << 20);
    let mut f = std::fs::File::create(vol.mnt.join("share/big")).unwrap();
    std::io::Write::write_all(&mut f, &big).unwrap();
    f.sync_all().unwrap();
    written.push(("share/big".to_string(), big));
    std::fs::File::open(vol.mnt.join("share"))
        .unwrap()
        .sync_all()
        .unwrap();
    let rec = std::fs::read_to_string(vol.backing.join("kmfs.lock")).unwrap();
    assert!(
        rec.starts_with(&format!("host=hostA pid={} ", a.pid())),
        "{rec}"
    );

    // B: refused, A named, nothing changed — daemonising and foreground.
    let before = snapshot(&vol.backing);
    let o = mount_on(&host_b, &vol, &mnt_b, &run_b, &[]);
    assert_eq!(o.status.code(), Some(LOCKED), "{}", text(&o));
    let line = last_line(&o);
    assert!(
        line.starts_with("kmfs: ")
            && line.contains("is in use by another writer")
            && line.contains(&format!("host=hostA pid={} ", a.pid()))
            && line.contains("command=mount")
            && line.contains("unmount it there first")
            && line.contains("fence it"),
        "{line}"
    );
    assert!(!is_mounted(&mnt_b));
    let mut bf = HostMount::start(&host_b, &vol, &mnt_b, &run_b, &[]);
    let st = bf.child.as_mut().unwrap().wait().unwrap();
    assert_eq!(st.code(), Some(LOCKED), "{}", bf.log_text());
    assert!(bf.log_text().contains("host=hostA"), "{}", bf.log_text());
    assert!(!is_mounted(&mnt_b));
    assert!(
        before == snapshot(&vol.backing),
        "refused mounts changed the backing tree"
    );
    // A hung host is no dead host: with A's daemon frozen (SIGSTOP), B's
    // mount waits as long as it was told to and is refused, changing
    // nothing; the lock is never taken from a holder that may wake up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = Instant::now();
    let o = mount_on(&host_b, &vol, &mnt_b, &run_b, &["-o", "lock_wait=4"]);
    let waited = t.elapsed();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(LOCKED), "{}", text(&o));
    assert!(waited >= Duration::from_secs(4), "{waited:?}");
    assert!(last_line(&o).contains(&format!("host=hostA pid={} ", a.pid())));
    assert!(!is_mounted(&mnt_b));
    assert!(
        before == snapshot(&vol.backing),
        "a mount refused by a hung holder changed the backing tree"
    );
    assert_eq!(
        std::fs::read(vol.mnt.join(&written[0].0)).unwrap(),
        written[0].1
    );

    // A starts a data re-encryption (slowed down) and crashes in the middle
    // of it; B's mount (as systemd runs it) succeeds once the lock is free,
    // finishing the interrupted file first, and the rekey goes on there.
    let o = kmfs_run(&run_a, &[&"rekey", &"--rate", &"2", &"--json", &vol.mnt]);
    assert!(o.status.success(), "rekey on A: {}", text(&o));
    let s = poll_rekey(&run_a, &vol.mnt, "a rekey under way", |s| {
        s["files_done"].as_u64().unwrap_or(0) >= 2 && s["phase"] == "running"
    });
    assert!(vol.backing.join("kmfs.rekey").exists(), "{s}");
    // With lock_wait, as the HA drop-in (docs/HA.md) runs it: B waits for
    // the lock however long A takes to get into a file.
    let mut b = HostMount::start(&host_b, &vol, &mnt_b, &run_b, &["-o", "lock_wait=60"]);
    // Kill A while its journal says a file is half re-encrypted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mid_file = loop {
        if let Ok(Some(r)) = kmfs::rekey::journal::Journal::pending(&vol.backing)
            && !r.complete
        {
            break r.file.path;
        }
        assert!(
            Instant::now() < deadline,
            "the rekey never was inside a file"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    // B is waiting on the lock (its grace period) while A still runs.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!is_mounted(&mnt_b));
    let a_pid = a.pid();
    a.kill9();
    let killed = Instant::now();
    b.wait_live(Duration::from_secs(20));
    let takeover_waiting = killed.elapsed();
    detach(&vol.mnt);
    // B resumed the rekey A had started, and finishes it.
    poll_rekey(&run_b, &mnt_b, "the rekey finished on B", |s| {
        s["phase"] == "idle" || s["phase"] == "done"
    });
    assert!(!vol.backing.join("kmfs.rekey").exists());
    for (p, data) in &written {
        let got = std::fs::read(mnt_b.join(p)).unwrap();
        assert!(got == *data, "{p} differs on B after the rekey");
    }
    // Again with a fresh mount command after a crash, the way a cluster
    // manager runs it: kill B, then start a daemonising mount on A.
    b.kill9();
    detach(&mnt_b);
    let killed = Instant::now();
    let o = mount_on(&host_a, &vol, &vol.mnt, &run_a, &[]);
    let takeover_fresh = killed.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let blog = b.log_text();
    report(format!(
        "TAKEOVER: SIGKILL of the holder in the middle of re-encrypting {} -> waiting mount \
         on the other host live (that file finished first): {} ms; \
         SIGKILL -> fresh daemonising mount returned live: {} ms",
        mid_file.display(),
        takeover_waiting.as_millis(),
        takeover_fresh.as_millis()
    ));
    assert!(
        blog.contains("op=rekey_recover") && blog.contains("generation="),
        "B did not finish the interrupted file {}:\n{blog}",
        mid_file.display()
    );
    assert!(takeover_waiting < Duration::from_secs(5));
    assert!(takeover_fresh < Duration::from_secs(5));
    assert!(
        blog.contains("action=takeover")
            && blog.contains(&format!("previous=\"host=hostA pid={a_pid} ")),
        "B's log names no takeover from A:\n{blog}"
    );
    // Every fsync'd byte is there, on the mount A now serves again.
    for (p, data) in &written {
        let got = std::fs::read(vol.mnt.join(p)).unwrap();
        assert!(got == *data, "{p} differs after the takeover");
    }
    let rec = std::fs::read_to_string(vol.backing.join("kmfs.lock")).unwrap();
    assert!(rec.starts_with("host=hostA "), "{rec}");
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&vol.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    // A clean unmount leaves no holder record (the next mount is no takeover).
    let deadline = Instant::now() + Duration::from_secs(10);
    while kmfs::volume::lock::holder(&vol.backing).unwrap().is_some() {
        assert!(Instant::now() < deadline, "daemon did not let go");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read(vol.backing.join("kmfs.lock")).unwrap(),
        b"",
        "a clean release leaves the record empty"
    );
}

/// `kmfs ARGS` with the control sockets of one host (`run`).
fn kmfs_run(run: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(KMFS);
    for a in args {
        c.arg(a);
    }
    let child = c
        .env("KMFS_RUNTIME_DIR", run)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(60))
}

/// Polls `kmfs rekey --status --json MNT` until `done` (60 s at most).
fn poll_rekey(
    run: &Path,
    mnt: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = kmfs_run(run, &[&"rekey", &"--status", &"--json", &mnt]);
        assert!(o.status.success(), "{}", text(&o));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "no {what}: {s:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Holds `kmfs.lock` of `backing` with an OFD write lock whose record is
/// `record`, in a `sleep` started by `spawn` (the descriptor as its fd 3),
/// not in this process: a holder that outlived the one the record names.
fn orphan_holder(backing: &Path, record: &str, mut spawn: Command) -> Child {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(backing.join("kmfs.lock"))
        .unwrap();
    let fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(f.as_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    f.set_len(0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, record.as_bytes(), 0).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: dup2/fcntl in the child between fork and exec (both
    // async-signal-safe); fd 3 ends up without the close-on-exec flag.
    unsafe {
        spawn.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = spawn
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(f);
    // The lock now lives in the child only.
    let probe = kmfs::volume::lock::holder(backing).unwrap();
    assert!(probe.is_some(), "the orphan does not hold the lock");
    child
}

/// A pid that no process has now (a child that has exited).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn b_a_lock_whose_holder_is_gone_is_explained_never_stolen_and_taken_over_on_request() {
    if !netns::available() {
        return;
    }
    let mut lab = Lab::new();
    let host_a = lab.host("hostA");
    let host_b = lab.host("hostB");
    let vol = Volume::create(false);
    let run_b = vol.dir.path().join("run-b");
    let mnt_b = vol.dir.path().join("mnt-b");

    // 1. This host: the record names a kmfs pid that is gone, but its
    //    descriptor lived on in another process (a leaked fd).
    let gone = dead_pid();
    let me = hostname();
    let record = format!("host={me} pid={gone} since=2026-11-30T20:00:00Z command=mount\n");
    let mut sleeper = orphan_holder(&vol.backing, &record, {
        let mut c = Command::new("sleep");
        c.arg("600");
        c
    });
    let before = snapshot(&vol.backing);
    let o = Command::new(KMFS)
        .arg("mount")
        .arg("--keyfile")
        .arg(&vol.key)
        .arg(&vol.backing)
        .arg(&vol.mnt)
        .env("KMFS_RUNTIME_DIR", &run_b)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(LOCKED), "{}", text(&o));
    let line = last_line(&o);
    assert!(
        line.contains(&format!("pid={gone} "))
            && line.contains("that process is gone, but the lock is still held by")
            && line.contains(&format!("pid={} (sleep)", sleeper.id()))
            && line.contains("kmfs never breaks a held lock"),
        "{line}"
    );
    assert!(
        before == snapshot(&vol.backing),
        "the refusal changed the backing tree"
    );
    // The operator stops that process; the next mount takes over and says so.
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let mut m = HostMount::start(&host_b, &vol, &mnt_b, &run_b, &[]);
    m.wait_live(Duration::from_secs(20));
    let log = m.log_text();
    assert!(
        log.contains("action=takeover")
            && log.contains(&format!("previous=\"host={me} pid={gone} ")),
        "{log}"
    );
    m.unmount();

    // 2. Another host (the NFS lease case): host A's kmfs is gone, the shared
    //    storage still holds its lock (here: a process in A's namespace holds
    //    the descriptor; on NFS the server holds it until A's lease expires).
    let record = format!("host=hostA pid={gone} since=2026-11-30T20:00:00Z command=mount\n");
    let mut lease = orphan_holder(&vol.backing, &record, {
        let mut c = host_a.command("sleep");
        c.arg("600");
        c
    });
    let before = snapshot(&vol.backing);
    let t = Instant::now();
    let o = mount_on(&host_b, &vol, &mnt_b, &run_b, &[]);
    let refused_after = t.elapsed();
    assert_eq!(o.status.code(), Some(LOCKED), "{}", text(&o));
    let line = last_line(&o);
    assert!(
        line.contains(&format!("host=hostA pid={gone} "))
            && line.contains("fence it (power it off) first")
            && line.contains("lease expires")
            && line.contains("-o lock_wait=SECONDS")
            && line.contains("never breaks another host's lock"),
        "{line}"
    );
    // An explicit wait that runs out: refused after the wait, nothing changed.
    let t = Instant::now();
    let o = mount_on(&host_b, &vol, &mnt_b, &run_b, &["-o", "lock_wait=5"]);
    let waited = t.elapsed();
    assert_eq!(o.status.code(), Some(LOCKED), "{}", text(&o));
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert!(!is_mounted(&mnt_b));
    assert!(
        before == snapshot(&vol.backing),
        "a refused mount changed the backing tree"
    );
    // The operator fences A (here: the lease holder goes 2 s after B starts
    // waiting); B's mount with lock_wait takes over then, not before.
    let mut m = HostMount::start(&host_b, &vol, &mnt_b, &run_b, &["-o", "lock_wait=60"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!is_mounted(&mnt_b), "mounted before the holder was fenced");
    lease.kill().unwrap();
    lease.wait().unwrap();
    let fenced = Instant::now();
    m.wait_live(Duration::from_secs(20));
    report(format!(
        "LEASE CASE: refused after {} ms (grace); lock_wait=5 refused after {} ms; \
         fenced -> lock_wait mount live: {} ms",
        refused_after.as_millis(),
        waited.as_millis(),
        fenced.elapsed().as_millis()
    ));
    let log = m.log_text();
    assert!(
        log.contains("action=wait")
            && log.contains("action=takeover")
            && log.contains(&format!("previous=\"host=hostA pid={gone} ")),
        "{log}"
    );
    m.unmount();
}
