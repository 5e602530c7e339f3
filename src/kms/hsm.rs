//! The emulator's side of a CloudHSM key store's connection: log in to the stand-in
//! cluster's token as kmsuser (CKU_USER), rotate the password with C_SetPIN, and keep
//! the logged-in session while the store is CONNECTED — what KMS does with the
//! CloudHSM client. Token selection is the proxy backend's (`backend::pkcs11::find_slot`).
//! On that session live the KMS keys' material: AES-256 secret keys labelled with the
//! key ARN, found by label for every operation (never a cached handle, so a key an
//! operator deleted is noticed at once).
//!
//! Why not the proxy backend's module registry: that keeps every module initialised
//! for the life of the process, and SoftHSMv2 loads a token's PIN once per
//! C_Initialize, so a long-lived context would keep accepting a kmsuser password the
//! operator has since reset on the token. Here each connect attempt re-initialises the
//! module (C_Finalize + C_Initialize) when no other store holds a session on it; while
//! another store on the same module stays connected the context is reused (and an
//! external reset may then go unseen until that store disconnects too).
//!
//! Every call here blocks; callers run it on a blocking thread. Nothing here logs or
//! returns a password: failures carry a `CKR_*` name only.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use super::clusters::{Cluster, TokenSelector};
use super::store::ConnectionErrorCode;
use crate::backend::pkcs11::{Selector, SlotError, ckr_name, find_slot};
use crate::secret::{SecretBytes, SecretString};

/// Why an operation with a KMS key's material in the token failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFault {
    /// The store holds no logged-in session (not CONNECTED, or lost at a restart).
    NoSession,
    /// No secret key labelled with the KMS key's ARN: deleted behind KMS's back.
    MaterialMissing,
    /// AES-GCM did not authenticate (wrong context, or a tampered blob).
    NotAuthentic,
    /// Any other refusal of the token: a `CKR_*` name.
    Token(String),
}

/// AES-GCM tag length in bits (KMS and this emulator use 128-bit tags).
const TAG_BITS: u64 = 128;

/// The template of a KMS key's material in the cluster: what KMS documents for keys in
/// CloudHSM key stores (persistent, owned by kmsuser, never leaves the HSM in the
/// clear), labelled with the key's ARN so an operator can find it.
fn key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The secret keys labelled `label` on `session`.
fn find_key(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, KeyFault> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| KeyFault::Token(ck_code(&e)))
}

/// The one key labelled `label`; none is `MaterialMissing`. Several (an operator
/// copied one in) is refused rather than guessed at.
fn the_key(session: &Session, label: &str) -> Result<ObjectHandle, KeyFault> {
    match find_key(session, label)?.as_slice() {
        [] => Err(KeyFault::MaterialMissing),
        [one] => Ok(*one),
        _ => Err(KeyFault::Token(
            "more than one key carries this label".to_owned(),
        )),
    }
}

/// Why a login attempt failed: the store's `ConnectionErrorCode` and a loggable reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ConnectionErrorCode,
    pub reason: String,
}

fn refuse(code: ConnectionErrorCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

fn ck_code(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f:?}: {}", ckr_name(*rv)),
        other => other.to_string(),
    }
}

struct ModuleCtx {
    ctx: Pkcs11,
    /// The logged-in session of each CONNECTED store on this module, by store id.
    held: HashMap<String, Held>,
}

/// A CONNECTED store's kmsuser session and what it learned about the store's keys.
struct Held {
    session: Session,
    /// Labels (key ARNs) whose material an operation on this session found missing.
    /// KMS documents that such a key's state "eventually changes to UNAVAILABLE"; the
    /// set dies with the session, so a reconnect (say, to a related cluster restored
    /// from a backup that still holds the key) looks again.
    missing: HashSet<String>,
}

impl Held {
    fn new(session: Session) -> Held {
        Held {
            session,
            missing: HashSet::new(),
        }
    }
}

