//! The XKS API: everything spec-shaped. One request's path through here:
//! route → prefix lookup → body (capped) → SigV4 → key-id check → JSON → handler →
//! response, and one log line at the end.
//!
//! `api` reaches the key manager only through [`crate::backend::Handle`] and never
//! reaches back into `server`.

pub mod aad;
pub mod decrypt;
pub mod encrypt;
pub mod error;
pub mod health;
pub mod key_manager;
pub mod metadata;
pub mod route;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::Handle;
use crate::config::{Config, KeystoreConfig, SecretSource};
use crate::policy::{AuthzRequest, KeyOperation, Policy};
use crate::sigv4::{Credential, CredentialSet, DuplicateAccessKeyId, VerifyPolicy};
use error::ApiError;
use key_manager::{KeyManager, KeyManagers};
use route::Operation;
use wire::RequestMetadata;

/// Largest plaintext/ciphertext we accept. The spec requires at least 4300 bytes; past
/// ours a request gets 501 UnsupportedOperationException.
pub const MAX_DATA: usize = 8192;
/// Largest AAD we accept. The spec requires at least 8192 bytes.
pub const MAX_AAD: usize = 16384;

/// Oversized bodies up to this many times the cap are read and discarded before the
/// 501, so HTTP/1.1 clients see the answer rather than a reset.
const DRAIN_LIMIT_FACTOR: usize = 4;

/// Characters of an unknown path, or of a refused request's kmsRequestId, that reach the
/// log line.
const MAX_LOGGED_PATH: usize = 256;
const MAX_LOGGED_REQUEST_ID: usize = 128;

/// The kmsRequestId of a body refused before it was decoded (a 401), for the log line
/// only: looked for after the answer is decided, bounded, never trusted or echoed.
fn peek_kms_request_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "requestMetadata")]
        request_metadata: Option<PeekMetadata>,
    }
    #[derive(serde::Deserialize)]
    struct PeekMetadata {
        #[serde(rename = "kmsRequestId")]
        kms_request_id: Option<String>,
    }
    let peek: Peek = serde_json::from_slice(body).ok()?;
    let id = peek.request_metadata?.kms_request_id?;
    Some(id.chars().take(MAX_LOGGED_REQUEST_ID).collect())
}

/// The most memory a body buffer takes before its bytes arrive, whatever length the
/// request declares: an unauthenticated request that declares 64 KiB and sends nothing
/// holds this much, no more. KMS's bodies are about 1 KiB; the buffer grows (wiping the
/// old block) only with bytes that actually arrived.
pub const BODY_BUFFER_START: usize = 8 * 1024;

/// Marks a response to a request whose SigV4 signature verified, so the connection it
/// came on counts as a client's (kept open for `idle_timeout`) rather than a stranger's.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated;

/// One path prefix's runtime state.
#[derive(Debug)]
pub struct Tenant {
    pub prefix: String,
    /// The key manager this prefix's keys live in.
    pub backend: Arc<KeyManager>,
    pub credentials: CredentialSet,
    pub allowed_keys: Option<HashSet<String>>,
    /// The prefix's request quota, if configured.
    pub quota: Option<TokenBucket>,
    /// When each credential's secret was set (for the credential-age metric).
    pub credential_since: Vec<CredentialSince>,
    /// See [`Call::aws_sample_metadata`].
    pub aws_sample_metadata: Option<Vec<u8>>,
}

/// When a credential's secret was set, as far as the proxy can tell.
#[derive(Debug, Clone)]
pub struct CredentialSince {
    pub access_key_id: String,
    pub since: SystemTime,
    /// `file`: the secret file's modification time (the time it was written, which on
    /// Kubernetes is when the Secret was updated). `env`: when this process read the
    /// variable (start or the last reload): the real age of an environment secret
    /// cannot be known, so age alerts should use file secrets.
    pub source: &'static str,
}

/// A token bucket: `rate` tokens per second, at most `burst` banked. One short lock per
/// request; contention is negligible next to the TLS and SigV4 work around it.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: std::sync::Mutex::new((f64::from(burst.max(1)), Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (tokens, last) = &mut *guard;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Every configured prefix and the key managers they use, swapped as a whole on
/// reload: a request sees one consistent pair, and a key manager a reload removed
/// stays in service until the last request that started with it has finished.
#[derive(Debug, Default)]
pub struct Tenants {
    by_prefix: HashMap<String, Arc<Tenant>>,
    managers: KeyManagers,
}

/// Why [`Tenants`] could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    #[error(transparent)]
    Credentials(#[from] DuplicateAccessKeyId),
    /// Only a caller that opened other backends than the config names gets this.
    #[error("keystore '{prefix}' uses backend '{backend}', which is not open")]
    NoBackend { prefix: String, backend: String },
}

