//! The `[vault]` table of `/etc/kvcrypt/kvcrypt.toml`: how kvcrypt authenticates to Entra ID and
//! reaches Key Vault / Managed HSM. Documented for operators in `docs/CONFIG-vault.md`.
//!
//! Deliberately absent: any switch that disables TLS verification or the Key Vault challenge
//! resource check. `resolve` + `ca_file` are the only way to point the production code path at
//! another address (an emulator, a private endpoint), and both keep verification on.

use super::KeyError;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// Limits on the timing settings, so a typo cannot turn a boot-time unlock into a hang.
const MIN_TIMEOUT_MS: u64 = 100;
const MAX_ATTEMPT_TIMEOUT_MS: u64 = 120_000;
const MAX_DEADLINE_MS: u64 = 600_000;
const MAX_RETRIES: u32 = 10;

/// The `[vault]` table: credential, network and timing settings shared by every Key Vault call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// How kvcrypt authenticates to Entra ID (`[vault.credential]`, selected by `kind`).
    pub credential: CredentialConfig,

    /// Entra ID authority host for sovereign / private clouds, e.g.
    /// `https://login.microsoftonline.us` (Azure Government) or
    /// `https://login.chinacloudapi.cn` (Azure China). Must be `https://`. Default: the public
    /// cloud, `https://login.microsoftonline.com`. (The vault host itself comes from each key id,
    /// e.g. `https://myvault.vault.usgovcloudapi.net/keys/k1/…`, so no vault suffix setting is
    /// needed.)
    #[serde(default)]
    pub authority_host: Option<String>,

    /// The keys allowed to unlock volumes, as versionless key ids
    /// (`https://myvault.vault.azure.net/keys/disk-kek`; any version matches, so rotation keeps
    /// working). Used by the CLI commands (`open`, `format`, `rewrap`, `header dump
    /// --dump-master-key`) and by every `[[volume]]` without its own `keys`. A header slot
    /// naming any other key is never tried, and requests go to the host named here, never to
    /// one the disk names. Validated when the file is read.
    #[serde(default)]
    pub keys: Vec<super::KeyPin>,

    /// curl-style DNS overrides applied to every connection kvcrypt makes (Entra ID and Key
    /// Vault): `"HOST:PORT:ADDR"` or `"HOST:PORT:ADDR:ADDRPORT"`, e.g.
    /// `"myvault.vault.azure.net:443:127.0.0.1:8443"`. TLS is still verified against `HOST`, so
    /// this cannot weaken anything; it exists for private endpoints and for the local emulator.
    /// `ADDR` may be IPv4 or a bracketed IPv6 address.
    #[serde(default)]
    pub resolve: Vec<String>,

    /// Extra trusted root CA certificate(s), PEM. Added to — never replacing — the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,

    /// Timeout of one HTTP attempt (connect + TLS + request + response), milliseconds.
    /// Default 5000, range 100..=120000.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,

    /// Overall deadline of one provider operation (token acquisition, challenge round trip and
    /// all retries included), milliseconds. Default 20000, at least `attempt_timeout_ms`, at most
    /// 600000. The SDK itself has no overall timeout, so this is enforced around every call.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,

    /// Retries after a transient failure (connection error, timeout, 408, 429, 5xx) within the
    /// deadline. Default 2, at most 10.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,

    /// First retry delay, milliseconds; doubles per retry (with jitter). Default 250.
    #[serde(default = "default_retry_delay_ms")]
    pub retry_delay_ms: u64,

    /// Cap on one retry delay, milliseconds, including a server's `Retry-After`. Default 4000.
    #[serde(default = "default_max_retry_delay_ms")]
    pub max_retry_delay_ms: u64,
}

fn default_attempt_timeout_ms() -> u64 {
    5_000
}
fn default_deadline_ms() -> u64 {
    20_000
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_delay_ms() -> u64 {
    250
}
fn default_max_retry_delay_ms() -> u64 {
    4_000
}

/// `[vault.credential]`: which Entra ID credential to use, and its parameters.
///
/// Secrets (client secret, certificate, its password) are read from files, never from the TOML
/// itself or the command line: either an explicit path (`*_file`) or the name of a systemd
/// credential (`*_credential`, read from `$CREDENTIALS_DIRECTORY/<name>`, see `LoadCredential=`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum CredentialConfig {
    /// Azure managed identity: the VM's IMDS endpoint, or App Service style when the environment
    /// has `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` (as the SDK detects it). At most one of the
    /// ids selects a user-assigned identity; none = system-assigned.
    ManagedIdentity(ManagedIdentityConfig),
    /// A service principal with a client secret.
    ClientSecret(ClientSecretConfig),
    /// A service principal with a certificate (PKCS#12 file holding the certificate and its RSA
    /// private key).
    ClientCertificate(ClientCertificateConfig),
    /// Workload identity federation: a service principal that trusts tokens from a file
    /// (Kubernetes service account token, or any OIDC token the host refreshes into the file).
    WorkloadIdentity(WorkloadIdentityConfig),
    /// The developer's `az login` session (runs `az account get-access-token`). Not for servers.
    AzureCli(AzureCliConfig),
}

