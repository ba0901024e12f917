//! The provider's logged-in session: opening it (C_OpenSession, C_Login),
//! running operations on it, reopening it when the token dropped it, and
//! retrying a key that a concurrent writer of the token hid for a moment.

use std::sync::RwLock;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::RawAuthPin;

use super::Pkcs11Provider;
use super::error::{OpResult, ck_text, is_session_lost, rv_of};
use crate::kms::KmsError;
use crate::sync::{MutexExt, RwLockExt};

/// Taken shared by every provider operation and exclusively by those that
/// create or modify token objects (see `with_session_exclusive`).
static OBJECTS_CHANGE: RwLock<()> = RwLock::new(());

impl Pkcs11Provider {
    /// Opens a read/write session and logs the user in.
    pub(super) fn open_session(&self) -> Result<Session, KmsError> {
        let r = (|| {
            let s = self.module.open_rw_session(self.slot).map_err(|e| {
                if is_session_lost(&e) || matches!(rv_of(&e), Some(RvError::SlotIdInvalid)) {
                    KmsError::Unreachable(format!(
                        "cannot open a session on {}: {}",
                        self.where_(),
                        ck_text(&e)
                    ))
                } else {
                    KmsError::Protocol(format!(
                        "cannot open a session on {}: {}",
                        self.where_(),
                        ck_text(&e)
                    ))
                }
            })?;
            let pin = RawAuthPin::new(Box::new(self.pin.as_bytes().to_vec()));
            match s.login_with_raw(UserType::User, &pin) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
                Err(e) => Err(match rv_of(&e) {
                    Some(RvError::PinIncorrect) => KmsError::AccessDenied(format!(
                        "wrong PIN for {} ({})",
                        self.where_(),
                        ck_text(&e)
                    )),
                    Some(RvError::PinLocked) => KmsError::AccessDenied(format!(
                        "the user PIN of {} is locked ({}); unblock it with the SO PIN",
                        self.where_(),
                        ck_text(&e)
                    )),
                    Some(RvError::PinLenRange | RvError::PinInvalid | RvError::PinExpired) => {
                        KmsError::AccessDenied(format!(
                            "the PIN for {} was rejected ({})",
                            self.where_(),
                            ck_text(&e)
                        ))
                    }
                    Some(RvError::UserPinNotInitialized) => KmsError::AccessDenied(format!(
                        "{} has no user PIN set ({})",
                        self.where_(),
                        ck_text(&e)
                    )),
                    _ => KmsError::AccessDenied(format!(
                        "cannot log in to {}: {}",
                        self.where_(),
                        ck_text(&e)
                    )),
                }),
            }
        })();
        match &r {
            Ok(_) => self.audit("login", "", None, Ok(())),
            Err(e) => self.audit("login", "", None, Err(&e.to_string())),
        }
        r
    }

    /// Runs `f` with the provider's session, reopening it once if the token
    /// dropped it.
    ///
    /// A key that is not found is looked for twice more, 150 ms apart and on
    /// a fresh session: SoftHSM 2.6 keeps its objects in files, and while
    /// another *process* writes the token (creates a key: another kmfs
    /// rotating, pkcs11-tool), a reader can briefly see the token without
    /// objects that are there. A key that is really missing costs 0.3 s more
    /// to report.
    pub(super) fn with_session<T>(
        &self,
        mut f: impl FnMut(&Session) -> OpResult<T>,
    ) -> Result<T, KmsError> {
        let mut attempt = 0;
        loop {
            let r = {
                let _shared = OBJECTS_CHANGE.read_locked();
                self.with_session_inner(&mut f)
            };
            match r {
                Err(KmsError::KeyNotFound(_)) if attempt < 2 => {
                    attempt += 1;
                    *self.session.locked() = None;
                    std::thread::sleep(std::time::Duration::from_millis(150));
                }
                r => return r,
            }
        }
    }

    /// [`with_session`](Self::with_session) for operations that create or
    /// modify token objects: no other PKCS#11 operation of this process runs
    /// meanwhile. SoftHSM 2.6 races otherwise: an object being created is seen
    /// half-written by a concurrent C_FindObjects, which then fails with
    /// CKR_OBJECT_HANDLE_INVALID and the C_GenerateKey with CKR_GENERAL_ERROR.
    /// Key creation and revocation are rare, so this costs nothing in practice.
    pub(super) fn with_session_exclusive<T>(
        &self,
        f: impl FnMut(&Session) -> OpResult<T>,
    ) -> Result<T, KmsError> {
        let _exclusive = OBJECTS_CHANGE.write_locked();
        self.with_session_inner(f)
    }

    fn with_session_inner<T>(
        &self,
        mut f: impl FnMut(&Session) -> OpResult<T>,
    ) -> Result<T, KmsError> {
        let mut guard = self.session.locked();
        for attempt in 0..2 {
            // A session that was closed or logged out behind our back (another
            // part of the process called C_Logout, the token was re-inserted)
            // would otherwise see no private objects and report the key as
            // missing: check it is still a logged-in user session.
            let usable = guard.as_ref().is_some_and(|s| {
                s.get_session_info()
                    .is_ok_and(|i| i.session_state() == SessionState::RwUser)
            });
            if !usable {
                *guard = None;
                *guard = Some(self.open_session()?);
            }
            let Some(session) = guard.as_ref() else {
                continue;
            };
            match f(session) {
                Ok(v) => return Ok(v),
                Err(e) if e.session_lost => {
                    *guard = None;
                    if attempt == 1 {
                        return Err(e.err);
                    }
                }
                Err(e) => return Err(e.err),
            }
        }
        Err(KmsError::Unreachable(format!(
            "lost the session to {}",
            self.where_()
        )))
    }
}
