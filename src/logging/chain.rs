//! Tamper-evident, hash-chained log lines (SPEC.md section 4).
//!
//! # Line format
//!
//! Every line of a kmfs log file is one message, terminated by `\n`, in one of
//! two shapes:
//!
//! ```text
//! serial=<N> time=<UTC> level=<LEVEL> <key=value fields...> hash=<64 hex>
//! serial=<N> time=<UTC> event=chain_start prev_serial=<P> prev_hash=<64 hex> reason=<R> hash=<64 hex>
//! ```
//!
//! - `serial` is a decimal `u64` without leading zeros. Within a chain it
//!   increases by exactly one from line to line.
//! - `time` is UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
//! - The **content** of a line is everything before the final ` hash=`; the line
//!   ends with ` hash=` and 64 lowercase hex digits, nothing after them.
//! - `hash_N = SHA-256(hash_{N-1} || content_N)`, where `hash_{N-1}` is the 32
//!   raw bytes of the previous line's hash and `content_N` the UTF-8 bytes of
//!   this line's content.
//! - A `event=chain_start` line opens a chain *segment*. It names its own
//!   predecessor: its serial is `prev_serial + 1` and its hash is computed over
//!   `prev_hash` (a fresh chain uses `prev_serial=0` and 64 zeros). The
//!   writer starts a segment when it creates a new file (`reason=new`), when
//!   the file was renamed away by log rotation (`reason=reopen`, linking to
//!   the last line written to the old file, so rotated files can be joined),
//!   when it was truncated under us (`reason=truncated`), or when the last line
//!   of an existing file cannot be parsed on start-up (`reason=unreadable_tail`).
//!   A restarted daemon whose file ends in a valid line simply continues that
//!   chain (next serial, chained to that line's hash).
//!
//! Example (hashes shortened here; they are always 64 digits):
//!
//! ```text
//! serial=1 time=2025-06-01T12:00:00.000001Z event=chain_start prev_serial=0 prev_hash=0000…0000 reason=new hash=5c1f…9a0e
//! serial=2 time=2025-06-01T12:00:00.000214Z level=INFO volume=vol1 op=unwrap server=km1 ip=10.0.0.5 port=5696 key=vol1-kek version=3 user=0(root) result=ok hash=0b7d…41c2
//! ```
//!
//! # What the chain proves, and what not
//!
//! Deleting, reordering, duplicating or editing any line, or cutting a line in
//! half, is detected by [`super::verify::verify_file`] at the first affected
//! line. The chain carries no secret: someone who can rewrite the whole file
//! can recompute every hash, and dropping lines at the very *end* of the file
//! leaves a valid shorter chain. Compare the last serial with a copy kept
//! elsewhere (the same lines go to syslog) to detect that.
//!
//! Several writers may share a file (e.g. a daemon writing its last lines
//! after umount while the next mount of the volume starts): each append takes
//! an exclusive `flock` on the file and, if the file grew since its own last
//! write, continues from the last line there, so the file stays one chain.
//!
//! # Log rotation
//!
//! Use logrotate's `create` mode (not `copytruncate`). The writer notices on
//! the next message that its path now names a different (or no) file, opens a
//! new one and starts it with a `chain_start` line linking to the old file's
//! last line. Each file therefore verifies on its own.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::sync::MutexExt;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Length of a SHA-256 hash in hex.
pub const HASH_HEX_LEN: usize = 64;
/// Longest line `verify` accepts and the writer produces (bytes, without `\n`).
pub const MAX_LINE: usize = 64 * 1024;
/// Longest message body the writer keeps; longer bodies are cut.
pub const MAX_BODY: usize = 16 * 1024;
/// The all-zero predecessor of a fresh chain.
pub const ZERO_HASH: [u8; 32] = [0; 32];

const HASH_SUFFIX: &str = " hash=";
const CHAIN_START: &str = "event=chain_start";

pub use crate::hex::encode as hex;

/// Parses exactly 64 lowercase hex digits.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != HASH_HEX_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(b[2 * i])? << 4) | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

/// `SHA-256(prev || content)`.
pub fn chain_hash(prev: &[u8; 32], content: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(content.as_bytes());
    h.finalize().into()
}

