//! `kvcrypt format`: safety checks, VMK generation, the key slots (one per `--key-id`: each
//! wrapping the whole VMK under policy `any`, or one Shamir share of it under `all` / `k-of-n`),
//! the customer-held recovery slot when asked, optional wipe, header write.

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::RngCore;

use super::recovery_key::RecoveryPublicKey;
use super::signatures;
use super::slots::{make_share_slot, make_slot};
use crate::cli::CliError;
use kvcrypt_crypto::XtsCipher;
use kvcrypt_crypto::secmem::{VMK_LEN, VolumeKey};
use kvcrypt_exit::{Context, Failure};
use kvcrypt_format::{HeaderError, SlotPolicy, VolumeHeader, layout};

/// Everything `format` needs besides the key provider.
pub struct FormatPlan {
    /// The keys (request ids, pinned), one slot each, in slot order; under a split policy key
    /// `i` wraps share `i + 1`.
    pub key_ids: Vec<String>,
    /// `Any` (each slot wraps the VMK) or a split policy checked by [`slot_policy`].
    pub policy: SlotPolicy,
    pub algorithm: Option<String>,
    pub label: String,
    pub sector_size: u32,
    pub master_key_file: Option<PathBuf>,
    /// Overwrite existing signatures (`--yes`).
    pub force: bool,
    pub wipe: bool,
    /// Show a progress bar for the wipe (only when stderr is a terminal).
    pub progress: bool,
    /// Also wrap the VMK with the customer's recovery public key (`--recovery-public-key`).
    pub recovery: Option<RecoveryPublicKey>,
}

/// Reads a customer-supplied VMK: exactly 64 raw bytes, two different AES-256 halves
/// (IEEE 1619 / FIPS 140 require the XTS data and tweak keys to differ).
pub fn read_master_key_file(path: &Path) -> Result<VolumeKey, Failure> {
    let mut f =
        File::open(path).with_context(|| format!("opening master key file {}", path.display()))?;
    let mut vmk = VolumeKey::zeroed();
    let mut extra = [0u8; 1];
    f.read_exact(vmk.expose_mut()).map_err(|_| {
        CliError::Usage(format!(
            "master key file {} must hold exactly {VMK_LEN} raw bytes (it is shorter)",
            path.display()
        ))
    })?;
    if f.read(&mut extra)
        .with_context(|| format!("reading {}", path.display()))?
        != 0
    {
        return Err(CliError::Usage(format!(
            "master key file {} must hold exactly {VMK_LEN} raw bytes (it is longer)",
            path.display()
        ))
        .into());
    }
    let k = vmk.expose();
    if k[..32] == k[32..] {
        return Err(CliError::Usage(format!(
            "master key file {}: the two 32-byte halves are equal, which XTS forbids",
            path.display()
        ))
        .into());
    }
    Ok(vmk)
}

/// The `--policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// Any one key unlocks (each slot wraps the whole volume key).
    Any,
    /// Every key is needed (the volume key is split n-of-n).
    All,
    /// Any K of the n keys unlock (needs --threshold K).
    #[value(name = "k-of-n")]
    KOfN,
}

