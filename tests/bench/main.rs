//! The tests that run the load generator (`xks-bench`), one binary behind the `bench`
//! feature (`cargo test --features bench --test bench`). Each module is one former
//! `tests/<name>.rs`; run one with `cargo test --features bench --test bench <name>::`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../harness/mod.rs"]
mod harness;
#[path = "../kms_support/mod.rs"]
mod kms_support;

mod bench_smoke;
mod soak;
