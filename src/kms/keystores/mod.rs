//! The six custom-key-store operations (Create, Connect, Disconnect, Update,
//! Describe, Delete): what every store type shares — the request shapes, names and
//! their uniqueness, the connection state machine and the background connect attempt,
//! Describe's paging, Delete's rules. What only external key stores have (the proxy
//! settings, their validation and uniqueness, Update's rules, the periodic
//! `KmsHealthCheck`) lives in [`xks`]; what only CloudHSM key stores have (the cluster
//! checks, Update's rules, the kmsuser login and password rotation) in [`cloudhsm`];
//! so the rules of each store type read apart.
//!
//! Every operation that calls out (the proxy, a token) goes through
//! [`Store::check_call_recheck`](super::store::Store::check_call_recheck): check
//! everything under the lock, release it for the call, then re-check under the lock
//! before applying — another request may have changed the store meanwhile.

pub mod cloudhsm;
pub mod xks;

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::error::{Exception, KmsError};
use super::store::{
    ConnectionErrorCode, ConnectionState, Connectivity, CustomKeyStore, State, StoreKind,
    XksSettings, now_epoch,
};
use super::validate::{self as v, Shown, Violations};
use super::{Ctx, Emulator};
use crate::secret::SecretString;
use xks::{check_xks_members, health_metadata, xks_members_of_create};
pub(super) use xks::{health_loop, target_of};

/// At most this many custom key stores per account and Region (not raisable).
pub const MAX_STORES: usize = 10;
const XKS_TYPE: &str = "EXTERNAL_KEY_STORE";
const CLOUDHSM_TYPE: &str = "AWS_CLOUDHSM";
const DEFAULT_PAGE: usize = 1000;

/// A sensitive string from a request: never shown by `Debug`, zeroized on drop.
#[derive(Debug, Clone)]
pub struct SecretInput(pub SecretString);

impl<'de> Deserialize<'de> for SecretInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(SecretString::new(s)))
    }
}

