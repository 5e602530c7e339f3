//! One token (primary or failover): its bounded pool of logged-in sessions, its
//! key-handle cache, its lifecycle, and the retry rules of one operation.
//!
//! Concurrency model:
//! - A session is used by one thread at a time: [`Lease`] takes it out of the pool
//!   and puts it back on drop. The pool is a `Mutex<Vec<_>>` + `Condvar`, bounded at
//!   `pool_size`; waiting for a session is bounded by the call deadline (then `Busy`).
//! - Object handles of token objects are valid in every session of the application
//!   (PKCS#11 §2.4), so the handle cache is per token, not per session: one
//!   C_FindObjects per key per token per (re)initialisation, never on the hot path.
//!   Entries carry the module generation they were found in and are evicted on
//!   CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID.
//! - Whether the token serves is its [`TokenLifecycle`]: two atomics read by every
//!   request before touching the token, so a lost token fails (or fails over) at once
//!   instead of making each request rediscover it. Every change of that state goes
//!   through a lifecycle transition; this file performs the transition's effect (log,
//!   counter, wake) after the lifecycle's lock is released.
//! - Every PKCS#11 call runs under a [`ModuleGuard`] (see `module.rs`); a lease
//!   borrows the guard, so no session outlives the generation it belongs to.
//!
//! Sessions are opened with "no close on drop" and closed explicitly, only in their own
//! generation: after a C_Finalize/C_Initialize the library may hand out the same
//! handle numbers again, and closing a stale handle would close a stranger's session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use cryptoki::types::AuthPin;

use super::errors::{Fault, Op, ckr_name, classify, error_code};
use super::keys::{KeyInfo, choose, id_template, read_key_info};
use super::lifecycle::{Due, Effect, Ticket, TokenLifecycle};
use super::module::{Exclusive, Module, ModuleGuard};
use super::settings::{IvPolicy, KeyIdAttribute, Selector};
use crate::backend::{BackendError, EkmHealth};
use crate::secret::SecretString;

/// Settings every token of a backend shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub pool_size: usize,
    pub call_deadline: Duration,
    pub iv_policy: IvPolicy,
    pub key_id_attribute: KeyIdAttribute,
    pub attributes_refresh: Duration,
    pub health_key: Option<String>,
    pub backoff_max: Duration,
    pub stats: Counters,
    /// Wakes the recovery thread when a token goes down.
    pub wake: Wake,
    /// The backend finished opening: failures are now the log's to report (during
    /// the start, the start's own error reports them, once).
    pub serving: AtomicBool,
}

impl Shared {
    /// How long a request may wait for a module re-initialisation to finish before
    /// failing: a quarter of its budget, so a failover token can still answer.
    pub(crate) fn module_wait(&self) -> Duration {
        (self.call_deadline / 4).min(Duration::from_millis(100))
    }
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub find_objects: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub token_losses: AtomicU64,
    pub recoveries: AtomicU64,
    pub failovers: AtomicU64,
}

/// A flag + condvar the recovery thread sleeps on.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    pub flag: Mutex<bool>,
    pub cv: Condvar,
}

impl Wake {
    pub(crate) fn notify(&self) {
        *self.flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }
}

/// What C_GetTokenInfo said about the token, kept for health and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenIdent {
    pub label: String,
    pub serial: String,
    pub model: String,
    pub manufacturer: String,
    pub firmware: String,
}

impl TokenIdent {
    fn from_info(info: &TokenInfo) -> Self {
        let fw = info.firmware_version();
        Self {
            label: info.label().trim().to_owned(),
            serial: info.serial_number().trim().to_owned(),
            model: info.model().trim().to_owned(),
            manufacturer: info.manufacturer_id().trim().to_owned(),
            firmware: format!("{}.{}", fw.major(), fw.minor()),
        }
    }
}

struct PooledSession {
    session: Session,
    generation: u64,
    epoch: u64,
}

struct PoolInner {
    idle: Vec<PooledSession>,
    /// Sessions of the current epoch, idle or leased.
    open: usize,
    /// Bumped by every teardown: leased sessions of an older epoch are closed on
    /// return instead of rejoining the pool. A validity stamp owned by the pool (it
    /// guards `open`'s accounting); the lifecycle records the epoch it serves in.
    epoch: u64,
}

