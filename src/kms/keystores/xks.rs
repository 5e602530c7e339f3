//! What only external key stores have: the XKS proxy settings' validation and
//! uniqueness rules, the synchronous health check of Create and Update, the settings
//! Update may change and when, the target a store's calls go to, and the periodic
//! `KmsHealthCheck` that never changes a store's state. The common life cycle (names,
//! states, Connect/Disconnect, Describe, Delete) is in `keystores`.

use super::{
    CreateCustomKeyStoreRequest, CredentialInput, Empty, UpdateCustomKeyStoreRequest,
    check_unique as check_any_unique, check_update_members, check_update_state, not_found,
};
use crate::api::wire::RequestMetadata;
use crate::kms::error::{Exception, KmsError};
use crate::kms::store::{
    ConnectionState, Connectivity, CustomKeyStore, State, StoreKind, XksSettings,
};
use crate::kms::validate::{self as v, Shown, Violations};
use crate::kms::xks_client::{XksFailure, XksTarget};
use crate::kms::{Ctx, Emulator, HealthCheckStats};
use crate::secret::SecretString;

/// Checks the credential's syntax: both members required, lengths and patterns.
pub(super) fn check_credential(vs: &mut Violations, c: &CredentialInput) {
    const M: &str = "xksProxyAuthenticationCredential";
    vs.required(&format!("{M}.accessKeyId"), &c.access_key_id);
    vs.required(&format!("{M}.rawSecretAccessKey"), &c.raw_secret_access_key);
    if let Some(a) = &c.access_key_id {
        vs.string(
            &format!("{M}.accessKeyId"),
            Some(a.0.expose()),
            20,
            30,
            v::is_access_key_id,
            v::ACCESS_KEY_ID_PATTERN,
            Shown::Redacted,
        );
    }
    if let Some(s) = &c.raw_secret_access_key {
        vs.string(
            &format!("{M}.rawSecretAccessKey"),
            Some(s.0.expose()),
            43,
            64,
            v::is_secret,
            v::SECRET_PATTERN,
            Shown::Redacted,
        );
    }
}

/// The connection-related members shared by Create and Update.
pub(super) struct XksMembers<'a> {
    pub(super) endpoint: Option<&'a str>,
    pub(super) path: Option<&'a str>,
    pub(super) vpc_name: Option<&'a str>,
    pub(super) vpc_owner: Option<&'a str>,
    pub(super) connectivity: Option<&'a str>,
    pub(super) credential: Option<&'a CredentialInput>,
}

pub(super) fn check_xks_members(
    vs: &mut Violations,
    m: XksMembers<'_>,
    allow_empty_vpc_name: bool,
) {
    let XksMembers {
        endpoint,
        path,
        vpc_name,
        vpc_owner,
        connectivity,
        credential,
    } = m;
    vs.string(
        "xksProxyUriEndpoint",
        endpoint,
        10,
        128,
        v::is_xks_endpoint,
        v::XKS_ENDPOINT_PATTERN,
        Shown::Yes,
    );
    vs.string(
        "xksProxyUriPath",
        path,
        10,
        128,
        v::is_xks_path,
        v::XKS_PATH_PATTERN,
        Shown::Yes,
    );
    // Update accepts "" to clear the service name when switching to PUBLIC.
    if !(allow_empty_vpc_name && vpc_name == Some("")) {
        vs.string(
            "xksProxyVpcEndpointServiceName",
            vpc_name,
            20,
            64,
            v::is_vpc_service_name,
            v::VPC_SERVICE_PATTERN,
            Shown::Yes,
        );
    }
    vs.string(
        "xksProxyVpcEndpointServiceOwner",
        vpc_owner,
        12,
        12,
        v::is_account_id,
        v::ACCOUNT_ID_PATTERN,
        Shown::Yes,
    );
    vs.one_of(
        "xksProxyConnectivity",
        connectivity,
        &["PUBLIC_ENDPOINT", "VPC_ENDPOINT_SERVICE"],
    );
    if let Some(c) = credential {
        check_credential(vs, c);
    }
}

