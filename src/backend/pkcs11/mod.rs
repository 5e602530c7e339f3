//! The PKCS#11 (HSM) backend: [`Pkcs11Backend`] implements [`CryptoBackend`] over any
//! PKCS#11 module through `cryptoki` (a safe wrapper: this crate stays
//! `forbid(unsafe_code)`).
//!
//! What lives where:
//! - `settings.rs`: the `[backend]` keys ([`Pkcs11Settings`]), defaults, validation, PIN
//!   resolution (env var or file; never inline).
//! - `errors.rs`: [`Pkcs11Error`] (setup/admin) and the one mapping from PKCS#11 return
//!   codes to [`BackendError`] plus the recovery action.
//! - `module.rs`: one loaded library per path per process; C_Initialize/C_Finalize and
//!   the lock that makes re-initialisation safe under load.
//! - `lifecycle.rs`: a token's state machine (not ready, serving, lost, refused): the
//!   only writer of that state, and the backoff of recovery attempts.
//! - `token.rs`: a token's slot, its bounded pool of logged-in sessions, its key-handle
//!   cache, and the retry rules of one operation.
//! - `keys.rs`: key attributes → spec/usages/end date; search and creation templates.
//! - `gcm.rs`: CKM_AES_GCM with the three IV policies; tag split/join.
//! - `recovery.rs`: the background thread that probes tokens and re-initialises lost
//!   ones with backoff.
//!
//! Request flow (Encrypt): pick the first token that is up (primary, then failover in
//! order) → module read guard → lease a session (bounded wait) → cached key handle
//! (one C_FindObjects per key per token, ever, unless the handle goes stale) → check
//! the key's status and CKA_ENCRYPT ourselves → C_EncryptInit/C_Encrypt with
//! CKM_AES_GCM → split the tag. A lost token marks itself down and the same request
//! moves to the next token; with none left the caller gets `Unavailable("<CKR name>")`
//! at once, and the recovery thread brings tokens back without a restart.
//!
//! Keys are named by `CKA_LABEL` (or `CKA_ID` as text, see [`KeyIdAttribute`]). Key
//! versions are not supported by PKCS#11 keys: everything is version 0.

mod errors;
mod gcm;
mod keys;
mod lifecycle;
mod module;
mod recovery;
mod settings;
mod token;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::crypto::rand::{SecureRandom, SystemRandom};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;

pub use errors::{Pkcs11Error, ckr_name};
/// The template every AES-256 key we create uses (also the benchmark's SoftHSM loop).
pub use keys::aes256_template;
pub use settings::{
    IvPolicy, KeyIdAttribute, MAX_TOKENS, Pkcs11Settings, SettingsError, TokenSettings,
};

use self::errors::{Fault, Op};
use self::keys::{KeyInfo, id_attribute_type, id_template};
use self::module::Module;
use self::token::{Counters, Shared, Token, Wake};
// Token selection, shared with the KMS emulator's CloudHSM stand-in clusters.
pub(crate) use self::settings::Selector;
pub(crate) use self::token::{SlotError, find_slot};
use crate::backend::{
    BackendError, CryptoBackend, EkmHealth, KeyMetadata, KeySpec, KeyStatus, KeyUsage, KeyVersion,
    Opening, Sealed, TAG_LEN,
};
use crate::secret::SecretBytes;

/// One key as the admin listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyListing {
    /// The external key id (CKA_LABEL or CKA_ID as text).
    pub id: String,
    pub spec: KeySpec,
    pub usages: Vec<KeyUsage>,
    pub status: KeyStatus,
}

/// Counters exposed for tests and metrics (not a stable API).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pkcs11Stats {
    /// C_FindObjects searches on the request path (key lookups that missed the cache).
    pub find_objects_calls: u64,
    pub sessions_opened: u64,
    /// Times a serving token was declared lost.
    pub token_losses: u64,
    /// Times a lost token came back.
    pub recoveries: u64,
    /// Requests served by a token other than the primary.
    pub failovers: u64,
    /// C_Finalize/C_Initialize cycles of the modules this backend uses (shared with
    /// any other backend on the same module in this process).
    pub module_reinits: u64,
}

