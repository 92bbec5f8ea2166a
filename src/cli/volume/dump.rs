//! Rendering of `kvcrypt header dump` (text and `--json`).

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::Zeroizing;

use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_format::{HeaderCopy, KeySlot, LoadedHeader};

fn hex(bytes: &[u8]) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn copy_state(l: &LoadedHeader, c: HeaderCopy) -> String {
    if l.used == c {
        "valid, in use".into()
    } else if let Some(d) = l.damaged.iter().find(|d| d.copy == c) {
        format!("DAMAGED: {}", d.reason)
    } else {
        "valid".into()
    }
}

/// The dm-crypt plain-mode command that opens the data area with the raw VMK.
pub fn cryptsetup_command(device: &Path, l: &LoadedHeader) -> String {
    format!(
        "cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --offset {} \
         --size {} --sector-size {} --iv-large-sectors --key-file VMK_FILE {} NAME",
        l.data_offset / 512,
        l.data_length / 512,
        l.sector_size,
        device.display()
    )
}

/// The customer-held recovery slot: what it is and which key pair opens it (the fingerprint
/// is what `openssl pkey -pubin -in PUB.pem -outform DER | sha256sum` prints).
fn recovery_text(s: &mut String, slot: &KeySlot) {
    let _ = writeln!(
        s,
        "  slot {}: recovery (customer-held RSA key; never used by the agent)",
        slot.id
    );
    let _ = writeln!(s, "    fingerprint: {}", slot.key_id);
    let bits = slot
        .recovery_bits()
        .map_or_else(|| "unknown".to_string(), |b| format!("{b}-bit RSA"));
    let _ = writeln!(s, "    key size:    {bits}");
    let _ = writeln!(
        s,
        "    algorithm:   {} (OAEP with SHA-256, MGF1-SHA-256)",
        slot.algorithm
    );
    let _ = writeln!(s, "    wrapped key: {} bytes", slot.wrapped.len());
    let _ = writeln!(s, "    created at:  {}", slot.created_at);
    let _ = writeln!(
        s,
        "    opens with:  kvcrypt recover DEVICE --private-key FILE"
    );
}

/// Zeroizing because with `--dump-master-key` it holds the key.
pub fn text(device: &Path, l: &LoadedHeader, mk: Option<(&VolumeKey, u32)>) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::new());
    let _ = writeln!(s, "kvcrypt volume header of {}", device.display());
    let _ = writeln!(s, "  version:       {}", l.version);
    let _ = writeln!(s, "  uuid:          {}", l.uuid);
    let _ = writeln!(s, "  label:         {:?}", l.label);
    let _ = writeln!(s, "  cipher:        {} ({}-bit key)", l.cipher, l.key_bits);
    let _ = writeln!(s, "  sector size:   {} bytes", l.sector_size);
    let _ = writeln!(
        s,
        "  data offset:   {} bytes ({} × 512)",
        l.data_offset,
        l.data_offset / 512
    );
    let _ = writeln!(
        s,
        "  data length:   {} bytes ({} sectors of {})",
        l.data_length,
        l.sector_count(),
        l.sector_size
    );
    let _ = writeln!(s, "  device size:   {} bytes", l.device_size);
    let _ = writeln!(s, "  sequence:      {}", l.sequence);
    for c in HeaderCopy::BOTH {
        let _ = writeln!(s, "  {c}: {}", copy_state(l, c));
    }
    let _ = writeln!(s, "  key check:     {}", B64.encode(l.key_check_digest()));
    if let Some(d) = l.access_check_digest() {
        let _ = writeln!(s, "  access check:  {}", B64.encode(d));
    }
    let _ = writeln!(s, "  header MAC:    {}", B64.encode(l.mac()));
    let _ = writeln!(s, "  policy:        {}", l.policy.describe(l.share_count()));
    let _ = writeln!(s, "key slots:");
    for slot in &l.slots {
        if slot.is_recovery() {
            recovery_text(&mut s, slot);
            continue;
        }
        let _ = writeln!(s, "  slot {}: {}", slot.id, slot.provider);
        let _ = writeln!(s, "    key id:      {}", slot.key_id);
        if let Some(x) = slot.share {
            let _ = writeln!(
                s,
                "    share:       {x} of {} (wraps one share of the volume key)",
                l.share_count()
            );
        }
        let _ = writeln!(s, "    algorithm:   {}", slot.algorithm);
        let _ = writeln!(s, "    wrapped key: {} bytes", slot.wrapped.len());
        let _ = writeln!(s, "    created at:  {}", slot.created_at);
        let check = match &slot.check {
            Some(c) => format!("{} bytes", c.len()),
            None => "none (access checks unwrap the volume key; `kvcrypt rewrap` adds one)".into(),
        };
        let _ = writeln!(s, "    access check: {check}");
    }
    let _ = writeln!(
        s,
        "dm-crypt access with the raw master key (VMK_FILE = 64 raw bytes):"
    );
    let _ = writeln!(s, "  {}", cryptsetup_command(device, l));
    if let Some((k, slot)) = mk {
        let from_recovery = l.slots.iter().any(|s| s.id == slot && s.is_recovery());
        if l.policy.is_split() && !from_recovery {
            let _ = writeln!(
                s,
                "master key (combined from {} shares, the first from slot {slot}, hex):",
                l.policy.threshold(l.share_count())
            );
        } else {
            let _ = writeln!(s, "master key (unwrapped from slot {slot}, hex):");
        }
        let _ = writeln!(s, "  {}", hex(k.expose()).as_str());
    }
    s
}

