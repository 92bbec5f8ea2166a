//! The Key Vault provider against the local emulator, over TLS with certificate verification and
//! the Key Vault challenge check on: every operation, each algorithm (checked against reference
//! implementations where the key material is ours), rotation, expiry, and every error class.

use azure_core::http::RequestContent;
use kvcrypt_exit::{Exit, ExitClass};
use kvcrypt_keyvault::{BlockingProvider, ErrorClass, KeyError, KeyId, KeyVaultProvider};
use kvcrypt_kv_emulator::{AuthMode, EmulatorConfig, Fault, FaultKind, FaultTarget, Op};
use kvcrypt_testkit::emulator::{HSM, Kv, VAULT, key_id};
use kvcrypt_testkit::keys::random_vmk;
use std::time::{Duration, Instant};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&B64, bytes)
}

/// Asserts the class and most specific code, and that the message names vault and key.
fn assert_err(err: &KeyError, class: ErrorClass, code: Option<&str>, vault: &str, key: &str) {
    assert_eq!(err.class(), class, "wrong class for: {err}");
    if code.is_some() {
        assert_eq!(err.code(), code, "wrong code for: {err}");
    }
    let msg = err.to_string();
    assert!(
        msg.contains(vault),
        "message does not name the vault: {msg}"
    );
    assert!(
        msg.contains(&format!("'{key}'")),
        "message does not name the key: {msg}"
    );
    let exit = match class {
        ErrorClass::Denied => Exit::AccessDenied,
        ErrorClass::Transient => Exit::VaultUnavailable,
        ErrorClass::Misconfigured => Exit::Config,
    };
    assert_eq!(err.exit_class(), exit);
}

/// Ops a typical kvcrypt identity gets ("Key Vault Crypto Service Encryption User").
const CRYPTO_USER: &[Op] = &[Op::Get, Op::Wrap, Op::Unwrap];

#[tokio::test]
async fn versionless_wrap_returns_versioned_kid_and_unwraps() {
    let kv = Kv::start();
    let version = kv.emu.create_key("disk-kek", "RSA", Some(2048)).unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let provider = kv.provider(&p);
    let vmk = random_vmk();

    let slot = provider
        .wrap(&key_id(VAULT, "disk-kek"), None, &vmk)
        .await
        .unwrap();
    assert_eq!(
        slot.key_id,
        format!("https://{VAULT}/keys/disk-kek/{version}")
    );
    assert_eq!(slot.algorithm, "RSA-OAEP-256");
    assert_eq!(slot.wrapped.len(), 256, "RSA-2048 ciphertext");
    assert_ne!(&slot.wrapped[..64], vmk.expose().as_slice());

    let latest = provider
        .latest_version(&key_id(VAULT, "disk-kek"))
        .await
        .unwrap();
    assert_eq!(latest, slot.key_id);

    let back = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap();
    assert_eq!(back.expose(), vmk.expose());

    // Wrapping with the versioned id gives the same kid; RSA-OAEP is randomized.
    let again = provider.wrap(&slot.key_id, None, &vmk).await.unwrap();
    assert_eq!(again.key_id, slot.key_id);
    assert_ne!(again.wrapped, slot.wrapped);
}

#[tokio::test]
async fn rsa_oaep_256_matches_reference_decryption() {
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    let kv = Kv::start();
    let admin = kv.admin_client(VAULT);
    // The customer's own key (BYOK), imported; we keep the private half to check the result.
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let primes = key.primes();
    let jwk = serde_json::json!({
        "key": {
            "kty": "RSA",
            "n": b64(&key.n().to_bytes_be()),
            "e": b64(&key.e().to_bytes_be()),
            "d": b64(&key.d().to_bytes_be()),
            "p": b64(&primes[0].to_bytes_be()),
            "q": b64(&primes[1].to_bytes_be()),
            "key_ops": ["wrapKey", "unwrapKey"],
        }
    });
    admin
        .import_key(
            "byok",
            RequestContent::from(serde_json::to_vec(&jwk).unwrap()),
            None,
        )
        .await
        .unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let provider = kv.provider(&p);
    let vmk = random_vmk();

    let slot = provider
        .wrap(&key_id(VAULT, "byok"), None, &vmk)
        .await
        .unwrap();
    assert_eq!(slot.algorithm, "RSA-OAEP-256");
    let plain = key
        .decrypt(rsa::Oaep::new::<sha2::Sha256>(), &slot.wrapped)
        .unwrap();
    assert_eq!(plain.as_slice(), vmk.expose().as_slice());

    // RSA-OAEP (SHA-1) round trip through the service.
    let slot = provider
        .wrap(&key_id(VAULT, "byok"), Some("RSA-OAEP"), &vmk)
        .await
        .unwrap();
    assert_eq!(slot.algorithm, "RSA-OAEP");
    assert!(
        key.decrypt(rsa::Oaep::new::<sha2::Sha256>(), &slot.wrapped)
            .is_err(),
        "RSA-OAEP must not be OAEP-SHA256"
    );
    let back = provider
        .unwrap(&slot.key_id, "RSA-OAEP", &slot.wrapped)
        .await
        .unwrap();
    assert_eq!(back.expose(), vmk.expose());
}

