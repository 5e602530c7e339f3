//! Loaded PKCS#11 modules: a process-wide registry (one [`Module`] per library path),
//! C_Initialize / C_Finalize, and the lock that makes re-initialisation safe.
//!
//! Why a registry: a PKCS#11 library has process-global state. Loading the same `.so`
//! twice returns the same library, a second C_Initialize fails with
//! CKR_CRYPTOKI_ALREADY_INITIALIZED, and one C_Finalize ends every session of every
//! user of that library in the process. So every backend and every token on a module
//! share one `Module`, and modules stay loaded and initialised for the life of the
//! process (finalizing on drop would race with a new backend initialising the same
//! library, e.g. during a config reload).
//!
//! Why a lock: C_Finalize while another thread is inside a PKCS#11 call is undefined
//! behaviour, and session handles from before a C_Finalize may be reused by the
//! library afterwards (closing a stale handle could close someone else's new session).
//! Every PKCS#11 call therefore runs under a *read* guard ([`ModuleGuard`]), and
//! re-initialisation takes the *write* lock: it waits for calls in flight, closes every
//! session of every token on the module, finalizes, initialises, bumps the generation
//! and rebuilds the tokens before anyone else runs. Sessions remember the generation
//! they were opened in and are only ever closed in that same generation.
//!
//! Requests never queue behind a re-initialisation indefinitely: [`Module::enter`] only
//! try-locks (std's RwLock refuses new readers while a writer waits), polling for at
//! most a short bound before failing with a named `Unavailable`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, TryLockError, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::errors::{Fault, Pkcs11Error, ckr_name};
use super::token::Token;

/// One loaded PKCS#11 library.
pub(crate) struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    state: RwLock<ModuleState>,
    /// Every live token on this module, from every backend in the process: a
    /// re-initialisation must tear down and rebuild all of them.
    tokens: Mutex<Vec<Weak<Token>>>,
    reinits: AtomicU64,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .field("reinits", &self.reinits.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(crate) struct ModuleState {
    /// Whether C_Initialize last succeeded (false after a failed re-initialisation).
    initialized: bool,
    /// Bumped by every re-initialisation; sessions and handles from an older generation
    /// are dead and must not be used or closed.
    generation: u64,
}

/// Proof that no re-initialisation runs while it is held; every PKCS#11 call happens
/// under one.
pub(crate) struct ModuleGuard<'a> {
    module: &'a Module,
    state: RwLockReadGuard<'a, ModuleState>,
}

impl ModuleGuard<'_> {
    pub(crate) fn ctx(&self) -> &Pkcs11 {
        &self.module.ctx
    }

    pub(crate) fn generation(&self) -> u64 {
        self.state.generation
    }
}

/// The write side, handed to token teardown/rebuild during a re-initialisation.
pub(crate) struct Exclusive<'a> {
    pub(crate) ctx: &'a Pkcs11,
    pub(crate) generation: u64,
}

static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();

