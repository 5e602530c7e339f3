//! The emulator's state — custom key stores, KMS keys and each key's own backing
//! material — kept in memory for fast reads and written through to an embedded,
//! crash-safe `redb` database (in memory by default, a file with `--data-dir`).
//!
//! Why write-through with a full in-memory copy: every request needs a consistent
//! view of one store and its keys (state machine checks), the data set is tiny (at
//! most 10 stores and a few thousand keys), and redb gives atomic, durable commits.
//! The database is the source of truth: if a commit fails, the in-memory copy is
//! reloaded from it, so memory never holds state that was not persisted.
//!
//! Lock discipline: one `std::sync::Mutex` around the in-memory state, held only for
//! short synchronous sections (never across an `.await`); the redb commit happens
//! inside it so that memory and disk change in the same order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::error::KmsError;
use crate::secret::{SecretBytes, SecretString};

const STORES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("custom_key_stores");
const KEYS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kms_keys");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// Bumped when a record's shape changes incompatibly.
const SCHEMA_VERSION: &[u8] = b"1";

/// Seconds since the Unix epoch, with millisecond precision (KMS's `CreationDate`).
pub fn now_epoch() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (d.as_millis() as f64) / 1000.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    #[serde(rename = "CONNECTED")]
    Connected,
    #[serde(rename = "CONNECTING")]
    Connecting,
    #[serde(rename = "FAILED")]
    Failed,
    #[serde(rename = "DISCONNECTED")]
    Disconnected,
    #[serde(rename = "DISCONNECTING")]
    Disconnecting,
}

/// The model's `ConnectionErrorCodeType`, in the model's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConnectionErrorCode {
    InvalidCredentials,
    ClusterNotFound,
    NetworkErrors,
    InternalError,
    InsufficientCloudhsmHsms,
    UserLockedOut,
    UserNotFound,
    UserLoggedIn,
    SubnetNotFound,
    InsufficientFreeAddressesInSubnet,
    XksProxyAccessDenied,
    XksProxyInvalidConfiguration,
    XksProxyInvalidResponse,
    XksProxyInvalidTlsConfiguration,
    XksProxyNotReachable,
    XksProxyTimedOut,
    XksVpcEndpointServiceNotFound,
    XksVpcEndpointServiceInvalidConfiguration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connectivity {
    #[serde(rename = "PUBLIC_ENDPOINT")]
    PublicEndpoint,
    #[serde(rename = "VPC_ENDPOINT_SERVICE")]
    VpcEndpointService,
}

impl Connectivity {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PUBLIC_ENDPOINT" => Some(Self::PublicEndpoint),
            "VPC_ENDPOINT_SERVICE" => Some(Self::VpcEndpointService),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PublicEndpoint => "PUBLIC_ENDPOINT",
            Self::VpcEndpointService => "VPC_ENDPOINT_SERVICE",
        }
    }
}

/// How KMS reaches one external key store proxy. The secret is a [`SecretString`],
/// so `Debug` (and therefore any log line) never shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksSettings {
    /// `https://host`, exactly as validated (no port, no path).
    pub endpoint: String,
    /// `[/prefix]/kms/xks/v1`.
    pub path: String,
    pub connectivity: Connectivity,
    pub access_key_id: String,
    pub secret: SecretString,
    pub vpc_service_name: Option<String>,
    pub vpc_service_owner: Option<String>,
}

/// How KMS reaches one CloudHSM key store's cluster. The password is the kmsuser
/// password KMS believes current (after a connect: the one it rotated to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudHsmSettings {
    pub cluster_id: String,
    /// `TrustAnchorCertificate` exactly as the caller supplied it (Describe echoes it).
    pub trust_anchor: String,
    pub password: SecretString,
    /// Consecutive refused logins on the current cluster. CloudHSM locks kmsuser out
    /// after 5; SoftHSM never locks, so the emulator counts (see `keystores::cloudhsm`).
    pub failed_logins: u32,
    /// Set by UpdateCustomKeyStore `KeyStorePassword`: a locked-out store may try one
    /// login with the new password (the operator has reset it on the cluster).
    pub retry_after_lockout: bool,
}

