//! A token's lifecycle as one state machine: whether it serves, why not, and when the
//! recovery thread tries it again; its transitions are the only way that state changes.
//!
//! Why one type: the token's state used to live in an `up` flag, a mutex-guarded record
//! and three "down" writers that disagreed in small ways (which code is kept, whether a
//! loss is counted, when the next attempt is due). Here each event is one transition
//! with one rule, and each returns an [`Effect`] that the [`Token`](super::token::Token)
//! performs (log, counter, wake) *after* the lock is released.
//!
//! Transitions take `now` instead of reading the clock, take no other lock and call no
//! PKCS#11 function, so they are safe under the module write lock or the pool mutex and
//! are unit-tested without a token.
//!
//! Concurrency: writers lock `detail`, change the phase, then store the two atomics the
//! hot path reads (`serving`, `generation`) before unlocking; a request only loads those
//! two (Acquire) and never takes the mutex.
//!
//! The other counters are not token state but validity stamps owned by their resource:
//! the pool's epoch (which sessions belong to the current pool), the key cache entries'
//! generation (a lookup that raced a re-initialisation), the module's generation (shared
//! by every backend on the module). The lifecycle only records which epoch and
//! generation it serves in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::slot::Slot;

use super::token::TokenIdent;

/// What `down_code` says about a token that was never built.
const NOT_READY: &str = "token not ready";

/// How soon the recovery thread retries a token whose (re)build just failed.
const RETRY_AFTER_BUILD_FAILURE: Duration = Duration::from_millis(100);

/// The first backoff step; doubled per failed attempt up to the configured maximum.
const BACKOFF_BASE_MS: u64 = 100;

/// Attempts beyond this do not double the delay again (2^15 steps is far past any cap).
const BACKOFF_MAX_DOUBLINGS: u32 = 16;

/// Where a token is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Never built ("token not ready").
    NotReady,
    /// Sessions are open and logged in, in this module generation and pool epoch.
    Serving { generation: u64, epoch: u64 },
    /// Lost or never reached: the recovery thread retries at `next_attempt`.
    Lost(Outage),
    /// C_Login refused the PIN: never retried automatically (each try counts towards
    /// locking the token); only a changed PIN ([`TokenLifecycle::pin_changed`]) retries.
    Refused(Outage),
}

/// Why and since when a token is not serving, and when it is tried next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outage {
    pub code: String,
    pub since: Instant,
    pub attempts: u32,
    pub next_attempt: Instant,
}

impl Outage {
    fn new(code: &str, since: Instant, next_attempt: Instant) -> Self {
        Self {
            code: code.to_owned(),
            since,
            attempts: 0,
            next_attempt,
        }
    }
}

/// What the token must do after a transition, with the lifecycle's lock released
/// (logging or waking a thread under it would stretch the critical section).
#[must_use = "the token must perform the effect (log, count, wake)"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    /// Serving → not serving because a request or probe found the token lost (or a
    /// session refill met a refused login): warn, count `token_losses`, wake the
    /// recovery thread. Never from a start or a failed rebuild.
    NewLoss,
    /// Lost or refused → serving: count `recoveries`, log how long it took.
    Recovered {
        after: Duration,
    },
    /// Wake the recovery thread (nothing else changed that the log must hear about).
    Wake,
}

/// What the recovery thread should do with a token now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    Serving,
    /// Refused login: wait for a changed PIN.
    Refused,
    /// The next attempt is not due yet.
    In(Duration),
    Now,
}

/// The module generation and pool epoch a request entered the token in, read from the
/// atomics without a lock. Every loss report carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub generation: u64,
    pub epoch: u64,
}

#[derive(Debug)]
struct Detail {
    phase: Phase,
    /// The last known slot and identity (for health, logs and admin calls); kept while
    /// the token is down so health can still name it.
    slot: Option<Slot>,
    ident: Option<TokenIdent>,
}