/// `XksProxyAuthenticationCredential`: both members are sensitive.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CredentialInput {
    pub access_key_id: Option<SecretInput>,
    pub raw_secret_access_key: Option<SecretInput>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateCustomKeyStoreRequest {
    pub custom_key_store_name: Option<String>,
    pub cloud_hsm_cluster_id: Option<String>,
    pub trust_anchor_certificate: Option<String>,
    pub key_store_password: Option<SecretInput>,
    pub custom_key_store_type: Option<String>,
    pub xks_proxy_uri_endpoint: Option<String>,
    pub xks_proxy_uri_path: Option<String>,
    pub xks_proxy_vpc_endpoint_service_name: Option<String>,
    pub xks_proxy_vpc_endpoint_service_owner: Option<String>,
    pub xks_proxy_authentication_credential: Option<CredentialInput>,
    pub xks_proxy_connectivity: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateCustomKeyStoreResponse {
    pub custom_key_store_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StoreIdRequest {
    pub custom_key_store_id: Option<String>,
}

/// The `{}` answer of operations without output.
#[derive(Debug, Serialize)]
pub struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateCustomKeyStoreRequest {
    pub custom_key_store_id: Option<String>,
    pub new_custom_key_store_name: Option<String>,
    pub key_store_password: Option<SecretInput>,
    pub cloud_hsm_cluster_id: Option<String>,
    pub xks_proxy_uri_endpoint: Option<String>,
    pub xks_proxy_uri_path: Option<String>,
    pub xks_proxy_vpc_endpoint_service_name: Option<String>,
    pub xks_proxy_vpc_endpoint_service_owner: Option<String>,
    pub xks_proxy_authentication_credential: Option<CredentialInput>,
    pub xks_proxy_connectivity: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeCustomKeyStoresRequest {
    pub custom_key_store_id: Option<String>,
    pub custom_key_store_name: Option<String>,
    pub limit: Option<i64>,
    pub marker: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeCustomKeyStoresResponse {
    pub custom_key_stores: Vec<CustomKeyStoresListEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
    pub truncated: bool,
}

/// One store as Describe shows it. There is deliberately no field for the XKS secret
/// or the CloudHSM password.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CustomKeyStoresListEntry {
    pub custom_key_store_id: String,
    pub custom_key_store_name: String,
    pub custom_key_store_type: &'static str,
    pub creation_date: f64,
    pub connection_state: ConnectionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_error_code: Option<ConnectionErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xks_proxy_configuration: Option<XksProxyConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_hsm_cluster_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_anchor_certificate: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct XksProxyConfiguration {
    pub connectivity: Connectivity,
    pub access_key_id: String,
    pub uri_endpoint: String,
    pub uri_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint_service_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vpc_endpoint_service_owner: Option<String>,
}

fn not_found(id: &str) -> KmsError {
    KmsError::new(
        Exception::CustomKeyStoreNotFound,
        format!("Custom key store {id} does not exist in this account and Region."),
    )
}

fn invalid_state(id: &str, state: ConnectionState, what: &str) -> KmsError {
    KmsError::new(
        Exception::CustomKeyStoreInvalidState,
        format!(
            "Custom key store {id} is in the {} state; {what}",
            serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
    )
}

/// Name uniqueness (brief §3.2) against every store but `exclude`, then the
/// store type's own uniqueness rules.
fn check_unique(
    state: &State,
    exclude: Option<&str>,
    name: Option<&str>,
    xks: Option<&XksSettings>,
) -> Result<(), KmsError> {
    if let Some(name) = name
        && state
            .stores
            .values()
            .any(|s| Some(s.id.as_str()) != exclude && s.name == name)
    {
        return Err(KmsError::new(
            Exception::CustomKeyStoreNameInUse,
            format!(
                "The custom key store name {name} is already assigned to another custom key \
                 store in this account and Region. Use a unique name."
            ),
        ));
    }
    match xks {
        Some(x) => xks::check_unique(state, exclude, x),
        None => Ok(()),
    }
}

fn new_store_id() -> Result<String, KmsError> {
    let bytes: [u8; 9] = random()?;
    let mut hex = hex::encode(bytes);
    hex.truncate(17);
    Ok(format!("cks-{hex}"))
}

/// Random bytes from the OS.
pub(super) fn random<const N: usize>() -> Result<[u8; N], KmsError> {
    let mut out = [0u8; N];
    crate::crypto::rand::SecureRandom::fill(&crate::crypto::rand::SystemRandom::new(), &mut out)
        .map_err(|_| KmsError::internal(&"the system random number generator failed"))?;
    Ok(out)
}

fn store_id_of(req: &StoreIdRequest) -> Result<String, KmsError> {
    checked_store_id(&req.custom_key_store_id)
}

/// The `CustomKeyStoreId` member every per-store operation takes: required, 1–64.
fn checked_store_id(id: &Option<String>) -> Result<String, KmsError> {
    let mut vs = Violations::new();
    vs.required("customKeyStoreId", id);
    vs.length("customKeyStoreId", id.as_deref(), 1, 64, Shown::Yes);
    vs.finish()?;
    Ok(id.clone().unwrap_or_default())
}

/// Update's state rule for both store types (brief §3.5, §3.8): a store changes only
/// while CONNECTED or DISCONNECTED, and the `offline` fields (where KMS connects to:
/// `what` names them) only while DISCONNECTED.
fn check_update_state(
    id: &str,
    state: ConnectionState,
    offline: bool,
    what: &str,
) -> Result<(), KmsError> {
    match state {
        ConnectionState::Disconnected => Ok(()),
        ConnectionState::Connected if offline => Err(invalid_state(id, state, what)),
        ConnectionState::Connected => Ok(()),
        ConnectionState::Connecting | ConnectionState::Disconnecting | ConnectionState::Failed => {
            Err(invalid_state(
                id,
                state,
                "a store can be updated only while CONNECTED or DISCONNECTED.",
            ))
        }
    }
}

/// UpdateCustomKeyStore's members whose syntax is the same for both store types (the
/// type-specific rules then say which of them a store may change).
fn check_update_members(vs: &mut Violations, req: &UpdateCustomKeyStoreRequest) {
    vs.length(
        "newCustomKeyStoreName",
        req.new_custom_key_store_name.as_deref(),
        1,
        256,
        Shown::Yes,
    );
    vs.length(
        "keyStorePassword",
        req.key_store_password.as_ref().map(|p| p.0.expose()),
        7,
        32,
        Shown::Redacted,
    );
    vs.string(
        "cloudHsmClusterId",
        req.cloud_hsm_cluster_id.as_deref(),
        19,
        24,
        v::is_cluster_id,
        v::CLUSTER_ID_PATTERN,
        Shown::Yes,
    );
}

/// `CustomKeyStoreType`, parsed once (`AWS_CLOUDHSM` when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreType {
    CloudHsm,
    External,
}

impl StoreType {
    fn parse(s: &str) -> Option<Self> {
        match s {
            CLOUDHSM_TYPE => Some(Self::CloudHsm),
            XKS_TYPE => Some(Self::External),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::CloudHsm => CLOUDHSM_TYPE,
            Self::External => XKS_TYPE,
        }
    }
}

/// The quota of [`MAX_STORES`] custom key stores (brief §2), counting every type and
/// every connection state.
fn check_store_limit(st: &State) -> Result<(), KmsError> {
    if st.stores.len() >= MAX_STORES {
        return Err(KmsError::new(
            Exception::LimitExceeded,
            format!(
                "You have reached the maximum of {MAX_STORES} custom key stores in this \
                 account and Region."
            ),
        ));
    }
    Ok(())
}

/// CreateCustomKeyStore's members against the model (every violation at once), and
/// the store type they ask for.
fn check_create_members(req: &CreateCustomKeyStoreRequest) -> Result<StoreType, KmsError> {
    let mut vs = Violations::new();
    vs.required("customKeyStoreName", &req.custom_key_store_name);
    vs.length(
        "customKeyStoreName",
        req.custom_key_store_name.as_deref(),
        1,
        256,
        Shown::Yes,
    );
    vs.one_of(
        "customKeyStoreType",
        req.custom_key_store_type.as_deref(),
        &[CLOUDHSM_TYPE, XKS_TYPE],
    );
    vs.string(
        "cloudHsmClusterId",
        req.cloud_hsm_cluster_id.as_deref(),
        19,
        24,
        v::is_cluster_id,
        v::CLUSTER_ID_PATTERN,
        Shown::Yes,
    );
    vs.length(
        "trustAnchorCertificate",
        req.trust_anchor_certificate.as_deref(),
        1,
        5000,
        Shown::Yes,
    );
    vs.length(
        "keyStorePassword",
        req.key_store_password.as_ref().map(|p| p.0.expose()),
        7,
        32,
        Shown::Redacted,
    );
    check_xks_members(&mut vs, xks_members_of_create(req), false);
    vs.finish()?;
    // `one_of` let only the model's values through.
    Ok(req
        .custom_key_store_type
        .as_deref()
        .and_then(StoreType::parse)
        .unwrap_or(StoreType::CloudHsm))
}

/// The members the store type needs and the other type's members it must not have
/// (KMS's exact reaction is unknown; brief §3.1: Validation), then an external key
/// store's connectivity rules. Gives the connectivity (PUBLIC when absent).
fn check_type_members(
    req: &CreateCustomKeyStoreRequest,
    store_type: StoreType,
) -> Result<Connectivity, KmsError> {
    let mut vs = Violations::new();
    let hsm_members = [
        ("cloudHsmClusterId", req.cloud_hsm_cluster_id.is_some()),
        (
            "trustAnchorCertificate",
            req.trust_anchor_certificate.is_some(),
        ),
        ("keyStorePassword", req.key_store_password.is_some()),
    ];
    let xks_members = xks::members_present(&xks_members_of_create(req));
    let (required, foreign) = match store_type {
        // The first four XKS members are required; the VPC ones depend on connectivity.
        StoreType::External => (&xks_members[..4], &hsm_members[..]),
        StoreType::CloudHsm => (&hsm_members[..], &xks_members[..]),
    };
    let type_name = store_type.as_str();
    for (member, present) in required {
        if !present {
            vs.custom(
                member,
                None,
                Shown::Yes,
                &format!("Member must not be null for a {type_name} custom key store"),
            );
        }
    }
    for (member, present) in foreign {
        if *present {
            vs.custom(
                member,
                Some(""),
                Shown::Redacted,
                &format!("Member is not valid for a {type_name} custom key store"),
            );
        }
    }
    let connectivity = req
        .xks_proxy_connectivity
        .as_deref()
        .and_then(Connectivity::parse)
        .unwrap_or(Connectivity::PublicEndpoint);
    if store_type == StoreType::External {
        let m = xks_members_of_create(req);
        xks::check_connectivity_members(
            &mut vs,
            connectivity,
            xks::ConnectivityChange::Create,
            m.endpoint,
            m.vpc_name,
            m.vpc_owner,
        );
    }
    vs.finish()?;
    Ok(connectivity)
}

impl Emulator {
    /// CreateCustomKeyStore (brief §3.2): the members' syntax, the store type's own
    /// members, then quota, name, the type's uniqueness and cluster rules and, for a
    /// PUBLIC external key store, the proxy's health — checked again when the new
    /// store is recorded DISCONNECTED.
    pub async fn create_custom_key_store(
        &self,
        ctx: &Ctx,
        req: CreateCustomKeyStoreRequest,
    ) -> Result<CreateCustomKeyStoreResponse, KmsError> {
        let store_type = check_create_members(&req)?;
        let connectivity = check_type_members(&req, store_type)?;
        let name = req.custom_key_store_name.clone().unwrap_or_default();
        let kind = match store_type {
            StoreType::External => StoreKind::External(xks::settings_of_create(
                req,
                connectivity,
                &self.config().account_id,
            )?),
            StoreType::CloudHsm => StoreKind::CloudHsm(cloudhsm::settings_of_create(req)?),
        };
        let id = self
            .store()
            .check_call_recheck(
                |st| self.check_new_store(st, &name, &kind),
                |()| self.create_health_check(ctx, &kind),
                |st, ch, (), ()| {
                    let id = new_store_id()?;
                    st.stores.insert(
                        id.clone(),
                        CustomKeyStore {
                            id: id.clone(),
                            name: name.clone(),
                            creation_date: now_epoch(),
                            connection_state: ConnectionState::Disconnected,
                            connection_error_code: None,
                            attempt: 0,
                            kind: kind.clone(),
                        },
                    );
                    ch.store(&id);
                    Ok(id)
                },
                |()| {},
            )
            .await?;
        // The name is the caller's: a `&str` field, escaped by both log formats.
        tracing::info!(custom_key_store_id = %id, name = name.as_str(), "custom key store created");
        Ok(CreateCustomKeyStoreResponse {
            custom_key_store_id: id,
        })
    }

    /// What a new store must satisfy against the others, in the order that decides
    /// which error wins: the quota, the name, then the type's own rules.
    fn check_new_store(&self, st: &State, name: &str, kind: &StoreKind) -> Result<(), KmsError> {
        check_store_limit(st)?;
        check_unique(st, None, Some(name), kind.xks())?;
        match kind {
            StoreKind::External(_) => Ok(()),
            StoreKind::CloudHsm(c) => self.check_new_cluster(st, c),
        }
    }

    pub fn connect_custom_key_store(
        &self,
        ctx: &Ctx,
        req: StoreIdRequest,
    ) -> Result<Empty, KmsError> {
        let id = store_id_of(&req)?;
        let started = self.store().transact(|st, ch| {
            let s = st.stores.get_mut(&id).ok_or_else(|| not_found(&id))?;
            match s.connection_state {
                ConnectionState::Disconnected => {
                    if let Some(c) = s.cloudhsm() {
                        self.cloudhsm_connect_check(c)?;
                    }
                    s.connection_state = ConnectionState::Connecting;
                    s.connection_error_code = None;
                    s.attempt += 1;
                    ch.store(&id);
                    Ok(Some(s.attempt))
                }
                // Already connecting or connected: accepted, nothing changes.
                ConnectionState::Connecting | ConnectionState::Connected => Ok(None),
                ConnectionState::Failed => Err(invalid_state(
                    &id,
                    s.connection_state,
                    "disconnect it before you connect it again.",
                )),
                ConnectionState::Disconnecting => Err(invalid_state(
                    &id,
                    s.connection_state,
                    "wait until it is DISCONNECTED, then connect it.",
                )),
            }
        })?;
        if let Some(attempt) = started {
            self.spawn_connect(id, attempt, ctx.request_id.clone());
        }
        Ok(Empty {})
    }

    /// Runs one connect attempt in the background; the result is applied only if the
    /// attempt is still the store's current one.
    fn spawn_connect(&self, id: String, attempt: u64, request_id: String) {
        let emu = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = emu.stopped() => {}
                _ = emu.connect_attempt(&id, attempt, &request_id) => {}
            }
        });
    }

    async fn connect_attempt(&self, id: &str, attempt: u64, request_id: &str) {
        tokio::time::sleep(self.config().connect_delay).await;
        if self
            .store()
            .read(|st| st.stores.get(id).is_some_and(|s| s.cloudhsm().is_some()))
        {
            return self.cloudhsm_connect_attempt(id, attempt).await;
        }
        let current = |s: &CustomKeyStore| {
            s.attempt == attempt && s.connection_state == ConnectionState::Connecting
        };
        let Some(target) = self
            .store()
            .read(|st| st.stores.get(id).filter(|s| current(s)).and_then(target_of))
        else {
            return;
        };
        let result = self
            .xks()
            .health(
                &target,
                health_metadata(request_id, "ConnectCustomKeyStore"),
            )
            .await;
        let applied = self.store().transact(|st, ch| {
            let Some(s) = st.stores.get_mut(id).filter(|s| current(s)) else {
                return Ok(false);
            };
            match &result {
                Ok(_) => {
                    s.connection_state = ConnectionState::Connected;
                    s.connection_error_code = None;
                }
                Err(f) => {
                    s.connection_state = ConnectionState::Failed;
                    s.connection_error_code = Some(f.connection_error_code());
                }
            }
            ch.store(id);
            Ok(true)
        });
        match (applied, &result) {
            (Ok(true), Ok(_)) => {
                tracing::info!(custom_key_store_id = %id, "custom key store connected")
            }
            (Ok(true), Err(f)) => tracing::info!(
                custom_key_store_id = %id,
                failure = ?f,
                code = ?f.connection_error_code(),
                "custom key store connection failed"
            ),
            (Ok(false), _) => {
                tracing::debug!(custom_key_store_id = %id, "stale connect result dropped")
            }
            (Err(e), _) => {
                tracing::error!(custom_key_store_id = %id, error = %e, "cannot record the connect result")
            }
        }
    }

    pub fn disconnect_custom_key_store(&self, req: StoreIdRequest) -> Result<Empty, KmsError> {
        let id = store_id_of(&req)?;
        let delay = self.config().disconnect_delay;
        let pending = self.store().transact(|st, ch| {
            let s = st.stores.get_mut(&id).ok_or_else(|| not_found(&id))?;
            match s.connection_state {
                ConnectionState::Disconnected | ConnectionState::Disconnecting => {
                    return Err(invalid_state(
                        &id,
                        s.connection_state,
                        "it is not connected.",
                    ));
                }
                ConnectionState::Connected
                | ConnectionState::Connecting
                | ConnectionState::Failed => {}
            }
            // Bumping the attempt makes any connect result in flight stale.
            s.attempt += 1;
            s.connection_error_code = None;
            s.connection_state = if delay.is_zero() {
                ConnectionState::Disconnected
            } else {
                ConnectionState::Disconnecting
            };
            ch.store(&id);
            Ok((!delay.is_zero()).then_some(s.attempt))
        })?;
        tracing::info!(custom_key_store_id = %id, "custom key store disconnecting");
        // A CloudHSM store's kmsuser session ends now (KMS logs out on disconnect).
        if self.shared.hsm.holds(&id) {
            let emu = self.clone();
            let store_id = id.clone();
            tokio::task::spawn_blocking(move || emu.shared.hsm.release(&store_id));
        }
        if let Some(attempt) = pending {
            self.spawn_finish_disconnect(id, attempt, delay);
        }
        Ok(Empty {})
    }

    fn spawn_finish_disconnect(&self, id: String, attempt: u64, delay: Duration) {
        let emu = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = emu.stopped() => {}
                _ = tokio::time::sleep(delay) => {
                    let r = emu.store().transact(|st, ch| {
                        if let Some(s) = st.stores.get_mut(&id)
                            && s.attempt == attempt
                            && s.connection_state == ConnectionState::Disconnecting
                        {
                            s.connection_state = ConnectionState::Disconnected;
                            ch.store(&id);
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        tracing::error!(custom_key_store_id = %id, error = %e, "cannot finish disconnect");
                    }
                }
            }
        });
    }

    /// After a restart: CONNECTING stores try again, DISCONNECTING ones finish, and
    /// CONNECTED CloudHSM stores log in to their clusters again.
    pub(super) fn resume_background_work(&self) {
        self.spawn_cloudhsm_resume();
        let pending: Vec<(String, u64, ConnectionState)> = self.store().read(|st| {
            st.stores
                .values()
                .filter(|s| {
                    matches!(
                        s.connection_state,
                        ConnectionState::Connecting | ConnectionState::Disconnecting
                    )
                })
                .map(|s| (s.id.clone(), s.attempt, s.connection_state))
                .collect()
        });
        for (id, attempt, state) in pending {
            match state {
                ConnectionState::Connecting => {
                    self.spawn_connect(id, attempt, uuid::Uuid::new_v4().to_string());
                }
                ConnectionState::Disconnecting => {
                    self.spawn_finish_disconnect(id, attempt, Duration::ZERO);
                }
                ConnectionState::Connected
                | ConnectionState::Disconnected
                | ConnectionState::Failed => {}
            }
        }
    }

    pub fn describe_custom_key_stores(
        &self,
        req: DescribeCustomKeyStoresRequest,
    ) -> Result<DescribeCustomKeyStoresResponse, KmsError> {
        let mut vs = Violations::new();
        vs.length(
            "customKeyStoreId",
            req.custom_key_store_id.as_deref(),
            1,
            64,
            Shown::Yes,
        );
        vs.length(
            "customKeyStoreName",
            req.custom_key_store_name.as_deref(),
            1,
            256,
            Shown::Yes,
        );
        vs.range("limit", req.limit, 1, 1000);
        vs.string(
            "marker",
            req.marker.as_deref(),
            1,
            1024,
            v::is_marker,
            v::MARKER_PATTERN,
            Shown::Yes,
        );
        if req.custom_key_store_id.is_some() && req.custom_key_store_name.is_some() {
            vs.custom(
                "customKeyStoreName",
                req.custom_key_store_name.as_deref(),
                Shown::Yes,
                "Member must be null when customKeyStoreId is given (specify one, not both)",
            );
        }
        vs.finish()?;
        let limit = req
            .limit
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or(DEFAULT_PAGE);

        self.store().read(|st| {
            let mut all: Vec<&CustomKeyStore> = st.stores.values().collect();
            all.sort_by(|a, b| {
                a.creation_date
                    .total_cmp(&b.creation_date)
                    .then_with(|| a.id.cmp(&b.id))
            });
            if let Some(id) = &req.custom_key_store_id {
                all.retain(|s| &s.id == id);
                if all.is_empty() {
                    return Err(not_found(id));
                }
            }
            if let Some(name) = &req.custom_key_store_name {
                all.retain(|s| &s.name == name);
                if all.is_empty() {
                    return Err(KmsError::new(
                        Exception::CustomKeyStoreNotFound,
                        format!("Custom key store with name {name} does not exist."),
                    ));
                }
            }
            let start = match &req.marker {
                None => 0,
                Some(m) => all.iter().position(|s| &s.id == m).ok_or_else(|| {
                    KmsError::new(
                        Exception::InvalidMarker,
                        "The marker that specifies where pagination should next begin is not valid.",
                    )
                })?,
            };
            let page: Vec<CustomKeyStoresListEntry> = all
                .iter()
                .skip(start)
                .take(limit)
                .map(|s| entry(s))
                .collect();
            let next = all.get(start + limit).map(|s| s.id.clone());
            Ok(DescribeCustomKeyStoresResponse {
                custom_key_stores: page,
                truncated: next.is_some(),
                next_marker: next,
            })
        })
    }

    /// UpdateCustomKeyStore: the store's type decides which rules apply.
    pub async fn update_custom_key_store(
        &self,
        ctx: &Ctx,
        req: UpdateCustomKeyStoreRequest,
    ) -> Result<Empty, KmsError> {
        let id = checked_store_id(&req.custom_key_store_id)?;
        let is_cloudhsm = self.store().read(|st| {
            st.stores
                .get(&id)
                .map(|s| s.cloudhsm().is_some())
                .ok_or_else(|| not_found(&id))
        })?;
        if is_cloudhsm {
            self.update_cloudhsm_store(ctx, req)
        } else {
            self.update_xks_store(ctx, req).await
        }
    }

    pub fn delete_custom_key_store(&self, req: StoreIdRequest) -> Result<Empty, KmsError> {
        let id = store_id_of(&req)?;
        self.purge_expired_keys()?;
        self.store().transact(|st, ch| {
            let s = st.stores.get(&id).ok_or_else(|| not_found(&id))?;
            if s.connection_state != ConnectionState::Disconnected {
                return Err(invalid_state(
                    &id,
                    s.connection_state,
                    "disconnect it before you delete it.",
                ));
            }
            let keys = st.keys_in_store(&id).count();
            if keys > 0 {
                return Err(KmsError::new(
                    Exception::CustomKeyStoreHasCmks,
                    format!(
                        "Custom key store {id} still holds {keys} KMS key(s), including keys \
                         pending deletion. Delete them (and wait for their waiting period) first."
                    ),
                ));
            }
            st.stores.remove(&id);
            ch.store(&id);
            Ok(())
        })?;
        tracing::info!(custom_key_store_id = %id, "custom key store deleted");
        Ok(Empty {})
    }
}

