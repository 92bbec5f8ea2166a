//! Where logs go: journald when our stderr is the journal stream, stderr otherwise.

use std::os::unix::fs::MetadataExt;

/// True when `$JOURNAL_STREAM` (`DEV:INODE`) names our stderr, as systemd sets it for services
/// whose output goes to the journal (sd_journal_stream_fd(3) recommends this check: the
/// variable is inherited by children whose stderr may have been redirected).
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}
