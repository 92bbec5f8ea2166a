//! `KeyError` and its classification into Denied / Transient / Misconfigured.
//!
//! Classification reads the RAW response body (`error.code`, `error.innererror.code` for Key
//! Vault; `error`, `error_codes` for Entra ID) and the status, not the SDK's `error_code`: the SDK
//! gets that wrong for 403s whose message contains `\r\n` (RBAC and firewall denials).
//!
//! Only `Denied` means "access was revoked" — the agent wipes keys on it. Anything that might be
//! a passing network or service problem is `Transient`; local mistakes are `Misconfigured`.

use super::http::CapturedFailure;
use crate::exit::{Exit, ExitClass};
use std::fmt;
use std::time::Duration;

/// What an operator (and the agent's policy) should make of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Access is refused: revoked permission, disabled/deleted key, firewall, deleted principal.
    Denied,
    /// The vault or identity service is unreachable or failing for now: retry later.
    Transient,
    /// Configuration or setup is wrong (config file, key id, credential files, bad request).
    Misconfigured,
}

/// The Key Vault operation that failed (named as in Key Vault's permission model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    WrapKey,
    UnwrapKey,
    GetKey,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::WrapKey => "wrapKey",
            Operation::UnwrapKey => "unwrapKey",
            Operation::GetKey => "get",
        })
    }
}

/// Details of a failed vault or identity call. `Display` is the operator-facing message.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Vault host (`myvault.vault.azure.net`).
    pub vault: String,
    /// Key name.
    pub key: String,
    pub operation: Operation,
    /// HTTP status, when the failure was an HTTP answer.
    pub status: Option<u16>,
    /// Most specific service error code: Key Vault `error.innererror.code`, else `error.code`;
    /// for Entra ID the OAuth `error` (e.g. `invalid_client`).
    pub code: Option<String>,
    /// Whether the failure came from the identity (token) service rather than Key Vault.
    pub from_identity: bool,
    message: String,
}

impl Failure {
    pub(crate) fn new(
        target: &Target,
        status: Option<u16>,
        code: Option<String>,
        from_identity: bool,
        message: String,
    ) -> Self {
        Self {
            vault: target.vault.clone(),
            key: target.key.clone(),
            operation: target.op,
            status,
            code,
            from_identity,
            message,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Errors of the key provider. Messages name the vault and key and say what to check; they never
/// contain key bytes or tokens.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Bad configuration, key id, algorithm or credential files, found before any request.
    #[error("{0}")]
    Config(String),
    /// The vault or identity service refused access.
    #[error("{0}")]
    Denied(Failure),
    /// The vault or identity service failed or was unreachable; worth retrying later.
    #[error("{0}")]
    Transient(Failure),
    /// The service rejected the request as malformed, or answered something kvcrypt cannot use.
    #[error("{0}")]
    Misconfigured(Failure),
    /// No answer within the configured deadline.
    #[error(
        "Key Vault {vault} did not complete {operation} on key '{key}' within {:.1} s: check \
         network connectivity, DNS and firewalls between this host and the vault \
         (vault.deadline_ms / vault.attempt_timeout_ms set the limits)",
        after.as_secs_f64()
    )]
    Timeout {
        vault: String,
        key: String,
        operation: Operation,
        after: Duration,
    },
}

impl KeyError {
    pub fn class(&self) -> ErrorClass {
        match self {
            KeyError::Config(_) | KeyError::Misconfigured(_) => ErrorClass::Misconfigured,
            KeyError::Denied(_) => ErrorClass::Denied,
            KeyError::Transient(_) | KeyError::Timeout { .. } => ErrorClass::Transient,
        }
    }

    /// The failure details, for errors that came from a service call.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            KeyError::Denied(f) | KeyError::Transient(f) | KeyError::Misconfigured(f) => Some(f),
            _ => None,
        }
    }

    /// The most specific service error code (`ForbiddenByRbac`, `KeyNotFound`, `invalid_client` …).
    pub fn code(&self) -> Option<&str> {
        self.failure().and_then(|f| f.code.as_deref())
    }

    /// The HTTP status of the failing answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        self.failure().and_then(|f| f.status)
    }
}

