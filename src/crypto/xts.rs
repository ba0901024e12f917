//! AES-256-XTS (IEEE 1619-2007 / NIST SP 800-38E) on the `aes` crate's batched
//! block API.
//!
//! Per data unit the tweak sequence T_j = E_K2(tweak) · α^j is computed first into
//! a small buffer; the data is then whitened with it, encrypted with one batched
//! `encrypt_blocks` call (which pipelines AES-NI/VAES instructions, detected at
//! run time) and whitened again. That keeps the AES unit busy instead of
//! encrypting one 16-byte block at a time as the reference `xts-mode` crate does.
//!
//! Data units of any length ≥ 16 bytes are supported; a length that is not a
//! multiple of 16 uses ciphertext stealing exactly as IEEE 1619 specifies.

use aes::Aes256;
use aes::cipher::array::Array;
use aes::cipher::{Block, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use super::keys::{Locked, Secret};

/// AES block size.
pub const AES_BLOCK: usize = 16;
/// Tweaks are computed for this many AES blocks at a time (the VAES-512
/// backend's parallel batch; a 4 KiB unit takes 4 batches).
const BATCH: usize = 256;

/// Why an XTS call was refused. Lengths are programming errors of the caller, but
/// they are reported, not panicked on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XtsError {
    #[error("XTS data unit of {0} bytes is shorter than one AES block (16 bytes)")]
    TooShort(usize),
    #[error("XTS key must be 64 bytes, got {0}")]
    KeyLength(usize),
    #[error("XTS source of {0} bytes for a destination of {1} bytes")]
    LengthMismatch(usize, usize),
}

struct Keys {
    data: Aes256,
    tweak: Aes256,
}

/// An AES-256-XTS key pair (K1 for data, K2 for tweaks), kept in locked memory.
pub struct Xts256 {
    keys: Locked<Keys>,
}

#[inline]
fn mul_alpha(t: u128) -> u128 {
    // Multiplication by x in GF(2^128) with the XTS (little-endian) convention.
    let carry = (t >> 127) as u8;
    (t << 1) ^ (0x87 * carry as u128)
}

#[inline]
fn xor_in_place(data: &mut [u8], tweaks: &[u8]) {
    for (d, t) in data.iter_mut().zip(tweaks) {
        *d ^= t;
    }
}

#[inline]
fn xor_from(data: &mut [u8], src: &[u8], tweaks: &[u8]) {
    for ((d, s), t) in data.iter_mut().zip(src).zip(tweaks) {
        *d = s ^ t;
    }
}

#[inline]
fn xor_block(block: &mut [u8], t: u128) {
    let v = u128::from_le_bytes(block[..16].try_into().expect("16-byte block")) ^ t;
    block[..16].copy_from_slice(&v.to_le_bytes());
}

impl Xts256 {
    /// Builds the cipher from a 64-byte key: K1 = key[0..32], K2 = key[32..64].
    pub fn new(key: &Secret) -> Result<Xts256, XtsError> {
        if key.len() != 64 {
            return Err(XtsError::KeyLength(key.len()));
        }
        let k = key.as_bytes();
        let data = Aes256::new_from_slice(&k[..32]).map_err(|_| XtsError::KeyLength(key.len()))?;
        let tweak = Aes256::new_from_slice(&k[32..]).map_err(|_| XtsError::KeyLength(key.len()))?;
        Ok(Xts256 {
            keys: Locked::new(Keys { data, tweak }),
        })
    }

    fn initial_tweak(&self, tweak: u128) -> u128 {
        let mut b: Block<Aes256> = Array(tweak.to_le_bytes());
        self.keys.tweak.encrypt_block(&mut b);
        u128::from_le_bytes(b.0)
    }

