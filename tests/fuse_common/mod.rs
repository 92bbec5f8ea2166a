//! Helpers shared by the data-path tests (tests/fuse_*.rs).
#![allow(dead_code)]

pub mod scenarios;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::VolumeKey;

/// Data offset used by tests that build a volume without a header (1 MiB, like the format).
pub const DATA_OFFSET: u64 = 1 << 20;

/// A fixed test key (not secret).
pub fn test_key(seed: u8) -> VolumeKey {
    let bytes: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(seed))
        .collect();
    VolumeKey::from_slice(&bytes).expect("64-byte key")
}

pub fn cipher(seed: u8) -> XtsCipher {
    XtsCipher::new(&test_key(seed))
}

/// Creates a sparse backing file of `data_len` bytes after a header area filled with 0xA5.
pub fn backing_file(dir: &Path, data_len: u64) -> PathBuf {
    let path = dir.join("backing.img");
    let f = std::fs::File::create(&path).expect("create backing file");
    f.set_len(DATA_OFFSET + data_len)
        .expect("size backing file");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0xA5u8; DATA_OFFSET as usize], 0)
        .expect("fill header area");
    path
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// True if any `chunk`-sized aligned piece of `needle` occurs anywhere in `haystack` (at any
/// multiple of `step`). Pieces are indexed by their first 8 bytes so the scan is linear.
pub fn contains_any_chunk(haystack: &[u8], needle: &[u8], chunk: usize, step: usize) -> bool {
    let mut index = std::collections::HashMap::new();
    for c in needle.chunks_exact(chunk) {
        index
            .entry(u64::from_le_bytes(c[..8].try_into().unwrap()))
            .or_insert_with(Vec::new)
            .push(c);
    }
    if haystack.len() < chunk {
        return false;
    }
    (0..=haystack.len() - chunk).step_by(step).any(|i| {
        let key = u64::from_le_bytes(haystack[i..i + 8].try_into().unwrap());
        index
            .get(&key)
            .is_some_and(|cs| cs.iter().any(|c| &haystack[i..i + chunk] == *c))
    })
}

/// Returns true (and prints why) if the kernel facilities for the FUSE+loop path are missing.
pub fn skip_without_fuse_loop() -> bool {
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            eprintln!(
                "\n!!! SKIPPING: {dev} is missing on this machine; the FUSE+loop data path cannot be tested !!!\n"
            );
            return true;
        }
    }
    if !kvcrypt_host::process::running_as_root() {
        eprintln!("\n!!! SKIPPING: FUSE+loop tests need root (CI runs as root) !!!\n");
        return true;
    }
    false
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(path).expect("read file for checksum");
    format!("{:x}", Sha256::digest(&data))
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a file-backed kvcrypt volume of `size` bytes (header written by the header module,
/// sealed with `key`; no key slots: tests hand the key to the worker directly).
pub fn make_volume(dir: &Path, size: u64, key: &VolumeKey) -> PathBuf {
    let path = dir.join("volume.img");
    let f = std::fs::File::create(&path).expect("create volume file");
    f.set_len(size).expect("size volume file");
    drop(f);
    let mut h =
        kvcrypt_format::VolumeHeader::new_for_device(size, 4096, "test", key).expect("new header");
    kvcrypt_format::write(&path, &mut h).expect("write header");
    path
}

/// A worker spec for tests: FUSE transport, this build's kvcrypt binary.
pub fn worker_spec(device: &Path, name: &str) -> kvcrypt::worker::WorkerSpec {
    let mut spec = kvcrypt::worker::WorkerSpec::new(device, name);
    spec.transport = kvcrypt_datapath::transport::TransportKind::Fuse;
    spec.exe = Some(PathBuf::from(env!("CARGO_BIN_EXE_kvcrypt")));
    spec
}

/// Waits (bounded) until process `pid` is gone.
pub fn wait_gone(pid: u32) {
    for _ in 0..500 {
        // SAFETY: signal 0 only probes for existence.
        if unsafe { libc::kill(pid as i32, 0) } != 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {pid} did not exit");
}

/// Unmounts and closes on drop, so a failing test does not leave mounts or workers behind.
pub struct Cleanup {
    pub mounts: Vec<PathBuf>,
    pub names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = std::process::Command::new("umount").arg(m).output();
        }
        for n in &self.names {
            if let Ok(mut c) = kvcrypt::worker::WorkerClient::connect(n) {
                if c.status().map(|s| s.is_suspended()).unwrap_or(false) {
                    let _ = c.resume(&test_key(42));
                }
                let _ = c.close();
            }
        }
    }
}

/// Opens a block device for direct I/O.
pub fn open_direct(dev: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open block device")
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets the FUSE module's `enable_uring` parameter while alive (the kernel offers
/// FUSE-over-io_uring only to connections mounted meanwhile) and restores the previous value
/// on drop. Holding it also serialises the tests of one file that need it.
pub struct EnableUring {
    old: String,
    _serial: MutexGuard<'static, ()>,
}

static URING_SERIAL: Mutex<()> = Mutex::new(());

impl EnableUring {
    /// Switches FUSE-over-io_uring on; `None` (with a loud note) if this kernel has no
    /// FUSE-over-io_uring (before 6.14).
    pub fn on() -> Option<EnableUring> {
        Self::set(true)
    }

    /// Sets the parameter to Y (`true`) or N.
    pub fn set(enable: bool) -> Option<EnableUring> {
        let serial = URING_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(old) = std::fs::read_to_string(ENABLE_URING) else {
            eprintln!(
                "\n!!! SKIPPING: {ENABLE_URING} is missing: this kernel has no FUSE-over-io_uring !!!\n"
            );
            return None;
        };
        std::fs::write(ENABLE_URING, if enable { "Y" } else { "N" })
            .expect("set the fuse enable_uring parameter");
        Some(EnableUring {
            old: old.trim().to_string(),
            _serial: serial,
        })
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = std::fs::write(ENABLE_URING, &self.old);
    }
}
