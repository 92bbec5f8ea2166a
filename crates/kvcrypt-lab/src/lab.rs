//! A self-contained kvcrypt setup for `kvcrypt-demo` and the agent's end-to-end tests: the
//! bundled Key Vault emulator (in-process), a principal with a client secret, an RSA key, a
//! config file reaching the emulator exactly as production reaches Azure (real host names
//! resolved to loopback, the emulator's CA added, TLS verified), a scratch volume, and the
//! agent run as a separate `kvcrypt agent` process with its own run directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use kvcrypt_kv_emulator::{
    Emulator, EmulatorConfig, EmulatorHandle, NewPrincipal, Op, PrincipalInfo, PrincipalKind,
};

use kvcrypt::agent::control::{self, Request};
use kvcrypt::agent::status::{VolumeState, VolumeStatus};

/// Host names the config uses; `resolve` maps them to the emulator.
pub const VAULT_HOST: &str = "kvcrypt-demo.vault.azure.net";
pub const LOGIN_HOST: &str = "login.microsoftonline.com";
pub const KEY_NAME: &str = "disk-kek";
/// Volume name used by the lab.
pub const VOLUME: &str = "demo";

/// The ways a customer takes access away (and gives it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Remove the principal's unwrapKey permission (RBAC role assignment / access policy).
    Permission,
    /// Disable the key.
    DisableKey,
    /// Turn on the vault firewall.
    Firewall,
    /// Delete the identity (service principal / managed identity).
    DeleteIdentity,
    /// Delete the key (soft delete; restored by recovering it).
    DeleteKey,
}

pub struct Lab {
    pub dir: PathBuf,
    pub emu: EmulatorHandle,
    pub principal: PrincipalInfo,
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub image: PathBuf,
    pub exe: PathBuf,
    /// Versionless key id given to `format`.
    pub key_id: String,
}

/// Settings of the lab's config file.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub size_mib: u64,
    /// Extra lines for `[agent]` (e.g. `hold = "3s"`).
    pub agent: String,
    /// Extra lines for the `[[volume]]` entry.
    pub volume: String,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            size_mib: 64,
            agent: "check_interval = \"1s\"\ncheck_jitter = 0.0\ncheck_timeout = \"3s\"\n".into(),
            volume: "transport = \"fuse\"\n".into(),
        }
    }
}

