//! The round trips: what is kept of each GenerateDataKey, the pool Decrypts pick
//! earlier ciphertexts from, the restart window, how failed calls are sorted and
//! retried, and the workers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::kms::{CallError, KmsClient};
use crate::runner::new_histogram;
use crate::workload::Rng;

/// How long one call may be retried (throttled, or inside the restart window).
const RETRY_LIMIT: Duration = Duration::from_secs(120);

/// One GenerateDataKey's result: what a later Decrypt needs and must get back.
#[derive(Debug, Clone)]
pub struct Made {
    pub seq: u64,
    /// Base64, as KMS returned it (and as Decrypt takes it).
    pub blob: Arc<str>,
    plaintext_sha256: [u8; 32],
    /// Made before the restart began (so by the first proxy).
    pub before_restart: bool,
}

/// The ciphertexts Decrypts pick from: the most recent, and a uniform sample of all
/// made so far (reservoir sampling, Algorithm R), both bounded.
pub struct Pool {
    recent: VecDeque<Made>,
    /// The uniform sample; also what the final check decrypts again.
    pub sample: Vec<Made>,
    sample_cap: usize,
    /// Ciphertexts inserted so far.
    seen: u64,
    rng: Rng,
}

/// How many of the latest ciphertexts Decrypts also pick from.
const RECENT: usize = 1024;

impl Pool {
    pub fn new(sample_cap: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(RECENT),
            sample: Vec::new(),
            sample_cap,
            seen: 0,
            rng: Rng::new(0x50a4),
        }
    }

    pub fn insert(&mut self, m: Made) {
        self.seen += 1;
        if self.sample.len() < self.sample_cap {
            self.sample.push(m.clone());
        } else {
            let j = self.rng.next_u64() % self.seen;
            if let Some(slot) = self.sample.get_mut(j as usize) {
                *slot = m.clone();
            }
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(m);
    }

    /// A ciphertext made earlier: one of the latest or one of the sample, evenly.
    pub fn pick(&mut self) -> Option<Made> {
        let r = self.rng.next_u64();
        let i = (r >> 1) as usize;
        if r & 1 == 0 && !self.recent.is_empty() {
            self.recent.get(i % self.recent.len()).cloned()
        } else if !self.sample.is_empty() {
            self.sample.get(i % self.sample.len()).cloned()
        } else {
            None
        }
    }
}

// --- The restart window -----------------------------------------------------------------

/// When errors of a missing proxy are put down to the restart. Microseconds since the
/// run's clock started; `u64::MAX` is "not yet" (opened) and "open-ended" (closes).
pub struct RestartWindow {
    opened_us: AtomicU64,
    /// The new proxy listens.
    ready_us: AtomicU64,
    closes_us: AtomicU64,
}

impl RestartWindow {
    pub fn new() -> Self {
        Self {
            opened_us: AtomicU64::new(u64::MAX),
            ready_us: AtomicU64::new(u64::MAX),
            closes_us: AtomicU64::new(u64::MAX),
        }
    }

    /// The restart begins (just before the SIGTERM).
    pub fn open(&self, now_us: u64) {
        self.opened_us.store(now_us, Ordering::Release);
    }

    /// The new proxy listens; the window closes `grace` later.
    pub fn ready(&self, now_us: u64, grace: Duration) {
        self.ready_us.store(now_us, Ordering::Release);
        self.closes_us.store(
            now_us.saturating_add(grace.as_micros() as u64),
            Ordering::Release,
        );
    }

    pub fn begun(&self) -> bool {
        self.opened_us.load(Ordering::Acquire) != u64::MAX
    }

    /// An attempt that started at `started_us` and failed now: inside the window?
    pub fn covers(&self, started_us: u64) -> bool {
        self.begun() && started_us <= self.closes_us.load(Ordering::Acquire)
    }

    /// `started_us` is before the SIGTERM (an attempt the old proxy had in flight, or
    /// that the emulator had just sent on a pooled connection to it).
    pub fn before_open(&self, started_us: u64) -> bool {
        started_us < self.opened_us.load(Ordering::Acquire)
    }

