//! KMIP Tag-Type-Length-Value (TTLV) encoding, KMIP 1.x section 9.1.
//!
//! Every item is `tag (3 bytes) ‖ type (1) ‖ length (4, big endian) ‖ value`,
//! with the value padded with zeros to a multiple of 8 bytes. Structures hold a
//! sequence of items whose padded sizes add up exactly to the structure length.
//!
//! The decoder is strict about lengths and types and never panics on any input
//! (see the proptest below): truncated items, lengths that overrun their parent,
//! unknown types, invalid UTF-8 and absurd nesting all give a [`TtlvError`].
//!
//! Byte strings, big integers and text strings are held in [`Zeroizing`] buffers
//! because they may carry a DEK, a KEK (Get) or a password, and the `Debug`
//! output of a [`Ttlv`] never shows their bytes (only their length), nor the
//! text of a Password item.

use std::fmt;

use zeroize::Zeroizing;

/// Deepest structure nesting accepted by the decoder (KMIP messages use < 10).
pub const MAX_DEPTH: usize = 32;

/// Tags used by kmfs (KMIP 1.4 section 9.1.3.1).
pub mod tag {
    pub const APPLICATION_SPECIFIC_INFORMATION: u32 = 0x420004;
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const AUTHENTICATION: u32 = 0x42000C;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CREDENTIAL: u32 = 0x420023;
    pub const CREDENTIAL_TYPE: u32 = 0x420024;
    pub const CREDENTIAL_VALUE: u32 = 0x420025;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42002A;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const CRYPTOGRAPHIC_USAGE_MASK: u32 = 0x42002C;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const KEY_BLOCK: u32 = 0x420040;
    pub const KEY_FORMAT_TYPE: u32 = 0x420042;
    pub const KEY_MATERIAL: u32 = 0x420043;
    pub const KEY_VALUE: u32 = 0x420045;
    pub const KEY_WRAPPING_DATA: u32 = 0x420046;
    pub const MAXIMUM_ITEMS: u32 = 0x42004F;
    pub const NAME: u32 = 0x420053;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const QUERY_FUNCTION: u32 = 0x420074;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_HEADER: u32 = 0x42007A;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const REVOCATION_REASON: u32 = 0x420081;
    pub const REVOCATION_REASON_CODE: u32 = 0x420082;
    pub const STATE: u32 = 0x42008D;
    pub const SYMMETRIC_KEY: u32 = 0x42008F;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
    pub const TIME_STAMP: u32 = 0x420092;
    pub const UNIQUE_BATCH_ITEM_ID: u32 = 0x420093;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const USERNAME: u32 = 0x420099;
    pub const VENDOR_IDENTIFICATION: u32 = 0x42009D;
    pub const PASSWORD: u32 = 0x4200A1;
    pub const DATA: u32 = 0x4200C2;
    pub const DATA_LENGTH: u32 = 0x4200C4;
    pub const TAG_LENGTH: u32 = 0x4200CE;
    pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: u32 = 0x4200FE;
    pub const AUTHENTICATED_ENCRYPTION_TAG: u32 = 0x4200FF;
}

/// A readable name for the tags kmfs uses, for error messages.
pub fn tag_name(t: u32) -> String {
    let name = match t {
        tag::ATTRIBUTE => "Attribute",
        tag::ATTRIBUTE_NAME => "AttributeName",
        tag::ATTRIBUTE_VALUE => "AttributeValue",
        tag::BATCH_COUNT => "BatchCount",
        tag::BATCH_ITEM => "BatchItem",
        tag::CRYPTOGRAPHIC_ALGORITHM => "CryptographicAlgorithm",
        tag::CRYPTOGRAPHIC_LENGTH => "CryptographicLength",
        tag::DATA => "Data",
        tag::IV_COUNTER_NONCE => "IVCounterNonce",
        tag::KEY_BLOCK => "KeyBlock",
        tag::KEY_FORMAT_TYPE => "KeyFormatType",
        tag::KEY_MATERIAL => "KeyMaterial",
        tag::KEY_VALUE => "KeyValue",
        tag::OPERATION => "Operation",
        tag::PROTOCOL_VERSION => "ProtocolVersion",
        tag::RESPONSE_HEADER => "ResponseHeader",
        tag::RESPONSE_MESSAGE => "ResponseMessage",
        tag::RESPONSE_PAYLOAD => "ResponsePayload",
        tag::RESULT_STATUS => "ResultStatus",
        tag::SYMMETRIC_KEY => "SymmetricKey",
        tag::UNIQUE_IDENTIFIER => "UniqueIdentifier",
        tag::AUTHENTICATED_ENCRYPTION_TAG => "AuthenticatedEncryptionTag",
        _ => return format!("tag 0x{t:06x}"),
    };
    name.to_string()
}