impl Lab {
    /// Starts the emulator and writes key, principal, config and an empty image in `dir`.
    pub fn start(dir: &Path, exe: &Path, opts: &LabOptions) -> anyhow::Result<Lab> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let emu = Emulator::start(EmulatorConfig::default())
            .context("starting the Key Vault emulator")?;
        emu.create_key(KEY_NAME, "RSA", Some(2048))
            .map_err(|e| anyhow::anyhow!("creating the key: {e}"))?;
        let principal = emu
            .create_secret_principal("kvcrypt-agent")
            .map_err(|e| anyhow::anyhow!("creating the principal: {e}"))?;
        grant(&emu, &principal)?;
        let secret = dir.join("client-secret");
        write_private(&secret, principal.secret.as_deref().unwrap_or_default())?;
        let image = dir.join("volume.img");
        let f = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        f.set_len(opts.size_mib << 20)?;
        let run_dir = dir.join("run");
        let config = dir.join("kvcrypt.toml");
        let port = emu.port();
        let text = format!(
            r#"# Written by the kvcrypt lab: the emulator stands in for Azure.
[vault]
keys = ["https://{VAULT_HOST}/keys/{KEY_NAME}"]
resolve = ["{VAULT_HOST}:443:127.0.0.1:{port}", "{LOGIN_HOST}:443:127.0.0.1:{port}"]
ca_file = "{ca}"
attempt_timeout_ms = 1000
deadline_ms = 3000
max_retries = 1
retry_delay_ms = 50
max_retry_delay_ms = 200

[vault.credential]
kind = "client-secret"
tenant_id = "{tenant}"
client_id = "{client}"
secret_file = "{secret}"

[agent]
{agent}
[[volume]]
name = "{VOLUME}"
path = "{image}"
{volume}"#,
            ca = emu.ca_pem_path().display(),
            tenant = emu.tenant_id(),
            client = principal.client_id,
            secret = secret.display(),
            agent = opts.agent,
            image = image.display(),
            volume = opts.volume,
        );
        write_private(&config, &text)?;
        Ok(Lab {
            dir: dir.to_owned(),
            emu,
            principal,
            config,
            run_dir,
            image,
            exe: exe.to_owned(),
            key_id: format!("https://{VAULT_HOST}/keys/{KEY_NAME}"),
        })
    }

    /// A `kvcrypt` command with this lab's config and run directory.
    pub fn kvcrypt(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--config")
            .arg(&self.config)
            .env("KVCRYPT_RUN_DIR", &self.run_dir);
        c
    }

    /// `kvcrypt format` of the image with the lab's key.
    pub fn format(&self) -> anyhow::Result<()> {
        let out = self
            .kvcrypt()
            .arg("format")
            .arg(&self.image)
            .arg("--key-id")
            .arg(&self.key_id)
            .arg("--label")
            .arg("demo")
            .arg("--yes")
            .stdin(Stdio::null())
            .output()
            .context("running kvcrypt format")?;
        if !out.status.success() {
            bail!(
                "kvcrypt format failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts `kvcrypt agent`; its log goes to `dir/agent.log` (appended).
    pub fn spawn_agent(&self, notify_socket: Option<&Path>) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let mut c = self.kvcrypt();
        c.arg("agent")
            .env("KVCRYPT_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(n) = notify_socket {
            c.env("NOTIFY_SOCKET", n);
        }
        c.spawn().context("starting kvcrypt agent")
    }

    /// Status of the lab's volume from the running agent.
    pub fn status(&self) -> anyhow::Result<VolumeStatus> {
        let r = control::request(
            &self.run_dir.join("control.sock"),
            &Request::Status {
                name: Some(VOLUME.into()),
            },
            Duration::from_secs(10),
        )?;
        r.volumes
            .into_iter()
            .next()
            .context("agent returned no volume")
    }

    /// Polls (every 10 ms) until the volume is in `state`; returns its status and the wait.
    pub fn wait_state(
        &self,
        state: VolumeState,
        timeout: Duration,
    ) -> anyhow::Result<(VolumeStatus, Duration)> {
        let t0 = Instant::now();
        let mut last = None;
        while t0.elapsed() < timeout {
            match self.status() {
                Ok(s) if s.state == state => return Ok((s, t0.elapsed())),
                Ok(s) => last = Some(format!("{} ({:?})", s.state, s.reason)),
                Err(e) => last = Some(format!("{e:#}")),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "volume not {state} after {timeout:?}; last seen: {}",
            last.unwrap_or_else(|| "nothing".into())
        )
    }

    /// Takes access away.
    pub fn revoke(&self, how: Revocation) -> anyhow::Result<()> {
        let id = &self.principal.client_id;
        let r = match how {
            Revocation::Permission => self.emu.revoke(id, &[Op::Unwrap, Op::Wrap], None),
            Revocation::DisableKey => self.emu.set_key_enabled(KEY_NAME, None, false),
            Revocation::Firewall => {
                self.emu.set_firewall(true);
                Ok(())
            }
            Revocation::DeleteIdentity => self.emu.delete_principal(id),
            Revocation::DeleteKey => return self.key_admin(false),
        };
        r.map_err(|e| anyhow::anyhow!("revoke {how:?}: {e}"))
    }

    /// Gives access back.
    pub fn restore(&self, how: Revocation) -> anyhow::Result<()> {
        let r = match how {
            Revocation::Permission => grant(&self.emu, &self.principal),
            Revocation::DisableKey => self
                .emu
                .set_key_enabled(KEY_NAME, None, true)
                .map_err(|e| anyhow::anyhow!("{e}")),
            Revocation::Firewall => {
                self.emu.set_firewall(false);
                Ok(())
            }
            Revocation::DeleteIdentity => {
                // Re-create the same app registration (same client id and secret), as an
                // operator restoring a deleted principal would, and assign the role again.
                self.emu
                    .create_principal(NewPrincipal {
                        kind: PrincipalKind::Secret,
                        name: Some(self.principal.name.clone()),
                        client_id: Some(self.principal.client_id.clone()),
                        secret: self.principal.secret.clone(),
                        ..Default::default()
                    })
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                grant(&self.emu, &self.principal)
            }
            Revocation::DeleteKey => self.key_admin(true),
        };
        r.with_context(|| format!("restore {how:?}"))
    }

    /// Deletes (`recover == false`) or recovers the key through the Key Vault API itself, as
    /// the customer would (the emulator's admin interface has no key deletion).
    fn key_admin(&self, recover: bool) -> anyhow::Result<()> {
        use azure_core::credentials::Secret;
        use azure_core::http::{ClientOptions, Transport};
        use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
        use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
        use std::sync::Arc;

        let admin = self
            .emu
            .create_secret_principal("kvcrypt-lab-admin")
            .map_err(|e| anyhow::anyhow!("admin principal: {e}"))?;
        self.emu
            .grant(&admin.client_id, &Op::ALL, None)
            .map_err(|e| anyhow::anyhow!("admin grant: {e}"))?;
        let ca = reqwest::Certificate::from_pem(self.emu.ca_pem().as_bytes())?;
        let mut b = reqwest::Client::builder().tls_certs_merge([ca]);
        for h in [VAULT_HOST, LOGIN_HOST] {
            b = b.resolve(h, ([127, 0, 0, 1], self.emu.port()).into());
        }
        let http = b.build()?;
        let options = || ClientOptions {
            transport: Some(Transport::new(Arc::new(http.clone()))),
            ..Default::default()
        };
        let cred = ClientSecretCredential::new(
            self.emu.tenant_id(),
            admin.client_id.clone(),
            Secret::new(admin.secret.clone().unwrap_or_default()),
            Some(ClientSecretCredentialOptions {
                client_options: options(),
            }),
        )?;
        let client = KeyClient::new(
            &format!("https://{VAULT_HOST}/"),
            cred,
            Some(KeyClientOptions {
                client_options: options(),
                ..Default::default()
            }),
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            if recover {
                client.recover_deleted_key(KEY_NAME, None).await.map(|_| ())
            } else {
                client.delete_key(KEY_NAME, None).await.map(|_| ())
            }
        })
        .with_context(|| {
            format!(
                "{} key {KEY_NAME}",
                if recover { "recovering" } else { "deleting" }
            )
        })?;
        let _ = self.emu.delete_principal(&admin.client_id);
        Ok(())
    }
}

fn grant(emu: &EmulatorHandle, p: &PrincipalInfo) -> anyhow::Result<()> {
    emu.grant(&p.client_id, &[Op::Get, Op::Wrap, Op::Unwrap], None)
        .map_err(|e| anyhow::anyhow!("granting key permissions: {e}"))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
