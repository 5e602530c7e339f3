//! What only CloudHSM key stores have: Create's checks against the stand-in cluster
//! registry ([`crate::kms::clusters`]), Update's rules (name while CONNECTED or
//! DISCONNECTED; password and cluster only while DISCONNECTED; only a related
//! cluster), Connect's synchronous cluster check, and the background connect attempt
//! that logs in as kmsuser and rotates its password ([`crate::kms::hsm`]).
//!
//! Lockout: CloudHSM locks kmsuser out after 5 failed logins; SoftHSMv2 never locks a
//! PIN, so the emulator counts refused logins itself (per store, persisted). The 5th
//! consecutive refusal, and every attempt after it, ends FAILED `USER_LOCKED_OUT`
//! without touching the token, until UpdateCustomKeyStore `KeyStorePassword` (the
//! operator reset the password on the cluster): the next attempt then logs in once,
//! and success clears the count. A token that itself answers CKR_PIN_LOCKED is
//! `USER_LOCKED_OUT` too.

use super::{
    CreateCustomKeyStoreRequest, Empty, UpdateCustomKeyStoreRequest, check_unique,
    check_update_members, check_update_state, not_found, xks,
};
use crate::kms::clusters::{Cluster, certificate_der};
use crate::kms::error::{Exception, KmsError};
use crate::kms::hsm::Refusal;
use crate::kms::store::{
    CloudHsmSettings, ConnectionErrorCode, ConnectionState, CustomKeyStore, State,
};
use crate::kms::validate::{Shown, Violations};
use crate::kms::{Ctx, Emulator};
use crate::secret::SecretString;

/// Refused logins after which CloudHSM locks kmsuser out.
pub const LOCKOUT_AFTER: u32 = 5;

fn cluster_not_found() -> KmsError {
    KmsError::new(
        Exception::CloudHsmClusterNotFound,
        "The request was rejected because KMS cannot find the CloudHSM cluster with the \
         specified cluster ID. Retry the request with a different cluster ID.",
    )
}

fn cluster_not_active() -> KmsError {
    KmsError::new(
        Exception::CloudHsmClusterNotActive,
        "The request was rejected because the CloudHSM cluster associated with the CloudHSM \
         key store is not active. Initialize and activate the cluster and try the command \
         again. For detailed instructions, see Getting Started in the CloudHSM User Guide.",
    )
}

pub(crate) fn cluster_invalid_configuration() -> KmsError {
    KmsError::new(
        Exception::CloudHsmClusterInvalidConfiguration,
        "The request was rejected because the associated CloudHSM cluster did not meet the \
         configuration requirements for an CloudHSM key store. The CloudHSM cluster must \
         contain at least two active HSMs, each in a different Availability Zone in the \
         Region.",
    )
}

fn cluster_in_use() -> KmsError {
    KmsError::new(
        Exception::CloudHsmClusterInUse,
        "The request was rejected because the specified CloudHSM cluster is already \
         associated with an CloudHSM key store in the account, or it shares a backup history \
         with an CloudHSM key store in the account. Each CloudHSM key store in the account \
         must be associated with a different CloudHSM cluster.",
    )
}

fn incorrect_trust_anchor() -> KmsError {
    KmsError::new(
        Exception::IncorrectTrustAnchor,
        "The request was rejected because the trust anchor certificate in the request to \
         create an CloudHSM key store is not the trust anchor certificate for the specified \
         CloudHSM cluster. When you initialize the CloudHSM cluster, you create the trust \
         anchor certificate and save it in the customerCA.crt file.",
    )
}

fn cluster_not_related() -> KmsError {
    KmsError::new(
        Exception::CloudHsmClusterNotRelated,
        "The request was rejected because the specified CloudHSM cluster has a different \
         cluster certificate than the original cluster. You cannot use the operation to \
         specify an unrelated cluster for an CloudHSM key store. Specify an CloudHSM cluster \
         that shares a backup history with the original cluster.",
    )
}

