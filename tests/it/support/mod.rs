//! Harnesses shared by all integration tests: the `kmfs` binary ([`cli`]),
//! FUSE mounts ([`mount`], [`fault`]), key servers ([`pykmip`], [`softhsm`]),
//! file servers a test starts ([`server`]),
//! deterministic randomness ([`rng`]), and the rules for running in one
//! process ([`exclusive`], [`in_own_process`], [`skip`]).

pub mod cli;
pub mod fault;
pub mod mount;
pub mod netns;
pub mod pykmip;
pub mod rekey;
pub mod rng;
pub mod server;
pub mod softhsm;

use std::io::Write;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Serialises the tests that change or observe machine-wide state: the
/// installed Debian package and `/usr/local/bin/kmfs` (ops_package),
/// `mount -t fuse.kmfs` through mount(8) and fstab (deploy). They run one at
/// a time; all other tests stay parallel.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    // A failed exclusive test poisons the lock; the next one still runs.
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// For a test that cannot run here because an outside component is
/// missing (`why` names it and how to install it). With `KMFS_REQUIRE_ALL=1`
/// (set by scripts/test.sh, so CI always runs everything) this fails the
/// test; otherwise it prints one `SKIPPED: <test>: <why>` line on stderr
/// (shown even though the test passes) and the caller returns.
pub fn skip(why: &str) {
    let t = std::thread::current();
    let test = t.name().unwrap_or("?");
    assert!(
        std::env::var_os("KMFS_REQUIRE_ALL").is_none_or(|v| v != "1"),
        "KMFS_REQUIRE_ALL=1 but {test} cannot run: {why}"
    );
    // Straight to fd 2, not eprintln!: the harness hides what a passing
    // test prints, and a skip must show in every run.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// A 127.0.0.1 TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const CHILD_ENV: &str = "KMFS_IT_CHILD";

/// For a test that needs the whole process to itself (it installs the
/// process-wide `log` logger, which another test of this binary also
/// installs, or holds thousands of descriptors): in the test harness, runs this test binary again with only
/// the test `name` (its full path, e.g. `logging::init_installs_...`) and
/// asserts it passed, returning `false`; in that child returns `true`, and
/// the caller runs the test body.
pub fn in_own_process(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some_and(|v| v == name) {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, name)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} in its own process:\n{text}");
    assert!(
        text.contains("1 passed"),
        "{name} did not run in its own process:\n{text}"
    );
    false
}
