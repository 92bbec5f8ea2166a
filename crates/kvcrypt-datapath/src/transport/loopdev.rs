//! Loop devices: attach a file with `LOOP_CONFIGURE` (direct I/O, block size, autoclear,
//! read-only) in one ioctl. Hand-written because the loop ioctls are four structs and two calls;
//! the crates that wrap them (`loopdev`) need bindgen/libclang at build time.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopInfo64>() == 232);

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot use /dev/loop-control (is the loop module loaded?): {0}")]
    Control(std::io::Error),
    #[error("cannot configure loop device {dev}: {source}")]
    Configure {
        dev: PathBuf,
        source: std::io::Error,
    },
    #[error("no free loop device after several attempts (other processes are racing for them)")]
    NoneFree,
}

/// An attached loop device. The device stays attached while this value (which holds it open)
/// lives; with autoclear the kernel detaches it on the last close, i.e. when this is dropped and
/// nothing (a mount, a process) still has the device open.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    dev: File,
}

impl LoopDevice {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel really uses direct I/O for the backing file (it silently drops the
    /// flag if the file cannot do it).
    pub fn direct_io(&self) -> bool {
        self.status()
            .map(|i| i.lo_flags & LO_FLAGS_DIRECT_IO != 0)
            .unwrap_or(false)
    }

    fn status(&self) -> std::io::Result<LoopInfo64> {
        status_of(&self.dev)
    }

    /// True if anything besides us has the device open (a mount, a process): opening it
    /// with O_EXCL fails then.
    pub fn in_use(&self) -> bool {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(&self.path)
            .is_err()
    }
}

fn status_of(dev: &File) -> std::io::Result<LoopInfo64> {
    // SAFETY: LoopInfo64 is plain integers; zeroed is a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 into `info`.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(info)
    }
}

/// The label (`lo_file_name`, set by [`attach`]) of the loop device at `dev`; `None` if it is
/// not bound to a file.
pub fn label(dev: &Path) -> std::io::Result<Option<String>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dev)?;
    match status_of(&f) {
        Ok(info) => Ok(Some(label_of(&info))),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

fn label_of(info: &LoopInfo64) -> String {
    let name = &info.lo_file_name;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// Holds the loop device at `path`, which must still be bound to a file labelled `want` (a
/// dead FUSE worker's device, taken over by a new worker): held like one from [`attach`], so
/// dropping it is the same last close (autoclear detaches it once nothing else holds it).
pub fn open_existing(path: &Path, read_only: bool, want: &str) -> std::io::Result<LoopDevice> {
    let dev = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    let info = status_of(&dev)?;
    let got = label_of(&info);
    if got != want {
        return Err(std::io::Error::other(format!(
            "bound to {got:?}, not {want:?}"
        )));
    }
    Ok(LoopDevice {
        path: path.to_owned(),
        dev,
    })
}

/// Detaches the loop device at `dev` (`LOOP_CLR_FD`). A device still open elsewhere is
/// detached by the kernel on its last close (autoclear).
pub fn detach(dev: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dev)?;
    // SAFETY: LOOP_CLR_FD takes no argument; `f` is an open loop device descriptor.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches `file` to a free loop device. `label` ends up in `lo_file_name` (shown by losetup).
pub fn attach(
    file: &File,
    block_size: u32,
    read_only: bool,
    direct_io: bool,
    label: &str,
) -> Result<LoopDevice, LoopError> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(LoopError::Control)?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(LoopError::Control(std::io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| LoopError::Configure {
                dev: path.clone(),
                source,
            })?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        // SAFETY: plain integer structs; zeroed is valid.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = file.as_raw_fd() as u32;
        cfg.block_size = block_size;
        cfg.info.lo_flags = flags;
        let name = label.as_bytes();
        let n = name.len().min(63);
        cfg.info.lo_file_name[..n].copy_from_slice(&name[..n]);
        // SAFETY: LOOP_CONFIGURE reads one loop_config from the pointer; `file` stays open for
        // the call (the kernel takes its own reference).
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if r == 0 {
            return Ok(LoopDevice { path, dev });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            continue; // someone else took it between GET_FREE and CONFIGURE
        }
        return Err(LoopError::Configure {
            dev: path,
            source: e,
        });
    }
    Err(LoopError::NoneFree)
}
