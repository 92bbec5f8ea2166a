//! libFuzzer-free mutation fuzzer for the header parser, for machines without cargo-fuzz /
//! nightly (the `fuzz/` directory has the cargo-fuzz target with the same entry point).
//!
//! `cargo run --release --example fuzz_header -- [EXECUTIONS] [RNG_SEED]`
//! `cargo run --example fuzz_header -- --seeds DIR` writes the seed inputs (for cargo-fuzz).
//!
//! Starts from valid header copies (`kvcrypt_format::fuzzing::seed_inputs`), applies random
//! stacked mutations (bit flips, byte/integer overwrites with boundary values, JSON-token
//! splices, truncation, extension, flag changes) and keeps inputs the parser accepts as further
//! seeds. Stops with exit code 1 on a property violation; a panic aborts with the input saved.

use kvcrypt_format::fuzzing::{check_input, seed_inputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"4294967296",
    b"1e999",
    b"\\u0000",
    b"\\ud800",
    b"\"id\":0",
    b"\"extra\":1",
    b"====",
    b"\xff\xfe",
];
const INTS: &[u64] = &[
    0,
    1,
    2,
    511,
    512,
    4095,
    4096,
    1 << 20,
    (1 << 20) + 1,
    520192,
    520193,
    u32::MAX as u64,
    u64::MAX,
];

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=4) {
        if input.len() < 2 {
            input.push(rng.r#gen());
            continue;
        }
        let body = input.len() - 1;
        // Bias towards the binary block's fields and the JSON start.
        let pos = 1 + if rng.gen_bool(0.5) {
            rng.gen_range(0..body.min(256))
        } else {
            rng.gen_range(0..body)
        };
        match rng.gen_range(0..9) {
            0 => input[pos] ^= 1 << rng.gen_range(0..8),
            1 => input[pos] = rng.r#gen(),
            2 => {
                let v = INTS[rng.gen_range(0..INTS.len())].to_le_bytes();
                let w = [2usize, 4, 8][rng.gen_range(0..3)];
                let end = (pos + w).min(input.len());
                input[pos..end].copy_from_slice(&v[..end - pos]);
            }
            3 => {
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                let end = (pos + t.len()).min(input.len());
                input[pos..end].copy_from_slice(&t[..end - pos]);
            }
            4 => input.truncate(rng.gen_range(1..=input.len())),
            5 => input.extend(std::iter::repeat_n(rng.r#gen::<u8>(), rng.gen_range(1..64))),
            6 => input[0] = rng.gen_range(0..8),
            7 => {
                // Delete a range (shifts the JSON).
                let end = (pos + rng.gen_range(1..16)).min(input.len());
                input.drain(pos..end);
            }
            _ => {
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                let at = pos.min(input.len());
                input.splice(at..at, t.iter().copied());
            }
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--seeds") {
        let Some(dir) = argv.get(1) else {
            eprintln!("usage: fuzz_header --seeds DIR");
            std::process::exit(2);
        };
        std::fs::create_dir_all(dir).expect("create seed directory");
        for (i, s) in seed_inputs().iter().enumerate() {
            std::fs::write(format!("{dir}/seed-{i}"), s).expect("write seed");
        }
        return;
    }
    let mut args = argv.into_iter();
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut corpus = seed_inputs();
    let (mut accepted, started) = (0u64, std::time::Instant::now());
    for i in 0..n {
        let mut input = corpus[rng.gen_range(0..corpus.len())].clone();
        mutate(&mut rng, &mut input);
        let result = std::panic::catch_unwind(|| check_input(&input));
        match result {
            Ok(Ok(true)) => {
                accepted += 1;
                if corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                let _ = std::fs::write("fuzz-header-failure.bin", &input);
                eprintln!(
                    "property violation after {i} executions: {e} (input saved to fuzz-header-failure.bin)"
                );
                std::process::exit(1);
            }
            Err(_) => {
                let _ = std::fs::write("fuzz-header-failure.bin", &input);
                eprintln!("PANIC after {i} executions (input saved to fuzz-header-failure.bin)");
                std::process::exit(1);
            }
        }
    }
    println!(
        "fuzz_header: {n} executions, {accepted} accepted, corpus {}, rng seed {seed}, {:.1}s, no crash",
        corpus.len(),
        started.elapsed().as_secs_f64()
    );
}
