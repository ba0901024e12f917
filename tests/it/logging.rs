//! Logging and audit trail (SPEC.md section 4): the real chained log file and
//! `verify_file`, restarts, rotation, concurrency, the CSV audit file, and the
//! process-wide `logging::init`.

use crate::support::cli;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmfs::audit::{self, AuditCsv, AuditRecord, CSV_HEADER};
use kmfs::logging::chain::{ChainWriter, parse_line};
use kmfs::logging::{self, LogLevel, LoggingConfig, LoggingError, verify_file};

fn write_log(path: &Path, n: usize) {
    let w = ChainWriter::open(path).unwrap();
    for i in 0..n {
        let a = w.append(&format!(
            "level=INFO volume=v op=test i={i} msg=\"message {i}\""
        ));
        assert!(a.error.is_none());
    }
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn put_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    fs::write(path, s).unwrap();
}

/// Broken line number and message from verify.
fn broken_at(path: &Path) -> (u64, String) {
    let e = verify_file(path).unwrap_err();
    (
        e.line().expect("a broken line, not an I/O error"),
        e.to_string(),
    )
}

fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kmfs.log");
    write_log(&path, n);
    (dir, path)
}

#[test]
fn intact_log_verifies_with_count() {
    let (_d, path) = log_with(20);
    let r = verify_file(&path).unwrap();
    // One chain_start line, then the 20 messages.
    assert_eq!(r.lines, 21);
    assert_eq!(r.segments, 1);
    assert_eq!(r.to_string(), "OK: 21 lines, chain intact");
    assert_eq!(r.last.as_ref().unwrap().0, 21);
    let first = lines(&path)[0].clone();
    assert!(
        first.contains(" event=chain_start prev_serial=0 "),
        "{first}"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn log_file_mode_tightened_to_0600() {
    let (_d, path) = log_with(1);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    write_log(&path, 1);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(verify_file(&path).unwrap().lines, 3);
}

#[test]
fn deleted_line_is_named() {
    let (_d, path) = log_with(20);
    let mut l = lines(&path);
    l.remove(9); // line 10
    put_lines(&path, &l);
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 10, "{msg}");
    assert_eq!(
        msg,
        "line 10: serial 11, expected 10: line with serial 10 missing or moved"
    );
}

#[test]
fn swapped_lines_are_named() {
    let (_d, path) = log_with(20);
    let mut l = lines(&path);
    l.swap(4, 5); // lines 5 and 6
    put_lines(&path, &l);
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 5, "{msg}");
    assert!(msg.contains("serial 6, expected 5"), "{msg}");
}

#[test]
fn duplicated_line_is_named() {
    let (_d, path) = log_with(10);
    let mut l = lines(&path);
    let dup = l[3].clone();
    l.insert(4, dup); // line 5 repeats line 4
    put_lines(&path, &l);
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 5, "{msg}");
    assert!(msg.contains("reordered or duplicated"), "{msg}");
}

#[test]
fn edited_character_is_named() {
    let (_d, path) = log_with(20);
    let mut l = lines(&path);
    l[11] = l[11].replace("message 10", "message 1O");
    put_lines(&path, &l);
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 12, "{msg}");
    assert!(msg.contains("hash mismatch"), "{msg}");
}

#[test]
fn edited_hash_is_named() {
    let (_d, path) = log_with(20);
    let mut l = lines(&path);
    let last = l[7].pop().unwrap();
    l[7].push(if last == '0' { '1' } else { '0' });
    put_lines(&path, &l);
    assert_eq!(broken_at(&path).0, 8);
}

#[test]
fn edited_serial_is_named() {
    let (_d, path) = log_with(20);
    let mut l = lines(&path);
    l[14] = l[14].replacen("serial=15 ", "serial=16 ", 1);
    put_lines(&path, &l);
    assert_eq!(broken_at(&path).0, 15);
}

