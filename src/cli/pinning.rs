//! The pins of CLI commands (`open`, `format`, `rewrap`, `header dump --dump-master-key`):
//! `[vault] keys` of the configuration file, waivable for one command with
//! `--allow-unpinned-key` (see `keys::Pins`).

use std::path::Path;

use kvcrypt_keyvault::{Pins, VaultConfig};

/// The flag that waives the check, as messages name it.
pub const ALLOW_FLAG: &str = "--allow-unpinned-key";

/// Pins from `[vault] keys` of `config`; `allow_unpinned` from `--allow-unpinned-key`.
pub fn cli_pins(cfg: &VaultConfig, config: &Path, allow_unpinned: bool) -> Pins {
    let mut pins = Pins::new(
        cfg.keys.clone(),
        format!("keys of [vault] in {}", config.display()),
    );
    pins.allow_unpinned = allow_unpinned;
    pins.escape_hint = Some(ALLOW_FLAG.to_owned());
    pins
}
