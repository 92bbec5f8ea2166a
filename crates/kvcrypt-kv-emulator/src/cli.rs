//! `kvcrypt-kv-emulator`: run the emulator (`serve`, the default) or drive a running one
//! through its admin API (`admin …`).

use super::{AuthMode, Emulator, EmulatorConfig};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kvcrypt-kv-emulator",
    about = "Local Azure Key Vault / Managed HSM emulator (real REST protocol over TLS)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the emulator (default when no subcommand is given).
    Serve(ServeArgs),
    /// Call the admin API of a running emulator.
    Admin(AdminArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// TCP port (0 = pick a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Extra host name for the server certificate (repeatable).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Persist state (keys, principals, CA, admin token) in this directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Write the CA certificate (PEM) here.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Write the ready line (JSON) to this file too.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Static admin token (default: generated, saved as STATE_DIR/admin-token).
    #[arg(long, env = "KVEMU_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Tenant id of the emulated directory.
    #[arg(long)]
    tenant_id: Option<String>,
    /// App Service IDENTITY_HEADER value expected by /msi/token.
    #[arg(long)]
    identity_header: Option<String>,
    /// Access token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime: u64,
    /// Authorization mode: rbac or access-policy.
    #[arg(long, default_value = "rbac", value_parser = parse_mode)]
    mode: AuthMode,
}

fn parse_mode(s: &str) -> Result<AuthMode, String> {
    match s {
        "rbac" => Ok(AuthMode::Rbac),
        "access-policy" | "accesspolicy" => Ok(AuthMode::AccessPolicy),
        _ => Err("use rbac or access-policy".into()),
    }
}

#[derive(Args)]
struct AdminArgs {
    /// Admin URL (`admin` of the ready line), e.g. https://127.0.0.1:8443/_admin.
    #[arg(long, env = "KVEMU_ADMIN_URL")]
    url: String,
    /// Admin token (or KVEMU_ADMIN_TOKEN, or --state-dir to read it).
    #[arg(long, env = "KVEMU_ADMIN_TOKEN")]
    token: Option<String>,
    /// CA certificate to trust (default: STATE_DIR/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The emulator's state directory (for the admin token and CA).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Show principals, keys, switches and faults.
    State,
    /// Create a principal; prints its client id (and secret).
    CreatePrincipal {
        /// secret | certificate | federated | msi
        #[arg(long, default_value = "secret")]
        kind: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        client_id: Option<String>,
        /// File holding the client secret (default: generated).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// PEM certificate (or RSA public key) file, for certificate principals.
        #[arg(long)]
        certificate: Option<PathBuf>,
        #[arg(long)]
        issuer: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        system_assigned: bool,
        #[arg(long)]
        resource_id: Option<String>,
    },
    /// Delete a principal (and its permissions).
    DeletePrincipal {
        #[arg(long)]
        principal: String,
    },
    /// Grant operations (comma-separated: unwrap,wrap,get,… or all), on a key or vault-wide.
    Grant {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        op: String,
        #[arg(long)]
        key: Option<String>,
    },
    /// Revoke operations on a key, or everywhere without --key.
    Revoke {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        op: String,
        #[arg(long)]
        key: Option<String>,
    },
    /// Create a key (new version if it exists).
    CreateKey {
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "RSA")]
        kty: String,
        #[arg(long)]
        size: Option<usize>,
    },
    /// Enable a key (all versions, or --version).
    EnableKey {
        #[arg(long)]
        key: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Disable a key (all versions, or --version).
    DisableKey {
        #[arg(long)]
        key: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Turn the vault firewall on (deny all callers) or off.
    Firewall {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Show the emulated clock, or move it forward (`--advance SECONDS`), running the
    /// rotations that become due.
    Clock {
        #[arg(long)]
        advance: Option<u64>,
    },
    /// Authorization mode: rbac or access-policy.
    Mode {
        #[arg(value_parser = ["rbac", "access-policy"])]
        mode: String,
    },
    /// Inject a fault: latency, status, throttle, reset, hang, or an answer that is not the
    /// service's: html, empty, foreign_json (for --status), unauthorized_no_challenge.
    Fault {
        #[arg(value_parser = [
            "latency", "status", "throttle", "reset", "hang", "html", "empty", "foreign_json",
            "unauthorized_no_challenge",
        ])]
        kind: String,
        /// Latency in milliseconds (latency).
        #[arg(long)]
        ms: Option<u64>,
        /// HTTP status (status: default 503; html, empty, foreign_json: default 403).
        #[arg(long)]
        status: Option<u16>,
        /// Only requests for this key (default: every request of the target).
        #[arg(long)]
        key: Option<String>,
        /// Retry-After seconds (throttle; omit for a 429 without the header).
        #[arg(long)]
        retry_after: Option<u64>,
        /// Number of requests to affect (default: until cleared).
        #[arg(long)]
        count: Option<u64>,
        /// vault | token | all
        #[arg(long, default_value = "vault")]
        target: String,
    },
    /// Remove all injected faults.
    ClearFaults,
    /// Show request counters and log (--clear to reset them).
    Requests {
        #[arg(long)]
        clear: bool,
    },
}

pub fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Admin(a)) => match admin_main(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kvcrypt-kv-emulator admin: {e}");
                ExitCode::from(1)
            }
        },
        Some(Cmd::Serve(s)) => serve_main(s),
        None => serve_main(cli.serve),
    }
}

