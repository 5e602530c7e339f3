//! The KMS emulator: AWS KMS's JSON API (awsJson1.1, `X-Amz-Target:
//! TrentService.<Op>`) for external key stores, calling an XKS proxy exactly as KMS
//! does, so boto3, the AWS CLI and `aws-sdk-kms` can drive the whole
//! external-key-store lifecycle on one machine — and for CloudHSM key stores, with a
//! PKCS#11 token standing in for the cluster.
//!
//! # Layout
//! - [`protocol`]: HTTP request → operation → HTTP response; the **only** place an
//!   [`error::Exception`] becomes a status code and a `{"__type","message"}` body.
//! - [`server`]: HTTP and HTTPS accept loops, graceful shutdown.
//! - [`keystores`]: the six custom-key-store operations and the connection state
//!   machine common to every store type; [`keystores::xks`]: what only external key
//!   stores have (proxy settings, Update's rules, the periodic `KmsHealthCheck`);
//!   [`keystores::cloudhsm`]: what only CloudHSM key stores have (cluster checks,
//!   Update's rules, the kmsuser login with password rotation and lockout).
//! - [`clusters`]: the stand-in CloudHSM clusters (`--cloudhsm-clusters`);
//!   [`hsm`]: the kmsuser sessions on their PKCS#11 tokens and the AES keys made,
//!   used and destroyed on them (`pkcs11` feature).
//! - [`keys`]: CreateKey, DescribeKey, ListKeys, Enable/DisableKey,
//!   Schedule/CancelKeyDeletion (and the end of the waiting period).
//! - [`crypto`]: Encrypt, Decrypt, GenerateDataKey*, ReEncrypt; double encryption
//!   for XKS keys, AES-GCM in the token for CloudHSM keys, and the emulator's
//!   versioned ciphertext blob.
//! - [`xks_client`]: SigV4-signed proxy calls, timeouts, response checks, and the
//!   failure → exception tables.
//! - [`store`]: state and its crash-safe persistence; [`quota`]: per-store rate
//!   limit; [`validate`]: model constraints → `ValidationException`.
//!
//! Dependency rule: the emulator reaches XKS keys only through the proxy — over
//! HTTPS, like KMS, using only `sigv4` (signing, caller verification) and `api::wire`
//! (the XKS JSON shapes) from the crate, never the proxy's server or its backends'
//! request path. For CloudHSM stores it uses the PKCS#11 module directly, like KMS uses
//! the CloudHSM client: [`hsm`] reuses `backend::pkcs11`'s token selection and return
//! code names, nothing else.
//!
//! Entry point: [`run`] with bound listeners, a [`Config`] and a shutdown future.

pub mod clusters;
pub mod crypto;
pub mod error;
#[cfg_attr(not(feature = "pkcs11"), path = "hsm_off.rs")]
pub mod hsm;
pub mod keys;
pub mod keystores;
pub mod protocol;
pub mod quota;
pub mod server;
pub mod store;
pub mod validate;
pub mod xks_client;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use error::{Exception, KmsError};
pub use server::{Listeners, server_tls_config};
pub use xks_client::XksClientConfig;

use crate::secret::SecretString;
use crate::sigv4::{Credential, CredentialSet};
use quota::Quotas;
use store::Store;
use xks_client::XksClient;

/// Everything the emulator is told at startup.
#[derive(Debug, Clone)]
pub struct Config {
    /// The one Region the emulator serves (key ARNs, SigV4 region for proxy calls).
    pub region: String,
    /// The one account it serves (12 digits).
    pub account_id: String,
    /// Caller access key ID → principal ARN (`awsPrincipalArn` sent to the proxy).
    /// Unmapped callers are `arn:aws:iam::<account>:root`.
    pub principals: HashMap<String, String>,
    /// `Some`: every request must carry a valid SigV4 signature (service `kms`, this
    /// Region) made with one of these credentials. `None`: signatures are not checked.
    pub client_credentials: Option<Vec<(String, SecretString)>>,
    /// Where the state is kept; `None` keeps it in memory only.
    pub data_dir: Option<PathBuf>,
    /// Time a store spends in CONNECTING before the health check (real KMS: minutes).
    pub connect_delay: Duration,
    /// Time a store spends in DISCONNECTING.
    pub disconnect_delay: Duration,
    /// Period of `KmsHealthCheck` calls to CONNECTED stores; zero turns them off.
    pub health_interval: Duration,
    /// Cryptographic requests per second per custom key store; zero: unlimited.
    pub store_rps: u32,
    /// Length of one "day" of a key's deletion waiting period (test knob; 86400 s in
    /// KMS). The reported `DeletionDate` always uses real days.
    pub deletion_day_length: Duration,
    pub xks: XksClientConfig,
    /// The stand-in CloudHSM clusters (`--cloudhsm-clusters`); empty: none.
    pub clusters: clusters::Clusters,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            region: "us-east-1".to_owned(),
            account_id: "111122223333".to_owned(),
            principals: HashMap::new(),
            client_credentials: None,
            data_dir: None,
            connect_delay: Duration::ZERO,
            disconnect_delay: Duration::ZERO,
            health_interval: Duration::from_secs(180),
            store_rps: 1800,
            deletion_day_length: Duration::from_secs(86_400),
            xks: XksClientConfig::default(),
            clusters: clusters::Clusters::default(),
        }
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    XksClient(#[from] xks_client::XksClientError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Who is calling and which request this is; passed to every operation.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `x-amzn-RequestId` of the response, also the `kmsRequestId` sent to the proxy.
    pub request_id: String,
    /// `awsPrincipalArn` sent to the proxy.
    pub principal_arn: String,
}

