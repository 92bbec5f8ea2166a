//! The one key-provider seam: what kvcrypt asks of whoever holds the customer's keys.
//!
//! Everything that wraps or unwraps goes through [`KeyProvider`]: the CLI's `format`, `rewrap`
//! and `header dump --dump-master-key` (synchronously, through [`BlockingProvider`]) and the
//! agent's unlock, resume and periodic access checks (asynchronously). [`KeyVaultProvider`] is
//! the production implementation; tests substitute their own.
//!
//! Errors are [`KeyError`]s in every implementation, so their class (denied, transient,
//! misconfigured) means the same to the agent and the exit code means the same to the CLI
//! whoever answered.

use std::sync::Arc;

use kvcrypt_crypto::kdf::ACCESS_SECRET_LEN;
use kvcrypt_crypto::secmem::{SecretBytes, VolumeKey};

use crate::{KeyError, KeyVaultProvider, KeyVersionInfo, VaultConfig, WrappedKey};

/// A format v2 access-check secret (see `kvcrypt_crypto::kdf`).
pub type AccessSecret = SecretBytes<ACCESS_SECRET_LEN>;

/// What kvcrypt needs from a key provider. Implementations must return secrets only in the
/// zeroizing types given here, and never put key bytes in error messages.
///
/// `async_trait` (rather than `async fn` in the trait) because callers hold the provider as
/// `Arc<dyn KeyProvider>`: the agent swaps it on reload, and tests inject fakes.
#[async_trait::async_trait]
pub trait KeyProvider: Send + Sync {
    /// Wraps `vmk` with `key_id` (versioned or versionless; versionless means the latest
    /// version). With `algorithm = None` the provider picks the default for the key's type.
    /// The result names the versioned key that wrapped it.
    async fn wrap(
        &self,
        key_id: &str,
        algorithm: Option<&str>,
        vmk: &VolumeKey,
    ) -> Result<WrappedKey, KeyError>;

    /// Unwraps a key slot's bytes with its versioned `key_id`.
    async fn unwrap(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<VolumeKey, KeyError>;

    /// Wraps a format v2 access-check secret with a slot's versioned key and algorithm (the
    /// slot's `check`).
    async fn wrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        secret: &AccessSecret,
    ) -> Result<WrappedKey, KeyError>;

    /// Unwraps a slot's `check`: what the agent's periodic checks ask, so the volume key
    /// itself crosses the provider only to unlock or resume.
    async fn unwrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<AccessSecret, KeyError>;

    /// The current (latest) version of `key_id`'s key (any version given is ignored), with
    /// whether and until when it can be used: what rotation following looks at.
    async fn current_version(&self, key_id: &str) -> Result<KeyVersionInfo, KeyError>;

    /// The versioned id of the latest version of `key_id`.
    async fn latest_version(&self, key_id: &str) -> Result<String, KeyError> {
        Ok(self.current_version(key_id).await?.key_id)
    }

    /// When the provider will next rotate the key of `current` by itself (Unix seconds), if
    /// it has a rotation policy saying so; providers without one answer `None`.
    async fn next_rotation(&self, current: &KeyVersionInfo) -> Result<Option<i64>, KeyError> {
        let _ = current;
        Ok(None)
    }
}

/// Azure Key Vault / Managed HSM: the inherent methods, which also serve secrets of any length.
#[async_trait::async_trait]
impl KeyProvider for KeyVaultProvider {
    async fn wrap(
        &self,
        key_id: &str,
        algorithm: Option<&str>,
        vmk: &VolumeKey,
    ) -> Result<WrappedKey, KeyError> {
        KeyVaultProvider::wrap(self, key_id, algorithm, vmk).await
    }

    async fn unwrap(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<VolumeKey, KeyError> {
        KeyVaultProvider::unwrap(self, key_id, algorithm, wrapped).await
    }

    async fn wrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        secret: &AccessSecret,
    ) -> Result<WrappedKey, KeyError> {
        self.wrap_secret(key_id, Some(algorithm), secret).await
    }

    async fn unwrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<AccessSecret, KeyError> {
        self.unwrap_secret(key_id, algorithm, wrapped).await
    }

    async fn current_version(&self, key_id: &str) -> Result<KeyVersionInfo, KeyError> {
        KeyVaultProvider::current_version(self, key_id).await
    }

    async fn latest_version(&self, key_id: &str) -> Result<String, KeyError> {
        KeyVaultProvider::latest_version(self, key_id).await
    }

    async fn next_rotation(&self, current: &KeyVersionInfo) -> Result<Option<i64>, KeyError> {
        KeyVaultProvider::next_rotation(self, current).await
    }
}

/// Any [`KeyProvider`], synchronously, for the CLI: owns a current-thread tokio runtime. Do
/// not use it from inside an async runtime (it blocks the calling thread).
pub struct BlockingProvider {
    runtime: tokio::runtime::Runtime,
    provider: Arc<dyn KeyProvider>,
}

impl BlockingProvider {
    /// Key Vault, as the `[vault]` table configures it.
    pub fn new(cfg: &VaultConfig) -> Result<Self, KeyError> {
        Self::over(Arc::new(KeyVaultProvider::new(cfg)?))
    }

    /// Any provider (tests use fakes).
    pub fn over(provider: Arc<dyn KeyProvider>) -> Result<Self, KeyError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| KeyError::Config(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Self { runtime, provider })
    }

    /// See [`KeyProvider::wrap`].
    pub fn wrap(
        &self,
        key_id: &str,
        algorithm: Option<&str>,
        vmk: &VolumeKey,
    ) -> Result<WrappedKey, KeyError> {
        self.runtime
            .block_on(self.provider.wrap(key_id, algorithm, vmk))
    }

    /// See [`KeyProvider::unwrap`].
    pub fn unwrap(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<VolumeKey, KeyError> {
        self.runtime
            .block_on(self.provider.unwrap(key_id, algorithm, wrapped))
    }

    /// See [`KeyProvider::wrap_access_secret`].
    pub fn wrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        secret: &AccessSecret,
    ) -> Result<WrappedKey, KeyError> {
        self.runtime
            .block_on(self.provider.wrap_access_secret(key_id, algorithm, secret))
    }

    /// See [`KeyProvider::unwrap_access_secret`].
    pub fn unwrap_access_secret(
        &self,
        key_id: &str,
        algorithm: &str,
        wrapped: &[u8],
    ) -> Result<AccessSecret, KeyError> {
        self.runtime.block_on(
            self.provider
                .unwrap_access_secret(key_id, algorithm, wrapped),
        )
    }

    /// Runs any future on this provider's runtime: for callers that compose the async
    /// functions of other modules over [`provider`](Self::provider).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The provider served.
    pub fn provider(&self) -> &dyn KeyProvider {
        self.provider.as_ref()
    }

    /// See [`KeyProvider::current_version`].
    pub fn current_version(&self, key_id: &str) -> Result<KeyVersionInfo, KeyError> {
        self.runtime.block_on(self.provider.current_version(key_id))
    }

    /// See [`KeyProvider::latest_version`].
    pub fn latest_version(&self, key_id: &str) -> Result<String, KeyError> {
        self.runtime.block_on(self.provider.latest_version(key_id))
    }
}
