//! AES-256-XTS kernel for x86_64 CPUs with VAES + VPCLMULQDQ + AVX2 — the only `unsafe` code of `crypto`.
//!
//! Why hand-written: the `aes` crate 0.8 pipelines 8 blocks of 128-bit AES-NI, which caps it at
//! roughly half of what the CPU can do: VAES executes two AES rounds per 256-bit instruction
//! (AMD Zen 4: two 256-bit AES units), and OpenSSL ≥ 3.2 uses VAES for XTS. To reach OpenSSL's
//! speed we keep 16 blocks (8 × ymm) in flight, fold the XTS pre-whitening into round key 0
//! and the post-whitening into the last round key (`aesenclast(x, k14 ^ T)`), and advance the
//! tweaks 16 blocks at a time with one byte-shift per lane (T·x^16, see [`mul_x16`]).
//!
//! VAES intrinsics (`_mm256_aesenc_epi128`) are only stable from Rust 1.89 while the crate's
//! MSRV is 1.88, so the four VAES instructions and VPCLMULQDQ are emitted by tiny register-only
//! `asm!` blocks (pure, no memory, no flags); everything else is stable AES-NI / AVX2 intrinsics.
//!
//! Key schedules are expanded directly into caller-provided secret memory ([`Keys`] lives in a
//! `SecretBox`), so no copy of them is left on the stack. Tweak scratch arrays are wiped before
//! returning.
//!
//! Correctness is checked by the IEEE 1619 vectors, the `xts-mode` cross-check and the OpenSSL
//! reference ciphertext in `tests/xts_vectors.rs`, for both this kernel and the portable path.

use core::arch::asm;
use core::arch::x86_64::*;

use zeroize::Zeroize;

use crate::secmem::Pod;

cpufeatures::new!(vaes_cpu, "aes", "avx2", "vaes", "vpclmulqdq");

/// True if this CPU (and OS) can run the kernel.
pub(super) fn available() -> bool {
    vaes_cpu::get()
}

/// Expanded AES-256 key schedules for XTS: data key (encrypt + decrypt) and tweak key.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub(super) struct Keys {
    enc: [__m128i; 15],
    dec: [__m128i; 15],
    tweak: [__m128i; 15],
}

// SAFETY: arrays of SIMD integer vectors: every bit pattern is valid, no heap, no resources.
unsafe impl Pod for Keys {}

/// `x = op(x, k)` for one VAES instruction on a ymm register (two AES blocks).
macro_rules! vaes {
    ($op:literal, $x:expr, $k:expr) => {{
        let k: __m256i = $k;
        // SAFETY: register-only VAES instruction; callers check VAES support at runtime
        // (`available()`) before entering any function that uses this macro.
        unsafe {
            asm!(
                concat!($op, " {x}, {x}, {k}"),
                x = inout(ymm_reg) $x,
                k = in(ymm_reg) k,
                options(pure, nomem, nostack, preserves_flags)
            )
        }
    }};
}

/// Expands both halves of the 64-byte XTS key into `keys`, in place.
pub(super) fn expand(key: &[u8; 64], keys: &mut Keys) {
    assert!(available(), "VAES kernel selected on a CPU without VAES");
    // SAFETY: the CPU supports AES-NI and AVX2 (checked above).
    unsafe {
        expand_one(&key[..32], &mut keys.enc);
        expand_one(&key[32..], &mut keys.tweak);
        keys.dec[0] = keys.enc[14];
        for i in 1..14 {
            keys.dec[i] = _mm_aesimc_si128(keys.enc[14 - i]);
        }
        keys.dec[14] = keys.enc[0];
    }
}

#[inline]
#[target_feature(enable = "aes,avx2")]
fn assist(t: __m128i, t2: __m128i) -> __m128i {
    let mut t = t;
    let mut t4 = _mm_slli_si128::<4>(t);
    t = _mm_xor_si128(t, t4);
    t4 = _mm_slli_si128::<4>(t4);
    t = _mm_xor_si128(t, t4);
    t4 = _mm_slli_si128::<4>(t4);
    t = _mm_xor_si128(t, t4);
    _mm_xor_si128(t, t2)
}