/// Every module the emulator has loaded and the sessions it holds.
#[derive(Default)]
pub struct Sessions {
    modules: Mutex<HashMap<PathBuf, ModuleCtx>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) | Ok(()) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A random kmsuser password: 32 characters of `[A-Za-z0-9]` (CloudHSM and KMS accept
/// 7–32 alphanumerics).
fn new_password() -> Result<SecretString, Refusal> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let rng = crate::crypto::rand::SystemRandom::new();
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        let mut b = [0u8; 1];
        crate::crypto::rand::SecureRandom::fill(&rng, &mut b).map_err(|_| {
            refuse(
                ConnectionErrorCode::InternalError,
                "the system random number generator failed",
            )
        })?;
        // 62 * 4 = 248: reject 248..=255 so every character is equally likely.
        if b[0] < 248 {
            out.push(ALPHABET[usize::from(b[0] % 62)] as char);
        }
    }
    Ok(SecretString::new(out))
}

impl Sessions {
    /// Logs in to `cluster`'s token as kmsuser with `password`, rotates the password,
    /// and keeps the session for `store_id`. Returns the new password.
    pub fn connect(
        &self,
        store_id: &str,
        cluster: &Cluster,
        password: &SecretString,
    ) -> Result<SecretString, Refusal> {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        // A previous session of this store (should not exist: disconnect releases it).
        for m in modules.values_mut() {
            m.held.remove(store_id);
        }
        let fresh = match modules.remove(&cluster.module) {
            Some(m) if !m.held.is_empty() => m,
            Some(m) => {
                // Nobody holds a session: start over so the token's PIN is re-read.
                if let Err(e) = m.ctx.clone().finalize() {
                    tracing::debug!(code = %ck_code(&e), "C_Finalize before a connect attempt failed");
                }
                initialize(&m.ctx).map_err(|e| {
                    refuse(
                        ConnectionErrorCode::InternalError,
                        format!("C_Initialize failed: {}", ck_code(&e)),
                    )
                })?;
                m
            }
            None => {
                let ctx = Pkcs11::new(&cluster.module).map_err(|e| {
                    refuse(
                        ConnectionErrorCode::InternalError,
                        format!(
                            "cannot load PKCS#11 module {}: {e}",
                            cluster.module.display()
                        ),
                    )
                })?;
                initialize(&ctx).map_err(|e| {
                    refuse(
                        ConnectionErrorCode::InternalError,
                        format!("C_Initialize failed: {}", ck_code(&e)),
                    )
                })?;
                ModuleCtx {
                    ctx,
                    held: HashMap::new(),
                }
            }
        };
        let entry = modules.entry(cluster.module.clone()).or_insert(fresh);
        let session = login(&entry.ctx, cluster, password)?;
        let new = new_password()?;
        if let Err(e) = session.set_pin(
            &AuthPin::from(password.expose()),
            &AuthPin::from(new.expose()),
        ) {
            let _ = session.logout();
            return Err(refuse(
                ConnectionErrorCode::InternalError,
                format!("rotating the kmsuser password failed: {}", ck_code(&e)),
            ));
        }
        entry.held.insert(store_id.to_owned(), Held::new(session));
        Ok(new)
    }

    /// Logs in again for a store that was CONNECTED before a restart: no rotation.
    pub fn reopen(
        &self,
        store_id: &str,
        cluster: &Cluster,
        password: &SecretString,
    ) -> Result<(), Refusal> {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if !modules.contains_key(&cluster.module) {
            let ctx = Pkcs11::new(&cluster.module).map_err(|e| {
                refuse(
                    ConnectionErrorCode::InternalError,
                    format!(
                        "cannot load PKCS#11 module {}: {e}",
                        cluster.module.display()
                    ),
                )
            })?;
            initialize(&ctx).map_err(|e| {
                refuse(
                    ConnectionErrorCode::InternalError,
                    format!("C_Initialize failed: {}", ck_code(&e)),
                )
            })?;
            modules.insert(
                cluster.module.clone(),
                ModuleCtx {
                    ctx,
                    held: HashMap::new(),
                },
            );
        }
        let entry = modules
            .get_mut(&cluster.module)
            .ok_or_else(|| refuse(ConnectionErrorCode::InternalError, "module vanished"))?;
        let session = login(&entry.ctx, cluster, password)?;
        entry.held.insert(store_id.to_owned(), Held::new(session));
        Ok(())
    }