    /// The new proxy serves and `started_us` is after it started listening.
    pub fn after_ready(&self, started_us: u64) -> bool {
        started_us >= self.ready_us.load(Ordering::Acquire)
    }
}

// --- Errors -----------------------------------------------------------------------------

/// How the soak treats a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The emulator's own per-store quota: retried as an SDK retries, counted apart.
    Throttled,
    /// What KMS answers while the proxy is gone, restarting or slow: retried inside the
    /// restart window, a failure outside it.
    ProxyUnavailable,
    /// Anything else: a failure.
    Other,
}

/// The kind of a failure and a short label to count it by.
pub fn classify(e: &CallError) -> (Kind, String) {
    match e {
        CallError::Transport(why) => (Kind::Other, format!("KMS transport: {why}")),
        CallError::Service { code, message, .. } => {
            if code == "ThrottlingException" {
                return (Kind::Throttled, code.clone());
            }
            // The emulator's messages (src/kms/xks_client.rs), by a distinctive phrase.
            const UNAVAILABLE: [(&str, &str); 6] = [
                (
                    "cannot communicate with the external key store proxy",
                    "proxy unreachable",
                ),
                ("did not respond in time", "proxy timed out"),
                ("in the time allotted", "proxy DependencyTimeout"),
                (
                    "cannot communicate with the external key manager",
                    "proxy InternalException",
                ),
                ("very high request rate", "proxy ThrottlingException"),
                ("cannot establish a TLS connection", "proxy TLS failure"),
            ];
            for (phrase, label) in UNAVAILABLE {
                if message.contains(phrase) {
                    return (Kind::ProxyUnavailable, format!("{code}: {label}"));
                }
            }
            let gist: String = message.chars().take(80).collect();
            (Kind::Other, format!("{code}: {gist}"))
        }
    }
}

// --- The load ---------------------------------------------------------------------------

/// Counters every worker adds to.
#[derive(Default)]
pub struct Counters {
    pub done: AtomicU64,
    pub generated: AtomicU64,
    pub decrypted: AtomicU64,
    pub mismatches: AtomicU64,
    pub failed_generate: AtomicU64,
    pub failed_decrypt: AtomicU64,
    pub retried_generate: AtomicU64,
    pub retried_decrypt: AtomicU64,
    pub throttled: AtomicU64,
    /// Retried attempts sent to KMS before the SIGTERM (see the report's field).
    pub retried_sent_before_sigterm: AtomicU64,
    /// Decrypts sent to the new proxy of ciphertexts the old one made.
    pub cross_restart_decrypts: AtomicU64,
    /// Decrypts of a ciphertext other than the one the round trip just made.
    pub decrypts_of_earlier: AtomicU64,
}

/// Labels counted under a lock (rare events only).
#[derive(Default)]
pub struct Tallies {
    pub failures: BTreeMap<String, u64>,
    pub retries: BTreeMap<String, u64>,
    /// The first few failures in full (sequence numbers, messages).
    pub examples: Vec<String>,
}

/// What the workers, the restart and the sampler share.
pub struct Shared {
    pub kms: KmsClient,
    pub key_arn: String,
    pub run_id: String,
    /// Round trips to make, and the next one to claim.
    pub n: u64,
    pub next: AtomicU64,
    pub counters: Counters,
    pub tallies: Mutex<Tallies>,
    pub pool: Mutex<Pool>,
    pub window: RestartWindow,
    /// The round trip whose end starts the restart; the worker that ends it notifies.
    pub restart_after: Option<u64>,
    pub restart_due: tokio::sync::Notify,
    /// The run's time base (the restart window's microseconds).
    pub clock: Instant,
    pub deadline: Instant,
    /// Stop claiming round trips (deadline passed or the restart failed).
    pub stop: AtomicBool,
}