/// The slot policy `--policy`/`--threshold` ask for with these keys, or why not: `all` and
/// `k-of-n` need 2 to 16 keys, each in a different vault (two shares in one vault would let
/// that one vault's keys, or its administrator, unlock with fewer independent parties than the
/// policy promises), and `k-of-n` a threshold 1 < K <= n; `--threshold` belongs to `k-of-n`.
pub fn slot_policy(
    policy: PolicyArg,
    threshold: Option<u8>,
    key_ids: &[String],
) -> Result<SlotPolicy, Failure> {
    let usage = |m: String| -> Failure { CliError::Usage(m).into() };
    let n = key_ids.len();
    for (i, k) in key_ids.iter().enumerate() {
        let v = super::slots::versionless(k).to_ascii_lowercase();
        if key_ids[..i]
            .iter()
            .any(|o| super::slots::versionless(o).to_ascii_lowercase() == v)
        {
            return Err(usage(format!("--key-id {k} is given twice")));
        }
    }
    let chosen = match (policy, threshold) {
        (PolicyArg::Any, None) => return Ok(SlotPolicy::Any),
        (PolicyArg::All, None) => SlotPolicy::All,
        (PolicyArg::KOfN, Some(k)) => SlotPolicy::KOfN { k },
        (PolicyArg::KOfN, None) => {
            return Err(usage(
                "--policy k-of-n needs --threshold K (how many of the keys unlock)".into(),
            ));
        }
        (p, Some(_)) => {
            return Err(usage(format!(
                "--threshold applies to --policy k-of-n only (not {})",
                match p {
                    PolicyArg::Any => "any: one key unlocks",
                    _ => "all: every key is needed",
                }
            )));
        }
    };
    let max = usize::from(kvcrypt_crypto::shamir::MAX_SHARES);
    if n < 2 || n > max {
        return Err(usage(format!(
            "--policy {chosen} needs 2 to {max} --key-id (one per vault), got {n}"
        )));
    }
    if let SlotPolicy::KOfN { k } = chosen
        && !(2..=n).contains(&usize::from(k))
    {
        return Err(usage(format!(
            "--threshold {k} is out of range: with {n} keys it must be 2 to {n} (1 would be              --policy any)"
        )));
    }
    let mut vaults: Vec<(String, &str)> = Vec::with_capacity(n);
    for k in key_ids {
        let vault = kvcrypt_keyvault::KeyId::parse(k)?
            .vault()
            .to_ascii_lowercase();
        if let Some((_, other)) = vaults.iter().find(|(v, _)| *v == vault) {
            return Err(usage(format!(
                "--key-id {k} and {other} are in the same vault ({vault}): under --policy                  {chosen} every key must be in a different vault, or that one vault alone                  would hold more than one share and the split would protect nothing"
            )));
        }
        vaults.push((vault, k));
    }
    Ok(chosen)
}

/// A fresh random VMK from the operating system's CSPRNG.
pub fn random_master_key() -> VolumeKey {
    let mut vmk = VolumeKey::zeroed();
    rand::rngs::OsRng.fill_bytes(vmk.expose_mut());
    vmk
}

/// Refuses to overwrite recognisable content unless forced. Returns what was found.
fn check_existing(f: &File, path: &Path, force: bool) -> Result<Vec<&'static str>, Failure> {
    let mut head = vec![0u8; signatures::SCAN_LEN];
    let mut got = 0;
    while got < head.len() {
        match f.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    let found = signatures::detect(&head[..got]);
    if !found.is_empty() && !force {
        return Err(CliError::Busy(format!(
            "{} already holds: {}; refusing to overwrite it (use --yes to format anyway; this \
             destroys the existing data)",
            path.display(),
            found.join(", ")
        ))
        .into());
    }
    Ok(found)
}

