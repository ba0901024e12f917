//! Key-server outage while a KMIP-backed volume is mounted (real PyKMIP server
//! on 127.0.0.1, mutual TLS):
//!
//! * the server is stopped (killed: connection refused) and, later, hung
//!   (SIGSTOP: TCP connects, nothing answers);
//! * during each outage, writers and readers keep going through the mount
//!   without a single error (the DEK is in the daemon's memory);
//! * `kmfs status` keeps working (it does not need the key server);
//! * `kmfs rotate-kek` fails with exit code ≠ 0 and one line naming the server,
//!   the header is unchanged, and the mount keeps working;
//! * when the server is back (a new server on the same port with the same
//!   database, or SIGCONT), rotation succeeds, and the volume remounts with
//!   the rotated KEK.

use crate::support::cli;
use crate::support::fault;
use crate::support::mount;
use crate::support::pykmip;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cli::{kmfs, text};
use fault::Daemon;
use mount::pattern;

fn write_config(dir: &Path, pki: &pykmip::Pki, port: u16) -> PathBuf {
    let mut t = String::from("provider = \"kmip\"\n[volume]\nname = \"outage\"\n");
    t += &format!(
        "[log]\nlevel = \"verbose\"\nsyslog = false\nfile = \"{}\"\naudit_file = \"{}\"\n",
        dir.join("outage.log").display(),
        dir.join("audit.csv").display()
    );
    t += "[kmip]\nkey_name = \"outage-kek\"\nconnect_timeout_ms = 1000\nread_timeout_ms = 1500\nretry_delay_ms = 50\nfailover_cycles = 1\n";
    t += &pki.toml_server("km-main", port);
    let p = dir.join("outage.toml");
    std::fs::write(&p, t).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A PyKMIP server restarted from the config file an earlier one wrote
/// (same port, same database); its process group is killed on drop.
struct Restarted(Child);

impl Restarted {
    fn start(conf: &Path, log: &Path, dir: &Path) -> Restarted {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let _ = std::fs::remove_file(log);
            let child = Command::new(pykmip::PYTHON)
                .arg(pykmip::SERVER_BIN)
                .arg("-f")
                .arg(conf)
                .arg("-l")
                .arg(log)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap();
            let s = Restarted(child);
            loop {
                let t = std::fs::read_to_string(log).unwrap_or_default();
                if t.contains("Starting connection service") {
                    return s;
                }
                if t.contains("Address already in use") {
                    break; // the old socket is still closing: try again
                }
                assert!(Instant::now() < deadline, "restarted server:\n{t}");
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        let pg = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Writers/readers that must see no error while they run.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Load {
    fn start(mnt: &Path, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..3u64)
            .map(|w| {
                let dir = mnt.join(format!("{tag}-{w}"));
                std::fs::create_dir(&dir).unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || n < 5 {
                        let data = pattern(w * 7919 + n, 1 + (n as usize * 40_961) % 700_000);
                        let p = dir.join(format!("f{}", n % 16));
                        std::fs::write(&p, &data)
                            .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                        let back = std::fs::read(&p)
                            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                        assert!(back == data, "{} differs", p.display());
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("I/O failed during the outage"))
            .sum()
    }
}

fn status_ok(target: &Path) -> serde_json::Value {
    let t0 = Instant::now();
    let o = kmfs(&[&"status", &"--json", &target]);
    assert!(o.status.success(), "status: {}", text(&o));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        t0.elapsed()
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// rotate-kek during an outage: fails, one clear line naming the server, the
/// header unchanged.
fn rotation_fails(mnt: &Path, back: &Path) {
    let before = std::fs::read(back.join("kmfs.volume")).unwrap();
    let t0 = Instant::now();
    let o = kmfs(&[&"rotate-kek", &mnt]);
    let out = text(&o);
    assert!(
        !o.status.success(),
        "rotation succeeded during the outage: {out}"
    );
    let line = String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    assert!(
        line.contains("km-main"),
        "message does not name the server: {out}"
    );
    assert!(line.contains("rotation failed"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(std::fs::read(back.join("kmfs.volume")).unwrap(), before);
    eprintln!("rotation during outage ({:?}): {line}", t0.elapsed());
}

fn rotation_succeeds(mnt: &Path) -> u64 {
    let o = kmfs(&[&"rotate-kek", &mnt]);
    assert!(o.status.success(), "rotation after recovery: {}", text(&o));
    assert!(text(&o).contains("rotated from"), "{}", text(&o));
    status_ok(mnt)["kek"]["version"].as_u64().unwrap()
}

#[test]
fn io_and_status_survive_key_server_outages_and_rotation_recovers() {
    if !pykmip::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etc = cli::private_dir(tmp.path().join("etc"));
    let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
    let db = tmp.path().join("km.db");
    let sdir = tmp.path().join("km");
    let server = pykmip::PykmipServer::start(&pki, &pki.server, &db, &sdir);
    let port = server.port;
    let cfg = write_config(&etc, &pki, port);
    let back = tmp.path().join("back");
    let mnt = tmp.path().join("mnt");
    let mut d = Daemon::init_and_mount(&cfg, &back, &mnt, tmp.path());
    std::fs::write(mnt.join("before"), pattern(1, 123_457)).unwrap();
    let v1 = status_ok(&mnt)["kek"]["version"].as_u64().unwrap();

    // Outage 1: the server is gone (connection refused).
    drop(server);
    let load = Load::start(&mnt, "down");
    let st = status_ok(&mnt);
    assert_eq!(st["kek"]["version"].as_u64(), Some(v1));
    status_ok(&back);
    rotation_fails(&mnt, &back);
    std::thread::sleep(Duration::from_millis(300));
    let n = load.finish();
    assert!(
        d.alive(),
        "daemon died during the outage:\n{}",
        d.log_text()
    );
    eprintln!("outage 1: {n} write+read rounds without error");

    // Back: a new server on the same port with the same database.
    let conf = sdir.join(format!("server-{port}.conf"));
    let restarted = Restarted::start(&conf, &sdir.join("restarted.log"), &sdir);
    let v2 = rotation_succeeds(&mnt);
    assert!(v2 > v1, "version {v1} -> {v2}");

    // Outage 2: the server hangs (SIGSTOP): connects, never answers.
    let pg = nix::unistd::Pid::from_raw(restarted.0.id() as i32);
    nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let load = Load::start(&mnt, "hung");
    status_ok(&mnt);
    rotation_fails(&mnt, &back);
    let n = load.finish();
    assert!(d.alive(), "daemon died during the hang:\n{}", d.log_text());
    eprintln!("outage 2: {n} write+read rounds without error");
    nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGCONT).unwrap();
    let v3 = rotation_succeeds(&mnt);
    assert!(v3 > v2, "version {v2} -> {v3}");

    // Everything written survives a remount that unwraps with the new KEK.
    let st = d.unmount();
    assert!(st.is_some_and(|s| s.success()), "{}", d.log_text());
    assert!(!d.log_text().contains("panicked"));
    let d = Daemon::mount_config(&cfg, &back, &mnt, tmp.path());
    assert_eq!(
        std::fs::read(mnt.join("before")).unwrap(),
        pattern(1, 123_457)
    );
    assert_eq!(status_ok(&mnt)["kek"]["version"].as_u64(), Some(v3));
    for tag in ["down", "hung"] {
        for w in 0..3 {
            let dir = mnt.join(format!("{tag}-{w}"));
            for e in std::fs::read_dir(&dir).unwrap() {
                std::fs::read(e.unwrap().path()).unwrap();
            }
        }
    }
    drop(d);
    drop(restarted);
}
