//! The `[log]` section of a volume config ([`LoggingConfig`]), its log
//! levels and syslog formats, and the errors from setting up logging.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use log::LevelFilter;
use serde::{Deserialize, Serialize};

/// Default audit CSV for root.
pub const DEFAULT_AUDIT_FILE: &str = "/var/log/kmfs/audit.csv";

/// Default seconds between log anchors.
pub const DEFAULT_ANCHOR_INTERVAL_S: u64 = 300;

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
}