/// The store type and its own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    External(XksSettings),
    CloudHsm(CloudHsmSettings),
}

/// One custom key store.
#[derive(Debug, Clone)]
pub struct CustomKeyStore {
    pub id: String,
    pub name: String,
    pub creation_date: f64,
    pub connection_state: ConnectionState,
    /// Present only while FAILED.
    pub connection_error_code: Option<ConnectionErrorCode>,
    /// Bumped by every connect and disconnect, so a connect attempt that finishes
    /// after a disconnect (or a newer connect) knows its result is stale and drops it.
    pub attempt: u64,
    pub kind: StoreKind,
}

impl StoreKind {
    pub fn xks(&self) -> Option<&XksSettings> {
        match self {
            StoreKind::External(x) => Some(x),
            StoreKind::CloudHsm(_) => None,
        }
    }
}

impl CustomKeyStore {
    /// The proxy settings of an external key store.
    pub fn xks(&self) -> Option<&XksSettings> {
        match &self.kind {
            StoreKind::External(x) => Some(x),
            StoreKind::CloudHsm(_) => None,
        }
    }

    pub fn xks_mut(&mut self) -> Option<&mut XksSettings> {
        match &mut self.kind {
            StoreKind::External(x) => Some(x),
            StoreKind::CloudHsm(_) => None,
        }
    }

    pub fn cloudhsm(&self) -> Option<&CloudHsmSettings> {
        match &self.kind {
            StoreKind::CloudHsm(c) => Some(c),
            StoreKind::External(_) => None,
        }
    }

    pub fn cloudhsm_mut(&mut self) -> Option<&mut CloudHsmSettings> {
        match &mut self.kind {
            StoreKind::CloudHsm(c) => Some(c),
            StoreKind::External(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    #[serde(rename = "AWS_KMS")]
    AwsKms,
    #[serde(rename = "EXTERNAL_KEY_STORE")]
    ExternalKeyStore,
    /// Material in a CloudHSM key store's cluster (the token), labelled with the ARN;
    /// `KmsKey::material` is unused for these keys.
    #[serde(rename = "AWS_CLOUDHSM")]
    AwsCloudHsm,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwsKms => "AWS_KMS",
            Self::ExternalKeyStore => "EXTERNAL_KEY_STORE",
            Self::AwsCloudHsm => "AWS_CLOUDHSM",
        }
    }
}

/// The state KMS stores for a key; `Unavailable` is derived, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredKeyState {
    Enabled,
    Disabled,
    PendingDeletion,
}

/// A KMS key. `material` is the emulator's own 256-bit backing key: for an XKS key
/// it is the inner layer of the double encryption; for an `AWS_KMS` key the only one.
#[derive(Debug, Clone)]
pub struct KmsKey {
    /// The key ID (a UUID).
    pub id: String,
    pub arn: String,
    pub origin: Origin,
    pub custom_key_store_id: Option<String>,
    pub xks_key_id: Option<String>,
    pub state: StoredKeyState,
    pub description: String,
    pub policy: String,
    pub tags: Vec<(String, String)>,
    pub creation_date: f64,
    /// Reported `DeletionDate` (real days from scheduling).
    pub deletion_date: Option<f64>,
    pub pending_window_days: Option<u32>,
    /// When the key really disappears: `--deletion-day-length` scales the wait so
    /// tests need not wait days; equal to `deletion_date` by default.
    pub purge_at: Option<f64>,
    pub material: SecretBytes,
    /// Random ID of the backing material; every ciphertext carries it, so two KMS
    /// keys over the same external key can never read each other's data.
    pub backing_key_id: [u8; 16],
}

/// Everything the emulator knows.
#[derive(Debug, Default)]
pub struct State {
    pub stores: BTreeMap<String, CustomKeyStore>,
    pub keys: BTreeMap<String, KmsKey>,
}

