//! A local unprivileged user on the file server (docs/SECURITY.md, attacker
//! 3), played by uid/gid 65534 (nobody/nogroup) against real mounts:
//! set-id programs and device nodes from the backing store grant nothing by
//! default, `create` of a name that appears under the caller's feet does not
//! open root's file, and a backing directory others can enter is refused.

use crate::support::cli;
use crate::support::mount;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cli::text;
use mount::Volume;

const NOBODY: &str = "65534";

/// `setpriv` to nobody/nogroup with no supplementary groups.
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .args(args);
    c
}

fn mount_options(mnt: &Path) -> String {
    let want = mnt.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .and_then(|l| l.split(' ').nth(5).map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn setuid_programs_in_the_volume_do_not_elevate_by_default() {
    let m = Volume::create(false).mount_with(&["-o", "allow_other"]);
    let opts = mount_options(m.mnt());
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{opts}");
    let id = m.p("id");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let o = as_nobody(&[id.to_str().unwrap(), "-u"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        NOBODY,
        "set-uid took effect"
    );
    drop(m);

    // Opting back in is explicit.
    let v = Volume::create(false);
    let m = v.mount_with(&["-o", "allow_other,suid,dev"]);
    let opts = mount_options(m.mnt());
    assert!(
        !opts.contains("nosuid") && !opts.contains("nodev"),
        "{opts}"
    );
}

#[test]
fn device_nodes_in_the_volume_cannot_be_opened_by_default() {
    let m = Volume::create(false).mount_with(&["-o", "allow_other"]);
    // /dev/null's numbers (1, 3), world-writable: harmless, but it proves a
    // device node from the volume is not opened.
    let dev = m.p("null");
    nix::sys::stat::mknod(
        &dev,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
}

/// The race: nobody opens `shared/secret` with O_CREAT (no O_EXCL) in a
/// world-writable directory while root's private file appears under that
/// name behind the kernel's back (renamed in the backing directory of a
/// plaintext-names volume). The kernel's LOOKUP finds nothing, so it sends
/// CREATE; the file exists by then. kmfs must not open it (as root) for
/// nobody: EEXIST. On the code before the fix, nobody read root's secret
/// within a few seconds.
#[test]
fn create_racing_an_appearing_file_never_opens_it_for_the_caller() {
    let m = Volume::create(true).mount_with(&["-o", "allow_other"]);
    std::fs::create_dir(m.p("shared")).unwrap();
    // World-writable without the sticky bit, so nobody can drop its cached
    // dentry (unlink) and make the kernel LOOKUP and CREATE again.
    std::fs::set_permissions(m.p("shared"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::create_dir(m.p("private")).unwrap();
    std::fs::set_permissions(m.p("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(m.p("private/secret"), b"TOPSECRET").unwrap();
    std::fs::set_permissions(
        m.p("private/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let from = m.backing().join("private/secret");
    let to = m.backing().join("shared/secret");
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A second name for root's file appears and disappears.
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::hard_link(&from, &to);
                let _ = std::fs::remove_file(&to);
            }
        })
    };
    let script = r#"
import os, sys, time
p = sys.argv[1]
end = time.time() + float(sys.argv[2])
tries = leaks = own = 0
errs = {}
while time.time() < end:
    tries += 1
    try:
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as e:
        errs[e.errno] = errs.get(e.errno, 0) + 1
        try:
            os.unlink(p)
        except OSError:
            pass
        continue
    st = os.fstat(fd)
    own += st.st_uid != 0
    if st.st_uid == 0:
        data = os.read(fd, 64)
        leaks += 1
        print("LEAK", data)
    os.close(fd)
    try:
        os.unlink(p)
    except OSError:
        pass
print("tries", tries, "leaks", leaks, "own", own, "errors", errs)
"#;
    let t = Instant::now();
    let o = as_nobody(&[
        "/usr/bin/python3",
        "-c",
        script,
        m.p("shared/secret").to_str().unwrap(),
        "8",
    ])
    .output()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let out = text(&o);
    eprintln!("{out}");
    assert!(o.status.success(), "{out}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(
        !out.contains("LEAK"),
        "nobody opened root's file through create: {out}"
    );
    assert!(out.contains("tries"), "{out}");
    assert_eq!(std::fs::read(m.p("private/secret")).unwrap(), b"TOPSECRET");
}

#[test]
fn a_backing_directory_others_can_enter_is_refused_unless_accepted() {
    let v = Volume::create(false);
    // kmfs init made it root's alone.
    let mode = std::fs::metadata(&v.backing).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "init left mode {mode:o}");
    std::fs::set_permissions(&v.backing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = v.mount_cmd(&[]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(16), "{msg}");
    assert!(msg.contains("0755") && msg.contains("chmod 700"), "{msg}");
    assert_eq!(msg.trim().lines().count(), 1, "{msg}");
    assert!(!mount::is_mounted(&v.mnt));
    // Group-writable parent without the sticky bit: refused too.
    std::fs::set_permissions(&v.backing, std::fs::Permissions::from_mode(0o700)).unwrap();
    let parent = v.backing.parent().unwrap();
    let before = std::fs::metadata(parent).unwrap().permissions().mode() & 0o7777;
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = v.mount_cmd(&[]);
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(before)).unwrap();
    assert_eq!(o.status.code(), Some(16), "{}", text(&o));
    assert!(text(&o).contains("above backing directory"), "{}", text(&o));
    // The explicit option accepts an open one.
    std::fs::set_permissions(&v.backing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = v.mount_with(&["-o", "insecure_backing"]);
    std::fs::write(m.p("f"), b"x").unwrap();
}