/// A cached key: its handle and attributes, found in `generation` (a validity stamp:
/// an entry from an older module generation is a lookup that raced a
/// re-initialisation, and is looked up again).
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub handle: ObjectHandle,
    pub info: KeyInfo,
    generation: u64,
    fetched: Instant,
}

/// One token (primary or failover).
pub(crate) struct Token {
    pub index: usize,
    pub module: Arc<Module>,
    pub selector: Selector,
    /// The user PIN. Replaced by a reload (the operator rotated it on the HSM and in
    /// the PIN source); read at every login.
    pin: Mutex<SecretString>,
    shared: Arc<Shared>,
    /// Serving, lost, refused or not ready; see `lifecycle.rs`.
    lifecycle: TokenLifecycle,
    pool: Mutex<PoolInner>,
    pool_cv: Condvar,
    keys: RwLock<HashMap<String, Arc<CachedKey>>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("index", &self.index)
            .field("selector", &self.selector)
            .field("serving", &self.lifecycle.is_serving())
            .finish_non_exhaustive()
    }
}

/// A session taken from the pool; goes back on drop (or is closed if broken/stale).
pub(crate) struct Lease<'g> {
    token: &'g Token,
    guard: &'g ModuleGuard<'g>,
    s: Option<PooledSession>,
    broken: bool,
}

impl Lease<'_> {
    pub(crate) fn session(&self) -> &Session {
        match &self.s {
            Some(s) => &s.session,
            // `s` is only taken in `drop`.
            None => unreachable!("lease used after drop"),
        }
    }

    /// The session must not be reused (lost, or stuck in an operation).
    pub(crate) fn discard(mut self) {
        self.broken = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(s) = self.s.take() else { return };
        let mut pool = self
            .token
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current_epoch = s.epoch == pool.epoch;
        let same_generation = s.generation == self.guard.generation();
        if !self.broken && current_epoch && same_generation {
            pool.idle.push(s);
            drop(pool);
            self.token.pool_cv.notify_one();
            return;
        }
        if current_epoch {
            pool.open = pool.open.saturating_sub(1);
        }
        drop(pool);
        self.token.pool_cv.notify_one();
        if same_generation {
            // Still a live handle in this generation: close it. Errors (already
            // closed, token gone) change nothing.
            let _ = s.session.close();
        }
        // Otherwise the handle died with its generation: forget it, never close it.
    }
}

impl Token {
    pub(crate) fn new(
        index: usize,
        module: Arc<Module>,
        selector: Selector,
        pin: SecretString,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            index,
            module,
            selector,
            pin: Mutex::new(pin),
            shared,
            lifecycle: TokenLifecycle::default(),
            pool: Mutex::new(PoolInner {
                idle: Vec::new(),
                open: 0,
                epoch: 0,
            }),
            pool_cv: Condvar::new(),
            keys: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.lifecycle.is_serving()
    }

    /// What the recovery thread should do with this token now.
    pub(crate) fn due(&self) -> Due {
        self.lifecycle.due(Instant::now())
    }

    /// How long until the next recovery attempt of a token that is down.
    pub(crate) fn retry_in(&self) -> Option<Duration> {
        self.lifecycle.retry_in(Instant::now())
    }

    /// The code of the current outage, if the token is down.
    pub(crate) fn outage_code(&self) -> Option<String> {
        self.lifecycle.outage_code()
    }

    /// Whether the token was ever built since start.
    pub(crate) fn ever_served(&self) -> bool {
        self.lifecycle.ever_served()
    }