/// TTLV item types (KMIP 1.4 section 9.1.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ItemType {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
}

impl ItemType {
    fn from_u8(b: u8) -> Option<ItemType> {
        Some(match b {
            0x01 => ItemType::Structure,
            0x02 => ItemType::Integer,
            0x03 => ItemType::LongInteger,
            0x04 => ItemType::BigInteger,
            0x05 => ItemType::Enumeration,
            0x06 => ItemType::Boolean,
            0x07 => ItemType::TextString,
            0x08 => ItemType::ByteString,
            0x09 => ItemType::DateTime,
            0x0A => ItemType::Interval,
            _ => return None,
        })
    }
}

/// The value of one TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    Structure(Vec<Ttlv>),
    Integer(i32),
    LongInteger(i64),
    /// Big-endian two's complement, a multiple of 8 bytes.
    BigInteger(Zeroizing<Vec<u8>>),
    Enumeration(u32),
    Boolean(bool),
    TextString(Zeroizing<String>),
    ByteString(Zeroizing<Vec<u8>>),
    /// Seconds since the Unix epoch.
    DateTime(i64),
    Interval(u32),
}

impl Value {
    pub fn item_type(&self) -> ItemType {
        match self {
            Value::Structure(_) => ItemType::Structure,
            Value::Integer(_) => ItemType::Integer,
            Value::LongInteger(_) => ItemType::LongInteger,
            Value::BigInteger(_) => ItemType::BigInteger,
            Value::Enumeration(_) => ItemType::Enumeration,
            Value::Boolean(_) => ItemType::Boolean,
            Value::TextString(_) => ItemType::TextString,
            Value::ByteString(_) => ItemType::ByteString,
            Value::DateTime(_) => ItemType::DateTime,
            Value::Interval(_) => ItemType::Interval,
        }
    }
}

/// One TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub struct Ttlv {
    pub tag: u32,
    pub value: Value,
}

/// Decoding or navigation failure. Never contains item contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlvError {
    #[error("truncated TTLV item at byte {at}")]
    Truncated { at: usize },
    #[error("unknown TTLV item type 0x{ty:02x} for {tag} at byte {at}", tag = tag_name(*tag))]
    BadType { tag: u32, ty: u8, at: usize },
    #[error("invalid length {len} for a {ty:?} item ({tag}) at byte {at}", tag = tag_name(*tag))]
    BadLength {
        tag: u32,
        ty: ItemType,
        len: u32,
        at: usize,
    },
    #[error("invalid boolean value in {tag}", tag = tag_name(*tag))]
    BadBoolean { tag: u32 },
    #[error("text string {tag} is not valid UTF-8", tag = tag_name(*tag))]
    BadUtf8 { tag: u32 },
    #[error("{count} unexpected bytes after the TTLV item")]
    Trailing { count: usize },
    #[error("TTLV structures nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("missing {tag} in {parent}", tag = tag_name(*tag), parent = tag_name(*parent))]
    Missing { tag: u32, parent: u32 },
    #[error("{tag} is a {found:?}, expected {expected:?}", tag = tag_name(*tag))]
    WrongType {
        tag: u32,
        expected: ItemType,
        found: ItemType,
    },
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

impl Ttlv {
    pub fn new(tag: u32, value: Value) -> Ttlv {
        Ttlv { tag, value }
    }
    pub fn structure(tag: u32, items: Vec<Ttlv>) -> Ttlv {
        Ttlv::new(tag, Value::Structure(items))
    }
    pub fn integer(tag: u32, v: i32) -> Ttlv {
        Ttlv::new(tag, Value::Integer(v))
    }
    pub fn long(tag: u32, v: i64) -> Ttlv {
        Ttlv::new(tag, Value::LongInteger(v))
    }
    pub fn enumeration(tag: u32, v: u32) -> Ttlv {
        Ttlv::new(tag, Value::Enumeration(v))
    }
    pub fn boolean(tag: u32, v: bool) -> Ttlv {
        Ttlv::new(tag, Value::Boolean(v))
    }
    pub fn text(tag: u32, v: &str) -> Ttlv {
        Ttlv::new(tag, Value::TextString(Zeroizing::new(v.to_string())))
    }
    pub fn bytes(tag: u32, v: &[u8]) -> Ttlv {
        Ttlv::new(tag, Value::ByteString(Zeroizing::new(v.to_vec())))
    }
    pub fn datetime(tag: u32, v: i64) -> Ttlv {
        Ttlv::new(tag, Value::DateTime(v))
    }

