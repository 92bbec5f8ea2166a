//! The emulator's state: keys (all versions, soft-deleted keys), principals, their
//! permissions, issued tokens and switches (firewall, authorization mode). Serialisable so a
//! state directory survives restarts.

use super::keycrypto::Material;
use super::rotation::RotationPolicy;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Which authorization model the vault uses; decides the 403 flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Azure RBAC: 403 `Forbidden` / innererror `ForbiddenByRbac`.
    #[default]
    Rbac,
    /// Vault access policies: 403 `Forbidden` / innererror `AccessDenied`.
    AccessPolicy,
}

/// A data-plane operation a principal may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Get,
    List,
    Create,
    Import,
    Update,
    Delete,
    Recover,
    Purge,
    Rotate,
    Wrap,
    Unwrap,
    Encrypt,
    Decrypt,
    GetRotationPolicy,
    SetRotationPolicy,
}

impl Op {
    pub const ALL: [Op; 15] = [
        Op::Get,
        Op::List,
        Op::Create,
        Op::Import,
        Op::Update,
        Op::Delete,
        Op::Recover,
        Op::Purge,
        Op::Rotate,
        Op::Wrap,
        Op::Unwrap,
        Op::Encrypt,
        Op::Decrypt,
        Op::GetRotationPolicy,
        Op::SetRotationPolicy,
    ];

    /// Parses `unwrap`, `unwrapKey`, `wrapkey`, … and `all` (→ every op).
    pub fn parse_list(s: &str) -> Result<Vec<Op>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let lower = part.to_ascii_lowercase();
            if lower == "all" || lower == "*" {
                out.extend(Op::ALL);
                continue;
            }
            let op = Op::ALL
                .into_iter()
                .find(|op| op.name() == lower || op.policy_name().eq_ignore_ascii_case(&lower))
                .ok_or_else(|| {
                    format!(
                        "unknown operation '{part}' (use get, list, create, import, update, delete, recover, purge, rotate, wrap, unwrap, encrypt, decrypt, getrotationpolicy, setrotationpolicy or all)"
                    )
                })?;
            out.push(op);
        }
        Ok(out)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::List => "list",
            Op::Create => "create",
            Op::Import => "import",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Recover => "recover",
            Op::Purge => "purge",
            Op::Rotate => "rotate",
            Op::Wrap => "wrap",
            Op::Unwrap => "unwrap",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::GetRotationPolicy => "getrotationpolicy",
            Op::SetRotationPolicy => "setrotationpolicy",
        }
    }

    /// Name used in access-policy messages and the "Operation X is not allowed" texts.
    pub fn policy_name(self) -> &'static str {
        match self {
            Op::Wrap => "wrapKey",
            Op::Unwrap => "unwrapKey",
            other => other.name(),
        }
    }

    /// The RBAC data action the real service names in its 403 message.
    pub fn rbac_action(self) -> &'static str {
        match self {
            Op::Get => "Microsoft.KeyVault/vaults/keys/read",
            Op::List => "Microsoft.KeyVault/vaults/keys/read",
            Op::Create => "Microsoft.KeyVault/vaults/keys/create/action",
            Op::Import => "Microsoft.KeyVault/vaults/keys/import/action",
            Op::Update => "Microsoft.KeyVault/vaults/keys/update/action",
            Op::Delete => "Microsoft.KeyVault/vaults/keys/delete",
            Op::Recover => "Microsoft.KeyVault/vaults/keys/recover/action",
            Op::Purge => "Microsoft.KeyVault/vaults/deletedKeys/delete",
            Op::Rotate => "Microsoft.KeyVault/vaults/keys/rotate/action",
            Op::Wrap => "Microsoft.KeyVault/vaults/keys/wrap/action",
            Op::Unwrap => "Microsoft.KeyVault/vaults/keys/unwrap/action",
            Op::Encrypt => "Microsoft.KeyVault/vaults/keys/encrypt/action",
            Op::Decrypt => "Microsoft.KeyVault/vaults/keys/decrypt/action",
            Op::GetRotationPolicy => "Microsoft.KeyVault/vaults/keys/rotationpolicy/read",
            Op::SetRotationPolicy => "Microsoft.KeyVault/vaults/keys/rotationpolicy/write",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: String,
    /// `RSA`, `RSA-HSM`, `oct`, `oct-HSM` as reported in the JWK.
    pub kty: String,
    pub key_ops: Vec<String>,
    pub material: Material,
    pub enabled: bool,
    pub nbf: Option<i64>,
    pub exp: Option<i64>,
    pub created: i64,
    pub updated: i64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Name as first created (lookups are case-insensitive, like the service).
    pub name: String,
    /// Oldest first; the last one is "latest".
    pub versions: Vec<KeyVersion>,
    /// Set with `PUT /keys/{name}/rotationpolicy`; `None`: the service's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_policy: Option<RotationPolicy>,
}

