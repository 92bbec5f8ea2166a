//! Volume fixtures: sized image files, formatted volumes, and editing header bytes the way
//! docs/FORMAT.md describes (so the tests that use them also check the document).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::VolumeHeader;
use sha2::{Digest, Sha256};

use crate::keys::{header_key, slot};

/// Offset of the primary header copy.
pub const PRIMARY: u64 = 0;
/// Offset of the secondary header copy.
pub const SECONDARY: u64 = 512 * 1024;
/// Data offset used by tests that build a volume without a header (1 MiB, like the format).
pub const DATA_OFFSET: u64 = 1 << 20;

/// A sparse file `dir/name` of `size` bytes (all zero).
pub fn sized_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// A formatted image of `size` bytes with one slot (`slot(1)`), sealed with `header_key(1)`.
pub fn formatted(dir: &Path, name: &str, size: u64, label: &str) -> (PathBuf, VolumeHeader) {
    let p = sized_file(dir, name, size);
    let vmk = header_key(1);
    let mut h = VolumeHeader::new_for_device(size, 4096, label, &vmk).unwrap();
    h.add_slot(slot(1));
    h.seal(&vmk);
    kvcrypt_header_io::write(&p, &mut h).unwrap();
    (p, h)
}

/// Creates `dir/volume.img`, a file-backed kvcrypt volume of `size` bytes (header sealed with
/// `key`; no key slots: tests hand the key to the worker directly).
pub fn make_volume(dir: &Path, size: u64, key: &VolumeKey) -> PathBuf {
    let path = sized_file(dir, "volume.img", size);
    let mut h = VolumeHeader::new_for_device(size, 4096, "test", key).expect("new header");
    kvcrypt_header_io::write(&path, &mut h).expect("write header");
    path
}

/// Creates `dir/backing.img`: a sparse backing file of `data_len` bytes after a header area
/// filled with 0xA5 (for engines opened without a header).
pub fn backing_file(dir: &Path, data_len: u64) -> PathBuf {
    let path = sized_file(dir, "backing.img", DATA_OFFSET + data_len);
    write_at(&path, 0, &vec![0xA5u8; DATA_OFFSET as usize]);
    path
}

/// `len` bytes of `p` at `off`.
pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
    b
}

/// Writes `bytes` into `p` at `off`.
pub fn write_at(p: &Path, off: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

/// Truncates (or extends) `p` to `size` bytes: a device that shrank or grew.
pub fn set_len(p: &Path, size: u64) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// The `metadata_length` field of the copy at `copy`.
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

/// Replaces `from` by `to` in the JSON metadata of both header copies and fixes their lengths
/// and checksums: the edit of an attacker who can write the disk.
pub fn rewrite_metadata(dev: &Path, from: &str, to: &str) {
    for copy in [PRIMARY, SECONDARY] {
        let len = metadata_len(dev, copy) as usize;
        let md = String::from_utf8(read_at(dev, copy + 4096, len)).unwrap();
        let evil = md.replace(from, to);
        assert_ne!(md, evil, "{from} not found in the header");
        write_at(dev, copy + 4096, evil.as_bytes());
        write_at(dev, copy + 168, &(evil.len() as u64).to_le_bytes());
        fix_checksum(dev, copy);
    }
}

/// Flips bits of the byte at `off`.
pub fn flip(p: &Path, off: u64) {
    let b = read_at(p, off, 1)[0];
    write_at(p, off, &[b ^ 0x5a]);
}

/// Opens a block device (or file) for direct I/O.
pub fn open_direct(dev: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open block device")
}
