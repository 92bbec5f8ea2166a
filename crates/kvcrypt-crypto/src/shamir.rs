//! Shamir secret sharing of the volume master key over GF(2^8), for split slot policies
//! (`all`, `k-of-n`; docs/FORMAT.md §3.3): the 64-byte VMK is split byte by byte, one random
//! polynomial of degree k − 1 per byte whose constant term is that byte; share `x` holds the
//! 64 values of the polynomials at `x` (x = 1..=n). Any k shares give the VMK back by Lagrange
//! interpolation at 0; k − 1 shares reveal nothing about it.
//!
//! Why our own ~100 lines instead of a crate: we looked at the maintained ones.
//! `vsss-rs` (6.x) returns shares as heap `Vec<u8>`s / generic-array values it allocates
//! itself and combines into a fresh heap secret, and `sharks` (0.5, unmaintained since 2021)
//! returns `Share { y: Vec<GF256> }` and multiplies through log/exp tables indexed by the
//! secret bytes (a cache-timing leak). Neither can work on caller-provided buffers, so every
//! share and the recombined VMK would pass through ordinary (swappable, dumpable, not wiped)
//! heap memory, which our rule forbids: key material lives only in [`SecretBytes`]. Here the
//! polynomial coefficients, every share and the result are `SecretBytes`, and the field
//! arithmetic is branch-free and table-free (multiplication by shift-and-mask, inversion by a
//! fixed chain of multiplications), so its timing does not depend on secret data.
//!
//! The field is GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1 (0x11b), as in most
//! Shamir implementations (e.g. HashiCorp Vault's), so the known vectors of FIPS 197 §4.2 apply.

use rand::RngCore;

use crate::secmem::{SecretBytes, VMK_LEN, VolumeKey};

/// Largest number of shares (and of key slots' vaults) a split volume may have.
pub const MAX_SHARES: u8 = 16;

/// Why a split or combination was refused. Carries no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("threshold {k} of {n} shares is invalid (need 2 <= k <= n <= {MAX_SHARES})")]
    BadThreshold { k: u8, n: u8 },
    #[error("share x-coordinate 0 is invalid (it would be the secret itself)")]
    ZeroX,
    #[error("share x-coordinate {0} is given twice")]
    DuplicateX(u8),
    #[error("too few shares: {got} given, at least {need} needed")]
    TooFewShares { got: usize, need: usize },
}

/// Multiplication in GF(2^8) mod 0x11b, constant time: eight rounds of shift-and-add where
/// both the "add b if this bit of a is set" and the reduction are masks, never branches or
/// table lookups.
#[inline]
fn mul(a: u8, b: u8) -> u8 {
    let mut a = a;
    let mut b = b;
    let mut p = 0u8;
    for _ in 0..8 {
        // 0xff when the low bit of b is set, else 0.
        p ^= a & (b & 1).wrapping_neg();
        // 0x1b when the high bit of a is set (reduction of x^8), else 0.
        let carry = (a >> 7).wrapping_neg() & 0x1b;
        a = (a << 1) ^ carry;
        b >>= 1;
    }
    p
}

/// Inverse in GF(2^8): a^254 (a^255 = 1 for a ≠ 0), by a fixed square-and-multiply chain, so
/// constant time. `inv(0) = 0`, never used (denominators are differences of distinct x).
fn inv(a: u8) -> u8 {
    let a2 = mul(a, a);
    let a3 = mul(a2, a); // a^3
    let a6 = mul(a3, a3);
    let a12 = mul(a6, a6);
    let a15 = mul(a12, a3); // a^15
    let a30 = mul(a15, a15);
    let a60 = mul(a30, a30);
    let a120 = mul(a60, a60);
    let a240 = mul(a120, a120);
    let a252 = mul(a240, a12);
    mul(a252, a2) // a^254
}

