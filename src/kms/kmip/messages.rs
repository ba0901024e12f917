//! KMIP 1.4 requests and responses for the operations kmfs uses.
//!
//! Fields are emitted in exactly the order the specification lists them (PyKMIP
//! rejects anything else with INVALID_MESSAGE). Every request carries one batch
//! item; every response is checked for protocol version, batch count, operation
//! and result status before its payload is handed out.
//!
//! Parsers return plain data for non-secret fields and [`Secret`] for key
//! material (Decrypt output, Get output, RNG output).

use std::fmt;

use super::ttlv::{Ttlv, TtlvError, Value, tag};
use crate::crypto::keys::Secret;

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

/// Optional KMIP Credential (Username and Password, credential type 1).
pub struct Credential<'a> {
    pub username: &'a str,
    pub password: Option<&'a Secret>,
}

fn protocol_version() -> Ttlv {
    Ttlv::structure(
        tag::PROTOCOL_VERSION,
        vec![
            Ttlv::integer(tag::PROTOCOL_VERSION_MAJOR, PROTOCOL_MAJOR),
            Ttlv::integer(tag::PROTOCOL_VERSION_MINOR, PROTOCOL_MINOR),
        ],
    )
}

/// A complete Request Message with one batch item.
pub fn request(op: Operation, payload: Vec<Ttlv>, cred: Option<&Credential>) -> Ttlv {
    let mut header = vec![protocol_version()];
    if let Some(c) = cred {
        let mut value = vec![Ttlv::text(tag::USERNAME, c.username)];
        if let Some(p) = c.password {
            // Passwords are read from a file as UTF-8 (checked at load time).
            let text = String::from_utf8_lossy(p.as_bytes());
            value.push(Ttlv::text(tag::PASSWORD, &text));
            if let std::borrow::Cow::Owned(mut s) = text {
                zeroize::Zeroize::zeroize(&mut s);
            }
        }
        header.push(Ttlv::structure(
            tag::AUTHENTICATION,
            vec![Ttlv::structure(
                tag::CREDENTIAL,
                vec![
                    Ttlv::enumeration(tag::CREDENTIAL_TYPE, enums::CREDENTIAL_USERNAME_PASSWORD),
                    Ttlv::structure(tag::CREDENTIAL_VALUE, value),
                ],
            )],
        ));
    }
    header.push(Ttlv::integer(tag::BATCH_COUNT, 1));
    Ttlv::structure(
        tag::REQUEST_MESSAGE,
        vec![
            Ttlv::structure(tag::REQUEST_HEADER, header),
            Ttlv::structure(
                tag::BATCH_ITEM,
                vec![
                    Ttlv::enumeration(tag::OPERATION, op as u32),
                    Ttlv::structure(tag::REQUEST_PAYLOAD, payload),
                ],
            ),
        ],
    )
}

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
            super::ttlv::tag_name(msg.tag)
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

fn attribute(name: &str, value: Ttlv) -> Ttlv {
    Ttlv::structure(
        tag::ATTRIBUTE,
        vec![Ttlv::text(tag::ATTRIBUTE_NAME, name), value],
    )
}

fn name_attribute(name: &str) -> Ttlv {
    attribute(
        "Name",
        Ttlv::structure(
            tag::ATTRIBUTE_VALUE,
            vec![
                Ttlv::text(tag::NAME_VALUE, name),
                Ttlv::enumeration(tag::NAME_TYPE, enums::NAME_TYPE_TEXT),
            ],
        ),
    )
}

fn gcm_parameters() -> Ttlv {
    Ttlv::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Ttlv::enumeration(tag::BLOCK_CIPHER_MODE, enums::BLOCK_CIPHER_MODE_GCM),
            Ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, enums::ALGORITHM_AES),
            Ttlv::integer(tag::TAG_LENGTH, GCM_TAG_LEN as i32),
        ],
    )
}