    /// Logs out and closes the session `store_id` holds, if any.
    pub fn release(&self, store_id: &str) {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        for m in modules.values_mut() {
            // Dropping the session closes it.
            if let Some(held) = m.held.remove(store_id)
                && let Err(e) = held.session.logout()
            {
                tracing::debug!(custom_key_store_id = %store_id, code = %ck_code(&e), "C_Logout failed");
            }
        }
    }

    /// C_GenerateRandom on the session `store_id` holds; `None` when it holds none.
    pub fn generate_random(&self, store_id: &str, n: u32) -> Option<Result<Vec<u8>, String>> {
        let modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        let held = modules.values().find_map(|m| m.held.get(store_id))?;
        Some(held.session.generate_random_vec(n).map_err(|e| ck_code(&e)))
    }

    /// Runs `f` on the session `store_id` holds.
    fn with_session<T>(
        &self,
        store_id: &str,
        f: impl FnOnce(&Session) -> Result<T, KeyFault>,
    ) -> Result<T, KeyFault> {
        let modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        let held = modules
            .values()
            .find_map(|m| m.held.get(store_id))
            .ok_or(KeyFault::NoSession)?;
        f(&held.session)
    }

    /// Runs `f` on the session `store_id` holds with the one key labelled `label`; a
    /// key found missing is remembered (see [`Sessions::material_missing`]).
    fn with_key<T>(
        &self,
        store_id: &str,
        label: &str,
        f: impl FnOnce(&Session, ObjectHandle) -> Result<T, KeyFault>,
    ) -> Result<T, KeyFault> {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        let held = modules
            .values_mut()
            .find_map(|m| m.held.get_mut(store_id))
            .ok_or(KeyFault::NoSession)?;
        match the_key(&held.session, label) {
            Ok(key) => f(&held.session, key),
            Err(KeyFault::MaterialMissing) => {
                held.missing.insert(label.to_owned());
                Err(KeyFault::MaterialMissing)
            }
            Err(other) => Err(other),
        }
    }

    /// Whether an operation on the session `store_id` holds found the material of the
    /// key labelled `label` missing (false when the store holds no session).
    pub fn material_missing(&self, store_id: &str, label: &str) -> bool {
        let modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        modules
            .values()
            .find_map(|m| m.held.get(store_id))
            .is_some_and(|h| h.missing.contains(label))
    }

    /// C_GenerateKey: a persistent, sensitive, non-extractable AES-256 key labelled
    /// `label` (the KMS key's ARN) on the kmsuser session of `store_id`.
    pub fn create_key(&self, store_id: &str, label: &str) -> Result<(), KeyFault> {
        self.with_session(store_id, |s| {
            s.generate_key(&Mechanism::AesKeyGen, &key_template(label))
                .map(|_| ())
                .map_err(|e| KeyFault::Token(ck_code(&e)))
        })
    }

