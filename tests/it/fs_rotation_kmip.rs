//! Online KEK rotation of a mounted volume whose KEK is on a real PyKMIP
//! server: a new KEK version with --revoke-old, a hung key server (rotation
//! fails cleanly after the timeouts, the mount keeps working, a later rotation
//! succeeds), and the daemon killed with SIGKILL in the middle of a rotation
//! (after its `rotate_start` audit row, while it waits on the hung server for
//! the new KEK): the volume mounts again with the KEK it had.

use crate::support::cli;
use cli::{KMFS, is_mounted, kmfs, ok, text};

use crate::support::pykmip;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Vol {
    tmp: tempfile::TempDir,
    cfg: PathBuf,
    back: PathBuf,
    mnt: PathBuf,
}

impl Vol {
    fn new(pki: &pykmip::Pki, port: u16, key: &str) -> Vol {
        let tmp = tempfile::tempdir().unwrap();
        let etc = cli::private_dir(tmp.path().join("etc"));
        let cfg = etc.join("v.toml");
        std::fs::write(
            &cfg,
            format!(
                "provider = \"kmip\"\n[log]\nsyslog = false\naudit_file = \"{}\"\n[kmip]\nkey_name = \"{key}\"\n\
                 connect_timeout_ms = 500\nread_timeout_ms = 700\nretry_delay_ms = 20\nfailover_cycles = 1\n{}",
                etc.join("audit.csv").display(),
                pki.toml_server("km", port),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let back = tmp.path().join("back");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&back).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        ok(kmfs(&[&"init", &"--create-kek", &"--config", &cfg, &back]));
        Vol {
            tmp,
            cfg,
            back,
            mnt,
        }
    }

    /// Mounts (daemonised: returns once live).
    fn mount(&self) {
        ok(kmfs(&[
            &"mount",
            &"--config",
            &self.cfg,
            &self.back,
            &self.mnt,
        ]));
        assert!(is_mounted(&self.mnt));
    }

    fn pid(&self) -> i32 {
        let st: serde_json::Value =
            serde_json::from_str(&ok(kmfs(&[&"status", &"--json", &self.mnt]))).unwrap();
        st["pid"].as_i64().unwrap() as i32
    }

    fn unmount(&self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }

    /// The operation column of the daemon's audit trail, in order.
    fn audit_ops(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.cfg.with_file_name("audit.csv")).unwrap();
        cli::parse_csv(&text)
            .into_iter()
            .skip(1)
            .map(|r| r[3].clone())
            .collect()
    }

    fn version(&self) -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&ok(kmfs(&[&"header", &"dump", &"--json", &self.back]))).unwrap();
        v["kek"]["version"].as_u64().unwrap()
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        self.unmount();
        let _ = &self.tmp;
    }
}

#[test]
fn online_rotation_revoke_hung_server_and_killed_daemon() {
    if !pykmip::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
    let mut server = pykmip::PykmipServer::start(
        &pki,
        &pki.server,
        &tmp.path().join("km.db"),
        &tmp.path().join("km"),
    );
    let v = Vol::new(&pki, server.port, "online-kek");
    v.mount();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(v.mnt.join("data"), &data).unwrap();

    // 1. Online rotation to version 2, revoking version 1.
    let out = ok(kmfs(&[&"rotate-kek", &"--revoke-old", &v.mnt]));
    assert!(
        out.contains("version 2") && out.contains("old key revoked"),
        "{out}"
    );
    assert_eq!(v.version(), 2);
    assert_eq!(std::fs::read(v.mnt.join("data")).unwrap(), data);

    // 2. Hung key server: the rotation fails within the timeouts with a clear
    //    message, I/O goes on, and the header is unchanged.
    server.hang();
    let t = Instant::now();
    let o = kmfs(&[&"rotate-kek", &v.mnt]);
    assert!(!o.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "rotation must give up within its timeouts"
    );
    let e = text(&o);
    assert!(e.contains("still uses") && e.contains("km"), "{e}");
    assert_eq!(v.version(), 2);
    std::fs::write(v.mnt.join("during-outage"), b"still writable").unwrap();
    assert_eq!(std::fs::read(v.mnt.join("data")).unwrap(), data);
    server.resume();
    ok(kmfs(&[&"rotate-kek", &v.mnt]));
    assert_eq!(v.version(), 3);

    // 3. SIGKILL the daemon in the middle of a rotation: once its audit trail
    //    has the rotation's `rotate_start` row and nothing after it, i.e.
    //    while it waits on the hung key server for the new KEK (up to the
    //    700 ms read timeout; the trail is polled every 5 ms). The volume
    //    mounts again with the KEK version it had.
    let starts = |ops: &[String]| ops.iter().filter(|o| *o == "rotate_start").count();
    let before = starts(&v.audit_ops());
    let pid = v.pid();
    server.hang();
    let mut rot = Command::new(KMFS)
        .arg("rotate-kek")
        .arg(&v.mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while starts(&v.audit_ops()) == before {
        assert!(Instant::now() < deadline, "the rotation never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on the daemon's pid, which this test owns.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let ops = v.audit_ops();
    let start = ops.iter().rposition(|o| o == "rotate_start").unwrap();
    assert!(
        ops[start + 1..].is_empty(),
        "the rotation went on before the kill: {:?}",
        &ops[start..]
    );
    let st = rot.wait().unwrap();
    assert!(
        !st.success(),
        "rotate-kek succeeded although its daemon died"
    );
    server.resume();
    v.unmount();
    assert!(!is_mounted(&v.mnt));
    v.mount();
    assert_eq!(
        v.version(),
        3,
        "killed before the key server answered: the committed header keeps version 3"
    );
    assert_eq!(std::fs::read(v.mnt.join("data")).unwrap(), data);
    assert_eq!(
        std::fs::read(v.mnt.join("during-outage")).unwrap(),
        b"still writable"
    );
    v.unmount();
}
