//! Key providers: Azure Key Vault / Managed HSM `wrapKey` / `unwrapKey` through the official SDK
//! (`azure_security_keyvault_keys`, `azure_identity`, `azure_core` 1.x).
//!
//! - [`KeyProvider`]: the one trait every wrap and unwrap goes through (`provider.rs`);
//!   [`KeyVaultProvider`] implements it, [`BlockingProvider`] serves any provider to the
//!   synchronous CLI.
//! - [`VaultConfig`]: the `[vault]` table of the config file (`docs/CONFIG-vault.md`).
//! - [`KeyError`]: failures classified Denied / Transient / Misconfigured (`error.rs`).
//!
//! Every call runs under an explicit deadline (the SDK has none), with our own reqwest client
//! (per-attempt timeouts, `resolve`, extra CA) and a bounded retry policy (`http.rs`). TLS
//! verification and the Key Vault challenge resource check are always on.

// This crate needs no `unsafe`; the compiler keeps it that way.
#![forbid(unsafe_code)]

mod answer;
mod config;
mod credential;
mod error;
mod http;
mod keyid;
mod pin;
mod provider;
mod rotation_policy;

pub use config::{
    AzureCliConfig, ClientCertificateConfig, ClientSecretConfig, CredentialConfig,
    ManagedIdentityConfig, VaultConfig, WorkloadIdentityConfig,
};
pub use error::{ErrorClass, Failure, KeyError, Operation};
pub use keyid::KeyId;
pub use pin::{KeyPin, PinError, Pins};
pub use provider::{AccessSecret, BlockingProvider, KeyProvider};

use azure_core::credentials::TokenCredential;
use azure_core::http::ClientMethodOptions;
use azure_security_keyvault_keys::models::{
    KeyClientGetKeyOptions, KeyClientGetKeyRotationPolicyOptions, KeyClientUnwrapKeyOptions,
    KeyClientWrapKeyOptions, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use base64::Engine as _;
use error::{Target, classify};
use http::FailureSlot;
use kvcrypt_crypto::secmem::{SecretBytes, VolumeKey};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use zeroize::{Zeroize, Zeroizing};

/// A key version as `GET /keys/{name}[/{version}]` describes it (times in Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionInfo {
    /// The versioned key id.
    pub key_id: String,
    /// `attributes.enabled` (Key Vault omits it only when true).
    pub enabled: bool,
    /// `attributes.exp`: after this the version no longer wraps or unwraps.
    pub expires: Option<i64>,
    /// `attributes.nbf`: before this it cannot be used.
    pub not_before: Option<i64>,
    /// `attributes.created`.
    pub created: Option<i64>,
}

impl KeyVersionInfo {
    /// Whether this version can wrap at `now` (enabled, inside nbf..exp).
    pub fn usable_at(&self, now: i64) -> bool {
        self.enabled
            && self.not_before.is_none_or(|nbf| nbf <= now)
            && self.expires.is_none_or(|exp| now < exp)
    }
}

/// What `get_key` read.
struct GotKey {
    info: KeyVersionInfo,
    kty: Option<KeyType>,
}

/// `KeySlot::provider` value for slots made by this provider.
pub const PROVIDER_NAME: &str = "azure-keyvault";

/// Largest wrapped key accepted for unwrap (RSA-4096 gives 512 bytes; AES-KW of 64 bytes, 72).
const MAX_WRAPPED_LEN: usize = 1024;

/// Key-wrap algorithms kvcrypt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapAlgorithm {
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256: the default for `RSA` / `RSA-HSM` keys.
    RsaOaep256,
    /// RSAES-OAEP with SHA-1 (legacy; accepted for existing keys/slots).
    RsaOaep,
    /// AES key wrap (RFC 3394) with a 256-bit key: default for `oct` keys in Key Vault.
    A256Kw,
    /// AES key wrap as Managed HSM names it for `oct-HSM` keys (RFC 3394): default there.
    CkmAesKeyWrap,
}

impl WrapAlgorithm {
    pub const ALL: [WrapAlgorithm; 4] = [
        WrapAlgorithm::RsaOaep256,
        WrapAlgorithm::RsaOaep,
        WrapAlgorithm::A256Kw,
        WrapAlgorithm::CkmAesKeyWrap,
    ];

