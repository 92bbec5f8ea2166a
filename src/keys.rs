//! Key providers (Azure Key Vault / Managed HSM). (Owned by the Key Vault work.)

use crate::exit::{Exit, ExitClass};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("access denied: {0}")]
    Denied(String),
}

impl ExitClass for KeyError {
    fn exit_class(&self) -> Exit {
        match self {
            KeyError::Denied(_) => Exit::AccessDenied,
        }
    }
}
