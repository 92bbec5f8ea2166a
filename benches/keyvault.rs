//! Key Vault provider timings against the local emulator (TLS, challenge check, real SDK path):
//! - one wrap+unwrap round trip (median of many) for an RSA-2048 key and a Managed HSM AES key;
//! - how long a hung server takes to be declared Transient, with the default settings and with
//!   a short deadline.
//!
//! Run: `cargo bench --bench keyvault` (release build). Optional: `KV_BENCH_ITERS=500`.

use kvcrypt_keyvault::{KeyVaultProvider, VaultConfig};
use kvcrypt_kv_emulator::{Fault, FaultKind, Op};
use kvcrypt_testkit::emulator::{HSM, Kv, VAULT, key_id};
use kvcrypt_testkit::keys::random_vmk;
use std::time::{Duration, Instant};

fn stats(mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let pct = |p: f64| d[((d.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "n={} median={:.2} ms p10={:.2} p90={:.2} min={:.2} max={:.2}",
        d.len(),
        ms(pct(0.5)),
        ms(pct(0.1)),
        ms(pct(0.9)),
        ms(d[0]),
        ms(d[d.len() - 1])
    )
}

async fn round_trips(provider: &KeyVaultProvider, id: &str, iters: usize) -> Vec<Duration> {
    let vmk = random_vmk();
    // Warm-up: token, challenge, TLS connection.
    for _ in 0..10 {
        let s = provider.wrap(id, None, &vmk).await.expect("wrap");
        provider
            .unwrap(&s.key_id, &s.algorithm, &s.wrapped)
            .await
            .expect("unwrap");
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let s = provider.wrap(id, None, &vmk).await.expect("wrap");
        let back = provider
            .unwrap(&s.key_id, &s.algorithm, &s.wrapped)
            .await
            .expect("unwrap");
        times.push(t.elapsed());
        assert_eq!(back.expose(), vmk.expose());
    }
    times
}

async fn hang_time(kv: &Kv, cfg: &VaultConfig) -> (Duration, String) {
    let provider = KeyVaultProvider::new(cfg).expect("provider");
    let s = provider
        .wrap(&key_id(VAULT, "rsa"), None, &random_vmk())
        .await
        .expect("wrap");
    kv.emu.inject_fault(Fault::new(FaultKind::Hang));
    let t = Instant::now();
    let err = provider
        .unwrap(&s.key_id, &s.algorithm, &s.wrapped)
        .await
        .expect_err("hung server");
    let elapsed = t.elapsed();
    kv.emu.clear_faults();
    (elapsed, format!("{:?}: {err}", err.class()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let iters: usize = std::env::var("KV_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let kv = Kv::start();
    kv.emu
        .create_key("rsa", "RSA", Some(2048))
        .expect("rsa key");
    kv.emu
        .create_key("aes", "oct-HSM", Some(256))
        .expect("aes key");
    let p = kv.principal("bench", &[Op::Get, Op::Wrap, Op::Unwrap]);
    let mut cfg = kv.config(&p);
    // Production defaults for timing (the helper shortens them for tests).
    let defaults = VaultConfig::new(cfg.credential.clone());
    cfg.attempt_timeout_ms = defaults.attempt_timeout_ms;
    cfg.deadline_ms = defaults.deadline_ms;
    cfg.max_retries = defaults.max_retries;
    cfg.retry_delay_ms = defaults.retry_delay_ms;
    cfg.max_retry_delay_ms = defaults.max_retry_delay_ms;
    let provider = KeyVaultProvider::new(&cfg).expect("provider");

    let rsa = round_trips(&provider, &key_id(VAULT, "rsa"), iters).await;
    println!(
        "wrap+unwrap RSA-2048 (RSA-OAEP-256), Key Vault:  {}",
        stats(rsa)
    );
    let aes = round_trips(&provider, &key_id(HSM, "aes"), iters).await;
    println!(
        "wrap+unwrap oct-HSM (CKM_AES_KEY_WRAP), M-HSM: {}",
        stats(aes)
    );

    let (t, what) = hang_time(&kv, &cfg).await;
    println!(
        "hung server, defaults (attempt {} ms, deadline {} ms, {} retries): declared after {:.2} s — {what}",
        cfg.attempt_timeout_ms,
        cfg.deadline_ms,
        cfg.max_retries,
        t.as_secs_f64()
    );
    let mut short = cfg.clone();
    short.attempt_timeout_ms = 1_000;
    short.deadline_ms = 3_000;
    let (t, what) = hang_time(&kv, &short).await;
    println!(
        "hung server, attempt 1000 ms / deadline 3000 ms: declared after {:.2} s — {what}",
        t.as_secs_f64()
    );
}
