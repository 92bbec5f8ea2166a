//! Local Azure Key Vault / Managed HSM emulator speaking the real REST protocol over TLS,
//! with Entra ID / managed-identity token endpoints, an admin interface (permissions, key
//! switches, firewall, fault injection) and optional persistent state.
//! Usage and the known differences from the real service: `docs/EMULATOR.md`.
//!
//! ```no_run
//! use kvcrypt_kv_emulator::{Emulator, EmulatorConfig};
//! let emu = Emulator::start(EmulatorConfig::default()).unwrap();
//! println!("vault at {} (CA {})", emu.vault_url("myvault"), emu.ca_pem_path().display());
//! emu.shutdown();
//! ```

// This crate needs no `unsafe`; the compiler keeps it that way.
#![forbid(unsafe_code)]

mod admin;
mod cli;
mod clock;
mod discovery;
mod errors;
mod identity;
mod keycrypto;
mod model;
mod rotation;
mod server;
mod tls;
mod vault;

pub use admin::{
    AdminError, Counters, Fault, FaultKind, FaultTarget, LogEntry, NewPrincipal, PrincipalInfo,
    PrincipalKind,
};
pub use cli::cli_main;
pub use clock::{ClockInfo, RotatedKey};
pub use model::{AuthMode, Op};
pub use rotation::{Action, IsoDuration, LifetimeAction, PolicyError, RotationPolicy, Trigger};

use model::State;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Errors starting the emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error(
        "emulator: refusing to listen on {0}: only loopback addresses (127.0.0.0/8, ::1) are allowed"
    )]
    NotLoopback(IpAddr),
    #[error("emulator: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("emulator: state directory {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("emulator: TLS setup failed: {0}")]
    Tls(String),
    #[error("emulator: cannot start its runtime: {0}")]
    Runtime(String),
}

impl kvcrypt_exit::ExitClass for EmulatorError {
    fn exit_class(&self) -> kvcrypt_exit::Exit {
        kvcrypt_exit::Exit::Config
    }
}

/// How to start an emulator. `Default` = ephemeral, port picked by the OS, RBAC mode.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// TCP port; 0 picks a free one.
    pub port: u16,
    /// Listen address (must be loopback).
    pub bind: IpAddr,
    /// Extra DNS names for the server certificate (beyond localhost, 127.0.0.1,
    /// `*.vault.azure.net`, `*.managedhsm.azure.net`, `login.microsoftonline.com`).
    pub hosts: Vec<String>,
    /// Persist keys, principals, permissions, tokens, CA and admin token here.
    pub state_dir: Option<PathBuf>,
    /// Also write the CA certificate (PEM) to this file.
    pub ca_out: Option<PathBuf>,
    /// Static admin token; generated (and saved in the state dir) when absent.
    pub admin_token: Option<String>,
    /// Tenant id of the emulated directory; fixed default so configs can name it.
    pub tenant_id: Option<String>,
    /// App Service `IDENTITY_HEADER` value the MSI endpoint expects; generated when absent.
    pub identity_header: Option<String>,
    /// Lifetime of issued access tokens.
    pub token_lifetime: Duration,
    /// Initial authorization mode (a persisted state keeps its own).
    pub mode: AuthMode,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            port: 0,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            hosts: Vec::new(),
            state_dir: None,
            ca_out: None,
            admin_token: None,
            tenant_id: None,
            identity_header: None,
            token_lifetime: Duration::from_secs(3600),
            mode: AuthMode::Rbac,
        }
    }
}

/// The tenant id used unless configured (a fixed value so test configs can hard-code it).
pub const DEFAULT_TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000e4e1";

/// State shared by the server tasks and the handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<admin::RequestLog>,
    state_file: Option<PathBuf>,
    /// The emulated clock key times follow (offset persisted in the state).
    pub(crate) clock: clock::Clock,
    /// Serialises automatic rotations (see `rotation::run`).
    rotation: Mutex<()>,
    pub(crate) tenant_id: String,
    pub(crate) admin_token: String,
    pub(crate) identity_header: String,
    pub(crate) token_lifetime: i64,
    pub(crate) port: u16,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way that
    // matters more than stopping the emulator would: keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
    pub(crate) fn faults(&self) -> MutexGuard<'_, Vec<Fault>> {
        lock(&self.faults)
    }
    pub(crate) fn log(&self) -> MutexGuard<'_, admin::RequestLog> {
        lock(&self.log)
    }
    pub(crate) fn rotation_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.rotation)
    }

    /// Runs `f` on the state and saves it (when persistent) before releasing the lock.
    pub(crate) fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.state();
        let r = f(&mut st);
        if let Some(path) = &self.state_file
            && let Err(e) = st.save(path)
        {
            tracing::error!("emulator: {e}");
        }
        r
    }
}

/// Entry point: `Emulator::start(config)`.
pub struct Emulator;