/// AES-256 key expansion with AESKEYGENASSIST (Intel AES-NI white paper, fig. 26).
#[target_feature(enable = "aes,avx2")]
fn expand_one(key: &[u8], rk: &mut [__m128i; 15]) {
    assert_eq!(key.len(), 32);
    // SAFETY: `key` is 32 bytes (asserted); unaligned loads.
    let (mut t1, mut t3) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    rk[0] = t1;
    rk[1] = t3;
    macro_rules! odd {
        ($i:literal, $rcon:literal) => {
            t1 = assist(
                t1,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(t3)),
            );
            rk[$i] = t1;
        };
    }
    macro_rules! even {
        ($i:literal) => {
            t3 = assist(
                t3,
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(t1)),
            );
            rk[$i] = t3;
        };
    }
    odd!(2, 0x01);
    even!(3);
    odd!(4, 0x02);
    even!(5);
    odd!(6, 0x04);
    even!(7);
    odd!(8, 0x08);
    even!(9);
    odd!(10, 0x10);
    even!(11);
    odd!(12, 0x20);
    even!(13);
    odd!(14, 0x40);
}

/// Broadcast round key `k` to both 128-bit lanes.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn bcast(k: &__m128i) -> __m256i {
    _mm256_broadcastsi128_si256(*k)
}

/// Tweak · x (GF(2^128), IEEE 1619 little-endian convention).
#[inline(always)]
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ (0u128.wrapping_sub(t >> 127) & 0x87)
}

/// Each 128-bit lane · x^16: shift left two bytes and fold the 16 bits shifted out back in
/// with x^128 = x^7 + x^2 + x + 1 (one carry-less multiply by 0x87). Four vector ops per two
/// tweaks; the shift-and-xor version without VPCLMULQDQ needed nine and cost ~5 % speed.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn mul_x16(t: __m256i) -> __m256i {
    let red = fold_0x87(_mm256_bsrli_epi128::<14>(t));
    _mm256_xor_si256(_mm256_bslli_epi128::<2>(t), red)
}

/// Each 128-bit lane · x^K for 1 ≤ K ≤ 63 (`KR` = 64 − K): 128-bit shift left by K bits,
/// then fold the K bits shifted out back in with one carry-less multiply by 0x87.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn mul_xk<const K: i32, const KR: i32>(t: __m256i) -> __m256i {
    debug_assert_eq!(K + KR, 64);
    let carries = _mm256_srli_epi64::<KR>(t);
    let shifted = _mm256_xor_si256(_mm256_slli_epi64::<K>(t), _mm256_bslli_epi128::<8>(carries));
    let red = fold_0x87(_mm256_bsrli_epi128::<8>(carries));
    _mm256_xor_si256(shifted, red)
}

/// Each 128-bit lane: the bits shifted out of the top (in the low 64 bits of `out`) times the
/// reduction polynomial 0x87 (x^128 = x^7 + x^2 + x + 1), as one carry-less multiply.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn fold_0x87(mut out: __m256i) -> __m256i {
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    // SAFETY: register-only VPCLMULQDQ (checked together with VAES in `available()`).
    unsafe {
        asm!(
            "vpclmulqdq {r}, {r}, {p}, 0x00",
            r = inout(ymm_reg) out,
            p = in(ymm_reg) poly,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    out
}

/// Scratch for tweaks, wiped when dropped.
struct Scratch {
    seq: [u128; 2],
    tw: [__m256i; 8],
    t0: [u128; 8],
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.seq.zeroize();
        self.t0.zeroize();
        for t in self.tw.iter_mut() {
            // SAFETY: `t` is a valid, aligned element of our own array.
            unsafe { std::ptr::write_volatile(t, _mm256_setzero_si256()) };
        }
    }
}