/// Create: an AES-256 symmetric key usable for Encrypt/Decrypt/WrapKey/UnwrapKey,
/// with the Name `name`.
pub fn create_aes256(name: &str) -> Vec<Ttlv> {
    vec![
        Ttlv::enumeration(tag::OBJECT_TYPE, enums::OBJECT_TYPE_SYMMETRIC_KEY),
        Ttlv::structure(
            tag::TEMPLATE_ATTRIBUTE,
            vec![
                attribute(
                    "Cryptographic Algorithm",
                    Ttlv::enumeration(tag::ATTRIBUTE_VALUE, enums::ALGORITHM_AES),
                ),
                attribute(
                    "Cryptographic Length",
                    Ttlv::integer(tag::ATTRIBUTE_VALUE, 256),
                ),
                attribute(
                    "Cryptographic Usage Mask",
                    Ttlv::integer(tag::ATTRIBUTE_VALUE, enums::USAGE_MASK_KEK),
                ),
                name_attribute(name),
            ],
        ),
    ]
}

/// Payload holding only a Unique Identifier (Activate, Get without options).
pub fn uid_only(uid: &str) -> Vec<Ttlv> {
    vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, uid)]
}

/// Locate symmetric keys by Name.
pub fn locate_by_name(name: &str) -> Vec<Ttlv> {
    vec![
        attribute(
            "Object Type",
            Ttlv::enumeration(tag::ATTRIBUTE_VALUE, enums::OBJECT_TYPE_SYMMETRIC_KEY),
        ),
        name_attribute(name),
    ]
}

/// Get the key in Raw format (the 32 key bytes).
pub fn get_raw(uid: &str) -> Vec<Ttlv> {
    vec![
        Ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
        Ttlv::enumeration(tag::KEY_FORMAT_TYPE, enums::KEY_FORMAT_RAW),
    ]
}

/// Get Attributes: the key's State (and its algorithm and length).
pub fn get_state(uid: &str) -> Vec<Ttlv> {
    vec![
        Ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
        Ttlv::text(tag::ATTRIBUTE_NAME, "State"),
    ]
}

/// Revoke with reason Cessation of Operation (the key becomes Deactivated).
pub fn revoke(uid: &str) -> Vec<Ttlv> {
    vec![
        Ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
        Ttlv::structure(
            tag::REVOCATION_REASON,
            vec![Ttlv::enumeration(
                tag::REVOCATION_REASON_CODE,
                enums::REVOCATION_CESSATION_OF_OPERATION,
            )],
        ),
    ]
}

/// Encrypt with AES-GCM, tag length 16. `iv` None lets the server choose it.
pub fn encrypt_gcm(uid: &str, data: &[u8], iv: Option<&[u8]>, aad: &[u8]) -> Vec<Ttlv> {
    let mut p = vec![
        Ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
        gcm_parameters(),
        Ttlv::bytes(tag::DATA, data),
    ];
    if let Some(iv) = iv {
        p.push(Ttlv::bytes(tag::IV_COUNTER_NONCE, iv));
    }
    p.push(Ttlv::bytes(
        tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
        aad,
    ));
    p
}

/// Decrypt with AES-GCM, tag length 16.
pub fn decrypt_gcm(
    uid: &str,
    ciphertext: &[u8],
    iv: &[u8],
    aad: &[u8],
    gcm_tag: &[u8],
) -> Vec<Ttlv> {
    vec![
        Ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
        gcm_parameters(),
        Ttlv::bytes(tag::DATA, ciphertext),
        Ttlv::bytes(tag::IV_COUNTER_NONCE, iv),
        Ttlv::bytes(tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA, aad),
        Ttlv::bytes(tag::AUTHENTICATED_ENCRYPTION_TAG, gcm_tag),
    ]
}

/// Discover Versions; an empty list asks for every version the server supports.
pub fn discover_versions() -> Vec<Ttlv> {
    vec![]
}

/// Query server information (vendor identification).
pub fn query_server_information() -> Vec<Ttlv> {
    vec![Ttlv::enumeration(
        tag::QUERY_FUNCTION,
        enums::QUERY_SERVER_INFORMATION,
    )]
}

