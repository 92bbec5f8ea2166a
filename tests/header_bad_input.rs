//! Bad-input behaviour of the volume header (issue 3, deliverable 4), on temporary image files.

use kvcrypt_exit::{Exit, ExitClass};
use kvcrypt_format::{HeaderCopy, HeaderError, VolumeHeader};
use kvcrypt_testkit::MIB;
use kvcrypt_testkit::keys::header_key as key;
use kvcrypt_testkit::volume::*;

#[test]
fn write_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.header, h);
    assert_eq!(l.sequence, 1);
    assert_eq!(l.used, HeaderCopy::Primary);
    assert!(l.damaged.is_empty(), "{:?}", l.damaged);
    assert_eq!(l.device_size, 8 * MIB);
    assert_eq!((l.data_offset, l.data_length), (MIB, 7 * MIB));
    l.verify_key(&key(1)).unwrap();
    // Both copies carry the magic, their copy index and the same sequence number.
    for (off, idx) in [(PRIMARY, 0u8), (SECONDARY, 1u8)] {
        let b = read_at(&p, off, 24);
        assert_eq!(&b[0..8], b"KVCRYPT\xba");
        assert_eq!(&b[8..10], &[2, 0], "version 2 little-endian");
        assert_eq!(&b[10..12], &[idx, 0]);
        assert_eq!(&b[16..24], &1u64.to_le_bytes());
    }
    // The data area is untouched.
    assert!(read_at(&p, MIB, 4096).iter().all(|&b| b == 0));
}

#[test]
fn device_smaller_than_header_plus_one_sector() {
    let dir = tempfile::tempdir().unwrap();
    let vmk = key(1);
    let e = VolumeHeader::new_for_device(MIB + 4095, 4096, "", &vmk).unwrap_err();
    assert!(
        matches!(e, HeaderError::DeviceTooSmall { needed, .. } if needed == MIB + 4096),
        "{e}"
    );
    assert_eq!(e.exit_class(), Exit::Device);
    // Writing a header whose data area does not fit the device is refused, nothing written.
    let mut h = VolumeHeader::new_for_device(8 * MIB, 4096, "", &vmk).unwrap();
    let small = sized_file(dir.path(), "small.img", 2 * MIB);
    let e = kvcrypt_header_io::write(&small, &mut h).unwrap_err();
    assert!(matches!(e, HeaderError::DeviceTooSmall { .. }), "{e}");
    assert!(read_at(&small, 0, 8).iter().all(|&b| b == 0));
    // A device that shrank after formatting: clear error on read.
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "");
    set_len(&p, 4 * MIB);
    let e = kvcrypt_header_io::read(&p).unwrap_err();
    assert!(
        matches!(e, HeaderError::DeviceTooSmall { size, .. } if size == 4 * MIB),
        "{e}"
    );
}

#[test]
fn not_a_kvcrypt_device() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = sized_file(dir.path(), "zeros.img", 4 * MIB);
    let empty = sized_file(dir.path(), "empty.img", 0);
    let noise = sized_file(dir.path(), "noise.img", 2 * MIB);
    let bytes: Vec<u8> = (0..2 * MIB)
        .map(|i| ((i * 2654435761) >> 13) as u8)
        .collect();
    write_at(&noise, 0, &bytes);
    for p in [&zeros, &empty, &noise] {
        let e = kvcrypt_header_io::read(p).unwrap_err();
        assert!(
            matches!(e, HeaderError::NotKvcrypt { .. }),
            "{}: {e}",
            p.display()
        );
        assert_eq!(e.exit_class(), Exit::NotKvcrypt);
        assert!(kvcrypt_header_io::probe(p).is_none());
    }
    let e = kvcrypt_header_io::read(dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, HeaderError::Io { .. }));
    assert_eq!(e.exit_class(), Exit::NotFound);
}

