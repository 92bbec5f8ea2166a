//! The HTTP side of the provider: the reqwest clients injected into both the identity credential
//! and the `KeyClient` (through azure_core's `Transport`), and a bounded retry policy.
//!
//! Why our own client: the SDK's default reqwest client has no overall timeout, 20 s connect and
//! 60 s read timeouts, no DNS override and no way to add a CA. Why our own retry policy: the
//! default retries 8 times for up to a minute and honours any `Retry-After`, however long, while
//! a boot-time unlock must answer within a bounded deadline.

use super::KeyError;
use super::answer::{Exchange, is_bearer_challenge};
use super::config::VaultConfig;
use azure_core::http::headers::{
    AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, RETRY_AFTER_MS, WWW_AUTHENTICATE, X_MS_RETRY_AFTER_MS,
};
use azure_core::http::policies::{Policy, PolicyResult, RetryHeaders, RetryPolicy};
use azure_core::http::{
    AsyncRawResponse, ClientOptions, Context, Request, RetryOptions, StatusCode, Transport,
};
use azure_core::time::Duration as AzDuration;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Status codes worth another attempt (the SDK's defaults: 408, 429, 500, 502, 503, 504).
const RETRY_STATUS: &[StatusCode] = &[
    StatusCode::RequestTimeout,
    StatusCode::TooManyRequests,
    StatusCode::InternalServerError,
    StatusCode::BadGateway,
    StatusCode::ServiceUnavailable,
    StatusCode::GatewayTimeout,
];

/// Exponential backoff with jitter, a retry count cap, a per-wait cap that also bounds a server's
/// `Retry-After`, and an elapsed-time cap equal to the operation deadline.
#[derive(Debug)]
pub(crate) struct BoundedRetry {
    max_retries: u32,
    initial_delay: Duration,
    max_delay: Duration,
    budget: Duration,
    headers: RetryHeaders,
}

impl BoundedRetry {
    pub(crate) fn new(cfg: &VaultConfig) -> Self {
        Self {
            max_retries: cfg.max_retries,
            initial_delay: Duration::from_millis(cfg.retry_delay_ms),
            max_delay: Duration::from_millis(cfg.max_retry_delay_ms),
            budget: cfg.deadline(),
            headers: RetryHeaders {
                retry_headers: vec![X_MS_RETRY_AFTER_MS, RETRY_AFTER_MS, RETRY_AFTER],
            },
        }
    }

    fn capped(&self, d: Duration) -> Duration {
        d.min(self.max_delay)
    }
}

fn to_az(d: Duration) -> AzDuration {
    AzDuration::try_from(d).unwrap_or(AzDuration::MAX)
}

#[async_trait::async_trait]
impl RetryPolicy for BoundedRetry {
    fn is_expired(&self, since_start: AzDuration, retry_count: u32) -> bool {
        retry_count >= self.max_retries || since_start >= to_az(self.budget)
    }

    fn retry_headers(&self) -> Option<&RetryHeaders> {
        Some(&self.headers)
    }

    fn retry_status_codes(&self) -> &[StatusCode] {
        RETRY_STATUS
    }

    fn sleep_duration(&self, retry_count: u32) -> AzDuration {
        let exp = retry_count.saturating_sub(1).min(16);
        let base = self.initial_delay.saturating_mul(1u32 << exp);
        // Up to 25 % jitter so many hosts unlocking after an outage do not retry in lockstep.
        let jitter_ms = base.as_millis() as u64 / 4;
        let jitter = if jitter_ms == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(rand::random::<u64>() % jitter_ms)
        };
        to_az(self.capped(base + jitter))
    }

    async fn wait(&self, retry_count: u32, retry_after: Option<AzDuration>) {
        let policy = self.sleep_duration(retry_count);
        let wanted = retry_after.map_or(policy, |ra| ra.max(policy));
        let wanted = Duration::try_from(wanted).unwrap_or(Duration::ZERO);
        tokio::time::sleep(self.capped(wanted)).await;
    }
}

