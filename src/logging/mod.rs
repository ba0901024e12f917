//! Logging (SPEC.md section 4): levels, syslog, an optional hash-chained log
//! file, and the set-up of the CSV audit trail ([`crate::audit`]).
//!
//! - [`init`] installs the process-wide logger (the `log` crate's) and the
//!   audit sink. Call it once per process, after daemonising.
//! - Every message is numbered and hash-chained by a [`chain::ChainWriter`]
//!   (format in [`chain`]), written to the file if one is configured, and the
//!   same line is sent to the local syslog socket. Messages from
//!   [`crate::audit::record`] (target `kmfs::audit`) go to syslog with the
//!   audit facility (default `authpriv`), the others with `facility`
//!   (default `daemon`).
//! - Without `/dev/log` (containers) syslog is skipped: one note on stderr,
//!   never an error. Without syslog and without a file, warnings go to
//!   stderr as plain lines (`kmfs: warning: ...`), each distinct warning once;
//!   the command's own error line comes last. With `stderr = true` (a
//!   foreground mount) every record is copied to stderr as a plain line. The
//!   hash-chained form goes only to the file and syslog.
//! - Levels: `none` (nothing; the CSV audit trail is still written), `basic`
//!   (error, warn, info), `verbose` (+ debug), `debug` (+ trace). Other
//!   crates (fuser, rustls, ...) are capped at error at `basic` (their
//!   internal messages are not the administrator's business) and at info
//!   otherwise.
//! - Repeated warnings and errors are folded: the first of a kind (same
//!   level, source and text with digits ignored) is logged, identical ones in
//!   the next [`REPEAT_WINDOW`] are counted, and the count is logged as one
//!   `op=log_repeat count=N` line when the window ends (or at unmount). The
//!   audit records are never folded.
//! - Anchors: with a log file, [`anchor`] logs `op=log_anchor
//!   anchor_serial=S anchor_hash=H` — the file's last serial and hash — to
//!   syslog (and the file); the daemon does so every `anchor_interval_s`
//!   seconds (default 300) when the log has grown, and at unmount. A copy of
//!   the file that lost its tail no longer reaches the latest anchor
//!   (`kmfs log verify --expect S:H`).
//!
//! # Fields
//!
//! Messages are `key=value` pairs after `level=` and `volume=`. The stable
//! keys are [`KEYS`]; build lines with [`kv`] so values are quoted the same
//! way everywhere: a value that is empty or contains a space, `"`, `=`, `\`
//! or a control character is written in double quotes with `\\`, `\"`, `\n`,
//! `\r`, `\t` and `\u{..}` escapes. A message that does not start with
//! `word=` is logged as `msg="..."`.
//!
//! ```text
//! serial=2 time=2025-06-01T12:00:00.000214Z level=INFO volume=vol1 op=unwrap server=km1 ip=10.0.0.5 port=5696 key=vol1-kek version=3 user=0(root) result=ok hash=0b7d…
//! serial=3 time=2025-06-01T12:00:01.100000Z level=WARN volume=vol1 op=read path="/docs/a b.txt" result=fail error="authentication tag mismatch" hash=9e21…
//! serial=4 time=2025-06-01T12:00:02.000000Z level=INFO volume=vol1 msg="mount ready" hash=c0aa…
//! ```

pub mod chain;
pub mod verify;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use serde::{Deserialize, Serialize};
use syslog::{Facility, Formatter3164, Formatter5424, LoggerBackend};

pub use chain::ChainWriter;
pub use verify::{VerifyError, VerifyReport, verify_file};

/// The stable field names used in log lines.
pub const KEYS: &[&str] = &[
    "op", "volume", "server", "ip", "port", "key", "version", "user", "result", "error", "path",
    "reason", "msg",
];

/// Target used by [`crate::audit::record`]; routed to the audit facility.
pub const AUDIT_TARGET: &str = "kmfs::audit";

/// Default audit CSV for root.
pub const DEFAULT_AUDIT_FILE: &str = "/var/log/kmfs/audit.csv";

/// Default seconds between log anchors.
pub const DEFAULT_ANCHOR_INTERVAL_S: u64 = 300;

/// How long identical warnings are folded into one count.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// At most this many kinds of warning are tracked for folding at once.
const REPEAT_KINDS: usize = 512;

/// At most this many distinct warnings are remembered for "each once" on stderr.
const STDERR_SEEN: usize = 1024;

/// The start-up warning at `verbose` and `debug`.
pub const VERBOSE_WARNING: &str = "log level is verbose or debug: logs grow fast and may expose sensitive information (file names, key names, server responses); use basic in production";

/// Log level from the config (`level = "basic"`) or a mount option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    None,
    #[default]
    Basic,
    Verbose,
    Debug,
}

