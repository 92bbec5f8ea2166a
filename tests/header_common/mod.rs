//! Helpers shared by the header tests: build formatted image files and edit their bytes the way
//! docs/FORMAT.md describes (so the tests also check the document).
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::{KeySlot, VolumeHeader};
use sha2::{Digest, Sha256};

pub const MIB: u64 = 1024 * 1024;
pub const PRIMARY: u64 = 0;
pub const SECONDARY: u64 = 512 * 1024;

pub fn key(b: u8) -> VolumeKey {
    let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7) ^ b).collect();
    VolumeKey::from_slice(&bytes).expect("64 bytes")
}

pub fn slot(n: u8) -> KeySlot {
    KeySlot {
        id: 0,
        provider: kvcrypt_format::PROVIDER_AZURE.into(),
        key_id: format!("https://example.vault.azure.net/keys/vol/{n:032x}"),
        algorithm: "RSA-OAEP-256".into(),
        wrapped: vec![n; 256],
        created_at: "2026-11-29T08:00:00Z".into(),
        check: None,
    }
}

pub fn sized_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// A formatted image of `size` bytes with one slot, sealed with `key(1)`.
pub fn formatted(dir: &Path, name: &str, size: u64, label: &str) -> (PathBuf, VolumeHeader) {
    let p = sized_file(dir, name, size);
    let vmk = key(1);
    let mut h = VolumeHeader::new_for_device(size, 4096, label, &vmk).unwrap();
    h.add_slot(slot(1));
    h.seal(&vmk);
    kvcrypt_format::write(&p, &mut h).unwrap();
    (p, h)
}

pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
    b
}

pub fn write_at(p: &Path, off: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

pub fn metadata_len(p: &Path, copy: u64) -> u64 {
    u64::from_le_bytes(read_at(p, copy + 168, 8).try_into().unwrap())
}

/// Recomputes the SHA-256 checksum of the copy at `copy` as docs/FORMAT.md §Checksum says:
/// SHA-256(binary block with bytes 224..256 zeroed || metadata[0..metadata_length]).
pub fn fix_checksum(p: &Path, copy: u64) {
    let mut block = read_at(p, copy, 4096);
    let md = read_at(p, copy + 4096, metadata_len(p, copy) as usize);
    block[224..256].fill(0);
    let mut h = Sha256::new();
    h.update(&block);
    h.update(&md);
    let sum: [u8; 32] = h.finalize().into();
    write_at(p, copy + 224, &sum);
}

pub fn flip(p: &Path, off: u64) {
    let b = read_at(p, off, 1)[0];
    write_at(p, off, &[b ^ 0x5a]);
}
