//! `kvcrypt recover`: the customer opens a volume with the private key of its recovery slot —
//! on any machine, offline, with no kvcrypt configuration and no vault — then either prints
//! what dm-crypt needs (exactly `header dump --dump-master-key`'s output) or wraps the volume
//! key into a new Key Vault slot so the agent can unlock the volume again.
//!
//! Order: nothing is asked of the operator until the key is proven: decrypt the recovery slot,
//! key check (wrong key → exit 8), MAC (tampered → exit 4), then the confirmation, then the
//! action.

use std::path::Path;

use kvcrypt_exit::Failure;

use super::recovery_key::{RecoveryKeyError, RecoveryPrivateKey};
use super::{confirm, dump, load_vault_config, slots, vault_provider, warn_damaged};
use crate::cli::RecoverArgs;

pub fn recover(config: &Path, a: RecoverArgs) -> Result<(), Failure> {
    // With --rewrap-key the configuration and the pin are checked before the private key is
    // read, so a refusal there never has the key in memory; --print-dm-crypt reads none of it.
    let target = match &a.rewrap_key {
        Some(k) => {
            let cfg = load_vault_config(config)?;
            kvcrypt_keyvault::KeyId::parse(k)?;
            let pins = crate::cli::pinning::cli_pins(&cfg, config, a.allow_unpinned_key);
            let id = pins.check_target(k)?;
            if pins.pin_for(k).is_none() {
                eprintln!(
                    "kvcrypt: warning: wrapping with {k}, which the configuration does not pin \
                     ({}): the agent will not use this slot until it is pinned",
                    crate::cli::pinning::ALLOW_FLAG
                );
            }
            Some((cfg, id))
        }
        None => None,
    };
    // Printing needs only the header (a header backup or a truncated copy of the device will
    // do); writing a new slot needs the whole device.
    let mut l = if target.is_some() {
        kvcrypt_header_io::read(&a.device)?
    } else {
        kvcrypt_header_io::read_header_only(&a.device)?
    };
    if target.is_some() && l.policy.is_split() {
        // A Key Vault slot of a split volume wraps a share, which the recovery key does not
        // give (it wraps the whole key); a whole-key slot would break the policy.
        return Err(crate::cli::CliError::Usage(format!(
            "--rewrap-key is not supported on a split volume ({}): print the volume key with \
             --print-dm-crypt and copy the data to a newly formatted volume",
            l.policy.describe(l.share_count())
        ))
        .into());
    }
    let slot = l.recovery_slot().cloned().ok_or(RecoveryKeyError::NoSlot)?;
    let vmk = {
        let key = RecoveryPrivateKey::read(&a.private_key)?;
        key.unwrap(&a.private_key, &slot)?
        // The private key is dropped (and wiped) here, before anything is asked or printed.
    };
    kvcrypt_crypto::secmem::scrub_stack();
    l.verify_key(&vmk)?;
    let device = a.device.display();
    if !a.yes {
        let question = match &target {
            None => format!(
                "The recovery key opens {device}. This prints its volume master key in clear \
                 text: anyone who sees it can read the volume forever."
            ),
            Some((_, id)) => format!(
                "The recovery key opens {device}. Add a key slot wrapped by {id} to it, so the \
                 agent and `kvcrypt open` unlock it with that key?"
            ),
        };
        confirm(&question, "--yes")?;
    }
    match target {
        None => {
            let mk = Some((&vmk, slot.id));
            if a.json {
                println!("{}", dump::json(&a.device, &l, mk).as_str());
            } else {
                print!("{}", dump::text(&a.device, &l, mk).as_str());
                warn_damaged(&a.device, &l);
            }
        }
        Some((cfg, key_id)) => {
            warn_damaged(&a.device, &l);
            let w = vault_provider(&cfg)?;
            // A new slot for this key only: the other Key Vault slots are left as they are (their
            // vault may be the one that was lost), and so is the recovery slot.
            let new = slots::make_slot(&w, &key_id, a.algorithm.as_deref(), &vmk)?;
            let id = l.add_slot(new);
            l.seal(&vmk);
            l.verify_key(&vmk)?;
            kvcrypt_header_io::write(&a.device, &mut l.header)?;
            if let Some(s) = l.slots.iter().find(|s| s.id == id) {
                println!(
                    "Recovered {device} with recovery slot {}: added key slot {id}: {} ({})",
                    slot.id, s.key_id, s.algorithm
                );
            }
        }
    }
    Ok(())
}
