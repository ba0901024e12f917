//! Operations (issue 17), each with the real binary, real daemons and real
//! log files: no log flood at `basic` from programs that ask isatty(3) on
//! every open; three online rotations in one second keep three header
//! backups; online and offline commands exit with the same code for the
//! same cause (12, 13, 14); log anchors in syslog and `kmfs log verify
//! --expect`; plain terminal output without syslog; `kmfs status
//! --openmetrics`.

use crate::support::cli;
use cli::{Dirs, KMFS, kmfs, ok, text, write_private};

use crate::support::pykmip;

use crate::support::softhsm;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the operations tests add to the shared temporary layout.
impl Dirs {
    fn key(&self, name: &str, byte: u8) -> PathBuf {
        let k = self.etc.join(name);
        std::fs::write(&k, [byte; 32]).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        k
    }

    /// A keyfile config with `[log]` lines `log`.
    fn keyfile_config(&self, key: &Path, log: &str) -> PathBuf {
        let cfg = self.etc.join("vol.toml");
        write_private(
            &cfg,
            &format!(
                "provider = \"keyfile\"\n[volume]\nname = \"opsvol\"\n[keyfile]\npath = \"{}\"\n[log]\naudit_file = \"{}\"\n{log}",
                key.display(),
                self.etc.join("audit.csv").display()
            ),
        );
        cfg
    }
}

