//! `KeyError` and its classification into Denied / Transient / Misconfigured.
//!
//! Classification reads the RAW response body (`error.code`, `error.innererror.code` for Key
//! Vault; `error`, `error_codes` for Entra ID) and the status, not the SDK's `error_code`: the SDK
//! gets that wrong for 403s whose message contains `\r\n` (RBAC and firewall denials).
//!
//! Only `Denied` means "access was revoked" — the agent wipes keys on it. Anything that might be
//! a passing network or service problem is `Transient`; local mistakes are `Misconfigured`.

use super::answer::{Received, Shape, challenge_persisted, shape};
use super::http::CallRecord;
use azure_core::http::headers::CONTENT_TYPE;
use kvcrypt_exit::{Exit, ExitClass};
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
    GetRotationPolicy,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::WrapKey => "wrapKey",
            Operation::UnwrapKey => "unwrapKey",
            Operation::GetKey => "get",
            Operation::GetRotationPolicy => "getrotationpolicy",
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

impl Failure {
    /// A service's refusal or failure as another [`crate::KeyProvider`] reports it (no HTTP
    /// details): `vault` and `key` name what was asked, `message` says what to check.
    pub fn answer(
        vault: impl Into<String>,
        key: impl Into<String>,
        operation: Operation,
        message: impl Into<String>,
    ) -> Self {
        Self {
            vault: vault.into(),
            key: key.into(),
            operation,
            status: None,
            code: None,
            from_identity: false,
            message: message.into(),
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

/// The fields of a service error answer that classification uses.
#[derive(Debug, Default, PartialEq)]
struct Body {
    /// Key Vault `error.code` or OAuth `error`.
    code: Option<String>,
    /// Key Vault `error.innererror.code`.
    inner: Option<String>,
    /// Key Vault `error.message` or OAuth `error_description` / App Service `message`.
    message: Option<String>,
}

/// The HTTP answer found in an error chain (or captured from the token endpoint).
struct HttpAnswer<'a> {
    status: u16,
    content_type: Option<&'a str>,
    body: &'a [u8],
}

impl HttpAnswer<'_> {
    fn received(&self) -> Received {
        Received::new(self.status, self.content_type, self.body)
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

/// Classifies an SDK error from a call described by `target`. `record` holds what the
/// pipelines saw of this call: the last failed token-endpoint answer (`http::CaptureFailures`)
/// and the Key Vault exchanges (`http::TraceAnswers`).
pub(crate) fn classify(err: &azure_core::Error, target: &Target, record: &CallRecord) -> KeyError {
    // The identity credentials wrap their failures in ErrorKind::Credential; the HTTP answer (if
    // any) sits further down the source chain.
    let mut from_identity = false;
    let mut http: Option<HttpAnswer<'_>> = None;
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
                    http = Some(HttpAnswer {
                        status: u16::from(*status),
                        content_type: raw_response
                            .as_ref()
                            .and_then(|r| r.headers().get_optional_str(&CONTENT_TYPE)),
                        body: raw_response
                            .as_ref()
                            .map(|r| r.body().as_ref())
                            .unwrap_or(&[]),
                    });
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

    // Which service answered is decided by where the answer came from (the credentials wrap
    // theirs in ErrorKind::Credential), never by what the body claims to be.
    if let Some(answer) = http {
        return if from_identity {
            classify_identity(&answer, target)
        } else {
            classify_vault(&answer, challenge_persisted(&record.exchanges), target)
        };
    }

    // The credential could not parse the token endpoint's error answer (azure_identity 1.0
    // fails on `\r\n` in descriptions, and on anything not JSON): classify from our own copy.
    if from_identity && let Some(answer) = &record.identity {
        let answer = HttpAnswer {
            status: answer.status,
            content_type: answer.content_type.as_deref(),
            body: &answer.body,
        };
        return classify_identity(&answer, target);
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

/// A transient failure for an answer that is not the service's own error answer (a proxy's,
/// load balancer's or captive portal's page, an empty body, some other JSON): it must never
/// revoke, so it is Transient and follows the agent's `offline_lock_after`.
fn not_service_answer(
    target: &Target,
    answer: &HttpAnswer<'_>,
    from_identity: bool,
    why: &str,
) -> KeyError {
    let Target { vault, key, op } = target;
    let (who, what) = if from_identity {
        (
            "the identity endpoint (Entra ID / managed identity)",
            "an Entra ID or managed identity error answer",
        )
    } else {
        ("Key Vault", "a Key Vault error answer")
    };
    KeyError::Transient(Failure::new(
        target,
        Some(answer.status),
        None,
        from_identity,
        format!(
            "{who} for {op} on key '{key}' in vault {vault} answered {}{why}: not {what}, \
             treated as transient (a proxy, load balancer or firewall appliance may be answering \
             in its place; only the service's own error answers revoke access)",
            answer.received()
        ),
    ))
}

fn classify_vault(answer: &HttpAnswer<'_>, persisted: bool, target: &Target) -> KeyError {
    let status = answer.status;
    let body = match shape(status, answer.body) {
        Shape::KeyVault {
            code,
            inner,
            message,
        } => Body {
            code: Some(code),
            inner,
            message,
        },
        _ => return not_service_answer(target, answer, false, ""),
    };
    // A 401 is only Key Vault refusing this identity when its Bearer challenge came back for a
    // request carrying a token fetched after a first challenge.
    if status == 401 && !persisted {
        return not_service_answer(
            target,
            answer,
            false,
            " without a Bearer challenge that persisted after a fresh token was sent",
        );
    }
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
            "Key Vault {vault} rejected the access token for {op} on key '{key}' (401 with a \
             Bearer challenge again after a freshly obtained token was sent): check that the identity belongs to the vault's tenant and that \
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
        404 if matches!(code.as_deref(), Some("KeyNotFound") | Some("NotFound")) => {
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

fn classify_identity(answer: &HttpAnswer<'_>, target: &Target) -> KeyError {
    let status = answer.status;
    let body = match shape(status, answer.body) {
        Shape::OAuth { code, message } => Body {
            code: Some(code),
            inner: None,
            message: Some(message),
        },
        Shape::AppServiceIdentity { message } => Body {
            code: None,
            inner: None,
            message: Some(message),
        },
        Shape::KeyVault { .. } | Shape::Foreign => {
            return not_service_answer(target, answer, true, "");
        }
    };
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
        // assigned to this machine: IMDS with OAuth `invalid_request` "Identity not found",
        // App Service with "No Managed Identity found for specified ClientId/…".
        (400 | 401 | 403, None) | (400 | 401 | 403, Some("invalid_request"))
            if body.message.as_deref().is_some_and(|m| {
                let m = m.to_ascii_lowercase();
                m.contains("identity")
                    && (m.contains("not found")
                        || m.contains("identity found")
                        || m.contains("not assigned")
                        || m.contains("has not been assigned"))
            }) =>
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
    use crate::answer::Exchange;
    use crate::http::CapturedFailure;
    use azure_core::http::{RawResponse, StatusCode, headers::Headers};

    fn target() -> Target {
        Target {
            vault: "myvault.vault.azure.net".into(),
            key: "k1".into(),
            op: Operation::UnwrapKey,
        }
    }

    fn classify_t(e: &azure_core::Error, t: &Target) -> KeyError {
        classify(e, t, &CallRecord::default())
    }

    /// What the trace policy records when the SDK answered a challenge and was refused again.
    fn challenged_twice() -> CallRecord {
        let ex = |authorized| Exchange {
            authorized,
            status: 401,
            challenge: true,
        };
        CallRecord {
            identity: None,
            exchanges: vec![ex(false), ex(true)],
        }
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
            content_type: Some("application/json; charset=utf-8".into()),
            body: br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}"#.to_vec(),
        };
        let record = CallRecord {
            identity: Some(answer),
            exchanges: Vec::new(),
        };
        let e = classify(&outer, &target(), &record);
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
        let mut headers = Headers::new();
        if body.starts_with('{') {
            headers.insert(CONTENT_TYPE, "application/json; charset=utf-8");
        } else if body.starts_with('<') {
            headers.insert(CONTENT_TYPE, "text/html");
        }
        let raw = RawResponse::from_bytes(status, headers, body.as_bytes().to_vec());
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

    fn identity_err(status: StatusCode, body: &str) -> azure_core::Error {
        azure_core::Error::with_error(
            azure_core::error::ErrorKind::Credential,
            http_err(status, body),
            "ClientSecretCredential authentication failed.",
        )
    }

    #[test]
    fn status_table() {
        let vault: &[(StatusCode, &str, ErrorClass, Option<&str>)] = &[
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
                StatusCode::Forbidden,
                r#"{"error":{"code":"ForbiddenByPolicy","message":"Operation denied by policy"}}"#,
                ErrorClass::Denied,
                Some("ForbiddenByPolicy"),
            ),
            (
                StatusCode::NotFound,
                r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k1 was not found in this key vault."}}"#,
                ErrorClass::Denied,
                Some("KeyNotFound"),
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
            // Not Key Vault's answers: never Denied, whatever the status.
            (
                StatusCode::Forbidden,
                "<html><head><title>403 Forbidden</title></head><body>nginx</body></html>",
                ErrorClass::Transient,
                None,
            ),
            (StatusCode::Forbidden, "", ErrorClass::Transient, None),
            (StatusCode::NotFound, "", ErrorClass::Transient, None),
            (
                StatusCode::NotFound,
                "<!DOCTYPE html><html><body>Not Found</body></html>",
                ErrorClass::Transient,
                None,
            ),
            (
                StatusCode::Forbidden,
                r#"{"statusCode":403,"message":"Forbidden by the gateway"}"#,
                ErrorClass::Transient,
                None,
            ),
            (
                StatusCode::Forbidden,
                r#"{"error":"Forbidden"}"#,
                ErrorClass::Transient,
                None,
            ),
            (
                StatusCode::BadRequest,
                "Bad Request",
                ErrorClass::Transient,
                None,
            ),
            // An OAuth body on the vault's path is not Entra ID's answer.
            (
                StatusCode::Unauthorized,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#,
                ErrorClass::Transient,
                None,
            ),
            // A 401 without the challenge round (no trace of a re-sent token).
            (
                StatusCode::Unauthorized,
                r#"{"error":{"code":"Unauthorized","message":"AKV10032: Invalid issuer."}}"#,
                ErrorClass::Transient,
                None,
            ),
        ];
        for (status, body, class, code) in vault {
            let e = classify_t(&http_err(*status, body), &target());
            assert_eq!(e.class(), *class, "{status} {body}: {e}");
            assert_eq!(e.code(), *code, "{status} {body}");
            assert_eq!(e.status(), Some(u16::from(*status)));
            assert!(!e.failure().unwrap().from_identity, "{e}");
        }
        let identity: &[(StatusCode, &str, ErrorClass, Option<&str>)] = &[
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
            (
                StatusCode::BadRequest,
                r#"{"statusCode":400,"message":"No Managed Identity found for specified ClientId/ResourceId/PrincipalId.","correlationId":"c"}"#,
                ErrorClass::Denied,
                None,
            ),
            (
                StatusCode::Unauthorized,
                r#"{"statusCode":401,"message":"The X-IDENTITY-HEADER header is missing."}"#,
                ErrorClass::Misconfigured,
                None,
            ),
            (
                StatusCode::ServiceUnavailable,
                r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: loop"}"#,
                ErrorClass::Transient,
                Some("temporarily_unavailable"),
            ),
            // Not the identity service's answers.
            (
                StatusCode::Unauthorized,
                "<html><body>401 Authorization Required</body></html>",
                ErrorClass::Transient,
                None,
            ),
            (StatusCode::BadRequest, "", ErrorClass::Transient, None),
            (
                StatusCode::Forbidden,
                r#"{"message":"blocked"}"#,
                ErrorClass::Transient,
                None,
            ),
            (
                StatusCode::Forbidden,
                r#"{"error":{"code":"Forbidden","message":"m"}}"#,
                ErrorClass::Transient,
                None,
            ),
        ];
        for (status, body, class, code) in identity {
            let e = classify_t(&identity_err(*status, body), &target());
            assert_eq!(e.class(), *class, "{status} {body}: {e}");
            assert_eq!(e.code(), *code, "{status} {body}");
            assert_eq!(e.status(), Some(u16::from(*status)));
            assert!(e.failure().unwrap().from_identity, "{e}");
        }
    }

    #[test]
    fn foreign_answer_message_says_what_was_received() {
        let body = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body><center>nginx</center></body></html>";
        let e = classify_t(&http_err(StatusCode::Forbidden, body), &target());
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(e.exit_class(), Exit::VaultUnavailable);
        let msg = e.to_string();
        for part in [
            "myvault.vault.azure.net",
            "'k1'",
            "unwrapKey",
            "HTTP 403",
            "content-type text/html",
            "<html> <head><title>403 Forbidden</title>",
            "not a Key Vault error answer, treated as transient",
        ] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }
        assert!(!msg.contains(['\r', '\n']), "{msg}");
        let e = classify_t(&http_err(StatusCode::NotFound, ""), &target());
        assert!(
            e.to_string()
                .contains("HTTP 404, no content-type, empty body"),
            "{e}"
        );
    }

    #[test]
    fn unauthorized_needs_a_challenge_that_persisted() {
        let body = r#"{"error":{"code":"Unauthorized","message":"[TokenExpired] Error validating token: 'S2S12086'."}}"#;
        let e = classify(
            &http_err(StatusCode::Unauthorized, body),
            &target(),
            &challenged_twice(),
        );
        assert_eq!(e.class(), ErrorClass::Denied, "{e}");
        assert_eq!(e.code(), Some("Unauthorized"));
        assert!(e.to_string().contains("freshly obtained token"), "{e}");
        // Without the challenge round (a 401 with no challenge, or to a request without a
        // token): transient, and the message does not claim a re-authentication.
        let once = CallRecord {
            identity: None,
            exchanges: vec![Exchange {
                authorized: true,
                status: 401,
                challenge: false,
            }],
        };
        let e = classify(&http_err(StatusCode::Unauthorized, body), &target(), &once);
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        assert!(
            e.to_string()
                .contains("without a Bearer challenge that persisted"),
            "{e}"
        );
        assert!(!e.to_string().contains("freshly obtained"), "{e}");
        // A challenge round that ends in an HTML 401: not Key Vault's answer.
        let e = classify(
            &http_err(StatusCode::Unauthorized, "<html>401</html>"),
            &target(),
            &challenged_twice(),
        );
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
    }

    #[test]
    fn unparsable_identity_answer_that_is_not_entra_is_transient() {
        let outer = azure_core::Error::with_error(
            azure_core::error::ErrorKind::Credential,
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::DataConversion,
                "expected value at line 1 column 1",
            ),
            "ClientSecretCredential authentication failed.",
        );
        let record = CallRecord {
            identity: Some(CapturedFailure {
                status: 403,
                content_type: Some("text/html".into()),
                body: b"<html><body>Access denied by proxy</body></html>".to_vec(),
            }),
            exchanges: Vec::new(),
        };
        let e = classify(&outer, &target(), &record);
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        assert!(e.failure().unwrap().from_identity);
        assert!(
            e.to_string()
                .contains("not an Entra ID or managed identity error answer"),
            "{e}"
        );
        assert!(e.to_string().contains("Access denied by proxy"), "{e}");
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
