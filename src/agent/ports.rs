//! What the agent's state machine needs from the outside world, as one trait.
//!
//! The real implementation (`host_platform.rs`) talks to Key Vault, the header code, the worker
//! processes and the kernel; unit tests drive the state machine with a fake. Keeping every
//! side effect behind this trait is what makes the revocation logic testable without root.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use kvcrypt_crypto::secmem::VolumeKey;

use super::config::{Selector, VaultConfig, VolumeSettings};

/// Class of a failed Key Vault call, as the agent acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessClass {
    /// Access revoked (permission removed, key disabled/deleted, firewall, identity deleted).
    Denied,
    /// Vault unreachable or failing for now (network, 5xx, 429, timeout).
    Transient,
    /// Local setup is wrong (credentials, key id, header); retrying will not fix it.
    Misconfigured,
    /// The header names no key the configuration pins for the volume (or nothing is pinned):
    /// refused before any request. A configuration matter, never a revocation.
    #[serde(rename = "not-pinned")]
    NotPinned,
}

/// The key provider's own classification of a failed call. `AccessClass` is a separate type
/// because it also holds what the agent decides before any call (`NotPinned`) and is what the
/// status reports; every provider class maps to one access class.
impl From<kvcrypt_keyvault::ErrorClass> for AccessClass {
    fn from(c: kvcrypt_keyvault::ErrorClass) -> Self {
        match c {
            kvcrypt_keyvault::ErrorClass::Denied => AccessClass::Denied,
            kvcrypt_keyvault::ErrorClass::Transient => AccessClass::Transient,
            kvcrypt_keyvault::ErrorClass::Misconfigured => AccessClass::Misconfigured,
        }
    }
}

impl std::fmt::Display for AccessClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessClass::Denied => "denied",
            AccessClass::Transient => "transient",
            AccessClass::Misconfigured => "misconfigured",
            AccessClass::NotPinned => "not pinned",
        })
    }
}

/// A classified failure with an operator-readable message (never key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessError {
    pub class: AccessClass,
    pub message: String,
}

impl AccessError {
    pub fn new(class: AccessClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

/// What kind of platform operation failed, as far as the state machine and the operator can
/// tell; the message says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformFailure {
    /// A worker could not be started, or did not report ready.
    WorkerStart,
    /// A worker did not answer its control socket in time, or answered with an error.
    WorkerControl,
    /// Ending a wedged worker by SIGKILL failed.
    WorkerKill,
    /// A kernel device operation (deleting a ublk device) failed.
    Device,
    /// Rewriting a damaged header copy failed.
    HeaderWrite,
    /// The configured hook failed or timed out.
    Hook,
    /// A `[vault]` section that cannot be used (reload).
    VaultConfig,
    /// The agent's own machinery failed (a blocking helper task panicked).
    Internal,
}

/// A failed platform operation: its kind and an operator-readable message (never key
/// material). Displays as the message alone, which is what the logs and replies quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlatformError {
    pub failure: PlatformFailure,
    pub message: String,
}

impl PlatformError {
    pub fn new(failure: PlatformFailure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }
}

/// One key slot as the agent uses it: enough to call unwrapKey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRef {
    pub key_id: String,
    pub algorithm: String,
    pub wrapped: Vec<u8>,
    /// Format v2: the wrapped access-check secret. Periodic checks unwrap this instead of the
    /// volume key, so the VMK never passes through the agent's HTTP stack except to unlock or
    /// resume. `None` for slots of older volumes (checks then unwrap the VMK).
    pub check: Option<Vec<u8>>,
    /// Split policies (`all`, `k-of-n`): the Shamir share this slot wraps (its x coordinate);
    /// `wrapped` is then that share, not the VMK. `None` under policy `any`.
    pub share: Option<u8>,
}

/// A pinned key's current version, as rotation following last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyView {
    /// The versionless key (`https://VAULT/keys/NAME`).
    pub key: String,
    /// The versioned id of its current version.
    pub current: String,
    pub enabled: bool,
    /// `exp` of the current version (Unix seconds).
    #[serde(default)]
    pub expires: Option<i64>,
    /// When Key Vault's rotation policy rotates the key next (Unix seconds), when the policy
    /// could be read (it needs the `getrotationpolicy` permission) and has a `Rotate` action.
    #[serde(default)]
    pub next_rotation: Option<i64>,
}

