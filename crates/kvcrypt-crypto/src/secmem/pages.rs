//! Page allocations for key material — the only `unsafe` code of `secmem`.
//!
//! Preference order:
//! 1. `memfd_secret(2)` pages: removed from the kernel's direct map, never swapped, not in
//!    core dumps, not readable through `/proc/PID/mem` or ptrace by anyone.
//! 2. Anonymous private pages with `mlock` (no swap) and `MADV_DONTDUMP` (no core dump).
//!
//! Memory is always wiped (volatile writes) before it is unmapped.

use std::io;
use std::ptr::NonNull;
use std::sync::OnceLock;

use zeroize::Zeroize;

/// How a secret allocation is backed. Reported by `SecretBytes::backing` for diagnostics/tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `memfd_secret(2)` pages (best).
    MemfdSecret,
    /// Anonymous pages, locked in RAM and excluded from core dumps.
    LockedAnon,
    /// Anonymous pages excluded from core dumps, but `mlock` failed (e.g. RLIMIT_MEMLOCK).
    UnlockedAnon,
}

/// A page-aligned, page-granular mapping holding secrets. Zero-filled when created.
pub(crate) struct SecretPages {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: the mapping is exclusively owned by this value (like a Box); access goes through
// `&self` / `&mut self`, so Rust's aliasing rules make cross-thread use sound.
unsafe impl Send for SecretPages {}
// SAFETY: see `Send`; shared access is read-only through `&self`.
unsafe impl Sync for SecretPages {}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 { p as usize } else { 4096 }
    })
}

/// Remembers that `memfd_secret` is unavailable so we do not retry a failing syscall per key.
static NO_MEMFD_SECRET: OnceLock<()> = OnceLock::new();

/// Set to `1` to accept key pages that cannot be locked in RAM (they could be swapped out).
/// Without it a process that cannot lock its key memory refuses to hold keys.
pub const ALLOW_UNLOCKED_ENV: &str = "KVCRYPT_ALLOW_UNLOCKED_KEY_MEMORY";

fn unlocked_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var_os(ALLOW_UNLOCKED_ENV).is_some_and(|v| v == "1"))
}

/// Why secret pages could not be had.
#[derive(Debug)]
pub(crate) enum PagesError {
    /// No memory could be mapped at all.
    Map(io::Error),
    /// Neither `memfd_secret` nor `mlock` worked, and unlocked pages are not allowed.
    Lock(io::Error),
}

impl SecretPages {
    /// Maps at least `len` (> 0) zeroed bytes. Aborts like `Box` on out-of-memory, and with a
    /// message when the pages cannot be locked (processes that hold keys check
    /// [`check_key_memory`] when they start, so this is only reached if a limit is hit later).
    pub(crate) fn new(len: usize) -> SecretPages {
        match Self::try_new(len) {
            Ok(p) => p,
            Err(PagesError::Lock(e)) => {
                eprintln!("kvcrypt: refusing to hold a key in memory that cannot be locked: {e}");
                std::process::abort()
            }
            Err(PagesError::Map(_)) => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), page_size())
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            ),
        }
    }

    pub(crate) fn try_new(len: usize) -> Result<SecretPages, PagesError> {
        let page = page_size();
        let len = len.max(1).div_ceil(page) * page;
        if NO_MEMFD_SECRET.get().is_none() {
            match Self::memfd_secret(len) {
                Ok(p) => return Ok(p),
                Err(_) => {
                    let _ = NO_MEMFD_SECRET.set(());
                }
            }
        }
        let (p, lock_error) = Self::anon(len).map_err(PagesError::Map)?;
        match lock_error {
            Some(e) if !unlocked_allowed() => {
                drop(p);
                Err(PagesError::Lock(e))
            }
            _ => Ok(p),
        }
    }

    fn memfd_secret(len: usize) -> io::Result<SecretPages> {
        // SAFETY: raw syscall with an integer flag argument; returns an fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_ulong) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = fd as libc::c_int;
        let result = (|| {
            // SAFETY: `fd` is a valid, owned file descriptor.
            if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: new shared mapping of our own fd; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(p)
        })();
        // SAFETY: the mapping (if any) keeps the secret memory alive; the fd is not needed.
        unsafe { libc::close(fd) };
        let p = result?;
        // Secretmem pages are unevictable already; DONTDUMP is belt and braces (errors ignored).
        // SAFETY: advising a mapping we own.
        unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) };
        Ok(SecretPages {
            ptr: NonNull::new(p.cast())
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?,
            len,
            backing: Backing::MemfdSecret,
        })
    }

    /// Anonymous pages, with the `mlock` error if they could not be locked.
    fn anon(len: usize) -> io::Result<(SecretPages, Option<io::Error>)> {
        // SAFETY: new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advising / locking a mapping we own.
        let locked = unsafe {
            libc::madvise(p, len, libc::MADV_DONTDUMP);
            libc::mlock(p, len) == 0
        };
        let lock_error = (!locked).then(io::Error::last_os_error);
        let pages = SecretPages {
            ptr: NonNull::new(p.cast())
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?,
            len,
            backing: if locked {
                Backing::LockedAnon
            } else {
                Backing::UnlockedAnon
            },
        };
        Ok((pages, lock_error))
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn backing(&self) -> Backing {
        self.backing
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live RW mapping of `len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SecretPages {
    fn drop(&mut self) {
        self.bytes_mut().zeroize();
        // SAFETY: unmapping the mapping we own; no references outlive `self`.
        unsafe {
            if self.backing == Backing::LockedAnon {
                libc::munlock(self.ptr.as_ptr().cast(), self.len);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Key memory cannot be locked in RAM and unlocked pages are not allowed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot lock key memory in RAM (memfd_secret is unavailable and mlock failed: {source}; \
     RLIMIT_MEMLOCK is {limit}): kvcrypt refuses to hold volume keys in memory that could be \
     swapped out. Raise the limit (systemd: LimitMEMLOCK=, shell: ulimit -l), run as root, or \
     set {ALLOW_UNLOCKED_ENV}=1 to accept swappable key pages"
)]
pub struct KeyMemoryError {
    source: io::Error,
    limit: String,
}

impl kvcrypt_exit::ExitClass for KeyMemoryError {
    fn exit_class(&self) -> kvcrypt_exit::Exit {
        kvcrypt_exit::Exit::KeyMemory
    }
}

/// Checks, before a process takes any key, that key memory can be had as it must be: what
/// backs it, or why it is refused (see [`ALLOW_UNLOCKED_ENV`]).
pub fn check_key_memory() -> Result<Backing, KeyMemoryError> {
    match SecretPages::try_new(1) {
        Ok(p) => Ok(p.backing()),
        Err(PagesError::Lock(source)) | Err(PagesError::Map(source)) => {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into the valid rlimit struct we pass.
            let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
                if lim.rlim_cur == libc::RLIM_INFINITY {
                    "unlimited".to_owned()
                } else {
                    format!("{} bytes", lim.rlim_cur)
                }
            } else {
                "unknown".to_owned()
            };
            Err(KeyMemoryError { source, limit })
        }
    }
}

/// Makes the process non-dumpable (no core files, no ptrace attach or `/proc/PID/mem` by
/// non-root) and sets RLIMIT_CORE to 0. Call early in every process that holds keys.
pub fn harden_process() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