impl State {
    pub fn store_by_name(&self, name: &str) -> Option<&CustomKeyStore> {
        self.stores.values().find(|s| s.name == name)
    }

    pub fn keys_in_store<'a>(&'a self, store_id: &'a str) -> impl Iterator<Item = &'a KmsKey> {
        self.keys
            .values()
            .filter(move |k| k.custom_key_store_id.as_deref() == Some(store_id))
    }
}

/// Which records a transaction touched; only those are written.
#[derive(Debug, Default)]
pub struct Changes {
    stores: BTreeSet<String>,
    keys: BTreeSet<String>,
}

impl Changes {
    pub fn store(&mut self, id: &str) {
        self.stores.insert(id.to_owned());
    }

    pub fn key(&mut self, id: &str) {
        self.keys.insert(id.to_owned());
    }

    fn is_empty(&self) -> bool {
        self.stores.is_empty() && self.keys.is_empty()
    }
}

/// The state plus its database.
pub struct Store {
    db: redb::Database,
    state: Mutex<State>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Why the state could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("emulator database: {0}")]
    Db(String),
    #[error("emulator database holds an unreadable record {0}")]
    Corrupt(String),
    #[error("emulator database schema version {0} is not supported by this build")]
    Schema(String),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

impl Store {
    /// An in-memory database: the state lives as long as the process.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(db_err)?;
        Self::from_db(db)
    }

    /// A database file `kms-emulator.redb` in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = redb::Database::create(dir.join("kms-emulator.redb")).map_err(db_err)?;
        Self::from_db(db)
    }

    fn from_db(db: redb::Database) -> Result<Self, StoreError> {
        // Create the tables and check the schema version in one transaction.
        let tx = db.begin_write().map_err(db_err)?;
        {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let existing = meta
                .get("schema")
                .map_err(db_err)?
                .map(|v| v.value().to_vec());
            match existing {
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(db_err)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => return Err(StoreError::Schema(String::from_utf8_lossy(&v).into())),
            }
            tx.open_table(STORES).map_err(db_err)?;
            tx.open_table(KEYS).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        let state = load(&db)?;
        Ok(Self {
            db,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change behind
        // that matters: the database is the truth and is reloaded on failure.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read-only access to a consistent snapshot.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let guard = self.lock();
        f(&guard)
    }

    /// Runs `f` on the state; records it marks in [`Changes`] are committed to the
    /// database atomically before the lock is released. If `f` fails it must not have
    /// changed anything (every operation checks first, then mutates).
    pub fn transact<T>(
        &self,
        f: impl FnOnce(&mut State, &mut Changes) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let mut guard = self.lock();
        let mut changes = Changes::default();
        let out = f(&mut guard, &mut changes)?;
        if changes.is_empty() {
            return Ok(out);
        }
        if let Err(e) = persist(&self.db, &guard, &changes) {
            // Memory ran ahead of the database: throw it away.
            match load(&self.db) {
                Ok(fresh) => *guard = fresh,
                Err(reload) => tracing::error!(error = %reload, "reloading state failed"),
            }
            return Err(KmsError::internal(&e));
        }
        Ok(out)
    }

    /// The one way an operation calls out — the XKS proxy, a CloudHSM token — between
    /// its checks and its change: `check` runs on a snapshot and hands `call` what it
    /// needs; the lock is released for the call (it is never held across an
    /// `.await`); then, in the transaction, `check` runs again on the state as it is
    /// *now* — another request may have taken the name or the endpoint, or moved the
    /// store's connection, meanwhile — and `apply` gets the re-check's result and the
    /// call's. A refusal by the first check means no call; a refusal by the re-check
    /// or by `apply` means no change, and `undo` gets the call's result back so that a
    /// call with a side effect (a key made in a token) can be reverted.
    pub async fn check_call_recheck<P, R, T, Fut>(
        &self,
        check: impl Fn(&State) -> Result<P, KmsError>,
        call: impl FnOnce(P) -> Fut,
        apply: impl FnOnce(&mut State, &mut Changes, P, &R) -> Result<T, KmsError>,
        undo: impl FnOnce(R),
    ) -> Result<T, KmsError>
    where
        Fut: std::future::Future<Output = Result<R, KmsError>>,
    {
        let checked = self.read(&check)?;
        let called = call(checked).await?;
        let applied = self.transact(|st, ch| {
            let now = check(st)?;
            apply(st, ch, now, &called)
        });
        if applied.is_err() {
            undo(called);
        }
        applied
    }
}

fn persist(db: &redb::Database, state: &State, changes: &Changes) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(db_err)?;
    {
        let mut stores = tx.open_table(STORES).map_err(db_err)?;
        for id in &changes.stores {
            match state.stores.get(id) {
                Some(s) => {
                    let mut bytes = encode_store(s)?;
                    stores
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(db_err)?;
                    bytes.zeroize();
                }
                None => {
                    stores.remove(id.as_str()).map_err(db_err)?;
                }
            }
        }
        let mut keys = tx.open_table(KEYS).map_err(db_err)?;
        for id in &changes.keys {
            match state.keys.get(id) {
                Some(k) => {
                    let mut bytes = encode_key(k)?;
                    keys.insert(id.as_str(), bytes.as_slice()).map_err(db_err)?;
                    bytes.zeroize();
                }
                None => {
                    keys.remove(id.as_str()).map_err(db_err)?;
                }
            }
        }
    }
    tx.commit().map_err(db_err)
}

fn load(db: &redb::Database) -> Result<State, StoreError> {
    let tx = db.begin_read().map_err(db_err)?;
    let mut state = State::default();
    let stores = tx.open_table(STORES).map_err(db_err)?;
    for row in stores.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        let s = decode_store(v.value()).ok_or_else(|| StoreError::Corrupt(k.value().into()))?;
        state.stores.insert(s.id.clone(), s);
    }
    let keys = tx.open_table(KEYS).map_err(db_err)?;
    for row in keys.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        let key = decode_key(v.value()).ok_or_else(|| StoreError::Corrupt(k.value().into()))?;
        state.keys.insert(key.id.clone(), key);
    }
    Ok(state)
}

