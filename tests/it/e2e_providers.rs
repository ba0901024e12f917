//! Both production providers end to end through the CLI and a real mount, and
//! a secret scan: a full init / mount / write / rotate cycle at `debug` log
//! level, after which every log line, audit row and daemon stderr line is
//! searched for the DEK, the KEK, the wrapped DEK, the HSM PIN and the written
//! data, raw and in hex and base64. None may appear.
//!
//! * PKCS#11 (SoftHSM2): init with a new KEK in the token, mount, write, read,
//!   online rotation, remount.
//! * KMIP (PyKMIP): the primary key server is down at mount time; the mount
//!   succeeds through the secondary and the audit trail records the failover.

use crate::support::cli;
use cli::{Dirs, KMFS, is_mounted, kmfs, ok, text};

use crate::support::pykmip;
use crate::support::softhsm;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use base64::Engine;

fn unmount(p: &Path) {
    if is_mounted(p) {
        let st = Command::new("umount").arg(p).status().unwrap();
        assert!(st.success());
    }
}

fn log_section(etc: &Path) -> String {
    format!(
        "[log]\nlevel = \"debug\"\nsyslog = false\nfile = \"{}\"\naudit_file = \"{}\"\n",
        etc.join("vol.log").display(),
        etc.join("audit.csv").display()
    )
}

/// Every form a secret could take in text.
fn forms(secret: &[u8]) -> Vec<String> {
    let mut v = vec![
        secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        secret
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    ];
    if let Ok(s) = std::str::from_utf8(secret) {
        v.push(s.to_string());
    }
    v
}

fn scan(haystacks: &[(&str, Vec<u8>)], name: &str, secret: &[u8]) {
    for (what, bytes) in haystacks {
        assert!(
            !bytes
                .windows(secret.len().min(16))
                .any(|w| w == &secret[..secret.len().min(16)]),
            "{name} (raw) found in {what}"
        );
        let text = String::from_utf8_lossy(bytes);
        for f in forms(secret) {
            let probe = &f[..f.len().min(24)];
            assert!(!text.contains(probe), "{name} found in {what} as {probe:?}");
        }
    }
}