/// Formats `path`: returns the header written (sequence 1 on a fresh device).
pub fn format_device(
    path: &Path,
    plan: &FormatPlan,
    w: &kvcrypt_keyvault::BlockingProvider,
) -> Result<VolumeHeader, Failure> {
    if plan.label.len() > layout::LABEL_MAX || plan.label.contains('\0') {
        return Err(CliError::Usage(format!(
            "label must be at most {} bytes of UTF-8 without NUL",
            layout::LABEL_MAX
        ))
        .into());
    }
    // Block devices O_EXCL and the exclusive claim: a mounted device or a served volume is
    // refused (no flag overrides that), and the claim is held until the header is written.
    let f = kvcrypt_host::inuse::open_for_overwrite(path)?;
    let size = kvcrypt_header_io::device_size(&f, path)?;
    let needed = layout::HEADER_AREA_SIZE + u64::from(plan.sector_size);
    if size < needed {
        return Err(HeaderError::DeviceTooSmall {
            path: path.to_path_buf(),
            size,
            needed,
        }
        .into());
    }
    check_existing(&f, path, plan.force)?;

    let vmk = match &plan.master_key_file {
        Some(p) => read_master_key_file(p)?,
        None => random_master_key(),
    };
    let mut h = VolumeHeader::new_for_device(size, plan.sector_size, &plan.label, &vmk).map_err(
        |e| match e {
            HeaderError::DeviceTooSmall { size, needed, .. } => HeaderError::DeviceTooSmall {
                path: path.to_path_buf(),
                size,
                needed,
            },
            e => e,
        },
    )?;
    // Wrap before touching the device: a vault failure leaves it unchanged.
    let algorithm = plan.algorithm.as_deref();
    let mut split = None;
    if plan.policy.is_split() {
        let n = u8::try_from(plan.key_ids.len())
            .map_err(|_| CliError::Usage("too many --key-id".into()))?;
        let k = u8::try_from(plan.policy.threshold(plan.key_ids.len()))
            .map_err(|_| CliError::Usage("threshold out of range".into()))?;
        let shares = kvcrypt_crypto::shamir::split(&vmk, k, n)
            .map_err(|e| CliError::Usage(format!("splitting the volume key: {e}")))?;
        for (key_id, (x, share)) in plan.key_ids.iter().zip(&shares) {
            h.add_slot(make_share_slot(w, key_id, algorithm, *x, share, &vmk)?);
        }
        h.policy = plan.policy;
        split = Some(shares);
    } else {
        for key_id in &plan.key_ids {
            h.add_slot(make_slot(w, key_id, algorithm, &vmk)?);
        }
    }
    if let Some(r) = &plan.recovery {
        h.add_slot(r.make_slot(&vmk)?);
    }
    h.seal(&vmk);
    // Prove the header as it will be written: its threshold of shares combines to this key
    // (and passes its key check and MAC), so a split that would not open is never written.
    if let Some(shares) = &split {
        let need = h.policy.threshold(h.share_count());
        let refs: Vec<(u8, &VolumeKey)> = shares.iter().take(need).map(|(x, s)| (*x, s)).collect();
        crate::keyslots::combine_shares(&h, &refs)?;
    }
    if plan.wipe {
        wipe_data_area(&f, path, &h, &vmk, plan.progress)?;
    }
    kvcrypt_header_io::write_to(&f, path, &mut h)?;
    Ok(h)
}