pub(super) fn xks_members_of_create(req: &CreateCustomKeyStoreRequest) -> XksMembers<'_> {
    XksMembers {
        endpoint: req.xks_proxy_uri_endpoint.as_deref(),
        path: req.xks_proxy_uri_path.as_deref(),
        vpc_name: req.xks_proxy_vpc_endpoint_service_name.as_deref(),
        vpc_owner: req.xks_proxy_vpc_endpoint_service_owner.as_deref(),
        connectivity: req.xks_proxy_connectivity.as_deref(),
        credential: req.xks_proxy_authentication_credential.as_ref(),
    }
}

/// The six XKS members of a request, in the model's order, and whether each is
/// present: the first four are what every external key store needs.
pub(super) fn members_present(m: &XksMembers<'_>) -> [(&'static str, bool); 6] {
    [
        ("xksProxyUriEndpoint", m.endpoint.is_some()),
        ("xksProxyUriPath", m.path.is_some()),
        ("xksProxyAuthenticationCredential", m.credential.is_some()),
        ("xksProxyConnectivity", m.connectivity.is_some()),
        ("xksProxyVpcEndpointServiceName", m.vpc_name.is_some()),
        ("xksProxyVpcEndpointServiceOwner", m.vpc_owner.is_some()),
    ]
}

/// How a request sets an external key store's connectivity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnectivityChange {
    /// CreateCustomKeyStore: a new store.
    Create,
    /// UpdateCustomKeyStore switching to the other connectivity.
    Switch,
    /// UpdateCustomKeyStore keeping the store's connectivity.
    Keep,
}

/// The connectivity rules, written once for Create and Update (brief §3.2, §3.5): a
/// VPC store needs a VPC endpoint service name (Update asks for it, and for a new
/// endpoint, only when it switches to VPC); a PUBLIC store has no VPC member (Update
/// may send an empty name to clear it, and needs a new endpoint when it switches to
/// PUBLIC). The `endpoint`, `vpc_name` and `vpc_owner` are the request's members.
pub(super) fn check_connectivity_members(
    vs: &mut Violations,
    connectivity: Connectivity,
    change: ConnectivityChange,
    endpoint: Option<&str>,
    vpc_name: Option<&str>,
    vpc_owner: Option<&str>,
) {
    const NAME: &str = "xksProxyVpcEndpointServiceName";
    const OWNER: &str = "xksProxyVpcEndpointServiceOwner";
    const VPC_ONLY: &str = "Member is only valid with VPC_ENDPOINT_SERVICE connectivity";
    if change == ConnectivityChange::Switch {
        vs.required("xksProxyUriEndpoint", &endpoint);
    }
    match (connectivity, change) {
        (Connectivity::VpcEndpointService, _) => {
            if change != ConnectivityChange::Keep {
                vs.required(NAME, &vpc_name);
            }
            // Only Update lets "" through the syntax check (to clear the name).
            if vpc_name == Some("") {
                vs.length(NAME, vpc_name, 20, 64, Shown::Yes);
            }
        }
        (Connectivity::PublicEndpoint, ConnectivityChange::Create) => {
            for (member, value) in [(NAME, vpc_name), (OWNER, vpc_owner)] {
                if value.is_some() {
                    vs.custom(member, Some(""), Shown::Redacted, VPC_ONLY);
                }
            }
        }
        (Connectivity::PublicEndpoint, ConnectivityChange::Switch | ConnectivityChange::Keep) => {
            if vpc_name.is_some_and(|s| !s.is_empty()) {
                vs.custom(
                    NAME,
                    vpc_name,
                    Shown::Yes,
                    "Member must be null or empty for PUBLIC_ENDPOINT connectivity",
                );
            }
            if vpc_owner.is_some() {
                vs.custom(OWNER, vpc_owner, Shown::Yes, VPC_ONLY);
            }
        }
    }
}

/// The credential's two members once their syntax is checked.
fn credential_of(c: CredentialInput) -> Result<(String, SecretString), KmsError> {
    let (Some(akid), Some(secret)) = (c.access_key_id, c.raw_secret_access_key) else {
        return Err(KmsError::validation("credential incomplete"));
    };
    Ok((akid.0.expose().to_owned(), secret.0))
}

