//! On-disk volume header, format v1 to v4 (docs/FORMAT.md is the normative description).
//!
//! Two copies of the header live in the first MiB of the device (primary at 0, secondary at
//! 512 KiB). Each is a 4096-byte binary block followed by a JSON metadata area with the key
//! slots, the key-check digest and the header MAC. The valid copy with the higher sequence
//! number wins; a damaged copy is reported and rewritten by the next write.
//!
//! This crate does no I/O: it works on bytes (the header area as read from a device or a
//! backup file) and on values, so the fuzz target depends on it alone. Reading and writing a
//! device or image file, in the order [`plan_write`] gives, is `kvcrypt-header-io`'s job
//! (`kvcrypt_header_io::read`, `write`, `backup`, `restore`, ...); `tests/architecture.rs`
//! keeps this crate free of file, process and network access.
//!
//! Submodules: `layout` (bytes), `metadata` (JSON), `auth` (key check, MAC), `copies` (the
//! two-copy rules: [`parse_image`], [`plan_write`]), `recovery` (the customer-held recovery
//! slot of format v3), `policy` (split slot policies of format v4: `all`, `k-of-n`).

// This crate needs no `unsafe`; the compiler keeps it that way.
#![forbid(unsafe_code)]

mod auth;
mod copies;
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
mod metadata;
pub mod policy;
pub mod recovery;

use std::path::PathBuf;

use kvcrypt_crypto::kdf;
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_exit::{Exit, ExitClass};

pub use copies::{CopyWrite, ProbeInfo, WritePlan, check_device_size, parse_image, plan_write};
pub use policy::SlotPolicy;
pub use recovery::PROVIDER_RECOVERY;

/// The provider name of Azure Key Vault / Managed HSM key slots.
pub const PROVIDER_AZURE: &str = "azure-keyvault";

/// One wrapped copy of the volume master key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub id: u32,
    /// Who can unwrap it (`azure-keyvault`, or `recovery-rsa` for the customer-held recovery
    /// slot of format v3).
    pub provider: String,
    /// Full, versioned key id: `https://VAULT/keys/NAME/VERSION` (recovery slot: the public
    /// key's fingerprint `sha256:HEX`).
    pub key_id: String,
    /// Wrap algorithm (`RSA-OAEP-256`, `RSA-OAEP`, `A256KW`, `CKM_AES_KEY_WRAP`; recovery
    /// slot: `RSA-OAEP-256`).
    pub algorithm: String,
    /// The wrapped VMK as returned by the provider (base64 in the JSON).
    pub wrapped: Vec<u8>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Format v2: the access-check secret wrapped by the same key (`None` in v1 headers and
    /// for slots added before the volume became v2). Access checks unwrap this, never the VMK.
    pub check: Option<Vec<u8>>,
    /// Format v4 (split policy): the x-coordinate (1..=255) of the Shamir share of the VMK this
    /// slot wraps — `wrapped` is then the share, not the VMK. `Some` exactly on every Key Vault
    /// slot of a split header (several slots may carry the same x: one share wrapped by two
    /// versions of a key after a rotation); `None` otherwise and on the recovery slot.
    pub share: Option<u8>,
}

impl std::fmt::Debug for KeySlot {
    // Wrapped bytes are not secret, but they are long; print their length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("key_id", &self.key_id)
            .field("algorithm", &self.algorithm)
            .field("wrapped_len", &self.wrapped.len())
            .field("created_at", &self.created_at)
            .field("check", &self.check.is_some())
            .field("share", &self.share)
            .finish()
    }
}

/// The decoded volume header (one copy's content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    /// Format version of this header: [`layout::VERSION_1`], [`layout::VERSION_2`],
    /// [`layout::VERSION_3`] (v2 with a recovery slot) or [`layout::VERSION_4`] (split policy).
    pub version: u16,
    pub uuid: uuid::Uuid,
    /// At most 47 bytes of UTF-8, no NUL.
    pub label: String,
    /// Always `aes-xts-plain64` in v1.
    pub cipher: String,
    /// Always 512 in v1 (two AES-256 keys).
    pub key_bits: u32,
    /// Encryption sector size: 4096 or 512.
    pub sector_size: u32,
    /// Byte offset of the data area (multiple of 1 MiB, at least 1 MiB).
    pub data_offset: u64,
    /// Byte length of the data area (multiple of `sector_size`).
    pub data_length: u64,
    /// Incremented by every header write (`kvcrypt_header_io::write`, see [`plan_write`]).
    pub sequence: u64,
    pub slots: Vec<KeySlot>,
    /// How many slots it takes to unlock (format v4 for `All` / `KOfN`; `Any` before). Every
    /// Key Vault slot of a split header carries a `share`. MAC-covered: re-seal after a change.
    pub policy: SlotPolicy,
    key_check: [u8; 32],
    /// Format v2: digest of the access-check secret (`None` exactly in v1 headers).
    access_check: Option<[u8; 32]>,
    mac: [u8; 32],
}

/// Which of the two header copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderCopy {
    Primary,
    Secondary,
}

