//! `latest_version` against the emulator: Key Vault answers GET of a disabled version with
//! 200 and `enabled: false`, so the provider itself must refuse a disabled latest version
//! rather than hand it out for wrapping new slots.

use kvcrypt_keyvault::ErrorClass;
use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::emulator::{Kv, VAULT, key_id};

#[tokio::test]
async fn a_disabled_latest_version_is_never_chosen() {
    let kv = Kv::start();
    let v1 = kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let v2 = kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let provider = kv.provider(&kv.principal("host", &[Op::Get, Op::Wrap, Op::Unwrap]));
    let id = key_id(VAULT, "k");
    let latest = provider.latest_version(&id).await.unwrap();
    assert!(latest.ends_with(&format!("/keys/k/{v2}")), "{latest}");

    kv.emu.set_key_enabled("k", Some(&v2), false).unwrap();
    let err = provider
        .latest_version(&id)
        .await
        .expect_err("a disabled latest version must not be chosen");
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert_eq!(err.code(), Some("KeyDisabled"), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("disabled") && msg.contains(&v2), "{msg}");
    assert!(!msg.contains(&v1), "{msg}");

    kv.emu.set_key_enabled("k", Some(&v2), true).unwrap();
    assert_eq!(provider.latest_version(&id).await.unwrap(), latest);
}
