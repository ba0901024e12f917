use super::*;
use crate::kms::keyfile::KeyfileProvider;
use std::os::unix::fs::PermissionsExt;

fn provider(dir: &Path) -> KeyfileProvider {
    let p = dir.join("kek");
    std::fs::write(&p, [4u8; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    KeyfileProvider::open(&p, None).unwrap()
}

fn name_of(v: &Volume, g: u16) -> crate::crypto::names::EncodedName {
    let k = v.keys.generations.get(g).unwrap();
    k.names.encrypt(&[1u8; 16], b"report.txt").unwrap()
}

/// A volume whose header is still version 1 opens with the same keys;
/// its first rekey step writes version 2; generation 1 has names keys
/// of its own, and retiring generation 0 leaves the new ones.
#[test]
fn a_version_1_volume_opens_and_upgrades_on_the_next_header_update() {
    let d = tempfile::tempdir().unwrap();
    let back = d.path().join("back");
    std::fs::create_dir(&back).unwrap();
    let p = provider(d.path());
    let v = Volume::init(&back, &p, &InitOptions::default()).unwrap();
    let name0 = name_of(&v, 0);
    let dek0 = v.dek().clone();
    let mut v1 = v.header.clone();
    v1.version = header::VERSION_1;
    header::store(&back, &header::encode_v1(&v1, &dek0)).unwrap();

    let v = Volume::open(&back, &p).unwrap();
    assert_eq!(v.header.version, header::VERSION_1);
    assert!(v.dek().ct_eq(&dek0));
    assert_eq!(name_of(&v, 0), name0);

    let mut v = v;
    let g = v.add_generation(&p).unwrap();
    assert_eq!(g, 1);
    let v2 = Volume::open(&back, &p).unwrap();
    // Not migrated yet (attributes and symlinks may be unbound).
    assert_eq!(v2.header.version, header::VERSION_2);
    assert!(v2.keys.unbound_ok());
    assert_eq!(v2.header.active, 1);
    assert_eq!(name_of(&v2, 0), name0);
    let name1 = name_of(&v2, 1);
    assert_ne!(name1, name0);
    assert!(v2.dek_of(0).unwrap().ct_eq(&dek0));
    assert!(!v2.dek().ct_eq(&dek0));

    let mut v2 = v2;
    let (kek, wrapped, aad) = v2.retire_proof_request(1).unwrap();
    let proof = p.unwrap(&kek, &wrapped, &aad).unwrap();
    let wrong = Secret::from_slice(&[0u8; 32]);
    assert!(v2.retire_generations(1, &kek, &wrong).is_err());
    assert_eq!(v2.header.generations.len(), 2);
    assert_eq!(v2.retire_generations(1, &kek, &proof).unwrap(), vec![0]);
    assert!(!v2.keys.unbound_ok());
    let v3 = Volume::open(&back, &p).unwrap();
    // The rekey's end stores format version 3: migrated.
    assert_eq!(v3.header.version, header::VERSION);
    assert!(!v3.keys.unbound_ok());
    assert_eq!(v3.header.generations.len(), 1);
    assert!(v3.dek_of(0).is_none());
    assert!(v3.keys.generations.get(0).is_none());
    assert_eq!(name_of(&v3, 1), name1);
}

/// A barrier after a switch waits for a `with_active` still holding the
/// old generation, not for one on the new; key lookups never wait for
/// either (no I/O runs under the generations' lock).
#[test]
fn barrier_waits_only_for_writes_with_the_old_generation() {
    use std::sync::mpsc;
    use std::time::Duration;
    let k = |b: u8| Arc::new(GenKeys::derive(&Secret::from_slice(&[b; 32]), &[0; 16]));
    let gens = Arc::new(Generations {
        inner: RwLock::new(GenInner {
            active: 0,
            keys: vec![(0, k(1)), (1, k(2))],
        }),
        holds: Mutex::new(Vec::new()),
        released: Condvar::new(),
    });
    let (entered, is_in) = mpsc::channel();
    let (finish, may_finish) = mpsc::channel::<()>();
    let old = {
        let gens = gens.clone();
        std::thread::spawn(move || {
            gens.with_active(|g, _| {
                entered.send(()).unwrap();
                may_finish.recv().unwrap();
                g
            })
        })
    };
    is_in.recv().unwrap();
    gens.set_active(1);
    // Lookups and a write with the new generation go on meanwhile.
    assert!(gens.get(0).is_some() && gens.all().len() == 2);
    assert_eq!(gens.with_active(|g, _| g), 1);
    let (done, barrier_done) = mpsc::channel();
    let waiter = {
        let gens = gens.clone();
        std::thread::spawn(move || {
            gens.barrier();
            done.send(()).unwrap();
        })
    };
    assert!(
        barrier_done
            .recv_timeout(Duration::from_millis(200))
            .is_err(),
        "the barrier returned while a write with the old generation ran"
    );
    assert_eq!(gens.active_keys().0, 1);
    finish.send(()).unwrap();
    assert_eq!(old.join().unwrap(), 0);
    barrier_done
        .recv_timeout(Duration::from_secs(10))
        .expect("the barrier returns once the old write is done");
    waiter.join().unwrap();
    // With nothing running, a barrier returns at once.
    gens.barrier();
}
