//! The request half: the Request Message around one batch item, and the
//! payload of each operation kmfs sends.

use super::super::ttlv::{Ttlv, tag};
use super::{GCM_TAG_LEN, Operation, PROTOCOL_MAJOR, PROTOCOL_MINOR, enums};
use crate::crypto::keys::Secret;

/// Optional KMIP Credential (Username and Password, credential type 1).
pub struct Credential<'a> {
    pub username: &'a str,
    pub password: Option<&'a Secret>,
}

pub(super) fn protocol_version() -> Ttlv {
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
