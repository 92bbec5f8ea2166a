//! Support for fuzzing the header parser (`fuzz/` cargo-fuzz target and the libFuzzer-free
//! `examples/fuzz_header.rs`). Not used by kvcrypt itself.
//!
//! Inputs use a compact encoding so a fuzzer does not have to grow 1 MiB images:
//! `flags (1 byte) || copy bytes`. The copy bytes become the primary copy; with flag bit 1 they
//! are also placed as the secondary copy (copy index patched to 1; bit 2 also bumps its
//! sequence). With bit 0 the checksums are recomputed after that, so mutations get past the
//! checksum into the field validation and the JSON parser.
//!
//! An input that starts with the kvcrypt magic is instead a raw header-area image (both copies,
//! as `tests/data/headers/` holds them), taken as it is: the hostile corpus seeds the fuzzer
//! directly. The compact inputs this shadows have flags `0x4B` and a copy without the magic,
//! which the parser refuses at its first check, so no input worth mutating is lost.

use std::path::Path;

use super::layout::{self, BINARY_HEADER_SIZE, COPY_SIZE};
use super::{KeySlot, VolumeHeader, encode_image, parse_image};
use kvcrypt_crypto::secmem::VolumeKey;

fn fix_checksum(copy: &mut [u8]) {
    if copy.len() < BINARY_HEADER_SIZE {
        return;
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&copy[layout::OFF_METADATA_LEN..layout::OFF_METADATA_LEN + 8]);
    let len = u64::from_le_bytes(len);
    if len > layout::MAX_METADATA_LEN || BINARY_HEADER_SIZE as u64 + len > copy.len() as u64 {
        return;
    }
    let mut block = [0u8; BINARY_HEADER_SIZE];
    block.copy_from_slice(&copy[..BINARY_HEADER_SIZE]);
    let sum = layout::checksum(
        &block,
        &copy[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + len as usize],
    );
    copy[layout::OFF_CHECKSUM..layout::OFF_CHECKSUM + 32].copy_from_slice(&sum);
}

/// Expands a compact fuzz input into a header-area image.
pub fn image_from_input(data: &[u8]) -> Vec<u8> {
    if data.starts_with(&layout::MAGIC) {
        return data[..data.len().min(layout::HEADER_AREA_SIZE as usize)].to_vec();
    }
    let Some((&flags, body)) = data.split_first() else {
        return Vec::new();
    };
    let body = &body[..body.len().min(COPY_SIZE as usize)];
    let mut image = body.to_vec();
    if flags & 1 != 0 {
        fix_checksum(&mut image);
    }
    if flags & 2 != 0 {
        let mut sec = body.to_vec();
        if sec.len() >= layout::OFF_SEQUENCE + 8 {
            sec[layout::OFF_COPY_INDEX..layout::OFF_COPY_INDEX + 2]
                .copy_from_slice(&1u16.to_le_bytes());
            if flags & 4 != 0 {
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&sec[layout::OFF_SEQUENCE..layout::OFF_SEQUENCE + 8]);
                let seq = u64::from_le_bytes(seq).wrapping_add(1);
                sec[layout::OFF_SEQUENCE..layout::OFF_SEQUENCE + 8]
                    .copy_from_slice(&seq.to_le_bytes());
            }
        }
        if flags & 1 != 0 {
            fix_checksum(&mut sec);
        }
        image.resize(COPY_SIZE as usize, 0);
        image.extend_from_slice(&sec);
    }
    image
}

/// Runs one input through the parser and checks properties of whatever it accepts.
/// `Ok(accepted)` for any input the parser handled correctly; `Err` only for a parser bug
/// (an accepted header that does not re-encode to itself). Panics are bugs too.
pub fn check_input(data: &[u8]) -> Result<bool, String> {
    let image = image_from_input(data);
    let Ok((h, used, damaged)) = parse_image(&image, Path::new("fuzz-input")) else {
        return Ok(false);
    };
    if damaged.iter().any(|d| d.copy == used) {
        return Err("the used copy is also reported damaged".into());
    }
    // Key check and MAC on attacker-controlled content must not panic.
    let _ = h.verify_key(&VolumeKey::zeroed());
    let again = encode_image(&h, h.sequence)
        .map_err(|e| format!("accepted header does not re-encode: {e}"))?;
    let (h2, _, d2) = parse_image(&again, Path::new("re-encoded"))
        .map_err(|e| format!("re-encoded header is rejected: {e}"))?;
    if h2 != h {
        return Err(format!("re-encoded header differs: {h:?} vs {h2:?}"));
    }
    if !d2.is_empty() {
        return Err(format!("fresh image reports damage: {d2:?}"));
    }
    Ok(true)
}

/// Valid compact inputs to start mutating from (primary + secondary, checksums fixed).
pub fn seed_inputs() -> Vec<Vec<u8>> {
    let vmk = VolumeKey::from_slice(&[7u8; 64]).unwrap_or_else(VolumeKey::zeroed);
    let mut seeds = Vec::new();
    for (i, (ss, label, nslots)) in [
        (4096u32, "data", 1usize),
        (512, "", 0),
        (4096, "Grüße \"x\"\n", 3),
    ]
    .into_iter()
    .enumerate()
    {
        let Ok(mut h) = VolumeHeader::new_for_device(64 << 20, ss, label, &vmk) else {
            continue;
        };
        for n in 0..nslots {
            h.add_slot(KeySlot {
                id: 0,
                provider: super::PROVIDER_AZURE.into(),
                key_id: format!("https://v{i}.vault.azure.net/keys/k/{n:032x}"),
                algorithm: ["RSA-OAEP-256", "A256KW", "CKM_AES_KEY_WRAP"][n % 3].into(),
                wrapped: vec![n as u8; 40 + 100 * n],
                created_at: "2026-11-29T08:00:00Z".into(),
                check: None,
                share: None,
            });
        }
        h.seal(&vmk);
        let Ok(image) = encode_image(&h, 5) else {
            continue;
        };
        let mut md_len = [0u8; 8];
        md_len.copy_from_slice(&image[layout::OFF_METADATA_LEN..layout::OFF_METADATA_LEN + 8]);
        let end = BINARY_HEADER_SIZE + u64::from_le_bytes(md_len) as usize;
        let mut input = vec![3u8];
        input.extend_from_slice(&image[..end.min(image.len())]);
        seeds.push(input);
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_accepted_and_damage_is_not() {
        let seeds = seed_inputs();
        assert_eq!(seeds.len(), 3);
        for s in &seeds {
            assert_eq!(check_input(s), Ok(true));
            // Without the checksum fix, a flipped metadata byte is rejected.
            let mut bad = s.clone();
            bad[0] = 2;
            let last = bad.len() - 2;
            bad[last] ^= 0x20;
            assert_eq!(check_input(&bad), Ok(false));
        }
        assert_eq!(check_input(&[]), Ok(false));
        assert_eq!(check_input(&[3]), Ok(false));
        // A raw image (starts with the magic) is parsed as it is, not as flags || copy.
        let raw = &seeds[0][1..];
        assert_eq!(image_from_input(raw), raw);
        assert_eq!(check_input(raw), Ok(true));
    }
}
