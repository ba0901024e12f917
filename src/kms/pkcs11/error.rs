//! The error an operation on the token returns ([`OpError`]: a [`KmsError`]
//! and whether the session it used is gone) and how PKCS#11 return values are
//! named and classified in messages.

use cryptoki::error::{Error as CkError, RvError};

use super::Pkcs11Provider;
use crate::kms::KmsError;

/// An error inside an operation, and whether the session it used is gone.
pub(super) struct OpError {
    pub(super) err: KmsError,
    pub(super) session_lost: bool,
}

impl From<KmsError> for OpError {
    fn from(err: KmsError) -> OpError {
        OpError {
            err,
            session_lost: false,
        }
    }
}

pub(super) type OpResult<T> = Result<T, OpError>;

/// `CKR_PIN_INCORRECT` for `RvError::PinIncorrect`, and so on.
pub fn rv_name(rv: &RvError) -> String {
    match rv {
        RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED(0x{v:x})"),
        RvError::UnknownErrorCode(v) => format!("CK_RV 0x{v:x}"),
        other => {
            let camel = format!("{other:?}");
            let mut s = String::from("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    s.push('_');
                }
                s.push(c.to_ascii_uppercase());
            }
            s
        }
    }
}

/// `C_Decrypt: CKR_ENCRYPTED_DATA_INVALID`, or the library's own message.
pub(super) fn ck_text(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: {}", rv_name(rv)),
        other => other.to_string(),
    }
}

pub(super) fn rv_of(e: &CkError) -> Option<&RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(rv),
        _ => None,
    }
}

pub(super) fn is_session_lost(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::DeviceError
        )
    )
}

impl Pkcs11Provider {
    /// Wraps a failure of the PKCS#11 call `what` into an [`OpError`]: a lost
    /// session becomes [`KmsError::Unreachable`], anything else what `make`
    /// builds from the message (which names the function and the CKR_ code).
    pub(super) fn ck_fail(
        &self,
        e: &CkError,
        make: impl FnOnce(String) -> KmsError,
        what: &str,
    ) -> OpError {
        let text = match e {
            CkError::Pkcs11(..) => ck_text(e),
            other => format!("{what}: {other}"),
        };
        let session_lost = is_session_lost(e);
        let err = if session_lost {
            KmsError::Unreachable(format!("{} failed: {text}", self.where_()))
        } else {
            make(text)
        };
        OpError { err, session_lost }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rv_names() {
        assert_eq!(rv_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            rv_name(&RvError::EncryptedDataInvalid),
            "CKR_ENCRYPTED_DATA_INVALID"
        );
        assert_eq!(rv_name(&RvError::UnknownErrorCode(0x1234)), "CK_RV 0x1234");
    }
}
