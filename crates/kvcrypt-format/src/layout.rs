//! Byte layout of one header copy: the 4096-byte binary block and where the JSON metadata
//! sits. Pure encode/decode of bytes, no I/O and no cryptography beyond the SHA-256 checksum.
//! docs/FORMAT.md is the normative description; every constant here appears there.

use sha2::{Digest, Sha256};

/// Magic bytes at offset 0 of each header copy. The trailing 0xBA keeps the magic from being
/// plain ASCII text that a text file could contain by accident.
pub const MAGIC: [u8; 8] = *b"KVCRYPT\xba";
/// Format version 1: key slots wrap only the VMK.
pub const VERSION_1: u16 = 1;
/// Format version 2: v1 plus access-check slots (docs/FORMAT.md §3.1), so periodic access
/// checks never unwrap the VMK. A v1 header is read and served as it is; it becomes v2 at its
/// next sealing write (format, rewrap, slot changes).
pub const VERSION_2: u16 = 2;
/// Format version 3: v2 plus the customer-held recovery slot (docs/FORMAT.md §3.2). Written
/// only for a header that has a recovery slot, so volumes without one stay readable by v2
/// readers.
pub const VERSION_3: u16 = 3;
/// Format version 4: a split slot policy (`all` or `k-of-n`, docs/FORMAT.md §3.3), with or
/// without a recovery slot. Written only for split headers, so `any` volumes stay readable by
/// v2/v3 readers.
pub const VERSION_4: u16 = 4;
/// The version a sealing write produces for a header with policy `any` and without a recovery
/// slot (with one: [`VERSION_3`]; split: [`VERSION_4`]; see `policy::version_for`).
pub const VERSION: u16 = VERSION_2;
/// The newest version this crate reads.
pub const NEWEST: u16 = VERSION_4;
/// Size of the binary part of a header copy.
pub const BINARY_HEADER_SIZE: usize = 4096;
/// Size of one header copy (binary block + metadata area).
pub const COPY_SIZE: u64 = 512 * 1024;
/// Byte offsets of the primary and secondary copy on the device.
pub const COPY_OFFSETS: [u64; 2] = [0, COPY_SIZE];
/// The header area: both copies. The data area never starts before its end.
pub const HEADER_AREA_SIZE: u64 = 2 * COPY_SIZE;
/// The data offset must be a multiple of this (1 MiB).
pub const DATA_ALIGNMENT: u64 = 1024 * 1024;
/// Largest JSON metadata a copy can hold.
pub const MAX_METADATA_LEN: u64 = COPY_SIZE - BINARY_HEADER_SIZE as u64;
/// Label field size; the label itself is at most one byte less (NUL terminated).
pub const LABEL_FIELD: usize = 48;
pub const LABEL_MAX: usize = LABEL_FIELD - 1;
/// Cipher name field size.
pub const CIPHER_FIELD: usize = 32;
pub const CIPHER: &str = "aes-xts-plain64";
pub const KEY_BITS: u32 = 512;

// Field offsets inside the binary block (all integers little-endian).
pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 8;
pub const OFF_COPY_INDEX: usize = 10;
pub const OFF_HEADER_SIZE: usize = 12;
pub const OFF_SEQUENCE: usize = 16;
pub const OFF_UUID: usize = 24;
pub const OFF_LABEL: usize = 40;
pub const OFF_CIPHER: usize = 88;
pub const OFF_KEY_BITS: usize = 120;
pub const OFF_SECTOR_SIZE: usize = 124;
pub const OFF_DATA_OFFSET: usize = 128;
pub const OFF_DATA_LENGTH: usize = 136;
pub const OFF_COPY_OFFSETS: usize = 144;
pub const OFF_COPY_SIZE: usize = 160;
pub const OFF_METADATA_LEN: usize = 168;
pub const OFF_CHECKSUM: usize = 224;
pub const CHECKSUM_LEN: usize = 32;

/// The fixed-size fields of one binary header block, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBinary {
    pub version: u16,
    pub copy_index: u16,
    pub header_size: u32,
    pub sequence: u64,
    pub uuid: [u8; 16],
    pub label: [u8; LABEL_FIELD],
    pub cipher: [u8; CIPHER_FIELD],
    pub key_bits: u32,
    pub sector_size: u32,
    pub data_offset: u64,
    pub data_length: u64,
    pub copy_offsets: [u64; 2],
    pub copy_size: u64,
    pub metadata_len: u64,
}

/// Why a copy could not be decoded. `Absent` means "no kvcrypt magic here".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Absent,
    UnsupportedVersion(u16),
    Truncated(String),
    Corrupt(String),
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// SHA-256 over the binary block with its checksum field zeroed, followed by the metadata bytes.
pub fn checksum(block: &[u8; BINARY_HEADER_SIZE], metadata: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut zeroed = *block;
    zeroed[OFF_CHECKSUM..OFF_CHECKSUM + CHECKSUM_LEN].fill(0);
    let mut h = Sha256::new();
    h.update(zeroed);
    h.update(metadata);
    h.finalize().into()
}

