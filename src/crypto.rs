//! The process's cryptographic implementation, chosen in this one place: *ring* by
//! default, aws-lc-rs on the AWS-LC FIPS 140-3 validated module with the `fips` feature.
//!
//! Everything in the crate that hashes, MACs, derives keys, encrypts or draws random
//! bytes does it through the modules re-exported here (`crate::crypto::{aead, digest,
//! hkdf, hmac, rand}`: the software keystore's AES-256-GCM, HKDF and HMAC, the SigV4
//! verifier's HMAC/SHA-256, the spec's CDIV, IVs and key material), and every TLS
//! endpoint takes its rustls provider from [`tls`]. aws-lc-rs mirrors ring's API, so
//! callers compile unchanged against either. Nothing else in `src/` names `ring` or
//! `aws_lc_rs`, and nothing else tests the `fips` feature: code that must behave
//! differently in FIPS mode (the TLS policy in `server::tls`) asks [`FIPS`], a constant,
//! so both branches compile and are type-checked in every build.
//!
//! Not here: constant-time comparison of MACs and plaintexts stays with `subtle`.
//! Comparing two byte strings is not an algorithm FIPS 140-3 approves or forbids, and
//! ring's `constant_time` is deprecated ("no promises regarding side channels").
//!
//! What FIPS mode covers and what it does not: README, "Compliance".

#[cfg(feature = "fips")]
pub use aws_lc_rs::{aead, digest, hkdf, hmac, rand};
#[cfg(not(feature = "fips"))]
pub use ring::{aead, digest, hkdf, hmac, rand};

/// rustls's provider over the same library (`default_provider()`, `cipher_suite`,
/// `kx_group`): in the FIPS build, rustls's aws-lc-rs provider in FIPS mode.
#[cfg(feature = "fips")]
pub use rustls::crypto::aws_lc_rs as tls;
#[cfg(not(feature = "fips"))]
pub use rustls::crypto::ring as tls;

/// Whether this is the FIPS build (`cargo build --features fips`).
pub const FIPS: bool = cfg!(feature = "fips");

/// What `xks-proxy --version` prints: the version and which cryptographic module.
#[cfg(feature = "fips")]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (FIPS 140-3 mode: aws-lc-rs on the AWS-LC FIPS module)"
);
/// What `xks-proxy --version` prints: the version and which cryptographic module.
#[cfg(not(feature = "fips"))]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (FIPS mode off: ring)");

/// The cryptographic module, for the start-up log line.
pub const MODULE: &str = if FIPS {
    "aws-lc-rs (AWS-LC FIPS module)"
} else {
    "ring"
};

/// Whether the module runs in its FIPS-approved mode now: in the FIPS build, AWS-LC's
/// `FIPS_mode()`, true once its power-on self-tests and integrity check have passed
/// (AWS-LC aborts the process if they fail); always false in the default build.
pub fn fips_mode() -> bool {
    #[cfg(feature = "fips")]
    {
        aws_lc_rs::try_fips_mode().is_ok()
    }
    #[cfg(not(feature = "fips"))]
    {
        false
    }
}

/// Why a process that must run in FIPS mode may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FipsError {
    /// `require_fips = true` in a build without the `fips` feature.
    #[error(
        "FIPS 140-3 mode is required (server.require_fips = true) but this xks-proxy was built without it: rebuild with `cargo build --release --features fips` (README, \"Compliance\")"
    )]
    NotAFipsBuild,
    /// The FIPS build, but the module is not in its approved mode.
    #[error(
        "this is a FIPS build but the AWS-LC module is not in FIPS mode (its self-tests or integrity check did not pass); refusing to start"
    )]
    ModuleNotInFipsMode,
}

/// The start-up check: a FIPS build must find its module in FIPS mode, and a config
/// that requires FIPS mode must run on a FIPS build.
pub fn check(require_fips: bool) -> Result<(), FipsError> {
    if FIPS && !fips_mode() {
        return Err(FipsError::ModuleNotInFipsMode);
    }
    if require_fips && !FIPS {
        return Err(FipsError::NotAFipsBuild);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_and_the_module_agree_on_fips_mode() {
        assert_eq!(fips_mode(), FIPS);
        assert_eq!(check(false), Ok(()));
        if FIPS {
            assert_eq!(check(true), Ok(()));
        } else {
            assert_eq!(check(true), Err(FipsError::NotAFipsBuild));
        }
    }
}
