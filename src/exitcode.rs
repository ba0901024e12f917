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
/// The volume is in use by another writer (its lock `kmfs.lock` is held).
pub const LOCKED: i32 = 21;

use crate::kms::KmsError;
use crate::rotation::RotateError;
use crate::volume::VolumeError;
use crate::volume::header::HeaderError;

/// The exit code of a key-provider failure. Used by the command line and by
/// the daemon (which sends it over the control socket), so a cause has the
/// same code online and offline.
pub fn for_kms(e: &KmsError) -> i32 {
    match e {
        KmsError::Unreachable(_) => KEY_SERVER,
        KmsError::AccessDenied(_) | KmsError::WrongKey(_) | KmsError::KeyNotFound(_) => WRONG_KEY,
        KmsError::Config(_) => CREDENTIALS,
        KmsError::Protocol(_) | KmsError::VerifyMismatch | KmsError::Unsupported { .. } => OTHER,
    }
}

/// The exit code of a volume (header, backing directory, key) failure.
pub fn for_volume(e: &VolumeError) -> i32 {
    match e {
        VolumeError::Kms(k) => for_kms(k),
        VolumeError::Header(h) => for_header(h),
        VolumeError::ProviderMismatch { .. } => CONFIG,
        VolumeError::WrongVolume { .. } | VolumeError::WrongKek { .. } => HEADER,
        VolumeError::Io { .. }
        | VolumeError::AlreadyInitialized(_)
        | VolumeError::NotEmpty(_)
        | VolumeError::NotADirectory(_) => BACKING_DIR,
    }
}

/// The exit code of a header failure.
pub fn for_header(e: &HeaderError) -> i32 {
    match e {
        HeaderError::FutureVersion { .. } => FUTURE_VERSION,
        HeaderError::Io { .. } => BACKING_DIR,
        _ => HEADER,
    }
}

/// The exit code of a failed KEK rotation, by its cause.
pub fn for_rotate(e: &RotateError) -> i32 {
    match e {
        RotateError::Kms { source, .. } => for_kms(source),
        RotateError::VerifyFailed { .. } => WRONG_KEY,
        RotateError::Header { source, .. } => for_header(source),
        RotateError::Store { source, .. } => for_volume(source),
        RotateError::SameKey(_) => USAGE,
    }
}

/// Names for the codes, as `kmfs status --openmetrics` and the README use them.
pub fn name(code: i32) -> &'static str {
    match code {
        OK => "ok",
        USAGE => "usage",
        CONFIG => "config",
        CREDENTIALS => "credentials",
        KEY_SERVER => "key_server",
        WRONG_KEY => "wrong_key",
        HEADER => "header",
        FUTURE_VERSION => "future_version",
        BACKING_DIR => "backing_dir",
        MOUNT => "mount",
        LOG_VERIFY => "log_verify",
        CONTROL => "control",
        CHECK => "check",
        LOCKED => "locked",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_map_to_the_readme_codes() {
        assert_eq!(for_kms(&KmsError::Unreachable("x".into())), 12);
        assert_eq!(for_kms(&KmsError::KeyNotFound("x".into())), 13);
        assert_eq!(for_kms(&KmsError::Config("x".into())), 11);
        assert_eq!(
            for_volume(&VolumeError::Kms(KmsError::WrongKey("x".into()))),
            13
        );
        assert_eq!(name(14), "header");
        assert_eq!(name(99), "other");
    }
}
