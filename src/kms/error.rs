//! The emulator's one exception type: a KMS exception name plus the message the
//! caller sees. [`protocol`](super::protocol) is the only place that turns it into an
//! HTTP status and a `{"__type","message"}` body.
//!
//! Messages are built by the emulator from fixed text plus identifiers (ARNs, store
//! IDs, member names). They never carry a secret, plaintext or a proxy's own
//! `errorMessage` (KMS only logs that one).

use std::fmt;

/// Every exception the emulator can return. Names match the KMS service model (or,
/// for the unmodelled ones, what AWS sends on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exception {
    // Custom key stores.
    CustomKeyStoreNotFound,
    CustomKeyStoreInvalidState,
    CustomKeyStoreNameInUse,
    CustomKeyStoreHasCmks,
    CloudHsmClusterNotFound,
    CloudHsmClusterNotActive,
    CloudHsmClusterInUse,
    CloudHsmClusterInvalidConfiguration,
    CloudHsmClusterNotRelated,
    IncorrectTrustAnchor,
    XksProxyUriInUse,
    XksProxyUriEndpointInUse,
    XksProxyUriUnreachable,
    XksProxyIncorrectAuthenticationCredential,
    XksProxyInvalidConfiguration,
    XksProxyInvalidResponse,
    XksProxyVpcEndpointServiceInUse,
    // External keys (CreateKey).
    XksKeyNotFound,
    XksKeyInvalidConfiguration,
    XksKeyAlreadyInUse,
    /// Not in the model; the XKS spec and the Developer Guide name it for a proxy 501.
    XksKeyInvalidResponse,
    // KMS keys and cryptography.
    KmsInvalidState,
    Disabled,
    NotFound,
    InvalidCiphertext,
    IncorrectKey,
    InvalidKeyUsage,
    InvalidArn,
    InvalidGrantToken,
    InvalidMarker,
    UnsupportedOperation,
    LimitExceeded,
    DryRunOperation,
    KmsInternal,
    // Unmodelled exceptions that AWS sends on the wire.
    Throttling,
    Validation,
    Serialization,
    UnknownOperation,
    UnrecognizedClient,
    InvalidSignature,
    IncompleteSignature,
    MissingAuthenticationToken,
}

/// An exception with the message the caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsError {
    pub exception: Exception,
    pub message: String,
}

impl KmsError {
    pub fn new(exception: Exception, message: impl Into<String>) -> Self {
        Self {
            exception,
            message: message.into(),
        }
    }

    /// `ValidationException` with one already formatted constraint message.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(Exception::Validation, message)
    }

    /// `KMSInternalException`: something inside the emulator failed (storage, a bug).
    /// The detail goes to the log, not to the caller.
    pub fn internal(detail: &dyn fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal emulator failure");
        Self::new(
            Exception::KmsInternal,
            "The request was rejected because an internal exception occurred. The request can be retried.",
        )
    }
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.exception, self.message)
    }
}

impl std::error::Error for KmsError {}
