use super::*;
use crate::crypto::keys::Secret;

fn keys() -> Vec<(u16, Arc<GenKeys>)> {
    [(0u16, 1u8), (1, 2)]
        .iter()
        .map(|(g, b)| {
            let dek = Secret::from_slice(&[*b; 32]);
            (*g, Arc::new(GenKeys::for_test(&dek, &[3u8; 16])))
        })
        .collect()
}

fn names_in(dir: &Path, k: &GenKeys, id: &[u8; 16]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().as_bytes().to_vec())
        .filter(|b| !names::is_reserved(b) || names::is_long(b))
        .map(|b| {
            let full = if names::is_long(&b) {
                let side = names::long_sidecar(std::str::from_utf8(&b).unwrap());
                std::fs::read_to_string(dir.join(side)).unwrap()
            } else {
                String::from_utf8(b).unwrap()
            };
            k.names
                .decrypt(id, &full)
                .expect("decrypts with the new keys")
        })
        .collect();
    v.sort();
    v
}

/// A directory interrupted half way (some entries renamed, the id still
/// on the old generation) is finished by running it again; symlink
/// targets follow; nothing is lost or doubled.
#[test]
fn a_directory_pass_interrupted_half_way_finishes_on_a_rerun() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let ks = keys();
    let (k0, k1) = (&ks[0].1, &ks[1].1);
    let id = dirid::create(&dir, 0).unwrap();
    let mut want: Vec<Vec<u8>> = Vec::new();
    for i in 0..20 {
        let plain = if i % 5 == 0 {
            format!("{}{i}", "n".repeat(200)).into_bytes()
        } else {
            format!("entry-{i}").into_bytes()
        };
        match k0.names.encrypt(&id, &plain).unwrap() {
            EncodedName::Short(s) => std::fs::write(dir.join(s), b"x").unwrap(),
            EncodedName::Long { backing, full } => {
                std::fs::write(dir.join(&backing), b"x").unwrap();
                std::fs::write(dir.join(names::long_sidecar(&backing)), full).unwrap();
            }
        }
        want.push(plain);
    }
    let link = k0.names.encrypt(&id, b"a link").unwrap();
    let target = k0
        .names
        .encrypt_symlink(&id, b"a link", b"../somewhere")
        .unwrap();
    std::os::unix::fs::symlink(&target, dir.join(link.backing())).unwrap();
    want.push(b"a link".to_vec());
    // An unbound target (a volume of format version 2) is bound on the way.
    let old = k0.names.encrypt(&id, b"old link").unwrap();
    let target = k0.names.encrypt_symlink_unbound(b"/old/target").unwrap();
    std::os::unix::fs::symlink(&target, dir.join(old.backing())).unwrap();
    want.push(b"old link".to_vec());
    want.sort();

    let mut j = Journal::open(d.path()).unwrap();
    // The whole pass, then the id put back: "crashed before the last step".
    rekey_dir(&dir, Path::new("d"), &ks, 1, true, &mut j).unwrap();
    dirid::write(&dir, &id, 0).unwrap();
    // And one entry moved back to the old name: "crashed half way".
    let one = k1.names.encrypt(&id, b"entry-3").unwrap();
    let back = k0.names.encrypt(&id, b"entry-3").unwrap();
    std::fs::rename(dir.join(one.backing()), dir.join(back.backing())).unwrap();

    assert_eq!(
        rekey_dir(&dir, Path::new("d"), &ks, 1, true, &mut j).unwrap(),
        (id, 1)
    );
    assert_eq!(dirid::read(&dir).unwrap(), (id, 1));
    assert_eq!(names_in(&dir, k1, &id), want);
    let l = k1.names.encrypt(&id, b"a link").unwrap();
    let t = std::fs::read_link(dir.join(l.backing())).unwrap();
    assert_eq!(
        k1.names
            .decrypt_symlink(&id, b"a link", t.as_os_str().as_bytes())
            .unwrap(),
        b"../somewhere"
    );
    let l = k1.names.encrypt(&id, b"old link").unwrap();
    let t = std::fs::read_link(dir.join(l.backing())).unwrap();
    assert_eq!(
        k1.names
            .decrypt_symlink(&id, b"old link", t.as_os_str().as_bytes())
            .unwrap(),
        b"/old/target"
    );
    assert!(!symlinks_behind(&dir, &ks, 1, false, false));
    // No sidecar is left without its entry.
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(entry) = n.strip_suffix(names::LONG_SUFFIX) {
            assert!(dir.join(entry).exists(), "orphan sidecar {n}");
        }
    }
    assert_eq!(Journal::pending(d.path()).unwrap(), None);
}

/// Unbound attribute values (format version 2) of a directory and of a
/// file without a header are rewritten bound to their owner; the file
/// gets a header for it; a value that does not authenticate is left.
#[test]
fn attributes_are_bound_to_their_owner_by_a_rekey() {
    let d = tempfile::tempdir().unwrap();
    let ks = keys();
    let xc = xattr_ciphers(&ks);
    let dir = d.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let id = dirid::create(&dir, 0).unwrap();
    let file = d.path().join("f");
    std::fs::write(&file, b"").unwrap();
    let (c0, c1) = (&xc[0].1, &xc[1].1);
    let put = |p: &Path, name: &[u8], v: &[u8]| {
        let Mapped::Encrypted(b) = c0.map_name(name).unwrap() else {
            panic!()
        };
        let blob = c0.seal_unbound(&b, name, v).unwrap();
        let fd = sys::open_path(
            open_dir(d.path()).unwrap().as_fd(),
            &cstr(p.file_name().unwrap().as_bytes()).unwrap(),
        )
        .unwrap();
        sys::setxattr(fd.as_fd(), &cstr(&b).unwrap(), &blob, 0).unwrap();
    };
    put(&dir, b"user.d", b"dir value");
    put(&file, b"security.capability", b"cap");
    for p in [&dir, &file] {
        let md = std::fs::symlink_metadata(p).unwrap();
        assert!(xattrs_behind(p, &md, &xc, 1, false, true).unwrap());
        // On a migrated volume an unbound value is simply unreadable.
        assert!(!xattrs_behind(p, &md, &xc, 1, false, false).unwrap());
    }
    let md = std::fs::symlink_metadata(&file).unwrap();
    let h = rekey_xattrs(&file, &md, &xc, 1, false, true)
        .unwrap()
        .expect("a header was written");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 40);
    let mdd = std::fs::symlink_metadata(&dir).unwrap();
    assert_eq!(rekey_xattrs(&dir, &mdd, &xc, 1, false, true).unwrap(), None);
    let mut got = Vec::new();
    for (p, owner) in [(&dir, id), (&file, h.file_id)] {
        let md = std::fs::symlink_metadata(p).unwrap();
        assert!(!xattrs_behind(p, &md, &xc, 1, false, true).unwrap());
        each_xattr(p, &mut |_, n, blob| {
            let o = c1
                .open(n, blob, Some(&owner), false)
                .expect("bound under 1");
            assert!(o.bound);
            assert!(c1.open(n, blob, Some(&[0u8; 16]), true).is_none());
            got.push((o.name, o.value));
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(
        got,
        vec![
            (b"user.d".to_vec(), b"dir value".to_vec()),
            (b"security.capability".to_vec(), b"cap".to_vec())
        ]
    );
}