/// A keystore's credentials as the verifier holds them; also what `preflight` checks.
pub fn credential_set(k: &KeystoreConfig) -> Result<CredentialSet, DuplicateAccessKeyId> {
    CredentialSet::new(
        k.credentials
            .iter()
            .map(|c| Credential::new(c.access_key_id.clone(), c.secret.clone()))
            .collect(),
    )
}

impl Tenants {
    /// The tenants of `keystores`, each pointing into `managers` (which must hold every
    /// backend the keystores name; extra ones are dropped).
    pub fn from_config(
        keystores: &[KeystoreConfig],
        mut managers: KeyManagers,
    ) -> Result<Self, TenantsError> {
        managers.retain(|name, _| keystores.iter().any(|k| &k.backend == name));
        let by_prefix =
            keystores
                .iter()
                .map(|k| {
                    let backend = managers.get(&k.backend).cloned().ok_or_else(|| {
                        TenantsError::NoBackend {
                            prefix: k.path_prefix.clone(),
                            backend: k.backend.clone(),
                        }
                    })?;
                    let credential_since = k
                        .credentials
                        .iter()
                        .map(|c| {
                            let (since, source) = match &c.source {
                                SecretSource::File(f) => (
                                    std::fs::metadata(f)
                                        .and_then(|m| m.modified())
                                        .unwrap_or_else(|_| SystemTime::now()),
                                    "file",
                                ),
                                SecretSource::Env(_) => (SystemTime::now(), "env"),
                            };
                            CredentialSince {
                                access_key_id: c.access_key_id.clone(),
                                since,
                                source,
                            }
                        })
                        .collect();
                    let tenant = Tenant {
                        credential_since,
                        backend,
                        aws_sample_metadata: k.aws_sample_metadata.clone(),
                        prefix: k.path_prefix.clone(),
                        credentials: credential_set(k)?,
                        allowed_keys: k.allowed_keys.as_ref().map(|v| v.iter().cloned().collect()),
                        quota: k.quota.map(|(rate, burst)| TokenBucket::new(rate, burst)),
                    };
                    Ok((k.path_prefix.clone(), Arc::new(tenant)))
                })
                .collect::<Result<_, TenantsError>>()?;
        Ok(Self {
            by_prefix,
            managers,
        })
    }

    /// The key managers in service, by name.
    pub fn managers(&self) -> &KeyManagers {
        &self.managers
    }

    pub fn get(&self, prefix: &str) -> Option<&Arc<Tenant>> {
        self.by_prefix.get(prefix)
    }

    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.by_prefix.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_prefix.values()
    }
}

/// The XKS API service: shared by every connection.
#[derive(Debug)]
pub struct Api {
    tenants: ArcSwap<Tenants>,
    sigv4: VerifyPolicy,
    max_body: usize,
    max_in_flight: usize,
    body_timeout: std::time::Duration,
    /// Global load-shedding limit: authenticated requests being processed at once.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Requests whose body is being read, before their signature is checked: what
    /// unauthenticated clients hold (for the metrics and the hostile-client tests).
    awaiting_body: std::sync::atomic::AtomicUsize,
    /// Secondary authorization, when configured; swapped on reload.
    policy: ArcSwap<Option<Arc<Policy>>>,
    /// The audit trail, when `[audit]` is on (restart-only: set once at start).
    audit: Option<Arc<crate::audit::Trail>>,
}

/// What a handler needs about the current request.
#[derive(Debug)]
pub struct Call<'a> {
    pub key_id: &'a str,
    pub backend: &'a Handle,
    /// The prefix's `aws_sample_ciphertexts` metadata, if its Decrypt also opens
    /// ciphertexts made by AWS's sample proxy.
    pub aws_sample_metadata: Option<&'a [u8]>,
}

