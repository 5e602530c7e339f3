//! Encrypt, Decrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext, ReEncrypt
//! (and GenerateRandom), with KMS's double encryption for keys in an external key
//! store and the emulator's own versioned ciphertext blob.
//!
//! # Blob format (private to the emulator, so it is versioned)
//! ```text
//! header = format(1) ‖ key UUID(16) ‖ backing-key ID(16)          33 bytes
//! aad    = header ‖ canon(encryption context)
//! inner  = IV(12) ‖ AES-256-GCM(key material, data, aad) ‖ tag(16)
//! format 1, AWS_KMS key: blob = header ‖ inner
//! format 2, XKS key:     blob = header ‖ u8 ivLen ‖ IV ‖ tag(16) ‖ u8 mdLen ‖
//!                               ciphertextMetadata ‖ proxy ciphertext of `inner`
//! format 3, CloudHSM key: blob = header ‖ inner, where `inner` is computed in the
//!                               store's cluster (C_Encrypt, CKM_AES_GCM) with the
//!                               key labelled with the KMS key's ARN
//! ```
//! Formats 1 and 3 share a layout, so both parse to `Blob::Local` (one layer, no
//! proxy); the format byte, which is part of the AAD, tells them apart.
//! `canon` sorts the context by key and length-prefixes every string (u16 BE), so
//! two different contexts never encode the same. For an XKS key the proxy gets the
//! same `aad` as `additionalAuthenticatedData`: a wrong context fails inside the
//! proxy (KMSInvalidStateException, as real KMS reports it), and a blob header moved
//! to another key fails both layers. The plaintext never leaves the emulator: the
//! proxy only ever sees `inner`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{Exception, KmsError};
use super::hsm::KeyFault;
use super::keys::{KeyState, check_grant_tokens, check_key_id, cloudhsm_key_fault, reported_state};
use super::keystores::{random, target_of};
use super::store::{ConnectionState, Origin, State};
use super::validate::{Shown, Violations};
use super::xks_client::{MSG_CORRUPT_PROXY_CIPHERTEXT, Sealed, XksTarget};
use super::{Ctx, Emulator};
use crate::api::wire::{Base64Bytes, Base64Secret, RequestMetadata};
use crate::secret::SecretBytes;

const FORMAT_LOCAL: u8 = 1;
const FORMAT_XKS: u8 = 2;
const FORMAT_CLOUDHSM: u8 = 3;
const HEADER_LEN: usize = 33;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The proxy must accept at least this much AAD.
const MAX_PROXY_AAD: usize = 8192;
const ALGORITHMS: &[&str] = &[
    "SYMMETRIC_DEFAULT",
    "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256",
    "SM2PKE",
];