impl KeyView {
    pub fn of(key: &str, info: &kvcrypt_keyvault::KeyVersionInfo) -> Self {
        Self {
            key: key.to_owned(),
            current: info.key_id.clone(),
            enabled: info.enabled,
            expires: info.expires,
            next_rotation: None,
        }
    }
}

/// What one round of rotation following found and did (never key material).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// The new header's slots, when a new header was written (filled in by the shell).
    pub slots: Option<Vec<SlotRef>>,
    /// Slots added: (slot id, versioned key id), each verified by unwrapping it again.
    pub added: Vec<(u32, String)>,
    /// Slots of older key versions removed after `rotation_grace`.
    pub pruned: Vec<(u32, String)>,
    /// Every pinned key's current version.
    pub keys: Vec<KeyView>,
    /// Versioned key ids whose slot unwrapped and passed the key check in this round.
    pub verified: Vec<String>,
    /// What did not work (lookups, wraps, verifications); the volume keeps serving.
    pub problems: Vec<String>,
}

/// A round of rotation following: the new header (already written to both copies), if any.
pub struct Rotation<H> {
    pub header: Option<H>,
    pub report: RotationReport,
}

/// A device being served by a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The encrypted backing device or file.
    pub backing: PathBuf,
    /// The plaintext block device (`/dev/loopN`, `/dev/ublkbN`).
    pub block_device: PathBuf,
    /// The worker is currently suspended (only meaningful when adopting).
    pub suspended: bool,
    /// ublk device id (`None` for FUSE). A ublk worker ends on suspend and leaves the device
    /// QUIESCED with its I/O held; resume starts a new worker that recovers this device.
    pub ublk_dev_id: Option<u32>,
    /// Only from `adopt`: the worker is dead but left a FUSE connection the platform holds
    /// (its I/O waits): a new worker is to take it over in place.
    pub worker_dead: bool,
    /// Only from `spawn`: the new worker took over the dead worker's device in place (FUSE:
    /// the same loop device and connection, unanswered requests resent).
    pub in_place: bool,
}

impl Served {
    /// A device served by a live worker, nothing recovered.
    pub fn new(backing: PathBuf, block_device: PathBuf) -> Served {
        Served {
            backing,
            block_device,
            suspended: false,
            ublk_dev_id: None,
            worker_dead: false,
            in_place: false,
        }
    }
}

/// Resolves when a watched worker process has ended, with a short description for the log
/// (pid, how it was noticed). Boxed and `'static` so the volume task can keep it across
/// iterations of its select loop.
pub type WorkerExit = Pin<Box<dyn Future<Output = String> + Send + 'static>>;

/// Everything with side effects, as three ports by concern: [`KeyPort`], [`WorkerPort`],
/// [`HostPort`]. The volume shell takes any `P: Platform`; whatever implements all three is
/// one. Blocking work must be moved off the runtime by the implementation (the shell awaits
/// these on tokio).
pub trait Platform: KeyPort + WorkerPort + HostPort {}

impl<T: KeyPort + WorkerPort + HostPort> Platform for T {}

