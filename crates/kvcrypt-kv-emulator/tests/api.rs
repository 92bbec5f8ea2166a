//! The emulator's REST surface driven with plain reqwest over verified TLS: tokens, the 401
//! challenge, the keys API, real cryptography cross-checked with independent code, error
//! bodies, faults, and persistence across a restart.

use kvcrypt_kv_emulator::{
    AuthMode, Emulator, EmulatorConfig, Fault, FaultKind, FaultTarget, NewPrincipal, Op,
    PrincipalKind,
};
use kvcrypt_testkit::data::{b64, hex, unb64};
use kvcrypt_testkit::emulator::rest::*;
use kvcrypt_testkit::emulator::{HSM, VAULT};
use kvcrypt_testkit::table;
use reqwest::Method;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Oaep, RsaPrivateKey};
use serde_json::{Value, json};
use std::sync::OnceLock;

/// One customer key for the whole test binary (RSA generation is slow-ish).
fn customer_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa keygen"))
}

fn rsa_jwk(k: &RsaPrivateKey) -> Value {
    use rsa::traits::PrivateKeyParts;
    let b = |x: &BigUint| b64(&x.to_bytes_be());
    let primes = k.primes();
    json!({
        "kty": "RSA", "key_ops": ["wrapKey", "unwrapKey", "encrypt", "decrypt"],
        "n": b(k.n()), "e": b(k.e()), "d": b(k.d()),
        "p": b(&primes[0]), "q": b(&primes[1]),
    })
}

fn start() -> kvcrypt_kv_emulator::EmulatorHandle {
    Emulator::start(EmulatorConfig::default()).expect("emulator starts")
}

