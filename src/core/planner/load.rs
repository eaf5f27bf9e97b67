//! Load-based scaling, for when no performance profile says what a worker can take: each interval, every
//! role moves by at most one worker, on the KV pressure its workers report.
//!
//! A pool's pressure is the KV its requests need over the KV it has: blocks the running requests hold, plus
//! what the queued ones will need (each estimated at the running requests' mean, since a worker reports how
//! many wait, not how long their prompts are), over every worker's blocks. Past 1 requests queue for KV.
//! A role scales up when the interval's mean pressure is past `up`; down when every sample was under `down`
//! and the load spread over one worker fewer would still stay under `up`, so that a step down is never
//! undone by the next interval's step up.
use crate::core::protocol::LoadMetrics;

/// Where load-based scaling moves a role.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Mean pressure past which a role gets one more worker.
    pub up: f64,
    /// Pressure every sample must stay under for a role to lose one.
    pub down: f64,
}

impl Default for Thresholds {
    /// Dynamo's "throughput" thresholds for decode (up past 1, down under 0.6): add a worker once requests
    /// queue for KV.
    fn default() -> Self {
        Self { up: 1.0, down: 0.6 }
    }
}

/// The fewest and most workers a role may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: usize,
    pub max: usize,
}

impl Bounds {
    pub fn clamp(&self, workers: usize) -> usize {
        workers.clamp(self.min, self.max.max(self.min))
    }
}

/// One role's workers at one moment, as their load reports say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolSample {
    /// Workers that answer and have reported their load.
    pub workers: usize,
    /// KV blocks the pool's requests need: held by running ones, estimated for queued ones.
    pub kv_demand: f64,
    pub kv_capacity: f64,
    pub running: u64,
    pub waiting: u64,
}

impl PoolSample {
    pub fn add(&mut self, load: &LoadMetrics) {
        let per_request = match load.requests_running {
            0 => 1.0,
            running => load.kv_active_blocks as f64 / f64::from(running),
        };
        self.workers += 1;
        self.kv_demand += load.kv_active_blocks as f64 + f64::from(load.requests_waiting) * per_request;
        self.kv_capacity += load.kv_total_blocks as f64;
        self.running += u64::from(load.requests_running);
        self.waiting += u64::from(load.requests_waiting);
    }

    /// KV needed over KV there is; `None` for a pool with no capacity reported.
    pub fn pressure(&self) -> Option<f64> {
        (self.kv_capacity > 0.0).then(|| self.kv_demand / self.kv_capacity)
    }
}

/// How many workers a role should have next, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub workers: usize,
    pub reason: String,
}

/// The next size of a role that has `current` workers, from its samples over the interval (oldest first).
/// Samples taken while the pool had another size than `current` are not its load: they are skipped.
pub fn step(samples: &[PoolSample], current: usize, bounds: Bounds, thresholds: Thresholds) -> Step {
    let hold = |reason: String| Step { workers: bounds.clamp(current), reason };
    let pressures: Vec<f64> =
        samples.iter().filter(|s| s.workers == current).filter_map(PoolSample::pressure).collect();
    if current < bounds.min || current > bounds.max.max(bounds.min) {
        return hold(format!("{current} workers, outside {}..={}", bounds.min, bounds.max));
    }
    if pressures.len() < MIN_SAMPLES {
        return hold(format!("{} load samples of {current} workers, too few to judge", pressures.len()));
    }
    let mean = pressures.iter().sum::<f64>() / pressures.len() as f64;
    let peak = pressures.iter().copied().fold(0.0, f64::max);
    if mean > thresholds.up {
        if current >= bounds.max {
            return hold(format!(
                "KV pressure {mean:.2} past {:.2}, but at the most workers ({current})",
                thresholds.up
            ));
        }
        return Step { workers: current + 1, reason: format!("KV pressure {mean:.2} past {:.2}", thresholds.up) };
    }
    if current > bounds.min && current > 1 && peak < thresholds.down {
        let spread = peak * current as f64 / (current - 1) as f64;
        if spread < thresholds.up {
            return Step {
                workers: current - 1,
                reason: format!("KV pressure at most {peak:.2}, under {:.2}", thresholds.down),
            };
        }
        return hold(format!("KV pressure {peak:.2} would be {spread:.2} on one worker fewer"));
    }
    hold(format!("KV pressure {mean:.2} (peak {peak:.2})"))
}

/// Samples a decision needs at least (Dynamo's load planner waits for 5 observations).
pub const MIN_SAMPLES: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(workers: usize, pressure: f64) -> PoolSample {
        let capacity = 100.0 * workers as f64;
        PoolSample { workers, kv_demand: pressure * capacity, kv_capacity: capacity, running: 0, waiting: 0 }
    }

    const BOUNDS: Bounds = Bounds { min: 1, max: 4 };

    #[test]
    fn queued_requests_count_at_the_running_ones_mean() {
        let mut pool = PoolSample::default();
        let load = |running, waiting, active| LoadMetrics {
            requests_running: running,
            requests_waiting: waiting,
            kv_active_blocks: active,
            kv_cached_blocks: 7,
            kv_total_blocks: 100,
            ..LoadMetrics::default()
        };
        pool.add(&load(4, 2, 80));
        pool.add(&load(0, 0, 0));
        // 80 held + 2 × 20 estimated, over 200.
        assert_eq!((pool.workers, pool.waiting, pool.pressure()), (2, 2, Some(0.6)));
        assert_eq!(PoolSample::default().pressure(), None);
    }

    #[test]
    fn a_role_moves_one_worker_per_interval_up_under_pressure_and_down_when_idle() {
        let t = Thresholds::default();
        assert_eq!(step(&[sample(2, 1.2); 6], 2, BOUNDS, t).workers, 3);
        assert_eq!(step(&[sample(4, 1.5); 6], 4, BOUNDS, t).workers, 4, "at the most workers");
        assert_eq!(step(&[sample(3, 0.1); 6], 3, BOUNDS, t).workers, 2);
        assert_eq!(step(&[sample(1, 0.0); 6], 1, BOUNDS, t).workers, 1, "at the fewest");
        assert_eq!(step(&[sample(3, 0.8); 6], 3, BOUNDS, t).workers, 3, "between the thresholds");
    }

    #[test]
    fn a_step_down_is_taken_only_when_one_worker_fewer_would_not_step_up_again() {
        let t = Thresholds::default();
        // 0.55 on two workers is 1.1 on one: past `up`.
        let held = step(&[sample(2, 0.55); 6], 2, BOUNDS, t);
        assert_eq!(held.workers, 2, "{}", held.reason);
        // One busy sample keeps the role as it is.
        let mut samples = vec![sample(3, 0.1); 6];
        samples[3] = sample(3, 0.7);
        assert_eq!(step(&samples, 3, BOUNDS, t).workers, 3);
    }

    #[test]
    fn samples_of_another_pool_size_or_too_few_decide_nothing() {
        let t = Thresholds::default();
        let mut samples = vec![sample(1, 2.0); 4];
        samples.extend([sample(2, 2.0); MIN_SAMPLES - 1]);
        let held = step(&samples, 2, BOUNDS, t);
        assert_eq!(held.workers, 2, "{}", held.reason);
        assert!(held.reason.contains("too few"), "{}", held.reason);
        // A pool outside its bounds (set tighter since) is brought into them first.
        assert_eq!(step(&[sample(6, 0.5); 6], 6, BOUNDS, t).workers, 4);
        assert_eq!(step(&[], 0, BOUNDS, t).workers, 1);
    }
}