/// One token's lifecycle. See the module docs.
#[derive(Debug)]
pub(crate) struct TokenLifecycle {
    detail: Mutex<Detail>,
    /// 0 unless the phase is `Serving`, then its epoch + 1. Written only with `detail`
    /// held; read by every request (Acquire).
    serving: AtomicU64,
    /// The module generation the token was last built in. Written only with `detail`
    /// held; it changes only under the module write lock, so a request holding a read
    /// guard never sees it move.
    generation: AtomicU64,
}

impl Default for TokenLifecycle {
    fn default() -> Self {
        Self {
            detail: Mutex::new(Detail {
                phase: Phase::NotReady,
                slot: None,
                ident: None,
            }),
            serving: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }
}

impl TokenLifecycle {
    fn detail(&self) -> MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the hot path's view of `phase`; called with `detail` held, after every
    /// change, so the atomics never disagree with the phase once the lock is released.
    fn publish(&self, phase: &Phase) {
        let serving = match phase {
            Phase::Serving { generation, epoch } => {
                self.generation.store(*generation, Ordering::Release);
                epoch.wrapping_add(1)
            }
            Phase::NotReady | Phase::Lost(_) | Phase::Refused(_) => 0,
        };
        self.serving.store(serving, Ordering::Release);
    }

    // ------------------------------------------------------------------ transitions

    /// The pool was (re)built: any phase → `Serving`.
    pub(crate) fn built(
        &self,
        generation: u64,
        epoch: u64,
        slot: Slot,
        ident: TokenIdent,
        now: Instant,
    ) -> Effect {
        let mut d = self.detail();
        let effect = match &d.phase {
            Phase::Lost(o) | Phase::Refused(o) => Effect::Recovered {
                after: now.saturating_duration_since(o.since),
            },
            Phase::NotReady | Phase::Serving { .. } => Effect::None,
        };
        d.phase = Phase::Serving { generation, epoch };
        d.slot = Some(slot);
        d.ident = Some(ident);
        self.publish(&d.phase);
        effect
    }

    /// A request or probe found the token lost; `ticket` is what it entered with.
    /// Serving → `Lost` (the first code is kept; the loss is counted once). Any other
    /// phase is unchanged, but the recovery thread is still woken (it may be sleeping
    /// on a long backoff).
    ///
    /// A report from an older pool epoch or module generation than the one serving is
    /// ignored: it comes from a session of a pool that has been rebuilt since (a light
    /// recovery), and must not take the fresh pool down or count a second loss. If the
    /// token really is gone, the next request or the probe (every second) says so.
    pub(crate) fn lost(&self, ticket: Ticket, code: &str, now: Instant) -> Effect {
        let mut d = self.detail();
        match d.phase {
            Phase::Serving { generation, epoch }
                if (generation, epoch) != (ticket.generation, ticket.epoch) =>
            {
                Effect::None
            }
            Phase::Serving { .. } => {
                d.phase = Phase::Lost(Outage::new(code, now, now));
                self.publish(&d.phase);
                Effect::NewLoss
            }
            Phase::NotReady | Phase::Lost(_) | Phase::Refused(_) => Effect::Wake,
        }
    }

    /// A build at start or after a re-initialisation failed: the token is down without
    /// counting a loss (the start's error or the re-initialisation's warning reports
    /// it), retried soon. An existing outage only takes the newer code; a refusal stays
    /// a refusal (it must not be retried with the same PIN).
    pub(crate) fn build_failed(&self, code: &str, now: Instant) {
        let mut d = self.detail();
        match &mut d.phase {
            Phase::NotReady | Phase::Serving { .. } => {
                d.phase = Phase::Lost(Outage::new(code, now, now + RETRY_AFTER_BUILD_FAILURE));
            }
            Phase::Lost(o) => o.code = code.to_owned(),
            Phase::Refused(_) => {}
        }
        self.publish(&d.phase);
    }

