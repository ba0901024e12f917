//! What `kmfs check` verifies of one entry: a file's header and id, a
//! symlink's target, an inode's encrypted extended attributes.

use super::*;

impl Checker<'_> {
    pub(super) fn file(
        &mut self,
        dfd: BorrowedFd<'_>,
        name: &OsStr,
        brel: &Path,
        plain: Option<&Path>,
        md: &fs::Metadata,
    ) {
        self.report.files += 1;
        let at = fd_dir(dfd).join(name);
        let owner = rekey::metadata::owner_of(&at, md, self.vol.header.plaintext_names());
        self.xattrs(&at, brel, plain, owner);
        let len = md.len();
        if len == 0 {
            return;
        }
        let Ok(cname) = sys::cstr(name.as_bytes()) else {
            return;
        };
        if len < HEADER_LEN {
            let i = self.find(
                Severity::Leftover,
                brel,
                plain,
                format!("file header incomplete ({len} of {HEADER_LEN} bytes; a crash while creating it): reads as empty"),
            );
            if self.repair {
                // Only the file examined, and only while it is still torn.
                let r = internal::open(dfd, &cname, libc::O_WRONLY, HEADER_LEN - 1)
                    .and_then(|f| same_as_scanned(f.as_fd(), md).and_then(|_| f.set_len(0)));
                self.repaired(i, r, "truncated to empty");
            }
            return;
        }
        self.report.bytes += len - HEADER_LEN;
        let hd = internal::open(dfd, &cname, libc::O_RDONLY, u64::MAX).and_then(|f| {
            same_as_scanned(f.as_fd(), md)?;
            FileHeader::read_from(&f)
        });
        match hd {
            Ok(Some(h)) => {
                if self.vol.keys.generations.get(h.generation).is_none() {
                    self.find(
                        Severity::Error,
                        brel,
                        plain,
                        format!("file uses key generation {}, which the volume header does not hold: unreadable", h.generation),
                    );
                }
                self.file_id(h.file_id, brel, plain, identity(md));
            }
            Ok(None) => {}
            Err(e) => {
                self.find(
                    Severity::Error,
                    brel,
                    plain,
                    format!("damaged file header: {e}"),
                );
            }
        }
    }

    /// Two backing files (not hard links of one) with the same file id: a
    /// copy of a backing file, e.g. restored beside its original. Both still
    /// read, but they share XTS tweaks, so an observer of both learns where
    /// they hold equal 16-byte blocks.
    pub(super) fn file_id(
        &mut self,
        id: [u8; 16],
        brel: &Path,
        plain: Option<&Path>,
        ino: (u64, u64),
    ) {
        match self.file_ids.get(&id) {
            Some((first, first_ino)) if *first_ino != ino => {
                let what = format!(
                    "has the same file id as backing {} (a copy of a backing file, e.g. restored beside its original): the two share encryption tweaks; copy it through the mount instead and remove this one",
                    first.display()
                );
                self.find(Severity::Warning, brel, plain, what);
            }
            Some(_) => {}
            None => {
                self.file_ids.insert(id, (brel.to_path_buf(), ino));
            }
        }
    }

    /// The encrypted extended attributes of the file or directory `brel`
    /// (at `at`), whose owner id is `owner`: each must authenticate
    /// (AES-GCM, bound to its backing name and owner; unbound ones only
    /// while the volume is not migrated) with a generation the header holds.
    /// A name stored under two generations is what an interrupted rekey
    /// leaves; the next rekey removes the old one.
    pub(super) fn xattrs(
        &mut self,
        at: &Path,
        brel: &Path,
        plain: Option<&Path>,
        owner: Option<[u8; OWNER_LEN]>,
    ) {
        let mut bad: Vec<String> = Vec::new();
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let mut twice = 0;
        let mut unbound = 0;
        let ciphers = &self.xciphers;
        let unbound_ok = self.unbound_ok;
        let r = rekey::metadata::each_xattr(at, &mut |_, n, blob| {
            let opened = ciphers.iter().find_map(|(_, c)| {
                let o = c.open(n, blob, owner.as_ref(), unbound_ok)?;
                // The value names the attribute it belongs to; the backing
                // name must be that name's encoding under the same key.
                (c.map_name(&o.name).ok()? == Mapped::Encrypted(n.to_vec())).then_some(o)
            });
            match opened {
                Some(o) => {
                    if !o.bound {
                        unbound += 1;
                    }
                    if seen.contains(&o.name) {
                        twice += 1
                    } else {
                        seen.push(o.name)
                    }
                }
                None => bad.push(String::from_utf8_lossy(n).into_owned()),
            }
            Ok(())
        });
        self.unbound += unbound;
        if let Err(e) = r {
            self.find(
                Severity::Error,
                brel,
                plain,
                format!("cannot list extended attributes: {e}"),
            );
            return;
        }
        for n in bad {
            self.find(
                Severity::Error,
                brel,
                plain,
                format!("extended attribute {n} does not authenticate with any key generation the header holds, bound to this file (damaged, foreign, or copied from another file): unreadable"),
            );
        }
        if twice > 0 {
            self.find(
                Severity::Warning,
                brel,
                plain,
                format!("{twice} extended attribute(s) stored under two key generations (an interrupted rekey); the copy on the newest generation is used and the next rekey removes the other"),
            );
        }
    }

    /// Symlink `brel` (at `at`), whose target is bound to `place` (its
    /// directory id and plaintext name; `None` if its name does not decrypt,
    /// already reported).
    pub(super) fn symlink(
        &mut self,
        at: &Path,
        brel: &Path,
        plain: Option<&Path>,
        place: Option<([u8; DIR_ID_LEN], Vec<u8>)>,
    ) {
        self.report.symlinks += 1;
        let Some((dir_id, name)) = place else {
            return;
        };
        match fs::read_link(at) {
            Ok(t) => {
                let stored = t.as_os_str().as_bytes();
                let place = rekey::metadata::LinkPlace {
                    dir_id,
                    name: &name,
                };
                let all = self.vol.keys.generations.all();
                match rekey::metadata::open_target(&all, &place, stored, self.unbound_ok) {
                    Some((_, bound, _)) => {
                        if !bound {
                            self.unbound += 1;
                        }
                    }
                    None => {
                        self.find(
                            Severity::Error,
                            brel,
                            plain,
                            "symlink target does not decrypt with any key generation the header holds, bound to this name and directory (damaged, or moved or copied from elsewhere): readlink fails"
                                .into(),
                        );
                    }
                }
            }
            Err(e) => {
                self.find(
                    Severity::Error,
                    brel,
                    plain,
                    format!("cannot read symlink: {e}"),
                );
            }
        }
    }
}
