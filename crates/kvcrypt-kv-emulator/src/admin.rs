//! The admin interface (`/_admin/…`, same TLS port, static bearer token): principals,
//! permissions, key switches, firewall, authorization mode, fault injection and the request
//! log. The same operations back `EmulatorHandle`'s helpers and the CLI's `admin` commands.

use super::Shared;
use super::clock::{ClockInfo, RotatedKey};
use super::errors::{Resp, json, no_content};
use super::keycrypto::Material;
use super::model::{AuthMode, KeyEntry, KeyVersion, Op, Principal, random_hex};
use super::rotation::{self, RotationPolicy};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// What kind of principal to create.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// App registration with a client secret (generated unless given).
    #[default]
    Secret,
    /// App registration authenticating with a certificate (client assertion, RS256).
    Certificate,
    /// App registration with a federated credential (workload identity).
    Federated,
    /// Managed identity (App Service MSI / IMDS endpoints).
    Msi,
}

/// Request to create a principal (admin API body and library argument).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NewPrincipal {
    pub kind: PrincipalKind,
    pub name: Option<String>,
    /// Fixed client (application) id; a random GUID when absent.
    pub client_id: Option<String>,
    pub secret: Option<String>,
    /// PEM certificate or RSA public key, for `certificate`.
    pub certificate_pem: Option<String>,
    /// Federated credential issuer and subject, for `federated`.
    pub issuer: Option<String>,
    pub subject: Option<String>,
    /// For `msi`: the system-assigned identity (chosen when a token request names none).
    pub system_assigned: bool,
    /// For `msi`: the user-assigned identity's resource id.
    pub resource_id: Option<String>,
}

/// A created principal, with its secret when it has one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalInfo {
    pub client_id: String,
    pub object_id: String,
    pub name: String,
    pub tenant_id: String,
    pub secret: Option<String>,
}

/// An injected fault.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Delay the answer by `ms` milliseconds (combines with other faults).
    Latency { ms: u64 },
    /// Answer with this HTTP status (5xx body in Key Vault's format).
    Status { status: u16 },
    /// 429 `Throttled`, with `Retry-After: retry_after` when given.
    Throttle {
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Reset the TCP connection (RST) instead of answering.
    Reset,
    /// Never answer (until the fault is cleared... for new requests; or the emulator stops).
    Hang,
    /// Answer `status` with an HTML error page (`text/html`), as a reverse proxy, load
    /// balancer or firewall appliance in front of the service would.
    Html { status: u16 },
    /// Answer `status` with an empty body and no content type.
    Empty { status: u16 },
    /// Answer `status` with JSON that is not the service's error shape
    /// (`{"code":"…","message":"…","status":N}`, no `error` object).
    ForeignJson { status: u16 },
    /// 401 with a Key Vault-shaped body but no `WWW-Authenticate` challenge (the real vault
    /// always challenges its 401s).
    UnauthorizedNoChallenge,
}

