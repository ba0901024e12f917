//! Running the real `kmfs` binary from integration tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const KMFS: &str = env!("CARGO_BIN_EXE_kmfs");

/// Runs `kmfs ARGS...` and returns its output.
pub fn kmfs(args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut c = Command::new(KMFS);
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

/// stdout followed by stderr, for messages and assertions.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts success (showing all output otherwise) and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Creates `dir` with mode 0700 (where configs and key files go: kmfs
/// refuses them in a directory others can write) and returns it.
pub fn private_dir(dir: PathBuf) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Writes `content` to `path` with mode 0600 (configs, key and PIN files).
pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Whether `p` is a mountpoint now (per /proc/self/mountinfo).
pub fn is_mounted(p: &Path) -> bool {
    let want = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// The file-system type /proc/self/mountinfo gives for the mountpoint `p`
/// (the field after the ` - ` separator), if `p` is mounted.
pub fn fstype(p: &Path) -> Option<String> {
    let want = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .map(str::to_string)
}

/// Minimal RFC 4180 reader (quoted fields may hold commas, quotes and line
/// ends), for checking the audit CSV kmfs writes.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && row.is_empty(),
        "file must end with a row end"
    );
    rows
}

/// A temporary directory with `etc/` (0700: config, key, log, audit),
/// `back/` and `mnt/`, for tests that drive the CLI with a config file.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
    pub etc: PathBuf,
    pub back: PathBuf,
    pub mnt: PathBuf,
}

impl Dirs {
    pub fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let etc = private_dir(tmp.path().join("etc"));
        let back = tmp.path().join("back");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&back).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        Dirs {
            tmp,
            etc,
            back,
            mnt,
        }
    }
}
