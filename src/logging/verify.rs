//! `kmfs log verify FILE`: recompute a log file's hash chain (format in
//! [`super::chain`]) and name the first line that is missing, out of order,
//! altered or cut.
//!
//! Rules, line by line (lines numbered from 1):
//! - every line must parse (see [`super::chain::parse_line`]) and be valid
//!   UTF-8, and the file must end with `\n`;
//! - line 1 must be an `event=chain_start` line (otherwise earlier lines are
//!   missing); its own `prev_serial`/`prev_hash` are taken on trust;
//! - every other line must have the previous line's serial + 1 and the hash
//!   `SHA-256(previous hash || content)`; a `chain_start` line in the middle
//!   must name the previous line's serial and hash as its predecessor.
//!
//! A corrupted file gives an error, never a panic.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::chain::{MAX_LINE, chain_hash, hex, parse_line};

/// An intact log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of lines checked.
    pub lines: u64,
    /// Number of `chain_start` lines (segments).
    pub segments: u64,
    /// The predecessor named by the first line (`prev_serial`, `prev_hash`
    /// hex): match it against the previous file's last line to join rotated
    /// files. `None` for an empty file.
    pub first_prev: Option<(u64, String)>,
    /// Serial and hash (hex) of the last line; `None` for an empty file.
    pub last: Option<(u64, String)>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OK: {} lines, chain intact", self.lines)
    }
}

/// Why a log does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The first broken line (1-based) and what is wrong with it.
    #[error("line {line}: {problem}")]
    Broken { line: u64, problem: String },
    /// The chain is intact but does not reach an expected anchor.
    #[error("{0}")]
    Anchor(String),
}

impl VerifyError {
    /// Line number of the first broken line, if that is the error.
    pub fn line(&self) -> Option<u64> {
        match self {
            VerifyError::Broken { line, .. } => Some(*line),
            VerifyError::Io { .. } | VerifyError::Anchor(_) => None,
        }
    }
}

/// Verifies the chained log at `path`.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    verify_reader(BufReader::new(file)).map_err(|e| match e {
        ReadOrBroken::Io(source) => io_err(source),
        ReadOrBroken::Broken(b) => b,
    })
}

/// Checks that the log at `path` (verify it first) reaches the anchor
/// `serial`/`hash` — the last serial and hash the daemon sent to syslog: the
/// line with that serial must be in the file with that hash. A file whose
/// tail was cut ends before the anchor; a rewritten one has another hash.
pub fn check_anchor(path: &Path, serial: u64, hash: &str) -> Result<(), VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let want = hash.to_ascii_lowercase();
    let mut last = None;
    let mut r = BufReader::new(file);
    let mut buf = Vec::new();
    let mut n: u64 = 0;
    loop {
        buf.clear();
        let read = (&mut r)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|source| VerifyError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        let Ok(text) = std::str::from_utf8(&buf) else {
            continue;
        };
        let Ok(p) = parse_line(text.trim_end_matches('\n')) else {
            continue;
        };
        if p.serial == serial {
            let have = hex(&p.hash);
            if have == want {
                return Ok(());
            }
            return Err(VerifyError::Broken {
                line: n,
                problem: format!(
                    "serial {serial} has hash {have}, the anchor says {want}: the log was rewritten"
                ),
            });
        }
        last = Some(p.serial);
    }
    Err(VerifyError::Anchor(match last {
        Some(l) if l < serial => format!(
            "the log ends at serial {l} but the anchor names serial {serial}: lines were cut from its end (or the rest is in a newer file)"
        ),
        Some(_) => format!("serial {serial} is not in this file (it is in an older, rotated file)"),
        None => format!("the log is empty but the anchor names serial {serial}"),
    }))
}

enum ReadOrBroken {
    Io(io::Error),
    Broken(VerifyError),
}

fn broken(line: u64, problem: impl Into<String>) -> ReadOrBroken {
    ReadOrBroken::Broken(VerifyError::Broken {
        line,
        problem: problem.into(),
    })
}

/// Verifies a chained log read from `r` (errors name no path).
pub fn verify_bytes(data: &[u8]) -> Result<VerifyReport, VerifyError> {
    verify_reader(data).map_err(|e| match e {
        ReadOrBroken::Io(source) => VerifyError::Io {
            path: PathBuf::new(),
            source,
        },
        ReadOrBroken::Broken(b) => b,
    })
}

