//! The Key Vault keys REST API (data plane): routing, bearer-token checks, the 401
//! challenge, authorization (RBAC / access-policy flavoured 403s), firewall, and the key
//! operations themselves.

#![allow(
    clippy::result_large_err,
    reason = "error values are finished HTTP responses, built once per request and returned straight to hyper"
)]

use super::Shared;
use super::errors::{
    Resp, bad_parameter, caller, firewall, forbidden, json, key_not_found, kv_error, no_content,
    unauthorized,
};
use super::keycrypto::{CryptoError, Material, b64url, b64url_decode};
use super::model::{DeletedEntry, KeyEntry, KeyVersion, Op, State, now, random_hex};
use super::rotation::{self, RotationPolicy};
use hyper::header::HeaderMap;
use hyper::{Method, StatusCode};
use serde_json::{Map, Value, json as j};

/// api-versions the emulator answers. Key Vault rejects unknown versions with 400.
const API_VERSIONS: [&str; 9] = [
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "2025-06-01-preview",
    "2025-07-01",
];

const RECOVERABLE_DAYS: i64 = 90;

#[derive(Debug, Clone, PartialEq)]
enum Route {
    ListKeys,
    ListVersions(String),
    Create(String),
    Import(String),
    Rotate(String),
    Get(String, Option<String>),
    Update(String, Option<String>),
    Delete(String),
    KeyOp(String, Option<String>, Op),
    GetRotationPolicy(String),
    SetRotationPolicy(String),
    ListDeleted,
    GetDeleted(String),
    Recover(String),
    Purge(String),
}

impl Route {
    fn op(&self) -> Op {
        match self {
            Route::ListKeys | Route::ListVersions(_) | Route::ListDeleted => Op::List,
            Route::Create(_) => Op::Create,
            Route::Import(_) => Op::Import,
            Route::Rotate(_) => Op::Rotate,
            Route::Get(..) | Route::GetDeleted(_) => Op::Get,
            Route::Update(..) => Op::Update,
            Route::Delete(_) => Op::Delete,
            Route::KeyOp(_, _, op) => *op,
            Route::Recover(_) => Op::Recover,
            Route::Purge(_) => Op::Purge,
            Route::GetRotationPolicy(_) => Op::GetRotationPolicy,
            Route::SetRotationPolicy(_) => Op::SetRotationPolicy,
        }
    }

    fn key_name(&self) -> Option<&str> {
        match self {
            Route::ListKeys | Route::ListDeleted => None,
            Route::ListVersions(n)
            | Route::Create(n)
            | Route::Import(n)
            | Route::Rotate(n)
            | Route::Get(n, _)
            | Route::Update(n, _)
            | Route::Delete(n)
            | Route::KeyOp(n, _, _)
            | Route::GetDeleted(n)
            | Route::Recover(n)
            | Route::Purge(n)
            | Route::GetRotationPolicy(n)
            | Route::SetRotationPolicy(n) => Some(n),
        }
    }
}

fn version_opt(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_string())
}

fn key_action(s: &str) -> Option<Op> {
    match s.to_ascii_lowercase().as_str() {
        "wrapkey" => Some(Op::Wrap),
        "unwrapkey" => Some(Op::Unwrap),
        "encrypt" => Some(Op::Encrypt),
        "decrypt" => Some(Op::Decrypt),
        _ => None,
    }
}