#[tokio::test]
async fn client_credentials_success_shape() {
    let emu = start();
    let c = client(&emu);
    let p = emu.create_secret_principal("app").unwrap();
    // Success shape (what azure_identity parses).
    let r = c
        .post(emu.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &p.client_id),
            ("client_secret", p.secret.as_deref().unwrap()),
            ("scope", "https://vault.azure.net/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_i64().unwrap() > 3000);
    assert!(!v["access_token"].as_str().unwrap().is_empty());
}

/// Who asks for a token in a [`TokenCase`].
#[derive(Clone, Copy)]
enum Asker {
    /// A registered application.
    App,
    /// A client id Entra ID never heard of.
    Unknown,
    /// An application that was registered, then removed.
    Removed,
}

/// A client-credentials request that must fail, and Entra ID's answer.
#[derive(Clone, Copy)]
struct TokenCase {
    asker: Asker,
    /// The application's real secret (else a wrong one).
    right_secret: bool,
    /// The emulator's tenant (else another).
    our_tenant: bool,
    scope: &'static str,
    status: u16,
    error: Option<&'static str>,
    code: Option<i64>,
    description: Option<&'static str>,
}

const DEFAULT_SCOPE: &str = "https://vault.azure.net/.default";

fn token_cases() -> Vec<(&'static str, TokenCase)> {
    let base = TokenCase {
        asker: Asker::App,
        right_secret: true,
        our_tenant: true,
        scope: DEFAULT_SCOPE,
        status: 400,
        error: None,
        code: None,
        description: None,
    };
    vec![
        (
            "wrong secret: 401 invalid_client AADSTS7000215",
            TokenCase {
                right_secret: false,
                status: 401,
                error: Some("invalid_client"),
                code: Some(7000215),
                description: Some("AADSTS7000215: Invalid client secret provided."),
                ..base
            },
        ),
        (
            "unknown app: 400 unauthorized_client AADSTS700016",
            TokenCase {
                asker: Asker::Unknown,
                right_secret: false,
                error: Some("unauthorized_client"),
                code: Some(700016),
                ..base
            },
        ),
        (
            "unknown tenant: 400 AADSTS90002",
            TokenCase {
                our_tenant: false,
                code: Some(90002),
                ..base
            },
        ),
        (
            "removed principal behaves like an unknown app",
            TokenCase {
                asker: Asker::Removed,
                code: Some(700016),
                ..base
            },
        ),
        (
            "scope without /.default: invalid_scope",
            TokenCase {
                right_secret: false,
                scope: "https://vault.azure.net",
                error: Some("invalid_scope"),
                ..base
            },
        ),
    ]
}

#[tokio::test]
async fn identity_errors() {
    table::rows_async(token_cases(), |name, t| async move {
        let emu = start();
        let c = client(&emu);
        let p = emu.create_secret_principal("app").unwrap();
        let client_id = match t.asker {
            Asker::App => p.client_id.clone(),
            Asker::Unknown => "00000000-1111-2222-3333-444444444444".to_string(),
            Asker::Removed => {
                emu.delete_principal(&p.client_id).unwrap();
                p.client_id.clone()
            }
        };
        let secret = if t.right_secret {
            p.secret.clone().unwrap()
        } else {
            "wrong".to_string()
        };
        let mut form = secret_form(&client_id, &secret);
        form[3].1 = t.scope.to_string();
        let tenant = if t.our_tenant {
            emu.tenant_id().to_string()
        } else {
            "other-tenant".to_string()
        };
        let (s, v) = token_request(&c, &emu, &tenant, &form).await;
        assert_eq!(s, t.status, "{name}: {v}");
        if let Some(error) = t.error {
            assert_eq!(v["error"], error, "{name}: {v}");
        }
        if let Some(code) = t.code {
            assert_eq!(v["error_codes"], json!([code]), "{name}: {v}");
        }
        if let Some(d) = t.description {
            let got = v["error_description"].as_str().unwrap_or_default();
            assert!(got.starts_with(d), "{name}: {got}");
        }
    })
    .await;
}

/// Which managed identity endpoint a [`MsiCase`] asks, and whether it sends the header that
/// proves it runs on the host (`X-IDENTITY-HEADER` on App Service, `Metadata: true` on IMDS).
#[derive(Clone, Copy)]
enum MsiEndpoint {
    AppService { proof: bool },
    Imds { proof: bool },
}

/// Which identity the request names (`client_id`), and which one the token is then for.
#[derive(Clone, Copy, PartialEq)]
enum Identity {
    /// None named: the system-assigned identity.
    System,
    User,
    Unknown,
}

#[derive(Clone, Copy)]
struct MsiCase {
    endpoint: MsiEndpoint,
    asks: Identity,
    status: u16,
    description: Option<&'static str>,
}

fn msi_cases() -> Vec<(&'static str, MsiCase)> {
    use Identity::*;
    use MsiEndpoint::*;
    let row = |endpoint, asks, status, description| MsiCase {
        endpoint,
        asks,
        status,
        description,
    };
    vec![
        (
            "App Service needs X-IDENTITY-HEADER",
            row(AppService { proof: false }, System, 401, None),
        ),
        (
            "App Service, system-assigned",
            row(AppService { proof: true }, System, 200, None),
        ),
        (
            "App Service, a user-assigned identity by client_id",
            row(AppService { proof: true }, User, 200, None),
        ),
        (
            "IMDS needs the Metadata header",
            row(Imds { proof: false }, System, 400, None),
        ),
        (
            "IMDS, unknown identity",
            row(
                Imds { proof: true },
                Unknown,
                400,
                Some("Identity not found"),
            ),
        ),
        (
            "IMDS, system-assigned; its token works once granted",
            row(Imds { proof: true }, System, 200, None),
        ),
    ]
}

#[tokio::test]
async fn managed_identity_endpoints() {
    table::rows_async(msi_cases(), |name, m| async move {
        let emu = start();
        let c = client(&emu);
        let mi = emu.create_msi_principal("vm", true).unwrap();
        let user = emu
            .create_principal(NewPrincipal {
                kind: PrincipalKind::Msi,
                name: Some("user-assigned".into()),
                ..Default::default()
            })
            .unwrap();
        let q = "api-version=2019-08-01&resource=https://vault.azure.net";
        let (base, header, value) = match m.endpoint {
            MsiEndpoint::AppService { proof } => (
                emu.msi_endpoint(),
                proof.then_some("X-IDENTITY-HEADER"),
                emu.identity_header().to_string(),
            ),
            MsiEndpoint::Imds { proof } => (
                emu.imds_endpoint(),
                proof.then_some("Metadata"),
                "true".into(),
            ),
        };
        let query = match m.asks {
            Identity::System => q.to_string(),
            Identity::User => format!("{q}&client_id={}", user.client_id),
            Identity::Unknown => format!("{q}&client_id=nope"),
        };
        let mut rb = c.get(format!("{base}?{query}"));
        if let Some(h) = header {
            rb = rb.header(h, value);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), m.status, "{name}");
        if m.status == 401 {
            return;
        }
        // Not every refusal has a JSON body; only the rows that check one need it.
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if let Some(d) = m.description {
            assert_eq!(v["error_description"], d, "{name}");
        }
        if m.status != 200 {
            return;
        }
        let want = if m.asks == Identity::User { &user } else { &mi };
        assert_eq!(v["client_id"], want.client_id, "{name}");
        match m.endpoint {
            MsiEndpoint::AppService { .. } if m.asks == Identity::System => {
                assert_eq!(v["resource"], "https://vault.azure.net", "{name}");
                assert_eq!(v["token_type"], "Bearer", "{name}");
                // expires_on is a *string* of Unix seconds on App Service.
                let on = v["expires_on"].as_str().unwrap_or_default();
                assert!(on.parse::<i64>().is_ok(), "{name}: {v}");
            }
            MsiEndpoint::Imds { .. } => {
                // An MSI token works against the vault once granted.
                let tok = v["access_token"].as_str().unwrap().to_string();
                emu.grant(&mi.client_id, &[Op::List], None).unwrap();
                let (s, _, _) = call(&c, Method::GET, &url(&emu, VAULT, "/keys"), &tok, None).await;
                assert_eq!(s, 200, "{name}");
            }
            _ => {}
        }
    })
    .await;
}

#[tokio::test]
async fn challenge_and_bad_tokens() {
    let emu = start();
    let c = client(&emu);
    for (host, resource) in [
        (VAULT, "https://vault.azure.net"),
        (HSM, "https://managedhsm.azure.net"),
    ] {
        let r = c.get(url(&emu, host, "/keys/k")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            challenge,
            format!(
                "Bearer authorization=\"https://login.microsoftonline.com/{}\", resource=\"{resource}\"",
                emu.tenant_id()
            )
        );
        // The SDK's check: the request host must end with "." + the challenge host.
        let challenge_host = resource.trim_start_matches("https://");
        assert!(host.ends_with(&format!(".{challenge_host}")));
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})
        );
    }
    // Unknown token → 401 with the challenge again.
    let (s, h, v) = call(&c, Method::GET, &url(&emu, VAULT, "/keys"), "bogus", None).await;
    assert_eq!(s, 401);
    assert!(h.contains_key("www-authenticate"));
    assert_eq!(v["error"]["code"], "Unauthorized");
    // A vault token presented to a Managed HSM → invalid audience.
    let (_p, t) = admin_principal(&c, &emu).await;
    let hsm = Api::new(&c, &emu, &t, HSM);
    let (s, _, v) = hsm.call(Method::GET, "/keys", None).await;
    assert_eq!(s, 401);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("AKV10022")
    );
}

