//! Key Vault / Managed HSM key identifiers: `https://<vault host>/keys/<name>[/<version>]`.

use super::KeyError;
use std::fmt;

/// A parsed key id. `version` is `None` for a versionless id (meaning "the latest version").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId {
    /// Vault host name, lower case (`myvault.vault.azure.net`, `myhsm.managedhsm.azure.net`).
    pub host: String,
    /// Explicit port, if the id names one (real ids never do).
    pub port: Option<u16>,
    pub name: String,
    pub version: Option<String>,
}

impl KeyId {
    /// Parses and validates a key id; errors are `KeyError::Config` with the reason.
    pub fn parse(id: &str) -> Result<Self, KeyError> {
        let bad = |why: &str| {
            KeyError::Config(format!(
                "invalid key id '{id}': {why} (expected https://<vault>.vault.azure.net/keys/<name>[/<version>] \
                 or https://<hsm>.managedhsm.azure.net/keys/<name>[/<version>])"
            ))
        };
        let url = url::Url::parse(id).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "https" {
            return Err(bad("Key Vault is only reachable over https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials in the URL are not allowed"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("query strings and fragments are not allowed"));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(_) => {
                return Err(bad(
                    "the host must be the vault's DNS name, not an IP address (use vault.resolve \
                     to point a name at an address)",
                ));
            }
            None => return Err(bad("no host")),
        };
        // Key Vault's challenge check needs the vault to sit under a resource domain
        // (`<vault>.vault.azure.net`): a single-label host can never pass it.
        if !host.contains('.') {
            return Err(bad("the host must be a fully qualified vault name"));
        }
        let path = url.path();
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut parts = path.split('/');
        if parts.next() != Some("") || parts.next() != Some("keys") {
            return Err(bad("the path must start with /keys/"));
        }
        let name = parts.next().unwrap_or_default();
        if !valid_name(name) {
            return Err(bad(
                "the key name must be 1-127 characters of letters, digits and '-'",
            ));
        }
        let version = match parts.next() {
            None => None,
            Some(v) if valid_version(v) => Some(v.to_owned()),
            Some(_) => return Err(bad("the key version must be letters and digits")),
        };
        if parts.next().is_some() {
            return Err(bad("unexpected path after the version"));
        }
        Ok(Self {
            host,
            port: url.port(),
            name: name.to_owned(),
            version,
        })
    }

    /// The vault endpoint for `KeyClient::new`: `https://host[:port]/`.
    pub fn vault_url(&self) -> String {
        match self.port {
            Some(p) => format!("https://{}:{p}/", self.host),
            None => format!("https://{}/", self.host),
        }
    }

    /// `host[:port]`, for error messages and the client cache.
    pub fn vault(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// Whether the key lives in a Managed HSM (which names the AES wrap algorithm
    /// `CKM_AES_KEY_WRAP` for `oct-HSM` keys).
    pub fn is_managed_hsm(&self) -> bool {
        self.host.contains(".managedhsm.")
    }

    /// The same key without a version.
    pub fn versionless(&self) -> String {
        format!("{}keys/{}", self.vault_url(), self.name)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}keys/{}/{v}", self.vault_url(), self.name),
            None => write!(f, "{}keys/{}", self.vault_url(), self.name),
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn valid_version(v: &str) -> bool {
    (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versioned_and_versionless() {
        let k = KeyId::parse(
            "https://MyVault.vault.azure.net/keys/k1/0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        assert_eq!(k.host, "myvault.vault.azure.net");
        assert_eq!(k.name, "k1");
        assert_eq!(
            k.version.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(k.vault_url(), "https://myvault.vault.azure.net/");
        assert!(!k.is_managed_hsm());
        assert_eq!(
            k.to_string(),
            "https://myvault.vault.azure.net/keys/k1/0123456789abcdef0123456789abcdef"
        );

        let k = KeyId::parse("https://hsm1.managedhsm.azure.net/keys/disk-kek/").unwrap();
        assert_eq!(k.version, None);
        assert!(k.is_managed_hsm());
        assert_eq!(
            k.versionless(),
            "https://hsm1.managedhsm.azure.net/keys/disk-kek"
        );

        let k = KeyId::parse("https://v.vault.azure.net:8443/keys/a").unwrap();
        assert_eq!(k.vault(), "v.vault.azure.net:8443");
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            "myvault/keys/k1",
            "http://v.vault.azure.net/keys/k1",
            "https://127.0.0.1/keys/k1",
            "https://localhost/keys/k1",
            "https://v.vault.azure.net/secrets/k1",
            "https://v.vault.azure.net/keys/",
            "https://v.vault.azure.net/keys/k_1",
            "https://v.vault.azure.net/keys/k1/v1/wrapkey",
            "https://v.vault.azure.net/keys/k1/v-1",
            "https://v.vault.azure.net/keys/k1?api-version=1",
            "https://user:pw@v.vault.azure.net/keys/k1",
        ] {
            let err = KeyId::parse(bad).expect_err(bad);
            assert!(matches!(err, KeyError::Config(_)), "{bad}: {err}");
        }
    }
}
