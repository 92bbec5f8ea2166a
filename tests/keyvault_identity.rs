//! Credential kinds of the Key Vault provider against the emulator's identity endpoints:
//! managed identity (App Service style, from the environment), client secret from a systemd
//! credentials directory, client certificate (PKCS#12), workload identity (federated token
//! file) — each with a successful round trip and the denial when the principal goes away.
//!
//! The environment-driven cases (`IDENTITY_ENDPOINT`, `CREDENTIALS_DIRECTORY`) run in a child
//! process of this test binary, so no test mutates its own process environment.

use base64::Engine as _;
use kvcrypt_keyvault::{
    ClientCertificateConfig, ClientSecretConfig, CredentialConfig, ErrorClass, KeyVaultProvider,
    ManagedIdentityConfig, VaultConfig, WorkloadIdentityConfig,
};
use kvcrypt_kv_emulator::{NewPrincipal, Op, PrincipalKind};
use kvcrypt_testkit::emulator::{Kv, VAULT, key_id};
use kvcrypt_testkit::keys::random_vmk;
use std::process::Command;

const CRYPTO_USER: &[Op] = &[Op::Get, Op::Wrap, Op::Unwrap];

/// Wrap + unwrap with `cfg`; returns the error of the first failing step.
async fn round_trip(cfg: &VaultConfig) -> Result<(), kvcrypt_keyvault::KeyError> {
    let provider = KeyVaultProvider::new(cfg)?;
    let vmk = random_vmk();
    let slot = provider.wrap(&key_id(VAULT, "k"), None, &vmk).await?;
    let back = provider
        .unwrap(&slot.key_id, &slot.algorithm, &slot.wrapped)
        .await?;
    assert_eq!(back.expose(), vmk.expose());
    Ok(())
}

fn with_credential(kv: &Kv, credential: CredentialConfig) -> VaultConfig {
    let mut cfg = VaultConfig::new(credential);
    cfg.resolve = kv.resolve();
    cfg.ca_file = Some(kv.emu.ca_pem_path().to_owned());
    cfg.attempt_timeout_ms = 1_000;
    cfg.deadline_ms = 3_000;
    cfg
}

// ---------------------------------------------------------------------------------------------
// Child-process cases. The parent passes everything through environment variables.

const CHILD: &str = "KVCRYPT_KV_CHILD";

fn child_config() -> VaultConfig {
    let cfg = std::env::var("KVCRYPT_KV_CONFIG").expect("config");
    VaultConfig::from_toml(&cfg).expect("config parses")
}

#[tokio::test]
#[ignore = "helper: run by the parent tests below in a child process with a prepared environment"]
async fn child_round_trip() {
    let cfg = child_config();
    let result = round_trip(&cfg).await;
    match std::env::var("KVCRYPT_KV_EXPECT").as_deref() {
        Ok("ok") => result.expect("round trip"),
        Ok("denied") => {
            let err = result.expect_err("must be denied");
            assert_eq!(err.class(), ErrorClass::Denied, "{err}");
            assert!(err.failure().is_some_and(|f| f.from_identity), "{err}");
        }
        other => panic!("bad KVCRYPT_KV_EXPECT {other:?}"),
    }
}

/// Runs `child_round_trip` with `cfg` and extra environment; asserts it passed.
fn run_child(cfg_toml: &str, expect: &str, env: &[(&str, String)]) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "child_round_trip",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, "1")
    .env("KVCRYPT_KV_CONFIG", cfg_toml)
    .env("KVCRYPT_KV_EXPECT", expect)
    .env_remove("IDENTITY_ENDPOINT")
    .env_remove("IDENTITY_HEADER")
    .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "child did not run:\n{text}");
}

fn common_toml(kv: &Kv) -> String {
    let resolve: Vec<String> = kv.resolve().iter().map(|r| format!("{r:?}")).collect();
    format!(
        "resolve = [{}]\nca_file = {:?}\nattempt_timeout_ms = 1000\ndeadline_ms = 3000\n",
        resolve.join(", "),
        kv.emu.ca_pem_path().display().to_string()
    )
}

#[test]
fn managed_identity_app_service_style() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let mi = kv.emu.create_msi_principal("vm-identity", true).unwrap();
    kv.emu.grant(&mi.client_id, CRYPTO_USER, None).unwrap();
    let env = [
        ("IDENTITY_ENDPOINT", kv.emu.msi_endpoint()),
        ("IDENTITY_HEADER", kv.emu.identity_header().to_owned()),
    ];
    // System-assigned, then the same identity selected by client id.
    let system = format!(
        "{}[credential]\nkind = \"managed-identity\"\n",
        common_toml(&kv)
    );
    run_child(&system, "ok", &env);
    let user = format!(
        "{}[credential]\nkind = \"managed-identity\"\nclient_id = \"{}\"\n",
        common_toml(&kv),
        mi.client_id
    );
    run_child(&user, "ok", &env);
    // The identity is removed from the machine: denied.
    kv.emu.delete_principal(&mi.client_id).unwrap();
    run_child(&system, "denied", &env);
}

#[test]
fn client_secret_from_systemd_credentials_directory() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let p = kv.principal("host1", CRYPTO_USER);
    let creds = kv.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("kvcrypt-sp"), p.secret.clone().unwrap()).unwrap();
    let toml = format!(
        "{}[credential]\nkind = \"client-secret\"\ntenant_id = \"{}\"\nclient_id = \"{}\"\nsecret_credential = \"kvcrypt-sp\"\n",
        common_toml(&kv),
        kv.emu.tenant_id(),
        p.client_id
    );
    run_child(
        &toml,
        "ok",
        &[("CREDENTIALS_DIRECTORY", creds.display().to_string())],
    );
}

