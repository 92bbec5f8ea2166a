//! The emulator's own CA and server certificate (rcgen), and the rustls server config.
//! The CA persists in the state directory so clients keep trusting a restarted emulator;
//! the server certificate is re-issued on every start (its SANs follow `--host`).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::Path;
use std::sync::Arc;

/// Host names every server certificate covers, so a client that maps a real vault host to
/// 127.0.0.1 (reqwest `resolve`, `/etc/hosts`) verifies TLS unmodified.
pub const DEFAULT_SANS: [&str; 5] = [
    "localhost",
    "127.0.0.1",
    "*.vault.azure.net",
    "*.managedhsm.azure.net",
    "login.microsoftonline.com",
];

pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
    /// The PEM clients trust (for a persisted CA: the file as first written).
    pub pem: String,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kvcrypt Key Vault emulator CA");
    dn.push(DnType::OrganizationName, "kvcrypt test infrastructure");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 12, 31);
    p
}

/// Loads the CA from `dir` (ca.pem + ca-key.pem) or creates one (and saves it there).
///
/// A reloaded CA is re-derived from the same fixed subject and the saved key: the issuer
/// name and key identifier of new server certificates then match the saved ca.pem, so it
/// keeps validating them (rcgen cannot parse the old certificate without extra features).
pub fn load_or_create_ca(dir: Option<&Path>) -> Result<Ca, String> {
    if let Some(dir) = dir {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if cert_path.exists() && key_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path)
                .map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| format!("{} is not a valid key: {e}", key_path.display()))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| format!("cannot rebuild the emulator CA: {e}"))?;
            let pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| format!("cannot read {}: {e}", cert_path.display()))?;
            return Ok(Ca { key, cert, pem });
        }
    }
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the CA key: {e}"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|e| format!("cannot create the emulator CA: {e}"))?;
    let pem = cert.pem();
    if let Some(dir) = dir {
        write_private(&dir.join("ca-key.pem"), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join("ca.pem"), &pem)
            .map_err(|e| format!("cannot write {}: {e}", dir.join("ca.pem").display()))?;
    }
    Ok(Ca { key, cert, pem })
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Issues a fresh server certificate for the default names plus `extra_hosts` and builds
/// the rustls config (HTTP/1.1 only, like the SDK's default transport negotiates).
pub fn server_config(ca: &Ca, extra_hosts: &[String]) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut names: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    for h in extra_hosts {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(h)) {
            names.push(h.clone());
        }
    }
    let mut params = CertificateParams::new(names)
        .map_err(|e| format!("invalid host name for the server certificate: {e}"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kvcrypt-kv-emulator");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the server key: {e}"))?;
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(|e| format!("cannot sign the server certificate: {e}"))?;
    let chain = vec![cert.der().clone()];
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