/// Maps method + path to a route. Empty version segments (`/keys/k//unwrapkey`,
/// `/keys/k/`) mean "latest", as on the real service.
fn route(method: &Method, path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let lit = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    let n = |i: usize| segs.get(i).map(|s| s.to_string()).unwrap_or_default();
    if lit(0, "keys") {
        return match (method.as_str(), segs.len()) {
            ("GET", 1) => Some(Route::ListKeys),
            ("GET", 2) if segs[1].is_empty() => Some(Route::ListKeys),
            ("GET", 3) if lit(2, "versions") => Some(Route::ListVersions(n(1))),
            ("GET", 3) if lit(2, "rotationpolicy") => Some(Route::GetRotationPolicy(n(1))),
            ("PUT", 3) if lit(2, "rotationpolicy") => Some(Route::SetRotationPolicy(n(1))),
            ("POST", 3) if lit(2, "create") => Some(Route::Create(n(1))),
            ("POST", 3) if lit(2, "rotate") => Some(Route::Rotate(n(1))),
            ("POST", 3) => key_action(segs[2]).map(|op| Route::KeyOp(n(1), None, op)),
            ("POST", 4) => {
                key_action(segs[3]).map(|op| Route::KeyOp(n(1), version_opt(segs[2]), op))
            }
            ("PUT", 2) => Some(Route::Import(n(1))),
            ("GET", 2) => Some(Route::Get(n(1), None)),
            ("GET", 3) => Some(Route::Get(n(1), version_opt(segs[2]))),
            ("PATCH", 2) => Some(Route::Update(n(1), None)),
            ("PATCH", 3) => Some(Route::Update(n(1), version_opt(segs[2]))),
            ("DELETE", 2) => Some(Route::Delete(n(1))),
            _ => None,
        };
    }
    if lit(0, "deletedkeys") {
        return match (method.as_str(), segs.len()) {
            ("GET", 1) => Some(Route::ListDeleted),
            ("GET", 2) => Some(Route::GetDeleted(n(1))),
            ("POST", 3) if lit(2, "recover") => Some(Route::Recover(n(1))),
            ("DELETE", 2) => Some(Route::Purge(n(1))),
            _ => None,
        };
    }
    None
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The resource (token audience) a vault host expects; also the 401 challenge's resource.
pub fn resource_for_host(host: &str) -> &'static str {
    if host_only(host).ends_with(".managedhsm.azure.net") {
        "https://managedhsm.azure.net"
    } else {
        "https://vault.azure.net"
    }
}

fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        return host;
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Which key types a host accepts: Managed HSM only `-HSM` types and oct; Key Vault no oct.
/// Hosts that are neither (localhost, 127.0.0.1, custom names) accept everything.
fn kty_allowed(host: &str, kty: &str) -> bool {
    let h = host_only(host);
    if h.ends_with(".managedhsm.azure.net") {
        kty.ends_with("-HSM")
    } else if h.ends_with(".vault.azure.net") {
        kty == "RSA" || kty == "RSA-HSM"
    } else {
        true
    }
}

pub struct Request<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub host: &'a str,
    pub body: &'a [u8],
}

pub struct Outcome {
    pub resp: Resp,
    pub principal: Option<String>,
    pub op: Option<&'static str>,
}

