//! The two-copy rules, on bytes: which copy wins, what is reported as damaged, and the plan of
//! a header write (its sequence number, and the copy that is *not* the valid one written
//! first, so one valid copy exists at every instant). No I/O: `kvcrypt-header-io` reads the
//! header area from the device, hands it here, and carries out the plan (each copy written
//! and synced in the planned order).

use std::path::Path;

use super::layout::{self, DecodeError};
use super::{DamagedCopy, HeaderCopy, HeaderError, VolumeHeader};

/// What `kvcrypt probe` needs: identity of a kvcrypt volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    pub uuid: uuid::Uuid,
    pub label: String,
    pub version: u16,
    pub sequence: u64,
}

impl ProbeInfo {
    /// The identity of the volume whose header is `h`.
    pub fn of(h: &VolumeHeader) -> ProbeInfo {
        ProbeInfo {
            uuid: h.uuid,
            label: h.label.clone(),
            version: h.version,
            sequence: h.sequence,
        }
    }
}

/// The bytes of `copy` inside an image of the header area (possibly short or empty).
fn copy_bytes(area: &[u8], copy: HeaderCopy) -> &[u8] {
    let start = (copy.offset() as usize).min(area.len());
    let end = (start + layout::COPY_SIZE as usize).min(area.len());
    &area[start..end]
}

fn describe(e: &DecodeError) -> String {
    match e {
        DecodeError::Absent => "no kvcrypt magic".into(),
        DecodeError::UnsupportedVersion(v) => format!("unsupported version {v}"),
        DecodeError::Truncated(r) => format!("truncated: {r}"),
        DecodeError::Corrupt(r) => r.clone(),
    }
}

/// Applies the two-copy rules to an image of the header area (the first MiB of a device, or a
/// backup file). `path` is only used in error messages. Never panics, whatever the bytes.
pub fn parse_image(
    area: &[u8],
    path: &Path,
) -> Result<(VolumeHeader, HeaderCopy, Vec<DamagedCopy>), HeaderError> {
    let results: Vec<(HeaderCopy, Result<VolumeHeader, DecodeError>)> = HeaderCopy::BOTH
        .iter()
        .map(|&c| (c, VolumeHeader::decode_copy(copy_bytes(area, c), c)))
        .collect();

    // The valid copy with the highest sequence wins; on a tie the primary (listed first).
    let mut best: Option<(HeaderCopy, &VolumeHeader)> = None;
    for (c, r) in &results {
        if let Ok(h) = r
            && best.is_none_or(|(_, b)| h.sequence > b.sequence)
        {
            best = Some((*c, h));
        }
    }

    if let Some((used, h)) = best {
        let mut damaged = Vec::new();
        for (c, r) in &results {
            if *c == used {
                continue;
            }
            match r {
                Err(e) => damaged.push(DamagedCopy {
                    copy: *c,
                    reason: describe(e),
                }),
                Ok(other) if other.sequence < h.sequence => damaged.push(DamagedCopy {
                    copy: *c,
                    reason: format!(
                        "stale (sequence {} < {}; an earlier header write was interrupted)",
                        other.sequence, h.sequence
                    ),
                }),
                Ok(other) if *other != *h => damaged.push(DamagedCopy {
                    copy: *c,
                    reason: "same sequence number but different content".into(),
                }),
                Ok(_) => {}
            }
        }
        return Ok((h.clone(), used, damaged));
    }

    let errs: Vec<&DecodeError> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let path = path.to_path_buf();
    if errs.iter().all(|e| **e == DecodeError::Absent) {
        return Err(HeaderError::NotKvcrypt { path });
    }
    if let Some(version) = errs.iter().find_map(|e| match e {
        DecodeError::UnsupportedVersion(v) => Some(*v),
        _ => None,
    }) {
        return Err(HeaderError::UnsupportedVersion {
            path,
            version,
            supported: layout::NEWEST,
        });
    }
    // Truncation with nothing else wrong (the other copy cut off or absent): say so plainly.
    if errs
        .iter()
        .all(|e| matches!(e, DecodeError::Truncated(_) | DecodeError::Absent))
    {
        let reason = errs
            .iter()
            .find_map(|e| match e {
                DecodeError::Truncated(r) => Some(r.clone()),
                _ => None,
            })
            .unwrap_or_default();
        return Err(HeaderError::TruncatedMetadata { path, reason });
    }
    let reason = |c: HeaderCopy| {
        results
            .iter()
            .find(|(rc, _)| *rc == c)
            .and_then(|(_, r)| r.as_ref().err())
            .map(describe)
            .unwrap_or_default()
    };
    Err(HeaderError::BothCopiesCorrupt {
        path,
        primary: reason(HeaderCopy::Primary),
        secondary: reason(HeaderCopy::Secondary),
    })
}