// --- On-disk records -------------------------------------------------------------
//
// Separate serde types keep `Serialize` off the in-memory types that hold secrets:
// the only path from a secret to bytes is these encoders, whose output goes straight
// into the database and is wiped afterwards.

/// A store. The XKS fields are the record's original shape (every record written
/// before CloudHSM stores existed is an external key store with them set); a CloudHSM
/// store leaves them absent and sets `cloudhsm` instead.
#[derive(Serialize, Deserialize)]
struct StoreRecord {
    id: String,
    name: String,
    creation_date: f64,
    connection_state: ConnectionState,
    connection_error_code: Option<ConnectionErrorCode>,
    attempt: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    connectivity: Option<Connectivity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default)]
    vpc_service_name: Option<String>,
    #[serde(default)]
    vpc_service_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cloudhsm: Option<CloudHsmRecord>,
}

#[derive(Serialize, Deserialize)]
struct CloudHsmRecord {
    cluster_id: String,
    trust_anchor: String,
    password: String,
    failed_logins: u32,
    retry_after_lockout: bool,
}

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    id: String,
    arn: String,
    origin: Origin,
    custom_key_store_id: Option<String>,
    xks_key_id: Option<String>,
    state: StoredKeyState,
    description: String,
    policy: String,
    tags: Vec<(String, String)>,
    creation_date: f64,
    deletion_date: Option<f64>,
    pending_window_days: Option<u32>,
    purge_at: Option<f64>,
    /// Base64 of the 32-byte backing material.
    material: String,
    backing_key_id: String,
}