/// Encrypts zeros over the whole data area, so unwritten blocks look like written ones.
fn wipe_data_area(
    f: &File,
    path: &Path,
    h: &VolumeHeader,
    vmk: &VolumeKey,
    progress: bool,
) -> Result<(), Failure> {
    const CHUNK: u64 = 4 * 1024 * 1024; // a multiple of both sector sizes
    let cipher = XtsCipher::new(vmk);
    let ss = u64::from(h.sector_size);
    let bar = (progress && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(h.data_length);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "wiping {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0u64;
    while done < h.data_length {
        let n = CHUNK.min(h.data_length - done);
        let chunk = &mut buf[..n as usize];
        chunk.fill(0);
        cipher
            .encrypt_sectors(chunk, done / ss, h.sector_size as usize)
            .context("encrypting the wipe pattern")?;
        f.write_all_at(chunk, h.data_offset + done)
            .with_context(|| {
                format!("wiping {} at byte {}", path.display(), h.data_offset + done)
            })?;
        done += n;
        if let Some(b) = &bar {
            b.set_position(done);
        }
    }
    f.sync_data()
        .with_context(|| format!("syncing {}", path.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::slots::unlock;
    use super::*;
    use kvcrypt_testkit::provider::XorVault;
    use std::fs::OpenOptions;

    const K: &str = "https://a.vault.azure.net/keys/vol/v1";

    fn plan() -> FormatPlan {
        FormatPlan {
            key_ids: vec!["https://a.vault.azure.net/keys/vol".into()],
            policy: SlotPolicy::Any,
            algorithm: None,
            label: "test".into(),
            sector_size: 4096,
            master_key_file: None,
            force: false,
            wipe: false,
            progress: false,
            recovery: None,
        }
    }

    fn file(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("dev.img");
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn formats_with_a_master_key_file_and_wipes_to_ciphertext_of_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), 3 << 20);
        let keyfile = dir.path().join("vmk.bin");
        let key: Vec<u8> = (0..64u8).collect();
        std::fs::write(&keyfile, &key).unwrap();
        let w = XorVault::new(&[K]).blocking();
        let mut pl = plan();
        pl.master_key_file = Some(keyfile);
        pl.wipe = true;
        pl.sector_size = 512;
        let h = format_device(&p, &pl, &w).unwrap();
        assert_eq!(h.slots[0].key_id, K, "slot stores the versioned id");
        let loaded = kvcrypt_header_io::read(&p).unwrap();
        assert_eq!(loaded.header, h);
        let pins = kvcrypt_keyvault::Pins::new(
            vec![kvcrypt_keyvault::KeyPin::parse("https://a.vault.azure.net/keys/vol").unwrap()],
            "keys of [vault]",
        );
        let (vmk, _) = unlock(&loaded, &w, &pins).unwrap();
        assert_eq!(&vmk.expose()[..], &key[..]);
        // The data area holds XTS(0…) under the VMK: decrypting sector 5 gives zeros.
        let mut sector = vec![0u8; 512];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut sector, (1 << 20) + 5 * 512)
            .unwrap();
        assert!(sector.iter().any(|&b| b != 0));
        XtsCipher::new(&vmk)
            .decrypt_sectors(&mut sector, 5, 512)
            .unwrap();
        assert!(sector.iter().all(|&b| b == 0));
    }

    #[test]
    fn policy_flags_are_checked_before_anything_happens() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = "https://a.vault.azure.net/keys/k";
        let b = "https://b.vault.azure.net/keys/k";
        let c = "https://c.vault.azure.net/keys/k";
        let a2 = "https://a.vault.azure.net/keys/other";
        assert_eq!(
            slot_policy(PolicyArg::Any, None, &ids(&[a])).unwrap(),
            SlotPolicy::Any
        );
        assert_eq!(
            slot_policy(PolicyArg::Any, None, &ids(&[a, a2])).unwrap(),
            SlotPolicy::Any
        );
        assert_eq!(
            slot_policy(PolicyArg::All, None, &ids(&[a, b])).unwrap(),
            SlotPolicy::All
        );
        assert_eq!(
            slot_policy(PolicyArg::KOfN, Some(2), &ids(&[a, b, c])).unwrap(),
            SlotPolicy::KOfN { k: 2 }
        );
        for (p, t, keys, why) in [
            (PolicyArg::KOfN, None, vec![a, b, c], "needs --threshold"),
            (PolicyArg::KOfN, Some(1), vec![a, b, c], "out of range"),
            (PolicyArg::KOfN, Some(4), vec![a, b, c], "out of range"),
            (PolicyArg::All, Some(2), vec![a, b], "k-of-n only"),
            (PolicyArg::Any, Some(1), vec![a], "k-of-n only"),
            (PolicyArg::All, None, vec![a], "needs 2 to 16"),
            (PolicyArg::KOfN, Some(2), vec![a, a2, b], "same vault"),
            (PolicyArg::Any, None, vec![a, a], "given twice"),
        ] {
            let e = slot_policy(p, t, &ids(&keys)).unwrap_err();
            assert_eq!(e.exit(), kvcrypt_exit::Exit::Usage, "{e:#}");
            assert!(format!("{e:#}").contains(why), "{why}: {e:#}");
        }
    }

    #[test]
    fn formats_a_split_volume_that_unlocks_with_its_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), 4 << 20);
        let keys = [
            "https://a.vault.azure.net/keys/k/1",
            "https://b.vault.azure.net/keys/k/1",
            "https://c.vault.azure.net/keys/k/1",
        ];
        let vault = XorVault::new(&keys);
        let w = vault.blocking();
        let mut pl = plan();
        pl.key_ids = keys.iter().map(|k| k.to_string()).collect();
        pl.policy = SlotPolicy::KOfN { k: 2 };
        let h = format_device(&p, &pl, &w).unwrap();
        assert_eq!(h.version, layout::VERSION_4);
        assert_eq!(h.share_count(), 3);
        let loaded = kvcrypt_header_io::read(&p).unwrap();
        assert_eq!(loaded.header, h);
        let pins = kvcrypt_keyvault::Pins::new(
            keys.iter()
                .map(|k| {
                    kvcrypt_keyvault::KeyPin::parse(&super::super::slots::versionless(k)).unwrap()
                })
                .collect(),
            "keys of [vault]",
        );
        let (vmk, _) = unlock(&loaded, &w, &pins).unwrap();
        vault.disable(keys[1]);
        assert_eq!(unlock(&loaded, &w, &pins).unwrap().0.expose(), vmk.expose());
        // No slot wraps the volume key itself.
        for (s, key) in loaded.slots.iter().zip(keys) {
            let share = w.unwrap(key, &s.algorithm, &s.wrapped);
            if let Ok(share) = share {
                assert_ne!(share.expose(), vmk.expose());
            }
        }
    }

    #[test]
    fn refuses_existing_content_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), 4 << 20);
        let w = XorVault::new(&[K]).blocking();
        // ext4 magic at 1080.
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[0x53, 0xef], 1080)
            .unwrap();
        let e = format_device(&p, &plan(), &w).unwrap_err();
        assert!(format!("{e}").contains("ext2/3/4"), "{e}");
        assert!(matches!(
            e.error().downcast_ref::<CliError>(),
            Some(CliError::Busy(_))
        ));
        let mut pl = plan();
        pl.force = true;
        let first = format_device(&p, &pl, &w).unwrap();
        // Now it holds a kvcrypt header: refused again without --yes.
        let e = format_device(&p, &plan(), &w).unwrap_err();
        assert!(format!("{e}").contains("kvcrypt header"), "{e}");
        assert_eq!(
            kvcrypt_header_io::read(&p).unwrap().uuid,
            first.uuid,
            "refused format wrote nothing"
        );
    }

    #[test]
    fn refuses_small_devices_bad_key_files_and_vault_failures_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let w = XorVault::new(&[K]).blocking();
        let p = file(dir.path(), (1 << 20) + 4095);
        let e = format_device(&p, &plan(), &w).unwrap_err();
        assert!(matches!(
            e.error().downcast_ref::<HeaderError>(),
            Some(HeaderError::DeviceTooSmall { .. })
        ));

        let p = file(dir.path(), 4 << 20);
        let kf = dir.path().join("short.bin");
        std::fs::write(&kf, [1u8; 63]).unwrap();
        let mut pl = plan();
        pl.master_key_file = Some(kf.clone());
        assert!(format_device(&p, &pl, &w).is_err());
        std::fs::write(&kf, [1u8; 65]).unwrap();
        assert!(format_device(&p, &pl, &w).is_err());
        std::fs::write(&kf, [1u8; 64]).unwrap();
        assert!(format_device(&p, &pl, &w).is_err(), "equal halves refused");

        let denied = XorVault::new(&[]).blocking();
        assert!(format_device(&p, &plan(), &denied).is_err());
        let mut head = vec![0u8; 8];
        File::open(&p).unwrap().read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, vec![0u8; 8], "nothing written after failures");
    }
}