/// A connect attempt's login: the rotated password, or why it was refused.
struct Login {
    outcome: Result<SecretString, Refusal>,
    /// Whether the token was asked (only a login on the token counts for lockout).
    on_token: bool,
}

/// Records a login in the store's settings — the rotated password, the failed-login
/// count (the 5th refused password locks kmsuser out) — and gives the
/// ConnectionErrorCode of a failure.
fn record_login(h: &mut CloudHsmSettings, login: &Login) -> Option<ConnectionErrorCode> {
    match &login.outcome {
        Ok(new_password) => {
            h.password = new_password.clone();
            h.failed_logins = 0;
            h.retry_after_lockout = false;
            None
        }
        Err(r) if !login.on_token => Some(r.code),
        Err(r) => {
            h.retry_after_lockout = false;
            if r.code == ConnectionErrorCode::InvalidCredentials {
                h.failed_logins = h.failed_logins.saturating_add(1);
                if h.failed_logins >= LOCKOUT_AFTER {
                    return Some(ConnectionErrorCode::UserLockedOut);
                }
            } else if r.code == ConnectionErrorCode::UserLockedOut {
                h.failed_logins = h.failed_logins.max(LOCKOUT_AFTER);
            }
            Some(r.code)
        }
    }
}

/// A cluster backs at most one store, and so does every cluster sharing its backup
/// history (checked against every store but `exclude`).
pub(super) fn check_cluster_free(
    emu: &Emulator,
    st: &State,
    exclude: Option<&str>,
    cluster: &Cluster,
) -> Result<(), KmsError> {
    let clusters = &emu.config().clusters;
    let taken = st
        .stores
        .values()
        .filter(|s| Some(s.id.as_str()) != exclude)
        .filter_map(|s| s.cloudhsm())
        .any(|c| {
            c.cluster_id == cluster.id
                || clusters
                    .get(&c.cluster_id)
                    .is_some_and(|other| other.is_related(cluster))
        });
    if taken {
        return Err(cluster_in_use());
    }
    Ok(())
}

/// CreateCustomKeyStore's CloudHSM key store, once the request's members are checked
/// (`keystores`): its settings. The cluster is checked against the registry and the
/// other stores by [`Emulator::check_new_cluster`].
pub(super) fn settings_of_create(
    req: CreateCustomKeyStoreRequest,
) -> Result<CloudHsmSettings, KmsError> {
    let password = req
        .key_store_password
        .ok_or_else(|| KmsError::validation("keyStorePassword missing"))?
        .0;
    Ok(CloudHsmSettings {
        cluster_id: req.cloud_hsm_cluster_id.unwrap_or_default(),
        trust_anchor: req.trust_anchor_certificate.unwrap_or_default(),
        password,
        failed_logins: 0,
        retry_after_lockout: false,
    })
}

impl Emulator {
    /// CreateCustomKeyStore's CloudHSM rules, after the quota and the name: the
    /// cluster exists, is active, the trust anchor is its own, no store uses it (or a
    /// related cluster), and it has two active HSMs in different AZs. Does not log in
    /// (KMS checks kmsuser only at Connect).
    pub(super) fn check_new_cluster(
        &self,
        st: &State,
        c: &CloudHsmSettings,
    ) -> Result<(), KmsError> {
        if !cfg!(feature = "pkcs11") {
            return Err(KmsError::new(
                Exception::CloudHsmClusterNotFound,
                "AWS CloudHSM key stores need the pkcs11 feature, which this KMS emulator \
                 was built without; create an EXTERNAL_KEY_STORE instead.",
            ));
        }
        let cluster = self
            .config()
            .clusters
            .get(&c.cluster_id)
            .ok_or_else(cluster_not_found)?;
        if !cluster.is_active() {
            return Err(cluster_not_active());
        }
        if certificate_der(c.trust_anchor.as_bytes()).as_deref()
            != Some(&cluster.trust_anchor_der[..])
        {
            return Err(incorrect_trust_anchor());
        }
        check_cluster_free(self, st, None, cluster)?;
        if !cluster.meets_hsm_requirement() {
            return Err(cluster_invalid_configuration());
        }
        Ok(())
    }

