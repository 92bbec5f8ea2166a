//! The hostile header corpus in tests/data/headers/ (see the README there): every image goes
//! through the real read path (`kvcrypt_header_io::read`, `read_header_only`, `probe`) and must give
//! exactly the outcome its row below names: the `HeaderError` variant (with the reason that
//! shows which check refused it) and the exit class, or, for the images the format accepts, the
//! copy used, the copies reported damaged and what the next layer (key check, MAC, key id
//! parser, rewrite) says.
//!
//! The table is also the generator: `KVCRYPT_REGEN_CORPUS=1 cargo test --test header_corpus`
//! rewrites the files from the builders (fixed key, UUID, timestamps and wrapped bytes, so the
//! output is byte-identical every time). Without it the test checks that every file is what its
//! builder produces, that every file in the directory has a row, and that the README lists it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_exit::{Exit, ExitClass};
use kvcrypt_format::layout::{self, COPY_SIZE};
use kvcrypt_format::{HeaderCopy, HeaderError, KeySlot, VolumeHeader};

const MIB: u64 = 1024 * 1024;
/// Device size the images are read at (unless a row says the file is the whole device): the
/// header area plus a 1 MiB data area. The files hold only the bytes up to the last non-zero
/// one; the test extends a temporary copy to this size (sparse).
const DEVICE: u64 = 2 * MIB;
const SEQ: u64 = 5;
const UUID: u128 = 0x6b766372_7970_4c00_8000_636f72707573;
const CREATED: &str = "2026-01-01T00:00:00Z";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/headers")
}

// ---------------------------------------------------------------------------------------------
// Builders: a valid sealed header, encoded by the real encoder, then edited the way an attacker
// with write access to the disk would.

fn key() -> VolumeKey {
    let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29) ^ 0x5c).collect();
    VolumeKey::from_slice(&bytes).expect("64 bytes")
}

fn slot(key_id: &str) -> KeySlot {
    KeySlot {
        id: 0,
        provider: kvcrypt_format::PROVIDER_AZURE.into(),
        key_id: key_id.into(),
        algorithm: "RSA-OAEP-256".into(),
        wrapped: vec![0xa5; 256],
        created_at: CREATED.into(),
        check: Some(vec![0x3c; 256]),
        share: None,
    }
}

const KEY_ID: &str = "https://corpus.vault.azure.net/keys/vol/0123456789abcdef0123456789abcdef";

/// The corpus volume's header with `edit` applied to its slots/fields, sealed with [`key`].
fn header_with(edit: impl FnOnce(&mut VolumeHeader)) -> VolumeHeader {
    let k = key();
    let mut h = VolumeHeader::new_for_device(DEVICE, 4096, "corpus", &k).unwrap();
    h.uuid = uuid::Uuid::from_u128(UUID);
    h.add_slot(slot(KEY_ID));
    edit(&mut h);
    h.seal(&k);
    h
}

fn image(h: &VolumeHeader, seq: u64) -> Vec<u8> {
    kvcrypt_format::encode_image(h, seq).unwrap()
}

fn valid() -> Vec<u8> {
    image(&header_with(|_| {}), SEQ)
}

fn cp(img: &mut [u8], c: HeaderCopy) -> &mut [u8] {
    let o = c.offset() as usize;
    &mut img[o..o + COPY_SIZE as usize]
}

fn md_len(copy: &[u8]) -> usize {
    let f = layout::OFF_METADATA_LEN;
    u64::from_le_bytes(copy[f..f + 8].try_into().unwrap()) as usize
}

