//! The proxy's integration tests, one binary (`cargo test --test proxy`): the real server
//! in-process or the real `xks-proxy` binary as a child, driven over loopback. Each
//! module is one former `tests/<name>.rs`; run one with `cargo test --test proxy <name>::`.
//!
//! One binary rather than one per file: every test executable links the whole crate and
//! its dependencies, so each extra one costs link time and disk (see the `[profile.dev]`
//! comment in Cargo.toml). What is in another binary needs a process of its own:
//! `metrics`, `throttling` and `handshake_log` read the process-wide metrics registry
//! (and `handshake_log` the per-process log budget), so only their own requests may be
//! in it; `log_escaping` records log lines under scoped subscribers (tracing caches
//! each call site's interest per process, and the tests here run without one);
//! `log_hygiene`, `policy_proxy` and `kms_log_hygiene` install the process-global
//! tracing subscriber; `backend_pkcs11` finalizes and reinitialises the PKCS#11 module
//! (process-wide) while other tests on it would run; `pkcs11_server` makes its SoftHSM
//! tokens before anything in its process initialises the module (SoftHSM sees only the
//! tokens that exist at C_Initialize); `fips` is built and run alone with `--features
//! fips`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../conformance/mod.rs"]
mod conformance;
#[path = "../harness/mod.rs"]
mod harness;
#[path = "../kms_support/mod.rs"]
mod kms_support;
#[path = "../softhsm/mod.rs"]
mod softhsm;

mod audit;
mod backend_software;
mod cli;
mod curl;
mod hostile_network;
mod idle_connections;
mod log_hygiene_child;
mod operating;
mod policy_examples;
mod proxy_api;
mod shipped_configs;
mod signals_under_load;
