//! Audit trail of key-manager and HSM operations (SPEC.md section 4).
//!
//! Every provider operation — connect, locate, create, activate, wrap, unwrap,
//! get, revoke, failover, rotation steps — successful or failed, is reported here
//! with [`record`]. Never put key values, key hashes, wrapped keys or data in a
//! record.
//!
//! [`record`] does two things:
//! - logs one `key=value` line with target [`crate::logging::AUDIT_TARGET`]
//!   (info if `result` is `ok`, warn otherwise), e.g.
//!   `op=unwrap server=km1 ip=10.0.0.5 port=5696 key=vol1-kek version=3 user=0(root) result=ok`;
//!   empty fields are left out, `reason` is logged as `error=` when the
//!   result is not `ok`; values are quoted by [`crate::logging::quote_value`]
//!   so no field can forge another line or field;
//! - appends one row to the CSV audit file installed by
//!   [`crate::logging::init`] (nothing if none is installed).
//!
//! # CSV format
//!
//! RFC 4180 (comma separated, `\n` line ends, fields with `,` `"` CR or LF
//! in double quotes, `"` doubled), header row [`CSV_HEADER`] written once
//! when the file is empty, mode 0600, opened append-only, `fsync` after every
//! row:
//!
//! ```text
//! date,time,volume,operation,server,ip,port,key,version,user,result,reason
//! 2025-06-01,12:00:00.214Z,vol1,unwrap,km1,10.0.0.5,5696,vol1-kek,3,0(root),ok,
//! 2025-06-01,12:00:07.002Z,vol1,connect,km2,10.0.0.6,5696,,,0(root),fail,"TLS handshake failed: certificate expired, ""km2"""
//! ```
//!
//! `date` and `time` are UTC. `user` is `uid(name)`: the actor set with
//! [`set_actor`] on this thread (the client the daemon acts for), otherwise
//! the process's effective uid and its user name (`uid` alone if the name is
//! unknown).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use time::OffsetDateTime;

use crate::logging::fields::{AUDIT_TARGET, kv, quote_value};
use crate::logging::file::open_private_append;
use crate::sync::{MutexExt, RwLockExt};

/// One audited operation. Fields that do not apply stay empty / `None`.
#[derive(Clone, Debug, Default)]
pub struct AuditRecord {
    /// Operation: `connect`, `locate`, `create`, `activate`, `wrap`, `unwrap`,
    /// `get`, `revoke`, `random`, `failover`, `rotate_*`, ...
    pub op: String,
    /// Key server's configured name (or HSM token label, or key file path).
    pub server: String,
    /// Key server IP address as connected to (empty if never resolved).
    pub ip: String,
    pub port: Option<u16>,
    /// Key name (or UID when no name is known).
    pub key: String,
    pub version: Option<u32>,
    /// `ok` or `fail`.
    pub result: String,
    /// What the server returned (result reason / message), or our error text.
    pub reason: String,
}

/// How an audited operation ended: the record's `result` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `ok`
    Ok,
    /// `fail`
    Fail,
}

impl Outcome {
    /// `ok` or `fail`, as written in the `result` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
        }
    }

    /// [`Outcome::Ok`] if `r` is `Ok`, [`Outcome::Fail`] otherwise.
    pub fn of<T, E>(r: &Result<T, E>) -> Outcome {
        if r.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Fail
        }
    }
}

