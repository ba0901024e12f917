//! Key servers behind real network faults (issue 20, docs/HA.md): two PyKMIP
//! servers in two "site" network namespaces sharing one key database, a file
//! server "host A" in a third whose volume config lists site 1 (nearest)
//! first. Links are cut for real: `ip link set down` on site 1's link and an
//! nft rule that drops (blackholes, no reset) every packet to site 1's KMIP
//! port — before the mount, during a KEK rotation of the mounted volume, and
//! at the new-generation step of an online data re-encryption (rekey).
//! Each must fail over to site 2 within the configured connect/read timeouts
//! (or fail safe: the committed header unchanged, I/O uninterrupted); the
//! audit trail names site 1 as failed and site 2 as the server that answered.
//! The failover times are printed against the configured timeouts.
//!
//! And the whole picture: host A crashes while site 1 is cut off, host B
//! takes over the volume through site 2.
//!
//! Default run: the blackhole at each of the three moments and the
//! takeover. With
//! `KMFS_LONG_TESTS=1` also link-down before mount, and link-down and
//! blackhole cut at several moments while a rotation is running.

use crate::support::{cli, netns, pykmip};

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cli::{KMFS, is_mounted, parse_csv, text};
use netns::{Host, Lab, Proxy, report};

const CONNECT_MS: u64 = 1000;
const READ_MS: u64 = 2000;
const RETRY_MS: u64 = 50;
const PORT: u16 = 5696;

use crate::support::fault::long_tests;

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
}

/// A server certificate from the test CA for the sites' addresses.
/// `dir` is the directory the PKI was generated in.
fn site_cert(pki: &pykmip::Pki, dir: &Path, ips: &[&str]) -> pykmip::CertKey {
    let key = dir.join("sites.key");
    run_ok(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&key),
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ext = dir.join("sites.ext");
    let san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
    std::fs::write(
        &ext,
        format!(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = {}\n",
            san.join(",")
        ),
    )
    .unwrap();
    let csr = dir.join("sites.csr");
    run_ok(
        Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=kmip-sites", "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .arg("-config")
            .arg(dir.join("openssl.cnf")),
    );
    let cert = dir.join("sites.pem");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "30", "-set_serial", "7777", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&pki.ca)
            .arg("-CAkey")
            .arg(dir.join("kmfs-test-ca.key"))
            .arg("-out")
            .arg(&cert)
            .arg("-extfile")
            .arg(&ext),
    );
    pykmip::CertKey { cert, key }
}

/// A PyKMIP server on a site host (its own process group, killed on drop).
struct SiteServer {
    child: Child,
    log: PathBuf,
}