#[test]
fn lines_removed_from_the_middle_are_named() {
    let (_d, path) = log_with(30);
    let mut l = lines(&path);
    l.drain(10..20); // lines 11..=20 gone
    put_lines(&path, &l);
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 11, "{msg}");
    assert!(msg.contains("serials 11..20 missing"), "{msg}");
}

#[test]
fn file_cut_in_the_middle_is_named() {
    let (_d, path) = log_with(30);
    let data = fs::read(&path).unwrap();
    let cut = data.len() / 2;
    fs::write(&path, &data[..cut]).unwrap();
    let expected_line = data[..cut].iter().filter(|&&c| c == b'\n').count() as u64 + 1;
    let (line, msg) = broken_at(&path);
    assert_eq!(line, expected_line, "{msg}");
    assert!(msg.contains("no newline") || msg.contains("hash"), "{msg}");
}

#[test]
fn deleted_head_is_named() {
    let (_d, path) = log_with(10);
    let l = lines(&path);
    put_lines(&path, &l[3..]);
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 1);
    assert!(msg.contains("lines before it are missing"), "{msg}");
}

#[test]
fn binary_garbage_gives_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.log");
    let junk: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    fs::write(&path, junk).unwrap();
    assert!(verify_file(&path).is_err());
    let missing = dir.path().join("missing.log");
    let e = verify_file(&missing).unwrap_err();
    assert_eq!(e.line(), None);
    assert!(e.to_string().starts_with("cannot read "), "{e}");
}

#[test]
fn restart_resumes_the_chain() {
    let (_d, path) = log_with(10);
    write_log(&path, 10); // a new writer, as after a daemon restart
    write_log(&path, 5);
    let r = verify_file(&path).unwrap();
    assert_eq!(r.lines, 26);
    assert_eq!(r.segments, 1, "resumed, no new segment");
    let l = lines(&path);
    for (i, line) in l.iter().enumerate() {
        assert_eq!(parse_line(line).unwrap().serial, i as u64 + 1);
    }
}

#[test]
fn restart_after_cut_last_line_starts_a_logged_segment() {
    let (_d, path) = log_with(10);
    let data = fs::read(&path).unwrap();
    fs::write(&path, &data[..data.len() - 20]).unwrap(); // crash mid-line
    write_log(&path, 5);
    let l = lines(&path);
    // The cut line is still there (and named), then a new segment.
    assert_eq!(l.len(), 11 + 6);
    assert!(l[11].contains("event=chain_start") && l[11].contains("reason=unreadable_tail"));
    let (line, msg) = broken_at(&path);
    assert_eq!(line, 11, "{msg}");
    // The new segment on its own verifies.
    put_lines(&path, &l[11..]);
    assert_eq!(verify_file(&path).unwrap().lines, 6);
}

#[test]
fn rotation_by_rename_starts_a_linked_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kmfs.log");
    let old = dir.path().join("kmfs.log.1");
    let w = ChainWriter::open(&path).unwrap();
    for i in 0..5 {
        w.append(&format!("op=before i={i}"));
    }
    fs::rename(&path, &old).unwrap(); // logrotate's `create` mode
    let a = w.append("op=after");
    assert_eq!(a.lines.len(), 2, "chain_start, then the message");
    assert!(a.lines[0].contains("reason=reopen"));
    for i in 0..3 {
        w.append(&format!("op=after i={i}"));
    }
    let r_old = verify_file(&old).unwrap();
    let r_new = verify_file(&path).unwrap();
    assert_eq!(r_old.lines, 6);
    assert_eq!(r_new.lines, 5);
    // The new file names the old file's last line as its predecessor.
    assert_eq!(r_new.first_prev, r_old.last);
    assert_eq!(
        parse_line(&lines(&path)[0]).unwrap().serial,
        7,
        "serials continue across files"
    );
}

#[test]
fn copytruncate_starts_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kmfs.log");
    let w = ChainWriter::open(&path).unwrap();
    for i in 0..5 {
        w.append(&format!("op=before i={i}"));
    }
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    w.append("op=after");
    let l = lines(&path);
    assert!(l[0].contains("reason=truncated"), "{}", l[0]);
    assert_eq!(verify_file(&path).unwrap().lines, 2);
}

