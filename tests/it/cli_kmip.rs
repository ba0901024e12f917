//! End to end through the real binary with real PyKMIP servers: `kmfs init
//! --create-kek` with a KMIP config, `keyserver check`, header restore with the
//! key server down (one clear error naming each server), the CSV audit trail of
//! every key-manager operation, and the hash-chained log verified by
//! `kmfs log verify`.

use crate::support::cli;
use cli::{kmfs, text};

use crate::support::pykmip;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn write_config(dir: &Path, pki: &pykmip::Pki, servers: &[(&str, u16)]) -> PathBuf {
    let mut t = String::from("provider = \"kmip\"\n[volume]\nname = \"vol1\"\n");
    t += &format!(
        "[log]\nlevel = \"verbose\"\nsyslog = false\nfile = \"{}\"\naudit_file = \"{}\"\n",
        dir.join("vol1.log").display(),
        dir.join("audit.csv").display()
    );
    t += "[kmip]\nkey_name = \"vol1-kek\"\nconnect_timeout_ms = 1000\nread_timeout_ms = 3000\nretry_delay_ms = 50\nfailover_cycles = 1\n";
    for (name, port) in servers {
        t += &pki.toml_server(name, *port);
    }
    let p = dir.join("vol1.toml");
    std::fs::write(&p, t).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn init_check_audit_and_outage_through_the_cli() {
    if !pykmip::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etc = cli::private_dir(tmp.path().join("etc"));
    let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
    let server = pykmip::PykmipServer::start(
        &pki,
        &pki.server,
        &tmp.path().join("km1.db"),
        &tmp.path().join("km1"),
    );
    let dead = pykmip::closed_port();
    let cfg = write_config(&etc, &pki, &[("km1", server.port), ("km2", dead)]);
    let back = tmp.path().join("back");
    std::fs::create_dir(&back).unwrap();

    // Without --create-kek a missing KEK is an error naming it; nothing written.
    let o = kmfs(&[&"init", &"--config", &cfg, &back]);
    assert_eq!(o.status.code(), Some(13), "{}", text(&o));
    assert!(text(&o).contains("vol1-kek"), "{}", text(&o));
    assert!(std::fs::read_dir(&back).unwrap().next().is_none());

    let o = kmfs(&[&"init", &"--create-kek", &"--config", &cfg, &back]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("created key-encryption key"));

    let o = kmfs(&[&"header", &"dump", &back]);
    let dump = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        dump.contains("KEK provider:     kmip") && dump.contains("KEK name:         vol1-kek"),
        "{dump}"
    );

    // keyserver check: km1 healthy, km2 (closed port) not → exit 12, both listed.
    let o = kmfs(&[&"keyserver", &"check", &"--config", &cfg]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(12), "{out}{}", text(&o));
    assert!(out.contains("km1") && out.contains("km2"), "{out}");

    // Restore the header while the only live server is up: works.
    let bak = tmp.path().join("hdr.bak");
    assert!(kmfs(&[&"header", &"backup", &back, &bak]).status.success());
    let o = kmfs(&[&"header", &"restore", &"--config", &cfg, &back, &bak]);
    assert!(o.status.success(), "{}", text(&o));

    // Key server down: one line naming each server and why; nothing changed.
    let live = std::fs::read(back.join("kmfs.volume")).unwrap();
    drop(server);
    let o = kmfs(&[&"header", &"restore", &"--config", &cfg, &back, &bak]);
    assert_eq!(o.status.code(), Some(12), "{}", text(&o));
    let line = text(&o).lines().last().unwrap().to_string();
    assert!(line.contains("km1") && line.contains("km2"), "{line}");
    assert_eq!(std::fs::read(back.join("kmfs.volume")).unwrap(), live);

    // The audit trail has a header row and rows for create, wrap and unwrap,
    // successful and failed; no key material (the DEK is never printed, so check
    // for the wrapped blob's hex and base64 forms instead).
    let audit = std::fs::read_to_string(etc.join("audit.csv")).unwrap();
    let first = audit.lines().next().unwrap();
    assert!(first.starts_with("date,time,"), "{first}");
    for op in ["create", "activate", "wrap", "unwrap"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(&format!(",{op},km1,")) && l.contains(",ok,")),
            "no successful {op} row in\n{audit}"
        );
    }
    assert!(
        audit.lines().any(|l| l.contains(",fail,")),
        "no failed row in\n{audit}"
    );
    let (h, _) = kmfs::volume::read_header(&back).unwrap();
    let hex: String = h.generations[0]
        .wrapped
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!audit.contains(&hex[..32]));

    // The chained log verifies, and names the line after an edit.
    let log = etc.join("vol1.log");
    let o = kmfs(&[&"log", &"verify", &log]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("OK: "));
    let logtext = std::fs::read_to_string(&log).unwrap();
    assert!(!logtext.contains(&hex[..32]), "wrapped key in the log");
    let edited = logtext.replacen("result=ok", "result=OK", 1);
    std::fs::write(&log, edited).unwrap();
    let o = kmfs(&[&"log", &"verify", &log]);
    assert_eq!(o.status.code(), Some(18));
    assert!(text(&o).contains("line "), "{}", text(&o));
}