/// UTC timestamp as written in the `time=` field.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedLine<'a> {
    pub serial: u64,
    /// Everything before ` hash=`: what the hash covers.
    pub content: &'a str,
    pub hash: [u8; 32],
    /// `Some((prev_serial, prev_hash))` for a `chain_start` line.
    pub chain_start: Option<(u64, [u8; 32])>,
}

fn parse_serial(s: &str) -> Option<u64> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// Parses one line (without its `\n`). The error says what is malformed.
/// Does not check the hash: that needs the previous line.
pub fn parse_line(line: &str) -> Result<ParsedLine<'_>, String> {
    if line.is_empty() {
        return Err("empty line".into());
    }
    if line.len() > MAX_LINE {
        return Err(format!("line longer than {MAX_LINE} bytes"));
    }
    if line.bytes().any(|c| c.is_ascii_control()) {
        return Err("control character inside the line".into());
    }
    let split = line
        .len()
        .checked_sub(HASH_HEX_LEN + HASH_SUFFIX.len())
        .filter(|&i| line.is_char_boundary(i) && line[i..].starts_with(HASH_SUFFIX))
        .ok_or("no hash= field at the end of the line (line cut short or edited)")?;
    let content = &line[..split];
    let hash = parse_hash(&line[split + HASH_SUFFIX.len()..])
        .ok_or("hash= is not 64 lowercase hex digits")?;

    let rest = content
        .strip_prefix("serial=")
        .ok_or("line does not start with serial=")?;
    let (serial, rest) = rest.split_once(' ').ok_or("no time= field")?;
    let serial = parse_serial(serial).ok_or("serial= is not a decimal number")?;
    let rest = rest
        .strip_prefix("time=")
        .ok_or("no time= field after serial")?;
    let (_time, rest) = rest.split_once(' ').ok_or("nothing after time=")?;

    let chain_start = if let Some(fields) = rest.strip_prefix(CHAIN_START) {
        let fields = fields
            .strip_prefix(" prev_serial=")
            .ok_or("chain_start without prev_serial=")?;
        let (ps, fields) = fields
            .split_once(' ')
            .ok_or("chain_start without prev_hash=")?;
        let ps = parse_serial(ps).ok_or("prev_serial= is not a decimal number")?;
        let fields = fields
            .strip_prefix("prev_hash=")
            .ok_or("chain_start without prev_hash=")?;
        let (ph, _reason) = fields.split_once(' ').unwrap_or((fields, ""));
        let ph = parse_hash(ph).ok_or("prev_hash= is not 64 lowercase hex digits")?;
        Some((ps, ph))
    } else if rest.starts_with("level=") {
        None
    } else {
        return Err("neither level= nor event=chain_start after time=".into());
    };
    Ok(ParsedLine {
        serial,
        content,
        hash,
        chain_start,
    })
}

/// Makes `body` safe to be the middle of one line: control characters are
/// escaped (`\n`, `\r`, `\t`, `\u{1b}`) and it is cut at [`MAX_BODY`] bytes.
pub fn sanitize_body(body: &str) -> String {
    let mut out = String::with_capacity(body.len().min(MAX_BODY));
    for c in body.chars() {
        if out.len() >= MAX_BODY {
            out.push_str("...[cut]");
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Why a new chain segment starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentReason {
    /// Empty or new file, or a writer without a file.
    New,
    /// The path now names another file (rotated away): new file.
    Reopen,
    /// The file shrank under us (`copytruncate`).
    Truncated,
    /// The last line of an existing file could not be parsed.
    UnreadableTail,
}

impl SegmentReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SegmentReason::New => "new",
            SegmentReason::Reopen => "reopen",
            SegmentReason::Truncated => "truncated",
            SegmentReason::UnreadableTail => "unreadable_tail",
        }
    }
}

struct OpenFile {
    file: File,
    dev: u64,
    ino: u64,
    /// File length after our last write; a shorter file was truncated.
    len: u64,
}