/// What the request log line reports; filled in as the request is understood.
#[derive(Debug, Default)]
struct RequestLog {
    /// The request's SigV4 signature verified (its connection is then KMS's).
    authenticated: bool,
    /// The request counts in its prefix's metrics: it verified, or it failed SigV4 while
    /// naming one of the prefix's access key ids (KMS with a stale secret or a skewed
    /// clock). Anything else is a stranger's and counts under prefix and operation
    /// "-", so nobody without a credential can move a tenant's error ratio or alerts.
    attributed: bool,
    /// The path asked for, when it names no configured prefix (a 404): truncated, and
    /// logged as a field (escaped), never as a metric label.
    unknown_path: Option<String>,
    prefix: Option<String>,
    /// The prefix's key manager.
    backend: Option<Arc<str>>,
    operation: Option<&'static str>,
    key_id: Option<String>,
    /// Verified, or on a 401 the one the Authorization header presented.
    access_key_id: Option<String>,
    /// Why SigV4 verification failed (a fixed text): for the operator only, never on
    /// the wire, where every 401 says the same.
    auth_failure: Option<String>,
    kms_request_id: Option<String>,
    kms_operation: Option<String>,
    principal: Option<String>,
    /// For the audit record only.
    source_vpc: Option<String>,
    source_vpce: Option<String>,
    /// The key version an Encrypt used or a Decrypt's ciphertext names (audit record).
    key_version: Option<u32>,
    /// Why the audit trail refused this request's record (a fixed label).
    audit_failure: Option<&'static str>,
    /// Why a request was refused before its signature verified (a label of
    /// `xks_unauthenticated_rejections_total`).
    unauthenticated: Option<UnauthenticatedRejection>,
}

/// Why a request was refused before its SigV4 signature verified: the `reason` label
/// of `xks_unauthenticated_rejections_total` (every value exists from start, at 0).
/// A flood of these is strangers, not KMS: it costs no permit, quota or backend slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnauthenticatedRejection {
    /// The signature, credential scope, date or access key id did not verify (401).
    Signature,
    /// The path names no configured prefix or operation (404).
    UnknownPath,
    /// A configured path with a method other than POST.
    MethodNotAllowed,
    /// A body over `limits.max_body`.
    BodyTooLarge,
    /// A body that did not arrive whole within `body_timeout`, or broke off.
    BodyUnreadable,
}

impl UnauthenticatedRejection {
    pub const ALL: [UnauthenticatedRejection; 5] = [
        UnauthenticatedRejection::Signature,
        UnauthenticatedRejection::UnknownPath,
        UnauthenticatedRejection::MethodNotAllowed,
        UnauthenticatedRejection::BodyTooLarge,
        UnauthenticatedRejection::BodyUnreadable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UnauthenticatedRejection::Signature => "signature",
            UnauthenticatedRejection::UnknownPath => "unknown_path",
            UnauthenticatedRejection::MethodNotAllowed => "method_not_allowed",
            UnauthenticatedRejection::BodyTooLarge => "body_too_large",
            UnauthenticatedRejection::BodyUnreadable => "body_unreadable",
        }
    }
}