impl Module {
    /// The module at `path`, loaded and initialised once per process.
    pub(crate) fn load(path: &Path) -> Result<Arc<Module>, Pkcs11Error> {
        let canonical = std::fs::canonicalize(path).map_err(|e| Pkcs11Error::ModuleLoad {
            path: path.to_owned(),
            reason: e.kind().to_string(),
        })?;
        let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = map.get(&canonical) {
            return Ok(Arc::clone(m));
        }
        let ctx = Pkcs11::new(&canonical).map_err(|e| Pkcs11Error::ModuleLoad {
            path: canonical.clone(),
            reason: e.to_string(),
        })?;
        initialize(&ctx).map_err(|e| Pkcs11Error::ModuleLoad {
            path: canonical.clone(),
            reason: format!("C_Initialize failed: {}", super::errors::error_code(&e)),
        })?;
        let module = Arc::new(Module {
            path: canonical.clone(),
            ctx,
            state: RwLock::new(ModuleState {
                initialized: true,
                generation: 0,
            }),
            tokens: Mutex::new(Vec::new()),
            reinits: AtomicU64::new(0),
        });
        map.insert(canonical, Arc::clone(&module));
        Ok(module)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn reinits(&self) -> u64 {
        self.reinits.load(Ordering::Relaxed)
    }

    pub(crate) fn register(&self, token: &Arc<Token>) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|w| w.strong_count() > 0);
        tokens.push(Arc::downgrade(token));
    }

    /// Whether a token on this module other than `me` is serving (a re-initialisation
    /// would interrupt it).
    pub(crate) fn others_up(&self, me: &Token) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens
            .iter()
            .filter_map(Weak::upgrade)
            .any(|t| !std::ptr::eq(Arc::as_ptr(&t), me) && t.is_up())
    }

    /// A read guard, waiting at most `wait` for a re-initialisation to finish. Fails
    /// with a named `Unavailable` rather than queueing requests behind recovery.
    pub(crate) fn enter(&self, wait: Duration) -> Result<ModuleGuard<'_>, Fault> {
        let start = Instant::now();
        loop {
            match self.state.try_read() {
                Ok(state) => return self.admit(state),
                Err(TryLockError::Poisoned(p)) => return self.admit(p.into_inner()),
                Err(TryLockError::WouldBlock) => {
                    if start.elapsed() >= wait {
                        return Err(Fault::TokenLost("module re-initialising".into()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// A read guard, waiting as long as it takes (admin calls, teardown on drop).
    pub(crate) fn enter_blocking(&self) -> Result<ModuleGuard<'_>, Fault> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        self.admit(state)
    }

    fn admit<'a>(
        &'a self,
        state: RwLockReadGuard<'a, ModuleState>,
    ) -> Result<ModuleGuard<'a>, Fault> {
        if !state.initialized {
            return Err(Fault::TokenLost(ckr_name(RvError::CryptokiNotInitialized)));
        }
        Ok(ModuleGuard {
            module: self,
            state,
        })
    }

    /// Finalizes and re-initialises the library, unless someone already did since
    /// `seen_generation` (several tokens may ask at once; one re-init serves all).
    ///
    /// Under the write lock: every token on the module drops its sessions and handle
    /// cache (closing sessions while they are still valid), then C_Finalize and
    /// C_Initialize run, then every token rebuilds its pool. Returns the outcome of
    /// C_Initialize as a code name on failure.
    pub(crate) fn reinitialize(&self, seen_generation: u64) -> Result<(), String> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        if state.generation != seen_generation && state.initialized {
            return Ok(());
        }
        let tokens: Vec<Arc<Token>> = {
            let mut list = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        if state.initialized {
            let old = Exclusive {
                ctx: &self.ctx,
                generation: state.generation,
            };
            for t in &tokens {
                t.teardown(&old);
            }
            // CKR_CRYPTOKI_NOT_INITIALIZED here just means it is already finalized.
            if let Err(e) = self.ctx.clone().finalize() {
                tracing::debug!(module = %self.path.display(), code = %super::errors::error_code(&e), "C_Finalize failed during recovery");
            }
        }
        state.generation += 1;
        self.reinits.fetch_add(1, Ordering::Relaxed);
        match initialize(&self.ctx) {
            Ok(()) => state.initialized = true,
            Err(e) => {
                state.initialized = false;
                let code = super::errors::error_code(&e);
                tracing::warn!(module = %self.path.display(), %code, "C_Initialize failed during recovery; will retry");
                for t in &tokens {
                    t.build_failed(&code);
                }
                return Err(code);
            }
        }
        let now = Exclusive {
            ctx: &self.ctx,
            generation: state.generation,
        };
        for t in &tokens {
            if let Err(code) = t.rebuild_exclusive(&now) {
                tracing::warn!(token = %t.selector, %code, "PKCS#11 token not back after re-initialisation");
            }
        }
        tracing::info!(
            module = %self.path.display(),
            generation = state.generation,
            took_ms = started.elapsed().as_millis() as u64,
            "PKCS#11 module re-initialised"
        );
        Ok(())
    }

    /// The current generation, for callers deciding whether to re-initialise.
    pub(crate) fn generation(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    // OS_LOCKING_OK: the library may be called from many threads at once (the session
    // pool does exactly that, one session per thread at a time).
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(()),
        // Someone else in the process initialised it (another library using the same
        // module): it is usable as it is.
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}