struct State {
    path: Option<PathBuf>,
    file: Option<OpenFile>,
    /// Serial and hash of the last line written (0 and zeros before any).
    serial: u64,
    prev: [u8; 32],
    /// The last write failed: re-read the file's tail before the next one.
    resync: bool,
    /// Segment-start lines written since the last `append` returned.
    pending: Vec<String>,
}

/// Appends chained lines to a file (or, without a file, only numbers and
/// chains them so the same lines can go to syslog). Safe to share between
/// threads: serial allocation and the write happen under one lock, so the
/// file's order is the serial order.
pub struct ChainWriter {
    state: Mutex<State>,
}

impl ChainWriter {
    /// Opens (creating with mode 0600, and its directory with 0750) `path` for
    /// appending. If the file ends with a valid line, the chain continues from
    /// it; otherwise a new segment starts (and is written at once).
    /// An existing file wider than 0600 is tightened to 0600.
    pub fn open(path: &Path) -> io::Result<ChainWriter> {
        let mut st = State {
            path: Some(path.to_path_buf()),
            file: None,
            serial: 0,
            prev: ZERO_HASH,
            resync: false,
            pending: Vec::new(),
        };
        let now = OffsetDateTime::now_utc();
        st.open_and_resume(now)?;
        Ok(ChainWriter {
            state: Mutex::new(st),
        })
    }

    /// A writer without a file: the chain lives only in the lines it returns.
    pub fn memory() -> ChainWriter {
        let mut st = State {
            path: None,
            file: None,
            serial: 0,
            prev: ZERO_HASH,
            resync: false,
            pending: Vec::new(),
        };
        let _ = st.start_segment(SegmentReason::New, OffsetDateTime::now_utc());
        ChainWriter {
            state: Mutex::new(st),
        }
    }

    /// The file this writer appends to, if any.
    pub fn path(&self) -> Option<PathBuf> {
        self.lock().path.clone()
    }

    /// Serial of the last line written.
    pub fn last_serial(&self) -> u64 {
        self.lock().serial
    }

    /// Serial and hash (hex) of the last line written: what a log anchor
    /// records.
    pub fn last(&self) -> (u64, String) {
        let st = self.lock();
        (st.serial, hex(&st.prev))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Numbers, timestamps, chains and writes one message. `body` is the part
    /// after `time=`, normally `level=INFO key=value ...` (`level=INFO ` is
    /// put in front if it does not start with `level=`); it is sanitised to
    /// one line. Never fails outright: the lines are returned even when the
    /// file write failed, so the caller can still forward them to syslog.
    pub fn append(&self, body: &str) -> Appended {
        self.append_at(body, OffsetDateTime::now_utc())
    }

    /// [`append`](Self::append) with a given time (tests).
    pub fn append_at(&self, body: &str, now: OffsetDateTime) -> Appended {
        let mut body = sanitize_body(body);
        if !body.starts_with("level=") {
            body.insert_str(0, "level=INFO ");
        }
        let mut st = self.lock();
        let mut error = st.check_file(now).err();
        // Another process may append to the same file (a daemon still writing
        // its last lines after umount while the next mount starts): hold an
        // exclusive lock while writing and continue from whatever it wrote.
        let _flock = st.file.as_ref().and_then(|f| {
            let fd = f.file.try_clone().ok()?;
            nix::fcntl::Flock::lock(fd, nix::fcntl::FlockArg::LockExclusive).ok()
        });
        if error.is_none() {
            error = st.catch_up(now).err();
        }
        let line = st.next_line(&body, now);
        if error.is_none() {
            error = st.write_line(&line).err();
        }
        let mut lines = std::mem::take(&mut st.pending);
        lines.push(line);
        Appended { lines, error }
    }
}

/// What [`ChainWriter::append`] produced.
#[derive(Debug)]
pub struct Appended {
    /// The lines written, without `\n`: any `chain_start` lines the writer had
    /// to emit first (at open, after rotation, ...), then the message itself.
    pub lines: Vec<String>,
    /// Set if writing to the file failed (the lines were still numbered).
    pub error: Option<io::Error>,
}

impl Appended {
    /// The message's own line (the last one).
    pub fn line(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }
}

impl State {
    /// Builds the next line and advances serial/hash.
    fn next_line(&mut self, body: &str, now: OffsetDateTime) -> String {
        self.serial = self.serial.wrapping_add(1);
        let content = format!("serial={} time={} {}", self.serial, format_time(now), body);
        let hash = chain_hash(&self.prev, &content);
        self.prev = hash;
        format!("{content}{HASH_SUFFIX}{}", hex(&hash))
    }

