//! The deployment files' tests, one binary (`cargo test --test deploy`): the linters over
//! `deploy/`, the container image's parts, a fleet on loopback and the credential
//! rotation runbook. Each module is one former `tests/deploy_<name>.rs`; run one with
//! `cargo test --test deploy deploy_<name>::`. Why one binary: `tests/proxy/main.rs`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../harness/mod.rs"]
mod harness;
#[path = "../kms_support/mod.rs"]
mod kms_support;
mod support;

mod deploy_container;
mod deploy_fleet;
mod deploy_lint;
mod deploy_rotation;