fn encode_store(s: &CustomKeyStore) -> Result<Vec<u8>, StoreError> {
    let mut rec = StoreRecord {
        id: s.id.clone(),
        name: s.name.clone(),
        creation_date: s.creation_date,
        connection_state: s.connection_state,
        connection_error_code: s.connection_error_code,
        attempt: s.attempt,
        endpoint: None,
        path: None,
        connectivity: None,
        access_key_id: None,
        secret: None,
        vpc_service_name: None,
        vpc_service_owner: None,
        cloudhsm: None,
    };
    match &s.kind {
        StoreKind::External(x) => {
            rec.endpoint = Some(x.endpoint.clone());
            rec.path = Some(x.path.clone());
            rec.connectivity = Some(x.connectivity);
            rec.access_key_id = Some(x.access_key_id.clone());
            rec.secret = Some(x.secret.expose().to_owned());
            rec.vpc_service_name = x.vpc_service_name.clone();
            rec.vpc_service_owner = x.vpc_service_owner.clone();
        }
        StoreKind::CloudHsm(c) => {
            rec.cloudhsm = Some(CloudHsmRecord {
                cluster_id: c.cluster_id.clone(),
                trust_anchor: c.trust_anchor.clone(),
                password: c.password.expose().to_owned(),
                failed_logins: c.failed_logins,
                retry_after_lockout: c.retry_after_lockout,
            });
        }
    }
    let out = serde_json::to_vec(&rec).map_err(db_err);
    rec.secret.zeroize();
    if let Some(c) = &mut rec.cloudhsm {
        c.password.zeroize();
    }
    out
}

fn decode_store(bytes: &[u8]) -> Option<CustomKeyStore> {
    let rec: StoreRecord = serde_json::from_slice(bytes).ok()?;
    let kind = match rec.cloudhsm {
        Some(c) => StoreKind::CloudHsm(CloudHsmSettings {
            cluster_id: c.cluster_id,
            trust_anchor: c.trust_anchor,
            password: SecretString::new(c.password),
            failed_logins: c.failed_logins,
            retry_after_lockout: c.retry_after_lockout,
        }),
        None => StoreKind::External(XksSettings {
            endpoint: rec.endpoint?,
            path: rec.path?,
            connectivity: rec.connectivity?,
            access_key_id: rec.access_key_id?,
            secret: SecretString::new(rec.secret?),
            vpc_service_name: rec.vpc_service_name,
            vpc_service_owner: rec.vpc_service_owner,
        }),
    };
    Some(CustomKeyStore {
        id: rec.id,
        name: rec.name,
        creation_date: rec.creation_date,
        connection_state: rec.connection_state,
        connection_error_code: rec.connection_error_code,
        attempt: rec.attempt,
        kind,
    })
}

fn encode_key(k: &KmsKey) -> Result<Vec<u8>, StoreError> {
    let mut rec = KeyRecord {
        id: k.id.clone(),
        arn: k.arn.clone(),
        origin: k.origin,
        custom_key_store_id: k.custom_key_store_id.clone(),
        xks_key_id: k.xks_key_id.clone(),
        state: k.state,
        description: k.description.clone(),
        policy: k.policy.clone(),
        tags: k.tags.clone(),
        creation_date: k.creation_date,
        deletion_date: k.deletion_date,
        pending_window_days: k.pending_window_days,
        purge_at: k.purge_at,
        material: STANDARD.encode(k.material.expose()),
        backing_key_id: hex::encode(k.backing_key_id),
    };
    let out = serde_json::to_vec(&rec).map_err(db_err);
    rec.material.zeroize();
    out
}