#[tokio::test]
async fn managed_hsm_oct_key_wraps_per_rfc3394() {
    let kv = Kv::start();
    let admin = kv.admin_client(HSM);
    let mut kek = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut kek);
    let jwk = serde_json::json!({
        "key": { "kty": "oct-HSM", "k": b64(&kek), "key_ops": ["wrapKey", "unwrapKey"] }
    });
    admin
        .import_key(
            "aes-kek",
            RequestContent::from(serde_json::to_vec(&jwk).unwrap()),
            None,
        )
        .await
        .unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let provider = kv.provider(&p);
    let vmk = random_vmk();
    let reference = aes_kw::KekAes256::from(kek);

    // Default on Managed HSM: CKM_AES_KEY_WRAP; A256KW explicitly. Both are RFC 3394.
    for (asked, expect) in [(None, "CKM_AES_KEY_WRAP"), (Some("A256KW"), "A256KW")] {
        let slot = provider
            .wrap(&key_id(HSM, "aes-kek"), asked, &vmk)
            .await
            .unwrap();
        assert_eq!(slot.algorithm, expect);
        assert!(
            slot.key_id
                .starts_with(&format!("https://{HSM}/keys/aes-kek/"))
        );
        assert_eq!(slot.wrapped.len(), 72);
        let mut out = [0u8; 64];
        reference.unwrap(&slot.wrapped, &mut out).unwrap();
        assert_eq!(&out, vmk.expose());
        let back = provider
            .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
            .await
            .unwrap();
        assert_eq!(back.expose(), vmk.expose());
    }
}

#[tokio::test]
async fn rsa_hsm_key_round_trips() {
    let kv = Kv::start();
    kv.emu.create_key("hsm-rsa", "RSA-HSM", Some(3072)).unwrap();
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let vmk = random_vmk();
    let slot = provider
        .wrap(&key_id(VAULT, "hsm-rsa"), None, &vmk)
        .await
        .unwrap();
    assert_eq!(slot.algorithm, "RSA-OAEP-256");
    assert_eq!(slot.wrapped.len(), 384, "RSA-3072 ciphertext");
    let back = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap();
    assert_eq!(back.expose(), vmk.expose());
}

#[tokio::test]
async fn rotated_key_still_unwraps_old_slots() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let admin = kv.admin_client(VAULT);
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let vmk = random_vmk();
    let old = provider
        .wrap(&key_id(VAULT, "k"), None, &vmk)
        .await
        .unwrap();

    admin.rotate_key("k", None).await.unwrap();
    let latest = provider.latest_version(&key_id(VAULT, "k")).await.unwrap();
    assert_ne!(latest, old.key_id, "rotation made a new version");
    let new = provider
        .wrap(&key_id(VAULT, "k"), None, &vmk)
        .await
        .unwrap();
    assert_eq!(new.key_id, latest, "versionless wrap uses the new version");

    for slot in [&old, &new] {
        let back = provider
            .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
            .await
            .unwrap();
        assert_eq!(back.expose(), vmk.expose());
    }
}