impl AuditRecord {
    /// The record of operation `op` on `server` (key server name, token
    /// label, provider kind) with version `version` of key `key`, ended with
    /// `outcome`; `reason` is what the server answered or our error text (may
    /// be empty). `ip` and `port` stay empty; a caller that knows them sets
    /// them with `AuditRecord { ip, port, ..AuditRecord::new(..) }`.
    pub fn new(
        op: &str,
        server: &str,
        key: &str,
        version: Option<u32>,
        outcome: Outcome,
        reason: &str,
    ) -> AuditRecord {
        AuditRecord {
            op: op.to_string(),
            server: server.to_string(),
            ip: String::new(),
            port: None,
            key: key.to_string(),
            version,
            result: outcome.as_str().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The CSV header row (without line end).
pub const CSV_HEADER: &str =
    "date,time,volume,operation,server,ip,port,key,version,user,result,reason";

thread_local! {
    static ACTOR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// From now on, records made on this thread name `uid(name)` as the user
/// (the client a daemon request comes from). Undo with [`clear_actor`], or use
/// [`acting_as`] for a scoped guard.
pub fn set_actor(uid: u32, name: &str) {
    let user = if name.is_empty() {
        uid.to_string()
    } else {
        format!("{uid}({name})")
    };
    ACTOR.with(|a| *a.borrow_mut() = Some(user));
}

/// Records on this thread name the process's effective user again.
pub fn clear_actor() {
    ACTOR.with(|a| *a.borrow_mut() = None);
}

/// Restores the previous actor of this thread when dropped.
#[must_use = "the actor is reset when the guard is dropped"]
pub struct ActorGuard {
    previous: Option<String>,
}

impl Drop for ActorGuard {
    fn drop(&mut self) {
        let prev = self.previous.take();
        ACTOR.with(|a| *a.borrow_mut() = prev);
    }
}

/// [`set_actor`] until the returned guard is dropped.
pub fn acting_as(uid: u32, name: &str) -> ActorGuard {
    let previous = ACTOR.with(|a| a.borrow().clone());
    set_actor(uid, name);
    ActorGuard { previous }
}

/// The effective user of this process, `uid(name)`; looked up once.
pub fn process_user() -> &'static str {
    static USER: OnceLock<String> = OnceLock::new();
    USER.get_or_init(|| {
        let uid = nix::unistd::geteuid();
        match nix::unistd::User::from_uid(uid) {
            Ok(Some(u)) => format!("{}({})", uid.as_raw(), u.name),
            _ => uid.as_raw().to_string(),
        }
    })
}

/// The `user` value for a record made now on this thread.
pub fn current_user() -> String {
    ACTOR
        .with(|a| a.borrow().clone())
        .unwrap_or_else(|| process_user().to_string())
}

/// RFC 4180 quoting of one field. Control characters other than CR, LF and
/// tab are written as `\u{..}`.
pub fn csv_field(v: &str) -> Cow<'_, str> {
    let odd_control = v
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'));
    let v: Cow<'_, str> = if odd_control {
        Cow::Owned(
            v.chars()
                .map(|c| {
                    if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
                        format!("\\u{{{:x}}}", u32::from(c))
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(v)
    };
    if v.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", v.replace('"', "\"\"")))
    } else {
        v
    }
}

/// The CSV row (with `\n`) for `rec`, made at `now` by `user`.
pub fn csv_row(rec: &AuditRecord, volume: &str, user: &str, now: OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    let date = format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day());
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    );
    let port = rec.port.map(|p| p.to_string()).unwrap_or_default();
    let version = rec.version.map(|v| v.to_string()).unwrap_or_default();
    let fields: [&str; 12] = [
        &date,
        &time,
        volume,
        &rec.op,
        &rec.server,
        &rec.ip,
        &port,
        &rec.key,
        &version,
        user,
        &rec.result,
        &rec.reason,
    ];
    let mut row = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            row.push(',');
        }
        row.push_str(&csv_field(f));
    }
    row.push('\n');
    row
}

/// The log line (without level/volume, which the logger adds) for `rec`.
pub fn log_line(rec: &AuditRecord, user: &str) -> String {
    let port = rec.port.map(|p| p.to_string()).unwrap_or_default();
    let version = rec.version.map(|v| v.to_string()).unwrap_or_default();
    let op = if rec.op.is_empty() {
        "unknown"
    } else {
        &rec.op
    };
    let result = if rec.result.is_empty() {
        "unknown"
    } else {
        &rec.result
    };
    let reason_key = if result == "ok" { "reason" } else { "error" };
    let mut s = String::new();
    for (k, v) in [
        ("op", op),
        ("server", rec.server.as_str()),
        ("ip", rec.ip.as_str()),
        ("port", port.as_str()),
        ("key", rec.key.as_str()),
        ("version", version.as_str()),
        ("user", user),
        ("result", result),
        (reason_key, rec.reason.as_str()),
    ] {
        if v.is_empty() {
            continue;
        }
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(&quote_value(v));
    }
    s
}

/// An append-only CSV audit file. Share it between threads freely.
pub struct AuditCsv {
    file: Mutex<File>,
    path: PathBuf,
    volume: String,
    rows: AtomicU64,
}