#[test]
fn missing_credentials_directory_is_a_config_error() {
    let cfg = VaultConfig::new(CredentialConfig::ClientSecret(ClientSecretConfig {
        tenant_id: "t".into(),
        client_id: "c".into(),
        secret_file: None,
        secret_credential: Some("kvcrypt-definitely-missing".into()),
    }));
    // Either $CREDENTIALS_DIRECTORY is unset, or it has no such credential.
    let err = KeyVaultProvider::new(&cfg).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured, "{err}");
    assert!(
        err.to_string().contains("kvcrypt-definitely-missing"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn workload_identity_federated_token_file() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    let issuer = "https://oidc.example.test/cluster1";
    let subject = "system:serviceaccount:kube-system:kvcrypt";
    let p = kv
        .emu
        .create_principal(NewPrincipal {
            kind: PrincipalKind::Federated,
            name: Some("wi".into()),
            issuer: Some(issuer.into()),
            subject: Some(subject.into()),
            ..Default::default()
        })
        .unwrap();
    kv.emu.grant(&p.client_id, CRYPTO_USER, None).unwrap();
    // A service-account token as the kubelet writes it (the emulator does not verify the
    // issuer's signature, see docs/EMULATOR.md).
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "iss": issuer, "sub": subject, "aud": "api://AzureADTokenExchange", "exp": exp
    });
    let jwt = format!(
        "{}.{}.{}",
        b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64.encode(claims.to_string()),
        b64.encode([1u8; 32])
    );
    let token_file = kv.dir.path().join("sa-token");
    std::fs::write(&token_file, jwt).unwrap();
    let cfg = with_credential(
        &kv,
        CredentialConfig::WorkloadIdentity(WorkloadIdentityConfig {
            tenant_id: kv.emu.tenant_id().into(),
            client_id: p.client_id.clone(),
            token_file: token_file.clone(),
        }),
    );
    round_trip(&cfg)
        .await
        .expect("workload identity round trip");

    kv.emu.delete_principal(&p.client_id).unwrap();
    let err = round_trip(&cfg).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");

    let mut missing = cfg.clone();
    if let CredentialConfig::WorkloadIdentity(w) = &mut missing.credential {
        w.token_file = kv.dir.path().join("no-such-token");
    }
    let err = KeyVaultProvider::new(&missing).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured, "{err}");
}

#[tokio::test]
async fn client_certificate_pkcs12_with_password() {
    let kv = Kv::start();
    kv.emu.create_key("k", "RSA", Some(2048)).unwrap();
    // The operator's certificate, made the way the docs tell them to (openssl CLI).
    let dir = kv.dir.path();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output();
        let out = out.expect("the openssl command is needed to make a test certificate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A fresh RSA key and a self-signed certificate for it, as the docs show.
    let self_signed = |key: &str, cert: &str, subject: &str| {
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-subj",
            subject, "-days", "2",
        ])
    };
    self_signed("key.pem", "cert.pem", "/CN=kvcrypt-test");
    run(&[
        "pkcs12",
        "-export",
        "-in",
        "cert.pem",
        "-inkey",
        "key.pem",
        "-out",
        "sp.pfx",
        "-passout",
        "pass:s3cret",
    ]);
    std::fs::write(dir.join("pfx.pass"), "s3cret\n").unwrap();
    let p = kv
        .emu
        .create_principal(NewPrincipal {
            kind: PrincipalKind::Certificate,
            name: Some("cert-sp".into()),
            certificate_pem: Some(std::fs::read_to_string(dir.join("cert.pem")).unwrap()),
            ..Default::default()
        })
        .unwrap();
    kv.emu.grant(&p.client_id, CRYPTO_USER, None).unwrap();
    let cfg = with_credential(
        &kv,
        CredentialConfig::ClientCertificate(ClientCertificateConfig {
            tenant_id: kv.emu.tenant_id().into(),
            client_id: p.client_id.clone(),
            certificate_file: Some(dir.join("sp.pfx")),
            certificate_credential: None,
            password_file: Some(dir.join("pfx.pass")),
            password_credential: None,
        }),
    );
    round_trip(&cfg).await.expect("certificate round trip");

    // A certificate the app registration does not know: Entra ID refuses the assertion.
    self_signed("other.pem", "other-cert.pem", "/CN=other");
    run(&[
        "pkcs12",
        "-export",
        "-in",
        "other-cert.pem",
        "-inkey",
        "other.pem",
        "-out",
        "other.pfx",
        "-passout",
        "pass:s3cret",
    ]);
    let mut other = cfg.clone();
    if let CredentialConfig::ClientCertificate(c) = &mut other.credential {
        c.certificate_file = Some(dir.join("other.pfx"));
    }
    let err = round_trip(&other).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Denied, "{err}");
    assert_eq!(err.code(), Some("invalid_client"), "{err}");

    // A wrong password is a local configuration error, found before any request.
    std::fs::write(dir.join("pfx.pass"), "wrong\n").unwrap();
    let err = KeyVaultProvider::new(&cfg).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured, "{err}");
}

#[test]
fn managed_identity_config_allows_one_id() {
    let cfg = VaultConfig::new(CredentialConfig::ManagedIdentity(ManagedIdentityConfig {
        client_id: Some("a".into()),
        object_id: Some("b".into()),
        resource_id: None,
    }));
    assert_eq!(
        KeyVaultProvider::new(&cfg).unwrap_err().class(),
        ErrorClass::Misconfigured
    );
}
