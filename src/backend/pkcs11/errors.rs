//! Errors of the PKCS#11 backend: [`Pkcs11Error`] for setup and admin failures, and
//! [`classify`], the **one** place a PKCS#11 return code becomes a [`BackendError`] (plus
//! what the backend must do about it: evict a cached handle, drop a session, or declare
//! the token lost and start recovery).
//!
//! Messages name only non-secret facts: a `CKR_*` code name, a `C_*` function name, a
//! token label, a key id, a module path. Never a PIN, key bytes or plaintext.

use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use crate::backend::{BackendError, KeyUsage};

/// Setup and admin failures (open, login, create/list keys). Request-path failures are
/// [`BackendError`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// A setting is missing, contradictory or out of range; `key` names it as written in
    /// the config (`pool_size`, `failover[1].token_label`, ...).
    #[error("invalid PKCS#11 setting `{key}`: {reason}")]
    InvalidSetting { key: String, reason: String },
    /// The PIN source named by a setting could not be read. The PIN itself never appears.
    #[error("cannot read the user PIN for `{key}`: {reason}")]
    PinSource { key: String, reason: String },
    #[error("cannot load PKCS#11 module {}: {reason}", path.display())]
    ModuleLoad { path: PathBuf, reason: String },
    /// A PKCS#11 call failed while setting up or administering a token.
    #[error("PKCS#11 {function} failed: {code}")]
    Call { function: String, code: String },
    /// No slot holds a token with this label/serial. The backend never falls back to
    /// "the first slot": a wrong label must not silently pick another token.
    #[error("no token with {selector} in PKCS#11 module {}", module.display())]
    TokenNotFound { selector: String, module: PathBuf },
    #[error("{count} tokens match {selector} in PKCS#11 module {}; make the selector unique", module.display())]
    AmbiguousToken {
        selector: String,
        count: usize,
        module: PathBuf,
    },
    /// C_Login failed. The code is named (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, ...);
    /// the PIN is not. A wrong PIN is never retried automatically (it would lock the token).
    #[error("login to token {token} failed: {code}")]
    LoginFailed { token: String, code: String },
    #[error("a key with id `{0}` already exists on the token")]
    DuplicateKey(String),
    #[error("invalid key id `{id}`: {reason}")]
    InvalidKeyId { id: String, reason: String },
    /// No configured token is usable right now (all are being recovered).
    #[error("no PKCS#11 token is available: {0}")]
    Unavailable(String),
}

impl Pkcs11Error {
    pub(crate) fn setting(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Pkcs11Error::InvalidSetting {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Wraps a cryptoki error from a setup/admin call.
    pub(crate) fn call(err: &CkError) -> Self {
        match err {
            CkError::Pkcs11(rv, function) => Pkcs11Error::Call {
                function: function_name(*function),
                code: ckr_name(*rv),
            },
            other => Pkcs11Error::Call {
                function: "cryptoki".into(),
                code: other_error_name(other).into(),
            },
        }
    }
}

/// What the request path is doing when an error occurs: the same code means different
/// things in different places (CKR_GENERAL_ERROR from C_Decrypt is SoftHSM's tag
/// mismatch; from anything else it means the token is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Finding a key and reading its attributes.
    Lookup,
    Encrypt,
    Decrypt,
}

/// A classified PKCS#11 failure: the error a caller sees and what the backend does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The request's own outcome; the token and session are fine.
    Final(BackendError),
    /// A cached object handle is no longer valid (key deleted or re-created, token
    /// re-initialised): evict it and look the key up again once.
    StaleHandle,
    /// This session is unusable (closed, logged out, stuck in an operation): discard it
    /// and retry once on a fresh session; a second loss escalates to `TokenLost`.
    SessionLost(String),
    /// The token, slot or module is gone: mark the token down (requests fail fast or
    /// fail over), and let the recovery thread re-initialise it.
    TokenLost(String),
    /// This outcome if the token still answers C_GetTokenInfo, else the token is lost:
    /// for what a vanished token answers and an ordinary failure shares
    /// (CKR_GENERAL_ERROR, a tag mismatch on SoftHSM / nShield, an empty search).
    /// Resolved by `Token::settle`; it never leaves `Token::with_key`.
    Suspect(BackendError),
}

