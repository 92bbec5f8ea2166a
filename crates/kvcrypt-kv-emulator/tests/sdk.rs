//! The official Azure SDK crates (`azure_identity`, `azure_security_keyvault_keys`) against
//! the emulator, unmodified: TLS verified against the emulator's CA, the vault reached by its
//! real-looking host name (mapped to 127.0.0.1) and the SDK's challenge-resource check ON.

use azure_core::http::{ClientOptions, Transport};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
use azure_security_keyvault_keys::{
    KeyClient, KeyClientOptions,
    models::{EncryptionAlgorithm, KeyOperationParameters},
};
use kvcrypt_kv_emulator::{Emulator, EmulatorConfig, Op};
use kvcrypt_testkit::emulator::rest::client;
use std::sync::Arc;

fn client_options(http: &reqwest::Client, authority: &str) -> ClientOptions {
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = authority.to_string();
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http.clone()))),
        cloud: Some(Arc::new(cloud.into())),
        retry: azure_core::http::RetryOptions::none(),
        ..Default::default()
    }
}

#[tokio::test]
async fn official_sdk_wraps_and_unwraps_through_the_emulator() {
    let emu = Emulator::start(EmulatorConfig::default()).unwrap();
    let version = emu.create_key("cmk", "RSA", Some(2048)).unwrap();
    let p = emu.create_secret_principal("sdk-app").unwrap();
    emu.grant(&p.client_id, &[Op::Get, Op::Wrap, Op::Unwrap], Some("cmk"))
        .unwrap();
    // The emulator-aware client (CA + host mapping) is the SDK transport as is.
    let http = client(&emu);
    let cred = ClientSecretCredential::new(
        emu.tenant_id(),
        p.client_id.clone(),
        p.secret.clone().unwrap().into(),
        Some(ClientSecretCredentialOptions {
            client_options: client_options(&http, &emu.authority_host()),
        }),
    )
    .unwrap();
    let kopts = KeyClientOptions {
        client_options: client_options(&http, &emu.authority_host()),
        ..Default::default()
    };
    // verify_challenge_resource stays at its default (true).
    let kc = KeyClient::new(&emu.vault_url("myvault"), cred, Some(kopts)).unwrap();

    let key = kc.get_key("cmk", None).await.unwrap().into_model().unwrap();
    let kid = key.key.as_ref().and_then(|k| k.kid.clone()).unwrap();
    assert_eq!(
        kid,
        format!(
            "https://myvault.vault.azure.net:{}/keys/cmk/{version}",
            emu.port()
        )
    );

    let vmk = vec![0x5au8; 64];
    let params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: Some(vmk.clone()),
        ..Default::default()
    };
    let wrapped = kc
        .wrap_key("cmk", params.try_into().unwrap(), None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(wrapped.kid.as_deref(), Some(kid.as_str()));
    let params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: wrapped.result.clone(),
        ..Default::default()
    };
    let unwrapped = kc
        .unwrap_key("cmk", &version, params.try_into().unwrap(), None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(unwrapped.result.as_deref(), Some(vmk.as_slice()));

    // Revocation surfaces as an HTTP 403 whose raw body carries ForbiddenByRbac.
    emu.revoke(&p.client_id, &[Op::Unwrap], None).unwrap();
    let params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: wrapped.result.clone(),
        ..Default::default()
    };
    let err = kc
        .unwrap_key("cmk", &version, params.try_into().unwrap(), None)
        .await
        .expect_err("revoked");
    match err.kind() {
        azure_core::error::ErrorKind::HttpResponse {
            status,
            raw_response,
            ..
        } => {
            assert_eq!(u16::from(*status), 403);
            let body = raw_response
                .as_ref()
                .map(|r| r.body().to_vec())
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["innererror"]["code"], "ForbiddenByRbac");
        }
        other => panic!("unexpected error kind {other:?}"),
    }
}