#[test]
fn eight_threads_keep_serials_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kmfs.log");
    let w = Arc::new(ChainWriter::open(&path).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                for i in 0..250 {
                    let a = w.append(&format!("level=DEBUG op=t thread={t} i={i}"));
                    assert!(a.error.is_none());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let r = verify_file(&path).unwrap();
    assert_eq!(r.lines, 1 + 8 * 250);
    assert_eq!(w.last_serial(), 1 + 8 * 250);
}

// ---- CSV audit trail ----

fn rec(op: &str, result: &str, reason: &str) -> AuditRecord {
    AuditRecord {
        op: op.into(),
        server: "km1".into(),
        ip: "10.0.0.5".into(),
        port: Some(5696),
        key: "vol1-kek".into(),
        version: Some(3),
        result: result.into(),
        reason: reason.into(),
    }
}

#[test]
fn csv_header_once_and_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/audit.csv");
    let a = AuditCsv::open(&path, "vol1").unwrap();
    a.append(&rec("connect", "ok", ""), "0(root)").unwrap();
    a.append(&rec("unwrap", "ok", ""), "0(root)").unwrap();
    drop(a);
    let before = fs::read(&path).unwrap();
    let a = AuditCsv::open(&path, "vol1").unwrap();
    a.append(&rec("revoke", "fail", "denied"), "0(root)")
        .unwrap();
    let after = fs::read(&path).unwrap();
    assert!(after.starts_with(&before), "existing rows untouched");
    let text = String::from_utf8(after).unwrap();
    assert_eq!(text.matches(CSV_HEADER).count(), 1);
    let rows = cli::parse_csv(&text);
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].join(","), CSV_HEADER);
    assert_eq!(rows[3][3], "revoke");
    assert_eq!(rows[3][10], "fail");
    assert_eq!(rows[3][11], "denied");
}

#[test]
fn csv_quotes_commas_quotes_newlines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.csv");
    let a = AuditCsv::open(&path, "vol, \"one\"").unwrap();
    let reason = "Item Not Found, \"vol1-kek\"\nsecond line\r\nthird";
    a.append(&rec("locate", "fail", reason), "1000(alice)")
        .unwrap();
    let rows = cli::parse_csv(&fs::read_to_string(&path).unwrap());
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].len(), 12);
    assert_eq!(rows[1][2], "vol, \"one\"");
    assert_eq!(rows[1][11], reason);
}

#[test]
fn csv_columns_utc_and_user() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.csv");
    let a = AuditCsv::open(&path, "vol1").unwrap();
    let t = time::OffsetDateTime::from_unix_timestamp(1_700_000_000)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(-5, 0, 0).unwrap());
    a.append_at(&rec("unwrap", "ok", ""), "1000(alice)", t)
        .unwrap();
    let rows = cli::parse_csv(&fs::read_to_string(&path).unwrap());
    let header: Vec<&str> = CSV_HEADER.split(',').collect();
    assert_eq!(
        header,
        [
            "date",
            "time",
            "volume",
            "operation",
            "server",
            "ip",
            "port",
            "key",
            "version",
            "user",
            "result",
            "reason"
        ]
    );
    assert_eq!(
        rows[1],
        [
            "2023-11-14",
            "22:13:20.000Z",
            "vol1",
            "unwrap",
            "km1",
            "10.0.0.5",
            "5696",
            "vol1-kek",
            "3",
            "1000(alice)",
            "ok",
            ""
        ]
    );
}

