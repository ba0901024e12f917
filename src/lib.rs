//! kmfs: a transparent encrypted filesystem with keys on a KMIP key manager or HSM.
//!
//! See docs/ARCHITECTURE.md for the map of the code. Data flows one way:
//! FUSE request (`fs`) → name translation (`crypto::names`) → block I/O
//! (`volume::content`) → crypto (`crypto::xts`) → backing file. Keys come from a
//! `kms::KeyProvider`, which the filesystem layer never sees.

pub mod audit;
pub mod be;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod credfile;
pub mod crypto;
pub mod daemon;
pub mod exitcode;
pub mod fs;
pub mod hex;
pub mod kms;
pub mod logging;
pub mod rekey;
pub mod rotation;
pub mod sync;
pub mod sys;
pub mod volume;