impl ExitClass for KeyError {
    fn exit_class(&self) -> Exit {
        match self.class() {
            ErrorClass::Denied => Exit::AccessDenied,
            ErrorClass::Transient => Exit::VaultUnavailable,
            ErrorClass::Misconfigured => Exit::Config,
        }
    }
}

/// What a call was about, for messages.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub vault: String,
    pub key: String,
    pub op: Operation,
}

/// Error body fields, parsed from the raw response.
#[derive(Debug, Default, PartialEq)]
struct Body {
    /// Key Vault `error.code` or OAuth `error`.
    code: Option<String>,
    /// Key Vault `error.innererror.code`.
    inner: Option<String>,
    /// Key Vault `error.message` or OAuth `error_description` / MSI `message`.
    message: Option<String>,
    /// The body had the OAuth / MSI shape (`error` is a string).
    oauth: bool,
}

fn parse_body(raw: &[u8]) -> Body {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return Body::default();
    };
    let s = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    match v.get("error") {
        Some(e) if e.is_object() => Body {
            code: s(e.get("code")),
            inner: s(e.get("innererror").and_then(|i| i.get("code"))),
            message: s(e.get("message")),
            oauth: false,
        },
        Some(e) if e.is_string() => Body {
            code: s(Some(e)),
            inner: None,
            message: s(v.get("error_description")),
            oauth: true,
        },
        _ => Body {
            code: None,
            inner: None,
            message: s(v.get("message")).or_else(|| s(v.get("Message"))),
            oauth: true,
        },
    }
}