/// Checks that a device of `device_size` bytes holds the whole data area of `h` (header area
/// included): [`HeaderError::DeviceTooSmall`] otherwise. `path` is only used in the error.
pub fn check_device_size(
    h: &VolumeHeader,
    device_size: u64,
    path: &Path,
) -> Result<(), HeaderError> {
    let needed = h.data_offset.saturating_add(h.data_length);
    if device_size < needed {
        return Err(HeaderError::DeviceTooSmall {
            path: path.to_path_buf(),
            size: device_size,
            needed,
        });
    }
    Ok(())
}

/// One header copy to write: `bytes` (one whole encoded copy) at byte `offset` of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyWrite {
    pub copy: HeaderCopy,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// How to write a header: the new sequence number and the copies, in the order they must be
/// written, each synced before the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// One above anything on the device and above the header's own sequence number.
    pub sequence: u64,
    /// Both copies; first the one that is *not* the currently valid one, so a crash at any
    /// point leaves one valid copy. A damaged copy is rewritten completely (repair).
    pub writes: Vec<CopyWrite>,
}

/// Plans writing `h` to a device of `device_size` bytes whose header area currently holds
/// `area` (the first MiB as read from the device, possibly short). Refuses a device too small
/// for the data area ([`HeaderError::DeviceTooSmall`]) and a header that does not encode.
/// `path` is only used in error messages. Does not touch the key check or MAC: call
/// [`VolumeHeader::seal`] after changing covered fields.
pub fn plan_write(
    area: &[u8],
    device_size: u64,
    path: &Path,
    h: &VolumeHeader,
) -> Result<WritePlan, HeaderError> {
    check_device_size(h, device_size, path)?;
    let mut disk_max = 0u64;
    let mut current = None;
    for c in HeaderCopy::BOTH {
        if let Ok(old) = VolumeHeader::decode_copy(copy_bytes(area, c), c) {
            if current.is_none() || old.sequence > disk_max {
                current = Some(c);
            }
            disk_max = disk_max.max(old.sequence);
        }
    }
    let sequence = h
        .sequence
        .max(disk_max)
        .checked_add(1)
        .ok_or_else(|| HeaderError::Invalid("sequence number exhausted".into()))?;
    let order = match current {
        Some(HeaderCopy::Primary) => [HeaderCopy::Secondary, HeaderCopy::Primary],
        _ => [HeaderCopy::Primary, HeaderCopy::Secondary],
    };
    let writes = order
        .iter()
        .map(|&copy| {
            h.encode_copy(copy, sequence).map(|bytes| CopyWrite {
                copy,
                offset: copy.offset(),
                bytes,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(WritePlan { sequence, writes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_image;
    use kvcrypt_crypto::secmem::VolumeKey;

    const SIZE: u64 = 8 << 20;

    fn header() -> VolumeHeader {
        let vmk = VolumeKey::from_slice(&[7; 64]).unwrap();
        VolumeHeader::new_for_device(SIZE, 4096, "plan", &vmk).unwrap()
    }

    /// `area` after carrying out `plan` on it.
    fn apply(area: &[u8], plan: &WritePlan) -> Vec<u8> {
        let mut out = area.to_vec();
        out.resize(layout::HEADER_AREA_SIZE as usize, 0);
        for w in &plan.writes {
            let at = w.offset as usize;
            out[at..at + w.bytes.len()].copy_from_slice(&w.bytes);
        }
        out
    }

    fn order(plan: &WritePlan) -> Vec<(HeaderCopy, u64)> {
        plan.writes.iter().map(|w| (w.copy, w.offset)).collect()
    }

    #[test]
    fn a_blank_area_is_written_primary_first() {
        let h = header();
        let path = Path::new("blank");
        let plan = plan_write(&[], SIZE, path, &h).unwrap();
        assert_eq!(plan.sequence, 1);
        assert_eq!(
            order(&plan),
            [
                (HeaderCopy::Primary, 0),
                (HeaderCopy::Secondary, layout::COPY_SIZE)
            ]
        );
        assert!(
            plan.writes
                .iter()
                .all(|w| w.bytes.len() as u64 == layout::COPY_SIZE)
        );
        let (back, used, damaged) = parse_image(&apply(&[], &plan), path).unwrap();
        assert_eq!((back.sequence, used), (1, HeaderCopy::Primary));
        assert!(damaged.is_empty());
    }

    #[test]
    fn the_copy_that_is_not_the_valid_one_is_written_first() {
        let mut h = header();
        let path = Path::new("img");
        // Both valid with the same sequence: the primary is the valid one (it wins a tie).
        let both = encode_image(&h, 5).unwrap();
        let plan = plan_write(&both, SIZE, path, &h).unwrap();
        assert_eq!(plan.sequence, 6);
        assert_eq!(order(&plan)[0].0, HeaderCopy::Secondary);
        // The secondary is newer: the primary goes first.
        let mut newer = encode_image(&h, 5).unwrap();
        let sec = encode_image(&h, 7).unwrap();
        newer[layout::COPY_SIZE as usize..].copy_from_slice(&sec[layout::COPY_SIZE as usize..]);
        let plan = plan_write(&newer, SIZE, path, &h).unwrap();
        assert_eq!(plan.sequence, 8);
        assert_eq!(order(&plan)[0].0, HeaderCopy::Primary);
        // A damaged primary: the secondary is the valid one, the primary is rewritten first.
        let mut damaged = encode_image(&h, 3).unwrap();
        damaged[0] ^= 0xff;
        let plan = plan_write(&damaged, SIZE, path, &h).unwrap();
        assert_eq!(order(&plan)[0].0, HeaderCopy::Primary);
        let (_, _, left) = parse_image(&apply(&damaged, &plan), path).unwrap();
        assert!(left.is_empty(), "repaired: {left:?}");
        // The header's own sequence counts when it is above the device's.
        h.sequence = 40;
        assert_eq!(plan_write(&both, SIZE, path, &h).unwrap().sequence, 41);
        h.sequence = u64::MAX;
        assert!(matches!(
            plan_write(&both, SIZE, path, &h),
            Err(HeaderError::Invalid(_))
        ));
    }

    #[test]
    fn a_device_too_small_for_the_data_area_is_refused() {
        let h = header();
        let path = Path::new("small");
        assert!(check_device_size(&h, SIZE, path).is_ok());
        match plan_write(&[], SIZE - 1, path, &h) {
            Err(HeaderError::DeviceTooSmall {
                path: p,
                size,
                needed,
            }) => {
                assert_eq!((p.as_path(), size, needed), (path, SIZE - 1, SIZE));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn probe_info_is_the_identity() {
        let mut h = header();
        h.sequence = 9;
        let i = ProbeInfo::of(&h);
        assert_eq!(
            (i.uuid, i.label.as_str(), i.version, i.sequence),
            (h.uuid, "plan", h.version, 9)
        );
    }
}
