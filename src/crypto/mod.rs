//! Cryptographic primitives: key handling, AES-256-XTS, name encryption.

pub mod content;
pub mod keys;
pub mod names;
pub mod xattr;
pub mod xts;
