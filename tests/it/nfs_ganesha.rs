//! A real NFS server on top of kmfs (issue 16): nfs-ganesha (Debian's
//! nfs-ganesha and nfs-ganesha-vfs) exports a kmfs mount over NFSv4 on
//! 127.0.0.1, and libnfs's command-line client (libnfs-utils: `nfs-cp`,
//! `nfs-cat`, `nfs-ls`) writes, reads and lists files through it. The kernel
//! here has no nfsd; ganesha's VFS FSAL serves a local filesystem the way
//! nfsd does through export operations: it keeps the file handle of every
//! object it has seen (`name_to_handle_at`) and reopens objects by handle
//! (`open_by_handle_at`) when it needs a descriptor. After the kernel's
//! caches are dropped, that reopen reaches the daemon as a LOOKUP of "." in
//! the node id (src/fs/export.rs). Before node ids were derived from backing
//! handles, every such reopen gave ESTALE: the same steps on kmfs 31b88c3
//! fail with `NFS4ERR_STALE` on `nfs-ls` and `nfs-cat` of the export.
//!
//! The backing directory is a tmpfs of its own, so files (not only
//! directories) reopen by handle (the `op=export` log line).
//!
//! ganesha does its file operations with the client's uid and gid, so the
//! volume is mounted with `allow_other` (a client other than root creates a
//! file here), as it must be under the kernel's nfsd too.
//!
//! A restart of the kmfs daemon is done the way it must be done under
//! ganesha: ganesha holds the mount busy (and, killed under it, a daemon
//! leaves ganesha serving the dead mount), so ganesha is stopped, the
//! volume unmounted and mounted again, and ganesha started. libnfs's tools
//! are one-shot clients (each run looks the path up from the export root),
//! so what spans the restart is the data and the names, not a client's
//! handles.
//!
//! libnfs 4.0 (Debian 12) cannot send an NFSv4 WRITE of more than 3940
//! bytes ("ZDR error: Failed to encode COMPOUND4args": the request must fit
//! one 4 KiB buffer), so files written through NFS here are small; larger
//! files are written through the mount and read through NFS. NFSv3 would
//! need rpcbind (ganesha exits when it cannot register v3), which this test
//! avoids. Ganesha still tries to register NFSv4 with rpcbind; without one
//! running that fails harmlessly ("Cannot register NFS V4 on TCP").

use crate::nfs_export::Tmpfs;
use crate::support::{self, mount, server};

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mount::{Volume, drop_caches};

/// The largest NFSv4 WRITE libnfs 4.0 can encode (see the module comment).
const LIBNFS_MAX_WRITE: usize = 3940;

fn tools_present() -> bool {
    let mut missing = server::missing(&["ganesha.nfsd", "nfs-cp", "nfs-cat", "nfs-ls"]);
    // The VFS FSAL is a package of its own.
    let vfs = ["/usr/lib/x86_64-linux-gnu/ganesha", "/usr/lib64/ganesha"]
        .iter()
        .any(|d| Path::new(d).join("libfsalvfs.so").exists());
    if !vfs {
        missing.push("libfsalvfs.so");
    }
    if missing.is_empty() {
        return true;
    }
    support::skip(&format!(
        "{} not installed (apt-get install nfs-ganesha nfs-ganesha-vfs libnfs-utils)",
        missing.join(", ")
    ));
    false
}