    /// C_Login refused the PIN: any phase → `Refused`, keeping an outage's `since` and
    /// attempts. Leaving `Serving` this way is a loss like any other (counted once,
    /// recovery woken), as when the refill that met the refusal reports it.
    pub(crate) fn login_refused(&self, code: &str, now: Instant) -> Effect {
        let mut d = self.detail();
        let (outage, effect) = match &d.phase {
            Phase::Lost(o) | Phase::Refused(o) => (
                Outage {
                    code: code.to_owned(),
                    ..o.clone()
                },
                Effect::None,
            ),
            Phase::NotReady => (Outage::new(code, now, now), Effect::None),
            Phase::Serving { .. } => (Outage::new(code, now, now), Effect::NewLoss),
        };
        d.phase = Phase::Refused(outage);
        self.publish(&d.phase);
        effect
    }

    /// A recovery attempt failed: the next one waits 100 ms doubling per attempt,
    /// capped at `max`, and a lost token's outage takes the latest code.
    pub(crate) fn attempt_failed(&self, code: &str, max: Duration, now: Instant) {
        let mut d = self.detail();
        match &mut d.phase {
            Phase::Lost(o) => {
                o.code = code.to_owned();
                o.attempts = o.attempts.saturating_add(1);
                o.next_attempt = now + backoff(o.attempts, max);
            }
            // The refusal stays the reason given (as `down_code` always named it),
            // whatever the failed attempt's own code was.
            Phase::Refused(o) => {
                o.attempts = o.attempts.saturating_add(1);
                o.next_attempt = now + backoff(o.attempts, max);
            }
            Phase::NotReady => {
                let mut o = Outage::new(code, now, now);
                o.attempts = 1;
                o.next_attempt = now + backoff(1, max);
                d.phase = Phase::Lost(o);
            }
            // The token is serving again (a re-initialisation by another backend on the
            // same module rebuilt it while this attempt failed): the failure is already
            // history, and a serving token has no next attempt to schedule.
            Phase::Serving { .. } => {}
        }
        self.publish(&d.phase);
    }

    /// A reload brought a different PIN: a refused token is retried at once.
    pub(crate) fn pin_changed(&self, now: Instant) -> Effect {
        let mut d = self.detail();
        let Phase::Refused(o) = &d.phase else {
            return Effect::None;
        };
        let o = Outage {
            next_attempt: now,
            ..o.clone()
        };
        d.phase = Phase::Lost(o);
        self.publish(&d.phase);
        Effect::Wake
    }

    // ------------------------------------------------------------------ reads

    /// The hot path's check: `Some` exactly when serving. Two atomic loads, no lock.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        let serving = self.serving.load(Ordering::Acquire);
        if serving == 0 {
            return None;
        }
        Some(Ticket {
            generation: self.generation.load(Ordering::Acquire),
            epoch: serving.wrapping_sub(1),
        })
    }

    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire) != 0
    }

    /// What the recovery thread should do now.
    pub(crate) fn due(&self, now: Instant) -> Due {
        match &self.detail().phase {
            Phase::Serving { .. } => Due::Serving,
            Phase::Refused(_) => Due::Refused,
            Phase::Lost(o) if o.next_attempt > now => Due::In(o.next_attempt - now),
            Phase::Lost(_) | Phase::NotReady => Due::Now,
        }
    }

    /// Time until the next attempt of a lost or refused token (None when serving or
    /// never built).
    pub(crate) fn retry_in(&self, now: Instant) -> Option<Duration> {
        match &self.detail().phase {
            Phase::Lost(o) | Phase::Refused(o) => {
                Some(o.next_attempt.saturating_duration_since(now))
            }
            Phase::NotReady | Phase::Serving { .. } => None,
        }
    }

    /// Why this token is not serving, as a code name: a refusal, else the outage's
    /// code, else "token not ready".
    pub(crate) fn down_code(&self) -> String {
        match &self.detail().phase {
            Phase::Lost(o) | Phase::Refused(o) => o.code.clone(),
            Phase::NotReady | Phase::Serving { .. } => NOT_READY.into(),
        }
    }

    /// The outage's code, when the token is lost or refused.
    pub(crate) fn outage_code(&self) -> Option<String> {
        match &self.detail().phase {
            Phase::Lost(o) | Phase::Refused(o) => Some(o.code.clone()),
            Phase::NotReady | Phase::Serving { .. } => None,
        }
    }

    /// The refused login's code, if the PIN was refused.
    pub(crate) fn refusal(&self) -> Option<String> {
        match &self.detail().phase {
            Phase::Refused(o) => Some(o.code.clone()),
            Phase::NotReady | Phase::Serving { .. } | Phase::Lost(_) => None,
        }
    }

    /// Whether the token was ever built (recovery does not re-initialise a shared
    /// module for a token it has never seen).
    pub(crate) fn ever_served(&self) -> bool {
        self.detail().ident.is_some()
    }

    pub(crate) fn slot(&self) -> Option<Slot> {
        self.detail().slot
    }

    pub(crate) fn ident(&self) -> Option<TokenIdent> {
        self.detail().ident.clone()
    }

    #[cfg(test)]
    fn phase(&self) -> Phase {
        self.detail().phase.clone()
    }
}