    /// The JWA name stored in key slots and sent to Key Vault.
    pub fn as_str(self) -> &'static str {
        match self {
            WrapAlgorithm::RsaOaep256 => "RSA-OAEP-256",
            WrapAlgorithm::RsaOaep => "RSA-OAEP",
            WrapAlgorithm::A256Kw => "A256KW",
            WrapAlgorithm::CkmAesKeyWrap => "CKM_AES_KEY_WRAP",
        }
    }

    /// Parses a JWA name (exact, as Key Vault spells it).
    pub fn parse(name: &str) -> Result<Self, KeyError> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == name)
            .ok_or_else(|| {
                KeyError::Config(format!(
                    "unsupported key-wrap algorithm '{name}': use one of RSA-OAEP-256, RSA-OAEP, \
                     A256KW, CKM_AES_KEY_WRAP"
                ))
            })
    }
}

/// The volume key wrapped by one Key Vault key: what a key slot stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Always the versioned key id returned by the service
    /// (`https://<vault>/keys/<name>/<version>`).
    pub key_id: String,
    /// JWA algorithm name (`RSA-OAEP-256`, `RSA-OAEP`, `A256KW`, `CKM_AES_KEY_WRAP`).
    pub algorithm: String,
    /// The wrapped key bytes (not secret).
    pub wrapped: Vec<u8>,
}

/// The Key Vault key provider. Cheap to share (`&self` methods); one instance serves any number
/// of vaults (one SDK client per vault host, created on first use).
pub struct KeyVaultProvider {
    cfg: VaultConfig,
    credential: Arc<dyn TokenCredential>,
    vault_http: reqwest::Client,
    clients: Mutex<HashMap<String, Arc<KeyClient>>>,
}

impl std::fmt::Debug for KeyVaultProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultProvider")
            .field("deadline_ms", &self.cfg.deadline_ms)
            .finish_non_exhaustive()
    }
}

/// Key Vault's `KeyOperationResult`, parsed by us so that the unwrapped key's base64 text can be
/// borrowed from the (then zeroized) response body instead of copied around.
#[derive(serde::Deserialize)]
struct OpResult<'a> {
    kid: Option<String>,
    #[serde(borrow)]
    value: Option<std::borrow::Cow<'a, str>>,
}

/// Base64url as Key Vault writes it (no padding), tolerating padding.
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