/// A test-only key description (see [`Pkcs11Backend::create_test_key`]).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct TestKey<'a> {
    pub id: &'a str,
    pub kind: TestKeyKind,
    pub usages: &'a [KeyUsage],
    /// `CKA_END_DATE` as (year, month, day).
    pub end_date: Option<(u16, u8, u8)>,
    /// Raw key bytes to import into **every** token (the same key on primary and
    /// failover, which non-extractable generated keys cannot be). `None` generates the
    /// key on the primary token only.
    pub material: Option<&'a [u8]>,
    /// `CKA_PRIVATE`. SoftHSM cannot read back a date attribute of a private object
    /// (SoftHSMv2 #804), so tests of readable end dates create public key objects.
    pub private: bool,
}

#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKeyKind {
    Aes { bytes: usize },
    GenericSecret { bytes: usize },
}

/// The PKCS#11 backend. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    monitor: Option<JoinHandle<()>>,
}

struct Inner {
    tokens: Vec<Arc<Token>>,
    shared: Arc<Shared>,
    /// Keys the config lists as disabled; replaced as a whole on reload (SIGHUP).
    disabled: arc_swap::ArcSwap<HashSet<String>>,
    rng: SystemRandom,
}

impl recovery::Tokens for Inner {
    fn tokens(&self) -> &[Arc<Token>] {
        &self.tokens
    }
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("tokens", &self.inner.tokens)
            .field("pool_size", &self.inner.shared.pool_size)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Backend {
    /// Loads the module(s), finds each token by label/serial, logs in, fills the
    /// session pools and starts the recovery thread.
    ///
    /// Fails on invalid settings, an unreadable PIN source, a module that does not
    /// load, an ambiguous token selector, a refused PIN, or when no configured token
    /// can be opened. A failover token that is merely absent starts as UNAVAILABLE and
    /// is recovered in the background.
    pub fn open(settings: &Pkcs11Settings) -> Result<Self, Pkcs11Error> {
        let plans = settings.plan()?;
        let shared = Arc::new(Shared {
            pool_size: settings.pool_size,
            call_deadline: settings.call_deadline(),
            iv_policy: settings.iv_policy,
            key_id_attribute: settings.key_id_attribute,
            attributes_refresh: Duration::from_secs(settings.key_attributes_refresh_secs),
            health_key: settings.health_check_key_label.clone(),
            backoff_max: Duration::from_millis(settings.recovery_backoff_max_ms),
            stats: Counters::default(),
            wake: Wake::default(),
            serving: AtomicBool::new(false),
        });
        let mut tokens = Vec::with_capacity(plans.len());
        let mut first_error: Option<Pkcs11Error> = None;
        // Tokens absent at start, said only once we know the proxy will serve anyway
        // (if none can be opened, the start fails with the first reason, once).
        let mut not_yet = Vec::new();
        for (index, plan) in plans.iter().enumerate() {
            let pin = plan.pin.resolve(&plan.key_prefix)?;
            let module = Module::load(&plan.module)?;
            let token = Arc::new(Token::new(
                index,
                Arc::clone(&module),
                plan.selector.clone(),
                pin,
                Arc::clone(&shared),
            ));
            module.register(&token);
            let guard = module
                .enter_blocking()
                .map_err(|f| Pkcs11Error::Unavailable(f.code()))?;
            if let Err(code) = token.build(guard.ctx(), guard.generation()) {
                if let Some(code) = token.login_refused() {
                    return Err(Pkcs11Error::LoginFailed {
                        token: plan.selector.to_string(),
                        code,
                    });
                }
                // Say precisely why, for the operator.
                let err = match find_slot(guard.ctx(), &plan.selector) {
                    Err(token::SlotError::NotFound) => Pkcs11Error::TokenNotFound {
                        selector: plan.selector.to_string(),
                        module: module.path().to_owned(),
                    },
                    Err(token::SlotError::Ambiguous(count)) => {
                        return Err(Pkcs11Error::AmbiguousToken {
                            selector: plan.selector.to_string(),
                            count,
                            module: module.path().to_owned(),
                        });
                    }
                    Err(token::SlotError::Call(e)) => Pkcs11Error::call(&e),
                    Ok(_) => Pkcs11Error::Unavailable(code.clone()),
                };
                token.build_failed(&code);
                not_yet.push((plan.selector.clone(), err.to_string()));
                first_error.get_or_insert(err);
            }
            drop(guard);
            tokens.push(token);
        }
        if !tokens.iter().any(|t| t.is_up()) {
            return Err(first_error
                .unwrap_or_else(|| Pkcs11Error::Unavailable("no token could be opened".into())));
        }
        for (selector, error) in not_yet {
            tracing::warn!(token = %selector, %error, "PKCS#11 token not available at start; serving with the others and will keep trying");
        }
        let inner = Arc::new(Inner {
            tokens,
            shared: Arc::clone(&shared),
            disabled: arc_swap::ArcSwap::from_pointee(
                settings.disabled_keys.iter().cloned().collect(),
            ),
            rng: SystemRandom::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let monitor = recovery::spawn(Arc::downgrade(&inner), shared, Arc::clone(&stop))
            .map_err(|e| Pkcs11Error::Unavailable(format!("cannot start recovery thread: {e}")))?;
        let backend = Self {
            inner,
            stop,
            monitor: Some(monitor),
        };
        backend.check_disabled_keys(&settings.disabled_keys)?;
        // From here on a refused login is news for the log; before, the start's error
        // said it.
        backend
            .inner
            .shared
            .serving
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(backend)
    }

    /// Every `disabled_keys` entry must name a key on the token: the kill switch of an
    /// incident must not silently miss because of a typo. A token that cannot be asked
    /// right now (down) does not block the list: it applies as written, with a warning.
    fn check_disabled_keys(&self, disabled: &[String]) -> Result<(), Pkcs11Error> {
        if disabled.is_empty() {
            return Ok(());
        }
        let known: HashSet<String> = match self.list_keys() {
            Ok(keys) => keys.into_iter().map(|k| k.id).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check backend.disabled_keys against the token now; applying the list as written");
                return Ok(());
            }
        };
        let unknown: Vec<&str> = disabled
            .iter()
            .filter(|k| !known.contains(*k))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(Pkcs11Error::setting(
            "disabled_keys",
            format!(
                "{} match no key on the token ({} keys there; `xks-proxy keys list` shows them): a disabled-key list with a typo would leave the intended key enabled",
                unknown
                    .iter()
                    .map(|k| format!("'{k}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                known.len()
            ),
        ))
    }

    /// Checks what [`Pkcs11Backend::open`] would check before loading a module: the
    /// settings, that every module file is a readable file, and that every PIN source
    /// can be read. Loads nothing and opens no session.
    pub fn preflight(settings: &Pkcs11Settings) -> Result<(), Pkcs11Error> {
        for plan in settings.plan()? {
            let meta = std::fs::metadata(&plan.module).map_err(|e| Pkcs11Error::ModuleLoad {
                path: plan.module.clone(),
                reason: e.kind().to_string(),
            })?;
            if !meta.is_file() {
                return Err(Pkcs11Error::ModuleLoad {
                    path: plan.module.clone(),
                    reason: "not a regular file".into(),
                });
            }
            plan.pin.resolve(&plan.key_prefix)?;
        }
        Ok(())
    }

    /// Creates a persistent AES-256 key on the primary token: sensitive,
    /// non-extractable, `CKA_LABEL` = `CKA_ID` = `key_id`, with exactly the
    /// CKA_ENCRYPT/DECRYPT/WRAP/UNWRAP/SIGN/VERIFY/DERIVE flags named in `usages`.
    /// Refuses an id already used by any object (by label or by id), and the reserved
    /// health-check label.
    ///
    /// Failover tokens are not written: a non-extractable key cannot be copied, so
    /// replicating it is the HSM cluster's job (Luna HA groups, CloudHSM clusters, nShield
    /// Security World).
    pub fn create_key(&self, key_id: &str, usages: &[KeyUsage]) -> Result<KeyListing, Pkcs11Error> {
        self.check_new_id(key_id)?;
        let token = self.primary_for_admin()?;
        let template = aes256_template(key_id, usages);
        let info = token.with_rw_session(|s| {
            refuse_duplicate(s, key_id)?;
            let handle = s
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(|e| Pkcs11Error::call(&e))?;
            read_info(s, handle)
        })?;
        self.forget(key_id);
        Ok(self.listing(key_id.to_owned(), &info))
    }

    /// Creates the health-check key (AES-256, ENCRYPT+DECRYPT) on every serving token
    /// that lacks it; each token's deep check round-trips with its own. Returns how
    /// many tokens got one.
    pub fn create_health_check_key(&self) -> Result<usize, Pkcs11Error> {
        let Some(label) = self.inner.shared.health_key.clone() else {
            return Err(Pkcs11Error::setting(
                "health_check_key_label",
                "no health-check key is configured",
            ));
        };
        let template = aes256_template(&label, &[KeyUsage::Encrypt, KeyUsage::Decrypt]);
        let mut created = 0;
        for t in self.inner.tokens.iter().filter(|t| t.is_up()) {
            let made = t.with_rw_session(|s| {
                if !s
                    .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
                    .map_err(|e| Pkcs11Error::call(&e))?
                    .is_empty()
                {
                    return Ok(false);
                }
                s.generate_key(&Mechanism::AesKeyGen, &template)
                    .map_err(|e| Pkcs11Error::call(&e))?;
                Ok(true)
            })?;
            if made {
                created += 1;
                t.evict(&label);
            }
        }
        Ok(created)
    }

    /// The secret keys on the primary token (or the first serving one), sorted by id;
    /// the health-check key is left out.
    pub fn list_keys(&self) -> Result<Vec<KeyListing>, Pkcs11Error> {
        let token = self
            .inner
            .tokens
            .iter()
            .find(|t| t.is_up())
            .ok_or_else(|| Pkcs11Error::Unavailable(self.inner.tokens[0].down_code()))?;
        let id_attr = id_attribute_type(self.inner.shared.key_id_attribute);
        let found = token.with_rw_session(|s| {
            let handles = s
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(|e| Pkcs11Error::call(&e))?;
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                let attrs = s
                    .get_attributes(h, &[id_attr])
                    .map_err(|e| Pkcs11Error::call(&e))?;
                let id = attrs.iter().find_map(|a| match a {
                    Attribute::Label(v) | Attribute::Id(v) => {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                });
                if let Some(id) = id.filter(|i| !i.is_empty()) {
                    out.push((id, read_info(s, h)?));
                }
            }
            Ok(out)
        })?;
        let mut listing: Vec<KeyListing> = found
            .into_iter()
            .filter(|(id, _)| Some(id) != self.inner.shared.health_key.as_ref())
            .map(|(id, info)| self.listing(id, &info))
            .collect();
        listing.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(listing)
    }

    /// Counters (not a stable API).
    #[doc(hidden)]
    pub fn stats(&self) -> Pkcs11Stats {
        let c = &self.inner.shared.stats;
        let mut modules: Vec<&Arc<Module>> = Vec::new();
        for t in &self.inner.tokens {
            if !modules.iter().any(|m| Arc::ptr_eq(m, &t.module)) {
                modules.push(&t.module);
            }
        }
        Pkcs11Stats {
            find_objects_calls: c.find_objects.load(Ordering::Relaxed),
            sessions_opened: c.sessions_opened.load(Ordering::Relaxed),
            token_losses: c.token_losses.load(Ordering::Relaxed),
            recoveries: c.recoveries.load(Ordering::Relaxed),
            failovers: c.failovers.load(Ordering::Relaxed),
            module_reinits: modules.iter().map(|m| m.reinits()).sum(),
        }
    }

    /// Creates a key for tests: AES of any size or a generic secret, any usages, an
    /// optional end date, generated on the primary or imported from raw bytes into
    /// every token. **Tests only**: importing raw material defeats the purpose of an
    /// HSM, so nothing outside tests may call this.
    #[doc(hidden)]
    pub fn create_test_key(&self, key: &TestKey<'_>) -> Result<(), Pkcs11Error> {
        crate::key_id::check(key.id).map_err(|reason| Pkcs11Error::InvalidKeyId {
            id: key.id.to_owned(),
            reason: reason.into(),
        })?;
        let (key_type, bytes, mechanism) = match key.kind {
            TestKeyKind::Aes { bytes } => (KeyType::AES, bytes, Mechanism::AesKeyGen),
            TestKeyKind::GenericSecret { bytes } => (
                KeyType::GENERIC_SECRET,
                bytes,
                Mechanism::GenericSecretKeyGen,
            ),
        };
        let mut template: Vec<Attribute> = aes256_template(key.id, key.usages)
            .into_iter()
            .filter(|a| {
                !matches!(
                    a.attribute_type(),
                    AttributeType::KeyType | AttributeType::ValueLen
                )
            })
            .collect();
        template.retain(|a| a.attribute_type() != AttributeType::Private);
        template.push(Attribute::Private(key.private));
        template.push(Attribute::KeyType(key_type));
        if let Some((y, m, d)) = key.end_date {
            let date = cryptoki::types::Date::new_from_str_slice(
                &format!("{y:04}"),
                &format!("{m:02}"),
                &format!("{d:02}"),
            )
            .map_err(|e| Pkcs11Error::call(&e))?;
            template.push(Attribute::EndDate(date));
        }
        match key.material {
            Some(material) => {
                template.push(Attribute::Value(material.to_vec()));
                for t in &self.inner.tokens {
                    t.with_rw_session(|s| {
                        refuse_duplicate(s, key.id)?;
                        s.create_object(&template)
                            .map_err(|e| Pkcs11Error::call(&e))
                    })?;
                }
            }
            None => {
                template.push(Attribute::ValueLen(
                    bytes
                        .try_into()
                        .map_err(|_| Pkcs11Error::setting("bytes", "too large"))?,
                ));
                self.primary_for_admin()?.with_rw_session(|s| {
                    refuse_duplicate(s, key.id)?;
                    s.generate_key(&mechanism, &template)
                        .map_err(|e| Pkcs11Error::call(&e))
                })?;
            }
        }
        self.forget(key.id);
        Ok(())
    }

    fn check_new_id(&self, key_id: &str) -> Result<(), Pkcs11Error> {
        crate::key_id::check(key_id).map_err(|reason| Pkcs11Error::InvalidKeyId {
            id: key_id.to_owned(),
            reason: reason.into(),
        })?;
        if self.is_health_key(key_id) {
            return Err(Pkcs11Error::InvalidKeyId {
                id: key_id.to_owned(),
                reason: "reserved for the health check (see create_health_check_key)".into(),
            });
        }
        Ok(())
    }

    fn primary_for_admin(&self) -> Result<&Arc<Token>, Pkcs11Error> {
        let primary = &self.inner.tokens[0];
        if !primary.is_up() {
            return Err(Pkcs11Error::Unavailable(primary.down_code()));
        }
        Ok(primary)
    }

    fn forget(&self, key_id: &str) {
        for t in &self.inner.tokens {
            t.evict(key_id);
        }
    }

    fn listing(&self, id: String, info: &KeyInfo) -> KeyListing {
        let status = self.status(&id, info);
        KeyListing {
            spec: info.spec(),
            usages: info.usages.clone(),
            status,
            id,
        }
    }

    fn is_health_key(&self, key_id: &str) -> bool {
        self.inner.shared.health_key.as_deref() == Some(key_id)
    }

    fn status(&self, key_id: &str, info: &KeyInfo) -> KeyStatus {
        if self.inner.disabled.load().contains(key_id) || info.expired(today()) {
            KeyStatus::Disabled
        } else {
            KeyStatus::Enabled
        }
    }

    /// Enabled, allows `usage`, and is AES-256; checked from the attributes before the
    /// HSM is asked (its refusal codes differ by vendor; some do not refuse at all).
    fn admit(&self, key_id: &str, info: &KeyInfo, usage: KeyUsage) -> Result<(), Fault> {
        if self.status(key_id, info) == KeyStatus::Disabled {
            return Err(Fault::Final(BackendError::KeyDisabled));
        }
        if !info.allows(usage) || !info.is_aes256() {
            return Err(Fault::Final(BackendError::UsageNotAllowed(usage)));
        }
        Ok(())
    }

    /// Runs `op` on the first serving token, moving to the next one when a token is
    /// lost under it. With none left: `Unavailable` naming the primary's failure.
    fn route<T>(
        &self,
        deadline: Instant,
        mut op: impl FnMut(&Token, Instant) -> Result<T, Fault>,
    ) -> Result<T, BackendError> {
        let mut first_failure: Option<Fault> = None;
        for t in &self.inner.tokens {
            if !t.is_up() {
                first_failure.get_or_insert_with(|| Fault::TokenLost(t.down_code()));
                continue;
            }
            match op(t, deadline) {
                Ok(v) => {
                    if t.index > 0 {
                        self.inner
                            .shared
                            .stats
                            .failovers
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(lost @ Fault::TokenLost(_)) => {
                    first_failure.get_or_insert(lost);
                }
                Err(other) => return Err(other.into_backend_error()),
            }
        }
        Err(first_failure
            .map(Fault::into_backend_error)
            .unwrap_or_else(|| BackendError::Unavailable("no PKCS#11 token configured".into())))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.shared.call_deadline
    }

    /// The deep check of one token: AES-GCM encrypt + decrypt of random bytes with the
    /// health-check key. Without a configured key: C_GetTokenInfo only.
    fn deep_check(&self, t: &Token) -> Result<(), Fault> {
        let deadline = Instant::now() + self.inner.shared.call_deadline.max(Duration::from_secs(1));
        let Some(label) = self.inner.shared.health_key.as_deref() else {
            return t.shallow_check();
        };
        let mut probe = [0u8; 32];
        self.inner
            .rng
            .fill(&mut probe)
            .map_err(|_| Fault::Final(BackendError::Failed("system RNG failed".into())))?;
        let aad = b"xks-proxy deep health check";
        let result = t.with_key(label, deadline, |ctx, key| {
            if !key.info.is_aes256()
                || !key.info.allows(KeyUsage::Encrypt)
                || !key.info.allows(KeyUsage::Decrypt)
            {
                return Err(Fault::Final(BackendError::UsageNotAllowed(
                    KeyUsage::Encrypt,
                )));
            }
            let sealed = gcm::encrypt(
                ctx.session(),
                key.handle,
                ctx.iv_policy(),
                &self.inner.rng,
                &probe,
                aad,
            )?;
            let opened = gcm::decrypt(
                ctx.session(),
                key.handle,
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
                aad,
            )?;
            if opened.expose() != probe {
                return Err(Fault::Final(BackendError::Failed(
                    "health round trip returned different bytes".into(),
                )));
            }
            Ok(())
        });
        if let Err(f) = &result {
            tracing::warn!(token = %t.selector, failure = %f.clone().code(), "PKCS#11 deep health check failed");
        }
        result
    }
}

impl Drop for Pkcs11Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.inner.shared.wake.notify();
        if let Some(h) = self.monitor.take()
            && h.join().is_err()
        {
            tracing::error!("PKCS#11 recovery thread panicked");
        }
        // The tokens close their sessions when the last reference goes (Token::drop).
    }
}

fn refuse_duplicate(s: &Session, key_id: &str) -> Result<(), Pkcs11Error> {
    for attr in [
        settings::KeyIdAttribute::Label,
        settings::KeyIdAttribute::Id,
    ] {
        let found = s
            .find_objects(&id_template(attr, key_id))
            .map_err(|e| Pkcs11Error::call(&e))?;
        if !found.is_empty() {
            return Err(Pkcs11Error::DuplicateKey(key_id.to_owned()));
        }
    }
    Ok(())
}

fn read_info(s: &Session, handle: cryptoki::object::ObjectHandle) -> Result<KeyInfo, Pkcs11Error> {
    keys::read_key_info(s, handle).map_err(|e| Pkcs11Error::call(&e))
}

fn today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}

/// The live part of new PKCS#11 settings, read and checked by a reload's first phase:
/// the PIN of each token that stays where it is, and the disabled-key list (every entry
/// names a key on the token). Not yet applied.
pub struct PreparedSettings {
    /// (index into the backend's tokens, its PIN).
    pins: Vec<(usize, crate::secret::SecretString)>,
    disabled: HashSet<String>,
}

impl std::fmt::Debug for PreparedSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // PINs are secrets: only how many.
        f.debug_struct("PreparedSettings")
            .field("pins", &self.pins.len())
            .field("disabled", &self.disabled.len())
            .finish()
    }
}

impl Pkcs11Backend {
    /// Phase 1 of a reload: every PIN read and the disabled-key list checked against
    /// the token before anything changes, so a reload that cannot read one applies
    /// nothing (the reloader then keeps the whole old config).
    fn prepare_settings(&self, settings: &Pkcs11Settings) -> Result<PreparedSettings, Pkcs11Error> {
        let plans = settings.plan()?;
        let mut pins = Vec::new();
        for (i, (token, plan)) in self.inner.tokens.iter().zip(&plans).enumerate() {
            // A changed token list makes another backend identity, which the reloader
            // opens anew (`config::reload::split_backend`); here only the same token at
            // the same place gets a new PIN.
            if token.selector == plan.selector {
                pins.push((i, plan.pin.resolve(&plan.key_prefix)?));
            }
        }
        self.check_disabled_keys(&settings.disabled_keys)?;
        Ok(PreparedSettings {
            pins,
            disabled: settings.disabled_keys.iter().cloned().collect(),
        })
    }