/// 100 ms · 2^(attempts−1), doublings capped at 16, the delay capped at `max`.
fn backoff(attempts: u32, max: Duration) -> Duration {
    let exp = attempts.min(BACKOFF_MAX_DOUBLINGS);
    let delay = Duration::from_millis(BACKOFF_BASE_MS.saturating_mul(1 << exp.saturating_sub(1)));
    delay.min(max)
}

#[cfg(test)]
mod tests {
    //! One test per transition row of the lifecycle (issue 17 §2), plus the backoff
    //! sequence and the invariant that the hot path's atomics mirror the phase.

    use super::*;

    const MAX: Duration = Duration::from_secs(2);

    fn ident() -> TokenIdent {
        TokenIdent {
            label: "t".into(),
            serial: "1".into(),
            model: "m".into(),
            manufacturer: "x".into(),
            firmware: "1.0".into(),
        }
    }

    fn at(generation: u64, epoch: u64) -> Ticket {
        Ticket { generation, epoch }
    }

    fn slot() -> Slot {
        Slot::try_from(1u64).expect("slot id")
    }

    fn serving(gen_: u64, epoch: u64, now: Instant) -> TokenLifecycle {
        let l = TokenLifecycle::default();
        assert_eq!(l.built(gen_, epoch, slot(), ident(), now), Effect::None);
        l
    }

    fn outage(l: &TokenLifecycle) -> Outage {
        match l.phase() {
            Phase::Lost(o) | Phase::Refused(o) => o,
            other => panic!("expected an outage, got {other:?}"),
        }
    }

    /// Rule: a new lifecycle is not ready and says so.
    #[test]
    fn a_new_token_is_not_ready() {
        let l = TokenLifecycle::default();
        assert_eq!(l.phase(), Phase::NotReady);
        assert_eq!(l.ticket(), None);
        assert_eq!(l.down_code(), "token not ready");
        assert_eq!(l.due(Instant::now()), Due::Now);
        assert!(!l.ever_served());
    }