impl Api {
    pub fn new(config: &Config, managers: KeyManagers) -> Result<Self, TenantsError> {
        Ok(Self {
            tenants: ArcSwap::from_pointee(Tenants::from_config(&config.keystores, managers)?),
            sigv4: config.sigv4.clone(),
            max_body: config.server.max_body_bytes,
            max_in_flight: config.server.max_in_flight,
            body_timeout: config.server.body_read_timeout,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.server.max_in_flight)),
            awaiting_body: std::sync::atomic::AtomicUsize::new(0),
            policy: ArcSwap::from_pointee(None),
            audit: None,
        })
    }

    /// Records every authenticated request in `trail` from now on.
    pub fn with_audit(mut self, trail: Option<Arc<crate::audit::Trail>>) -> Self {
        self.audit = trail;
        self
    }

    /// The audit trail, if on.
    pub fn audit(&self) -> Option<&Arc<crate::audit::Trail>> {
        self.audit.as_ref()
    }

    /// Installs (or removes) the secondary-authorization policy.
    pub fn replace_policy(&self, policy: Option<Arc<Policy>>) {
        self.policy.store(Arc::new(policy));
    }

    /// Replaces every prefix's credentials and allow-list at once; requests in flight
    /// keep the tenants they started with.
    pub fn replace_tenants(&self, tenants: Tenants) {
        self.tenants.store(Arc::new(tenants));
    }

    /// The current tenants (a snapshot).
    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants.load_full()
    }

    /// `/ping`: serving unless every instance of every key manager is UNAVAILABLE.
    /// A load balancer that takes the proxy out of rotation takes every tenant with
    /// it, so one tenant's dead HSM must not make the others unreachable; its own
    /// GetHealthStatus reports it.
    pub fn serving(&self) -> bool {
        self.tenants
            .load()
            .managers
            .values()
            .any(|m| m.health.serving())
    }

    /// Requests whose body is being read (not yet authenticated).
    pub fn awaiting_body(&self) -> usize {
        self.awaiting_body
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Authenticated requests being processed (out of `server.max_in_flight`).
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Serves one HTTP request (any path).
    pub async fn serve<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.uri().path() == "/ping" {
            return self.ping(req.method());
        }
        let started = Instant::now();
        let mut log = RequestLog::default();
        let result = self.dispatch(req, &mut log).await;
        let mut response = match result {
            Ok(r) | Err(Outcomed(r)) => r,
        };
        // Authenticated requests only: a stranger's flood must not fill the audit disk
        // or its queue (and so push a fail-closed proxy into refusing KMS).
        if log.authenticated
            && log.audit_failure.is_none()
            && let Some(trail) = &self.audit
        {
            let record = log.audit_record(&response, started.elapsed());
            if let Err(why) = trail.record(record).await {
                log.audit_failure = Some(why.label());
                if trail.on_failure() == crate::config::AuditOnFailure::FailClosed {
                    // Whatever the key manager did stays with us: no output leaves
                    // without its record.
                    response = Outcomed::from(ApiError::AuditUnavailable).0;
                }
            }
        }
        if log.authenticated {
            response.extensions_mut().insert(Authenticated);
        }
        let outcome = if response.status() == StatusCode::OK {
            "ok"
        } else {
            // Several names share a status, so the dispatcher records the errorName
            // in the response's extensions for this line.
            response
                .extensions()
                .get::<Outcome>()
                .map(|o| o.0)
                .unwrap_or("error")
        };
        let elapsed = started.elapsed();
        let operation = log.operation.unwrap_or("-");
        let (metric_operation, prefix_label) = match &log.prefix {
            Some(p) if log.attributed => (operation, p.clone()),
            _ => ("-", "-".to_owned()),
        };
        metrics::counter!(
            "xks_requests_total",
            "operation" => metric_operation,
            "prefix" => prefix_label.clone(),
            "outcome" => outcome
        )
        .increment(1);
        metrics::histogram!(
            "xks_request_duration_seconds",
            "operation" => metric_operation,
            "prefix" => prefix_label,
            "outcome" => outcome
        )
        .record(elapsed.as_secs_f64());
        if let Some(why) = log.unauthenticated {
            metrics::counter!("xks_unauthenticated_rejections_total", "reason" => why.label())
                .increment(1);
        }
        tracing::info!(
            target: "xks_proxy::request",
            kms_request_id = log.kms_request_id.as_deref().unwrap_or("-"),
            kms_operation = log.kms_operation.as_deref().unwrap_or("-"),
            principal = log.principal.as_deref().unwrap_or("-"),
            access_key_id = log.access_key_id.as_deref().unwrap_or("-"),
            auth_failure = log.auth_failure.as_deref(),
            prefix = log.prefix.as_deref().unwrap_or("-"),
            backend = log.backend.as_deref().unwrap_or("-"),
            path = log.unknown_path.as_deref(),
            operation = log.operation.unwrap_or("-"),
            key_id = log.key_id.as_deref().unwrap_or("-"),
            status = response.status().as_u16(),
            outcome,
            audit_failure = log.audit_failure,
            elapsed_us = elapsed.as_micros() as u64,
            "xks request"
        );
        response
    }

    fn ping(&self, method: &Method) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        ping_response(self.serving())
    }

    /// One request, step by step in the order the threat model wants: route (404/405
    /// before anything else), bound and read the body, verify SigV4, admit (in-flight
    /// limit, audit, quota), check the key id, then decode, authorize and run the
    /// operation. The steps are plain (inlined) functions; every await stays here, so
    /// the request's future and its work are those of the one function it was.
    async fn dispatch<B>(
        &self,
        req: Request<B>,
        log: &mut RequestLog,
    ) -> Result<Response<Full<Bytes>>, Outcomed>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let tenants = self.tenants.load();
        let (route, tenant) = match route_request(&parts, &tenants, log) {
            Ok(found) => found,
            Err(early) => {
                // An answer given before the body is read would go out beside a reset of
                // the unread stream (HTTP/2 RST_STREAM), and some clients (curl 7.88) then
                // lose the answer. So the body is consumed first, within the body deadline
                // and a bound, never buffered.
                let mut body = std::pin::pin!(body);
                let drain = discard(body.as_mut(), DRAIN_LIMIT_FACTOR * self.max_body);
                let _ = tokio::time::timeout(self.body_timeout, drain).await;
                log.unauthenticated = Some(match early {
                    ApiError::MethodNotAllowed => UnauthenticatedRejection::MethodNotAllowed,
                    _ => UnauthenticatedRejection::UnknownPath,
                });
                return Err(early.into());
            }
        };
        let operation = route.operation;
        let key_id = route.key_id.map(str::to_owned);
        log.key_id.clone_from(&key_id);

        // Until the signature verifies, the request holds no permit, quota token or
        // backend slot: only its connection, its stream, and a body buffer of at most
        // BODY_BUFFER_START bytes plus what actually arrived (capped at max_body), for
        // at most the body deadline.
        //
        // Bound the body before reading it: a declared length over the cap is refused
        // without buffering a byte; an undeclared one is cut off at the cap.
        if let Some(len) = self.declared_over_cap(&parts.headers) {
            // An HTTP/1.1 client still sending when we answer may see a reset instead
            // of our 501. For moderately oversized bodies, discard (never buffer) the
            // rest first so the client reads a clean error; beyond that, answer now.
            if len <= DRAIN_LIMIT_FACTOR * self.max_body {
                let mut body = std::pin::pin!(body);
                let drain = discard(body.as_mut(), len);
                let _ = tokio::time::timeout(self.body_timeout, drain).await;
            }
            log.unauthenticated = Some(UnauthenticatedRejection::BodyTooLarge);
            return Err(ApiError::BodyTooLarge(self.max_body).into());
        }
        let reading = Counted::enter(&self.awaiting_body);
        let body = tokio::time::timeout(self.body_timeout, read_capped(body, self.max_body))
            .await
            .map_err(|_| ApiError::BodyUnreadable)
            .and_then(|read| read)
            .map_err(|e| {
                log.unauthenticated = Some(match e {
                    ApiError::BodyTooLarge(_) => UnauthenticatedRejection::BodyTooLarge,
                    _ => UnauthenticatedRejection::BodyUnreadable,
                });
                e
            })?;
        drop(reading);

        self.authenticate(&parts, &body, tenant, log)?;
        let _in_flight = self.admit(tenant, log)?;
        let key_id = allowed_key_id(tenant, key_id)?;
        let call = Call {
            key_id: key_id.as_deref().unwrap_or(""),
            backend: &tenant.backend.handle,
            aws_sample_metadata: tenant.aws_sample_metadata.as_deref(),
        };
        match operation {
            Operation::GetHealthStatus => {
                let req: wire::HealthRequest = decode(&body, log)?;
                drop(req);
                Ok(json_ok(&tenant.backend.health.response()))
            }
            Operation::GetKeyMetadata => {
                let req: wire::MetadataRequest = decode(&body, log)?;
                self.authorize(
                    KeyOperation::GetKeyMetadata,
                    tenant,
                    &call,
                    &req.request_metadata,
                )?;
                Ok(json_ok(&metadata::handle(&call, req).await?))
            }
            Operation::Encrypt => {
                let req: wire::EncryptRequest = decode(&body, log)?;
                self.authorize(KeyOperation::Encrypt, tenant, &call, &req.request_metadata)?;
                let (resp, key_version) = encrypt::handle(&call, req).await?;
                log.key_version = Some(key_version);
                Ok(json_ok(&resp))
            }
            Operation::Decrypt => {
                let req: wire::DecryptRequest = decode(&body, log)?;
                self.authorize(KeyOperation::Decrypt, tenant, &call, &req.request_metadata)?;
                log.key_version = req
                    .ciphertext_metadata
                    .as_ref()
                    .and_then(|m| aad::Metadata::decode(&m.0))
                    .map(|m| m.key_version);
                Ok(json_secret_ok(&decrypt::handle(&call, req).await?))
            }
        }
    }

    /// The body length the request declares (Content-Length), when it is over the cap.
    #[inline]
    fn declared_over_cap(&self, headers: &http::HeaderMap) -> Option<usize> {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&len| len > self.max_body)
    }

    /// SigV4 against the prefix's credentials: the step that makes the request a
    /// client's (its log line then names the verified access key id).
    #[inline]
    fn authenticate(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        tenant: &Tenant,
        log: &mut RequestLog,
    ) -> Result<(), ApiError> {
        let verified = crate::sigv4::verify(
            parts,
            body,
            &tenant.credentials,
            &self.sigv4,
            SystemTime::now(),
        )
        .map_err(|e| {
            // The answer is decided (one 401 text for every cause); what follows is
            // only for the operator's log line: the cause, who it claimed to be, and
            // which KMS request it was.
            log.auth_failure = Some(e.to_string());
            log.access_key_id = crate::sigv4::presented_access_key_id(parts);
            log.kms_request_id = peek_kms_request_id(body);
            log.unauthenticated = Some(UnauthenticatedRejection::Signature);
            log.attributed = log
                .access_key_id
                .as_deref()
                .is_some_and(|a| tenant.credentials.get(a).is_some());
            ApiError::Auth(e)
        })?;
        log.authenticated = true;
        log.attributed = true;
        log.access_key_id = Some(verified.access_key_id);
        Ok(())
    }

    /// Admission of an authenticated request, in order: the global in-flight limit,
    /// the audit trail (fail closed), the prefix's quota. The permit is held for the
    /// rest of the request.
    #[inline]
    fn admit(
        &self,
        tenant: &Tenant,
        log: &mut RequestLog,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        // Load shedding, now that the request is a client's: over the global limit,
        // answer 429 at once rather than queue towards KMS's 250 ms timeout. Taken only
        // after SigV4, so unauthenticated requests can never fill it.
        let in_flight = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)?;
        // Fail closed early: a broken audit writer means no key work at all.
        if let Some(trail) = &self.audit
            && trail.on_failure() == crate::config::AuditOnFailure::FailClosed
            && let Some(why) = trail.refusing()
        {
            trail.note_refusal(why);
            log.audit_failure = Some(why.label());
            return Err(ApiError::AuditUnavailable);
        }
        // The per-prefix quota counts authenticated requests only, so an unauthenticated
        // flood cannot spend a tenant's quota.
        if let Some(q) = &tenant.quota
            && !q.try_take()
        {
            return Err(ApiError::QuotaExceeded);
        }
        Ok(in_flight)
    }
}