#[tokio::test]
async fn expired_key_still_unwraps_but_refuses_wrap() {
    let kv = Kv::start();
    let version = kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let admin = kv.admin_client(VAULT);
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let vmk = random_vmk();
    let slot = provider
        .wrap(&key_id(VAULT, "k"), None, &vmk)
        .await
        .unwrap();

    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let body = serde_json::json!({ "attributes": { "exp": past } });
    admin
        .update_key_properties(
            "k",
            RequestContent::from(serde_json::to_vec(&body).unwrap()),
            Some(
                azure_security_keyvault_keys::models::KeyClientUpdateKeyPropertiesOptions {
                    key_version: Some(version),
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap();

    let back = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .expect("expiry is not revocation: unwrap still works");
    assert_eq!(back.expose(), vmk.expose());
    let err = provider
        .wrap(&key_id(VAULT, "k"), None, &vmk)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("KeyExpired"), VAULT, "k");
}

/// Sets up a key, a provider and one good slot.
async fn ready(kv: &Kv) -> (KeyVaultProvider, kvcrypt_keyvault::WrappedKey, String) {
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let provider = kv.provider(&p);
    let slot = provider
        .wrap(&key_id(VAULT, "k"), None, &random_vmk())
        .await
        .unwrap();
    (provider, slot, p.client_id)
}

#[tokio::test]
async fn revoked_permission_is_denied_and_restored_access_works() {
    let kv = Kv::start();
    let (provider, slot, who) = ready(&kv).await;
    kv.emu.revoke(&who, &[Op::Unwrap], None).unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(
        &err,
        ErrorClass::Denied,
        Some("ForbiddenByRbac"),
        VAULT,
        "k",
    );
    assert_eq!(err.status(), Some(403));
    assert!(
        err.to_string()
            .contains("Key Vault Crypto Service Encryption User"),
        "{err}"
    );

    kv.emu.grant(&who, &[Op::Unwrap], None).unwrap();
    provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .expect("access restored");
}

#[tokio::test]
async fn access_policy_vault_denies_with_access_denied() {
    let kv = Kv::start();
    let (provider, slot, who) = ready(&kv).await;
    kv.emu.set_mode(AuthMode::AccessPolicy);
    kv.emu.revoke(&who, &[Op::Unwrap], None).unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("AccessDenied"), VAULT, "k");
}

#[tokio::test]
async fn disabled_key_is_denied() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    kv.emu.set_key_enabled("k", None, false).unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("KeyDisabled"), VAULT, "k");
}

#[tokio::test]
async fn deleted_key_is_denied() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    kv.admin_client(VAULT).delete_key("k", None).await.unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("KeyNotFound"), VAULT, "k");
    assert_eq!(err.status(), Some(404));
}

#[tokio::test]
async fn firewall_is_denied() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    kv.emu.set_firewall(true);
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(
        &err,
        ErrorClass::Denied,
        Some("ForbiddenByFirewall"),
        VAULT,
        "k",
    );
}

#[tokio::test]
async fn deleted_principal_is_denied() {
    let kv = Kv::start();
    let (provider, slot, who) = ready(&kv).await;
    let cfg = provider.config().clone();
    kv.emu.delete_principal(&who).unwrap();
    // A fresh start (boot): Entra ID no longer knows the application.
    let fresh = KeyVaultProvider::new(&cfg).unwrap();
    let err = fresh
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(
        &err,
        ErrorClass::Denied,
        Some("unauthorized_client"),
        VAULT,
        "k",
    );
    assert!(err.failure().unwrap().from_identity);
    assert!(err.to_string().contains("AADSTS700016"), "{err}");
    // A running agent with a cached token: the vault refuses it one way or another.
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
}

#[tokio::test]
async fn wrong_client_secret_is_denied() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let cfg = kv.config(&p);
    if let kvcrypt_keyvault::CredentialConfig::ClientSecret(c) = &cfg.credential {
        std::fs::write(c.secret_file.as_ref().unwrap(), "not-the-secret\n").unwrap();
    }
    let provider = KeyVaultProvider::new(&cfg).unwrap();
    let err = provider
        .wrap(&key_id(VAULT, "k"), None, &random_vmk())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert_eq!(err.code(), Some("invalid_client"));
    assert!(err.to_string().contains("AADSTS7000215"), "{err}");
    assert!(
        !err.to_string().contains("not-the-secret"),
        "secrets never appear in messages"
    );
}

#[tokio::test]
async fn server_errors_are_transient_and_retried() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    for status in [500u16, 503] {
        kv.emu
            .inject_fault(Fault::new(FaultKind::Status { status }));
        let err = provider
            .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
            .await
            .unwrap_err();
        assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
        assert_eq!(err.status(), Some(status));
        kv.emu.clear_faults();
    }
    // One failure is absorbed by the retry policy.
    kv.emu
        .inject_fault(Fault::new(FaultKind::Status { status: 503 }).times(1));
    provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .expect("a single 503 is retried");
}

