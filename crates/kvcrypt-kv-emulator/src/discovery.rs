//! Entra ID discovery, which MSAL-based SDKs (Python, .NET, Java, JavaScript, Go) fetch before
//! their first token request: OpenID Connect metadata (`GET /{tenant}/v2.0/.well-known/
//! openid-configuration`), AAD instance discovery (`GET /common/discovery/instance`) and the
//! signing-key set the metadata points to (`GET /{tenant}/discovery/v2.0/keys`).
//!
//! Every URL in the answers is built from the host the client used, so a client that reached
//! the emulator as `https://127.0.0.1:PORT` is sent back to exactly that address.

#![allow(
    clippy::result_large_err,
    reason = "error values are finished HTTP responses, built once per request and returned straight to hyper"
)]

use super::Shared;
use super::errors::{Resp, aad_error, json};
use hyper::StatusCode;
use serde_json::json as j;
use std::collections::HashMap;

/// Tenant aliases the real service accepts besides a tenant id.
const TENANT_ALIASES: [&str; 3] = ["common", "organizations", "consumers"];

/// What a discovery path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Discovery {
    /// `/{tenant}/v2.0/.well-known/openid-configuration`
    OpenIdConfiguration(String),
    /// `/common/discovery/instance`
    Instance,
    /// `/{tenant}/discovery/v2.0/keys`
    Keys(String),
}

/// Maps a path to a discovery request (`None`: not a discovery path).
pub fn route(path: &str) -> Option<Discovery> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        [tenant, "v2.0", ".well-known", "openid-configuration"] => {
            Some(Discovery::OpenIdConfiguration(tenant.to_string()))
        }
        ["common", "discovery", "instance"] => Some(Discovery::Instance),
        [tenant, "discovery", "v2.0", "keys"] => Some(Discovery::Keys(tenant.to_string())),
        _ => None,
    }
}

pub fn handle(shared: &Shared, d: &Discovery, host: &str, query: &str) -> Resp {
    match d {
        Discovery::OpenIdConfiguration(tenant) => openid_configuration(shared, host, tenant),
        Discovery::Instance => instance(host, query),
        Discovery::Keys(tenant) => match known_tenant(shared, tenant) {
            // Tokens are opaque (docs/EMULATOR.md), so there is nothing to verify them with:
            // the set is empty but well-formed.
            Ok(_) => json(StatusCode::OK, &j!({ "keys": [] })),
            Err(r) => r,
        },
    }
}

/// The tenant as the answers name it: the configured id, or an alias as given.
fn known_tenant(shared: &Shared, tenant: &str) -> Result<String, Resp> {
    if tenant.eq_ignore_ascii_case(&shared.tenant_id) {
        return Ok(shared.tenant_id.clone());
    }
    let lower = tenant.to_ascii_lowercase();
    if TENANT_ALIASES.contains(&lower.as_str()) {
        return Ok(lower);
    }
    Err(aad_error(
        StatusCode::BAD_REQUEST,
        "invalid_tenant",
        90002,
        &format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
        ),
    ))
}

fn openid_configuration(shared: &Shared, host: &str, tenant: &str) -> Resp {
    let tenant = match known_tenant(shared, tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let base = format!("https://{host}/{tenant}");
    // For an alias the real issuer carries the literal `{tenantid}` placeholder.
    let issuer_tenant = if TENANT_ALIASES.contains(&tenant.as_str()) {
        "{tenantid}"
    } else {
        tenant.as_str()
    };
    json(
        StatusCode::OK,
        &j!({
            "token_endpoint": format!("{base}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported":
                ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/discovery/v2.0/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("https://{host}/{issuer_tenant}/v2.0"),
            "request_uri_parameter_supported": false,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/oauth2/v2.0/devicecode"),
            "http_logout_supported": true,
            "frontchannel_logout_supported": true,
            "end_session_endpoint": format!("{base}/oauth2/v2.0/logout"),
            "claims_supported": [
                "sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time",
                "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash",
                "c_hash", "email"
            ],
            "kerberos_endpoint": format!("{base}/kerberos"),
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }),
    )
}

/// Whether `authority` (host[:port] of an authorization endpoint) is this emulator: the host
/// the request came in on, a loopback name, or the public Entra host (mapped to loopback).
fn is_emulator_host(authority: &str, request_host: &str) -> bool {
    let name = authority
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(']') || h.starts_with('['))
        .map_or(authority, |(h, _)| h);
    authority.eq_ignore_ascii_case(request_host)
        || [
            "127.0.0.1",
            "localhost",
            "[::1]",
            "login.microsoftonline.com",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

fn instance(host: &str, query: &str) -> Resp {
    let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for param in ["api-version", "authorization_endpoint"] {
        if !q.contains_key(param) {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                &format!("The request body must contain the following parameter: '{param}'."),
            );
        }
    }
    let invalid = || {
        aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_instance",
            50049,
            "Unknown or invalid instance.",
        )
    };
    let Ok(endpoint) = url::Url::parse(&q["authorization_endpoint"]) else {
        return invalid();
    };
    let authority = match (endpoint.host_str(), endpoint.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        // MSAL builds this parameter from the authority's host *name*, dropping its port:
        // for the host the request came in on, answer where the emulator really listens.
        (Some(h), None) if host.rsplit_once(':').is_some_and(|(n, _)| n == h) => host.to_string(),
        (Some(h), None) => h.to_string(),
        (None, _) => return invalid(),
    };
    if endpoint.scheme() != "https" || !is_emulator_host(&authority, host) {
        return invalid();
    }
    let tenant = endpoint
        .path_segments()
        .and_then(|mut s| s.next())
        .filter(|t| !t.is_empty())
        .unwrap_or("common")
        .to_string();
    json(
        StatusCode::OK,
        &j!({
            "tenant_discovery_endpoint":
                format!("https://{authority}/{tenant}/v2.0/.well-known/openid-configuration"),
            "api-version": "1.1",
            "metadata": [{
                "preferred_network": authority,
                "preferred_cache": authority,
                "aliases": [authority],
            }],
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route("/t/v2.0/.well-known/openid-configuration"),
            Some(Discovery::OpenIdConfiguration("t".into()))
        );
        assert_eq!(
            route("/common/discovery/instance"),
            Some(Discovery::Instance)
        );
        assert_eq!(
            route("/t/discovery/v2.0/keys"),
            Some(Discovery::Keys("t".into()))
        );
        assert_eq!(route("/t/oauth2/v2.0/token"), None);
        assert_eq!(route("/keys/k"), None);
    }

    #[test]
    fn emulator_hosts() {
        assert!(is_emulator_host("127.0.0.1:8443", "127.0.0.1:8443"));
        assert!(is_emulator_host("localhost:1", "127.0.0.1:8443"));
        assert!(is_emulator_host("login.microsoftonline.com", "x"));
        assert!(is_emulator_host("[::1]:5", "x"));
        assert!(!is_emulator_host("evil.example:443", "127.0.0.1:8443"));
    }
}
