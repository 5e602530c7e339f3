//! What only external key stores have: the XKS proxy settings' validation and
//! uniqueness rules, the synchronous health check of Create and Update, the settings
//! Update may change and when, the target a store's calls go to, and the periodic
//! `KmsHealthCheck` that never changes a store's state. The common life cycle (names,
//! states, Connect/Disconnect, Describe, Delete) is in `keystores`.

use super::{
    CreateCustomKeyStoreRequest, CredentialInput, Empty, UpdateCustomKeyStoreRequest,
    check_unique as check_any_unique, check_update_members, invalid_state, not_found,
};
use crate::api::wire::RequestMetadata;
use crate::kms::error::{Exception, KmsError};
use crate::kms::store::{ConnectionState, Connectivity, CustomKeyStore, State, XksSettings};
use crate::kms::validate::{self as v, Shown, Violations};
use crate::kms::xks_client::{XksFailure, XksTarget};
use crate::kms::{Ctx, Emulator, HealthCheckStats};

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
    let x = s.xks()?;
    Some(XksTarget {
        endpoint: x.endpoint.clone(),
        path: x.path.clone(),
        access_key_id: x.access_key_id.clone(),
        secret: x.secret.clone(),
    })
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
    /// CreateCustomKeyStore's XKS part, after the common checks: the settings from the
    /// request, their uniqueness, and for a PUBLIC store the synchronous health check
    /// KMS makes before it creates anything.
    pub(super) async fn new_xks_settings(
        &self,
        ctx: &Ctx,
        req: CreateCustomKeyStoreRequest,
        connectivity: Connectivity,
    ) -> Result<XksSettings, KmsError> {
        let cred = req
            .xks_proxy_authentication_credential
            .ok_or_else(|| KmsError::validation("credential missing"))?;
        let (Some(akid), Some(secret)) = (cred.access_key_id, cred.raw_secret_access_key) else {
            return Err(KmsError::validation("credential incomplete"));
        };
        let xks = XksSettings {
            endpoint: req.xks_proxy_uri_endpoint.unwrap_or_default(),
            path: req.xks_proxy_uri_path.unwrap_or_default(),
            connectivity,
            access_key_id: akid.0.expose().to_owned(),
            secret: secret.0,
            vpc_service_name: req.xks_proxy_vpc_endpoint_service_name,
            vpc_service_owner: match connectivity {
                // Defaults to the caller's account for VPC stores.
                Connectivity::VpcEndpointService => Some(
                    req.xks_proxy_vpc_endpoint_service_owner
                        .unwrap_or_else(|| self.config().account_id.clone()),
                ),
                Connectivity::PublicEndpoint => None,
            },
        };
        warn_if_ip(&xks.endpoint);
        self.store().read(|st| check_unique(st, None, &xks))?;

        // 4. PUBLIC stores: a synchronous health check, as KMS does.
        if connectivity == Connectivity::PublicEndpoint {
            let target = XksTarget {
                endpoint: xks.endpoint.clone(),
                path: xks.path.clone(),
                access_key_id: xks.access_key_id.clone(),
                secret: xks.secret.clone(),
            };
            self.xks()
                .health(
                    &target,
                    health_metadata(&ctx.request_id, "CreateCustomKeyStore"),
                )
                .await
                .map_err(|f| {
                    tracing::info!(failure = ?f, "CreateCustomKeyStore health check failed");
                    f.for_store_admin()
                })?;
        }

        Ok(xks)
    }

    /// UpdateCustomKeyStore for an external key store (`keystores` dispatches here).
    pub(super) async fn update_xks_store(
        &self,
        ctx: &Ctx,
        req: UpdateCustomKeyStoreRequest,
    ) -> Result<Empty, KmsError> {
        // The dispatcher (`keystores`) has checked `customKeyStoreId` already.
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
        let id = req.custom_key_store_id.clone().unwrap_or_default();

        // Fields of the wrong store type.
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

        let renames = req.new_custom_key_store_name.is_some();
        let live_fields =
            req.xks_proxy_authentication_credential.is_some() || req.xks_proxy_uri_path.is_some();
        let offline_fields = req.xks_proxy_uri_endpoint.is_some()
            || req.xks_proxy_connectivity.is_some()
            || req.xks_proxy_vpc_endpoint_service_name.is_some()
            || req.xks_proxy_vpc_endpoint_service_owner.is_some();
        let connection_fields = live_fields || offline_fields;

        // Build the new settings from a snapshot, checking state and uniqueness.
        let build = |st: &State| -> Result<(CustomKeyStore, u64), KmsError> {
            let s = st.stores.get(&id).ok_or_else(|| not_found(&id))?;
            match s.connection_state {
                ConnectionState::Disconnected => {}
                ConnectionState::Connected if offline_fields => {
                    return Err(invalid_state(
                        &id,
                        s.connection_state,
                        "the proxy endpoint, connectivity and VPC endpoint service can be \
                         changed only while the store is DISCONNECTED.",
                    ));
                }
                ConnectionState::Connected => {}
                ConnectionState::Connecting
                | ConnectionState::Disconnecting
                | ConnectionState::Failed => {
                    return Err(invalid_state(
                        &id,
                        s.connection_state,
                        "a store can be updated only while CONNECTED or DISCONNECTED.",
                    ));
                }
            }
            let mut next = s.clone();
            if let Some(n) = &req.new_custom_key_store_name {
                next.name = n.clone();
            }
            let before = s
                .xks()
                .ok_or_else(|| KmsError::internal(&"store type changed"))?
                .connectivity;
            let nx = next
                .xks_mut()
                .ok_or_else(|| KmsError::internal(&"store type changed"))?;
            if let Some(c) = &req.xks_proxy_authentication_credential {
                let (Some(a), Some(k)) = (&c.access_key_id, &c.raw_secret_access_key) else {
                    return Err(KmsError::validation("credential incomplete"));
                };
                nx.access_key_id = a.0.expose().to_owned();
                nx.secret = k.0.clone();
            }
            if let Some(p) = &req.xks_proxy_uri_path {
                nx.path = p.clone();
            }
            if let Some(e) = &req.xks_proxy_uri_endpoint {
                nx.endpoint = e.clone();
            }
            let after = req
                .xks_proxy_connectivity
                .as_deref()
                .and_then(Connectivity::parse)
                .unwrap_or(before);
            nx.connectivity = after;
            let svc = req.xks_proxy_vpc_endpoint_service_name.as_deref();
            let mut vs = Violations::new();
            match after {
                Connectivity::VpcEndpointService => {
                    if before != after {
                        vs.required("xksProxyUriEndpoint", &req.xks_proxy_uri_endpoint);
                        vs.required(
                            "xksProxyVpcEndpointServiceName",
                            &req.xks_proxy_vpc_endpoint_service_name,
                        );
                    }
                    if svc == Some("") {
                        vs.length("xksProxyVpcEndpointServiceName", svc, 20, 64, Shown::Yes);
                    }
                    if let Some(svc) = svc {
                        nx.vpc_service_name = Some(svc.to_owned());
                    }
                    if let Some(o) = &req.xks_proxy_vpc_endpoint_service_owner {
                        nx.vpc_service_owner = Some(o.clone());
                    } else if nx.vpc_service_owner.is_none() {
                        nx.vpc_service_owner = Some(self.config().account_id.clone());
                    }
                }
                Connectivity::PublicEndpoint => {
                    if before != after {
                        vs.required("xksProxyUriEndpoint", &req.xks_proxy_uri_endpoint);
                    }
                    if svc.is_some_and(|s| !s.is_empty()) {
                        vs.custom(
                            "xksProxyVpcEndpointServiceName",
                            svc,
                            Shown::Yes,
                            "Member must be null or empty for PUBLIC_ENDPOINT connectivity",
                        );
                    }
                    if req.xks_proxy_vpc_endpoint_service_owner.is_some() {
                        vs.custom(
                            "xksProxyVpcEndpointServiceOwner",
                            req.xks_proxy_vpc_endpoint_service_owner.as_deref(),
                            Shown::Yes,
                            "Member is only valid with VPC_ENDPOINT_SERVICE connectivity",
                        );
                    }
                    nx.vpc_service_name = None;
                    nx.vpc_service_owner = None;
                }
            }
            vs.finish()?;
            let name = renames.then_some(next.name.as_str());
            let xks = connection_fields.then(|| next.xks()).flatten();
            check_any_unique(st, Some(&id), name, xks)?;
            Ok((next, s.attempt))
        };

        let (next, attempt) = self.store().read(build)?;
        let Some(target) = target_of(&next) else {
            return Err(KmsError::internal(&"store type changed"));
        };
        warn_if_ip(&target.endpoint);

        // Health check with the NEW values before anything is applied.
        if connection_fields
            && next.xks().map(|x| x.connectivity) == Some(Connectivity::PublicEndpoint)
        {
            self.xks()
                .health(
                    &target,
                    health_metadata(&ctx.request_id, "UpdateCustomKeyStore"),
                )
                .await
                .map_err(|f| {
                    tracing::info!(failure = ?f, "UpdateCustomKeyStore health check failed");
                    f.for_store_admin()
                })?;
        }

        self.store().transact(|st, ch| {
            // Re-derive from the current state so concurrent changes are not lost.
            let (again, now_attempt) = build(st)?;
            if now_attempt != attempt {
                return Err(KmsError::new(
                    Exception::CustomKeyStoreInvalidState,
                    format!(
                        "Custom key store {id} changed its connection state during the update; \
                         retry the request."
                    ),
                ));
            }
            st.stores.insert(id.clone(), again);
            ch.store(&id);
            Ok(())
        })?;
        tracing::info!(custom_key_store_id = %id, "custom key store updated");
        Ok(Empty {})
    }
}
