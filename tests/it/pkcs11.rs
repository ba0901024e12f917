//! The `pkcs11` key provider against a real SoftHSM2 token.

use crate::support::softhsm;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use kmfs::crypto::keys::Secret;
use kmfs::kms::pkcs11::{Pkcs11Config, Pkcs11Mode, Pkcs11Provider};
use kmfs::kms::{KekRef, KeyProvider, KmsError, generate_dek};
use softhsm::{
    Hsm, KEK, KEK_EXTRACTABLE, MODULE, OTHER_TOKEN, PIN, PIN_TOKEN, RELOGIN_TOKEN, TOKEN,
};

fn provider(cfg: &Pkcs11Config) -> Pkcs11Provider {
    Pkcs11Provider::from_config(cfg).unwrap_or_else(|e| panic!("from_config: {e}"))
}

fn err(cfg: &Pkcs11Config) -> KmsError {
    match Pkcs11Provider::from_config(cfg) {
        Ok(_) => panic!("from_config succeeded"),
        Err(e) => e,
    }
}

/// A session of our own (cryptoki directly) on `token`, logged in.
fn raw_session(token: &str) -> cryptoki::session::Session {
    let ctx = Pkcs11::new(MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token)
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::from(PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    s
}

fn dek(byte: u8) -> Secret {
    Secret::from_slice(&[byte; 32])
}

#[test]
fn wrap_unwrap_round_trip_in_token() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let p = provider(&hsm.config(KEK));
    let kek = p.current_kek().unwrap();
    assert_eq!(kek.provider, "pkcs11");
    assert_eq!(kek.name, KEK);
    assert_eq!(kek.version, 1);
    let d = dek(7);
    let blob = p.wrap(&kek, &d, b"volume-a").unwrap();
    assert_eq!(blob.len(), 1 + 12 + 32 + 16);
    assert_eq!(blob[0], 1);
    assert!(!blob.windows(32).any(|w| w == [7u8; 32]));
    assert!(p.unwrap(&kek, &blob, b"volume-a").unwrap().ct_eq(&d));
    // Fresh IV every time.
    let blob2 = p.wrap(&kek, &d, b"volume-a").unwrap();
    assert_ne!(blob[1..13], blob2[1..13]);
    assert_ne!(blob, blob2);
    // A second provider (new session, same process) unwraps it too.
    let p2 = provider(&hsm.config(KEK));
    assert!(p2.unwrap(&kek, &blob, b"volume-a").unwrap().ct_eq(&d));
    assert!(p.describe().contains(TOKEN) && p.describe().contains(KEK));
}