/// Parameters of `kind = "managed-identity"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedIdentityConfig {
    /// Client id of a user-assigned identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Object (principal) id of a user-assigned identity.
    #[serde(default)]
    pub object_id: Option<String>,
    /// Azure resource id of a user-assigned identity (IMDS only).
    #[serde(default)]
    pub resource_id: Option<String>,
}

/// Parameters of `kind = "client-secret"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSecretConfig {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// File holding the client secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Name of a systemd credential holding the secret (`$CREDENTIALS_DIRECTORY/<name>`).
    #[serde(default)]
    pub secret_credential: Option<String>,
}

/// Parameters of `kind = "client-certificate"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificateConfig {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// PKCS#12 (`.pfx`) file with the certificate and its RSA private key.
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    /// Name of a systemd credential holding the PKCS#12 file.
    #[serde(default)]
    pub certificate_credential: Option<String>,
    /// File holding the PKCS#12 password, if it has one.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding the PKCS#12 password.
    #[serde(default)]
    pub password_credential: Option<String>,
}

/// Parameters of `kind = "workload-identity"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadIdentityConfig {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id of the identity that trusts the federated token.
    pub client_id: String,
    /// File holding the federated (OIDC) token; re-read as it is rotated.
    pub token_file: PathBuf,
}

/// Parameters of `kind = "azure-cli"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureCliConfig {
    /// Tenant to request the token for (default: the CLI's current tenant).
    #[serde(default)]
    pub tenant_id: Option<String>,
}

/// One parsed `resolve` entry: connections to `host` go to `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolveEntry {
    pub host: String,
    pub addr: SocketAddr,
}

impl VaultConfig {
    /// A config with the given credential and every other setting at its default.
    pub fn new(credential: CredentialConfig) -> Self {
        Self {
            credential,
            authority_host: None,
            keys: Vec::new(),
            resolve: Vec::new(),
            ca_file: None,
            attempt_timeout_ms: default_attempt_timeout_ms(),
            deadline_ms: default_deadline_ms(),
            max_retries: default_max_retries(),
            retry_delay_ms: default_retry_delay_ms(),
            max_retry_delay_ms: default_max_retry_delay_ms(),
        }
    }

    /// Parses the `[vault]` table from TOML text (the table's contents, not the whole file).
    pub fn from_toml(text: &str) -> Result<Self, KeyError> {
        toml::from_str(text).map_err(|e| KeyError::Config(format!("invalid [vault] settings: {e}")))
    }

    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    /// Checks ranges and cross-field rules; called by `KeyVaultProvider::new`.
    pub fn validate(&self) -> Result<(), KeyError> {
        let bad = |m: String| Err(KeyError::Config(m));
        if !(MIN_TIMEOUT_MS..=MAX_ATTEMPT_TIMEOUT_MS).contains(&self.attempt_timeout_ms) {
            return bad(format!(
                "vault.attempt_timeout_ms = {} is out of range {MIN_TIMEOUT_MS}..={MAX_ATTEMPT_TIMEOUT_MS}",
                self.attempt_timeout_ms
            ));
        }
        if self.deadline_ms < self.attempt_timeout_ms || self.deadline_ms > MAX_DEADLINE_MS {
            return bad(format!(
                "vault.deadline_ms = {} must be between attempt_timeout_ms ({}) and {MAX_DEADLINE_MS}",
                self.deadline_ms, self.attempt_timeout_ms
            ));
        }
        if self.max_retries > MAX_RETRIES {
            return bad(format!(
                "vault.max_retries = {} is above the limit of {MAX_RETRIES}",
                self.max_retries
            ));
        }
        if self.retry_delay_ms > self.max_retry_delay_ms {
            return bad(format!(
                "vault.retry_delay_ms ({}) must be <= max_retry_delay_ms ({})",
                self.retry_delay_ms, self.max_retry_delay_ms
            ));
        }
        if let Some(host) = &self.authority_host {
            let url = url::Url::parse(host).map_err(|e| {
                KeyError::Config(format!("vault.authority_host '{host}' is not a URL: {e}"))
            })?;
            if url.scheme() != "https" || url.host_str().is_none() {
                return bad(format!(
                    "vault.authority_host '{host}' must be an https:// URL with a host name"
                ));
            }
        }
        self.resolve_entries()?;
        self.credential.validate()
    }

