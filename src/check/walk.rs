//! The walk of `kmfs check`: one directory (its id, entries, leftovers of
//! interrupted operations) and the plaintext name of an entry.

use super::*;

impl Checker<'_> {
    /// A leftover entry `name` of `dfd` that `--repair` removes.
    fn removable(&mut self, dfd: BorrowedFd<'_>, name: &OsStr, brel: &Path, what: &str) {
        let i = self.find(Severity::Leftover, brel, None, what.into());
        if self.repair {
            self.repaired(i, unlink(dfd, name, 0), "removed");
        }
    }

    /// Checks directory `rel`, open as `dfd` (plaintext path `plain`, if
    /// its names decrypt).
    pub(super) fn dir(&mut self, dfd: BorrowedFd<'_>, rel: &Path, plain: Option<PathBuf>) {
        self.report.directories += 1;
        let abs = fd_dir(dfd);
        let at_root = rel.as_os_str().is_empty();
        let encrypted = !self.vol.header.plaintext_names();
        let key: Option<([u8; DIR_ID_LEN], u16)> = if encrypted {
            match dirid::read_at(dfd) {
                Ok((id, g)) if self.vol.keys.generations.get(g).is_some() => Some((id, g)),
                Ok((_, g)) => {
                    self.find(
                        Severity::Error,
                        &rel.join(dirid::DIRID_FILE),
                        plain.as_deref(),
                        format!("the names in this directory use key generation {g}, which the volume header does not hold"),
                    );
                    None
                }
                Err(e) => {
                    self.find(
                        Severity::Error,
                        &rel.join(dirid::DIRID_FILE),
                        plain.as_deref(),
                        format!("directory id missing or damaged ({e}): the names in this directory cannot be decrypted"),
                    );
                    None
                }
            }
        } else {
            None
        };
        let owner = if encrypted {
            key.map(|(id, _)| id)
        } else {
            Some(NO_OWNER)
        };
        // `abs` is a /proc/self/fd link: "." makes each_xattr (O_NOFOLLOW)
        // open the directory, not the link.
        self.xattrs(&abs.join("."), rel, plain.as_deref(), owner);
        let mut entries: Vec<(OsString, fs::Metadata)> = match fs::read_dir(&abs) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| Some((e.file_name(), e.metadata().ok()?)))
                .collect(),
            Err(e) => {
                self.find(
                    Severity::Error,
                    rel,
                    plain.as_deref(),
                    format!("cannot list: {e}"),
                );
                return;
            }
        };
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let present: std::collections::HashSet<Vec<u8>> =
            entries.iter().map(|(n, _)| n.as_bytes().to_vec()).collect();
        for (name, md) in &entries {
            self.tick();
            let b = name.as_bytes();
            let brel = rel.join(name);
            let kind = BackingKind::classify(b);
            if kind == BackingKind::DirId || (at_root && kind.is_root_file()) {
                continue;
            }
            // Temporary files of atomic writes (header, backups, directory
            // ids, rekey state): a crash between create and rename leaves them.
            if kind == BackingKind::Temp && md.is_file() {
                self.removable(
                    dfd,
                    name,
                    &brel,
                    "temporary file of an interrupted atomic write",
                );
                continue;
            }
            if kind == BackingKind::TempEntry && md.is_dir() {
                self.half_created_dir(dfd, name, &brel, md);
                continue;
            }
            if kind == BackingKind::TempEntry && md.file_type().is_symlink() {
                // A symlink re-created for a rename or a rekey, never renamed
                // into place: the entry it was for still has its own.
                self.removable(
                    dfd,
                    name,
                    &brel,
                    "symlink whose re-creation was interrupted (a rename or rekey)",
                );
                continue;
            }
            if kind == BackingKind::LongSidecar {
                let entry = &b[..b.len() - names::LONG_SUFFIX.len()];
                if !present.contains(entry) {
                    self.removable(dfd, name, &brel, "long-name sidecar without its entry");
                }
                continue;
            }
            // The plaintext name of this entry.
            let pname: Option<OsString> = if !encrypted {
                if names::is_reserved(b) {
                    self.find(Severity::Warning, &brel, None, "unknown kmfs file".into());
                    None
                } else {
                    Some(name.clone())
                }
            } else if let Some((id, g)) = key {
                self.decrypt_name(dfd, &brel, plain.as_deref(), &id, g, b)
            } else {
                None
            };
            let pchild = match (&plain, &pname) {
                (Some(p), Some(n)) => Some(p.join(n)),
                _ => None,
            };
            let ft = md.file_type();
            if ft.is_dir() {
                match open_subdir(dfd, name).and_then(|c| same_as_scanned(c.as_fd(), md).map(|_| c))
                {
                    Ok(child) => self.dir(child.as_fd(), &brel, pchild),
                    Err(e) => {
                        self.find(
                            Severity::Error,
                            &brel,
                            pchild.as_deref(),
                            format!("cannot open directory: {e}"),
                        );
                    }
                }
            } else if ft.is_file() {
                self.file(dfd, name, &brel, pchild.as_deref(), md);
            } else if ft.is_symlink() {
                let place = match (&pname, key) {
                    (Some(n), Some((id, _))) => Some((id, n.as_bytes().to_vec())),
                    (Some(n), None) if !encrypted => {
                        Some(([0u8; DIR_ID_LEN], n.as_bytes().to_vec()))
                    }
                    _ => None,
                };
                self.symlink(&abs.join(name), &brel, pchild.as_deref(), place);
            } else {
                self.report.other += 1;
            }
        }
    }

    /// The plaintext name of backing entry `b` in a directory with id `id`.
    pub(super) fn decrypt_name(
        &mut self,
        dfd: BorrowedFd<'_>,
        brel: &Path,
        parent: Option<&Path>,
        id: &[u8; DIR_ID_LEN],
        g: u16,
        b: &[u8],
    ) -> Option<OsString> {
        // The entry's own name is what is wrong: say which directory it is in.
        let inside = parent
            .map(|p| format!(" (in {})", p.display()))
            .unwrap_or_default();
        let plain: Option<&Path> = None;
        let s = std::str::from_utf8(b).ok();
        let full = if names::is_long(b) {
            match internal::read_sidecar(dfd, b) {
                Ok(c) => c,
                Err(e @ internal::SidecarError::Mismatch) => {
                    self.find(Severity::Error, brel, plain, format!("{e}{inside}"));
                    return None;
                }
                Err(e) => {
                    self.find(Severity::Error, brel, plain, format!("{e}{inside}"));
                    return None;
                }
            }
        } else if names::is_reserved(b) {
            self.find(
                Severity::Warning,
                brel,
                plain,
                format!("unknown kmfs file{inside}"),
            );
            return None;
        } else {
            match s {
                Some(s) => s.to_string(),
                None => {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        format!("name does not decrypt in this directory (not base64url){inside}"),
                    );
                    return None;
                }
            }
        };
        let keys = self.vol.keys.generations.get(g)?;
        match keys.names.decrypt(id, &full) {
            Ok(n) => Some(OsString::from_vec(n)),
            Err(_) => {
                self.find(
                    Severity::Error,
                    brel,
                    plain,
                    format!("name does not decrypt in this directory{inside}: moved here from another directory, or damaged; invisible through the mount"),
                );
                None
            }
        }
    }

    pub(super) fn half_created_dir(
        &mut self,
        dfd: BorrowedFd<'_>,
        name: &OsStr,
        brel: &Path,
        md: &fs::Metadata,
    ) {
        let child = open_subdir(dfd, name).and_then(|c| same_as_scanned(c.as_fd(), md).map(|_| c));
        let only_id = child.as_ref().is_ok_and(|c| {
            fs::read_dir(fd_dir(c.as_fd()))
                .map(|rd| rd.flatten().all(|e| e.file_name() == dirid::DIRID_FILE))
                .unwrap_or(false)
        });
        if let (Ok(child), true) = (child, only_id) {
            let i = self.find(
                Severity::Leftover,
                brel,
                None,
                "directory whose creation was interrupted (empty)".into(),
            );
            if self.repair {
                let r = unlink(child.as_fd(), OsStr::new(dirid::DIRID_FILE), 0)
                    .or_else(|e| {
                        if e.kind() == io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .and_then(|_| unlink(dfd, name, libc::AT_REMOVEDIR));
                self.repaired(i, r, "removed");
            }
        } else {
            self.find(
                Severity::Warning,
                brel,
                None,
                "directory whose creation was interrupted, but it holds entries; left alone".into(),
            );
        }
    }
}