    /// Phase 2: the checked PINs and list swapped in (a lock and a pointer swap).
    fn apply_settings(&self, PreparedSettings { pins, disabled }: PreparedSettings) {
        for (i, pin) in pins {
            self.inner.tokens[i].replace_pin(pin);
        }
        tracing::info!(count = disabled.len(), "PKCS#11 disabled-key list reloaded");
        self.inner.disabled.store(Arc::new(disabled));
    }
}

impl CryptoBackend for Pkcs11Backend {
    fn prepare_reload(
        &self,
        config: Option<&crate::config::BackendConfig>,
    ) -> Result<crate::backend::PreparedReload, BackendError> {
        #[allow(irrefutable_let_patterns)]
        let Some(crate::config::BackendConfig::Pkcs11(settings)) = config else {
            return Ok(crate::backend::PreparedReload::Nothing);
        };
        self.prepare_settings(settings)
            .map(crate::backend::PreparedReload::Pkcs11)
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn commit_reload(&self, prepared: crate::backend::PreparedReload) {
        match prepared {
            crate::backend::PreparedReload::Pkcs11(p) => self.apply_settings(p),
            crate::backend::PreparedReload::Nothing => {}
            crate::backend::PreparedReload::Software(_) => {
                debug_assert!(false, "a software reload committed to a PKCS#11 backend");
            }
        }
    }

    fn key_metadata(&self, key: &str) -> Result<KeyMetadata, BackendError> {
        if self.is_health_key(key) {
            return Err(BackendError::KeyNotFound);
        }
        let info = self.route(self.deadline(), |t, deadline| {
            t.with_key(key, deadline, |ctx, cached| {
                // Metadata is read fresh (by handle, no search): KMS asks it at
                // CreateKey, when an operator may just have changed the key.
                keys::read_key_info(ctx.session(), cached.handle)
                    .map_err(|e| errors::classify(&e, Op::Lookup))
            })
        })?;
        Ok(KeyMetadata {
            spec: info.spec(),
            usages: info.usages.clone(),
            status: self.status(key, &info),
        })
    }

    fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        aad: &dyn Fn(KeyVersion) -> Vec<u8>,
    ) -> Result<Sealed, BackendError> {
        if self.is_health_key(key) {
            return Err(BackendError::KeyNotFound);
        }
        // PKCS#11 keys have one version.
        let aad = aad(0);
        self.route(self.deadline(), |t, deadline| {
            t.with_key(key, deadline, |ctx, cached| {
                self.admit(key, &cached.info, KeyUsage::Encrypt)?;
                gcm::encrypt(
                    ctx.session(),
                    cached.handle,
                    ctx.iv_policy(),
                    &self.inner.rng,
                    plaintext,
                    &aad,
                )
            })
        })
    }