/// Routing: the operation and tenant the path names, noted on the log line; or why the
/// request is refused before its body is read (404 for a path naming no configured
/// prefix or operation, 405 for a method other than POST).
#[inline]
fn route_request<'p, 't>(
    parts: &'p http::request::Parts,
    tenants: &'t Tenants,
    log: &mut RequestLog,
) -> Result<(route::Route<'p>, &'t Arc<Tenant>), ApiError> {
    let found =
        route::parse(parts.uri.path()).and_then(|route| Some((route, tenants.get(route.prefix)?)));
    if let Some((route, tenant)) = &found {
        // Only configured prefixes reach logs and metric labels (bounded cardinality).
        log.operation = Some(route.operation.as_str());
        log.prefix = Some(route.prefix.to_owned());
        log.backend = Some(Arc::clone(&tenant.backend.name));
    } else {
        // What was asked, for the operator (a KMS store with the wrong
        // XksProxyUriPath shows up here): a log field only.
        log.unknown_path = Some(parts.uri.path().chars().take(MAX_LOGGED_PATH).collect());
    }
    match found {
        None => Err(ApiError::UnknownPath),
        Some(_) if parts.method != Method::POST => Err(ApiError::MethodNotAllowed),
        Some(found) => Ok(found),
    }
}

/// The key id, looked at only now that the caller is authenticated (before, it learns
/// nothing about key ids): well-formed, then one of the prefix's.
#[inline]
fn allowed_key_id(tenant: &Tenant, key_id: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(k) = key_id else {
        return Ok(None);
    };
    if !crate::key_id::is_valid(&k) {
        // The spec defines key ids as 1-128 of [A-Za-z0-9._-]; an id outside that is
        // malformed input (400), not a well-formed id we lack (404).
        return Err(ApiError::Validation(format!(
            "external key id must be {}",
            crate::key_id::RULE
        )));
    }
    if let Some(allowed) = &tenant.allowed_keys
        && !allowed.contains(&k)
    {
        return Err(ApiError::KeyNotAllowed);
    }
    Ok(Some(k))
}