/// The volume's header and its keys: reading and repairing the header, and what the agent asks
/// of the key provider (through `kvcrypt_keyvault::KeyProvider` on the host, see `access.rs`).
pub trait KeyPort: Send + Sync + 'static {
    /// A parsed, self-verified header.
    type Header: Send + Sync + 'static;

    /// Reads the header of `dev`.
    fn read_header(
        &self,
        dev: &Path,
    ) -> impl Future<Output = Result<Self::Header, AccessError>> + Send;

    /// Key slots of a header, in the order to try them.
    fn slots(&self, h: &Self::Header) -> Vec<SlotRef>;

    /// Checks an unwrapped key against the header's key-check digest.
    fn verify_key(&self, h: &Self::Header, key: &VolumeKey) -> Result<(), AccessError>;

    /// unwrapKey (the call revocation takes away).
    fn unwrap_key(
        &self,
        slot: &SlotRef,
    ) -> impl Future<Output = Result<VolumeKey, AccessError>> + Send;

    /// Proves access with `slot` without the volume key: unwrapKey of the slot's access-check
    /// secret, verified against the header (the same key and permission as the VMK, so
    /// revocation takes it away just the same). A slot without one (a volume formatted before
    /// format v2) falls back to unwrapping the VMK and checking it.
    fn check_slot(
        &self,
        h: &Self::Header,
        slot: &SlotRef,
    ) -> impl Future<Output = Result<(), AccessError>> + Send;

    /// How many distinct shares an unlock or an access check needs: 1 under policy `any`
    /// (every slot wraps the whole volume key), the threshold under `all` / `k-of-n`.
    fn threshold(&self, h: &Self::Header) -> usize {
        let _ = h;
        1
    }

    /// Split policies: the volume key rebuilt from unwrapped shares (x coordinate, share),
    /// verified against the header's key check and MAC.
    fn combine_shares(
        &self,
        h: &Self::Header,
        shares: &[(u8, VolumeKey)],
    ) -> Result<VolumeKey, AccessError> {
        let _ = (h, shares);
        Err(AccessError::new(
            AccessClass::Misconfigured,
            "this platform does not combine key shares",
        ))
    }

    /// Rewrites both header copies of `dev` from `h` when the other copy is damaged or stale
    /// (the winning copy was just proved authentic by the key check and MAC). `Ok(None)`:
    /// nothing to repair; `Ok(Some(what))`: repaired, `what` says what was wrong.
    fn repair_header(
        &self,
        dev: &Path,
        h: &Self::Header,
    ) -> impl Future<Output = Result<Option<String>, PlatformError>> + Send;

    /// Rotation following: looks up each pinned key's current version; when one has no slot,
    /// adds a verified slot for it, and once such a slot is `rotation_grace` old removes the
    /// older versions' slots; a changed header is sealed and written to both copies of `dev`
    /// (crash-safe order) and read back. Failures of lookups or wraps are reported, not
    /// errors: only a header that could not be written is.
    fn follow_rotation(
        &self,
        dev: &Path,
        h: &Self::Header,
        settings: &VolumeSettings,
    ) -> impl Future<Output = Result<Rotation<Self::Header>, PlatformError>> + Send;

    /// Reload: builds a new key provider from `vault` (validation, credential files) and,
    /// only if that succeeds, uses it for every later Key Vault call. On error nothing
    /// changes. Platforms without a vault client accept anything.
    fn reload_vault(&self, vault: &VaultConfig) -> Result<(), PlatformError> {
        let _ = vault;
        Ok(())
    }
}