/// A running emulator. Dropping it stops the server.
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    bind: IpAddr,
    ca_pem: String,
    ca_path: PathBuf,
    temp_dir: Option<PathBuf>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn read_or_create_secret(
    dir: Option<&Path>,
    file: &str,
    given: Option<String>,
) -> Result<String, String> {
    if let Some(v) = given {
        if let Some(d) = dir {
            tls::write_private(&d.join(file), v.as_bytes())?;
        }
        return Ok(v);
    }
    if let Some(d) = dir {
        let p = d.join(file);
        if let Ok(v) = std::fs::read_to_string(&p) {
            let v = v.trim().to_string();
            if !v.is_empty() {
                return Ok(v);
            }
        }
        let v = model::random_hex(24);
        tls::write_private(&p, v.as_bytes())?;
        return Ok(v);
    }
    Ok(model::random_hex(24))
}

impl Emulator {
    /// Starts an emulator on its own thread and Tokio runtime, so it works the same from a
    /// plain `#[test]`, from `#[tokio::test]` and from `main`. Returns once it listens.
    pub fn start(config: EmulatorConfig) -> Result<EmulatorHandle, EmulatorError> {
        if !config.bind.is_loopback() {
            return Err(EmulatorError::NotLoopback(config.bind));
        }
        let dir = config.state_dir.clone();
        let state_err = |message: String| EmulatorError::State {
            path: dir.clone().unwrap_or_default(),
            message,
        };
        if let Some(d) = &dir {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| state_err(e.to_string()))?;
        }
        let state_file = dir.as_ref().map(|d| d.join("state.json"));
        let mut state = match &state_file {
            Some(p) if p.exists() => State::load(p).map_err(state_err)?,
            _ => State {
                mode: config.mode,
                ..State::default()
            },
        };
        state.prune_tokens();
        let admin_token =
            read_or_create_secret(dir.as_deref(), "admin-token", config.admin_token.clone())
                .map_err(state_err)?;
        let identity_header = read_or_create_secret(
            dir.as_deref(),
            "identity-header",
            config.identity_header.clone(),
        )
        .map_err(state_err)?;
        let tenant_id = read_or_create_secret(
            dir.as_deref(),
            "tenant-id",
            Some(config.tenant_id.clone().unwrap_or_else(|| {
                dir.as_ref()
                    .and_then(|d| std::fs::read_to_string(d.join("tenant-id")).ok())
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| DEFAULT_TENANT_ID.to_string())
            })),
        )
        .map_err(state_err)?;

        let ca = tls::load_or_create_ca(dir.as_deref()).map_err(EmulatorError::Tls)?;
        let tls_cfg = tls::server_config(&ca, &config.hosts).map_err(EmulatorError::Tls)?;
        let mut temp_dir = None;
        let ca_path = match (&config.ca_out, &dir) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => d.join("ca.pem"),
            (None, None) => {
                let t =
                    std::env::temp_dir().join(format!("kvcrypt-emulator-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&t).map_err(|e| EmulatorError::Tls(e.to_string()))?;
                temp_dir = Some(t.clone());
                t.join("ca.pem")
            }
        };
        if dir.as_ref().is_none_or(|d| ca_path != d.join("ca.pem")) {
            std::fs::write(&ca_path, &ca.pem).map_err(|e| {
                EmulatorError::Tls(format!("cannot write {}: {e}", ca_path.display()))
            })?;
        }

        let addr = SocketAddr::new(config.bind, config.port);
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| EmulatorError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| EmulatorError::Bind { addr, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind { addr, source })?
            .port();

        let clock = clock::Clock::new(state.clock_offset);
        let shared = Arc::new(Shared {
            clock,
            rotation: Mutex::new(()),
            state: Mutex::new(state),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(admin::RequestLog::default()),
            state_file,
            tenant_id,
            admin_token,
            identity_header,
            token_lifetime: config.token_lifetime.as_secs() as i64,
            port,
        });
        shared.mutate(|_| ()); // write the initial state file

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("kvcrypt-emulator")
            .build()
            .map_err(|e| EmulatorError::Runtime(e.to_string()))?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let srv_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvcrypt-emulator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => server::serve(srv_shared, l, tls_cfg, stop_rx).await,
                        Err(e) => tracing::error!("emulator: listener: {e}"),
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| EmulatorError::Runtime(e.to_string()))?;
        Ok(EmulatorHandle {
            shared,
            bind: config.bind,
            ca_pem: ca.pem,
            ca_path,
            temp_dir,
            stop,
            thread: Some(thread),
        })
    }
}

