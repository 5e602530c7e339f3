//! The XKS API's request bodies, end to end: JSON and Base64 decoding of all four
//! operations (`api::wire`), the error-text scrubbing of `api`'s decoder, the
//! handlers' checks (`api::{health,metadata,encrypt,decrypt}`, the AAD and metadata
//! of `api::aad`), the software key manager and the one error→wire mapping.
//!
//! Input: one selector byte (operation and key) and the body. Each input becomes a
//! correctly SigV4-signed POST to a real `Api` over a software keystore, so what is
//! fuzzed is the body, not the signature check (`sigv4` has its own target).
//!
//! Checked: the signature always verifies (never 401); the status is one the body
//! can legitimately cause (200, 400, 404, 501: never 500 or another status); every
//! answer is the spec's JSON (a response struct, or an `ErrorResponse` with one of the
//! spec's names); and an Encrypt that succeeds decrypts back to its plaintext.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use xks_proxy::api::Api;
use xks_proxy::api::key_manager::KeyManager;
use xks_proxy::api::wire;
use xks_proxy::backend::software::{Keystore, MasterKey};
use xks_proxy::backend::{CryptoBackend, KeyUsage};
use xks_proxy::config::Config;
use xks_proxy::secret::SecretString;
use xks_proxy::sigv4::canonical;

const ACCESS_KEY_ID: &str = "AKIAFUZZFUZZFUZZFUZZ";
const SECRET: &str = "FuzzSecretValueFuzzSecretValueFuzzSecretVal1";
const REGION: &str = "us-east-1";
const SERVICE: &str = "kms-xks-proxy";
/// Keys the selector byte chooses from: usable, encrypt-only, disabled, absent.
const KEYS: [&str; 4] = ["fuzz-key", "fuzz-enc-only", "fuzz-disabled", "no-such-key"];
const SPEC_ERROR_NAMES: &[&str] = &[
    "ValidationException",
    "InvalidStateException",
    "InvalidCiphertextException",
    "InvalidKeyUsageException",
    "AuthenticationFailedException",
    "AccessDeniedException",
    "KeyNotFoundException",
    "InvalidUriPathException",
    "ThrottlingException",
    "UnsupportedOperationException",
    "DependencyTimeoutException",
    "InternalException",
];

struct Proxy {
    rt: tokio::runtime::Runtime,
    api: Api,
    _dir: tempfile::TempDir,
}

static PROXY: LazyLock<Proxy> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("tempdir");
    let master = MasterKey::generate();
    std::fs::write(dir.path().join("master.key"), master.to_base64().expose()).expect("write");
    std::fs::write(dir.path().join("secret"), SECRET).expect("write");
    let mut ks = Keystore::create(&dir.path().join("keystore.json"), &master).expect("keystore");
    ks.create_key(KEYS[0], &[KeyUsage::Encrypt, KeyUsage::Decrypt])
        .expect("key");
    ks.create_key(KEYS[1], &[KeyUsage::Encrypt]).expect("key");
    ks.create_key(KEYS[2], &[KeyUsage::Encrypt, KeyUsage::Decrypt])
        .expect("key");
    ks.set_enabled(KEYS[2], false).expect("disable");
    ks.save().expect("save");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
insecure_plain_http = true

[backend]
kind = "software"
keystore = "keystore.json"
master_key_file = "master.key"

[[keystores]]
path_prefix = ""
[[keystores.credentials]]
access_key_id = "{ACCESS_KEY_ID}"
secret_file = "secret"
"#
    );
    let config = Config::from_toml(&text, dir.path()).expect("config");
    let entry = &config.backends[0];
    let backend: Arc<dyn CryptoBackend> =
        xks_proxy::backend::open(&entry.config).expect("software backend");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A shutdown already signalled (its sender dropped): the health monitor's periodic
    // re-checks end at once; its first check, which GetHealthStatus answers from, stays.
    let (_, shutdown) = tokio::sync::watch::channel(false);
    let manager = rt
        .block_on(KeyManager::start(
            &entry.name,
            backend,
            Some(&entry.config),
            config.limits,
            config.health.clone(),
            shutdown,
        ))
        .expect("key manager");
    let managers = [(entry.name.clone(), manager)].into();
    let api = Api::new(&config, managers).expect("api");
    Proxy { rt, api, _dir: dir }
});