/// CreateCustomKeyStore's external key store, once the request's members are checked
/// (`keystores`): its settings, with the VPC endpoint service owner defaulting to the
/// caller's account for a VPC store.
pub(super) fn settings_of_create(
    req: CreateCustomKeyStoreRequest,
    connectivity: Connectivity,
    account_id: &str,
) -> Result<XksSettings, KmsError> {
    let cred = req
        .xks_proxy_authentication_credential
        .ok_or_else(|| KmsError::validation("credential missing"))?;
    let (access_key_id, secret) = credential_of(cred)?;
    Ok(XksSettings {
        endpoint: req.xks_proxy_uri_endpoint.unwrap_or_default(),
        path: req.xks_proxy_uri_path.unwrap_or_default(),
        connectivity,
        access_key_id,
        secret,
        vpc_service_name: req.xks_proxy_vpc_endpoint_service_name,
        vpc_service_owner: match connectivity {
            Connectivity::VpcEndpointService => Some(
                req.xks_proxy_vpc_endpoint_service_owner
                    .unwrap_or_else(|| account_id.to_owned()),
            ),
            Connectivity::PublicEndpoint => None,
        },
    })
}

/// UpdateCustomKeyStore's members for an external key store, once checked.
#[derive(Debug)]
pub(super) struct XksUpdate {
    name: Option<String>,
    credential: Option<(String, SecretString)>,
    path: Option<String>,
    endpoint: Option<String>,
    connectivity: Option<Connectivity>,
    /// `Some("")` clears the name (switching to PUBLIC).
    vpc_name: Option<String>,
    vpc_owner: Option<String>,
}

impl XksUpdate {
    /// Fields that say where KMS connects: changed only while DISCONNECTED.
    fn offline_fields(&self) -> bool {
        self.endpoint.is_some()
            || self.connectivity.is_some()
            || self.vpc_name.is_some()
            || self.vpc_owner.is_some()
    }

    /// Fields that change how KMS reaches the proxy: they need its health check.
    fn connection_fields(&self) -> bool {
        self.credential.is_some() || self.path.is_some() || self.offline_fields()
    }
}

/// UpdateCustomKeyStore's members for an external key store: their syntax, then no
/// CloudHSM member (the dispatcher has checked `customKeyStoreId` already).
fn check_xks_update(req: UpdateCustomKeyStoreRequest) -> Result<(String, XksUpdate), KmsError> {
    let mut vs = Violations::new();
    check_update_members(&mut vs, &req);
    check_xks_members(
        &mut vs,
        XksMembers {
            endpoint: req.xks_proxy_uri_endpoint.as_deref(),
            path: req.xks_proxy_uri_path.as_deref(),
            vpc_name: req.xks_proxy_vpc_endpoint_service_name.as_deref(),
            vpc_owner: req.xks_proxy_vpc_endpoint_service_owner.as_deref(),
            connectivity: req.xks_proxy_connectivity.as_deref(),
            credential: req.xks_proxy_authentication_credential.as_ref(),
        },
        true,
    );
    vs.finish()?;
    let mut vs = Violations::new();
    if req.key_store_password.is_some() {
        vs.custom(
            "keyStorePassword",
            Some(""),
            Shown::Redacted,
            "Member is not valid for an EXTERNAL_KEY_STORE custom key store",
        );
    }
    if req.cloud_hsm_cluster_id.is_some() {
        vs.custom(
            "cloudHsmClusterId",
            req.cloud_hsm_cluster_id.as_deref(),
            Shown::Yes,
            "Member is not valid for an EXTERNAL_KEY_STORE custom key store",
        );
    }
    vs.finish()?;
    let update = XksUpdate {
        name: req.new_custom_key_store_name,
        credential: req
            .xks_proxy_authentication_credential
            .map(credential_of)
            .transpose()?,
        path: req.xks_proxy_uri_path,
        endpoint: req.xks_proxy_uri_endpoint,
        // `one_of` let only the model's values through.
        connectivity: req
            .xks_proxy_connectivity
            .as_deref()
            .and_then(Connectivity::parse),
        vpc_name: req.xks_proxy_vpc_endpoint_service_name,
        vpc_owner: req.xks_proxy_vpc_endpoint_service_owner,
    };
    Ok((req.custom_key_store_id.unwrap_or_default(), update))
}

