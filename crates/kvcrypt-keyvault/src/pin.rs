//! Key pinning: the configuration, not the disk, says which Key Vault keys may unlock a volume.
//!
//! Anyone who can write the disk can rewrite the key ids in its header (the MAC is only
//! checked after an unwrap), so a header must never choose the host the agent talks to.
//! `keys = ["https://VAULT/keys/NAME", …]` (in `[vault]`, or per `[[volume]]`) names the keys
//! allowed; a slot is tried only if its key id names one of them (any version: rotation keeps
//! working), and the request then goes to the host *of the pin*. Nothing here touches the
//! network: every check runs before the first request.

use std::fmt;

use super::{KeyError, KeyId};
use kvcrypt_exit::{Exit, ExitClass};

/// One pinned key: a versionless Key Vault / Managed HSM key id from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPin(KeyId);

impl KeyPin {
    /// Parses a `keys` entry: an https Key Vault / Managed HSM key URL without a version.
    /// Errors are `KeyError::Config` naming the entry and what is wrong with it.
    pub fn parse(entry: &str) -> Result<Self, KeyError> {
        let id = KeyId::parse(entry)
            .map_err(|e| KeyError::Config(format!("keys entry '{entry}': {e}")))?;
        if let Some(v) = &id.version {
            return Err(KeyError::Config(format!(
                "keys entry '{entry}' names key version {v}: pin the versionless key id \
                 ({}) so that every version of the key matches and rotation keeps working",
                id.versionless()
            )));
        }
        Ok(Self(id))
    }

    /// Whether `id` (any version) is this key: host, port and key name compared as Key Vault
    /// does, case-insensitively (the scheme is always https).
    pub fn matches(&self, id: &KeyId) -> bool {
        self.0.host.eq_ignore_ascii_case(&id.host)
            && self.0.port == id.port
            && self.0.name.eq_ignore_ascii_case(&id.name)
    }

    /// The key id to send requests for, for `version` of this key: host, port and name all
    /// from the configuration, only the version from the slot.
    pub fn with_version(&self, version: Option<&str>) -> String {
        KeyId {
            version: version.map(str::to_owned),
            ..self.0.clone()
        }
        .to_string()
    }
}

impl fmt::Display for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.versionless())
    }
}

impl<'de> serde::Deserialize<'de> for KeyPin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyPin::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A header names no pinned key (or nothing is pinned, or `format`/`rewrap` was asked to wrap
/// with an unpinned key). Always raised before any network request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PinError(pub String);

impl ExitClass for PinError {
    fn exit_class(&self) -> Exit {
        Exit::NotPinned
    }
}

/// The keys one volume (or one CLI command) may use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pins {
    pub keys: Vec<KeyPin>,
    /// Where the pins come from, for messages (`[vault] keys`, `[[volume]] "data" keys`).
    pub source: String,
    /// The operator waived the check for this command (`--allow-unpinned-key`): unpinned key
    /// ids are used as the header names them. Never set by the agent.
    pub allow_unpinned: bool,
    /// What to tell the operator to waive the check, if anything can (a CLI flag).
    pub escape_hint: Option<String>,
}

impl Pins {
    pub fn new(keys: Vec<KeyPin>, source: impl Into<String>) -> Self {
        Self {
            keys,
            source: source.into(),
            allow_unpinned: false,
            escape_hint: None,
        }
    }

    /// The pin `key_id` matches, if any (an unparsable id matches nothing).
    pub fn pin_for(&self, key_id: &str) -> Option<&KeyPin> {
        let id = KeyId::parse(key_id).ok()?;
        self.keys.iter().find(|p| p.matches(&id))
    }

    /// The key id to send requests for a slot naming `key_id`: rebuilt from the matching pin,
    /// so the host comes from the configuration. `None`: not pinned, never to be tried (with
    /// `allow_unpinned`, the slot's own id).
    pub fn request_id(&self, key_id: &str) -> Option<String> {
        if let Ok(id) = KeyId::parse(key_id)
            && let Some(p) = self.keys.iter().find(|p| p.matches(&id))
        {
            return Some(p.with_version(id.version.as_deref()));
        }
        self.allow_unpinned.then(|| key_id.to_owned())
    }

    /// For each of a header's slot key ids, the id to use (`None`: skip the slot). Refuses when
    /// no slot may be tried at all. Headers without slots are the caller's business.
    pub fn select(&self, header_ids: &[&str]) -> Result<Vec<Option<String>>, PinError> {
        let chosen: Vec<Option<String>> = header_ids.iter().map(|k| self.request_id(k)).collect();
        if header_ids.is_empty() || chosen.iter().any(Option::is_some) {
            return Ok(chosen);
        }
        Err(self.refusal(&format!(
            "the volume header names {} — no key this configuration pins",
            list(header_ids.iter().copied())
        )))
    }

    /// Checks a key `format` / `rewrap` is about to wrap with; returns the id to use (from the
    /// pin). Refuses an unpinned key unless the check was waived.
    pub fn check_target(&self, key_id: &str) -> Result<String, PinError> {
        match self.request_id(key_id) {
            Some(id) => Ok(id),
            None => Err(self.refusal(&format!("{key_id} is not a key this configuration pins"))),
        }
    }