    /// Length of the value field, without padding.
    fn value_len(&self) -> usize {
        match &self.value {
            Value::Structure(items) => items.iter().map(Ttlv::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_) | Value::Boolean(_) | Value::DateTime(_) => 8,
            Value::BigInteger(b) => padded(b.len()),
            Value::TextString(s) => s.len(),
            Value::ByteString(b) => b.len(),
        }
    }

    /// Encoded size of this item including header and padding.
    pub fn encoded_len(&self) -> usize {
        8 + padded(self.value_len())
    }

    /// Encodes this item. The buffer is allocated once at its final size so that
    /// no partial copy of secret contents is left behind by reallocation.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.encoded_len()));
        self.encode_into(&mut out);
        debug_assert_eq!(out.len(), self.encoded_len());
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let len = self.value_len();
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        out.push(self.value.item_type() as u8);
        let len32 = u32::try_from(len).expect("TTLV item larger than 4 GiB");
        out.extend_from_slice(&len32.to_be_bytes());
        let start = out.len();
        match &self.value {
            Value::Structure(items) => items.iter().for_each(|i| i.encode_into(out)),
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) | Value::DateTime(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Boolean(b) => out.extend_from_slice(&u64::from(*b).to_be_bytes()),
            Value::BigInteger(b) => {
                // Sign-extend on the left to a multiple of 8 bytes.
                let fill = if b.first().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                out.resize(out.len() + padded(b.len()) - b.len(), fill);
                out.extend_from_slice(b);
            }
            Value::TextString(s) => out.extend_from_slice(s.as_bytes()),
            Value::ByteString(b) => out.extend_from_slice(b),
        }
        out.resize(start + padded(len), 0);
    }

    /// Decodes exactly one item that fills all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Ttlv, TtlvError> {
        let (item, used) = decode_at(buf, 0, 0)?;
        if used != buf.len() {
            return Err(TtlvError::Trailing {
                count: buf.len() - used,
            });
        }
        Ok(item)
    }

    /// For a message header: `(tag, type, value length)` of the first 8 bytes.
    pub fn peek_header(buf: &[u8; 8]) -> (u32, u8, u32) {
        let tag = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        (tag, buf[3], len)
    }

    // ---- navigation ----

    /// Children of a structure (an error naming the tag otherwise).
    pub fn items(&self) -> Result<&[Ttlv], TtlvError> {
        match &self.value {
            Value::Structure(items) => Ok(items),
            v => Err(self.wrong(ItemType::Structure, v)),
        }
    }

    /// First child with tag `t`, if this is a structure holding one.
    pub fn find(&self, t: u32) -> Option<&Ttlv> {
        match &self.value {
            Value::Structure(items) => items.iter().find(|i| i.tag == t),
            _ => None,
        }
    }

    /// All children with tag `t`.
    pub fn find_all(&self, t: u32) -> impl Iterator<Item = &Ttlv> {
        let items: &[Ttlv] = match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        };
        items.iter().filter(move |i| i.tag == t)
    }

    /// First child with tag `t`, or [`TtlvError::Missing`].
    pub fn child(&self, t: u32) -> Result<&Ttlv, TtlvError> {
        self.items()?
            .iter()
            .find(|i| i.tag == t)
            .ok_or(TtlvError::Missing {
                tag: t,
                parent: self.tag,
            })
    }

    fn wrong(&self, expected: ItemType, found: &Value) -> TtlvError {
        TtlvError::WrongType {
            tag: self.tag,
            expected,
            found: found.item_type(),
        }
    }

    pub fn as_integer(&self) -> Result<i32, TtlvError> {
        match &self.value {
            Value::Integer(v) => Ok(*v),
            v => Err(self.wrong(ItemType::Integer, v)),
        }
    }

    pub fn as_enum(&self) -> Result<u32, TtlvError> {
        match &self.value {
            Value::Enumeration(v) => Ok(*v),
            v => Err(self.wrong(ItemType::Enumeration, v)),
        }
    }

    pub fn as_text(&self) -> Result<&str, TtlvError> {
        match &self.value {
            Value::TextString(s) => Ok(s.as_str()),
            v => Err(self.wrong(ItemType::TextString, v)),
        }
    }

    pub fn as_bytes(&self) -> Result<&[u8], TtlvError> {
        match &self.value {
            Value::ByteString(b) => Ok(b.as_slice()),
            v => Err(self.wrong(ItemType::ByteString, v)),
        }
    }
}

