//! The per-custom-key-store request quota (1,800 cryptographic requests per second by
//! default): one token bucket per store, charged after the key lookup and before the
//! proxy call, as KMS does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::error::{Exception, KmsError};

/// What KMS says when a quota is exceeded ([DG:throttling]).
const THROTTLED: &str =
    "You have exceeded the rate at which you may call KMS. Reduce the frequency of your calls.";

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by store ID. `rps == 0` turns the quota off.
#[derive(Debug)]
pub struct Quotas {
    rps: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Quotas {
    pub fn new(rps: u32) -> Self {
        Self {
            rps,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `store_id`, or fails with `ThrottlingException`.
    pub fn charge(&self, store_id: &str) -> Result<(), KmsError> {
        if self.rps == 0 {
            return Ok(());
        }
        let cap = f64::from(self.rps);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // A bucket starts full: a burst of up to one second's quota is allowed.
        let b = buckets.entry(store_id.to_owned()).or_insert(Bucket {
            tokens: cap,
            last: now,
        });
        let refill = now.duration_since(b.last).as_secs_f64() * cap;
        b.tokens = (b.tokens + refill).min(cap);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(KmsError::new(Exception::Throttling, THROTTLED))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_second_of_burst_then_throttles() {
        let q = Quotas::new(5);
        for _ in 0..5 {
            q.charge("cks-a").expect("within quota");
        }
        let err = q.charge("cks-a").expect_err("over quota");
        assert_eq!(err.exception, Exception::Throttling);
        // Stores are independent.
        q.charge("cks-b").expect("other store");
    }

    #[test]
    fn zero_turns_the_quota_off() {
        let q = Quotas::new(0);
        for _ in 0..10_000 {
            q.charge("cks-a").expect("unlimited");
        }
    }
}