fn verify_reader<R: BufRead>(mut r: R) -> Result<VerifyReport, ReadOrBroken> {
    let mut report = VerifyReport {
        lines: 0,
        segments: 0,
        first_prev: None,
        last: None,
    };
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut buf = Vec::new();
    let mut n: u64 = 0;
    loop {
        buf.clear();
        // Bounded read: a corrupted file without newlines must not eat memory.
        let read = (&mut r)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(ReadOrBroken::Io)?;
        if read == 0 {
            break;
        }
        n += 1;
        if buf.last() != Some(&b'\n') {
            if buf.len() > MAX_LINE {
                return Err(broken(n, format!("line longer than {MAX_LINE} bytes")));
            }
            return Err(broken(
                n,
                "last line has no newline: the file was cut in the middle of a line",
            ));
        }
        buf.pop();
        let text = std::str::from_utf8(&buf).map_err(|_| broken(n, "not valid UTF-8"))?;
        let p = parse_line(text).map_err(|what| broken(n, what))?;

        match (p.chain_start, prev) {
            (Some((ps, ph)), prev_line) => {
                if let Some((s, h)) = prev_line
                    && (ps != s || ph != h)
                {
                    return Err(broken(
                        n,
                        format!(
                            "chain restart names serial {ps} as its predecessor but line {} has serial {s}{}: lines missing or altered before it",
                            n - 1,
                            if ps == s { " with another hash" } else { "" }
                        ),
                    ));
                }
                if ps.checked_add(1) != Some(p.serial) {
                    return Err(broken(
                        n,
                        format!("chain start has serial {} but prev_serial {ps}", p.serial),
                    ));
                }
                if chain_hash(&ph, p.content) != p.hash {
                    return Err(broken(n, "hash mismatch: line altered"));
                }
                if prev_line.is_none() {
                    report.first_prev = Some((ps, hex(&ph)));
                }
                report.segments += 1;
            }
            (None, None) => {
                return Err(broken(
                    n,
                    format!(
                        "serial {} does not start a chain: the lines before it are missing",
                        p.serial
                    ),
                ));
            }
            (None, Some((s, h))) => {
                let expected = s.wrapping_add(1);
                if p.serial != expected {
                    let what = if p.serial > expected {
                        if p.serial - expected == 1 {
                            format!("line with serial {expected} missing or moved")
                        } else {
                            format!(
                                "lines with serials {expected}..{} missing or moved",
                                p.serial - 1
                            )
                        }
                    } else {
                        "lines reordered or duplicated".to_string()
                    };
                    return Err(broken(
                        n,
                        format!("serial {}, expected {expected}: {what}", p.serial),
                    ));
                }
                if chain_hash(&h, p.content) != p.hash {
                    return Err(broken(
                        n,
                        "hash mismatch: this line or its hash was altered",
                    ));
                }
            }
        }
        prev = Some((p.serial, p.hash));
        report.lines = n;
    }
    report.last = prev.map(|(s, h)| (s, hex(&h)));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::super::chain::ChainWriter;
    use super::*;

    fn log_of(n: usize) -> Vec<String> {
        let w = ChainWriter::memory();
        let mut lines = Vec::new();
        for i in 0..n {
            lines.extend(w.append(&format!("level=INFO op=test i={i}")).lines);
        }
        lines
    }

    fn join(lines: &[String]) -> Vec<u8> {
        let mut s = lines.join("\n");
        s.push('\n');
        s.into_bytes()
    }

    #[test]
    fn intact_log_verifies() {
        let lines = log_of(5);
        let r = verify_bytes(&join(&lines)).unwrap();
        assert_eq!(r.lines, 6);
        assert_eq!(r.segments, 1);
        assert_eq!(r.to_string(), "OK: 6 lines, chain intact");
        assert_eq!(r.first_prev, Some((0, "0".repeat(64))));
        assert_eq!(r.last.unwrap().0, 6);
    }

    #[test]
    fn empty_file_is_ok_with_zero_lines() {
        let r = verify_bytes(b"").unwrap();
        assert_eq!(r.lines, 0);
        assert_eq!(r.last, None);
    }

    #[test]
    fn deleted_first_line_detected() {
        let lines = log_of(3);
        let e = verify_bytes(&join(&lines[1..])).unwrap_err();
        assert_eq!(e.line(), Some(1));
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn mid_file_restart_must_link() {
        let mut lines = log_of(3);
        let other = log_of(2);
        lines.extend(other);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert_eq!(e.line(), Some(5));
        assert!(e.to_string().starts_with("line 5: chain restart"), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let inputs: [&[u8]; 6] = [
            b"\n",
            b"\xff\xfe\n",
            b"serial=1\n",
            b"no newline",
            b"serial=18446744073709551615 time=x event=chain_start prev_serial=18446744073709551615 prev_hash=0000000000000000000000000000000000000000000000000000000000000000 reason=new hash=0000000000000000000000000000000000000000000000000000000000000000\n",
            &[b'a'; MAX_LINE * 2],
        ];
        for input in inputs {
            let e = verify_bytes(input).unwrap_err();
            assert_eq!(e.line(), Some(1), "{e}");
        }
    }
}
