//! The errors of a rekey, typed; each prints as the one line the status,
//! the log and the command line show.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::volume::VolumeError;

/// Why an attempt of a rekey ended early. All but [`RekeyError::Stopped`]
/// make the rekey wait and retry.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// A file system operation failed: `what` (an action), on `path` if it
    /// names one.
    #[error("{}: {source}{}", Subject(what, path.as_ref()), enospc_hint(source))]
    Io {
        what: &'static str,
        path: Option<PathBuf>,
        #[source]
        source: io::Error,
    },
    #[error("no keys for generation {0}")]
    NoKeys(u16),
    #[error(
        "{} was moved while being re-encrypted; finishing it from the journal",
        .0.display()
    )]
    Moved(PathBuf),
    #[error(
        "the rekey journal names key generations {from} → {to}, which the volume header does not hold"
    )]
    JournalGenerations { from: u16, to: u16 },
    /// The host could not retire the old generations.
    #[error(transparent)]
    Retire(#[from] RetireError),
    #[error("stopped")]
    Stopped,
}

impl RekeyError {
    /// `what` failed with `source`, on no particular path.
    pub(super) fn io(what: &'static str, source: io::Error) -> RekeyError {
        RekeyError::Io {
            what,
            path: None,
            source,
        }
    }

    /// `what` failed on `path` with `source`.
    pub(super) fn at(
        what: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> RekeyError {
        RekeyError::Io {
            what,
            path: Some(path.into()),
            source,
        }
    }
}

/// "what path", "what" or "path", as the message starts.
struct Subject<'a>(&'a str, Option<&'a PathBuf>);

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (w, None) => f.write_str(w),
            ("", Some(p)) => write!(f, "{}", p.display()),
            (w, Some(p)) => write!(f, "{w} {}", p.display()),
        }
    }
}

fn enospc_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        " (free some space; the rekey resumes by itself)"
    } else {
        ""
    }
}

/// Why a rekey could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    State(#[source] io::Error),
    #[error("a rekey to key generation {0} is already in progress (see kmfs rekey --status)")]
    InProgress(u16),
    #[error("cannot create a new key generation: {0}")]
    NewGeneration(#[source] VolumeError),
    #[error("cannot write the rekey state file: {0}")]
    StoreState(#[source] io::Error),
}

/// Why the old generations could not be retired at the end of a rekey.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot retire the old key generations (the key manager must confirm generation {keep} first): {source}"
)]
pub struct RetireError {
    pub keep: u16,
    /// The key manager's or the header's error.
    #[source]
    pub source: VolumeError,
}

/// A throttle value out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThrottleError {
    #[error("rate {0} MB/s is out of range (more than 0, at most {max})", max = super::Throttle::MAX_RATE_MB)]
    Rate(f64),
    #[error("cpu {0}% is out of range (1 to 100)")]
    Cpu(u8),
    #[error("{0:?} is not a number")]
    NotANumber(String),
}
