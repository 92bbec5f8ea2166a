//! Response builders for the real services' bodies: Key Vault's
//! `{"error":{"code","message","innererror"}}` and Entra ID's OAuth error JSON.
//! Texts are copied from the real services (including their `\r\n` line breaks, which
//! trip up the SDK's own `error_code` parsing — clients must read the raw body).

use super::model::{AuthMode, Op, now};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

pub type Resp = Response<Full<Bytes>>;

/// The service version header value the real vault sends (kept for client logs).
const SERVICE_VERSION: &str = "1.9.2489.1";

pub fn json(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(
        "cache-control",
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    r
}

pub fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// Adds the headers every Key Vault data-plane response carries.
pub fn vault_headers(mut r: Resp, request_id: &str) -> Resp {
    let h = r.headers_mut();
    if let Ok(v) = request_id.parse() {
        h.insert("x-ms-request-id", v);
    }
    h.insert(
        "x-ms-keyvault-service-version",
        hyper::header::HeaderValue::from_static(SERVICE_VERSION),
    );
    h.insert(
        "x-ms-keyvault-region",
        hyper::header::HeaderValue::from_static("emulator"),
    );
    h.insert(
        "x-ms-keyvault-network-info",
        hyper::header::HeaderValue::from_static(
            "conn_type=Ipv4;addr=127.0.0.1;act_addr_fam=InterNetwork;",
        ),
    );
    r
}

pub fn kv_error(status: StatusCode, code: &str, message: &str, inner: Option<&str>) -> Resp {
    let mut err = serde_json::json!({ "code": code, "message": message });
    if let Some(inner) = inner {
        err["innererror"] = serde_json::json!({ "code": inner });
    }
    json(status, &serde_json::json!({ "error": err }))
}

pub fn bad_parameter(message: &str) -> Resp {
    kv_error(StatusCode::BAD_REQUEST, "BadParameter", message, None)
}

/// The 401 challenge. Its `resource` must be the vault's resource domain so the SDK's
/// challenge check (`request host ends with ".{challenge host}"`) passes for real vault
/// host names.
pub fn unauthorized(tenant: &str, resource: &str, message: &str) -> Resp {
    let mut r = kv_error(StatusCode::UNAUTHORIZED, "Unauthorized", message, None);
    let challenge = format!(
        "Bearer authorization=\"https://login.microsoftonline.com/{tenant}\", resource=\"{resource}\""
    );
    if let Ok(v) = challenge.parse() {
        r.headers_mut().insert("www-authenticate", v);
    }
    r
}

pub fn caller(client_id: &str, object_id: &str, tenant: &str) -> String {
    format!("appid={client_id};oid={object_id};iss=https://sts.windows.net/{tenant}/")
}

pub fn vault_label(host: &str) -> String {
    let name = host.split('.').next().unwrap_or(host);
    let name = name.split(':').next().unwrap_or(name);
    format!("{name};location=eastus")
}

/// 403 for a missing permission, in the flavour of the vault's authorization mode.
pub fn forbidden(mode: AuthMode, op: Op, caller: &str, host: &str, key_name: Option<&str>) -> Resp {
    match mode {
        AuthMode::Rbac => {
            let vault = host.split('.').next().unwrap_or(host);
            let vault = vault.split(':').next().unwrap_or(vault);
            let mut resource = format!(
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kvcrypt-emulator/providers/microsoft.keyvault/vaults/{vault}"
            );
            if let Some(k) = key_name {
                resource.push_str(&format!("/keys/{k}"));
            }
            let msg = format!(
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: {caller}\r\nAction: '{}'\r\nResource: '{}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\nVault: {}\r\n",
                op.rbac_action(),
                resource.to_ascii_lowercase(),
                vault_label(host)
            );
            kv_error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &msg,
                Some("ForbiddenByRbac"),
            )
        }
        AuthMode::AccessPolicy => {
            let msg = format!(
                "The user, group or application '{caller}' does not have keys {} permission on key vault '{}'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
                op.policy_name(),
                vault_label(host)
            );
            kv_error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &msg,
                Some("AccessDenied"),
            )
        }
    }
}

pub fn firewall(caller: &str, host: &str) -> Resp {
    let msg = format!(
        "Client address is not authorized and caller is not a trusted service.\r\nClient address: 127.0.0.1\r\nCaller: {caller}\r\nVault: {}",
        vault_label(host)
    );
    kv_error(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &msg,
        Some("ForbiddenByFirewall"),
    )
}

pub fn key_not_found(name_or_id: &str) -> Resp {
    let msg = format!(
        "A key with (name/id) {name_or_id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
    );
    kv_error(StatusCode::NOT_FOUND, "KeyNotFound", &msg, None)
}

pub fn throttled(retry_after: Option<u64>) -> Resp {
    let mut r = kv_error(
        StatusCode::TOO_MANY_REQUESTS,
        "Throttled",
        "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
        None,
    );
    if let Some(s) = retry_after
        && let Ok(v) = s.to_string().parse()
    {
        r.headers_mut().insert("retry-after", v);
    }
    r
}

pub fn server_error(status: StatusCode) -> Resp {
    let (code, msg) = match status.as_u16() {
        503 => (
            "ServiceUnavailable",
            "The service is temporarily unavailable. Please retry later.",
        ),
        502 => ("BadGateway", "The gateway received an invalid response."),
        504 => ("GatewayTimeout", "The gateway timed out."),
        _ => (
            "InternalServerError",
            "The server encountered an internal error. Please retry the request.",
        ),
    };
    kv_error(status, code, msg, None)
}

/// Bodies that are NOT the services' own (fault injection): what a reverse proxy, load
/// balancer or firewall appliance in front of the vault answers. They carry none of the
/// vault's `x-ms-*` headers either.
pub fn html_page(status: StatusCode) -> Resp {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>Microsoft-Azure-Application-Gateway/v2</center>\r\n</body>\r\n</html>\r\n"
    );
    let mut r = Response::new(Full::new(Bytes::from(page)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/html"),
    );
    r
}

/// `status` with no body and no content type.
pub fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// JSON, but not Key Vault's `{"error":{…}}` nor an OAuth error.
pub fn foreign_json(status: StatusCode) -> Resp {
    json(
        status,
        &serde_json::json!({
            "code": status.canonical_reason().unwrap_or("Error"),
            "message": "Access denied by the gateway policy.",
            "status": status.as_u16(),
        }),
    )
}

/// A Key Vault-shaped 401 without the `WWW-Authenticate` challenge the real vault sends.
pub fn unauthorized_without_challenge() -> Resp {
    kv_error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "AKV10000: Request is missing a Bearer or PoP token.",
        None,
    )
}

/// Entra ID (AAD v2 token endpoint) error body.
pub fn aad_error(status: StatusCode, error: &str, code: u32, description: &str) -> Resp {
    let trace = uuid::Uuid::new_v4();
    let corr = uuid::Uuid::new_v4();
    let ts = super::identity::aad_timestamp(now());
    let desc = format!(
        "AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {ts}Z"
    );
    json(
        status,
        &serde_json::json!({
            "error": error,
            "error_description": desc,
            "error_codes": [code],
            "timestamp": format!("{ts}Z"),
            "trace_id": trace.to_string(),
            "correlation_id": corr.to_string(),
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}
