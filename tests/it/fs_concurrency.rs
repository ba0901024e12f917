//! Many threads reading and writing through one mount, on the same file and on
//! different files; every byte is checked afterwards.

use crate::support::mount;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use mount::{Volume, pattern};

#[test]
fn concurrent_writers_and_readers() {
    let m = Arc::new(Volume::create(false).mount());
    const THREADS: usize = 8;
    // Same file: each thread owns interleaved, unaligned 3001-byte slots, so
    // writes share units and need correct read-modify-write.
    const SLOT: usize = 3001;
    const ROUNDS: usize = 12;
    let shared = m.p("shared");
    fs::write(&shared, b"").unwrap();
    let mut hs = Vec::new();
    for t in 0..THREADS {
        let m = m.clone();
        let shared = shared.clone();
        hs.push(std::thread::spawn(move || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&shared)
                .unwrap();
            for r in 0..ROUNDS {
                let slot = r * THREADS + t;
                let d = pattern((slot * 31 + 7) as u64, SLOT);
                f.write_all_at(&d, (slot * SLOT) as u64).unwrap();
                // Read back what this thread wrote so far (others keep writing).
                let mut b = vec![0u8; SLOT];
                f.read_exact_at(&mut b, (slot * SLOT) as u64).unwrap();
                assert_eq!(b, d, "thread {t} slot {slot}");
            }
            // Own file, large multi-unit writes and reads.
            let own = m.p(&format!("own-{t}"));
            let data = pattern(1000 + t as u64, 777_777 + t * 13);
            fs::write(&own, &data).unwrap();
            for _ in 0..3 {
                assert_eq!(fs::read(&own).unwrap(), data);
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let got = fs::read(&shared).unwrap();
    assert_eq!(got.len(), THREADS * ROUNDS * SLOT);
    for slot in 0..THREADS * ROUNDS {
        assert_eq!(
            &got[slot * SLOT..(slot + 1) * SLOT],
            &pattern((slot * 31 + 7) as u64, SLOT)[..],
            "slot {slot}"
        );
    }
    // Concurrent appenders: every record lands whole.
    let log = m.p("append.log");
    fs::write(&log, b"").unwrap();
    let mut hs = Vec::new();
    for t in 0..THREADS {
        let log = log.clone();
        hs.push(std::thread::spawn(move || {
            use std::io::Write;
            let mut f = OpenOptions::new().append(true).open(&log).unwrap();
            for i in 0..50 {
                let rec = format!("{t:02}:{i:04}:{}\n", "z".repeat(17 + t));
                f.write_all(rec.as_bytes()).unwrap();
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let s = fs::read_to_string(&log).unwrap();
    let lines: Vec<_> = s.lines().collect();
    assert_eq!(lines.len(), THREADS * 50);
    for l in lines {
        let t: usize = l[..2].parse().unwrap();
        assert_eq!(l.len(), 8 + 17 + t, "{l}");
    }
}

/// Many clients streaming at once (issue 18): 8 threads write 1 MiB
/// requests to 8 files and to disjoint stripes of one shared file, fsync,
/// and read everything back concurrently, before and after a remount (so
/// the second pass decrypts what reached the backing files). Requests of
/// 128 KiB and more are encrypted on rayon's pool when alone and in the
/// worker thread when others are in flight; both must give the same bytes.
#[test]
fn concurrent_streams_to_many_files_and_one() {
    const THREADS: usize = 8;
    const OWN: usize = 3 << 20;
    const STRIPE: usize = 256 << 10;
    const STRIPES: usize = 4; // per thread
    let m = Arc::new(Volume::create(false).mount());
    let shared = m.p("shared-streams");
    fs::write(&shared, b"").unwrap();
    let own_data = |t: usize| pattern(5000 + t as u64, OWN + t * 4099);
    let stripe_data = |i: usize| pattern(9000 + i as u64, STRIPE);
    let hs: Vec<_> = (0..THREADS)
        .map(|t| {
            let m = m.clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                let own = own_data(t);
                let f = fs::File::create(m.p(&format!("stream-{t}"))).unwrap();
                for (i, chunk) in own.chunks(1 << 20).enumerate() {
                    f.write_all_at(chunk, (i << 20) as u64).unwrap();
                }
                f.sync_all().unwrap();
                let s = OpenOptions::new().write(true).open(&shared).unwrap();
                for k in 0..STRIPES {
                    let i = k * THREADS + t;
                    s.write_all_at(&stripe_data(i), (i * STRIPE) as u64)
                        .unwrap();
                }
                s.sync_all().unwrap();
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let check = |m: &Arc<mount::Mounted>| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let m = m.clone();
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let got = fs::read(m.p(&format!("stream-{t}"))).unwrap();
                    assert!(got == own_data(t), "stream-{t} differs");
                    let s = fs::File::open(&shared).unwrap();
                    for k in 0..STRIPES {
                        let i = k * THREADS + t;
                        let mut b = vec![0u8; STRIPE];
                        s.read_exact_at(&mut b, (i * STRIPE) as u64).unwrap();
                        assert!(b == stripe_data(i), "shared stripe {i} differs");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    };
    check(&m);
    let vol = Arc::into_inner(m).unwrap().unmount();
    let m = Arc::new(vol.mount());
    assert_eq!(
        fs::metadata(&shared).unwrap().len(),
        (THREADS * STRIPES * STRIPE) as u64
    );
    check(&m);
}
