//! Header I/O on a device or image file, and the two-copy rules: which copy wins, what is
//! reported as damaged, the write order that keeps one valid copy at every instant.
//!
//! Plain `std::fs::File` positioned I/O works for block devices and regular files alike; the
//! size comes from `seek(End)`, which Linux answers for block devices with the same value as
//! the `BLKGETSIZE64` ioctl, so no `unsafe` is needed here.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::layout::{self, DecodeError};
use super::{DamagedCopy, HeaderCopy, HeaderError, LoadedHeader, VolumeHeader};

/// What `kvcrypt probe` needs: identity of a kvcrypt volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    pub uuid: uuid::Uuid,
    pub label: String,
    pub version: u16,
    pub sequence: u64,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> HeaderError + 'a {
    move |source| HeaderError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Size in bytes of an open device or file.
pub fn device_size(mut file: &File, path: &Path) -> Result<u64, HeaderError> {
    file.seek(SeekFrom::End(0))
        .map_err(io_err(path, "determining size"))
}

/// Reads up to `HEADER_AREA_SIZE` bytes from the start of `file` (less if it is shorter).
fn read_area(mut file: &File, path: &Path) -> Result<Vec<u8>, HeaderError> {
    let mut buf = Vec::with_capacity(layout::HEADER_AREA_SIZE as usize);
    file.seek(SeekFrom::Start(0))
        .map_err(io_err(path, "seeking to the header"))?;
    file.take(layout::HEADER_AREA_SIZE)
        .read_to_end(&mut buf)
        .map_err(io_err(path, "reading the header"))?;
    Ok(buf)
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
            supported: layout::VERSION,
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

/// Reads the volume header of `path`: the valid copy with the higher sequence number, which
/// copy that was, and which copy is damaged.
pub fn read(path: impl AsRef<Path>) -> Result<LoadedHeader, HeaderError> {
    let path = path.as_ref();
    let l = read_header_only(path)?;
    if l.missing_bytes().is_some() {
        return Err(HeaderError::DeviceTooSmall {
            path: path.to_path_buf(),
            size: l.device_size,
            needed: l.header.data_offset.saturating_add(l.header.data_length),
        });
    }
    Ok(l)
}

/// [`read`] without the check that the device holds the whole data area: for the commands that
/// must still work on a truncated device (`header dump`, `header backup`), so its header can be
/// saved before anything else is tried. [`LoadedHeader::missing_bytes`] tells how short it is.
pub fn read_header_only(path: impl AsRef<Path>) -> Result<LoadedHeader, HeaderError> {
    let path = path.as_ref();
    let f = File::open(path).map_err(io_err(path, "opening"))?;
    let size = device_size(&f, path)?;
    let area = read_area(&f, path)?;
    let (header, used, damaged) = parse_image(&area, path)?;
    Ok(LoadedHeader {
        header,
        used,
        damaged,
        device_size: size,
    })
}

/// Identity of the kvcrypt volume at `path`, or `None` for anything else (including errors).
pub fn probe(path: impl AsRef<Path>) -> Option<ProbeInfo> {
    let path = path.as_ref();
    let f = File::open(path).ok()?;
    let area = read_area(&f, path).ok()?;
    let (h, _, _) = parse_image(&area, path).ok()?;
    Some(ProbeInfo {
        uuid: h.uuid,
        label: h.label,
        version: h.version,
        sequence: h.sequence,
    })
}

/// Writes `h` to both copies of `path` with a sequence number one above anything on the device
/// (and above `h.sequence`), then updates `h.sequence`. The copy that is *not* currently the
/// valid one is written and synced first, so a crash at any point leaves one valid copy; a
/// damaged copy is overwritten completely (repair).
///
/// Does not touch the key check or MAC: call [`VolumeHeader::seal`] after changing covered
/// fields.
pub fn write(path: impl AsRef<Path>, h: &mut VolumeHeader) -> Result<(), HeaderError> {
    let path = path.as_ref();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path, "opening for writing"))?;
    write_to(&f, path, h)
}

/// [`write`] through a descriptor the caller opened (and may hold a claim on, see
/// [`kvcrypt_host::inuse::open_for_overwrite`]); `path` names it in errors.
pub fn write_to(f: &File, path: &Path, h: &mut VolumeHeader) -> Result<(), HeaderError> {
    let size = device_size(f, path)?;
    let needed = h.data_offset.saturating_add(h.data_length);
    if size < needed {
        return Err(HeaderError::DeviceTooSmall {
            path: path.to_path_buf(),
            size,
            needed,
        });
    }
    let area = read_area(f, path)?;
    let mut disk_max = 0u64;
    let mut current = None;
    for c in HeaderCopy::BOTH {
        if let Ok(old) = VolumeHeader::decode_copy(copy_bytes(&area, c), c) {
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
    let encoded: Vec<(HeaderCopy, Vec<u8>)> = order
        .iter()
        .map(|&c| h.encode_copy(c, sequence).map(|b| (c, b)))
        .collect::<Result<_, _>>()?;
    for (c, bytes) in &encoded {
        f.write_all_at(bytes, c.offset())
            .map_err(io_err(path, "writing a header copy"))?;
        f.sync_data()
            .map_err(io_err(path, "syncing a header copy"))?;
    }
    h.sequence = sequence;
    Ok(())
}

/// Saves the whole header area (both copies, 1 MiB, raw) of `device` to a new file `file`.
/// Refuses if `device` has no readable header or `file` exists.
pub fn backup(
    device: impl AsRef<Path>,
    file: impl AsRef<Path>,
) -> Result<LoadedHeader, HeaderError> {
    let (device, file) = (device.as_ref(), file.as_ref());
    let loaded = read_header_only(device)?;
    let f = File::open(device).map_err(io_err(device, "opening"))?;
    let area = read_area(&f, device)?;
    // 0600 whatever the umask: the backup holds the wrapped keys and the key check, and
    // restoring it brings back every key slot it lists (also one revoked since).
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(io_err(
            file,
            "creating the backup file (it must not exist yet)",
        ))?;
    out.write_all(&area)
        .map_err(io_err(file, "writing the backup"))?;
    out.sync_all().map_err(io_err(file, "syncing the backup"))?;
    Ok(loaded)
}

/// Reads a header backup (as written by [`backup`]) and returns its header.
pub fn read_backup(file: impl AsRef<Path>) -> Result<VolumeHeader, HeaderError> {
    let file = file.as_ref();
    let f = File::open(file).map_err(io_err(file, "opening the backup"))?;
    let area = read_area(&f, file)?;
    Ok(parse_image(&area, file)?.0)
}

/// Writes the header from backup `file` to both copies of `device` (with a sequence number
/// above anything on the device, so it wins). Returns the restored header.
pub fn restore(
    device: impl AsRef<Path>,
    file: impl AsRef<Path>,
) -> Result<VolumeHeader, HeaderError> {
    let mut h = read_backup(file)?;
    write(device, &mut h)?;
    Ok(h)
}

/// [`restore`] through a descriptor the caller opened (and holds a claim on); `device` names
/// it in errors.
pub fn restore_to(
    f: &File,
    device: &Path,
    file: impl AsRef<Path>,
) -> Result<VolumeHeader, HeaderError> {
    let mut h = read_backup(file)?;
    write_to(f, device, &mut h)?;
    Ok(h)
}