pub async fn handle(shared: &Shared, req: Request<'_>) -> Outcome {
    let resource = resource_for_host(req.host);
    let mut out = Outcome {
        resp: bad_parameter("Unknown request."),
        principal: None,
        op: None,
    };
    // 1. Authentication (before anything else: the SDK's first, body-less request must get
    //    the challenge).
    let token = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        });
    let Some(token) = token else {
        out.resp = unauthorized(
            &shared.tenant_id,
            resource,
            "AKV10000: Request is missing a Bearer or PoP token.",
        );
        return out;
    };
    let info = shared.state().tokens.get(&token).cloned();
    let Some(info) = info else {
        out.resp = unauthorized(
            &shared.tenant_id,
            resource,
            "[BearerReadAccessTokenFailed] Error validating token: 'S2S12005'.",
        );
        return out;
    };
    out.principal = Some(info.client_id.clone());
    // Tokens follow the wall clock, not the emulated one (see `clock.rs`).
    if info.expires_on <= now() {
        out.resp = unauthorized(
            &shared.tenant_id,
            resource,
            "[TokenExpired] Error validating token: 'S2S12086'.",
        );
        return out;
    }
    if info.resource != resource {
        out.resp = unauthorized(
            &shared.tenant_id,
            resource,
            &format!(
                "AKV10022: Invalid audience. Expected {resource}, found: {}.",
                info.resource
            ),
        );
        return out;
    }
    let who = caller(&info.client_id, &info.object_id, &shared.tenant_id);
    // 2. Network rules.
    if shared.state().firewall {
        out.resp = firewall(&who, req.host);
        return out;
    }
    // 3. api-version and route.
    let api_version = url::form_urlencoded::parse(req.query.as_bytes())
        .find(|(k, _)| k == "api-version")
        .map(|(_, v)| v.into_owned());
    match api_version {
        None => {
            out.resp = bad_parameter("The 'api-version' query parameter is missing.");
            return out;
        }
        Some(v) if !API_VERSIONS.contains(&v.as_str()) => {
            out.resp = bad_parameter(&format!(
                "The specified version ({v}) is not recognized. Consider using the latest supported version (2025-07-01)."
            ));
            return out;
        }
        Some(_) => {}
    }
    let Some(route) = route(req.method, req.path) else {
        out.resp = bad_parameter(&format!(
            "The request URI {} {} is not a supported Key Vault keys operation.",
            req.method, req.path
        ));
        return out;
    };
    let op = route.op();
    out.op = Some(op.name());
    if let Some(name) = route.key_name()
        && !valid_name(name)
    {
        out.resp = bad_parameter(&format!("The request URI contains an invalid name: {name}"));
        return out;
    }
    // 4. Authorization.
    let (allowed, mode) = {
        let st = shared.state();
        (st.allowed(&info.client_id, op, route.key_name()), st.mode)
    };
    if !allowed {
        out.resp = forbidden(mode, op, &who, req.host, route.key_name());
        return out;
    }
    // 5. The operation.
    out.resp = match execute(shared, &route, &req).await {
        Ok(r) | Err(r) => r,
    };
    out
}

type OpResult = Result<Resp, Resp>;

fn parse_body(body: &[u8]) -> Result<Value, Resp> {
    if body.is_empty() {
        return Err(bad_parameter("The request body is missing."));
    }
    serde_json::from_slice(body)
        .map_err(|e| bad_parameter(&format!("The request body is not valid JSON: {e}")))
}

fn crypto_err(e: CryptoError) -> Resp {
    match e {
        CryptoError::BadParameter(m) => bad_parameter(&m),
        CryptoError::Internal(m) => kv_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            &m,
            None,
        ),
    }
}

fn kid(host: &str, name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("https://{host}/keys/{name}/{v}"),
        None => format!("https://{host}/keys/{name}"),
    }
}

fn attributes(v: &KeyVersion) -> Value {
    let mut a = j!({
        "enabled": v.enabled,
        "created": v.created,
        "updated": v.updated,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": RECOVERABLE_DAYS,
        "exportable": false,
    });
    if let Some(nbf) = v.nbf {
        a["nbf"] = nbf.into();
    }
    if let Some(exp) = v.exp {
        a["exp"] = exp.into();
    }
    a
}

/// KeyBundle: public JWK + attributes (+ tags). Private parts are never included.
fn key_bundle(host: &str, name: &str, v: &KeyVersion) -> Value {
    let mut jwk = Map::new();
    jwk.insert("kid".into(), kid(host, name, Some(&v.version)).into());
    jwk.insert("kty".into(), v.kty.clone().into());
    jwk.insert("key_ops".into(), j!(v.key_ops));
    v.material.public_fields(&mut jwk);
    let mut b = j!({ "key": jwk, "attributes": attributes(v) });
    if !v.tags.is_empty() {
        b["tags"] = j!(v.tags);
    }
    b
}

