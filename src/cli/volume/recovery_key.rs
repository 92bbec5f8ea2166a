//! The customer's recovery key pair (format v3 recovery slot, docs/FORMAT.md §3.2): reading the
//! PEM files, the fingerprint, and RSA-OAEP-256 wrap / unwrap of the volume key. Everything
//! here is local: no vault, no configuration.
//!
//! Crate choice: RustCrypto's `rsa` 0.9 (with `sha2`, and `pem` for SPKI / PKCS#1 / PKCS#8),
//! the maintained pure-Rust RSA that this workspace already builds as the emulator's reference
//! implementation, so no second RSA stack and no C library are added. Its private keys zeroize
//! their numbers on drop. Its decryption is not constant-time (RUSTSEC-2023-0071, "Marvin"):
//! that attack needs an oracle answering many chosen ciphertexts, while `kvcrypt recover`
//! decrypts one ciphertext once, on the customer's own machine; blinding is used all the same.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use kvcrypt_crypto::secmem::{SecretBox, VMK_LEN, VolumeKey};
use kvcrypt_exit::{Exit, ExitClass};
use kvcrypt_format::KeySlot;
use kvcrypt_format::recovery::{
    FINGERPRINT_PREFIX, PROVIDER_RECOVERY, RECOVERY_ALGORITHM, RECOVERY_KEY_BITS, fingerprint,
};

/// Largest key file read. A 4096-bit PKCS#8 PEM private key is about 3.3 KB; the margin allows
/// comments and line-ending variants, and the bound keeps a wrong file (a disk image) out.
const MAX_PEM: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryKeyError {
    #[error("{path}: {why}")]
    Unusable { path: PathBuf, why: String },
    #[error(
        "{path}: a {bits}-bit RSA key; a recovery key must have 3072 or 4096 bits (make one with \
         `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072`)"
    )]
    Size { path: PathBuf, bits: usize },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the volume has no recovery slot (it was formatted or rewrapped without --recovery-public-key)"
    )]
    NoSlot,
    #[error(
        "the private key {path} is not the volume's recovery key: its public key is {found}, the \
         recovery slot was made for {want}"
    )]
    Mismatch {
        path: PathBuf,
        found: String,
        want: String,
    },
    #[error(
        "the recovery slot does not decrypt with the matching private key (its wrapped key was \
         altered): the header is not to be trusted — restore it from a backup"
    )]
    Undecryptable,
}

impl ExitClass for RecoveryKeyError {
    fn exit_class(&self) -> Exit {
        match self {
            RecoveryKeyError::Unusable { .. } | RecoveryKeyError::Size { .. } => Exit::RecoveryKey,
            RecoveryKeyError::Io { source, .. } => source.exit_class(),
            RecoveryKeyError::NoSlot => Exit::NotFound,
            RecoveryKeyError::Mismatch { .. } => Exit::WrongKey,
            RecoveryKeyError::Undecryptable => Exit::HeaderInvalid,
        }
    }
}

fn unusable(path: &Path, why: impl Into<String>) -> RecoveryKeyError {
    RecoveryKeyError::Unusable {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn check_bits(path: &Path, key: &RsaPublicKey) -> Result<(), RecoveryKeyError> {
    let bits = key.n().bits();
    if RECOVERY_KEY_BITS.iter().any(|&b| b as usize == bits) {
        Ok(())
    } else {
        Err(RecoveryKeyError::Size {
            path: path.to_path_buf(),
            bits,
        })
    }
}

fn spki_fingerprint(path: &Path, key: &RsaPublicKey) -> Result<String, RecoveryKeyError> {
    let der = key
        .to_public_key_der()
        .map_err(|e| unusable(path, format!("cannot encode the public key: {e}")))?;
    Ok(fingerprint(der.as_bytes()))
}

/// The customer's public key, as `--recovery-public-key` gives it.
pub struct RecoveryPublicKey {
    key: RsaPublicKey,
    /// `sha256:HEX` of the SPKI DER: the slot's `key_id`.
    pub fingerprint: String,
    pub bits: usize,
}

impl std::fmt::Debug for RecoveryPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RecoveryPublicKey({}, {} bits)",
            self.fingerprint, self.bits
        )
    }
}