impl KeyVaultProvider {
    /// Validates `cfg`, reads the credential's secret files and builds the HTTP clients. No
    /// network traffic happens here.
    pub fn new(cfg: &VaultConfig) -> Result<Self, KeyError> {
        cfg.validate()?;
        let clients = http::build_clients(cfg)?;
        let credential = credential::build_credential(cfg, &clients.identity)?;
        Ok(Self {
            cfg: cfg.clone(),
            credential,
            vault_http: clients.vault,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration this provider was built from.
    pub fn config(&self) -> &VaultConfig {
        &self.cfg
    }

    /// Wraps `vmk` with the key `key_id` (versioned or versionless). With `algorithm = None` the
    /// default for the key's type is used: RSA-OAEP-256 for RSA keys, A256KW for `oct` keys in
    /// Key Vault, CKM_AES_KEY_WRAP for Managed HSM (needs the `get` permission to read the type).
    pub async fn wrap(
        &self,
        key_id: &str,
        algorithm: Option<&str>,
        vmk: &VolumeKey,
    ) -> Result<WrappedKey, KeyError> {
        self.wrap_secret(key_id, algorithm, vmk).await
    }

    /// [`KeyVaultProvider::wrap`] for any secret (the VMK, or a format v2 access-check secret).
    pub async fn wrap_secret<const N: usize>(
        &self,
        key_id: &str,
        algorithm: Option<&str>,
        vmk: &SecretBytes<N>,
    ) -> Result<WrappedKey, KeyError> {
        let id = KeyId::parse(key_id)?;
        let explicit = algorithm.map(WrapAlgorithm::parse).transpose()?;
        let target = self.target(&id, Operation::WrapKey);
        self.with_deadline(&target, async {
            let client = self.client(&id)?;
            let alg = match explicit {
                Some(a) => a,
                None => self.default_algorithm(&client, &id).await?,
            };
            let body = wrap_request_body(alg, vmk.expose());
            // Keep a handle on the request bytes (they hold the VMK in base64) to wipe them
            // once the SDK has dropped its copies.
            let keep = body.clone();
            let slot = FailureSlot::default();
            let result = client
                .wrap_key(
                    &id.name,
                    body.into(),
                    Some(KeyClientWrapKeyOptions {
                        key_version: id.version.clone(),
                        method_options: ClientMethodOptions {
                            context: slot.context(),
                        },
                    }),
                )
                .await;
            wipe_bytes(keep);
            let response = result.map_err(|e| classify(&e, &target, &slot.take()))?;
            let raw = azure_core::Bytes::from(response.into_body());
            let parsed: OpResult<'_> = serde_json::from_slice(&raw)
                .map_err(|e| bad_answer(&target, &format!("unparsable wrapKey result: {e}")))?;
            let kid = self.versioned_kid(&id, parsed.kid.as_deref(), &target)?;
            let wrapped = parsed
                .value
                .as_deref()
                .map(|v| B64.decode(v))
                .transpose()
                .map_err(|_| bad_answer(&target, "wrapKey result is not base64url"))?
                .filter(|w| !w.is_empty())
                .ok_or_else(|| bad_answer(&target, "wrapKey returned no value"))?;
            Ok(WrappedKey {
                key_id: kid,
                algorithm: alg.as_str().to_owned(),
                wrapped,
            })
        })
        .await
    }

    /// Unwraps a key slot. `key_id` must be versioned (as stored in slots): a versionless id
    /// would silently use the latest version, which cannot unwrap slots made before a rotation.
    pub async fn unwrap(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<VolumeKey, KeyError> {
        self.unwrap_secret(key_id, algorithm, wrapped).await
    }

    /// [`KeyVaultProvider::unwrap`] of an `N`-byte secret (the VMK, or a format v2
    /// access-check secret); an answer of another length is refused.
    pub async fn unwrap_secret<const N: usize>(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes<N>, KeyError> {
        let id = KeyId::parse(key_id)?;
        let Some(version) = id.version.clone() else {
            return Err(KeyError::Config(format!(
                "key id '{key_id}' has no version: unwrap needs the versioned key id stored in \
                 the key slot"
            )));
        };
        let alg = WrapAlgorithm::parse(algorithm)?;
        if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED_LEN {
            return Err(KeyError::Config(format!(
                "wrapped key of {} bytes for key '{key_id}' is not a plausible key slot",
                wrapped.len()
            )));
        }
        let target = self.target(&id, Operation::UnwrapKey);
        self.with_deadline(&target, async {
            let client = self.client(&id)?;
            let body = serde_json::json!({ "alg": alg.as_str(), "value": B64.encode(wrapped) });
            let body = azure_core::Bytes::from(body.to_string().into_bytes());
            let slot = FailureSlot::default();
            let response = client
                .unwrap_key(
                    &id.name,
                    &version,
                    body.into(),
                    Some(KeyClientUnwrapKeyOptions {
                        method_options: ClientMethodOptions {
                            context: slot.context(),
                        },
                    }),
                )
                .await
                .map_err(|e| classify(&e, &target, &slot.take()))?;
            let raw = azure_core::Bytes::from(response.into_body());
            let result = decode_unwrap_result::<N>(&raw, &target);
            wipe_bytes(raw);
            result
        })
        .await
    }

    /// The versioned id of the key's current (latest) version. A disabled latest version is
    /// refused (`Denied`, code `KeyDisabled`): Key Vault answers GET of a disabled version
    /// with 200 and `enabled: false`, and a slot must never be wrapped for a version the
    /// vault will not use.
    pub async fn latest_version(&self, key_id: &str) -> Result<String, KeyError> {
        let info = self.current_version(key_id).await?;
        if info.enabled {
            return Ok(info.key_id);
        }
        let id = KeyId::parse(key_id)?;
        let target = self.target(&id, Operation::GetKey);
        Err(KeyError::Denied(Failure::new(
            &target,
            None,
            Some("KeyDisabled".to_owned()),
            false,
            format!(
                "the latest version of key '{}' in vault {} ({}) is disabled, so it cannot wrap \
                 new key slots: re-enable it, or rotate the key to a new version",
                id.name,
                id.vault(),
                info.key_id
            ),
        )))
    }

    /// The key's current (latest) version as Key Vault describes it: its versioned id and
    /// whether, and until when, it may be used.
    pub async fn current_version(&self, key_id: &str) -> Result<KeyVersionInfo, KeyError> {
        let id = KeyId::parse(key_id)?;
        let id = KeyId {
            version: None,
            ..id
        };
        let target = self.target(&id, Operation::GetKey);
        self.with_deadline(&target, async {
            let client = self.client(&id)?;
            Ok(self.get_key(&client, &id, None, &target).await?.info)
        })
        .await
    }

    /// When Key Vault will next rotate the key of `current` by itself (Unix seconds), from
    /// the key's rotation policy; `Ok(None)` without a `Rotate` action. Needs the
    /// `getrotationpolicy` permission (Key Vault Crypto Officer has it; a role with only
    /// get/wrap/unwrap does not): callers treat a refusal as "unknown", never as revocation.
    pub async fn next_rotation(&self, current: &KeyVersionInfo) -> Result<Option<i64>, KeyError> {
        let id = KeyId::parse(&current.key_id)?;
        let id = KeyId {
            version: None,
            ..id
        };
        let target = self.target(&id, Operation::GetRotationPolicy);
        self.with_deadline(&target, async {
            let client = self.client(&id)?;
            let slot = FailureSlot::default();
            let response = client
                .get_key_rotation_policy(
                    &id.name,
                    Some(KeyClientGetKeyRotationPolicyOptions {
                        method_options: ClientMethodOptions {
                            context: slot.context(),
                        },
                    }),
                )
                .await
                .map_err(|e| classify(&e, &target, &slot.take()))?;
            let policy = response
                .into_model()
                .map_err(|e| bad_answer(&target, &format!("unparsable rotation policy: {e}")))?;
            let triggers: Vec<rotation_policy::RotateTrigger> = policy
                .lifetime_actions
                .unwrap_or_default()
                .into_iter()
                .filter(|a| {
                    a.action.as_ref().and_then(|t| t.type_prop)
                        == Some(
                            azure_security_keyvault_keys::models::KeyRotationPolicyAction::Rotate,
                        )
                })
                .filter_map(|a| {
                    let t = a.trigger?;
                    t.time_after_create
                        .map(rotation_policy::RotateTrigger::AfterCreate)
                        .or(t
                            .time_before_expiry
                            .map(rotation_policy::RotateTrigger::BeforeExpiry))
                })
                .collect();
            Ok(rotation_policy::next_rotation(
                &triggers,
                current.created,
                current.expires,
            ))
        })
        .await
    }

    fn target(&self, id: &KeyId, op: Operation) -> Target {
        Target {
            vault: id.vault(),
            key: id.name.clone(),
            op,
        }
    }

    /// Runs `fut` under the configured overall deadline.
    async fn with_deadline<T>(
        &self,
        target: &Target,
        fut: impl Future<Output = Result<T, KeyError>>,
    ) -> Result<T, KeyError> {
        let deadline = self.cfg.deadline();
        match tokio::time::timeout(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(KeyError::Timeout {
                vault: target.vault.clone(),
                key: target.key.clone(),
                operation: target.op,
                after: deadline,
            }),
        }
    }

    /// The SDK client for the vault of `id` (each caches its own challenge scope and token).
    fn client(&self, id: &KeyId) -> Result<Arc<KeyClient>, KeyError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| KeyError::Config("internal error: key client cache poisoned".into()))?;
        if let Some(c) = clients.get(&id.vault()) {
            return Ok(Arc::clone(c));
        }
        let options = KeyClientOptions {
            client_options: http::vault_client_options(&self.vault_http, &self.cfg),
            // Always verify that the challenge's resource matches the vault's domain; there is
            // deliberately no setting to turn this off.
            verify_challenge_resource: Some(true),
            ..Default::default()
        };
        let client = KeyClient::new(&id.vault_url(), Arc::clone(&self.credential), Some(options))
            .map_err(|e| {
            KeyError::Config(format!(
                "cannot create a client for vault {}: {e}",
                id.vault()
            ))
        })?;
        let client = Arc::new(client);
        clients.insert(id.vault(), Arc::clone(&client));
        Ok(client)
    }

    /// GET the key (a given version, or the latest) → its versioned id, attributes and type.
    async fn get_key(
        &self,
        client: &KeyClient,
        id: &KeyId,
        version: Option<String>,
        target: &Target,
    ) -> Result<GotKey, KeyError> {
        let slot = FailureSlot::default();
        let response = client
            .get_key(
                &id.name,
                Some(KeyClientGetKeyOptions {
                    key_version: version,
                    method_options: ClientMethodOptions {
                        context: slot.context(),
                    },
                }),
            )
            .await
            .map_err(|e| classify(&e, target, &slot.take()))?;
        let key = response
            .into_model()
            .map_err(|e| bad_answer(target, &format!("unparsable key: {e}")))?;
        let jwk = key
            .key
            .ok_or_else(|| bad_answer(target, "the key has no JWK"))?;
        let kid = self.versioned_kid(id, jwk.kid.as_deref(), target)?;
        let attributes = key.attributes.unwrap_or_default();
        let unix = |t: Option<azure_core::time::OffsetDateTime>| t.map(|t| t.unix_timestamp());
        Ok(GotKey {
            info: KeyVersionInfo {
                key_id: kid,
                // Key Vault leaves `enabled` out only where it is true.
                enabled: attributes.enabled.unwrap_or(true),
                expires: unix(attributes.expires),
                not_before: unix(attributes.not_before),
                created: unix(attributes.created),
            },
            kty: jwk.kty,
        })
    }

    async fn default_algorithm(
        &self,
        client: &KeyClient,
        id: &KeyId,
    ) -> Result<WrapAlgorithm, KeyError> {
        let target = self.target(id, Operation::GetKey);
        let kty = self
            .get_key(client, id, id.version.clone(), &target)
            .await?
            .kty;
        match kty {
            Some(KeyType::Rsa) | Some(KeyType::RsaHsm) => Ok(WrapAlgorithm::RsaOaep256),
            Some(KeyType::Oct) | Some(KeyType::OctHsm) if id.is_managed_hsm() => {
                Ok(WrapAlgorithm::CkmAesKeyWrap)
            }
            Some(KeyType::Oct) | Some(KeyType::OctHsm) => Ok(WrapAlgorithm::A256Kw),
            other => Err(KeyError::Misconfigured(Failure::new(
                &target,
                None,
                None,
                false,
                format!(
                    "key '{}' in vault {} has type {} which cannot wrap keys: use an RSA, RSA-HSM \
                     or oct-HSM key",
                    id.name,
                    id.vault(),
                    other.map_or_else(|| "(none)".to_owned(), |k| k.to_string())
                ),
            ))),
        }
    }

    /// Checks that the service's `kid` is a versioned id of the key we asked for.
    fn versioned_kid(
        &self,
        asked: &KeyId,
        kid: Option<&str>,
        target: &Target,
    ) -> Result<String, KeyError> {
        let kid = kid.ok_or_else(|| bad_answer(target, "the answer has no key id (kid)"))?;
        let got = KeyId::parse(kid)
            .map_err(|_| bad_answer(target, &format!("the answer's key id '{kid}' is invalid")))?;
        if got.host != asked.host || !got.name.eq_ignore_ascii_case(&asked.name) {
            return Err(bad_answer(
                target,
                &format!("the answer names another key ({kid})"),
            ));
        }
        match (&got.version, &asked.version) {
            (None, _) => Err(bad_answer(
                target,
                &format!("the answer's key id '{kid}' has no version"),
            )),
            (Some(g), Some(a)) if g != a => Err(bad_answer(
                target,
                &format!("the answer's key id '{kid}' is another version than requested"),
            )),
            // Rebuild from the parsed parts: canonical form, and the port (if any) we used.
            (Some(_), _) => Ok(KeyId {
                port: asked.port,
                ..got
            }
            .to_string()),
        }
    }
}

fn bad_answer(target: &Target, what: &str) -> KeyError {
    KeyError::Misconfigured(Failure::new(
        target,
        None,
        None,
        false,
        format!(
            "unexpected answer from vault {} for {} on key '{}': {what}",
            target.vault, target.op, target.key
        ),
    ))
}

/// `{"alg":"…","value":"<base64url(vmk)>"}` in a buffer with no spare capacity, so that the
/// `Bytes` made from it owns exactly this allocation (which `wipe_bytes` can then zeroize).
fn wrap_request_body(alg: WrapAlgorithm, secret: &[u8]) -> azure_core::Bytes {
    let mut b64 = Zeroizing::new(String::with_capacity(secret.len() * 2));
    B64.encode_string(secret, &mut b64);
    let head = format!("{{\"alg\":\"{}\",\"value\":\"", alg.as_str());
    let tail = "\"}";
    let mut body = Vec::with_capacity(head.len() + b64.len() + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(b64.as_bytes());
    body.extend_from_slice(tail.as_bytes());
    azure_core::Bytes::from(body)
}

/// Zeroizes a `Bytes` buffer if we hold its only reference (best effort: copies made inside
/// hyper/rustls write buffers are out of reach).
fn wipe_bytes(bytes: azure_core::Bytes) {
    if let Ok(mut unique) = bytes.try_into_mut() {
        unique.as_mut().zeroize();
    } else {
        tracing::debug!("key material buffer still shared; not wiped here");
    }
}

fn decode_unwrap_result<const N: usize>(
    raw: &[u8],
    target: &Target,
) -> Result<SecretBytes<N>, KeyError> {
    let parsed: OpResult<'_> = serde_json::from_slice(raw)
        .map_err(|_| bad_answer(target, "unparsable unwrapKey result"))?;
    let mut value = parsed
        .value
        .ok_or_else(|| bad_answer(target, "unwrapKey returned no value"))?;
    let mut plain = Zeroizing::new(Vec::with_capacity(N + 8));
    let decoded = B64.decode_vec(value.as_bytes(), &mut plain);
    if let std::borrow::Cow::Owned(s) = &mut value {
        s.zeroize();
    }
    decoded.map_err(|_| bad_answer(target, "unwrapKey result is not base64url"))?;
    if plain.len() != N {
        return Err(KeyError::Misconfigured(Failure::new(
            target,
            None,
            Some("WrongKeyLength".into()),
            false,
            format!(
                "key '{}' in vault {} unwrapped a {}-byte secret where kvcrypt expects {N} bytes: \
                 this slot was not made by kvcrypt for this volume (wrong slot or algorithm?)",
                target.key,
                target.vault,
                plain.len()
            ),
        )));
    }
    SecretBytes::<N>::from_slice(&plain).ok_or_else(|| bad_answer(target, "secret length"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcrypt_crypto::secmem::VMK_LEN;

    fn target() -> Target {
        Target {
            vault: "v.vault.azure.net".into(),
            key: "k".into(),
            op: Operation::UnwrapKey,
        }
    }

    /// The agent drives the provider from a multi-threaded runtime: the provider must be
    /// shareable and its futures `Send` (a compile-time check).
    #[test]
    fn provider_and_its_futures_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<KeyVaultProvider>();
        send_sync::<KeyError>();
        #[allow(dead_code)]
        fn futures(p: &KeyVaultProvider, vmk: &VolumeKey) {
            send(&p.wrap("k", None, vmk));
            send(&p.unwrap("k", "RSA-OAEP-256", &[]));
            send(&p.latest_version("k"));
        }
    }

    #[test]
    fn algorithms_round_trip() {
        for a in WrapAlgorithm::ALL {
            assert_eq!(WrapAlgorithm::parse(a.as_str()).unwrap(), a);
        }
        assert!(WrapAlgorithm::parse("RSA1_5").is_err());
        assert!(WrapAlgorithm::parse("rsa-oaep-256").is_err());
    }

    #[test]
    fn wrap_body_is_exact_json() {
        let vmk = VolumeKey::from_slice(&[7u8; VMK_LEN]).unwrap();
        let body = wrap_request_body(WrapAlgorithm::A256Kw, vmk.expose());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["alg"], "A256KW");
        assert_eq!(
            B64.decode(v["value"].as_str().unwrap()).unwrap(),
            vec![7u8; VMK_LEN]
        );
        // The only reference: wiping works.
        let copy = body.clone();
        drop(body);
        let mut m = copy.try_into_mut().expect("unique");
        m.as_mut().zeroize();
        assert!(m.iter().all(|&b| b == 0));
    }

    #[test]
    fn unwrap_result_checks_length() {
        let ok = format!(
            r#"{{"kid":"https://v.vault.azure.net/keys/k/abc","value":"{}"}}"#,
            B64.encode([9u8; VMK_LEN])
        );
        let key = decode_unwrap_result::<VMK_LEN>(ok.as_bytes(), &target()).unwrap();
        assert_eq!(key.expose(), &[9u8; VMK_LEN]);

        let short = format!(r#"{{"value":"{}"}}"#, B64.encode([9u8; 32]));
        let err = decode_unwrap_result::<VMK_LEN>(short.as_bytes(), &target()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Misconfigured);
        assert_eq!(err.code(), Some("WrongKeyLength"));
        assert!(err.to_string().contains("32-byte"), "{err}");
        assert!(
            !err.to_string().contains("CQkJ"),
            "no key material in messages"
        );

        let padded = format!(r#"{{"value":"{}=="}}"#, B64.encode([1u8; VMK_LEN]));
        assert!(decode_unwrap_result::<VMK_LEN>(padded.as_bytes(), &target()).is_ok());
        assert!(decode_unwrap_result::<VMK_LEN>(b"{}", &target()).is_err());
        assert!(decode_unwrap_result::<VMK_LEN>(b"<html>", &target()).is_err());
    }
}