#[test]
fn csv_mode_0600_even_if_it_was_wider() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.csv");
    AuditCsv::open(&path, "v").unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    AuditCsv::open(&path, "v").unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn csv_syncs_every_row_and_is_thread_safe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.csv");
    let a = Arc::new(AuditCsv::open(&path, "v").unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let a = Arc::clone(&a);
            std::thread::spawn(move || {
                for i in 0..25 {
                    a.append(&rec("get", "ok", &format!("t{t} i{i}")), "0")
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(a.rows_synced(), 100);
    let rows = cli::parse_csv(&fs::read_to_string(&path).unwrap());
    assert_eq!(rows.len(), 101);
    assert!(rows.iter().all(|r| r.len() == 12));
}

// ---- The process-wide logger ----

/// `logging::init` installs the process's `log` logger and audit sink, which
/// other tests of this binary install too (kmip's capture, pkcs11's sink):
/// it runs in a process of its own.
#[test]
fn init_installs_file_logger_and_audit_sink() {
    if !crate::support::in_own_process("logging::init_installs_file_logger_and_audit_sink") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log/kmfs.log");
    let audit_path = dir.path().join("audit/audit.csv");
    let cfg = LoggingConfig {
        level: LogLevel::Debug,
        syslog: false,
        file: Some(log_path.clone()),
        audit_file: Some(audit_path.clone()),
        ..Default::default()
    };
    logging::init(&cfg, "vol1").unwrap();
    assert!(matches!(
        logging::init(&cfg, "vol1"),
        Err(LoggingError::AlreadyInitialized)
    ));

    // Targets outside kmfs (this test crate is `it`) are capped at info
    // and tagged src=; the daemon's own targets start with `kmfs`.
    log::debug!(target: "other_crate", "dropped at any level");
    log::info!(
        target: "kmfs::test",
        "{}",
        logging::kv(&[("op", "mount"), ("path", "/mnt/my vol"), ("result", "ok")])
    );
    log::debug!(target: "kmfs::test", "plain text\nserial=999 forged line");
    audit::record(&rec("unwrap", "ok", ""));
    {
        let _g = audit::acting_as(4242, "carol");
        audit::record(&rec(
            "rotate_kek",
            "fail",
            "server said: \"Permission Denied\"",
        ));
    }

    let text = fs::read_to_string(&log_path).unwrap();
    let r = verify_file(&log_path).unwrap();
    assert_eq!(r.lines as usize, text.lines().count());
    assert!(text.contains("op=log_open log_level=debug"), "{text}");
    assert!(
        text.contains("level=WARN volume=vol1 op=log_warning"),
        "{text}"
    );
    assert!(
        text.contains("op=mount path=\"/mnt/my vol\" result=ok"),
        "{text}"
    );
    assert!(
        text.contains("msg=\"plain text\\nserial=999 forged line\""),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("serial=999")));
    assert!(!text.contains("dropped at any level"));
    assert!(text.contains(
        "level=INFO volume=vol1 op=unwrap server=km1 ip=10.0.0.5 port=5696 key=vol1-kek version=3 user="
    ));
    assert!(text.contains(
        "level=WARN volume=vol1 op=rotate_kek server=km1 ip=10.0.0.5 port=5696 key=vol1-kek version=3 user=4242(carol) result=fail error=\"server said: \\\"Permission Denied\\\"\""
    ), "{text}");

    let rows = cli::parse_csv(&fs::read_to_string(&audit_path).unwrap());
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1][3], "unwrap");
    assert_eq!(rows[1][9], audit::process_user());
    assert_eq!(rows[2][9], "4242(carol)");
    assert_eq!(rows[2][11], "server said: \"Permission Denied\"");
    assert_eq!(
        fs::metadata(&audit_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// Two writers on one file (a daemon's last lines after umount while the next
/// mount of the same volume starts): each continues from the other's last
/// line, so the file still verifies.
#[test]
fn two_writers_on_one_file_keep_one_chain() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("shared.log");
    let a = kmfs::logging::ChainWriter::open(&p).unwrap();
    let b = kmfs::logging::ChainWriter::open(&p).unwrap();
    for i in 0..50 {
        let w = if i % 3 == 0 { &b } else { &a };
        let r = w.append(&format!("op=test i={i} result=ok"));
        assert!(r.error.is_none());
    }
    let report = kmfs::logging::verify_file(&p).unwrap();
    assert!(report.lines >= 50, "{report}");
}