    pub(crate) fn resolve_entries(&self) -> Result<Vec<ResolveEntry>, KeyError> {
        self.resolve.iter().map(|s| parse_resolve(s)).collect()
    }
}

impl CredentialConfig {
    fn validate(&self) -> Result<(), KeyError> {
        match self {
            CredentialConfig::ManagedIdentity(m) => {
                let ids = [&m.client_id, &m.object_id, &m.resource_id];
                if ids.iter().filter(|i| i.is_some()).count() > 1 {
                    return Err(KeyError::Config(
                        "vault.credential: set at most one of client_id, object_id, resource_id \
                         for a managed identity"
                            .into(),
                    ));
                }
                Ok(())
            }
            CredentialConfig::ClientSecret(c) => {
                non_empty("tenant_id", &c.tenant_id)?;
                non_empty("client_id", &c.client_id)?;
                one_source("secret", &c.secret_file, &c.secret_credential, true)
            }
            CredentialConfig::ClientCertificate(c) => {
                non_empty("tenant_id", &c.tenant_id)?;
                non_empty("client_id", &c.client_id)?;
                one_source(
                    "certificate",
                    &c.certificate_file,
                    &c.certificate_credential,
                    true,
                )?;
                one_source("password", &c.password_file, &c.password_credential, false)
            }
            CredentialConfig::WorkloadIdentity(c) => {
                non_empty("tenant_id", &c.tenant_id)?;
                non_empty("client_id", &c.client_id)
            }
            CredentialConfig::AzureCli(_) => Ok(()),
        }
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), KeyError> {
    if value.trim().is_empty() {
        return Err(KeyError::Config(format!(
            "vault.credential.{field} must not be empty"
        )));
    }
    Ok(())
}

fn one_source(
    what: &str,
    file: &Option<PathBuf>,
    credential: &Option<String>,
    required: bool,
) -> Result<(), KeyError> {
    match (file, credential) {
        (Some(_), Some(_)) => Err(KeyError::Config(format!(
            "vault.credential: set only one of {what}_file and {what}_credential"
        ))),
        (None, None) if required => Err(KeyError::Config(format!(
            "vault.credential: set {what}_file (a path) or {what}_credential (a systemd \
             credential name); secrets are never taken from the config file or the command line"
        ))),
        _ => Ok(()),
    }
}

/// Reads a secret from `file` or from the systemd credential `credential`
/// (`$CREDENTIALS_DIRECTORY/<name>`). Returns `None` when neither is set.
pub(crate) fn read_secret(
    what: &str,
    file: &Option<PathBuf>,
    credential: &Option<String>,
) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
    let path = match (file, credential) {
        (Some(p), _) => p.clone(),
        (None, Some(name)) => credential_path(what, name)?,
        (None, None) => return Ok(None),
    };
    read_secret_file(what, &path).map(Some)
}

fn credential_path(what: &str, name: &str) -> Result<PathBuf, KeyError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(KeyError::Config(format!(
            "vault.credential.{what}_credential '{name}' is not a valid systemd credential name"
        )));
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
        KeyError::Config(format!(
            "vault.credential.{what}_credential = '{name}' but $CREDENTIALS_DIRECTORY is not set: \
             run kvcrypt from a unit with LoadCredential={name}:… or use {what}_file"
        ))
    })?;
    Ok(Path::new(&dir).join(name))
}

