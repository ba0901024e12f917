//! Cryptographic primitives: key handling, AES-256-XTS, name encryption.

pub mod keys;
