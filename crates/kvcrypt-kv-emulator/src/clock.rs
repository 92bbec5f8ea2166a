//! The emulator's clock: wall-clock time plus an offset that tests move forward through the
//! admin interface, so months of key lifetime (rotation, expiry) pass in milliseconds.
//!
//! Everything about keys — `created`, `updated`, `exp`/`nbf` checks, deletion dates,
//! rotation — reads this clock. Access tokens do not: clients cache them by their *own*
//! clock, so an emulated jump would make every cached token look expired to the vault while
//! the client still believes it is valid, and no SDK recovers from that.

use serde::Serialize;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug, Default)]
pub struct Clock {
    offset: AtomicI64,
}

impl Clock {
    pub fn new(offset: i64) -> Clock {
        Clock {
            offset: AtomicI64::new(offset),
        }
    }

    /// Emulated Unix time in seconds.
    pub fn now(&self) -> i64 {
        super::model::now() + self.offset()
    }

    pub fn offset(&self) -> i64 {
        self.offset.load(Ordering::SeqCst)
    }

    pub fn set_offset(&self, offset: i64) {
        self.offset.store(offset, Ordering::SeqCst);
    }
}

/// The clock as the admin interface reports it (`GET`/`POST /_admin/clock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ClockInfo {
    /// Emulated Unix time in seconds.
    pub now: i64,
    /// How far the emulated clock is ahead of the wall clock.
    pub offset_seconds: i64,
    /// Key versions the automatic rotation created while answering (oldest first).
    #[serde(default)]
    pub rotated: Vec<RotatedKey>,
}

/// A key version created by a rotation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RotatedKey {
    pub name: String,
    pub version: String,
    /// Emulated time the version was created at (its policy's trigger time).
    pub created: i64,
}

#[cfg(test)]
mod tests {
    use super::Clock;

    #[test]
    fn offset_moves_now() {
        let c = Clock::new(0);
        let before = c.now();
        c.set_offset(86_400);
        assert!(c.now() - before >= 86_400);
        assert_eq!(c.offset(), 86_400);
    }
}
