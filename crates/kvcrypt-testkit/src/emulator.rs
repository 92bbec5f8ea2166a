//! The in-process Key Vault emulator as the tests use it: started with its TLS CA and an
//! admin API, principals with permissions, and `VaultConfig`s / config files that reach it
//! exactly as production would — real host names (`myvault.vault.azure.net`,
//! `login.microsoftonline.com`) mapped to loopback with `resolve`, the emulator's CA added with
//! `ca_file`, TLS verification and the challenge check on. [`rest`] speaks its REST API
//! directly (the emulator's own tests).

use azure_core::credentials::Secret;
use azure_core::http::{ClientOptions, Transport};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use kvcrypt_keyvault::{ClientSecretConfig, CredentialConfig, KeyVaultProvider, VaultConfig};
use kvcrypt_kv_emulator::{
    ClockInfo, Emulator, EmulatorConfig, EmulatorHandle, Op, PrincipalInfo, RotationPolicy,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub const VAULT: &str = "myvault.vault.azure.net";
pub const HSM: &str = "myhsm.managedhsm.azure.net";
pub const LOGIN: &str = "login.microsoftonline.com";

/// `https://{host}/keys/{name}`: a versionless key id.
pub fn key_id(host: &str, name: &str) -> String {
    format!("https://{host}/keys/{name}")
}

/// A running emulator and a private directory for the secrets and config files made for it
/// (both go away with the value).
pub struct Kv {
    pub emu: EmulatorHandle,
    pub dir: tempfile::TempDir,
}

impl Kv {
    /// An emulator with the default configuration.
    pub fn start() -> Kv {
        Kv::with(EmulatorConfig::default())
    }

    /// An emulator with `config` (extra host names, token lifetime, state directory, ...).
    pub fn with(config: EmulatorConfig) -> Kv {
        let emu = Emulator::start(config).expect("start emulator");
        Kv {
            emu,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// `resolve` entries sending the vault, the HSM and Entra ID to the emulator.
    pub fn resolve(&self) -> Vec<String> {
        let port = self.emu.port();
        [VAULT, HSM, LOGIN]
            .iter()
            .map(|h| format!("{h}:443:127.0.0.1:{port}"))
            .collect()
    }

    /// A service principal with a client secret, granted `ops` vault-wide.
    pub fn principal(&self, name: &str, ops: &[Op]) -> PrincipalInfo {
        let p = self.emu.create_secret_principal(name).expect("principal");
        if !ops.is_empty() {
            self.emu.grant(&p.client_id, ops, None).expect("grant");
        }
        p
    }

    /// Writes `p`'s client secret to a 0600 file of its own, as an operator would.
    fn secret_file(&self, p: &PrincipalInfo) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("client-secret-{}", p.client_id));
        let secret = p.secret.clone().expect("principal has a secret");
        std::fs::write(&path, format!("{secret}\n")).expect("write secret");
        path
    }

    /// Production-shaped config for `p` (secret in a file), short timeouts for tests.
    pub fn config(&self, p: &PrincipalInfo) -> VaultConfig {
        let mut cfg = VaultConfig::new(CredentialConfig::ClientSecret(ClientSecretConfig {
            tenant_id: self.emu.tenant_id().to_owned(),
            client_id: p.client_id.clone(),
            secret_file: Some(self.secret_file(p)),
            secret_credential: None,
        }));
        cfg.resolve = self.resolve();
        cfg.ca_file = Some(self.emu.ca_pem_path().to_owned());
        cfg.attempt_timeout_ms = 1_000;
        cfg.deadline_ms = 3_000;
        cfg.max_retries = 2;
        cfg.retry_delay_ms = 50;
        cfg.max_retry_delay_ms = 200;
        cfg
    }

    pub fn provider(&self, p: &PrincipalInfo) -> KeyVaultProvider {
        KeyVaultProvider::new(&self.config(p)).expect("provider")
    }

    /// The config file an operator would write for principal `p` (client secret in a file):
    /// `[vault]` with the emulator's `resolve` entries and CA, plus `vault_extra` lines
    /// (e.g. `keys = [...]`, shorter timeouts).
    pub fn config_file(&self, p: &PrincipalInfo, vault_extra: &str) -> PathBuf {
        self.config_file_resolving(p, vault_extra, &[])
    }

    /// [`Kv::config_file`] with more `resolve` entries (e.g. a host the test traps). Each call
    /// writes a new file, so configs made for one principal never overwrite one another.
    pub fn config_file_resolving(
        &self,
        p: &PrincipalInfo,
        vault_extra: &str,
        extra_resolve: &[String],
    ) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let secret = self.secret_file(p);
        let resolve: Vec<String> = self
            .resolve()
            .iter()
            .chain(extra_resolve)
            .map(|r| format!("{r:?}"))
            .collect();
        let text = format!(
            "[vault]\nresolve = [{}]\nca_file = {:?}\n{vault_extra}\n[vault.credential]\n\
             kind = \"client-secret\"\ntenant_id = {:?}\nclient_id = {:?}\nsecret_file = {:?}\n",
            resolve.join(", "),
            self.emu.ca_pem_path(),
            self.emu.tenant_id(),
            p.client_id,
            secret,
        );
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .path()
            .join(format!("kvcrypt-{}-{n}.toml", p.client_id));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Moves the emulator's clock forward by `by`; the rotations that became due run before
    /// this returns (their new versions are in the answer).
    pub fn advance_clock(&self, by: Duration) -> ClockInfo {
        self.emu.advance_clock(by)
    }

    /// Gives key `name` a rotation policy: a new version `every` after the latest one's
    /// creation, expiring `expires_after` its creation when given (the service's minimums
    /// apply: 7 days, 28 days).
    pub fn rotate_every(&self, name: &str, every: Duration, expires_after: Option<Duration>) {
        let mut policy = RotationPolicy::rotate_after(every);
        if let Some(e) = expires_after {
            policy = policy.expires_after(e);
        }
        self.emu
            .set_rotation_policy(name, policy)
            .expect("rotation policy");
    }

    /// Total requests the emulator has seen.
    pub fn total_requests(&self) -> u64 {
        self.emu.requests().0.total
    }

    /// An SDK `KeyClient` for management operations the provider does not do (rotate, delete,
    /// update attributes, import), authenticated as a principal with every permission.
    pub fn admin_client(&self, host: &str) -> KeyClient {
        let p = self.principal("kv-admin", &Op::ALL);
        let ca = reqwest::Certificate::from_pem(self.emu.ca_pem().as_bytes()).expect("ca");
        let mut b = reqwest::Client::builder().tls_certs_merge([ca]);
        for h in [VAULT, HSM, LOGIN] {
            b = b.resolve(h, ([127, 0, 0, 1], self.emu.port()).into());
        }
        let http = b.build().expect("client");
        let options = || ClientOptions {
            transport: Some(Transport::new(Arc::new(http.clone()))),
            ..Default::default()
        };
        let cred = ClientSecretCredential::new(
            self.emu.tenant_id(),
            p.client_id.clone(),
            Secret::new(p.secret.clone().expect("secret")),
            Some(ClientSecretCredentialOptions {
                client_options: options(),
            }),
        )
        .expect("credential");
        KeyClient::new(
            &format!("https://{host}/"),
            cred,
            Some(KeyClientOptions {
                client_options: options(),
                ..Default::default()
            }),
        )
        .expect("key client")
    }
}

/// The emulator's REST API spoken directly with reqwest over verified TLS: a client that trusts
/// the emulator's CA and maps the real host names to 127.0.0.1 (like the provider's `resolve`
/// setting), tokens, and request shorthands that return status, headers and JSON body.
pub mod rest {
    use super::{HSM, LOGIN, VAULT};
    use crate::data::b64;
    use kvcrypt_kv_emulator::{EmulatorHandle, Op, PrincipalInfo};
    use reqwest::Method;
    use reqwest::header::HeaderMap;
    use serde_json::{Value, json};

    /// A client that trusts only the emulator's CA and reaches it under the real host names.
    pub fn client(emu: &EmulatorHandle) -> reqwest::Client {
        let addr = emu.addr();
        reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(emu.ca_pem().as_bytes()).expect("CA PEM")
            ])
            .resolve(VAULT, addr)
            .resolve(HSM, addr)
            .resolve(LOGIN, addr)
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("client")
    }

    /// The client-credentials form for `client_id` / `secret` and the vault scope.
    pub fn secret_form(client_id: &str, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", client_id.to_string()),
            ("client_secret", secret.to_string()),
            ("scope", "https://vault.azure.net/.default".to_string()),
        ]
    }

    /// POSTs `form` to the token endpoint of `tenant`: status and JSON body.
    pub async fn token_request(
        c: &reqwest::Client,
        emu: &EmulatorHandle,
        tenant: &str,
        form: &[(&str, String)],
    ) -> (u16, Value) {
        let url = format!("{}/{tenant}/oauth2/v2.0/token", emu.base_url());
        let r = c.post(url).form(form).send().await.expect("token request");
        (r.status().as_u16(), r.json().await.expect("JSON body"))
    }

    /// Client-credentials token for `p` (secret flow) for the given resource.
    pub async fn token(
        c: &reqwest::Client,
        emu: &EmulatorHandle,
        p: &PrincipalInfo,
        resource: &str,
    ) -> String {
        let mut form = secret_form(&p.client_id, p.secret.as_deref().unwrap_or_default());
        form[3].1 = format!("{resource}/.default");
        let (s, v) = token_request(c, emu, emu.tenant_id(), &form).await;
        assert_eq!(s, 200, "token for {}: {v}", p.client_id);
        v["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// A fresh emulator, a client for it and the vault token of a principal with every
    /// permission: the start of most REST tests.
    pub async fn admin_session() -> (EmulatorHandle, reqwest::Client, String) {
        let emu = kvcrypt_kv_emulator::Emulator::start(Default::default()).expect("start emulator");
        let c = client(&emu);
        let (_p, t) = admin_principal(&c, &emu).await;
        (emu, c, t)
    }

    /// A principal with every permission vault-wide and a vault token.
    pub async fn admin_principal(
        c: &reqwest::Client,
        emu: &EmulatorHandle,
    ) -> (PrincipalInfo, String) {
        let p = emu
            .create_secret_principal("test-admin")
            .expect("principal");
        emu.grant(&p.client_id, &Op::ALL, None).expect("grant");
        let t = token(c, emu, &p, "https://vault.azure.net").await;
        (p, t)
    }

    /// `https://{host}:{port}{path}` with the api-version the SDK sends.
    pub fn url(emu: &EmulatorHandle, host: &str, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!(
            "https://{host}:{}{path}{sep}api-version=2025-07-01",
            emu.port()
        )
    }

    /// One request with a bearer token and an optional JSON body: status, headers, JSON body
    /// (`Null` when empty).
    pub async fn call(
        c: &reqwest::Client,
        method: Method,
        url: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, HeaderMap, Value) {
        let mut rb = c.request(method, url).bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON body")
        };
        (status, headers, v)
    }

    /// A key operation (`wrapkey`, `unwrapkey`, `encrypt`, ...) at `u`: status and body.
    pub async fn wrap(
        c: &reqwest::Client,
        u: &str,
        token: &str,
        alg: &str,
        data: &[u8],
    ) -> (u16, Value) {
        let body = json!({"alg": alg, "value": b64(data)});
        let (s, _, v) = call(c, Method::POST, u, token, Some(body)).await;
        (s, v)
    }

    /// `error.innererror.code` of a Key Vault error body.
    pub fn inner_code(v: &Value) -> Option<&str> {
        v["error"]["innererror"]["code"].as_str()
    }

    /// A client, an emulator and a token together, for tests that make many requests as one
    /// caller: each method is one request to `host` + `path`.
    pub struct Api<'a> {
        pub c: &'a reqwest::Client,
        pub emu: &'a EmulatorHandle,
        pub token: &'a str,
        pub host: &'a str,
    }

    impl<'a> Api<'a> {
        pub fn new(
            c: &'a reqwest::Client,
            emu: &'a EmulatorHandle,
            token: &'a str,
            host: &'a str,
        ) -> Api<'a> {
            Api {
                c,
                emu,
                token,
                host,
            }
        }

        /// `method path` with an optional JSON body.
        pub async fn call(
            &self,
            method: Method,
            path: &str,
            body: Option<Value>,
        ) -> (u16, HeaderMap, Value) {
            call(
                self.c,
                method,
                &url(self.emu, self.host, path),
                self.token,
                body,
            )
            .await
        }

        /// GET `path`: status and body.
        pub async fn get(&self, path: &str) -> (u16, Value) {
            let (s, _, v) = self.call(Method::GET, path, None).await;
            (s, v)
        }

        /// POST `path` with an optional JSON body: status and body.
        pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
            let (s, _, v) = self.call(Method::POST, path, body).await;
            (s, v)
        }

        /// PUT `path` with a JSON body: status and body.
        pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
            let (s, _, v) = self.call(Method::PUT, path, Some(body)).await;
            (s, v)
        }

        /// PATCH `path` with a JSON body: status and body.
        pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
            let (s, _, v) = self.call(Method::PATCH, path, Some(body)).await;
            (s, v)
        }

        /// DELETE `path`: status and body.
        pub async fn delete(&self, path: &str) -> (u16, Value) {
            let (s, _, v) = self.call(Method::DELETE, path, None).await;
            (s, v)
        }

        /// A key operation at `path` (e.g. `/keys/k//unwrapkey`): status and body.
        pub async fn wrap(&self, path: &str, alg: &str, data: &[u8]) -> (u16, Value) {
            wrap(
                self.c,
                &url(self.emu, self.host, path),
                self.token,
                alg,
                data,
            )
            .await
        }
    }
}