    /// Encrypts (or decrypts) a whole-block region starting with tweak value
    /// `t` and returns the tweak for the next block. The result lands in
    /// `data`; the input is `src` when given (same length, out of place: the
    /// first whitening pass is the copy) and `data` itself otherwise.
    ///
    /// Tweaks are laid out as bytes next to the data, so both whitening passes
    /// are plain byte-slice XORs that the compiler vectorises.
    fn process_full(
        &self,
        src: Option<&[u8]>,
        data: &mut [u8],
        mut t: u128,
        encrypt: bool,
    ) -> u128 {
        debug_assert_eq!(data.len() % AES_BLOCK, 0);
        debug_assert!(src.is_none_or(|s| s.len() == data.len()));
        let mut tweaks = [0u8; BATCH * AES_BLOCK];
        let mut off = 0;
        while off < data.len() {
            let len = (data.len() - off).min(tweaks.len());
            let tw = &mut tweaks[..len];
            for slot in tw.chunks_exact_mut(AES_BLOCK) {
                slot.copy_from_slice(&t.to_le_bytes());
                t = mul_alpha(t);
            }
            let chunk = &mut data[off..off + len];
            match src {
                Some(s) => xor_from(chunk, &s[off..off + len], tw),
                None => xor_in_place(chunk, tw),
            }
            let (blocks, rest) = Array::slice_as_chunks_mut(chunk);
            debug_assert!(rest.is_empty());
            if encrypt {
                self.keys.data.encrypt_blocks(blocks);
            } else {
                self.keys.data.decrypt_blocks(blocks);
            }
            xor_in_place(chunk, tw);
            off += len;
        }
        t
    }

    fn one_block(&self, block: &mut [u8], t: u128, encrypt: bool) {
        xor_block(block, t);
        let b: &mut Block<Aes256> = (&mut block[..16]).try_into().expect("16-byte block");
        if encrypt {
            self.keys.data.encrypt_block(b);
        } else {
            self.keys.data.decrypt_block(b);
        }
        xor_block(block, t);
    }

    /// Encrypts one data unit in place. `tweak` is the data-unit number (encoded
    /// little-endian as IEEE 1619 specifies). `data.len()` must be ≥ 16.
    pub fn encrypt(&self, data: &mut [u8], tweak: u128) -> Result<(), XtsError> {
        self.unit(None, data, tweak, true)
    }

    /// Encrypts plaintext `src` into `dst` (same length): the same result as
    /// copying and encrypting in place, without the separate copy.
    pub fn encrypt_from(&self, src: &[u8], dst: &mut [u8], tweak: u128) -> Result<(), XtsError> {
        if src.len() != dst.len() {
            return Err(XtsError::LengthMismatch(src.len(), dst.len()));
        }
        self.unit(Some(src), dst, tweak, true)
    }

    /// Decrypts one data unit in place (inverse of [`Xts256::encrypt`]).
    pub fn decrypt(&self, data: &mut [u8], tweak: u128) -> Result<(), XtsError> {
        self.unit(None, data, tweak, false)
    }

