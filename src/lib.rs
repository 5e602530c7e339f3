//! # xks-proxy
//!
//! An AWS KMS External Key Store (XKS) proxy: KMS sends SigV4-signed HTTPS requests, the
//! proxy performs AES-256-GCM in a key manager it controls (an HSM over PKCS#11, or a
//! software keystore) and answers in the spec's JSON. Plus a KMS emulator that calls the
//! proxy exactly as KMS does.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | TOML → [`config::raw`] (serde) → one validator per table → validated [`config::Config`]; secrets read from env/files; named backends (`[backend]` is `default`, more as `[backends.NAME]`), each keystore naming its own; [`config::reload`]: every setting classified once as restart-only or reloadable (by type) |
//! | [`server`] | listeners, TLS ([`server::tls`]), connection caps in all and per source ([`server::admission`]), each connection's HTTP/1.1+2 and deadlines ([`server::connection`]), graceful drain, and [`server::reload`]: applying a reload all at once, one at a time, and its triggers (SIGHUP, the file watch) |
//! | [`api`] | the XKS API: routing, the one error→wire mapping, AAD/CDIV, handlers, health, and [`api::key_manager`]: each configured backend in service behind its own `Handle` and health monitor, which tenants (prefixes) point into |
//! | [`sigv4`] | our SigV4 verifier (the product) and a KMS-like signer (aws-sigv4) |
//! | [`backend`] | the [`backend::CryptoBackend`] trait, [`backend::Handle`] (the one async→blocking boundary: permits, a bounded wait queue, a deadline, and the backend's own call threads — not `spawn_blocking`, see its doc), [`backend::software`] keystore, `backend::pkcs11` (HSMs through cryptoki: session pool, handle cache, each token's state in one state machine (`lifecycle`) whose transitions are the only writers, recovery, failover); a reload is two-phase per backend (`prepare_reload` checks, `commit_reload` applies) |
//! | [`policy`] | optional secondary authorization (Cedar) over `requestMetadata`; health exempt |
//! | [`audit`] | the tamper-evident audit trail: one hash-chained record per authenticated request, HMAC-sealed checkpoints, a writer thread behind a bounded queue (fail closed or count the drops), rotation, and `audit verify`/`show` |
//! | [`secret`] | zeroizing, `Debug`-redacted secret types |
//! | [`key_id`] | the spec's external key id rule (1–128 of `A-Za-z0-9._-`), defined once for config, backends, API and emulator; a leaf like `secret` |
//! | [`crypto`] | the one choice of cryptographic implementation: ring, or aws-lc-rs on the AWS-LC FIPS 140-3 module (feature `fips`); every hash, MAC, KDF, AEAD, random draw and TLS provider comes from here |
//! | [`telemetry`] | tracing setup (human or JSON), the Prometheus registry |
//! | [`doctor`] | `xks-proxy doctor`: an end-to-end check of a config |
//! | [`key_admin`] | `xks-proxy keys`: creating, listing, enabling, disabling and rotating keys on a backend, offline |
//! | [`aws_sample`] | moving from AWS's sample proxy: its `settings.toml` read into this config (`config import-aws-sample`) |
//! | [`kms`] | the KMS emulator: KMS's JSON API, custom key stores (external and CloudHSM), XKS keys, [`kms::xks_client`] which calls the proxy exactly as KMS does, and `kms::hsm`, the kmsuser login on a PKCS#11 token standing in for a CloudHSM cluster |
//!
//! # One Encrypt request
//!
//! `server` (admission, TLS handshake, HTTP) → [`api::Api::serve`] →
//! [`api::route::parse`] → prefix lookup → body read under a cap and a deadline →
//! [`sigv4::verify`] with the prefix's credentials → only now the in-flight slot and the
//! prefix's quota (nothing scarce is held before the signature verifies) → key id checks
//! → `wire::EncryptRequest` → [`api::encrypt`] builds the spec AAD ([`api::aad`]) and
//! calls the prefix's backend through its [`backend::Handle`] (encrypt, CDIV, verify-decrypt) → 200
//! JSON, and one log line with kmsRequestId, operation, principal, prefix, key, outcome
//! and elapsed time (and, with `[audit]`, its record queued for the [`audit`] writer,
//! or a 503 if it cannot be). An answer the API gives before the body is read (404, 405, 501)
//! still consumes the body first, bounded, so HTTP/2 clients receive it.
//!
//! Dependency directions: `server` → `api` → (`sigv4`, `policy`, `backend` via `Handle`);
//! `backend` knows nothing of HTTP, Base64 or the spec's AAD layout; `kms` reaches XKS
//! keys only through the proxy's HTTP API like KMS (using `sigv4` and `api::wire`); for
//! CloudHSM key stores it uses the PKCS#11 module directly, like KMS uses the CloudHSM
//! client (`backend::pkcs11`'s token selection, not its request path).
//!
//! Binaries: `xks-proxy` (`src/bin/xks-proxy.rs`), `kms-emulator`
//! (`src/bin/kms-emulator.rs`), and, with the `bench` feature only (not part of the
//! product), the load generator `xks-bench` (`benches/loadgen/`).
//!
//! The binaries are thin: they parse arguments, call the library and print.
//!
//! Start reading at `src/bin/xks-proxy.rs`, then [`server::start`] and [`api::Api::serve`].
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod aws_sample;
pub mod backend;
pub mod config;
pub mod crypto;
pub mod doctor;
#[doc(hidden)]
pub mod fuzzing;
pub mod key_admin;
pub mod key_id;
pub mod kms;
pub mod policy;
pub mod secret;
pub mod server;
pub mod sigv4;
pub mod telemetry;
