//! Commands on a volume itself, run without the agent (they call Key Vault directly where they
//! need a key): format, header, probe, rewrap, benchmark.
//!
//! Submodules: `format` (format logic), `slots` (key-slot logic over any key provider),
//! `signatures` (existing-content detection), `udev` (probe output encoding), `dump` (header
//! dump rendering), `recovery_key` (the customer's RSA recovery key pair), `recover` (`kvcrypt
//! recover`).

mod dump;
mod format;
mod recover;
mod recovery_key;
mod signatures;
mod slots;
mod udev;

pub use format::PolicyArg;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::{
    BenchmarkArgs, CliError, FormatArgs, HeaderCmd, HeaderDumpArgs, ProbeArgs, RecoverArgs,
    RewrapArgs,
};
use kvcrypt_exit::{Context, Exit, Failure};
use kvcrypt_format as header;
use kvcrypt_keyvault::BlockingProvider;

/// THE wiring point to the key provider of the commands run without the agent: Key Vault as
/// the `[vault]` table of the config file says, for `format`, `rewrap`, `header dump
/// --dump-master-key` and `open --foreground`. (Their pins, `[vault] keys`, are checked before
/// it is used: see `pinning`.)
pub(super) fn vault_provider(
    cfg: &kvcrypt_keyvault::VaultConfig,
) -> Result<BlockingProvider, kvcrypt_keyvault::KeyError> {
    BlockingProvider::new(cfg)
}

/// Unwraps the volume key with the first pinned slot of `h` that works and passes the key
/// check (for `open --foreground`); see [`slots::unlock`].
pub(super) fn unlock_volume(
    h: &header::VolumeHeader,
    w: &BlockingProvider,
    pins: &kvcrypt_keyvault::Pins,
) -> Result<(kvcrypt_crypto::secmem::VolumeKey, u32), Failure> {
    slots::unlock(h, w, pins)
}

/// Reads only the `[vault]` table of the config file (the offline commands need nothing else,
/// and must not fail on agent settings they do not use).
pub(super) fn load_vault_config(config: &Path) -> Result<kvcrypt_keyvault::VaultConfig, Failure> {
    let text = std::fs::read_to_string(config).map_err(|e| {
        CliError::Config(format!(
            "cannot read config file {} ({e}); its [vault] table says how to reach Key Vault \
             (see --config / KVCRYPT_CONFIG)",
            config.display()
        ))
    })?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| CliError::Config(format!("config file {}: {e}", config.display())))?;
    let vault = table.get("vault").ok_or_else(|| {
        CliError::Config(format!(
            "config file {} has no [vault] table",
            config.display()
        ))
    })?;
    let vault_text = toml::to_string(vault)
        .map_err(|e| CliError::Config(format!("config file {}: [vault]: {e}", config.display())))?;
    kvcrypt_keyvault::VaultConfig::from_toml(&vault_text)
        .with_context(|| format!("config file {}", config.display()))
}

pub fn format(config: &Path, a: FormatArgs) -> Result<(), Failure> {
    // A recovery key that is refused is refused before anything else happens.
    let recovery = a
        .recovery_public_key
        .as_deref()
        .map(recovery_key::RecoveryPublicKey::read)
        .transpose()?;
    let cfg = load_vault_config(config)?;
    // Before anything is read, written or asked of a vault: the keys parse, suit the policy
    // and are pinned.
    for k in &a.key_id {
        kvcrypt_keyvault::KeyId::parse(k)?;
    }
    let policy = format::slot_policy(a.policy, a.threshold, &a.key_id)?;
    let pins = super::pinning::cli_pins(&cfg, config, a.allow_unpinned_key);
    let mut key_ids = Vec::with_capacity(a.key_id.len());
    for k in &a.key_id {
        key_ids.push(pins.check_target(k)?);
        if pins.pin_for(k).is_none() {
            eprintln!(
                "kvcrypt: warning: formatting with {k}, which the configuration does not pin \
                 ({}): the agent will not unlock this volume until the key is pinned",
                super::pinning::ALLOW_FLAG
            );
        }
    }
    let plan = format::FormatPlan {
        key_ids,
        policy,
        algorithm: a.algorithm,
        label: a.label.unwrap_or_default(),
        sector_size: a.sector_size,
        master_key_file: a.master_key_file,
        force: a.yes,
        wipe: a.wipe,
        progress: true,
        recovery,
    };
    let w = vault_provider(&cfg)?;
    let h = format::format_device(&a.device, &plan, &w)?;
    println!(
        "Formatted {} as kvcrypt volume {} ({} bytes of data in {}-byte sectors); policy {}",
        a.device.display(),
        h.uuid,
        h.data_length,
        h.sector_size,
        h.policy.describe(h.share_count())
    );
    for s in h.slots.iter().filter(|s| !s.is_recovery()) {
        match s.share {
            Some(x) => println!(
                "key slot {}: {} ({}), share {x}",
                s.id, s.key_id, s.algorithm
            ),
            None => println!("key slot {}: {} ({})", s.id, s.key_id, s.algorithm),
        }
    }
    if let Some(r) = h.recovery_slot() {
        print_recovery_added(r);
    }
    Ok(())
}

