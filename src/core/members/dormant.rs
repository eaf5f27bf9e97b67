//! Endpoints discovery lists but no worker answers at: a cluster-file entry left by a killed worker, a
//! machine that is down. Each open connection costs file descriptors and pings, so a quiet one is closed
//! and tried again later, less and less often; a worker that comes back at the address is found at the next
//! probe.
//!
//! 1. A new connection (or one whose worker was lost) may stay quiet for `PATIENCE`.
//! 2. Past it the connection is closed and the endpoint is dormant until `retry_at`, first `FIRST_BACKOFF`
//!    away, doubling at each failed probe up to `MAX_BACKOFF`.
//! 3. A probe reconnects and gets `PROBE` to hear a Hello (a live worker answers within milliseconds);
//!    then step 2 again.
//! 4. A worker that answers, or an endpoint discovery drops, leaves this bookkeeping.
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const PATIENCE: Duration = Duration::from_secs(30);
pub const PROBE: Duration = Duration::from_secs(3);
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Quiet {
    /// When the connection must have heard a Hello by.
    deadline: Instant,
    /// How long to stay closed if it does not.
    backoff: Duration,
}

#[derive(Debug, Default)]
pub struct Dormancy {
    /// Open connections with no live worker behind them.
    quiet: HashMap<String, Quiet>,
    /// Closed connections, by when to probe again and the backoff after that probe.
    dormant: HashMap<String, (Instant, Duration)>,
}

/// What the owner of the connections must do now.
#[derive(Debug, Default, PartialEq)]
pub struct Due {
    pub close: Vec<String>,
    pub reconnect: Vec<String>,
}

impl Dormancy {
    /// A connection to `addr` was opened because discovery listed it (or its worker was lost).
    pub fn quiet(&mut self, addr: &str, now: Instant) {
        self.dormant.remove(addr);
        self.quiet.insert(addr.to_string(), Quiet { deadline: now + PATIENCE, backoff: FIRST_BACKOFF });
    }

    /// Its worker answered.
    pub fn alive(&mut self, addr: &str) {
        self.quiet.remove(addr);
    }

    /// Discovery no longer lists it.
    pub fn forget(&mut self, addr: &str) {
        self.quiet.remove(addr);
        self.dormant.remove(addr);
    }

    /// Connections to close (quiet past their deadline) and endpoints to probe (dormant past `retry_at`);
    /// the probes are counted as open and quiet from `now`.
    pub fn due(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        self.quiet.retain(|addr, quiet| {
            if now < quiet.deadline {
                return true;
            }
            let next = (quiet.backoff * 2).min(MAX_BACKOFF);
            self.dormant.insert(addr.clone(), (now + quiet.backoff, next));
            due.close.push(addr.clone());
            false
        });
        self.dormant.retain(|addr, &mut (retry_at, backoff)| {
            if now < retry_at {
                return true;
            }
            self.quiet.insert(addr.clone(), Quiet { deadline: now + PROBE, backoff });
            due.reconnect.push(addr.clone());
            false
        });
        due.close.sort();
        due.reconnect.sort();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_endpoint_is_closed_then_probed_less_and_less_often() {
        let start = Instant::now();
        let mut dormancy = Dormancy::default();
        dormancy.quiet("a", start);
        assert_eq!(dormancy.due(start + PATIENCE / 2), Due::default());
        let closed = dormancy.due(start + PATIENCE);
        assert_eq!(closed.close, vec!["a".to_string()]);
        assert_eq!(dormancy.dormant.len(), 1);
        let mut now = start + PATIENCE;
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let mut waited = Duration::ZERO;
            while dormancy.due(now + waited).reconnect.is_empty() {
                waited += Duration::from_secs(1);
            }
            gaps.push(waited.as_secs());
            now += waited;
            assert_eq!(dormancy.due(now + PROBE).close, vec!["a".to_string()], "a failed probe closes again");
            now += PROBE;
        }
        assert_eq!(gaps, vec![10, 20, 40, 60, 60]);
    }

    #[test]
    fn a_worker_that_answers_or_leaves_discovery_is_no_longer_tracked() {
        let start = Instant::now();
        let mut dormancy = Dormancy::default();
        dormancy.quiet("a", start);
        dormancy.quiet("b", start);
        dormancy.alive("a");
        dormancy.forget("b");
        assert_eq!(dormancy.due(start + PATIENCE * 10), Due::default());
        // A lost worker gets the full patience again, then the first backoff.
        dormancy.quiet("a", start);
        let due = dormancy.due(start + PATIENCE);
        assert_eq!(due.close, vec!["a".to_string()]);
        assert!(dormancy.due(start + PATIENCE + FIRST_BACKOFF).reconnect == vec!["a".to_string()]);
    }
}
