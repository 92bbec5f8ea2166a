//! Helpers shared by the emulator integration tests: a reqwest client that trusts the
//! emulator's CA and maps real vault host names to 127.0.0.1 (like the provider's
//! `resolve` setting), and token / REST shorthands.
#![allow(dead_code)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kvcrypt_kv_emulator::{EmulatorHandle, Op, PrincipalInfo};
use serde_json::{Value, json};

pub const VAULT: &str = "myvault.vault.azure.net";
pub const HSM: &str = "myhsm.managedhsm.azure.net";

pub fn client(emu: &EmulatorHandle) -> reqwest::Client {
    let addr = emu.addr();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(emu.ca_pem().as_bytes()).expect("CA PEM")])
        .resolve(VAULT, addr)
        .resolve(HSM, addr)
        .resolve("login.microsoftonline.com", addr)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client")
}

pub fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).expect("base64url")
}

/// Client-credentials token for `p` (secret flow) for the given resource.
pub async fn token(
    c: &reqwest::Client,
    emu: &EmulatorHandle,
    p: &PrincipalInfo,
    resource: &str,
) -> String {
    let r = c
        .post(emu.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", p.client_id.as_str()),
            ("client_secret", p.secret.as_deref().unwrap_or_default()),
            ("scope", &format!("{resource}/.default")),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// A principal with every permission vault-wide and a vault token.
pub async fn admin_principal(c: &reqwest::Client, emu: &EmulatorHandle) -> (PrincipalInfo, String) {
    let p = emu
        .create_secret_principal("test-admin")
        .expect("principal");
    emu.grant(&p.client_id, &Op::ALL, None).expect("grant");
    let t = token(c, emu, &p, "https://vault.azure.net").await;
    (p, t)
}

pub fn url(emu: &EmulatorHandle, host: &str, path: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!(
        "https://{host}:{}{path}{sep}api-version=2025-07-01",
        emu.port()
    )
}

pub async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = c.request(method, url).bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).expect("JSON body")
    };
    (status, headers, v)
}

pub async fn wrap(
    c: &reqwest::Client,
    u: &str,
    token: &str,
    alg: &str,
    data: &[u8],
) -> (u16, Value) {
    let (s, _, v) = call(
        c,
        reqwest::Method::POST,
        u,
        token,
        Some(json!({"alg": alg, "value": b64(data)})),
    )
    .await;
    (s, v)
}

pub fn inner_code(v: &Value) -> Option<&str> {
    v["error"]["innererror"]["code"].as_str()
}
