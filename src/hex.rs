//! Lowercase hexadecimal for non-secret bytes (volume and file ids, hashes,
//! PKCS#11 CKA_IDs): one encoder and one decoder for the whole crate.

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// The bytes of hex text `s` (either case); `None` if it is not hex.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        assert_eq!(encode(&[0, 0xab, 0x10, 0xff]), "00ab10ff");
        assert_eq!(decode("00AB10ff"), Some(vec![0, 0xab, 0x10, 0xff]));
        for bad in ["0", "zz", "+1", "0g"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