#[tokio::test]
async fn key_lifecycle() {
    let (emu, c, t) = admin_session().await;
    let vault = Api::new(&c, &emu, &t, VAULT);
    let (s, _, v) = vault
        .call(
            Method::POST,
            "/keys/kek/create",
            Some(json!({"kty": "RSA", "key_size": 2048})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let kid1 = v["key"]["kid"].as_str().unwrap().to_string();
    let prefix = format!("https://{VAULT}:{}/keys/kek/", emu.port());
    assert!(kid1.starts_with(&prefix), "{kid1}");
    let v1 = kid1.trim_start_matches(&prefix).to_string();
    assert_eq!(v1.len(), 32);
    assert_eq!(v["key"]["kty"], "RSA");
    assert_eq!(unb64(v["key"]["n"].as_str().unwrap()).len(), 256);
    assert!(v["key"].get("d").is_none() && v["key"].get("p").is_none());
    assert_eq!(v["attributes"]["enabled"], true);
    assert_eq!(v["attributes"]["recoveryLevel"], "Recoverable+Purgeable");

    // Rotate → a second version, which is now "latest".
    let (s, _, v) = vault.call(Method::POST, "/keys/kek/rotate", None).await;
    assert_eq!(s, 200);
    let kid2 = v["key"]["kid"].as_str().unwrap().to_string();
    assert_ne!(kid1, kid2);
    let (_, _, v) = vault.call(Method::GET, "/keys/kek/", None).await;
    assert_eq!(v["key"]["kid"], kid2.as_str());
    let (_, _, v) = vault
        .call(Method::GET, &format!("/keys/kek/{v1}"), None)
        .await;
    assert_eq!(v["key"]["kid"], kid1.as_str());
    let (s, _, v) = vault.call(Method::GET, "/keys/kek/versions", None).await;
    assert_eq!(s, 200);
    let kids: Vec<&str> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec![kid1.as_str(), kid2.as_str()]);

    // Update attributes: disable v1 → GET still answers (enabled=false, as the service does:
    // reading a disabled key's public part is allowed), unwrap refused with KeyDisabled.
    let (s, _, v) = vault
        .call(
            Method::PATCH,
            &format!("/keys/kek/{v1}"),
            Some(json!({"attributes": {"enabled": false, "exp": 4102444800i64}})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["attributes"]["enabled"], false);
    assert_eq!(v["attributes"]["exp"], 4102444800i64);
    let (s, _, v) = vault
        .call(Method::GET, &format!("/keys/kek/{v1}"), None)
        .await;
    assert_eq!(s, 200, "GET of a disabled version: {v}");
    assert_eq!(v["key"]["kid"], kid1.as_str());
    assert_eq!(v["attributes"]["enabled"], false);
    let (s, v) = vault
        .wrap(
            &format!("/keys/kek/{v1}/unwrapkey"),
            "RSA-OAEP-256",
            &[0u8; 256],
        )
        .await;
    assert_eq!((s, inner_code(&v)), (403, Some("KeyDisabled")));
    assert_eq!(
        v["error"]["message"],
        "Operation unwrapKey is not allowed on a disabled key."
    );

    // Soft delete, conflict on re-create, recover, delete + purge.
    let (s, _, v) = vault.call(Method::DELETE, "/keys/kek", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["recoveryId"],
        format!("https://{VAULT}:{}/deletedkeys/kek", emu.port())
    );
    assert!(v["scheduledPurgeDate"].as_i64().unwrap() > v["deletedDate"].as_i64().unwrap());
    let (s, _, v) = vault.call(Method::GET, "/keys/kek", None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("KeyNotFound")));
    let (s, _, _) = vault
        .call(
            Method::POST,
            "/keys/kek/create",
            Some(json!({"kty": "RSA"})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, _, v) = vault.call(Method::GET, "/deletedkeys/kek", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["key"]["kid"], kid2.as_str());
    let (s, _, _) = vault
        .call(Method::POST, "/deletedkeys/kek/recover", None)
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = vault.call(Method::GET, "/keys/kek", None).await;
    assert_eq!(s, 200);
    vault.call(Method::DELETE, "/keys/kek", None).await;
    let (s, _, _) = vault.call(Method::DELETE, "/deletedkeys/kek", None).await;
    assert_eq!(s, 204);
    let (s, _, _) = vault.call(Method::GET, "/deletedkeys/kek", None).await;
    assert_eq!(s, 404);

    // Bad input → 400 BadParameter.
    let (s, _, v) = vault
        .call(
            Method::POST,
            "/keys/kek/create",
            Some(json!({"kty": "RSA", "key_size": 1024})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("BadParameter"))
    );
    let (s, _, _) = vault
        .call(
            Method::POST,
            "/keys/k/create",
            Some(json!({"kty": "oct-HSM"})),
        )
        .await;
    assert_eq!(s, 400, "Key Vault (not Managed HSM) has no oct-HSM keys");
    let r = c
        .get(format!(
            "https://{VAULT}:{}/keys?api-version=1.0",
            emu.port()
        ))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn imported_rsa_key_wraps_and_unwraps_with_real_oaep() {
    let (emu, c, t) = admin_session().await;
    let vault = Api::new(&c, &emu, &t, VAULT);
    let k = customer_key();
    let (s, _, v) = vault
        .call(Method::PUT, "/keys/cmk", Some(json!({"key": rsa_jwk(k)})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["key"].get("d").is_none(),
        "private parts must never be returned"
    );
    assert_eq!(unb64(v["key"]["n"].as_str().unwrap()), k.n().to_bytes_be());
    let kid = v["key"]["kid"].as_str().unwrap().to_string();
    let version = kid.rsplit('/').next().unwrap().to_string();
    let vmk: Vec<u8> = (0..64u8).collect();

    // Emulator wraps (RSA-OAEP-256) → independent rsa-crate decrypt with the customer key.
    let (s, v) = vault
        .wrap(
            &format!("/keys/cmk/{version}/wrapkey"),
            "RSA-OAEP-256",
            &vmk,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["kid"], kid.as_str());
    let wrapped = unb64(v["value"].as_str().unwrap());
    assert_eq!(
        k.decrypt(Oaep::new::<sha2::Sha256>(), &wrapped).unwrap(),
        vmk
    );

    // Independent RSA-OAEP (SHA-1) encrypt → emulator unwraps, on both versionless paths.
    let ct = k
        .to_public_key()
        .encrypt(&mut rand::rngs::OsRng, Oaep::new::<sha1::Sha1>(), &vmk)
        .unwrap();
    for path in ["/keys/cmk//unwrapkey", "/keys/cmk/unwrapkey"] {
        let (s, v) = wrap(&c, &url(&emu, VAULT, path), &t, "RSA-OAEP", &ct).await;
        assert_eq!(s, 200, "{path}: {v}");
        assert_eq!(unb64(v["value"].as_str().unwrap()), vmk);
        assert_eq!(v["kid"], kid.as_str(), "versionless resolves to latest");
    }
    // Wrong algorithm for the ciphertext → 400.
    let (s, v) = vault
        .wrap(
            &format!("/keys/cmk/{version}/unwrapkey"),
            "RSA-OAEP-256",
            &ct,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("BadParameter"))
    );

    // After rotation the old version still unwraps old slots.
    vault.call(Method::POST, "/keys/cmk/rotate", None).await;
    let (s, v) = vault
        .wrap(
            &format!("/keys/cmk/{version}/unwrapkey"),
            "RSA-OAEP-256",
            &wrapped,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(unb64(v["value"].as_str().unwrap()), vmk);

    // Expired key: unwrap still works, wrap is refused.
    vault
        .call(
            Method::PATCH,
            &format!("/keys/cmk/{version}"),
            Some(json!({"attributes": {"exp": 1000}})),
        )
        .await;
    let (s, _) = vault
        .wrap(
            &format!("/keys/cmk/{version}/unwrapkey"),
            "RSA-OAEP-256",
            &wrapped,
        )
        .await;
    assert_eq!(s, 200, "expired keys still unwrap");
    let (s, v) = vault
        .wrap(
            &format!("/keys/cmk/{version}/wrapkey"),
            "RSA-OAEP-256",
            &vmk,
        )
        .await;
    assert_eq!((s, inner_code(&v)), (403, Some("KeyExpired")));
}

#[tokio::test]
async fn aes_key_wrap_on_managed_hsm_matches_rfc3394() {
    let emu = start();
    let c = client(&emu);
    let p = emu.create_secret_principal("hsm-user").unwrap();
    emu.grant(&p.client_id, &Op::ALL, None).unwrap();
    let t = token(&c, &emu, &p, "https://managedhsm.azure.net").await;
    let hsm = Api::new(&c, &emu, &t, HSM);
    // RFC 3394 §4.6 vector: 256-bit KEK 00..1F, key data 00112233..0F.
    let kek: Vec<u8> = (0u8..32).collect();
    let data: Vec<u8> = (0..16u8).map(|i| i * 0x11).chain(0..16u8).collect();
    let expected =
        hex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21");
    let (s, _, v) = hsm.call(Method::PUT, "/keys/aes", Some(
            json!({"key": {"kty": "oct-HSM", "k": b64(&kek), "key_ops": ["wrapKey", "unwrapKey"]}}),
        )).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["key"]["kty"], "oct-HSM");
    assert!(v["key"].get("k").is_none());
    for alg in ["A256KW", "CKM_AES_KEY_WRAP"] {
        let (s, v) = wrap(&c, &url(&emu, HSM, "/keys/aes//wrapkey"), &t, alg, &data).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(unb64(v["value"].as_str().unwrap()), expected, "{alg}");
        let (s, v) = wrap(
            &c,
            &url(&emu, HSM, "/keys/aes//unwrapkey"),
            &t,
            alg,
            &expected,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(unb64(v["value"].as_str().unwrap()), data);
    }
    // key_ops without encrypt → KeyOperationForbidden.
    let (s, v) = hsm.wrap("/keys/aes//encrypt", "A256KW", &data).await;
    assert_eq!((s, inner_code(&v)), (403, Some("KeyOperationForbidden")));
    // A generated oct-HSM key round-trips a 64-byte volume key.
    let (s, _, v) = hsm
        .call(
            Method::POST,
            "/keys/gen/create",
            Some(json!({"kty": "oct-HSM", "key_size": 256})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let vmk = [7u8; 64];
    let (_, v) = hsm
        .wrap("/keys/gen//wrapkey", "CKM_AES_KEY_WRAP", &vmk)
        .await;
    let wrapped = unb64(v["value"].as_str().unwrap());
    assert_eq!(wrapped.len(), 72);
    let (_, v) = hsm
        .wrap("/keys/gen//unwrapkey", "CKM_AES_KEY_WRAP", &wrapped)
        .await;
    assert_eq!(unb64(v["value"].as_str().unwrap()), vmk);
    // Managed HSM refuses non-HSM RSA.
    let (s, _, _) = hsm
        .call(Method::POST, "/keys/r/create", Some(json!({"kty": "RSA"})))
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn authorization_errors_follow_mode_permissions_and_firewall() {
    let emu = start();
    let c = client(&emu);
    emu.create_key("kek", "oct", Some(256)).unwrap();
    let p = emu.create_secret_principal("reader").unwrap();
    emu.grant(&p.client_id, &[Op::Get], Some("kek")).unwrap();
    let t = token(&c, &emu, &p, "https://vault.azure.net").await;
    let vault = Api::new(&c, &emu, &t, VAULT);
    let unwrap_url = url(&emu, VAULT, "/keys/kek//unwrapkey");
    let wrapped = [0u8; 40];

    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &wrapped).await;
    assert_eq!(
        (s, v["error"]["code"].as_str(), inner_code(&v)),
        (403, Some("Forbidden"), Some("ForbiddenByRbac"))
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with(
        "Caller is not authorized to perform action on resource.\r\nIf role assignments"
    ));
    assert!(msg.contains(&format!(
        "Caller: appid={};oid={}",
        p.client_id, p.object_id
    )));
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keys/unwrap/action'"));

    emu.set_mode(AuthMode::AccessPolicy);
    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &wrapped).await;
    assert_eq!((s, inner_code(&v)), (403, Some("AccessDenied")));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not have keys unwrapKey permission")
    );

    // Grant unwrap on the key → it reaches the crypto (all-zero input is not a valid wrap).
    emu.grant(&p.client_id, &[Op::Wrap, Op::Unwrap], Some("kek"))
        .unwrap();
    let (s, v) = vault.wrap("/keys/kek//wrapkey", "A256KW", &[1u8; 32]).await;
    assert_eq!(s, 200, "{v}");
    let good = unb64(v["value"].as_str().unwrap());
    let (s, _) = wrap(&c, &unwrap_url, &t, "A256KW", &good).await;
    assert_eq!(s, 200);
    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &wrapped).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("BadParameter"))
    );

    // Revoke (no key = everywhere) → denied again, the token itself still valid.
    emu.revoke(&p.client_id, &[Op::Unwrap], None).unwrap();
    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &good).await;
    assert_eq!((s, inner_code(&v)), (403, Some("AccessDenied")));
    emu.grant(&p.client_id, &[Op::Unwrap], None).unwrap();

    // Firewall.
    emu.set_firewall(true);
    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &good).await;
    assert_eq!((s, inner_code(&v)), (403, Some("ForbiddenByFirewall")));
    assert!(v["error"]["message"].as_str().unwrap().starts_with(
        "Client address is not authorized and caller is not a trusted service.\r\nClient address: 127.0.0.1\r\n"
    ));
    emu.set_firewall(false);

    // Disabled key via the admin switch; then 404 for a missing key.
    emu.set_key_enabled("kek", None, false).unwrap();
    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &good).await;
    assert_eq!((s, inner_code(&v)), (403, Some("KeyDisabled")));
    emu.set_key_enabled("kek", None, true).unwrap();
    let (s, _) = wrap(&c, &unwrap_url, &t, "A256KW", &good).await;
    assert_eq!(s, 200);
    emu.grant(&p.client_id, &[Op::Unwrap], Some("gone"))
        .unwrap();
    let (s, v) = vault.wrap("/keys/gone//unwrapkey", "A256KW", &good).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("KeyNotFound")));
    // Deleting the principal removes its permissions; its token no longer authorizes.
    emu.delete_principal(&p.client_id).unwrap();
    let (s, v) = wrap(&c, &unwrap_url, &t, "A256KW", &good).await;
    assert_eq!((s, inner_code(&v)), (403, Some("AccessDenied")));
}

