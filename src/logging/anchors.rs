//! Log anchors: the log file's last serial and hash, logged as
//! `op=log_anchor` to syslog (and the file) on a timer and at unmount, so a
//! copy of the file that lost its tail can be detected
//! (`kmfs log verify --expect S:H`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter};

use super::config::DEFAULT_ANCHOR_INTERVAL_S;
use super::fields::kv;
use super::repeat::REPEAT_WINDOW;
use super::{LOGGER, Logger};

impl Logger {
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
pub(super) static ANCHOR_INTERVAL: AtomicU64 = AtomicU64::new(DEFAULT_ANCHOR_INTERVAL_S);

/// [`start_anchors`] with the interval from the config [`init`](super::init) was given.
pub fn start_configured_anchors() {
    start_anchors(Duration::from_secs(ANCHOR_INTERVAL.load(Ordering::Relaxed)));
}

#[cfg(test)]
mod tests {
    use log::Level;

    use crate::logging::LogLevel;
    use crate::logging::tests::file_logger;

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
}
