//! `secmem::harden_process` really makes this (test) process non-dumpable with no core files.
//! Its own test binary, because the settings are process-wide.

#[test]
fn harden_process_disables_dumps_and_core_files() {
    kvcrypt_crypto::secmem::harden_process().expect("harden_process");
    // SAFETY: prctl(PR_GET_DUMPABLE) and getrlimit only read process attributes.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    assert_eq!(dumpable, 0, "process must not be dumpable");
    let mut lim = libc::rlimit {
        rlim_cur: 1,
        rlim_max: 1,
    };
    // SAFETY: getrlimit writes only into `lim`, a valid rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
    assert_eq!(rc, 0);
    assert_eq!(
        (lim.rlim_cur, lim.rlim_max),
        (0, 0),
        "RLIMIT_CORE must be 0"
    );
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    assert!(status.contains("CoreDumping:\t0"), "{status}");
}

#[test]
fn secret_pages_are_excluded_from_core_dumps() {
    // VM_DONTDUMP shows as "dd" in /proc/self/smaps VmFlags.
    let key = kvcrypt_crypto::secmem::VolumeKey::from_slice(&[3u8; 64]).expect("64 bytes");
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let start = format!("{:x}-", key.address());
    let block: Vec<&str> = smaps
        .split('\n')
        .skip_while(|l| !l.starts_with(&start))
        .take_while(|l| !l.starts_with("VmFlags"))
        .collect();
    assert!(!block.is_empty(), "mapping of the key not found");
    let flags = smaps
        .split('\n')
        .skip_while(|l| !l.starts_with(&start))
        .find(|l| l.starts_with("VmFlags"))
        .expect("VmFlags line");
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    // Locked: memfd_secret pages are unevictable; the mlock fallback shows "lo".
    let secretmem = block[0].contains("secretmem");
    assert!(
        secretmem || flags.split_whitespace().any(|f| f == "lo"),
        "{}: {flags}",
        block[0]
    );
}

/// Issue: when `mlock` failed (RLIMIT_MEMLOCK) key pages silently fell back to unlocked,
/// swappable memory. A process that would hold keys now refuses to start (exit 16, a message
/// naming the limit) unless swappable key pages are explicitly allowed.
#[test]
fn key_memory_that_cannot_be_locked_is_refused_unless_allowed() {
    if !kvcrypt_testkit::env::is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the tests as root"
        );
        eprintln!("skipped: needs root to drop to an unprivileged user with RLIMIT_MEMLOCK=0");
        return;
    }
    let exe = env!("CARGO_BIN_EXE_kvcrypt");
    // As nobody (no CAP_IPC_LOCK) with a zero memlock limit, neither memfd_secret pages nor
    // mlock are possible. `open` of a missing device would fail later for other reasons.
    let run = |allow: bool| {
        let mut c = std::process::Command::new("prlimit");
        c.args(["--memlock=0:0", "setpriv", "--reuid=65534", "--regid=65534"])
            .args([
                "--clear-groups",
                "--",
                exe,
                "open",
                "/nonexistent/disk",
                "t",
                "--no-access-checks",
            ])
            .env_remove(kvcrypt_crypto::secmem::ALLOW_UNLOCKED_ENV);
        if allow {
            c.env(kvcrypt_crypto::secmem::ALLOW_UNLOCKED_ENV, "1");
        }
        c.output().expect("run kvcrypt under prlimit/setpriv")
    };
    let refused = run(false);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(16), "{err}");
    assert!(
        err.contains("cannot lock key memory") && err.contains("RLIMIT_MEMLOCK is 0 bytes"),
        "{err}"
    );
    let allowed = run(true);
    let err = String::from_utf8_lossy(&allowed.stderr);
    assert_ne!(allowed.status.code(), Some(16), "{err}");
    assert!(!err.contains("cannot lock key memory"), "{err}");
}
