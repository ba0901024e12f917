//! What the rekey tests read from a backing directory: which generation each
//! user file's header names.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Whether a backing entry is one of kmfs's own files: `kmfs.*`, except the
/// data files of long names (`kmfs.long.<hash>`, not their `.name` sidecar).
pub fn own_file(name: &str) -> bool {
    name.starts_with("kmfs.") && (!name.starts_with("kmfs.long.") || name.ends_with(".name"))
}

/// (path, generation) of every user file in the backing tree that has a
/// header (≥ 40 bytes): the big-endian u16 at bytes 6..8. Also checks the
/// file magic, so a wrong guess at the layout fails loudly.
pub fn backing_generations(back: &Path) -> Vec<(PathBuf, u16)> {
    let mut out = Vec::new();
    for p in super::mount::all_files(back) {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !md.is_file() || own_file(&name) || md.len() < 40 {
            continue;
        }
        let mut h = [0u8; 8];
        std::fs::File::open(&p)
            .unwrap()
            .read_exact(&mut h)
            .unwrap_or_else(|err| panic!("{}: {err}", p.display()));
        assert_eq!(&h[..4], b"KMFC", "{} is not a kmfs file", p.display());
        out.push((p, u16::from_be_bytes([h[6], h[7]])));
    }
    out
}

/// How many backing user files are on each generation.
pub fn generation_counts(back: &Path) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for (_, g) in backing_generations(back) {
        *out.entry(g).or_default() += 1;
    }
    out
}