impl Fault {
    /// A short name of the failure for logs and health: the `CKR_*` code of a lost
    /// session/token, else the caller-visible error's text.
    pub(crate) fn code(self) -> String {
        match self {
            Fault::SessionLost(code) | Fault::TokenLost(code) => code,
            other => other.into_backend_error().to_string(),
        }
    }

    /// The error a caller sees when no retry or failover rescued the request.
    pub(crate) fn into_backend_error(self) -> BackendError {
        match self {
            Fault::Final(e) => e,
            Fault::StaleHandle => BackendError::KeyNotFound,
            Fault::SessionLost(code) | Fault::TokenLost(code) => BackendError::Unavailable(code),
            Fault::Suspect(e) => {
                debug_assert!(false, "an unsettled Fault::Suspect left Token::with_key");
                e
            }
        }
    }
}

/// The one mapping from a PKCS#11 failure to a [`BackendError`] and a recovery action.
///
/// - Decrypt failures are `InvalidCiphertext` **only on C_Decrypt/C_DecryptInit**:
///   SoftHSM reports a tag mismatch as CKR_GENERAL_ERROR, nShield as
///   CKR_FUNCTION_FAILED, the rest as CKR_ENCRYPTED_DATA_INVALID. The first two are
///   also what a vanished token answers, so they are `Suspect`: trusted only once the
///   token answers C_GetTokenInfo (`Token::settle`). So is CKR_GENERAL_ERROR anywhere.
/// - Stale handles → re-lookup; lost sessions → fresh session; lost token/module →
///   recovery and `Unavailable("<CKR name>")`.
/// - Resource exhaustion → `Busy` (ThrottlingException: KMS backs off and retries).
pub(crate) fn classify(err: &CkError, op: Op) -> Fault {
    let (rv, function) = match err {
        CkError::Pkcs11(rv, function) => (*rv, *function),
        // Not a return code: a library-level failure (missing symbol, null function
        // pointer, integer conversion). Nothing to recover; name the kind only.
        other => return Fault::Final(BackendError::Failed(other_error_name(other).into())),
    };
    let name = ckr_name(rv);
    let in_decrypt = op == Op::Decrypt;
    let decrypt_call = matches!(function, Function::Decrypt | Function::DecryptInit);
    match rv {
        // --- authentication failure of a decryption (vendor-specific codes) ---
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange if in_decrypt => {
            Fault::Final(BackendError::InvalidCiphertext)
        }
        RvError::GeneralError | RvError::FunctionFailed
            if in_decrypt && matches!(function, Function::Decrypt) =>
        {
            Fault::Suspect(BackendError::InvalidCiphertext)
        }
        // An odd refusal to start decrypting, unless the token is gone.
        RvError::FunctionFailed if in_decrypt && decrypt_call => {
            Fault::Suspect(BackendError::Failed(name))
        }
        // An IV or tag length the token refuses is a bad ciphertext, not a broken HSM.
        RvError::MechanismParamInvalid | RvError::DataLenRange | RvError::DataInvalid
            if in_decrypt && decrypt_call =>
        {
            Fault::Final(BackendError::InvalidCiphertext)
        }

        // --- the cached object handle went stale ---
        RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => Fault::StaleHandle,

        // --- the key does not allow this (we check attributes first; this is the HSM
        //     agreeing, e.g. after an attribute changed under our cache) ---
        RvError::KeyFunctionNotPermitted | RvError::KeyTypeInconsistent => match op {
            Op::Decrypt => Fault::Final(BackendError::UsageNotAllowed(KeyUsage::Decrypt)),
            Op::Encrypt => Fault::Final(BackendError::UsageNotAllowed(KeyUsage::Encrypt)),
            Op::Lookup => Fault::Final(BackendError::Failed(name)),
        },

        // --- this session is unusable; a fresh one may work ---
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::UserNotLoggedIn
        | RvError::OperationActive
        | RvError::OperationNotInitialized => Fault::SessionLost(name),

        // --- the token, slot or module is gone ---
        RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SlotIdInvalid
        | RvError::CryptokiNotInitialized
        | RvError::PinExpired
        | RvError::PinLocked
        | RvError::PinIncorrect
        | RvError::UserPinNotInitialized => Fault::TokenLost(name),

        // --- what SoftHSM answers once its token is gone, but also what some HSMs
        //     answer for one odd object or request: lost only if C_GetTokenInfo fails ---
        RvError::GeneralError => Fault::Suspect(BackendError::Failed(name)),

        // --- out of resources: ask the caller to back off ---
        RvError::SessionCount | RvError::DeviceMemory | RvError::HostMemory => {
            Fault::Final(BackendError::Busy)
        }

        // Everything else: the HSM refused in a way with no better name.
        _ => Fault::Final(BackendError::Failed(name)),
    }
}

