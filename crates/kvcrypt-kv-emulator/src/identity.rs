//! Token endpoints: Entra ID client credentials (`POST /{tenant}/oauth2/v2.0/token`, client
//! secret or client assertion), App Service managed identity (`GET /msi/token`, header
//! `X-IDENTITY-HEADER`) and VM IMDS (`GET /metadata/identity/oauth2/token`, `Metadata: true`).
//! Response shapes follow what `azure_identity` parses (App Service/IMDS `expires_on` is a
//! *string*; Entra returns `expires_in` as a number).

#![allow(
    clippy::result_large_err,
    reason = "error values are finished HTTP responses, built once per request and returned straight to hyper"
)]

use super::Shared;
use super::errors::{Resp, aad_error, json};
use super::model::{Principal, TokenInfo, now, random_hex};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::StatusCode;
use hyper::header::HeaderMap;
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier as _;
use std::collections::HashMap;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `YYYY-MM-DD HH:MM:SS` (UTC), the format Entra ID uses in its error bodies.
pub fn aad_timestamp(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm): avoids a date crate for one format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Resources the emulated tenant issues tokens for (scope minus `/.default`).
fn known_resource(resource: &str) -> Option<&'static str> {
    match resource.trim_end_matches('/') {
        "https://vault.azure.net" | "cfa8b339-82a2-471a-a3c9-0fc0be7a4093" => {
            Some("https://vault.azure.net")
        }
        "https://managedhsm.azure.net" => Some("https://managedhsm.azure.net"),
        _ => None,
    }
}

fn issue(shared: &Shared, p: &Principal, resource: &str) -> (String, i64) {
    let token = format!("kvemu.{}", random_hex(32));
    let expires_on = now() + shared.token_lifetime;
    shared.mutate(|st| {
        st.prune_tokens();
        st.tokens.insert(
            token.clone(),
            TokenInfo {
                client_id: p.client_id.clone(),
                object_id: p.object_id.clone(),
                resource: resource.to_string(),
                expires_on,
            },
        );
    });
    (token, expires_on)
}

/// Outcome of a token request: the response and, when one was identified, the principal.
pub struct TokenOutcome {
    pub resp: Resp,
    pub principal: Option<String>,
}

fn fail(resp: Resp) -> TokenOutcome {
    TokenOutcome {
        resp,
        principal: None,
    }
}

fn missing(param: &str) -> Resp {
    aad_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{param}'."),
    )
}

pub fn entra_token(shared: &Shared, tenant: &str, body: &[u8]) -> TokenOutcome {
    if !tenant.eq_ignore_ascii_case(&shared.tenant_id) {
        return fail(aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
            ),
        ));
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let Some(grant) = form.get("grant_type") else {
        return fail(missing("grant_type"));
    };
    if grant != "client_credentials" {
        return fail(aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{grant}'."),
        ));
    }
    let Some(client_id) = form.get("client_id") else {
        return fail(missing("client_id"));
    };
    let Some(scope) = form.get("scope") else {
        return fail(missing("scope"));
    };
    let Some(resource) = scope.strip_suffix("/.default") else {
        return fail(aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        ));
    };
    let Some(resource) = known_resource(resource) else {
        return fail(aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            &format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        ));
    };
    let principal = shared
        .state()
        .principals
        .get(client_id)
        .filter(|p| !p.msi)
        .cloned();
    let Some(p) = principal else {
        return fail(aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ));
    };
    if let Some(secret) = form.get("client_secret") {
        if !p.secrets.iter().any(|s| s == secret) {
            return fail(aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            ));
        }
    } else if let Some(assertion) = form.get("client_assertion") {
        if form.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
            return fail(aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                7000012,
                "The client_assertion_type parameter is missing or is not 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.",
            ));
        }
        if let Err(resp) = check_assertion(&p, tenant, assertion) {
            return fail(resp);
        }
    } else {
        return fail(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    }
    let (token, expires_on) = issue(shared, &p, resource);
    let expires_in = expires_on - now();
    TokenOutcome {
        resp: json(
            StatusCode::OK,
            &serde_json::json!({
                "token_type": "Bearer",
                "expires_in": expires_in,
                "ext_expires_in": expires_in,
                "access_token": token,
            }),
        ),
        principal: Some(p.client_id),
    }
}