#[tokio::test]
async fn throttling_is_transient_with_and_without_retry_after() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    for retry_after in [Some(1), None] {
        kv.emu
            .inject_fault(Fault::new(FaultKind::Throttle { retry_after }));
        let err = provider
            .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
            .await
            .unwrap_err();
        assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
        // Either the retries ran out (429 Throttled) or a long Retry-After hit the deadline.
        assert!(
            err.code() == Some("Throttled") || matches!(err, KeyError::Timeout { .. }),
            "{err}"
        );
        kv.emu.clear_faults();
    }
}

#[tokio::test]
async fn hung_server_is_transient_within_the_deadline() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    kv.emu.inject_fault(Fault::new(FaultKind::Hang));
    let start = Instant::now();
    // The outer guard only keeps a broken deadline from hanging the test suite.
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        provider.unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped),
    )
    .await
    .expect("the provider's own deadline must end the call");
    let elapsed = start.elapsed();
    let err = result.unwrap_err();
    assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
    eprintln!(
        "hung server declared Transient after {:.2} s (deadline {} ms): {err}",
        elapsed.as_secs_f64(),
        provider.config().deadline_ms
    );
    kv.emu.clear_faults();
}

#[tokio::test]
async fn connection_reset_is_transient() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    kv.emu.inject_fault(Fault::new(FaultKind::Reset));
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
}

#[tokio::test]
async fn token_endpoint_failure_is_transient() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    kv.emu
        .inject_fault(Fault::new(FaultKind::Status { status: 503 }).target(FaultTarget::Token));
    let err = provider
        .wrap(&key_id(VAULT, "k"), None, &random_vmk())
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
    assert!(err.failure().unwrap().from_identity, "{err}");
}

#[tokio::test]
async fn unknown_ca_fails_tls_and_is_transient() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let mut cfg = kv.config(&kv.principal("host1", CRYPTO_USER));
    cfg.ca_file = None;
    let provider = KeyVaultProvider::new(&cfg).unwrap();
    let err = provider
        .wrap(&key_id(VAULT, "k"), None, &random_vmk())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("certificate") || msg.contains("tls"), "{msg}");
    let (counters, _) = kv.emu.requests();
    assert_eq!(
        counters.total, 0,
        "no request may pass an unverified TLS connection"
    );
}

#[tokio::test]
async fn challenge_from_foreign_domain_is_refused() {
    // A server that answers for `myvault.vault.example.net` (trusted certificate and all) but
    // challenges for the Key Vault resource: the SDK must not send it a token.
    let kv = {
        let mut c = EmulatorConfig::default();
        c.hosts.push("myvault.vault.example.net".into());
        let emu = kvcrypt_kv_emulator::Emulator::start(c).unwrap();
        Kv {
            emu,
            dir: tempfile::tempdir().unwrap(),
        }
    };
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let mut cfg = kv.config(&kv.principal("host1", CRYPTO_USER));
    cfg.resolve.push(format!(
        "myvault.vault.example.net:443:127.0.0.1:{}",
        kv.emu.port()
    ));
    let provider = KeyVaultProvider::new(&cfg).unwrap();
    let err = provider
        .wrap(
            "https://myvault.vault.example.net/keys/k",
            None,
            &random_vmk(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured, "{err}");
    assert_eq!(err.code(), Some("ChallengeMismatch"), "{err}");
    let (_, log) = kv.emu.requests();
    assert!(
        log.iter().all(|e| !e.path.contains("token")),
        "no token may be requested for a mismatched challenge: {log:?}"
    );
}

#[tokio::test]
async fn wrong_algorithm_for_key_is_misconfigured() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let err = provider
        .wrap(&key_id(VAULT, "k"), Some("A256KW"), &random_vmk())
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Misconfigured, None, VAULT, "k");
    assert_eq!(err.status(), Some(400));
}

#[tokio::test]
async fn unwrap_of_a_non_vmk_is_rejected() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let admin = kv.admin_client(VAULT);
    // A slot holding a 32-byte key, made directly through the SDK.
    let body = serde_json::json!({ "alg": "RSA-OAEP-256", "value": b64(&[5u8; 32]) });
    let res = admin
        .wrap_key(
            "k",
            RequestContent::from(serde_json::to_vec(&body).unwrap()),
            None,
        )
        .await
        .unwrap()
        .into_model()
        .unwrap();
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let err = provider
        .unwrap(
            res.kid.as_deref().unwrap(),
            "RSA-OAEP-256",
            res.result.as_deref().unwrap(),
        )
        .await
        .unwrap_err();
    assert_err(
        &err,
        ErrorClass::Misconfigured,
        Some("WrongKeyLength"),
        VAULT,
        "k",
    );
}