    /// Performs a transition's effect, with the lifecycle's lock released.
    fn perform(&self, effect: Effect, code: &str) {
        match effect {
            Effect::None => {}
            Effect::NewLoss => {
                tracing::warn!(
                    token = %self.selector,
                    module = %self.module.path().display(),
                    code,
                    "PKCS#11 token lost; failing over / recovering"
                );
                self.shared
                    .stats
                    .token_losses
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.wake.notify();
            }
            Effect::Recovered { after } => {
                self.shared.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    token = %self.selector,
                    after_ms = after.as_millis() as u64,
                    "PKCS#11 token recovered"
                );
            }
            Effect::Wake => self.shared.wake.notify(),
        }
    }

    fn login_pin(&self) -> AuthPin {
        AuthPin::from(
            self.pin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .expose(),
        )
    }

    /// A reload re-read the PIN source. A different PIN replaces the one logins use;
    /// if the old one had been refused, the token is retried at once (one login
    /// attempt). The same PIN after a refusal is not tried again: each refused login
    /// counts towards locking the token, and a reload is not a reason to spend one.
    pub(crate) fn replace_pin(&self, pin: SecretString) {
        let changed = {
            let mut current = self.pin.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = !bool::from(subtle::ConstantTimeEq::ct_eq(
                current.expose().as_bytes(),
                pin.expose().as_bytes(),
            ));
            if changed {
                *current = pin;
            }
            changed
        };
        let Some(code) = self.lifecycle.refusal() else {
            if changed {
                tracing::info!(token = %self.selector, "PKCS#11 user PIN replaced; new sessions log in with it");
            }
            return;
        };
        if !changed {
            tracing::warn!(token = %self.selector, %code, "PKCS#11 login was refused and the reloaded PIN is the same one; not retrying (would lock the token)");
            return;
        }
        let effect = self.lifecycle.pin_changed(Instant::now());
        tracing::info!(token = %self.selector, "PKCS#11 user PIN replaced after a refused login; logging in again");
        self.perform(effect, &code);
    }

    /// The refused login's code, if C_Login refused the PIN (cleared only by a
    /// reload that brings a different PIN, or a restart).
    pub(crate) fn login_refused(&self) -> Option<String> {
        self.lifecycle.refusal()
    }

    pub(crate) fn ident(&self) -> Option<TokenIdent> {
        self.lifecycle.ident()
    }

    /// Why this token is not serving, as a code name.
    pub(crate) fn down_code(&self) -> String {
        self.lifecycle.down_code()
    }

    /// Marks the token lost: requests stop using it at once, and the recovery thread
    /// is woken to rebuild it. `ticket` is what the reporter entered the token with.
    /// Only [`Token::settle`] calls it: that is where "lost" is decided.
    fn mark_down(&self, ticket: Ticket, code: &str) {
        let effect = self.lifecycle.lost(ticket, code, Instant::now());
        self.perform(effect, code);
    }

    /// Schedules the next recovery attempt with exponential backoff (100 ms doubling,
    /// capped at `recovery_backoff_max_ms`), recording the latest failure code.
    pub(crate) fn attempt_failed(&self, code: &str) {
        self.lifecycle
            .attempt_failed(code, self.shared.backoff_max, Instant::now());
    }

    // ---------------------------------------------------------------- build / teardown

    /// Drops the pool and the handle cache. Idle sessions of `generation` are closed;
    /// leased ones are closed by their holders on return (their epoch is now old).
    fn teardown_with(&self, ctx: &Pkcs11, generation: u64) {
        let _ = ctx; // sessions carry their own context handle
        let idle = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            pool.epoch += 1;
            pool.open = 0;
            std::mem::take(&mut pool.idle)
        };
        self.pool_cv.notify_all();
        for s in idle {
            if s.generation == generation {
                let _ = s.session.close();
            }
        }
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Teardown during a module re-initialisation (write lock held by the caller).
    ///
    /// Healthy tokens sharing the module are only paused here (no "lost" record): they
    /// are rebuilt before the write lock is released.
    ///
    /// The lifecycle is left as it is: requests already wait on the module lock
    /// (briefly), and a token rebuilt before the lock is released never looks down to
    /// them. A token that fails to rebuild is marked down then.
    pub(crate) fn teardown(&self, ex: &Exclusive<'_>) {
        self.teardown_with(ex.ctx, ex.generation);
    }

    /// Rebuild during a module re-initialisation (write lock held by the caller). A
    /// failure leaves the token down for the recovery thread.
    pub(crate) fn rebuild_exclusive(&self, ex: &Exclusive<'_>) -> Result<(), String> {
        if let Some(code) = self.login_refused() {
            return Err(code);
        }
        self.build(ex.ctx, ex.generation)
            .inspect_err(|code| self.build_failed(code))
    }

    /// Records the token as down with `code` without counting a new loss (a start, or
    /// a re-initialisation, could not bring it up).
    pub(crate) fn build_failed(&self, code: &str) {
        self.lifecycle.build_failed(code, Instant::now());
    }

    /// Light recovery: new sessions in the current module generation, without
    /// finalizing the module (enough after a session-level loss or an HSM restart that
    /// kept the library's state valid).
    pub(crate) fn rebuild(&self, guard: &ModuleGuard<'_>) -> Result<(), String> {
        self.teardown_with(guard.ctx(), guard.generation());
        self.build(guard.ctx(), guard.generation())
    }

    /// Finds the slot, opens `pool_size` sessions, logs in, and marks the token up.
    /// Returns the failure as a code name; a refused PIN is recorded as permanent.
    pub(crate) fn build(&self, ctx: &Pkcs11, generation: u64) -> Result<(), String> {
        let (slot, ident) = find_slot(ctx, &self.selector).map_err(|e| e.code())?;
        let mut sessions = Vec::with_capacity(self.shared.pool_size);
        let epoch = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch;
        let close_all = |sessions: Vec<PooledSession>| {
            for s in sessions {
                let _ = s.session.close();
            }
        };
        for _ in 0..self.shared.pool_size {
            match self.open_session(ctx, slot) {
                Ok(session) => sessions.push(PooledSession {
                    session,
                    generation,
                    epoch,
                }),
                Err(code) => {
                    close_all(sessions);
                    return Err(code);
                }
            }
        }
        {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.epoch != epoch {
                // Torn down again while we built: these sessions belong to nobody.
                drop(pool);
                close_all(sessions);
                return Err("token torn down during rebuild".into());
            }
            pool.open = sessions.len();
            pool.idle = sessions;
        }
        self.pool_cv.notify_all();
        let effect = self
            .lifecycle
            .built(generation, epoch, slot, ident, Instant::now());
        self.perform(effect, "");
        Ok(())
    }

    fn open_session(&self, ctx: &Pkcs11, slot: Slot) -> Result<Session, String> {
        // Read-only sessions: the request path never writes, and some HSMs cap
        // read/write sessions far lower than read-only ones.
        let session = ctx
            .open_ro_session_no_drop(slot)
            .map_err(|e| error_code(&e))?;
        self.shared
            .stats
            .sessions_opened
            .fetch_add(1, Ordering::Relaxed);
        // Login state is per token per application: the first session logs in, the
        // others get CKR_USER_ALREADY_LOGGED_IN, which is success.
        let pin = self.login_pin();
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => {
                let code = error_code(&e);
                let _ = session.close();
                if let CkError::Pkcs11(
                    RvError::PinIncorrect
                    | RvError::PinLocked
                    | RvError::PinExpired
                    | RvError::PinInvalid
                    | RvError::PinLenRange
                    | RvError::UserPinNotInitialized,
                    _,
                ) = e
                {
                    if self.shared.serving.load(Ordering::Acquire) {
                        tracing::error!(token = %self.selector, %code, "PKCS#11 login refused; not retrying (would lock the token)");
                    }
                    let effect = self.lifecycle.login_refused(&code, Instant::now());
                    self.perform(effect, &code);
                }
                Err(code)
            }
        }
    }

    // ---------------------------------------------------------------- request path

    /// Runs `f` on a leased session with the key `key_id`, applying the retry rules:
    /// a stale handle is looked up again once, a lost session is replaced once, and
    /// every other failure goes to [`Token::settle`], which alone decides whether the
    /// token is lost (the caller then fails over). `f` sees the cached key and decides
    /// (usage, status) before doing crypto.
    pub(crate) fn with_key<T>(
        &self,
        key_id: &str,
        deadline: Instant,
        mut f: impl FnMut(&OpCtx<'_>, &CachedKey) -> Result<T, Fault>,
    ) -> Result<T, Fault> {
        let (guard, ticket) = self.enter()?;
        let mut lease = self.checkout_or_mark(&guard, ticket, deadline)?;
        let mut stale_retry = true;
        let mut session_retry = true;
        loop {
            let step = self.key(&guard, &lease, key_id).and_then(|key| match key {
                Some(key) => {
                    let ctx = OpCtx {
                        token: self,
                        lease: &lease,
                    };
                    f(&ctx, &key)
                }
                // FindObjects found nothing. On a vanished SoftHSM token that is also
                // what a search says: "no such key" only if the token still answers.
                None => Err(Fault::Suspect(BackendError::KeyNotFound)),
            });
            let fault = match step {
                Ok(v) => return Ok(v),
                Err(fault) => fault,
            };
            match fault {
                Fault::StaleHandle if stale_retry => {
                    stale_retry = false;
                    self.evict(key_id);
                }
                Fault::StaleHandle => {
                    // Stale again right after a fresh lookup: the key vanished between
                    // search and use, or the token did.
                    self.evict(key_id);
                    let suspect = Fault::Suspect(BackendError::KeyNotFound);
                    return Err(self.settle(&guard, ticket, Some(lease), suspect));
                }
                Fault::SessionLost(code) if session_retry => {
                    session_retry = false;
                    tracing::debug!(token = %self.selector, %code, "PKCS#11 session lost; retrying on a fresh one");
                    lease.discard();
                    lease = self.checkout_or_mark(&guard, ticket, deadline)?;
                }
                fault @ (Fault::Final(_)
                | Fault::Suspect(_)
                | Fault::SessionLost(_)
                | Fault::TokenLost(_)) => {
                    return Err(self.settle(&guard, ticket, Some(lease), fault));
                }
            }
        }
    }

    /// The one place that decides whether the token is lost, and the only caller of
    /// the lifecycle's `lost`: a `Suspect` outcome stands if C_GetTokenInfo still
    /// answers, else the token is lost; a `TokenLost` (or a session lost again after
    /// its one retry) is a lost token; anything else passes through. A lost token's
    /// session is discarded (never returned to the pool).
    fn settle(
        &self,
        guard: &ModuleGuard<'_>,
        ticket: Ticket,
        lease: Option<Lease<'_>>,
        fault: Fault,
    ) -> Fault {
        let code = match fault {
            Fault::Suspect(outcome) => match self.confirm_alive(guard) {
                Ok(()) => return Fault::Final(outcome),
                Err(code) => code,
            },
            Fault::SessionLost(code) | Fault::TokenLost(code) => code,
            passed @ (Fault::Final(_) | Fault::StaleHandle) => return passed,
        };
        if let Some(lease) = lease {
            lease.discard();
        }
        self.mark_down(ticket, &code);
        Fault::TokenLost(code)
    }

    /// A module guard for this token and the ticket a loss report must carry, or a
    /// `TokenLost` if the token is down or its pool belongs to an older module
    /// generation (recovery will rebuild it). Two atomic loads: no lock of the token's.
    fn enter(&self) -> Result<(ModuleGuard<'_>, Ticket), Fault> {
        if !self.is_up() {
            return Err(Fault::TokenLost(self.down_code()));
        }
        let guard = self.module.enter(self.shared.module_wait())?;
        match self.lifecycle.ticket() {
            Some(ticket) if ticket.generation == guard.generation() => Ok((guard, ticket)),
            Some(_) | None => Err(Fault::TokenLost(self.down_code())),
        }
    }

    /// [`Token::checkout`], with a failure to open a session settled (so a token on
    /// which no session can be opened is lost, and the next requests fail over at
    /// once instead of trying again).
    fn checkout_or_mark<'g>(
        &'g self,
        guard: &'g ModuleGuard<'g>,
        ticket: Ticket,
        deadline: Instant,
    ) -> Result<Lease<'g>, Fault> {
        self.checkout(guard, deadline)
            .map_err(|fault| self.settle(guard, ticket, None, fault))
    }

    /// Takes an idle session, waiting until `deadline` (then `Busy`).
    fn checkout<'g>(
        &'g self,
        guard: &'g ModuleGuard<'g>,
        deadline: Instant,
    ) -> Result<Lease<'g>, Fault> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while let Some(s) = pool.idle.pop() {
                if s.generation == guard.generation() {
                    return Ok(Lease {
                        token: self,
                        guard,
                        s: Some(s),
                        broken: false,
                    });
                }
                // From a dead generation: forget without closing.
                pool.open = pool.open.saturating_sub(1);
            }
            if pool.open < self.shared.pool_size {
                // Refill a slot freed by a discarded session.
                pool.open += 1;
                let epoch = pool.epoch;
                drop(pool);
                let slot = self.lifecycle.slot();
                let opened = match slot {
                    Some(slot) => self.open_session(guard.ctx(), slot),
                    None => Err(ckr_name(RvError::TokenNotPresent)),
                };
                match opened {
                    Ok(session) => {
                        return Ok(Lease {
                            token: self,
                            guard,
                            s: Some(PooledSession {
                                session,
                                generation: guard.generation(),
                                epoch,
                            }),
                            broken: false,
                        });
                    }
                    Err(code) => {
                        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
                        if pool.epoch == epoch {
                            pool.open = pool.open.saturating_sub(1);
                        }
                        return Err(Fault::TokenLost(code));
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Fault::Final(BackendError::Busy));
            }
            pool = self
                .pool_cv
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The cached key, or a fresh lookup (the only C_FindObjects on the request path,
    /// once per key per token generation). Attributes older than the refresh interval
    /// are re-read through the handle.
    fn key(
        &self,
        guard: &ModuleGuard<'_>,
        lease: &Lease<'_>,
        key_id: &str,
    ) -> Result<Option<Arc<CachedKey>>, Fault> {
        let cached = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_id)
            .cloned();
        if let Some(k) = cached
            && k.generation == guard.generation()
        {
            if k.fetched.elapsed() < self.shared.attributes_refresh {
                return Ok(Some(k));
            }
            let info =
                read_key_info(lease.session(), k.handle).map_err(|e| classify(&e, Op::Lookup))?;
            let fresh = Arc::new(CachedKey {
                handle: k.handle,
                info,
                generation: k.generation,
                fetched: Instant::now(),
            });
            self.insert(key_id, &fresh);
            return Ok(Some(fresh));
        }
        let template = id_template(self.shared.key_id_attribute, key_id);
        self.shared
            .stats
            .find_objects
            .fetch_add(1, Ordering::Relaxed);
        let handles = lease
            .session()
            .find_objects(&template)
            .map_err(|e| classify(&e, Op::Lookup))?;
        let mut infos = Vec::with_capacity(handles.len());
        for h in &handles {
            infos.push(read_key_info(lease.session(), *h).map_err(|e| classify(&e, Op::Lookup))?);
        }
        match choose(&infos) {
            Ok(None) => Ok(None),
            Ok(Some(i)) => {
                let key = Arc::new(CachedKey {
                    handle: handles[i],
                    info: infos.swap_remove(i),
                    generation: guard.generation(),
                    fetched: Instant::now(),
                });
                self.insert(key_id, &key);
                Ok(Some(key))
            }
            Err(count) => {
                tracing::warn!(token = %self.selector, key = key_id, count, "several secret keys carry this key id; refusing to guess");
                Err(Fault::Final(BackendError::Failed(format!(
                    "{count} keys on the token carry this key id"
                ))))
            }
        }
    }

    fn insert(&self, key_id: &str, key: &Arc<CachedKey>) {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key_id.to_owned(), Arc::clone(key));
    }

    pub(crate) fn evict(&self, key_id: &str) {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key_id);
    }

    /// C_GetTokenInfo on our slot, and the token there must still be ours; else the
    /// code of the failure. (SoftHSM answers CKR_GENERAL_ERROR once its directory is
    /// gone.) Only [`Token::settle`] and [`Token::check_alive`] ask.
    fn confirm_alive(&self, guard: &ModuleGuard<'_>) -> Result<(), String> {
        let slot = self
            .lifecycle
            .slot()
            .ok_or_else(|| ckr_name(RvError::TokenNotPresent))?;
        let info = guard
            .ctx()
            .get_token_info(slot)
            .map_err(|e| error_code(&e))?;
        if !self.selector.matches(&info) {
            return Err(ckr_name(RvError::TokenNotRecognized));
        }
        Ok(())
    }

    /// [`Token::confirm_alive`], a failure settled as a lost token.
    fn check_alive(&self, guard: &ModuleGuard<'_>, ticket: Ticket) -> Result<(), Fault> {
        self.confirm_alive(guard)
            .map_err(|code| self.settle(guard, ticket, None, Fault::TokenLost(code)))
    }

    /// C_GetTokenInfo only: the health check when no health-check key is configured.
    pub(crate) fn shallow_check(&self) -> Result<(), Fault> {
        let (guard, ticket) = self.enter()?;
        self.check_alive(&guard, ticket)
    }

    /// The liveness probe the recovery thread runs on serving tokens, so a lost token
    /// is noticed even without traffic.
    pub(crate) fn probe(&self) {
        if !self.is_up() {
            return;
        }
        let Ok((guard, ticket)) = self.enter() else {
            return;
        };
        // A failure is settled (the token marked lost) inside; nothing else to do.
        let _ = self.check_alive(&guard, ticket);
    }

    // ---------------------------------------------------------------- admin helpers

    /// Runs `f` with a fresh read/write session on this token (admin calls: key
    /// creation and listing), under a module guard.
    pub(crate) fn with_rw_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, super::Pkcs11Error>,
    ) -> Result<T, super::Pkcs11Error> {
        let guard = self
            .module
            .enter_blocking()
            .map_err(|f| super::Pkcs11Error::Unavailable(f.into_backend_error().to_string()))?;
        let slot = self
            .lifecycle
            .slot()
            .ok_or_else(|| super::Pkcs11Error::Unavailable(self.down_code()))?;
        let session = guard
            .ctx()
            .open_rw_session_no_drop(slot)
            .map_err(|e| super::Pkcs11Error::call(&e))?;
        let pin = self.login_pin();
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                let _ = session.close();
                return Err(super::Pkcs11Error::LoginFailed {
                    token: self.selector.to_string(),
                    code: error_code(&e),
                });
            }
        }
        let out = f(&session);
        let _ = session.close();
        drop(guard);
        out
    }

    // ---------------------------------------------------------------- health

    /// This token's `ekmFleetDetails` entry, from its own deep check.
    pub(crate) fn health(&self, deep: impl FnOnce(&Token) -> Result<(), Fault>) -> EkmHealth {
        use crate::backend::HealthState;
        let state = if !self.is_up() {
            HealthState::Unavailable
        } else {
            match deep(self) {
                Ok(()) => HealthState::Active,
                Err(Fault::TokenLost(_)) => HealthState::Unavailable,
                // The token answers but cannot prove crypto now (health key missing,
                // every session busy, odd failure): degraded, not gone.
                Err(_) => HealthState::Degraded,
            }
        };
        let (id, model) = match self.ident() {
            Some(i) => (
                format!("{} (serial {})", i.label, i.serial),
                format!("{} {} firmware {}", i.manufacturer, i.model, i.firmware),
            ),
            None => (self.selector.to_string(), "unknown (never reached)".into()),
        };
        EkmHealth { id, model, state }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // Close our sessions while their generation is current (see module docs).
        if let Ok(guard) = self.module.enter_blocking() {
            self.teardown_with(guard.ctx(), guard.generation());
        }
    }
}