#[test]
fn primary_corrupt_opens_from_secondary_and_write_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    let good = read_at(&p, PRIMARY, 8192);
    flip(&p, PRIMARY + 40); // first label byte
    flip(&p, PRIMARY + 4100); // metadata byte
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.used, HeaderCopy::Secondary);
    assert_eq!(l.header, h);
    assert_eq!(l.damaged.len(), 1);
    assert_eq!(l.damaged[0].copy, HeaderCopy::Primary);
    assert!(
        l.damaged[0].reason.contains("checksum"),
        "{}",
        l.damaged[0].reason
    );

    let mut h2 = l.header.clone();
    kvcrypt_header_io::write(&p, &mut h2).unwrap();
    assert_eq!(h2.sequence, 2);
    // The primary's bytes on disk are repaired: equal to the original except the sequence
    // number and checksum, which a new write changes.
    let now = read_at(&p, PRIMARY, 8192);
    assert_eq!(now[40], good[40]);
    assert_eq!(now[4100], good[4100]);
    assert_eq!(&now[16..24], &2u64.to_le_bytes());
    let mut a = now.clone();
    let mut b = good.clone();
    for v in [&mut a, &mut b] {
        v[16..24].fill(0);
        v[224..256].fill(0);
    }
    assert_eq!(a, b);
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert!(l.damaged.is_empty(), "{:?}", l.damaged);
    assert_eq!(l.used, HeaderCopy::Primary);
}

#[test]
fn secondary_corrupt_is_reported_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    write_at(&p, SECONDARY, &[0xff; 4096]);
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.used, HeaderCopy::Primary);
    assert_eq!(
        l.damaged.iter().map(|d| d.copy).collect::<Vec<_>>(),
        vec![HeaderCopy::Secondary]
    );
    let mut h = l.header.clone();
    kvcrypt_header_io::write(&p, &mut h).unwrap();
    assert_eq!(&read_at(&p, SECONDARY, 8)[..], b"KVCRYPT\xba");
    assert_eq!(&read_at(&p, SECONDARY + 16, 8)[..], &2u64.to_le_bytes());
    assert!(kvcrypt_header_io::read(&p).unwrap().damaged.is_empty());
}

#[test]
fn stale_copy_loses_to_higher_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "old");
    let old_primary = read_at(&p, PRIMARY, 512 * 1024);
    let vmk = key(1);
    let mut h = kvcrypt_header_io::read(&p).unwrap().header;
    h.label = "new".into();
    h.seal(&vmk);
    kvcrypt_header_io::write(&p, &mut h).unwrap();
    // Simulate a crash that left the primary at the old contents.
    write_at(&p, PRIMARY, &old_primary);
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.used, HeaderCopy::Secondary);
    assert_eq!(l.label, "new");
    assert_eq!(l.sequence, 2);
    assert!(l.damaged[0].reason.contains("stale"), "{:?}", l.damaged);
}

#[test]
fn both_copies_corrupt_suggests_header_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    flip(&p, PRIMARY + 130);
    flip(&p, SECONDARY + 4200);
    let e = kvcrypt_header_io::read(&p).unwrap_err();
    assert!(matches!(e, HeaderError::BothCopiesCorrupt { .. }), "{e}");
    assert_eq!(e.exit_class(), Exit::HeaderInvalid);
    let msg = e.to_string();
    assert!(msg.contains("kvcrypt header restore"), "{msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(kvcrypt_header_io::probe(&p).is_none());
}

#[test]
fn truncated_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    let md_len = metadata_len(&p, PRIMARY);
    assert!(md_len > 100);
    // An image cut off inside the primary's metadata (so the secondary is gone too).
    set_len(&p, 4096 + md_len / 2);
    let e = kvcrypt_header_io::read(&p).unwrap_err();
    assert!(matches!(e, HeaderError::TruncatedMetadata { .. }), "{e}");
    assert_eq!(e.exit_class(), Exit::HeaderInvalid);

    // Metadata whose JSON is cut short (length field and checksum consistent with it).
    let (p, _) = formatted(dir.path(), "w.img", 8 * MIB, "data");
    for copy in [PRIMARY, SECONDARY] {
        write_at(&p, copy + 168, &(md_len / 2).to_le_bytes());
        fix_checksum(&p, copy);
    }
    let e = kvcrypt_header_io::read(&p).unwrap_err();
    assert!(
        matches!(e, HeaderError::BothCopiesCorrupt { ref primary, .. } if primary.contains("JSON")),
        "{e}"
    );
}

