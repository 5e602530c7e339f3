//! What each request is: the four XKS calls with KMS-realistic bodies, signed like KMS
//! (fresh X-Amz-Date every time, `aws-sigv4` through `xks_proxy::sigv4::sign_request`),
//! and the checks applied to each response. Also the pool of ciphertexts that Decrypt
//! replays (made by this run's own Encrypts, so the plaintext can be checked).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ring::digest;
use xks_proxy::api::wire::{
    Base64Bytes, Base64Secret, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse,
    ErrorResponse, HealthRequest, HealthResponse, MetadataRequest, MetadataResponse,
    RequestMetadata,
};
use xks_proxy::secret::SecretBytes;

use crate::cli::{LoadArgs, OpArg, Verify};
use crate::conn::Connector;
use crate::target::Target;

/// KMS's caller, as it appears in requestMetadata.
const PRINCIPAL: &str = "arn:aws:iam::111122223333:role/xks-bench";
const KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

/// One XKS call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Op {
    Encrypt,
    Decrypt,
    Metadata,
    Health,
}

/// A label for a failed request: the spec's errorName, or what went wrong on the wire
/// or in the check.
pub type ErrorLabel = Cow<'static, str>;

/// A tiny PRNG (splitmix64) for plaintexts and request ids: the generator must not
/// spend a getrandom syscall per request on data nobody needs to be secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A ciphertext this run made, with what it must decrypt to.
#[derive(Debug, Clone)]
pub struct Sample {
    pub plaintext: Vec<u8>,
    pub aad: Vec<u8>,
    pub sealed: EncryptResponse,
}

/// The request mix and the shared, read-only inputs of every request.
#[derive(Debug)]
pub struct Workload {
    /// Cumulative weights over [Encrypt, Decrypt, Metadata, Health].
    cumulative: [u32; 4],
    pub plaintext_bytes: usize,
    pub aad: Vec<u8>,
    pub cdiv: bool,
    pub verify: Verify,
    /// Decrypt inputs; empty unless the mix has Decrypt.
    pub samples: Vec<Sample>,
}

impl Workload {
    pub fn new(load: &LoadArgs) -> Result<Self> {
        let weights = match load.op {
            OpArg::Encrypt => [1, 0, 0, 0],
            OpArg::Decrypt => [0, 1, 0, 0],
            OpArg::Metadata => [0, 0, 1, 0],
            OpArg::Health => [0, 0, 0, 1],
            OpArg::Mix => parse_mix(&load.mix)?,
        };
        let mut cumulative = [0u32; 4];
        let mut sum = 0u32;
        for (c, w) in cumulative.iter_mut().zip(weights) {
            sum = sum.saturating_add(w);
            *c = sum;
        }
        if sum == 0 {
            bail!("--mix has no positive weight");
        }
        if load.plaintext_bytes == 0 || load.plaintext_bytes > 8192 {
            bail!("--plaintext-bytes must be 1..=8192");
        }
        // An encryption context as KMS serialises it into the AAD: readable text of
        // the asked-for length.
        let context = b"aws:kms:xks:bench=1,app=payments,tenant=111122223333,purpose=data-key,region=us-east-1,";
        let aad = context
            .iter()
            .copied()
            .cycle()
            .take(load.aad_bytes)
            .collect();
        Ok(Self {
            cumulative,
            plaintext_bytes: load.plaintext_bytes,
            aad,
            cdiv: !load.no_cdiv,
            verify: load.verify,
            samples: Vec::new(),
        })
    }

    pub fn uses(&self, op: Op) -> bool {
        let i = op as usize;
        let prev = if i == 0 { 0 } else { self.cumulative[i - 1] };
        self.cumulative[i] > prev
    }

    /// Picks the next operation by weight.
    pub fn pick(&self, rng: &mut Rng) -> Op {
        let total = self.cumulative[3];
        let r = (rng.next_u64() % u64::from(total)) as u32;
        match self.cumulative.iter().position(|&c| r < c) {
            Some(0) => Op::Encrypt,
            Some(1) => Op::Decrypt,
            Some(2) => Op::Metadata,
            _ => Op::Health,
        }
    }