impl LogLevel {
    /// The `log` crate filter for this level.
    pub fn filter(self) -> LevelFilter {
        match self {
            LogLevel::None => LevelFilter::Off,
            LogLevel::Basic => LevelFilter::Info,
            LogLevel::Verbose => LevelFilter::Debug,
            LogLevel::Debug => LevelFilter::Trace,
        }
    }

    /// Whether the start-up warning about log size and sensitive data applies.
    pub fn is_noisy(self) -> bool {
        matches!(self, LogLevel::Verbose | LogLevel::Debug)
    }
}

impl FromStr for LogLevel {
    type Err = LoggingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(LogLevel::None),
            "basic" => Ok(LogLevel::Basic),
            "verbose" => Ok(LogLevel::Verbose),
            "debug" => Ok(LogLevel::Debug),
            _ => Err(LoggingError::BadLevel(s.to_string())),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::None => "none",
            LogLevel::Basic => "basic",
            LogLevel::Verbose => "verbose",
            LogLevel::Debug => "debug",
        })
    }
}

/// Syslog message format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    #[default]
    Rfc3164,
    Rfc5424,
}

/// The `[log]` section of a volume config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `none`, `basic` (default), `verbose` or `debug`.
    pub level: LogLevel,
    /// Send lines to the local syslog socket (default true).
    pub syslog: bool,
    /// `rfc3164` (default) or `rfc5424`.
    pub syslog_format: SyslogFormat,
    /// Syslog socket (default: the system's, `/dev/log` and the usual others).
    pub syslog_socket: Option<PathBuf>,
    /// Syslog facility for ordinary messages (default `daemon`).
    pub facility: String,
    /// Syslog facility for audit messages (default `authpriv`).
    pub audit_facility: String,
    /// Hash-chained log file (default none). One file per volume.
    pub file: Option<PathBuf>,
    /// Audit CSV. Default [`DEFAULT_AUDIT_FILE`] for root, otherwise
    /// `$XDG_STATE_HOME/kmfs/audit.csv` (or `~/.local/state/kmfs/audit.csv`).
    pub audit_file: Option<PathBuf>,
    /// Also copy every line to stderr (foreground runs).
    pub stderr: bool,
    /// Seconds between log anchors sent to syslog (0: only at unmount).
    pub anchor_interval_s: u64,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: LogLevel::Basic,
            syslog: true,
            syslog_format: SyslogFormat::Rfc3164,
            syslog_socket: None,
            facility: "daemon".into(),
            audit_facility: "authpriv".into(),
            file: None,
            audit_file: None,
            stderr: false,
            anchor_interval_s: DEFAULT_ANCHOR_INTERVAL_S,
        }
    }
}

impl LoggingConfig {
    /// The audit CSV path, with the default resolved.
    pub fn audit_file_path(&self) -> PathBuf {
        if let Some(p) = &self.audit_file {
            return p.clone();
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from(DEFAULT_AUDIT_FILE);
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| Path::new(&h).join(".local/state"))
            })
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        state.join("kmfs/audit.csv")
    }
}

/// Errors from setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("logging is already initialised in this process")]
    AlreadyInitialized,
    #[error("unknown log level {0:?} (expected none, basic, verbose or debug)")]
    BadLevel(String),
    #[error("unknown syslog facility {0:?}")]
    BadFacility(String),
    #[error("cannot open log file {}: {source}", path.display())]
    LogFile { path: PathBuf, source: io::Error },
    #[error("cannot open audit file {}: {source}", path.display())]
    AuditFile { path: PathBuf, source: io::Error },
}

/// Quotes a value for a `key=value` field (see the module doc).
pub fn quote_value(v: &str) -> Cow<'_, str> {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '=' | '\\'));
    if plain {
        return Cow::Borrowed(v);
    }
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => s.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => s.push(c),
        }
    }
    s.push('"');
    Cow::Owned(s)
}

/// Formats `key=value` pairs separated by spaces, values quoted with
/// [`quote_value`]. Keys are reduced to `[a-z0-9_]`.
pub fn kv(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        if !s.is_empty() {
            s.push(' ');
        }
        s.extend(k.chars().map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        }));
        s.push('=');
        s.push_str(&quote_value(v));
    }
    s
}

/// Whether a message already is `key=value ...` (starts with `word=`).
fn looks_like_kv(msg: &str) -> bool {
    match msg.split_once('=') {
        Some((k, _)) => {
            !k.is_empty()
                && k.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        }
        None => false,
    }
}

/// The body of a line (after `time=`) for one `log` record.
fn format_body(level: Level, volume: &str, target: &str, msg: &str) -> String {
    let mut body = format!("level={} volume={}", level, quote_value(volume));
    if !target.starts_with("kmfs") {
        body.push_str(" src=");
        body.push_str(&quote_value(target));
    }
    body.push(' ');
    if looks_like_kv(msg) {
        body.push_str(msg);
    } else {
        body.push_str("msg=");
        body.push_str(&quote_value(msg));
    }
    body
}