/// Encrypts (`ENC`) or decrypts whole sectors in place. `buf.len()` is a multiple of
/// `sector_size`, which is a non-zero multiple of 16 (checked by the caller).
pub(super) fn xts<const ENC: bool>(keys: &Keys, buf: &mut [u8], first: u64, sector_size: usize) {
    assert!(available(), "VAES kernel selected on a CPU without VAES");
    assert!(
        sector_size >= 16
            && sector_size.is_multiple_of(16)
            && buf.len().is_multiple_of(sector_size)
    );
    // SAFETY: CPU support checked above; shapes asserted.
    unsafe { xts_inner::<ENC>(keys, buf, first, sector_size) }
}

#[target_feature(enable = "aes,avx2")]
unsafe fn xts_inner<const ENC: bool>(keys: &Keys, buf: &mut [u8], first: u64, sector_size: usize) {
    let mut s = Scratch {
        seq: [0; 2],
        tw: [_mm256_setzero_si256(); 8],
        t0: [0; 8],
    };
    let mut sectors = buf.chunks_exact_mut(sector_size);
    let mut n = first;
    loop {
        initial_tweaks(keys, n, &mut s.t0);
        let mut done = 0;
        for (i, sector) in sectors.by_ref().take(8).enumerate() {
            one_sector::<ENC>(keys, sector, s.t0[i], &mut s);
            done += 1;
        }
        if done < 8 {
            break;
        }
        n = n.wrapping_add(8);
    }
}

/// Tweaks T = AES(K2, sector) for sectors n..n+8, four VAES pipelines at once.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn initial_tweaks(keys: &Keys, n: u64, out: &mut [u128; 8]) {
    let mut x = [_mm256_setzero_si256(); 4];
    let k0 = bcast(&keys.tweak[0]);
    for (i, xi) in x.iter_mut().enumerate() {
        let a = n.wrapping_add(2 * i as u64) as i64;
        let b = n.wrapping_add(2 * i as u64 + 1) as i64;
        *xi = _mm256_xor_si256(_mm256_set_epi64x(0, b, 0, a), k0);
    }
    for r in 1..14 {
        let k = bcast(&keys.tweak[r]);
        for xi in x.iter_mut() {
            vaes!("vaesenc", *xi, k);
        }
    }
    let k = bcast(&keys.tweak[14]);
    for (i, xi) in x.iter_mut().enumerate() {
        vaes!("vaesenclast", *xi, k);
        // SAFETY: out has 8 u128 = 4 × 32 bytes; unaligned store of lane pair i.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(2 * i).cast(), *xi) };
    }
}

#[inline]
#[target_feature(enable = "aes,avx2")]
fn one_sector<const ENC: bool>(keys: &Keys, sector: &mut [u8], t0: u128, s: &mut Scratch) {
    // Tweaks T_0..T_15 as pairs: tw[i] = [T_0, T_1] · x^(2i), all independent of each other
    // (a serial doubling chain here cost ~15 % at 512-byte sectors).
    s.seq[0] = t0;
    s.seq[1] = mul_x(t0);
    // SAFETY: seq has at least 2 u128; lane 0 = T_0, lane 1 = T_1.
    let base = unsafe { _mm256_loadu_si256(s.seq.as_ptr().cast()) };
    s.tw[0] = base;
    s.tw[1] = mul_xk::<2, 62>(base);
    s.tw[2] = mul_xk::<4, 60>(base);
    s.tw[3] = mul_xk::<6, 58>(base);
    s.tw[4] = mul_xk::<8, 56>(base);
    s.tw[5] = mul_xk::<10, 54>(base);
    s.tw[6] = mul_xk::<12, 52>(base);
    s.tw[7] = mul_xk::<14, 50>(base);
    let mut chunks = sector.chunks_exact_mut(256);
    let mut advance = false;
    for c in chunks.by_ref() {
        // Advance lazily, so the last batch of a sector does not compute unused tweaks.
        if advance {
            for t in s.tw.iter_mut() {
                *t = mul_x16(*t);
            }
        }
        blocks16::<ENC>(keys, c, &s.tw);
        advance = true;
    }
    // Fewer than 16 blocks left: the next tweaks cover them in order.
    let rest = chunks.into_remainder();
    if rest.is_empty() {
        return;
    }
    if advance {
        for t in s.tw.iter_mut() {
            *t = mul_x16(*t);
        }
    }
    let mut pairs = rest.chunks_exact_mut(32);
    let mut i = 0;
    for c in pairs.by_ref() {
        blocks2::<ENC>(keys, c, s.tw[i]);
        i += 1;
    }
    let last = pairs.into_remainder();
    if !last.is_empty() {
        block1::<ENC>(keys, last, _mm256_castsi256_si128(s.tw[i]));
    }
}

