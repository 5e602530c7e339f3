//! Connection admission: how many connections a listener holds open, in all and per
//! source, so that one host on the internet cannot take every slot from KMS.
//!
//! The per-source cap is the mechanism of choice because KMS calls from many addresses
//! (its fleet, or the VPC endpoint's), while an attacker's connections come from few:
//! a cap well under the total leaves room for KMS unless the attacker controls many
//! sources. IPv6 sources are grouped by /64, the block one host usually has, so a single
//! machine cannot multiply itself by rotating addresses within its prefix.
//!
//! Memory per admitted connection is held by the caller; admission itself costs one
//! map entry per distinct source, removed with the source's last connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its maximum number of connections.
    Total,
    /// This source holds its maximum number of connections.
    Source,
}

/// One listener's connection caps.
#[derive(Debug)]
pub struct Gate {
    total: Arc<Semaphore>,
    limit: usize,
    per_source_limit: usize,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// An admitted connection; dropping it frees its slots.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Gate {
    pub fn new(limit: usize, per_source_limit: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(limit)),
            limit,
            per_source_limit,
            per_source: Arc::default(),
        }
    }

    /// Admits a connection from `peer`, or says which cap refused it.
    pub fn admit(&self, peer: SocketAddr) -> Result<Admission, Refused> {
        let source = source_of(peer.ip());
        let mut counts = self
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(source).or_insert(0);
        if *count >= self.per_source_limit {
            if *count == 0 {
                counts.remove(&source);
            }
            return Err(Refused::Source);
        }
        let Ok(permit) = Arc::clone(&self.total).try_acquire_owned() else {
            if *count == 0 {
                counts.remove(&source);
            }
            return Err(Refused::Total);
        };
        *count += 1;
        Ok(Admission {
            _permit: permit,
            source,
            per_source: Arc::clone(&self.per_source),
        })
    }

    /// The total cap.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The cap per source.
    pub fn per_source_limit(&self) -> usize {
        self.per_source_limit
    }

    /// Waits until every admitted connection has gone (or `grace` ran out); for drain.
    /// Returns false on timeout.
    pub async fn drained(&self, grace: std::time::Duration) -> bool {
        let all = u32::try_from(self.limit).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.total.acquire_many(all))
            .await
            .is_ok()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = counts.get_mut(&self.source) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// The unit a per-source cap counts: an IPv4 address (IPv4-mapped IPv6 included), or
/// the /64 of an IPv6 address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let gate = Gate::new(10, 2);
        let a1 = gate.admit(peer("192.0.2.1:1000")).expect("first");
        let _a2 = gate.admit(peer("192.0.2.1:1001")).expect("second");
        assert_eq!(
            gate.admit(peer("192.0.2.1:1002")).err(),
            Some(Refused::Source)
        );
        // Another source still gets in.
        let _b1 = gate.admit(peer("192.0.2.2:1000")).expect("other source");
        // A closed connection frees its source's slot.
        drop(a1);
        let _a3 = gate.admit(peer("192.0.2.1:1003")).expect("slot freed");
    }

    #[test]
    fn the_total_cap_holds_across_sources() {
        let gate = Gate::new(2, 2);
        let _a = gate.admit(peer("192.0.2.1:1")).expect("a");
        let _b = gate.admit(peer("192.0.2.2:1")).expect("b");
        assert_eq!(gate.admit(peer("192.0.2.3:1")).err(), Some(Refused::Total));
        // A refusal leaves no entry behind (the map cannot grow with refused sources).
        let counts = gate.per_source.lock().expect("lock");
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_slash_64() {
        let gate = Gate::new(10, 1);
        let _a = gate.admit(peer("[2001:db8:1:2::1]:1")).expect("first");
        assert_eq!(
            gate.admit(peer("[2001:db8:1:2:ffff::9]:1")).err(),
            Some(Refused::Source),
            "same /64"
        );
        let _b = gate.admit(peer("[2001:db8:1:3::1]:1")).expect("other /64");
        // IPv4-mapped addresses count as their IPv4 source.
        let _c = gate.admit(peer("192.0.2.7:1")).expect("v4");
        assert_eq!(
            gate.admit(peer("[::ffff:192.0.2.7]:1")).err(),
            Some(Refused::Source)
        );
    }

    #[test]
    fn every_slot_is_returned() {
        let gate = Gate::new(3, 3);
        let all: Vec<_> = (0..3)
            .map(|i| gate.admit(peer(&format!("192.0.2.1:{i}"))).expect("admit"))
            .collect();
        drop(all);
        assert!(gate.per_source.lock().expect("lock").is_empty());
        assert_eq!(gate.total.available_permits(), 3);
    }
}