    /// One data unit into `data`, read from `src` when given (same length).
    fn unit(
        &self,
        src: Option<&[u8]>,
        data: &mut [u8],
        tweak: u128,
        encrypt: bool,
    ) -> Result<(), XtsError> {
        let len = data.len();
        if len < AES_BLOCK {
            return Err(XtsError::TooShort(len));
        }
        let t0 = self.initial_tweak(tweak);
        let rem = len % AES_BLOCK;
        if rem == 0 {
            self.process_full(src, data, t0, encrypt);
            return Ok(());
        }
        // Ciphertext stealing: all full blocks but the last go the normal way.
        let full = len - rem - AES_BLOCK;
        let t = self.process_full(src.map(|s| &s[..full]), &mut data[..full], t0, encrypt);
        if let Some(s) = src {
            data[full..].copy_from_slice(&s[full..]);
        }
        let t_next = mul_alpha(t);
        // Encrypt: CC = E(P_{m-1}, T_{m-1}); C_m = CC[..rem]; C_{m-1} = E(P_m ‖ CC[rem..], T_m).
        // Decrypt: PP = D(C_{m-1}, T_m); P_m = PP[..rem]; P_{m-1} = D(C_m ‖ PP[rem..], T_{m-1}).
        // Same steps; only the order of the two tweaks differs.
        let (first, second) = if encrypt { (t, t_next) } else { (t_next, t) };
        let (head, tail) = data[full..].split_at_mut(AES_BLOCK);
        self.one_block(head, first, encrypt);
        let mut last = [0u8; AES_BLOCK];
        last[..rem].copy_from_slice(tail);
        last[rem..].copy_from_slice(&head[rem..]);
        tail.copy_from_slice(&head[..rem]);
        self.one_block(&mut last, second, encrypt);
        head.copy_from_slice(&last);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(k1: &str, k2: &str) -> Xts256 {
        let mut k = unhex(k1);
        k.extend(unhex(k2));
        Xts256::new(&Secret::from_vec(k)).unwrap()
    }

    fn check(xts: &Xts256, tweak: u128, pt: &[u8], ct: &[u8]) {
        let mut buf = pt.to_vec();
        xts.encrypt(&mut buf, tweak).unwrap();
        assert_eq!(buf, ct, "encrypt, tweak {tweak:#x}");
        xts.decrypt(&mut buf, tweak).unwrap();
        assert_eq!(buf, pt, "decrypt, tweak {tweak:#x}");
    }

    /// IEEE 1619-2007 Annex B, vector 10 (XTS-AES-256, 512-byte data unit,
    /// data unit sequence number 0xff).
    #[test]
    fn ieee1619_vector_10() {
        let xts = key(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592",
        );
        let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let ct = unhex(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
             5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
             5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
             c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
             2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
             b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
             93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
             583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
             84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
             505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
             9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
             a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
             6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
             645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
             1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
             773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        );
        check(&xts, 0xff, &pt, &ct);
    }

    /// IEEE 1619-2007 Annex B, vector 11 (tweak 0xffff): first and last block
    /// (the last block as computed by OpenSSL 3.0.19 for the same input).
    #[test]
    fn ieee1619_vector_11_first_and_last_blocks() {
        let xts = key(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592",
        );
        let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let mut buf = pt.clone();
        xts.encrypt(&mut buf, 0xffff).unwrap();
        assert_eq!(buf[..16], unhex("77a31251618a15e6b92d1d66dffe7b50")[..]);
        assert_eq!(buf[496..], unhex("a4f9e27b42af8100cb9d59cef9645803")[..]);
        xts.decrypt(&mut buf, 0xffff).unwrap();
        assert_eq!(buf, pt);
    }

    /// Out of place gives the same ciphertext as in place, for whole-block
    /// units and for every ciphertext-stealing remainder.
    #[test]
    fn encrypt_from_matches_in_place() {
        let xts = Xts256::new(&Secret::from_slice(&[9u8; 64])).unwrap();
        for len in [16, 17, 31, 32, 255, 256, 4095, 4096, 4111] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut inplace = pt.clone();
            xts.encrypt(&mut inplace, 77).unwrap();
            let mut out = vec![0xaau8; len];
            xts.encrypt_from(&pt, &mut out, 77).unwrap();
            assert_eq!(out, inplace, "len {len}");
        }
        let mut short = [0u8; 32];
        assert_eq!(
            xts.encrypt_from(&[0u8; 33], &mut short, 0),
            Err(XtsError::LengthMismatch(33, 32))
        );
    }

    #[test]
    fn rejects_short_units_and_bad_keys() {
        let xts = Xts256::new(&Secret::from_slice(&[3u8; 64])).unwrap();
        let mut b = [0u8; 15];
        assert_eq!(xts.encrypt(&mut b, 0), Err(XtsError::TooShort(15)));
        assert_eq!(xts.decrypt(&mut b, 0), Err(XtsError::TooShort(15)));
        assert!(matches!(
            Xts256::new(&Secret::from_slice(&[3u8; 32])),
            Err(XtsError::KeyLength(32))
        ));
    }
}
