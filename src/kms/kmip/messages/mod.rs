//! KMIP 1.4 requests and responses for the operations kmfs uses.
//!
//! Fields are emitted in exactly the order the specification lists them (PyKMIP
//! rejects anything else with INVALID_MESSAGE). Every request carries one batch
//! item; every response is checked for protocol version, batch count, operation
//! and result status before its payload is handed out.
//!
//! Parsers return plain data for non-secret fields and [`Secret`] for key
//! material (Decrypt output, Get output, RNG output).

/// The protocol version kmfs speaks. AES-GCM Encrypt/Decrypt needs 1.4: at 1.2/1.3
/// the authenticated-encryption tag fields do not exist.
pub const PROTOCOL_MAJOR: i32 = 1;
pub const PROTOCOL_MINOR: i32 = 4;

/// AES-GCM tag length kmfs always requests and insists on.
pub const GCM_TAG_LEN: usize = 16;
/// AES-GCM IV length kmfs generates.
pub const GCM_IV_LEN: usize = 12;

/// KMIP operations (KMIP 1.4 section 9.1.3.2.27).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Operation {
    Create = 0x01,
    Locate = 0x08,
    Get = 0x0A,
    GetAttributes = 0x0B,
    Activate = 0x12,
    Revoke = 0x13,
    Query = 0x18,
    DiscoverVersions = 0x1E,
    Encrypt = 0x1F,
    Decrypt = 0x20,
    RngRetrieve = 0x25,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Create => "Create",
            Operation::Locate => "Locate",
            Operation::Get => "Get",
            Operation::GetAttributes => "GetAttributes",
            Operation::Activate => "Activate",
            Operation::Revoke => "Revoke",
            Operation::Query => "Query",
            Operation::DiscoverVersions => "DiscoverVersions",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
            Operation::RngRetrieve => "RNGRetrieve",
        }
    }
}

/// Enumeration values (KMIP 1.4 section 9.1.3.2).
pub mod enums {
    pub const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
    pub const ALGORITHM_AES: u32 = 0x03;
    pub const BLOCK_CIPHER_MODE_GCM: u32 = 0x09;
    pub const NAME_TYPE_TEXT: u32 = 0x01;
    pub const KEY_FORMAT_RAW: u32 = 0x01;
    pub const KEY_FORMAT_TRANSPARENT_SYMMETRIC: u32 = 0x07;
    pub const CREDENTIAL_USERNAME_PASSWORD: u32 = 0x01;
    pub const REVOCATION_CESSATION_OF_OPERATION: u32 = 0x06;
    pub const QUERY_OPERATIONS: u32 = 0x01;
    pub const QUERY_SERVER_INFORMATION: u32 = 0x03;
    pub const RESULT_SUCCESS: u32 = 0x00;
    /// Encrypt | Decrypt | Wrap Key | Unwrap Key.
    pub const USAGE_MASK_KEK: i32 = 0x04 | 0x08 | 0x10 | 0x20;

    pub const STATE_PRE_ACTIVE: u32 = 1;
    pub const STATE_ACTIVE: u32 = 2;

    pub fn state_name(s: u32) -> &'static str {
        match s {
            1 => "Pre-Active",
            2 => "Active",
            3 => "Deactivated",
            4 => "Compromised",
            5 => "Destroyed",
            6 => "Destroyed Compromised",
            _ => "unknown state",
        }
    }
}

/// KMIP result reasons (KMIP 1.4 section 9.1.3.2.29).
pub mod reason {
    pub const ITEM_NOT_FOUND: u32 = 0x01;
    pub const AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
    pub const INVALID_MESSAGE: u32 = 0x04;
    pub const OPERATION_NOT_SUPPORTED: u32 = 0x05;
    pub const FEATURE_NOT_SUPPORTED: u32 = 0x08;
    pub const CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
    pub const ILLEGAL_OPERATION: u32 = 0x0B;
    pub const PERMISSION_DENIED: u32 = 0x0C;
    pub const GENERAL_FAILURE: u32 = 0x100;

    pub fn name(r: u32) -> &'static str {
        match r {
            0x01 => "ITEM_NOT_FOUND",
            0x02 => "RESPONSE_TOO_LARGE",
            0x03 => "AUTHENTICATION_NOT_SUCCESSFUL",
            0x04 => "INVALID_MESSAGE",
            0x05 => "OPERATION_NOT_SUPPORTED",
            0x06 => "MISSING_DATA",
            0x07 => "INVALID_FIELD",
            0x08 => "FEATURE_NOT_SUPPORTED",
            0x09 => "OPERATION_CANCELED_BY_REQUESTER",
            0x0A => "CRYPTOGRAPHIC_FAILURE",
            0x0B => "ILLEGAL_OPERATION",
            0x0C => "PERMISSION_DENIED",
            0x0D => "OBJECT_ARCHIVED",
            0x0E => "INDEX_OUT_OF_BOUNDS",
            0x0F => "APPLICATION_NAMESPACE_NOT_SUPPORTED",
            0x10 => "KEY_FORMAT_TYPE_NOT_SUPPORTED",
            0x11 => "KEY_COMPRESSION_TYPE_NOT_SUPPORTED",
            0x12 => "ENCODING_OPTION_ERROR",
            0x13 => "KEY_VALUE_NOT_PRESENT",
            0x14 => "ATTESTATION_REQUIRED",
            0x15 => "ATTESTATION_FAILED",
            0x16 => "SENSITIVE",
            0x17 => "NOT_EXTRACTABLE",
            0x18 => "OBJECT_ALREADY_EXISTS",
            0x100 => "GENERAL_FAILURE",
            _ => "UNKNOWN_REASON",
        }
    }
}

mod request;
mod response;
#[cfg(test)]
mod tests;

pub use request::*;
pub use response::*;