fn print_recovery_added(s: &header::KeySlot) {
    println!(
        "Recovery slot {}: {} ({}-bit RSA, {}, customer-held; keep the private key offline — \
         `kvcrypt recover` opens the volume with it)",
        s.id,
        s.key_id,
        s.recovery_bits().unwrap_or_default(),
        s.algorithm
    );
}

pub fn recover(config: &Path, a: RecoverArgs) -> Result<(), Failure> {
    recover::recover(config, a)
}

pub fn header(config: &Path, h: HeaderCmd) -> Result<(), Failure> {
    match h {
        HeaderCmd::Dump(a) => header_dump(config, a),
        HeaderCmd::Backup { device, file } => {
            let l = kvcrypt_header_io::backup(&device, &file)?;
            warn_damaged(&device, &l);
            warn_truncated(&device, &l);
            println!(
                "Saved the header area of {} (volume {}) to {}",
                device.display(),
                l.uuid,
                file.display()
            );
            Ok(())
        }
        HeaderCmd::Restore { device, file, yes } => header_restore(&device, &file, yes),
    }
}

fn warn_damaged(device: &Path, l: &header::LoadedHeader) {
    for d in &l.damaged {
        eprintln!(
            "kvcrypt: warning: {}: {} is damaged ({}); it will be repaired by the next header \
             write (e.g. `kvcrypt rewrap`), or restore a backup",
            device.display(),
            d.copy,
            d.reason
        );
    }
}

/// A device shorter than its data area can still have its header saved or dumped, but it can
/// not be served: say so, with the numbers.
fn warn_truncated(device: &Path, l: &header::LoadedHeader) {
    if let Some(missing) = l.missing_bytes() {
        eprintln!(
            "kvcrypt: warning: {} is truncated: {} bytes, but its data area ends at byte {} \
             ({missing} bytes missing); the header is intact, but the volume cannot be opened \
             until the device has its full size again",
            device.display(),
            l.device_size,
            l.header.data_offset.saturating_add(l.header.data_length),
        );
    }
}

/// Asks the operator to type YES on the terminal; refuses without a terminal.
fn confirm(question: &str, flag: &str) -> Result<(), Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::Usage(format!(
            "{question} — no terminal to confirm on; pass {flag} to confirm non-interactively"
        ))
        .into());
    }
    eprint!("{question}\nType YES (in capitals) to continue: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the confirmation")?;
    if line.trim_end_matches(['\r', '\n']) != "YES" {
        return Err(CliError::Usage("not confirmed; nothing done".into()).into());
    }
    Ok(())
}