/// The worker processes and the kernel devices they serve.
pub trait WorkerPort: Send + Sync + 'static {
    /// Ends the worker of `name` with SIGKILL sent through a pidfd and waits until the pidfd
    /// reports its exit, so its key pages are gone: the last resort when a suspend fails or
    /// times out (a wedged worker must not keep the key). `Ok` describes what was done.
    fn kill_worker(&self, name: &str)
    -> impl Future<Output = Result<String, PlatformError>> + Send;

    /// Starts a worker serving `dev` as `settings.name`; with `recover_dev_id` it re-attaches
    /// that QUIESCED ublk device (ublk resume) instead of adding a new device. When the
    /// platform holds a dead FUSE worker's connection ([`fuse_held`](Self::fuse_held)) the new
    /// worker takes it over in place (`Served::in_place`); if that fails the platform lets go
    /// of the connection and opens a new device, saying why in its log.
    fn spawn(
        &self,
        settings: &VolumeSettings,
        dev: &Path,
        key: &VolumeKey,
        recover_dev_id: Option<u32>,
    ) -> impl Future<Output = Result<Served, PlatformError>> + Send;

    /// Finds a worker left running by a previous agent (or, for ublk, a device left QUIESCED
    /// by a worker that exited on suspend: reported as suspended, with its device id).
    fn adopt(&self, name: &str) -> impl Future<Output = Option<Served>> + Send;

    /// Worker status (I/O counters etc.); an error means the worker is gone.
    fn worker_status(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<serde_json::Value, PlatformError>> + Send;

    /// Watches the worker now serving `name`: the future resolves as soon as that process
    /// ends (crash, SIGKILL, or its own exit). It never resolves if the worker cannot be
    /// watched; the periodic status check still notices a dead worker then.
    fn watch_worker(&self, name: &str) -> WorkerExit;

    /// Whether ublk device `dev_id`, whose worker died, can still be recovered (QUIESCED, or
    /// LIVE with a dead server the kernel has not noticed yet). False once it was removed.
    fn ublk_recoverable(&self, dev_id: u32) -> impl Future<Output = bool> + Send;

    /// Clears what a dead worker of `name` left behind that would stand in the way of a new
    /// one: its stale state file and socket and, for FUSE, the loop device still bound to the
    /// dead FUSE file (whose I/O now fails). Returns a note for the log.
    fn clean_dead_worker(&self, name: &str, served: &Served)
    -> impl Future<Output = String> + Send;

    /// Whether the platform holds the FUSE connection of `name`'s worker (duplicates of its
    /// /dev/fuse descriptors), so that the worker's death fails no I/O and a new worker can
    /// take the same device over in place.
    fn fuse_held(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// Lets go of a dead FUSE worker's held connection because no worker will take it over
    /// (revocation, lock, removal, a vanished disk): its held I/O fails and the loop device is
    /// detached, as when nothing was held. Returns a note for the log.
    fn release_fuse(&self, name: &str, served: &Served) -> impl Future<Output = String> + Send {
        let _ = (name, served);
        std::future::ready(String::new())
    }

    /// Wipes the worker's key; new I/O waits.
    fn suspend(&self, name: &str) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// Gives a suspended FUSE worker its key back; held I/O proceeds. (ublk workers are
    /// gone after suspend: the state machine resumes them with `spawn(.., Some(id))`.)
    fn resume(
        &self,
        name: &str,
        key: &VolumeKey,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// Flushes, removes the device, ends the worker. Without `force` a device in use (or a
    /// suspended one) stays; with `force` it is removed anyway (revocation: the data must go).
    fn close(
        &self,
        name: &str,
        force: bool,
    ) -> impl Future<Output = Result<(), CloseFailed>> + Send;

    /// Stops and deletes ublk device `dev_id` of volume `name` with no worker serving it (a
    /// suspended ublk volume's device sits QUIESCED after its worker exited; removal must
    /// still remove it).
    fn delete_ublk_device(
        &self,
        name: &str,
        dev_id: u32,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
}

/// The rest of the host: finding disks, the filesystems on a served device, the hook, what an
/// agent restart must remember, and whether the whole system is stopping.
pub trait HostPort: Send + Sync + 'static {
    /// Handles of frozen filesystems (kept open so a lazily unmounted one can still be thawed).
    type Frozen: Send + 'static;

    /// Finds the device a selector names, if present now.
    fn locate(&self, sel: &Selector) -> impl Future<Output = Option<PathBuf>> + Send;

    /// FIFREEZE every filesystem mounted on `block_device`.
    fn freeze(&self, block_device: &Path) -> impl Future<Output = Self::Frozen> + Send;

    /// FITHAW what `freeze` froze (or, with `None`, every filesystem on the device: after an
    /// agent restart the handles are gone).
    fn thaw(
        &self,
        block_device: &Path,
        frozen: Option<Self::Frozen>,
    ) -> impl Future<Output = ()> + Send;

    /// Records (`Some(reason)`) or clears (`None`) that the operator locked or closed volume
    /// `name`, so that a restarted agent keeps it that way until `kvcrypt unlock`.
    fn remember_manual(&self, name: &str, reason: Option<&str>) {
        let _ = (name, reason);
    }

    /// What [`remember_manual`](Self::remember_manual) recorded for `name`, if anything.
    fn manual_lock(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }

    /// Whether the whole system is shutting down (poweroff, reboot) rather than the agent
    /// alone being stopped or restarted. Platforms that cannot tell say no.
    fn system_stopping(&self) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }

    /// Runs the configured hook (with its timeout) before a device is removed.
    fn run_hook(
        &self,
        settings: &VolumeSettings,
        block_device: &Path,
        reason: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
}

/// Why a worker did not close. `busy`: the device is mounted or held open (the operator must
/// unmount it first); otherwise something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFailed {
    pub busy: bool,
    pub message: String,
}

impl std::fmt::Display for CloseFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for CloseFailed {
    fn from(message: String) -> Self {
        CloseFailed {
            busy: false,
            message,
        }
    }
}

impl From<PlatformError> for CloseFailed {
    fn from(e: PlatformError) -> Self {
        e.message.into()
    }
}

impl From<&str> for CloseFailed {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}
