//! `kvcrypt benchmark`: single-core throughput of the XTS engine, like `cryptsetup benchmark`.
//!
//! Encrypts/decrypts a 1 MiB buffer in place, repeatedly, for a fixed amount of this thread's
//! CPU time per measurement, with a random throw-away key (no real key is ever used here).
//! Rates are bytes per second of *CPU time* (like `openssl speed`), so other load on a shared
//! machine does not distort them; wall-clock time is reported alongside.

use std::time::{Duration, Instant};

use rand::RngCore;
use serde::Serialize;

use super::{Implementation, XtsCipher};
use crate::secmem::VolumeKey;

/// Size of the buffer processed per call.
pub const BENCH_BUFFER: usize = 1 << 20;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub implementation: Implementation,
    pub sector_size: usize,
    /// "encrypt" or "decrypt".
    pub operation: &'static str,
    /// Bytes processed.
    pub bytes: u64,
    /// CPU seconds of the measuring thread.
    pub seconds: f64,
    /// Wall-clock seconds (larger than `seconds` when the machine is busy).
    pub wall_seconds: f64,
    /// Decimal megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Binary mebibytes (2^20 bytes) per second, as `cryptsetup benchmark` prints.
    pub mib_per_s: f64,
}

/// All measurements of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub cipher: &'static str,
    pub key_bits: u32,
    pub buffer_bytes: usize,
    /// The implementation `XtsCipher::new` picks on this CPU.
    pub default_implementation: Implementation,
    pub results: Vec<BenchResult>,
}

/// CPU time consumed by the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Measures `op` over `buf` for about `seconds` of thread CPU time (at least one call).
/// Returns (bytes, CPU seconds, wall seconds).
fn measure(mut op: impl FnMut(&mut [u8]), buf: &mut [u8], seconds: f64) -> (u64, f64, f64) {
    // Warm up (page faults, caches, frequency ramp).
    op(buf);
    let budget = seconds.max(0.01);
    let wall = Instant::now();
    let start = thread_cpu_seconds();
    let mut calls = 0u64;
    let cpu = loop {
        op(buf);
        calls += 1;
        let used = thread_cpu_seconds() - start;
        // Guard against a clock that does not advance: fall back to wall time.
        if used >= budget || wall.elapsed() >= Duration::from_secs_f64(budget * 20.0) {
            break if used > 0.0 {
                used
            } else {
                wall.elapsed().as_secs_f64()
            };
        }
    };
    (calls * buf.len() as u64, cpu, wall.elapsed().as_secs_f64())
}

/// Runs encrypt and decrypt at 512- and 4096-byte sectors for every implementation this CPU
/// supports (the default one first), `seconds` per measurement.
pub fn run_benchmark(seconds: f64) -> BenchReport {
    let mut key = VolumeKey::zeroed();
    rand::thread_rng().fill_bytes(key.expose_mut());
    let mut buf = vec![0u8; BENCH_BUFFER];
    rand::thread_rng().fill_bytes(&mut buf);
    let implementations = Implementation::available();
    let mut results = Vec::new();
    for &implementation in &implementations {
        let Ok(xts) = XtsCipher::with_implementation(&key, implementation) else {
            continue;
        };
        for sector_size in [512usize, 4096] {
            for operation in ["encrypt", "decrypt"] {
                let (bytes, secs, wall) = if operation == "encrypt" {
                    measure(
                        |b| drop(xts.encrypt_sectors(b, 0, sector_size)),
                        &mut buf,
                        seconds,
                    )
                } else {
                    measure(
                        |b| drop(xts.decrypt_sectors(b, 0, sector_size)),
                        &mut buf,
                        seconds,
                    )
                };
                results.push(BenchResult {
                    implementation,
                    sector_size,
                    operation,
                    bytes,
                    seconds: secs,
                    wall_seconds: wall,
                    mb_per_s: bytes as f64 / secs / 1e6,
                    mib_per_s: bytes as f64 / secs / (1u64 << 20) as f64,
                });
            }
        }
    }
    BenchReport {
        cipher: "aes-xts-plain64",
        key_bits: 512,
        buffer_bytes: BENCH_BUFFER,
        default_implementation: implementations[0],
        results,
    }
}

impl BenchReport {
    /// A `cryptsetup benchmark`-like table: one line per implementation and sector size.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# One thread, {} KiB buffer, random key; MiB/s = 2^20 bytes per CPU-second.",
            self.buffer_bytes / 1024
        );
        let _ = writeln!(
            s,
            "#     Algorithm |  Key |  Sector |      Encryption |      Decryption | Implementation"
        );
        let mut rows: Vec<(Implementation, usize)> = Vec::new();
        for r in &self.results {
            if !rows.contains(&(r.implementation, r.sector_size)) {
                rows.push((r.implementation, r.sector_size));
            }
        }
        for (imp, ss) in rows {
            let rate = |op: &str| {
                self.results
                    .iter()
                    .find(|r| r.implementation == imp && r.sector_size == ss && r.operation == op)
                    .map(|r| format!("{:10.1} MiB/s", r.mib_per_s))
                    .unwrap_or_else(|| format!("{:>16}", "n/a"))
            };
            let default = if imp == self.default_implementation {
                " (default)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "{:>15} | {:>4}b | {:>6}b | {} | {} | {imp}{default}",
                self.cipher,
                self.key_bits,
                ss,
                rate("encrypt"),
                rate("decrypt"),
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_covers_both_sector_sizes_and_operations() {
        let r = run_benchmark(0.01);
        for imp in Implementation::available() {
            for ss in [512, 4096] {
                for op in ["encrypt", "decrypt"] {
                    let m = r
                        .results
                        .iter()
                        .find(|x| {
                            x.implementation == imp && x.sector_size == ss && x.operation == op
                        })
                        .expect("measurement present");
                    assert!(m.bytes >= 2 * BENCH_BUFFER as u64 / 2 && m.seconds > 0.0);
                }
            }
        }
        let table = r.table();
        assert!(
            table.contains("aes-xts-plain64") && table.contains("4096b"),
            "{table}"
        );
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["cipher"], "aes-xts-plain64");
    }
}