#[test]
fn wrong_aad_and_tampered_blobs_are_wrong_key() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let p = provider(&hsm.config(KEK));
    let kek = p.current_kek().unwrap();
    let blob = p.wrap(&kek, &dek(3), b"vol-1").unwrap();
    let e = p.unwrap(&kek, &blob, b"vol-2").unwrap_err();
    assert!(matches!(e, KmsError::WrongKey(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(KEK) && msg.contains(TOKEN) && msg.contains("CKR_"),
        "{msg}"
    );
    eprintln!("wrong AAD: {msg}");
    for i in 0..blob.len() {
        let mut t = blob.clone();
        t[i] ^= 0x40;
        let e = p.unwrap(&kek, &t, b"vol-1").unwrap_err();
        assert!(matches!(e, KmsError::WrongKey(_)), "byte {i}: {e}");
    }
    for len in [0, 1, 13, 28, 29, blob.len() - 1] {
        let e = p.unwrap(&kek, &blob[..len], b"vol-1").unwrap_err();
        assert!(matches!(e, KmsError::WrongKey(_)), "len {len}: {e}");
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(matches!(
        p.unwrap(&kek, &longer, b"vol-1"),
        Err(KmsError::WrongKey(_))
    ));
    // The session survives all those failures.
    assert!(p.unwrap(&kek, &blob, b"vol-1").unwrap().ct_eq(&dek(3)));
}

#[test]
fn kek_value_cannot_be_read_and_stays_non_extractable() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    // Make sure the module is initialised the way the provider does it.
    let p = provider(&hsm.config(KEK));
    let kek = p.current_kek().unwrap();

    let s = raw_session(TOKEN);
    let h = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(KEK.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(h.len(), 1);
    let attrs = s
        .get_attributes(
            h[0],
            &[
                AttributeType::Value,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Private,
                AttributeType::NeverExtractable,
            ],
        )
        .unwrap();
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "CKA_VALUE of the KEK was readable"
    );
    for a in &attrs {
        match a {
            Attribute::Sensitive(b) => assert!(*b, "CKA_SENSITIVE"),
            Attribute::Extractable(b) => assert!(!*b, "CKA_EXTRACTABLE"),
            Attribute::Private(b) => assert!(*b, "CKA_PRIVATE"),
            Attribute::NeverExtractable(b) => assert!(*b, "CKA_NEVER_EXTRACTABLE"),
            _ => {}
        }
    }
    let e = s
        .update_attributes(h[0], &[Attribute::Extractable(true)])
        .unwrap_err();
    assert!(
        matches!(e, CkError::Pkcs11(RvError::AttributeReadOnly, _)),
        "{e}"
    );
    // ... and yet wrap mode works with it: wrapping happens inside the token.
    let blob = p.wrap(&kek, &dek(1), b"x").unwrap();
    assert!(p.unwrap(&kek, &blob, b"x").unwrap().ct_eq(&dek(1)));
    drop(s);
}

#[test]
fn wrong_pin_is_access_denied_with_clear_message() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let wrong = hsm.dir.join("wrong.pin");
    crate::support::cli::write_private(&wrong, "0000-wrong\n");
    let mut c = hsm.config(KEK);
    c.token_label = Some(PIN_TOKEN.into());
    c.pin_file = Some(wrong);
    let e = err(&c);
    let msg = e.to_string();
    assert!(matches!(e, KmsError::AccessDenied(_)), "{msg}");
    eprintln!("wrong PIN: {msg}");
    assert!(
        msg.contains("wrong PIN for token \"kmfs-pin\"")
            && msg.contains("CKR_PIN_INCORRECT")
            && msg.contains(MODULE),
        "{msg}"
    );
}

#[test]
fn pin_from_systemd_credential() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let mut c = hsm.config(KEK);
    c.pin_file = None;
    c.pin_credential = Some(softhsm::PIN_CREDENTIAL.into());
    let p = provider(&c);
    let kek = p.current_kek().unwrap();
    let blob = p.wrap(&kek, &dek(9), b"a").unwrap();
    assert!(p.unwrap(&kek, &blob, b"a").unwrap().ct_eq(&dek(9)));
    c.pin_credential = Some("no-such-credential".into());
    let msg = err(&c).to_string();
    assert!(
        msg.contains("HSM PIN credential") && msg.contains("no-such-credential"),
        "{msg}"
    );
    c.pin_credential = Some("../hsm.pin".into());
    assert!(err(&c).to_string().contains("not a valid credential name"));
}