fn decode_key(bytes: &[u8]) -> Option<KmsKey> {
    let mut rec: KeyRecord = serde_json::from_slice(bytes).ok()?;
    let material = SecretBytes::new(STANDARD.decode(&rec.material).ok()?);
    rec.material.zeroize();
    if material.len() != 32 {
        return None;
    }
    let backing_key_id: [u8; 16] = hex::decode(&rec.backing_key_id).ok()?.try_into().ok()?;
    Some(KmsKey {
        id: rec.id,
        arn: rec.arn,
        origin: rec.origin,
        custom_key_store_id: rec.custom_key_store_id,
        xks_key_id: rec.xks_key_id,
        state: rec.state,
        description: rec.description,
        policy: rec.policy,
        tags: rec.tags,
        creation_date: rec.creation_date,
        deletion_date: rec.deletion_date,
        pending_window_days: rec.pending_window_days,
        purge_at: rec.purge_at,
        material,
        backing_key_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_store() -> CustomKeyStore {
        CustomKeyStore {
            id: "cks-0123456789abcdef0".into(),
            name: "s".into(),
            creation_date: 1.5,
            connection_state: ConnectionState::Disconnected,
            connection_error_code: None,
            attempt: 0,
            kind: StoreKind::External(XksSettings {
                endpoint: "https://xks.test.example".into(),
                path: "/kms/xks/v1".into(),
                connectivity: Connectivity::PublicEndpoint,
                access_key_id: "AKIA4GBY3I6JCE5M2HPM".into(),
                secret: SecretString::from("very-secret-value-that-must-not-leak-000000"),
                vpc_service_name: None,
                vpc_service_owner: None,
            }),
        }
    }

    fn sample_cloudhsm_store() -> CustomKeyStore {
        CustomKeyStore {
            id: "cks-1123456789abcdef0".into(),
            name: "h".into(),
            creation_date: 2.5,
            connection_state: ConnectionState::Failed,
            connection_error_code: Some(ConnectionErrorCode::UserLockedOut),
            attempt: 3,
            kind: StoreKind::CloudHsm(CloudHsmSettings {
                cluster_id: "cluster-abcdefghijk".into(),
                trust_anchor: "-----BEGIN CERTIFICATE-----".into(),
                password: SecretString::from("kmsuserPasswordNeverShown"),
                failed_logins: 5,
                retry_after_lockout: true,
            }),
        }
    }

    #[test]
    fn debug_of_a_cloudhsm_store_hides_the_password() {
        let shown = format!("{:?}", sample_cloudhsm_store());
        assert!(!shown.contains("kmsuserPassword"), "{shown}");
    }

    #[test]
    fn a_cloudhsm_store_survives_reopening_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .transact(|st, ch| {
                    let s = sample_cloudhsm_store();
                    ch.store(&s.id);
                    st.stores.insert(s.id.clone(), s);
                    Ok(())
                })
                .expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let s = store
            .read(|st| st.stores.get("cks-1123456789abcdef0").cloned())
            .expect("store persisted");
        assert_eq!(s.kind, sample_cloudhsm_store().kind);
        assert_eq!(
            s.connection_error_code,
            Some(ConnectionErrorCode::UserLockedOut)
        );
    }

    /// A data dir written before CloudHSM stores existed: the record as that code
    /// wrote it (every XKS field, no `cloudhsm`) still opens as the same XKS store.
    #[test]
    fn an_xks_record_of_the_original_shape_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = serde_json::json!({
            "id": "cks-0123456789abcdef0", "name": "old", "creation_date": 1.5,
            "connection_state": "CONNECTED", "connection_error_code": null, "attempt": 7,
            "endpoint": "https://xks.test.example", "path": "/kms/xks/v1",
            "connectivity": "PUBLIC_ENDPOINT", "access_key_id": "AKIA4GBY3I6JCE5M2HPM",
            "secret": "very-secret-value-that-must-not-leak-000000",
            "vpc_service_name": null, "vpc_service_owner": null
        })
        .to_string();
        {
            let store = Store::open(dir.path()).expect("open");
            let tx = store.db.begin_write().expect("tx");
            {
                let mut t = tx.open_table(STORES).expect("table");
                t.insert("cks-0123456789abcdef0", old.as_bytes())
                    .expect("insert");
            }
            tx.commit().expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let s = store
            .read(|st| st.stores.get("cks-0123456789abcdef0").cloned())
            .expect("loaded");
        let mut want = sample_store();
        want.name = "old".into();
        assert_eq!(s.kind, want.kind);
        assert_eq!(s.attempt, 7);
        assert_eq!(s.connection_state, ConnectionState::Connected);
    }

    #[test]
    fn debug_of_a_store_hides_the_secret() {
        let shown = format!("{:?}", sample_store());
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn state_survives_reopening_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .transact(|st, ch| {
                    let s = sample_store();
                    ch.store(&s.id);
                    st.stores.insert(s.id.clone(), s);
                    Ok(())
                })
                .expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let s = store
            .read(|st| st.stores.get("cks-0123456789abcdef0").cloned())
            .expect("store persisted");
        assert_eq!(
            s.xks().expect("xks").secret.expose(),
            "very-secret-value-that-must-not-leak-000000"
        );
        assert_eq!(s.connection_state, ConnectionState::Disconnected);
    }

    #[test]
    fn a_failed_closure_commits_nothing() {
        let store = Store::in_memory().expect("memory");
        let r: Result<(), KmsError> = store.transact(|_, _| Err(KmsError::validation("no")));
        assert!(r.is_err());
        assert!(store.read(|st| st.stores.is_empty()));
    }

    /// The check of [`Store::check_call_recheck`] for these tests: the name "s" is
    /// free (as Create's name-uniqueness rule, brief §3.2).
    fn name_free(st: &State) -> Result<usize, KmsError> {
        match st.store_by_name("s") {
            Some(_) => Err(KmsError::new(
                crate::kms::Exception::CustomKeyStoreNameInUse,
                "taken",
            )),
            None => Ok(st.stores.len()),
        }
    }

    fn add(st: &mut State, ch: &mut Changes, s: CustomKeyStore) {
        ch.store(&s.id);
        st.stores.insert(s.id.clone(), s);
    }

    /// keystores module doc: "check everything under the lock, release it for the
    /// call, then re-check under the lock before applying".
    #[tokio::test]
    async fn the_recheck_sees_what_changed_during_the_call_and_undoes_it() {
        let store = Store::in_memory().expect("memory");
        let undone = std::cell::Cell::new(None);
        let r = store
            .check_call_recheck(
                name_free,
                |_| async {
                    // Another request takes the name while the call is out.
                    store.transact(|st, ch| {
                        add(st, ch, sample_store());
                        Ok(())
                    })?;
                    Ok("made in the token")
                },
                |_, _, _, _| -> Result<(), KmsError> { panic!("applied after a refused re-check") },
                |made| undone.set(Some(made)),
            )
            .await;
        assert_eq!(
            r.map_err(|e| e.exception),
            Err(crate::kms::Exception::CustomKeyStoreNameInUse)
        );
        assert_eq!(undone.get(), Some("made in the token"));
    }

    #[tokio::test]
    async fn a_refused_first_check_makes_no_call() {
        let store = Store::in_memory().expect("memory");
        store
            .transact(|st, ch| {
                add(st, ch, sample_store());
                Ok(())
            })
            .expect("seed");
        let called = std::cell::Cell::new(false);
        let r = store
            .check_call_recheck(
                name_free,
                |_| async {
                    called.set(true);
                    Ok(())
                },
                |_, _, _, _| Ok(()),
                |()| panic!("nothing to undo"),
            )
            .await;
        assert!(r.is_err());
        assert!(!called.get());
    }

    #[tokio::test]
    async fn apply_gets_the_recheck_and_the_call_and_commits() {
        let store = Store::in_memory().expect("memory");
        let r = store
            .check_call_recheck(
                name_free,
                |before| async move { Ok(before + 40) },
                |st, ch, now, called| {
                    add(st, ch, sample_store());
                    Ok(now + called + 2)
                },
                |_| panic!("nothing to undo"),
            )
            .await;
        assert_eq!(r.expect("applied"), 42);
        assert!(store.read(|st| st.store_by_name("s").is_some()));
    }
}