    /// Row `built`: any → Serving; Recovered (with the outage's length) only from
    /// Lost or Refused.
    #[test]
    fn built_serves_and_reports_a_recovery_only_after_an_outage() {
        let t0 = Instant::now();
        let l = serving(3, 7, t0);
        assert_eq!(
            l.phase(),
            Phase::Serving {
                generation: 3,
                epoch: 7
            }
        );
        assert_eq!(
            l.ticket(),
            Some(Ticket {
                generation: 3,
                epoch: 7
            })
        );
        assert!(l.ever_served());
        assert_eq!(l.slot(), Some(slot()));

        let _ = l.lost(at(3, 7), "CKR_DEVICE_REMOVED", t0);
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(
            l.built(4, 8, slot(), ident(), later),
            Effect::Recovered {
                after: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            l.ticket(),
            Some(Ticket {
                generation: 4,
                epoch: 8
            })
        );

        let _ = l.login_refused("CKR_PIN_INCORRECT", later);
        assert!(matches!(
            l.built(4, 9, slot(), ident(), later),
            Effect::Recovered { .. }
        ));
    }

    /// Row `lost`: Serving → Lost{attempts 0, next now}, counted (NewLoss); the hot
    /// path stops at once.
    #[test]
    fn lost_takes_a_serving_token_down_once() {
        let t0 = Instant::now();
        let l = serving(0, 0, t0);
        assert_eq!(l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0), Effect::NewLoss);
        assert_eq!(l.ticket(), None);
        assert_eq!(outage(&l), Outage::new("CKR_DEVICE_REMOVED", t0, t0));
        assert_eq!(l.due(t0), Due::Now);
        assert_eq!(l.down_code(), "CKR_DEVICE_REMOVED");
    }

