//! KMS key management: CreateKey (ordinary `AWS_KMS` keys, keys backed by an
//! external key, checked with the proxy's GetKeyMetadata, and keys whose material
//! the emulator generates in a CloudHSM key store's token), DescribeKey with the
//! derived `Unavailable` state, ListKeys, EnableKey, DisableKey, ScheduleKeyDeletion
//! and CancelKeyDeletion; plus key-ID resolution shared with [`crypto`](super::crypto).

use serde::{Deserialize, Serialize};

use super::error::{Exception, KmsError};
use super::hsm::KeyFault;
use super::keystores::cloudhsm::cluster_invalid_configuration;
use super::keystores::{Empty, random, target_of};
use super::store::{ConnectionState, KmsKey, Origin, State, StoredKeyState, now_epoch};
use super::validate::{self as v, Shown, Violations};
use super::xks_client::XksTarget;
use super::{Ctx, Emulator};
use crate::api::wire::RequestMetadata;
use crate::secret::SecretBytes;

const KEY_SPECS: &[&str] = &[
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SYMMETRIC_DEFAULT",
    "HMAC_224",
    "HMAC_256",
    "HMAC_384",
    "HMAC_512",
    "SM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
    "ECC_NIST_EDWARDS25519",
];
const KEY_USAGES: &[&str] = &[
    "SIGN_VERIFY",
    "ENCRYPT_DECRYPT",
    "GENERATE_VERIFY_MAC",
    "KEY_AGREEMENT",
];
const ORIGINS: &[&str] = &["AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"];
const DEFAULT_LIST_LIMIT: usize = 100;

/// What DescribeKey reports; `Unavailable` is derived from the store's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    Unavailable,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "Enabled",
            Self::Disabled => "Disabled",
            Self::PendingDeletion => "PendingDeletion",
            Self::Unavailable => "Unavailable",
        }
    }
}