/// The reqwest clients: `vault` is https-only; `identity` additionally allows plain http, which
/// the managed identity endpoints use (IMDS `http://169.254.169.254`, App Service
/// `IDENTITY_ENDPOINT` on localhost). Entra ID endpoints are https regardless: the SDK refuses
/// an `http://` authority host, and Key Vault bearer tokens are only ever sent over https.
pub(crate) struct Clients {
    pub vault: reqwest::Client,
    pub identity: reqwest::Client,
}

pub(crate) fn build_clients(cfg: &VaultConfig) -> Result<Clients, KeyError> {
    let mut extra_roots = Vec::new();
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            KeyError::Config(format!("cannot read vault.ca_file {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            KeyError::Config(format!(
                "vault.ca_file {} is not a PEM certificate bundle: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(KeyError::Config(format!(
                "vault.ca_file {} holds no certificate",
                path.display()
            )));
        }
        extra_roots = certs;
    }
    let resolve = cfg.resolve_entries()?;
    let attempt = cfg.attempt_timeout();
    let build = |https_only: bool| {
        let mut b = reqwest::Client::builder()
            .https_only(https_only)
            // Connect (TCP + TLS handshake) and the whole attempt share the per-attempt budget.
            .connect_timeout(attempt)
            .timeout(attempt)
            .redirect(reqwest::redirect::Policy::none())
            // No proxy from the environment: an unexpected HTTPS_PROXY would silently reroute
            // key traffic (and `resolve` would not apply to it).
            .no_proxy()
            // No idle connections kept: an `unwrapKey` answer carries the volume key, and a
            // pooled connection keeps its last records in live TLS and HTTP read buffers
            // (which the wiping allocator only clears once they are freed). Key Vault calls
            // are seconds apart, so a handshake per call costs nothing that matters.
            .pool_max_idle_per_host(0)
            .tls_certs_merge(extra_roots.iter().cloned());
        for entry in &resolve {
            b = b.resolve(&entry.host, entry.addr);
        }
        b.build()
            .map_err(|e| KeyError::Config(format!("cannot build the HTTPS client: {e}")))
    };
    Ok(Clients {
        vault: build(true)?,
        identity: build(false)?,
    })
}

/// `ClientOptions` that route through `client` and retry with `BoundedRetry`.
pub(crate) fn client_options(
    client: &reqwest::Client,
    cfg: &VaultConfig,
    cloud: Option<Arc<azure_core::cloud::CloudConfiguration>>,
) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(client.clone()))),
        retry: RetryOptions::custom(Arc::new(BoundedRetry::new(cfg))),
        cloud,
        ..Default::default()
    }
}

/// The options for the Key Vault clients: as `client_options`, plus `TraceAnswers`.
pub(crate) fn vault_client_options(client: &reqwest::Client, cfg: &VaultConfig) -> ClientOptions {
    let mut options = client_options(client, cfg, None);
    options.per_try_policies.push(Arc::new(TraceAnswers));
    options
}

/// The options for the identity credential: as `client_options`, plus `CaptureFailures`.
pub(crate) fn identity_client_options(
    client: &reqwest::Client,
    cfg: &VaultConfig,
    cloud: Option<Arc<azure_core::cloud::CloudConfiguration>>,
) -> ClientOptions {
    let mut options = client_options(client, cfg, cloud);
    options.per_try_policies.push(Arc::new(CaptureFailures));
    options
}

/// A failed token-endpoint answer: status and body (error bodies carry no tokens).
#[derive(Debug, Clone)]
pub(crate) struct CapturedFailure {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// What one operation's pipelines recorded about its failed answers.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallRecord {
    /// The last failed token-endpoint answer (`CaptureFailures`).
    pub identity: Option<CapturedFailure>,
    /// The Key Vault request/answer pairs, oldest first (`TraceAnswers`; the last few only).
    pub exchanges: Vec<Exchange>,
}

/// How many Key Vault exchanges a record keeps: the 401 rule needs the last two.
const EXCHANGES_KEPT: usize = 8;

