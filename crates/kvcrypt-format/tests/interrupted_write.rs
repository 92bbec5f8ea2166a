//! A power cut at any point of a header write leaves a header that unlocks.
//!
//! The writes of a rotation (a slot added) and of a prune (an old slot removed) are carried
//! out on an image of the header area the way `kvcrypt-header-io` does: the plan's copies in
//! order, each synced before the next. The cut is simulated at every 512-byte sector of each
//! copy write (what reached the disk of the copy in flight is a prefix), and with random
//! subsets of its sectors (a disk may persist the sectors of one write in any order). Every
//! state must parse, pass the key check and MAC with the volume key, and be either the old
//! header or the new one — both of which hold a slot that unwrapped before the write.

use std::path::Path;

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::{KeySlot, VolumeHeader, encode_image, parse_image, plan_write};

const SIZE: u64 = 8 << 20;
const SECTOR: usize = 512;

fn slot(version: &str) -> KeySlot {
    KeySlot {
        id: 0,
        provider: kvcrypt_format::PROVIDER_AZURE.into(),
        key_id: format!("https://v.vault.azure.net/keys/k/{version}"),
        algorithm: "RSA-OAEP-256".into(),
        wrapped: vec![version.len() as u8; 256],
        created_at: "2026-12-01T00:00:00Z".into(),
        check: Some(vec![9; 256]),
        share: None,
    }
}

/// A tiny deterministic generator: the subsets are the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Every state a cut during writing `new` over `area` can leave, checked.
fn every_cut_unlocks(
    name: &str,
    area: &[u8],
    old: &VolumeHeader,
    new: &VolumeHeader,
    vmk: &VolumeKey,
) {
    let path = Path::new(name);
    let plan = plan_write(area, SIZE, path, new).unwrap();
    assert_eq!(plan.writes.len(), 2, "{name}: both copies are written");
    let check = |state: &[u8], what: &str| {
        let (h, _, _) = parse_image(state, path)
            .unwrap_or_else(|e| panic!("{name}: {what}: the header does not parse: {e}"));
        h.verify_key(vmk).unwrap_or_else(|e| {
            panic!("{name}: {what}: the winning copy fails the key check: {e}")
        });
        assert!(
            h.slots == old.slots || h.slots == new.slots,
            "{name}: {what}: neither the old nor the new header: {:?}",
            h.slots
        );
        h.slots == new.slots
    };
    let mut disk = area.to_vec();
    let mut states = 0usize;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for (i, w) in plan.writes.iter().enumerate() {
        let at = w.offset as usize;
        let sectors = w.bytes.len() / SECTOR;
        // A prefix of this copy's sectors reached the disk.
        for cut in 0..=sectors {
            let mut state = disk.clone();
            let n = cut * SECTOR;
            state[at..at + n].copy_from_slice(&w.bytes[..n]);
            check(&state, &format!("copy write {i}, cut after sector {cut}"));
            states += 1;
        }
        // Any subset of them did.
        for round in 0..64 {
            let mut state = disk.clone();
            for s in 0..sectors {
                if rng.next().is_multiple_of(2) {
                    let r = s * SECTOR..(s + 1) * SECTOR;
                    state[at + r.start..at + r.end].copy_from_slice(&w.bytes[r]);
                }
            }
            check(
                &state,
                &format!("copy write {i}, random sectors round {round}"),
            );
            states += 1;
        }
        // Synced: this copy is on disk before the next write starts.
        disk[at..at + w.bytes.len()].copy_from_slice(&w.bytes);
    }
    assert!(
        check(&disk, "after both writes"),
        "{name}: the new header wins in the end"
    );
    eprintln!("{name}: {states} interrupted states, each unlocks");
}

#[test]
fn a_power_cut_while_adding_or_pruning_a_slot_leaves_a_header_that_unlocks() {
    let vmk = VolumeKey::from_slice(&[0x5a; 64]).unwrap();
    let mut v1 = VolumeHeader::new_for_device(SIZE, 4096, "cut", &vmk).unwrap();
    v1.add_slot(slot("v1"));
    v1.seal(&vmk);
    let area = encode_image(&v1, 1).unwrap();
    v1.sequence = 1;

    // Rotation: the slot of the new version is added.
    let mut both = v1.clone();
    both.add_slot(slot("v2"));
    both.seal(&vmk);
    every_cut_unlocks("add", &area, &v1, &both, &vmk);

    // After the grace period: the old version's slot is pruned.
    let area = encode_image(&both, 2).unwrap();
    both.sequence = 2;
    let mut pruned = both.clone();
    pruned.remove_slot(0).unwrap();
    pruned.seal(&vmk);
    every_cut_unlocks("prune", &area, &both, &pruned, &vmk);

    // The same with a damaged secondary copy on disk (it is rewritten first, then the primary).
    let mut damaged = encode_image(&v1, 1).unwrap();
    damaged[(512 << 10) + 100] ^= 0xff;
    let mut added = v1.clone();
    added.add_slot(slot("v2"));
    added.seal(&vmk);
    every_cut_unlocks("add over a damaged copy", &damaged, &v1, &added, &vmk);
}
