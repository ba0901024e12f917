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