fn deleted_bundle(host: &str, d: &DeletedEntry) -> Option<Value> {
    let latest = d.key.latest()?;
    let mut b = key_bundle(host, &d.key.name, latest);
    b["recoveryId"] = format!("https://{host}/deletedkeys/{}", d.key.name).into();
    b["deletedDate"] = d.deleted_date.into();
    b["scheduledPurgeDate"] = d.scheduled_purge_date.into();
    Some(b)
}

/// The key_ops a new key gets when the request names none (as the service does).
pub(super) fn default_ops(kty: &str) -> Vec<String> {
    let ops: &[&str] = if kty.starts_with("RSA") {
        &[
            "encrypt",
            "decrypt",
            "sign",
            "verify",
            "wrapKey",
            "unwrapKey",
        ]
    } else {
        &["encrypt", "decrypt", "wrapKey", "unwrapKey"]
    };
    ops.iter().map(|s| s.to_string()).collect()
}

fn parse_key_ops(v: Option<&Value>, kty: &str) -> Result<Vec<String>, Resp> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(default_ops(kty));
    };
    let arr = v
        .as_array()
        .ok_or_else(|| bad_parameter("Property key_ops must be an array."))?;
    let allowed: &[&str] = if kty.starts_with("RSA") {
        &[
            "encrypt",
            "decrypt",
            "sign",
            "verify",
            "wrapKey",
            "unwrapKey",
            "import",
            "export",
        ]
    } else {
        &[
            "encrypt",
            "decrypt",
            "wrapKey",
            "unwrapKey",
            "import",
            "export",
        ]
    };
    let mut out = Vec::new();
    for op in arr {
        let s = op.as_str().unwrap_or_default();
        if !allowed.contains(&s) {
            return Err(bad_parameter(&format!(
                "Invalid key operation '{s}' for key type {kty}."
            )));
        }
        out.push(s.to_string());
    }
    Ok(out)
}

struct Attrs {
    enabled: Option<bool>,
    nbf: Option<Option<i64>>,
    exp: Option<Option<i64>>,
}

fn parse_attrs(body: &Value) -> Result<Attrs, Resp> {
    let mut a = Attrs {
        enabled: None,
        nbf: None,
        exp: None,
    };
    let Some(attrs) = body.get("attributes").filter(|v| !v.is_null()) else {
        return Ok(a);
    };
    if let Some(e) = attrs.get("enabled") {
        a.enabled = Some(
            e.as_bool()
                .ok_or_else(|| bad_parameter("Property attributes.enabled must be a boolean."))?,
        );
    }
    for (field, slot) in [("nbf", &mut a.nbf), ("exp", &mut a.exp)] {
        match attrs.get(field) {
            None => {}
            Some(Value::Null) => *slot = Some(None),
            Some(v) => {
                *slot = Some(Some(v.as_i64().ok_or_else(|| {
                    bad_parameter(&format!(
                        "Property attributes.{field} must be a Unix time in seconds."
                    ))
                })?))
            }
        }
    }
    Ok(a)
}

fn parse_tags(body: &Value) -> std::collections::BTreeMap<String, String> {
    body.get("tags")
        .and_then(|t| t.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn conflict_if_deleted(st: &State, name: &str) -> Result<(), Resp> {
    if st.deleted.contains_key(&name.to_ascii_lowercase()) {
        return Err(kv_error(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged."
            ),
            None,
        ));
    }
    Ok(())
}

/// Adds a version (creating the key if new) and answers with its KeyBundle.
fn add_version(shared: &Shared, host: &str, name: &str, version: KeyVersion) -> OpResult {
    shared.mutate(|st| {
        conflict_if_deleted(st, name)?;
        let entry = st
            .keys
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| KeyEntry {
                name: name.to_string(),
                versions: Vec::new(),
                rotation_policy: None,
            });
        let bundle = key_bundle(host, &entry.name, &version);
        entry.versions.push(version);
        Ok(json(StatusCode::OK, &bundle))
    })
}