impl AuditCsv {
    /// Opens `path` for appending (creating it with mode 0600 and its
    /// directory with 0750), tightens its mode to 0600 if it was wider, and
    /// writes the header if the file is empty. Existing rows are never
    /// touched.
    pub fn open(path: &Path, volume: &str) -> io::Result<AuditCsv> {
        let file = Self::open_file(path)?;
        Ok(AuditCsv {
            file: Mutex::new(file),
            path: path.to_path_buf(),
            volume: volume.to_string(),
            rows: AtomicU64::new(0),
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        let file = open_private_append(path, false)?;
        // Two daemons may share one audit file: lock while deciding on the
        // header so it is written once.
        let lock = nix::fcntl::Flock::lock(file.try_clone()?, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from(e))?;
        if file.metadata()?.len() == 0 {
            (&file).write_all(format!("{CSV_HEADER}\n").as_bytes())?;
            file.sync_data()?;
        }
        drop(lock);
        Ok(file)
    }

    /// Whether the path no longer names the open file (logrotate renamed or
    /// removed it): then the next row goes to a new file at the path.
    fn rotated(&self, f: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(&self.path), f.metadata()) {
            (Ok(p), Ok(o)) => p.dev() != o.dev() || p.ino() != o.ino(),
            (Err(_), _) => true,
            _ => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows appended and synced by this handle.
    pub fn rows_synced(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Appends one row for `rec` made now by `user` and syncs it to disk.
    pub fn append(&self, rec: &AuditRecord, user: &str) -> io::Result<()> {
        self.append_at(rec, user, OffsetDateTime::now_utc())
    }

    /// [`append`](Self::append) with a given time (tests).
    pub fn append_at(&self, rec: &AuditRecord, user: &str, now: OffsetDateTime) -> io::Result<()> {
        let row = csv_row(rec, &self.volume, user, now);
        let mut f = self.file.locked();
        if self.rotated(&f) {
            *f = Self::open_file(&self.path)?;
        }
        f.write_all(row.as_bytes())?;
        f.sync_data()?;
        self.rows.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

static SINK: RwLock<Option<Arc<AuditCsv>>> = RwLock::new(None);

/// Installs (or with `None` removes) the process-wide CSV sink used by
/// [`record`]. [`crate::logging::init`] calls this.
pub fn install_sink(sink: Option<AuditCsv>) {
    *SINK.write_locked() = sink.map(Arc::new);
}

/// Records one operation in the audit trail and the log.
/// Key-server counters of this process, by server name (for
/// `kmfs status --openmetrics`), counted from the audit records of
/// key-manager operations.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerCounters {
    /// Connections attempted (KMIP; an HSM session has none).
    pub connects: u64,
    /// Connections that failed (refused, timed out, TLS).
    pub connect_failures: u64,
    /// Key-manager operations (connect excluded): create, wrap, unwrap, ...
    pub operations: u64,
    /// Operations that failed.
    pub operation_failures: u64,
}

static SERVER_COUNTERS: std::sync::Mutex<std::collections::BTreeMap<String, ServerCounters>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn count_server(rec: &AuditRecord) {
    // kmfs's own steps (rotation, rekey) are not key-server traffic.
    if rec.server.is_empty() || rec.op.starts_with("rotate_") || rec.op.starts_with("rekey") {
        return;
    }
    let failed = rec.result != "ok";
    let mut m = SERVER_COUNTERS.locked();
    let c = m.entry(rec.server.clone()).or_default();
    if rec.op == "connect" {
        c.connects += 1;
        c.connect_failures += u64::from(failed);
    } else {
        c.operations += 1;
        c.operation_failures += u64::from(failed);
    }
}

/// The key-server counters so far, by server name.
pub fn server_counters() -> std::collections::BTreeMap<String, ServerCounters> {
    SERVER_COUNTERS.locked().clone()
}

pub fn record(rec: &AuditRecord) {
    count_server(rec);
    let user = current_user();
    let line = log_line(rec, &user);
    if rec.result == "ok" {
        log::info!(target: AUDIT_TARGET, "{line}");
    } else {
        log::warn!(target: AUDIT_TARGET, "{line}");
    }
    let sink = SINK.read_locked().clone();
    if let Some(sink) = sink
        && let Err(e) = sink.append(rec, &user)
    {
        static REPORTED: AtomicBool = AtomicBool::new(false);
        log::error!(
            "{}",
            kv(&[
                ("op", "audit_write"),
                ("path", &sink.path().display().to_string()),
                ("result", "fail"),
                ("error", &e.to_string()),
            ])
        );
        if !REPORTED.swap(true, Ordering::Relaxed) {
            let _ = writeln!(
                io::stderr(),
                "kmfs: cannot append to audit file {}: {e}",
                sink.path().display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> AuditRecord {
        AuditRecord {
            op: "unwrap".into(),
            server: "km1".into(),
            ip: "10.0.0.5".into(),
            port: Some(5696),
            key: "vol1-kek".into(),
            version: Some(3),
            result: "ok".into(),
            reason: String::new(),
        }
    }

    #[test]
    fn log_line_normalised() {
        assert_eq!(
            log_line(&rec(), "0(root)"),
            "op=unwrap server=km1 ip=10.0.0.5 port=5696 key=vol1-kek version=3 user=0(root) result=ok"
        );
        let r = AuditRecord {
            op: "connect".into(),
            server: "km 2".into(),
            result: "fail".into(),
            reason: "refused\nserial=5 op=forged".into(),
            ..Default::default()
        };
        let l = log_line(&r, "1000(alice)");
        assert_eq!(
            l,
            "op=connect server=\"km 2\" user=1000(alice) result=fail error=\"refused\\nserial=5 op=forged\""
        );
        assert!(!l.contains('\n'));
    }

    #[test]
    fn constructor_fills_the_same_fields() {
        let r = AuditRecord {
            ip: "10.0.0.5".into(),
            port: Some(5696),
            ..AuditRecord::new("unwrap", "km1", "vol1-kek", Some(3), Outcome::Ok, "")
        };
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(
            csv_row(&r, "v", "0(root)", t),
            csv_row(&rec(), "v", "0(root)", t)
        );
        let f = AuditRecord::new("connect", "", "", None, Outcome::of(&Err::<(), _>(())), "x");
        assert_eq!((f.result.as_str(), f.reason.as_str()), ("fail", "x"));
        assert_eq!(Outcome::of(&Ok::<_, ()>(1)), Outcome::Ok);
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("l1\nl2"), "\"l1\nl2\"");
        assert_eq!(csv_field("esc\x1b"), "esc\\u{1b}");
    }

    #[test]
    fn rotation_by_rename_continues_in_a_new_file_with_header() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.csv");
        let a = AuditCsv::open(&p, "v").unwrap();
        let rec = AuditRecord {
            op: "wrap".into(),
            result: "ok".into(),
            ..Default::default()
        };
        a.append(&rec, "0(root)").unwrap();
        fs::rename(&p, d.path().join("audit.csv.1")).unwrap();
        a.append(&rec, "0(root)").unwrap();
        let old = fs::read_to_string(d.path().join("audit.csv.1")).unwrap();
        let new = fs::read_to_string(&p).unwrap();
        assert_eq!(old.lines().count(), 2);
        assert_eq!(new.lines().count(), 2);
        assert!(new.starts_with(CSV_HEADER));
    }

    #[test]
    fn csv_row_has_utc_date_time() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        let row = csv_row(&rec(), "vol1", "0(root)", t);
        assert_eq!(
            row,
            "2023-11-14,22:13:20.000Z,vol1,unwrap,km1,10.0.0.5,5696,vol1-kek,3,0(root),ok,\n"
        );
        assert_eq!(row.split(',').count(), CSV_HEADER.split(',').count());
    }

    #[test]
    fn actor_overrides_process_user_on_this_thread() {
        assert_eq!(current_user(), process_user());
        {
            let _g = acting_as(1234, "bob");
            assert_eq!(current_user(), "1234(bob)");
            std::thread::spawn(|| assert_eq!(current_user(), process_user()))
                .join()
                .unwrap();
        }
        assert_eq!(current_user(), process_user());
        set_actor(7, "");
        assert_eq!(current_user(), "7");
        clear_actor();
        assert_eq!(current_user(), process_user());
        let uid = nix::unistd::geteuid().as_raw().to_string();
        assert!(process_user().starts_with(&uid));
    }
}
