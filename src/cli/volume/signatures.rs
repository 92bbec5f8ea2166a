//! Recognises existing content that `kvcrypt format` must not destroy without `--yes`:
//! filesystem, swap, LUKS and partition-table signatures at their well-known offsets.
//!
//! Hand-written because the only complete implementation is libblkid (a C library and a build
//! dependency on its headers); the handful of magic numbers below cover what a cloud data disk
//! realistically holds. Each entry names its source layout.

use kvcrypt_format::layout;

/// How much of the start of the device to scan: the kvcrypt header area (its secondary copy
/// is at 512 KiB; the furthest foreign signature, btrfs, is at 64 KiB).
pub const SCAN_LEN: usize = layout::HEADER_AREA_SIZE as usize;

/// (what, byte offset, magic bytes)
const SIGNATURES: &[(&str, usize, &[u8])] = &[
    // LUKS1/LUKS2 primary header ("LUKS\xba\xbe") and LUKS2 secondary header ("SKUL\xba\xbe").
    ("LUKS volume", 0, b"LUKS\xba\xbe"),
    ("LUKS2 secondary header", 16 * 1024, b"SKUL\xba\xbe"),
    // XFS superblock: "XFSB" at offset 0.
    ("XFS filesystem", 0, b"XFSB"),
    // ext2/3/4 superblock at 1024, s_magic 0xEF53 (little-endian) at +56.
    ("ext2/3/4 filesystem", 1024 + 56, &[0x53, 0xef]),
    // btrfs primary superblock at 64 KiB, magic "_BHRfS_M" at +64.
    ("btrfs filesystem", 64 * 1024 + 64, b"_BHRfS_M"),
    // Linux swap: signature in the last 10 bytes of the first page (4 KiB pages here).
    ("Linux swap", 4096 - 10, b"SWAPSPACE2"),
    ("Linux swap (old)", 4096 - 10, b"SWAP-SPACE"),
    // GPT header "EFI PART" in LBA 1 (512-byte or 4096-byte logical blocks).
    ("GPT partition table", 512, b"EFI PART"),
    ("GPT partition table", 4096, b"EFI PART"),
    // MBR / DOS boot sector (also FAT and NTFS boot sectors): 0x55 0xAA at 510.
    ("MBR partition table or boot sector", 510, &[0x55, 0xaa]),
];

/// Names of all signatures found in `head` (the first bytes of the device; may be short).
pub fn detect(head: &[u8]) -> Vec<&'static str> {
    let mut found = Vec::new();
    if head.len() >= 8 && head[..8] == layout::MAGIC
        || head.len() >= layout::COPY_SIZE as usize + 8
            && head[layout::COPY_SIZE as usize..][..8] == layout::MAGIC
    {
        found.push("kvcrypt header");
    }
    for &(what, off, magic) in SIGNATURES {
        if head.get(off..off + magic.len()) == Some(magic) && !found.contains(&what) {
            found.push(what);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(off: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; SCAN_LEN];
        b[off..off + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn detects_each_signature_at_its_offset() {
        assert!(detect(&vec![0u8; SCAN_LEN]).is_empty());
        assert_eq!(
            detect(&with(1080, &[0x53, 0xef])),
            vec!["ext2/3/4 filesystem"]
        );
        assert_eq!(detect(&with(0, b"XFSB")), vec!["XFS filesystem"]);
        assert_eq!(detect(&with(65600, b"_BHRfS_M")), vec!["btrfs filesystem"]);
        assert_eq!(detect(&with(4086, b"SWAPSPACE2")), vec!["Linux swap"]);
        assert_eq!(detect(&with(0, b"LUKS\xba\xbe")), vec!["LUKS volume"]);
        assert_eq!(detect(&with(512, b"EFI PART")), vec!["GPT partition table"]);
        assert_eq!(
            detect(&with(510, &[0x55, 0xaa])),
            vec!["MBR partition table or boot sector"]
        );
        assert_eq!(detect(&with(0, &layout::MAGIC)), vec!["kvcrypt header"]);
        // One byte off is not a match.
        assert!(detect(&with(1081, &[0x53, 0xef])).is_empty());
        // Short input never panics.
        assert!(detect(&[0x55]).is_empty());
    }
}
