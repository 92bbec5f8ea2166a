//! Criterion benchmarks of the XTS engine: encrypt/decrypt a 1 MiB buffer at 512- and
//! 4096-byte sectors, for every implementation this CPU supports.
//!
//! Run: `cargo bench --bench xts`. Compare with `openssl speed -evp aes-256-xts -bytes 4096`
//! and `python3 benches/openssl_xts.py` (see the benchmark section of the issue note).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_crypto::{Implementation, XtsCipher};

fn xts(c: &mut Criterion) {
    let key = VolumeKey::from_slice(&[0x5a; 64]).expect("64 bytes");
    let mut buf = vec![0xa5u8; 1 << 20];
    let mut group = c.benchmark_group("aes-256-xts-1MiB");
    group.throughput(Throughput::Bytes(buf.len() as u64));
    for implementation in Implementation::available() {
        let cipher = XtsCipher::with_implementation(&key, implementation).expect("available");
        for sector_size in [512usize, 4096] {
            let param = format!("{implementation}/{sector_size}");
            group.bench_function(BenchmarkId::new("encrypt", &param), |b| {
                b.iter(|| {
                    cipher
                        .encrypt_sectors(&mut buf, 0, sector_size)
                        .expect("encrypt")
                })
            });
            group.bench_function(BenchmarkId::new("decrypt", &param), |b| {
                b.iter(|| {
                    cipher
                        .decrypt_sectors(&mut buf, 0, sector_size)
                        .expect("decrypt")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, xts);
criterion_main!(benches);
