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
//!   never an error. Without syslog and without a file, lines go to stderr.
//! - Levels: `none` (nothing; the CSV audit trail is still written), `basic`
//!   (error, warn, info), `verbose` (+ debug), `debug` (+ trace). Other
//!   crates (fuser, rustls, ...) are capped at info whatever the level.
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
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// The kmfs logger: filter, chain writer, syslog and stderr sinks. Usable
/// directly (tests, tools) or installed process-wide by [`init`].
pub struct Logger {
    filter: LevelFilter,
    volume: String,
    chain: ChainWriter,
    syslog: Option<SyslogSink>,
    audit_syslog: Option<SyslogSink>,
    stderr: bool,
    file_error_reported: AtomicBool,
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
                        "to stderr"
                    }
                );
            }
            (s, a)
        } else {
            (None, None)
        };
        let stderr = cfg.stderr || (syslog.is_none() && cfg.file.is_none());
        Ok(Logger {
            filter: cfg.level.filter(),
            volume: volume.to_string(),
            chain,
            syslog,
            audit_syslog,
            stderr,
            file_error_reported: AtomicBool::new(false),
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

    /// Logs a preformatted message (what [`Log::log`] does for a record).
    pub fn log_message(&self, level: Level, target: &str, msg: &str) {
        let meta = Metadata::builder().level(level).target(target).build();
        if !self.enabled(&meta) {
            return;
        }
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
        for (i, line) in appended.lines.iter().enumerate() {
            // Segment starts that precede the message are informational.
            let lvl = if i + 1 == appended.lines.len() {
                level
            } else {
                Level::Info
            };
            if let Some(s) = sink {
                s.send(lvl, line);
            }
            if self.stderr {
                let _ = writeln!(io::stderr(), "{line}");
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        let cap = if meta.target().starts_with("kmfs") {
            self.filter
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
        log::set_logger(Box::leak(Box::new(logger)))
            .map_err(|_| LoggingError::AlreadyInitialized)?;
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
        l.log_message(Level::Warn, "fuser", "from another crate");
        l.log_message(Level::Debug, "fuser", "dropped");
        let text = std::fs::read_to_string(dir.path().join("kmfs.log")).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("noise") && !text.contains("dropped"));
        assert!(text.contains("level=WARN volume=vol1 src=fuser msg=\"from another crate\""));
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
