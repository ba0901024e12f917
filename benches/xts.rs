//! Crypto throughput per core, next to OpenSSL measured in the same run.
//!
//! `cargo bench --bench xts` runs criterion on 4 KiB AES-256-XTS units (one
//! thread) and on a 1 MiB multi-unit request (rayon, all cores), then prints a
//! summary: our single-core GB/s, `openssl speed -evp aes-256-xts -bytes 4096`
//! from the same run, and the ratio. Set KMFS_BENCH_SUMMARY_ONLY=1 to skip
//! criterion and print only the summary.

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

fn main() {
    if std::env::var_os("KMFS_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c);
        c.final_summary();
    }
    summary();
}