#[test]
fn pkcs11_end_to_end_with_secret_scan() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = softhsm::Hsm::for_processes();
    let d = Dirs::new();
    let cfg = d.etc.join("vol.toml");
    cli::write_private(
        &cfg,
        &format!(
            "provider = \"pkcs11\"\n{}{}",
            log_section(&d.etc),
            hsm.toml_section("e2e-kek")
        ),
    );
    ok(kmfs(&[
        &"init",
        &"--create-kek",
        &"--config",
        &cfg,
        &d.back,
    ]));
    let daemon_err = d.etc.join("daemon.err");
    let errf = std::fs::File::create(&daemon_err).unwrap();
    let st = Command::new(KMFS)
        .args(["mount", "--config"])
        .arg(&cfg)
        .arg(&d.back)
        .arg(&d.mnt)
        .stderr(errf)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "{}",
        std::fs::read_to_string(&daemon_err).unwrap()
    );
    let secret_data =
        b"PAYROLL-2026 account 4711 balance 1,000,000 -- secret scan marker".repeat(64);
    std::fs::write(d.mnt.join("payroll.txt"), &secret_data).unwrap();
    assert_eq!(
        std::fs::read(d.mnt.join("payroll.txt")).unwrap(),
        secret_data
    );
    ok(kmfs(&[&"rotate-kek", &d.mnt]));
    // The generation-0 DEK and its wrap, before a rekey retires them.
    let (dek0, wrapped0) = {
        let provider = kmfs::kms::pkcs11::Pkcs11Provider::from_config(&{
            let mut c = hsm.config("e2e-kek");
            c.key_version = None;
            c
        })
        .unwrap();
        let v = kmfs::volume::Volume::open(&d.back, &provider).unwrap();
        (
            v.dek().as_bytes().to_vec(),
            v.header.generations[0].wrapped.clone(),
        )
    };
    // Online rekey through the token (new DEK from its RNG, wrapped inside it).
    ok(kmfs(&[&"rekey", &"--cpu", &"100", &d.mnt]));
    let out = ok(kmfs(&[&"rekey", &"--status", &"--wait", &d.mnt]));
    assert!(out.contains("removed generation(s) [0]"), "{out}");
    unmount(&d.mnt);
    let st = Command::new(KMFS)
        .args(["mount", "--config"])
        .arg(&cfg)
        .arg(&d.back)
        .arg(&d.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(d.mnt.join("payroll.txt")).unwrap(),
        secret_data
    );
    unmount(&d.mnt);

    // The secrets: the DEK (unwrapped here through the token), the wrapped DEK
    // from the header, the PIN, the data.
    let provider = kmfs::kms::pkcs11::Pkcs11Provider::from_config(&{
        let mut c = hsm.config("e2e-kek");
        c.key_version = None;
        c
    })
    .unwrap();
    let vol = kmfs::volume::Volume::open(&d.back, &provider).unwrap();
    let dek = vol.dek().as_bytes().to_vec();
    let wrapped = vol.header.generations[0].wrapped.clone();
    let hay = vec![
        ("log file", std::fs::read(d.etc.join("vol.log")).unwrap()),
        (
            "audit trail",
            std::fs::read(d.etc.join("audit.csv")).unwrap(),
        ),
        ("daemon stderr", std::fs::read(&daemon_err).unwrap()),
    ];
    assert!(hay[0].1.len() > 1000, "debug log unexpectedly short");
    assert!(String::from_utf8_lossy(&hay[1].1).contains(",unwrap,"));
    assert_eq!(vol.header.active, 1);
    assert!(dek != dek0, "the rekey kept the DEK");
    scan(&hay, "DEK", &dek);
    scan(&hay, "wrapped DEK", &wrapped);
    scan(&hay, "retired DEK", &dek0);
    scan(&hay, "retired wrapped DEK", &wrapped0);
    scan(&hay, "PIN", softhsm::PIN.as_bytes());
    scan(&hay, "file data", &secret_data[..64]);
    let o = kmfs(&[&"log", &"verify", &d.etc.join("vol.log")]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn keyfile_cycle_at_debug_level_leaks_no_kek() {
    let d = Dirs::new();
    let key = d.etc.join("kek");
    let kek: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    std::fs::write(&key, &kek).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = d.etc.join("vol.toml");
    cli::write_private(
        &cfg,
        &format!(
            "provider = \"keyfile\"\n{}[keyfile]\npath = \"{}\"\n",
            log_section(&d.etc),
            key.display()
        ),
    );
    ok(kmfs(&[&"init", &"--config", &cfg, &d.back]));
    ok(kmfs(&[&"mount", &"--config", &cfg, &d.back, &d.mnt]));
    std::fs::write(d.mnt.join("f"), b"keyfile secret scan marker 0123456789").unwrap();
    unmount(&d.mnt);
    let p = kmfs::kms::keyfile::KeyfileProvider::open(&key, None).unwrap();
    let vol = kmfs::volume::Volume::open(&d.back, &p).unwrap();
    let hay = vec![
        ("log file", std::fs::read(d.etc.join("vol.log")).unwrap()),
        (
            "audit trail",
            // A missing trail must fail, not scan as empty.
            std::fs::read(d.etc.join("audit.csv")).expect("the audit trail exists"),
        ),
    ];
    scan(&hay, "KEK", &kek);
    scan(&hay, "DEK", vol.dek().as_bytes());
    scan(&hay, "wrapped DEK", &vol.header.generations[0].wrapped);
    scan(&hay, "file data", b"keyfile secret scan marker");
}

#[test]
fn kmip_mount_fails_over_to_the_secondary() {
    if !pykmip::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
    let server = pykmip::PykmipServer::start(
        &pki,
        &pki.server,
        &tmp.path().join("km.db"),
        &tmp.path().join("km"),
    );
    let d = Dirs::new();
    let cfg = d.etc.join("vol.toml");
    let dead = pykmip::closed_port();
    let mut t = format!(
        "provider = \"kmip\"\n{}[kmip]\nkey_name = \"failover-kek\"\nconnect_timeout_ms = 500\nread_timeout_ms = 2000\nretry_delay_ms = 100\nfailover_cycles = 1\n",
        log_section(&d.etc)
    );
    for (name, port) in [("primary", dead), ("secondary", server.port)] {
        t += &pki.toml_server(name, port);
    }
    cli::write_private(&cfg, &t);
    ok(kmfs(&[
        &"init",
        &"--create-kek",
        &"--config",
        &cfg,
        &d.back,
    ]));
    let start = std::time::Instant::now();
    ok(kmfs(&[&"mount", &"--config", &cfg, &d.back, &d.mnt]));
    let took = start.elapsed();
    std::fs::write(d.mnt.join("x"), b"through the secondary").unwrap();
    assert_eq!(
        std::fs::read(d.mnt.join("x")).unwrap(),
        b"through the secondary"
    );
    unmount(&d.mnt);
    let audit = std::fs::read_to_string(d.etc.join("audit.csv")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains(",failover,primary,")),
        "no failover row for the primary in\n{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains(",unwrap,secondary,") && l.contains(",ok,"))
    );
    let log = std::fs::read_to_string(d.etc.join("vol.log")).unwrap();
    assert!(
        log.contains("op=failover") && log.contains("server=primary"),
        "{log}"
    );
    eprintln!("mount with the primary down took {took:?}");
}

/// The scanner itself finds a secret in each form it claims to look for.
#[test]
fn the_scan_finds_planted_secrets() {
    let secret: Vec<u8> = (100..132u8).collect();
    for f in forms(&secret) {
        let hay = vec![("planted", format!("op=x key={f} result=ok").into_bytes())];
        let r = std::panic::catch_unwind(|| scan(&hay, "planted", &secret));
        assert!(r.is_err(), "scan missed {f}");
    }
    let hay = vec![("planted", [b"raw:".as_slice(), &secret].concat())];
    assert!(std::panic::catch_unwind(|| scan(&hay, "planted", &secret)).is_err());
}
