//! Correlation headers: every answer in the services' own format — normal answers and injected
//! faults alike — echoes the client's `x-ms-client-request-id` (and, from Entra ID, MSAL's
//! `client-request-id`), so a client's logs tie each failure to its request.

use kvcrypt_kv_emulator::{Fault, FaultKind, FaultTarget};
use kvcrypt_testkit::emulator::VAULT;
use kvcrypt_testkit::emulator::rest::{admin_session, secret_form, url};
use kvcrypt_testkit::table;

const REQUEST_ID: &str = "5d7c1f0e-3a8b-4c2d-9e6f-0123456789ab";

/// `GET /keys` with a client request id: status and headers.
async fn list_keys(
    c: &reqwest::Client,
    emu: &kvcrypt_kv_emulator::EmulatorHandle,
    token: &str,
) -> (u16, reqwest::header::HeaderMap) {
    let r = c
        .get(url(emu, VAULT, "/keys"))
        .bearer_auth(token)
        .header("x-ms-client-request-id", REQUEST_ID)
        .send()
        .await
        .expect("request");
    (r.status().as_u16(), r.headers().clone())
}

fn header<'h>(h: &'h reqwest::header::HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn vault_answers_and_injected_faults_echo_the_client_request_id() {
    let rows: Vec<(&str, (Option<FaultKind>, u16))> = vec![
        ("normal answer", (None, 200)),
        (
            "injected 503",
            (Some(FaultKind::Status { status: 503 }), 503),
        ),
        (
            "injected throttle",
            (
                Some(FaultKind::Throttle {
                    retry_after: Some(1),
                }),
                429,
            ),
        ),
        (
            "injected 401 without challenge",
            (Some(FaultKind::UnauthorizedNoChallenge), 401),
        ),
        (
            "injected latency",
            (Some(FaultKind::Latency { ms: 10 }), 200),
        ),
    ];
    table::rows_async(rows, |name, (kind, status)| async move {
        let (emu, c, t) = admin_session().await;
        if let Some(kind) = kind {
            emu.inject_fault(Fault::new(kind).times(1));
        }
        let (s, h) = list_keys(&c, &emu, &t).await;
        assert_eq!(s, status, "{name}");
        assert_eq!(
            header(&h, "x-ms-client-request-id"),
            Some(REQUEST_ID),
            "{name}: {h:?}"
        );
        assert!(header(&h, "x-ms-request-id").is_some(), "{name}: {h:?}");
    })
    .await;
}

#[tokio::test]
async fn token_answers_and_injected_token_faults_echo_the_client_request_ids() {
    let (emu, c, _t) = admin_session().await;
    let p = emu.create_secret_principal("corr").unwrap();
    let token_url = emu.token_url();
    for (name, fault, want) in [
        ("token answer", false, 200),
        ("injected token 500", true, 500),
    ] {
        if fault {
            emu.inject_fault(
                Fault::new(FaultKind::Status { status: 500 })
                    .target(FaultTarget::Token)
                    .times(1),
            );
        }
        let r = c
            .post(&token_url)
            .header("x-ms-client-request-id", REQUEST_ID)
            .header("client-request-id", REQUEST_ID)
            .form(&secret_form(&p.client_id, p.secret.as_deref().unwrap()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{name}");
        for h in ["x-ms-client-request-id", "client-request-id"] {
            assert_eq!(
                header(r.headers(), h),
                Some(REQUEST_ID),
                "{name}: {h}: {:?}",
                r.headers()
            );
        }
    }
}
