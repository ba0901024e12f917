//! Folding of repeated warnings and errors (see the [`crate::logging`]
//! module doc): the first of a kind is logged, identical ones in the next
//! [`REPEAT_WINDOW`] are counted and logged as one `op=log_repeat` line.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use log::Level;

use super::fields::kv;

/// How long identical warnings are folded into one count.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);

/// At most this many kinds of warning are tracked for folding at once.
const REPEAT_KINDS: usize = 512;

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
pub(super) struct Repeats {
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
    pub(super) fn check(
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
    pub(super) fn expire(&mut self, now: Instant, all: bool) -> Vec<(Level, String)> {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use log::Level;

    use super::*;
    use crate::logging::tests::file_logger;
    use crate::logging::{AUDIT_TARGET, LogLevel};

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
}
