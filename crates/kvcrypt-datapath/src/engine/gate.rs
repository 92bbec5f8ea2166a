//! The key gate: holds the expanded cipher, counts requests in flight, and parks new requests
//! while the volume is suspended (revocation / `kvcrypt lock`).
//!
//! A request enters the gate (getting a shared handle to the cipher), runs, and leaves. Suspend
//! marks the gate closed for new entries, waits for every request in flight to leave, and then
//! drops the cipher — the expanded AES keys are zeroized by `XtsCipher`'s `Drop`. Requests that
//! arrive while suspended sleep on a condvar until resume or shutdown: they wait, they never fail.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kvcrypt_crypto::XtsCipher;

#[derive(Default)]
struct State {
    cipher: Option<Arc<XtsCipher>>,
    suspended: bool,
    shutdown: bool,
    inflight: usize,
    /// Requests currently parked because the volume is suspended (for status/tests).
    parked: usize,
}

/// Why [`Gate::try_enter`] did not admit a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Suspended,
    ShutDown,
}

pub struct Gate {
    state: Mutex<State>,
    cv: Condvar,
}

/// Proof that a request is in flight; leaving the gate happens on drop.
pub struct Ticket<'a> {
    gate: &'a Gate,
    cipher: Option<Arc<XtsCipher>>,
}

impl Ticket<'_> {
    pub fn cipher(&self) -> &XtsCipher {
        self.cipher
            .as_deref()
            .expect("ticket holds a cipher until dropped")
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Drop our handle to the cipher before announcing we left, so that suspend() holds the
        // last reference and its drop really wipes the keys.
        self.cipher = None;
        let mut st = self.gate.lock();
        st.inflight -= 1;
        // Only suspend() waits for the drain, and it sets `suspended` first (under the lock).
        // Notifying otherwise would cost a futex syscall per request.
        if st.inflight == 0 && st.suspended {
            self.gate.cv.notify_all();
        }
    }
}

impl Gate {
    pub fn new(cipher: XtsCipher) -> Gate {
        Gate {
            state: Mutex::new(State {
                cipher: Some(Arc::new(cipher)),
                ..State::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this small lock leaves the counters consistent; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters the gate, waiting while suspended. `None` once the engine shuts down.
    pub fn enter(&self) -> Option<Ticket<'_>> {
        let mut st = self.lock();
        let mut counted = false;
        while st.suspended && !st.shutdown {
            if !counted {
                st.parked += 1;
                counted = true;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if counted {
            st.parked -= 1;
        }
        if st.shutdown {
            return None;
        }
        let cipher = st.cipher.clone()?;
        st.inflight += 1;
        Some(Ticket {
            gate: self,
            cipher: Some(cipher),
        })
    }

    /// Enters the gate without waiting (event-loop transports, see `engine::split`).
    pub fn try_enter(&self) -> Result<Ticket<'_>, Closed> {
        let mut st = self.lock();
        if st.shutdown {
            return Err(Closed::ShutDown);
        }
        if st.suspended {
            return Err(Closed::Suspended);
        }
        let cipher = st.cipher.clone().ok_or(Closed::Suspended)?;
        st.inflight += 1;
        Ok(Ticket {
            gate: self,
            cipher: Some(cipher),
        })
    }

    /// Waits, without entering, until the gate is open again; counts `waiting` parked requests
    /// meanwhile. False once shut down.
    pub fn wait_resumed(&self, waiting: usize) -> bool {
        let mut st = self.lock();
        st.parked += waiting;
        while st.suspended && !st.shutdown {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= waiting;
        !st.shutdown
    }

    /// Stops admitting requests and waits for those in flight; then runs `before_wipe` (the
    /// engine flushes the backing store there) and drops the cipher.
    pub fn suspend<E>(&self, before_wipe: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut st = self.lock();
        st.suspended = true;
        while st.inflight > 0 {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        // Flush without holding the lock would let nothing in anyway (suspended is set), but
        // keeping it makes resume() wait for the flush to finish, which is what we want.
        let r = before_wipe();
        st.cipher = None;
        r
    }

    /// Installs a (new) cipher and wakes every parked request.
    pub fn resume(&self, cipher: XtsCipher) {
        let mut st = self.lock();
        st.cipher = Some(Arc::new(cipher));
        st.suspended = false;
        self.cv.notify_all();
    }

    /// Fails every parked and future request (used when the device is being removed).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        self.cv.notify_all();
    }

    pub fn is_suspended(&self) -> bool {
        self.lock().suspended
    }

    /// Number of requests currently waiting for resume.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }
}
