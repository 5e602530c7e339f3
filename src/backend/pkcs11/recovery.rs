//! The recovery thread: notices lost tokens and brings them back, without a restart.
//!
//! One background thread per backend (`xks-pkcs11-recovery`). It never serves
//! requests; requests only read the tokens' lifecycles (two atomics), so a lost token costs them
//! nothing but an immediate `Unavailable` (or a failover) while this thread works.
//!
//! Each round:
//! 1. **Probe** serving tokens (every second) with C_GetTokenInfo, so a token lost while
//!    idle (a failover token, a quiet night) is noticed before KMS asks.
//! 2. **Recover** each lost token whose backoff has expired:
//!    - *light*: tear down its pool, find its slot again, open sessions, log in — enough
//!      after session-level losses or an HSM that restarted behind a live library;
//!    - *full*: if that fails, C_Finalize + C_Initialize the module (under its write
//!      lock; see `module.rs`) and rebuild every token on it. SoftHSM needs this: once
//!      its token directory disappears, the in-memory token stays invalid
//!      (CKR_GENERAL_ERROR from C_GetTokenInfo, empty searches) even after the
//!      directory returns, until the library is re-initialised.
//!    - a refused PIN is never retried (it would lock the token);
//!    - a token never found since start does not get full attempts while other tokens
//!      on its module serve (a label typo must not disrupt them every few seconds).
//! 3. Sleep until the next probe or attempt is due, or until a request reports a loss.
//!
//! Backoff: 100 ms doubling to `recovery_backoff_max_ms` (default 2 s), so a returning
//! token serves again within about 2 s, while a long outage costs one re-initialisation
//! attempt per interval.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::lifecycle::Due;
use super::token::{Shared, Token};

/// How often serving tokens are probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What the thread needs from the backend: the tokens (weakly, so dropping the backend
/// ends the thread) and the shared wake-up/stop signals.
pub(crate) trait Tokens: Send + Sync + 'static {
    fn tokens(&self) -> &[Arc<Token>];
}

/// Starts the recovery thread.
pub(crate) fn spawn<T: Tokens>(
    owner: Weak<T>,
    shared: Arc<Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("xks-pkcs11-recovery".into())
        .spawn(move || run(owner, shared, stop))
}

fn run<T: Tokens>(owner: Weak<T>, shared: Arc<Shared>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut last_probe = Instant::now();
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let sleep = {
            let Some(owner) = owner.upgrade() else { return };
            let tokens = owner.tokens();
            if last_probe.elapsed() >= PROBE_INTERVAL {
                last_probe = Instant::now();
                for t in tokens {
                    t.probe();
                }
            }
            let mut next = PROBE_INTERVAL.saturating_sub(last_probe.elapsed());
            for t in tokens {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(wait) = attend(t) {
                    next = next.min(wait);
                }
            }
            next
        };
        let flag = shared
            .wake
            .flag
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut flag = if *flag {
            flag
        } else {
            shared
                .wake
                .cv
                .wait_timeout(flag, sleep.max(Duration::from_millis(10)))
                .unwrap_or_else(PoisonError::into_inner)
                .0
        };
        *flag = false;
    }
}

/// Recovers `t` if it is down and due; returns how long until it next needs attention.
fn attend(t: &Token) -> Option<Duration> {
    match t.due() {
        // A refused PIN waits for a reload with a different one.
        Due::Serving | Due::Refused => return None,
        Due::In(wait) => return Some(wait),
        Due::Now => {}
    }
    match recover(t) {
        Ok(()) => None,
        Err(code) => {
            t.attempt_failed(&code);
            t.retry_in()
        }
    }
}

/// One recovery attempt: light, then full. Returns the last failure's code name.
fn recover(t: &Token) -> Result<(), String> {
    let (seen_generation, light) = match t.module.enter_blocking() {
        Ok(guard) => (guard.generation(), t.rebuild(&guard)),
        Err(fault) => (t.module.generation(), Err(fault.code())),
    };
    let light_code = match light {
        Ok(()) => return Ok(()),
        Err(code) => code,
    };
    if let Some(code) = t.login_refused() {
        return Err(code);
    }
    // A token never seen since start (absent, or a typo in its label) must not make us
    // re-initialise a module that is serving other tokens every few seconds: only
    // light attempts for it. A token that was serving and got lost may re-initialise
    // (that is what brings a SoftHSM token back).
    if !t.ever_served() && t.module.others_up(t) {
        return Err(light_code);
    }
    tracing::debug!(token = %t.selector, code = %light_code, "light PKCS#11 recovery failed; re-initialising the module");
    t.module.reinitialize(seen_generation)?;
    if t.is_up() {
        return Ok(());
    }
    Err(t.outage_code().unwrap_or(light_code))
}
