//! Criterion micro benchmarks of the per-request work of an Encrypt, piece by piece, and
//! one in-process end-to-end Encrypt over TLS (`cargo bench --bench micro`):
//!
//! - `sigv4`: our verifier with a warm signing-key cache (every request after the first
//!   of a day) and with a cold one (key derived), and `sign_request` (what KMS and the
//!   load generator pay).
//! - `aad`: the spec's AAD encoding and the CDIV (`xks_proxy::api::aad`).
//! - `software_keystore`: encrypt/decrypt through the `CryptoBackend` trait.
//! - `json`: decode of each request and encode of each response (`api::wire`).
//! - `e2e`: one signed Encrypt over a keep-alive TLS connection to a proxy in this
//!   process (software keystore, no log subscriber), through the load generator's
//!   client code (benches/loadgen), response fully checked.
//!
//! Benchmarks report; they never assert timings.

#![allow(missing_debug_implementations)]

#[allow(dead_code)]
#[path = "loadgen/ceiling.rs"]
mod ceiling;
#[allow(dead_code)]
#[path = "loadgen/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "loadgen/conn.rs"]
mod conn;
#[allow(dead_code)]
#[path = "loadgen/servers.rs"]
mod servers;
#[allow(dead_code)]
#[path = "loadgen/target.rs"]
mod target;
#[allow(dead_code)]
#[path = "loadgen/workload.rs"]
mod workload;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use clap::Parser;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use xks_proxy::api::aad::{self, Metadata};
use xks_proxy::api::wire::*;
use xks_proxy::backend::software::{Keystore, MasterKey, SoftwareBackend};
use xks_proxy::backend::{CryptoBackend, KeyUsage, Opening};
use xks_proxy::config::TlsConfig;
use xks_proxy::secret::{SecretBytes, SecretString};
use xks_proxy::sigv4::{Credential, CredentialSet, VerifyPolicy};

const AKID: &str = "AKIAXKSPROXYBENCH234";
const SECRET: &str = "p4Xk7Qz9Lm2Vb8Nc1Rt6Yw3Ue5Io0PaSdFgHjKlZxC";
const PLAINTEXT: [u8; 32] = [0x42; 32];
/// ~100 bytes, like the encryption context KMS passes as AAD.
const AAD: &[u8] = b"aws:kms:xks:bench=1,app=payments,tenant=111122223333,purpose=data-key,region=us-east-1,abcdefghijkl";
const PRINCIPAL: &str = "arn:aws:iam::111122223333:role/app";
const KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

fn metadata(op: &str) -> RequestMetadata {
    RequestMetadata {
        kms_request_id: "5fc9b7b2-3f7a-4f5e-9c67-1f1d1c6a2b11".into(),
        kms_operation: op.into(),
        aws_principal_arn: Some(PRINCIPAL.into()),
        kms_key_arn: Some(KEY_ARN.into()),
        ..RequestMetadata::default()
    }
}

fn encrypt_request() -> EncryptRequest {
    EncryptRequest {
        request_metadata: metadata("GenerateDataKey"),
        plaintext: Base64Secret(SecretBytes::from_slice(&PLAINTEXT)),
        encryption_algorithm: "AES_GCM".into(),
        additional_authenticated_data: Some(Base64Bytes(AAD.to_vec())),
        ciphertext_data_integrity_value_algorithm: Some("SHA_256".into()),
    }
}

/// A request as the server sees it after HTTP/1.1 parsing: path-only URI, Host header.
fn signed_encrypt() -> (http::request::Parts, Bytes) {
    let body = Bytes::from(serde_json::to_vec(&encrypt_request()).expect("json"));
    let mut req = http::Request::post("/bench/kms/xks/v1/keys/bench-key-1/encrypt")
        .header("host", "xks.example.com")
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    xks_proxy::sigv4::sign_request(
        &mut req,
        AKID,
        &SecretString::from(SECRET),
        "us-east-1",
        "kms-xks-proxy",
        SystemTime::now(),
    )
    .expect("sign");
    req.into_parts()
}

fn credentials() -> CredentialSet {
    CredentialSet::new(vec![Credential::new(AKID, SecretString::from(SECRET))]).expect("set")
}

