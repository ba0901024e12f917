//! One writer per volume: the lock file `kmfs.lock` in the backing root
//! (docs/FORMAT.md section 1).
//!
//! Every process that may change a volume — the mount daemon for its whole
//! life, and the offline commands that write (`init`, `rekey`,
//! `check --repair`, `header restore`, offline `rotate-kek`) — takes a
//! non-blocking whole-file write lock on `kmfs.lock` with `F_OFD_SETLK` before
//! it touches anything else. An open-file-description lock belongs to the
//! descriptor, not the process: it survives the mount's fork into the daemon
//! (the daemon takes it itself, after the fork), is released when the last
//! descriptor closes (also when the holder crashes), and is carried to the
//! server as a byte-range lock on NFSv4 and as a file lock on CephFS, so it
//! also excludes a writer on another host of shared storage.
//!
//! The holder writes one line into the file, `host=… pid=… since=…
//! command=…`, so a refused writer can name it, and empties it again when it
//! lets go cleanly. A record found by the next holder therefore means its
//! predecessor ended without letting go (a crash, `kill -9`, a fenced host):
//! harmless — the lock itself is gone — but logged as a takeover naming the
//! predecessor, and overwritten.
//! Read-only commands never take the lock; [`holder`] tells them, without
//! taking it, whether a writer is active.
//!
//! kmfs never breaks a lock that is held (docs/HA.md). When the named holder
//! is gone but the lock is not free — its descriptor lives on in another
//! process on this host, or another host died while its NFS lease still
//! holds the lock on the server — the refusal says so and what releases it
//! (stopping that process; fencing that host, then the lease expiry), and
//! [`VolumeLock::acquire_wait`] (`kmfs mount -o lock_wait=SECONDS`) waits
//! for it instead of failing after [`GRACE`].

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

use crate::logging::fields::quote_value;
use crate::sys;

/// The lock file's name in the backing root (a reserved `kmfs.` name).
pub const LOCK_FILE: &str = "kmfs.lock";
const LOCK_NAME: &CStr = c"kmfs.lock";
/// At most this much of a holder record is read.
const MAX_RECORD: usize = super::internal::limits::LOCK as usize;
/// A holder named in a message is cut to this many characters.
const MAX_SHOWN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (here or on another host) holds the lock.
    #[error("volume {} is in use by another writer ({holder}); {advice}", path.display())]
    Held {
        path: PathBuf,
        holder: String,
        /// What releases the lock (see [`advice`]).
        advice: String,
    },
    /// `kmfs.lock` exists but is not a regular file.
    #[error(
        "lock file {} is a {what}, not a regular file; remove it (kmfs creates a new one) and try again",
        path.display()
    )]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("lock file {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// The value of `key=` in a holder record.
fn field<'a>(holder: &'a str, key: &str) -> Option<&'a str> {
    holder
        .split(' ')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

/// What releases a lock held by `holder` (the record), whose descriptor is
/// `file` (an open file description of the same `kmfs.lock`).
fn advice(holder: &str, file: &File) -> String {
    let finish = if field(holder, "command") == Some("mount") {
        "unmount it there first"
    } else {
        "wait until that command has finished"
    };
    let pid = field(holder, "pid").and_then(|p| p.parse::<i32>().ok());
    let here = field(holder, "host") == Some(hostname().as_str());
    match (here, pid) {
        (true, Some(pid)) if pid > 0 && !alive(pid) => {
            let others = lock_holders(file);
            let who = if others.is_empty() {
                "a process that inherited its descriptor".to_string()
            } else {
                others.join(", ")
            };
            format!(
                "that process is gone, but the lock is still held by {who}; stop that (it releases the lock) and try again — kmfs never breaks a held lock"
            )
        }
        (true, _) => finish.to_string(),
        (false, _) => format!(
            "{finish}; if that host is down or hung, fence it (power it off) first: its lock is released when the shared storage lets go of it (NFSv4: when its lease expires), and `kmfs mount -o lock_wait=SECONDS` waits for that — kmfs never breaks another host's lock (docs/HA.md)"
        ),
    }
}