    fn refusal(&self, what: &str) -> PinError {
        let pinned = if self.keys.is_empty() {
            format!(
                "no key is pinned ({} is empty or missing): add keys = [\"https://<vault>/keys/<name>\"] \
                 naming the versionless key(s) allowed to unlock this volume",
                self.source
            )
        } else {
            format!(
                "pinned by {}: {}; add the versionless key id to keys = [...] if it is meant \
                 to unlock this volume",
                self.source,
                list(self.keys.iter().map(|k| k.to_string()))
            )
        };
        let hint = match &self.escape_hint {
            Some(h) => format!(" (or pass {h} to trust the key ids on the disk this once)"),
            None => String::new(),
        };
        PinError(format!(
            "{what}; refused before any request to a vault the disk names. {pinned}{hint}"
        ))
    }
}

fn list<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    items
        .map(|s| s.as_ref().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(keys: &[&str]) -> Pins {
        Pins::new(
            keys.iter().map(|k| KeyPin::parse(k).unwrap()).collect(),
            "[vault] keys",
        )
    }

    #[test]
    fn pins_parse_and_bad_entries_are_named() {
        let p = KeyPin::parse("https://MyVault.vault.azure.net/keys/Disk-Kek").unwrap();
        assert_eq!(
            p.to_string(),
            "https://myvault.vault.azure.net/keys/Disk-Kek"
        );
        KeyPin::parse("https://hsm1.managedhsm.azure.net/keys/k/").unwrap();
        for (bad, why) in [
            ("http://v.vault.azure.net/keys/k", "https"),
            ("https://v.vault.azure.net/keys/k/0123abcd", "version"),
            ("https://v.vault.azure.net/secrets/k", "/keys/"),
            ("https://10.0.0.1/keys/k", "IP address"),
            ("v.vault.azure.net/keys/k", "invalid key id"),
        ] {
            let e = KeyPin::parse(bad).unwrap_err();
            assert!(matches!(e, KeyError::Config(_)), "{bad}: {e}");
            let m = e.to_string();
            assert!(m.contains(bad) && m.contains(why), "{bad}: {m}");
        }
    }

    #[test]
    fn any_version_matches_case_insensitively_and_the_host_comes_from_the_pin() {
        let p = pins(&["https://myvault.vault.azure.net/keys/Disk-Kek"]);
        let got = p
            .request_id("https://MYVAULT.vault.azure.net/keys/disk-kek/0123abcd")
            .unwrap();
        assert_eq!(
            got,
            "https://myvault.vault.azure.net/keys/Disk-Kek/0123abcd"
        );
        assert!(
            p.request_id("https://myvault.vault.azure.net/keys/disk-kek/ffff")
                .is_some()
        );
        // Another vault, another key, another port, garbage: not pinned.
        for other in [
            "https://evil.vault.azure.net/keys/disk-kek/0123abcd",
            "https://myvault.vault.azure.net/keys/other/0123abcd",
            "https://myvault.vault.azure.net:8443/keys/disk-kek/0123abcd",
            "https://myvault.vault.azure.net.evil.example/keys/disk-kek/1",
            "not a url",
        ] {
            assert_eq!(p.request_id(other), None, "{other}");
        }
        // An explicit default port is the same endpoint.
        assert!(
            pins(&["https://myvault.vault.azure.net:443/keys/disk-kek"])
                .request_id("https://myvault.vault.azure.net/keys/disk-kek/1")
                .is_some()
        );
    }

    #[test]
    fn select_skips_unpinned_slots_and_refuses_when_none_is_left() {
        let p = pins(&["https://a.vault.azure.net/keys/vol"]);
        let ids = [
            "https://evil.vault.azure.net/keys/vol/1",
            "https://a.vault.azure.net/keys/vol/2",
        ];
        assert_eq!(
            p.select(&ids).unwrap(),
            vec![
                None,
                Some("https://a.vault.azure.net/keys/vol/2".to_owned())
            ]
        );
        let e = p.select(&ids[..1]).unwrap_err();
        assert!(
            e.0.contains("https://evil.vault.azure.net/keys/vol/1"),
            "{e}"
        );
        assert!(e.0.contains("https://a.vault.azure.net/keys/vol"), "{e}");
        assert_eq!(e.exit_class(), Exit::NotPinned);
        // Nothing pinned at all: refused, telling the operator to add keys = [...].
        let none = Pins::new(vec![], "[[volume]] \"data\" keys (and [vault] keys)");
        let e = none.select(&ids).unwrap_err();
        assert!(
            e.0.contains("no key is pinned") && e.0.contains("keys = ["),
            "{e}"
        );
        // Waived: every slot is tried, pinned ones rebuilt from the pin.
        let mut waived = p.clone();
        waived.allow_unpinned = true;
        waived.escape_hint = Some("--allow-unpinned-key".into());
        assert!(waived.select(&ids).unwrap().iter().all(Option::is_some));
        let mut hinted = p.clone();
        hinted.escape_hint = Some("--allow-unpinned-key".into());
        assert!(
            hinted
                .select(&ids[..1])
                .unwrap_err()
                .0
                .contains("--allow-unpinned-key")
        );
    }

    #[test]
    fn format_targets_must_be_pinned() {
        let p = pins(&["https://a.vault.azure.net/keys/vol"]);
        assert_eq!(
            p.check_target("https://a.vault.azure.net/keys/VOL")
                .unwrap(),
            "https://a.vault.azure.net/keys/vol"
        );
        assert!(
            p.check_target("https://b.vault.azure.net/keys/vol")
                .is_err()
        );
    }
}