fn put(copy: &mut [u8], off: usize, bytes: &[u8]) {
    copy[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Recomputes the checksum (anyone can: it is not a security measure, docs/FORMAT.md §2.2), so
/// the edit reaches the checks behind it.
fn refix(copy: &mut [u8]) {
    let block: [u8; 4096] = copy[..4096].try_into().unwrap();
    let sum = layout::checksum(&block, &copy[4096..4096 + md_len(copy)]);
    put(copy, layout::OFF_CHECKSUM, &sum);
}

fn set_metadata(copy: &mut [u8], md: &[u8]) {
    copy[4096..].fill(0);
    put(copy, 4096, md);
    put(
        copy,
        layout::OFF_METADATA_LEN,
        &(md.len() as u64).to_le_bytes(),
    );
    refix(copy);
}

fn json(copy: &[u8]) -> String {
    String::from_utf8(copy[4096..4096 + md_len(copy)].to_vec()).unwrap()
}

/// Edits the JSON text of a copy (length field and checksum follow).
fn edit_json(copy: &mut [u8], f: impl FnOnce(String) -> String) {
    let s = f(json(copy));
    set_metadata(copy, s.as_bytes());
}

/// Replaces the first `from` in `s`; the builder is wrong if it is not there.
fn replace(s: &str, from: &str, to: &str) -> String {
    assert!(s.contains(from), "{from:?} not in the metadata");
    s.replacen(from, to, 1)
}

fn trim(mut img: Vec<u8>) -> Vec<u8> {
    let end = img.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    img.truncate(end);
    img
}

/// The valid image with `edit` applied to the primary copy only; the secondary is left out
/// (zeros on the device), so the primary's own check is what the error reports.
fn primary(edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut img = valid();
    edit(cp(&mut img, HeaderCopy::Primary));
    img.truncate(COPY_SIZE as usize);
    trim(img)
}

/// The valid image with `edit` applied to both copies.
fn both(edit: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut img = valid();
    for c in HeaderCopy::BOTH {
        edit(cp(&mut img, c));
    }
    trim(img)
}

/// A binary-block field set to `bytes`, checksum recomputed, primary copy only.
fn field(off: usize, bytes: &[u8]) -> Vec<u8> {
    let bytes = bytes.to_vec();
    primary(move |c| {
        put(c, off, &bytes);
        refix(c);
    })
}

fn text48(s: &[u8]) -> [u8; layout::LABEL_FIELD] {
    let mut f = [0u8; layout::LABEL_FIELD];
    f[..s.len()].copy_from_slice(s);
    f
}

/// A header sealed with `edit`, primary copy only (for values only a key holder could seal).
fn sealed_primary(edit: impl FnOnce(&mut VolumeHeader)) -> Vec<u8> {
    let mut img = image(&header_with(edit), SEQ);
    img.truncate(COPY_SIZE as usize);
    trim(img)
}

/// The corpus volume as a 2-of-3 split header (format v4): three share slots (x = 1, 2, 3) in
/// three vaults, sealed with [`key`].
fn split_header() -> VolumeHeader {
    header_with(|h| {
        h.slots[0].share = Some(1);
        for x in 2..=3u8 {
            let mut s = slot(&KEY_ID.replace("corpus.", &format!("corpus{x}.")));
            s.share = Some(x);
            h.add_slot(s);
        }
        h.policy = kvcrypt_format::SlotPolicy::KOfN { k: 2 };
    })
}

/// The split header's JSON edited with `f`, primary copy only.
fn split_json(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut img = image(&split_header(), SEQ);
    edit_json(cp(&mut img, HeaderCopy::Primary), |s| {
        let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
        f(&mut v);
        serde_json::to_string_pretty(&v).unwrap()
    });
    img.truncate(COPY_SIZE as usize);
    trim(img)
}

fn json_primary(f: impl FnOnce(String) -> String) -> Vec<u8> {
    primary(|c| edit_json(c, f))
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

// ---------------------------------------------------------------------------------------------
// Expected outcomes.

/// An outcome pattern with its source text (for failure messages).
struct Pat {
    text: &'static str,
    matches: fn(&HeaderError) -> bool,
    exit: Exit,
}

macro_rules! pat {
    ($exit:ident, $($p:tt)+) => {
        Pat { text: stringify!($($p)+), matches: |e| matches!(e, $($p)+), exit: Exit::$exit }
    };
}

/// Both copies unusable, the primary for `$why`, the secondary absent (zeros).
macro_rules! primary_bad {
    ($why:literal) => {
        Expect::Err(pat!(HeaderInvalid, HeaderError::BothCopiesCorrupt { primary, secondary, .. }
            if primary.contains($why) && secondary == "no kvcrypt magic"))
    };
}

enum Expect {
    /// `read` fails like this.
    Err(Pat),
    /// `read` accepts the image: the copy it used and the copies it reports damaged (with a
    /// word of the reason), then what the next layer says.
    Opens {
        used: HeaderCopy,
        damaged: &'static [(HeaderCopy, &'static str)],
        then: Then,
    },
}

enum Then {
    /// The corpus key passes the key check and the MAC.
    Unlocks,
    /// `verify_key` with the corpus key fails like this.
    KeyFails(Pat),
    /// The header is authentic; the Key Vault layer refuses the slot's key id (`KeyId::parse`).
    KeyIdRefused(&'static str),
    /// The header is authentic; the Key Vault layer refuses the slot's algorithm.
    AlgorithmRefused,
    /// The header is authentic and rewriting it (`write`, e.g. a repair) fails like this.
    WriteFails(Pat),
    /// The header is authentic and can be rewritten (and reads back the same).
    Rewrites,
}

enum Device {
    /// Read through a temporary copy extended to [`DEVICE`] bytes.
    Sized,
    /// The file is the whole device (truncation cases).
    AsIs,
}

struct Case {
    file: &'static str,
    build: fn() -> Vec<u8>,
    device: Device,
    expect: Expect,
}

use Device::{AsIs, Sized};

fn c(file: &'static str, build: fn() -> Vec<u8>, device: Device, expect: Expect) -> Case {
    Case {
        file,
        build,
        device,
        expect,
    }
}

/// The corpus header with `n` minimal slots, if it fits the metadata area pretty-printed (the
/// writer falls back to compact JSON beyond that, see `json-compact-many-slots.img`).
fn with_slots(n: usize) -> Option<VolumeHeader> {
    let mut h = header_with(|h| h.slots.clear());
    for _ in 0..n {
        let mut s = slot("https://v.vault.azure.net/keys/k/1");
        s.wrapped = vec![1];
        s.check = None;
        h.add_slot(s);
    }
    h.seal(&key());
    let img = kvcrypt_format::encode_image(&h, SEQ).ok()?;
    (&img[4096..4098] == b"{\n").then_some(h)
}

fn cases() -> Vec<Case> {
    use layout::*;
    vec![
        // --- the binary block (layout.rs decode_copy) ---------------------------------------
        c(
            "magic-luks2.img",
            || field(OFF_MAGIC, b"LUKS\xba\xbe\x00\x02"),
            Sized,
            Expect::Err(pat!(NotKvcrypt, HeaderError::NotKvcrypt { .. })),
        ),
        c(
            "version-0.img",
            || field(OFF_VERSION, &0u16.to_le_bytes()),
            Sized,
            Expect::Err(pat!(
                HeaderInvalid,
                HeaderError::UnsupportedVersion {
                    version: 0,
                    supported: 4,
                    ..
                }
            )),
        ),
        c(
            "version-5.img",
            || field(OFF_VERSION, &5u16.to_le_bytes()),
            Sized,
            Expect::Err(pat!(
                HeaderInvalid,
                HeaderError::UnsupportedVersion {
                    version: 5,
                    supported: 4,
                    ..
                }
            )),
        ),
        c(
            // Version 3 is the recovery-slot version: a header claiming it without one is not
            // a header kvcrypt writes (one encoding per content).
            "v3-without-recovery-slot.img",
            || field(OFF_VERSION, &3u16.to_le_bytes()),
            Sized,
            primary_bad!("format v3 header without a recovery slot"),
        ),
        c(
            // Format v4 (split policy): the policy member is what makes it v4.
            "v4-without-policy.img",
            || field(OFF_VERSION, &4u16.to_le_bytes()),
            Sized,
            primary_bad!("format v4 header without a policy member"),
        ),
        c(
            "v4-split-2-of-3.img",
            || {
                let mut img = image(&split_header(), SEQ);
                img.truncate(COPY_SIZE as usize);
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::Unlocks,
            },
        ),
        c(
            "policy-in-v2.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    v["policy"] = serde_json::json!({"kind": "all", "threshold": 1, "shares": 1});
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("a policy member in a format v2 header (split policies need v4)"),
        ),
        c(
            "share-in-v2.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    v["keyslots"][0]["share"] = 1.into();
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("key slot 0: a share index in a format v2 header"),
        ),
        c(
            "v4-slot-without-share.img",
            || split_json(|v| drop(v["keyslots"][1].as_object_mut().unwrap().remove("share"))),
            Sized,
            primary_bad!("key slot 1: a slot of a split (k-of-n) header without a share index"),
        ),
        c(
            "v4-share-zero.img",
            || split_json(|v| v["keyslots"][2]["share"] = 0.into()),
            Sized,
            primary_bad!("key slot 2: share index 0"),
        ),
        c(
            "v4-share-256.img",
            || split_json(|v| v["keyslots"][2]["share"] = 256.into()),
            Sized,
            primary_bad!("metadata JSON: invalid value: integer `256`"),
        ),
        c(
            "v4-threshold-zero.img",
            || split_json(|v| v["policy"]["threshold"] = 0.into()),
            Sized,
            primary_bad!("policy threshold 0 outside 1..=3"),
        ),
        c(
            "v4-threshold-above-shares.img",
            || split_json(|v| v["policy"]["threshold"] = 4.into()),
            Sized,
            primary_bad!("policy threshold 4 outside 1..=3"),
        ),
        c(
            "v4-shares-not-distinct-x.img",
            || split_json(|v| v["keyslots"][2]["share"] = 2.into()),
            Sized,
            primary_bad!("policy says 3 shares, the key slots carry 2 distinct share indexes"),
        ),
        c(
            "v4-all-below-every-share.img",
            || split_json(|v| v["policy"]["kind"] = "all".into()),
            Sized,
            primary_bad!("policy all with threshold 2 of 3 shares"),
        ),
        c(
            "v4-unknown-policy-kind.img",
            || split_json(|v| v["policy"]["kind"] = "any".into()),
            Sized,
            primary_bad!("unknown policy kind \"any\""),
        ),
        c(
            "v4-policy-unknown-member.img",
            || split_json(|v| v["policy"]["weights"] = serde_json::json!([1, 1, 1])),
            Sized,
            primary_bad!("unknown field `weights`"),
        ),
        c(
            // Well-formed but not what the key holder sealed: the threshold lowered to 1 (any
            // one share would "unlock"). The MAC covers the policy.
            "v4-threshold-lowered.img",
            || split_json(|v| v["policy"]["threshold"] = 1.into()),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::KeyFails(pat!(HeaderInvalid, HeaderError::Tampered)),
            },
        ),
        c(
            "v4-shares-swapped.img",
            || {
                split_json(|v| {
                    v["keyslots"][0]["share"] = 3.into();
                    v["keyslots"][2]["share"] = 1.into();
                })
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::KeyFails(pat!(HeaderInvalid, HeaderError::Tampered)),
            },
        ),
        c(
            "truncated-binary-block.img",
            || valid()[..1000].to_vec(),
            AsIs,
            Expect::Err(
                pat!(HeaderInvalid, HeaderError::TruncatedMetadata { reason, .. }
                if reason.contains("binary header cut short at 1000 of 4096")),
            ),
        ),
        c(
            "truncated-metadata.img",
            || {
                let img = valid();
                img[..4096 + md_len(&img) / 2].to_vec()
            },
            AsIs,
            Expect::Err(
                pat!(HeaderInvalid, HeaderError::TruncatedMetadata { reason, .. }
                if reason.contains("metadata needs")),
            ),
        ),
        c(
            "metadata-length-zero.img",
            || field(OFF_METADATA_LEN, &0u64.to_le_bytes()),
            Sized,
            primary_bad!("metadata length 0 outside 1..=520192"),
        ),
        c(
            // One byte more than the metadata area holds. The checksum is left stale: the
            // length check must come first (it bounds what the checksum reads).
            "metadata-length-beyond-area.img",
            || primary(|c| put(c, OFF_METADATA_LEN, &520193u64.to_le_bytes())),
            Sized,
            primary_bad!("metadata length 520193 outside"),
        ),
        c(
            "metadata-length-u64-max.img",
            || primary(|c| put(c, OFF_METADATA_LEN, &u64::MAX.to_le_bytes())),
            Sized,
            primary_bad!("metadata length 18446744073709551615 outside"),
        ),
        c(
            "both-copies-checksum-mismatch.img",
            || both(|c| c[4096 + 20] ^= 0x01),
            Sized,
            Expect::Err(
                pat!(HeaderInvalid, HeaderError::BothCopiesCorrupt { primary, secondary, .. }
                if primary == "checksum mismatch" && secondary == "checksum mismatch"),
            ),
        ),
        c(
            "copies-swapped.img",
            || {
                let mut img = valid();
                let (a, b) = img.split_at_mut(COPY_SIZE as usize);
                a.swap_with_slice(b);
                trim(img)
            },
            Sized,
            Expect::Err(
                pat!(HeaderInvalid, HeaderError::BothCopiesCorrupt { primary, secondary, .. }
                if primary.contains("copy index 1 found in the primary")
                    && secondary.contains("copy index 0 found in the secondary")),
            ),
        ),
        c(
            "header-size-512.img",
            || field(OFF_HEADER_SIZE, &512u32.to_le_bytes()),
            Sized,
            primary_bad!("header/copy size or copy offsets differ"),
        ),
        c(
            "label-not-nul-terminated.img",
            || field(OFF_LABEL, &[b'A'; LABEL_FIELD]),
            Sized,
            primary_bad!("label: text field not NUL-terminated"),
        ),
        c(
            "label-bytes-after-nul.img",
            || field(OFF_LABEL, &text48(b"corpus\0evil")),
            Sized,
            primary_bad!("label: text field has bytes after its terminating NUL"),
        ),
        c(
            "label-not-utf8.img",
            || field(OFF_LABEL, &text48(b"corp\xff\xfeus")),
            Sized,
            primary_bad!("label: text field is not UTF-8"),
        ),
        c(
            "cipher-unsupported.img",
            || field(OFF_CIPHER, &text48(b"aes-cbc-plain")[..CIPHER_FIELD]),
            Sized,
            primary_bad!("unsupported cipher \"aes-cbc-plain\""),
        ),
        c(
            "key-bits-256.img",
            || field(OFF_KEY_BITS, &256u32.to_le_bytes()),
            Sized,
            primary_bad!("unsupported key size 256 bits"),
        ),
        c(
            "sector-size-0.img",
            || field(OFF_SECTOR_SIZE, &0u32.to_le_bytes()),
            Sized,
            primary_bad!("sector size 0 (must be 4096 or 512)"),
        ),
        c(
            "sector-size-3.img",
            || field(OFF_SECTOR_SIZE, &3u32.to_le_bytes()),
            Sized,
            primary_bad!("sector size 3 (must be 4096 or 512)"),
        ),
        c(
            "sector-size-u32-max.img",
            || field(OFF_SECTOR_SIZE, &u32::MAX.to_le_bytes()),
            Sized,
            primary_bad!("sector size 4294967295 (must be 4096 or 512)"),
        ),
        c(
            "data-offset-in-header-area.img",
            || field(OFF_DATA_OFFSET, &COPY_SIZE.to_le_bytes()),
            Sized,
            primary_bad!("data offset 524288 (must be a non-zero multiple of 1 MiB)"),
        ),
        c(
            "data-offset-unaligned.img",
            || field(OFF_DATA_OFFSET, &(MIB + 4096).to_le_bytes()),
            Sized,
            primary_bad!("data offset 1052672 (must be a non-zero multiple of 1 MiB)"),
        ),
        c(
            "data-length-zero.img",
            || field(OFF_DATA_LENGTH, &0u64.to_le_bytes()),
            Sized,
            primary_bad!("data length 0 (must be a non-zero multiple of the sector size 4096)"),
        ),
        c(
            "data-length-unaligned.img",
            || field(OFF_DATA_LENGTH, &(MIB + 512).to_le_bytes()),
            Sized,
            primary_bad!("data length 1049088 (must be a non-zero multiple of the sector size"),
        ),
        c(
            "data-end-overflows.img",
            || {
                primary(|c| {
                    put(c, OFF_DATA_OFFSET, &(u64::MAX / MIB * MIB).to_le_bytes());
                    put(c, OFF_DATA_LENGTH, &MIB.to_le_bytes());
                    refix(c);
                })
            },
            Sized,
            primary_bad!("data area end overflows"),
        ),
        c(
            // Authentic (sealed with the key), but the data area ends 1 TiB past the device.
            "data-beyond-device.img",
            || sealed_primary(|h| h.data_length = 1 << 40),
            Sized,
            Expect::Err(
                pat!(Device, HeaderError::DeviceTooSmall { size, needed, .. }
                if *size == DEVICE && *needed == MIB + (1 << 40)),
            ),
        ),
        // --- the JSON metadata (metadata.rs decode) -----------------------------------------
        c(
            "json-truncated.img",
            || json_primary(|s| s[..s.len() / 2].to_string()),
            Sized,
            primary_bad!("metadata JSON: EOF while parsing"),
        ),
        c(
            "json-not-utf8.img",
            || {
                primary(|c| {
                    let s = json(c).into_bytes();
                    let at = s.windows(5).position(|w| w == b"azure").unwrap();
                    let mut md = s[..at].to_vec();
                    md.extend_from_slice(b"\xff\xfe");
                    md.extend_from_slice(&s[at..]);
                    set_metadata(c, &md);
                })
            },
            Sized,
            primary_bad!("metadata JSON: invalid unicode code point"),
        ),
        c(
            "json-wrong-type.img",
            || json_primary(|s| replace(&s, "\"id\": 0", "\"id\": \"0\"")),
            Sized,
            primary_bad!("metadata JSON: invalid type: string \"0\", expected u32"),
        ),
        c(
            "json-id-out-of-range.img",
            || json_primary(|s| replace(&s, "\"id\": 0", "\"id\": 4294967296")),
            Sized,
            primary_bad!("metadata JSON: invalid value: integer `4294967296`, expected u32"),
        ),
        c(
            "json-missing-mac.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    v.as_object_mut().unwrap().remove("mac").unwrap();
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("metadata JSON: missing field `mac`"),
        ),
        c(
            "json-duplicate-member.img",
            || {
                json_primary(|s| {
                    let kc = format!(
                        "{{\n  \"key_check\": {{ \"algorithm\": \"hkdf-sha256/hmac-sha256\", \
                         \"value\": \"{}\" }},",
                        b64(&[0; 32])
                    );
                    replace(&s, "{", &kc)
                })
            },
            Sized,
            primary_bad!("metadata JSON: duplicate field `key_check`"),
        ),
        c(
            "json-unknown-member.img",
            || json_primary(|s| replace(&s, "{", "{\n  \"note\": \"hidden, unauthenticated\",")),
            Sized,
            primary_bad!("metadata JSON: unknown field `note`"),
        ),
        c(
            // 50 000 nested objects where a slot id belongs: refused at the first one (the
            // typed parser never descends into them); no stack overflow.
            "json-deep-nesting.img",
            || {
                primary(|c| {
                    let n = 50_000;
                    let md = format!(
                        "{{\"keyslots\":[{{\"id\":{}0{}}}]}}",
                        "{\"x\":".repeat(n),
                        "}".repeat(n)
                    );
                    set_metadata(c, md.as_bytes());
                })
            },
            Sized,
            primary_bad!("metadata JSON: invalid type: map, expected u32"),
        ),
        c(
            "json-trailing-garbage.img",
            || json_primary(|s| s + "{}"),
            Sized,
            primary_bad!("metadata JSON: trailing characters"),
        ),
        c(
            // Authentic content, but the slot is the JSON array of its field values: serde
            // accepts that for a struct, FORMAT.md §2.3 does not (a second encoding).
            "json-slot-as-array.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    let slot = v["keyslots"][0].as_object().unwrap().clone();
                    let fields = [
                        "id",
                        "provider",
                        "key_id",
                        "algorithm",
                        "wrapped",
                        "created_at",
                        "check",
                    ];
                    v["keyslots"][0] = fields.iter().map(|f| slot[*f].clone()).collect();
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("metadata JSON: invalid type: sequence, expected a JSON object"),
        ),
        c(
            // A v1 header that carries the v2 member `access_check` as `null` (and no `check`).
            "v1-access-check-null.img",
            || {
                primary(|c| {
                    put(c, OFF_VERSION, &1u16.to_le_bytes());
                    edit_json(c, |s| {
                        let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                        v["access_check"] = serde_json::Value::Null;
                        v["keyslots"][0].as_object_mut().unwrap().remove("check");
                        serde_json::to_string_pretty(&v).unwrap()
                    })
                })
            },
            Sized,
            primary_bad!("metadata JSON: invalid type: null, expected a JSON object"),
        ),
        c(
            // A recovery slot (well-formed, as format v3 has it) in a header that says v2: a v2
            // reader would not know the provider, so v2 must not carry it.
            "recovery-slot-in-v2.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    let slots = v["keyslots"].as_array_mut().unwrap();
                    slots.push(serde_json::json!({
                        "id": 1,
                        "provider": "recovery-rsa",
                        "key_id": format!("sha256:{}", "ab".repeat(32)),
                        "algorithm": "RSA-OAEP-256",
                        "wrapped": b64(&[0x5a; 384]),
                        "created_at": CREATED,
                    }));
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("key slot 1: a recovery-rsa slot in a format v2 header (needs v3)"),
        ),
        c(
            "slots-duplicate-id.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    let slots = v["keyslots"].as_array_mut().unwrap();
                    slots.push(slots[0].clone());
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("duplicate key slot id 0"),
        ),
        c(
            "slot-wrapped-not-base64.img",
            || json_primary(|s| replace(&s, "\"wrapped\": \"", "\"wrapped\": \"%%")),
            Sized,
            primary_bad!("key slot 0: wrapped key is not base64"),
        ),
        c(
            "slot-wrapped-empty.img",
            || {
                json_primary(|s| {
                    let w = format!("\"wrapped\": \"{}\"", b64(&[0xa5; 256]));
                    replace(&s, &w, "\"wrapped\": \"\"")
                })
            },
            Sized,
            primary_bad!("key slot 0: empty wrapped key"),
        ),
        c(
            "slot-check-empty.img",
            || {
                json_primary(|s| {
                    let w = format!("\"check\": \"{}\"", b64(&[0x3c; 256]));
                    replace(&s, &w, "\"check\": \"\"")
                })
            },
            Sized,
            primary_bad!("key slot 0: empty check"),
        ),
        c(
            "v1-with-v2-members.img",
            || field(OFF_VERSION, &1u16.to_le_bytes()),
            Sized,
            primary_bad!("format v1 header with v2 members"),
        ),
        c(
            "v2-without-access-check.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    v.as_object_mut().unwrap().remove("access_check").unwrap();
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("format v2 header without access_check"),
        ),
        c(
            "mac-algorithm-none.img",
            || json_primary(|s| replace(&s, "\"hmac-sha256\"", "\"none\"")),
            Sized,
            primary_bad!("mac: unknown algorithm \"none\""),
        ),
        c(
            "mac-value-16-bytes.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    v["mac"]["value"] = b64(&[7; 16]).into();
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("mac: value is not 32 bytes"),
        ),
        c(
            "key-check-not-base64.img",
            || {
                json_primary(|s| {
                    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                    v["key_check"]["value"] = "not base64!".into();
                    serde_json::to_string_pretty(&v).unwrap()
                })
            },
            Sized,
            primary_bad!("key_check: bad base64"),
        ),
        // --- accepted by the format; the next layer decides ---------------------------------
        c(
            "slots-zero.img",
            || sealed_primary(|h| h.slots.clear()),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::Unlocks,
            },
        ),
        c(
            "slots-thousands.img",
            || {
                // As many minimal slots as the metadata area holds (2000+, found by bisection):
                // bounded by the area, so parsing them stays cheap.
                let (mut lo, mut hi) = (1, 100_000);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    if with_slots(mid).is_some() {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                assert!(lo > 2000, "{lo}");
                let h = with_slots(lo).unwrap();
                let mut img = image(&h, SEQ);
                img.truncate(COPY_SIZE as usize);
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::Unlocks,
            },
        ),
        c(
            // 370 000 wrapped bytes fill the area; the format only bounds them by it (Key
            // Vault unwrap refuses more than 1024 bytes before any request).
            "slot-wrapped-huge.img",
            || sealed_primary(|h| h.slots[0].wrapped = vec![0xa5; 370_000]),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::Unlocks,
            },
        ),
        c(
            "slot-key-id-http.img",
            || {
                sealed_primary(|h| {
                    h.slots[0].key_id = "http://corpus.vault.azure.net/keys/vol/1".into()
                })
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::KeyIdRefused("only reachable over https"),
            },
        ),
        c(
            "slot-key-id-userinfo.img",
            || {
                sealed_primary(|h| {
                    h.slots[0].key_id = "https://user:pw@corpus.vault.azure.net/keys/vol/1".into()
                })
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::KeyIdRefused("credentials in the URL are not allowed"),
            },
        ),
        c(
            "slot-key-id-ip-host.img",
            || sealed_primary(|h| h.slots[0].key_id = "https://169.254.169.254/keys/vol/1".into()),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::KeyIdRefused("not an IP address"),
            },
        ),
        c(
            "slot-algorithm-none.img",
            || sealed_primary(|h| h.slots[0].algorithm = "none".into()),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::AlgorithmRefused,
            },
        ),
        c(
            // Authentic, written compactly (as FORMAT.md allows: any JSON formatting) with more
            // slots than fit the area pretty-printed. A reader that accepts it must be able to
            // write it back (repair, rewrap).
            "json-compact-many-slots.img",
            || {
                let mut h = header_with(|h| h.slots.clear());
                for _ in 0..3000 {
                    let mut s = slot("https://v.vault.azure.net/keys/k/1");
                    s.wrapped = vec![1];
                    s.check = None;
                    h.add_slot(s);
                }
                h.seal(&key());
                let digest = |alg: &str, d: &[u8; 32]| serde_json::json!({"algorithm": alg, "value": b64(d)});
                let slots: Vec<_> = h
                    .slots
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id, "provider": s.provider, "key_id": s.key_id,
                            "algorithm": s.algorithm, "wrapped": b64(&s.wrapped),
                            "created_at": s.created_at,
                        })
                    })
                    .collect();
                let md = serde_json::to_vec(&serde_json::json!({
                    "keyslots": slots,
                    "key_check": digest("hkdf-sha256/hmac-sha256", h.key_check_digest()),
                    "access_check": digest("hkdf-sha256/hmac-sha256", h.access_check_digest().unwrap()),
                    "mac": digest("hmac-sha256", h.mac()),
                }))
                .unwrap();
                assert!(md.len() as u64 <= MAX_METADATA_LEN, "{}", md.len());
                primary(|c| set_metadata(c, &md))
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "no kvcrypt magic")],
                then: Then::Rewrites,
            },
        ),
        // --- the two-copy rules (copies.rs parse_image) -------------------------------------
        c(
            "primary-corrupt-secondary-valid.img",
            || {
                let mut img = valid();
                cp(&mut img, HeaderCopy::Primary)[4096 + 20] ^= 0x01;
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Secondary,
                damaged: &[(HeaderCopy::Primary, "checksum mismatch")],
                then: Then::Unlocks,
            },
        ),
        c(
            "secondary-copy-index-0.img",
            || {
                let mut img = valid();
                let (a, b) = img.split_at_mut(COPY_SIZE as usize);
                b.copy_from_slice(a);
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(HeaderCopy::Secondary, "copy index 0 found in the secondary")],
                then: Then::Unlocks,
            },
        ),
        c(
            "primary-version-5-secondary-valid.img",
            || {
                let mut img = valid();
                let p = cp(&mut img, HeaderCopy::Primary);
                put(p, OFF_VERSION, &5u16.to_le_bytes());
                refix(p);
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Secondary,
                damaged: &[(HeaderCopy::Primary, "unsupported version 5")],
                then: Then::Unlocks,
            },
        ),
        c(
            "sequence-tie-different-content.img",
            || {
                let mut img = valid();
                let other = image(&header_with(|h| h.label = "other".into()), SEQ);
                let s = COPY_SIZE as usize;
                img[s..].copy_from_slice(&other[s..]);
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[(
                    HeaderCopy::Secondary,
                    "same sequence number but different content",
                )],
                then: Then::Unlocks,
            },
        ),
        c(
            // The secondary claims to be newer (sequence 6) and its label was changed without
            // the key: it wins the sequence rule, and the MAC catches it.
            "newer-secondary-bad-mac.img",
            || {
                let mut img = valid();
                let sec = cp(&mut img, HeaderCopy::Secondary);
                put(sec, OFF_SEQUENCE, &(SEQ + 1).to_le_bytes());
                put(sec, OFF_LABEL, &text48(b"evil"));
                refix(sec);
                trim(img)
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Secondary,
                damaged: &[(HeaderCopy::Primary, "stale (sequence 5 < 6")],
                then: Then::KeyFails(pat!(HeaderInvalid, HeaderError::Tampered)),
            },
        ),
        c(
            "mac-tampered-data-length.img",
            || {
                both(|c| {
                    put(c, OFF_DATA_LENGTH, &(MIB / 2).to_le_bytes());
                    refix(c);
                })
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[],
                then: Then::KeyFails(pat!(HeaderInvalid, HeaderError::Tampered)),
            },
        ),
        c(
            "key-check-forged.img",
            || {
                both(|c| {
                    edit_json(c, |s| {
                        let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                        v["key_check"]["value"] = b64(&[0x42; 32]).into();
                        serde_json::to_string_pretty(&v).unwrap()
                    })
                })
            },
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[],
                then: Then::KeyFails(pat!(WrongKey, HeaderError::WrongKey)),
            },
        ),
        c(
            "sequence-u64-max.img",
            || trim(image(&header_with(|_| {}), u64::MAX)),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[],
                then: Then::WriteFails(pat!(Usage, HeaderError::Invalid(m)
                    if m == "sequence number exhausted")),
            },
        ),
        c(
            "valid.img",
            || trim(valid()),
            Sized,
            Expect::Opens {
                used: HeaderCopy::Primary,
                damaged: &[],
                then: Then::Rewrites,
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The test.

fn check_pat(what: &str, p: &Pat, e: &HeaderError) -> Result<(), String> {
    if !(p.matches)(e) {
        return Err(format!("{what}: expected `{}`, got {e:?} ({e})", p.text));
    }
    if e.exit_class() != p.exit {
        return Err(format!(
            "{what}: exit class {:?}, expected {:?}",
            e.exit_class(),
            p.exit
        ));
    }
    Ok(())
}

/// Runs one case; returns the error `read` gave (for the cross-check of the patterns).
fn run(case: &Case, bytes: &[u8], tmp: &Path) -> Result<Option<HeaderError>, String> {
    let p = tmp.join(case.file);
    std::fs::write(&p, bytes).unwrap();
    if let Sized = case.device {
        assert!(
            bytes.len() as u64 <= DEVICE,
            "{} is larger than the device",
            case.file
        );
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(DEVICE)
            .unwrap();
    }
    // The fuzz target's property (accepted headers re-encode to themselves) on the raw image.
    kvcrypt_format::fuzzing::check_input(bytes).map_err(|e| format!("fuzz property: {e}"))?;

    let read = kvcrypt_header_io::read(&p);
    // probe and read_header_only skip only the device-size check.
    let header_only = kvcrypt_header_io::read_header_only(&p);
    let probe = kvcrypt_header_io::probe(&p);
    match (&header_only, &probe) {
        (Ok(l), Some(i)) if i.uuid == l.uuid && i.sequence == l.sequence => {}
        (Err(_), None) => {}
        _ => return Err(format!("probe {probe:?} disagrees with read_header_only")),
    }
    if let (Ok(a), Ok(b)) = (&read, &header_only)
        && a.header != b.header
    {
        return Err("read and read_header_only disagree".into());
    }
    match (&case.expect, read) {
        (Expect::Err(p), Err(e)) => check_pat("read", p, &e).map(|()| Some(e)),
        (Expect::Err(p), Ok(l)) => Err(format!(
            "read: expected `{}`, but the image was accepted (used {:?}, damaged {:?})",
            p.text, l.used, l.damaged
        )),
        (Expect::Opens { .. }, Err(e)) => Err(format!("read: expected to open, got {e:?}")),
        (
            Expect::Opens {
                used,
                damaged,
                then,
            },
            Ok(l),
        ) => {
            if l.used != *used {
                return Err(format!("used {:?}, expected {used:?}", l.used));
            }
            let ok = l.damaged.len() == damaged.len()
                && l.damaged
                    .iter()
                    .zip(damaged.iter())
                    .all(|(d, (c, why))| d.copy == *c && d.reason.contains(why));
            if !ok {
                return Err(format!("damaged {:?}, expected {damaged:?}", l.damaged));
            }
            if l.uuid != uuid::Uuid::from_u128(UUID) {
                return Err(format!("uuid {}", l.uuid));
            }
            let verified = l.verify_key(&key());
            match then {
                Then::KeyFails(p) => match verified {
                    Err(e) => check_pat("verify_key", p, &e),
                    Ok(()) => Err(format!("verify_key: expected `{}`, passed", p.text)),
                },
                _ => {
                    verified.map_err(|e| format!("verify_key: {e}"))?;
                    then_authentic(then, &l, &p)
                }
            }
            .map(|()| None)
        }
    }
}

fn then_authentic(then: &Then, l: &kvcrypt_format::LoadedHeader, p: &Path) -> Result<(), String> {
    match then {
        Then::Unlocks | Then::KeyFails(_) => Ok(()),
        Then::KeyIdRefused(why) => {
            let e = match kvcrypt_keyvault::KeyId::parse(&l.slots[0].key_id) {
                Ok(id) => return Err(format!("KeyId::parse accepted {id}")),
                Err(e) => e,
            };
            if !e.to_string().contains(why) || e.exit_class() != Exit::Config {
                return Err(format!("KeyId::parse: {e} ({:?})", e.exit_class()));
            }
            Ok(())
        }
        Then::AlgorithmRefused => {
            match kvcrypt_keyvault::WrapAlgorithm::parse(&l.slots[0].algorithm) {
                Err(e) if e.exit_class() == Exit::Config => Ok(()),
                r => Err(format!("WrapAlgorithm::parse: {r:?}")),
            }
        }
        Then::WriteFails(pat) => {
            let mut h = l.header.clone();
            match kvcrypt_header_io::write(p, &mut h) {
                Err(e) => check_pat("write", pat, &e),
                Ok(()) => Err(format!("write: expected `{}`, succeeded", pat.text)),
            }
        }
        Then::Rewrites => {
            let mut h = l.header.clone();
            kvcrypt_header_io::write(p, &mut h).map_err(|e| format!("write: {e}"))?;
            let back = kvcrypt_header_io::read(p).map_err(|e| format!("re-read: {e}"))?;
            let mut want = l.header.clone();
            want.sequence = h.sequence;
            if back.header != want || !back.damaged.is_empty() {
                return Err(format!("re-read differs: {:?}", back.damaged));
            }
            back.verify_key(&key())
                .map_err(|e| format!("re-read verify_key: {e}"))
        }
    }
}

#[test]
fn hostile_header_corpus() {
    let cases = cases();
    let names: BTreeSet<&str> = cases.iter().map(|c| c.file).collect();
    assert_eq!(
        names.len(),
        cases.len(),
        "duplicate file names in the table"
    );
    let regen = std::env::var_os("KVCRYPT_REGEN_CORPUS").is_some_and(|v| v == "1");
    let dir = dir();
    if regen {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut errors = Vec::new();
    for case in &cases {
        let built = (case.build)();
        let path = dir.join(case.file);
        if regen {
            std::fs::write(&path, &built).unwrap();
        }
        let on_disk = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{}: {e} (regenerate the corpus)", case.file));
                continue;
            }
        };
        if on_disk != built {
            failures.push(format!(
                "{}: the file differs from what its builder produces; regenerate with \
                 KVCRYPT_REGEN_CORPUS=1 cargo test --release --test header_corpus",
                case.file
            ));
        }
        match run(case, &on_disk, tmp.path()) {
            Ok(Some(e)) => errors.push((case.file, e)),
            Ok(None) => {}
            Err(e) => failures.push(format!("{}: {e}", case.file)),
        }
    }
    // Each expected pattern singles out its own check: it matches no other case's error (so
    // every assertion above can fail, and two rows never test the same thing by accident).
    for case in &cases {
        let Expect::Err(p) = &case.expect else {
            continue;
        };
        for (file, e) in &errors {
            if *file != case.file && (p.matches)(e) {
                failures.push(format!(
                    "{}: its pattern `{}` also matches the error of {file}",
                    case.file, p.text
                ));
            }
        }
    }
    // Every file in the directory has a row (and the README documents every row).
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "README.md" && !names.contains(name.as_str()) {
            failures.push(format!(
                "{name}: in tests/data/headers/ but not in the table"
            ));
        }
    }
    for n in &names {
        if !readme.contains(&format!("| `{n}` |")) {
            failures.push(format!("{n}: no row in tests/data/headers/README.md"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} corpus images checked, {} refused with distinct errors",
        cases.len(),
        errors.len()
    );
}