fn header_dump(config: &Path, a: HeaderDumpArgs) -> Result<(), Failure> {
    let l = kvcrypt_header_io::read_header_only(&a.device)?;
    let master_key = if a.dump_master_key {
        if !kvcrypt_host::process::running_as_root() {
            return Err(CliError::Permission(
                "--dump-master-key needs root: the master key gives full access to the data".into(),
            )
            .into());
        }
        if !a.yes_i_understand {
            confirm(
                &format!(
                    "This prints the volume master key of {} in clear text. Anyone who sees it \
                     can read the volume forever, whatever happens to the Key Vault key.",
                    a.device.display()
                ),
                "--yes-i-understand",
            )?;
        }
        let cfg = load_vault_config(config)?;
        let pins = super::pinning::cli_pins(&cfg, config, a.allow_unpinned_key);
        let w = vault_provider(&cfg)?;
        let (vmk, slot) = slots::unlock(&l, &w, &pins)?;
        Some((vmk, slot))
    } else {
        None
    };
    let mk = master_key.as_ref().map(|(k, s)| (k, *s));
    if a.json {
        println!("{}", dump::json(&a.device, &l, mk).as_str());
    } else {
        print!("{}", dump::text(&a.device, &l, mk).as_str());
        warn_damaged(&a.device, &l);
    }
    warn_truncated(&a.device, &l);
    Ok(())
}

fn header_restore(device: &Path, file: &Path, yes: bool) -> Result<(), Failure> {
    let backup = kvcrypt_header_io::read_backup(file)?;
    // Claimed before asking: a served or mounted device is refused whatever the answer would
    // be, and nothing starts serving it while the operator reads the question.
    let dev = kvcrypt_host::inuse::open_for_overwrite(device)?;
    let current = match kvcrypt_header_io::read(device) {
        Ok(l) if l.uuid == backup.uuid => format!("the header of the same volume {}", l.uuid),
        Ok(l) => format!("a DIFFERENT kvcrypt volume {}", l.uuid),
        Err(e) => format!("no usable header ({e})"),
    };
    if !yes {
        confirm(
            &format!(
                "Restore the header of volume {} from {} onto {}, which currently holds {}?",
                backup.uuid,
                file.display(),
                device.display(),
                current
            ),
            "--yes",
        )?;
    }
    let h = kvcrypt_header_io::restore_to(&dev, device, file)?;
    println!(
        "Restored the header of volume {} onto {} (sequence {})",
        h.uuid,
        device.display(),
        h.sequence
    );
    Ok(())
}

/// `sdb` → `/dev/sdb` when no such relative path exists (udev passes kernel names).
fn probe_path(p: &Path) -> PathBuf {
    if p.components().count() == 1 && !p.exists() {
        let dev = Path::new("/dev").join(p);
        if dev.exists() {
            return dev;
        }
    }
    p.to_path_buf()
}

/// Silent by contract (udev `IMPORT{program}`): prints properties for a kvcrypt volume, and for
/// anything else exits with `Exit::NotKvcrypt` without a word — hence the direct `exit`
/// instead of an error that `main` would print.
pub fn probe(a: ProbeArgs) -> Result<(), Failure> {
    let Some(info) = kvcrypt_header_io::probe(probe_path(&a.device)) else {
        std::process::exit(i32::from(Exit::NotKvcrypt.code()));
    };
    let mut out = std::io::stdout().lock();
    let text = format!(
        "ID_FS_TYPE=kvcrypt\nID_FS_USAGE=crypto\nID_FS_VERSION={}\nID_FS_UUID={}\nID_FS_UUID_ENC={}\n\
         ID_FS_LABEL={}\nID_FS_LABEL_ENC={}\n",
        info.version,
        info.uuid,
        info.uuid,
        udev::safe(&info.label),
        udev::encode(&info.label)
    );
    if out
        .write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .is_err()
    {
        std::process::exit(i32::from(Exit::Failure.code()));
    }
    Ok(())
}