#[test]
fn missing_token_and_key_are_named() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let mut c = hsm.config(KEK);
    c.token_label = Some("no-such-token".into());
    let e = err(&c);
    let msg = e.to_string();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{msg}");
    assert!(
        msg.contains("no token labelled \"no-such-token\"")
            && msg.contains(MODULE)
            && msg.contains(TOKEN),
        "{msg}"
    );

    let mut c = hsm.config(KEK);
    c.token_label = None;
    c.slot = Some(987_654);
    let msg = err(&c).to_string();
    assert!(msg.contains("slot 987654"), "{msg}");

    let p = provider(&hsm.config("no-such-kek"));
    let e = p.current_kek().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{msg}");
    assert!(msg.contains("no-such-kek") && msg.contains(TOKEN), "{msg}");

    let mut c = hsm.config(KEK);
    c.key_version = Some(5);
    let e = provider(&c).current_kek().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{msg}");
    assert!(
        msg.contains("kmfs-kek.v5") && msg.contains("version 5"),
        "{msg}"
    );

    // A header reference to a key that is not there.
    let p = provider(&hsm.config(KEK));
    let gone = KekRef {
        provider: "pkcs11".into(),
        name: "deleted-kek".into(),
        uid: String::new(),
        version: 1,
    };
    let e = p.unwrap(&gone, &[1u8; 60], b"a").unwrap_err();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{e}");
    // ... or to another provider's key.
    let other = KekRef {
        provider: "kmip".into(),
        ..gone
    };
    assert!(
        p.unwrap(&other, &[1u8; 60], b"a")
            .unwrap_err()
            .to_string()
            .contains("kmip")
    );

    let mut c = hsm.config(KEK);
    c.module = "/nonexistent/libpkcs11.so".into();
    let msg = err(&c).to_string();
    assert!(
        msg.contains("cannot load PKCS#11 module /nonexistent/libpkcs11.so"),
        "{msg}"
    );
    // Not a PKCS#11 library at all.
    let not_a_lib = hsm.dir.join("not-a-module.so");
    std::fs::write(&not_a_lib, b"not an ELF file").unwrap();
    c.module = not_a_lib.clone();
    let msg = err(&c).to_string();
    assert!(msg.contains(&not_a_lib.display().to_string()), "{msg}");
}

#[test]
fn loose_pin_file_is_refused_naming_it() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let loose = hsm.dir.join("loose.pin");
    crate::support::cli::write_private(&loose, PIN);
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = hsm.config(KEK);
    c.pin_file = Some(loose.clone());
    let e = err(&c);
    let msg = e.to_string();
    assert!(matches!(e, KmsError::Config(_)), "{msg}");
    assert!(
        msg.contains("HSM PIN file")
            && msg.contains(&loose.display().to_string())
            && msg.contains("0644"),
        "{msg}"
    );
}