/// Whether process `pid` exists on this host (in this pid namespace).
fn alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != Errno::ESRCH,
    }
}

/// The local processes holding a write lock on the file `file` is open on,
/// as `pid=N (COMM)`: found through `/proc/PID/fdinfo`, whose `lock:` lines
/// list the locks of that descriptor's open file description. At most 8.
fn lock_holders(file: &File) -> Vec<String> {
    let Ok(st) = sys::fstat(file.as_fd()) else {
        return Vec::new();
    };
    let dev = st.st_dev;
    let want = format!(
        " {:02x}:{:02x}:{} ",
        // The kernel prints MAJOR:MINOR:INODE, major and minor in hex.
        libc::major(dev),
        libc::minor(dev),
        st.st_ino
    );
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.starts_with("lock:") && l.contains(" WRITE ") && l.contains(&want))
            })
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let comm: String = comm
                .trim()
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect();
            out.push(format!("pid={pid} ({comm})"));
            if out.len() == 8 {
                break;
            }
        }
    }
    out
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct VolumeLock {
    file: File,
    dir: File,
    path: PathBuf,
    created: bool,
    /// The record of a predecessor that ended without letting go.
    previous: Option<String>,
}

impl Drop for VolumeLock {
    /// Empties the holder record before the lock goes (with the descriptor):
    /// a clean release leaves no record behind.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// `kmfs.lock` opened, and the backing directory it was opened in.
struct Opened {
    dir: File,
    file: File,
    /// This open created the file (`O_EXCL`).
    created: bool,
}

/// Attempts at opening a lock file that others create or remove meanwhile.
const ATTEMPTS: usize = 20;
/// How long [`VolumeLock::acquire`] waits for a holder that is finishing:
/// `umount` returns when the kernel has let go of the mount, a moment before
/// the daemon has stopped and closed its lock, so `umount && kmfs rekey` (or
/// a remount) would otherwise fail now and then.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl VolumeLock {
    /// Takes the volume's writer lock for `command` (named in the holder
    /// record). If another writer holds it for longer than [`GRACE`], fails
    /// with [`LockError::Held`] naming that writer, having changed nothing.
    pub fn acquire(backing: &Path, command: &str) -> Result<VolumeLock, LockError> {
        Self::acquire_wait(backing, command, GRACE)
    }