    /// Builds, signs and returns one request, plus what its response must satisfy.
    pub fn request(
        &self,
        connector: &Connector,
        op: Op,
        rng: &mut Rng,
    ) -> Result<(http::Request<Bytes>, Expect), ErrorLabel> {
        let target = &connector.target;
        let (body, expect) = self
            .body(op, rng)
            .map_err(|_| Cow::Borrowed("EncodeFailed"))?;
        let mut req = connector.request(&target.path(op), body);
        xks_proxy::sigv4::sign_request(
            &mut req,
            &target.access_key_id,
            &target.secret,
            &target.region,
            &target.service,
            SystemTime::now(),
        )
        .map_err(|_| Cow::Borrowed("SignFailed"))?;
        Ok((req, expect))
    }

    /// A well-formed Encrypt body, as `request` would send it (the flood's attackers send
    /// it unsigned).
    pub fn encrypt_body(&self, rng: &mut Rng) -> serde_json::Result<Bytes> {
        Ok(self.body(Op::Encrypt, rng)?.0)
    }

    fn body(&self, op: Op, rng: &mut Rng) -> serde_json::Result<(Bytes, Expect)> {
        let mut id = [0u8; 16];
        rng.fill(&mut id);
        let request_id = uuid::Builder::from_random_bytes(id).into_uuid().to_string();
        let metadata = |operation: &str, full: bool| RequestMetadata {
            kms_request_id: request_id.clone(),
            kms_operation: operation.to_owned(),
            aws_principal_arn: full.then(|| PRINCIPAL.to_owned()),
            kms_key_arn: full.then(|| KEY_ARN.to_owned()),
            ..RequestMetadata::default()
        };
        Ok(match op {
            Op::Health => (
                serde_json::to_vec(&HealthRequest {
                    request_metadata: metadata("KmsHealthCheck", false),
                })?
                .into(),
                Expect::Health,
            ),
            Op::Metadata => (
                serde_json::to_vec(&MetadataRequest {
                    request_metadata: metadata("CreateKey", true),
                })?
                .into(),
                Expect::Metadata,
            ),
            Op::Encrypt => {
                let mut plaintext = vec![0u8; self.plaintext_bytes];
                rng.fill(&mut plaintext);
                let body = serde_json::to_vec(&EncryptRequest {
                    request_metadata: metadata("GenerateDataKey", true),
                    plaintext: Base64Secret(SecretBytes::from_slice(&plaintext)),
                    encryption_algorithm: "AES_GCM".into(),
                    additional_authenticated_data: (!self.aad.is_empty())
                        .then(|| Base64Bytes(self.aad.clone())),
                    ciphertext_data_integrity_value_algorithm: self
                        .cdiv
                        .then(|| "SHA_256".to_owned()),
                })?;
                (
                    body.into(),
                    Expect::Encrypt {
                        plaintext_len: plaintext.len(),
                    },
                )
            }
            Op::Decrypt => {
                let n = self.samples.len().max(1);
                let i = (rng.next_u64() % n as u64) as usize;
                match self.samples.get(i) {
                    Some(s) => {
                        let body = serde_json::to_vec(&DecryptRequest {
                            request_metadata: metadata("Decrypt", true),
                            ciphertext: s.sealed.ciphertext.clone(),
                            encryption_algorithm: "AES_GCM".into(),
                            initialization_vector: s.sealed.initialization_vector.clone(),
                            authentication_tag: s.sealed.authentication_tag.clone(),
                            additional_authenticated_data: (!s.aad.is_empty())
                                .then(|| Base64Bytes(s.aad.clone())),
                            ciphertext_metadata: s.sealed.ciphertext_metadata.clone(),
                        })?;
                        (body.into(), Expect::Decrypt { sample: i })
                    }
                    // No samples (e.g. verification off against a null server): a
                    // well-formed Decrypt of a made-up ciphertext.
                    None => (
                        serde_json::to_vec(&DecryptRequest {
                            request_metadata: metadata("Decrypt", true),
                            ciphertext: Base64Bytes(vec![7; self.plaintext_bytes]),
                            encryption_algorithm: "AES_GCM".into(),
                            initialization_vector: Base64Bytes(vec![1; 12]),
                            authentication_tag: Base64Bytes(vec![2; 16]),
                            additional_authenticated_data: None,
                            ciphertext_metadata: None,
                        })?
                        .into(),
                        Expect::Status,
                    ),
                }
            }
        })
    }