impl Shared {
    pub fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    pub fn failure(&self, label: String, detail: String) {
        if let Ok(mut t) = self.tallies.lock() {
            *t.failures.entry(label).or_default() += 1;
            if t.examples.len() < 10 {
                t.examples.push(detail);
            }
        }
    }

    pub fn context(&self, seq: u64) -> Value {
        json!({"purpose": "xks-bench-soak", "run": self.run_id, "seq": seq.to_string()})
    }

    /// Calls `op`, retrying what the soak allows; the answer and the latency of the
    /// attempt that succeeded.
    pub async fn call(
        &self,
        op: &str,
        body: &Value,
        retried: &AtomicU64,
    ) -> Result<(Value, Duration), (String, CallError)> {
        let first = Instant::now();
        let mut backoff = Duration::from_millis(20);
        // Bounded by RETRY_LIMIT (and each attempt by the client timeout).
        loop {
            let started_us = self.now_us();
            let t0 = Instant::now();
            let e = match self.kms.call(op, body).await {
                Ok(v) => return Ok((v, t0.elapsed())),
                Err(e) => e,
            };
            let (kind, label) = classify(&e);
            let retry = match kind {
                Kind::Throttled => {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Kind::ProxyUnavailable if self.window.covers(started_us) => {
                    retried.fetch_add(1, Ordering::Relaxed);
                    if self.window.before_open(started_us) {
                        self.counters
                            .retried_sent_before_sigterm
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut t) = self.tallies.lock() {
                        *t.retries.entry(format!("{op} {label}")).or_default() += 1;
                    }
                    true
                }
                Kind::ProxyUnavailable | Kind::Other => false,
            };
            if !retry || first.elapsed() > RETRY_LIMIT {
                return Err((format!("{op} {label}"), e));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// GenerateDataKey for round trip `seq`; `None` if it failed (counted).
    pub async fn generate(&self, seq: u64, hist: &mut Histogram<u64>) -> Option<Made> {
        let body = json!({
            "KeyId": self.key_arn,
            "KeySpec": "AES_256",
            "EncryptionContext": self.context(seq),
        });
        let (answer, took) = match self
            .call("GenerateDataKey", &body, &self.counters.retried_generate)
            .await
        {
            Ok(a) => a,
            Err((label, e)) => {
                self.counters
                    .failed_generate
                    .fetch_add(1, Ordering::Relaxed);
                self.failure(label, format!("GenerateDataKey #{seq}: {e}"));
                return None;
            }
        };
        let _ = hist.record(took.as_micros().max(1) as u64);
        let plaintext = answer["Plaintext"]
            .as_str()
            .and_then(|p| STANDARD.decode(p).ok());
        let blob = answer["CiphertextBlob"].as_str();
        let (Some(plaintext), Some(blob)) = (plaintext, blob) else {
            self.counters
                .failed_generate
                .fetch_add(1, Ordering::Relaxed);
            self.failure(
                "GenerateDataKey answer without Plaintext or CiphertextBlob".into(),
                // The member names only: never a data key in a report.
                format!(
                    "GenerateDataKey #{seq}: members {:?}",
                    answer.as_object().map(|o| o.keys().collect::<Vec<_>>())
                ),
            );
            return None;
        };
        if plaintext.len() != 32 || answer["KeyId"].as_str() != Some(self.key_arn.as_str()) {
            self.counters
                .failed_generate
                .fetch_add(1, Ordering::Relaxed);
            self.failure(
                "GenerateDataKey answer: wrong Plaintext length or KeyId".into(),
                format!(
                    "GenerateDataKey #{seq}: {} plaintext bytes, KeyId {}",
                    plaintext.len(),
                    answer["KeyId"]
                ),
            );
            return None;
        }
        self.counters.generated.fetch_add(1, Ordering::Relaxed);
        Some(Made {
            seq,
            blob: Arc::from(blob),
            plaintext_sha256: sha256(&plaintext),
            before_restart: !self.window.begun(),
        })
    }

    /// Decrypts `m` and compares; true if the plaintext came back.
    pub async fn decrypt(&self, m: &Made, hist: Option<&mut Histogram<u64>>) -> bool {
        let body = json!({
            "KeyId": self.key_arn,
            "CiphertextBlob": &*m.blob,
            "EncryptionContext": self.context(m.seq),
        });
        let started_us = self.now_us();
        let (answer, took) = match self
            .call("Decrypt", &body, &self.counters.retried_decrypt)
            .await
        {
            Ok(a) => a,
            Err((label, e)) => {
                self.counters.failed_decrypt.fetch_add(1, Ordering::Relaxed);
                self.failure(label, format!("Decrypt of #{}: {e}", m.seq));
                return false;
            }
        };
        if let Some(h) = hist {
            let _ = h.record(took.as_micros().max(1) as u64);
        }
        let plaintext = answer["Plaintext"]
            .as_str()
            .and_then(|p| STANDARD.decode(p).ok());
        let same = plaintext
            .as_deref()
            .is_some_and(|p| sha256(p) == m.plaintext_sha256)
            && answer["KeyId"].as_str() == Some(self.key_arn.as_str());
        if !same {
            self.counters.mismatches.fetch_add(1, Ordering::Relaxed);
            self.failure(
                "Decrypt returned another plaintext (or KeyId)".into(),
                format!(
                    "Decrypt of #{}: {} plaintext bytes, KeyId {}",
                    m.seq,
                    plaintext.as_ref().map_or(0, Vec::len),
                    answer["KeyId"]
                ),
            );
            return false;
        }
        self.counters.decrypted.fetch_add(1, Ordering::Relaxed);
        if m.before_restart && self.window.after_ready(started_us) {
            self.counters
                .cross_restart_decrypts
                .fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Latency of the successful attempts, per operation.
pub struct WorkerStats {
    pub generate: Histogram<u64>,
    pub decrypt: Histogram<u64>,
}

pub async fn worker(shared: Arc<Shared>) -> WorkerStats {
    let mut stats = WorkerStats {
        generate: new_histogram(),
        decrypt: new_histogram(),
    };
    // Bounded by `n` claims.
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= shared.deadline {
            shared.stop.store(true, Ordering::Relaxed);
            break;
        }
        let seq = shared.next.fetch_add(1, Ordering::Relaxed);
        if seq >= shared.n {
            break;
        }
        let made = shared.generate(seq, &mut stats.generate).await;
        let earlier = shared.pool.lock().ok().and_then(|mut p| p.pick());
        // Only the very first round trips find nothing earlier: they decrypt their own.
        let target = match (earlier, &made) {
            (Some(e), _) => {
                shared
                    .counters
                    .decrypts_of_earlier
                    .fetch_add(1, Ordering::Relaxed);
                Some(e)
            }
            (None, Some(m)) => Some(m.clone()),
            (None, None) => None,
        };
        if let Some(t) = target {
            shared.decrypt(&t, Some(&mut stats.decrypt)).await;
        }
        if let Some(m) = made
            && let Ok(mut p) = shared.pool.lock()
        {
            p.insert(m);
        }
        let done = shared.counters.done.fetch_add(1, Ordering::AcqRel) + 1;
        if Some(done) == shared.restart_after {
            shared.restart_due.notify_one();
        }
    }
    stats
}

/// Decrypts every entry of `items` at `concurrency`; how many came back right (the
/// others are counted as failures or mismatches like any Decrypt).
pub async fn redecrypt_all(shared: &Arc<Shared>, items: Vec<Made>, concurrency: usize) -> u64 {
    let items = Arc::new(items);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (shared, items, next) = (Arc::clone(shared), Arc::clone(&items), Arc::clone(&next));
        tasks.spawn(async move {
            let mut ok = 0u64;
            // Bounded by the item count.
            while let Some(m) = items.get(next.fetch_add(1, Ordering::Relaxed) as usize) {
                if shared.decrypt(m, None).await {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += r.unwrap_or(0);
    }
    ok
}