    /// Connect's synchronous part for a CloudHSM store: an inactive cluster fails the
    /// call (the store stays DISCONNECTED). A cluster missing from the registry or
    /// without active HSMs fails later, in the attempt, with a ConnectionErrorCode.
    pub(super) fn cloudhsm_connect_check(&self, c: &CloudHsmSettings) -> Result<(), KmsError> {
        match self.config().clusters.get(&c.cluster_id) {
            Some(cluster) if !cluster.is_active() => Err(cluster_not_active()),
            _ => Ok(()),
        }
    }

    /// One background connect attempt: log in as kmsuser, rotate the password, keep
    /// the session. The rotated password and the failed-login count are recorded even
    /// when the attempt has gone stale (the token changed either way).
    pub(super) async fn cloudhsm_connect_attempt(&self, id: &str, attempt: u64) {
        let current = |s: &CustomKeyStore| {
            s.attempt == attempt && s.connection_state == ConnectionState::Connecting
        };
        let Some(c) = self.store().read(|st| {
            st.stores
                .get(id)
                .filter(|s| current(s))
                .and_then(|s| s.cloudhsm().cloned())
        }) else {
            return;
        };
        let login = self.cloudhsm_login(id, &c).await;
        let applied = self.store().transact(|st, ch| {
            let Some(s) = st.stores.get_mut(id) else {
                return Ok((false, None));
            };
            let is_current = current(s);
            let Some(h) = s.cloudhsm_mut() else {
                return Ok((false, None));
            };
            let code = record_login(h, &login);
            if is_current {
                s.connection_error_code = code;
                s.connection_state = match code {
                    None => ConnectionState::Connected,
                    Some(_) => ConnectionState::Failed,
                };
            }
            ch.store(id);
            Ok((is_current, code))
        });
        match (&applied, &login.outcome) {
            (Ok((true, None)), _) => {
                tracing::info!(custom_key_store_id = %id, "custom key store connected; kmsuser password rotated")
            }
            (Ok((true, Some(code))), Err(r)) => tracing::info!(
                custom_key_store_id = %id,
                code = ?code,
                reason = %r.reason,
                "custom key store connection failed"
            ),
            (Ok(_), _) => {
                tracing::debug!(custom_key_store_id = %id, "stale connect result recorded")
            }
            (Err(e), _) => {
                tracing::error!(custom_key_store_id = %id, error = %e, "cannot record the connect result")
            }
        }
        // A session nobody wants any more: the attempt went stale, or was not recorded.
        let keep = matches!(applied, Ok((true, None)));
        if login.outcome.is_ok() && !keep {
            let emu = self.clone();
            let store_id = id.to_owned();
            let _ = tokio::task::spawn_blocking(move || emu.shared.hsm.release(&store_id)).await;
        }
    }

    /// The attempt's login: refused without touching the token when the cluster is
    /// missing, has no active HSM, or kmsuser is locked out (and no new password
    /// came since); otherwise a login on the token that rotates the password.
    async fn cloudhsm_login(&self, id: &str, c: &CloudHsmSettings) -> Login {
        let refused = |code, reason| Login {
            outcome: Err(Refusal { code, reason }),
            on_token: false,
        };
        let cluster = self.config().clusters.get(&c.cluster_id).cloned();
        let Some(cl) = cluster else {
            return refused(
                ConnectionErrorCode::ClusterNotFound,
                format!("cluster {} is not in the registry", c.cluster_id),
            );
        };
        if cl.active_hsms() == 0 {
            return refused(
                ConnectionErrorCode::InsufficientCloudhsmHsms,
                format!("cluster {} has no active HSM", cl.id),
            );
        }
        if c.failed_logins >= LOCKOUT_AFTER && !c.retry_after_lockout {
            return refused(
                ConnectionErrorCode::UserLockedOut,
                "kmsuser is locked out; reset its password on the cluster, then \
                 UpdateCustomKeyStore KeyStorePassword"
                    .to_owned(),
            );
        }
        let emu = self.clone();
        let store_id = id.to_owned();
        let password = c.password.clone();
        let outcome =
            tokio::task::spawn_blocking(move || emu.shared.hsm.connect(&store_id, &cl, &password))
                .await
                .unwrap_or_else(|e| {
                    Err(Refusal {
                        code: ConnectionErrorCode::InternalError,
                        reason: format!("login task failed: {e}"),
                    })
                });
        Login {
            outcome,
            on_token: true,
        }
    }