/// A version created at emulated time `t`.
fn new_version(
    kty: String,
    key_ops: Vec<String>,
    material: Material,
    attrs: &Attrs,
    t: i64,
) -> KeyVersion {
    KeyVersion {
        version: random_hex(16),
        kty,
        key_ops,
        material,
        enabled: attrs.enabled.unwrap_or(true),
        nbf: attrs.nbf.flatten(),
        exp: attrs.exp.flatten(),
        created: t,
        updated: t,
        tags: Default::default(),
    }
}

async fn generate(kty: &str, bits: usize) -> Result<Material, Resp> {
    if kty.starts_with("RSA") {
        // Prime search takes a while: keep it off the reactor thread.
        tokio::task::spawn_blocking(move || Material::generate_rsa(bits))
            .await
            .map_err(|e| crypto_err(CryptoError::Internal(e.to_string())))?
            .map_err(crypto_err)
    } else {
        Ok(Material::generate_oct(bits))
    }
}

fn check_size(kty: &str, size: Option<i64>) -> Result<usize, Resp> {
    let (default, allowed): (i64, &[i64]) = if kty.starts_with("RSA") {
        (2048, &[2048, 3072, 4096])
    } else {
        (256, &[128, 192, 256])
    };
    let size = size.unwrap_or(default);
    if !allowed.contains(&size) {
        return Err(bad_parameter(&format!(
            "The key size {size} is not supported for key type {kty}."
        )));
    }
    Ok(size as usize)
}