/// `{"kind": "any"}`, or for split volumes `{"kind", "threshold", "shares", "text"}`.
fn policy_json(l: &LoadedHeader) -> serde_json::Value {
    let n = l.share_count();
    let text = l.policy.describe(n);
    if l.policy.is_split() {
        serde_json::json!({
            "kind": l.policy.to_string(),
            "threshold": l.policy.threshold(n),
            "shares": n,
            "text": text,
        })
    } else {
        serde_json::json!({ "kind": "any", "text": text })
    }
}

/// Zeroizing because with `--dump-master-key` it holds the key.
pub fn json(device: &Path, l: &LoadedHeader, mk: Option<(&VolumeKey, u32)>) -> Zeroizing<String> {
    let copies: Vec<serde_json::Value> = HeaderCopy::BOTH
        .iter()
        .map(|&c| {
            let damaged = l.damaged.iter().find(|d| d.copy == c);
            serde_json::json!({
                "copy": c,
                "offset": c.offset(),
                "in_use": l.used == c,
                "valid": damaged.is_none(),
                "problem": damaged.map(|d| d.reason.clone()),
            })
        })
        .collect();
    let slots: Vec<serde_json::Value> = l
        .slots
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "kind": if s.is_recovery() { "recovery" } else { "key-vault" },
                "bits": s.recovery_bits(),
                "provider": s.provider,
                "key_id": s.key_id,
                "algorithm": s.algorithm,
                "wrapped": B64.encode(&s.wrapped),
                "created_at": s.created_at,
                "check": s.check.as_ref().map(|c| B64.encode(c)),
                "share": s.share,
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "device": device.display().to_string(),
        "version": l.version,
        "uuid": l.uuid.to_string(),
        "label": l.label,
        "cipher": l.cipher,
        "key_bits": l.key_bits,
        "sector_size": l.sector_size,
        "data_offset": l.data_offset,
        "data_length": l.data_length,
        "device_size": l.device_size,
        "sequence": l.sequence,
        "copies": copies,
        "key_check": B64.encode(l.key_check_digest()),
        "access_check": l.access_check_digest().map(|d| B64.encode(d)),
        "mac": B64.encode(l.mac()),
        "policy": policy_json(l),
        "keyslots": slots,
        "dm_crypt": cryptsetup_command(device, l),
    });
    if let Some((k, slot)) = mk {
        v["master_key_hex"] = serde_json::Value::String(hex(k.expose()).as_str().to_owned());
        v["master_key_slot"] = serde_json::Value::from(slot);
    }
    let out = Zeroizing::new(serde_json::to_string_pretty(&v).unwrap_or_default());
    if let serde_json::Value::Object(mut m) = v {
        // Do not leave the hex key lying in the freed JSON tree.
        if let Some(serde_json::Value::String(mut s)) = m.remove("master_key_hex") {
            zeroize::Zeroize::zeroize(&mut s);
        }
    }
    out
}