    /// After a restart, CONNECTED CloudHSM stores have no session: log in again with
    /// the (rotated, persisted) password, without rotating it. A refusal is logged and
    /// changes nothing — like KMS, the store stays CONNECTED until disconnected, and
    /// operations needing the cluster fail meanwhile.
    pub(super) fn spawn_cloudhsm_resume(&self) {
        let connected: Vec<(String, CloudHsmSettings)> = self.store().read(|st| {
            st.stores
                .values()
                .filter(|s| s.connection_state == ConnectionState::Connected)
                .filter_map(|s| s.cloudhsm().map(|c| (s.id.clone(), c.clone())))
                .collect()
        });
        for (id, c) in connected {
            let Some(cluster) = self.config().clusters.get(&c.cluster_id).cloned() else {
                tracing::warn!(custom_key_store_id = %id, cluster_id = %c.cluster_id, "CONNECTED store's cluster is not in the registry");
                continue;
            };
            let emu = self.clone();
            tokio::task::spawn_blocking(move || {
                match emu.shared.hsm.reopen(&id, &cluster, &c.password) {
                    Ok(()) => {
                        tracing::info!(custom_key_store_id = %id, "kmsuser session re-opened after restart")
                    }
                    Err(r) => {
                        tracing::warn!(custom_key_store_id = %id, code = ?r.code, reason = %r.reason, "cannot re-open the kmsuser session after restart")
                    }
                }
            });
        }
    }

    /// UpdateCustomKeyStore for a CloudHSM key store (`keystores` dispatches here).
    /// Nothing is called out, so it checks and applies in one transaction.
    pub(super) fn update_cloudhsm_store(
        &self,
        _ctx: &Ctx,
        req: UpdateCustomKeyStoreRequest,
    ) -> Result<Empty, KmsError> {
        check_cloudhsm_update(&req)?;
        let id = req.custom_key_store_id.clone().unwrap_or_default();
        let offline = req.key_store_password.is_some() || req.cloud_hsm_cluster_id.is_some();
        self.store().transact(|st, ch| {
            let s = st.stores.get(&id).ok_or_else(|| not_found(&id))?;
            check_update_state(
                &id,
                s.connection_state,
                offline,
                "the key store password and the CloudHSM cluster can be changed only while \
                 the store is DISCONNECTED.",
            )?;
            let current = s
                .cloudhsm()
                .ok_or_else(|| KmsError::internal(&"store type changed"))?
                .cluster_id
                .clone();
            if let Some(new_id) = &req.cloud_hsm_cluster_id
                && *new_id != current
            {
                self.check_related_cluster(st, &id, &current, new_id)?;
            }
            check_unique(
                st,
                Some(&id),
                req.new_custom_key_store_name.as_deref(),
                None,
            )?;
            let s = st.stores.get_mut(&id).ok_or_else(|| not_found(&id))?;
            if let Some(n) = &req.new_custom_key_store_name {
                s.name = n.clone();
            }
            let h = s
                .cloudhsm_mut()
                .ok_or_else(|| KmsError::internal(&"store type changed"))?;
            if let Some(c) = &req.cloud_hsm_cluster_id {
                h.cluster_id = c.clone();
            }
            if let Some(p) = &req.key_store_password {
                // Tells KMS the password the operator set; never changes it on the cluster.
                h.password = p.0.clone();
                h.retry_after_lockout = h.failed_logins >= LOCKOUT_AFTER;
            }
            ch.store(&id);
            Ok(())
        })?;
        tracing::info!(custom_key_store_id = %id, "custom key store updated");
        Ok(Empty {})
    }