impl SiteServer {
    fn start(
        site: &Host,
        pki: &pykmip::Pki,
        cert: &pykmip::CertKey,
        db: &Path,
        dir: &Path,
    ) -> SiteServer {
        let dir = dir.join(&site.hostname);
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let conf = dir.join("server.conf");
        let log = dir.join("server.log");
        std::fs::write(
            &conf,
            format!(
                "[server]\nhostname={}\nport={PORT}\ncertificate_path={}\nkey_path={}\nca_path={}\nauth_suite=TLS1.2\nenable_tls_client_auth=True\npolicy_path={}\ndatabase_path={}\nlogging_level=DEBUG\n",
                site.ip,
                cert.cert.display(),
                cert.key.display(),
                pki.ca.display(),
                policies.display(),
                db.display()
            ),
        )
        .unwrap();
        let child = site
            .command(pykmip::PYTHON)
            .arg(pykmip::SERVER_BIN)
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&log)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut s = SiteServer { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = std::fs::read_to_string(&s.log).unwrap_or_default();
            if t.contains("Starting connection service") {
                return s;
            }
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("pykmip-server on {} exited ({st}):\n{t}", site.hostname);
            }
            assert!(
                Instant::now() < deadline,
                "pykmip-server on {} did not start:\n{t}",
                site.hostname
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SiteServer {
    fn drop(&mut self) {
        let pg = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Two sites sharing one key database, and host A with a volume config that
/// lists site 1 first.
struct World {
    tmp: tempfile::TempDir,
    _servers: Vec<SiteServer>,
    site1: Host,
    site2: Host,
    host: Host,
    /// The standby file server (host B), same config, its own sockets.
    host_b: Host,
    cfg: PathBuf,
    audit: PathBuf,
    run: PathBuf,
    // Last: the namespaces go after the servers in them.
    _lab: Lab,
}

impl World {
    fn new(tag: &str) -> World {
        Self::new_via(tag, PORT)
    }

    /// Like [`World::new`], with site 1 listed at `site1_port` (a proxy in
    /// front of its server).
    fn new_via(tag: &str, site1_port: u16) -> World {
        let mut lab = Lab::new();
        let site1 = lab.host("site1");
        let site2 = lab.host("site2");
        let host = lab.host("hostA");
        let host_b = lab.host("hostB");
        let tmp = tempfile::tempdir().unwrap();
        let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
        let cert = site_cert(&pki, &tmp.path().join("pki"), &[&site1.ip, &site2.ip]);
        let db = tmp.path().join("keys.sqlite");
        let servers = vec![
            SiteServer::start(&site1, &pki, &cert, &db, tmp.path()),
            SiteServer::start(&site2, &pki, &cert, &db, tmp.path()),
        ];
        let etc = cli::private_dir(tmp.path().join("etc"));
        let run = cli::private_dir(tmp.path().join("run"));
        let audit = etc.join("audit.csv");
        let mut t = format!(
            "provider = \"kmip\"\n[volume]\nname = \"{tag}\"\n[log]\nlevel = \"verbose\"\nsyslog = false\nfile = \"{}\"\naudit_file = \"{}\"\n",
            etc.join("kmfs.log").display(),
            audit.display()
        );
        t += &format!(
            "[kmip]\nkey_name = \"{tag}-kek\"\nconnect_timeout_ms = {CONNECT_MS}\nread_timeout_ms = {READ_MS}\nretry_delay_ms = {RETRY_MS}\nfailover_cycles = 1\n"
        );
        for (s, port) in [(&site1, site1_port), (&site2, PORT)] {
            t += &format!(
                "[[kmip.server]]\nname = \"{}\"\nhost = \"{}\"\nport = {port}\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
                s.hostname,
                s.ip,
                pki.ca.display(),
                pki.client.cert.display(),
                pki.client.key.display()
            );
        }
        let cfg = etc.join(format!("{tag}.toml"));
        std::fs::write(&cfg, t).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        World {
            tmp,
            _servers: servers,
            site1,
            site2,
            host,
            host_b,
            cfg,
            audit,
            run,
            _lab: lab,
        }
    }

    /// `kmfs ARGS` on host A (its network, the test's mount namespace).
    fn kmfs(&self, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        self.kmfs_on(&self.host, &self.run, args)
    }

    /// `kmfs ARGS` on `host` with control sockets in `run`.
    fn kmfs_on(&self, host: &Host, run: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        let mut c = host.command(KMFS);
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
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut child = child;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kmfs {:?} hangs", c_args(args));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    fn back(&self) -> PathBuf {
        self.tmp.path().join("cipher")
    }

    fn mnt(&self) -> PathBuf {
        self.tmp.path().join("plain")
    }

    /// `kmfs init --create-kek` with both sites up.
    fn init(&self) {
        std::fs::create_dir_all(self.back()).unwrap();
        std::fs::create_dir_all(self.mnt()).unwrap();
        let o = self.kmfs(&[
            &"init",
            &"--create-kek",
            &"--config",
            &self.cfg,
            &self.back(),
        ]);
        assert!(o.status.success(), "init: {}", text(&o));
    }

    /// A daemonising mount (as kmfs@.service runs it); returns its output
    /// and how long it took.
    fn mount(&self) -> (Output, Duration) {
        let t = Instant::now();
        let o = self.kmfs(&[&"mount", &"--config", &self.cfg, &self.back(), &self.mnt()]);
        (o, t.elapsed())
    }

    fn unmount(&self) {
        let o = Command::new("umount").arg(self.mnt()).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        // The daemon lets go of the lock a moment after umount returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while kmfs::volume::lock::holder(&self.back()).unwrap().is_some() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Audit rows appended since row `from`.
    fn audit_rows(&self, from: usize) -> Vec<Vec<String>> {
        let t = std::fs::read_to_string(&self.audit).unwrap_or_default();
        parse_csv(&t).into_iter().skip(1).skip(from).collect()
    }

    fn audit_len(&self) -> usize {
        self.audit_rows(0).len()
    }

    fn kek_version(&self) -> u64 {
        let o = Command::new(KMFS)
            .args(["status", "--json"])
            .arg(self.mnt())
            .env("KMFS_RUNTIME_DIR", &self.run)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["kek"]["version"].as_u64().unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if is_mounted(&self.mnt()) {
            let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
        }
    }
}

fn c_args(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

// CSV columns: date,time,volume,operation,server,ip,port,key,version,user,result,reason
const OP: usize = 3;
const SERVER: usize = 4;
const RESULT: usize = 10;

/// Asserts the audit rows name `failed` as failed (a failover row) and
/// `answered` as the server that did the key operation `op`.
fn assert_audit(rows: &[Vec<String>], failed: &str, answered: &str, op: &str) {
    let shown = || {
        rows.iter()
            .map(|r| r.join(","))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        rows.iter()
            .any(|r| r[OP] == "failover" && r[SERVER] == failed && r[RESULT] != "ok"),
        "no failover row for {failed}:\n{}",
        shown()
    );
    assert!(
        rows.iter()
            .any(|r| r[OP] == op && r[SERVER] == answered && r[RESULT] == "ok"),
        "no successful {op} by {answered}:\n{}",
        shown()
    );
    assert!(
        !rows
            .iter()
            .any(|r| r[OP] == op && r[SERVER] == failed && r[RESULT] == "ok"),
        "{failed} answered {op} although it was cut off:\n{}",
        shown()
    );
}

/// The worst case the configuration allows for one failover: a connect or
/// a read timing out, the retry delay, and the work on the next server.
fn budget() -> Duration {
    Duration::from_millis(CONNECT_MS.max(READ_MS) + RETRY_MS + 3000)
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    LinkDown,
    Blackhole,
}

impl Fault {
    fn apply(self, site: &Host, on: bool) {
        match self {
            Fault::LinkDown => site.link(!on),
            Fault::Blackhole => site.blackhole(PORT, on),
        }
    }
}

fn faults() -> Vec<Fault> {
    let mut v = Vec::new();
    if netns::nft_available() {
        v.push(Fault::Blackhole);
    }
    if long_tests() || v.is_empty() {
        v.push(Fault::LinkDown);
    }
    v
}

/// Site 1 cut before the mount: the mount unlocks through site 2 within
/// the timeouts, and the audit trail says so.
fn before_mount(fault: Fault) {
    let w = World::new("before");
    w.init();
    fault.apply(&w.site1, true);
    let from = w.audit_len();
    let (o, took) = w.mount();
    assert!(
        o.status.success(),
        "mount with site1 cut ({fault:?}): {}",
        text(&o)
    );
    std::fs::write(w.mnt().join("f"), b"unlocked through site 2").unwrap();
    report(format!(
        "FAILOVER before mount, site1 {fault:?}: mount returned after {} ms (connect timeout {CONNECT_MS} ms, read timeout {READ_MS} ms, retry delay {RETRY_MS} ms)",
        took.as_millis()
    ));
    assert!(took < budget(), "{took:?} > {:?}", budget());
    assert_audit(&w.audit_rows(from), "site1", "site2", "unwrap");
    w.unmount();
    fault.apply(&w.site1, false);
    let _ = &w.site2;
}

/// Site 1 cut while a KEK rotation of the mounted volume runs (`after` into
/// it; zero: just before it starts). The rotation either completes through
/// site 2 or fails leaving the header as it was; I/O is never interrupted;
/// after healing, the volume remounts with the KEK the header names.
fn during_rotation(fault: Fault, after: Duration) {
    let w = World::new("rotate");
    w.init();
    let (o, _) = w.mount();
    assert!(o.status.success(), "{}", text(&o));
    let v0 = w.kek_version();
    let header = w.back().join("kmfs.volume");
    let h0 = std::fs::read(&header).unwrap();
    let from = w.audit_len();
    // Writers keep going through the whole rotation.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = {
        let stop = stop.clone();
        let mnt = w.mnt();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 3 {
                let data = vec![(n % 251) as u8; 65_536 + n as usize];
                std::fs::write(mnt.join("io"), &data).unwrap();
                assert_eq!(std::fs::read(mnt.join("io")).unwrap(), data);
                n += 1;
            }
            n
        })
    };
    if after.is_zero() {
        fault.apply(&w.site1, true);
    }
    let t = Instant::now();
    let mut rot = Command::new(KMFS);
    rot.arg("rotate-kek")
        .arg(w.mnt())
        .env("KMFS_RUNTIME_DIR", &w.run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = rot.spawn().unwrap();
    if !after.is_zero() {
        std::thread::sleep(after);
        fault.apply(&w.site1, true);
    }
    let o = child.wait_with_output().unwrap();
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ios = io.join().expect("I/O failed during the rotation");
    let rows = w.audit_rows(from);
    let failed_over = rows
        .iter()
        .any(|r| r[OP] == "failover" && r[SERVER] == "site1");
    report(format!(
        "FAILOVER during rotation, site1 {fault:?} {} ms in: rotate-kek {} after {} ms ({}; {ios} write+read rounds meanwhile; connect timeout {CONNECT_MS} ms, read timeout {READ_MS} ms)",
        after.as_millis(),
        if o.status.success() {
            "succeeded"
        } else {
            "failed"
        },
        took.as_millis(),
        if failed_over {
            "failed over to site2"
        } else {
            "no failover needed"
        }
    ));
    if o.status.success() {
        let v = w.kek_version();
        // One new version — or more, when a Create reached site 1 but its
        // answer was lost and site 2 was asked again: the lost one is an
        // unused key version on the key manager, never one the header names.
        assert!(v > v0, "rotation succeeded but the KEK version is {v}");
        if v > v0 + 1 {
            report(format!(
                "NOTE: a Create whose answer was cut off left {} unused KEK version(s) on the key manager",
                v - v0 - 1
            ));
        }
        if after.is_zero() {
            // Every operation of the rotation had to go to site 2.
            assert_audit(&rows, "site1", "site2", "wrap");
        }
        assert!(took < budget() * 4, "{took:?}");
    } else {
        // Fail safe: the committed header as it was, one line naming a server.
        assert_eq!(std::fs::read(&header).unwrap(), h0, "header changed");
        assert_eq!(w.kek_version(), v0);
        assert!(text(&o).contains("site"), "{}", text(&o));
        assert!(
            !after.is_zero(),
            "with site 2 up the rotation must fail over"
        );
    }
    w.unmount();
    fault.apply(&w.site1, false);
    // Whatever the header names unlocks again, nearest site first.
    let (o, _) = w.mount();
    assert!(
        o.status.success(),
        "remount after the rotation: {}",
        text(&o)
    );
    assert!(std::fs::read(w.mnt().join("io")).is_ok());
    w.unmount();
}

/// Site 1 cut just before an online data re-encryption starts: its
/// new-generation step (a new DEK wrapped under the KEK) fails over to site
/// 2 within the timeouts, the rekey runs to the end with I/O going on, and
/// the volume remounts afterwards.
fn during_rekey_start(fault: Fault) {
    let w = World::new("rekey");
    w.init();
    let (o, _) = w.mount();
    assert!(o.status.success(), "{}", text(&o));
    for i in 0..8u8 {
        std::fs::write(w.mnt().join(format!("f{i}")), vec![i; 100_000]).unwrap();
    }
    let from = w.audit_len();
    fault.apply(&w.site1, true);
    let t = Instant::now();
    let o = Command::new(KMFS)
        .args(["rekey", "--json"])
        .arg(w.mnt())
        .env("KMFS_RUNTIME_DIR", &w.run)
        .output()
        .unwrap();
    let took = t.elapsed();
    report(format!(
        "FAILOVER at a rekey's new-generation step, site1 {fault:?}: `kmfs rekey` {} after {} ms (connect timeout {CONNECT_MS} ms, read timeout {READ_MS} ms)",
        if o.status.success() {
            "started"
        } else {
            "failed"
        },
        took.as_millis()
    ));
    assert!(o.status.success(), "rekey with site1 cut: {}", text(&o));
    assert!(took < budget() * 2, "{took:?}");
    assert_audit(&w.audit_rows(from), "site1", "site2", "wrap");
    // The rekey runs to its end; files stay readable meanwhile.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for i in 0..8u8 {
            assert_eq!(
                std::fs::read(w.mnt().join(format!("f{i}"))).unwrap(),
                vec![i; 100_000]
            );
        }
        let o = Command::new(KMFS)
            .args(["rekey", "--status", "--json"])
            .arg(w.mnt())
            .env("KMFS_RUNTIME_DIR", &w.run)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if st["phase"] == "idle" || st["phase"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "rekey did not finish: {st:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.unmount();
    fault.apply(&w.site1, false);
    let (o, _) = w.mount();
    assert!(o.status.success(), "remount after the rekey: {}", text(&o));
    assert_eq!(
        std::fs::read(w.mnt().join("f7")).unwrap(),
        vec![7u8; 100_000]
    );
    w.unmount();
}

/// The whole picture: host A serves the volume and crashes (SIGKILL) while
/// the nearest key-manager site is cut off; host B, listing the same sites,
/// takes over: its mount waits for the lock, unlocks through site 2 within
/// the connect timeout, and every byte A had fsync'd is there.
#[test]
fn host_a_crashes_while_site_1_is_cut_and_host_b_takes_over_through_site_2() {
    if !netns::available() || !pykmip::available() {
        return;
    }
    let fault = faults()[0];
    let w = World::new("takeover");
    w.init();
    let (o, _) = w.mount();
    assert!(o.status.success(), "A: {}", text(&o));
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut f = std::fs::File::create(w.mnt().join("share.bin")).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let o = Command::new(KMFS)
        .args(["status", "--json"])
        .arg(w.mnt())
        .env("KMFS_RUNTIME_DIR", &w.run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a_pid = st["pid"].as_i64().unwrap() as i32;
    fault.apply(&w.site1, true);
    let from = w.audit_len();
    let run_b = cli::private_dir(w.tmp.path().join("run-b"));
    let mnt_b = w.tmp.path().join("plain-b");
    std::fs::create_dir(&mnt_b).unwrap();
    // A crashes.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let o = w.kmfs_on(
        &w.host_b,
        &run_b,
        &[
            &"mount",
            &"-o",
            &"lock_wait=30",
            &"--config",
            &w.cfg,
            &w.back(),
            &mnt_b,
        ],
    );
    let took = killed.elapsed();
    let _ = Command::new("umount").arg("-l").arg(w.mnt()).status();
    assert!(o.status.success(), "B: {}", text(&o));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .stderr(Stdio::null())
                .status();
        }
    }
    let _b = Unmount(mnt_b.clone());
    report(format!(
        "TAKEOVER with site1 {fault:?}: SIGKILL of A -> B's mount returned live after {} ms (connect timeout {CONNECT_MS} ms)",
        took.as_millis()
    ));
    assert!(took < budget(), "{took:?}");
    assert_audit(&w.audit_rows(from), "site1", "site2", "unwrap");
    assert!(std::fs::read(mnt_b.join("share.bin")).unwrap() == data);
    let rec = std::fs::read_to_string(w.back().join("kmfs.lock")).unwrap();
    assert!(rec.starts_with("host=hostB "), "{rec}");
    let o = Command::new("umount").arg(&mnt_b).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    fault.apply(&w.site1, false);
}

#[test]
fn key_server_site_cut_at_a_rekeys_new_generation_step_fails_over() {
    if !netns::available() || !pykmip::available() {
        return;
    }
    for f in faults() {
        during_rekey_start(f);
    }
}

#[test]
fn key_server_site_cut_before_mount_fails_over_within_the_timeouts() {
    if !netns::available() || !pykmip::available() {
        return;
    }
    for f in faults() {
        before_mount(f);
    }
}

#[test]
fn key_server_site_cut_during_a_kek_rotation_fails_over_or_fails_safe() {
    if !netns::available() || !pykmip::available() {
        return;
    }
    for f in faults() {
        during_rotation(f, Duration::ZERO);
        if long_tests() {
            for ms in [5, 20, 60, 150] {
                during_rotation(f, Duration::from_millis(ms));
            }
        }
    }
}

/// A slow or silent site 1 (a proxy in its namespace that delays or
/// swallows its answers): below the read timeout site 1 still answers; above
/// it, or silent, the mount fails over to site 2 after about the read
/// timeout. Long set only.
#[test]
fn key_server_slow_or_silent_site_fails_over_on_the_read_timeout() {
    if !long_tests() || !netns::available() || !pykmip::available() {
        return;
    }
    let w = World::new_via("slow", PORT + 1);
    let at =
        |port: u16| -> std::net::SocketAddr { format!("{}:{port}", w.site1.ip).parse().unwrap() };
    let proxy = Proxy::start(&w.site1, at(PORT + 1), at(PORT));
    w.init();
    use std::sync::atomic::Ordering;
    for (what, delay, stall, fails_over) in [
        ("delayed 200 ms", 200u64, false, false),
        ("delayed 3000 ms", 3000, false, true),
        ("silent after the handshake", 0, true, true),
    ] {
        proxy.delay_ms.store(delay, Ordering::Relaxed);
        proxy.stall.store(stall, Ordering::Relaxed);
        let from = w.audit_len();
        let (o, took) = w.mount();
        assert!(o.status.success(), "mount with site1 {what}: {}", text(&o));
        report(format!(
            "FAILOVER before mount, site1 {what}: mount returned after {} ms ({}; read timeout {READ_MS} ms)",
            took.as_millis(),
            if fails_over {
                "failed over to site2"
            } else {
                "answered by site1"
            }
        ));
        let rows = w.audit_rows(from);
        if fails_over {
            assert_audit(&rows, "site1", "site2", "unwrap");
            assert!(took >= Duration::from_millis(READ_MS), "{took:?}");
            assert!(took < budget(), "{took:?}");
        } else {
            assert!(
                rows.iter()
                    .any(|r| r[OP] == "unwrap" && r[SERVER] == "site1" && r[RESULT] == "ok"),
                "{rows:?}"
            );
            assert!(!rows.iter().any(|r| r[OP] == "failover"), "{rows:?}");
        }
        w.unmount();
    }
    drop(proxy);
}
