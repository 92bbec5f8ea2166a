//! Reading and writing the kvcrypt volume header on a device or image file: the I/O half of
//! the header, whose rules live in the pure `kvcrypt-format` crate (which does no I/O).
//!
//! [`read()`] takes the first MiB of the device, and [`kvcrypt_format::parse_image`] decides
//! which copy wins and which is damaged. [`write()`] carries out
//! [`kvcrypt_format::plan_write`]: the copy that is *not* the currently valid one is written and
//! synced first, then the other, so one valid copy exists at every instant (a crash mid-write
//! loses at most the new header). A [`backup`] is the raw header area in a new file of mode
//! 0600 whatever the umask (it holds the wrapped keys); [`restore`] writes a backup's header
//! back above anything on the device.
//!
//! Plain `std::fs::File` positioned I/O works for block devices and regular files alike; the
//! size comes from `seek(End)`, which Linux answers for block devices with the same value as
//! the `BLKGETSIZE64` ioctl, so no `unsafe` is needed here. Errors are [`HeaderError`] (I/O
//! failures as its `Io` variant, naming the path and the operation), so their exit codes are
//! the format's.

// This crate needs no `unsafe`; the compiler keeps it that way.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use kvcrypt_format::{HeaderError, LoadedHeader, ProbeInfo, VolumeHeader, layout};

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

/// Reads the volume header of `path`: the valid copy with the higher sequence number, which
/// copy that was, and which copy is damaged.
pub fn read(path: impl AsRef<Path>) -> Result<LoadedHeader, HeaderError> {
    let path = path.as_ref();
    let l = read_header_only(path)?;
    kvcrypt_format::check_device_size(&l.header, l.device_size, path)?;
    Ok(l)
}

/// [`read()`] without the check that the device holds the whole data area: for the commands that
/// must still work on a truncated device (`header dump`, `header backup`), so its header can be
/// saved before anything else is tried. [`LoadedHeader::missing_bytes`] tells how short it is.
pub fn read_header_only(path: impl AsRef<Path>) -> Result<LoadedHeader, HeaderError> {
    let path = path.as_ref();
    let f = File::open(path).map_err(io_err(path, "opening"))?;
    let size = device_size(&f, path)?;
    let area = read_area(&f, path)?;
    let (header, used, damaged) = kvcrypt_format::parse_image(&area, path)?;
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
    let (h, _, _) = kvcrypt_format::parse_image(&area, path).ok()?;
    Some(ProbeInfo::of(&h))
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

/// [`write()`] through a descriptor the caller opened (and may hold a claim on, see
/// `kvcrypt_host::inuse::open_for_overwrite`); `path` names it in errors.
pub fn write_to(f: &File, path: &Path, h: &mut VolumeHeader) -> Result<(), HeaderError> {
    let size = device_size(f, path)?;
    // Before reading anything: a device too small is refused whatever its header area holds.
    kvcrypt_format::check_device_size(h, size, path)?;
    let area = read_area(f, path)?;
    let plan = kvcrypt_format::plan_write(&area, size, path, h)?;
    for w in &plan.writes {
        f.write_all_at(&w.bytes, w.offset)
            .map_err(io_err(path, "writing a header copy"))?;
        f.sync_data()
            .map_err(io_err(path, "syncing a header copy"))?;
    }
    h.sequence = plan.sequence;
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
    Ok(kvcrypt_format::parse_image(&area, file)?.0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use kvcrypt_crypto::secmem::VolumeKey;
    use kvcrypt_format::HeaderCopy;

    const SIZE: u64 = 8 << 20;

    fn image(dir: &Path) -> (std::path::PathBuf, VolumeHeader) {
        let p = dir.join("img");
        File::create(&p).unwrap().set_len(SIZE).unwrap();
        let vmk = VolumeKey::from_slice(&[3; 64]).unwrap();
        let h = VolumeHeader::new_for_device(SIZE, 4096, "io", &vmk).unwrap();
        (p, h)
    }

    #[test]
    fn write_then_read_and_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (p, mut h) = image(dir.path());
        assert!(probe(&p).is_none());
        assert!(matches!(read(&p), Err(HeaderError::NotKvcrypt { .. })));
        write(&p, &mut h).unwrap();
        assert_eq!(h.sequence, 1);
        write(&p, &mut h).unwrap();
        assert_eq!(h.sequence, 2);
        let l = read(&p).unwrap();
        assert_eq!(
            (l.header.sequence, l.used, l.device_size),
            (2, HeaderCopy::Primary, SIZE)
        );
        assert!(l.damaged.is_empty());
        assert_eq!(l.header, h);
        assert_eq!(probe(&p), Some(ProbeInfo::of(&h)));
        // A device cut short: `read` refuses it, `read_header_only` still reads it.
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(SIZE - 4096)
            .unwrap();
        assert!(matches!(read(&p), Err(HeaderError::DeviceTooSmall { .. })));
        assert_eq!(read_header_only(&p).unwrap().missing_bytes(), Some(4096));
        assert!(matches!(
            write(&p, &mut h),
            Err(HeaderError::DeviceTooSmall { .. })
        ));
        assert!(matches!(
            read(dir.path().join("missing")),
            Err(HeaderError::Io { op: "opening", .. })
        ));
    }

    #[test]
    fn backup_is_0600_and_restore_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (p, mut h) = image(dir.path());
        write(&p, &mut h).unwrap();
        let bak = dir.path().join("bak");
        backup(&p, &bak).unwrap();
        let mode = std::fs::metadata(&bak).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&bak).unwrap().len(),
            layout::HEADER_AREA_SIZE
        );
        assert!(
            backup(&p, &bak).is_err(),
            "an existing file is not overwritten"
        );
        assert_eq!(read_backup(&bak).unwrap(), h);
        // Newer writes on the device; the restored header is written above them.
        write(&p, &mut h).unwrap();
        write(&p, &mut h).unwrap();
        let restored = restore(&p, &bak).unwrap();
        assert_eq!(restored.sequence, 4);
        assert_eq!(read(&p).unwrap().header, restored);
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert_eq!(restore_to(&f, &p, &bak).unwrap().sequence, 5);
        assert_eq!(device_size(&f, &p).unwrap(), SIZE);
    }
}