impl Api {
    /// Secondary authorization for the key operations. GetHealthStatus never comes here
    /// (spec: it is exempt), and `KeyOperation` has no variant for it.
    fn authorize(
        &self,
        operation: KeyOperation,
        tenant: &Tenant,
        call: &Call<'_>,
        metadata: &RequestMetadata,
    ) -> Result<(), ApiError> {
        let guard = self.policy.load();
        let Some(policy) = guard.as_ref() else {
            return Ok(());
        };
        let decision = policy.authorize(&AuthzRequest {
            operation,
            prefix: &tenant.prefix,
            key_id: call.key_id,
            metadata,
        });
        if decision.allowed {
            return Ok(());
        }
        // Request-derived strings go in as `&str` values, which both log formats
        // escape (quoted with `\n` and `\u{1b}` in the human one, JSON-escaped in the
        // other): a newline in kmsRequestId must never start a forged log line.
        tracing::warn!(
            kms_request_id = metadata.kms_request_id.as_str(),
            kms_operation = metadata.kms_operation.as_str(),
            principal = metadata.aws_principal_arn.as_deref().unwrap_or("-"),
            prefix = tenant.prefix.as_str(),
            key_id = call.key_id,
            decided_by = ?decision.reason,
            "secondary authorization denied the request"
        );
        Err(ApiError::AccessDenied)
    }
}