    /// Checks one response. `Err` carries the label the report counts it under.
    pub fn check(
        &self,
        expect: &Expect,
        status: http::StatusCode,
        body: &[u8],
    ) -> Result<(), ErrorLabel> {
        if status != http::StatusCode::OK {
            return Err(error_label(status, body));
        }
        if self.verify == Verify::Status {
            return Ok(());
        }
        let bad = |what: &'static str| Cow::Borrowed(what);
        match expect {
            Expect::Status => Ok(()),
            Expect::Health => {
                let h: HealthResponse =
                    serde_json::from_slice(body).map_err(|_| bad("BadHealthResponse"))?;
                if h.ekm_fleet_details.is_empty() || h.xks_proxy_fleet_size == 0 {
                    return Err(bad("BadHealthResponse"));
                }
                Ok(())
            }
            Expect::Metadata => {
                let m: MetadataResponse =
                    serde_json::from_slice(body).map_err(|_| bad("BadMetadataResponse"))?;
                if m.key_spec != "AES_256" {
                    return Err(bad("BadMetadataResponse"));
                }
                Ok(())
            }
            Expect::Encrypt { plaintext_len } => {
                let e: EncryptResponse =
                    serde_json::from_slice(body).map_err(|_| bad("BadEncryptResponse"))?;
                check_sealed(&e, *plaintext_len, &self.aad, self.cdiv)
            }
            Expect::Decrypt { sample } => {
                let d: DecryptResponse =
                    serde_json::from_slice(body).map_err(|_| bad("BadDecryptResponse"))?;
                match self.samples.get(*sample) {
                    Some(s) if d.plaintext.0.expose() == s.plaintext.as_slice() => Ok(()),
                    _ => Err(bad("PlaintextMismatch")),
                }
            }
        }
    }
}

/// What a response must be for its request to count as a success.
#[derive(Debug, Clone)]
pub enum Expect {
    Status,
    Health,
    Metadata,
    Encrypt {
        plaintext_len: usize,
    },
    /// Index into [`Workload::samples`].
    Decrypt {
        sample: usize,
    },
}

/// The spec's errorName from an error body, else the HTTP status.
fn error_label(status: http::StatusCode, body: &[u8]) -> ErrorLabel {
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) if !e.error_name.is_empty() => Cow::Owned(e.error_name),
        _ => Cow::Owned(format!("HTTP {}", status.as_u16())),
    }
}