#[test]
fn unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    write_at(&p, PRIMARY + 8, &5u16.to_le_bytes());
    // Version 5 is the first unknown one (3 is the recovery slot's, 4 the split policies'). One copy of an unknown version: the other (v2) copy is used, the first reported.
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.used, HeaderCopy::Secondary);
    assert!(l.damaged[0].reason.contains("unsupported version 5"));
    write_at(&p, SECONDARY + 8, &5u16.to_le_bytes());
    let e = kvcrypt_header_io::read(&p).unwrap_err();
    assert!(
        matches!(
            e,
            HeaderError::UnsupportedVersion {
                version: 5,
                supported: 4,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.exit_class(), Exit::HeaderInvalid);
    assert!(e.to_string().contains("version 5"));
}

#[test]
fn wrong_key_fails_the_key_check() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    let l = kvcrypt_header_io::read(&p).unwrap();
    let e = l.verify_key(&key(2)).unwrap_err();
    assert!(matches!(e, HeaderError::WrongKey));
    assert_eq!(e.exit_class(), Exit::WrongKey);
    l.verify_key(&key(1)).unwrap();
}

#[test]
fn tampered_label_is_detected_by_the_mac() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    for copy in [PRIMARY, SECONDARY] {
        write_at(&p, copy + 40, b"evil");
        fix_checksum(&p, copy);
    }
    // Without the key the change is invisible (checksums are right) ...
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert_eq!(l.label, "evil");
    assert!(l.damaged.is_empty());
    // ... with the key it is caught.
    let e = l.verify_key(&key(1)).unwrap_err();
    assert!(matches!(e, HeaderError::Tampered), "{e}");
    assert_eq!(e.exit_class(), Exit::HeaderInvalid);
}

#[test]
fn tampered_key_slot_is_detected_by_the_mac() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    for copy in [PRIMARY, SECONDARY] {
        let len = metadata_len(&p, copy) as usize;
        let md = String::from_utf8(read_at(&p, copy + 4096, len)).unwrap();
        let evil = md.replace("example.vault.azure.net", "attacker.vault.azure.net");
        assert_ne!(md, evil);
        write_at(&p, copy + 4096, evil.as_bytes());
        write_at(&p, copy + 168, &(evil.len() as u64).to_le_bytes());
        fix_checksum(&p, copy);
    }
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert!(l.slots[0].key_id.contains("attacker"));
    assert!(matches!(l.verify_key(&key(1)), Err(HeaderError::Tampered)));
}

#[test]
fn backup_restore_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "data");
    let bak = dir.path().join("v.hdr");
    kvcrypt_header_io::backup(&p, &bak).unwrap();
    assert_eq!(std::fs::metadata(&bak).unwrap().len(), MIB);
    // A second backup to the same file is refused rather than overwriting it.
    assert!(kvcrypt_header_io::backup(&p, &bak).is_err());
    // Destroy both copies, then restore.
    write_at(&p, PRIMARY, &vec![0u8; MIB as usize]);
    assert!(matches!(
        kvcrypt_header_io::read(&p),
        Err(HeaderError::NotKvcrypt { .. })
    ));
    let restored = kvcrypt_header_io::restore(&p, &bak).unwrap();
    let l = kvcrypt_header_io::read(&p).unwrap();
    assert!(l.damaged.is_empty());
    assert_eq!(l.uuid, h.uuid);
    assert_eq!(l.slots, h.slots);
    assert_eq!(l.sequence, restored.sequence);
    assert!(l.sequence > h.sequence);
    l.verify_key(&key(1)).unwrap();
    // A non-header file is not accepted as a backup.
    let junk = sized_file(dir.path(), "junk", MIB);
    assert!(matches!(
        kvcrypt_header_io::restore(&p, &junk),
        Err(HeaderError::NotKvcrypt { .. })
    ));
}

#[test]
fn probe_reports_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (p, h) = formatted(dir.path(), "v.img", 8 * MIB, "my vol");
    let info = kvcrypt_header_io::probe(&p).unwrap();
    assert_eq!(info.uuid, h.uuid);
    assert_eq!(info.label, "my vol");
    assert_eq!(info.version, 2);
}