/// Encodes one complete copy (binary block + metadata, zero-padded to `COPY_SIZE`).
/// The caller guarantees `metadata.len() <= MAX_METADATA_LEN`.
pub fn encode_copy(raw: &RawBinary, metadata: &[u8]) -> Vec<u8> {
    let mut block = [0u8; BINARY_HEADER_SIZE];
    block[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    block[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&raw.version.to_le_bytes());
    block[OFF_COPY_INDEX..OFF_COPY_INDEX + 2].copy_from_slice(&raw.copy_index.to_le_bytes());
    block[OFF_HEADER_SIZE..OFF_HEADER_SIZE + 4].copy_from_slice(&raw.header_size.to_le_bytes());
    block[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&raw.sequence.to_le_bytes());
    block[OFF_UUID..OFF_UUID + 16].copy_from_slice(&raw.uuid);
    block[OFF_LABEL..OFF_LABEL + LABEL_FIELD].copy_from_slice(&raw.label);
    block[OFF_CIPHER..OFF_CIPHER + CIPHER_FIELD].copy_from_slice(&raw.cipher);
    block[OFF_KEY_BITS..OFF_KEY_BITS + 4].copy_from_slice(&raw.key_bits.to_le_bytes());
    block[OFF_SECTOR_SIZE..OFF_SECTOR_SIZE + 4].copy_from_slice(&raw.sector_size.to_le_bytes());
    block[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&raw.data_offset.to_le_bytes());
    block[OFF_DATA_LENGTH..OFF_DATA_LENGTH + 8].copy_from_slice(&raw.data_length.to_le_bytes());
    block[OFF_COPY_OFFSETS..OFF_COPY_OFFSETS + 8]
        .copy_from_slice(&raw.copy_offsets[0].to_le_bytes());
    block[OFF_COPY_OFFSETS + 8..OFF_COPY_OFFSETS + 16]
        .copy_from_slice(&raw.copy_offsets[1].to_le_bytes());
    block[OFF_COPY_SIZE..OFF_COPY_SIZE + 8].copy_from_slice(&raw.copy_size.to_le_bytes());
    block[OFF_METADATA_LEN..OFF_METADATA_LEN + 8].copy_from_slice(&raw.metadata_len.to_le_bytes());
    let sum = checksum(&block, metadata);
    block[OFF_CHECKSUM..OFF_CHECKSUM + CHECKSUM_LEN].copy_from_slice(&sum);

    let mut out = vec![0u8; COPY_SIZE as usize];
    out[..BINARY_HEADER_SIZE].copy_from_slice(&block);
    out[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + metadata.len()].copy_from_slice(metadata);
    out
}

/// Decodes one copy from `bytes` (whatever of the copy's region could be read; may be short).
/// Checks magic, version, length fields and the checksum; returns the fixed fields and the
/// metadata bytes. Semantic validation of the values is the caller's job.
pub fn decode_copy(bytes: &[u8]) -> Result<(RawBinary, &[u8]), DecodeError> {
    if bytes.len() < OFF_VERSION + 2 || bytes[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return Err(DecodeError::Absent);
    }
    let version = u16_at(bytes, OFF_VERSION);
    if !(VERSION_1..=NEWEST).contains(&version) {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if bytes.len() < BINARY_HEADER_SIZE {
        return Err(DecodeError::Truncated(format!(
            "binary header cut short at {} of {BINARY_HEADER_SIZE} bytes",
            bytes.len()
        )));
    }
    let mut block = [0u8; BINARY_HEADER_SIZE];
    block.copy_from_slice(&bytes[..BINARY_HEADER_SIZE]);
    let metadata_len = u64_at(&block, OFF_METADATA_LEN);
    if metadata_len == 0 || metadata_len > MAX_METADATA_LEN {
        return Err(DecodeError::Corrupt(format!(
            "metadata length {metadata_len} outside 1..={MAX_METADATA_LEN}"
        )));
    }
    // metadata_len <= MAX_METADATA_LEN, so the conversion and the addition cannot overflow.
    let end = BINARY_HEADER_SIZE + metadata_len as usize;
    if bytes.len() < end {
        return Err(DecodeError::Truncated(format!(
            "metadata needs {metadata_len} bytes, only {} present",
            bytes.len() - BINARY_HEADER_SIZE
        )));
    }
    let metadata = &bytes[BINARY_HEADER_SIZE..end];
    if checksum(&block, metadata)[..] != block[OFF_CHECKSUM..OFF_CHECKSUM + CHECKSUM_LEN] {
        return Err(DecodeError::Corrupt("checksum mismatch".into()));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&block[OFF_UUID..OFF_UUID + 16]);
    let mut label = [0u8; LABEL_FIELD];
    label.copy_from_slice(&block[OFF_LABEL..OFF_LABEL + LABEL_FIELD]);
    let mut cipher = [0u8; CIPHER_FIELD];
    cipher.copy_from_slice(&block[OFF_CIPHER..OFF_CIPHER + CIPHER_FIELD]);
    let raw = RawBinary {
        version,
        copy_index: u16_at(&block, OFF_COPY_INDEX),
        header_size: u32_at(&block, OFF_HEADER_SIZE),
        sequence: u64_at(&block, OFF_SEQUENCE),
        uuid,
        label,
        cipher,
        key_bits: u32_at(&block, OFF_KEY_BITS),
        sector_size: u32_at(&block, OFF_SECTOR_SIZE),
        data_offset: u64_at(&block, OFF_DATA_OFFSET),
        data_length: u64_at(&block, OFF_DATA_LENGTH),
        copy_offsets: [
            u64_at(&block, OFF_COPY_OFFSETS),
            u64_at(&block, OFF_COPY_OFFSETS + 8),
        ],
        copy_size: u64_at(&block, OFF_COPY_SIZE),
        metadata_len,
    };
    Ok((raw, metadata))
}

/// Reads a NUL-padded text field: bytes up to the first NUL, which must be valid UTF-8, and
/// everything after the first NUL must be NUL too (so one value has one encoding).
pub fn text_field(field: &[u8]) -> Result<String, String> {
    let len = field
        .iter()
        .position(|&b| b == 0)
        .ok_or("text field not NUL-terminated")?;
    if field[len..].iter().any(|&b| b != 0) {
        return Err("text field has bytes after its terminating NUL".into());
    }
    String::from_utf8(field[..len].to_vec()).map_err(|_| "text field is not UTF-8".to_string())
}

/// Encodes `s` into a NUL-padded field of `N` bytes; `None` if it does not fit with its NUL
/// or contains a NUL itself.
pub fn pad_field<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() >= N || s.as_bytes().contains(&0) {
        return None;
    }
    let mut f = [0u8; N];
    f[..s.len()].copy_from_slice(s.as_bytes());
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawBinary {
        RawBinary {
            version: VERSION,
            copy_index: 1,
            header_size: BINARY_HEADER_SIZE as u32,
            sequence: 7,
            uuid: [9; 16],
            label: pad_field("data").unwrap(),
            cipher: pad_field(CIPHER).unwrap(),
            key_bits: KEY_BITS,
            sector_size: 4096,
            data_offset: DATA_ALIGNMENT,
            data_length: 8192,
            copy_offsets: COPY_OFFSETS,
            copy_size: COPY_SIZE,
            metadata_len: 2,
        }
    }

    #[test]
    fn encode_decode_round_trip_and_field_offsets() {
        let raw = sample();
        let bytes = encode_copy(&raw, b"{}");
        assert_eq!(bytes.len() as u64, COPY_SIZE);
        assert_eq!(&bytes[0..8], b"KVCRYPT\xba");
        assert_eq!(&bytes[8..10], &VERSION.to_le_bytes());
        assert_eq!(&bytes[16..24], &7u64.to_le_bytes());
        assert_eq!(&bytes[40..44], b"data");
        assert_eq!(&bytes[88..103], b"aes-xts-plain64");
        assert_eq!(&bytes[4096..4098], b"{}");
        let (back, md) = decode_copy(&bytes).unwrap();
        assert_eq!(back, raw);
        assert_eq!(md, b"{}");
    }

    #[test]
    fn checksum_detects_any_flipped_byte_in_block_or_metadata() {
        let bytes = encode_copy(&sample(), b"{}");
        for pos in [9usize, 20, 45, 130, 200, 3000, 4096, 4097] {
            let mut b = bytes.clone();
            b[pos] ^= 0x01;
            let r = decode_copy(&b);
            assert!(r.is_err(), "flip at {pos} not detected");
        }
    }

    #[test]
    fn short_and_foreign_inputs() {
        assert_eq!(decode_copy(&[]), Err(DecodeError::Absent));
        assert_eq!(decode_copy(&[0u8; 4096]), Err(DecodeError::Absent));
        let bytes = encode_copy(&sample(), b"{}");
        assert!(matches!(
            decode_copy(&bytes[..100]),
            Err(DecodeError::Truncated(_))
        ));
        assert!(matches!(
            decode_copy(&bytes[..4097]),
            Err(DecodeError::Truncated(_))
        ));
        // Version 4 (split policy) is known; the next one is not.
        let mut v5 = bytes.clone();
        v5[8] = 5;
        assert_eq!(decode_copy(&v5), Err(DecodeError::UnsupportedVersion(5)));
    }

    #[test]
    fn text_fields() {
        assert_eq!(text_field(b"ab\0\0").unwrap(), "ab");
        assert!(text_field(b"ab\0c").is_err());
        assert!(text_field(b"abcd").is_err());
        assert!(pad_field::<4>("abcd").is_none());
        assert!(pad_field::<8>("a\0b").is_none());
    }
}
