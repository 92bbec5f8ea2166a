//! AES-256-XTS sector engine and key derivation. (Owned by the format/XTS work.)
