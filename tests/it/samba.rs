//! Samba on top of kmfs (issue 16): a real `smbd` (Debian's samba package)
//! on 127.0.0.1 shares a kmfs mount; `smbclient` puts, gets, renames and
//! deletes files and sets DOS attributes (stored by smbd as the
//! `user.DOSATTRIB` xattr, which kmfs encrypts); and `smbtorture`'s SMB2
//! durable-handle tests drop a client's connection and reopen its files by
//! their durable handles. smbd grants that reconnect only if the file's
//! stat is unchanged — before kmfs reported plaintext `st_blocks` and
//! dropped cached attributes after setxattr, it refused them with
//! "stat_ex.st_ex_blocks differs". `benches/samba_durable.sh` runs the same
//! durable tests on a plain directory and a gocryptfs share for comparison.

use crate::support::{self, mount, server};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use mount::{Volume, getx};

/// smbtorture's durable-open tests that reconnect after a dropped
/// connection. (`reopen1a` needs two authenticated users, which a guest
/// share cannot give: it fails on a plain directory too.)
pub const DURABLE_TESTS: &[&str] = &[
    "reopen2",
    "reopen2a",
    "reopen2-lease",
    "reopen3",
    "reopen4",
    "file-position",
    "lock-oplock",
];

/// A private smbd serving `path` as `[share]` on a free 127.0.0.1 port,
/// guest access mapped to root; killed on drop.
struct Smbd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Smbd {
    fn start(path: &Path) -> Smbd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["private", "lock", "state", "cache", "pid", "ncalrpc"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let port = support::free_port();
        let conf = format!(
            "[global]
  server role = standalone server
  smb ports = {port}
  interfaces = 127.0.0.1
  bind interfaces only = yes
  disable netbios = yes
  private dir = {d}/private
  lock directory = {d}/lock
  state directory = {d}/state
  cache directory = {d}/cache
  pid directory = {d}/pid
  ncalrpc dir = {d}/ncalrpc
  log file = {d}/log.%m
  log level = 1
  map to guest = Bad User
  load printers = no
  printcap name = /dev/null
  disable spoolss = yes
[share]
  path = {share}
  read only = no
  guest ok = yes
  force user = root
  ea support = yes
  durable handles = yes
  kernel oplocks = no
  kernel share modes = no
  posix locking = no
",
            d = d.display(),
            share = path.display()
        );
        std::fs::write(d.join("smb.conf"), conf).unwrap();
        let mut child = Command::new("smbd")
            .args(["--foreground", "--no-process-group", "--configfile"])
            .arg(d.join("smb.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("smbd.err")).unwrap())
            .spawn()
            .unwrap();
        server::wait_listening("smbd", port, &mut child, || Smbd::logs_in(d));
        Smbd { child, port, dir }
    }

    fn logs(&self) -> String {
        Smbd::logs_in(self.dir.path())
    }

    fn logs_in(dir: &Path) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("log.") || n == "smbd.err" {
                out += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        out
    }

    fn client(&self, commands: &str) -> String {
        let out = Command::new("smbclient")
            .arg("//127.0.0.1/share")
            .args(["-p", &self.port.to_string(), "-N", "-c", commands])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("NT_STATUS_"),
            "smbclient -c '{commands}' failed:\n{text}"
        );
        text
    }

    /// Runs one smbtorture durable-open test; its result line.
    fn torture(&self, test: &str) -> String {
        let out = Command::new("timeout")
            .arg("120")
            .arg("smbtorture")
            .arg("//127.0.0.1/share")
            .args(["-p", &self.port.to_string(), "-U%", "-N"])
            .arg(format!("smb2.durable-open.{test}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| {
                ["success:", "failure:", "error:", "skip:"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(|l| {
                // A failure's reason follows on the next lines.
                let at = text.find(l).unwrap();
                text[at..].lines().take(3).collect::<Vec<_>>().join(" ")
            })
            .unwrap_or_else(|| format!("no result: {text}"))
    }
}

impl Drop for Smbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // smbd's children (one per connection) leave with their parent.
    }
}

fn tools_present() -> bool {
    let missing = server::missing(&["smbd", "smbclient", "smbtorture"]);
    if missing.is_empty() {
        return true;
    }
    support::skip(&format!(
        "{} not installed (apt-get install samba smbclient samba-testsuite)",
        missing.join(", ")
    ));
    false
}

#[test]
fn smbclient_works_on_a_kmfs_share_and_durable_handles_reconnect() {
    if !tools_present() {
        return;
    }
    let m = Volume::create(false).mount();
    let smbd = Smbd::start(m.mnt());
    let work = tempfile::tempdir().unwrap();
    let local: PathBuf = work.path().join("local.bin");
    let data = mount::pattern(7, 300_000);
    std::fs::write(&local, &data).unwrap();
    let got = work.path().join("got.bin");

    smbd.client(&format!(
        "mkdir docs; put {} docs\\report.bin; rename docs\\report.bin docs\\final.bin; get docs\\final.bin {}; setmode docs\\final.bin +r",
        local.display(),
        got.display()
    ));
    assert!(std::fs::read(&got).unwrap() == data, "get after put");
    // Through the mount: the file, its contents and smbd's DOS attributes
    // (an encrypted xattr) are there; the backing holds no plaintext name.
    let p = m.p("docs/final.bin");
    assert!(std::fs::read(&p).unwrap() == data);
    let dos = getx(&p, "user.DOSATTRIB").expect("smbd stored user.DOSATTRIB");
    assert!(!dos.is_empty());
    assert!(!m.p("docs/report.bin").exists());
    for f in mount::all_files(m.backing()) {
        let name = f.to_string_lossy();
        assert!(
            !name.contains("final") && !name.contains("docs"),
            "plaintext name in the backing directory: {name}"
        );
    }
    smbd.client("setmode docs\\final.bin -r; del docs\\final.bin; rmdir docs");
    assert!(!m.p("docs").exists(), "deleted through smbclient");

    let mut failed = Vec::new();
    for t in DURABLE_TESTS {
        let r = smbd.torture(t);
        eprintln!("smb2.durable-open.{t}: {r}");
        if !r.starts_with("success:") {
            failed.push(format!("{t}: {r}"));
        }
    }
    let logs = smbd.logs();
    assert!(
        failed.is_empty(),
        "durable-handle tests failed on kmfs:\n{}\nsmbd log:\n{logs}",
        failed.join("\n")
    );
    assert!(
        !logs.contains("denying durable reconnect"),
        "smbd denied a durable reconnect:\n{logs}"
    );
    drop(smbd);
    m.unmount();
}