/// Splits `vmk` into `n` shares, any `k` of which rebuild it. Share `i` (0-based) has
/// x-coordinate `i + 1`. The random coefficients come from the operating system's CSPRNG
/// straight into secret memory.
pub fn split(vmk: &VolumeKey, k: u8, n: u8) -> Result<Vec<(u8, VolumeKey)>, ShamirError> {
    if k < 2 || k > n || n > MAX_SHARES {
        return Err(ShamirError::BadThreshold { k, n });
    }
    // Coefficients a_1..a_{k-1} of every byte's polynomial: (k − 1) × 64 ≤ 960 bytes.
    const COEFFS: usize = (MAX_SHARES as usize - 1) * VMK_LEN;
    let mut coeffs = SecretBytes::<COEFFS>::zeroed();
    let used = usize::from(k - 1) * VMK_LEN;
    rand::rngs::OsRng.fill_bytes(&mut coeffs.expose_mut()[..used]);
    let c = coeffs.expose();
    let secret = vmk.expose();
    let mut shares = Vec::with_capacity(usize::from(n));
    for x in 1..=n {
        let mut share = VolumeKey::zeroed();
        let y = share.expose_mut();
        for (i, out) in y.iter_mut().enumerate() {
            // Horner: (((a_{k-1}) x + a_{k-2}) x + …) x + a_0, a_0 = the secret byte.
            let mut acc = 0u8;
            for j in (0..usize::from(k - 1)).rev() {
                acc = mul(acc, x) ^ c[j * VMK_LEN + i];
            }
            *out = mul(acc, x) ^ secret[i];
        }
        shares.push((x, share));
    }
    Ok(shares)
}