type Context = BTreeMap<String, String>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptRequest {
    pub key_id: Option<String>,
    pub plaintext: Option<Base64Secret>,
    pub encryption_context: Option<Context>,
    pub grant_tokens: Option<Vec<String>>,
    pub encryption_algorithm: Option<String>,
    pub dry_run: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptResponse {
    pub ciphertext_blob: Base64Bytes,
    pub key_id: String,
    pub encryption_algorithm: &'static str,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DecryptRequest {
    pub ciphertext_blob: Option<Base64Bytes>,
    pub encryption_context: Option<Context>,
    pub grant_tokens: Option<Vec<String>>,
    pub key_id: Option<String>,
    pub encryption_algorithm: Option<String>,
    pub dry_run: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DecryptResponse {
    pub key_id: String,
    pub plaintext: Base64Secret,
    pub encryption_algorithm: &'static str,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateDataKeyRequest {
    pub key_id: Option<String>,
    pub encryption_context: Option<Context>,
    pub number_of_bytes: Option<i64>,
    pub key_spec: Option<String>,
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateDataKeyResponse {
    pub ciphertext_blob: Base64Bytes,
    pub plaintext: Base64Secret,
    pub key_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateDataKeyWithoutPlaintextResponse {
    pub ciphertext_blob: Base64Bytes,
    pub key_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReEncryptRequest {
    pub ciphertext_blob: Option<Base64Bytes>,
    pub source_encryption_context: Option<Context>,
    pub source_key_id: Option<String>,
    pub destination_key_id: Option<String>,
    pub destination_encryption_context: Option<Context>,
    pub source_encryption_algorithm: Option<String>,
    pub destination_encryption_algorithm: Option<String>,
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReEncryptResponse {
    pub ciphertext_blob: Base64Bytes,
    pub source_key_id: String,
    pub key_id: String,
    pub source_encryption_algorithm: &'static str,
    pub destination_encryption_algorithm: &'static str,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateRandomRequest {
    pub number_of_bytes: Option<i64>,
    pub custom_key_store_id: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateRandomResponse {
    pub plaintext: Base64Secret,
}

/// A key that passed the state checks, with what the operation needs from it.
#[derive(Debug)]
struct UsableKey {
    arn: String,
    uuid: [u8; 16],
    backing_key_id: [u8; 16],
    material: SecretBytes,
    /// For keys in an external key store: store ID, external key ID, proxy target.
    xks: Option<(String, String, XksTarget)>,
    /// For keys in a CloudHSM key store: the store ID (the token key's label is `arn`).
    cloudhsm: Option<String>,
}

impl UsableKey {
    /// The custom key store holding the key, if any.
    fn store_id(&self) -> Option<&str> {
        self.xks
            .as_ref()
            .map(|x| x.0.as_str())
            .or(self.cloudhsm.as_deref())
    }

    /// The blob format this key writes and reads.
    fn format(&self) -> u8 {
        match (&self.xks, &self.cloudhsm) {
            (Some(_), _) => FORMAT_XKS,
            (None, Some(_)) => FORMAT_CLOUDHSM,
            (None, None) => FORMAT_LOCAL,
        }
    }

    fn header(&self, format: u8) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = format;
        h[1..17].copy_from_slice(&self.uuid);
        h[17..].copy_from_slice(&self.backing_key_id);
        h
    }
}

/// `canon(EC)`: pairs sorted by key (BTreeMap order), each string u16-length-prefixed.
pub fn canon(ec: &Context) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in ec {
        for s in [k, v] {
            // Lengths beyond u16 cannot happen: the request body is capped at 1 MiB
            // and the total AAD at 8192 bytes; saturate rather than wrap regardless.
            let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn aead_key(material: &SecretBytes) -> Result<crate::crypto::aead::LessSafeKey, KmsError> {
    crate::crypto::aead::UnboundKey::new(&crate::crypto::aead::AES_256_GCM, material.expose())
        .map(crate::crypto::aead::LessSafeKey::new)
        .map_err(|_| KmsError::internal(&"key material is not an AES-256 key"))
}

/// `IV ‖ AES-256-GCM(material, data, aad) ‖ tag`.
fn seal_inner(material: &SecretBytes, data: &[u8], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
    let key = aead_key(material)?;
    let iv: [u8; IV_LEN] = random()?;
    let mut buf = Vec::with_capacity(IV_LEN + data.len() + TAG_LEN);
    buf.extend_from_slice(&iv);
    buf.extend_from_slice(data);
    let tag = key
        .seal_in_place_separate_tag(
            crate::crypto::aead::Nonce::assume_unique_for_key(iv),
            crate::crypto::aead::Aad::from(aad),
            &mut buf[IV_LEN..],
        )
        .map_err(|_| KmsError::internal(&"AES-GCM seal failed"))?;
    buf.extend_from_slice(tag.as_ref());
    Ok(buf)
}

/// Opens `seal_inner`'s output; `None` if anything does not authenticate.
fn open_inner(material: &SecretBytes, inner: &[u8], aad: &[u8]) -> Option<SecretBytes> {
    if inner.len() < IV_LEN + TAG_LEN {
        return None;
    }
    let key = aead_key(material).ok()?;
    let iv: [u8; IV_LEN] = inner[..IV_LEN].try_into().ok()?;
    let mut buf = SecretBytes::from_slice(&inner[IV_LEN..]);
    let n = key
        .open_in_place(
            crate::crypto::aead::Nonce::assume_unique_for_key(iv),
            crate::crypto::aead::Aad::from(aad),
            buf.expose_mut(),
        )
        .ok()?
        .len();
    buf.expose_mut().truncate(n);
    Some(buf)
}

/// A parsed blob (`Local`: formats 1 and 3, one AES-GCM layer). `pub(crate)` only
/// for [`crate::fuzzing`].
#[derive(Debug)]
pub(crate) enum Blob<'a> {
    Local { header: &'a [u8], inner: &'a [u8] },
    Xks { header: &'a [u8], sealed: Sealed },
}

impl Blob<'_> {
    fn header(&self) -> &[u8] {
        match self {
            Blob::Local { header, .. } | Blob::Xks { header, .. } => header,
        }
    }

    pub(crate) fn key_uuid(&self) -> uuid::Uuid {
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.header()[1..17]);
        uuid::Uuid::from_bytes(b)
    }

    pub(crate) fn backing_key_id(&self) -> &[u8] {
        &self.header()[17..HEADER_LEN]
    }
}

fn invalid_ciphertext() -> KmsError {
    KmsError::new(
        Exception::InvalidCiphertext,
        "The ciphertext is not valid, was not produced by this KMS, or does not match the \
         encryption context.",
    )
}

pub(crate) fn parse_blob(blob: &[u8]) -> Result<Blob<'_>, KmsError> {
    if blob.len() < HEADER_LEN {
        return Err(invalid_ciphertext());
    }
    let (header, rest) = blob.split_at(HEADER_LEN);
    match header[0] {
        FORMAT_LOCAL | FORMAT_CLOUDHSM if rest.len() >= IV_LEN + TAG_LEN => Ok(Blob::Local {
            header,
            inner: rest,
        }),
        FORMAT_XKS => {
            let (&iv_len, rest) = rest.split_first().ok_or_else(invalid_ciphertext)?;
            let iv_len = usize::from(iv_len);
            if !matches!(iv_len, 12 | 16) || rest.len() < iv_len + TAG_LEN + 1 {
                return Err(invalid_ciphertext());
            }
            let (iv, rest) = rest.split_at(iv_len);
            let (tag, rest) = rest.split_at(TAG_LEN);
            let (&md_len, rest) = rest.split_first().ok_or_else(invalid_ciphertext)?;
            let md_len = usize::from(md_len);
            if md_len > 20 || rest.len() < md_len + IV_LEN + TAG_LEN {
                return Err(invalid_ciphertext());
            }
            let (md, ct) = rest.split_at(md_len);
            Ok(Blob::Xks {
                header,
                sealed: Sealed {
                    ciphertext: ct.to_vec(),
                    iv: iv.to_vec(),
                    tag: tag.to_vec(),
                    metadata: md.to_vec(),
                },
            })
        }
        _ => Err(invalid_ciphertext()),
    }
}

fn check_algorithm(vs: &mut Violations, member: &str, alg: Option<&str>) {
    vs.one_of(member, alg, ALGORITHMS);
}

/// A modelled algorithm other than SYMMETRIC_DEFAULT cannot be used with these keys.
fn require_symmetric(alg: Option<&str>) -> Result<(), KmsError> {
    match alg {
        None | Some("SYMMETRIC_DEFAULT") => Ok(()),
        Some(other) => Err(KmsError::new(
            Exception::InvalidKeyUsage,
            format!("{other} is not a valid encryption algorithm for a SYMMETRIC_DEFAULT key."),
        )),
    }
}

fn dry_run() -> KmsError {
    KmsError::new(
        Exception::DryRunOperation,
        "The request would have succeeded, but the DryRun option is set.",
    )
}

fn check_context(vs: &mut Violations, member: &str, ec: Option<&Context>) {
    if let Some(ec) = ec
        && HEADER_LEN + canon(ec).len() > MAX_PROXY_AAD
    {
        vs.custom(
            member,
            None,
            Shown::Yes,
            "Member must encode to at most 8159 bytes of encryption context",
        );
    }
}

impl Emulator {
    /// Resolves `key_id` and applies the key-state checks of brief §5.1 step 3.
    fn usable_key(&self, st: &State, key_id: &str) -> Result<UsableKey, KmsError> {
        let id = self.resolve_key(st, key_id)?;
        let k = st.keys.get(&id).ok_or_else(|| {
            KmsError::new(Exception::NotFound, format!("Key '{id}' does not exist"))
        })?;
        match self.key_state(st, k) {
            KeyState::Enabled => {}
            KeyState::Disabled => {
                return Err(KmsError::new(
                    Exception::Disabled,
                    format!("{} is disabled.", k.arn),
                ));
            }
            KeyState::PendingDeletion => {
                return Err(KmsError::new(
                    Exception::KmsInvalidState,
                    format!("{} is pending deletion.", k.arn),
                ));
            }
            KeyState::Unavailable
                if k.origin == Origin::AwsCloudHsm
                    && reported_state(st, k) != KeyState::Unavailable =>
            {
                // The store is CONNECTED: the key is Unavailable because its material
                // was found missing.
                return Err(cloudhsm_key_fault(&k.arn, &KeyFault::MaterialMissing));
            }
            KeyState::Unavailable if k.origin == Origin::AwsCloudHsm => {
                return Err(KmsError::new(
                    Exception::KmsInvalidState,
                    format!(
                        "{} is unavailable. This KMS key is in a custom key store that is not \
                         connected to its CloudHSM cluster. Connect the custom key store and \
                         try the request again.",
                        k.arn
                    ),
                ));
            }
            KeyState::Unavailable => {
                return Err(KmsError::new(
                    Exception::KmsInvalidState,
                    format!(
                        "{} is unavailable. This KMS key is in a custom key store that is not \
                         connected to its external key store proxy. Connect the external key \
                         store and try the request again.",
                        k.arn
                    ),
                ));
            }
        }
        let uuid = uuid::Uuid::try_parse(&k.id)
            .map_err(|e| KmsError::internal(&e))?
            .into_bytes();
        let xks = match k.origin {
            Origin::AwsKms | Origin::AwsCloudHsm => None,
            Origin::ExternalKeyStore => {
                let store_id = k.custom_key_store_id.clone().unwrap_or_default();
                let s = st
                    .stores
                    .get(&store_id)
                    .ok_or_else(|| KmsError::internal(&"key refers to a missing store"))?;
                Some((
                    store_id,
                    k.xks_key_id.clone().unwrap_or_default(),
                    target_of(s).ok_or_else(|| {
                        KmsError::internal(&"an external key in a store that is not external")
                    })?,
                ))
            }
        };
        Ok(UsableKey {
            arn: k.arn.clone(),
            uuid,
            backing_key_id: k.backing_key_id,
            material: k.material.clone(),
            xks,
            cloudhsm: match k.origin {
                Origin::AwsCloudHsm => k.custom_key_store_id.clone(),
                Origin::AwsKms | Origin::ExternalKeyStore => None,
            },
        })
    }

    /// Charges the custom key store's request quota (KMS has one per external and
    /// per CloudHSM key store); keys in no store are not charged.
    fn charge(&self, key: &UsableKey) -> Result<(), KmsError> {
        match key.store_id() {
            Some(store_id) => self.shared.quotas.charge(store_id),
            None => Ok(()),
        }
    }

    fn metadata(&self, ctx: &Ctx, op: &str, key: &UsableKey) -> RequestMetadata {
        RequestMetadata {
            kms_request_id: ctx.request_id.clone(),
            kms_operation: op.to_owned(),
            aws_principal_arn: Some(ctx.principal_arn.clone()),
            kms_key_arn: Some(key.arn.clone()),
            ..RequestMetadata::default()
        }
    }

    /// Encrypts `data` under `key` (through the proxy for XKS keys) into a blob.
    async fn seal(
        &self,
        ctx: &Ctx,
        op: &str,
        key: &UsableKey,
        data: &[u8],
        ec: &Context,
    ) -> Result<Vec<u8>, KmsError> {
        let header = key.header(key.format());
        let mut aad = header.to_vec();
        aad.extend_from_slice(&canon(ec));
        if let Some(store_id) = &key.cloudhsm {
            let iv: [u8; IV_LEN] = random()?;
            let (emu, sid, label) = (self.clone(), store_id.clone(), key.arn.clone());
            let data = SecretBytes::from_slice(data);
            let aad2 = aad.clone();
            let sealed = tokio::task::spawn_blocking(move || {
                emu.shared
                    .hsm
                    .encrypt(&sid, &label, iv, data.expose(), &aad2)
            })
            .await
            .map_err(|e| KmsError::internal(&e))?
            .map_err(|f| {
                tracing::info!(key_arn = %key.arn, fault = ?f, "CloudHSM Encrypt failed");
                cloudhsm_key_fault(&key.arn, &f)
            })?;
            let mut blob = header.to_vec();
            blob.extend_from_slice(&iv);
            blob.extend_from_slice(&sealed);
            return Ok(blob);
        }
        let inner = seal_inner(&key.material, data, &aad)?;
        let Some((_, xks_key_id, target)) = &key.xks else {
            let mut blob = header.to_vec();
            blob.extend_from_slice(&inner);
            return Ok(blob);
        };
        let sealed = self
            .xks()
            .encrypt(
                target,
                xks_key_id,
                self.metadata(ctx, op, key),
                &SecretBytes::new(inner),
                &aad,
            )
            .await
            .map_err(|f| {
                tracing::info!(key_arn = %key.arn, failure = ?f, "proxy Encrypt failed");
                f.for_crypto()
            })?;
        let mut blob = header.to_vec();
        // Sizes were checked by the client (IV 12/16, metadata <= 20), so they fit u8.
        blob.push(u8::try_from(sealed.iv.len()).map_err(|e| KmsError::internal(&e))?);
        blob.extend_from_slice(&sealed.iv);
        blob.extend_from_slice(&sealed.tag);
        blob.push(u8::try_from(sealed.metadata.len()).map_err(|e| KmsError::internal(&e))?);
        blob.extend_from_slice(&sealed.metadata);
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(blob)
    }

    /// Decrypts a parsed blob with `key` (already matched to the blob).
    async fn open(
        &self,
        ctx: &Ctx,
        op: &str,
        key: &UsableKey,
        blob: &Blob<'_>,
        ec: &Context,
    ) -> Result<SecretBytes, KmsError> {
        let mut aad = blob.header().to_vec();
        aad.extend_from_slice(&canon(ec));
        // A blob of another format than the key's was not made by it.
        if blob.header()[0] != key.format() {
            return Err(invalid_ciphertext());
        }
        if let (Some(store_id), Blob::Local { inner, .. }) = (&key.cloudhsm, blob) {
            let (iv, sealed) = inner.split_at(IV_LEN);
            let (emu, sid, label) = (self.clone(), store_id.clone(), key.arn.clone());
            let (iv, sealed) = (iv.to_vec(), sealed.to_vec());
            return tokio::task::spawn_blocking(move || {
                emu.shared.hsm.decrypt(&sid, &label, &iv, &sealed, &aad)
            })
            .await
            .map_err(|e| KmsError::internal(&e))?
            .map_err(|f| {
                tracing::info!(key_arn = %key.arn, fault = ?f, "CloudHSM Decrypt failed");
                cloudhsm_key_fault(&key.arn, &f)
            });
        }
        match (blob, &key.xks) {
            (Blob::Local { inner, .. }, None) => {
                open_inner(&key.material, inner, &aad).ok_or_else(invalid_ciphertext)
            }
            (Blob::Xks { sealed, .. }, Some((_, xks_key_id, target))) => {
                let inner = self
                    .xks()
                    .decrypt(
                        target,
                        xks_key_id,
                        self.metadata(ctx, op, key),
                        sealed,
                        &aad,
                    )
                    .await
                    .map_err(|f| {
                        tracing::info!(key_arn = %key.arn, failure = ?f, "proxy Decrypt failed");
                        f.for_crypto()
                    })?;
                open_inner(&key.material, inner.expose(), &aad).ok_or_else(|| {
                    KmsError::new(Exception::KmsInvalidState, MSG_CORRUPT_PROXY_CIPHERTEXT)
                })
            }
            // A blob of the other format than the key's origin was not made by it.
            (Blob::Local { .. }, Some(_)) | (Blob::Xks { .. }, None) => Err(invalid_ciphertext()),
        }
    }

    /// Finds and checks the key a blob names; `key_id` (optional) must agree.
    fn key_for_blob(
        &self,
        st: &State,
        blob: &Blob<'_>,
        key_id: Option<&str>,
    ) -> Result<UsableKey, KmsError> {
        let from_blob = blob.key_uuid().to_string();
        if let Some(given) = key_id {
            let given_id = self.resolve_key(st, given)?;
            if given_id != from_blob {
                return Err(KmsError::new(
                    Exception::IncorrectKey,
                    "The key ID in the request does not identify the KMS key that encrypted \
                     the ciphertext.",
                ));
            }
        }
        let k = st.keys.get(&from_blob).ok_or_else(invalid_ciphertext)?;
        if k.backing_key_id.as_slice() != blob.backing_key_id() {
            return Err(invalid_ciphertext());
        }
        self.usable_key(st, &from_blob)
    }

    pub async fn encrypt(
        &self,
        ctx: &Ctx,
        req: EncryptRequest,
    ) -> Result<EncryptResponse, KmsError> {
        let mut vs = Violations::new();
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), true);
        vs.required("plaintext", &req.plaintext);
        vs.blob_length(
            "plaintext",
            req.plaintext.as_ref().map(|p| p.0.expose()),
            1,
            4096,
        );
        check_grant_tokens(&mut vs, req.grant_tokens.as_ref());
        check_algorithm(
            &mut vs,
            "encryptionAlgorithm",
            req.encryption_algorithm.as_deref(),
        );
        check_context(
            &mut vs,
            "encryptionContext",
            req.encryption_context.as_ref(),
        );
        vs.finish()?;
        require_symmetric(req.encryption_algorithm.as_deref())?;
        self.purge_expired_keys()?;
        let key = self
            .store()
            .read(|st| self.usable_key(st, req.key_id.as_deref().unwrap_or_default()))?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        self.charge(&key)?;
        let plaintext = req.plaintext.map(|p| p.0).unwrap_or_default();
        let ec = req.encryption_context.unwrap_or_default();
        let blob = self
            .seal(ctx, "Encrypt", &key, plaintext.expose(), &ec)
            .await?;
        Ok(EncryptResponse {
            ciphertext_blob: Base64Bytes(blob),
            key_id: key.arn,
            encryption_algorithm: "SYMMETRIC_DEFAULT",
        })
    }

    pub async fn decrypt(
        &self,
        ctx: &Ctx,
        req: DecryptRequest,
    ) -> Result<DecryptResponse, KmsError> {
        let mut vs = Violations::new();
        vs.required("ciphertextBlob", &req.ciphertext_blob);
        vs.blob_length(
            "ciphertextBlob",
            req.ciphertext_blob.as_ref().map(|b| b.0.as_slice()),
            1,
            6144,
        );
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), false);
        check_grant_tokens(&mut vs, req.grant_tokens.as_ref());
        check_algorithm(
            &mut vs,
            "encryptionAlgorithm",
            req.encryption_algorithm.as_deref(),
        );
        vs.finish()?;
        require_symmetric(req.encryption_algorithm.as_deref())?;
        self.purge_expired_keys()?;
        let raw = req.ciphertext_blob.map(|b| b.0).unwrap_or_default();
        let blob = parse_blob(&raw)?;
        let key = self
            .store()
            .read(|st| self.key_for_blob(st, &blob, req.key_id.as_deref()))?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        self.charge(&key)?;
        let ec = req.encryption_context.unwrap_or_default();
        let plaintext = self.open(ctx, "Decrypt", &key, &blob, &ec).await?;
        Ok(DecryptResponse {
            key_id: key.arn,
            plaintext: Base64Secret(plaintext),
            encryption_algorithm: "SYMMETRIC_DEFAULT",
        })
    }

    /// The shared part of GenerateDataKey and GenerateDataKeyWithoutPlaintext.
    async fn data_key(
        &self,
        ctx: &Ctx,
        op: &str,
        req: GenerateDataKeyRequest,
    ) -> Result<(Vec<u8>, SecretBytes, String), KmsError> {
        let mut vs = Violations::new();
        check_key_id(&mut vs, "keyId", req.key_id.as_deref(), true);
        vs.range("numberOfBytes", req.number_of_bytes, 1, 1024);
        vs.one_of("keySpec", req.key_spec.as_deref(), &["AES_256", "AES_128"]);
        check_grant_tokens(&mut vs, req.grant_tokens.as_ref());
        check_context(
            &mut vs,
            "encryptionContext",
            req.encryption_context.as_ref(),
        );
        vs.finish()?;
        let n = match (req.number_of_bytes, req.key_spec.as_deref()) {
            (Some(n), None) => usize::try_from(n).map_err(|e| KmsError::internal(&e))?,
            (None, Some("AES_128")) => 16,
            (None, Some(_)) => 32,
            (None, None) => {
                return Err(KmsError::validation(
                    "Please specify either number of bytes or key spec.",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(KmsError::validation(
                    "Please specify either number of bytes or key spec, not both.",
                ));
            }
        };
        self.purge_expired_keys()?;
        let key = self
            .store()
            .read(|st| self.usable_key(st, req.key_id.as_deref().unwrap_or_default()))?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        self.charge(&key)?;
        let mut data = SecretBytes::new(vec![0u8; n]);
        crate::crypto::rand::SecureRandom::fill(
            &crate::crypto::rand::SystemRandom::new(),
            data.expose_mut(),
        )
        .map_err(|_| KmsError::internal(&"the system random number generator failed"))?;
        let ec = req.encryption_context.unwrap_or_default();
        let blob = self.seal(ctx, op, &key, data.expose(), &ec).await?;
        Ok((blob, data, key.arn))
    }

    pub async fn generate_data_key(
        &self,
        ctx: &Ctx,
        req: GenerateDataKeyRequest,
    ) -> Result<GenerateDataKeyResponse, KmsError> {
        let (blob, plaintext, arn) = self.data_key(ctx, "GenerateDataKey", req).await?;
        Ok(GenerateDataKeyResponse {
            ciphertext_blob: Base64Bytes(blob),
            plaintext: Base64Secret(plaintext),
            key_id: arn,
        })
    }

    pub async fn generate_data_key_without_plaintext(
        &self,
        ctx: &Ctx,
        req: GenerateDataKeyRequest,
    ) -> Result<GenerateDataKeyWithoutPlaintextResponse, KmsError> {
        let (blob, _plaintext, arn) = self
            .data_key(ctx, "GenerateDataKeyWithoutPlaintext", req)
            .await?;
        Ok(GenerateDataKeyWithoutPlaintextResponse {
            ciphertext_blob: Base64Bytes(blob),
            key_id: arn,
        })
    }

    pub async fn re_encrypt(
        &self,
        ctx: &Ctx,
        req: ReEncryptRequest,
    ) -> Result<ReEncryptResponse, KmsError> {
        let mut vs = Violations::new();
        vs.required("ciphertextBlob", &req.ciphertext_blob);
        vs.blob_length(
            "ciphertextBlob",
            req.ciphertext_blob.as_ref().map(|b| b.0.as_slice()),
            1,
            6144,
        );
        check_key_id(&mut vs, "sourceKeyId", req.source_key_id.as_deref(), false);
        check_key_id(
            &mut vs,
            "destinationKeyId",
            req.destination_key_id.as_deref(),
            true,
        );
        check_algorithm(
            &mut vs,
            "sourceEncryptionAlgorithm",
            req.source_encryption_algorithm.as_deref(),
        );
        check_algorithm(
            &mut vs,
            "destinationEncryptionAlgorithm",
            req.destination_encryption_algorithm.as_deref(),
        );
        check_grant_tokens(&mut vs, req.grant_tokens.as_ref());
        check_context(
            &mut vs,
            "destinationEncryptionContext",
            req.destination_encryption_context.as_ref(),
        );
        vs.finish()?;
        require_symmetric(req.source_encryption_algorithm.as_deref())?;
        require_symmetric(req.destination_encryption_algorithm.as_deref())?;
        self.purge_expired_keys()?;
        let raw = req.ciphertext_blob.map(|b| b.0).unwrap_or_default();
        let blob = parse_blob(&raw)?;
        let (source, dest) = self.store().read(|st| {
            let source = self.key_for_blob(st, &blob, req.source_key_id.as_deref())?;
            let dest =
                self.usable_key(st, req.destination_key_id.as_deref().unwrap_or_default())?;
            Ok::<_, KmsError>((source, dest))
        })?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        // Brief §8: a ReEncrypt between two stores is charged to both.
        self.charge(&source)?;
        if dest.store_id() != source.store_id() {
            self.charge(&dest)?;
        }
        let source_ec = req.source_encryption_context.unwrap_or_default();
        let plaintext = self
            .open(ctx, "ReEncrypt", &source, &blob, &source_ec)
            .await?;
        let dest_ec = req.destination_encryption_context.unwrap_or_default();
        let new_blob = self
            .seal(ctx, "ReEncrypt", &dest, plaintext.expose(), &dest_ec)
            .await?;
        Ok(ReEncryptResponse {
            ciphertext_blob: Base64Bytes(new_blob),
            source_key_id: source.arn,
            key_id: dest.arn,
            source_encryption_algorithm: "SYMMETRIC_DEFAULT",
            destination_encryption_algorithm: "SYMMETRIC_DEFAULT",
        })
    }

    pub fn generate_random(
        &self,
        req: GenerateRandomRequest,
    ) -> Result<GenerateRandomResponse, KmsError> {
        let mut vs = Violations::new();
        vs.required("numberOfBytes", &req.number_of_bytes);
        vs.range("numberOfBytes", req.number_of_bytes, 1, 1024);
        vs.length(
            "customKeyStoreId",
            req.custom_key_store_id.as_deref(),
            1,
            64,
            Shown::Yes,
        );
        vs.finish()?;
        let n = req.number_of_bytes.unwrap_or(32);
        if let Some(id) = &req.custom_key_store_id {
            return self.generate_random_in_store(id, n);
        }
        let n = usize::try_from(n).map_err(|e| KmsError::internal(&e))?;
        let mut data = SecretBytes::new(vec![0u8; n]);
        crate::crypto::rand::SecureRandom::fill(
            &crate::crypto::rand::SystemRandom::new(),
            data.expose_mut(),
        )
        .map_err(|_| KmsError::internal(&"the system random number generator failed"))?;
        Ok(GenerateRandomResponse {
            plaintext: Base64Secret(data),
        })
    }
}

impl Emulator {
    /// GenerateRandom with a `CustomKeyStoreId`: an external key store cannot (KMS's
    /// rule); a CloudHSM key store must be CONNECTED, and the bytes come from its
    /// cluster (C_GenerateRandom on the kmsuser session).
    fn generate_random_in_store(
        &self,
        id: &str,
        n: i64,
    ) -> Result<GenerateRandomResponse, KmsError> {
        let state = self.store().read(|st| {
            st.stores
                .get(id)
                .map(|s| (s.cloudhsm().is_some(), s.connection_state))
        });
        match state {
            None => Err(KmsError::new(
                Exception::CustomKeyStoreNotFound,
                format!("Custom key store {id} does not exist."),
            )),
            Some((false, _)) => Err(KmsError::new(
                Exception::UnsupportedOperation,
                format!(
                    "GenerateRandom is not supported with custom key store {id}: it is an \
                     external key store."
                ),
            )),
            Some((true, state)) if state != ConnectionState::Connected => Err(KmsError::new(
                Exception::CustomKeyStoreInvalidState,
                format!(
                    "Custom key store {id} is not connected to its CloudHSM cluster. Connect \
                     the custom key store and try the request again."
                ),
            )),
            Some((true, _)) => {
                let n = u32::try_from(n).map_err(|e| KmsError::internal(&e))?;
                match self.shared.hsm.generate_random(id, n) {
                    Some(Ok(bytes)) => Ok(GenerateRandomResponse {
                        plaintext: Base64Secret(SecretBytes::new(bytes)),
                    }),
                    // CONNECTED without a session: the emulator restarted (sessions are
                    // not re-opened at start yet) or the cluster failed under it.
                    None => Err(KmsError::new(
                        Exception::CustomKeyStoreInvalidState,
                        format!(
                            "Custom key store {id} has no session with its CloudHSM cluster; \
                             disconnect and connect it again."
                        ),
                    )),
                    Some(Err(code)) => Err(KmsError::new(
                        Exception::KmsInternal,
                        format!("KMS cannot communicate with your CloudHSM cluster ({code})."),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canon_is_unambiguous_and_order_independent() {
        let a: Context = [("a".into(), "bc".into())].into();
        let b: Context = [("ab".into(), "c".into())].into();
        assert_ne!(canon(&a), canon(&b));
        let x: Context = [("k1".into(), "v".into()), ("k2".into(), "w".into())].into();
        let mut y = Context::new();
        y.insert("k2".into(), "w".into());
        y.insert("k1".into(), "v".into());
        assert_eq!(canon(&x), canon(&y));
        assert!(canon(&Context::new()).is_empty());
    }

    #[test]
    fn inner_layer_round_trips_and_binds_the_aad() {
        let material = SecretBytes::new(vec![7u8; 32]);
        let inner = seal_inner(&material, b"hello", b"aad").expect("seal");
        assert_eq!(inner.len(), 5 + IV_LEN + TAG_LEN);
        let out = open_inner(&material, &inner, b"aad").expect("open");
        assert_eq!(out.expose(), b"hello");
        assert!(open_inner(&material, &inner, b"other").is_none());
        assert!(open_inner(&SecretBytes::new(vec![8u8; 32]), &inner, b"aad").is_none());
    }

    #[test]
    fn cloudhsm_blob_is_one_layer_and_keeps_its_format_byte() {
        let mut blob = vec![FORMAT_CLOUDHSM];
        blob.extend_from_slice(&[1u8; 32]);
        blob.extend_from_slice(&[5u8; IV_LEN + TAG_LEN + 3]);
        let parsed = parse_blob(&blob).expect("parse");
        let Blob::Local { header, inner } = &parsed else {
            panic!("wrong shape");
        };
        assert_eq!(header[0], FORMAT_CLOUDHSM);
        assert_eq!(inner.len(), IV_LEN + TAG_LEN + 3);
        // Shorter than IV + tag: refused like a format-1 blob.
        assert!(parse_blob(&blob[..HEADER_LEN + IV_LEN + TAG_LEN - 1]).is_err());
    }

    #[test]
    fn xks_blob_parses_back() {
        let mut blob = vec![FORMAT_XKS];
        blob.extend_from_slice(&[1u8; 32]);
        blob.push(12);
        blob.extend_from_slice(&[2u8; 12]);
        blob.extend_from_slice(&[3u8; 16]);
        blob.push(2);
        blob.extend_from_slice(b"md");
        blob.extend_from_slice(&[4u8; 40]);
        let Blob::Xks { sealed, .. } = parse_blob(&blob).expect("parse") else {
            panic!("wrong format");
        };
        assert_eq!(sealed.iv, vec![2u8; 12]);
        assert_eq!(sealed.tag, vec![3u8; 16]);
        assert_eq!(sealed.metadata, b"md".to_vec());
        assert_eq!(sealed.ciphertext.len(), 40);
        // Truncations and unknown versions are InvalidCiphertext, never a panic.
        for n in 0..blob.len() {
            let _ = parse_blob(&blob[..n]);
        }
        blob[0] = 9;
        assert_eq!(
            parse_blob(&blob).expect_err("version").exception,
            Exception::InvalidCiphertext
        );
    }
}