impl HeaderCopy {
    pub const BOTH: [HeaderCopy; 2] = [HeaderCopy::Primary, HeaderCopy::Secondary];
    pub fn index(self) -> usize {
        match self {
            HeaderCopy::Primary => 0,
            HeaderCopy::Secondary => 1,
        }
    }
    pub fn offset(self) -> u64 {
        layout::COPY_OFFSETS[self.index()]
    }
}

impl std::fmt::Display for HeaderCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderCopy::Primary => write!(f, "primary header (offset 0)"),
            HeaderCopy::Secondary => write!(f, "secondary header (offset {})", layout::COPY_SIZE),
        }
    }
}

/// A copy that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedCopy {
    pub copy: HeaderCopy,
    pub reason: String,
}

/// Result of `kvcrypt_header_io::read`: the winning header plus what was found about the copies.
#[derive(Debug, Clone)]
pub struct LoadedHeader {
    pub header: VolumeHeader,
    /// The copy the header was taken from.
    pub used: HeaderCopy,
    /// Copies that are damaged (or stale, i.e. valid with a lower sequence number). Repaired by
    /// the next write.
    pub damaged: Vec<DamagedCopy>,
    /// Size of the device in bytes.
    pub device_size: u64,
}

impl LoadedHeader {
    /// Bytes missing at the end of the device (the data area runs past it), or `None` if the
    /// device is large enough. Only `kvcrypt_header_io::read_header_only` returns such headers.
    pub fn missing_bytes(&self) -> Option<u64> {
        let needed = self
            .header
            .data_offset
            .saturating_add(self.header.data_length);
        (self.device_size < needed).then(|| needed - self.device_size)
    }
}

impl std::ops::Deref for LoadedHeader {
    type Target = VolumeHeader;
    fn deref(&self) -> &VolumeHeader {
        &self.header
    }
}

impl std::ops::DerefMut for LoadedHeader {
    fn deref_mut(&mut self) -> &mut VolumeHeader {
        &mut self.header
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{path}: not a kvcrypt volume (no kvcrypt header in either header copy)")]
    NotKvcrypt { path: PathBuf },
    #[error(
        "{path}: device too small: {size} bytes, need at least {needed} bytes \
         (1 MiB header area + the data area)"
    )]
    DeviceTooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error(
        "{path}: both header copies are damaged (primary: {primary}; secondary: {secondary}); \
         restore the header from a backup with `kvcrypt header restore {path} BACKUP_FILE`"
    )]
    BothCopiesCorrupt {
        path: PathBuf,
        primary: String,
        secondary: String,
    },
    #[error(
        "{path}: unsupported kvcrypt header version {version} (this kvcrypt understands versions \
         1 to {supported}); use a newer kvcrypt"
    )]
    UnsupportedVersion {
        path: PathBuf,
        version: u16,
        supported: u16,
    },
    #[error(
        "{path}: header metadata is truncated ({reason}); the device or image was cut short — \
         restore the header with `kvcrypt header restore {path} BACKUP_FILE`"
    )]
    TruncatedMetadata { path: PathBuf, reason: String },
    #[error(
        "the key does not match the volume's key check (wrong key, wrong key version or a slot \
         of another volume)"
    )]
    WrongKey,
    #[error(
        "header MAC mismatch: the header was modified by someone without the volume key \
         (tampered); do not use it — restore the header from a trusted backup"
    )]
    Tampered,
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid header: {0}")]
    Invalid(String),
}

impl ExitClass for HeaderError {
    fn exit_class(&self) -> Exit {
        match self {
            HeaderError::NotKvcrypt { .. } => Exit::NotKvcrypt,
            HeaderError::DeviceTooSmall { .. } => Exit::Device,
            HeaderError::BothCopiesCorrupt { .. }
            | HeaderError::UnsupportedVersion { .. }
            | HeaderError::TruncatedMetadata { .. }
            | HeaderError::Tampered => Exit::HeaderInvalid,
            HeaderError::WrongKey => Exit::WrongKey,
            HeaderError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Exit::NotFound,
                std::io::ErrorKind::PermissionDenied => Exit::Permission,
                _ => Exit::Device,
            },
            HeaderError::Invalid(_) => Exit::Usage,
        }
    }
}

/// Encodes `h` as a complete header-area image (both copies, 1 MiB) with `sequence`, exactly
/// as a header write puts it on disk. For tests, fuzzing and tools that build images offline.
pub fn encode_image(h: &VolumeHeader, sequence: u64) -> Result<Vec<u8>, HeaderError> {
    let mut image = Vec::with_capacity(layout::HEADER_AREA_SIZE as usize);
    for c in HeaderCopy::BOTH {
        image.extend_from_slice(&h.encode_copy(c, sequence)?);
    }
    Ok(image)
}