    fn decrypt(&self, key: &str, opening: Opening<'_>) -> Result<SecretBytes, BackendError> {
        if self.is_health_key(key) {
            return Err(BackendError::KeyNotFound);
        }
        self.route(self.deadline(), |t, deadline| {
            t.with_key(key, deadline, |ctx, cached| {
                self.admit(key, &cached.info, KeyUsage::Decrypt)?;
                if opening.key_version != 0
                    || !matches!(opening.iv.len(), 12 | 16)
                    || opening.tag.len() != TAG_LEN
                {
                    return Err(Fault::Final(BackendError::InvalidCiphertext));
                }
                gcm::decrypt(
                    ctx.session(),
                    cached.handle,
                    opening.iv,
                    opening.ciphertext,
                    opening.tag,
                    opening.aad,
                )
            })
        })
    }

    fn health(&self) -> Vec<EkmHealth> {
        self.inner
            .tokens
            .iter()
            .take(MAX_TOKENS)
            .map(|t| t.health(|t| self.deep_check(t)))
            .collect()
    }

    fn ekm_vendor(&self) -> String {
        self.inner
            .tokens
            .iter()
            .find_map(|t| t.ident())
            .map(|i| format!("{} (PKCS#11)", i.manufacturer))
            .unwrap_or_else(|| "PKCS#11 HSM".into())
    }

    fn may_block(&self) -> bool {
        true
    }

    fn concurrency(&self) -> usize {
        self.inner.shared.pool_size
    }
}
