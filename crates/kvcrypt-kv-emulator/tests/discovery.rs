//! Entra ID discovery as MSAL-based SDKs walk it: instance discovery → tenant discovery
//! (OpenID configuration) → the token endpoint it names, all on the emulator's own host; and
//! Entra's error shape for a wrong client secret.

use kvcrypt_kv_emulator::EmulatorHandle;
use kvcrypt_testkit::emulator::LOGIN;
use kvcrypt_testkit::emulator::rest::{client, secret_form};
use serde_json::Value;

async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

fn start() -> EmulatorHandle {
    kvcrypt_kv_emulator::Emulator::start(Default::default()).expect("emulator starts")
}

#[tokio::test]
async fn openid_configuration_names_the_emulators_own_endpoints() {
    let emu = start();
    let c = client(&emu);
    let tenant = emu.tenant_id().to_owned();
    let base = emu.base_url();
    let (s, v) = get(
        &c,
        &format!("{base}/{tenant}/v2.0/.well-known/openid-configuration"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_endpoint"], emu.token_url());
    assert_eq!(v["issuer"], format!("{base}/{tenant}/v2.0"));
    assert_eq!(
        v["authorization_endpoint"],
        format!("{base}/{tenant}/oauth2/v2.0/authorize")
    );
    assert_eq!(
        v["device_authorization_endpoint"],
        format!("{base}/{tenant}/oauth2/v2.0/devicecode")
    );
    assert_eq!(v["id_token_signing_alg_values_supported"][0], "RS256");
    assert!(
        v["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "client_secret_post"),
        "{v}"
    );
    let jwks = v["jwks_uri"].as_str().unwrap().to_owned();
    assert_eq!(jwks, format!("{base}/{tenant}/discovery/v2.0/keys"));
    let (s, keys) = get(&c, &jwks).await;
    assert_eq!((s, keys["keys"].is_array()), (200, true), "{keys}");

    // Reached under the public Entra host name, every URL keeps that host (and port).
    let public = format!("https://{LOGIN}:{}", emu.port());
    let (s, v) = get(
        &c,
        &format!("{public}/{tenant}/v2.0/.well-known/openid-configuration"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["token_endpoint"],
        format!("{public}/{tenant}/oauth2/v2.0/token")
    );

    // `common`: endpoints keep the alias, the issuer has the `{tenantid}` placeholder.
    let (s, v) = get(
        &c,
        &format!("{base}/common/v2.0/.well-known/openid-configuration"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["token_endpoint"],
        format!("{base}/common/oauth2/v2.0/token")
    );
    assert_eq!(v["issuer"], format!("{base}/{{tenantid}}/v2.0"));

    // Another tenant: Entra's AADSTS90002.
    let (s, v) = get(
        &c,
        &format!("{base}/not-our-tenant/v2.0/.well-known/openid-configuration"),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"], "invalid_tenant");
    assert_eq!(v["error_codes"][0], 90002);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS90002: Tenant 'not-our-tenant' not found."),
        "{v}"
    );
}

#[tokio::test]
async fn instance_discovery_leads_msal_to_a_working_token_endpoint() {
    let emu = start();
    let c = client(&emu);
    let tenant = emu.tenant_id().to_owned();
    let base = emu.base_url();
    let authority = format!("127.0.0.1:{}", emu.port());
    // MSAL asks with the authorization endpoint of its authority (api-version 1.0 or 1.1).
    for api in ["1.1", "1.0"] {
        let url = reqwest::Url::parse_with_params(
            &format!("{base}/common/discovery/instance"),
            [
                ("api-version", api),
                (
                    "authorization_endpoint",
                    &format!("{base}/{tenant}/oauth2/v2.0/authorize"),
                ),
            ],
        )
        .unwrap();
        let (s, v) = get(&c, url.as_str()).await;
        assert_eq!(s, 200, "{v}");
        let tde = v["tenant_discovery_endpoint"].as_str().unwrap().to_owned();
        assert_eq!(
            tde,
            format!("{base}/{tenant}/v2.0/.well-known/openid-configuration")
        );
        let meta = &v["metadata"][0];
        assert_eq!(meta["preferred_network"], authority.as_str(), "{v}");
        assert_eq!(meta["preferred_cache"], authority.as_str(), "{v}");
        assert_eq!(meta["aliases"][0], authority.as_str(), "{v}");

        // Follow it: the OpenID configuration, then its token endpoint issues a token.
        let (s, config) = get(&c, &tde).await;
        assert_eq!(s, 200, "{config}");
        let p = emu.create_secret_principal(&format!("msal-{api}")).unwrap();
        let r = c
            .post(config["token_endpoint"].as_str().unwrap())
            .form(&secret_form(&p.client_id, p.secret.as_deref().unwrap()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // MSAL sends its authority's host name without the port: the answer names the port the
    // emulator listens on, or MSAL would go to 443.
    let url = reqwest::Url::parse_with_params(
        &format!("{base}/common/discovery/instance"),
        [
            ("api-version", "1.0"),
            (
                "authorization_endpoint",
                &format!("https://127.0.0.1/{tenant}/oauth2/v2.0/authorize"),
            ),
        ],
    )
    .unwrap();
    let (s, v) = get(&c, url.as_str()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["tenant_discovery_endpoint"],
        format!("{base}/{tenant}/v2.0/.well-known/openid-configuration")
    );

    // An authority that is not this emulator: invalid_instance (MSAL then refuses it).
    let url = reqwest::Url::parse_with_params(
        &format!("{base}/common/discovery/instance"),
        [
            ("api-version", "1.1"),
            (
                "authorization_endpoint",
                "https://login.example.org/t/oauth2/v2.0/authorize",
            ),
        ],
    )
    .unwrap();
    let (s, v) = get(&c, url.as_str()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_instance")),
        "{v}"
    );
    assert_eq!(v["error_codes"][0], 50049);
}

#[tokio::test]
async fn wrong_client_secret_answers_like_entra_id() {
    let emu = start();
    let c = client(&emu);
    let p = emu.create_secret_principal("app").unwrap();
    let r = c
        .post(emu.token_url())
        .form(&secret_form(&p.client_id, "not-the-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_client");
    let desc = v["error_description"].as_str().unwrap();
    assert!(
        desc.starts_with("AADSTS7000215: Invalid client secret provided"),
        "{desc}"
    );
    assert_eq!(v["error_codes"], serde_json::json!([7000215]));
    for field in ["timestamp", "trace_id", "correlation_id"] {
        assert!(
            v[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}: {v}"
        );
    }
    // The ids in the description are the ones in the fields.
    for field in ["trace_id", "correlation_id"] {
        assert!(desc.contains(v[field].as_str().unwrap()), "{field}: {desc}");
    }
}