impl RecoveryPublicKey {
    /// Reads a PEM public key: SPKI (`BEGIN PUBLIC KEY`, what `openssl pkey -pubout` writes) or
    /// PKCS#1 (`BEGIN RSA PUBLIC KEY`). Only RSA with 3072 or 4096 bits is accepted.
    pub fn read(path: &Path) -> Result<RecoveryPublicKey, RecoveryKeyError> {
        let mut text = String::new();
        File::open(path)
            .map_err(|source| RecoveryKeyError::Io {
                path: path.to_path_buf(),
                op: "opening the recovery public key",
                source,
            })?
            .take(MAX_PEM as u64 + 1)
            .read_to_string(&mut text)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => unusable(path, "not a PEM text file"),
                _ => RecoveryKeyError::Io {
                    path: path.to_path_buf(),
                    op: "reading the recovery public key",
                    source: e,
                },
            })?;
        if text.len() > MAX_PEM {
            return Err(unusable(path, "too large for a PEM public key"));
        }
        if text.contains("PRIVATE KEY-----") {
            return Err(unusable(
                path,
                "this is a private key; give the public key (`openssl pkey -in KEY -pubout`), and \
                 keep the private key offline",
            ));
        }
        let key = if text.contains("-----BEGIN RSA PUBLIC KEY-----") {
            RsaPublicKey::from_pkcs1_pem(&text)
                .map_err(|e| unusable(path, format!("not a PKCS#1 RSA public key: {e}")))?
        } else if text.contains("-----BEGIN PUBLIC KEY-----") {
            RsaPublicKey::from_public_key_pem(&text).map_err(|e| {
                unusable(
                    path,
                    format!("not an RSA public key (SPKI \"PUBLIC KEY\" PEM of RSA expected): {e}"),
                )
            })?
        } else {
            return Err(unusable(
                path,
                "no PEM public key (expected -----BEGIN PUBLIC KEY----- or -----BEGIN RSA PUBLIC \
                 KEY-----)",
            ));
        };
        check_bits(path, &key)?;
        Ok(RecoveryPublicKey {
            fingerprint: spki_fingerprint(path, &key)?,
            bits: key.n().bits(),
            key,
        })
    }

    /// The recovery slot for `vmk` (id assigned when added to a header): RSA-OAEP with SHA-256
    /// as hash and MGF1 hash and an empty label.
    pub fn make_slot(&self, vmk: &VolumeKey) -> Result<KeySlot, kvcrypt_exit::Failure> {
        let wrapped = self
            .key
            .encrypt(&mut rand::rngs::OsRng, Oaep::new::<Sha256>(), vmk.expose())
            .map_err(|e| {
                kvcrypt_exit::Failure::new(
                    Exit::Failure,
                    format!("wrapping the volume key with the recovery public key: {e}"),
                )
            })?;
        Ok(KeySlot {
            id: 0,
            provider: PROVIDER_RECOVERY.into(),
            key_id: self.fingerprint.clone(),
            algorithm: RECOVERY_ALGORITHM.into(),
            wrapped,
            created_at: kvcrypt_format::now_rfc3339(),
            check: None,
            share: None,
        })
    }
}

/// The customer's private key, for `kvcrypt recover` only. Never printed (`Debug` shows the
/// fingerprint); the key's numbers are heap values of the `rsa` crate, wiped when it is dropped
/// (and every freed heap block is wiped by the binary's allocator).
pub struct RecoveryPrivateKey {
    key: RsaPrivateKey,
    pub fingerprint: String,
}

impl std::fmt::Debug for RecoveryPrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecoveryPrivateKey({}, redacted)", self.fingerprint)
    }
}

/// Reads `path` whole into secret memory with plain `read` calls (no buffered reader keeping a
/// copy, no growing `Vec` leaving freed copies behind); returns the buffer and the length.
fn read_secret_file(path: &Path) -> Result<(SecretBox<[u8; MAX_PEM]>, usize), RecoveryKeyError> {
    let io = |op, source| RecoveryKeyError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let mut f = File::open(path).map_err(|e| io("opening the private key", e))?;
    let mut buf = SecretBox::<[u8; MAX_PEM]>::zeroed();
    let mut len = 0;
    loop {
        let room = &mut buf.expose_mut()[len..];
        if room.is_empty() {
            // Full: one more byte means the file is larger than any key file.
            let mut probe = [0u8; 1];
            let n = f
                .read(&mut probe)
                .map_err(|e| io("reading the private key", e))?;
            zeroize::Zeroize::zeroize(&mut probe);
            if n != 0 {
                return Err(unusable(path, "too large for a PEM private key"));
            }
            break;
        }
        match f.read(room) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading the private key", e)),
        }
    }
    Ok((buf, len))
}