fn parse_facility(name: &str) -> Result<Facility, LoggingError> {
    Facility::from_str(name).map_err(|()| LoggingError::BadFacility(name.to_string()))
}

enum SyslogConn {
    Rfc3164(syslog::Logger<LoggerBackend, Formatter3164>),
    Rfc5424(syslog::Logger<LoggerBackend, Formatter5424>),
}

/// One connection to the local syslog socket, reconnected once on error.
struct SyslogSink {
    facility: Facility,
    format: SyslogFormat,
    socket: Option<PathBuf>,
    conn: Mutex<Option<SyslogConn>>,
}

impl SyslogSink {
    fn connect(
        facility: Facility,
        format: SyslogFormat,
        socket: Option<&Path>,
    ) -> Option<SyslogConn> {
        fn backend<F: Clone>(
            f: F,
            socket: Option<&Path>,
        ) -> Option<syslog::Logger<LoggerBackend, F>> {
            match socket {
                Some(p) => syslog::unix_custom(f, p).ok(),
                None => syslog::unix(f).ok(),
            }
        }
        let process = "kmfs".to_string();
        let pid = std::process::id();
        let hostname = None;
        match format {
            SyslogFormat::Rfc3164 => backend(
                Formatter3164 {
                    facility,
                    hostname,
                    process,
                    pid,
                },
                socket,
            )
            .map(SyslogConn::Rfc3164),
            SyslogFormat::Rfc5424 => backend(
                Formatter5424 {
                    facility,
                    hostname,
                    process,
                    pid,
                },
                socket,
            )
            .map(SyslogConn::Rfc5424),
        }
    }

    fn open(facility: Facility, format: SyslogFormat, socket: Option<&Path>) -> Option<SyslogSink> {
        let conn = Self::connect(facility, format, socket)?;
        Some(SyslogSink {
            facility,
            format,
            socket: socket.map(Path::to_path_buf),
            conn: Mutex::new(Some(conn)),
        })
    }

    fn send_once(conn: &mut SyslogConn, level: Level, line: &str) -> syslog::Result<()> {
        match conn {
            SyslogConn::Rfc3164(l) => match level {
                Level::Error => l.err(line),
                Level::Warn => l.warning(line),
                Level::Info => l.info(line),
                Level::Debug | Level::Trace => l.debug(line),
            },
            SyslogConn::Rfc5424(l) => {
                let m = (0u32, Default::default(), line);
                match level {
                    Level::Error => l.err(m),
                    Level::Warn => l.warning(m),
                    Level::Info => l.info(m),
                    Level::Debug | Level::Trace => l.debug(m),
                }
            }
        }
    }

    fn send(&self, level: Level, line: &str) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = conn.as_mut()
            && Self::send_once(c, level, line).is_ok()
        {
            return;
        }
        // syslogd restarted or socket gone: reconnect once, then give up on
        // this line (the file copy, if any, still has it).
        *conn = Self::connect(self.facility, self.format, self.socket.as_deref());
        if let Some(c) = conn.as_mut() {
            let _ = Self::send_once(c, level, line);
        }
    }
}

/// What the stderr sink shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StderrMode {
    Off,
    /// Warnings only (errors reach the terminal as the command's own last line).
    Warnings,
    /// Every record (foreground runs).
    All,
}

/// One kind of repeated warning being folded.
struct Repeat {
    since: Instant,
    suppressed: u64,
    level: Level,
    target: String,
    msg: String,
}

impl Repeat {
    fn summary(&self) -> (Level, String) {
        (
            self.level,
            kv(&[
                ("op", "log_repeat"),
                ("count", &self.suppressed.to_string()),
                ("window_s", &REPEAT_WINDOW.as_secs().to_string()),
                ("src", &self.target),
                ("msg", &self.msg),
            ]),
        )
    }
}

/// Folds repeated warnings (see the module doc).
#[derive(Default)]
struct Repeats {
    kinds: HashMap<String, Repeat>,
}

/// The folding key: level, target and text with digit runs reduced to `#`.
fn repeat_key(level: Level, target: &str, msg: &str) -> String {
    let mut k = format!("{level}|{target}|");
    let mut digits = false;
    for c in msg.chars() {
        if c.is_ascii_digit() {
            if !digits {
                k.push('#');
            }
            digits = true;
        } else {
            digits = false;
            k.push(c);
        }
    }
    k
}