/// What an operation closure gets: the leased session and the token's IV policy.
pub(crate) struct OpCtx<'a> {
    token: &'a Token,
    lease: &'a Lease<'a>,
}

impl OpCtx<'_> {
    pub(crate) fn session(&self) -> &Session {
        self.lease.session()
    }

    pub(crate) fn iv_policy(&self) -> IvPolicy {
        self.token.shared.iv_policy
    }
}

impl Selector {
    pub(crate) fn matches(&self, info: &TokenInfo) -> bool {
        match self {
            Selector::Label(l) => info.label().trim_end() == l,
            Selector::Serial(s) => info.serial_number().trim() == s,
        }
    }
}

/// Why a slot lookup failed.
#[derive(Debug)]
pub(crate) enum SlotError {
    Call(CkError),
    NotFound,
    Ambiguous(usize),
}

impl SlotError {
    pub(crate) fn code(&self) -> String {
        match self {
            SlotError::Call(e) => error_code(e),
            SlotError::NotFound => ckr_name(RvError::TokenNotPresent),
            SlotError::Ambiguous(n) => format!("{n} tokens match the selector"),
        }
    }
}

/// The one slot whose token matches `selector`. Never "the first slot".
pub(crate) fn find_slot(
    ctx: &Pkcs11,
    selector: &Selector,
) -> Result<(Slot, TokenIdent), SlotError> {
    let slots = ctx.get_slots_with_token().map_err(SlotError::Call)?;
    let mut found = Vec::new();
    for slot in slots {
        // A slot whose token cannot be read (e.g. a vanished SoftHSM token) is skipped:
        // it cannot be ours, or if it is, it is not usable.
        if let Ok(info) = ctx.get_token_info(slot)
            && info.token_initialized()
            && selector.matches(&info)
        {
            found.push((slot, TokenIdent::from_info(&info)));
        }
    }
    match found.len() {
        0 => Err(SlotError::NotFound),
        1 => Ok(found.remove(0)),
        n => Err(SlotError::Ambiguous(n)),
    }
}
