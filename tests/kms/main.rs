//! The KMS emulator's integration tests, one binary (`cargo test --test kms`): the
//! emulator in-process or as the real `kms-emulator` binary, against the in-test XKS
//! responder or the real proxy, over loopback. Each module is one former
//! `tests/<name>.rs`; run one with `cargo test --test kms <name>::`. Why one binary, and
//! what stays alone: `tests/proxy/main.rs`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../harness/mod.rs"]
mod harness;
#[path = "../kms_support/mod.rs"]
mod kms_support;

mod kms_cloudhsm_sdk;
mod kms_emulator;
mod kms_operating;
mod kms_sdk_e2e;