    /// Rule (`mark_down` kept the first code): a repeated loss changes nothing but
    /// still wakes recovery, and is not counted again.
    #[test]
    fn a_repeated_loss_keeps_the_first_code_and_counts_once() {
        let t0 = Instant::now();
        let l = serving(0, 0, t0);
        assert_eq!(l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0), Effect::NewLoss);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.lost(at(0, 0), "CKR_GENERAL_ERROR", t1), Effect::Wake);
        assert_eq!(outage(&l), Outage::new("CKR_DEVICE_REMOVED", t0, t0));
    }

    /// Row `lost` on NotReady and Refused: unchanged, still a wake.
    #[test]
    fn lost_on_a_token_that_is_not_serving_only_wakes() {
        let t0 = Instant::now();
        let l = TokenLifecycle::default();
        assert_eq!(l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0), Effect::Wake);
        assert_eq!(l.phase(), Phase::NotReady);
        let _ = l.login_refused("CKR_PIN_INCORRECT", t0);
        assert_eq!(l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0), Effect::Wake);
        assert_eq!(l.refusal().as_deref(), Some("CKR_PIN_INCORRECT"));
    }

    /// Row `build_failed` (was `note_down`): NotReady or Serving → Lost retried in
    /// 100 ms, not counted; Lost → newer code only; Refused unchanged.
    #[test]
    fn build_failed_schedules_a_retry_without_counting() {
        let t0 = Instant::now();
        let l = TokenLifecycle::default();
        l.build_failed("CKR_TOKEN_NOT_PRESENT", t0);
        assert_eq!(
            outage(&l),
            Outage::new("CKR_TOKEN_NOT_PRESENT", t0, t0 + Duration::from_millis(100))
        );
        assert_eq!(l.due(t0), Due::In(Duration::from_millis(100)));

        let s = serving(0, 0, t0);
        s.build_failed("CKR_GENERAL_ERROR", t0);
        assert_eq!(s.ticket(), None);
        assert_eq!(outage(&s).next_attempt, t0 + Duration::from_millis(100));

        let t1 = t0 + Duration::from_secs(1);
        s.build_failed("CKR_CRYPTOKI_NOT_INITIALIZED", t1);
        assert_eq!(
            outage(&s),
            Outage {
                code: "CKR_CRYPTOKI_NOT_INITIALIZED".into(),
                ..Outage::new("", t0, t0 + Duration::from_millis(100))
            }
        );

        let _ = s.login_refused("CKR_PIN_INCORRECT", t1);
        s.build_failed("CKR_GENERAL_ERROR", t1);
        assert_eq!(s.refusal().as_deref(), Some("CKR_PIN_INCORRECT"));
    }

    /// Row `login_refused`: any → Refused, keeping an outage's `since`; a serving
    /// token's refusal is a (counted) loss; the recovery thread leaves it alone.
    #[test]
    fn login_refused_parks_the_token_until_the_pin_changes() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(3);
        let l = serving(0, 0, t0);
        assert_eq!(l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0), Effect::NewLoss);
        assert_eq!(l.login_refused("CKR_PIN_INCORRECT", t1), Effect::None);
        let o = outage(&l);
        assert_eq!((o.code.as_str(), o.since), ("CKR_PIN_INCORRECT", t0));
        assert_eq!(l.due(t1), Due::Refused);
        assert_eq!(l.down_code(), "CKR_PIN_INCORRECT");

        let s = serving(0, 0, t0);
        assert_eq!(s.login_refused("CKR_PIN_INCORRECT", t1), Effect::NewLoss);
        assert_eq!(s.ticket(), None);

        let n = TokenLifecycle::default();
        assert_eq!(n.login_refused("CKR_PIN_LOCKED", t1), Effect::None);
        assert_eq!(n.refusal().as_deref(), Some("CKR_PIN_LOCKED"));
    }

    /// Row `attempt_failed` (was `backoff`): the delay sequence is 100, 200, 400 …
    /// ms, capped at the configured maximum, the doublings saturating at 16.
    #[test]
    fn attempt_failed_backs_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let l = serving(0, 0, t0);
        let _ = l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0);
        let mut delays = Vec::new();
        for _ in 0..6 {
            l.attempt_failed("CKR_TOKEN_NOT_PRESENT", MAX, t0);
            delays.push(outage(&l).next_attempt - t0);
        }
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            delays,
            [ms(100), ms(200), ms(400), ms(800), ms(1600), ms(2000)]
        );
        let o = outage(&l);
        assert_eq!((o.code.as_str(), o.attempts), ("CKR_TOKEN_NOT_PRESENT", 6));

        let day = Duration::from_secs(86_400);
        assert_eq!(backoff(16, day), ms(100 << 15));
        assert_eq!(backoff(40, day), ms(100 << 15));
        assert_eq!(backoff(u32::MAX, MAX), MAX);
        assert_eq!(l.retry_in(t0), Some(MAX));
    }

    /// Row `attempt_failed` on a refused token: it backs off like a lost one (and
    /// stays refused).
    #[test]
    fn attempt_failed_on_a_refused_token_keeps_the_refusal() {
        let t0 = Instant::now();
        let l = TokenLifecycle::default();
        let _ = l.login_refused("CKR_PIN_INCORRECT", t0);
        l.attempt_failed("CKR_GENERAL_ERROR", MAX, t0);
        assert_eq!(outage(&l).attempts, 1);
        assert_eq!(l.due(t0), Due::Refused);
        assert_eq!(l.down_code(), "CKR_PIN_INCORRECT");
    }

    /// Row `pin_changed`: Refused → Lost due now, with a wake; on any other phase it
    /// does nothing.
    #[test]
    fn a_changed_pin_retries_a_refused_token_at_once() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        let l = TokenLifecycle::default();
        let _ = l.login_refused("CKR_PIN_INCORRECT", t0);
        l.attempt_failed("CKR_PIN_INCORRECT", MAX, t0);
        assert_eq!(l.pin_changed(t1), Effect::Wake);
        assert_eq!(l.refusal(), None);
        assert_eq!(l.due(t1), Due::Now);
        assert_eq!(outage(&l).since, t0);

        let s = serving(0, 0, t0);
        assert_eq!(s.pin_changed(t1), Effect::None);
        assert!(s.is_serving());
    }

    /// Rule (stale-epoch guard): a loss reported with a ticket from before a rebuild
    /// is ignored (no second loss counted, the rebuilt token keeps serving); one with
    /// the current ticket still takes the token down.
    #[test]
    fn a_loss_reported_from_an_older_epoch_is_ignored() {
        let t0 = Instant::now();
        let l = serving(2, 4, t0);
        let old = l.ticket().expect("serving");
        assert_eq!(l.lost(old, "CKR_DEVICE_REMOVED", t0), Effect::NewLoss);
        let _ = l.built(2, 5, slot(), ident(), t0);
        assert_eq!(l.lost(old, "CKR_SESSION_HANDLE_INVALID", t0), Effect::None);
        assert_eq!(l.ticket(), Some(at(2, 5)));
        let _ = l.built(3, 6, slot(), ident(), t0);
        assert_eq!(l.lost(at(2, 6), "CKR_GENERAL_ERROR", t0), Effect::None);
        assert!(l.is_serving());
        assert_eq!(l.lost(at(3, 6), "CKR_DEVICE_REMOVED", t0), Effect::NewLoss);
        assert_eq!(l.ticket(), None);
    }

    /// Rule: a failed recovery attempt on a token that serves again (another backend's
    /// re-initialisation rebuilt it) changes nothing.
    #[test]
    fn a_failed_attempt_on_a_serving_token_is_ignored() {
        let t0 = Instant::now();
        let l = serving(1, 1, t0);
        l.attempt_failed("CKR_TOKEN_NOT_PRESENT", MAX, t0);
        assert_eq!(
            l.phase(),
            Phase::Serving {
                generation: 1,
                epoch: 1
            }
        );
        assert_eq!(l.retry_in(t0), None);
        assert_eq!(l.due(t0), Due::Serving);
    }

    /// Rule: without a changed PIN a refusal is never retried, whatever else happens.
    #[test]
    fn pin_unchanged_after_refusal_stays_refused() {
        let t0 = Instant::now();
        let l = TokenLifecycle::default();
        let _ = l.login_refused("CKR_PIN_INCORRECT", t0);
        for i in 0..20 {
            let t = t0 + Duration::from_secs(i);
            l.attempt_failed("CKR_PIN_INCORRECT", MAX, t);
            l.build_failed("CKR_GENERAL_ERROR", t);
            let _ = l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t);
            assert_eq!(l.due(t + Duration::from_secs(60)), Due::Refused);
        }
        assert_eq!(l.down_code(), "CKR_PIN_INCORRECT");
    }

    /// Invariant: the hot path's atomics say "serving" exactly when the phase is
    /// `Serving`, with its generation and epoch, after every transition.
    #[test]
    fn serving_is_nonzero_exactly_when_the_phase_is_serving() {
        let t0 = Instant::now();
        let l = TokenLifecycle::default();
        let check = |l: &TokenLifecycle| match l.phase() {
            Phase::Serving { generation, epoch } => {
                assert_eq!(l.ticket(), Some(Ticket { generation, epoch }));
            }
            Phase::NotReady | Phase::Lost(_) | Phase::Refused(_) => {
                assert_eq!(l.ticket(), None);
                assert!(!l.is_serving());
            }
        };
        let steps: [&dyn Fn(&TokenLifecycle); 9] = [
            &|l| l.build_failed("CKR_TOKEN_NOT_PRESENT", t0),
            &|l| l.attempt_failed("CKR_TOKEN_NOT_PRESENT", MAX, t0),
            &|l| {
                let _ = l.built(0, 0, slot(), ident(), t0);
            },
            &|l| {
                let _ = l.lost(at(0, 0), "CKR_DEVICE_REMOVED", t0);
            },
            &|l| {
                let _ = l.built(1, 9, slot(), ident(), t0);
            },
            &|l| {
                let _ = l.login_refused("CKR_PIN_INCORRECT", t0);
            },
            &|l| l.attempt_failed("CKR_PIN_INCORRECT", MAX, t0),
            &|l| {
                let _ = l.pin_changed(t0);
            },
            &|l| {
                let _ = l.built(2, 5, slot(), ident(), t0);
            },
        ];
        check(&l);
        for step in steps {
            step(&l);
            check(&l);
        }
        assert!(l.is_serving());
    }
}