/// The `/ping` response for load balancers.
pub fn ping_response(serving: bool) -> Response<Full<Bytes>> {
    let (status, text) = if serving {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "key manager unavailable\n")
    };
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Counts itself in an `AtomicUsize` while alive.
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Counted<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The errorName, carried on the response so the log line can report it.
#[derive(Debug, Clone, Copy)]
struct Outcome(&'static str);

/// An `ApiError` already turned into its response (so `?` works in `dispatch`).
struct Outcomed(Response<Full<Bytes>>);

impl From<ApiError> for Outcomed {
    fn from(e: ApiError) -> Self {
        let mut r = e.to_response();
        r.extensions_mut().insert(Outcome(e.error_name().as_str()));
        Outcomed(r)
    }
}

/// Parses a request body, recording its metadata for the log line. serde's messages
/// can quote input values (which may be plaintext), so only quote-free ones pass.
fn decode<T: DeserializeOwned + HasMetadata>(
    body: &[u8],
    log: &mut RequestLog,
) -> Result<T, ApiError> {
    let req: T = serde_json::from_slice(body).map_err(|e| {
        // serde's own text can quote input values (`invalid type: integer `123``, a
        // string in quotes), and a value may be plaintext: a text with a quote or a
        // backtick passes only when it names one of our fields; otherwise a fixed text
        // by category. (Our own messages, such as the Base64 one, have neither.)
        let text = e.to_string();
        let names_our_field =
            text.starts_with("missing field `") || text.starts_with("duplicate field `");
        let detail = if names_our_field || !(text.contains('"') || text.contains('`')) {
            text
        } else {
            let what = match e.classify() {
                serde_json::error::Category::Io | serde_json::error::Category::Syntax => {
                    "not valid JSON"
                }
                serde_json::error::Category::Eof => "the JSON ends early",
                serde_json::error::Category::Data => "a field has the wrong type or value",
            };
            format!("{what} (line {}, column {})", e.line(), e.column())
        };
        ApiError::Validation(format!("invalid request body: {detail}"))
    })?;
    let m = req.metadata();
    log.kms_request_id = Some(m.kms_request_id.clone());
    log.kms_operation = Some(m.kms_operation.clone());
    log.principal.clone_from(&m.aws_principal_arn);
    log.source_vpc.clone_from(&m.aws_source_vpc);
    log.source_vpce.clone_from(&m.aws_source_vpce);
    Ok(req)
}

impl RequestLog {
    /// This request's audit record: what the log line says, plus the source VPC and
    /// key version; never a body field.
    fn audit_record(
        &self,
        response: &Response<Full<Bytes>>,
        elapsed: std::time::Duration,
    ) -> crate::audit::RequestRecord {
        let ok = response.status() == StatusCode::OK;
        crate::audit::RequestRecord {
            time: crate::audit::now(),
            kms_request_id: self.kms_request_id.clone(),
            kms_operation: self.kms_operation.clone(),
            xks_operation: self.operation,
            principal: self.principal.clone(),
            source_vpc: self.source_vpc.clone(),
            source_vpce: self.source_vpce.clone(),
            prefix: self.prefix.clone(),
            access_key_id: self.access_key_id.clone(),
            key_id: self.key_id.clone(),
            key_version: self.key_version,
            outcome: if ok { "ok" } else { "error" },
            error_name: if ok {
                None
            } else {
                response.extensions().get::<Outcome>().map(|o| o.0)
            },
            status: response.status().as_u16(),
            backend: self.backend.as_deref().map(str::to_owned),
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// Every request body carries `requestMetadata`.
trait HasMetadata {
    fn metadata(&self) -> &RequestMetadata;
}

macro_rules! has_metadata {
    ($($t:ty),*) => {$(
        impl HasMetadata for $t {
            fn metadata(&self) -> &RequestMetadata {
                &self.request_metadata
            }
        }
    )*};
}
has_metadata!(
    wire::HealthRequest,
    wire::MetadataRequest,
    wire::EncryptRequest,
    wire::DecryptRequest
);

/// Spec: awsPrincipalArn is required for every API but GetHealthStatus.
pub(crate) fn require_principal(md: &RequestMetadata) -> Result<(), ApiError> {
    match md.aws_principal_arn.as_deref() {
        Some(p) if !p.is_empty() => Ok(()),
        _ => Err(ApiError::Validation(
            "requestMetadata.awsPrincipalArn is required".into(),
        )),
    }
}

/// Spec: kmsKeyArn is required for Encrypt and Decrypt.
pub(crate) fn require_key_arn(md: &RequestMetadata) -> Result<(), ApiError> {
    match md.kms_key_arn.as_deref() {
        Some(p) if !p.is_empty() => Ok(()),
        _ => Err(ApiError::Validation(
            "requestMetadata.kmsKeyArn is required".into(),
        )),
    }
}

fn json_ok<T: Serialize>(body: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(_) => {
            Outcomed::from(ApiError::Backend(crate::backend::BackendError::Failed(
                "response serialisation failed".into(),
            )))
            .0
        }
    }
}

/// Like [`json_ok`], for a body that carries plaintext (the Decrypt response): the
/// serialized bytes are built without reallocation leftovers and wiped once hyper has
/// written them and dropped the body. (Copies hyper or rustls make while writing are
/// theirs, as on the request side.)
fn json_secret_ok<T: Serialize>(body: &T) -> Response<Full<Bytes>> {
    let mut out = WipingWriter::with_capacity(256, usize::MAX);
    if serde_json::to_writer(&mut out, body).is_err() {
        return Outcomed::from(ApiError::Backend(crate::backend::BackendError::Failed(
            "response serialisation failed".into(),
        )))
        .0;
    }
    let mut r = Response::new(Full::new(Bytes::from_owner(out)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A byte buffer that wipes itself on drop and wipes the old block whenever it grows
/// (Vec's own growth would free it unwiped). It grows by doubling, but never past
/// `cap` beyond what it must hold.
struct WipingWriter {
    buf: zeroize::Zeroizing<Vec<u8>>,
    cap: usize,
}

impl WipingWriter {
    fn with_capacity(start: usize, cap: usize) -> Self {
        Self {
            buf: zeroize::Zeroizing::new(Vec::with_capacity(start)),
            cap,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let buf = &mut *self.buf;
        if buf.capacity() - buf.len() < data.len() {
            let need = buf.len() + data.len();
            let want = need.max((2 * buf.capacity()).min(self.cap));
            let mut bigger = Vec::with_capacity(want);
            bigger.extend_from_slice(buf);
            let mut old = std::mem::replace(buf, bigger);
            zeroize::Zeroize::zeroize(&mut old);
        }
        buf.extend_from_slice(data);
    }
}

impl std::io::Write for WipingWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.push(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRef<[u8]> for WipingWriter {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// Reads a body of up to `max` bytes. A longer one (chunked, so not refused up front)
/// is kept no further than the cap, and up to `DRAIN_LIMIT_FACTOR × max` more bytes are
/// discarded before the 501, as for declared lengths.
///
/// The copy is wiped when the request is done: an Encrypt body carries the plaintext
/// (Base64). What hyper and rustls buffered before us is theirs to reuse.
async fn read_capped<B>(body: B, max: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    // Sized from the declared length (what KMS always sends), so the copy is normally
    // never reallocated, but never more than BODY_BUFFER_START up front, whatever the
    // declared length: memory follows the bytes that actually arrive.
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(max);
    let mut buf = WipingWriter::with_capacity(hint.clamp(1024, BODY_BUFFER_START).min(max), max);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::BodyUnreadable)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing we use
        };
        if buf.buf.len() + data.len() > max {
            discard(body.as_mut(), DRAIN_LIMIT_FACTOR * max).await;
            return Err(ApiError::BodyTooLarge(max));
        }
        buf.push(&data);
    }
    Ok(buf.buf)
}

/// Reads and drops up to `limit` more bytes of an oversized body (never buffering them):
/// an HTTP/1.1 client still sending when we answer may otherwise see a reset instead of
/// our 501.
async fn discard<B>(mut body: std::pin::Pin<&mut B>, limit: usize)
where
    B: http_body::Body<Data = Bytes>,
{
    let mut seen = 0;
    while seen <= limit
        && let Some(Ok(frame)) = body.frame().await
    {
        seen += frame.data_ref().map_or(0, Bytes::len);
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    /// The wiping buffer holds exactly what was pushed, across growth, and never grows
    /// past its cap beyond what it must hold (an unauthenticated body's memory follows
    /// the bytes that arrived).
    #[test]
    fn the_wiping_buffer_keeps_its_bytes_and_its_cap() {
        let mut w = WipingWriter::with_capacity(4, 100);
        let mut want = Vec::new();
        for i in 0..30u8 {
            w.push(&[i, i, i]);
            want.extend_from_slice(&[i, i, i]);
        }
        assert_eq!(w.as_ref(), &want[..]);
        assert!(w.buf.capacity() <= 100, "{}", w.buf.capacity());
    }

    /// The Decrypt response written through the wiping buffer is byte-for-byte what
    /// serde_json writes.
    #[test]
    fn the_secret_response_is_the_same_json() {
        let resp = wire::DecryptResponse {
            plaintext: wire::Base64Secret(crate::secret::SecretBytes::from_slice(&[7u8; 6000])),
        };
        let mut w = WipingWriter::with_capacity(256, usize::MAX);
        serde_json::to_writer(&mut w, &resp).expect("json");
        assert_eq!(w.as_ref(), &serde_json::to_vec(&resp).expect("json")[..]);
        let r = json_secret_ok(&resp);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