fn decode_at(buf: &[u8], at: usize, depth: usize) -> Result<(Ttlv, usize), TtlvError> {
    if depth > MAX_DEPTH {
        return Err(TtlvError::TooDeep);
    }
    let hdr = buf.get(at..at + 8).ok_or(TtlvError::Truncated { at })?;
    let tag = u32::from_be_bytes([0, hdr[0], hdr[1], hdr[2]]);
    let ty = ItemType::from_u8(hdr[3]).ok_or(TtlvError::BadType {
        tag,
        ty: hdr[3],
        at,
    })?;
    let len32 = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let len = len32 as usize;
    let bad_len = TtlvError::BadLength {
        tag,
        ty,
        len: len32,
        at,
    };
    let fixed = match ty {
        ItemType::Integer | ItemType::Enumeration | ItemType::Interval => Some(4),
        ItemType::LongInteger | ItemType::Boolean | ItemType::DateTime => Some(8),
        _ => None,
    };
    if fixed.is_some_and(|f| f != len)
        || (ty == ItemType::BigInteger && (len == 0 || !len.is_multiple_of(8)))
        || (ty == ItemType::Structure && !len.is_multiple_of(8))
    {
        return Err(bad_len);
    }
    let start = at + 8;
    let total = padded(len);
    let end = start
        .checked_add(total)
        .ok_or(TtlvError::Truncated { at })?;
    if end > buf.len() {
        return Err(TtlvError::Truncated { at });
    }
    let v = &buf[start..start + len];
    let value = match ty {
        ItemType::Structure => {
            let mut items = Vec::new();
            let mut pos = start;
            while pos < end {
                let (item, used) = decode_at(&buf[..end], pos, depth + 1)?;
                items.push(item);
                pos += used;
            }
            Value::Structure(items)
        }
        ItemType::Integer => Value::Integer(i32::from_be_bytes(
            v.try_into().map_err(|_| bad_len.clone())?,
        )),
        ItemType::Enumeration => Value::Enumeration(u32::from_be_bytes(
            v.try_into().map_err(|_| bad_len.clone())?,
        )),
        ItemType::Interval => Value::Interval(u32::from_be_bytes(
            v.try_into().map_err(|_| bad_len.clone())?,
        )),
        ItemType::LongInteger => Value::LongInteger(i64::from_be_bytes(
            v.try_into().map_err(|_| bad_len.clone())?,
        )),
        ItemType::DateTime => Value::DateTime(i64::from_be_bytes(
            v.try_into().map_err(|_| bad_len.clone())?,
        )),
        ItemType::Boolean => match u64::from_be_bytes(v.try_into().map_err(|_| bad_len.clone())?) {
            0 => Value::Boolean(false),
            1 => Value::Boolean(true),
            _ => return Err(TtlvError::BadBoolean { tag }),
        },
        ItemType::BigInteger => Value::BigInteger(Zeroizing::new(v.to_vec())),
        ItemType::ByteString => Value::ByteString(Zeroizing::new(v.to_vec())),
        ItemType::TextString => {
            let bytes = Zeroizing::new(v.to_vec());
            match std::str::from_utf8(&bytes) {
                Ok(s) => Value::TextString(Zeroizing::new(s.to_string())),
                Err(_) => return Err(TtlvError::BadUtf8 { tag }),
            }
        }
    };
    Ok((Ttlv { tag, value }, end - at))
}

impl fmt::Debug for Ttlv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", tag_name(self.tag))?;
        match &self.value {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "{v}"),
            Value::LongInteger(v) => write!(f, "{v}L"),
            Value::Enumeration(v) => write!(f, "enum(0x{v:x})"),
            Value::Interval(v) => write!(f, "interval({v})"),
            Value::DateTime(v) => write!(f, "datetime({v})"),
            Value::Boolean(b) => write!(f, "{b}"),
            Value::TextString(_) if self.tag == tag::PASSWORD => write!(f, "<redacted>"),
            Value::TextString(s) => write!(f, "{:?}", s.as_str()),
            Value::ByteString(b) => write!(f, "<{} bytes>", b.len()),
            Value::BigInteger(b) => write!(f, "<big integer, {} bytes>", b.len()),
        }
    }
}

#[cfg(test)]
mod tests;