fn serve_main(a: ServeArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cfg = EmulatorConfig {
        port: a.port,
        bind: a.bind,
        hosts: a.hosts,
        state_dir: a.state_dir,
        ca_out: a.ca_out,
        admin_token: a.admin_token,
        tenant_id: a.tenant_id,
        identity_header: a.identity_header,
        token_lifetime: std::time::Duration::from_secs(a.token_lifetime),
        mode: a.mode,
    };
    let handle = match Emulator::start(cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("kvcrypt-kv-emulator: {e}");
            return ExitCode::from(kvcrypt_exit::Exit::Config.code());
        }
    };
    let line = handle.ready_json().to_string();
    if let Some(p) = &a.ready_file {
        // Write then rename so a watcher never reads a half-written line.
        let tmp = p.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, format!("{line}\n")).and_then(|_| std::fs::rename(&tmp, p))
        {
            eprintln!(
                "kvcrypt-kv-emulator: cannot write ready file {}: {e}",
                p.display()
            );
            return ExitCode::from(1);
        }
    }
    println!("{line}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvcrypt-kv-emulator: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    });
    handle.shutdown();
    ExitCode::SUCCESS
}

fn admin_main(a: AdminArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let token = match (&a.token, &a.state_dir) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) => std::fs::read_to_string(d.join("admin-token"))
            .with_context(|| format!("cannot read {}", d.join("admin-token").display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("give --token, KVEMU_ADMIN_TOKEN or --state-dir"),
    };
    let ca_path =
        a.ca.clone()
            .or_else(|| a.state_dir.as_ref().map(|d| d.join("ca.pem")))
            .context("give --ca (the emulator's CA certificate) or --state-dir")?;
    let ca_pem =
        std::fs::read(&ca_path).with_context(|| format!("cannot read {}", ca_path.display()))?;
    let ca = reqwest::Certificate::from_pem(&ca_pem).context("invalid CA certificate")?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(std::time::Duration::from_secs(120))
        .build()?;
    let base = a.url.trim_end_matches('/').to_string();
    let (method, path, body): (reqwest::Method, String, Option<serde_json::Value>) = match a.cmd {
        AdminCmd::State => (reqwest::Method::GET, "state".into(), None),
        AdminCmd::CreatePrincipal {
            kind,
            name,
            client_id,
            secret_file,
            certificate,
            issuer,
            subject,
            system_assigned,
            resource_id,
        } => {
            let secret = match secret_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let certificate_pem = match certificate {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?,
                ),
                None => None,
            };
            let body = serde_json::json!({
                "kind": kind, "name": name, "client_id": client_id, "secret": secret,
                "certificate_pem": certificate_pem, "issuer": issuer, "subject": subject,
                "system_assigned": system_assigned, "resource_id": resource_id,
            });
            (reqwest::Method::POST, "principals".into(), Some(body))
        }
        AdminCmd::DeletePrincipal { principal } => (
            reqwest::Method::DELETE,
            format!("principals/{principal}"),
            None,
        ),
        AdminCmd::Grant { principal, op, key } => (
            reqwest::Method::POST,
            "grant".into(),
            Some(serde_json::json!({"principal": principal, "ops": op, "key": key})),
        ),
        AdminCmd::Revoke { principal, op, key } => (
            reqwest::Method::POST,
            "revoke".into(),
            Some(serde_json::json!({"principal": principal, "ops": op, "key": key})),
        ),
        AdminCmd::CreateKey { key, kty, size } => (
            reqwest::Method::POST,
            format!("keys/{key}"),
            Some(serde_json::json!({"kty": kty, "key_size": size})),
        ),
        AdminCmd::EnableKey { key, version } => key_enabled_request(key, version, true),
        AdminCmd::DisableKey { key, version } => key_enabled_request(key, version, false),
        AdminCmd::Firewall { state } => (
            reqwest::Method::POST,
            "firewall".into(),
            Some(serde_json::json!({"enabled": state == "on"})),
        ),
        AdminCmd::Mode { mode } => (
            reqwest::Method::POST,
            "mode".into(),
            Some(serde_json::json!({"mode": mode})),
        ),
        AdminCmd::Fault {
            kind,
            ms,
            status,
            retry_after,
            count,
            target,
            key,
        } => {
            let mut f = serde_json::json!({"kind": kind, "count": count, "target": target});
            if let Some(k) = key {
                f["key"] = k.into();
            }
            match kind.as_str() {
                "latency" => f["ms"] = ms.context("latency needs --ms")?.into(),
                "status" => f["status"] = status.unwrap_or(503).into(),
                "html" | "empty" | "foreign_json" => f["status"] = status.unwrap_or(403).into(),
                "throttle" => f["retry_after"] = serde_json::json!(retry_after),
                _ => {}
            }
            (reqwest::Method::POST, "faults".into(), Some(f))
        }
        AdminCmd::ClearFaults => (reqwest::Method::DELETE, "faults".into(), None),
        AdminCmd::Clock { advance: None } => (reqwest::Method::GET, "clock".into(), None),
        AdminCmd::Clock {
            advance: Some(secs),
        } => (
            reqwest::Method::POST,
            "clock".into(),
            Some(serde_json::json!({ "advance_seconds": secs })),
        ),
        AdminCmd::Requests { clear } => {
            if clear {
                (reqwest::Method::DELETE, "requests".into(), None)
            } else {
                (reqwest::Method::GET, "requests".into(), None)
            }
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut req = client
            .request(method, format!("{base}/{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the emulator at {base}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !text.is_empty() {
            println!("{text}");
        }
        if !status.is_success() {
            anyhow::bail!("the emulator answered {status}");
        }
        Ok(())
    })
}

/// Enable and disable share one admin request shape.
fn key_enabled_request(
    key: String,
    version: Option<String>,
    enabled: bool,
) -> (reqwest::Method, String, Option<serde_json::Value>) {
    (
        reqwest::Method::POST,
        format!("keys/{key}/enabled"),
        Some(serde_json::json!({"enabled": enabled, "version": version})),
    )
}