impl Repeats {
    /// Whether to log this record now, and count lines to log first.
    fn check(
        &mut self,
        level: Level,
        target: &str,
        msg: &str,
        now: Instant,
    ) -> (bool, Vec<(Level, String)>) {
        let key = repeat_key(level, target, msg);
        let mut out = Vec::new();
        if let Some(r) = self.kinds.get_mut(&key) {
            if now.duration_since(r.since) < REPEAT_WINDOW {
                r.suppressed += 1;
                return (false, out);
            }
            if r.suppressed > 0 {
                out.push(r.summary());
            }
            r.since = now;
            r.suppressed = 0;
            return (true, out);
        }
        if self.kinds.len() >= REPEAT_KINDS {
            out.extend(self.expire(now, false));
        }
        if self.kinds.len() < REPEAT_KINDS {
            self.kinds.insert(
                key,
                Repeat {
                    since: now,
                    suppressed: 0,
                    level,
                    target: target.to_string(),
                    msg: msg.to_string(),
                },
            );
        }
        (true, out)
    }

    /// Ends the windows that are over (all of them if `all`) and returns
    /// their count lines.
    fn expire(&mut self, now: Instant, all: bool) -> Vec<(Level, String)> {
        let mut out = Vec::new();
        self.kinds.retain(|_, r| {
            let over = all || now.duration_since(r.since) >= REPEAT_WINDOW;
            if over && r.suppressed > 0 {
                out.push(r.summary());
            }
            !over
        });
        out
    }
}

/// The kmfs logger: filter, chain writer, syslog and stderr sinks. Usable
/// directly (tests, tools) or installed process-wide by [`init`].
pub struct Logger {
    filter: LevelFilter,
    volume: String,
    chain: ChainWriter,
    syslog: Option<SyslogSink>,
    audit_syslog: Option<SyslogSink>,
    stderr: StderrMode,
    file_error_reported: AtomicBool,
    repeats: Mutex<Repeats>,
    stderr_seen: Mutex<HashSet<String>>,
    /// Serial of the last anchor line (0: none yet).
    last_anchor: AtomicU64,
}

impl Logger {
    /// Builds a logger from `cfg` without installing it. Opens the log file
    /// (error if it cannot) and connects to syslog (skipped, with one note on
    /// stderr, if the socket is missing).
    pub fn new(cfg: &LoggingConfig, volume: &str) -> Result<Logger, LoggingError> {
        let facility = parse_facility(&cfg.facility)?;
        let audit_facility = parse_facility(&cfg.audit_facility)?;
        let chain = match &cfg.file {
            Some(path) => ChainWriter::open(path).map_err(|source| LoggingError::LogFile {
                path: path.clone(),
                source,
            })?,
            None => ChainWriter::memory(),
        };
        let (syslog, audit_syslog) = if cfg.syslog && cfg.level != LogLevel::None {
            let socket = cfg.syslog_socket.as_deref();
            let s = SyslogSink::open(facility, cfg.syslog_format, socket);
            let a = SyslogSink::open(audit_facility, cfg.syslog_format, socket);
            if s.is_none() {
                let _ = writeln!(
                    io::stderr(),
                    "kmfs: note: no local syslog socket ({}); logging {}",
                    socket.unwrap_or(Path::new("/dev/log")).display(),
                    if cfg.file.is_some() {
                        "to the log file only"
                    } else {
                        "warnings to stderr only"
                    }
                );
            }
            (s, a)
        } else {
            (None, None)
        };
        let stderr = if cfg.stderr {
            StderrMode::All
        } else if syslog.is_none() && cfg.file.is_none() {
            StderrMode::Warnings
        } else {
            StderrMode::Off
        };
        Ok(Logger {
            filter: cfg.level.filter(),
            volume: volume.to_string(),
            chain,
            syslog,
            audit_syslog,
            stderr,
            file_error_reported: AtomicBool::new(false),
            repeats: Mutex::new(Repeats::default()),
            stderr_seen: Mutex::new(HashSet::new()),
            last_anchor: AtomicU64::new(0),
        })
    }

    /// The level filter in force.
    pub fn filter(&self) -> LevelFilter {
        self.filter
    }

    /// The chain writer (its file, last serial).
    pub fn chain(&self) -> &ChainWriter {
        &self.chain
    }

    /// Whether warnings are shown on stderr (so callers need not print them
    /// again).
    pub fn warnings_on_stderr(&self) -> bool {
        self.stderr != StderrMode::Off
    }

    /// Logs a preformatted message (what [`Log::log`] does for a record).
    /// Repeated warnings and errors are folded (see the module doc).
    pub fn log_message(&self, level: Level, target: &str, msg: &str) {
        let meta = Metadata::builder().level(level).target(target).build();
        if !self.enabled(&meta) {
            return;
        }
        if level <= Level::Warn && target != AUDIT_TARGET {
            let (emit, counts) = self
                .repeats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check(level, target, msg, Instant::now());
            for (l, m) in counts {
                self.write_record(l, "kmfs::logging", &m);
            }
            if !emit {
                return;
            }
        }
        self.write_record(level, target, msg);
    }