/// The store as `update` would leave it, built from the state as it is: the state
/// rule, the connectivity rules against the store's current connectivity, then the
/// uniqueness of what changes.
fn next_xks_store(
    st: &State,
    id: &str,
    update: &XksUpdate,
    account_id: &str,
) -> Result<CustomKeyStore, KmsError> {
    let s = st.stores.get(id).ok_or_else(|| not_found(id))?;
    check_update_state(
        id,
        s.connection_state,
        update.offline_fields(),
        "the proxy endpoint, connectivity and VPC endpoint service can be changed only \
         while the store is DISCONNECTED.",
    )?;
    let mut next = s.clone();
    if let Some(n) = &update.name {
        next.name = n.clone();
    }
    let nx = next
        .xks_mut()
        .ok_or_else(|| KmsError::internal(&"store type changed"))?;
    apply_xks_update(nx, update, account_id)?;
    let name = update.name.is_some().then_some(next.name.as_str());
    let xks = update.connection_fields().then(|| next.xks()).flatten();
    check_any_unique(st, Some(id), name, xks)?;
    Ok(next)
}

/// Applies `update` to a store's settings, after the connectivity rules for the
/// connectivity it ends with. A VPC store keeps its service owner unless given one
/// (the caller's account when it had none); a PUBLIC store has neither VPC field.
fn apply_xks_update(
    x: &mut XksSettings,
    update: &XksUpdate,
    account_id: &str,
) -> Result<(), KmsError> {
    let before = x.connectivity;
    let after = update.connectivity.unwrap_or(before);
    let change = if before == after {
        ConnectivityChange::Keep
    } else {
        ConnectivityChange::Switch
    };
    let mut vs = Violations::new();
    check_connectivity_members(
        &mut vs,
        after,
        change,
        update.endpoint.as_deref(),
        update.vpc_name.as_deref(),
        update.vpc_owner.as_deref(),
    );
    vs.finish()?;
    if let Some((akid, secret)) = &update.credential {
        x.access_key_id = akid.clone();
        x.secret = secret.clone();
    }
    if let Some(p) = &update.path {
        x.path = p.clone();
    }
    if let Some(e) = &update.endpoint {
        x.endpoint = e.clone();
    }
    x.connectivity = after;
    match after {
        Connectivity::VpcEndpointService => {
            if let Some(svc) = &update.vpc_name {
                x.vpc_service_name = Some(svc.clone());
            }
            if let Some(o) = &update.vpc_owner {
                x.vpc_service_owner = Some(o.clone());
            } else if x.vpc_service_owner.is_none() {
                x.vpc_service_owner = Some(account_id.to_owned());
            }
        }
        Connectivity::PublicEndpoint => {
            x.vpc_service_name = None;
            x.vpc_service_owner = None;
        }
    }
    Ok(())
}

/// XKS uniqueness (brief §3.2): endpoint + path, a VPC store's endpoint, the VPC
/// endpoint service, against every store but `exclude`.
pub(super) fn check_unique(
    state: &State,
    exclude: Option<&str>,
    x: &XksSettings,
) -> Result<(), KmsError> {
    let others = || {
        state
            .stores
            .values()
            .filter(move |s| Some(s.id.as_str()) != exclude)
            .filter_map(|s| s.xks())
    };
    if others().any(|s| s.endpoint.eq_ignore_ascii_case(&x.endpoint) && s.path == x.path) {
        return Err(KmsError::new(
            Exception::XksProxyUriInUse,
            "The combination of XksProxyUriEndpoint and XksProxyUriPath is already used by \
             another external key store in this account and Region.",
        ));
    }
    let vpc = Connectivity::VpcEndpointService;
    if others().any(|s| {
        s.endpoint.eq_ignore_ascii_case(&x.endpoint)
            && (s.connectivity == vpc || x.connectivity == vpc)
    }) {
        return Err(KmsError::new(
            Exception::XksProxyUriEndpointInUse,
            "The XksProxyUriEndpoint is already used by another external key store, and an \
             external key store with VPC endpoint service connectivity needs its own endpoint.",
        ));
    }
    if let Some(svc) = &x.vpc_service_name
        && others().any(|s| s.vpc_service_name.as_deref() == Some(svc.as_str()))
    {
        return Err(KmsError::new(
            Exception::XksProxyVpcEndpointServiceInUse,
            "The XksProxyVpcEndpointServiceName is already associated with another external \
             key store in this account and Region.",
        ));
    }
    Ok(())
}

/// Where an external key store's calls go; `None` for other store types.
pub(in crate::kms) fn target_of(s: &CustomKeyStore) -> Option<XksTarget> {
    s.xks().map(target_of_settings)
}