/// One line, bounded: service messages are quoted for the operator but must not flood logs.
fn tidy(msg: &str) -> String {
    let one_line: String = msg
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if one_line.chars().count() > 400 {
        let cut: String = one_line.chars().take(400).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

/// Classifies an SDK error from a call described by `target`. `identity_answer` is the last
/// failed token-endpoint answer captured for this call, if any (see `http::CaptureFailures`).
pub(crate) fn classify(
    err: &azure_core::Error,
    target: &Target,
    identity_answer: Option<&CapturedFailure>,
) -> KeyError {
    // The identity credentials wrap their failures in ErrorKind::Credential; the HTTP answer (if
    // any) sits further down the source chain.
    let mut from_identity = false;
    let mut http: Option<(&azure_core::Error, u16, &[u8])> = None;
    let mut transport: Option<String> = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(ae) = e.downcast_ref::<azure_core::Error>() {
            match ae.kind() {
                azure_core::error::ErrorKind::Credential => from_identity = true,
                azure_core::error::ErrorKind::HttpResponse {
                    status,
                    raw_response,
                    ..
                } if http.is_none() => {
                    let body = raw_response
                        .as_ref()
                        .map(|r| r.body().as_ref())
                        .unwrap_or(&[]);
                    http = Some((ae, u16::from(*status), body));
                }
                _ => {}
            }
        } else if let Some(re) = e.downcast_ref::<reqwest::Error>() {
            transport.get_or_insert_with(|| describe_reqwest(re));
        } else if let Some(io) = e.downcast_ref::<std::io::Error>() {
            transport.get_or_insert_with(|| format!("I/O error: {io}"));
        }
        cur = e.source();
    }

    if let Some((_, status, raw)) = http {
        let body = parse_body(raw);
        let identity = from_identity || body.oauth;
        return if identity {
            classify_identity(status, body, target)
        } else {
            classify_vault(status, body, target)
        };
    }

    // The credential could not parse the token endpoint's error answer (azure_identity 1.0
    // fails on `\r\n` in descriptions): classify from our own copy of it.
    if from_identity && let Some(answer) = identity_answer {
        let mut body = parse_body(&answer.body);
        body.oauth = true;
        return classify_identity(answer.status, body, target);
    }

    let Target { vault, key, op } = target;
    let mut detail = tidy(&chain_text(err));
    // The SDK's own text goes on to suggest turning the check off; kvcrypt never does.
    if let Some(cut) = detail.find(". Set verify_challenge_resource") {
        detail.truncate(cut);
    }
    // Transport failures (connect, TLS, DNS, timeouts, resets): all worth retrying later.
    if let Some(t) = transport {
        let who = if from_identity {
            "the identity endpoint (Entra ID / managed identity)"
        } else {
            "Key Vault"
        };
        return KeyError::Transient(Failure::new(
            target,
            None,
            None,
            from_identity,
            format!(
                "cannot reach {who} for {op} on key '{key}' in vault {vault}: {t}. Check network \
                 connectivity, DNS, firewalls and (for TLS errors) the system CA store or \
                 vault.ca_file"
            ),
        ));
    }
    let kind = err.kind();
    use azure_core::error::ErrorKind as K;
    match kind {
        K::Connection | K::Io => KeyError::Transient(Failure::new(
            target,
            None,
            None,
            from_identity,
            format!("network error during {op} on key '{key}' in vault {vault}: {detail}"),
        )),
        // A response we could not parse: usually a proxy or captive portal in the way.
        K::DataConversion if !detail.contains("challenge") => KeyError::Transient(Failure::new(
            target,
            None,
            None,
            from_identity,
            format!(
                "unexpected answer during {op} on key '{key}' in vault {vault}: {detail} (is a \
                 proxy or middlebox answering for the vault?)"
            ),
        )),
        _ if detail.contains("challenge") => KeyError::Misconfigured(Failure::new(
            target,
            None,
            Some("ChallengeMismatch".into()),
            false,
            format!(
                "the server answering for vault {vault} sent an authentication challenge that \
                 does not match the vault's domain, so no token was sent ({detail}). Check the \
                 key id's host and vault.resolve: this is not that vault's genuine endpoint"
            ),
        )),
        K::Credential => KeyError::Misconfigured(Failure::new(
            target,
            None,
            None,
            true,
            format!(
                "cannot obtain an Entra ID token for {op} on key '{key}' in vault {vault}: \
                 {detail}. Check [vault.credential] (for managed identity: is this a VM with an \
                 identity; for azure-cli: is `az login` done)"
            ),
        )),
        _ => KeyError::Misconfigured(Failure::new(
            target,
            None,
            None,
            from_identity,
            format!("{op} on key '{key}' in vault {vault} failed: {detail}"),
        )),
    }
}

/// The messages of the whole error chain, without the SDK's retry-policy boilerplate (the
/// useful text, e.g. a challenge mismatch, sits in an inner error).
fn chain_text(err: &azure_core::Error) -> String {
    const NOISE: [&str; 2] = [
        "non-transport error occurred which will not be retried",
        "retry policy expired and the request will no longer be retried",
    ];
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !NOISE.contains(&text.as_str()) && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    // Walk to the innermost cause: reqwest's own Display is only "error sending request".
    let mut root = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        root = c.to_string();
        cur = c.source();
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    if root.is_empty() {
        what.to_owned()
    } else {
        format!("{what} ({root})")
    }
}

fn classify_vault(status: u16, body: Body, target: &Target) -> KeyError {
    let Target { vault, key, op } = target;
    let code = body.inner.clone().or(body.code.clone());
    let said = body
        .message
        .as_deref()
        .map(|m| format!(" Key Vault said: {}", tidy(m)))
        .unwrap_or_default();
    let code_txt = code.as_deref().unwrap_or("no error code");
    let f = |message: String| Failure::new(target, Some(status), code.clone(), false, message);
    match status {
        401 => KeyError::Denied(f(format!(
            "Key Vault {vault} rejected the access token for {op} on key '{key}' (401 after \
             re-authenticating): check that the identity belongs to the vault's tenant and that \
             vault.authority_host matches the vault's cloud.{said}"
        ))),
        403 => {
            let hint = match code.as_deref() {
                Some("ForbiddenByRbac") => format!(
                    "the identity has no role granting keys/{op} on this vault or key — it lost \
                     the 'Key Vault Crypto Service Encryption User' role (or an equivalent custom \
                     role); check the role assignments"
                ),
                Some("AccessDenied") => format!(
                    "the vault's access policy does not grant {op} to this identity; check the \
                     vault's access policies (or that the principal still exists)"
                ),
                Some("KeyDisabled") => {
                    "the key (or this version) is disabled; re-enable it if this is not an \
                     intended revocation"
                        .to_owned()
                }
                Some("KeyOperationForbidden") => format!(
                    "the key's permitted operations (key_ops) exclude {op}, or the key is not \
                     yet valid / expired for it; check the key's properties"
                ),
                Some("KeyExpired") | Some("KeyNotYetValid") => format!(
                    "the key version is expired or not yet valid, so it may not {op} new keys \
                     (existing slots still unwrap): rotate the key or fix its activation/expiry dates"
                ),
                Some("ForbiddenByFirewall") => {
                    "the vault's firewall rejects this host's address; check the vault's network \
                     rules / private endpoint"
                        .to_owned()
                }
                _ => "access is forbidden; check the vault's access control and network rules"
                    .to_owned(),
            };
            KeyError::Denied(f(format!(
                "Key Vault {vault} denied {op} on key '{key}' ({code_txt}): {hint}.{said}"
            )))
        }
        404 if matches!(
            code.as_deref(),
            Some("KeyNotFound") | Some("NotFound") | None
        ) =>
        {
            KeyError::Denied(f(format!(
                "Key Vault {vault} has no key '{key}' (or not this version) for {op} \
                 ({code_txt}): it was deleted or never existed; if soft-deleted, recover it \
                 (az keyvault key recover).{said}"
            )))
        }
        408 | 429 | 500..=599 => {
            let what = match status {
                429 => "is throttling requests",
                408 => "timed out the request",
                _ => "failed with a server error",
            };
            KeyError::Transient(f(format!(
                "Key Vault {vault} {what} (HTTP {status}, {code_txt}) during {op} on key '{key}' \
                 — retries within the deadline did not succeed; this is usually temporary.{said}"
            )))
        }
        _ => KeyError::Misconfigured(f(format!(
            "Key Vault {vault} rejected {op} on key '{key}' (HTTP {status}, {code_txt}): check \
             the key id, the algorithm and that the key type supports {op}.{said}"
        ))),
    }
}

fn classify_identity(status: u16, body: Body, target: &Target) -> KeyError {
    let Target { vault, key, op } = target;
    let code = body.code.clone();
    let said = body
        .message
        .as_deref()
        .map(|m| format!(" The identity service said: {}", tidy(m)))
        .unwrap_or_default();
    let code_txt = code.as_deref().unwrap_or("no error code");
    let f = |message: String| Failure::new(target, Some(status), code.clone(), true, message);
    let lead = format!("cannot get a token for {op} on key '{key}' in vault {vault}");
    match (status, code.as_deref()) {
        (408 | 429 | 500..=599, _) => KeyError::Transient(f(format!(
            "{lead}: the identity endpoint failed (HTTP {status}, {code_txt}); usually \
             temporary.{said}"
        ))),
        (_, Some("invalid_client")) => KeyError::Denied(f(format!(
            "{lead}: Entra ID rejected the client credentials (invalid_client): the secret or \
             certificate is wrong, expired or was removed from the app registration.{said}"
        ))),
        (_, Some("unauthorized_client")) => KeyError::Denied(f(format!(
            "{lead}: Entra ID does not know this client (unauthorized_client): the application \
             or service principal was deleted or disabled, or client_id / tenant_id are \
             wrong.{said}"
        ))),
        (_, Some("invalid_grant")) => KeyError::Denied(f(format!(
            "{lead}: Entra ID refused the grant (invalid_grant): the federated credential no \
             longer trusts this token, or the principal was removed.{said}"
        ))),
        // Managed identity endpoints answer 400 when the identity is not (or no longer)
        // assigned to this machine.
        (400 | 401 | 403, None) | (400 | 401 | 403, Some("invalid_request"))
            if body.message.as_deref().is_some_and(|m| {
                let m = m.to_ascii_lowercase();
                m.contains("identity") && (m.contains("not found") || m.contains("not assigned"))
            }) || code.is_none() =>
        {
            KeyError::Denied(f(format!(
                "{lead}: the managed identity endpoint refused (HTTP {status}): the identity is \
                 not assigned to this machine (removed?), or the configured client/object id is \
                 wrong.{said}"
            )))
        }
        _ => KeyError::Misconfigured(f(format!(
            "{lead}: the identity service rejected the request (HTTP {status}, {code_txt}): check \
             tenant_id, client_id and vault.authority_host.{said}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::{RawResponse, StatusCode, headers::Headers};

    fn target() -> Target {
        Target {
            vault: "myvault.vault.azure.net".into(),
            key: "k1".into(),
            op: Operation::UnwrapKey,
        }
    }

    fn classify_t(e: &azure_core::Error, t: &Target) -> KeyError {
        classify(e, t, None)
    }

    #[test]
    fn unparsable_identity_error_uses_captured_answer() {
        // What azure_identity 1.0 returns for a real Entra ID error (borrowed-str parse failure).
        let inner = azure_core::Error::with_message(
            azure_core::error::ErrorKind::DataConversion,
            "invalid type: string, expected a borrowed string",
        );
        let outer = azure_core::Error::with_error(
            azure_core::error::ErrorKind::Credential,
            inner,
            "ClientSecretCredential authentication failed.",
        );
        let answer = CapturedFailure {
            status: 401,
            body: br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}"#.to_vec(),
        };
        let e = classify(&outer, &target(), Some(&answer));
        assert_eq!(e.class(), ErrorClass::Denied, "{e}");
        assert_eq!(e.code(), Some("invalid_client"));
        assert!(e.failure().unwrap().from_identity);
        // Without the captured answer it is only a setup problem.
        assert_eq!(
            classify_t(&outer, &target()).class(),
            ErrorClass::Misconfigured
        );
    }

    fn http_err(status: StatusCode, body: &str) -> azure_core::Error {
        let raw = RawResponse::from_bytes(status, Headers::new(), body.as_bytes().to_vec());
        azure_core::Error::with_message(
            azure_core::error::ErrorKind::HttpResponse {
                status,
                // Deliberately wrong, like the SDK's for messages with \r\n.
                error_code: Some("Forbidden".into()),
                raw_response: Some(Box::new(raw)),
            },
            "boom",
        )
    }

    #[test]
    fn rbac_403_with_crlf_message_is_denied_with_inner_code() {
        let body = r#"{"error":{"code":"Forbidden","message":"Caller is not authorized to perform action on resource.\r\nIf role assignments were recently changed, please wait several minutes.\r\nCaller: appid=x;oid=y\r\nAction: 'Microsoft.KeyVault/vaults/keys/unwrap/action'","innererror":{"code":"ForbiddenByRbac"}}}"#;
        let e = classify_t(&http_err(StatusCode::Forbidden, body), &target());
        assert_eq!(e.class(), ErrorClass::Denied);
        assert_eq!(e.code(), Some("ForbiddenByRbac"));
        assert_eq!(e.exit_class(), Exit::AccessDenied);
        let msg = e.to_string();
        assert!(msg.contains("myvault.vault.azure.net"), "{msg}");
        assert!(msg.contains("'k1'"), "{msg}");
        assert!(
            msg.contains("Key Vault Crypto Service Encryption User"),
            "{msg}"
        );
        assert!(!msg.contains('\r') && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn status_table() {
        let cases: &[(StatusCode, &str, ErrorClass, Option<&str>)] = &[
            (
                StatusCode::Forbidden,
                r#"{"error":{"code":"Forbidden","message":"m","innererror":{"code":"KeyDisabled"}}}"#,
                ErrorClass::Denied,
                Some("KeyDisabled"),
            ),
            (
                StatusCode::Forbidden,
                r#"{"error":{"code":"Forbidden","message":"Client address is not authorized\r\nx","innererror":{"code":"ForbiddenByFirewall"}}}"#,
                ErrorClass::Denied,
                Some("ForbiddenByFirewall"),
            ),
            (
                StatusCode::NotFound,
                r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k1 was not found in this key vault."}}"#,
                ErrorClass::Denied,
                Some("KeyNotFound"),
            ),
            (
                StatusCode::Unauthorized,
                r#"{"error":{"code":"Unauthorized","message":"AKV10032: Invalid issuer."}}"#,
                ErrorClass::Denied,
                Some("Unauthorized"),
            ),
            (
                StatusCode::TooManyRequests,
                r#"{"error":{"code":"Throttled","message":"Request was not processed because too many requests were received."}}"#,
                ErrorClass::Transient,
                Some("Throttled"),
            ),
            (
                StatusCode::ServiceUnavailable,
                "",
                ErrorClass::Transient,
                None,
            ),
            (
                StatusCode::BadGateway,
                "<html>",
                ErrorClass::Transient,
                None,
            ),
            (
                StatusCode::BadRequest,
                r#"{"error":{"code":"BadParameter","message":"Invalid algorithm"}}"#,
                ErrorClass::Misconfigured,
                Some("BadParameter"),
            ),
            (
                StatusCode::Unauthorized,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
                ErrorClass::Denied,
                Some("invalid_client"),
            ),
            (
                StatusCode::BadRequest,
                r#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application with identifier 'x' was not found in the directory","error_codes":[700016]}"#,
                ErrorClass::Denied,
                Some("unauthorized_client"),
            ),
            (
                StatusCode::BadRequest,
                r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant 'x' not found.","error_codes":[90002]}"#,
                ErrorClass::Misconfigured,
                Some("invalid_request"),
            ),
            (
                StatusCode::BadRequest,
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
                ErrorClass::Denied,
                Some("invalid_request"),
            ),
        ];
        for (status, body, class, code) in cases {
            let e = classify_t(&http_err(*status, body), &target());
            assert_eq!(e.class(), *class, "{status} {body}: {e}");
            assert_eq!(e.code(), *code, "{status} {body}");
            assert_eq!(e.status(), Some(u16::from(*status)));
        }
    }

    #[test]
    fn credential_wrapped_http_error_is_identity() {
        let inner = http_err(
            StatusCode::Unauthorized,
            r#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys are expired."}"#,
        );
        let outer = azure_core::Error::with_error(
            azure_core::error::ErrorKind::Credential,
            inner,
            "ClientSecretCredential authentication failed.",
        );
        let e = classify_t(&outer, &target());
        assert_eq!(e.class(), ErrorClass::Denied);
        assert!(e.failure().unwrap().from_identity);
        assert!(e.to_string().contains("AADSTS7000222"), "{e}");
    }

    #[test]
    fn transport_kinds_are_transient() {
        for kind in [
            azure_core::error::ErrorKind::Connection,
            azure_core::error::ErrorKind::Io,
        ] {
            let e = classify_t(&azure_core::Error::with_message(kind, "reset"), &target());
            assert_eq!(e.class(), ErrorClass::Transient);
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = classify_t(
            &azure_core::Error::new(azure_core::error::ErrorKind::Io, io),
            &target(),
        );
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(e.to_string().contains("reset by peer"), "{e}");
    }

    #[test]
    fn challenge_mismatch_is_misconfigured() {
        let e = classify_t(
            &azure_core::Error::with_message(
                azure_core::error::ErrorKind::Other,
                "challenge resource 'https://evil.example/.default' doesn't match the requested domain 'myvault.vault.azure.net'",
            ),
            &target(),
        );
        assert_eq!(e.class(), ErrorClass::Misconfigured);
        assert_eq!(e.code(), Some("ChallengeMismatch"));
    }

    #[test]
    fn timeout_is_transient_and_names_vault() {
        let e = KeyError::Timeout {
            vault: "v.vault.azure.net".into(),
            key: "k".into(),
            operation: Operation::WrapKey,
            after: Duration::from_millis(2500),
        };
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(e.exit_class(), Exit::VaultUnavailable);
        assert!(e.to_string().contains("2.5 s"));
    }
}