#[tokio::test]
async fn local_mistakes_are_misconfigured_without_traffic() {
    let kv = Kv::start();
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let vmk = random_vmk();
    for bad in [
        "https://127.0.0.1/keys/k",
        "http://myvault.vault.azure.net/keys/k",
        "https://myvault.vault.azure.net/secrets/k",
    ] {
        let err = provider.wrap(bad, None, &vmk).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::Misconfigured, "{bad}: {err}");
    }
    let err = provider
        .wrap(&key_id(VAULT, "k"), Some("RSA1_5"), &vmk)
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured);
    let err = provider
        .unwrap(&key_id(VAULT, "k"), "RSA-OAEP-256", &[1; 256])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no version"), "{err}");
    let (counters, _) = kv.emu.requests();
    assert_eq!(counters.total, 0);
    assert!(KeyId::parse("https://myvault.vault.azure.net/keys/k/abc").is_ok());
}

#[test]
fn blocking_provider_round_trip() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let provider = BlockingProvider::new(&kv.config(&p)).unwrap();
    let vmk = random_vmk();
    let slot = provider.wrap(&key_id(VAULT, "k"), None, &vmk).unwrap();
    assert_eq!(
        provider.latest_version(&key_id(VAULT, "k")).unwrap(),
        slot.key_id
    );
    let back = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .unwrap();
    assert_eq!(back.expose(), vmk.expose());
}

/// Nothing listens where the vault and the token endpoint are (the vault down at boot, as in
/// the system test): a network failure, so Transient — not a configuration mistake. Seen in
/// the system test: the token request's "connection refused" came back as Misconfigured.
#[tokio::test]
async fn vault_and_token_endpoint_unreachable_is_transient() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let mut cfg = kv.config(&kv.principal("host1", CRYPTO_USER));
    // A loopback port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.resolve = cfg
        .resolve
        .iter()
        .map(|r| {
            let (host, _) = r.rsplit_once(':').unwrap();
            format!("{host}:{closed}")
        })
        .collect();
    let provider = KeyVaultProvider::new(&cfg).unwrap();
    let err = provider
        .wrap(&key_id(VAULT, "k"), None, &random_vmk())
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
}

// ---------------------------------------------------------------------------------------------
// Only Key Vault's own error answers revoke: whatever else answers (a proxy's HTML page, an empty
// body, some other JSON, a 401 without the vault's challenge) is Transient.

/// The answers injected for `fault`, and the status each must report.
fn foreign_faults() -> Vec<(FaultKind, u16)> {
    vec![
        (FaultKind::Html { status: 403 }, 403),
        (FaultKind::Html { status: 404 }, 404),
        (FaultKind::Empty { status: 403 }, 403),
        (FaultKind::Empty { status: 404 }, 404),
        (FaultKind::ForeignJson { status: 403 }, 403),
        (FaultKind::ForeignJson { status: 404 }, 404),
        (FaultKind::UnauthorizedNoChallenge, 401),
    ]
}

#[tokio::test]
async fn answers_that_are_not_key_vaults_are_transient() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    for (fault, status) in foreign_faults() {
        kv.emu.inject_fault(Fault::new(fault.clone()));
        let err = provider
            .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
            .await
            .unwrap_err();
        assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
        assert_eq!(err.status(), Some(status), "{fault:?}: {err}");
        assert_eq!(
            err.code(),
            None,
            "an unverified answer's code is not trusted: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("not a Key Vault error answer, treated as transient"),
            "{fault:?}: {msg}"
        );
        assert!(msg.contains(&format!("HTTP {status}")), "{fault:?}: {msg}");
        match fault {
            FaultKind::Html { .. } => {
                assert!(msg.contains("content-type text/html"), "{msg}");
                assert!(msg.contains("<html> <head><title>"), "{msg}");
            }
            FaultKind::Empty { .. } => assert!(msg.contains("empty body"), "{msg}"),
            FaultKind::ForeignJson { .. } => {
                assert!(msg.contains("Access denied by the gateway policy"), "{msg}")
            }
            _ => {
                assert!(
                    msg.contains("without a Bearer challenge that persisted"),
                    "{msg}"
                );
                assert!(!msg.contains("freshly obtained"), "{msg}");
            }
        }
        kv.emu.clear_faults();
        provider
            .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
            .await
            .expect("the vault answers again");
    }
}

