//! The kvcrypt lab: an emulated Key Vault, a scratch volume and a real agent run end to end
//! ([`lab`]), and the demo built on it ([`demo`], binary `kvcrypt-demo`). Used by the demo and
//! by the tests; never linked into the production `kvcrypt` binary.

pub mod demo;
pub mod lab;