fn read_secret_file(what: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        KeyError::Config(format!(
            "cannot read the {what} file {}: {e} (check the path and that it is readable by root)",
            path.display()
        ))
    })?);
    if bytes.is_empty() {
        return Err(KeyError::Config(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Reads a text secret (client secret, password), dropping one trailing newline as editors and
/// `echo` add it.
pub(crate) fn secret_text(what: &str, bytes: Zeroizing<Vec<u8>>) -> Result<String, KeyError> {
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| KeyError::Config(format!("the {what} is not UTF-8 text")))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(KeyError::Config(format!("the {what} is empty")));
    }
    Ok(text.to_owned())
}

/// Parses `HOST:PORT:ADDR[:ADDRPORT]` (curl's `--resolve`, optionally with a target port as in
/// curl's `--connect-to`).
///
/// reqwest overrides by host name only and uses an explicit URL port over the override's port,
/// so `ADDRPORT` can only redirect the implicit https port: `PORT` must then be 443.
pub(crate) fn parse_resolve(entry: &str) -> Result<ResolveEntry, KeyError> {
    let bad = |why: &str| {
        KeyError::Config(format!(
            "vault.resolve entry '{entry}': {why} (expected HOST:PORT:ADDR or HOST:PORT:ADDR:ADDRPORT, \
             e.g. myvault.vault.azure.net:443:127.0.0.1:8443)"
        ))
    };
    let (host, rest) = entry.split_once(':').ok_or_else(|| bad("no port"))?;
    let (port, rest) = rest.split_once(':').ok_or_else(|| bad("no address"))?;
    if host.is_empty() || host.parse::<IpAddr>().is_ok() || host.contains(['/', '[', ']', '@']) {
        return Err(bad("HOST must be a DNS name"));
    }
    let port: u16 = port.parse().map_err(|_| bad("PORT is not a port number"))?;
    let (addr, addr_port) = if let Some(v6) = rest.strip_prefix('[') {
        let (a, tail) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let p = match tail {
            "" => None,
            t => Some(t.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
        };
        (a, p)
    } else {
        match rest.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        }
    };
    let ip: IpAddr = addr.parse().map_err(|_| bad("ADDR is not an IP address"))?;
    let target_port = match addr_port {
        None => port,
        Some(p) => p
            .parse()
            .map_err(|_| bad("ADDRPORT is not a port number"))?,
    };
    if target_port != port && port != 443 {
        return Err(bad(
            "a different ADDRPORT only works for the implicit https port, so PORT must be 443",
        ));
    }
    if port == 0 || target_port == 0 {
        return Err(bad("port 0"));
    }
    Ok(ResolveEntry {
        host: host.to_ascii_lowercase(),
        addr: SocketAddr::new(ip, target_port),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_entries_parse() {
        let e = parse_resolve("MyVault.vault.azure.net:443:127.0.0.1:8443").unwrap();
        assert_eq!(e.host, "myvault.vault.azure.net");
        assert_eq!(e.addr, "127.0.0.1:8443".parse().unwrap());
        let e = parse_resolve("login.microsoftonline.com:443:127.0.0.2").unwrap();
        assert_eq!(e.addr, "127.0.0.2:443".parse().unwrap());
        let e = parse_resolve("h.example:443:[::1]:9000").unwrap();
        assert_eq!(e.addr, "[::1]:9000".parse().unwrap());
        let e = parse_resolve("h.example:8443:[::1]").unwrap();
        assert_eq!(e.addr, "[::1]:8443".parse().unwrap());
        for bad in [
            "",
            "host",
            "host:443",
            "host:x:127.0.0.1",
            "host:443:notanip",
            "127.0.0.1:443:127.0.0.1",
            "host:8443:127.0.0.1:9000",
            "host:443:[::1",
            "host:443:127.0.0.1:0",
        ] {
            assert!(parse_resolve(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn parses_full_table_and_rejects_unknown_fields() {
        let cfg = VaultConfig::from_toml(
            r#"
            resolve = ["myvault.vault.azure.net:443:127.0.0.1:8443"]
            ca_file = "/etc/kvcrypt/ca.pem"
            attempt_timeout_ms = 2000
            deadline_ms = 8000
            [credential]
            kind = "client-secret"
            tenant_id = "t"
            client_id = "c"
            secret_credential = "kvcrypt-sp"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.max_retries, 2);
        assert!(matches!(cfg.credential, CredentialConfig::ClientSecret(_)));

        let unknown_top =
            VaultConfig::from_toml("insecure = true\n[credential]\nkind = \"azure-cli\"\n");
        assert!(unknown_top.is_err());
        let unknown_cred = VaultConfig::from_toml(
            "[credential]\nkind = \"client-secret\"\ntenant_id = \"t\"\nclient_id = \"c\"\nsecret = \"inline\"\n",
        );
        assert!(unknown_cred.is_err(), "inline secrets must be rejected");
    }

    #[test]
    fn validation_rules() {
        let mut cfg = VaultConfig::new(CredentialConfig::ClientSecret(ClientSecretConfig {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret_file: None,
            secret_credential: None,
        }));
        assert!(cfg.validate().is_err(), "a secret source is required");
        if let CredentialConfig::ClientSecret(c) = &mut cfg.credential {
            c.secret_file = Some("/x".into());
        }
        cfg.validate().unwrap();
        cfg.deadline_ms = 10;
        assert!(cfg.validate().is_err());
        cfg.deadline_ms = 20_000;
        cfg.authority_host = Some("http://login.example".into());
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn secrets_from_credentials_directory_only_by_name() {
        assert!(credential_path("secret", "../etc/shadow").is_err());
        assert!(credential_path("secret", "").is_err());
    }

    #[test]
    fn secret_text_strips_one_newline() {
        let s = secret_text("secret", Zeroizing::new(b"abc\r\n".to_vec())).unwrap();
        assert_eq!(s, "abc");
        assert!(secret_text("secret", Zeroizing::new(b"\n".to_vec())).is_err());
    }
}
