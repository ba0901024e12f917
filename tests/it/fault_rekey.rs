//! Faults during an online data re-encryption (`kmfs rekey`), with real parts
//! only: a real FUSE mount, a real tmpfs and a real PyKMIP server.
//!
//! * Disk full: the backing directory lives on a small tmpfs that a filler
//!   file *beside* the backing directory fills up to a few hundred KiB. The
//!   rekey starts (it only writes the small header and state file), then
//!   waits with a clear "No space left … free some space" message without
//!   touching a single file (its journal cannot be allocated), while reads
//!   go on. Once the filler is deleted it resumes by itself and finishes:
//!   one key generation left, every backing file on it, contents unchanged,
//!   also after a remount.
//! * Key manager outage: the walk over the files needs no key server, the
//!   final retirement of the old generation does. The server is hung
//!   (SIGSTOP) right after the rekey starts; the rekey re-encrypts every file,
//!   then waits with a message naming the key manager and keeps the old
//!   generation, reads and writes go on; after SIGCONT it retires the old
//!   generation, and the audit trail shows the failed and then the successful
//!   `rekey_retire`.

use crate::support::cli;
use crate::support::fault;
use crate::support::mount;
use crate::support::pykmip;
use crate::support::rekey::backing_generations;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cli::{kmfs, text};
use fault::{Daemon, Tmpfs};
use mount::{Volume, pattern};
use serde_json::Value;