/// Signs like KMS (SignedHeaders host;x-amz-date) at the current time and serves.
fn serve(path: &str, body: &[u8]) -> (StatusCode, Bytes) {
    let now: time::OffsetDateTime = SystemTime::now().into();
    let amz_date = now
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .expect("format");
    let day = &amz_date[..8];
    let (mut parts, ()) = http::Request::post(path)
        .header("host", "xks.example")
        .header("content-type", "application/json")
        .header("x-amz-date", &amz_date)
        .body(())
        .expect("request")
        .into_parts();
    let creq =
        canonical::canonical_request(&parts, "host;x-amz-date", &canonical::hex_sha256(body))
            .expect("canonical request");
    let scope = format!("{day}/{REGION}/{SERVICE}/aws4_request");
    let sts = canonical::string_to_sign(&amz_date, &scope, &creq);
    let key = canonical::derive_signing_key(&SecretString::from(SECRET), day, REGION, SERVICE);
    let signature = hex::encode(canonical::signature(&key, sts.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{scope}, SignedHeaders=host;x-amz-date, Signature={signature}"
    );
    parts.headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&authorization).expect("ascii"),
    );
    let req = http::Request::from_parts(parts, Full::new(Bytes::copy_from_slice(body)));
    let proxy = &*PROXY;
    proxy.rt.block_on(async {
        let resp = proxy.api.serve(req).await;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        (status, body)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let key = KEYS[usize::from(selector >> 2) % KEYS.len()];
    let (path, verb) = match selector & 3 {
        0 => ("/kms/xks/v1/health".to_owned(), "health"),
        1 => (format!("/kms/xks/v1/keys/{key}/metadata"), "metadata"),
        2 => (format!("/kms/xks/v1/keys/{key}/encrypt"), "encrypt"),
        _ => (format!("/kms/xks/v1/keys/{key}/decrypt"), "decrypt"),
    };
    let (status, answer) = serve(&path, body);
    assert!(
        matches!(status.as_u16(), 200 | 400 | 404 | 501),
        "{verb}: status {status}, body {}",
        String::from_utf8_lossy(&answer)
    );
    if status != StatusCode::OK {
        let err: wire::ErrorResponse = serde_json::from_slice(&answer).expect("error JSON");
        assert!(
            SPEC_ERROR_NAMES.contains(&err.error_name.as_str()),
            "{err:?}"
        );
        return;
    }
    match verb {
        "health" => drop(serde_json::from_slice::<wire::HealthResponse>(&answer).expect("json")),
        "metadata" => {
            drop(serde_json::from_slice::<wire::MetadataResponse>(&answer).expect("json"))
        }
        "decrypt" => drop(serde_json::from_slice::<wire::DecryptResponse>(&answer).expect("json")),
        _ => {
            // What the proxy accepted, the client's own decoder reads the same way.
            let req: wire::EncryptRequest = serde_json::from_slice(body).expect("accepted body");
            let sealed: wire::EncryptResponse = serde_json::from_slice(&answer).expect("json");
            let back = wire::DecryptRequest {
                request_metadata: req.request_metadata,
                ciphertext: sealed.ciphertext,
                encryption_algorithm: "AES_GCM".to_owned(),
                initialization_vector: sealed.initialization_vector,
                authentication_tag: sealed.authentication_tag,
                additional_authenticated_data: req.additional_authenticated_data,
                ciphertext_metadata: sealed.ciphertext_metadata,
            };
            let body = serde_json::to_vec(&back).expect("json");
            let (status, answer) = serve(&format!("/kms/xks/v1/keys/{key}/decrypt"), &body);
            if key == KEYS[1] {
                // Encrypt-only: decrypting is refused, by name.
                assert_eq!(status, StatusCode::BAD_REQUEST);
                return;
            }
            assert_eq!(
                status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&answer)
            );
            let opened: wire::DecryptResponse = serde_json::from_slice(&answer).expect("json");
            assert!(
                opened.plaintext == req.plaintext,
                "round trip changed the plaintext"
            );
        }
    }
});