async fn execute(shared: &Shared, route: &Route, req: &Request<'_>) -> OpResult {
    let host = req.host;
    match route {
        Route::ListKeys => {
            let st = shared.state();
            let value: Vec<Value> = st
                .keys
                .values()
                .filter_map(|e| {
                    let v = e.latest()?;
                    Some(j!({"kid": kid(host, &e.name, None), "attributes": attributes(v)}))
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                &j!({"value": value, "nextLink": null}),
            ))
        }
        Route::ListVersions(name) => {
            let st = shared.state();
            let entry = st
                .keys
                .get(&name.to_ascii_lowercase())
                .ok_or_else(|| key_not_found(name))?;
            let value: Vec<Value> = entry
                .versions
                .iter()
                .map(|v| {
                    j!({"kid": kid(host, &entry.name, Some(&v.version)), "attributes": attributes(v)})
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                &j!({"value": value, "nextLink": null}),
            ))
        }
        Route::Create(name) => {
            let body = parse_body(req.body)?;
            let kty = body
                .get("kty")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad_parameter("Property kty is required."))?
                .to_string();
            if !["RSA", "RSA-HSM", "oct", "oct-HSM"].contains(&kty.as_str()) {
                return Err(bad_parameter(&format!(
                    "Key type {kty} is not supported by the emulator (RSA, RSA-HSM, oct, oct-HSM)."
                )));
            }
            if !kty_allowed(host, &kty) {
                return Err(bad_parameter(&format!(
                    "Key type {kty} is not supported by this kind of vault."
                )));
            }
            let size = check_size(&kty, body.get("key_size").and_then(|v| v.as_i64()))?;
            if let Some(e) = body.get("public_exponent").and_then(|v| v.as_i64())
                && e != 65537
            {
                return Err(bad_parameter(
                    "Only the public exponent 65537 is supported.",
                ));
            }
            let ops = parse_key_ops(body.get("key_ops"), &kty)?;
            let attrs = parse_attrs(&body)?;
            conflict_if_deleted(&shared.state(), name)?;
            let material = generate(&kty, size).await?;
            let mut v = new_version(kty, ops, material, &attrs, shared.clock.now());
            v.tags = parse_tags(&body);
            add_version(shared, host, name, v)
        }
        Route::Import(name) => {
            let body = parse_body(req.body)?;
            let jwk = body
                .get("key")
                .filter(|k| k.is_object())
                .ok_or_else(|| bad_parameter("Property key is required."))?;
            let material = Material::from_jwk(jwk).map_err(crypto_err)?;
            let hsm = body.get("Hsm").and_then(|v| v.as_bool()).unwrap_or(false)
                || host_only(host).ends_with(".managedhsm.azure.net");
            let jkty = jwk.get("kty").and_then(|v| v.as_str()).unwrap_or_default();
            let base = if material.is_rsa() { "RSA" } else { "oct" };
            let kty = if hsm || jkty.ends_with("-HSM") {
                format!("{base}-HSM")
            } else {
                base.to_string()
            };
            if !kty_allowed(host, &kty) {
                return Err(bad_parameter(&format!(
                    "Key type {kty} is not supported by this kind of vault."
                )));
            }
            let ops = parse_key_ops(jwk.get("key_ops"), &kty)?;
            let attrs = parse_attrs(&body)?;
            let mut v = new_version(kty, ops, material, &attrs, shared.clock.now());
            v.tags = parse_tags(&body);
            add_version(shared, host, name, v)
        }
        Route::Rotate(name) => {
            let (kty, bits, ops) = {
                let st = shared.state();
                let v = st
                    .keys
                    .get(&name.to_ascii_lowercase())
                    .and_then(KeyEntry::latest)
                    .ok_or_else(|| key_not_found(name))?;
                (v.kty.clone(), v.material.bits(), v.key_ops.clone())
            };
            let material = generate(&kty, bits).await?;
            let t = shared.clock.now();
            // An on-demand rotation applies the policy's expiryTime, like a scheduled one.
            let exp =
                rotation::policy_expiry(shared.state().keys.get(&name.to_ascii_lowercase()), t);
            let attrs = Attrs {
                enabled: None,
                nbf: None,
                exp: Some(exp),
            };
            add_version(
                shared,
                host,
                name,
                new_version(kty, ops, material, &attrs, t),
            )
        }
        Route::Get(name, version) => {
            let st = shared.state();
            // A disabled version is still readable (public JWK, `enabled: false`): the
            // service refuses only cryptographic operations on it (see `key_op`).
            let (entry, v) = find(&st, name, version.as_deref())?;
            Ok(json(StatusCode::OK, &key_bundle(host, &entry.name, v)))
        }
        Route::Update(name, version) => {
            let body = parse_body(req.body)?;
            let attrs = parse_attrs(&body)?;
            shared.mutate(|st| {
                let entry = st
                    .keys
                    .get_mut(&name.to_ascii_lowercase())
                    .ok_or_else(|| key_not_found(name))?;
                let display = entry.name.clone();
                let v = match version {
                    None => entry.versions.last_mut(),
                    Some(ver) => entry.versions.iter_mut().find(|v| &v.version == ver),
                }
                .ok_or_else(|| key_not_found(&versioned(name, version.as_deref())))?;
                if body.get("key_ops").is_some_and(|o| !o.is_null()) {
                    v.key_ops = parse_key_ops(body.get("key_ops"), &v.kty)?;
                }
                if let Some(e) = attrs.enabled {
                    v.enabled = e;
                }
                if let Some(n) = attrs.nbf {
                    v.nbf = n;
                }
                if let Some(x) = attrs.exp {
                    v.exp = x;
                }
                if body.get("tags").is_some() {
                    v.tags = parse_tags(&body);
                }
                v.updated = shared.clock.now();
                Ok(json(StatusCode::OK, &key_bundle(host, &display, v)))
            })
        }
        Route::Delete(name) => shared.mutate(|st| {
            let entry = st
                .keys
                .remove(&name.to_ascii_lowercase())
                .ok_or_else(|| key_not_found(name))?;
            let t = shared.clock.now();
            let d = DeletedEntry {
                key: entry,
                deleted_date: t,
                scheduled_purge_date: t + RECOVERABLE_DAYS * 86_400,
            };
            let body = deleted_bundle(host, &d).unwrap_or_else(|| j!({}));
            st.deleted.insert(name.to_ascii_lowercase(), d);
            Ok(json(StatusCode::OK, &body))
        }),
        Route::ListDeleted => {
            let st = shared.state();
            let value: Vec<Value> = st
                .deleted
                .values()
                .filter_map(|d| {
                    let v = d.key.latest()?;
                    Some(j!({
                        "kid": kid(host, &d.key.name, None),
                        "attributes": attributes(v),
                        "recoveryId": format!("https://{host}/deletedkeys/{}", d.key.name),
                        "deletedDate": d.deleted_date,
                        "scheduledPurgeDate": d.scheduled_purge_date,
                    }))
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                &j!({"value": value, "nextLink": null}),
            ))
        }
        Route::GetDeleted(name) => {
            let st = shared.state();
            st.deleted
                .get(&name.to_ascii_lowercase())
                .and_then(|d| deleted_bundle(host, d))
                .map(|b| json(StatusCode::OK, &b))
                .ok_or_else(deleted_not_found)
        }
        Route::Recover(name) => shared.mutate(|st| {
            let d = st
                .deleted
                .remove(&name.to_ascii_lowercase())
                .ok_or_else(deleted_not_found)?;
            let body = d
                .key
                .latest()
                .map(|v| key_bundle(host, &d.key.name, v))
                .unwrap_or_else(|| j!({}));
            st.keys.insert(name.to_ascii_lowercase(), d.key);
            Ok(json(StatusCode::OK, &body))
        }),
        Route::Purge(name) => shared.mutate(|st| {
            st.deleted
                .remove(&name.to_ascii_lowercase())
                .map(|_| no_content())
                .ok_or_else(deleted_not_found)
        }),
        Route::KeyOp(name, version, op) => {
            key_op(shared, host, name, version.as_deref(), *op, req.body)
        }
        Route::GetRotationPolicy(name) => {
            let st = shared.state();
            let (entry, _) = find(&st, name, None)?;
            Ok(json(
                StatusCode::OK,
                &rotation::to_json(entry.rotation_policy.as_ref(), &policy_id(host, entry)),
            ))
        }
        Route::SetRotationPolicy(name) => {
            let body = parse_body(req.body)?;
            let policy =
                RotationPolicy::from_json(&body).map_err(|e| bad_parameter(&e.to_string()))?;
            let stored = shared
                .set_rotation_policy(name, policy)
                .map_err(|e| match e {
                    super::admin::AdminError::NotFound(_) => key_not_found(name),
                    super::admin::AdminError::BadRequest(m) => bad_parameter(&m),
                })?;
            let st = shared.state();
            let (entry, _) = find(&st, name, None)?;
            Ok(json(
                StatusCode::OK,
                &rotation::to_json(Some(&stored), &policy_id(host, entry)),
            ))
        }
    }
}

