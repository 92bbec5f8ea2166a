//! Key lifecycle: disabled keys, rotation policies and automatic rotation on the emulator's
//! clock.

use kvcrypt_testkit::emulator::VAULT;
use kvcrypt_testkit::emulator::rest::{Api, admin_session, inner_code};

#[tokio::test]
async fn disabled_key_is_readable_but_refuses_cryptography() {
    let (emu, c, t) = admin_session().await;
    let vault = Api::new(&c, &emu, &t, VAULT);
    let version = emu.create_key("kek", "RSA", Some(2048)).unwrap();
    emu.set_key_enabled("kek", None, false).unwrap();

    // GET of the latest and of the named version: 200 with enabled=false, as the service.
    for path in ["/keys/kek".to_string(), format!("/keys/kek/{version}")] {
        let (s, v) = vault.get(&path).await;
        assert_eq!(s, 200, "GET {path} of a disabled key: {v}");
        assert_eq!(v["attributes"]["enabled"], false, "{path}: {v}");
        assert!(
            v["key"]["kid"].as_str().unwrap().ends_with(&version),
            "{path}: {v}"
        );
        assert!(v["key"]["n"].is_string(), "{path}: public JWK: {v}");
    }
    let (s, v) = vault.get("/keys").await;
    assert_eq!(s, 200);
    assert_eq!(v["value"][0]["attributes"]["enabled"], false, "{v}");

    // Every cryptographic operation is refused with KeyDisabled.
    for (op, name) in [
        ("wrapkey", "wrapKey"),
        ("unwrapkey", "unwrapKey"),
        ("encrypt", "encrypt"),
        ("decrypt", "decrypt"),
    ] {
        let data = if op.starts_with("un") || op == "decrypt" {
            vec![0u8; 256]
        } else {
            vec![7u8; 32]
        };
        let (s, v) = vault
            .wrap(&format!("/keys/kek/{version}/{op}"), "RSA-OAEP-256", &data)
            .await;
        assert_eq!((s, inner_code(&v)), (403, Some("KeyDisabled")), "{op}: {v}");
        assert_eq!(
            v["error"]["message"],
            format!("Operation {name} is not allowed on a disabled key.")
        );
    }

    // Re-enabled: wrapping works again.
    emu.set_key_enabled("kek", None, true).unwrap();
    let (s, v) = vault
        .wrap("/keys/kek//wrapkey", "RSA-OAEP-256", &[7u8; 32])
        .await;
    assert_eq!(s, 200, "{v}");
}