#[test]
fn rotation_creates_version_2_and_old_wraps_still_unwrap() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let name = "rot-kek";
    let p = provider(&hsm.config(name));
    assert!(matches!(p.current_kek(), Err(KmsError::KeyNotFound(_))));
    let v1 = p.create_kek(Some(name)).unwrap();
    assert_eq!((v1.name.as_str(), v1.version), (name, 1));
    assert_eq!(v1.uid.len(), 32, "CKA_ID of a generated key: 16 bytes hex");
    // Asking again uses the existing key.
    assert_eq!(p.create_kek(Some(name)).unwrap(), v1);
    assert_eq!(p.current_kek().unwrap(), v1);
    let old = p.wrap(&v1, &dek(1), b"vol").unwrap();

    let v2 = p.create_kek(None).unwrap();
    assert_eq!((v2.name.as_str(), v2.version), (name, 2));
    assert_ne!(v2.uid, v1.uid);
    assert_eq!(p.current_kek().unwrap(), v2);
    let new = p.wrap(&p.current_kek().unwrap(), &dek(2), b"vol").unwrap();
    assert!(p.unwrap(&v1, &old, b"vol").unwrap().ct_eq(&dek(1)));
    assert!(p.unwrap(&v2, &new, b"vol").unwrap().ct_eq(&dek(2)));
    assert!(matches!(
        p.unwrap(&v2, &old, b"vol"),
        Err(KmsError::WrongKey(_))
    ));
    assert!(matches!(
        p.unwrap(&v1, &new, b"vol"),
        Err(KmsError::WrongKey(_))
    ));

    // The generated key is as locked down as the administrator's.
    let out = std::process::Command::new(softhsm::PKCS11_TOOL)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args([
            "--module",
            MODULE,
            "--token-label",
            TOKEN,
            "--login",
            "--pin",
            PIN,
        ])
        .args(["--list-objects", "--type", "secrkey"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let entry = listing
        .split("Secret Key Object")
        .find(|o| o.contains("label:      rot-kek.v2"))
        .unwrap_or_else(|| panic!("rot-kek.v2 not listed:\n{listing}"));
    assert!(
        entry.contains("sensitive") && entry.contains("never extractable"),
        "{entry}"
    );
    // CKA_PRIVATE: invisible without logging in.
    let out = std::process::Command::new(softhsm::PKCS11_TOOL)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args(["--module", MODULE, "--token-label", TOKEN])
        .args(["--list-objects", "--type", "secrkey"])
        .output()
        .unwrap();
    let public = String::from_utf8_lossy(&out.stdout);
    assert!(!public.contains("rot-kek"), "{public}");

    // A configured version wins over the newest.
    let mut c = hsm.config(name);
    c.key_version = Some(1);
    assert_eq!(provider(&c).current_kek().unwrap(), v1);
    let v3 = provider(&c).create_kek(None).unwrap();
    assert_eq!(v3.version, 3);

    // A header whose CKA_ID does not match the key under that label.
    let replaced = KekRef {
        uid: "00".repeat(16),
        ..v1.clone()
    };
    let e = p.unwrap(&replaced, &old, b"vol").unwrap_err();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{e}");
    assert!(e.to_string().contains("replaced"), "{e}");
    // Version labels are reserved.
    assert!(p.create_kek(Some("rot-kek.v7")).is_err());
}

#[test]
fn revoke_disables_but_keeps_the_key() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let name = "rev-kek";
    let p = provider(&hsm.config(name));
    let v1 = p.create_kek(Some(name)).unwrap();
    let blob = p.wrap(&v1, &dek(4), b"v").unwrap();
    let v2 = p.create_kek(None).unwrap();
    p.revoke(&v1).unwrap();
    let e = p.unwrap(&v1, &blob, b"v").unwrap_err();
    assert!(matches!(e, KmsError::KeyNotFound(_)), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");
    assert!(matches!(
        p.wrap(&v1, &dek(4), b"v"),
        Err(KmsError::KeyNotFound(_))
    ));
    let mut c = hsm.config(name);
    c.key_version = Some(1);
    let e = provider(&c).current_kek().unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
    // Still on the token; the newer version is unaffected.
    assert_eq!(p.current_kek().unwrap(), v2);
    // Extract mode honours the usage flags too.
    let mut xc = hsm.config(name);
    xc.mode = Pkcs11Mode::Extract;
    let x = provider(&xc);
    for e in [
        x.unwrap(&v1, &blob, b"v").unwrap_err(),
        x.wrap(&v1, &dek(4), b"v").unwrap_err(),
    ] {
        assert!(e.to_string().contains("revoked"), "{e}");
    }
    let b2 = p.wrap(&v2, &dek(5), b"v").unwrap();
    assert!(p.unwrap(&v2, &b2, b"v").unwrap().ct_eq(&dek(5)));
    let out = std::process::Command::new(softhsm::PKCS11_TOOL)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args([
            "--module",
            MODULE,
            "--token-label",
            TOKEN,
            "--login",
            "--pin",
            PIN,
        ])
        .args(["--list-objects", "--type", "secrkey", "--label", name])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("rev-kek"));
}

#[test]
fn extract_mode_works_with_extractable_key_only() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let mut c = hsm.config(KEK_EXTRACTABLE);
    c.mode = Pkcs11Mode::Extract;
    let p = provider(&c);
    let kek = p.current_kek().unwrap();
    let blob = p.wrap(&kek, &dek(6), b"e").unwrap();
    assert!(p.unwrap(&kek, &blob, b"e").unwrap().ct_eq(&dek(6)));
    assert!(matches!(
        p.unwrap(&kek, &blob, b"f"),
        Err(KmsError::WrongKey(_))
    ));
    // Same blob format as wrap mode: the token unwraps what was wrapped locally.
    let w = provider(&hsm.config(KEK_EXTRACTABLE));
    assert!(w.unwrap(&kek, &blob, b"e").unwrap().ct_eq(&dek(6)));
    let blob2 = w.wrap(&kek, &dek(8), b"e").unwrap();
    assert!(p.unwrap(&kek, &blob2, b"e").unwrap().ct_eq(&dek(8)));

    // A non-extractable key is refused with a clear message.
    let mut c = hsm.config(KEK);
    c.mode = Pkcs11Mode::Extract;
    let p = provider(&c);
    let kek = p.current_kek().unwrap();
    let e = p.wrap(&kek, &dek(6), b"e").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, KmsError::Config(_)), "{msg}");
    assert!(
        msg.contains("extract")
            && msg.contains(KEK)
            && msg.contains("CKA_SENSITIVE=true")
            && msg.contains("mode = \"wrap\""),
        "{msg}"
    );
    let wblob = provider(&hsm.config(KEK))
        .wrap(&kek, &dek(6), b"e")
        .unwrap();
    assert!(matches!(
        p.unwrap(&kek, &wblob, b"e"),
        Err(KmsError::Config(_))
    ));
}

