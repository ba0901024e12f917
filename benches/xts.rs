//! Crypto throughput per core, next to OpenSSL measured in the same run.
//!
//! `cargo bench --bench xts` runs criterion on 4 KiB AES-256-XTS units (one
//! thread) and on a 1 MiB multi-unit request (rayon, all cores), then prints a
//! summary: our single-core GB/s, `openssl speed -evp aes-256-xts -bytes 4096`
//! from the same run, and the ratio; then the content cipher's thread scaling
//! (1 vs 2 … threads on a 1 MiB request) and, per request size in units, the
//! serial loop against rayon — the data behind `PARALLEL_MIN_UNITS` in
//! `crypto/content.rs`. Set KMFS_BENCH_SUMMARY_ONLY=1 to skip criterion and
//! print only the summaries.

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kmfs::crypto::content::{BLOCK, ContentCipher};
use kmfs::crypto::keys::Secret;
use kmfs::crypto::xts::Xts256;

fn xts() -> Xts256 {
    Xts256::new(&Secret::from_slice(&[0x42u8; 64])).unwrap()
}

fn criterion_benches(c: &mut Criterion) {
    let x = xts();
    let mut g = c.benchmark_group("aes256-xts");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let mut buf = vec![7u8; BLOCK];
    g.bench_function("encrypt 4KiB unit, 1 core", |b| {
        let mut t = 0u128;
        b.iter(|| {
            t += 1;
            x.encrypt(black_box(&mut buf), t).unwrap()
        })
    });
    g.bench_function("decrypt 4KiB unit, 1 core", |b| {
        let mut t = 0u128;
        b.iter(|| {
            t += 1;
            x.decrypt(black_box(&mut buf), t).unwrap()
        })
    });
    g.finish();

    let content = ContentCipher::new(&Secret::from_slice(&[1u8; 32]), &[2u8; 16]);
    let mut g = c.benchmark_group("content");
    let mut big = vec![9u8; 1 << 20];
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("encrypt 1MiB request, rayon", |b| {
        b.iter(|| {
            content
                .encrypt_units(&[3u8; 16], 0, black_box(&mut big))
                .unwrap()
        })
    });
    g.finish();
}

/// Our single-core encryption rate in bytes/s, measured for `dur`.
fn our_rate(dur: Duration) -> f64 {
    let x = xts();
    let mut buf = vec![7u8; BLOCK];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..256 {
            x.encrypt(black_box(&mut buf), n as u128).unwrap();
            n += 1;
        }
    }
    (n * BLOCK as u64) as f64 / start.elapsed().as_secs_f64()
}

/// `openssl speed -evp aes-256-xts -bytes 4096` in bytes/s (single process).
fn openssl_rate(secs: u32) -> Option<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-xts",
            "-bytes",
            "4096",
            "-seconds",
            &secs.to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Last line: "AES-256-XTS   123456.78k" (1000s of bytes per second).
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains("xts"))?;
    let k = line.split_whitespace().last()?.trim_end_matches('k');
    k.parse::<f64>().ok().map(|v| v * 1000.0)
}

fn summary() {
    let ours = our_rate(Duration::from_secs(3));
    println!("\n== AES-256-XTS single-core summary (4096-byte units, same run)");
    println!("kmfs Xts256 (aes crate, batched):   {:.2} GB/s", ours / 1e9);
    match openssl_rate(3) {
        Some(o) => {
            println!("openssl speed -evp aes-256-xts:      {:.2} GB/s", o / 1e9);
            println!("ratio kmfs / openssl:                {:.2}", ours / o);
        }
        None => println!("openssl speed: not available (install openssl)"),
    }
}

/// Mean time of `f` over `dur` (after one warm-up call).
fn time_per_call(dur: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < dur {
        f();
        n += 1;
    }
    start.elapsed() / n
}

/// Thread scaling of the content cipher (1 MiB requests, rayon pools of 1 and
/// 2 threads) and the request size from which spreading the units of one
/// request over threads pays (serial loop vs rayon on all cores).
fn scaling() {
    use rayon::prelude::*;
    let content = ContentCipher::new(&Secret::from_slice(&[1u8; 32]), &[2u8; 16]);
    let mut big = vec![9u8; 1 << 20];
    println!("\n== content cipher thread scaling (1 MiB request, rayon pool size)");
    let mut base = 0.0;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in 1..=cpus.max(2) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let t = pool.install(|| {
            time_per_call(Duration::from_millis(700), || {
                content
                    .encrypt_units(&[3u8; 16], 0, black_box(&mut big))
                    .unwrap()
            })
        });
        let gbs = big.len() as f64 / t.as_secs_f64() / 1e9;
        if threads == 1 {
            base = gbs;
        }
        println!(
            "{threads} thread(s): {gbs:.2} GB/s  (x{:.2} vs 1 thread)",
            gbs / base
        );
    }
    println!("\n== parallel threshold: units of one request, serial vs rayon ({cpus} cores)");
    println!("units   serial µs   rayon µs   rayon/serial");
    let x = xts();
    for units in [1usize, 2, 3, 4, 6, 8, 16, 32, 64] {
        let mut buf = vec![5u8; units * BLOCK];
        let serial = time_per_call(Duration::from_millis(200), || {
            for (i, u) in black_box(&mut buf).chunks_mut(BLOCK).enumerate() {
                x.encrypt(u, i as u128).unwrap();
            }
        });
        let par = time_per_call(Duration::from_millis(200), || {
            black_box(&mut buf)
                .par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(i, u)| x.encrypt(u, i as u128).unwrap());
        });
        println!(
            "{units:5} {:11.2} {:10.2} {:14.2}",
            serial.as_secs_f64() * 1e6,
            par.as_secs_f64() * 1e6,
            par.as_secs_f64() / serial.as_secs_f64()
        );
    }
}

fn main() {
    if std::env::var_os("KMFS_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c);
        c.final_summary();
    }
    summary();
    scaling();
}
