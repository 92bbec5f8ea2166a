//! Which key slots to ask, in which order, and what their answers add up to.

use super::*;

/// The slots to try, in order: only those naming a key the configuration pins (with the pin's
/// host: the disk is not trusted to choose the vault), the one that worked last first — after
/// a key rotation (`kvcrypt rewrap` added a slot for the new version) a disabled old version
/// must not lock a volume the new slot still opens.
pub(super) fn plan_slots(
    s: &VolumeSettings,
    slots: &[SlotRef],
    last: Option<&SlotRef>,
) -> Result<Vec<SlotRef>, AccessError> {
    if slots.is_empty() {
        return Err(AccessError::new(
            AccessClass::Misconfigured,
            "the volume header has no key slot",
        ));
    }
    // Pinning, before any request.
    let ids: Vec<&str> = slots.iter().map(|s| s.key_id.as_str()).collect();
    let chosen = s
        .pins
        .select(&ids)
        .map_err(|e| AccessError::new(AccessClass::NotPinned, e.0))?;
    let mut slots: Vec<SlotRef> = slots
        .iter()
        .cloned()
        .zip(chosen)
        .filter_map(|(mut slot, id)| match id {
            Some(id) => {
                slot.key_id = id;
                Some(slot)
            }
            None => {
                tracing::debug!(volume = %s.name, key_id = %slot.key_id,
                    "volume {}: key slot {} is not pinned; not tried", s.name, slot.key_id);
                None
            }
        })
        .collect();
    if let Some(last) = last
        && let Some(i) = slots.iter().position(|s| s.key_id == last.key_id)
    {
        let s = slots.remove(i);
        slots.insert(0, s);
    }
    Ok(slots)
}

/// One error for a failed access check: with several slots, one transient failure means "maybe
/// later" — the volume is not treated as revoked while any slot could still work.
pub(super) fn combine(errors: &[AccessError]) -> AccessError {
    let class = if errors.iter().any(|e| e.class == AccessClass::Transient) {
        AccessClass::Transient
    } else if errors.iter().any(|e| e.class == AccessClass::Denied) {
        AccessClass::Denied
    } else {
        AccessClass::Misconfigured
    };
    let message = errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    AccessError::new(class, message)
}
