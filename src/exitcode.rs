//! Process exit codes, one per failure class (as gocryptfs's exitcodes package),
//! so scripts and systemd can tell why kmfs stopped. Documented in README.md.

/// Success.
pub const OK: i32 = 0;
/// Any failure not covered below.
pub const OTHER: i32 = 1;
/// Command-line usage error (clap uses 2 as well).
pub const USAGE: i32 = 2;
/// The volume config is missing, unreadable, malformed or has loose permissions.
pub const CONFIG: i32 = 10;
/// A key file, client key or PIN file is unusable or has loose permissions.
pub const CREDENTIALS: i32 = 11;
/// No key server / HSM could be reached.
pub const KEY_SERVER: i32 = 12;
/// The key manager refused access, or the KEK does not unwrap the volume key.
pub const WRONG_KEY: i32 = 13;
/// The volume header is missing, damaged or fails authentication.
pub const HEADER: i32 = 14;
/// The volume was written by a newer kmfs.
pub const FUTURE_VERSION: i32 = 15;
/// The backing directory is missing, not empty (init) or otherwise unusable.
pub const BACKING_DIR: i32 = 16;
/// The mountpoint is missing, busy, or the FUSE mount failed.
pub const MOUNT: i32 = 17;
/// A log file failed verification (`kmfs log verify`).
pub const LOG_VERIFY: i32 = 18;
/// The control socket of a mounted volume could not be reached.
pub const CONTROL: i32 = 19;
/// `kmfs check` found errors (unreadable names or files).
pub const CHECK: i32 = 20;