    /// Logs the count lines of folded warnings whose window is over (all of
    /// them if `all`, at unmount).
    pub fn flush_repeats(&self, all: bool) {
        let counts = self
            .repeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire(Instant::now(), all);
        for (l, m) in counts {
            self.write_record(l, "kmfs::logging", &m);
        }
    }

    /// Logs an anchor — the log file's last serial and hash — to syslog and
    /// the file, unless nothing was logged since the previous anchor (or
    /// there is no file). Returns the anchored serial and hash.
    pub fn anchor(&self, reason: &str) -> Option<(u64, String)> {
        if self.filter == LevelFilter::Off {
            return None;
        }
        self.chain.path()?;
        let (serial, hash) = self.chain.last();
        if serial == self.last_anchor.load(Ordering::Relaxed) {
            return None;
        }
        self.write_record(
            Level::Info,
            "kmfs::logging",
            &kv(&[
                ("op", "log_anchor"),
                ("anchor_serial", &serial.to_string()),
                ("anchor_hash", &hash),
                ("reason", reason),
            ]),
        );
        self.last_anchor
            .store(self.chain.last_serial(), Ordering::Relaxed);
        Some((serial, hash))
    }

    fn to_stderr(&self, level: Level, target: &str, msg: &str) {
        let show = match self.stderr {
            StderrMode::Off => false,
            StderrMode::Warnings => level == Level::Warn,
            StderrMode::All => true,
        };
        if !show {
            return;
        }
        if level == Level::Warn {
            let mut seen = self.stderr_seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(msg) {
                return;
            }
            if seen.len() < STDERR_SEEN {
                seen.insert(msg.to_string());
            }
        }
        let lvl = match level {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        let src = if target.starts_with("kmfs") {
            String::new()
        } else {
            format!("[{target}] ")
        };
        let _ = writeln!(
            io::stderr(),
            "kmfs: {lvl}: {src}{}",
            chain::sanitize_body(msg)
        );
    }

    fn write_record(&self, level: Level, target: &str, msg: &str) {
        let body = format_body(level, &self.volume, target, msg);
        let appended = self.chain.append(&body);
        if let Some(e) = &appended.error
            && !self.file_error_reported.swap(true, Ordering::Relaxed)
        {
            let _ = writeln!(
                io::stderr(),
                "kmfs: cannot write log file{}: {e} (further errors not shown)",
                self.chain
                    .path()
                    .map(|p| format!(" {}", p.display()))
                    .unwrap_or_default()
            );
        }
        let sink = if target == AUDIT_TARGET {
            self.audit_syslog.as_ref().or(self.syslog.as_ref())
        } else {
            self.syslog.as_ref()
        };
        if let Some(s) = sink {
            for (i, line) in appended.lines.iter().enumerate() {
                // Segment starts that precede the message are informational.
                let lvl = if i + 1 == appended.lines.len() {
                    level
                } else {
                    Level::Info
                };
                s.send(lvl, line);
            }
        }
        self.to_stderr(level, target, msg);
    }
}

impl Log for Logger {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        let cap = if meta.target().starts_with("kmfs") {
            self.filter
        } else if self.filter == LevelFilter::Info {
            // basic: only other crates' errors.
            LevelFilter::Error
        } else {
            self.filter.min(LevelFilter::Info)
        };
        meta.level() <= cap
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        self.log_message(record.level(), record.target(), &msg);
    }

    fn flush(&self) {}
}

/// The process-wide logger [`init`] installed.
static LOGGER: OnceLock<&'static Logger> = OnceLock::new();

/// Whether the installed logger shows warnings on stderr itself.
pub fn warnings_reach_stderr() -> bool {
    LOGGER.get().is_some_and(|l| l.warnings_on_stderr())
}

/// Logs an anchor through the installed logger (see [`Logger::anchor`]) and
/// the counts of folded warnings. Called by the daemon at unmount.
pub fn anchor(reason: &str) -> Option<(u64, String)> {
    let l = LOGGER.get()?;
    l.flush_repeats(reason == "unmount");
    l.anchor(reason)
}

/// Starts the thread that anchors the log every `interval` (and ends folding
/// windows that are over). For the mount daemon; does nothing without an
/// installed logger with a file, or with a zero interval.
pub fn start_anchors(interval: Duration) {
    let Some(l) = LOGGER.get().copied() else {
        return;
    };
    if interval.is_zero() || l.chain.path().is_none() {
        return;
    }
    let tick = interval.min(REPEAT_WINDOW);
    let _ = std::thread::Builder::new()
        .name("kmfs-log-anchor".into())
        .spawn(move || {
            let mut last = Instant::now();
            loop {
                std::thread::sleep(tick);
                l.flush_repeats(false);
                if last.elapsed() >= interval {
                    l.anchor("interval");
                    last = Instant::now();
                }
            }
        });
}

/// The anchor interval of the installed logger's config, kept for
/// [`start_anchors`].
static ANCHOR_INTERVAL: AtomicU64 = AtomicU64::new(DEFAULT_ANCHOR_INTERVAL_S);