impl RecoveryPrivateKey {
    /// Reads an unencrypted PEM private key: PKCS#8 (`BEGIN PRIVATE KEY`, what `openssl genpkey`
    /// writes) or PKCS#1 (`BEGIN RSA PRIVATE KEY`).
    pub fn read(path: &Path) -> Result<RecoveryPrivateKey, RecoveryKeyError> {
        let (buf, len) = read_secret_file(path)?;
        let text = std::str::from_utf8(&buf.expose()[..len])
            .map_err(|_| unusable(path, "not a PEM text file"))?;
        let key = if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(unusable(
                path,
                "an encrypted (passphrase-protected) private key; kvcrypt reads an unencrypted \
                 PEM key: decrypt it onto memory-backed storage first (e.g. `openssl pkey -in KEY \
                 -out /dev/shm/recovery.pem`) and remove that copy afterwards",
            ));
        } else if text.contains("-----BEGIN RSA PRIVATE KEY-----") {
            RsaPrivateKey::from_pkcs1_pem(text)
                .map_err(|e| unusable(path, format!("not a PKCS#1 RSA private key: {e}")))?
        } else if text.contains("-----BEGIN PRIVATE KEY-----") {
            RsaPrivateKey::from_pkcs8_pem(text).map_err(|e| {
                unusable(
                    path,
                    format!(
                        "not an RSA private key (PKCS#8 \"PRIVATE KEY\" PEM of RSA expected): {e}"
                    ),
                )
            })?
        } else {
            return Err(unusable(
                path,
                "no PEM private key (expected -----BEGIN PRIVATE KEY----- or -----BEGIN RSA \
                 PRIVATE KEY-----)",
            ));
        };
        drop(buf);
        let public = key.to_public_key();
        check_bits(path, &public)?;
        Ok(RecoveryPrivateKey {
            fingerprint: spki_fingerprint(path, &public)?,
            key,
        })
    }

    /// Decrypts the recovery slot `s` of a header: refuses a slot made for another key pair
    /// before decrypting anything. The result still has to pass the header's key check.
    pub fn unwrap(&self, path: &Path, s: &KeySlot) -> Result<VolumeKey, RecoveryKeyError> {
        if s.key_id != self.fingerprint {
            return Err(RecoveryKeyError::Mismatch {
                path: path.to_path_buf(),
                found: self.fingerprint.clone(),
                want: s.key_id.clone(),
            });
        }
        debug_assert!(s.key_id.starts_with(FINGERPRINT_PREFIX));
        let plain = Zeroizing::new(
            self.key
                .decrypt_blinded(&mut rand::rngs::OsRng, Oaep::new::<Sha256>(), &s.wrapped)
                .map_err(|_| RecoveryKeyError::Undecryptable)?,
        );
        if plain.len() != VMK_LEN {
            return Err(RecoveryKeyError::Undecryptable);
        }
        VolumeKey::from_slice(&plain).ok_or(RecoveryKeyError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::EncodeRsaPublicKey;
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn wraps_and_unwraps_with_both_pem_encodings_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, 3072).unwrap();
        let public = private.to_public_key();
        let spki = write(
            dir.path(),
            "pub.pem",
            &public.to_public_key_pem(LineEnding::LF).unwrap(),
        );
        let pkcs1 = write(
            dir.path(),
            "pub1.pem",
            &public.to_pkcs1_pem(LineEnding::LF).unwrap(),
        );
        let a = RecoveryPublicKey::read(&spki).unwrap();
        let b = RecoveryPublicKey::read(&pkcs1).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "same key, same fingerprint");
        assert_eq!(a.bits, 3072);
        assert_eq!(
            a.fingerprint,
            fingerprint(public.to_public_key_der().unwrap().as_bytes())
        );
        let vmk = VolumeKey::from_slice(&[0x42; 64]).unwrap();
        let slot = a.make_slot(&vmk).unwrap();
        assert_eq!(slot.wrapped.len(), 384);
        assert_eq!(slot.recovery_bits(), Some(3072));

        let key_pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
        let sk = write(dir.path(), "key.pem", &key_pem);
        let k = RecoveryPrivateKey::read(&sk).unwrap();
        assert!(!format!("{k:?}").contains("BigUint"), "{k:?}");
        assert_eq!(k.unwrap(&sk, &slot).unwrap().expose(), vmk.expose());
        // Altered ciphertext with the right key: the slot is not to be trusted.
        let mut bad = slot.clone();
        bad.wrapped[10] ^= 1;
        assert!(matches!(
            k.unwrap(&sk, &bad),
            Err(RecoveryKeyError::Undecryptable)
        ));
        // The private key given as a public key is refused, and so is garbage.
        let e = RecoveryPublicKey::read(&sk).unwrap_err();
        assert_eq!(e.exit_class(), Exit::RecoveryKey);
        let junk = write(dir.path(), "junk.pem", "hello");
        assert_eq!(
            RecoveryPublicKey::read(&junk).unwrap_err().exit_class(),
            Exit::RecoveryKey
        );
        assert_eq!(
            RecoveryPrivateKey::read(&junk).unwrap_err().exit_class(),
            Exit::RecoveryKey
        );
        let missing = dir.path().join("missing.pem");
        assert_eq!(
            RecoveryPrivateKey::read(&missing).unwrap_err().exit_class(),
            Exit::NotFound
        );
    }
}