#[test]
fn random_bytes_come_from_the_token() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let p = provider(&hsm.config(KEK));
    let a = p.random(32).unwrap();
    let b = p.random(32).unwrap();
    assert_eq!((a.len(), b.len()), (32, 32));
    assert!(!a.ct_eq(&b));
    assert!(a.as_bytes().iter().any(|x| *x != 0));
    assert_eq!(p.random(0).unwrap().len(), 0);
    assert!(p.random(usize::MAX).is_err());
    let d1 = generate_dek(&p).unwrap();
    let d2 = generate_dek(&p).unwrap();
    assert!(!d1.ct_eq(&d2));
}

#[test]
fn one_provider_shared_by_threads() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let p = Arc::new(provider(&hsm.config(KEK)));
    let kek = p.current_kek().unwrap();
    let handles: Vec<_> = (0..8u8)
        .map(|t| {
            let p = Arc::clone(&p);
            let kek = kek.clone();
            std::thread::spawn(move || {
                for i in 0..25u8 {
                    let d = Secret::from_slice(&[t.wrapping_mul(31).wrapping_add(i); 32]);
                    let aad = [t, i];
                    let blob = p.wrap(&kek, &d, &aad).unwrap();
                    assert!(p.unwrap(&kek, &blob, &aad).unwrap().ct_eq(&d));
                    assert_eq!(p.random(16).unwrap().len(), 16);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn volume_init_and_open_through_the_token() {
    if !softhsm::available() {
        return;
    }
    use kmfs::volume::{InitOptions, Volume};
    let (hsm, _turn) = Hsm::in_process();
    let backing = tempfile::tempdir().unwrap();
    let p = provider(&hsm.config(KEK));
    let v = Volume::init(backing.path(), &p, &InitOptions::default()).unwrap();
    assert_eq!(v.header.kek.provider, "pkcs11");
    assert_eq!(v.header.kek.name, KEK);
    assert_eq!(v.header.kek.version, 1);
    drop(p);

    let t = Instant::now();
    let p = provider(&hsm.config(KEK));
    let opened = Volume::open(backing.path(), &p).unwrap();
    let unlock = t.elapsed();
    assert!(opened.dek().ct_eq(v.dek()));
    assert_eq!(opened.header.kek, v.header.kek);
    eprintln!("pkcs11 unlock (from_config + Volume::open) took {unlock:?}");

    // With a wrong PIN nothing opens, and the header is untouched.
    let before = std::fs::read_dir(backing.path()).unwrap().count();
    let wrong = hsm.dir.join("wrong2.pin");
    crate::support::cli::write_private(&wrong, "nope");
    let mut c = hsm.config(KEK);
    c.token_label = Some(PIN_TOKEN.into());
    c.pin_file = Some(wrong);
    assert!(matches!(
        Pkcs11Provider::from_config(&c),
        Err(KmsError::AccessDenied(_))
    ));
    // The same label on another token is another key: wrong key.
    let mut c = hsm.config(KEK);
    c.token_label = Some(OTHER_TOKEN.into());
    let other = provider(&c);
    let e = Volume::open(backing.path(), &other).err().unwrap();
    assert!(
        e.to_string().contains("CKA_ID") || e.to_string().contains("wrong key"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(backing.path()).unwrap().count(), before);
}

#[test]
fn session_logged_out_behind_our_back_is_reopened() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let mut c = hsm.config(KEK);
    c.token_label = Some(RELOGIN_TOKEN.into());
    let p = provider(&c);
    let kek = p.current_kek().unwrap();
    let blob = p.wrap(&kek, &dek(2), b"r").unwrap();
    // C_Logout logs out every session of this process on the token, and
    // closing the last one of ours would too.
    let s = raw_session(RELOGIN_TOKEN);
    s.logout().unwrap();
    assert!(p.unwrap(&kek, &blob, b"r").unwrap().ct_eq(&dek(2)));
    drop(s);
    assert!(p.unwrap(&kek, &blob, b"r").unwrap().ct_eq(&dek(2)));
}

#[test]
fn every_hsm_operation_is_audited_without_key_material() {
    if !softhsm::available() {
        return;
    }
    use kmfs::audit::{AuditCsv, install_sink};
    let (hsm, _turn) = Hsm::in_process();
    let csv = hsm.dir.join("audit.csv");
    // Process-wide: rows of parallel tests land here too; look at ours only.
    install_sink(Some(AuditCsv::open(&csv, "p11-test").unwrap()));
    let name = "audit-kek";
    let p = provider(&hsm.config(name));
    let kek = p.create_kek(Some(name)).unwrap();
    let d = dek(0xa5);
    let blob = p.wrap(&kek, &d, b"aad").unwrap();
    p.unwrap(&kek, &blob, b"aad").unwrap();
    p.unwrap(&kek, &blob, b"other").unwrap_err();
    p.random(32).unwrap();
    p.revoke(&kek).unwrap();
    p.unwrap(&kek, &blob, b"aad").unwrap_err();
    let mut xc = hsm.config(name);
    xc.mode = Pkcs11Mode::Extract;
    provider(&xc).wrap(&kek, &d, b"aad").unwrap_err();

    let text = std::fs::read_to_string(&csv).unwrap();
    let ours: Vec<(String, String)> = text
        .lines()
        .filter(|l| l.contains(",audit-kek,"))
        .map(|l| {
            let f: Vec<&str> = l.splitn(12, ',').collect();
            assert_eq!(f[4], TOKEN, "{l}");
            (f[3].to_string(), f[10].to_string())
        })
        .collect();
    let has = |op: &str, res: &str| ours.iter().any(|(o, r)| o == op && r == res);
    for (op, res) in [
        ("locate", "fail"), // create_kek(Some) looks first
        ("create", "ok"),
        ("locate", "ok"),
        ("wrap", "ok"),
        ("unwrap", "ok"),
        ("unwrap", "fail"),
        ("revoke", "ok"),
        ("get", "fail"),
    ] {
        assert!(has(op, res), "no {op} {res} row in {ours:?}");
    }
    assert!(
        !has("get", "ok"),
        "wrap mode must never fetch the key: {ours:?}"
    );
    assert!(text.contains(",random,kmfs-test,"), "no random row");
    assert!(text.contains(",login,kmfs-test,"), "no login row");
    let hexed = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert!(!text.contains(&hexed(&blob[13..29])), "wrapped key logged");
    assert!(!text.contains(&hexed(d.as_bytes())), "DEK logged");
    assert!(!text.contains(PIN), "PIN logged");
    let wrong_aad = text
        .lines()
        .find(|l| l.contains(",unwrap,") && l.contains(",audit-kek,") && l.contains(",fail,"))
        .unwrap();
    assert!(wrong_aad.contains("CKR_"), "{wrong_aad}");
}

#[test]
fn token_by_slot_id() {
    if !softhsm::available() {
        return;
    }
    let (hsm, _turn) = Hsm::in_process();
    let slot = raw_session(TOKEN).get_session_info().unwrap().slot_id();
    let mut c = hsm.config(KEK);
    c.token_label = None;
    c.slot = Some(slot.id());
    let p = provider(&c);
    assert!(p.describe().contains(TOKEN), "{}", p.describe());
    let kek = p.current_kek().unwrap();
    let blob = p.wrap(&kek, &dek(1), b"s").unwrap();
    assert!(p.unwrap(&kek, &blob, b"s").unwrap().ct_eq(&dek(1)));
}