/// [`start_anchors`] with the interval from the config [`init`] was given.
pub fn start_configured_anchors() {
    start_anchors(Duration::from_secs(ANCHOR_INTERVAL.load(Ordering::Relaxed)));
}

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Sets up the process-wide logger and the CSV audit sink from `cfg`, for the
/// volume `volume_name`. Call once per process (after daemonising); a second
/// call returns [`LoggingError::AlreadyInitialized`]. Fails if the log file
/// or the audit file cannot be opened — never because syslog is missing. At
/// `verbose`/`debug` prints [`VERBOSE_WARNING`] on stderr and logs it.
pub fn init(cfg: &LoggingConfig, volume_name: &str) -> Result<(), LoggingError> {
    if INITIALISED.swap(true, Ordering::SeqCst) {
        return Err(LoggingError::AlreadyInitialized);
    }
    let result = (|| {
        let audit_path = cfg.audit_file_path();
        let audit = crate::audit::AuditCsv::open(&audit_path, volume_name).map_err(|source| {
            LoggingError::AuditFile {
                path: audit_path.clone(),
                source,
            }
        })?;
        let logger = Logger::new(cfg, volume_name)?;
        let filter = logger.filter();
        let logger: &'static Logger = Box::leak(Box::new(logger));
        log::set_logger(logger).map_err(|_| LoggingError::AlreadyInitialized)?;
        let _ = LOGGER.set(logger);
        ANCHOR_INTERVAL.store(cfg.anchor_interval_s, Ordering::Relaxed);
        log::set_max_level(filter);
        crate::audit::install_sink(Some(audit));
        Ok(())
    })();
    if result.is_err() {
        INITIALISED.store(false, Ordering::SeqCst);
        return result;
    }
    log::info!(
        "{}",
        kv(&[
            ("op", "log_open"),
            ("log_level", &cfg.level.to_string()),
            ("pid", &std::process::id().to_string()),
        ])
    );
    if cfg.level.is_noisy() {
        let _ = writeln!(io::stderr(), "kmfs: warning: {VERBOSE_WARNING}");
        log::warn!("{}", kv(&[("op", "log_warning"), ("msg", VERBOSE_WARNING)]));
    }
    Ok(())
}

