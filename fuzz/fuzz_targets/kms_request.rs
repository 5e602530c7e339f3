//! The KMS emulator's awsJson1.1 front door (`kms::protocol`): the `X-Amz-Target`
//! operation name, the JSON decoding of every operation's input (`protocol::parse`
//! into the operation's request struct, Base64 members included) and each
//! operation's model validation (`kms::validate`), through `protocol::handle`.
//!
//! Input: `<operation name>\n<JSON body>`; the name follows `TrentService.` in
//! `X-Amz-Target`, so unknown and unimplemented names are fuzzed too.
//!
//! The emulator under test is in memory and starts empty, so every operation is
//! decoded, validated, and then refused for naming a key or store that does not exist:
//! nothing is created and nothing reaches the network. Two operations would create
//! state, so they are kept from it: CreateCustomKeyStore goes to a second emulator that
//! already has the maximum number of stores (LimitExceeded comes after all validation
//! and before the public-endpoint health check), and a CreateKey that would make an
//! AWS_KMS key is only decoded.
//!
//! Checked: every answer is JSON; an error has a `__type` and is never a 500; a body
//! `protocol::parse` refuses is answered SerializationException, with the fixed
//! message that never quotes the body.
#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use xks_proxy::kms::protocol::{self, Op};
use xks_proxy::kms::{Config, Emulator, Exception, KmsError, crypto, keys, keystores};

struct Emulators {
    rt: tokio::runtime::Runtime,
    /// Empty: every operation but CreateCustomKeyStore.
    empty: Emulator,
    /// Holds `MAX_STORES` stores, never connected: CreateCustomKeyStore only.
    full: Emulator,
}

/// A store with a VPC endpoint service: created without a call to its proxy.
fn vpc_store(i: usize) -> String {
    let letter = char::from(b'A' + u8::try_from(i).expect("few stores"));
    format!(
        r#"{{"CustomKeyStoreName":"fuzz-{i}","CustomKeyStoreType":"EXTERNAL_KEY_STORE",
            "XksProxyUriEndpoint":"https://xks-{i}.fuzz.invalid","XksProxyUriPath":"/kms/xks/v1",
            "XksProxyConnectivity":"VPC_ENDPOINT_SERVICE",
            "XksProxyVpcEndpointServiceName":"com.amazonaws.vpce.us-east-1.vpce-svc-0000000000000000{i}",
            "XksProxyAuthenticationCredential":{{"AccessKeyId":"AKIAFUZZFUZZFUZZFUZ{letter}",
            "RawSecretAccessKey":"FuzzSecretValueFuzzSecretValueFuzzSecretVal{i}"}}}}"#
    )
}

static EMULATORS: LazyLock<Emulators> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let empty = Emulator::new(Config::default()).expect("emulator");
    let full = Emulator::new(Config::default()).expect("emulator");
    for i in 0..keystores::MAX_STORES {
        let (status, body) =
            rt.block_on(call(&full, "CreateCustomKeyStore", vpc_store(i).as_bytes()));
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    drop(_entered);
    Emulators { rt, empty, full }
});

async fn call(emulator: &Emulator, target: &str, body: &[u8]) -> (StatusCode, Bytes) {
    let req = http::Request::post("/")
        .header("x-amz-target", format!("TrentService.{target}"))
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = protocol::handle(emulator, req).await;
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, KmsError> {
    protocol::parse::<T>(body)
}

/// Decodes `body` as `op`'s input: the refusal, if any, and whether running the
/// operation would create something.
fn decode_for(op: Op, body: &[u8]) -> (Option<KmsError>, bool) {
    let refused = match op {
        Op::CreateCustomKeyStore => decode::<keystores::CreateCustomKeyStoreRequest>(body).err(),
        Op::ConnectCustomKeyStore | Op::DisconnectCustomKeyStore | Op::DeleteCustomKeyStore => {
            decode::<keystores::StoreIdRequest>(body).err()
        }
        Op::UpdateCustomKeyStore => decode::<keystores::UpdateCustomKeyStoreRequest>(body).err(),
        Op::DescribeCustomKeyStores => {
            decode::<keystores::DescribeCustomKeyStoresRequest>(body).err()
        }
        Op::CreateKey => match decode::<keys::CreateKeyRequest>(body) {
            // Absent Origin is AWS_KMS: such a key is made in the emulator itself.
            Ok(r) => return (None, r.origin.as_deref().is_none_or(|o| o == "AWS_KMS")),
            Err(e) => Some(e),
        },
        Op::DescribeKey | Op::EnableKey | Op::DisableKey | Op::CancelKeyDeletion => {
            decode::<keys::KeyIdRequest>(body).err()
        }
        Op::ListKeys => decode::<keys::ListKeysRequest>(body).err(),
        Op::ScheduleKeyDeletion => decode::<keys::ScheduleKeyDeletionRequest>(body).err(),
        Op::Encrypt => decode::<crypto::EncryptRequest>(body).err(),
        Op::Decrypt => decode::<crypto::DecryptRequest>(body).err(),
        Op::GenerateDataKey | Op::GenerateDataKeyWithoutPlaintext => {
            decode::<crypto::GenerateDataKeyRequest>(body).err()
        }
        Op::ReEncrypt => decode::<crypto::ReEncryptRequest>(body).err(),
        Op::GenerateRandom => decode::<crypto::GenerateRandomRequest>(body).err(),
    };
    (refused, false)
}

fuzz_target!(|data: &[u8]| {
    let (name, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    if http::HeaderValue::from_str(&format!("TrentService.{name}")).is_err() {
        return;
    }
    let op = Op::parse(name);
    let (refused, creates) = match op {
        Some(op) => decode_for(op, body),
        None => (None, false),
    };
    if let Some(e) = &refused {
        assert_eq!(e.exception, Exception::Serialization);
        assert!(
            e.message
                .starts_with("The request body is not valid JSON for this operation"),
            "{}",
            e.message
        );
    }
    if creates {
        return;
    }
    let emus = &*EMULATORS;
    let emulator = if op == Some(Op::CreateCustomKeyStore) {
        &emus.full
    } else {
        &emus.empty
    };
    let (status, answer) = emus.rt.block_on(call(emulator, name, body));
    let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON answer");
    if status == StatusCode::OK {
        // Only what needs no key or store: ListKeys, DescribeCustomKeyStores,
        // GenerateRandom.
        assert!(answer.is_object(), "{answer}");
        assert!(refused.is_none());
        return;
    }
    let kind = answer["__type"].as_str().expect("__type");
    assert!(kind.ends_with("Exception"), "{answer}");
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    if refused.is_some() {
        assert_eq!(kind, "SerializationException", "{answer}");
    }
});