/// RNG Retrieve `len` bytes (KMIP 1.3+).
pub fn rng_retrieve(len: usize) -> Vec<Ttlv> {
    vec![Ttlv::integer(
        tag::DATA_LENGTH,
        i32::try_from(len).unwrap_or(i32::MAX),
    )]
}

// ---- response payload parsers ----

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses kmip-1.4-ttlv-samples.txt (copied verbatim below) into
    /// `(section title, request bytes, response bytes)`.
    fn samples() -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let text = include_str!("testdata/kmip-1.4-ttlv-samples.txt");
        let mut out = Vec::new();
        let mut title = String::new();
        let mut req = None;
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if let Some(t) = l.strip_prefix("## ") {
                title = t.to_string();
            } else if l.starts_with("request (") {
                req = Some(unhex(lines.next().unwrap()));
            } else if l.starts_with("response (") {
                out.push((
                    title.clone(),
                    req.take().unwrap(),
                    unhex(lines.next().unwrap()),
                ));
            }
        }
        out
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.trim().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn sample(prefix: &str) -> (Vec<u8>, Ttlv) {
        let (_, req, resp) = samples()
            .into_iter()
            .find(|s| s.0.starts_with(prefix))
            .unwrap();
        (req, Ttlv::decode(&resp).unwrap())
    }

    fn uid_payload() -> Vec<Ttlv> {
        uid_only("1")
    }

    #[test]
    fn all_captured_samples_decode_and_reencode_identically() {
        let s = samples();
        assert_eq!(s.len(), 8);
        for (title, req, resp) in s {
            for bytes in [&req, &resp] {
                let t = Ttlv::decode(bytes).unwrap_or_else(|e| panic!("{title}: {e}"));
                assert_eq!(t.to_bytes().as_slice(), bytes.as_slice(), "{title}");
            }
        }
    }

    #[test]
    fn our_requests_match_captured_bytes() {
        let (req, _) = sample("Locate");
        // The capture has only the Name attribute; ours adds Object Type first.
        let mut payload = locate_by_name("kmfs-ttlv-sample");
        payload.remove(0);
        assert_eq!(
            request(Operation::Locate, payload, None)
                .to_bytes()
                .as_slice(),
            req.as_slice()
        );

        let (req, _) = sample("Encrypt");
        let iv: Vec<u8> = (0..12).collect();
        let p = encrypt_gcm("1", &[0u8; 32], Some(&iv), b"kmfs");
        assert_eq!(
            request(Operation::Encrypt, p, None).to_bytes().as_slice(),
            req.as_slice()
        );

        let (req, _) = sample("Decrypt");
        let ct = unhex("4702d61bc5e5c21b8d41978bb1e9786d83d68734f07b5f7c3867e5851d6900b2");
        let tg = unhex("0f17a25dfef4b0a200ae855ec0f99dda");
        let p = decrypt_gcm("1", &ct, &iv, b"kmfs", &tg);
        assert_eq!(
            request(Operation::Decrypt, p, None).to_bytes().as_slice(),
            req.as_slice()
        );

        let (req, _) = sample("Revoke");
        assert_eq!(
            request(Operation::Revoke, revoke("1"), None)
                .to_bytes()
                .as_slice(),
            req.as_slice()
        );
        let (req, _) = sample("DiscoverVersions");
        assert_eq!(
            request(Operation::DiscoverVersions, discover_versions(), None)
                .to_bytes()
                .as_slice(),
            req.as_slice()
        );
        let (req, _) = sample("Get");
        assert_eq!(
            request(Operation::Get, uid_payload(), None)
                .to_bytes()
                .as_slice(),
            req.as_slice()
        );
    }

    #[test]
    fn create_request_matches_capture_except_mask() {
        let (req, _) = sample("Create");
        let mut ours =
            request(Operation::Create, create_aes256("kmfs-ttlv-created"), None).to_bytes();
        // The capture used mask Encrypt|Decrypt (0x0c); kmfs adds Wrap|Unwrap (0x3c).
        let pos = ours.windows(4).position(|w| w == [0, 0, 0, 0x3c]).unwrap();
        ours[pos + 3] = 0x0c;
        assert_eq!(ours.as_slice(), req.as_slice());
    }

    #[test]
    fn captured_responses_parse() {
        let (_, r) = sample("Create");
        assert_eq!(
            parse_uid(&parse_response(&r, Operation::Create).unwrap()).unwrap(),
            "2"
        );
        let (_, r) = sample("Locate");
        assert_eq!(
            parse_uids(&parse_response(&r, Operation::Locate).unwrap()).unwrap(),
            ["1"]
        );
        let (_, r) = sample("Encrypt");
        let e = parse_encrypt(&parse_response(&r, Operation::Encrypt).unwrap()).unwrap();
        assert_eq!(
            e.data,
            unhex("4702d61bc5e5c21b8d41978bb1e9786d83d68734f07b5f7c3867e5851d6900b2")
        );
        assert_eq!(e.tag.unwrap(), unhex("0f17a25dfef4b0a200ae855ec0f99dda"));
        assert!(e.iv.is_none());
        let (_, r) = sample("Decrypt");
        let d = parse_data_secret(&parse_response(&r, Operation::Decrypt).unwrap()).unwrap();
        assert_eq!(d.as_bytes(), &[0u8; 32]);
        let (_, r) = sample("Get");
        let k = parse_get_symmetric_key(&parse_response(&r, Operation::Get).unwrap()).unwrap();
        assert_eq!(k.as_bytes(), (0u8..32).collect::<Vec<_>>().as_slice());
        let (_, r) = sample("Revoke");
        assert_eq!(
            parse_uid(&parse_response(&r, Operation::Revoke).unwrap()).unwrap(),
            "1"
        );
        let (_, r) = sample("DiscoverVersions");
        let v = parse_versions(&parse_response(&r, Operation::DiscoverVersions).unwrap()).unwrap();
        assert_eq!(v, ["2.0", "1.4", "1.3", "1.2", "1.1", "1.0"]);
    }

    #[test]
    fn wrong_operation_and_failures_are_reported() {
        let (_, r) = sample("Locate");
        let e = parse_response(&r, Operation::Get).unwrap_err();
        assert!(matches!(e, ResponseError::Malformed(_)), "{e}");
        let fail = Ttlv::structure(
            tag::RESPONSE_MESSAGE,
            vec![
                Ttlv::structure(
                    tag::RESPONSE_HEADER,
                    vec![
                        protocol_version(),
                        Ttlv::datetime(tag::TIME_STAMP, 1),
                        Ttlv::integer(tag::BATCH_COUNT, 1),
                    ],
                ),
                Ttlv::structure(
                    tag::BATCH_ITEM,
                    vec![
                        Ttlv::enumeration(tag::OPERATION, Operation::Decrypt as u32),
                        Ttlv::enumeration(tag::RESULT_STATUS, 1),
                        Ttlv::enumeration(tag::RESULT_REASON, reason::PERMISSION_DENIED),
                        Ttlv::text(tag::RESULT_MESSAGE, "Not\nallowed"),
                    ],
                ),
            ],
        );
        let bytes = fail.to_bytes();
        let e = parse_response(&Ttlv::decode(&bytes).unwrap(), Operation::Decrypt).unwrap_err();
        assert_eq!(e.to_string(), "PERMISSION_DENIED: Not allowed");
    }

    #[test]
    fn credential_is_encoded_before_batch_count_and_redacted() {
        let pw = Secret::from_slice(b"s3cret");
        let cred = Credential {
            username: "kmfs",
            password: Some(&pw),
        };
        let r = request(Operation::Query, query_server_information(), Some(&cred));
        let hdr = r.child(tag::REQUEST_HEADER).unwrap().items().unwrap();
        assert_eq!(hdr[1].tag, tag::AUTHENTICATION);
        assert_eq!(hdr[2].tag, tag::BATCH_COUNT);
        assert!(!format!("{r:?}").contains("s3cret"));
        let bytes = r.to_bytes();
        assert!(bytes.windows(6).any(|w| w == b"s3cret"));
    }
}