    /// [`VolumeLock::acquire`], waiting up to `wait` (at least [`GRACE`])
    /// for the holder to let go: for a takeover after the old holder has
    /// been fenced, while the shared storage still holds its lock (an NFS
    /// lease that has not expired yet). Never breaks the lock.
    pub fn acquire_wait(
        backing: &Path,
        command: &str,
        wait: std::time::Duration,
    ) -> Result<VolumeLock, LockError> {
        let deadline = std::time::Instant::now() + wait.max(GRACE);
        let mut logged = false;
        loop {
            match Self::try_acquire(backing, command) {
                Err(LockError::Held { holder, .. }) if std::time::Instant::now() < deadline => {
                    if !logged && wait > GRACE {
                        log::warn!(
                            "op=lock path={} action=wait holder={} wait_s={}",
                            backing.display(),
                            quote_value(&holder),
                            wait.as_secs()
                        );
                        logged = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    /// [`VolumeLock::acquire`] without waiting.
    pub fn try_acquire(backing: &Path, command: &str) -> Result<VolumeLock, LockError> {
        let path = backing.join(LOCK_FILE);
        let mut attempt = 0;
        let Opened { dir, file, created } = loop {
            attempt += 1;
            let gone = || LockError::Io {
                path: path.clone(),
                what: "cannot create (it keeps being replaced)",
                source: io::Error::from(io::ErrorKind::NotFound),
            };
            let Some(o) = open(backing, &path, true)? else {
                if attempt < ATTEMPTS {
                    continue;
                }
                return Err(gone());
            };
            let fl = whole_file(libc::F_WRLCK);
            match fcntl(o.file.as_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
                Ok(_) => {}
                Err(Errno::EAGAIN | Errno::EACCES) => {
                    let holder = read_record(&o.file);
                    return Err(LockError::Held {
                        path: backing.to_path_buf(),
                        advice: advice(&holder, &o.file),
                        holder,
                    });
                }
                Err(e) => {
                    return Err(LockError::Io {
                        path,
                        what: "cannot lock (does the file system support POSIX locks?)",
                        source: e.into(),
                    });
                }
            }
            // The lock counts only if `kmfs.lock` still is the file locked: a
            // failed `init` removes the file it created (holding the lock),
            // and whoever opened it just before then holds a lock on a file
            // nobody else will find. Try again with the new one.
            if same_file(&o.dir, &o.file) {
                break o;
            }
            if attempt >= ATTEMPTS {
                return Err(gone());
            }
        };
        // A record left behind: its writer ended without letting go.
        let previous = match read_record(&file) {
            r if r == NOBODY => None,
            r => {
                log::warn!(
                    "op=lock path={} action=takeover previous={} note=\"the previous writer ended without releasing the lock (crash, kill or fenced host)\"",
                    path.display(),
                    quote_value(&r)
                );
                Some(r)
            }
        };
        let record = format!(
            "host={} pid={} since={} command={}\n",
            hostname(),
            std::process::id(),
            now_rfc3339(),
            command.replace(char::is_whitespace, "-")
        );
        // Write the new record over the old one, then cut it: a reader
        // never sees an empty file between the two. The record only names
        // the holder to a refused writer; the lock is what excludes. So a
        // record that cannot be written (a full or read-only-quota disk,
        // where a rotation or a repair must still run) is a warning.
        let written = file
            .write_all_at(record.as_bytes(), 0)
            .and_then(|()| file.set_len(record.len() as u64))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            log::warn!(
                "op=lock path={} action=record error=\"{e}\" note=\"lock held, but the holder record could not be written: a refused writer will not see who holds it\"",
                path.display()
            );
        }
        log::debug!(
            "op=lock path={} command={command} result=ok",
            path.display()
        );
        Ok(VolumeLock {
            file,
            dir,
            path,
            created,
            previous,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The holder record of a predecessor that ended without releasing the
    /// lock (crashed, killed, fenced): this acquisition was a takeover.
    pub fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
    }

    /// Whether this lock created `kmfs.lock` (it did not exist before).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Removes `kmfs.lock` while still holding the lock, then releases it:
    /// for a command that created the file and then failed (`init`), so it
    /// leaves nothing behind. Safe against a writer that opened the file
    /// meanwhile: [`VolumeLock::acquire`] retries on a removed file.
    pub fn remove(self) {
        if let Err(e) = sys::unlinkat(self.dir.as_fd(), LOCK_NAME, 0) {
            log::warn!(
                "op=unlock path={} action=remove error=\"{e}\"",
                self.path.display()
            );
        }
    }
}

/// Whether `kmfs.lock` in `dir` is the file `file` is open on.
fn same_file(dir: &File, file: &File) -> bool {
    match (
        sys::fstatat(dir.as_fd(), LOCK_NAME, libc::AT_SYMLINK_NOFOLLOW),
        sys::fstat(file.as_fd()),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// The holder record of the writer that holds the lock of `backing` now, or
/// `None` if nobody does (or there is no lock file). Takes nothing, creates
/// nothing: for read-only commands.
pub fn holder(backing: &Path) -> Result<Option<String>, LockError> {
    let path = backing.join(LOCK_FILE);
    let Some(Opened { file, .. }) = open(backing, &path, false)? else {
        return Ok(None);
    };
    let mut fl = whole_file(libc::F_WRLCK);
    fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).map_err(|e| LockError::Io {
        path,
        what: "cannot query the lock",
        source: e.into(),
    })?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(read_record(&file)))
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // Must be 0 for the OFD commands.
        l_pid: 0,
    }
}

/// Opens `kmfs.lock` in `backing` without following a symlink and without
/// blocking (a FIFO planted there must not hang anyone): with `create`
/// read-write, creating it (`O_EXCL`) if it is absent; otherwise read-only.
/// `Ok(None)`: it is absent (without `create`), or was created or removed by
/// someone else between the look and the open (with `create`: try again).
/// Anything but a regular file is refused.
fn open(backing: &Path, path: &Path, create: bool) -> Result<Option<Opened>, LockError> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(backing)
        .map_err(|e| LockError::Io {
            path: path.to_path_buf(),
            what: "cannot open the backing directory",
            source: e,
        })?;
    let not_regular = |what| LockError::NotRegular {
        path: path.to_path_buf(),
        what,
    };
    // Refuse a special file before opening it: opening a device can have
    // effects of its own. The fstat after the open closes the race.
    let exists = match sys::fstatat(dir.as_fd(), LOCK_NAME, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            check_type(st.st_mode).map_err(not_regular)?;
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            if !create {
                return Ok(None);
            }
            false
        }
        Err(e) => {
            return Err(LockError::Io {
                path: path.to_path_buf(),
                what: "cannot inspect",
                source: e,
            });
        }
    };
    let flags = libc::O_NOFOLLOW
        | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | match (create, exists) {
            (true, false) => libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            (true, true) => libc::O_RDWR,
            (false, _) => libc::O_RDONLY,
        };
    let fd = match sys::openat(dir.as_fd(), LOCK_NAME, flags, 0o600) {
        Ok(fd) => fd,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) => not_regular("symbolic link"),
                Some(libc::EISDIR) => not_regular("directory"),
                Some(libc::ENOENT | libc::EEXIST) => return Ok(None),
                _ => LockError::Io {
                    path: path.to_path_buf(),
                    what: "cannot open",
                    source: e,
                },
            });
        }
    };
    let st = sys::fstat(fd.as_fd()).map_err(|e| LockError::Io {
        path: path.to_path_buf(),
        what: "cannot inspect",
        source: e,
    })?;
    check_type(st.st_mode).map_err(not_regular)?;
    Ok(Some(Opened {
        dir,
        file: File::from(fd),
        created: !exists && create,
    }))
}