/// Results of the periodic health checks, for the emulator-only status route.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HealthCheckStats {
    pub ok: u64,
    pub failed: u64,
    /// Name of the last failure (`XksFailure` debug form), if the last check failed.
    pub last_failure: Option<String>,
}

/// A running emulator: state, proxy client and settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    store: Store,
    xks: XksClient,
    quotas: Quotas,
    /// Caller credentials when `--verify-client-sigv4` is on.
    client_credentials: Option<CredentialSet>,
    health_stats: Mutex<HashMap<String, HealthCheckStats>>,
    /// The kmsuser sessions of CONNECTED CloudHSM key stores.
    hsm: hsm::Sessions,
    /// Flipped to `true` when serving stops; background tasks (connect attempts,
    /// health checks) watch it so none outlives the server.
    stop: tokio::sync::watch::Sender<bool>,
}

impl Emulator {
    /// Opens the state and builds the proxy client; starts nothing.
    pub fn new(config: Config) -> Result<Self, StartError> {
        if !validate::is_account_id(&config.account_id) {
            return Err(StartError::Config(
                "the account ID must be 12 digits".to_owned(),
            ));
        }
        if config.region.is_empty()
            || !config
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(StartError::Config(
                "the region must look like us-east-1".to_owned(),
            ));
        }
        if config.deletion_day_length.is_zero() {
            return Err(StartError::Config(
                "the deletion day length must be positive".to_owned(),
            ));
        }
        let store = match &config.data_dir {
            Some(dir) => Store::open(dir)?,
            None => Store::in_memory()?,
        };
        let xks = XksClient::new(&config.xks, &config.region)?;
        let client_credentials = match &config.client_credentials {
            None => None,
            Some(list) => Some(
                CredentialSet::new(
                    list.iter()
                        .map(|(akid, secret)| Credential::new(akid.clone(), secret.clone()))
                        .collect(),
                )
                .map_err(|e| {
                    StartError::Config(format!("duplicate client access key id {}", e.0))
                })?,
            ),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                quotas: Quotas::new(config.store_rps),
                config,
                store,
                xks,
                client_credentials,
                health_stats: Mutex::new(HashMap::new()),
                hsm: hsm::Sessions::default(),
                stop: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    fn store(&self) -> &Store {
        &self.shared.store
    }

    fn xks(&self) -> &XksClient {
        &self.shared.xks
    }

    /// `arn:aws:kms:<region>:<account>:key/<id>`.
    pub fn key_arn(&self, key_id: &str) -> String {
        format!(
            "arn:aws:kms:{}:{}:key/{}",
            self.shared.config.region, self.shared.config.account_id, key_id
        )
    }

    /// The caller's principal ARN for an access key ID.
    pub fn principal_for(&self, access_key_id: Option<&str>) -> String {
        access_key_id
            .and_then(|a| self.shared.config.principals.get(a).cloned())
            .unwrap_or_else(|| format!("arn:aws:iam::{}:root", self.shared.config.account_id))
    }

    /// Resolves when serving has stopped.
    async fn stopped(&self) {
        let mut rx = self.shared.stop.subscribe();
        // An error means the sender is gone, which also means stopped.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// A copy of the periodic health-check counters, by store ID.
    pub fn health_stats(&self) -> HashMap<String, HealthCheckStats> {
        self.shared
            .health_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Serves the KMS API on `listeners` until `shutdown` completes, then drains
/// in-flight requests. Background work (connect attempts, health checks) stops too.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let emulator = Emulator::new(config)?;
    serve(emulator, listeners, shutdown).await
}

/// Like [`run`], with an emulator built by the caller (tests inspect it).
pub async fn serve(
    emulator: Emulator,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    emulator.resume_background_work();
    let health = tokio::spawn(keystores::health_loop(emulator.clone()));
    let served = server::serve(emulator.clone(), listeners, shutdown).await;
    emulator.shared.stop.send_replace(true);
    let _ = health.await;
    served
}
