//! Shared setup for the Key Vault provider tests and bench: an in-process emulator, principals,
//! and `VaultConfig`s that reach it exactly as production would — real host names
//! (`myvault.vault.azure.net`, `login.microsoftonline.com`) mapped to loopback with `resolve`,
//! the emulator's CA added with `ca_file`, TLS verification and the challenge check on.
#![allow(dead_code)]

use azure_core::credentials::Secret;
use azure_core::http::{ClientOptions, Transport};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use kvcrypt_crypto::secmem::VolumeKey;
use kvcrypt_keyvault::{ClientSecretConfig, CredentialConfig, KeyVaultProvider, VaultConfig};
use kvcrypt_kv_emulator::{Emulator, EmulatorConfig, EmulatorHandle, Op, PrincipalInfo};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

pub const VAULT: &str = "myvault.vault.azure.net";
pub const HSM: &str = "myhsm.managedhsm.azure.net";
pub const LOGIN: &str = "login.microsoftonline.com";

pub struct Kv {
    pub emu: EmulatorHandle,
    pub dir: tempfile::TempDir,
}

pub fn key_id(host: &str, name: &str) -> String {
    format!("https://{host}/keys/{name}")
}

pub fn random_vmk() -> VolumeKey {
    let mut b = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    VolumeKey::from_slice(&b).expect("64 bytes")
}

impl Kv {
    pub fn start() -> Kv {
        let emu = Emulator::start(EmulatorConfig::default()).expect("start emulator");
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

    /// Production-shaped config for `p` (secret in a 0600 file), short timeouts for tests.
    pub fn config(&self, p: &PrincipalInfo) -> VaultConfig {
        let secret_path = self.dir.path().join(format!("{}.secret", p.client_id));
        let secret = p.secret.clone().expect("principal has a secret");
        std::fs::write(&secret_path, format!("{secret}\n")).expect("write secret");
        let mut cfg = VaultConfig::new(CredentialConfig::ClientSecret(ClientSecretConfig {
            tenant_id: self.emu.tenant_id().to_owned(),
            client_id: p.client_id.clone(),
            secret_file: Some(secret_path),
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

/// Runs the `kvcrypt` binary with `--config cfg` and no stdin (so nothing can prompt).
pub fn kvcrypt_cli(cfg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvcrypt"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("KVCRYPT_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run kvcrypt")
}

/// Asserts that a `kvcrypt` run succeeded and returns its stdout.
pub fn ok(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

impl Kv {
    /// The config file an operator would write for principal `p` (client secret in a file):
    /// `[vault]` with the emulator's `resolve` entries and CA, plus `vault_extra` lines
    /// (e.g. shorter timeouts). One file per principal.
    pub fn config_file(&self, p: &PrincipalInfo, vault_extra: &str) -> PathBuf {
        let secret = self
            .dir
            .path()
            .join(format!("client-secret-{}", p.client_id));
        std::fs::write(&secret, format!("{}\n", p.secret.clone().unwrap())).unwrap();
        let resolve: Vec<String> = self.resolve().iter().map(|r| format!("{r:?}")).collect();
        let text = format!(
            "[vault]\nresolve = [{}]\nca_file = {:?}\n{vault_extra}\n[vault.credential]\n\
             kind = \"client-secret\"\ntenant_id = {:?}\nclient_id = {:?}\nsecret_file = {:?}\n",
            resolve.join(", "),
            self.emu.ca_pem_path(),
            self.emu.tenant_id(),
            p.client_id,
            secret,
        );
        let path = self
            .dir
            .path()
            .join(format!("kvcrypt-{}.toml", p.client_id));
        std::fs::write(&path, text).unwrap();
        path
    }
}