fn json_ok(o: Output, what: &str) -> Value {
    assert!(o.status.success(), "{what} failed: {}", text(&o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: output is not JSON ({e}): {}", text(&o)))
}

/// `kmfs rekey --status --json MNT`.
fn rekey_status(mnt: &Path) -> Value {
    json_ok(
        kmfs(&[&"rekey", &"--status", &"--json", &mnt]),
        "kmfs rekey --status",
    )
}

/// `kmfs header dump --json BACKING`.
fn header(back: &Path) -> Value {
    json_ok(
        kmfs(&[&"header", &"dump", &"--json", &back]),
        "kmfs header dump",
    )
}

fn generations(h: &Value) -> Vec<u64> {
    h["generations"]
        .as_array()
        .expect("header dump has generations")
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect()
}

/// Polls the rekey status until `done(status)`, failing at once if `bad`
/// says so and after `timeout`; `log` gives the daemon log for the message.
fn poll(
    mnt: &Path,
    timeout: Duration,
    what: &str,
    log: &dyn Fn() -> String,
    done: &dyn Fn(&Value) -> bool,
    bad: &dyn Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = rekey_status(mnt);
        if done(&s) {
            return s;
        }
        assert!(
            !bad(&s),
            "while waiting for {what}, unexpected rekey status:\n{s:#}\ndaemon log:\n{}",
            log()
        );
        assert!(
            Instant::now() < deadline,
            "no {what} after {timeout:?}; last status:\n{s:#}\ndaemon log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn phase(s: &Value) -> &str {
    s["phase"].as_str().unwrap_or("?")
}

/// Asserts that every backing user file is on generation `g`.
fn assert_all_on(back: &Path, g: u16, min_files: usize, when: &str) {
    let all = backing_generations(back);
    assert!(
        all.len() >= min_files,
        "{when}: only {} backing files with a header, expected at least {min_files}",
        all.len()
    );
    let wrong: Vec<_> = all.iter().filter(|(_, x)| *x != g).collect();
    assert!(
        wrong.is_empty(),
        "{when}: {} of {} backing files are not on generation {g}, e.g. {:?}",
        wrong.len(),
        all.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Creates `path` with `data` and fsyncs it (so the data is in the backing
/// file before free space is measured).
fn create(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Checks every (relative path, content) through the mount.
fn verify(mnt: &Path, files: &[(String, Vec<u8>)], when: &str) {
    for (rel, data) in files {
        let got =
            std::fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{when}: read {rel}: {e}"));
        assert!(
            got == *data,
            "{when}: {rel} differs (size {} , expected {})",
            got.len(),
            data.len()
        );
    }
}

fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

#[test]
fn disk_full_during_rekey_waits_then_resumes() {
    let mut vol = Volume::create(false);
    // The tmpfs holds the backing directory *and* the filler beside it, so
    // the filler takes space from the volume without being part of it.
    let fsdir = vol.dir.path().join("fs");
    std::fs::create_dir(&fsdir).unwrap();
    let _tmpfs = Tmpfs::over(&fsdir, "16m");
    let back = fsdir.join("back");
    std::fs::create_dir(&back).unwrap();
    let o = kmfs(&[&"init", &"--keyfile", &vol.key, &back]);
    assert!(o.status.success(), "init: {}", text(&o));
    vol.backing = back.clone();
    let mut d = Daemon::mount(&vol);
    let m = vol.mnt.clone();

    // A few hundred small files of every shape (empty, tiny, unit-sized,
    // odd), a long name, and a few bigger files (the biggest spans three
    // journal chunks).
    let sizes = [0usize, 1, 15, 16, 17, 100, 4095, 4096, 4097, 6000];
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in 0..4 {
        std::fs::create_dir(m.join(format!("d{dir}"))).unwrap();
    }
    for i in 0..240usize {
        let len = sizes[i % sizes.len()] + (i / sizes.len()) * 13 * (i % 3);
        files.push((format!("d{}/f{i}", i % 4), pattern(i as u64 + 1, len)));
    }
    files.push((format!("d1/{}", "L".repeat(240)), pattern(1000, 5000)));
    files.push(("big0".into(), pattern(1001, 300_001)));
    files.push(("big1".into(), pattern(1002, 1 << 20)));
    files.push(("d2/big2".into(), pattern(1003, 2_600_000)));
    for (rel, data) in &files {
        create(&m.join(rel), data);
    }
    verify(&m, &files, "before the rekey");
    let plain_total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();

    let h0 = header(&back);
    let g0 = h0["active_generation"].as_u64().unwrap() as u16;
    assert_eq!(generations(&h0), vec![g0 as u64], "{h0:#}");
    let with_header = backing_generations(&back).len();
    let nonempty = files.iter().filter(|(_, d)| !d.is_empty()).count();
    assert!(
        (nonempty..=files.len()).contains(&with_header),
        "{with_header} backing files with a header for {nonempty} non-empty of {} files",
        files.len()
    );
    assert!(
        backing_generations(&back).iter().any(|(p, _)| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("kmfs.long.")),
        "the long name did not make a kmfs.long.* backing file"
    );
    assert_all_on(&back, g0, with_header, "before the rekey");

    // Fill the tmpfs from outside the backing directory until about 512 KiB
    // are left: room for the header swap and the state file, not for the
    // 2.1 MiB journal.
    let free = free_bytes(&fsdir);
    let filler = fsdir.join("filler");
    {
        let mut f = File::create(&filler).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = free.saturating_sub(512 << 10);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        f.sync_all().unwrap();
    }
    let free = free_bytes(&fsdir);
    assert!(
        free > 64 << 10 && free < 1 << 20,
        "{free} bytes free after filling"
    );

    // The start writes only the header and the state file: it succeeds.
    let started = json_ok(kmfs(&[&"rekey", &"--json", &m]), "kmfs rekey --json MNT");
    let target = started["target_generation"].as_u64().expect("target") as u16;
    assert_ne!(target, g0, "{started:#}");
    assert_eq!(
        started["old_generations"],
        serde_json::json!([g0]),
        "{started:#}"
    );
    let log = || daemon_log(vol.dir.path());
    let s = poll(
        &m,
        Duration::from_secs(20),
        "phase waiting on a full disk",
        &log,
        &|s| phase(s) == "waiting",
        &|s| matches!(phase(s), "done" | "finishing" | "stopped"),
    );
    let msg = s["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("No space left") && msg.contains("free some space"),
        "the waiting message does not say the disk is full and what to do: {s:#}"
    );
    assert!(msg.contains("journal"), "{s:#}");
    assert_eq!(s["files_done"].as_u64(), Some(0), "{s:#}");
    assert!(back.join("kmfs.rekey").exists(), "no state file");
    let h = header(&back);
    assert_eq!(h["active_generation"].as_u64(), Some(target as u64));
    assert_eq!(generations(&h), vec![g0 as u64, target as u64], "{h:#}");
    // Without its journal the rekey touched nothing, and the volume serves
    // files on the old generation while the new one is active.
    assert_all_on(&back, g0, with_header, "while waiting");
    verify(&m, &files, "while waiting on a full disk");
    // A retry (1 s later) fails the same way.
    std::thread::sleep(Duration::from_millis(1500));
    let s = rekey_status(&m);
    assert_eq!(phase(&s), "waiting", "{s:#}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or("")
            .contains("No space left"),
        "{s:#}"
    );
    assert_all_on(&back, g0, with_header, "while still waiting");

    // Free the space: the rekey resumes by itself (backoff ≤ 4 s here) and
    // finishes.
    std::fs::remove_file(&filler).unwrap();
    let t0 = Instant::now();
    let s = poll(
        &m,
        Duration::from_secs(60),
        "phase done after freeing space",
        &log,
        &|s| phase(s) == "done",
        &|s| phase(s) == "stopped",
    );
    eprintln!("rekey done {:?} after freeing space: {s}", t0.elapsed());
    assert_eq!(s["target_generation"].as_u64(), Some(target as u64));
    assert_eq!(s["files_total"].as_u64(), Some(with_header as u64), "{s:#}");
    assert_eq!(s["files_done"], s["files_total"], "{s:#}");
    assert_eq!(s["files_skipped"].as_u64(), Some(0), "{s:#}");
    assert_eq!(s["bytes_total"].as_u64(), Some(plain_total), "{s:#}");
    assert_eq!(s["bytes_done"], s["bytes_total"], "{s:#}");

    let h = header(&back);
    assert_eq!(generations(&h), vec![target as u64], "{h:#}");
    assert_eq!(h["active_generation"].as_u64(), Some(target as u64));
    assert_all_on(&back, target, with_header, "after the rekey");
    assert!(!back.join("kmfs.rekey").exists(), "state file left behind");
    assert!(
        !back.join("kmfs.rekey.journal").exists(),
        "journal left behind"
    );
    verify(&m, &files, "after the rekey");

    let st = d.unmount();
    let text = d.log_text();
    assert!(st.is_some_and(|s| s.success()), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let mut d = Daemon::mount(&vol);
    verify(&m, &files, "after a remount");
    assert_eq!(rekey_status(&m)["phase"], "idle");
    let st = d.unmount();
    assert!(st.is_some_and(|s| s.success()), "{}", d.log_text());
}

/// The newest daemon log `fault::Daemon` wrote in `dir` (for failure
/// messages; a closure over the `Daemon` itself would borrow it).
fn daemon_log(dir: &Path) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("daemon-")
        })
        .collect();
    logs.sort();
    logs.last()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .unwrap_or_default()
}

/// The read timeout (6 s) is longer than the 5 s in which `kmfs rekey
/// --status MNT` must find the daemon: status requests must keep answering
/// while the retire step waits on a hung key manager.
fn write_kmip_config(etc: &Path, pki: &pykmip::Pki, port: u16) -> PathBuf {
    let cfg = etc.join("rekey.toml");
    std::fs::write(
        &cfg,
        format!(
            "provider = \"kmip\"\n[volume]\nname = \"rekey\"\n\
             [log]\nlevel = \"verbose\"\nsyslog = false\nfile = \"{}\"\naudit_file = \"{}\"\n\
             [kmip]\nkey_name = \"rekey-kek\"\n\
             connect_timeout_ms = 500\nread_timeout_ms = 6000\nretry_delay_ms = 20\nfailover_cycles = 1\n{}",
            etc.join("kmfs.log").display(),
            etc.join("audit.csv").display(),
            pki.toml_server("km-rekey", port),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    cfg
}

#[test]
fn key_server_outage_during_rekey_waits_then_resumes() {
    if !pykmip::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etc = cli::private_dir(tmp.path().join("etc"));
    let pki = pykmip::Pki::generate(&tmp.path().join("pki"));
    let mut server = pykmip::PykmipServer::start(
        &pki,
        &pki.server,
        &tmp.path().join("km.db"),
        &tmp.path().join("km"),
    );
    let cfg = write_kmip_config(&etc, &pki, server.port);
    let back = tmp.path().join("back");
    let mnt = tmp.path().join("mnt");
    let mut d = Daemon::init_and_mount(&cfg, &back, &mnt, tmp.path());

    // 300 files of 20–60 KiB (about 12 MB): at 2 MB/s the walk takes
    // several seconds, so the server is surely stopped before the end.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in 0..6 {
        std::fs::create_dir(mnt.join(format!("d{dir}"))).unwrap();
    }
    for i in 0..300usize {
        let len = 20 * 1024 + (i * 7919) % (40 * 1024);
        files.push((format!("d{}/f{i}", i % 6), pattern(i as u64 + 7, len)));
    }
    for (rel, data) in &files {
        create(&mnt.join(rel), data);
    }
    let h0 = header(&back);
    let g0 = h0["active_generation"].as_u64().unwrap() as u16;
    assert_eq!(generations(&h0), vec![g0 as u64], "{h0:#}");
    assert_all_on(&back, g0, files.len(), "before the rekey");

    // Start (needs the key server: new DEK, wrap, verify), then hang the
    // server at once: the walk does not need it, the retirement does.
    let o = kmfs(&[&"rekey", &"--rate", &"2", &"--json", &mnt]);
    server.hang();
    let started = json_ok(o, "kmfs rekey --rate 2 --json MNT");
    let target = started["target_generation"].as_u64().expect("target") as u16;
    assert_ne!(target, g0, "{started:#}");
    let s = rekey_status(&mnt);
    assert!(
        matches!(phase(&s), "scanning" | "running"),
        "the rekey is not walking right after its start: {s:#}"
    );
    assert_eq!(generations(&header(&back)).len(), 2);

    let log = || daemon_log(tmp.path());
    let t0 = Instant::now();
    let s = poll(
        &mnt,
        Duration::from_secs(40),
        "phase waiting on the key manager",
        &log,
        &|s| phase(s) == "waiting",
        &|s| matches!(phase(s), "done" | "stopped"),
    );
    eprintln!("waiting {:?} after the start: {s}", t0.elapsed());
    let msg = s["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("key manager")
            && msg.contains("cannot retire")
            && msg.contains(&format!("generation {target}")),
        "the waiting message does not name the key manager: {s:#}"
    );
    assert!(
        msg.contains("km-rekey"),
        "message does not name the server: {s:#}"
    );
    // The walk is complete; only the retirement waits.
    assert_eq!(s["files_total"].as_u64(), Some(files.len() as u64), "{s:#}");
    assert_eq!(s["files_done"], s["files_total"], "{s:#}");
    assert_all_on(
        &back,
        target,
        files.len(),
        "while waiting on the key manager",
    );
    let h = header(&back);
    assert_eq!(
        generations(&h),
        vec![g0 as u64, target as u64],
        "the old generation went before the key manager confirmed the new one: {h:#}"
    );
    assert!(
        back.join("kmfs.rekey").exists(),
        "no state file while waiting"
    );

    // The volume keeps serving reads and writes.
    verify(&mnt, &files, "while waiting on the key manager");
    let extra = ("d0/written-while-waiting".to_string(), pattern(99, 33_333));
    create(&mnt.join(&extra.0), &extra.1);
    files.push(extra);
    assert!(d.alive(), "daemon died:\n{}", d.log_text());

    // The server is back: the next retry retires the old generation.
    server.resume();
    let t1 = Instant::now();
    let s = poll(
        &mnt,
        Duration::from_secs(60),
        "phase done after the key server is back",
        &log,
        &|s| phase(s) == "done",
        &|s| phase(s) == "stopped",
    );
    eprintln!("rekey done {:?} after SIGCONT: {s}", t1.elapsed());
    let h = header(&back);
    assert_eq!(generations(&h), vec![target as u64], "{h:#}");
    assert_eq!(h["active_generation"].as_u64(), Some(target as u64));
    assert_all_on(&back, target, files.len(), "after the rekey");
    assert!(!back.join("kmfs.rekey").exists(), "state file left behind");
    assert!(
        !back.join("kmfs.rekey.journal").exists(),
        "journal left behind"
    );
    verify(&mnt, &files, "after the rekey");

    // The audit trail: the new generation, then failed and finally a
    // successful retirement of the old one.
    let audit = std::fs::read_to_string(etc.join("audit.csv")).unwrap();
    let rows = cli::parse_csv(&audit);
    assert_eq!(
        rows.first().map(|r| r.join(",")).as_deref(),
        Some("date,time,volume,operation,server,ip,port,key,version,user,result,reason")
    );
    let ops: Vec<(&str, &str, &str)> = rows
        .iter()
        .skip(1)
        .filter(|r| r.len() >= 12 && r[3].starts_with("rekey_"))
        .map(|r| (r[3].as_str(), r[10].as_str(), r[11].as_str()))
        .collect();
    assert!(
        ops.iter()
            .any(|(op, res, _)| *op == "rekey_new_generation" && *res == "ok"),
        "no rekey_new_generation ok row: {ops:?}"
    );
    let retire: Vec<_> = ops
        .iter()
        .filter(|(op, _, _)| *op == "rekey_retire")
        .collect();
    let first_fail = retire.iter().position(|(_, res, _)| *res == "fail");
    let first_ok = retire.iter().position(|(_, res, _)| *res == "ok");
    assert!(
        first_fail.is_some() && first_ok.is_some() && first_fail < first_ok,
        "expected a failed and then a successful rekey_retire: {retire:?}"
    );
    assert_eq!(
        retire.last().map(|r| r.1),
        Some("ok"),
        "last rekey_retire: {retire:?}"
    );
    assert!(
        retire.iter().filter(|r| r.1 == "ok").count() == 1,
        "{retire:?}"
    );
    assert!(
        retire[first_fail.unwrap()]
            .2
            .contains(&format!("generation={target}")),
        "{retire:?}"
    );

    // A remount unwraps the one generation left.
    let st = d.unmount();
    let t = d.log_text();
    assert!(st.is_some_and(|s| s.success()), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    let mut d = Daemon::mount_config(&cfg, &back, &mnt, tmp.path());
    verify(&mnt, &files, "after a remount");
    let st = d.unmount();
    assert!(st.is_some_and(|s| s.success()), "{}", d.log_text());
    drop(server);
}
