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

mod anchors;
pub mod chain;
mod config;
pub mod fields;
pub(crate) mod file;
mod repeat;
mod syslog;
pub mod verify;

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

pub use anchors::{anchor, start_anchors, start_configured_anchors};
pub use chain::ChainWriter;
pub use config::{
    DEFAULT_ANCHOR_INTERVAL_S, DEFAULT_AUDIT_FILE, LogLevel, LoggingConfig, LoggingError,
    SyslogFormat,
};
pub use fields::{AUDIT_TARGET, KEYS, kv, quote_value};
pub use file::open_private_append;
pub use repeat::REPEAT_WINDOW;
pub use verify::{VerifyError, VerifyReport, verify_file};

use self::syslog::{SyslogSink, parse_facility};
use crate::sync::MutexExt;
use fields::format_body;
use repeat::Repeats;

/// At most this many distinct warnings are remembered for "each once" on stderr.
const STDERR_SEEN: usize = 1024;

/// The start-up warning at `verbose` and `debug`.
pub const VERBOSE_WARNING: &str = "log level is verbose or debug: logs grow fast and may expose sensitive information (file names, key names, server responses); use basic in production";

/// What the stderr sink shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StderrMode {
    Off,
    /// Warnings only (errors reach the terminal as the command's own last line).
    Warnings,
    /// Every record (foreground runs).
    All,
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
                .locked()
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
        let counts = self.repeats.locked().expire(Instant::now(), all);
        for (l, m) in counts {
            self.write_record(l, "kmfs::logging", &m);
        }
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
            let mut seen = self.stderr_seen.locked();
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
        anchors::ANCHOR_INTERVAL.store(cfg.anchor_interval_s, Ordering::Relaxed);
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::logging) fn file_logger(dir: &Path, level: LogLevel) -> Logger {
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
}