/// Where calls with these settings go.
pub(super) fn target_of_settings(x: &XksSettings) -> XksTarget {
    XksTarget {
        endpoint: x.endpoint.clone(),
        path: x.path.clone(),
        access_key_id: x.access_key_id.clone(),
        secret: x.secret.clone(),
    }
}

pub(super) fn health_metadata(request_id: &str, operation: &str) -> RequestMetadata {
    RequestMetadata {
        kms_request_id: request_id.to_owned(),
        kms_operation: operation.to_owned(),
        ..RequestMetadata::default()
    }
}

/// The spec wants a DNS name, the model accepts an IP: accept it, as KMS does, and warn.
pub(super) fn warn_if_ip(endpoint: &str) {
    if let Some(host) = endpoint.strip_prefix("https://")
        && host.parse::<std::net::IpAddr>().is_ok()
    {
        tracing::warn!(
            endpoint,
            "XKS proxy endpoint is an IP address; the spec asks for a DNS name"
        );
    }
}

/// Calls GetHealthStatus (`kmsOperation=KmsHealthCheck`) on every CONNECTED store
/// every `health_interval`. Results are logged and counted; they never change a
/// store's state.
pub(in crate::kms) async fn health_loop(emu: Emulator) {
    let interval = emu.config().health_interval;
    if interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = emu.stopped() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let ids: Vec<String> = emu.store().read(|st| {
            st.stores
                .values()
                .filter(|s| s.connection_state == ConnectionState::Connected && s.xks().is_some())
                .map(|s| s.id.clone())
                .collect()
        });
        for id in ids {
            // Re-read right before the call: a disconnect stops health checks at once.
            let Some(target) = emu.store().read(|st| {
                st.stores
                    .get(&id)
                    .filter(|s| s.connection_state == ConnectionState::Connected)
                    .and_then(target_of)
            }) else {
                continue;
            };
            let request_id = uuid::Uuid::new_v4().to_string();
            let result = tokio::select! {
                _ = emu.stopped() => return,
                r = emu.xks().health(&target, health_metadata(&request_id, "KmsHealthCheck")) => r,
            };
            record_health(&emu, &id, &request_id, result.err());
        }
    }
}

fn record_health(emu: &Emulator, id: &str, request_id: &str, failure: Option<XksFailure>) {
    let mut stats = emu
        .shared
        .health_stats
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let entry: &mut HealthCheckStats = stats.entry(id.to_owned()).or_default();
    match failure {
        None => {
            entry.ok += 1;
            entry.last_failure = None;
            tracing::debug!(custom_key_store_id = %id, kms_request_id = %request_id, "KmsHealthCheck ok");
        }
        Some(f) => {
            entry.failed += 1;
            entry.last_failure = Some(format!("{f:?}"));
            tracing::warn!(custom_key_store_id = %id, kms_request_id = %request_id, failure = ?f, "KmsHealthCheck failed");
        }
    }
}

impl Emulator {
    /// GetHealthStatus for Create or Update (`operation`) with the store's new
    /// settings: a failure fails the request with the store-administration exception
    /// of brief §7 (the proxy's own message goes to the log only).
    async fn proxy_health(
        &self,
        ctx: &Ctx,
        target: &XksTarget,
        operation: &'static str,
    ) -> Result<(), KmsError> {
        self.xks()
            .health(target, health_metadata(&ctx.request_id, operation))
            .await
            .map(|_| ())
            .map_err(|f| {
                tracing::info!(failure = ?f, "{operation} health check failed");
                f.for_store_admin()
            })
    }

    /// Create's outcall: a PUBLIC external key store's proxy must answer
    /// GetHealthStatus (`kmsOperation=CreateCustomKeyStore`) before KMS creates
    /// anything; a VPC store is not contacted at create time (nor is a cluster).
    pub(super) async fn create_health_check(
        &self,
        ctx: &Ctx,
        kind: &StoreKind,
    ) -> Result<(), KmsError> {
        let Some(x) = kind.xks() else {
            return Ok(());
        };
        warn_if_ip(&x.endpoint);
        match x.connectivity {
            Connectivity::PublicEndpoint => {
                self.proxy_health(ctx, &target_of_settings(x), "CreateCustomKeyStore")
                    .await
            }
            Connectivity::VpcEndpointService => Ok(()),
        }
    }