fn entry(s: &CustomKeyStore) -> CustomKeyStoresListEntry {
    CustomKeyStoresListEntry {
        custom_key_store_id: s.id.clone(),
        custom_key_store_name: s.name.clone(),
        custom_key_store_type: match s.kind {
            StoreKind::External(_) => XKS_TYPE,
            StoreKind::CloudHsm(_) => CLOUDHSM_TYPE,
        },
        creation_date: s.creation_date,
        connection_state: s.connection_state,
        connection_error_code: if s.connection_state == ConnectionState::Failed {
            s.connection_error_code
        } else {
            None
        },
        xks_proxy_configuration: s.xks().map(|x| XksProxyConfiguration {
            connectivity: x.connectivity,
            access_key_id: x.access_key_id.clone(),
            uri_endpoint: x.endpoint.clone(),
            uri_path: x.path.clone(),
            vpc_endpoint_service_name: x.vpc_service_name.clone(),
            vpc_endpoint_service_owner: x.vpc_service_owner.clone(),
        }),
        cloud_hsm_cluster_id: s.cloudhsm().map(|c| c.cluster_id.clone()),
        trust_anchor_certificate: s.cloudhsm().map(|c| c.trust_anchor.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brief §3.8, Update rows: name, credential and path while CONNECTED or
    /// DISCONNECTED; any other field only while DISCONNECTED; never in the other
    /// states.
    #[test]
    fn update_is_allowed_by_state_and_by_what_it_changes() {
        use ConnectionState as S;
        let allowed = |state, offline| check_update_state("cks-1", state, offline, "x").is_ok();
        assert!(allowed(S::Disconnected, true));
        assert!(allowed(S::Connected, false));
        assert!(!allowed(S::Connected, true));
        for state in [S::Connecting, S::Disconnecting, S::Failed] {
            assert!(!allowed(state, false));
        }
    }

    /// Brief §2: at most 10 stores, counting every type and state.
    #[test]
    fn the_eleventh_store_is_over_the_limit() {
        let mut st = State::default();
        assert!(check_store_limit(&st).is_ok());
        for i in 0..MAX_STORES {
            let id = format!("cks-{i}");
            st.stores.insert(
                id.clone(),
                CustomKeyStore {
                    id,
                    name: format!("s{i}"),
                    creation_date: 0.0,
                    connection_state: ConnectionState::Failed,
                    connection_error_code: None,
                    attempt: 0,
                    kind: StoreKind::CloudHsm(super::super::store::CloudHsmSettings {
                        cluster_id: String::new(),
                        trust_anchor: String::new(),
                        password: SecretString::from("p"),
                        failed_logins: 0,
                        retry_after_lockout: false,
                    }),
                },
            );
        }
        assert_eq!(
            check_store_limit(&st).map_err(|e| e.exception),
            Err(Exception::LimitExceeded)
        );
    }
}