    /// Update's rules for another cluster (brief §10): it exists, is active, shares
    /// the current cluster's backup history, has two active HSMs in different AZs,
    /// and no other store uses it (or a related cluster).
    fn check_related_cluster(
        &self,
        st: &State,
        id: &str,
        current: &str,
        new_id: &str,
    ) -> Result<(), KmsError> {
        let clusters = &self.config().clusters;
        let new = clusters.get(new_id).ok_or_else(cluster_not_found)?;
        if !new.is_active() {
            return Err(cluster_not_active());
        }
        if !clusters.get(current).is_some_and(|old| old.is_related(new)) {
            return Err(cluster_not_related());
        }
        if !new.meets_hsm_requirement() {
            return Err(cluster_invalid_configuration());
        }
        check_cluster_free(self, st, Some(id), new)
    }
}

/// UpdateCustomKeyStore's members for a CloudHSM key store: their syntax, then no
/// XKS member.
fn check_cloudhsm_update(req: &UpdateCustomKeyStoreRequest) -> Result<(), KmsError> {
    let mut vs = Violations::new();
    check_update_members(&mut vs, req);
    let xks = xks::members_present(&xks::XksMembers {
        endpoint: req.xks_proxy_uri_endpoint.as_deref(),
        path: req.xks_proxy_uri_path.as_deref(),
        vpc_name: req.xks_proxy_vpc_endpoint_service_name.as_deref(),
        vpc_owner: req.xks_proxy_vpc_endpoint_service_owner.as_deref(),
        connectivity: req.xks_proxy_connectivity.as_deref(),
        credential: req.xks_proxy_authentication_credential.as_ref(),
    });
    for (member, present) in xks {
        if present {
            vs.custom(
                member,
                Some(""),
                Shown::Redacted,
                "Member is not valid for an AWS_CLOUDHSM custom key store",
            );
        }
    }
    vs.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(failed_logins: u32) -> CloudHsmSettings {
        CloudHsmSettings {
            cluster_id: "cluster-234567abcdef".into(),
            trust_anchor: String::new(),
            password: SecretString::from("old-password"),
            failed_logins,
            retry_after_lockout: true,
        }
    }

    fn refused(code: ConnectionErrorCode, on_token: bool) -> Login {
        Login {
            outcome: Err(Refusal {
                code,
                reason: String::new(),
            }),
            on_token,
        }
    }

    /// Module doc: "The 5th consecutive refusal ... ends FAILED USER_LOCKED_OUT".
    #[test]
    fn the_fifth_refused_password_locks_kmsuser_out() {
        let mut h = settings(LOCKOUT_AFTER - 2);
        let wrong = refused(ConnectionErrorCode::InvalidCredentials, true);
        assert_eq!(
            record_login(&mut h, &wrong),
            Some(ConnectionErrorCode::InvalidCredentials)
        );
        assert_eq!(
            record_login(&mut h, &wrong),
            Some(ConnectionErrorCode::UserLockedOut)
        );
        assert_eq!(h.failed_logins, LOCKOUT_AFTER);
        assert!(!h.retry_after_lockout);
    }

    /// Module doc: a refusal without touching the token does not count.
    #[test]
    fn a_refusal_before_the_token_counts_nothing() {
        let mut h = settings(1);
        let r = record_login(
            &mut h,
            &refused(ConnectionErrorCode::ClusterNotFound, false),
        );
        assert_eq!(r, Some(ConnectionErrorCode::ClusterNotFound));
        assert_eq!(h.failed_logins, 1);
        assert!(h.retry_after_lockout);
    }

    /// Module doc: "success clears the count"; the rotated password is kept.
    #[test]
    fn a_login_keeps_the_rotated_password_and_clears_the_count() {
        let mut h = settings(LOCKOUT_AFTER);
        let ok = Login {
            outcome: Ok(SecretString::from("rotated")),
            on_token: true,
        };
        assert_eq!(record_login(&mut h, &ok), None);
        assert_eq!(h.password.expose(), "rotated");
        assert_eq!((h.failed_logins, h.retry_after_lockout), (0, false));
    }
}
