//! The local syslog sink: one connection per facility, RFC 3164 or 5424,
//! reconnected once on error.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use log::Level;
use syslog::{Facility, Formatter3164, Formatter5424, LoggerBackend};

use super::config::{LoggingError, SyslogFormat};
use crate::sync::MutexExt;

pub(super) fn parse_facility(name: &str) -> Result<Facility, LoggingError> {
    Facility::from_str(name).map_err(|()| LoggingError::BadFacility(name.to_string()))
}

enum SyslogConn {
    Rfc3164(syslog::Logger<LoggerBackend, Formatter3164>),
    Rfc5424(syslog::Logger<LoggerBackend, Formatter5424>),
}

/// One connection to the local syslog socket, reconnected once on error.
pub(super) struct SyslogSink {
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

    pub(super) fn open(
        facility: Facility,
        format: SyslogFormat,
        socket: Option<&Path>,
    ) -> Option<SyslogSink> {
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

    pub(super) fn send(&self, level: Level, line: &str) {
        let mut conn = self.conn.locked();
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use log::Level;

    use crate::logging::{AUDIT_TARGET, Logger, LoggingConfig, LoggingError, SyslogFormat};

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