    fn start_segment(&mut self, reason: SegmentReason, now: OffsetDateTime) -> io::Result<()> {
        let (ps, ph) = (self.serial, self.prev);
        self.serial = ps.wrapping_add(1);
        let content = format!(
            "serial={} time={} {CHAIN_START} prev_serial={ps} prev_hash={} reason={}",
            self.serial,
            format_time(now),
            hex(&ph),
            reason.as_str()
        );
        let hash = chain_hash(&ph, &content);
        self.prev = hash;
        let line = format!("{content}{HASH_SUFFIX}{}", hex(&hash));
        let res = self.write_line(&line);
        self.pending.push(line);
        res
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        // One write(2) with O_APPEND: the line lands whole or not at all in
        // the normal case; a short write (disk full) is handled by resync.
        match f.file.write_all(&buf) {
            Ok(()) => {
                f.len = f.file.metadata().map(|m| m.len()).unwrap_or(f.len);
                Ok(())
            }
            Err(e) => {
                self.resync = true;
                Err(e)
            }
        }
    }

    /// Before a write: reopen after rotation, restart after truncation, and
    /// re-read the tail after a failed write.
    fn check_file(&mut self, now: OffsetDateTime) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let Some(f) = self.file.as_ref() else {
            return self.open_and_resume(now);
        };
        let same = match fs::metadata(&path) {
            Ok(m) => m.dev() == f.dev && m.ino() == f.ino,
            Err(_) => false,
        };
        if !same {
            self.file = None;
            self.open_new_after_rotation(now)?;
            return Ok(());
        }
        if self.resync {
            self.resync = false;
            return self.resume_from_tail(now);
        }
        let len = f.file.metadata()?.len();
        if len < f.len {
            self.start_segment(SegmentReason::Truncated, now)?;
        }
        Ok(())
    }

    /// Under the file lock: if the file grew since our last write, another
    /// writer appended; continue the chain from its last line.
    fn catch_up(&mut self, now: OffsetDateTime) -> io::Result<()> {
        let Some(f) = self.file.as_ref() else {
            return Ok(());
        };
        if f.file.metadata()?.len() > f.len {
            return self.resume_from_tail(now);
        }
        Ok(())
    }

    fn open_file(path: &Path) -> io::Result<OpenFile> {
        let file = super::open_private_append(path, true)?;
        let m = file.metadata()?;
        Ok(OpenFile {
            file,
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
        })
    }