/// Shape of an Encrypt response, and its CDIV recomputed from what came back.
fn check_sealed(
    e: &EncryptResponse,
    plaintext_len: usize,
    aad: &[u8],
    cdiv: bool,
) -> Result<(), ErrorLabel> {
    if e.ciphertext.0.len() != plaintext_len {
        return Err(Cow::Borrowed("CiphertextLengthWrong"));
    }
    if e.authentication_tag.0.len() != 16 {
        return Err(Cow::Borrowed("TagLengthWrong"));
    }
    if !matches!(e.initialization_vector.0.len(), 12 | 16) {
        return Err(Cow::Borrowed("IvLengthWrong"));
    }
    if e.ciphertext_metadata
        .as_ref()
        .is_some_and(|m| m.0.len() > 20)
    {
        return Err(Cow::Borrowed("CiphertextMetadataTooLong"));
    }
    match (&e.ciphertext_data_integrity_value, cdiv) {
        (None, false) => Ok(()),
        (Some(_), false) => Err(Cow::Borrowed("UnexpectedCdiv")),
        (None, true) => Err(Cow::Borrowed("CdivMissing")),
        (Some(got), true) => {
            let md = e.ciphertext_metadata.as_ref().map_or(&[][..], |m| &m.0);
            let mut ctx = digest::Context::new(&digest::SHA256);
            for part in [
                aad,
                md,
                &e.initialization_vector.0,
                &e.ciphertext.0,
                &e.authentication_tag.0,
            ] {
                ctx.update(part);
            }
            if ctx.finish().as_ref() == got.0.as_slice() {
                Ok(())
            } else {
                Err(Cow::Borrowed("CdivMismatch"))
            }
        }
    }
}

fn parse_mix(text: &str) -> Result<[u32; 4]> {
    let mut w = [0u32; 4];
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, value) = part
            .split_once('=')
            .with_context(|| format!("--mix entry '{part}' is not name=weight"))?;
        let value: u32 = value
            .trim()
            .parse()
            .with_context(|| format!("--mix weight '{value}' is not a whole number"))?;
        let i = match name.trim() {
            "encrypt" => 0,
            "decrypt" => 1,
            "metadata" => 2,
            "health" => 3,
            other => {
                bail!("--mix: unknown operation '{other}' (encrypt, decrypt, metadata, health)")
            }
        };
        w[i] = value;
    }
    Ok(w)
}

/// Makes the Decrypt pool: `count` Encrypts over one connection before the clock
/// starts. Any failure here stops the run (a Decrypt benchmark needs real ciphertexts).
pub async fn make_samples(
    workload: &Workload,
    connector: &Connector,
    count: usize,
    timeout: std::time::Duration,
) -> Result<Vec<Sample>> {
    let mut conn = connector
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to make Decrypt samples: {}", e.0))?;
    let mut rng = Rng::new(0x5eed);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut plaintext = vec![0u8; workload.plaintext_bytes];
        rng.fill(&mut plaintext);
        let body = serde_json::to_vec(&EncryptRequest {
            request_metadata: RequestMetadata {
                kms_request_id: format!("xks-bench-sample-{}", out.len()),
                kms_operation: "Encrypt".into(),
                aws_principal_arn: Some(PRINCIPAL.into()),
                kms_key_arn: Some(KEY_ARN.into()),
                ..RequestMetadata::default()
            },
            plaintext: Base64Secret(SecretBytes::from_slice(&plaintext)),
            encryption_algorithm: "AES_GCM".into(),
            additional_authenticated_data: (!workload.aad.is_empty())
                .then(|| Base64Bytes(workload.aad.clone())),
            ciphertext_data_integrity_value_algorithm: Some("SHA_256".into()),
        })?;
        let target: &Arc<Target> = &connector.target;
        let mut req = connector.request(&target.path(Op::Encrypt), body.into());
        xks_proxy::sigv4::sign_request(
            &mut req,
            &target.access_key_id,
            &target.secret,
            &target.region,
            &target.service,
            SystemTime::now(),
        )?;
        let (status, body) = conn
            .send(req, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("Encrypt for a Decrypt sample: {}", e.0))?;
        if status != http::StatusCode::OK {
            bail!(
                "Encrypt for a Decrypt sample failed: {}",
                error_label(status, &body)
            );
        }
        let sealed: EncryptResponse =
            serde_json::from_slice(&body).context("Encrypt response is not the spec's JSON")?;
        check_sealed(&sealed, plaintext.len(), &workload.aad, true)
            .map_err(|e| anyhow::anyhow!("Encrypt response for a Decrypt sample: {e}"))?;
        out.push(Sample {
            plaintext,
            aad: workload.aad.clone(),
            sealed,
        });
    }
    Ok(out)
}