/// Rebuilds the secret from exactly the `shares` given, by Lagrange interpolation at 0. The
/// x-coordinates must be distinct and non-zero. Whether the result is the volume's key is for
/// the caller to check (the header's key check): shares of different splits, or fewer than the
/// threshold, give a wrong key, not an error.
pub fn combine(shares: &[(u8, &VolumeKey)]) -> Result<VolumeKey, ShamirError> {
    if shares.is_empty() {
        return Err(ShamirError::TooFewShares { got: 0, need: 1 });
    }
    for (i, (x, _)) in shares.iter().enumerate() {
        if *x == 0 {
            return Err(ShamirError::ZeroX);
        }
        if shares[..i].iter().any(|(o, _)| o == x) {
            return Err(ShamirError::DuplicateX(*x));
        }
    }
    let mut out = VolumeKey::zeroed();
    for (j, (xj, yj)) in shares.iter().enumerate() {
        // l_j(0) = Π_{m≠j} x_m / (x_m − x_j); in GF(2^8) subtraction is XOR. The x are
        // public, but the arithmetic is constant time anyway.
        let mut num = 1u8;
        let mut den = 1u8;
        for (m, (xm, _)) in shares.iter().enumerate() {
            if m != j {
                num = mul(num, *xm);
                den = mul(den, xm ^ xj);
            }
        }
        let l = mul(num, inv(den));
        for (o, y) in out.expose_mut().iter_mut().zip(yj.expose()) {
            *o ^= mul(l, *y);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> VolumeKey {
        let mut k = VolumeKey::zeroed();
        for (i, b) in k.expose_mut().iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        k
    }

    /// Slow reference multiplication (Russian peasant with branches), for the exhaustive check.
    fn mul_ref(mut a: u8, mut b: u8) -> u8 {
        let mut p = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                p ^= a;
            }
            let hi = a & 0x80 != 0;
            a <<= 1;
            if hi {
                a ^= 0x1b;
            }
            b >>= 1;
        }
        p
    }

    #[test]
    fn field_arithmetic_matches_fips197_and_is_a_field() {
        // FIPS 197 §4.2: {57} • {83} = {c1}; §4.2.1: {57} • {13} = {fe}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        // FIPS 197 §5.1.1 S-box derivation: the inverse of {53} is {ca}.
        assert_eq!(inv(0x53), 0xca);
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), mul_ref(a, b), "{a} * {b}");
            }
            if a != 0 {
                assert_eq!(mul(a, inv(a)), 1, "inverse of {a}");
            }
        }
    }

    #[test]
    fn known_vector_combines() {
        // Secret byte s, polynomial f(x) = s + 0x02·x (k = 2): f(1) = s ^ 2, f(2) = s ^ 4.
        // Independent of `split`: hand-made shares of the secret 0x00..0x3f.
        let mut s1 = VolumeKey::zeroed();
        let mut s2 = VolumeKey::zeroed();
        for i in 0..64u8 {
            s1.expose_mut()[usize::from(i)] = i ^ mul(0x02, 1);
            s2.expose_mut()[usize::from(i)] = i ^ mul(0x02, 2);
        }
        let got = combine(&[(1, &s1), (2, &s2)]).unwrap();
        let want: Vec<u8> = (0..64u8).collect();
        assert_eq!(&got.expose()[..], &want[..]);
        // f(x) = 0x42 + 0x17·x + 0x9a·x² at x = 3, 7, 200 (k = 3), evaluated with mul_ref.
        let f = |x: u8| 0x42 ^ mul_ref(0x17, x) ^ mul_ref(0x9a, mul_ref(x, x));
        let shares: Vec<(u8, VolumeKey)> = [3u8, 7, 200]
            .iter()
            .map(|&x| (x, VolumeKey::from_slice(&[f(x); 64]).unwrap()))
            .collect();
        let refs: Vec<(u8, &VolumeKey)> = shares.iter().map(|(x, s)| (*x, s)).collect();
        assert_eq!(combine(&refs).unwrap().expose(), &[0x42; 64]);
    }

    /// Every k-subset of indices 0..n.
    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|m| m.count_ones() as usize == k)
            .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn every_k_subset_rebuilds_and_fewer_or_wrong_shares_do_not() {
        let vmk = key(5);
        for (k, n) in [
            (2u8, 2u8),
            (2, 3),
            (3, 3),
            (2, 5),
            (3, 5),
            (4, 6),
            (5, 5),
            (3, 8),
        ] {
            let shares = split(&vmk, k, n).unwrap();
            assert_eq!(shares.len(), usize::from(n));
            for (i, (x, s)) in shares.iter().enumerate() {
                assert_eq!(usize::from(*x), i + 1);
                assert_ne!(s.expose(), vmk.expose(), "a share is not the key");
            }
            for sub in subsets(usize::from(n), usize::from(k)) {
                let picked: Vec<(u8, &VolumeKey)> =
                    sub.iter().map(|&i| (shares[i].0, &shares[i].1)).collect();
                assert_eq!(
                    combine(&picked).unwrap().expose(),
                    vmk.expose(),
                    "{k}/{n} {sub:?}"
                );
                // One share altered (one bit): another key.
                let mut bad = shares[sub[0]].1.clone();
                bad.expose_mut()[9] ^= 1;
                let mut wrong = picked.clone();
                wrong[0] = (shares[sub[0]].0, &bad);
                assert_ne!(combine(&wrong).unwrap().expose(), vmk.expose());
                // The right share bytes under another x: another key.
                let other_x = (1..=n).find(|x| !sub.iter().any(|&i| shares[i].0 == *x));
                if let Some(ox) = other_x {
                    let mut moved = picked.clone();
                    moved[0].0 = ox;
                    assert_ne!(combine(&moved).unwrap().expose(), vmk.expose());
                }
            }
            // k − 1 shares interpolate to something else (k-1 points fit many polynomials).
            for sub in subsets(usize::from(n), usize::from(k - 1)) {
                let picked: Vec<(u8, &VolumeKey)> =
                    sub.iter().map(|&i| (shares[i].0, &shares[i].1)).collect();
                assert_ne!(combine(&picked).unwrap().expose(), vmk.expose(), "{sub:?}");
            }
        }
    }

    #[test]
    fn splits_are_random() {
        let vmk = key(1);
        let a = split(&vmk, 2, 3).unwrap();
        let b = split(&vmk, 2, 3).unwrap();
        assert_ne!(a[0].1.expose(), b[0].1.expose());
        // Shares of two splits do not mix.
        let mixed = combine(&[(1, &a[0].1), (2, &b[1].1)]).unwrap();
        assert_ne!(mixed.expose(), vmk.expose());
    }

    #[test]
    fn bad_parameters_are_refused() {
        let vmk = key(2);
        for (k, n) in [(0u8, 3u8), (1, 3), (4, 3), (2, 17), (17, 17), (2, 0)] {
            assert_eq!(
                split(&vmk, k, n).unwrap_err(),
                ShamirError::BadThreshold { k, n }
            );
        }
        assert!(split(&vmk, 16, 16).is_ok());
        let s = split(&vmk, 2, 2).unwrap();
        assert_eq!(
            combine(&[]).unwrap_err(),
            ShamirError::TooFewShares { got: 0, need: 1 }
        );
        assert_eq!(
            combine(&[(0, &s[0].1), (2, &s[1].1)]).unwrap_err(),
            ShamirError::ZeroX
        );
        assert_eq!(
            combine(&[(2, &s[0].1), (2, &s[1].1)]).unwrap_err(),
            ShamirError::DuplicateX(2)
        );
    }

    #[test]
    fn errors_carry_no_key_material() {
        let e = ShamirError::TooFewShares { got: 1, need: 2 };
        assert_eq!(format!("{e}"), "too few shares: 1 given, at least 2 needed");
    }
}