/// A foreground daemon (`kmfs mount -f --config CFG BACK MNT`) in the
/// background; unmounted and reaped on drop.
struct Daemon {
    child: Option<Child>,
    mnt: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn start(cfg: &Path, back: &Path, mnt: &Path) -> Daemon {
        let stderr = mnt.with_extension("stderr");
        let child = Command::new(KMFS)
            .args(["mount", "-f", "--config"])
            .arg(cfg)
            .arg(back)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cli::is_mounted(mnt) {
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited with {st}:\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "not mounted:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Unmounts and waits for the daemon; true if it exited 0.
    fn stop(&mut self) -> bool {
        if cli::is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .status();
        }
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn code(o: &std::process::Output) -> Option<i32> {
    o.status.code()
}

fn line_count(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .count()
}

// ---------------------------------------------------------------------------
// 1. No log flood at `basic`.

/// Ten thousand opens and stats from Python (which asks isatty(3), i.e. a
/// TCGETS ioctl, on every open) at `basic` add a bounded number of lines to
/// the hash-chained log; the ioctl is answered ENOTTY. Before the fix each
/// open added a WARN line from fuser (ten thousand lines here).
#[test]
fn ten_thousand_python_opens_do_not_flood_the_basic_log() {
    let d = Dirs::new();
    let key = d.key("key", 7);
    let logf = d.etc.join("vol.log");
    let cfg = d.keyfile_config(
        &key,
        &format!(
            "level = \"basic\"\nsyslog = false\nfile = \"{}\"\n",
            logf.display()
        ),
    );
    ok(kmfs(&[&"init", &"--config", &cfg, &d.back]));
    let mut dm = Daemon::start(&cfg, &d.back, &d.mnt);
    for i in 0..10 {
        std::fs::write(d.mnt.join(format!("f{i}")), b"data").unwrap();
    }
    let before = line_count(&logf);
    let script = format!(
        "import os, sys\nd = {:?}\nn = 0\nfor i in range(10000):\n    p = os.path.join(d, 'f%d' % (i % 10))\n    with open(p) as f:\n        f.read()\n    os.stat(p)\n    n += 1\nprint(n)\n# isatty on a kmfs file is answered, not an error\nwith open(os.path.join(d, 'f0')) as f:\n    sys.stdout.write('tty=%s\\n' % f.isatty())\n",
        d.mnt.display().to_string()
    );
    let o = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("10000") && out.contains("tty=False"), "{out}");
    let after = line_count(&logf);
    eprintln!("log lines before the 10000 opens: {before}, after: {after}");
    let grown = after - before;
    assert!(
        grown <= 20,
        "the basic log grew by {grown} lines for 10000 opens:\n{}",
        std::fs::read_to_string(&logf).unwrap()
    );
    let log = std::fs::read_to_string(&logf).unwrap();
    assert!(!log.contains("Not Implemented"), "{log}");
    assert!(dm.stop(), "{}", dm.log());
    let v = ok(kmfs(&[&"log", &"verify", &logf]));
    assert!(v.starts_with("OK: "), "{v}");
}

// ---------------------------------------------------------------------------
// 2. Rotation backups never collide.

fn dated_backups(back: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(back)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kmfs.volume.2") && n.ends_with(".bak"))
        .collect();
    v.sort();
    v
}

fn backup_kek_version(back: &Path, name: &str) -> u32 {
    let p = back.join(name);
    let bytes = kmfs::volume::header::read_file(&p).unwrap();
    kmfs::volume::header::VolumeHeader::decode(&bytes, &p)
        .unwrap()
        .kek
        .version
}

/// Three online rotations (real SoftHSM token, a new KEK version each) in
/// one second leave three distinct dated backups, each holding the KEK
/// version it replaced.
#[test]
fn three_rotations_in_one_second_keep_three_backups() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = softhsm::Hsm::for_processes();
    let d = Dirs::new();
    let cfg = d.etc.join("vol.toml");
    write_private(
        &cfg,
        &format!(
            "provider = \"pkcs11\"\n[log]\nsyslog = false\naudit_file = \"{}\"\n{}",
            d.etc.join("audit.csv").display(),
            hsm.toml_section("ops-three-kek")
        ),
    );
    ok(kmfs(&[
        &"init",
        &"--create-kek",
        &"--config",
        &cfg,
        &d.back,
    ]));
    let dm = Daemon::start(&cfg, &d.back, &d.mnt);
    // Bursts of three concurrent `kmfs rotate-kek` (the daemon serialises
    // them), each started right after a second boundary, until one burst
    // lands in one second (three tries: the machine may be loaded).
    let mut bursts = Vec::new();
    let mut fitted = false;
    for _ in 0..3 {
        loop {
            let sub = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_millis();
            if sub < 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let children: Vec<Child> = (0..3)
            .map(|_| {
                Command::new(KMFS)
                    .args(["rotate-kek", "--json"])
                    .arg(&d.mnt)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut burst = Vec::new();
        for c in children {
            let out = ok(c.wait_with_output().unwrap());
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            burst.push(v["backup"].as_str().unwrap().to_string());
        }
        // Same second: the names agree up to the seconds (…THHMMSS).
        fitted = burst.iter().all(|n| n[..27] == burst[0][..27]);
        bursts.extend(burst);
        if fitted {
            break;
        }
    }
    drop(dm);
    assert!(
        fitted,
        "no burst of three rotations fitted in one second: {bursts:?}"
    );
    let names = dated_backups(&d.back);
    let mut reported = bursts.clone();
    reported.sort();
    reported.dedup();
    assert_eq!(
        reported.len(),
        bursts.len(),
        "a name was reported twice: {bursts:?}"
    );
    assert_eq!(reported, names, "every reported backup exists");
    let versions: Vec<u32> = names
        .iter()
        .map(|n| backup_kek_version(&d.back, n))
        .collect();
    let want: Vec<u32> = (1..=names.len() as u32).collect();
    assert_eq!(versions, want, "{names:?}");
}

// ---------------------------------------------------------------------------
// 3. Online and offline commands exit with the same code for the same cause.

/// 12: the key server is down. Online (the daemon cannot create the new KEK)
/// and offline (the volume cannot even be opened) both exit 12.
#[test]
fn key_server_down_exits_12_online_and_offline() {
    if !pykmip::available() {
        return;
    }
    let d = Dirs::new();
    let pki = pykmip::Pki::generate(&d.tmp.path().join("pki"));
    let server = pykmip::PykmipServer::start(
        &pki,
        &pki.server,
        &d.tmp.path().join("km.db"),
        &d.tmp.path().join("km"),
    );
    let cfg = d.etc.join("vol.toml");
    write_private(
        &cfg,
        &format!(
            "provider = \"kmip\"\n[log]\nsyslog = false\naudit_file = \"{}\"\n\
             [kmip]\nkey_name = \"ops12-kek\"\nconnect_timeout_ms = 1000\nread_timeout_ms = 3000\nretry_delay_ms = 50\nfailover_cycles = 1\n{}",
            d.etc.join("audit.csv").display(),
            pki.toml_server("km-ops", server.port),
        ),
    );
    ok(kmfs(&[
        &"init",
        &"--create-kek",
        &"--config",
        &cfg,
        &d.back,
    ]));
    let mut dm = Daemon::start(&cfg, &d.back, &d.mnt);
    drop(server);
    let online = kmfs(&[&"rotate-kek", &d.mnt]);
    assert_eq!(code(&online), Some(12), "{}", text(&online));
    assert!(text(&online).contains("km-ops"), "{}", text(&online));
    assert!(dm.stop(), "{}", dm.log());
    let offline = kmfs(&[&"rotate-kek", &"--config", &cfg, &d.back]);
    assert_eq!(code(&offline), Some(12), "{}", text(&offline));
}

/// 13: the new KEK exists but the token refuses to use it (revoked). Online
/// and offline both exit 13; the volume keeps its KEK.
#[test]
fn refused_key_exits_13_online_and_offline() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = softhsm::Hsm::for_processes();
    {
        use kmfs::kms::KeyProvider;
        let p = kmfs::kms::pkcs11::Pkcs11Provider::from_config(&hsm.config(softhsm::KEK)).unwrap();
        let k = p.create_kek(Some("ops13-revoked")).unwrap();
        p.revoke(&k).unwrap();
    }
    let d = Dirs::new();
    let cfg = d.etc.join("vol.toml");
    write_private(
        &cfg,
        &format!(
            "provider = \"pkcs11\"\n[log]\nsyslog = false\naudit_file = \"{}\"\n{}",
            d.etc.join("audit.csv").display(),
            hsm.toml_section("ops13-kek")
        ),
    );
    ok(kmfs(&[
        &"init",
        &"--create-kek",
        &"--config",
        &cfg,
        &d.back,
    ]));
    let before = std::fs::read(d.back.join("kmfs.volume")).unwrap();
    let mut dm = Daemon::start(&cfg, &d.back, &d.mnt);
    let online = kmfs(&[&"rotate-kek", &"--new-key", &"ops13-revoked", &d.mnt]);
    assert_eq!(code(&online), Some(13), "{}", text(&online));
    assert!(dm.stop(), "{}", dm.log());
    let offline = kmfs(&[
        &"rotate-kek",
        &"--new-key",
        &"ops13-revoked",
        &"--config",
        &cfg,
        &d.back,
    ]);
    assert_eq!(code(&offline), Some(13), "{}", text(&offline));
    assert_eq!(std::fs::read(d.back.join("kmfs.volume")).unwrap(), before);
}

/// 14: the header on disk was damaged while mounted. The daemon refuses to
/// rotate with 14, as the offline command does.
#[test]
fn damaged_header_exits_14_online_and_offline() {
    let d = Dirs::new();
    let key = d.key("key", 1);
    let key2 = d.key("key2", 2);
    let cfg = d.keyfile_config(&key, "syslog = false\n");
    ok(kmfs(&[&"init", &"--config", &cfg, &d.back]));
    let mut dm = Daemon::start(&cfg, &d.back, &d.mnt);
    let hdr = d.back.join("kmfs.volume");
    let mut bytes = std::fs::read(&hdr).unwrap();
    bytes[..8].copy_from_slice(b"garbage!");
    std::fs::write(&hdr, &bytes).unwrap();
    let online = kmfs(&[&"rotate-kek", &"--new-keyfile", &key2, &d.mnt]);
    assert_eq!(code(&online), Some(14), "{}", text(&online));
    assert!(text(&online).contains("bad magic"), "{}", text(&online));
    assert!(dm.stop(), "{}", dm.log());
    assert_eq!(std::fs::read(&hdr).unwrap(), bytes, "nothing written");
    let offline = kmfs(&[
        &"rotate-kek",
        &"--config",
        &cfg,
        &"--new-keyfile",
        &key2,
        &d.back,
    ]);
    assert_eq!(code(&offline), Some(14), "{}", text(&offline));
}

// ---------------------------------------------------------------------------
// 4. Log anchors.

/// A syslog stand-in: receives datagrams on a thread (as syslogd does, so
/// the daemon's sends never wait for a full queue) until stopped.
struct Syslog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Syslog {
    fn start(sock: &Path) -> Syslog {
        let rx = std::os::unix::net::UnixDatagram::bind(sock).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                match rx.recv(&mut buf) {
                    Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(_) if stop2.load(std::sync::atomic::Ordering::Relaxed) => return out,
                    Err(_) => {}
                }
            }
        });
        Syslog { stop, thread }
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `field=value` from a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The daemon sends anchors (last serial and hash of the log file) to syslog
/// at a fixed interval and at unmount; `kmfs log verify` prints the last
/// serial and hash, and `--expect` catches a cut tail that plain
/// verification cannot.
#[test]
fn anchors_in_syslog_catch_a_cut_tail() {
    let d = Dirs::new();
    let key = d.key("key", 3);
    let logf = d.etc.join("vol.log");
    let sock = d.etc.join("syslog.sock");
    let syslog = Syslog::start(&sock);
    let cfg = d.keyfile_config(
        &key,
        &format!(
            "file = \"{}\"\nsyslog_socket = \"{}\"\nanchor_interval_s = 1\n",
            logf.display(),
            sock.display()
        ),
    );
    ok(kmfs(&[&"init", &"--config", &cfg, &d.back]));
    let mut dm = Daemon::start(&cfg, &d.back, &d.mnt);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(dm.stop(), "{}", dm.log());
    let sent = syslog.finish();
    let anchors: Vec<&String> = sent
        .iter()
        .filter(|l| l.contains("op=log_anchor"))
        .collect();
    assert!(
        anchors.iter().any(|l| l.contains("reason=interval")),
        "{sent:#?}"
    );
    let last = anchors.last().expect("an anchor");
    assert!(last.contains("reason=unmount"), "{last}");
    let serial = field(last, "anchor_serial").unwrap();
    let hash = field(last, "anchor_hash").unwrap();

    // Verify prints the last serial and hash; the anchor is reached.
    let out = ok(kmfs(&[&"log", &"verify", &logf]));
    assert!(out.contains("last serial") && out.contains("hash"), "{out}");
    let expect = format!("{serial}:{hash}");
    let out = ok(kmfs(&[&"log", &"verify", &"--expect", &expect, &logf]));
    assert!(out.contains("anchor serial"), "{out}");

    // Cut the tail: the anchor's own line and the one it names. The chain
    // still verifies, the anchor does not.
    let text_before = std::fs::read_to_string(&logf).unwrap();
    let lines: Vec<&str> = text_before.lines().collect();
    let anchored = lines
        .iter()
        .position(|l| field(l, "serial") == Some(serial))
        .unwrap();
    let cut = lines[..anchored].join("\n") + "\n";
    std::fs::write(&logf, cut).unwrap();
    let o = kmfs(&[&"log", &"verify", &logf]);
    assert!(o.status.success(), "{}", text(&o));
    let o = kmfs(&[&"log", &"verify", &"--expect", &expect, &logf]);
    assert_eq!(code(&o), Some(18), "{}", text(&o));
    assert!(text(&o).contains("cut"), "{}", text(&o));
    // A rewritten line with the anchor's serial: another hash.
    let o = kmfs(&[
        &"log",
        &"verify",
        &"--expect",
        &format!("1:{}", "0".repeat(64)),
        &logf,
    ]);
    assert_eq!(code(&o), Some(18), "{}", text(&o));
}

// ---------------------------------------------------------------------------
// 7. A terminal without syslog.

/// No syslog socket, no log file, a failing daemonised mount (a key file
/// that does not unwrap the volume key): the terminal gets plain lines, the
/// key-file warning once, no hash-chained records, and the error last.
#[test]
fn terminal_without_syslog_gets_plain_lines_and_the_error_last() {
    let d = Dirs::new();
    let key = d.key("key", 4);
    let wrong = d.key("wrong", 5);
    let cfg = d.keyfile_config(&key, "syslog = true\n");
    ok(kmfs(&[&"init", &"--config", &cfg, &d.back]));
    let cfg = d.keyfile_config(
        &wrong,
        &format!(
            "syslog_socket = \"{}\"\n",
            d.etc.join("no-such-syslog.sock").display()
        ),
    );
    let opt = format!("config={}", cfg.display());
    let o = Command::new(KMFS)
        .arg(&d.back)
        .arg(&d.mnt)
        .args(["-o", &opt])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(13), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        !err.contains("serial=") && !err.contains("hash="),
        "chained records on the terminal:\n{err}"
    );
    let key_warnings = lines.iter().filter(|l| l.contains("key file")).count()
        - usize::from(lines.last().is_some_and(|l| l.contains("key file")));
    assert_eq!(key_warnings, 1, "{err}");
    assert!(lines.iter().all(|l| l.starts_with("kmfs: ")), "{err}");
    let last = lines.last().unwrap();
    assert!(last.contains("cannot unwrap"), "{err}");
    assert!(!cli::is_mounted(&d.mnt));
}

// ---------------------------------------------------------------------------
// 6. OpenMetrics.

/// `kmfs status --openmetrics` lists every mounted volume's counters with
/// Prometheus names; `--prometheus MNT` one volume for the textfile collector.
#[test]
fn status_openmetrics_for_all_mounted_volumes() {
    let d = Dirs::new();
    let key = d.key("key", 6);
    let cfg = d.keyfile_config(&key, "syslog = false\n");
    ok(kmfs(&[&"init", &"--config", &cfg, &d.back]));
    let _dm = Daemon::start(&cfg, &d.back, &d.mnt);
    std::fs::write(d.mnt.join("a"), vec![7u8; 10_000]).unwrap();
    assert_eq!(std::fs::read(d.mnt.join("a")).unwrap().len(), 10_000);
    let st: serde_json::Value =
        serde_json::from_str(&ok(kmfs(&[&"status", &"--json", &d.mnt]))).unwrap();
    let id = st["volume_id"].as_str().unwrap().to_string();
    let om = ok(kmfs(&[&"status", &"--openmetrics"]));
    assert!(om.ends_with("# EOF\n"), "{om}");
    let sel = format!("{{volume=\"{id}\"}}");
    let value = |name: &str| -> f64 {
        om.lines()
            .find(|l| l.starts_with(&format!("{name}{sel} ")))
            .unwrap_or_else(|| panic!("no {name} for {id} in\n{om}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("kmfs_written_bytes_total") >= 10_000.0, "{om}");
    assert!(value("kmfs_writes_total") >= 1.0);
    assert!(value("kmfs_reads_total") >= 0.0, "{om}");
    assert!(value("kmfs_read_bytes_total") >= 0.0, "{om}");
    assert_eq!(value("kmfs_io_errors_total"), 0.0);
    assert_eq!(value("kmfs_kek_version"), 1.0);
    assert!(value("kmfs_daemon_uptime_seconds") >= 0.0);
    assert!(om.contains("# TYPE kmfs_read_bytes counter"), "{om}");
    let prom = ok(kmfs(&[&"status", &"--prometheus", &d.mnt]));
    assert!(
        prom.contains("# TYPE kmfs_read_bytes_total counter"),
        "{prom}"
    );
    assert!(!prom.contains("# EOF"));
}
