//! Is an error answer really the service's own? Only Key Vault's (or Entra ID's) own error
//! answers may revoke access: the agent wipes keys and freezes filesystems on `Denied`, so a
//! proxy's, load balancer's or captive portal's error page (HTML, empty, some other JSON) must
//! never be taken for a revocation.
//!
//! The shapes recognised, as the real services (and every official Azure SDK) define them:
//! - Key Vault / Managed HSM: `{"error":{"code":"Forbidden","message":"…","innererror":{…}}}`
//!   (the `KeyVaultError` model of the SDKs).
//! - Entra ID token endpoint and VM IMDS: the OAuth 2.0 error
//!   `{"error":"invalid_client","error_description":"AADSTS…"}` (RFC 6749 §5.2).
//! - App Service managed identity endpoint: `{"statusCode":400,"message":"…"}`.
//!
//! A 401 from Key Vault additionally counts only when it carries a `Bearer` challenge and
//! persisted after the SDK answered a challenge with a newly obtained token (see
//! [`challenge_persisted`]): a 401 without a challenge, or to a request that carried no token,
//! says nothing about this identity's access.

use std::fmt;

/// One request/answer pair of a Key Vault call, as the per-try trace policy saw it
/// (`http::TraceAnswers`). No header values are kept: only whether they were there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exchange {
    /// The request carried `Authorization: Bearer …`.
    pub authorized: bool,
    pub status: u16,
    /// The answer carried a `WWW-Authenticate: Bearer …` challenge.
    pub challenge: bool,
}

/// Whether a `WWW-Authenticate` value is a Bearer challenge (scheme names are
/// case-insensitive, RFC 9110 §11.1).
pub(crate) fn is_bearer_challenge(value: Option<&str>) -> bool {
    // "Bearer" followed by a space (and its parameters); "Bearerx" or a bare "Bearer" is not.
    value.is_some_and(|v| {
        let v = v.trim_start();
        v.len() > 7
            && v.get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
    })
}

/// A challenge-based 401 that persisted after re-authenticating: the last answer is a 401
/// with a Bearer challenge to a request that carried a token, and the answer before it was a
/// 401 challenge too — so the SDK's challenge handling fetched a token from the credential and
/// re-sent the request with it (it re-sends exactly once after a challenge, and the retry
/// policy never retries a 401).
pub(crate) fn challenge_persisted(exchanges: &[Exchange]) -> bool {
    match exchanges {
        [.., before, last] => {
            last.status == 401
                && last.challenge
                && last.authorized
                && before.status == 401
                && before.challenge
        }
        _ => false,
    }
}

/// The error answer's body, judged by its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Key Vault's `{"error":{"code","message","innererror":{"code"}}}`.
    KeyVault {
        code: String,
        inner: Option<String>,
        message: Option<String>,
    },
    /// OAuth error of Entra ID or IMDS: `{"error":"…","error_description":"…"}`.
    OAuth { code: String, message: String },
    /// App Service managed identity endpoint: `{"statusCode":N,"message":"…"}` (N = the status).
    AppServiceIdentity { message: String },
    /// Anything else: not JSON, empty, JSON of another shape.
    Foreign,
}

/// Judges `body` (the raw answer to a request that got HTTP `status`).
pub(crate) fn shape(status: u16, body: &[u8]) -> Shape {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Shape::Foreign;
    };
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.as_str())
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
    };
    match v.get("error") {
        Some(e) if e.is_object() => {
            // Both fields are required by the Key Vault REST spec (`KeyVaultError.error`).
            let (Some(code), Some(message)) = (text(e.get("code")), e.get("message")) else {
                return Shape::Foreign;
            };
            if !message.is_string() {
                return Shape::Foreign;
            }
            Shape::KeyVault {
                code,
                inner: text(e.get("innererror").and_then(|i| i.get("code"))),
                message: text(Some(message)),
            }
        }
        Some(e) if e.is_string() => match (text(Some(e)), text(v.get("error_description"))) {
            (Some(code), Some(message)) => Shape::OAuth { code, message },
            _ => Shape::Foreign,
        },
        Some(_) => Shape::Foreign,
        None => match (
            v.get("statusCode").and_then(|s| s.as_u64()),
            text(v.get("message")),
        ) {
            (Some(s), Some(message)) if s == u64::from(status) => {
                Shape::AppServiceIdentity { message }
            }
            _ => Shape::Foreign,
        },
    }
}