/// Opens `path` for appending (and reading, if `read`), creating it with mode
/// 0600 and its directory with 0750; tightens a wider existing file to 0600
/// (log lines and audit rows may name files and keys) and refuses anything
/// that is not a regular file. Shared by the chained log and the audit CSV.
pub fn open_private_append(path: &Path, read: bool) -> io::Result<fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
    }
    let file = fs::OpenOptions::new()
        .read(read)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_toml() {
        let c: LoggingConfig = toml::from_str("").unwrap();
        assert_eq!(c, LoggingConfig::default());
        assert_eq!(c.level, LogLevel::Basic);
        assert_eq!(c.facility, "daemon");
        assert_eq!(c.audit_facility, "authpriv");
        let c: LoggingConfig = toml::from_str(
            "level = \"debug\"\nsyslog = false\nfile = \"/x/kmfs.log\"\naudit_file = \"/x/a.csv\"\nsyslog_format = \"rfc5424\"\nfacility = \"local3\"",
        )
        .unwrap();
        assert_eq!(c.level, LogLevel::Debug);
        assert_eq!(c.audit_file_path(), PathBuf::from("/x/a.csv"));
        assert_eq!(c.syslog_format, SyslogFormat::Rfc5424);
        let back: LoggingConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(toml::from_str::<LoggingConfig>("levle = \"basic\"").is_err());
        assert!(toml::from_str::<LoggingConfig>("level = \"loud\"").is_err());
    }

    #[test]
    fn levels_map_to_filters() {
        assert_eq!(LogLevel::None.filter(), LevelFilter::Off);
        assert_eq!(LogLevel::Basic.filter(), LevelFilter::Info);
        assert_eq!(LogLevel::Verbose.filter(), LevelFilter::Debug);
        assert_eq!(LogLevel::Debug.filter(), LevelFilter::Trace);
        assert_eq!("verbose".parse::<LogLevel>().unwrap(), LogLevel::Verbose);
        assert!("x".parse::<LogLevel>().is_err());
        assert!(LogLevel::Debug.is_noisy() && !LogLevel::Basic.is_noisy());
    }

    #[test]
    fn values_are_quoted() {
        assert_eq!(quote_value("km1"), "km1");
        assert_eq!(quote_value(""), "\"\"");
        assert_eq!(quote_value("a b"), "\"a b\"");
        assert_eq!(quote_value("x=y"), "\"x=y\"");
        assert_eq!(quote_value("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(
            quote_value("l1\nserial=9 hash=00"),
            "\"l1\\nserial=9 hash=00\""
        );
        assert_eq!(
            kv(&[("op", "unwrap"), ("Error", "timed out"), ("b@d", "1")]),
            "op=unwrap error=\"timed out\" b_d=1"
        );
    }

    #[test]
    fn body_formatting() {
        assert_eq!(
            format_body(Level::Info, "vol 1", "kmfs::fs", "op=mount result=ok"),
            "level=INFO volume=\"vol 1\" op=mount result=ok"
        );
        assert_eq!(
            format_body(Level::Warn, "v", "kmfs", "mount ready"),
            "level=WARN volume=v msg=\"mount ready\""
        );
        assert_eq!(
            format_body(Level::Info, "v", "rustls::conn", "x=1"),
            "level=INFO volume=v src=rustls::conn x=1"
        );
        assert_eq!(
            format_body(Level::Info, "v", "kmfs", "Hello=1"),
            "level=INFO volume=v msg=\"Hello=1\""
        );
    }

    fn file_logger(dir: &Path, level: LogLevel) -> Logger {
        let cfg = LoggingConfig {
            level,
            syslog: false,
            file: Some(dir.join("kmfs.log")),
            audit_file: Some(dir.join("audit.csv")),
            ..Default::default()
        };
        Logger::new(&cfg, "vol1").unwrap()
    }

    #[test]
    fn file_logger_filters_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let l = file_logger(dir.path(), LogLevel::Basic);
        l.log_message(Level::Info, "kmfs::x", "op=mount result=ok");
        l.log_message(Level::Debug, "kmfs::x", "op=noise");
        l.log_message(Level::Error, "fuser", "from another crate");
        l.log_message(Level::Warn, "fuser", "dropped at basic");
        l.log_message(Level::Debug, "fuser", "dropped");
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("noise") && !text.contains("dropped"));
        assert!(text.contains("level=ERROR volume=vol1 src=fuser msg=\"from another crate\""));
        let r = verify_file(&dir.path().join("kmfs.log")).unwrap();
        assert_eq!(r.lines, 3);
    }

    #[test]
    fn debug_level_caps_other_crates() {
        let dir = tempfile::tempdir().unwrap();
        let l = file_logger(dir.path(), LogLevel::Debug);
        assert!(
            l.enabled(
                &Metadata::builder()
                    .level(Level::Trace)
                    .target("kmfs::fs")
                    .build()
            )
        );
        assert!(
            !l.enabled(
                &Metadata::builder()
                    .level(Level::Debug)
                    .target("rustls")
                    .build()
            )
        );
        let none = file_logger(dir.path(), LogLevel::None);
        assert!(
            !none.enabled(
                &Metadata::builder()
                    .level(Level::Error)
                    .target("kmfs")
                    .build()
            )
        );
    }

    fn syslog_logger(
        dir: &Path,
        format: SyslogFormat,
    ) -> (Logger, std::os::unix::net::UnixDatagram) {
        let sock = dir.join("log.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let cfg = LoggingConfig {
            syslog_socket: Some(sock),
            syslog_format: format,
            file: Some(dir.join("kmfs.log")),
            ..Default::default()
        };
        (Logger::new(&cfg, "vol1").unwrap(), rx)
    }

    fn recv(rx: &std::os::unix::net::UnixDatagram) -> String {
        let mut buf = vec![0u8; 65536];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn syslog_gets_chained_lines_with_facilities() {
        let dir = tempfile::tempdir().unwrap();
        let (l, rx) = syslog_logger(dir.path(), SyslogFormat::Rfc3164);
        l.log_message(Level::Info, "kmfs::x", "op=mount result=ok");
        // daemon (3 << 3) | info (6) = 30; the chain_start line comes first.
        let first = recv(&rx);
        assert!(first.starts_with("<30>"), "{first}");
        assert!(first.contains("kmfs["), "{first}");
        assert!(first.contains("serial=1 ") && first.contains("event=chain_start"));
        let m = recv(&rx);
        assert!(
            m.contains("serial=2 ") && m.contains("op=mount result=ok hash="),
            "{m}"
        );
        // The same line is in the file.
        let file = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        let line2 = file.lines().nth(1).unwrap();
        assert!(m.ends_with(line2), "{m}\n{line2}");
        // Audit records go to authpriv (10 << 3) | warning (4) = 84.
        l.log_message(Level::Warn, AUDIT_TARGET, "op=unwrap result=fail");
        let a = recv(&rx);
        assert!(a.starts_with("<84>"), "{a}");
    }

    #[test]
    fn syslog_rfc5424() {
        let dir = tempfile::tempdir().unwrap();
        let (l, rx) = syslog_logger(dir.path(), SyslogFormat::Rfc5424);
        l.log_message(Level::Error, "kmfs", "op=x");
        let _start = recv(&rx);
        let m = recv(&rx);
        // daemon | err (3) = 27, version 1.
        assert!(m.starts_with("<27>1 "), "{m}");
        assert!(m.contains(" kmfs ") && m.contains("op=x hash="), "{m}");
    }

    #[test]
    fn missing_syslog_socket_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LoggingConfig {
            syslog_socket: Some(dir.path().join("nope.sock")),
            file: Some(dir.path().join("kmfs.log")),
            ..Default::default()
        };
        let l = Logger::new(&cfg, "v").unwrap();
        l.log_message(Level::Info, "kmfs", "op=still_logged");
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        assert!(text.contains("op=still_logged"));
    }

    #[test]
    fn basic_keeps_other_crates_warnings_out() {
        let dir = tempfile::tempdir().unwrap();
        let l = file_logger(dir.path(), LogLevel::Basic);
        l.log_message(Level::Warn, "fuser", "[Not Implemented] ioctl(cmd: 21505)");
        l.log_message(Level::Error, "fuser", "Failed to send FUSE reply");
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        assert!(!text.contains("Not Implemented"), "{text}");
        assert!(text.contains("Failed to send FUSE reply"), "{text}");
        let v = file_logger(dir.path(), LogLevel::Verbose);
        assert!(
            v.enabled(
                &Metadata::builder()
                    .level(Level::Warn)
                    .target("fuser")
                    .build()
            )
        );
    }

    #[test]
    fn repeated_warnings_are_folded_into_a_count() {
        let mut r = Repeats::default();
        let t0 = Instant::now();
        assert!(
            r.check(Level::Warn, "kmfs::fs", "op=read ino=5 error=x", t0)
                .0
        );
        for i in 0..100 {
            let msg = format!("op=read ino={i} error=x");
            assert!(!r.check(Level::Warn, "kmfs::fs", &msg, t0).0);
        }
        // Another text is its own kind.
        assert!(r.check(Level::Warn, "kmfs::fs", "op=write error=y", t0).0);
        // After the window: the count line, then the message again.
        let later = t0 + REPEAT_WINDOW;
        let (emit, counts) = r.check(Level::Warn, "kmfs::fs", "op=read ino=7 error=x", later);
        assert!(emit);
        assert_eq!(counts.len(), 1);
        assert!(
            counts[0].1.starts_with("op=log_repeat count=100 "),
            "{counts:?}"
        );
        assert!(r.expire(later, true).is_empty());

        // Through a logger: 1000 identical warnings are one line.
        let dir = tempfile::tempdir().unwrap();
        let l = file_logger(dir.path(), LogLevel::Basic);
        for _ in 0..1000 {
            l.log_message(
                Level::Warn,
                "kmfs::fs",
                "op=read result=fail error=\"tag mismatch\"",
            );
        }
        l.flush_repeats(true);
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}"); // chain_start, first, count
        assert!(text.contains("op=log_repeat count=999 "), "{text}");
        // Audit records are never folded.
        for _ in 0..3 {
            l.log_message(Level::Warn, AUDIT_TARGET, "op=unwrap result=fail");
        }
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        assert_eq!(text.matches("op=unwrap result=fail").count(), 3);
    }

    #[test]
    fn anchors_name_the_last_line_and_are_not_repeated_idle() {
        let dir = tempfile::tempdir().unwrap();
        let l = file_logger(dir.path(), LogLevel::Basic);
        l.log_message(Level::Info, "kmfs", "op=mount result=ok");
        let (serial, hash) = l.anchor("interval").unwrap();
        assert_eq!(serial, 2);
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        let line2 = text.lines().nth(1).unwrap();
        assert!(line2.ends_with(&format!("hash={hash}")), "{line2}");
        assert!(text.lines().nth(2).unwrap().contains(&format!(
            "op=log_anchor anchor_serial=2 anchor_hash={hash} reason=interval"
        )));
        // Nothing new since: no second anchor.
        assert!(l.anchor("interval").is_none());
        l.log_message(Level::Info, "kmfs", "op=x");
        assert_eq!(l.anchor("unmount").unwrap().0, 4);
        crate::logging::verify::check_anchor(&dir.path().join("kmfs.log"), 4, &l.chain().last().1)
            .unwrap_err();
        let (s, h) = {
            let t = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
            let last = t.lines().last().unwrap().to_string();
            let s: u64 = last.split(' ').next().unwrap()[7..].parse().unwrap();
            (s, last.rsplit("hash=").next().unwrap().to_string())
        };
        crate::logging::verify::check_anchor(&dir.path().join("kmfs.log"), s, &h).unwrap();
    }

    #[test]
    fn bad_facility_is_an_error() {
        let cfg = LoggingConfig {
            facility: "nope".into(),
            syslog: false,
            ..Default::default()
        };
        assert!(matches!(
            Logger::new(&cfg, "v"),
            Err(LoggingError::BadFacility(_))
        ));
    }
}