fn policy_id(host: &str, entry: &KeyEntry) -> String {
    format!("{}/rotationpolicy", kid(host, &entry.name, None))
}

fn versioned(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{name}/{v}"),
        None => name.to_string(),
    }
}

fn deleted_not_found() -> Resp {
    kv_error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        "Deleted Key not found",
        None,
    )
}

fn disabled(op: &str) -> Resp {
    kv_error(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!("Operation {op} is not allowed on a disabled key."),
        Some("KeyDisabled"),
    )
}

fn find<'s>(
    st: &'s State,
    name: &str,
    version: Option<&str>,
) -> Result<(&'s KeyEntry, &'s KeyVersion), Resp> {
    let entry = st
        .keys
        .get(&name.to_ascii_lowercase())
        .ok_or_else(|| key_not_found(&versioned(name, version)))?;
    let v = match version {
        None => entry.latest(),
        Some(ver) => entry.versions.iter().find(|v| v.version == ver),
    }
    .ok_or_else(|| key_not_found(&versioned(name, version)))?;
    Ok((entry, v))
}

fn key_op(
    shared: &Shared,
    host: &str,
    name: &str,
    version: Option<&str>,
    op: Op,
    body: &[u8],
) -> OpResult {
    // Clone the version out so crypto (RSA is slow-ish) runs without the state lock.
    let (display, v) = {
        let st = shared.state();
        let (e, v) = find(&st, name, version)?;
        (e.name.clone(), v.clone())
    };
    let op_name = match op {
        Op::Wrap => "wrapKey",
        Op::Unwrap => "unwrapKey",
        Op::Encrypt => "encrypt",
        Op::Decrypt => "decrypt",
        other => other.name(),
    };
    if !v.enabled {
        return Err(disabled(op_name));
    }
    if !v.key_ops.iter().any(|o| o == op_name) {
        return Err(kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Operation {op_name} is not permitted on this key. The key's key_ops do not include '{op_name}'."
            ),
            Some("KeyOperationForbidden"),
        ));
    }
    let protecting = matches!(op, Op::Wrap | Op::Encrypt);
    let t = shared.clock.now();
    // Expiry and activation dates only gate *protecting* operations: the real service
    // still unwraps/decrypts with an expired or not-yet-valid key.
    if protecting && v.exp.is_some_and(|exp| exp <= t) {
        return Err(kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("Operation {op_name} is not allowed on an expired key."),
            Some("KeyExpired"),
        ));
    }
    if protecting && v.nbf.is_some_and(|nbf| nbf > t) {
        return Err(kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("Operation {op_name} is not allowed on a key that is not yet valid."),
            Some("KeyNotYetValid"),
        ));
    }
    let body = parse_body(body)?;
    let alg = body
        .get("alg")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad_parameter("Property alg is required."))?;
    let value = body
        .get("value")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad_parameter("Property value is required."))?;
    let data = b64url_decode(value).map_err(crypto_err)?;
    let result = if protecting {
        v.material.wrap(alg, &data).map_err(crypto_err)?
    } else {
        v.material.unwrap(alg, &data).map_err(crypto_err)?.to_vec()
    };
    let result = zeroize::Zeroizing::new(result);
    Ok(json(
        StatusCode::OK,
        &j!({"kid": kid(host, &display, Some(&v.version)), "value": b64url(&result)}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let post = Method::POST;
        assert_eq!(
            route(&post, "/keys/k//unwrapkey"),
            Some(Route::KeyOp("k".into(), None, Op::Unwrap))
        );
        assert_eq!(
            route(&post, "/keys/k/unwrapKey"),
            Some(Route::KeyOp("k".into(), None, Op::Unwrap))
        );
        assert_eq!(
            route(&post, "/keys/k/abc/wrapkey"),
            Some(Route::KeyOp("k".into(), Some("abc".into()), Op::Wrap))
        );
        assert_eq!(
            route(&Method::GET, "/keys/k/"),
            Some(Route::Get("k".into(), None))
        );
        assert_eq!(
            route(&Method::GET, "/keys/k/versions"),
            Some(Route::ListVersions("k".into()))
        );
        assert_eq!(
            route(&Method::GET, "/keys/k/rotationpolicy"),
            Some(Route::GetRotationPolicy("k".into()))
        );
        assert_eq!(
            route(&Method::PUT, "/keys/k/rotationpolicy"),
            Some(Route::SetRotationPolicy("k".into()))
        );
        assert_eq!(route(&Method::GET, "/secrets/x"), None);
    }

    #[test]
    fn challenge_resource_follows_host() {
        assert_eq!(
            resource_for_host("a.vault.azure.net:8443"),
            "https://vault.azure.net"
        );
        assert_eq!(
            resource_for_host("h.managedhsm.azure.net"),
            "https://managedhsm.azure.net"
        );
        assert!(!kty_allowed("a.vault.azure.net", "oct-HSM"));
        assert!(!kty_allowed("h.managedhsm.azure.net", "RSA"));
        assert!(kty_allowed("127.0.0.1:1", "oct"));
    }
}