pub fn rewrap(config: &Path, a: RewrapArgs) -> Result<(), Failure> {
    let recovery = a
        .recovery_public_key
        .as_deref()
        .map(recovery_key::RecoveryPublicKey::read)
        .transpose()?;
    let mut l = kvcrypt_header_io::read(&a.device)?;
    warn_damaged(&a.device, &l);
    // Adding the recovery slot is the change asked for: no Key Vault slot is added with it
    // unless a key is named (a pending key rotation is not done behind the operator's back).
    let add = !a.no_add && (recovery.is_none() || a.key_id.is_some());
    let plan = slots::RewrapPlan {
        key_id: a.key_id,
        algorithm: a.algorithm,
        add,
        remove: a.remove_slot,
        recovery,
        replace_recovery: a.replace_recovery,
    };
    let cfg = load_vault_config(config)?;
    let pins = super::pinning::cli_pins(&cfg, config, a.allow_unpinned_key);
    let w = vault_provider(&cfg)?;
    let out = slots::rewrap(&mut l.header, &w, &plan, &pins)?;
    for (x, why) in &out.shares_failed {
        eprintln!("warning: share {x} was not rewrapped ({why}); its slots stay as they are");
    }
    for (id, why) in &out.checks_failed {
        eprintln!(
            "warning: key slot {id} got no access check ({why}); the agent's access checks \
             fall back to unwrapping the volume key with it"
        );
    }
    if out.added.is_none()
        && out.removed.is_empty()
        && out.checks_added.is_empty()
        && out.recovery_added.is_none()
        && out.shares_added.is_empty()
    {
        if l.policy.is_split() {
            if !out.shares_failed.is_empty() {
                return Err(Failure::new(
                    Exit::Failure,
                    "no share could be rewrapped and nothing else changed (see the warnings)",
                ));
            }
            println!(
                "Nothing changed: every share is already wrapped by the latest version of its key"
            );
            return Ok(());
        }
        match (out.recovery_present, out.already_present) {
            (Some(id), _) => println!(
                "Nothing changed: recovery slot {id} already wraps the volume key with that \
                 public key"
            ),
            (None, p) => println!(
                "Nothing changed: key slot {} already wraps the volume key with that key version",
                p.unwrap_or_default()
            ),
        }
        return Ok(());
    }
    kvcrypt_header_io::write(&a.device, &mut l.header)?;
    if let Some(id) = out.added
        && let Some(s) = l.slots.iter().find(|s| s.id == id)
    {
        println!("Added key slot {id}: {} ({})", s.key_id, s.algorithm);
    }
    if let Some(id) = out.recovery_added
        && let Some(s) = l.slots.iter().find(|s| s.id == id)
    {
        print_recovery_added(s);
    }
    for (x, id) in &out.shares_added {
        if let Some(s) = l.slots.iter().find(|s| s.id == *id) {
            println!(
                "Added key slot {id}: share {x} wrapped by {} ({})",
                s.key_id, s.algorithm
            );
        }
    }
    for id in &out.removed {
        println!("Removed key slot {id}");
    }
    for id in &out.checks_added {
        println!("Added an access check to key slot {id} (format v2)");
    }
    Ok(())
}

pub fn benchmark(a: BenchmarkArgs) -> Result<(), Failure> {
    if !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 600.0) {
        return Err(CliError::Usage(format!(
            "--seconds {} is out of range: give a duration between 0 and 600 seconds",
            a.seconds
        ))
        .into());
    }
    let report = kvcrypt_crypto::bench::run_benchmark(a.seconds);
    if a.json {
        // Serialising the plain report struct does not fail in practice; nothing to tell apart.
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| Failure::wrap(Exit::Failure, e))?;
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kvcrypt.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn vault_config_errors_are_configuration_errors() {
        let (_d, p) = cfg("[agent]\n");
        let e = load_vault_config(&p).unwrap_err();
        assert!(format!("{e:#}").contains("no [vault] table"), "{e:#}");
        assert_eq!(e.exit(), Exit::Config);
        let e = load_vault_config(Path::new("/nonexistent/kvcrypt.toml")).unwrap_err();
        assert_eq!(e.exit(), Exit::Config);
        let (_d, p) = cfg("[vault]\nbogus = 1\n");
        let e = load_vault_config(&p).unwrap_err();
        assert_eq!(e.exit(), Exit::Config, "{e:#}");
        let (_d, p) = cfg("[vault.credential]\nkind = \"managed-identity\"\n");
        let c = load_vault_config(&p).unwrap();
        assert!(matches!(
            c.credential,
            kvcrypt_keyvault::CredentialConfig::ManagedIdentity(_)
        ));
        // Not a TOML file at all.
        let (_d, p) = cfg("this is = = not toml");
        let e = load_vault_config(&p).unwrap_err();
        assert_eq!(e.exit(), Exit::Config, "{e:#}");
        assert!(format!("{e:#}").contains("config file"), "{e:#}");
    }
}