/// What a client sees of an injected fault on `GET /keys`.
enum Seen {
    /// An HTTP answer: status, `error.code`, and the `Retry-After` header (`Some(None)`: must
    /// be absent; `None`: not checked).
    Answer(u16, Option<&'static str>, Option<Option<&'static str>>),
    /// The connection reset (a request error, not a timeout).
    Reset,
    /// No answer within the client's 500 ms timeout.
    Hang,
}

/// A fault injected `times` times, what each of those requests sees, the next request's status
/// (`None`: not checked) and the fault's counter in `/admin/requests`.
struct FaultCase {
    kind: FaultKind,
    times: u64,
    seen: Seen,
    after: Option<u16>,
    counter: &'static str,
}

fn fault_cases() -> Vec<(&'static str, FaultCase)> {
    let row = |kind, times, seen, after, counter| FaultCase {
        kind,
        times,
        seen,
        after,
        counter,
    };
    vec![
        (
            "throttle with Retry-After",
            row(
                FaultKind::Throttle {
                    retry_after: Some(7),
                },
                1,
                Seen::Answer(429, Some("Throttled"), Some(Some("7"))),
                None,
                "throttle",
            ),
        ),
        (
            "throttle without Retry-After",
            row(
                FaultKind::Throttle { retry_after: None },
                1,
                Seen::Answer(429, None, Some(None)),
                None,
                "throttle-no-retry-after",
            ),
        ),
        (
            "status 503 twice, then the count is exhausted",
            row(
                FaultKind::Status { status: 503 },
                2,
                Seen::Answer(503, None, None),
                Some(200),
                "status-503",
            ),
        ),
        (
            "reset",
            row(FaultKind::Reset, 1, Seen::Reset, Some(200), "reset"),
        ),
        ("hang", row(FaultKind::Hang, 1, Seen::Hang, None, "hang")),
        (
            "latency",
            row(
                FaultKind::Latency { ms: 50 },
                1,
                Seen::Answer(200, None, None),
                None,
                "latency",
            ),
        ),
    ]
}

