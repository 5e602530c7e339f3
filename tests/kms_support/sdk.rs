//! The real Rust SDK (`aws-sdk-kms`) against the emulator: a client that signs like a
//! KMS caller and never retries (every failure counts), and the custom key store calls
//! the end-to-end tests share, with a failure as its service error code.

use std::time::Duration;

use aws_sdk_kms::Client;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::types::{ConnectionStateType, CustomKeyStoresListEntry};

/// How long a store may take to leave CONNECTING or DISCONNECTING.
const SETTLE: Duration = Duration::from_secs(30);

/// A client for the emulator at `endpoint` (`http://host:port`), signing as `akid`.
pub fn client(endpoint: &str, akid: &str, secret: &str) -> Client {
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(akid, secret, None, None, "test"))
        .retry_config(aws_sdk_kms::config::retry::RetryConfig::disabled())
        .build();
    Client::from_conf(conf)
}

/// The error code of a failed SDK call.
pub fn code<E: ProvideErrorMetadata, R>(r: Result<R, SdkError<E>>) -> String {
    match r {
        Ok(_) => panic!("call unexpectedly succeeded"),
        Err(e) => e
            .as_service_error()
            .and_then(|s| s.code())
            .unwrap_or_else(|| panic!("not a service error"))
            .to_owned(),
    }
}

/// A failed call's service error code, or "not a service error".
pub fn service_code<E: ProvideErrorMetadata>(e: SdkError<E>) -> String {
    e.as_service_error()
        .and_then(|s| s.code())
        .unwrap_or("not a service error")
        .to_owned()
}

pub async fn describe(kms: &Client, id: &str) -> CustomKeyStoresListEntry {
    kms.describe_custom_key_stores()
        .custom_key_store_id(id)
        .send()
        .await
        .expect("describe")
        .custom_key_stores()[0]
        .clone()
}

/// Polls until the store leaves CONNECTING/DISCONNECTING (bounded).
pub async fn settled(kms: &Client, id: &str) -> CustomKeyStoresListEntry {
    let settled = crate::harness::poll_async(SETTLE, || async {
        let s = describe(kms, id).await;
        match s.connection_state() {
            Some(ConnectionStateType::Connecting | ConnectionStateType::Disconnecting) => None,
            _ => Some(s),
        }
    })
    .await;
    settled.unwrap_or_else(|| panic!("store {id} never settled within {SETTLE:?}"))
}

/// Connects and waits (bounded) for the attempt to end; returns the entry.
pub async fn connect(kms: &Client, id: &str) -> CustomKeyStoresListEntry {
    kms.connect_custom_key_store()
        .custom_key_store_id(id)
        .send()
        .await
        .expect("connect accepted");
    settled(kms, id).await
}

pub async fn disconnect(kms: &Client, id: &str) {
    kms.disconnect_custom_key_store()
        .custom_key_store_id(id)
        .send()
        .await
        .expect("disconnect");
}
