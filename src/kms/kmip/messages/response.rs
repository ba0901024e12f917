//! The response half: checking a Response Message against the request
//! (version, batch, operation, result status), and parsing each payload.

use std::fmt;

use super::super::ttlv::{Ttlv, TtlvError, Value, tag};
use super::*;
use crate::crypto::keys::Secret;

/// Why a response could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// Not a well-formed KMIP response to our request.
    Malformed(String),
    /// The server answered with a failed result status.
    Failed {
        status: u32,
        reason: Option<u32>,
        message: String,
    },
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseError::Malformed(m) => write!(f, "malformed KMIP response: {m}"),
            ResponseError::Failed {
                reason,
                message,
                status,
            } => {
                match reason {
                    Some(r) => write!(f, "{}", reason::name(*r))?,
                    None => write!(f, "operation failed (result status {status})")?,
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
        }
    }
}

impl From<TtlvError> for ResponseError {
    fn from(e: TtlvError) -> Self {
        ResponseError::Malformed(e.to_string())
    }
}

/// Checks a Response Message to a request for `op` and returns its payload (an
/// empty structure when the server sent none).
pub fn parse_response(msg: &Ttlv, op: Operation) -> Result<Ttlv, ResponseError> {
    let bad = |m: String| ResponseError::Malformed(m);
    if msg.tag != tag::RESPONSE_MESSAGE {
        return Err(bad(format!(
            "expected ResponseMessage, got {}",
            super::super::ttlv::tag_name(msg.tag)
        )));
    }
    let header = msg.child(tag::RESPONSE_HEADER)?;
    let pv = header.child(tag::PROTOCOL_VERSION)?;
    let major = pv.child(tag::PROTOCOL_VERSION_MAJOR)?.as_integer()?;
    let minor = pv.child(tag::PROTOCOL_VERSION_MINOR)?.as_integer()?;
    if major != PROTOCOL_MAJOR {
        return Err(bad(format!("server answered in KMIP {major}.{minor}")));
    }
    let count = header.child(tag::BATCH_COUNT)?.as_integer()?;
    let items: Vec<&Ttlv> = msg.find_all(tag::BATCH_ITEM).collect();
    if count != 1 || items.len() != 1 {
        return Err(bad(format!(
            "expected one batch item, got {} (count {count})",
            items.len()
        )));
    }
    let item = items[0];
    if let Some(o) = item.find(tag::OPERATION) {
        let got = o.as_enum()?;
        if got != op as u32 {
            return Err(bad(format!(
                "answer is for operation 0x{got:02x}, not {}",
                op.name()
            )));
        }
    }
    let status = item.child(tag::RESULT_STATUS)?.as_enum()?;
    if status != enums::RESULT_SUCCESS {
        let reason = item.find(tag::RESULT_REASON).and_then(|r| r.as_enum().ok());
        let message = item
            .find(tag::RESULT_MESSAGE)
            .and_then(|m| m.as_text().ok())
            .map(sanitize)
            .unwrap_or_default();
        return Err(ResponseError::Failed {
            status,
            reason,
            message,
        });
    }
    Ok(item
        .find(tag::RESPONSE_PAYLOAD)
        .cloned()
        .unwrap_or_else(|| Ttlv::structure(tag::RESPONSE_PAYLOAD, vec![])))
}

/// A server's message on one line, printable, of bounded length.
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out.trim().to_string()
}

pub fn parse_uid(payload: &Ttlv) -> Result<String, ResponseError> {
    Ok(payload
        .child(tag::UNIQUE_IDENTIFIER)?
        .as_text()?
        .to_string())
}

pub fn parse_uids(payload: &Ttlv) -> Result<Vec<String>, ResponseError> {
    payload
        .find_all(tag::UNIQUE_IDENTIFIER)
        .map(|t| Ok(t.as_text()?.to_string()))
        .collect()
}