/// `CKR_*` name of a return code, e.g. `CKR_DEVICE_REMOVED`.
///
/// Derived from cryptoki's variant names (CamelCase → SCREAMING_SNAKE), which follow the
/// spec's names one to one; vendor and unknown codes are printed in hex.
pub fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED(0x{code:08x})"),
        RvError::UnknownErrorCode(code) => format!("CKR_UNKNOWN(0x{code:08x})"),
        other => {
            let debug = format!("{other:?}");
            let mut out = String::with_capacity(debug.len() + 8);
            out.push_str("CKR_");
            for (i, c) in debug.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

/// `C_*` name of a PKCS#11 function, e.g. `C_DecryptInit`.
pub(crate) fn function_name(function: Function) -> String {
    format!("C_{function:?}")
}

/// The code name of a PKCS#11 failure (`CKR_*`), or the kind of a non-return-code error.
pub(crate) fn error_code(err: &CkError) -> String {
    match err {
        CkError::Pkcs11(rv, _) => ckr_name(*rv),
        other => other_error_name(other).into(),
    }
}

fn other_error_name(err: &CkError) -> &'static str {
    match err {
        CkError::LibraryLoading(_) => "module loading failed",
        CkError::Pkcs11(..) => "PKCS#11 error",
        CkError::NotSupported => "operation not supported by cryptoki",
        CkError::TryFromInt(_) | CkError::TryFromSlice(_) | CkError::ParseInt(_) => {
            "value conversion failed"
        }
        CkError::Utf8(_) => "invalid UTF-8 from the module",
        CkError::NulError(_) => "interior NUL byte",
        CkError::NullFunctionPointer => "the module lacks a required function",
        CkError::MissingSymbol(_) => "the module lacks a required symbol",
        CkError::InvalidValue => "invalid value from the module",
        CkError::PinNotSet => "PIN not set",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(rv: RvError, f: Function) -> CkError {
        CkError::Pkcs11(rv, f)
    }

    fn unavailable(code: &str) -> BackendError {
        BackendError::Unavailable(code.into())
    }

    /// The whole mapping, pinned: (code, function, op) → caller-visible error + action.
    // One table on purpose, however long: each row is one rule of the mapping, and
    // reading the rows side by side (which codes mean "lost", which "suspect", which
    // the caller's fault) is the review.
    #[test]
    fn error_mapping_table() {
        use BackendError as B;
        use Function as F;
        use RvError as R;
        type Row = (R, F, Op, Fault);
        let table: Vec<Row> = vec![
            // Decrypt authentication failures, per vendor.
            // SoftHSM's and nShield's tag mismatch, trusted once the token answers.
            (
                R::GeneralError,
                F::Decrypt,
                Op::Decrypt,
                Fault::Suspect(B::InvalidCiphertext),
            ), // SoftHSM
            (
                R::FunctionFailed,
                F::Decrypt,
                Op::Decrypt,
                Fault::Suspect(B::InvalidCiphertext),
            ), // nShield
            (
                R::FunctionFailed,
                F::DecryptInit,
                Op::Decrypt,
                Fault::Suspect(B::Failed("CKR_FUNCTION_FAILED".into())),
            ),
            (
                R::EncryptedDataInvalid,
                F::Decrypt,
                Op::Decrypt,
                Fault::Final(B::InvalidCiphertext),
            ),
            (
                R::EncryptedDataLenRange,
                F::Decrypt,
                Op::Decrypt,
                Fault::Final(B::InvalidCiphertext),
            ),
            (
                R::MechanismParamInvalid,
                F::DecryptInit,
                Op::Decrypt,
                Fault::Final(B::InvalidCiphertext),
            ),
            // ... but the same codes elsewhere are not ciphertext problems: a failure,
            // or a lost token if C_GetTokenInfo fails too.
            (
                R::GeneralError,
                F::Encrypt,
                Op::Encrypt,
                Fault::Suspect(B::Failed("CKR_GENERAL_ERROR".into())),
            ),
            (
                R::GeneralError,
                F::DecryptInit,
                Op::Decrypt,
                Fault::Suspect(B::Failed("CKR_GENERAL_ERROR".into())),
            ),
            (
                R::GeneralError,
                F::GetTokenInfo,
                Op::Lookup,
                Fault::Suspect(B::Failed("CKR_GENERAL_ERROR".into())),
            ),
            (
                R::FunctionFailed,
                F::Encrypt,
                Op::Encrypt,
                Fault::Final(B::Failed("CKR_FUNCTION_FAILED".into())),
            ),
            (
                R::EncryptedDataInvalid,
                F::Encrypt,
                Op::Encrypt,
                Fault::Final(B::Failed("CKR_ENCRYPTED_DATA_INVALID".into())),
            ),
            (
                R::MechanismParamInvalid,
                F::EncryptInit,
                Op::Encrypt,
                Fault::Final(B::Failed("CKR_MECHANISM_PARAM_INVALID".into())),
            ),
            // Stale handles.
            (
                R::ObjectHandleInvalid,
                F::EncryptInit,
                Op::Encrypt,
                Fault::StaleHandle,
            ),
            (
                R::KeyHandleInvalid,
                F::DecryptInit,
                Op::Decrypt,
                Fault::StaleHandle,
            ),
            (
                R::ObjectHandleInvalid,
                F::GetAttributeValue,
                Op::Lookup,
                Fault::StaleHandle,
            ),
            // Usage refused by the HSM itself.
            (
                R::KeyFunctionNotPermitted,
                F::EncryptInit,
                Op::Encrypt,
                Fault::Final(B::UsageNotAllowed(KeyUsage::Encrypt)),
            ),
            (
                R::KeyFunctionNotPermitted,
                F::DecryptInit,
                Op::Decrypt,
                Fault::Final(B::UsageNotAllowed(KeyUsage::Decrypt)),
            ),
            (
                R::KeyTypeInconsistent,
                F::EncryptInit,
                Op::Encrypt,
                Fault::Final(B::UsageNotAllowed(KeyUsage::Encrypt)),
            ),
            // Session loss.
            (
                R::SessionHandleInvalid,
                F::Encrypt,
                Op::Encrypt,
                Fault::SessionLost("CKR_SESSION_HANDLE_INVALID".into()),
            ),
            (
                R::SessionClosed,
                F::Decrypt,
                Op::Decrypt,
                Fault::SessionLost("CKR_SESSION_CLOSED".into()),
            ),
            (
                R::UserNotLoggedIn,
                F::EncryptInit,
                Op::Encrypt,
                Fault::SessionLost("CKR_USER_NOT_LOGGED_IN".into()),
            ),
            (
                R::OperationActive,
                F::EncryptInit,
                Op::Encrypt,
                Fault::SessionLost("CKR_OPERATION_ACTIVE".into()),
            ),
            // Token / device / module loss.
            (
                R::DeviceRemoved,
                F::Encrypt,
                Op::Encrypt,
                Fault::TokenLost("CKR_DEVICE_REMOVED".into()),
            ),
            (
                R::DeviceRemoved,
                F::Decrypt,
                Op::Decrypt,
                Fault::TokenLost("CKR_DEVICE_REMOVED".into()),
            ),
            (
                R::TokenNotPresent,
                F::FindObjectsInit,
                Op::Lookup,
                Fault::TokenLost("CKR_TOKEN_NOT_PRESENT".into()),
            ),
            (
                R::DeviceError,
                F::Decrypt,
                Op::Decrypt,
                Fault::TokenLost("CKR_DEVICE_ERROR".into()),
            ),
            (
                R::CryptokiNotInitialized,
                F::Encrypt,
                Op::Encrypt,
                Fault::TokenLost("CKR_CRYPTOKI_NOT_INITIALIZED".into()),
            ),
            (
                R::SlotIdInvalid,
                F::OpenSession,
                Op::Lookup,
                Fault::TokenLost("CKR_SLOT_ID_INVALID".into()),
            ),
            (
                R::PinIncorrect,
                F::Login,
                Op::Lookup,
                Fault::TokenLost("CKR_PIN_INCORRECT".into()),
            ),
            // Resource exhaustion.
            (
                R::SessionCount,
                F::OpenSession,
                Op::Lookup,
                Fault::Final(B::Busy),
            ),
            (
                R::DeviceMemory,
                F::Encrypt,
                Op::Encrypt,
                Fault::Final(B::Busy),
            ),
            // Anything else.
            (
                R::DataLenRange,
                F::Encrypt,
                Op::Encrypt,
                Fault::Final(B::Failed("CKR_DATA_LEN_RANGE".into())),
            ),
            (
                R::MechanismInvalid,
                F::EncryptInit,
                Op::Encrypt,
                Fault::Final(B::Failed("CKR_MECHANISM_INVALID".into())),
            ),
            (
                R::VendorDefined(0x8000_0001),
                F::Encrypt,
                Op::Encrypt,
                Fault::Final(B::Failed("CKR_VENDOR_DEFINED(0x80000001)".into())),
            ),
        ];
        for (rv, f, op, want) in table {
            let got = classify(&err(rv, f), op);
            assert_eq!(got, want, "{rv:?} from {f:?} during {op:?}");
        }
    }

    #[test]
    fn faults_become_named_backend_errors() {
        assert_eq!(
            Fault::StaleHandle.into_backend_error(),
            BackendError::KeyNotFound
        );
        assert_eq!(
            Fault::TokenLost("CKR_DEVICE_REMOVED".into()).into_backend_error(),
            unavailable("CKR_DEVICE_REMOVED")
        );
        assert_eq!(
            Fault::SessionLost("CKR_SESSION_CLOSED".into()).into_backend_error(),
            unavailable("CKR_SESSION_CLOSED")
        );
        let msg = unavailable("CKR_DEVICE_REMOVED").to_string();
        assert!(msg.ends_with("CKR_DEVICE_REMOVED"), "{msg}");
    }

    #[test]
    fn ckr_names_follow_the_spec() {
        assert_eq!(ckr_name(RvError::DeviceRemoved), "CKR_DEVICE_REMOVED");
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(
            ckr_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            ckr_name(RvError::EncryptedDataLenRange),
            "CKR_ENCRYPTED_DATA_LEN_RANGE"
        );
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(RvError::UnknownErrorCode(0x1234)),
            "CKR_UNKNOWN(0x00001234)"
        );
        assert_eq!(function_name(Function::DecryptInit), "C_DecryptInit");
    }

    #[test]
    fn non_return_code_errors_never_leak_details() {
        let f = classify(&CkError::PinNotSet, Op::Lookup);
        assert_eq!(f, Fault::Final(BackendError::Failed("PIN not set".into())));
        let e = Pkcs11Error::call(&err(RvError::PinIncorrect, Function::Login));
        assert_eq!(e.to_string(), "PKCS#11 C_Login failed: CKR_PIN_INCORRECT");
    }
}