#[tokio::test]
async fn a_fresh_client_meeting_a_challenge_less_401_is_transient() {
    // The first request of a new client carries no token: a 401 without a challenge then says
    // nothing about this identity.
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    let fresh = KeyVaultProvider::new(provider.config()).unwrap();
    kv.emu.clear_requests();
    kv.emu
        .inject_fault(Fault::new(FaultKind::UnauthorizedNoChallenge));
    let err = fresh
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
    assert_eq!(err.status(), Some(401));
    assert!(!err.to_string().contains("freshly obtained"), "{err}");
    // Without a challenge the SDK never fetched a token: nothing was tried with one.
    let (_, log) = kv.emu.requests();
    assert!(
        log.iter().all(|e| e.op.as_deref() != Some("token")),
        "{log:?}"
    );
    assert_eq!(log.len(), 1, "{log:?}");
}

#[tokio::test]
async fn keyed_fault_hits_only_that_key() {
    let kv = Kv::start();
    let (provider, slot, _) = ready(&kv).await;
    kv.emu.create_key("other", "RSA", Some(2048)).unwrap();
    let other = provider
        .wrap(&key_id(VAULT, "other"), None, &random_vmk())
        .await
        .unwrap();
    kv.emu
        .inject_fault(Fault::new(FaultKind::Html { status: 403 }).for_key("K"));
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
    provider
        .unwrap(&other.key_id, &other.algorithm, &other.wrapped)
        .await
        .expect("another key is not affected");
}

#[tokio::test]
async fn token_endpoint_answers_that_are_not_entra_ids_are_transient() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    for fault in [
        FaultKind::Html { status: 403 },
        FaultKind::Empty { status: 400 },
        FaultKind::Empty { status: 401 },
        FaultKind::ForeignJson { status: 400 },
    ] {
        // A new provider each time: no cached token, so the token endpoint is asked.
        let provider = kv.provider(&p);
        kv.emu
            .inject_fault(Fault::new(fault.clone()).target(FaultTarget::Token));
        let err = provider
            .wrap(&key_id(VAULT, "k"), None, &random_vmk())
            .await
            .unwrap_err();
        assert_err(&err, ErrorClass::Transient, None, VAULT, "k");
        assert!(err.failure().unwrap().from_identity, "{err}");
        assert!(
            err.to_string()
                .contains("not an Entra ID or managed identity error answer"),
            "{fault:?}: {err}"
        );
        kv.emu.clear_faults();
    }
}

#[tokio::test]
async fn challenge_that_persists_after_a_fresh_token_is_denied() {
    // Every token the emulator issues is already expired: Key Vault challenges the request, the
    // SDK fetches a new token and re-sends, and Key Vault challenges again.
    let kv = {
        let c = EmulatorConfig {
            token_lifetime: Duration::ZERO,
            ..EmulatorConfig::default()
        };
        Kv {
            emu: kvcrypt_kv_emulator::Emulator::start(c).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    };
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let provider = kv.provider(&kv.principal("host1", CRYPTO_USER));
    let err = provider
        .wrap(&key_id(VAULT, "k"), Some("RSA-OAEP-256"), &random_vmk())
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("Unauthorized"), VAULT, "k");
    assert_eq!(err.status(), Some(401));
    assert!(err.to_string().contains("freshly obtained token"), "{err}");
    let (_, log) = kv.emu.requests();
    let tokens = log
        .iter()
        .filter(|e| e.op.as_deref() == Some("token"))
        .count();
    assert!(tokens >= 1, "a token was obtained: {log:?}");
}

#[tokio::test]
async fn real_key_vault_denials_stay_denied_next_to_foreign_faults() {
    // The same vault, the same provider: Key Vault's own 403 and 404 still revoke.
    let kv = Kv::start();
    let (provider, slot, who) = ready(&kv).await;
    kv.emu.revoke(&who, &[Op::Unwrap], None).unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(
        &err,
        ErrorClass::Denied,
        Some("ForbiddenByRbac"),
        VAULT,
        "k",
    );
    kv.emu.grant(&who, &[Op::Unwrap], None).unwrap();
    kv.emu.set_key_enabled("k", None, false).unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("KeyDisabled"), VAULT, "k");
    kv.emu.set_key_enabled("k", None, true).unwrap();
    kv.admin_client(VAULT).delete_key("k", None).await.unwrap();
    let err = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await
        .unwrap_err();
    assert_err(&err, ErrorClass::Denied, Some("KeyNotFound"), VAULT, "k");
}