/// Brief §4.2: PendingDeletion always shows; otherwise a key in a store that is not
/// CONNECTED is Unavailable; otherwise the stored state.
pub fn reported_state(st: &State, k: &KmsKey) -> KeyState {
    match k.state {
        StoredKeyState::PendingDeletion => KeyState::PendingDeletion,
        stored => {
            let store_down = k.custom_key_store_id.as_ref().is_some_and(|id| {
                st.stores
                    .get(id)
                    .is_none_or(|s| s.connection_state != ConnectionState::Connected)
            });
            match (store_down, stored) {
                (true, _) => KeyState::Unavailable,
                (false, StoredKeyState::Enabled) => KeyState::Enabled,
                (false, StoredKeyState::Disabled) => KeyState::Disabled,
                (false, StoredKeyState::PendingDeletion) => KeyState::PendingDeletion,
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TagInput {
    pub tag_key: Option<String>,
    pub tag_value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateKeyRequest {
    pub policy: Option<String>,
    pub description: Option<String>,
    pub key_usage: Option<String>,
    pub customer_master_key_spec: Option<String>,
    pub key_spec: Option<String>,
    pub origin: Option<String>,
    pub custom_key_store_id: Option<String>,
    pub bypass_policy_lockout_safety_check: Option<bool>,
    pub tags: Option<Vec<TagInput>>,
    pub multi_region: Option<bool>,
    pub xks_key_id: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadataResponse {
    pub key_metadata: KeyMetadata,
}

#[derive(Debug, Serialize)]
pub struct XksKeyConfiguration {
    #[serde(rename = "Id")]
    pub id: String,
}

/// `KeyMetadata` as KMS returns it for symmetric keys.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadata {
    #[serde(rename = "AWSAccountId")]
    pub aws_account_id: String,
    pub key_id: String,
    pub arn: String,
    pub creation_date: f64,
    pub enabled: bool,
    pub description: String,
    pub key_usage: &'static str,
    pub key_state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<f64>,
    pub origin: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_key_store_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_hsm_cluster_id: Option<String>,
    pub key_manager: &'static str,
    pub customer_master_key_spec: &'static str,
    pub key_spec: &'static str,
    pub encryption_algorithms: Vec<&'static str>,
    pub multi_region: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_deletion_window_in_days: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xks_key_configuration: Option<XksKeyConfiguration>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyIdRequest {
    pub key_id: Option<String>,
    pub grant_tokens: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListKeysRequest {
    pub limit: Option<i64>,
    pub marker: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListKeysResponse {
    pub keys: Vec<KeyListEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyListEntry {
    pub key_id: String,
    pub key_arn: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduleKeyDeletionRequest {
    pub key_id: Option<String>,
    pub pending_window_in_days: Option<i64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduleKeyDeletionResponse {
    pub key_id: String,
    pub deletion_date: f64,
    pub key_state: &'static str,
    pub pending_window_in_days: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CancelKeyDeletionResponse {
    pub key_id: String,
}

/// `KeyId` syntax shared by every operation that takes one.
pub fn check_key_id(vs: &mut Violations, member: &str, key_id: Option<&str>, required: bool) {
    if required {
        vs.required(member, &key_id);
    }
    vs.length(member, key_id, 1, 2048, Shown::Yes);
}

pub fn check_grant_tokens(vs: &mut Violations, tokens: Option<&Vec<String>>) {
    if let Some(t) = tokens {
        if t.len() > 10 {
            vs.custom(
                "grantTokens",
                None,
                Shown::Yes,
                "Member must have length less than or equal to 10",
            );
        }
        for (i, tok) in t.iter().enumerate() {
            vs.length(
                &format!("grantTokens.{}.member", i + 1),
                Some(tok),
                1,
                8192,
                Shown::Redacted,
            );
        }
    }
}

fn key_not_found(arn: &str) -> KmsError {
    KmsError::new(Exception::NotFound, format!("Key '{arn}' does not exist"))
}

/// A failure with a key's material in its CloudHSM cluster, as KMS reports it.
pub(super) fn cloudhsm_key_fault(arn: &str, f: &KeyFault) -> KmsError {
    match f {
        // KMS documents the exception but no text: say what happened and what to do.
        KeyFault::MaterialMissing => KmsError::new(
            Exception::KmsInvalidState,
            format!(
                "{arn} is unusable: its key material is not in the associated AWS CloudHSM \
                 cluster (no key labelled with this key ARN is owned by kmsuser). Restore \
                 the key from a backup of the cluster, or schedule the KMS key for deletion."
            ),
        ),
        KeyFault::NoSession => KmsError::new(
            Exception::KmsInvalidState,
            format!(
                "{arn} is unavailable: KMS holds no session with the CloudHSM cluster of its \
                 custom key store. Disconnect and connect the custom key store again."
            ),
        ),
        KeyFault::NotAuthentic => KmsError::new(
            Exception::InvalidCiphertext,
            "The ciphertext is not valid, was not produced by this KMS, or does not match the \
             encryption context.",
        ),
        KeyFault::Token(code) => KmsError::new(
            Exception::KmsInternal,
            format!("KMS cannot communicate with your CloudHSM cluster ({code})."),
        ),
    }
}

/// CreateKey's `Origin`, parsed once: the three origins a key can have, plus
/// `EXTERNAL` (imported material), which the model allows and the emulator refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestedOrigin {
    Stored(Origin),
    Imported,
}

impl RequestedOrigin {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "AWS_KMS" => Some(Self::Stored(Origin::AwsKms)),
            "EXTERNAL" => Some(Self::Imported),
            "AWS_CLOUDHSM" => Some(Self::Stored(Origin::AwsCloudHsm)),
            "EXTERNAL_KEY_STORE" => Some(Self::Stored(Origin::ExternalKeyStore)),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Stored(o) => o.as_str(),
            Self::Imported => "EXTERNAL",
        }
    }

    fn in_custom_key_store(self) -> bool {
        match self {
            Self::Stored(Origin::ExternalKeyStore | Origin::AwsCloudHsm) => true,
            Self::Stored(Origin::AwsKms) | Self::Imported => false,
        }
    }
}

/// Where a new key's material lives: CreateKey's parameters once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// `AWS_KMS`: the emulator's own material only.
    Kms,
    /// `AWS_CLOUDHSM`: material generated in the store's cluster.
    CloudHsm { store_id: String },
    /// `EXTERNAL_KEY_STORE`: the emulator's material under the proxy's external key.
    External {
        store_id: String,
        xks_key_id: String,
    },
}

/// CreateKey's members against the model (every violation at once), and the origin
/// they ask for (`AWS_KMS` when absent).
fn check_create_key_members(req: &CreateKeyRequest) -> Result<RequestedOrigin, KmsError> {
    let mut vs = Violations::new();
    vs.string(
        "policy",
        req.policy.as_deref(),
        1,
        131_072,
        v::is_policy,
        v::POLICY_PATTERN,
        Shown::Yes,
    );
    vs.length(
        "description",
        req.description.as_deref(),
        0,
        8192,
        Shown::Yes,
    );
    vs.one_of("keyUsage", req.key_usage.as_deref(), KEY_USAGES);
    vs.one_of(
        "customerMasterKeySpec",
        req.customer_master_key_spec.as_deref(),
        &KEY_SPECS[..13],
    );
    vs.one_of("keySpec", req.key_spec.as_deref(), KEY_SPECS);
    vs.one_of("origin", req.origin.as_deref(), ORIGINS);
    vs.length(
        "customKeyStoreId",
        req.custom_key_store_id.as_deref(),
        1,
        64,
        Shown::Yes,
    );
    vs.string(
        "xksKeyId",
        req.xks_key_id.as_deref(),
        1,
        128,
        v::is_xks_key_id,
        v::XKS_KEY_ID_PATTERN,
        Shown::Yes,
    );
    for (i, t) in req.tags.iter().flatten().enumerate() {
        let m = format!("tags.{}.member", i + 1);
        vs.required(&format!("{m}.tagKey"), &t.tag_key);
        vs.required(&format!("{m}.tagValue"), &t.tag_value);
        vs.length(
            &format!("{m}.tagKey"),
            t.tag_key.as_deref(),
            1,
            128,
            Shown::Yes,
        );
        vs.length(
            &format!("{m}.tagValue"),
            t.tag_value.as_deref(),
            0,
            256,
            Shown::Yes,
        );
    }
    vs.finish()?;
    // `one_of` let only the model's values through.
    Ok(req
        .origin
        .as_deref()
        .and_then(RequestedOrigin::parse)
        .unwrap_or(RequestedOrigin::Stored(Origin::AwsKms)))
}

/// The key type and the origin's own members (brief §4.1 step 1: Validation for a
/// missing or illegal combination, UnsupportedOperation for a key type the emulator
/// or a custom key store cannot hold). The order decides which error wins.
fn check_key_type(req: &CreateKeyRequest, origin: RequestedOrigin) -> Result<(), KmsError> {
    if req.key_spec.is_some() && req.customer_master_key_spec.is_some() {
        return Err(KmsError::validation(
            "You cannot specify KeySpec and CustomerMasterKeySpec in the same request. \
             CustomerMasterKeySpec is deprecated.",
        ));
    }
    let spec = req
        .key_spec
        .as_deref()
        .or(req.customer_master_key_spec.as_deref())
        .unwrap_or("SYMMETRIC_DEFAULT");
    let usage = req.key_usage.as_deref().unwrap_or("ENCRYPT_DECRYPT");
    if origin == RequestedOrigin::Stored(Origin::ExternalKeyStore) {
        let mut vs = Violations::new();
        vs.required("customKeyStoreId", &req.custom_key_store_id);
        vs.required("xksKeyId", &req.xks_key_id);
        vs.finish()?;
    } else if req.xks_key_id.is_some() {
        return Err(KmsError::validation(format!(
            "XksKeyId is valid only with Origin EXTERNAL_KEY_STORE, not {}.",
            origin.as_str()
        )));
    }
    let in_store = origin.in_custom_key_store();
    if spec != "SYMMETRIC_DEFAULT" {
        return Err(KmsError::new(
            Exception::UnsupportedOperation,
            if in_store {
                format!("{spec} KMS keys are not supported in a custom key store.")
            } else {
                format!("The KMS emulator supports only SYMMETRIC_DEFAULT keys, not {spec}.")
            },
        ));
    }
    if usage != "ENCRYPT_DECRYPT" {
        return Err(KmsError::validation(format!(
            "KeyUsage {usage} is not compatible with KeySpec SYMMETRIC_DEFAULT."
        )));
    }
    if req.multi_region == Some(true) {
        return Err(KmsError::new(
            Exception::UnsupportedOperation,
            if in_store {
                "Multi-Region keys are not supported in a custom key store."
            } else {
                "The KMS emulator does not support multi-Region keys."
            },
        ));
    }
    Ok(())
}

/// [`check_key_type`], then the origin decides where the key lives; a custom key
/// store ID belongs to the two custom-key-store origins only.
fn placement_of(req: &CreateKeyRequest, origin: RequestedOrigin) -> Result<Placement, KmsError> {
    check_key_type(req, origin)?;
    let store_id = req.custom_key_store_id.clone();
    match origin {
        RequestedOrigin::Imported => Err(KmsError::new(
            Exception::UnsupportedOperation,
            "The KMS emulator does not support imported key material (Origin EXTERNAL).",
        )),
        RequestedOrigin::Stored(Origin::AwsKms) => match store_id {
            Some(_) => Err(KmsError::validation(
                "CustomKeyStoreId requires Origin AWS_CLOUDHSM or EXTERNAL_KEY_STORE.",
            )),
            None => Ok(Placement::Kms),
        },
        RequestedOrigin::Stored(Origin::AwsCloudHsm) => match store_id {
            Some(store_id) => Ok(Placement::CloudHsm { store_id }),
            None => Err(KmsError::validation(
                "Origin AWS_CLOUDHSM requires a CustomKeyStoreId.",
            )),
        },
        // Both members are required for this origin: `check_key_type` said so.
        RequestedOrigin::Stored(Origin::ExternalKeyStore) => {
            match (store_id, req.xks_key_id.clone()) {
                (Some(store_id), Some(xks_key_id)) => Ok(Placement::External {
                    store_id,
                    xks_key_id,
                }),
                (None, _) | (_, None) => Err(KmsError::internal(&"XKS members unchecked")),
            }
        }
    }
}

/// CreateKey's checks of an external key store (brief §4.1 steps 2–3): it exists, is
/// an external one, is CONNECTED, and no key in it (pending deletion included: it
/// still holds its external key) uses `xks_key_id`. Gives where the proxy is.
fn check_xks_store(st: &State, store_id: &str, xks_key_id: &str) -> Result<XksTarget, KmsError> {
    let s = st.stores.get(store_id).ok_or_else(|| {
        KmsError::new(
            Exception::CustomKeyStoreNotFound,
            format!("Custom key store {store_id} does not exist."),
        )
    })?;
    if s.xks().is_none() {
        return Err(KmsError::new(
            Exception::UnsupportedOperation,
            format!(
                "Custom key store {store_id} is an AWS_CLOUDHSM key store; use Origin \
                 AWS_CLOUDHSM."
            ),
        ));
    }
    if s.connection_state != ConnectionState::Connected {
        return Err(KmsError::new(
            Exception::CustomKeyStoreInvalidState,
            format!(
                "Custom key store {store_id} is not connected to its external key store \
                 proxy. Connect the external key store and try the request again."
            ),
        ));
    }
    if st
        .keys_in_store(store_id)
        .any(|k| k.xks_key_id.as_deref() == Some(xks_key_id))
    {
        return Err(KmsError::new(
            Exception::XksKeyAlreadyInUse,
            format!(
                "The external key {xks_key_id} is already associated with a KMS key in \
                 custom key store {store_id}."
            ),
        ));
    }
    target_of(s).ok_or_else(|| KmsError::internal(&"store type changed"))
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok() && s.len() == 36
}

impl Emulator {
    /// Resolves a key ID, key ARN, alias name or alias ARN to a key's ID.
    pub(super) fn resolve_key(&self, st: &State, key_id: &str) -> Result<String, KmsError> {
        let cfg = self.config();
        let alias_not_found = |name: &str| {
            KmsError::new(
                Exception::NotFound,
                format!(
                    "Alias arn:aws:kms:{}:{}:{name} is not found.",
                    cfg.region, cfg.account_id
                ),
            )
        };
        let id = if let Some(rest) = key_id.strip_prefix("arn:") {
            // arn:<partition>:kms:<region>:<account>:key/<id> or :alias/<name>
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(KmsError::new(
                    Exception::InvalidArn,
                    format!("Invalid arn {key_id}"),
                ));
            };
            if partition.is_empty() || service != "kms" {
                return Err(KmsError::new(
                    Exception::InvalidArn,
                    format!("Invalid arn {key_id}"),
                ));
            }
            if let Some(alias) = resource.strip_prefix("alias/") {
                return Err(alias_not_found(&format!("alias/{alias}")));
            }
            let Some(id) = resource.strip_prefix("key/") else {
                return Err(KmsError::new(
                    Exception::InvalidArn,
                    format!("Invalid arn {key_id}"),
                ));
            };
            if region != cfg.region || account != cfg.account_id {
                return Err(key_not_found(key_id));
            }
            id.to_owned()
        } else if key_id.starts_with("alias/") {
            // The emulator has no aliases yet.
            return Err(alias_not_found(key_id));
        } else {
            if !is_uuid(key_id) {
                return Err(KmsError::new(
                    Exception::NotFound,
                    format!("Invalid keyId '{key_id}'"),
                ));
            }
            key_id.to_owned()
        };
        let now = now_epoch();
        match st.keys.get(&id) {
            Some(k) if k.purge_at.is_none_or(|t| t > now) => Ok(id),
            _ => Err(key_not_found(&self.key_arn(&id))),
        }
    }

    /// CreateKey's checks of a CloudHSM key store: it exists, is a CloudHSM one, is
    /// CONNECTED, and its cluster still has two active HSMs in different AZs.
    fn check_cloudhsm_store(&self, st: &State, store_id: &str) -> Result<(), KmsError> {
        let s = st.stores.get(store_id).ok_or_else(|| {
            KmsError::new(
                Exception::CustomKeyStoreNotFound,
                format!("Custom key store {store_id} does not exist."),
            )
        })?;
        let Some(c) = s.cloudhsm() else {
            return Err(KmsError::new(
                Exception::UnsupportedOperation,
                format!(
                    "Custom key store {store_id} is an EXTERNAL_KEY_STORE; use Origin \
                     EXTERNAL_KEY_STORE."
                ),
            ));
        };
        if s.connection_state != ConnectionState::Connected {
            return Err(KmsError::new(
                Exception::CustomKeyStoreInvalidState,
                format!(
                    "Custom key store {store_id} is not connected to its CloudHSM cluster. \
                     Connect the custom key store and try the request again."
                ),
            ));
        }
        if !self
            .config()
            .clusters
            .get(&c.cluster_id)
            .is_some_and(|cl| cl.meets_hsm_requirement())
        {
            return Err(cluster_invalid_configuration());
        }
        Ok(())
    }

    /// Removes keys whose deletion waiting period has run out. The material of a key
    /// in a CloudHSM key store is destroyed in its cluster when the store is
    /// connected; otherwise (as KMS documents) the deletion of the backing key is
    /// best effort: it stays in the cluster and a warning says so.
    pub(super) fn purge_expired_keys(&self) -> Result<(), KmsError> {
        let now = now_epoch();
        let in_clusters = self.store().transact(|st, ch| {
            let expired: Vec<String> = st
                .keys
                .values()
                .filter(|k| k.purge_at.is_some_and(|t| t <= now))
                .map(|k| k.id.clone())
                .collect();
            let mut in_clusters = Vec::new();
            for id in expired {
                if let Some(k) = st.keys.remove(&id)
                    && k.origin == Origin::AwsCloudHsm
                    && let Some(store_id) = k.custom_key_store_id
                {
                    in_clusters.push((store_id, k.arn));
                }
                ch.key(&id);
                tracing::info!(key_id = %id, "KMS key deleted at the end of its waiting period");
            }
            Ok(in_clusters)
        })?;
        for (store_id, arn) in in_clusters {
            match self.shared.hsm.destroy_key(&store_id, &arn) {
                Ok(n) => {
                    tracing::info!(key_arn = %arn, destroyed = n, "key material destroyed in the CloudHSM cluster");
                }
                Err(f) => {
                    tracing::warn!(
                        key_arn = %arn,
                        custom_key_store_id = %store_id,
                        fault = ?f,
                        "the key material could not be destroyed in the CloudHSM cluster; \
                         it stays there, labelled with the key ARN (delete it with the \
                         CloudHSM tools)"
                    );
                }
            }
        }
        Ok(())
    }

    /// [`reported_state`], plus what the store's session has learned: a CloudHSM key
    /// whose material an operation found missing from the cluster is `Unavailable`
    /// (KMS: its state "eventually changes to UNAVAILABLE"; until an operation looks,
    /// it keeps its state, as KMS's "fails even when its key state is Enabled") until
    /// the store connects again. PendingDeletion still shows.
    pub(super) fn key_state(&self, st: &State, k: &KmsKey) -> KeyState {
        match (reported_state(st, k), &k.custom_key_store_id) {
            (KeyState::Enabled | KeyState::Disabled, Some(store_id))
                if k.origin == Origin::AwsCloudHsm
                    && self.shared.hsm.material_missing(store_id, &k.arn) =>
            {
                KeyState::Unavailable
            }
            (state, _) => state,
        }
    }

    fn metadata_of(&self, st: &State, k: &KmsKey) -> KeyMetadata {
        let state = self.key_state(st, k);
        let pending = state == KeyState::PendingDeletion;
        KeyMetadata {
            aws_account_id: self.config().account_id.clone(),
            key_id: k.id.clone(),
            arn: k.arn.clone(),
            creation_date: k.creation_date,
            enabled: state == KeyState::Enabled,
            description: k.description.clone(),
            key_usage: "ENCRYPT_DECRYPT",
            key_state: state.as_str(),
            deletion_date: if pending { k.deletion_date } else { None },
            origin: k.origin.as_str(),
            custom_key_store_id: k.custom_key_store_id.clone(),
            cloud_hsm_cluster_id: match k.origin {
                Origin::AwsCloudHsm => k
                    .custom_key_store_id
                    .as_ref()
                    .and_then(|id| st.stores.get(id))
                    .and_then(|s| s.cloudhsm())
                    .map(|c| c.cluster_id.clone()),
                Origin::AwsKms | Origin::ExternalKeyStore => None,
            },
            key_manager: "CUSTOMER",
            customer_master_key_spec: "SYMMETRIC_DEFAULT",
            key_spec: "SYMMETRIC_DEFAULT",
            encryption_algorithms: vec!["SYMMETRIC_DEFAULT"],
            multi_region: false,
            pending_deletion_window_in_days: if pending { k.pending_window_days } else { None },
            xks_key_configuration: k
                .xks_key_id
                .as_ref()
                .map(|id| XksKeyConfiguration { id: id.clone() }),
        }
    }

    fn default_policy(&self) -> String {
        format!(
            r#"{{"Version":"2012-10-17","Id":"key-default-1","Statement":[{{"Sid":"Enable IAM User Permissions","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::{}:root"}},"Action":"kms:*","Resource":"*"}}]}}"#,
            self.config().account_id
        )
    }

    /// CreateKey: the members' syntax, then the parameter combination (which decides
    /// where the key lives), then the store's own checks and its outcall for a key in
    /// a custom key store.
    pub async fn create_key(
        &self,
        ctx: &Ctx,
        req: CreateKeyRequest,
    ) -> Result<KeyMetadataResponse, KmsError> {
        let origin = check_create_key_members(&req)?;
        let placement = placement_of(&req, origin)?;
        let key = self.new_key(req, &placement)?;
        let (id, arn, origin) = (key.id.clone(), key.arn.clone(), key.origin);
        match placement {
            Placement::Kms => self.store().transact(|st, ch| {
                st.keys.insert(id.clone(), key);
                ch.key(&id);
                Ok(())
            })?,
            Placement::External {
                store_id,
                xks_key_id,
            } => {
                self.create_xks_key(ctx, key, &store_id, &xks_key_id)
                    .await?
            }
            Placement::CloudHsm { store_id } => self.create_cloudhsm_key(key, &store_id).await?,
        }
        tracing::info!(key_arn = %arn, origin = origin.as_str(), "KMS key created");
        self.store().read(|st| {
            let k = st.keys.get(&id).ok_or_else(|| key_not_found(&arn))?;
            Ok(KeyMetadataResponse {
                key_metadata: self.metadata_of(st, k),
            })
        })
    }

    /// A new key, Enabled, with fresh backing material, placed as CreateKey decided.
    fn new_key(&self, req: CreateKeyRequest, placement: &Placement) -> Result<KmsKey, KmsError> {
        let id = uuid::Uuid::new_v4().to_string();
        let (origin, custom_key_store_id, xks_key_id) = match placement {
            Placement::Kms => (Origin::AwsKms, None, None),
            Placement::CloudHsm { store_id } => (Origin::AwsCloudHsm, Some(store_id.clone()), None),
            Placement::External {
                store_id,
                xks_key_id,
            } => (
                Origin::ExternalKeyStore,
                Some(store_id.clone()),
                Some(xks_key_id.clone()),
            ),
        };
        Ok(KmsKey {
            arn: self.key_arn(&id),
            id,
            origin,
            custom_key_store_id,
            xks_key_id,
            state: StoredKeyState::Enabled,
            description: req.description.unwrap_or_default(),
            policy: req.policy.unwrap_or_else(|| self.default_policy()),
            tags: req
                .tags
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    (
                        t.tag_key.unwrap_or_default(),
                        t.tag_value.unwrap_or_default(),
                    )
                })
                .collect(),
            creation_date: now_epoch(),
            deletion_date: None,
            pending_window_days: None,
            purge_at: None,
            material: SecretBytes::new(random::<32>()?.to_vec()),
            backing_key_id: random::<16>()?,
        })
    }

    /// CreateKey in an external key store (brief §4.1 steps 2–5): the store and the
    /// external key's uniqueness, the proxy's GetKeyMetadata, the same checks again
    /// in the transaction that records the key.
    async fn create_xks_key(
        &self,
        ctx: &Ctx,
        key: KmsKey,
        store_id: &str,
        xks_key_id: &str,
    ) -> Result<(), KmsError> {
        self.purge_expired_keys()?;
        self.store()
            .check_call_recheck(
                |st| check_xks_store(st, store_id, xks_key_id),
                |target| self.check_external_key(ctx, target, xks_key_id),
                |st, ch, _, ()| {
                    let id = key.id.clone();
                    st.keys.insert(id.clone(), key);
                    ch.key(&id);
                    Ok(())
                },
                |()| {},
            )
            .await
    }

    /// GetKeyMetadata (`kmsOperation=CreateKey`, no `kmsKeyArn`: the key does not exist
    /// yet); the external key must be an enabled AES-256 key that can encrypt and
    /// decrypt (brief §4.1 step 4), with one message per unmet requirement.
    async fn check_external_key(
        &self,
        ctx: &Ctx,
        target: XksTarget,
        xks_key_id: &str,
    ) -> Result<(), KmsError> {
        let md = RequestMetadata {
            kms_request_id: ctx.request_id.clone(),
            kms_operation: "CreateKey".to_owned(),
            aws_principal_arn: Some(ctx.principal_arn.clone()),
            ..RequestMetadata::default()
        };
        let meta = self
            .xks()
            .key_metadata(&target, xks_key_id, md)
            .await
            .map_err(|f| {
                tracing::info!(failure = ?f, "CreateKey GetKeyMetadata failed");
                f.for_create_key()
            })?;
        let invalid = |what: String| KmsError::new(Exception::XksKeyInvalidConfiguration, what);
        if meta.key_spec != "AES_256" {
            return Err(invalid(format!(
                "The external key {xks_key_id} is not a 256-bit AES key (its keySpec is {}). \
                 KMS keys in an external key store need an AES_256 external key.",
                meta.key_spec.chars().take(32).collect::<String>()
            )));
        }
        if !(meta.key_usage.iter().any(|u| u == "ENCRYPT")
            && meta.key_usage.iter().any(|u| u == "DECRYPT"))
        {
            return Err(invalid(format!(
                "The external key {xks_key_id} does not allow both ENCRYPT and DECRYPT. \
                 Enable both operations on the key in the external key manager."
            )));
        }
        if meta.key_status != "ENABLED" {
            return Err(invalid(format!(
                "The external key {xks_key_id} is not enabled in the external key manager. \
                 Enable the external key and try the request again."
            )));
        }
        Ok(())
    }

    /// CreateKey in a CloudHSM key store: the store's checks, a new AES-256 key in the
    /// cluster labelled with the ARN, the checks again in the transaction; material
    /// no KMS key would refer to (the re-check refused) is destroyed again.
    async fn create_cloudhsm_key(&self, key: KmsKey, store_id: &str) -> Result<(), KmsError> {
        self.purge_expired_keys()?;
        let arn = key.arn.clone();
        let arn = arn.as_str();
        self.store()
            .check_call_recheck(
                |st| self.check_cloudhsm_store(st, store_id),
                |()| async move {
                    let emu = self.clone();
                    let (sid, label) = (store_id.to_owned(), arn.to_owned());
                    tokio::task::spawn_blocking(move || emu.shared.hsm.create_key(&sid, &label))
                        .await
                        .map_err(|e| KmsError::internal(&e))?
                        .map_err(|f| {
                            tracing::warn!(key_arn = %arn, fault = ?f, "generating the key in the CloudHSM cluster failed");
                            cloudhsm_key_fault(arn, &f)
                        })
                },
                |st, ch, (), ()| {
                    let id = key.id.clone();
                    st.keys.insert(id.clone(), key);
                    ch.key(&id);
                    Ok(())
                },
                |()| {
                    if let Err(f) = self.shared.hsm.destroy_key(store_id, arn) {
                        tracing::warn!(key_arn = %arn, fault = ?f, "removing the unrecorded key from the CloudHSM cluster failed");
                    }
                },
            )
            .await
    }

    pub fn describe_key(&self, req: KeyIdRequest) -> Result<KeyMetadataResponse, KmsError> {
        let mut vs = Violations::new();
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), true);
        check_grant_tokens(&mut vs, req.grant_tokens.as_ref());
        vs.finish()?;
        self.purge_expired_keys()?;
        self.store().read(|st| {
            let id = self.resolve_key(st, req.key_id.as_deref().unwrap_or_default())?;
            let k = st.keys.get(&id).ok_or_else(|| key_not_found(&id))?;
            Ok(KeyMetadataResponse {
                key_metadata: self.metadata_of(st, k),
            })
        })
    }

    pub fn list_keys(&self, req: ListKeysRequest) -> Result<ListKeysResponse, KmsError> {
        let mut vs = Violations::new();
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
        vs.finish()?;
        self.purge_expired_keys()?;
        let limit = req
            .limit
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or(DEFAULT_LIST_LIMIT);
        self.store().read(|st| {
            let all: Vec<&KmsKey> = st.keys.values().collect();
            let start = match &req.marker {
                None => 0,
                Some(m) => all.iter().position(|k| &k.id == m).ok_or_else(|| {
                    KmsError::new(
                        Exception::InvalidMarker,
                        "The marker that specifies where pagination should next begin is not valid.",
                    )
                })?,
            };
            let keys = all
                .iter()
                .skip(start)
                .take(limit)
                .map(|k| KeyListEntry {
                    key_id: k.id.clone(),
                    key_arn: k.arn.clone(),
                })
                .collect();
            let next = all.get(start + limit).map(|k| k.id.clone());
            Ok(ListKeysResponse {
                keys,
                truncated: next.is_some(),
                next_marker: next,
            })
        })
    }

    /// EnableKey / DisableKey: allowed unless PendingDeletion; on an Unavailable key
    /// the stored state changes and shows once the store reconnects.
    fn set_enabled(&self, req: KeyIdRequest, enabled: bool) -> Result<Empty, KmsError> {
        let mut vs = Violations::new();
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), true);
        vs.finish()?;
        self.purge_expired_keys()?;
        self.store().transact(|st, ch| {
            let id = self.resolve_key(st, req.key_id.as_deref().unwrap_or_default())?;
            let k = st.keys.get_mut(&id).ok_or_else(|| key_not_found(&id))?;
            if k.state == StoredKeyState::PendingDeletion {
                return Err(KmsError::new(
                    Exception::KmsInvalidState,
                    format!("{} is pending deletion.", k.arn),
                ));
            }
            k.state = if enabled {
                StoredKeyState::Enabled
            } else {
                StoredKeyState::Disabled
            };
            ch.key(&id);
            Ok(Empty {})
        })
    }

    pub fn enable_key(&self, req: KeyIdRequest) -> Result<Empty, KmsError> {
        self.set_enabled(req, true)
    }

    pub fn disable_key(&self, req: KeyIdRequest) -> Result<Empty, KmsError> {
        self.set_enabled(req, false)
    }

    pub fn schedule_key_deletion(
        &self,
        req: ScheduleKeyDeletionRequest,
    ) -> Result<ScheduleKeyDeletionResponse, KmsError> {
        let mut vs = Violations::new();
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), true);
        vs.range("pendingWindowInDays", req.pending_window_in_days, 1, 365);
        vs.finish()?;
        let days = req.pending_window_in_days.unwrap_or(30);
        if !(7..=30).contains(&days) {
            return Err(KmsError::validation(format!(
                "1 validation error detected: Value '{days}' at 'pendingWindowInDays' failed to \
                 satisfy constraint: Member must have value between 7 and 30"
            )));
        }
        let days = u32::try_from(days).unwrap_or(30);
        self.purge_expired_keys()?;
        let day_len = self.config().deletion_day_length.as_secs_f64();
        self.store().transact(|st, ch| {
            let id = self.resolve_key(st, req.key_id.as_deref().unwrap_or_default())?;
            let k = st.keys.get_mut(&id).ok_or_else(|| key_not_found(&id))?;
            if k.state == StoredKeyState::PendingDeletion {
                return Err(KmsError::new(
                    Exception::KmsInvalidState,
                    format!("{} is pending deletion.", k.arn),
                ));
            }
            let now = now_epoch();
            let deletion_date = now + f64::from(days) * 86_400.0;
            k.state = StoredKeyState::PendingDeletion;
            k.deletion_date = Some(deletion_date);
            k.pending_window_days = Some(days);
            k.purge_at = Some(now + f64::from(days) * day_len);
            ch.key(&id);
            tracing::info!(key_arn = %k.arn, days, "KMS key scheduled for deletion");
            Ok(ScheduleKeyDeletionResponse {
                key_id: k.arn.clone(),
                deletion_date,
                key_state: "PendingDeletion",
                pending_window_in_days: days,
            })
        })
    }

    pub fn cancel_key_deletion(
        &self,
        req: KeyIdRequest,
    ) -> Result<CancelKeyDeletionResponse, KmsError> {
        let mut vs = Violations::new();
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), true);
        vs.finish()?;
        self.purge_expired_keys()?;
        self.store().transact(|st, ch| {
            let id = self.resolve_key(st, req.key_id.as_deref().unwrap_or_default())?;
            let k = st.keys.get_mut(&id).ok_or_else(|| key_not_found(&id))?;
            if k.state != StoredKeyState::PendingDeletion {
                return Err(KmsError::new(
                    Exception::KmsInvalidState,
                    format!("{} is not pending deletion.", k.arn),
                ));
            }
            // KMS brings a cancelled key back Disabled, never Enabled.
            k.state = StoredKeyState::Disabled;
            k.deletion_date = None;
            k.pending_window_days = None;
            k.purge_at = None;
            ch.key(&id);
            Ok(CancelKeyDeletionResponse {
                key_id: k.arn.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> CreateKeyRequest {
        serde_json::from_value(json).expect("request")
    }

    fn placement(json: serde_json::Value) -> Result<Placement, (Exception, String)> {
        let req = request(json);
        check_create_key_members(&req)
            .and_then(|origin| placement_of(&req, origin))
            .map_err(|e| (e.exception, e.message))
    }

    #[test]
    fn every_origin_of_the_model_parses_to_itself() {
        for o in ORIGINS {
            assert_eq!(
                RequestedOrigin::parse(o).map(RequestedOrigin::as_str),
                Some(*o)
            );
        }
        assert_eq!(RequestedOrigin::parse("aws_kms"), None);
    }

    /// Brief §4.1 step 1: the origin decides where the key lives; AWS_KMS by default.
    #[test]
    fn the_origin_places_the_key() {
        assert_eq!(placement(serde_json::json!({})), Ok(Placement::Kms));
        assert_eq!(
            placement(serde_json::json!({"Origin": "AWS_CLOUDHSM", "CustomKeyStoreId": "cks-1"})),
            Ok(Placement::CloudHsm {
                store_id: "cks-1".into()
            })
        );
        assert_eq!(
            placement(serde_json::json!({
                "Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": "cks-1", "XksKeyId": "k"
            })),
            Ok(Placement::External {
                store_id: "cks-1".into(),
                xks_key_id: "k".into()
            })
        );
    }

    /// Brief §4.1 step 1: Validation for a missing or illegal combination,
    /// UnsupportedOperation for what a store (or the emulator) cannot hold.
    #[test]
    fn illegal_combinations_are_refused_with_the_documented_exception() {
        let cases = [
            (
                serde_json::json!({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": "cks-1"}),
                Exception::Validation,
            ),
            (serde_json::json!({"XksKeyId": "k"}), Exception::Validation),
            (
                serde_json::json!({"Origin": "AWS_CLOUDHSM", "KeySpec": "RSA_2048"}),
                Exception::UnsupportedOperation,
            ),
            (
                serde_json::json!({"KeyUsage": "SIGN_VERIFY"}),
                Exception::Validation,
            ),
            (
                serde_json::json!({"MultiRegion": true}),
                Exception::UnsupportedOperation,
            ),
            (
                serde_json::json!({"Origin": "EXTERNAL"}),
                Exception::UnsupportedOperation,
            ),
            (
                serde_json::json!({"CustomKeyStoreId": "cks-1"}),
                Exception::Validation,
            ),
            (
                serde_json::json!({"Origin": "AWS_CLOUDHSM"}),
                Exception::Validation,
            ),
        ];
        for (json, want) in cases {
            let got = placement(json.clone()).map_err(|(e, _)| e);
            assert_eq!(got, Err(want), "{json}");
        }
    }

    /// The order of the checks decides which error wins: the key type before the
    /// origin's own rules (an imported RSA key is refused for its type).
    #[test]
    fn the_key_type_is_checked_before_the_origin() {
        let got = placement(serde_json::json!({"Origin": "EXTERNAL", "KeySpec": "RSA_2048"}));
        assert_eq!(
            got,
            Err((
                Exception::UnsupportedOperation,
                "The KMS emulator supports only SYMMETRIC_DEFAULT keys, not RSA_2048.".into()
            ))
        );
    }
}
