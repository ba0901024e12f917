use super::*;
use proptest::prelude::*;
use std::fs;

fn sample() -> VolumeHeader {
    VolumeHeader {
        flags: 0,
        suite: SUITE_XTS_SIV_V1,
        block_size: 4096,
        volume_id: [5u8; 16],
        created: 1_700_000_000,
        updated: 1_700_000_100,
        kek: KekRef {
            provider: "kmip".into(),
            name: "vol1-kek".into(),
            uid: "42".into(),
            version: 3,
        },
        active: 2,
        generations: vec![
            DekGeneration {
                generation: 1,
                created: 1_700_000_000,
                wrapped: vec![0xaa; 61],
            },
            DekGeneration {
                generation: 2,
                created: 1_700_000_090,
                wrapped: vec![0xcc; 61],
            },
        ],
        version: VERSION,
        history: vec![RotationEntry {
            retired_at: 1_700_000_050,
            kek: KekRef {
                provider: "kmip".into(),
                name: "vol1-kek".into(),
                uid: "17".into(),
                version: 2,
            },
        }],
    }
}

fn dek() -> Secret {
    Secret::from_slice(&[3u8; 32])
}

#[test]
fn roundtrip_and_mac() {
    let h = sample();
    let bytes = h.encode(&dek());
    let p = Path::new("t");
    let back = VolumeHeader::decode(&bytes, p).unwrap();
    assert_eq!(back, h);
    VolumeHeader::verify(&bytes, &dek(), p).unwrap();
    let other = Secret::from_slice(&[4u8; 32]);
    assert!(matches!(
        VolumeHeader::verify(&bytes, &other, p),
        Err(HeaderError::BadMac(_))
    ));
}

#[test]
fn every_single_byte_change_is_detected() {
    let h = sample();
    let bytes = h.encode(&dek());
    let p = Path::new("t");
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let detected = match VolumeHeader::decode(&b, p) {
            Err(_) => true,
            Ok(_) => VolumeHeader::verify(&b, &dek(), p).is_err(),
        };
        assert!(detected, "flip at byte {i} went unnoticed");
    }
}

#[test]
fn checksum_rejects_tampering_even_with_fixed_up_length() {
    let h = sample();
    let mut bytes = h.encode(&dek());
    let n = bytes.len();
    bytes[60] ^= 0xff;
    assert!(matches!(
        VolumeHeader::decode(&bytes, Path::new("t")),
        Err(HeaderError::Checksum(_))
    ));
    // An attacker who recomputes the checksum still fails the HMAC.
    let sum = Sha256::digest(&bytes[..n - 32]);
    bytes[n - 32..].copy_from_slice(&sum);
    let h2 = VolumeHeader::decode(&bytes, Path::new("t"));
    if h2.is_ok() {
        assert!(VolumeHeader::verify(&bytes, &dek(), Path::new("t")).is_err());
    }
}

#[test]
fn truncated_future_and_foreign_headers() {
    let bytes = sample().encode(&dek());
    let p = Path::new("t");
    for cut in [0, 5, 13, 60, bytes.len() - 1] {
        assert!(VolumeHeader::decode(&bytes[..cut], p).is_err(), "cut {cut}");
    }
    let mut future = bytes.clone();
    future[9] = 4;
    let e = VolumeHeader::decode(&future, p).unwrap_err();
    assert!(
        matches!(e, HeaderError::FutureVersion { found: 4, .. }),
        "{e}"
    );
    let mut zero = bytes.clone();
    zero[9] = 0;
    assert!(VolumeHeader::decode(&zero, p).is_err());
    assert!(e.to_string().contains("upgrade kmfs"));
    assert!(matches!(
        VolumeHeader::decode(b"[volume]\nname = 1\n", p),
        Err(HeaderError::BadMagic(_))
    ));
}

