//! The on-disk format: volume header, per-file layout, block I/O.

pub mod content;
pub mod header;
pub mod layout;