fn sigv4(c: &mut Criterion) {
    let mut g = c.benchmark_group("sigv4");
    let (parts, body) = signed_encrypt();
    let policy = VerifyPolicy::default();
    let warm = credentials();
    xks_proxy::sigv4::verify(&parts, &body, &warm, &policy, SystemTime::now()).expect("verifies");
    g.bench_function("verify_encrypt_cached_key", |b| {
        b.iter(|| {
            xks_proxy::sigv4::verify(black_box(&parts), &body, &warm, &policy, SystemTime::now())
                .expect("verifies")
        })
    });
    g.bench_function("verify_encrypt_derive_key", |b| {
        b.iter_batched(
            credentials,
            |cold| {
                xks_proxy::sigv4::verify(
                    black_box(&parts),
                    &body,
                    &cold,
                    &policy,
                    SystemTime::now(),
                )
                .expect("verifies")
            },
            BatchSize::SmallInput,
        )
    });
    let secret = SecretString::from(SECRET);
    g.bench_function("sign_request_encrypt", |b| {
        b.iter_batched(
            || {
                http::Request::post(
                    "https://xks.example.com/bench/kms/xks/v1/keys/bench-key-1/encrypt",
                )
                .body(body.clone())
                .expect("request")
            },
            |mut req| {
                xks_proxy::sigv4::sign_request(
                    &mut req,
                    AKID,
                    &secret,
                    "us-east-1",
                    "kms-xks-proxy",
                    SystemTime::now(),
                )
                .expect("sign");
                req
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn aad_and_cdiv(c: &mut Criterion) {
    let mut g = c.benchmark_group("aad");
    let md = Metadata::v1(1).encode();
    g.bench_function("encode_100B_aad", |b| {
        b.iter(|| aad::encode(black_box(AAD), &md))
    });
    let iv = [7u8; 12];
    let tag = [9u8; 16];
    g.bench_function("cdiv_32B", |b| {
        b.iter(|| aad::cdiv(black_box(AAD), &md, &iv, &PLAINTEXT, &tag))
    });
    g.finish();
}

fn software_keystore(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keystore.json");
    let master = MasterKey::generate();
    let mut ks = Keystore::create(&path, &master).expect("keystore");
    ks.create_key("k", &[KeyUsage::Encrypt, KeyUsage::Decrypt])
        .expect("key");
    ks.save().expect("save");
    let backend: Arc<dyn CryptoBackend> =
        Arc::new(SoftwareBackend::open(&path, master).expect("open"));
    let aad_for = |v| aad::encode(AAD, &Metadata::v1(v).encode());

    let mut g = c.benchmark_group("software_keystore");
    g.bench_function("encrypt_32B", |b| {
        b.iter(|| {
            backend
                .encrypt("k", black_box(&PLAINTEXT), &aad_for)
                .expect("encrypt")
        })
    });
    let sealed = backend.encrypt("k", &PLAINTEXT, &aad_for).expect("encrypt");
    let full_aad = aad_for(sealed.key_version);
    g.bench_function("decrypt_32B", |b| {
        b.iter(|| {
            backend
                .decrypt(
                    "k",
                    Opening {
                        key_version: sealed.key_version,
                        iv: &sealed.iv,
                        ciphertext: black_box(&sealed.ciphertext),
                        tag: &sealed.tag,
                        aad: &full_aad,
                    },
                )
                .expect("decrypt")
        })
    });
    g.finish();
}

fn json(c: &mut Criterion) {
    let mut g = c.benchmark_group("json");
    let health = serde_json::to_vec(&HealthRequest {
        request_metadata: RequestMetadata {
            kms_request_id: "5fc9b7b2-3f7a-4f5e-9c67-1f1d1c6a2b11".into(),
            kms_operation: "KmsHealthCheck".into(),
            ..RequestMetadata::default()
        },
    })
    .expect("json");
    let metadata_req = serde_json::to_vec(&MetadataRequest {
        request_metadata: metadata("CreateKey"),
    })
    .expect("json");
    let encrypt = serde_json::to_vec(&encrypt_request()).expect("json");
    let decrypt = serde_json::to_vec(&DecryptRequest {
        request_metadata: metadata("Decrypt"),
        ciphertext: Base64Bytes(PLAINTEXT.to_vec()),
        encryption_algorithm: "AES_GCM".into(),
        initialization_vector: Base64Bytes(vec![7; 12]),
        authentication_tag: Base64Bytes(vec![9; 16]),
        additional_authenticated_data: Some(Base64Bytes(AAD.to_vec())),
        ciphertext_metadata: Some(Base64Bytes(vec![1, 0, 0, 0, 1])),
    })
    .expect("json");
    g.bench_function("decode_health_request", |b| {
        b.iter(|| serde_json::from_slice::<HealthRequest>(black_box(&health)).expect("decode"))
    });
    g.bench_function("decode_metadata_request", |b| {
        b.iter(|| {
            serde_json::from_slice::<MetadataRequest>(black_box(&metadata_req)).expect("decode")
        })
    });
    g.bench_function("decode_encrypt_request", |b| {
        b.iter(|| serde_json::from_slice::<EncryptRequest>(black_box(&encrypt)).expect("decode"))
    });
    g.bench_function("decode_decrypt_request", |b| {
        b.iter(|| serde_json::from_slice::<DecryptRequest>(black_box(&decrypt)).expect("decode"))
    });
    let enc_resp = EncryptResponse {
        authentication_tag: Base64Bytes(vec![9; 16]),
        ciphertext: Base64Bytes(PLAINTEXT.to_vec()),
        ciphertext_data_integrity_value: Some(Base64Bytes(vec![3; 32])),
        ciphertext_metadata: Some(Base64Bytes(vec![1, 0, 0, 0, 1])),
        initialization_vector: Base64Bytes(vec![7; 12]),
    };
    let dec_resp = DecryptResponse {
        plaintext: Base64Secret(SecretBytes::from_slice(&PLAINTEXT)),
    };
    let md_resp = MetadataResponse {
        key_spec: "AES_256".into(),
        key_usage: vec!["ENCRYPT".into(), "DECRYPT".into()],
        key_status: "ENABLED".into(),
    };
    let health_resp = HealthResponse {
        xks_proxy_fleet_size: 1,
        xks_proxy_vendor: "xks-proxy".into(),
        xks_proxy_model: "xks-proxy 0.1.0".into(),
        ekm_vendor: "xks-proxy software keystore".into(),
        ekm_fleet_details: vec![EkmFleetDetail {
            id: "keystore.json".into(),
            model: "software keystore v1".into(),
            health_status: "ACTIVE".into(),
        }],
    };
    g.bench_function("encode_encrypt_response", |b| {
        b.iter(|| serde_json::to_vec(black_box(&enc_resp)).expect("encode"))
    });
    g.bench_function("encode_decrypt_response", |b| {
        b.iter(|| serde_json::to_vec(black_box(&dec_resp)).expect("encode"))
    });
    g.bench_function("encode_metadata_response", |b| {
        b.iter(|| serde_json::to_vec(black_box(&md_resp)).expect("encode"))
    });
    g.bench_function("encode_health_response", |b| {
        b.iter(|| serde_json::to_vec(black_box(&health_resp)).expect("encode"))
    });
    g.finish();
}

/// The load generator's defaults, as its command line gives them.
#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    load: cli::LoadArgs,
}

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsConfig::Files {
        certificate: servers::repo_file("certs/server-ecdsa.pem"),
        private_key: servers::repo_file("certs/server-ecdsa.key"),
    };
    let listen = "127.0.0.1:0".parse().expect("addr");
    let (config, akid) = servers::bench_proxy_config(
        dir.path(),
        listen,
        "/bench",
        &tls,
        &servers::BenchBackend::Software,
    )
    .expect("config");
    let running = rt
        .block_on(async {
            let backends = xks_proxy::backend::open_all(&config.backends).expect("backend");
            xks_proxy::server::start(&config, backends).await
        })
        .expect("proxy");
    let args = cli::TargetArgs {
        url: format!("https://localhost:{}", running.local_addr.port()),
        prefix: "/bench".into(),
        key_id: servers::BENCH_KEY.into(),
        access_key_id: akid,
        secret: None,
        secret_file: Some(dir.path().join("secret")),
        region: "us-east-1".into(),
        service: "kms-xks-proxy".into(),
        ca: Some(servers::repo_file("certs/ca.pem")),
        insecure: false,
        client_cert: None,
        client_key: None,
        connect_to: None,
        allow_remote: false,
    };
    let target = Arc::new(
        rt.block_on(target::Target::from_args(&args))
            .expect("target"),
    );
    let connector = conn::Connector::new(target, false, true).expect("connector");
    let load = Defaults::parse_from(["micro"]).load;
    let workload = workload::Workload::new(&load).expect("workload");
    let mut rng = workload::Rng::new(1);
    let mut connection = rt.block_on(connector.connect()).expect("connect");

    let mut g = c.benchmark_group("e2e");
    g.measurement_time(Duration::from_secs(10));
    for (name, op) in [
        ("encrypt_tls_keepalive", workload::Op::Encrypt),
        ("health_tls_keepalive", workload::Op::Health),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (req, expect) =
                        workload.request(&connector, op, &mut rng).expect("request");
                    let (status, body) = connection
                        .send(req, Duration::from_secs(5))
                        .await
                        .expect("response");
                    workload
                        .check(&expect, status, &body)
                        .expect("valid response");
                })
            })
        });
    }
    g.finish();
    running.shutdown();
}

criterion_group!(benches, sigv4, aad_and_cdiv, software_keystore, json, e2e);
criterion_main!(benches);