/// Checks a client assertion JWT.
///
/// * `iss == sub == client_id`: a certificate credential — the RS256 signature must verify
///   against a certificate registered for the principal.
/// * otherwise a federated credential (workload identity): accepted when (`iss`, `sub`)
///   matches a registered federated credential. The issuer's signing keys are not fetched
///   (no OIDC discovery offline), so its signature is not verified — a documented gap.
fn check_assertion(p: &Principal, tenant: &str, assertion: &str) -> Result<(), Resp> {
    let malformed = || {
        aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50027,
            "JWT token is invalid or malformed.",
        )
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return Err(malformed());
    };
    let decode_json = |part: &str| -> Option<serde_json::Value> {
        let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let (Some(header), Some(claims)) = (decode_json(h), decode_json(c)) else {
        return Err(malformed());
    };
    let claim = |k: &str| claims.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (iss, sub, aud) = (claim("iss"), claim("sub"), claim("aud"));
    let t = now();
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_i64())
        && exp < t - 300
    {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700024,
            &format!(
                "Client assertion is not within its valid time range. Current time: {}Z, expiry time of assertion {}Z.",
                aad_timestamp(t),
                aad_timestamp(exp)
            ),
        ));
    }
    if iss == p.client_id && sub == p.client_id {
        if !aud.contains(tenant) || !aud.contains("/oauth2/") {
            return Err(aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700021,
                &format!(
                    "Client assertion audience claim does not match Realm issuer. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials . Audience: '{aud}'."
                ),
            ));
        }
        if header.get("alg").and_then(|v| v.as_str()) != Some("RS256") {
            return Err(malformed());
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| malformed())?;
        let signed = format!("{h}.{c}");
        let verified = p.cert_public_keys.iter().any(|spki_b64| {
            let Ok(der) = base64::engine::general_purpose::STANDARD.decode(spki_b64) else {
                return false;
            };
            let Ok(key) = rsa::RsaPublicKey::from_public_key_der(&der) else {
                return false;
            };
            let Ok(sig) = rsa::pkcs1v15::Signature::try_from(sig.as_slice()) else {
                return false;
            };
            rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(key)
                .verify(signed.as_bytes(), &sig)
                .is_ok()
        });
        if !verified {
            return Err(aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                "Client assertion failed signature validation.",
            ));
        }
        return Ok(());
    }
    if p.federated.iter().any(|(i, s)| i == iss && s == sub) {
        return Ok(());
    }
    Err(aad_error(
        StatusCode::BAD_REQUEST,
        "invalid_client",
        70021,
        &format!(
            "No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{aud}'."
        ),
    ))
}

/// Managed identity: App Service flavour (`imds == false`) or VM IMDS flavour.
pub fn msi_token(shared: &Shared, query: &str, headers: &HeaderMap, imds: bool) -> TokenOutcome {
    let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let corr = uuid::Uuid::new_v4().to_string();
    let app_err = |status: StatusCode, message: &str| {
        json(
            status,
            &serde_json::json!({"statusCode": status.as_u16(), "message": message, "correlationId": corr}),
        )
    };
    let imds_err = |status: StatusCode, error: &str, desc: &str| {
        json(
            status,
            &serde_json::json!({"error": error, "error_description": desc}),
        )
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if imds {
        if !header("metadata").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return fail(imds_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required metadata header not specified",
            ));
        }
    } else if header("x-identity-header") != Some(shared.identity_header.as_str()) {
        return fail(app_err(
            StatusCode::UNAUTHORIZED,
            "The X-IDENTITY-HEADER header is missing or does not match this environment's IDENTITY_HEADER.",
        ));
    }
    if !q.contains_key("api-version") {
        return fail(if imds {
            imds_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required query variable 'api-version' is missing",
            )
        } else {
            app_err(StatusCode::BAD_REQUEST, "api-version is required.")
        });
    }
    let Some(resource) = q.get("resource").and_then(|r| known_resource(r)) else {
        return fail(if imds {
            imds_err(
                StatusCode::BAD_REQUEST,
                "invalid_resource",
                "AADSTS500011: The resource principal was not found in the tenant.",
            )
        } else {
            app_err(
                StatusCode::BAD_REQUEST,
                "The 'resource' query parameter is missing or names an unknown resource.",
            )
        });
    };
    let client_id = q.get("client_id");
    let object_id = q.get("object_id").or_else(|| q.get("principal_id"));
    let res_id = q
        .get("msi_res_id")
        .or_else(|| q.get("mi_res_id"))
        .or_else(|| q.get("msi_resource_id"));
    let principal = {
        let st = shared.state();
        st.principals
            .values()
            .filter(|p| p.msi)
            .find(|p| match (client_id, object_id, res_id) {
                (Some(c), _, _) => &p.client_id == c,
                (_, Some(o), _) => &p.object_id == o,
                (_, _, Some(r)) => p.msi_resource_id.as_ref() == Some(r),
                _ => p.system_assigned,
            })
            .cloned()
    };
    let Some(p) = principal else {
        return fail(if imds {
            imds_err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Identity not found",
            )
        } else {
            app_err(
                StatusCode::BAD_REQUEST,
                "No Managed Identity found for specified ClientId/ResourceId/PrincipalId.",
            )
        });
    };
    let (token, expires_on) = issue(shared, &p, resource);
    let body = if imds {
        let expires_in = (expires_on - now()).to_string();
        serde_json::json!({
            "access_token": token,
            "client_id": p.client_id,
            "expires_in": expires_in,
            "expires_on": expires_on.to_string(),
            "ext_expires_in": expires_in,
            "not_before": (now() - 5).to_string(),
            "resource": resource,
            "token_type": "Bearer",
        })
    } else {
        serde_json::json!({
            "access_token": token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": p.client_id,
        })
    };
    TokenOutcome {
        resp: json(StatusCode::OK, &body),
        principal: Some(p.client_id),
    }
}

#[cfg(test)]
mod tests {
    use super::aad_timestamp;

    #[test]
    fn timestamp_format() {
        assert_eq!(aad_timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(aad_timestamp(1_586_984_735), "2020-04-15 21:05:35");
        assert_eq!(aad_timestamp(951_782_400), "2000-02-29 00:00:00");
    }
}