#[tokio::test]
async fn fault_injection() {
    table::rows_async(fault_cases(), |name, f| async move {
        let (emu, c, t) = admin_session().await;
        let list = url(&emu, VAULT, "/keys");
        emu.inject_fault(Fault::new(f.kind).times(f.times));
        for n in 0..f.times {
            match f.seen {
                Seen::Answer(status, code, retry_after) => {
                    let (s, h, v) = call(&c, Method::GET, &list, &t, None).await;
                    assert_eq!(s, status, "{name} ({n}): {v}");
                    if code.is_some() {
                        assert_eq!(v["error"]["code"].as_str(), code, "{name}: {v}");
                    }
                    if let Some(want) = retry_after {
                        let got = h.get("retry-after").map(|x| x.to_str().unwrap());
                        assert_eq!(got, want, "{name}: Retry-After");
                    }
                }
                Seen::Reset => {
                    let err = c.get(&list).bearer_auth(&t).send().await.expect_err(name);
                    assert!(!err.is_timeout(), "{name}: {err:?}");
                }
                Seen::Hang => {
                    let err = c
                        .get(&list)
                        .bearer_auth(&t)
                        .timeout(std::time::Duration::from_millis(500))
                        .send()
                        .await
                        .expect_err(name);
                    assert!(err.is_timeout(), "{name}: {err:?}");
                }
            }
        }
        if let Some(status) = f.after {
            let (s, _, _) = call(&c, Method::GET, &list, &t, None).await;
            assert_eq!(s, status, "{name}: the request after the fault's count");
        }
        let (counters, log) = emu.requests();
        assert_eq!(
            counters.by_fault.get(f.counter),
            Some(&f.times),
            "{name}: counter {}",
            f.counter
        );
        if let (Seen::Answer(status, ..), None) = (&f.seen, f.after) {
            assert_eq!(log.last().unwrap().status, *status, "{name}: request log");
        }
    })
    .await;
}