/// 16 blocks (256 bytes), 8 VAES pipelines.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn blocks16<const ENC: bool>(keys: &Keys, c: &mut [u8], tw: &[__m256i; 8]) {
    debug_assert_eq!(c.len(), 256);
    let rk = if ENC { &keys.enc } else { &keys.dec };
    let p = c.as_mut_ptr();
    let k0 = bcast(&rk[0]);
    let mut x = [_mm256_setzero_si256(); 8];
    for i in 0..8 {
        // SAFETY: c is 256 bytes; block pair i is bytes 32i..32i+32.
        let d = unsafe { _mm256_loadu_si256(p.add(32 * i).cast()) };
        x[i] = _mm256_xor_si256(d, _mm256_xor_si256(tw[i], k0));
    }
    for r in rk.iter().take(14).skip(1) {
        let k = bcast(r);
        for xi in x.iter_mut() {
            if ENC {
                vaes!("vaesenc", *xi, k);
            } else {
                vaes!("vaesdec", *xi, k);
            }
        }
    }
    let kl = bcast(&rk[14]);
    for i in 0..8 {
        let k = _mm256_xor_si256(kl, tw[i]);
        if ENC {
            vaes!("vaesenclast", x[i], k);
        } else {
            vaes!("vaesdeclast", x[i], k);
        }
        // SAFETY: as for the load.
        unsafe { _mm256_storeu_si256(p.add(32 * i).cast(), x[i]) };
    }
}

/// 2 blocks (32 bytes).
#[inline]
#[target_feature(enable = "aes,avx2")]
fn blocks2<const ENC: bool>(keys: &Keys, c: &mut [u8], tw: __m256i) {
    debug_assert_eq!(c.len(), 32);
    let rk = if ENC { &keys.enc } else { &keys.dec };
    let p = c.as_mut_ptr();
    // SAFETY: c is 32 bytes.
    let d = unsafe { _mm256_loadu_si256(p.cast()) };
    let mut x = _mm256_xor_si256(d, _mm256_xor_si256(tw, bcast(&rk[0])));
    for r in rk.iter().take(14).skip(1) {
        if ENC {
            vaes!("vaesenc", x, bcast(r));
        } else {
            vaes!("vaesdec", x, bcast(r));
        }
    }
    let k = _mm256_xor_si256(bcast(&rk[14]), tw);
    if ENC {
        vaes!("vaesenclast", x, k);
    } else {
        vaes!("vaesdeclast", x, k);
    }
    // SAFETY: c is 32 bytes.
    unsafe { _mm256_storeu_si256(p.cast(), x) };
}

/// 1 block (16 bytes), plain AES-NI.
#[inline]
#[target_feature(enable = "aes,avx2")]
fn block1<const ENC: bool>(keys: &Keys, c: &mut [u8], tw: __m128i) {
    debug_assert_eq!(c.len(), 16);
    let rk = if ENC { &keys.enc } else { &keys.dec };
    let p = c.as_mut_ptr();
    // SAFETY: c is 16 bytes.
    let d = unsafe { _mm_loadu_si128(p.cast()) };
    let mut x = _mm_xor_si128(d, _mm_xor_si128(tw, rk[0]));
    for r in rk.iter().take(14).skip(1) {
        x = if ENC {
            _mm_aesenc_si128(x, *r)
        } else {
            _mm_aesdec_si128(x, *r)
        };
    }
    let k = _mm_xor_si128(rk[14], tw);
    x = if ENC {
        _mm_aesenclast_si128(x, k)
    } else {
        _mm_aesdeclast_si128(x, k)
    };
    // SAFETY: c is 16 bytes.
    unsafe { _mm_storeu_si128(p.cast(), x) };
}