impl FaultKind {
    /// Checks the fields an admin request gave.
    pub fn validate(&self) -> Result<(), AdminError> {
        match self {
            FaultKind::Html { status }
            | FaultKind::Empty { status }
            | FaultKind::ForeignJson { status }
                if !(400..=599).contains(status) =>
            {
                Err(AdminError::BadRequest(format!(
                    "fault status {status} is not an error status (400-599)"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// Key Vault data-plane requests.
    #[default]
    Vault,
    /// Token endpoints (Entra ID, MSI, IMDS).
    Token,
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fault {
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Number of requests to affect; `None` = until cleared.
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    pub target: FaultTarget,
    /// Only requests naming this key (`/keys/{key}/…`, case-insensitive); `None` = all.
    /// Token requests name no key, so a keyed fault never applies to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Fault {
    pub fn new(kind: FaultKind) -> Self {
        Fault {
            kind,
            count: None,
            target: FaultTarget::Vault,
            key: None,
        }
    }
    /// Restricts the fault to requests for key `name`.
    pub fn for_key(mut self, name: &str) -> Self {
        self.key = Some(name.to_owned());
        self
    }
    pub fn times(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }
    pub fn target(mut self, t: FaultTarget) -> Self {
        self.target = t;
        self
    }
}

/// One line of the request log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    pub time: i64,
    pub method: String,
    pub path: String,
    /// 0 when no response was sent (reset / hang).
    pub status: u16,
    pub principal: Option<String>,
    pub op: Option<String>,
    pub fault: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub total: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_op: BTreeMap<String, u64>,
    pub by_fault: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct RequestLog {
    pub entries: std::collections::VecDeque<LogEntry>,
    pub counters: Counters,
}

const LOG_CAP: usize = 2000;

impl RequestLog {
    pub fn push(&mut self, e: LogEntry) {
        let c = &mut self.counters;
        c.total += 1;
        *c.by_status.entry(e.status.to_string()).or_default() += 1;
        if let Some(op) = &e.op {
            *c.by_op.entry(op.clone()).or_default() += 1;
        }
        if let Some(f) = &e.fault {
            *c.by_fault.entry(f.clone()).or_default() += 1;
        }
        if self.entries.len() >= LOG_CAP {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }
}

fn principal_spki(pem: &str) -> Result<String, AdminError> {
    use base64::Engine as _;
    use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
    use x509_cert::der::{DecodePem, Encode};
    let der = if pem.contains("BEGIN CERTIFICATE") {
        let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
            .map_err(|e| AdminError::BadRequest(format!("invalid certificate PEM: {e}")))?;
        cert.tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| AdminError::BadRequest(format!("invalid certificate: {e}")))?
    } else {
        let key = rsa::RsaPublicKey::from_public_key_pem(pem)
            .map_err(|e| AdminError::BadRequest(format!("invalid RSA public key PEM: {e}")))?;
        key.to_public_key_der()
            .map_err(|e| AdminError::BadRequest(e.to_string()))?
            .as_bytes()
            .to_vec()
    };
    // Only RSA keys can verify the SDK's RS256 assertions.
    rsa::RsaPublicKey::from_public_key_der(&der)
        .map_err(|_| AdminError::BadRequest("the certificate's key is not an RSA key".into()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(der))
}

impl Shared {
    pub fn create_principal(&self, np: NewPrincipal) -> Result<PrincipalInfo, AdminError> {
        let client_id = np
            .client_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut p = Principal {
            client_id: client_id.clone(),
            object_id: uuid::Uuid::new_v4().to_string(),
            name: np
                .name
                .clone()
                .unwrap_or_else(|| format!("kvemu-{}", &client_id[..8.min(client_id.len())])),
            secrets: Vec::new(),
            cert_public_keys: Vec::new(),
            federated: Vec::new(),
            msi: np.kind == PrincipalKind::Msi,
            system_assigned: np.system_assigned,
            msi_resource_id: np.resource_id.clone(),
        };
        let mut secret = np.secret.clone();
        if np.kind == PrincipalKind::Secret && secret.is_none() {
            secret = Some(format!("kvemu~{}", random_hex(20)));
        }
        if let Some(s) = &secret {
            p.secrets.push(s.clone());
        }
        if let Some(pem) = &np.certificate_pem {
            p.cert_public_keys.push(principal_spki(pem)?);
        } else if np.kind == PrincipalKind::Certificate {
            return Err(AdminError::BadRequest(
                "a certificate principal needs certificate_pem".into(),
            ));
        }
        match (&np.issuer, &np.subject) {
            (Some(i), Some(s)) => p.federated.push((i.clone(), s.clone())),
            _ if np.kind == PrincipalKind::Federated => {
                return Err(AdminError::BadRequest(
                    "a federated principal needs issuer and subject".into(),
                ));
            }
            _ => {}
        }
        let info = PrincipalInfo {
            client_id: p.client_id.clone(),
            object_id: p.object_id.clone(),
            name: p.name.clone(),
            tenant_id: self.tenant_id.clone(),
            secret,
        };
        self.mutate(|st| {
            if st.principals.contains_key(&client_id) {
                return Err(AdminError::BadRequest(format!(
                    "principal {client_id} already exists"
                )));
            }
            st.principals.insert(client_id.clone(), p);
            Ok(())
        })?;
        Ok(info)
    }

    /// Removes a principal and its permissions. Tokens it already holds stay valid until
    /// they expire (as with real Entra ID tokens) but no longer authorize anything.
    pub fn delete_principal(&self, client_id: &str) -> Result<(), AdminError> {
        self.mutate(|st| {
            st.principals
                .remove(client_id)
                .ok_or_else(|| AdminError::NotFound(format!("principal {client_id}")))?;
            st.grants.remove(client_id);
            Ok(())
        })
    }

    pub fn grant(&self, client_id: &str, ops: &[Op], key: Option<&str>) -> Result<(), AdminError> {
        self.mutate(|st| {
            if !st.principals.contains_key(client_id) {
                return Err(AdminError::NotFound(format!("principal {client_id}")));
            }
            st.grant(client_id, ops, key);
            Ok(())
        })
    }

    pub fn revoke(&self, client_id: &str, ops: &[Op], key: Option<&str>) -> Result<(), AdminError> {
        self.mutate(|st| {
            if !st.principals.contains_key(client_id) {
                return Err(AdminError::NotFound(format!("principal {client_id}")));
            }
            st.revoke(client_id, ops, key);
            Ok(())
        })
    }

    /// Enables/disables one version, or every version when `version` is `None`.
    pub fn set_key_enabled(
        &self,
        name: &str,
        version: Option<&str>,
        enabled: bool,
    ) -> Result<(), AdminError> {
        self.mutate(|st| {
            let e = st
                .keys
                .get_mut(&name.to_ascii_lowercase())
                .ok_or_else(|| AdminError::NotFound(format!("key {name}")))?;
            let mut hit = false;
            for v in e.versions.iter_mut() {
                if version.is_none_or(|want| want == v.version) {
                    v.enabled = enabled;
                    v.updated = self.clock.now();
                    hit = true;
                }
            }
            if hit {
                Ok(())
            } else {
                Err(AdminError::NotFound(format!(
                    "key {name} version {version:?}"
                )))
            }
        })
    }

    /// Creates a key (new version if it exists) without going through the REST API; blocks
    /// while an RSA key is generated. Returns the new version id.
    pub fn create_key(
        &self,
        name: &str,
        kty: &str,
        size: Option<usize>,
        key_ops: Option<Vec<String>>,
    ) -> Result<String, AdminError> {
        let rsa = match kty {
            "RSA" | "RSA-HSM" => true,
            "oct" | "oct-HSM" => false,
            other => return Err(AdminError::BadRequest(format!("unsupported kty {other}"))),
        };
        let material = if rsa {
            let bits = size.unwrap_or(2048);
            if ![2048, 3072, 4096].contains(&bits) {
                return Err(AdminError::BadRequest(format!(
                    "unsupported RSA size {bits}"
                )));
            }
            Material::generate_rsa(bits).map_err(|e| AdminError::BadRequest(e.to_string()))?
        } else {
            let bits = size.unwrap_or(256);
            if ![128, 192, 256].contains(&bits) {
                return Err(AdminError::BadRequest(format!(
                    "unsupported AES size {bits}"
                )));
            }
            Material::generate_oct(bits)
        };
        self.add_key_version(name, kty, material, key_ops)
    }

    /// Adds a version holding given material (used for admin imports and by tests).
    pub fn add_key_version(
        &self,
        name: &str,
        kty: &str,
        material: Material,
        key_ops: Option<Vec<String>>,
    ) -> Result<String, AdminError> {
        let ops = key_ops.unwrap_or_else(|| super::vault::default_ops(kty));
        let t = self.clock.now();
        let version = random_hex(16);
        let v = KeyVersion {
            version: version.clone(),
            kty: kty.to_string(),
            key_ops: ops,
            material,
            enabled: true,
            nbf: None,
            exp: None,
            created: t,
            updated: t,
            tags: Default::default(),
        };
        self.mutate(|st| {
            if st.deleted.contains_key(&name.to_ascii_lowercase()) {
                return Err(AdminError::BadRequest(format!(
                    "key {name} is soft-deleted; recover or purge it first"
                )));
            }
            let entry = st
                .keys
                .entry(name.to_ascii_lowercase())
                .or_insert_with(|| KeyEntry {
                    name: name.to_string(),
                    versions: Vec::new(),
                    rotation_policy: None,
                });
            entry.versions.push(v);
            Ok(())
        })?;
        Ok(version)
    }

    /// Validates and stores a rotation policy (keeping its first `created` time).
    pub fn set_rotation_policy(
        &self,
        name: &str,
        mut policy: RotationPolicy,
    ) -> Result<RotationPolicy, AdminError> {
        policy
            .validate()
            .map_err(|e| AdminError::BadRequest(e.to_string()))?;
        let t = self.clock.now();
        self.mutate(|st| {
            let e = st
                .keys
                .get_mut(&name.to_ascii_lowercase())
                .ok_or_else(|| AdminError::NotFound(format!("key {name}")))?;
            policy.created = e.rotation_policy.as_ref().map_or(t, |p| p.created);
            policy.updated = t;
            e.rotation_policy = Some(policy.clone());
            Ok(policy)
        })
    }

    pub fn clock_info(&self, rotated: Vec<RotatedKey>) -> ClockInfo {
        ClockInfo {
            now: self.clock.now(),
            offset_seconds: self.clock.offset(),
            rotated,
        }
    }

    /// Moves the emulated clock forward (persisted with the state), then rotates what is due.
    pub fn advance_clock(&self, seconds: i64) -> ClockInfo {
        self.mutate(|st| {
            st.clock_offset = st.clock_offset.saturating_add(seconds.max(0));
            self.clock.set_offset(st.clock_offset);
        });
        let rotated = rotation::run(self);
        self.clock_info(rotated)
    }

    pub fn set_firewall(&self, on: bool) {
        self.mutate(|st| st.firewall = on);
    }

    pub fn set_mode(&self, mode: AuthMode) {
        self.mutate(|st| st.mode = mode);
    }

    pub fn inject_fault(&self, f: Fault) {
        self.faults().push(f);
    }

    pub fn clear_faults(&self) {
        self.faults().clear();
    }

    pub fn requests(&self) -> (Counters, Vec<LogEntry>) {
        let log = self.log();
        (log.counters.clone(), log.entries.iter().cloned().collect())
    }

    pub fn clear_requests(&self) {
        *self.log() = RequestLog::default();
    }

    fn summary(&self) -> serde_json::Value {
        let st = self.state();
        let principals: Vec<_> = st
            .principals
            .values()
            .map(|p| {
                serde_json::json!({
                    "client_id": p.client_id, "object_id": p.object_id, "name": p.name,
                    "msi": p.msi, "system_assigned": p.system_assigned,
                    "federated": p.federated, "certificates": p.cert_public_keys.len(),
                    "grants": st.grants.get(&p.client_id),
                })
            })
            .collect();
        let keys: Vec<_> = st
            .keys
            .values()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "versions": e.versions.iter().map(|v| serde_json::json!({
                        "version": v.version, "kty": v.kty, "bits": v.material.bits(),
                        "enabled": v.enabled, "key_ops": v.key_ops, "nbf": v.nbf, "exp": v.exp,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let deleted: Vec<_> = st.deleted.values().map(|d| d.key.name.clone()).collect();
        serde_json::json!({
            "tenant_id": self.tenant_id,
            "firewall": st.firewall,
            "mode": st.mode,
            "principals": principals,
            "keys": keys,
            "deleted_keys": deleted,
            "faults": *self.faults(),
        })
    }
}

fn err_resp(e: AdminError) -> Resp {
    let status = match e {
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
    };
    json(status, &serde_json::json!({ "error": e.to_string() }))
}

fn ok() -> Resp {
    json(StatusCode::OK, &serde_json::json!({ "ok": true }))
}

#[derive(Deserialize)]
struct GrantBody {
    principal: String,
    /// List of ops, or one comma-separated string.
    ops: serde_json::Value,
    #[serde(default)]
    key: Option<String>,
}

fn parse_ops(v: &serde_json::Value) -> Result<Vec<Op>, AdminError> {
    let joined = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(","),
        _ => {
            return Err(AdminError::BadRequest(
                "ops must be a list or string".into(),
            ));
        }
    };
    let ops = Op::parse_list(&joined).map_err(AdminError::BadRequest)?;
    if ops.is_empty() {
        return Err(AdminError::BadRequest("no operation given".into()));
    }
    Ok(ops)
}

fn body_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| AdminError::BadRequest(format!("invalid JSON: {e}")))
}

/// Handles `/_admin/…` once the admin token has been checked.
pub async fn handle(
    shared: &std::sync::Arc<Shared>,
    method: &hyper::Method,
    path: &str,
    body: &[u8],
) -> Resp {
    let rest = path.trim_start_matches("/_admin").trim_matches('/');
    let segs: Vec<&str> = rest.split('/').collect();
    let r: Result<Resp, AdminError> = async {
        match (method.as_str(), segs.as_slice()) {
            ("GET", [""]) | ("GET", ["health"]) => Ok(ok()),
            ("GET", ["state"]) => Ok(json(StatusCode::OK, &shared.summary())),
            ("POST", ["principals"]) => {
                let np: NewPrincipal = body_json(body)?;
                let info = shared.create_principal(np)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::to_value(info).unwrap_or_default(),
                ))
            }
            ("DELETE", ["principals", id]) => shared.delete_principal(id).map(|_| ok()),
            ("POST", ["grant"]) | ("POST", ["revoke"]) => {
                let g: GrantBody = body_json(body)?;
                let ops = parse_ops(&g.ops)?;
                if segs[0] == "grant" {
                    shared.grant(&g.principal, &ops, g.key.as_deref())?;
                } else {
                    shared.revoke(&g.principal, &ops, g.key.as_deref())?;
                }
                Ok(ok())
            }
            ("POST", ["keys", name]) => {
                #[derive(Deserialize)]
                struct K {
                    #[serde(default = "rsa_kty")]
                    kty: String,
                    #[serde(default)]
                    key_size: Option<usize>,
                    #[serde(default)]
                    key_ops: Option<Vec<String>>,
                }
                fn rsa_kty() -> String {
                    "RSA".into()
                }
                let k: K = body_json(body)?;
                let (s, n) = (shared.clone(), name.to_string());
                let version = tokio::task::spawn_blocking(move || {
                    s.create_key(&n, &k.kty, k.key_size, k.key_ops)
                })
                .await
                .map_err(|e| AdminError::BadRequest(e.to_string()))??;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"name": name, "version": version}),
                ))
            }
            ("POST", ["keys", name, "enabled"]) => {
                #[derive(Deserialize)]
                struct E {
                    enabled: bool,
                    #[serde(default)]
                    version: Option<String>,
                }
                let e: E = body_json(body)?;
                shared
                    .set_key_enabled(name, e.version.as_deref(), e.enabled)
                    .map(|_| ok())
            }
            ("GET", ["clock"]) => Ok(json(
                StatusCode::OK,
                &serde_json::to_value(shared.clock_info(Vec::new())).unwrap_or_default(),
            )),
            ("POST", ["clock"]) => {
                #[derive(Deserialize)]
                struct C {
                    advance_seconds: i64,
                }
                let c: C = body_json(body)?;
                if c.advance_seconds < 0 {
                    // Key times must never run backwards (a version created "in the future"
                    // would break every ordering the service guarantees).
                    return Err(AdminError::BadRequest(
                        "advance_seconds must not be negative: the clock only moves forward".into(),
                    ));
                }
                let s = shared.clone();
                let info = tokio::task::spawn_blocking(move || s.advance_clock(c.advance_seconds))
                    .await
                    .map_err(|e| AdminError::BadRequest(e.to_string()))?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::to_value(info).unwrap_or_default(),
                ))
            }
            ("POST", ["firewall"]) => {
                #[derive(Deserialize)]
                struct F {
                    enabled: bool,
                }
                let f: F = body_json(body)?;
                shared.set_firewall(f.enabled);
                Ok(ok())
            }
            ("POST", ["mode"]) => {
                #[derive(Deserialize)]
                struct M {
                    mode: AuthMode,
                }
                let m: M = body_json(body)?;
                shared.set_mode(m.mode);
                Ok(ok())
            }
            ("GET", ["faults"]) => Ok(json(
                StatusCode::OK,
                &serde_json::to_value(&*shared.faults()).unwrap_or_default(),
            )),
            ("POST", ["faults"]) => {
                let f: Fault = body_json(body)?;
                f.kind.validate()?;
                shared.inject_fault(f);
                Ok(ok())
            }
            ("DELETE", ["faults"]) => {
                shared.clear_faults();
                Ok(ok())
            }
            ("GET", ["requests"]) => {
                let (counters, log) = shared.requests();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"counters": counters, "log": log}),
                ))
            }
            ("DELETE", ["requests"]) => {
                shared.clear_requests();
                Ok(no_content())
            }
            _ => Err(AdminError::NotFound(format!("{method} {path}"))),
        }
    }
    .await;
    r.unwrap_or_else(err_resp)
}