    /// AES-256-GCM in the token with the key labelled `label`: `ciphertext ‖ tag`.
    pub fn encrypt(
        &self,
        store_id: &str,
        label: &str,
        iv: [u8; 12],
        data: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, KeyFault> {
        self.with_key(store_id, label, |s, key| {
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
                .map_err(|e| KeyFault::Token(ck_code(&e)))?;
            s.encrypt(&Mechanism::AesGcm(params), key, data)
                .map_err(|e| KeyFault::Token(ck_code(&e)))
        })
    }

    /// Opens `encrypt`'s output. A tag that does not verify is `NotAuthentic`
    /// (SoftHSMv2 reports it as CKR_ENCRYPTED_DATA_INVALID or a general failure).
    pub fn decrypt(
        &self,
        store_id: &str,
        label: &str,
        iv: &[u8],
        ciphertext_and_tag: &[u8],
        aad: &[u8],
    ) -> Result<SecretBytes, KeyFault> {
        self.with_key(store_id, label, |s, key| {
            let mut iv = iv.to_vec();
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
                .map_err(|e| KeyFault::Token(ck_code(&e)))?;
            s.decrypt(&Mechanism::AesGcm(params), key, ciphertext_and_tag)
                .map(SecretBytes::new)
                .map_err(|e| match e {
                    CkError::Pkcs11(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::GeneralError
                        | RvError::FunctionFailed,
                        _,
                    ) => KeyFault::NotAuthentic,
                    other => KeyFault::Token(ck_code(&other)),
                })
        })
    }

    /// C_DestroyObject on every key labelled `label`; returns how many there were.
    pub fn destroy_key(&self, store_id: &str, label: &str) -> Result<usize, KeyFault> {
        self.with_session(store_id, |s| {
            let keys = find_key(s, label)?;
            for k in &keys {
                s.destroy_object(*k)
                    .map_err(|e| KeyFault::Token(ck_code(&e)))?;
            }
            Ok(keys.len())
        })
    }

    /// Whether `store_id` holds a logged-in session (tests, status).
    pub fn holds(&self, store_id: &str) -> bool {
        let modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        modules.values().any(|m| m.held.contains_key(store_id))
    }
}

/// Opens a read-write session on the cluster's token and logs in as CKU_USER.
/// C_Login's refusals become the CloudHSM connection error codes; a token the module
/// cannot find or talk to is `NETWORK_ERRORS` ("KMS cannot communicate with your
/// CloudHSM cluster"), while a module that cannot be loaded or initialised is
/// `INTERNAL_ERROR` (KMS's own client is broken, nothing on the cluster to fix).
fn login(ctx: &Pkcs11, cluster: &Cluster, password: &SecretString) -> Result<Session, Refusal> {
    let selector = match &cluster.token {
        TokenSelector::Label(l) => Selector::Label(l.clone()),
        TokenSelector::Serial(s) => Selector::Serial(s.clone()),
    };
    let (slot, _) = find_slot(ctx, &selector).map_err(|e| {
        refuse(
            ConnectionErrorCode::NetworkErrors,
            match e {
                SlotError::NotFound => format!("no token with {selector}"),
                other => format!("token {selector}: {}", other.code()),
            },
        )
    })?;
    let session = ctx.open_rw_session(slot).map_err(|e| {
        refuse(
            ConnectionErrorCode::NetworkErrors,
            format!("C_OpenSession failed: {}", ck_code(&e)),
        )
    })?;
    match session.login(UserType::User, Some(&AuthPin::from(password.expose()))) {
        Ok(()) => Ok(session),
        Err(e) => {
            let code = match &e {
                CkError::Pkcs11(
                    RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                    _,
                ) => ConnectionErrorCode::InvalidCredentials,
                CkError::Pkcs11(RvError::PinLocked, _) => ConnectionErrorCode::UserLockedOut,
                CkError::Pkcs11(RvError::UserPinNotInitialized, _) => {
                    ConnectionErrorCode::UserNotFound
                }
                CkError::Pkcs11(
                    RvError::UserAlreadyLoggedIn | RvError::UserAnotherAlreadyLoggedIn,
                    _,
                ) => ConnectionErrorCode::UserLoggedIn,
                _ => ConnectionErrorCode::NetworkErrors,
            };
            Err(refuse(code, format!("C_Login failed: {}", ck_code(&e))))
        }
    }
}