/// Output of Encrypt. Ciphertext, IV and tag are not secret.
#[derive(Debug)]
pub struct EncryptOut {
    pub data: Vec<u8>,
    pub iv: Option<Vec<u8>>,
    pub tag: Option<Vec<u8>>,
}

pub fn parse_encrypt(payload: &Ttlv) -> Result<EncryptOut, ResponseError> {
    Ok(EncryptOut {
        data: payload.child(tag::DATA)?.as_bytes()?.to_vec(),
        iv: match payload.find(tag::IV_COUNTER_NONCE) {
            Some(t) => Some(t.as_bytes()?.to_vec()),
            None => None,
        },
        tag: match payload.find(tag::AUTHENTICATED_ENCRYPTION_TAG) {
            Some(t) => Some(t.as_bytes()?.to_vec()),
            None => None,
        },
    })
}

/// The Data of a Decrypt or RNG Retrieve response, as a secret.
pub fn parse_data_secret(payload: &Ttlv) -> Result<Secret, ResponseError> {
    Ok(Secret::from_slice(payload.child(tag::DATA)?.as_bytes()?))
}

/// The key bytes of a Get response for an unwrapped AES symmetric key.
pub fn parse_get_symmetric_key(payload: &Ttlv) -> Result<Secret, ResponseError> {
    let bad = |m: &str| ResponseError::Malformed(m.to_string());
    let ot = payload.child(tag::OBJECT_TYPE)?.as_enum()?;
    if ot != enums::OBJECT_TYPE_SYMMETRIC_KEY {
        return Err(bad("the object is not a symmetric key"));
    }
    let block = payload.child(tag::SYMMETRIC_KEY)?.child(tag::KEY_BLOCK)?;
    if block.find(tag::KEY_WRAPPING_DATA).is_some() {
        return Err(bad(
            "the server returned the key wrapped, but no wrapping was requested",
        ));
    }
    if let Some(a) = block.find(tag::CRYPTOGRAPHIC_ALGORITHM)
        && a.as_enum()? != enums::ALGORITHM_AES
    {
        return Err(bad("the key is not an AES key"));
    }
    let format = block.child(tag::KEY_FORMAT_TYPE)?.as_enum()?;
    let value = block.child(tag::KEY_VALUE)?;
    let material = value.child(tag::KEY_MATERIAL)?;
    let bytes = match (format, &material.value) {
        (enums::KEY_FORMAT_RAW, Value::ByteString(b)) => b.as_slice(),
        (enums::KEY_FORMAT_TRANSPARENT_SYMMETRIC, Value::Structure(_)) => {
            // Transparent Symmetric Key: a structure holding Key (0x42003F).
            material.child(0x42003F)?.as_bytes()?
        }
        _ => return Err(bad("unsupported key format in Get response")),
    };
    Ok(Secret::from_slice(bytes))
}

/// The State attribute from a Get Attributes response, if present.
pub fn parse_state(payload: &Ttlv) -> Result<Option<u32>, ResponseError> {
    for a in payload.find_all(tag::ATTRIBUTE) {
        if a.child(tag::ATTRIBUTE_NAME)?.as_text()? == "State" {
            return Ok(Some(a.child(tag::ATTRIBUTE_VALUE)?.as_enum()?));
        }
    }
    Ok(None)
}

/// Protocol versions from a Discover Versions response, as "major.minor".
pub fn parse_versions(payload: &Ttlv) -> Result<Vec<String>, ResponseError> {
    payload
        .find_all(tag::PROTOCOL_VERSION)
        .map(|v| {
            let major = v.child(tag::PROTOCOL_VERSION_MAJOR)?.as_integer()?;
            let minor = v.child(tag::PROTOCOL_VERSION_MINOR)?.as_integer()?;
            Ok(format!("{major}.{minor}"))
        })
        .collect()
}

/// Vendor Identification from a Query response.
pub fn parse_vendor(payload: &Ttlv) -> Option<String> {
    payload
        .find(tag::VENDOR_IDENTIFICATION)
        .and_then(|v| v.as_text().ok())
        .map(sanitize)
}