/// Version 3 (bound attributes and symlinks) and version 2 share one
/// layout; a header read as version 2 is written back as version 2, one
/// read as version 1 too, and only one marked version 3 as version 3.
#[test]
fn version_2_and_3_headers_roundtrip_in_their_own_version() {
    let p = Path::new("t");
    let mut h = sample();
    assert!(h.bound());
    let v3 = h.encode(&dek());
    assert_eq!(u16::from_be_bytes([v3[8], v3[9]]), 3);
    h.version = VERSION_2;
    let v2 = h.encode(&dek());
    assert_eq!(u16::from_be_bytes([v2[8], v2[9]]), 2);
    assert_eq!(v2.len(), v3.len());
    let back = VolumeHeader::decode(&v2, p).unwrap();
    assert_eq!(back.version, VERSION_2);
    assert!(!back.bound());
    assert_eq!(back, h);
    VolumeHeader::verify(&v2, &dek(), p).unwrap();
    h.version = VERSION_1;
    assert_eq!(h.encode(&dek()), v2);
    // The version is authenticated: relabelling a version 2 header as 3
    // (with the checksum fixed up) fails the HMAC.
    let mut forged = v2.clone();
    forged[9] = 3;
    let n = forged.len();
    let sum = Sha256::digest(&forged[..n - 32]);
    forged[n - 32..].copy_from_slice(&sum);
    assert!(VolumeHeader::decode(&forged, p).unwrap().bound());
    assert!(VolumeHeader::verify(&forged, &dek(), p).is_err());
}

#[test]
fn version_1_headers_read_as_generation_0() {
    let h = sample();
    let bytes = encode_v1(&h, &dek());
    let p = Path::new("t");
    let back = VolumeHeader::decode(&bytes, p).unwrap();
    assert_eq!(back.version, VERSION_1);
    assert_eq!(back.active, 0);
    assert_eq!(back.generations.len(), 1);
    assert_eq!(back.generations[0].generation, 0);
    assert_eq!(back.generations[0].wrapped, h.generations[0].wrapped);
    VolumeHeader::verify(&bytes, &v1_mac_key(&dek(), &h.volume_id), p).unwrap();
    assert!(VolumeHeader::verify(&bytes, &dek(), p).is_err());
}

#[test]
fn generations_must_be_ordered_and_hold_the_active_one() {
    let p = Path::new("t");
    let mut h = sample();
    h.active = 7;
    let e = VolumeHeader::decode(&h.encode(&dek()), p).unwrap_err();
    assert!(e.to_string().contains("active key generation 7"), "{e}");
    let mut h = sample();
    h.generations.swap(0, 1);
    let e = VolumeHeader::decode(&h.encode(&dek()), p).unwrap_err();
    assert!(e.to_string().contains("out of order"), "{e}");
}

#[test]
fn dek_aad_differs_per_generation_and_keeps_v1_for_generation_0() {
    let id = [9u8; 16];
    let mut v1 = b"kmfs v1 dek ".to_vec();
    v1.extend_from_slice(&id);
    assert_eq!(dek_aad(&id, 0), v1);
    assert_ne!(dek_aad(&id, 1), dek_aad(&id, 2));
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = VolumeHeader::decode(&bytes, Path::new("fuzz"));
    }

    #[test]
    fn decode_never_panics_on_mutated_headers(pos in 0usize..200, val in any::<u8>()) {
        let mut bytes = sample().encode(&dek());
        let n = bytes.len();
        bytes[pos % n] = val;
        // Recompute the checksum so the parser goes past it.
        let sum = Sha256::digest(&bytes[..n - 32]);
        bytes[n - 32..].copy_from_slice(&sum);
        let _ = VolumeHeader::decode(&bytes, Path::new("fuzz"));
    }
}

#[test]
fn store_keeps_a_backup_and_leaves_no_temporary_files() {
    let d = tempfile::tempdir().unwrap();
    store(d.path(), b"first").unwrap();
    store(d.path(), b"second").unwrap();
    assert_eq!(fs::read(d.path().join(HEADER_FILE)).unwrap(), b"second");
    assert_eq!(fs::read(d.path().join(BACKUP_FILE)).unwrap(), b"first");
    let names: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