/// Current time as RFC 3339 (UTC, seconds), for `KeySlot::created_at`.
pub fn now_rfc3339() -> String {
    use time::format_description::well_known::Rfc3339;
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

impl VolumeHeader {
    /// A fresh header for a device of `device_size` bytes: random UUID, data area from 1 MiB to
    /// the last whole sector, no key slots yet, sealed with `vmk` (key check + MAC). Add slots
    /// with [`VolumeHeader::add_slot`] and call [`VolumeHeader::seal`] again before writing it.
    pub fn new_for_device(
        device_size: u64,
        sector_size: u32,
        label: &str,
        vmk: &VolumeKey,
    ) -> Result<VolumeHeader, HeaderError> {
        let data_offset = layout::DATA_ALIGNMENT;
        let ss = u64::from(sector_size);
        let needed = data_offset + ss;
        if device_size < needed {
            return Err(HeaderError::DeviceTooSmall {
                path: PathBuf::new(),
                size: device_size,
                needed,
            });
        }
        let data_length = (device_size - data_offset) / ss * ss;
        let mut h = VolumeHeader {
            version: layout::VERSION,
            uuid: uuid::Uuid::new_v4(),
            label: label.to_string(),
            cipher: layout::CIPHER.to_string(),
            key_bits: layout::KEY_BITS,
            sector_size,
            data_offset,
            data_length,
            sequence: 0,
            slots: Vec::new(),
            policy: SlotPolicy::Any,
            key_check: [0; 32],
            access_check: None,
            mac: [0; 32],
        };
        h.validate().map_err(HeaderError::Invalid)?;
        h.seal(vmk);
        Ok(h)
    }

    /// Recomputes the key-check digest and the MAC with `vmk`. Needed after any change to a
    /// MAC-covered field (label, geometry, slots). The caller must have verified `vmk` first
    /// (sealing with a wrong key would lock the volume's real key out).
    ///
    /// Sealing writes the current format version: a v1 header becomes v2 and gains the
    /// access-check digest (its slots gain access-check slots as the caller wraps them); a
    /// header with a recovery slot is v3, and becomes v2 again when that slot is removed; a
    /// header with a split policy (`All`, `KOfN`) is v4, recovery slot or not.
    pub fn seal(&mut self, vmk: &VolumeKey) {
        self.version = policy::version_for(self.policy, &self.slots);
        self.access_check = Some(kdf::access_check_digest(kdf::access_secret(vmk).expose()));
        self.key_check = auth::key_check(vmk);
        self.mac = auth::mac(vmk, self, &self.key_check);
    }

    /// Checks an unwrapped access-check secret (from a slot's `check`) against the header's
    /// digest. A mismatch is [`HeaderError::WrongKey`]; a v1 header has nothing to check
    /// against ([`HeaderError::Invalid`]).
    pub fn verify_access_secret(&self, secret: &[u8]) -> Result<(), HeaderError> {
        match &self.access_check {
            None => Err(HeaderError::Invalid(
                "a format v1 header has no access check".into(),
            )),
            Some(d) if kdf::verify_access_check(secret, d) => Ok(()),
            Some(_) => Err(HeaderError::WrongKey),
        }
    }

    /// The stored access-check digest (format v2).
    pub fn access_check_digest(&self) -> Option<&[u8; 32]> {
        self.access_check.as_ref()
    }

    /// Checks that `vmk` is this volume's key (key-check digest → [`HeaderError::WrongKey`]) and
    /// that the header is authentic (MAC → [`HeaderError::Tampered`]).
    pub fn verify_key(&self, vmk: &VolumeKey) -> Result<(), HeaderError> {
        if !auth::verify_key_check(vmk, &self.key_check) {
            return Err(HeaderError::WrongKey);
        }
        if !auth::verify_mac(vmk, self, &self.key_check, &self.mac) {
            return Err(HeaderError::Tampered);
        }
        Ok(())
    }

    /// Adds `slot` with the next free id (the id in `slot` is ignored) and returns that id.
    /// The header must be re-sealed before it is written.
    pub fn add_slot(&mut self, mut slot: KeySlot) -> u32 {
        let id = self
            .slots
            .iter()
            .map(|s| s.id.saturating_add(1))
            .max()
            .unwrap_or(0);
        slot.id = id;
        self.slots.push(slot);
        id
    }

    /// Removes the slot `id`; refuses to remove the last slot (the volume would be unopenable),
    /// the last one that is not the recovery slot (the agent never uses the recovery slot,
    /// so the volume could only be opened by hand with the customer's private key) and, in a
    /// split header, the last slot of a share (the share would be lost for good, and with it
    /// the volume under `all`, or one share of margin under `k-of-n`).
    pub fn remove_slot(&mut self, id: u32) -> Result<KeySlot, HeaderError> {
        let pos = self
            .slots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| HeaderError::Invalid(format!("no key slot {id}")))?;
        if let Some(x) = self.slots[pos].share
            && !self.slots.iter().any(|s| s.id != id && s.share == Some(x))
        {
            return Err(HeaderError::Invalid(format!(
                "refusing to remove key slot {id}: it is the only slot holding share {x} of the                  split ({}) volume key; rewrap that share to a new key version first (`kvcrypt                  rewrap`), or re-format to change the volume's keys",
                self.policy.describe(self.share_count())
            )));
        }
        if self.slots.len() == 1 {
            return Err(HeaderError::Invalid(format!(
                "refusing to remove key slot {id}: it is the last one and the volume could never \
                 be opened again"
            )));
        }
        let others_usable = self.slots.iter().any(|s| s.id != id && !s.is_recovery());
        if !self.slots[pos].is_recovery() && !others_usable {
            return Err(HeaderError::Invalid(format!(
                "refusing to remove key slot {id}: it is the last Key Vault slot, and only the \
                 recovery slot would remain (the agent never unlocks with it); add a Key Vault \
                 slot first (`kvcrypt rewrap --key-id`)"
            )));
        }
        Ok(self.slots.remove(pos))
    }

    /// Number of distinct shares (x-coordinates) of a split header; 0 for policy `Any`.
    pub fn share_count(&self) -> usize {
        policy::share_xs(&self.slots).len()
    }

    /// The customer-held recovery slot, if the header has one (format v3).
    pub fn recovery_slot(&self) -> Option<&KeySlot> {
        self.slots.iter().find(|s| s.is_recovery())
    }

    /// The stored key-check digest.
    pub fn key_check_digest(&self) -> &[u8; 32] {
        &self.key_check
    }

    /// The stored header MAC.
    pub fn mac(&self) -> &[u8; 32] {
        &self.mac
    }

    /// Number of encryption sectors in the data area.
    pub fn sector_count(&self) -> u64 {
        self.data_length / u64::from(self.sector_size.max(1))
    }

    /// Semantic checks of v1 values; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.label.len() > layout::LABEL_MAX || self.label.as_bytes().contains(&0) {
            return Err(format!(
                "label must be at most {} bytes of UTF-8 without NUL (got {} bytes)",
                layout::LABEL_MAX,
                self.label.len()
            ));
        }
        if self.cipher != layout::CIPHER {
            return Err(format!("unsupported cipher {:?}", self.cipher));
        }
        if self.key_bits != layout::KEY_BITS {
            return Err(format!("unsupported key size {} bits", self.key_bits));
        }
        if self.sector_size != 4096 && self.sector_size != 512 {
            return Err(format!(
                "sector size {} (must be 4096 or 512)",
                self.sector_size
            ));
        }
        if self.data_offset < layout::HEADER_AREA_SIZE
            || !self.data_offset.is_multiple_of(layout::DATA_ALIGNMENT)
        {
            return Err(format!(
                "data offset {} (must be a non-zero multiple of 1 MiB)",
                self.data_offset
            ));
        }
        if self.data_length == 0 || !self.data_length.is_multiple_of(u64::from(self.sector_size)) {
            return Err(format!(
                "data length {} (must be a non-zero multiple of the sector size {})",
                self.data_length, self.sector_size
            ));
        }
        if self.data_offset.checked_add(self.data_length).is_none() {
            return Err("data area end overflows".into());
        }
        Ok(())
    }

    /// Builds one encoded copy (`COPY_SIZE` bytes) of this header. Refuses a header whose
    /// policy and shares break the rules readers apply (docs/FORMAT.md §3.3) — e.g. a whole-key
    /// slot added to a split header — since writing it would leave a volume no reader opens.
    fn encode_copy(&self, copy: HeaderCopy, sequence: u64) -> Result<Vec<u8>, HeaderError> {
        let json = policy::to_json(self.policy, &self.slots);
        policy::decode(self.version, json.as_ref(), &self.slots).map_err(|e| {
            HeaderError::Invalid(format!(
                "refusing to write a header readers would refuse: {e} (seal it after changing \
                 its slots or policy)"
            ))
        })?;
        self.encode_copy_unchecked(copy, sequence)
    }

    /// [`VolumeHeader::encode_copy`] without the policy rules (tests build refused headers).
    fn encode_copy_unchecked(
        &self,
        copy: HeaderCopy,
        sequence: u64,
    ) -> Result<Vec<u8>, HeaderError> {
        self.validate().map_err(HeaderError::Invalid)?;
        let md = metadata::encode(
            &self.slots,
            &self.key_check,
            self.access_check.as_ref(),
            &self.mac,
            policy::to_json(self.policy, &self.slots),
        );
        if md.len() as u64 > layout::MAX_METADATA_LEN {
            return Err(HeaderError::Invalid(format!(
                "metadata is {} bytes, the area holds {} (too many key slots?)",
                md.len(),
                layout::MAX_METADATA_LEN
            )));
        }
        let raw = layout::RawBinary {
            version: self.version,
            copy_index: copy.index() as u16,
            header_size: layout::BINARY_HEADER_SIZE as u32,
            sequence,
            uuid: *self.uuid.as_bytes(),
            label: layout::pad_field(&self.label)
                .ok_or_else(|| HeaderError::Invalid("label does not fit".into()))?,
            cipher: layout::pad_field(&self.cipher)
                .ok_or_else(|| HeaderError::Invalid("cipher name does not fit".into()))?,
            key_bits: self.key_bits,
            sector_size: self.sector_size,
            data_offset: self.data_offset,
            data_length: self.data_length,
            copy_offsets: layout::COPY_OFFSETS,
            copy_size: layout::COPY_SIZE,
            metadata_len: md.len() as u64,
        };
        Ok(layout::encode_copy(&raw, &md))
    }

    /// Decodes and validates the copy expected at `copy` from its bytes.
    fn decode_copy(bytes: &[u8], copy: HeaderCopy) -> Result<VolumeHeader, layout::DecodeError> {
        use layout::DecodeError::Corrupt;
        let (raw, md) = layout::decode_copy(bytes)?;
        if usize::from(raw.copy_index) != copy.index() {
            return Err(Corrupt(format!(
                "copy index {} found in the {copy}",
                raw.copy_index
            )));
        }
        if raw.header_size as usize != layout::BINARY_HEADER_SIZE
            || raw.copy_offsets != layout::COPY_OFFSETS
            || raw.copy_size != layout::COPY_SIZE
        {
            return Err(Corrupt(
                "header/copy size or copy offsets differ from v1 layout".into(),
            ));
        }
        let label = layout::text_field(&raw.label).map_err(|e| Corrupt(format!("label: {e}")))?;
        let cipher =
            layout::text_field(&raw.cipher).map_err(|e| Corrupt(format!("cipher: {e}")))?;
        let decoded = metadata::decode(md, raw.version).map_err(Corrupt)?;
        recovery::check(raw.version, &decoded.slots).map_err(Corrupt)?;
        let slot_policy = policy::decode(raw.version, decoded.policy.as_ref(), &decoded.slots)
            .map_err(Corrupt)?;
        let h = VolumeHeader {
            version: raw.version,
            uuid: uuid::Uuid::from_bytes(raw.uuid),
            label,
            cipher,
            key_bits: raw.key_bits,
            sector_size: raw.sector_size,
            data_offset: raw.data_offset,
            data_length: raw.data_length,
            sequence: raw.sequence,
            slots: decoded.slots,
            policy: slot_policy,
            key_check: decoded.key_check,
            access_check: decoded.access_check,
            mac: decoded.mac,
        };
        h.validate().map_err(Corrupt)?;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> VolumeKey {
        VolumeKey::from_slice(&[b; 64]).unwrap()
    }

    fn slot(n: u8) -> KeySlot {
        KeySlot {
            id: 99,
            provider: PROVIDER_AZURE.into(),
            key_id: format!("https://v.vault.azure.net/keys/k/{n}"),
            algorithm: "RSA-OAEP-256".into(),
            wrapped: vec![n; 256],
            created_at: "2026-01-01T00:00:00Z".into(),
            check: None,
            share: None,
        }
    }

    #[test]
    fn seal_verify_and_slot_changes() {
        let vmk = key(1);
        let mut h = VolumeHeader::new_for_device(64 << 20, 4096, "x", &vmk).unwrap();
        assert_eq!(h.data_offset, 1 << 20);
        assert_eq!(h.data_length, 63 << 20);
        assert_eq!(h.add_slot(slot(1)), 0);
        assert_eq!(h.add_slot(slot(2)), 1);
        // Slots changed without re-sealing: the MAC no longer matches.
        assert!(matches!(h.verify_key(&vmk), Err(HeaderError::Tampered)));
        h.seal(&vmk);
        h.verify_key(&vmk).unwrap();
        assert!(matches!(h.verify_key(&key(2)), Err(HeaderError::WrongKey)));
        h.remove_slot(0).unwrap();
        assert!(h.remove_slot(1).is_err(), "last slot must stay");
        assert!(h.remove_slot(7).is_err());
        assert_eq!(h.add_slot(slot(3)), 2);
    }

    /// A volume formatted before format v2: its header is written as v1 (v1 MAC input, no
    /// v2 members), so this builds one the way kvcrypt 0.1 sealed it.
    fn v1_header(vmk: &VolumeKey) -> VolumeHeader {
        let mut h = VolumeHeader::new_for_device(10 << 20, 4096, "old", vmk).unwrap();
        h.add_slot(slot(1));
        h.version = layout::VERSION_1;
        h.access_check = None;
        h.key_check = auth::key_check(vmk);
        h.mac = auth::mac(vmk, &h, &h.key_check);
        h
    }

    #[test]
    fn v1_headers_still_read_and_verify_and_become_v2_when_sealed() {
        let vmk = key(4);
        let h1 = v1_header(&vmk);
        let bytes = h1.encode_copy(HeaderCopy::Primary, 3).unwrap();
        assert_eq!(&bytes[8..10], &[1, 0], "written as version 1");
        assert!(!String::from_utf8_lossy(&bytes[4096..]).contains("access_check"));
        let back = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap();
        assert_eq!(back.version, layout::VERSION_1);
        assert!(back.access_check_digest().is_none());
        back.verify_key(&vmk).unwrap();
        let secret = kdf::access_secret(&vmk);
        assert!(matches!(
            back.verify_access_secret(secret.expose()),
            Err(HeaderError::Invalid(_))
        ));
        // The next sealing write makes it v2 with an access check.
        let mut h2 = back;
        h2.slots[0].check = Some(vec![9; 48]);
        h2.seal(&vmk);
        let bytes = h2.encode_copy(HeaderCopy::Primary, 4).unwrap();
        assert_eq!(&bytes[8..10], &[2, 0]);
        let back = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap();
        back.verify_key(&vmk).unwrap();
        back.verify_access_secret(secret.expose()).unwrap();
        let wrong = kdf::access_secret(&key(5));
        assert!(matches!(
            back.verify_access_secret(wrong.expose()),
            Err(HeaderError::WrongKey)
        ));
        assert_eq!(back.slots[0].check.as_deref(), Some(&[9u8; 48][..]));
        // The slot's check is MAC-covered: changing it is tampering.
        let mut t = back.clone();
        t.slots[0].check = Some(vec![8; 48]);
        assert!(matches!(t.verify_key(&vmk), Err(HeaderError::Tampered)));
        let mut t = back;
        t.slots[0].check = None;
        assert!(matches!(t.verify_key(&vmk), Err(HeaderError::Tampered)));
    }

    #[test]
    fn version_and_v2_members_must_agree() {
        let vmk = key(6);
        // A v1 header carrying v2 members is refused (a v1 reader could not interpret them).
        let mut h = v1_header(&vmk);
        h.slots[0].check = Some(vec![1; 40]);
        let bytes = h.encode_copy(HeaderCopy::Primary, 1).unwrap();
        assert!(VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).is_err());
        // A v2 header without its access-check digest is refused.
        let mut h = v1_header(&vmk);
        h.version = layout::VERSION_2;
        let bytes = h.encode_copy(HeaderCopy::Primary, 1).unwrap();
        assert!(VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).is_err());
    }

    /// A recovery slot as `kvcrypt format --recovery-public-key` makes it (3072-bit key).
    fn recovery_slot() -> KeySlot {
        KeySlot {
            id: 0,
            provider: PROVIDER_RECOVERY.into(),
            key_id: recovery::fingerprint(b"customer spki"),
            algorithm: recovery::RECOVERY_ALGORITHM.into(),
            wrapped: (0..384u32).map(|i| i as u8).collect(),
            created_at: "2026-02-01T00:00:00Z".into(),
            check: None,
            share: None,
        }
    }

    fn with_recovery(vmk: &VolumeKey) -> VolumeHeader {
        let mut h = VolumeHeader::new_for_device(10 << 20, 4096, "rec", vmk).unwrap();
        h.add_slot(slot(1));
        h.add_slot(recovery_slot());
        h.seal(vmk);
        h
    }

    #[test]
    fn recovery_slot_round_trips_in_a_v3_header() {
        let vmk = key(7);
        let h = with_recovery(&vmk);
        assert_eq!(
            h.version,
            layout::VERSION_3,
            "a recovery slot makes the header v3"
        );
        let bytes = h.encode_copy(HeaderCopy::Primary, 5).unwrap();
        assert_eq!(&bytes[8..10], &[3, 0], "written as version 3");
        let back = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap();
        let mut want = h.clone();
        want.sequence = 5;
        assert_eq!(back, want);
        back.verify_key(&vmk).unwrap();
        let r = back.recovery_slot().expect("recovery slot");
        assert_eq!(r.id, 1);
        assert_eq!(r.recovery_bits(), Some(3072));
        assert!(r.check.is_none());
        // Removing it makes the next seal write v2 again (readable by the previous release).
        let mut h2 = back;
        h2.remove_slot(1).unwrap();
        h2.seal(&vmk);
        assert_eq!(h2.version, layout::VERSION_2);
        let bytes = h2.encode_copy(HeaderCopy::Primary, 6).unwrap();
        assert_eq!(&bytes[8..10], &[2, 0]);
        VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary)
            .unwrap()
            .verify_key(&vmk)
            .unwrap();
    }

    #[test]
    fn the_mac_covers_the_recovery_slot() {
        let vmk = key(8);
        let h = with_recovery(&vmk);
        h.verify_key(&vmk).unwrap();
        let pos = h.slots.iter().position(|s| s.is_recovery()).unwrap();
        let mut t = h.clone();
        t.slots[pos].wrapped[100] ^= 1;
        assert!(matches!(t.verify_key(&vmk), Err(HeaderError::Tampered)));
        let mut t = h.clone();
        // Another fingerprint (one hex digit changed): still a well-formed slot, but tampered.
        let mut id = t.slots[pos].key_id.clone().into_bytes();
        let last = id.len() - 1;
        id[last] = if id[last] == b'0' { b'1' } else { b'0' };
        t.slots[pos].key_id = String::from_utf8(id).unwrap();
        assert!(matches!(t.verify_key(&vmk), Err(HeaderError::Tampered)));
        // The same changes through the bytes on disk: the copy decodes, the MAC refuses it.
        let bytes = t.encode_copy(HeaderCopy::Primary, 2).unwrap();
        let back = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap();
        assert!(matches!(back.verify_key(&vmk), Err(HeaderError::Tampered)));
        // Dropping the recovery slot (and the version with it) is tampering too.
        let mut t = h;
        t.slots.remove(pos);
        t.version = layout::VERSION_2;
        assert!(matches!(t.verify_key(&vmk), Err(HeaderError::Tampered)));
    }

    #[test]
    fn a_recovery_slot_needs_version_3_and_version_3_needs_one() {
        let vmk = key(9);
        // A v2 header carrying a recovery slot is refused: v2 readers would not know it.
        let mut h = with_recovery(&vmk);
        h.version = layout::VERSION_2;
        let bytes = h.encode_copy(HeaderCopy::Primary, 1).unwrap();
        let e = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap_err();
        assert!(format!("{e:?}").contains("needs v3"), "{e:?}");
        // A v3 header without one is refused (one encoding per content).
        let mut h = VolumeHeader::new_for_device(10 << 20, 4096, "x", &vmk).unwrap();
        h.add_slot(slot(1));
        h.seal(&vmk);
        h.version = layout::VERSION_3;
        let bytes = h.encode_copy(HeaderCopy::Primary, 1).unwrap();
        assert!(VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).is_err());
        // Version 5 is unknown.
        let mut h = with_recovery(&vmk);
        h.version = 5;
        let bytes = h.encode_copy_unchecked(HeaderCopy::Primary, 1).unwrap();
        assert!(matches!(
            VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary),
            Err(layout::DecodeError::UnsupportedVersion(5))
        ));
    }

    /// A 2-of-3 split header: shares 1..=3 in three vaults, share 2 also under a rotated key
    /// version (slot 3), and a recovery slot.
    fn split_header(vmk: &VolumeKey, policy: SlotPolicy) -> VolumeHeader {
        let mut h = VolumeHeader::new_for_device(10 << 20, 4096, "split", vmk).unwrap();
        for x in 1..=3u8 {
            let mut s = slot(x);
            s.key_id = format!("https://v{x}.vault.azure.net/keys/k/1");
            s.share = Some(x);
            s.check = Some(vec![x; 40]);
            h.add_slot(s);
        }
        let mut again = slot(9);
        again.key_id = "https://v2.vault.azure.net/keys/k/2".into();
        again.share = Some(2);
        h.add_slot(again);
        h.add_slot(recovery_slot());
        h.policy = policy;
        h.seal(vmk);
        h
    }

    #[test]
    fn split_headers_are_v4_and_round_trip() {
        let vmk = key(11);
        for policy in [SlotPolicy::KOfN { k: 2 }, SlotPolicy::All] {
            let h = split_header(&vmk, policy);
            assert_eq!(h.version, layout::VERSION_4);
            assert_eq!(h.share_count(), 3);
            let bytes = h.encode_copy(HeaderCopy::Primary, 7).unwrap();
            assert_eq!(&bytes[8..10], &[4, 0], "written as version 4");
            let back = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap();
            let mut want = h.clone();
            want.sequence = 7;
            assert_eq!(back, want);
            assert_eq!(back.policy, policy);
            back.verify_key(&vmk).unwrap();
            let md = String::from_utf8_lossy(&bytes[4096..]).into_owned();
            assert!(md.contains("\"share\": 2"), "{md}");
        }
        // Back to `any` (not something kvcrypt does, but the rule): v3 with the recovery slot.
        let mut h = split_header(&vmk, SlotPolicy::All);
        h.policy = SlotPolicy::Any;
        for s in &mut h.slots {
            s.share = None;
        }
        h.seal(&vmk);
        assert_eq!(h.version, layout::VERSION_3);
    }

    #[test]
    fn the_mac_covers_the_policy_and_every_share() {
        let vmk = key(12);
        let h = split_header(&vmk, SlotPolicy::KOfN { k: 2 });
        h.verify_key(&vmk).unwrap();
        let tampered = |edit: &dyn Fn(&mut VolumeHeader)| {
            let mut t = h.clone();
            edit(&mut t);
            assert!(matches!(t.verify_key(&vmk), Err(HeaderError::Tampered)));
        };
        tampered(&|t| t.policy = SlotPolicy::KOfN { k: 3 });
        tampered(&|t| t.policy = SlotPolicy::KOfN { k: 1 });
        tampered(&|t| t.policy = SlotPolicy::All);
        for i in 0..4 {
            tampered(&|t| t.slots[i].share = Some(7));
            tampered(&|t| t.slots[i].share = t.slots[i].share.map(|x| x % 3 + 1));
        }
        // The number of shares: a slot of a fourth share added.
        tampered(&|t| {
            let mut s = t.slots[0].clone();
            s.id = 10;
            s.share = Some(4);
            t.slots.push(s);
        });
        // Dropping the split (policy any, shares gone, version 3): tampering too.
        tampered(&|t| {
            t.policy = SlotPolicy::Any;
            t.version = layout::VERSION_3;
            for s in &mut t.slots {
                s.share = None;
            }
        });
        // Through the bytes on disk: a copy with a changed share decodes, the MAC refuses it.
        let mut t = h.clone();
        t.slots[0].share = Some(3);
        t.slots[2].share = Some(1);
        let bytes = t.encode_copy(HeaderCopy::Primary, 2).unwrap();
        let back = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap();
        assert!(matches!(back.verify_key(&vmk), Err(HeaderError::Tampered)));
    }

    #[test]
    fn readers_refuse_inconsistent_split_headers() {
        let vmk = key(13);
        let refused = |t: VolumeHeader, why: &str| {
            // The writer refuses such a header too; the reader is tested on its bytes.
            assert!(matches!(
                t.encode_copy(HeaderCopy::Primary, 1),
                Err(HeaderError::Invalid(_))
            ));
            let bytes = t.encode_copy_unchecked(HeaderCopy::Primary, 1).unwrap();
            let e = VolumeHeader::decode_copy(&bytes, HeaderCopy::Primary).unwrap_err();
            assert!(format!("{e:?}").contains(why), "{why}: {e:?}");
        };
        let h = split_header(&vmk, SlotPolicy::All);
        let mut t = h.clone();
        t.version = layout::VERSION_3;
        refused(t, "need v4");
        let mut t = h.clone();
        t.slots[1].share = None;
        refused(t, "without a share index");
        let mut t = h.clone();
        t.slots[0].share = Some(0);
        refused(t, "share index 0");
        let mut t = h.clone();
        let r = t.slots.iter().position(|s| s.is_recovery()).unwrap();
        t.slots[r].share = Some(1);
        refused(t, "recovery slot wraps the whole");
        // A v4 header without a policy, and a share on a v2 header.
        let mut t = h.clone();
        t.policy = SlotPolicy::Any;
        refused(t, "without a policy");
        let mut t = VolumeHeader::new_for_device(10 << 20, 4096, "x", &vmk).unwrap();
        let mut s = slot(1);
        s.share = Some(1);
        t.add_slot(s);
        t.seal(&vmk);
        refused(t, "share index in a format v2");
        let mut t = h;
        t.policy = SlotPolicy::KOfN { k: 4 };
        refused(t, "outside 1..=3");
    }

    #[test]
    fn the_last_slot_of_a_share_stays() {
        let vmk = key(14);
        let mut h = split_header(&vmk, SlotPolicy::KOfN { k: 2 });
        let e = h.remove_slot(0).unwrap_err();
        assert!(format!("{e}").contains("only slot holding share 1"), "{e}");
        // Share 2 has two slots (1 and 3): one of them may go, then not the other.
        h.remove_slot(1).unwrap();
        assert!(h.remove_slot(3).is_err());
        assert_eq!(h.share_count(), 3);
    }

    #[test]
    fn the_recovery_slot_never_remains_alone() {
        let vmk = key(10);
        let mut h = with_recovery(&vmk);
        let e = h.remove_slot(0).unwrap_err();
        assert!(format!("{e}").contains("last Key Vault slot"), "{e}");
        assert_eq!(h.slots.len(), 2);
        h.remove_slot(1).unwrap();
        assert!(h.recovery_slot().is_none());
    }

    #[test]
    fn copy_encode_decode_round_trip() {
        let vmk = key(3);
        let mut h = VolumeHeader::new_for_device(10 << 20, 512, "lbl ü", &vmk).unwrap();
        h.add_slot(slot(5));
        h.seal(&vmk);
        for c in HeaderCopy::BOTH {
            let bytes = h.encode_copy(c, 42).unwrap();
            let back = VolumeHeader::decode_copy(&bytes, c).unwrap();
            let mut want = h.clone();
            want.sequence = 42;
            assert_eq!(back, want);
            back.verify_key(&vmk).unwrap();
        }
        // A primary copy placed where the secondary belongs is refused.
        let bytes = h.encode_copy(HeaderCopy::Primary, 1).unwrap();
        assert!(VolumeHeader::decode_copy(&bytes, HeaderCopy::Secondary).is_err());
    }

    #[test]
    fn invalid_parameters_are_refused() {
        let vmk = key(1);
        assert!(matches!(
            VolumeHeader::new_for_device((1 << 20) + 4095, 4096, "", &vmk),
            Err(HeaderError::DeviceTooSmall { .. })
        ));
        assert!(VolumeHeader::new_for_device((1 << 20) + 512, 512, "", &vmk).is_ok());
        assert!(matches!(
            VolumeHeader::new_for_device(8 << 20, 4096, &"a".repeat(48), &vmk),
            Err(HeaderError::Invalid(_))
        ));
        assert!(matches!(
            VolumeHeader::new_for_device(8 << 20, 1024, "", &vmk),
            Err(HeaderError::Invalid(_))
        ));
    }

    #[test]
    fn rfc3339_timestamp() {
        let t = now_rfc3339();
        assert!(
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).is_ok(),
            "{t}"
        );
    }
}
