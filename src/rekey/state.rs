//! The rekey state file `kmfs.rekey` in the backing root: which generation a
//! rekey moves files to, its throttle, whether it is paused, and counters.
//! Its presence means a rekey is in progress; the mount daemon resumes it.
//! The authoritative progress is in the per-file headers, so a stale
//! counter here only skews the progress display.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Throttle;
use crate::volume::{atomic, internal};

pub use crate::volume::backing::STATE_FILE;
const STATE_TMP: &str = "kmfs.rekey.tmp";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyState {
    /// The generation every file is being moved to.
    pub target: u16,
    /// Unix seconds.
    pub started: u64,
    pub paused: bool,
    pub throttle: Throttle,
    pub files_done: u64,
    pub bytes_done: u64,
}

pub fn path(backing: &Path) -> PathBuf {
    backing.join(STATE_FILE)
}

impl RekeyState {
    /// The state of the rekey in progress in `backing`, if any.
    pub fn load(backing: &Path) -> io::Result<Option<RekeyState>> {
        let p = path(backing);
        let damaged = |e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: damaged rekey state file: {e}", p.display()),
            )
        };
        let text = match internal::read_path(&p, internal::limits::REKEY_STATE) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(damaged(&e)),
        };
        let st: RekeyState = serde_json::from_slice(&text).map_err(|e| damaged(&e))?;
        st.throttle.validate().map_err(|e| damaged(&e))?;
        Ok(Some(st))
    }

    /// Checks the state file (unauthenticated, in the backing directory)
    /// against the authenticated header: its target must be the header's
    /// active generation. Anything else is a stale or planted state file,
    /// and following it could retire the generation the data is on.
    pub fn check_against(&self, hdr: &crate::volume::header::VolumeHeader) -> io::Result<()> {
        if self.target != hdr.active {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{STATE_FILE} names key generation {} as the rekey's target, but the volume header's active generation is {}: a stale or forged state file; kmfs check reports it, and removing it is safe when no rekey was started",
                    self.target, hdr.active
                ),
            ));
        }
        Ok(())
    }

    /// Stores the state atomically.
    pub fn store(&self, backing: &Path) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        atomic::write(backing, STATE_TMP, STATE_FILE, &text, 0o600)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

pub fn remove(backing: &Path) -> io::Result<()> {
    crate::sys::remove_file_if_exists(&path(backing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_remove() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(RekeyState::load(d.path()).unwrap(), None);
        let s = RekeyState {
            target: 3,
            started: 5,
            paused: true,
            throttle: Throttle {
                rate_mb: Some(2.5),
                cpu: None,
            },
            files_done: 7,
            bytes_done: 9,
        };
        s.store(d.path()).unwrap();
        assert_eq!(RekeyState::load(d.path()).unwrap(), Some(s));
        std::fs::write(path(d.path()), b"{").unwrap();
        let e = RekeyState::load(d.path()).unwrap_err();
        assert!(e.to_string().contains("damaged rekey state"), "{e}");
        remove(d.path()).unwrap();
        remove(d.path()).unwrap();
    }
}