    /// UpdateCustomKeyStore for an external key store (`keystores` dispatches here):
    /// the new settings are built from the store as it is, checked with the proxy
    /// (the old ones stay in force if it fails), then built and checked again from
    /// the store as it is when they are recorded.
    pub(super) async fn update_xks_store(
        &self,
        ctx: &Ctx,
        req: UpdateCustomKeyStoreRequest,
    ) -> Result<Empty, KmsError> {
        let (id, update) = check_xks_update(req)?;
        let account_id = &self.config().account_id;
        self.store()
            .check_call_recheck(
                |st| next_xks_store(st, &id, &update, account_id),
                |next| self.update_health_check(ctx, &update, next),
                |st, ch, again, &attempt| {
                    if again.attempt != attempt {
                        return Err(KmsError::new(
                            Exception::CustomKeyStoreInvalidState,
                            format!(
                                "Custom key store {id} changed its connection state during \
                                 the update; retry the request."
                            ),
                        ));
                    }
                    st.stores.insert(id.clone(), again);
                    ch.store(&id);
                    Ok(())
                },
                |_| {},
            )
            .await?;
        tracing::info!(custom_key_store_id = %id, "custom key store updated");
        Ok(Empty {})
    }

    /// Update's outcall: GetHealthStatus with the NEW values, when the request changes
    /// how KMS reaches a PUBLIC store. Gives the connection attempt the new settings
    /// were built on, so that the re-check can tell a connect or disconnect meanwhile.
    async fn update_health_check(
        &self,
        ctx: &Ctx,
        update: &XksUpdate,
        next: CustomKeyStore,
    ) -> Result<u64, KmsError> {
        let Some(target) = target_of(&next) else {
            return Err(KmsError::internal(&"store type changed"));
        };
        warn_if_ip(&target.endpoint);
        if update.connection_fields()
            && next.xks().map(|x| x.connectivity) == Some(Connectivity::PublicEndpoint)
        {
            self.proxy_health(ctx, &target, "UpdateCustomKeyStore")
                .await?;
        }
        Ok(next.attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations(
        connectivity: Connectivity,
        change: ConnectivityChange,
        endpoint: Option<&str>,
        vpc_name: Option<&str>,
        vpc_owner: Option<&str>,
    ) -> Option<String> {
        let mut vs = Violations::new();
        check_connectivity_members(&mut vs, connectivity, change, endpoint, vpc_name, vpc_owner);
        vs.finish().err().map(|e| e.message)
    }

    const SVC: Option<&str> = Some("com.amazonaws.vpce.us-east-1.vpce-svc-0001");
    const ENDPOINT: Option<&str> = Some("https://xks.test.example");
    use super::ConnectivityChange::{Create, Keep, Switch};
    use crate::kms::store::Connectivity::{PublicEndpoint as Public, VpcEndpointService as Vpc};

    /// Brief §3.2: a VPC store needs its endpoint service name; a PUBLIC one has none.
    #[test]
    fn create_asks_a_vpc_store_for_its_service_name_and_a_public_one_for_none() {
        assert_eq!(violations(Vpc, Create, ENDPOINT, SVC, None), None);
        assert!(
            violations(Vpc, Create, ENDPOINT, None, None)
                .is_some_and(|m| m.contains("'xksProxyVpcEndpointServiceName'"))
        );
        assert_eq!(violations(Public, Create, ENDPOINT, None, None), None);
        let m = violations(Public, Create, ENDPOINT, SVC, Some("111122223333")).expect("refused");
        assert!(m.starts_with("2 validation errors"), "{m}");
        assert!(!m.contains("vpce-svc"), "{m}");
    }

    /// Brief §3.5: switching needs a new endpoint (and, to VPC, a service name);
    /// switching to PUBLIC accepts an empty service name; keeping asks for nothing.
    #[test]
    fn update_asks_for_what_a_switch_needs() {
        assert_eq!(violations(Vpc, Keep, None, None, None), None);
        let m = violations(Vpc, Switch, None, None, None).expect("refused");
        assert!(m.starts_with("2 validation errors"), "{m}");
        assert!(violations(Public, Switch, None, None, None).is_some());
        assert_eq!(violations(Public, Switch, ENDPOINT, Some(""), None), None);
        assert!(violations(Public, Keep, None, SVC, None).is_some());
        assert!(violations(Vpc, Keep, None, Some(""), None).is_some());
    }
}
