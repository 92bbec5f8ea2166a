//! TLS accept loop, per-request fault injection, dispatch and the request log.

use super::Shared;
use super::admin::{FaultKind, FaultTarget, LogEntry};
use super::errors::{
    Resp, empty, foreign_json, html_page, json, server_error, throttled,
    unauthorized_without_challenge, vault_headers,
};
use super::{discovery, identity, model::now, rotation, vault};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const MAX_BODY: usize = 1 << 20;

/// A TCP stream that, when asked, closes with an RST (SO_LINGER 0) instead of a FIN —
/// the "connection reset" fault.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            // Deprecated because a *non-zero* linger blocks in drop; zero never blocks.
            #[allow(deprecated)]
            let _ = self.inner.set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Error returned by the service to make hyper drop the connection without answering.
#[derive(Debug)]
struct Abort;
impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection aborted by fault injection")
    }
}
impl std::error::Error for Abort {}

pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let Ok((tcp, peer)) = accepted else {
            continue;
        };
        if !peer.ip().is_loopback() {
            continue; // never serve anything but loopback clients
        }
        let _ = tcp.set_nodelay(true);
        let reset = Arc::new(AtomicBool::new(false));
        let stream = ResettableStream {
            inner: tcp,
            reset: reset.clone(),
        };
        let (acceptor, shared, mut stop) = (acceptor.clone(), shared.clone(), shutdown.clone());
        let stop_for_svc = shutdown.clone();
        tokio::spawn(async move {
            let conn = async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let (shared, reset, stop) =
                        (shared.clone(), reset.clone(), stop_for_svc.clone());
                    async move { handle(shared, req, peer, reset, stop).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            };
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

enum Decision {
    Continue,
    /// An answer in the vault's own format (gets its `x-ms-*` headers).
    Respond(Resp, String),
    /// An answer from "something in front of" the vault: sent as is.
    RespondForeign(Resp, String),
    Reset,
    Hang,
}

/// The key a data-plane path names (`/keys/{name}/…`), if any.
fn key_of(path: &str) -> Option<&str> {
    let mut segs = path.trim_start_matches('/').split('/');
    match (segs.next(), segs.next()) {
        (Some("keys"), Some(name)) if !name.is_empty() => Some(name),
        _ => None,
    }
}

fn error_status(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// Consumes matching faults (counted ones decrement, exhausted ones are removed).
fn decide(shared: &Shared, target: FaultTarget, key: Option<&str>) -> (Duration, Decision) {
    let mut faults = shared.faults();
    let mut latency = Duration::ZERO;
    let mut decision = Decision::Continue;
    for f in faults.iter_mut() {
        let applies = f.target == FaultTarget::All || f.target == target;
        let key_matches = match (&f.key, key) {
            (None, _) => true,
            (Some(want), Some(k)) => want.eq_ignore_ascii_case(k),
            (Some(_), None) => false,
        };
        if !applies || !key_matches || f.count == Some(0) {
            continue;
        }
        let used = match &f.kind {
            FaultKind::Latency { ms } => {
                latency += Duration::from_millis(*ms);
                true
            }
            _ if !matches!(decision, Decision::Continue) => false,
            FaultKind::Status { status } => {
                let s = StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                decision = Decision::Respond(server_error(s), format!("status-{}", s.as_u16()));
                true
            }
            FaultKind::Throttle { retry_after } => {
                let name = match retry_after {
                    Some(_) => "throttle",
                    None => "throttle-no-retry-after",
                };
                decision = Decision::Respond(throttled(*retry_after), name.into());
                true
            }
            FaultKind::Reset => {
                decision = Decision::Reset;
                true
            }
            FaultKind::Hang => {
                decision = Decision::Hang;
                true
            }
            FaultKind::Html { status } => {
                let s = error_status(*status);
                decision = Decision::RespondForeign(html_page(s), format!("html-{}", s.as_u16()));
                true
            }
            FaultKind::Empty { status } => {
                let s = error_status(*status);
                decision = Decision::RespondForeign(empty(s), format!("empty-{}", s.as_u16()));
                true
            }
            FaultKind::ForeignJson { status } => {
                let s = error_status(*status);
                decision = Decision::RespondForeign(
                    foreign_json(s),
                    format!("foreign-json-{}", s.as_u16()),
                );
                true
            }
            FaultKind::UnauthorizedNoChallenge => {
                decision = Decision::Respond(
                    unauthorized_without_challenge(),
                    "unauthorized-no-challenge".into(),
                );
                true
            }
        };
        if used && let Some(c) = f.count.as_mut() {
            *c -= 1;
        }
    }
    faults.retain(|f| f.count != Some(0));
    (latency, decision)
}

fn admin_authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let h = req.headers();
    let bearer = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let direct = h.get("x-admin-token").and_then(|v| v.to_str().ok());
    bearer.or(direct) == Some(shared.admin_token.as_str())
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    reset: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> Result<Resp, Abort> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| format!("127.0.0.1:{}", shared.port));
    let mut entry = LogEntry {
        time: now(),
        method: method.to_string(),
        path: path.clone(),
        status: 0,
        principal: None,
        op: None,
        fault: None,
    };

    if path == "/_admin" || path.starts_with("/_admin/") {
        // Admin calls are never faulted nor logged (they would skew the counters).
        if !peer.ip().is_loopback() || !admin_authorized(&shared, &req) {
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "missing or wrong admin token"}),
            ));
        }
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return Ok(r),
        };
        return Ok(admin::handle(&shared, &method, &path, &body).await);
    }

    // Entra ID discovery belongs to the identity side: a token-targeted fault breaks it too,
    // as an outage of login.microsoftonline.com would.
    let discovery = discovery::route(&path).filter(|_| method == hyper::Method::GET);
    let is_token = path == "/msi/token"
        || path == "/metadata/identity/oauth2/token"
        || path.ends_with("/oauth2/v2.0/token")
        || discovery.is_some();
    let target = if is_token {
        FaultTarget::Token
    } else {
        FaultTarget::Vault
    };
    let key = if is_token { None } else { key_of(&path) };
    let headers = req.headers().clone();
    let (latency, decision) = decide(&shared, target, key);
    if !latency.is_zero() {
        entry.fault = Some("latency".into());
        tokio::time::sleep(latency).await;
    }
    match decision {
        Decision::Continue => {}
        Decision::Respond(resp, name) => {
            entry.fault = Some(name);
            entry.status = resp.status().as_u16();
            shared.log().push(entry);
            // A fault in the service's own format looks like any other answer of it,
            // correlation headers included.
            let resp = vault_headers(resp, &uuid::Uuid::new_v4().to_string());
            return Ok(echo_correlation(resp, &headers, is_token));
        }
        Decision::RespondForeign(resp, name) => {
            entry.fault = Some(name);
            entry.status = resp.status().as_u16();
            shared.log().push(entry);
            return Ok(resp);
        }
        Decision::Reset => {
            entry.fault = Some("reset".into());
            shared.log().push(entry);
            reset.store(true, Ordering::SeqCst);
            return Err(Abort);
        }
        Decision::Hang => {
            entry.fault = Some("hang".into());
            shared.log().push(entry);
            // Never answer; the connection only ends when the client gives up or the
            // emulator stops.
            let _ = stop.changed().await;
            return Err(Abort);
        }
    }

    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return Ok(r),
    };
    let resp = if let Some(d) = &discovery {
        entry.op = Some("discovery".into());
        echo_correlation(discovery::handle(&shared, d, &host, &query), &headers, true)
    } else if is_token {
        let out = if path == "/msi/token" && method == hyper::Method::GET {
            identity::msi_token(&shared, &query, &headers, false)
        } else if path == "/metadata/identity/oauth2/token" && method == hyper::Method::GET {
            identity::msi_token(&shared, &query, &headers, true)
        } else if method == hyper::Method::POST {
            let tenant = path
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            identity::entra_token(&shared, &tenant, &body)
        } else {
            identity::TokenOutcome {
                resp: json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &serde_json::json!({"error": "invalid_request"}),
                ),
                principal: None,
            }
        };
        entry.principal = out.principal;
        entry.op = Some("token".into());
        echo_correlation(out.resp, &headers, true)
    } else {
        // Lazy automatic rotation: whatever the emulated clock made due is rotated before
        // the request sees the keys (the clock also moves only through the admin interface,
        // which rotates too).
        let due = rotation::any_due(&shared.state(), shared.clock.now());
        if due {
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || rotation::run(&s)).await;
        }
        let request_id = uuid::Uuid::new_v4().to_string();
        let out = vault::handle(
            &shared,
            vault::Request {
                method: &method,
                path: &path,
                query: &query,
                headers: &headers,
                host: &host,
                body: &body,
            },
        )
        .await;
        entry.principal = out.principal;
        entry.op = out.op.map(str::to_string);
        echo_correlation(vault_headers(out.resp, &request_id), &headers, false)
    };
    entry.status = resp.status().as_u16();
    shared.log().push(entry);
    Ok(resp)
}

use super::admin;

/// Echoes the client's correlation ids, as the services do (SDKs log them to tie a failure to
/// the service's own logs): Key Vault and Entra ID echo `x-ms-client-request-id`; Entra ID
/// also echoes MSAL's `client-request-id`.
fn echo_correlation(mut resp: Resp, req: &hyper::HeaderMap, token: bool) -> Resp {
    let names: &[&str] = if token {
        &["x-ms-client-request-id", "client-request-id"]
    } else {
        &["x-ms-client-request-id"]
    };
    for name in names {
        if let Some(v) = req.get(*name) {
            resp.headers_mut().insert(*name, v.clone());
        }
    }
    resp
}

async fn read_body(req: Request<Incoming>) -> Result<Vec<u8>, Resp> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes().to_vec()),
        Err(_) => Err(super::errors::bad_parameter(
            "The request body could not be read or exceeds 1 MiB.",
        )),
    }
}