#[tokio::test]
async fn token_endpoint_faults_only_when_targeted() {
    let (emu, c, t) = admin_session().await;
    let list = url(&emu, VAULT, "/keys");

    // Token endpoint faults only when targeted.
    emu.inject_fault(Fault::new(FaultKind::Status { status: 500 }).target(FaultTarget::Token));
    let r = c
        .post(emu.token_url())
        .form(&[("grant_type", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(call(&c, Method::GET, &list, &t, None).await.0, 200);
    emu.clear_faults();
    let r = c
        .post(emu.token_url())
        .form(&[("grant_type", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// POST `body` to the admin API's `path` with the admin token.
async fn admin_post(
    c: &reqwest::Client,
    emu: &kvcrypt_kv_emulator::EmulatorHandle,
    path: &str,
    body: Value,
) -> reqwest::Response {
    let url = format!("{}/{path}", emu.admin_url());
    let r = c
        .post(url)
        .bearer_auth(emu.admin_token())
        .json(&body)
        .send();
    r.await.expect("admin request")
}

/// GET the admin API's `path` with the admin token.
async fn admin_get(
    c: &reqwest::Client,
    emu: &kvcrypt_kv_emulator::EmulatorHandle,
    path: &str,
) -> reqwest::Response {
    let url = format!("{}/{path}", emu.admin_url());
    let r = c.get(url).bearer_auth(emu.admin_token()).send();
    r.await.expect("admin request")
}

/// Raw answer of a GET: status, headers, body bytes.
async fn raw_get(
    c: &reqwest::Client,
    url: &str,
    token: &str,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let r = c.get(url).bearer_auth(token).send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.expect("body").to_vec())
}

/// An answer that is not the vault's: the fault, its status, what the headers and body must
/// (not) show, and its counter.
type ForeignCase = (
    FaultKind,
    u16,
    fn(&str, &reqwest::header::HeaderMap, &[u8]),
    &'static str,
);

fn foreign_cases() -> Vec<(&'static str, ForeignCase)> {
    vec![
        (
            "an HTML page, as a proxy or application gateway sends: no JSON, none of the vault's headers",
            (
                FaultKind::Html { status: 403 },
                403,
                |name, h, body| {
                    assert_eq!(h["content-type"], "text/html", "{name}");
                    assert!(!h.contains_key("x-ms-request-id"), "{name}: {h:?}");
                    let text = String::from_utf8(body.to_vec()).unwrap();
                    assert!(
                        text.starts_with("<html>") && text.contains("403 Forbidden"),
                        "{name}: {text}"
                    );
                },
                "html-403",
            ),
        ),
        (
            "empty, for a chosen status",
            (
                FaultKind::Empty { status: 404 },
                404,
                |name, h, body| {
                    assert_eq!(body.len(), 0, "{name}");
                    assert!(!h.contains_key("content-type"), "{name}: {h:?}");
                },
                "empty-404",
            ),
        ),
        (
            "JSON, but without Key Vault's `error` object",
            (
                FaultKind::ForeignJson { status: 403 },
                403,
                |name, h, body| {
                    assert!(
                        h["content-type"]
                            .to_str()
                            .unwrap()
                            .starts_with("application/json"),
                        "{name}: {h:?}"
                    );
                    let v: Value = serde_json::from_slice(body).unwrap();
                    assert!(v.get("error").is_none(), "{name}: {v}");
                    assert_eq!(v["status"], 403, "{name}");
                },
                "foreign-json-403",
            ),
        ),
        (
            "a Key Vault-shaped 401 without the challenge the real vault always sends",
            (
                FaultKind::UnauthorizedNoChallenge,
                401,
                |name, h, body| {
                    assert!(!h.contains_key("www-authenticate"), "{name}: {h:?}");
                    let v: Value = serde_json::from_slice(body).unwrap();
                    assert_eq!(v["error"]["code"], "Unauthorized", "{name}");
                },
                "unauthorized-no-challenge",
            ),
        ),
    ]
}

#[tokio::test]
async fn faults_that_are_not_the_vaults_answers() {
    table::rows_async(
        foreign_cases(),
        |name, (kind, status, check, counter)| async move {
            let emu = start();
            let c = client(&emu);
            let (_p, t) = admin_principal(&c, &emu).await;
            emu.create_key("k1", "oct", Some(256)).unwrap();
            emu.inject_fault(Fault::new(kind).times(1));
            let (s, h, body) = raw_get(&c, &url(&emu, VAULT, "/keys/k1"), &t).await;
            assert_eq!(s, status, "{name}");
            check(name, &h, &body);
            let (counters, _) = emu.requests();
            assert_eq!(
                counters.by_fault.get(counter),
                Some(&1),
                "{name}: counter {counter}"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn keyed_and_admin_injected_faults() {
    let (emu, c, t) = admin_session().await;
    emu.create_key("k1", "oct", Some(256)).unwrap();
    emu.create_key("k2", "oct", Some(256)).unwrap();
    let k1 = url(&emu, VAULT, "/keys/k1");
    let k2 = url(&emu, VAULT, "/keys/k2");

    // The genuine 401 (no token) does carry it.
    let r = c.get(&k1).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer ")
    );

    // Aimed at one key (name matched case-insensitively): other keys and the token endpoint
    // are answered normally, and the fault stays for its key.
    emu.inject_fault(Fault::new(FaultKind::Html { status: 404 }).for_key("K1"));
    assert_eq!(call(&c, Method::GET, &k2, &t, None).await.0, 200);
    assert_eq!(raw_get(&c, &k1, &t).await.0, 404);
    assert_eq!(raw_get(&c, &url(&emu, VAULT, "/keys/k1/"), &t).await.0, 404);
    let list = url(&emu, VAULT, "/keys");
    assert_eq!(call(&c, Method::GET, &list, &t, None).await.0, 200);
    emu.clear_faults();
    assert_eq!(call(&c, Method::GET, &k1, &t, None).await.0, 200);

    let (counters, _) = emu.requests();
    assert_eq!(counters.by_fault.get("html-404"), Some(&2));

    // The admin API takes them as JSON, and refuses a status that is not an error.
    let r = admin_post(
        &c,
        &emu,
        "faults",
        json!({"kind": "empty", "status": 403, "key": "k2", "count": 1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (s, _, body) = raw_get(&c, &k2, &t).await;
    assert_eq!((s, body.len()), (403, 0));
    let r = admin_post(&c, &emu, "faults", json!({"kind": "html", "status": 200})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("not an error status"),
        "{v}"
    );
    let r = admin_post(
        &c,
        &emu,
        "faults",
        json!({"kind": "unauthorized_no_challenge", "target": "token", "count": 1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = c
        .post(emu.token_url())
        .form(&[("grant_type", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(!r.headers().contains_key("www-authenticate"));
}

#[tokio::test]
async fn admin_http_api() {
    let emu = start();
    let c = client(&emu);
    let admin = emu.admin_url();
    let r = c
        .post(format!("{admin}/principals"))
        .json(&json!({"kind": "secret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "admin needs its token");
    let r = admin_post(
        &c,
        &emu,
        "principals",
        json!({"kind": "secret", "name": "ops"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let p: kvcrypt_kv_emulator::PrincipalInfo = r.json().await.unwrap();
    let r = admin_post(&c, &emu, "keys/k1", json!({"kty": "oct", "key_size": 256})).await;
    assert_eq!(r.status(), 200);
    let r = admin_post(
        &c,
        &emu,
        "grant",
        json!({"principal": p.client_id, "ops": "get,list"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let t = token(&c, &emu, &p, "https://vault.azure.net").await;
    let vault = Api::new(&c, &emu, &t, VAULT);
    let (s, _, v) = vault.call(Method::GET, "/keys", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["value"][0]["kid"],
        format!("https://{VAULT}:{}/keys/k1", emu.port())
    );
    let r = admin_post(
        &c,
        &emu,
        "faults",
        json!({"kind": "status", "status": 502, "count": 1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(vault.call(Method::GET, "/keys", None).await.0, 502);
    let r = admin_get(&c, &emu, "requests").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["counters"]["by_status"]["502"], 1);
    // The faulted request never reached routing, so only the first list counts as an op.
    assert_eq!(v["counters"]["by_op"]["list"], 1);
    assert_eq!(v["counters"]["by_op"]["token"], 1);
    assert_eq!(v["counters"]["total"], 3);
    let r = admin_get(&c, &emu, "state").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["keys"][0]["name"], "k1");
    assert!(
        v.to_string().find(p.secret.as_deref().unwrap()).is_none(),
        "state view hides secrets"
    );
}

#[tokio::test]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || EmulatorConfig {
        state_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let emu = Emulator::start(cfg()).unwrap();
    let c = client(&emu);
    let (p, t) = admin_principal(&c, &emu).await;
    let vault = Api::new(&c, &emu, &t, VAULT);
    let (s, _, v) = vault
        .call(
            Method::POST,
            "/keys/kek/create",
            Some(json!({"kty": "RSA"})),
        )
        .await;
    assert_eq!(s, 200);
    let kid = v["key"]["kid"].as_str().unwrap().to_string();
    let version = kid.rsplit('/').next().unwrap().to_string();
    let vmk = [42u8; 64];
    let (_, v) = vault.wrap("/keys/kek//wrapkey", "RSA-OAEP-256", &vmk).await;
    let wrapped = unb64(v["value"].as_str().unwrap());
    let ca_before = emu.ca_pem().to_string();
    let admin_token = emu.admin_token().to_string();
    emu.shutdown();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("state.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let emu = Emulator::start(cfg()).unwrap();
    assert_eq!(emu.ca_pem(), ca_before);
    assert_eq!(emu.admin_token(), admin_token);
    // A client built from the *old* CA PEM still verifies the re-issued server cert.
    let c = client(&emu);
    let vault = Api::new(&c, &emu, &t, VAULT);
    let (s, v) = vault
        .wrap(
            &format!("/keys/kek/{version}/unwrapkey"),
            "RSA-OAEP-256",
            &wrapped,
        )
        .await;
    assert_eq!(s, 200, "old token, key and permissions survive: {v}");
    assert_eq!(unb64(v["value"].as_str().unwrap()), vmk);
    let t2 = token(&c, &emu, &p, "https://vault.azure.net").await;
    assert_ne!(t, t2);
}

fn jwt(header: Value, claims: Value, key: Option<&RsaPrivateKey>) -> String {
    use rsa::signature::{SignatureEncoding, Signer};
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = match key {
        Some(k) => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k.clone())
            .sign(signed.as_bytes())
            .to_vec(),
        None => b"unsigned".to_vec(),
    };
    format!("{signed}.{}", b64(&sig))
}

async fn assertion_token(
    c: &reqwest::Client,
    emu: &kvcrypt_kv_emulator::EmulatorHandle,
    client_id: &str,
    assertion: &str,
) -> (u16, Value) {
    let r = c
        .post(emu.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", "https://vault.azure.net/.default"),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn certificate_and_federated_client_assertions() {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let emu = start();
    let c = client(&emu);
    // A certificate credential: self-signed cert over the customer's RSA key.
    let k = customer_key();
    let pem = k.to_pkcs8_pem(LineEnding::LF).unwrap();
    let kp = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["kvcrypt-app".to_string()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let p = emu
        .create_principal(NewPrincipal {
            kind: PrincipalKind::Certificate,
            certificate_pem: Some(cert.pem()),
            ..Default::default()
        })
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"aud": emu.token_url(), "iss": p.client_id, "sub": p.client_id,
        "jti": "1", "nbf": now, "exp": now + 600});
    let header = json!({"alg": "RS256", "typ": "JWT"});
    let (s, v) = assertion_token(
        &c,
        &emu,
        &p.client_id,
        &jwt(header.clone(), claims.clone(), Some(k)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["access_token"].is_string());
    // Signed by another key → AADSTS700027.
    let other = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let (s, v) = assertion_token(
        &c,
        &emu,
        &p.client_id,
        &jwt(header.clone(), claims.clone(), Some(&other)),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")));
    assert_eq!(v["error_codes"], json!([700027]));
    // Expired assertion → AADSTS700024.
    let mut old = claims.clone();
    old["exp"] = json!(now - 3600);
    let (s, v) = assertion_token(&c, &emu, &p.client_id, &jwt(header.clone(), old, Some(k))).await;
    assert_eq!(s, 401);
    assert_eq!(v["error_codes"], json!([700024]));

    // Federated (workload identity): accepted on a registered issuer + subject.
    let f = emu
        .create_principal(NewPrincipal {
            kind: PrincipalKind::Federated,
            issuer: Some("https://oidc.example.test/cluster".into()),
            subject: Some("system:serviceaccount:kvcrypt:agent".into()),
            ..Default::default()
        })
        .unwrap();
    let fed = |sub: &str| {
        jwt(
            json!({"alg": "RS256", "typ": "JWT"}),
            json!({"iss": "https://oidc.example.test/cluster", "sub": sub,
                "aud": "api://AzureADTokenExchange", "exp": now + 600}),
            None,
        )
    };
    let (s, _) = assertion_token(
        &c,
        &emu,
        &f.client_id,
        &fed("system:serviceaccount:kvcrypt:agent"),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = assertion_token(
        &c,
        &emu,
        &f.client_id,
        &fed("system:serviceaccount:other:x"),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error_codes"], json!([70021]));
}