/// A private ganesha.nfsd exporting `path` as `/vault` (NFSv4 over TCP on
/// a free 127.0.0.1 port, root not squashed), its configuration, log and
/// recovery state in a temporary directory; killed on drop.
struct Ganesha {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Ganesha {
    fn start(path: &Path) -> Ganesha {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("recovery")).unwrap();
        let port = support::free_port();
        let conf = format!(
            "NFS_CORE_PARAM {{
  Bind_addr = 127.0.0.1;
  NFS_Port = {port};
  Protocols = 4;
  Enable_NLM = false;
  Enable_RQUOTA = false;
  Enable_UDP = false;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSv4 {{
  Graceless = true;
  RecoveryBackend = fs;
  RecoveryRoot = {d}/recovery;
  Only_Numeric_Owners = true;
}}
EXPORT {{
  Export_Id = 1;
  Path = {export};
  Pseudo = /vault;
  Access_Type = RW;
  Squash = No_Root_Squash;
  Protocols = 4;
  Transports = TCP;
  SecType = sys;
  FSAL {{ Name = VFS; }}
}}
",
            d = d.display(),
            export = path.display()
        );
        std::fs::write(d.join("ganesha.conf"), conf).unwrap();
        let mut child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(d.join("ganesha.conf"))
            .arg("-L")
            .arg(d.join("ganesha.log"))
            .arg("-p")
            .arg(d.join("ganesha.pid"))
            .args(["-N", "NIV_EVENT"])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("ganesha.err")).unwrap())
            .spawn()
            .unwrap();
        server::wait_listening("ganesha.nfsd", port, &mut child, || Ganesha::logs_in(d));
        Ganesha {
            child: Some(child),
            port,
            dir,
        }
    }

    fn logs(&self) -> String {
        Ganesha::logs_in(self.dir.path())
    }

    fn logs_in(dir: &Path) -> String {
        ["ganesha.log", "ganesha.err"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .collect()
    }

    /// Stops the server the way an administrator does (SIGTERM), waiting
    /// for it to let go of the export.
    fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ganesha.nfsd ignored SIGTERM for 15 s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The libnfs URL of `rel` in the export.
    fn url(&self, rel: &str) -> String {
        format!(
            "nfs://127.0.0.1/vault/{rel}?version=4&nfsport={}",
            self.port
        )
    }

    /// Runs a libnfs tool (under a timeout: a lost server must not hang
    /// the suite).
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("30")
            .arg(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, what: &str, out: Output) -> Vec<u8> {
        assert!(
            out.status.success(),
            "{what} failed ({}): {}\nganesha log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out.stdout
    }

    /// `nfs-cp` of a local file to `rel` in the export (as root).
    fn put(&self, local: &Path, rel: &str) {
        let out = self.run("nfs-cp", &[local.to_str().unwrap(), &self.url(rel)]);
        self.ok(&format!("nfs-cp {} -> {rel}", local.display()), out);
    }

    /// [`Ganesha::put`] with the client's credentials uid = gid = `uid`.
    fn put_as(&self, local: &Path, rel: &str, uid: u32) {
        let url = format!("{}&uid={uid}&gid={uid}", self.url(rel));
        let out = self.run("nfs-cp", &[local.to_str().unwrap(), &url]);
        self.ok(
            &format!("nfs-cp {} -> {rel} as {uid}", local.display()),
            out,
        );
    }

    /// `nfs-cat` of `rel`: its contents.
    fn cat(&self, rel: &str) -> Vec<u8> {
        let out = self.run("nfs-cat", &[&self.url(rel)]);
        self.ok(&format!("nfs-cat {rel}"), out)
    }

    /// `nfs-ls` of directory `rel`: (name, size) of its entries, sorted.
    fn ls(&self, rel: &str) -> Vec<(String, u64)> {
        let out = self.run("nfs-ls", &[&self.url(rel)]);
        let text = String::from_utf8(self.ok(&format!("nfs-ls {rel}"), out)).unwrap();
        // "-rw-r--r--  1     0     0       300000 big.bin"
        let mut v: Vec<(String, u64)> = text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert!(f.len() >= 6, "nfs-ls line: {l}");
                (f[5..].join(" "), f[4].parse().unwrap())
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn entries(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    let mut v: Vec<_> = list.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    v.sort();
    v
}

#[test]
fn ganesha_serves_a_kmfs_mount_through_cache_drops_and_a_daemon_restart() {
    if !tools_present() {
        return;
    }
    let mut fs = None;
    let vol = Volume::create_on(false, |b| fs = Some(Tmpfs::mount(b)));
    let _fs = fs;
    // ganesha acts with the client's uid: other users than the one who
    // mounted need allow_other (as under the kernel's nfsd).
    let m = vol.mount_with(&["-o", "allow_other"]);
    let work = tempfile::tempdir().unwrap();
    let local = |name: &str, seed: u64, len: usize| -> (PathBuf, Vec<u8>) {
        let data = mount::pattern(seed, len);
        let p = work.path().join(name);
        std::fs::write(&p, &data).unwrap();
        (p, data)
    };
    std::fs::create_dir(m.p("docs")).unwrap();
    let big = mount::pattern(21, 300_000);
    std::fs::write(m.p("docs/big.bin"), &big).unwrap();

    let g = Ganesha::start(m.mnt());
    let (report_local, report) = local("report", 22, LIBNFS_MAX_WRITE);
    g.put(&report_local, "docs/report.bin");
    assert!(g.cat("docs/report.bin") == report, "read back over NFS");
    assert!(
        std::fs::read(m.p("docs/report.bin")).unwrap() == report,
        "the NFS write, read through the mount"
    );
    assert!(
        g.cat("docs/big.bin") == big,
        "a file written through the mount"
    );
    let listing = entries(&[
        ("big.bin", 300_000),
        ("report.bin", LIBNFS_MAX_WRITE as u64),
    ]);
    assert_eq!(g.ls("docs"), listing);
    for f in mount::all_files(m.backing()) {
        let name = f.to_string_lossy();
        assert!(
            !name.contains("report") && !name.contains("docs"),
            "plaintext name in the backing directory: {name}"
        );
    }

    // The kernel forgets the inodes; ganesha still has their handles and
    // reopens them by handle (LOOKUP of "." in the daemon).
    drop_caches();
    assert!(g.cat("docs/big.bin") == big, "read after a cache drop");
    // (With files reopened by handle: the backing directory is a whole
    // filesystem. Checked here, after the reads that fail without it.)
    assert!(
        m.daemon_log().contains("by_handle=all"),
        "{}",
        m.daemon_log()
    );
    assert_eq!(g.ls("docs"), listing, "listing after a cache drop");
    drop_caches();
    // A create opens the parent directory by its handle.
    let (late_local, late) = local("late", 23, 1000);
    g.put(&late_local, "docs/late.bin");
    assert!(std::fs::read(m.p("docs/late.bin")).unwrap() == late);
    drop_caches();
    assert!(g.cat("docs/report.bin") == report);
    // A client user other than root, in a directory open to all.
    std::fs::create_dir(m.p("pub")).unwrap();
    std::fs::set_permissions(m.p("pub"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (user_local, user) = local("user", 25, 500);
    g.put_as(&user_local, "pub/user.bin", 1000);
    let md = std::fs::metadata(m.p("pub/user.bin")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (1000, 1000),
        "created as the client's user"
    );
    assert!(std::fs::read(m.p("pub/user.bin")).unwrap() == user);

    // Restart the kmfs daemon under the export.
    g.stop();
    let m = m.unmount().mount_with(&["-o", "allow_other"]);
    let g = Ganesha::start(m.mnt());
    let listing = entries(&[
        ("big.bin", 300_000),
        ("late.bin", 1000),
        ("report.bin", LIBNFS_MAX_WRITE as u64),
    ]);
    assert_eq!(g.ls("docs"), listing, "listing after the restart");
    assert!(g.cat("docs/big.bin") == big, "read after the restart");
    drop_caches();
    assert!(g.cat("docs/late.bin") == late);
    assert!(g.cat("docs/big.bin") == big);
    let (after_local, after) = local("after", 24, 2000);
    g.put(&after_local, "docs/after.bin");
    drop_caches();
    assert!(g.cat("docs/after.bin") == after);
    assert!(std::fs::read(m.p("docs/after.bin")).unwrap() == after);
    g.stop();
    m.unmount();
}