impl EmulatorHandle {
    pub fn port(&self) -> u16 {
        self.shared.port
    }
    /// The listening address, for `reqwest::ClientBuilder::resolve(vault_host, addr)`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.shared.port)
    }
    /// PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_path
    }
    /// `https://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port())
    }
    /// `https://{name}.vault.azure.net:PORT` — resolve that host to 127.0.0.1 in the client.
    pub fn vault_url(&self, name: &str) -> String {
        format!("https://{name}.vault.azure.net:{}", self.port())
    }
    /// `https://{name}.managedhsm.azure.net:PORT`
    pub fn managed_hsm_url(&self, name: &str) -> String {
        format!("https://{name}.managedhsm.azure.net:{}", self.port())
    }
    /// Authority host for Entra ID credentials (`https://127.0.0.1:PORT`).
    pub fn authority_host(&self) -> String {
        self.base_url()
    }
    /// `https://127.0.0.1:PORT/{tenant}/oauth2/v2.0/token`
    pub fn token_url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.base_url(), self.tenant_id())
    }
    /// App Service `IDENTITY_ENDPOINT` value.
    pub fn msi_endpoint(&self) -> String {
        format!("{}/msi/token", self.base_url())
    }
    /// IMDS-style token endpoint.
    pub fn imds_endpoint(&self) -> String {
        format!("{}/metadata/identity/oauth2/token", self.base_url())
    }
    /// App Service `IDENTITY_HEADER` value.
    pub fn identity_header(&self) -> &str {
        &self.shared.identity_header
    }
    pub fn tenant_id(&self) -> &str {
        &self.shared.tenant_id
    }
    /// `https://127.0.0.1:PORT/_admin`
    pub fn admin_url(&self) -> String {
        format!("{}/_admin", self.base_url())
    }
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }
    /// The machine-readable ready line the binary prints.
    pub fn ready_json(&self) -> serde_json::Value {
        serde_json::json!({
            "port": self.port(),
            "ca": self.ca_path,
            "admin": self.admin_url(),
            "admin_token": self.admin_token(),
            "tenant_id": self.tenant_id(),
            "token_url": self.token_url(),
            "msi_endpoint": self.msi_endpoint(),
            "identity_header": self.identity_header(),
        })
    }

    pub fn create_principal(&self, p: NewPrincipal) -> Result<PrincipalInfo, AdminError> {
        self.shared.create_principal(p)
    }
    /// Shorthand: an app registration with a generated client secret.
    pub fn create_secret_principal(&self, name: &str) -> Result<PrincipalInfo, AdminError> {
        self.create_principal(NewPrincipal {
            kind: PrincipalKind::Secret,
            name: Some(name.to_string()),
            ..Default::default()
        })
    }
    /// Shorthand: a managed identity (`system_assigned` = chosen when no id is requested).
    pub fn create_msi_principal(
        &self,
        name: &str,
        system_assigned: bool,
    ) -> Result<PrincipalInfo, AdminError> {
        self.create_principal(NewPrincipal {
            kind: PrincipalKind::Msi,
            name: Some(name.to_string()),
            system_assigned,
            ..Default::default()
        })
    }
    pub fn delete_principal(&self, client_id: &str) -> Result<(), AdminError> {
        self.shared.delete_principal(client_id)
    }
    /// Grants ops on one key (`Some(name)`) or vault-wide (`None`).
    pub fn grant(&self, client_id: &str, ops: &[Op], key: Option<&str>) -> Result<(), AdminError> {
        self.shared.grant(client_id, ops, key)
    }
    /// Revokes ops on one key, or on every scope of the principal with `None`.
    pub fn revoke(&self, client_id: &str, ops: &[Op], key: Option<&str>) -> Result<(), AdminError> {
        self.shared.revoke(client_id, ops, key)
    }
    /// Enables/disables one version, or all versions with `version == None`.
    pub fn set_key_enabled(
        &self,
        name: &str,
        version: Option<&str>,
        enabled: bool,
    ) -> Result<(), AdminError> {
        self.shared.set_key_enabled(name, version, enabled)
    }
    /// Creates a key directly (blocks while generating RSA). Returns the version id.
    pub fn create_key(
        &self,
        name: &str,
        kty: &str,
        size: Option<usize>,
    ) -> Result<String, AdminError> {
        self.shared.create_key(name, kty, size, None)
    }
    /// Sets key `name`'s rotation policy (as `PUT /keys/{name}/rotationpolicy` does, with the
    /// same validation).
    pub fn set_rotation_policy(
        &self,
        name: &str,
        policy: RotationPolicy,
    ) -> Result<(), AdminError> {
        self.shared.set_rotation_policy(name, policy).map(drop)
    }
    /// The emulated clock (Unix seconds) that key times and rotation follow.
    pub fn clock(&self) -> ClockInfo {
        self.shared.clock_info(Vec::new())
    }
    /// Moves the emulated clock forward by `by` and runs the rotations that are now due
    /// (blocks while their keys are generated). Returns the clock and the new versions.
    pub fn advance_clock(&self, by: Duration) -> ClockInfo {
        self.shared.advance_clock(by.as_secs() as i64)
    }
    pub fn set_firewall(&self, enabled: bool) {
        self.shared.set_firewall(enabled)
    }
    pub fn set_mode(&self, mode: AuthMode) {
        self.shared.set_mode(mode)
    }
    pub fn inject_fault(&self, fault: Fault) {
        self.shared.inject_fault(fault)
    }
    pub fn clear_faults(&self) {
        self.shared.clear_faults()
    }
    /// Counters and the request log (latest 2000 requests).
    pub fn requests(&self) -> (Counters, Vec<LogEntry>) {
        self.shared.requests()
    }
    pub fn clear_requests(&self) {
        self.shared.clear_requests()
    }
    /// Stops the server and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(d) = self.temp_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}