    fn open_new_after_rotation(&mut self, now: OffsetDateTime) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        self.file = Some(Self::open_file(&path)?);
        let empty = self.file.as_ref().is_some_and(|f| f.len == 0);
        if empty {
            // Link the new file to the last line of the old one.
            self.start_segment(SegmentReason::Reopen, now)
        } else {
            // Someone put a file with content there: continue its chain.
            self.resume_from_tail(now)
        }
    }

    fn open_and_resume(&mut self, now: OffsetDateTime) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        self.file = Some(Self::open_file(&path)?);
        self.resume_from_tail(now)
    }

    /// Continues from the file's last line if it is valid, else starts a segment.
    fn resume_from_tail(&mut self, now: OffsetDateTime) -> io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let len = f.file.metadata()?.len();
        f.len = len;
        if len == 0 {
            self.serial = 0;
            self.prev = ZERO_HASH;
            return self.start_segment(SegmentReason::New, now);
        }
        let tail_len = len.min(MAX_LINE as u64 + 2);
        let mut tail = vec![0u8; tail_len as usize];
        f.file.seek(SeekFrom::Start(len - tail_len))?;
        f.file.read_exact(&mut tail)?;
        if tail.last() != Some(&b'\n') {
            // A cut line (crash or disk full mid-write): end it so our next
            // line starts clean. `verify` will name the cut line.
            f.file.write_all(b"\n")?;
            f.len += 1;
            return self.start_segment(SegmentReason::UnreadableTail, now);
        }
        let body = &tail[..tail.len() - 1];
        let last = match body.iter().rposition(|&c| c == b'\n') {
            Some(i) => &body[i + 1..],
            None if tail_len == len => body,
            None => &[][..], // longer than MAX_LINE: unreadable
        };
        let parsed = std::str::from_utf8(last)
            .ok()
            .and_then(|s| parse_line(s).ok())
            .map(|p| (p.serial, p.hash));
        match parsed {
            Some((serial, hash)) => {
                self.serial = serial;
                self.prev = hash;
                Ok(())
            }
            None => self.start_segment(SegmentReason::UnreadableTail, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let h = chain_hash(&ZERO_HASH, "x");
        assert_eq!(parse_hash(&hex(&h)), Some(h));
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(parse_hash("AB"), None);
        assert_eq!(parse_hash(&"G".repeat(64)), None);
    }

    #[test]
    fn chain_hash_known_answer() {
        // SHA-256 of 32 zero bytes followed by "abc".
        let mut input = vec![0u8; 32];
        input.extend_from_slice(b"abc");
        let expect: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(chain_hash(&ZERO_HASH, "abc"), expect);
    }

    #[test]
    fn time_format_is_utc_micro() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(format_time(t), "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn memory_writer_lines_parse_and_chain() {
        let w = ChainWriter::memory();
        let a = w.append("level=INFO op=mount volume=v");
        assert!(a.error.is_none());
        assert_eq!(a.lines.len(), 2, "chain_start first");
        let start = parse_line(&a.lines[0]).unwrap();
        assert_eq!(start.chain_start, Some((0, ZERO_HASH)));
        let p = parse_line(a.line()).unwrap();
        assert_eq!(p.hash, chain_hash(&start.hash, p.content));
        assert_eq!(p.serial, 2);
        assert!(p.chain_start.is_none());
        let a = w.append("no level prefix");
        assert_eq!(a.lines.len(), 1);
        assert!(a.line().contains(" level=INFO no level prefix hash="));
        assert_eq!(parse_line(a.line()).unwrap().serial, 3);
    }

    #[test]
    fn body_is_forced_onto_one_line() {
        let w = ChainWriter::memory();
        let a = w.append("level=INFO msg=\"a\nserial=99 forged\r\x1b\"");
        let l = a.line();
        assert!(!l.contains('\n') && !l.contains('\r') && !l.contains('\x1b'));
        assert!(l.contains("\\nserial=99"));
        assert!(parse_line(l).is_ok());
    }

    #[test]
    fn long_body_is_cut() {
        let w = ChainWriter::memory();
        let a = w.append(&"x".repeat(MAX_BODY * 3));
        assert!(a.line().len() < MAX_LINE);
        assert!(parse_line(a.line()).is_ok());
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        for bad in [
            "",
            "hash=",
            "serial=1",
            "serial=01 time=x level=INFO a hash=0000000000000000000000000000000000000000000000000000000000000000",
            "serial=1 time=x bogus hash=0000000000000000000000000000000000000000000000000000000000000000",
            "serial=1 time=x event=chain_start prev_serial=0 hash=0000000000000000000000000000000000000000000000000000000000000000",
            "é hash=000000000000000000000000000000000000000000000000000000000000000é",
            "\u{0}\u{0}",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn segment_start_links_to_previous_line() {
        let w = ChainWriter::memory();
        let a = w.append("level=INFO a");
        let last = parse_line(a.line()).unwrap();
        let (serial, hash) = (last.serial, last.hash);
        let mut st = w.lock();
        st.start_segment(SegmentReason::Reopen, OffsetDateTime::now_utc())
            .unwrap();
        let line = st.pending.pop().unwrap();
        let p = parse_line(&line).unwrap();
        assert_eq!(p.chain_start, Some((serial, hash)));
        assert_eq!(p.serial, serial + 1);
        assert_eq!(p.hash, chain_hash(&hash, p.content));
        assert!(line.contains(" reason=reopen hash="));
    }
}