fn check_type(mode: libc::mode_t) -> Result<(), &'static str> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Ok(()),
        _ => Err(super::internal::kind_name(mode)),
    }
}

/// What [`read_record`] gives for an empty record.
const NOBODY: &str = "holder unknown: the lock file names nobody yet";

/// The first line of the holder record (at most 4 KiB read), as printable
/// ASCII: the file may have been written by anybody who can write the
/// backing directory, and its text goes into messages.
fn read_record(file: &File) -> String {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    let shown: String = String::from_utf8_lossy(line)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(MAX_SHOWN)
        .collect();
    let shown = shown.trim();
    if shown.is_empty() {
        NOBODY.into()
    } else {
        shown.to_string()
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if r == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '=')
        .collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_and_named_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        assert!(holder(d.path()).unwrap().is_none());
        assert!(!d.path().join(LOCK_FILE).exists(), "holder creates nothing");
        let first = VolumeLock::acquire(d.path(), "mount").unwrap();
        // A second open file description, in the same process: refused.
        let t = std::time::Instant::now();
        let e = VolumeLock::acquire(d.path(), "rekey").unwrap_err();
        assert!(t.elapsed() >= GRACE);
        let msg = e.to_string();
        assert!(matches!(e, LockError::Held { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid={}", std::process::id()))
                && msg.contains("host=")
                && msg.contains("since=")
                && msg.contains("command=mount")
                && msg.contains("unmount it there first"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        let h = holder(d.path()).unwrap().unwrap();
        assert!(h.contains("command=mount"), "{h}");
        drop(first);
        assert!(holder(d.path()).unwrap().is_none());
        let again = VolumeLock::acquire(d.path(), "check-repair").unwrap();
        let rec = std::fs::read_to_string(again.path()).unwrap();
        assert!(rec.ends_with("command=check-repair\n"), "{rec}");
        assert_eq!(rec.lines().count(), 1);
    }

    #[test]
    fn a_removed_lock_file_is_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let first = VolumeLock::acquire(d.path(), "init").unwrap();
        assert!(first.created());
        // Someone opened the file before the failed init removed it.
        let early = File::open(first.path()).unwrap();
        first.remove();
        assert!(!d.path().join(LOCK_FILE).exists());
        // The early opener's lock is on a file nobody else finds.
        let fl = whole_file(libc::F_RDLCK);
        fcntl(early.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).unwrap();
        assert!(!same_file(&File::open(d.path()).unwrap(), &early));
        let second = VolumeLock::acquire(d.path(), "mount").unwrap();
        assert!(second.created());
        let third = VolumeLock::try_acquire(d.path(), "rekey").unwrap_err();
        assert!(matches!(third, LockError::Held { .. }), "{third}");
        drop(second);
        assert!(!VolumeLock::acquire(d.path(), "rekey").unwrap().created());
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(LOCK_FILE);
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let e = VolumeLock::acquire(d.path(), "mount").unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert!(holder(d.path()).is_err());
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = VolumeLock::acquire(d.path(), "mount").unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        let e = VolumeLock::acquire(d.path(), "mount").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn a_clean_release_empties_the_record_and_a_left_record_is_a_takeover() {
        let d = tempfile::tempdir().unwrap();
        let first = VolumeLock::acquire(d.path(), "mount").unwrap();
        assert!(first.previous().is_none());
        drop(first);
        assert_eq!(std::fs::read(d.path().join(LOCK_FILE)).unwrap(), b"");
        let clean = VolumeLock::acquire(d.path(), "mount").unwrap();
        assert!(clean.previous().is_none(), "a clean release is no takeover");
        drop(clean);
        // What a crashed holder leaves: its record, no lock.
        let left = "host=fs1 pid=4242 since=2026-11-30T17:02:11Z command=mount";
        std::fs::write(d.path().join(LOCK_FILE), format!("{left}\n")).unwrap();
        let next = VolumeLock::acquire(d.path(), "mount").unwrap();
        assert_eq!(next.previous(), Some(left));
    }

    #[test]
    fn the_advice_says_what_releases_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let f = File::create(d.path().join("x")).unwrap();
        let me = format!(
            "host={} pid={} since=x command=mount",
            hostname(),
            std::process::id()
        );
        assert_eq!(advice(&me, &f), "unmount it there first");
        let cmd = me.replace("command=mount", "command=rekey");
        assert_eq!(advice(&cmd, &f), "wait until that command has finished");
        let other = "host=elsewhere.example pid=7 since=x command=mount";
        let a = advice(other, &f);
        assert!(
            a.starts_with("unmount it there first; if that host is down or hung, fence it")
                && a.contains("-o lock_wait=SECONDS")
                && a.contains("never breaks another host's lock"),
            "{a}"
        );
        assert_eq!(field(other, "host"), Some("elsewhere.example"));
        assert_eq!(field(other, "pid"), Some("7"));
        assert_eq!(field("hostile=1 host=", "host"), Some(""));
        assert_eq!(field("xhost=a", "host"), None);
    }

    #[test]
    fn hostile_records_are_bounded_and_printable() {
        let d = tempfile::tempdir().unwrap();
        let mut junk = b"host=x\x1b[31m pid=1 ".to_vec();
        junk.extend(std::iter::repeat_n(b'A', 100_000));
        std::fs::write(d.path().join(LOCK_FILE), &junk).unwrap();
        let f = File::open(d.path().join(LOCK_FILE)).unwrap();
        let r = read_record(&f);
        assert!(r.starts_with("host=x?[31m pid=1 "), "{r}");
        assert_eq!(r.chars().count(), MAX_SHOWN);
        std::fs::write(d.path().join(LOCK_FILE), b"").unwrap();
        let f = File::open(d.path().join(LOCK_FILE)).unwrap();
        assert!(read_record(&f).contains("holder unknown"));
    }
}