/// Per-operation slot the pipelines fill (the identity pipeline with the last failed token
/// answer, the vault pipeline with its exchanges). It travels in the request `Context`, which
/// the Key Vault client hands on to the credential.
#[derive(Debug, Clone, Default)]
pub(crate) struct FailureSlot(Arc<Mutex<CallRecord>>);

impl FailureSlot {
    pub(crate) fn take(&self) -> CallRecord {
        self.0
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    /// A `Context` carrying this slot, for `ClientMethodOptions`.
    pub(crate) fn context(&self) -> Context<'static> {
        Context::new().with_value(self.clone())
    }
}

/// Records, for every Key Vault request the SDK sends, whether it carried a bearer token and
/// whether its answer was a challenge — never the token or any body.
///
/// Why: a 401 only means "this identity is refused" when Key Vault challenged a request that
/// carried a token the SDK fetched after a first challenge (see `answer::challenge_persisted`);
/// the error the SDK returns shows only the last answer, not what was sent. As a per-try policy
/// it runs after the SDK's authorization policy, so it sees both sends of a challenge round.
#[derive(Debug)]
struct TraceAnswers;

#[async_trait::async_trait]
impl Policy for TraceAnswers {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let authorized = request
            .headers()
            .get_optional_str(&AUTHORIZATION)
            .is_some_and(|v| {
                v.len() > 7
                    && v.get(..7)
                        .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
            });
        let response = next[0].send(ctx, request, &next[1..]).await?;
        if let Some(slot) = ctx.value::<FailureSlot>()
            && let Ok(mut s) = slot.0.lock()
        {
            if s.exchanges.len() == EXCHANGES_KEPT {
                s.exchanges.remove(0);
            }
            s.exchanges.push(Exchange {
                authorized,
                status: u16::from(response.status()),
                challenge: is_bearer_challenge(
                    response.headers().get_optional_str(&WWW_AUTHENTICATE),
                ),
            });
        }
        Ok(response)
    }
}

/// Records failed token-endpoint answers before the credential parses them.
///
/// Why: azure_identity 1.0 parses Entra ID error bodies into a struct with a *borrowed*
/// `error_description: &str`, which fails for every real description (they contain `\r\n`
/// before "Trace ID"), so the credential reports a JSON `DataConversion` error and the status,
/// `error` code (`invalid_client` …) and AADSTS text are lost. We keep our own copy.
#[derive(Debug)]
struct CaptureFailures;

#[async_trait::async_trait]
impl Policy for CaptureFailures {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let response = next[0].send(ctx, request, &next[1..]).await?;
        let Some(slot) = ctx.value::<FailureSlot>() else {
            return Ok(response);
        };
        if response.status().is_success() {
            // Never buffer or keep a successful answer: it holds the access token.
            return Ok(response);
        }
        let (status, headers, body) = response.deconstruct();
        let bytes = body.collect().await?;
        if let Ok(mut s) = slot.0.lock() {
            s.identity = Some(CapturedFailure {
                status: u16::from(status),
                content_type: headers.get_optional_str(&CONTENT_TYPE).map(str::to_owned),
                body: bytes.to_vec(),
            });
        }
        Ok(AsyncRawResponse::from_bytes(status, headers, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AzureCliConfig, CredentialConfig};

    #[test]
    fn retry_is_bounded() {
        let mut cfg = VaultConfig::new(CredentialConfig::AzureCli(AzureCliConfig::default()));
        cfg.max_retries = 3;
        cfg.retry_delay_ms = 1000;
        cfg.max_retry_delay_ms = 1500;
        let p = BoundedRetry::new(&cfg);
        assert!(!p.is_expired(AzDuration::seconds(1), 2));
        assert!(p.is_expired(AzDuration::seconds(1), 3));
        assert!(p.is_expired(AzDuration::seconds(21), 0));
        for n in 1..10 {
            let d = p.sleep_duration(n);
            assert!(d <= AzDuration::milliseconds(1500), "{d}");
            assert!(d >= AzDuration::milliseconds(1000), "{d}");
        }
    }
}