impl KeyEntry {
    pub fn latest(&self) -> Option<&KeyVersion> {
        self.versions.last()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeletedEntry {
    pub key: KeyEntry,
    pub deleted_date: i64,
    pub scheduled_purge_date: i64,
}

/// A service principal / managed identity known to the emulated tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Principal {
    pub client_id: String,
    pub object_id: String,
    pub name: String,
    /// Client secrets accepted by the client-credentials flow.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// DER SubjectPublicKeyInfo of registered certificates (client assertions are verified
    /// against these).
    #[serde(default)]
    pub cert_public_keys: Vec<String>,
    /// Federated credentials: (issuer, subject) pairs accepted as client assertions.
    #[serde(default)]
    pub federated: Vec<(String, String)>,
    /// A managed identity: tokens come from the MSI/IMDS endpoints.
    #[serde(default)]
    pub msi: bool,
    /// The system-assigned identity (used when the MSI request names no identity).
    #[serde(default)]
    pub system_assigned: bool,
    #[serde(default)]
    pub msi_resource_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    pub client_id: String,
    pub object_id: String,
    pub resource: String,
    pub expires_on: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Live keys by lower-cased name.
    pub keys: BTreeMap<String, KeyEntry>,
    pub deleted: BTreeMap<String, DeletedEntry>,
    pub principals: BTreeMap<String, Principal>,
    /// client_id → scope (`*` or a lower-cased key name) → granted ops.
    pub grants: BTreeMap<String, BTreeMap<String, BTreeSet<Op>>>,
    pub tokens: BTreeMap<String, TokenInfo>,
    pub firewall: bool,
    pub mode: AuthMode,
    /// Seconds the emulated clock is ahead of the wall clock (see `clock.rs`).
    #[serde(default)]
    pub clock_offset: i64,
}

pub const ALL_KEYS: &str = "*";

impl State {
    pub fn allowed(&self, client_id: &str, op: Op, key: Option<&str>) -> bool {
        let Some(scopes) = self.grants.get(client_id) else {
            return false;
        };
        let vault_wide = scopes.get(ALL_KEYS).is_some_and(|s| s.contains(&op));
        let per_key = key
            .map(|k| k.to_ascii_lowercase())
            .and_then(|k| scopes.get(&k))
            .is_some_and(|s| s.contains(&op));
        vault_wide || per_key
    }

    pub fn grant(&mut self, client_id: &str, ops: &[Op], key: Option<&str>) {
        let scope = key.map_or_else(|| ALL_KEYS.to_string(), str::to_ascii_lowercase);
        self.grants
            .entry(client_id.to_string())
            .or_default()
            .entry(scope)
            .or_default()
            .extend(ops.iter().copied());
    }

    /// Revokes ops on one key scope, or — without a key — on every scope of the principal
    /// (a complete revocation, which is what a customer removing a role assignment does).
    pub fn revoke(&mut self, client_id: &str, ops: &[Op], key: Option<&str>) {
        let Some(scopes) = self.grants.get_mut(client_id) else {
            return;
        };
        let key = key.map(str::to_ascii_lowercase);
        for (scope, set) in scopes.iter_mut() {
            if key.as_ref().is_none_or(|k| k == scope) {
                for op in ops {
                    set.remove(op);
                }
            }
        }
        scopes.retain(|_, set| !set.is_empty());
    }

    /// Drops expired tokens so the state file does not grow without bound. Tokens live on the
    /// wall clock, not the emulated one (see `clock.rs`).
    pub fn prune_tokens(&mut self) {
        let t = now();
        self.tokens.retain(|_, info| info.expires_on > t);
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read state file {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("state file {} is not valid: {e}", path.display()))
    }

    /// Writes the state atomically (temp file + rename), mode 0600: it holds private keys.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))
    }
}