/// What was received, for the message of an answer that is not the service's: status,
/// content type, size and the first bytes (control characters replaced, truncated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    pub status: u16,
    pub content_type: Option<String>,
    pub len: usize,
    pub head: String,
}

/// How many characters of a foreign body are quoted.
const HEAD_CHARS: usize = 80;

impl Received {
    pub(crate) fn new(status: u16, content_type: Option<&str>, body: &[u8]) -> Self {
        Self {
            status,
            content_type: content_type.map(|c| sanitize(c, 60)),
            len: body.len(),
            head: sanitize(
                &String::from_utf8_lossy(&body[..body.len().min(4 * HEAD_CHARS)]),
                HEAD_CHARS,
            ),
        }
    }
}

/// One line of printable text, whitespace runs collapsed, at most `max` characters.
fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    let mut space = false;
    for c in s.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if space || out.is_empty() {
                continue;
            }
            space = true;
        } else {
            space = false;
        }
        if count == max {
            out.push('…');
            return out;
        }
        out.push(c);
        count += 1;
    }
    out.trim_end().to_owned()
}

impl fmt::Display for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        match &self.content_type {
            Some(c) => write!(f, ", content-type {c}")?,
            None => f.write_str(", no content-type")?,
        }
        if self.len == 0 {
            f.write_str(", empty body")
        } else {
            write!(
                f,
                ", {} bytes: \"{}\"",
                self.len,
                self.head.replace('"', "'")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KV_403: &str = r#"{"error":{"code":"Forbidden","message":"Caller is not authorized.\r\nCaller: x","innererror":{"code":"ForbiddenByRbac"}}}"#;

    #[test]
    fn key_vault_shapes() {
        assert_eq!(
            shape(403, KV_403.as_bytes()),
            Shape::KeyVault {
                code: "Forbidden".into(),
                inner: Some("ForbiddenByRbac".into()),
                message: Some("Caller is not authorized.\r\nCaller: x".into()),
            }
        );
        for (status, body, code) in [
            (
                404,
                r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k was not found in this key vault."}}"#,
                "KeyNotFound",
            ),
            (
                403,
                r#"{"error":{"code":"Forbidden","message":"Operation unwrapKey is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#,
                "Forbidden",
            ),
            (
                403,
                r#"{"error":{"code":"ForbiddenByPolicy","message":"m"}}"#,
                "ForbiddenByPolicy",
            ),
            (
                401,
                r#"{"error":{"code":"Unauthorized","message":"AKV10032: Invalid issuer."}}"#,
                "Unauthorized",
            ),
        ] {
            match shape(status, body.as_bytes()) {
                Shape::KeyVault { code: c, .. } => assert_eq!(c, code),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn oauth_and_app_service_shapes() {
        assert_eq!(
            shape(401, br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x","error_codes":[7000215]}"#),
            Shape::OAuth {
                code: "invalid_client".into(),
                message: "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x".into()
            }
        );
        assert_eq!(
            shape(
                400,
                br#"{"error":"invalid_request","error_description":"Identity not found"}"#
            ),
            Shape::OAuth {
                code: "invalid_request".into(),
                message: "Identity not found".into()
            }
        );
        assert_eq!(
            shape(400, br#"{"statusCode":400,"message":"No Managed Identity found for specified ClientId/ResourceId/PrincipalId.","correlationId":"c"}"#),
            Shape::AppServiceIdentity {
                message: "No Managed Identity found for specified ClientId/ResourceId/PrincipalId.".into()
            }
        );
    }

    #[test]
    fn everything_else_is_foreign() {
        for (status, body) in [
            (403, ""),
            (
                403,
                "<html><head><title>403 Forbidden</title></head><body>nginx</body></html>",
            ),
            (404, "<!DOCTYPE html><html>Not Found</html>"),
            (404, "Not Found"),
            (403, "null"),
            (403, "[]"),
            (403, "{}"),
            (403, r#"{"message":"Forbidden"}"#),
            // App Service shape whose statusCode is not the answer's status.
            (403, r#"{"statusCode":500,"message":"Forbidden"}"#),
            (403, r#"{"error":"Forbidden"}"#),
            (403, r#"{"error":""}"#),
            (403, r#"{"error":{"message":"no code"}}"#),
            (403, r#"{"error":{"code":"Forbidden"}}"#),
            (403, r#"{"error":{"code":"","message":"empty code"}}"#),
            (403, r#"{"error":{"code":7,"message":"m"}}"#),
            (403, r#"{"error":{"code":"Forbidden","message":3}}"#),
            (403, r#"{"error":42}"#),
            (401, r#"{"statusCode":401,"message":""}"#),
            // A truncated Key Vault answer is not an answer.
            (403, &KV_403[..40]),
        ] {
            assert_eq!(
                shape(status, body.as_bytes()),
                Shape::Foreign,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn bearer_challenge_detection() {
        assert!(is_bearer_challenge(Some(
            r#"Bearer authorization="https://login.microsoftonline.com/t", resource="https://vault.azure.net""#
        )));
        assert!(is_bearer_challenge(Some("bearer realm=\"x\"")));
        assert!(!is_bearer_challenge(None));
        assert!(!is_bearer_challenge(Some("")));
        assert!(!is_bearer_challenge(Some("Bearer")));
        assert!(!is_bearer_challenge(Some("Basic realm=\"proxy\"")));
        assert!(!is_bearer_challenge(Some("Bearerx a=b")));
        assert!(!is_bearer_challenge(Some("Beärer a=b")));
    }

    fn ex(authorized: bool, status: u16, challenge: bool) -> Exchange {
        Exchange {
            authorized,
            status,
            challenge,
        }
    }

    #[test]
    fn only_a_challenge_that_survives_a_fresh_token_counts() {
        // First request of a client (no token), challenge, token fetched, refused again.
        assert!(challenge_persisted(&[
            ex(false, 401, true),
            ex(true, 401, true)
        ]));
        // Cached token refused, re-authenticated, refused again.
        assert!(challenge_persisted(&[
            ex(true, 401, true),
            ex(true, 401, true)
        ]));
        // An earlier 503 retried first does not matter.
        assert!(challenge_persisted(&[
            ex(true, 503, false),
            ex(true, 401, true),
            ex(true, 401, true)
        ]));
        // A 401 without a challenge: the SDK never re-authenticates, nothing was proven.
        assert!(!challenge_persisted(&[ex(true, 401, false)]));
        assert!(!challenge_persisted(&[ex(false, 401, false)]));
        // The challenge was answered, then a 401 without challenge.
        assert!(!challenge_persisted(&[
            ex(false, 401, true),
            ex(true, 401, false)
        ]));
        // A challenge to a request without a token only (nothing re-sent).
        assert!(!challenge_persisted(&[ex(false, 401, true)]));
        // The re-sent request carried no token.
        assert!(!challenge_persisted(&[
            ex(false, 401, true),
            ex(false, 401, true)
        ]));
        // A 401 that was not preceded by a challenge.
        assert!(!challenge_persisted(&[
            ex(true, 503, false),
            ex(true, 401, true)
        ]));
        assert!(!challenge_persisted(&[]));
    }

    #[test]
    fn received_is_one_bounded_line() {
        let html = format!(
            "<html>\r\n<head><title>403 Forbidden</title></head>\n\t<body>{}</body></html>",
            "x".repeat(5000)
        );
        let r = Received::new(403, Some("text/html"), html.as_bytes());
        let s = r.to_string();
        let lead = format!(
            "HTTP 403, content-type text/html, {} bytes: \"<html> <head><title>403 Forbidden</title></head> <body>xxx",
            html.len()
        );
        assert!(s.starts_with(&lead), "{s}");
        assert!(s.ends_with("…\""), "{s}");
        assert!(!s.contains(['\r', '\n', '\t']), "{s}");
        assert!(s.chars().count() < 160, "{s}");
        assert_eq!(
            Received::new(404, None, b"").to_string(),
            "HTTP 404, no content-type, empty body"
        );
        let r = Received::new(
            403,
            Some("application/json"),
            b"{\"message\":\"no\x07\x1b[31m\"}",
        );
        assert_eq!(
            r.to_string(),
            "HTTP 403, content-type application/json, 22 bytes: \"{'message':'no [31m'}\""
        );
        // Invalid UTF-8 and a cut in the middle of a character do not panic.
        let r = Received::new(403, None, &[0xff, 0xfe, b'a', 0xe2, 0x82]);
        assert!(r.to_string().contains("5 bytes"), "{r}");
    }
}
