//! Profile-based sizing: the workers each role needs next interval for its latency target, from the traffic
//! forecast and the workers' performance profile (Dynamo's SLA planner, with the prefill queue counted).
//!
//! - **Prefill** (target: time to first token). A prompt of the forecast mean length takes S ms alone
//!   (the profile, times the prefill correction). Prompts arrive at random, so they queue: with each worker
//!   busy a fraction ρ of the time, a prompt waits ρ·S / (2(1 − ρ)) on average (an M/D/1 queue per worker,
//!   which random spreading over workers is; a router that balances does better, so this errs on the safe
//!   side). TTFT ≤ target holds for ρ ≤ 2k / (1 + 2k), k = (target − S) / S, and the workers needed are the
//!   busy time per second, λ·S, over that ρ. Dynamo divides by throughput alone, which sizes a pool to be
//!   busy all the time, where its queue, and TTFT, grows without bound.
//! - **Decode** (target: time between tokens). Sequences of the forecast mean context (prompt plus half the
//!   output) decode at most B at a time within the target ITL (divided by the decode correction), giving
//!   T tokens/s per worker; the workers needed are λ·OSL / T.
//! - **Aggregated** workers do both, time-shared: the sum of the two (a worker busy prefilling a fraction of
//!   its time decodes the rest).
//!
//! The corrections are observed over expected latency in the last interval (Dynamo's correction factors),
//! so a profile that is off (another model, a noisy neighbour) is corrected by what clients see.
use super::profile::Profile;

/// The latency targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Targets {
    pub ttft_ms: f64,
    pub itl_ms: f64,
}

impl Default for Targets {
    /// Dynamo's SLA defaults.
    fn default() -> Self {
        Self { ttft_ms: 500.0, itl_ms: 50.0 }
    }
}

/// Traffic of one interval, as rates and means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    pub requests_per_s: f64,
    pub prompt_tokens: f64,
    pub output_tokens: f64,
}

impl Demand {
    /// From an interval's totals; `None` for an interval without requests.
    pub fn per_interval(requests: f64, input_tokens: f64, output_tokens: f64, seconds: f64) -> Option<Self> {
        (requests > 0.0 && seconds > 0.0).then(|| Self {
            requests_per_s: requests / seconds,
            prompt_tokens: input_tokens / requests,
            output_tokens: output_tokens / requests,
        })
    }

    /// The mean context a decoding sequence has: its prompt and half its output.
    pub fn context_tokens(&self) -> f64 {
        self.prompt_tokens + self.output_tokens / 2.0
    }
}

/// Observed over expected latency; 1 when the profile is right.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Corrections {
    pub prefill: f64,
    pub decode: f64,
}

impl Default for Corrections {
    fn default() -> Self {
        Self { prefill: 1.0, decode: 1.0 }
    }
}

/// Corrections stay within this factor of 1: one odd interval must not swing the plan wildly.
pub const CORRECTION_LIMIT: f64 = 4.0;

pub fn bounded_correction(observed: f64, expected: f64) -> Option<f64> {
    let ratio = observed / expected;
    (ratio.is_finite() && ratio > 0.0).then(|| ratio.clamp(1.0 / CORRECTION_LIMIT, CORRECTION_LIMIT))
}

/// Prefill workers needed (fractional) for `demand` to meet the TTFT target.
pub fn prefill_workers(demand: &Demand, profile: &Profile, targets: &Targets, correction: f64) -> Result<f64, String> {
    let service = profile.prefill_ms(demand.prompt_tokens) * correction;
    if service >= targets.ttft_ms {
        return Err(format!(
            "a prompt of {:.0} tokens takes {service:.0} ms alone, past the {:.0} ms TTFT target",
            demand.prompt_tokens, targets.ttft_ms
        ));
    }
    Ok(demand.requests_per_s * service / 1000.0 / max_busy(service, targets.ttft_ms))
}

/// The busy fraction at which a worker's mean TTFT, queueing included, is the target.
fn max_busy(service_ms: f64, ttft_target_ms: f64) -> f64 {
    let k = (ttft_target_ms - service_ms) / service_ms;
    2.0 * k / (1.0 + 2.0 * k)
}

/// The mean TTFT the queueing model expects with `workers` prefilling `demand`.
pub fn expected_ttft_ms(demand: &Demand, profile: &Profile, workers: f64) -> f64 {
    let service = profile.prefill_ms(demand.prompt_tokens);
    let busy = (demand.requests_per_s * service / 1000.0 / workers.max(f64::MIN_POSITIVE)).min(0.99);
    service + busy * service / (2.0 * (1.0 - busy))
}

/// Decode workers needed (fractional) for `demand` to meet the ITL target.
pub fn decode_workers(demand: &Demand, profile: &Profile, targets: &Targets, correction: f64) -> Result<f64, String> {
    let context = demand.context_tokens();
    let target = targets.itl_ms / correction;
    let Some((tokens_per_s, _)) = profile.decode_capacity(context, target) else {
        return Err(format!(
            "one sequence of {context:.0} tokens decodes slower than the {target:.1} ms ITL target (or does not \
             fit in a worker's KV)"
        ));
    };
    Ok(demand.requests_per_s * demand.output_tokens / tokens_per_s)
}

/// The ITL a decode worker has with `running` sequences of `demand`'s mean context.
pub fn expected_itl_ms(demand: &Demand, profile: &Profile, running: f64) -> f64 {
    profile.itl_ms(demand.context_tokens(), running.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::mocker(16_384 * 16, 256, 1.0)
    }

    const DEMAND: Demand = Demand { requests_per_s: 10.0, prompt_tokens: 2048.0, output_tokens: 200.0 };

    #[test]
    fn prefill_workers_keep_the_mean_ttft_at_the_target_with_the_queue() {
        let profile = profile();
        let targets = Targets::default();
        let workers = prefill_workers(&DEMAND, &profile, &targets, 1.0).unwrap();
        let ttft = expected_ttft_ms(&DEMAND, &profile, workers);
        assert!((ttft - targets.ttft_ms).abs() < 1e-6, "{ttft} ms with {workers} workers");
        // Busy all the time (Dynamo's count) would be fewer workers and an unbounded queue.
        let busy = DEMAND.requests_per_s * profile.prefill_ms(2048.0) / 1000.0;
        assert!(workers > busy);
        // Twice the traffic, twice the workers; a profile twice too fast, more.
        let double = Demand { requests_per_s: 20.0, ..DEMAND };
        assert!((prefill_workers(&double, &profile, &targets, 1.0).unwrap() - 2.0 * workers).abs() < 1e-9);
        assert!(prefill_workers(&DEMAND, &profile, &targets, 2.0).unwrap() > 2.0 * workers);
        let error = prefill_workers(&DEMAND, &profile, &Targets { ttft_ms: 10.0, ..targets }, 1.0).unwrap_err();
        assert!(error.contains("past the 10 ms TTFT target"), "{error}");
    }

    #[test]
    fn decode_workers_carry_the_output_tokens_at_the_best_batch_within_the_itl_target() {
        let profile = profile();
        let targets = Targets { itl_ms: 30.0, ..Targets::default() };
        let workers = decode_workers(&DEMAND, &profile, &targets, 1.0).unwrap();
        let (tokens_per_s, batch) = profile.decode_capacity(DEMAND.context_tokens(), 30.0).unwrap();
        assert!((workers * tokens_per_s - 10.0 * 200.0).abs() < 1e-6);
        assert!(expected_itl_ms(&DEMAND, &profile, batch) <= 30.0);
        // Clients seeing twice the ITL the profile says: the target is halved, so more workers.
        assert!(decode_workers(&DEMAND, &profile, &targets, 2.0).unwrap() > workers);
        assert!(decode_workers(&DEMAND, &profile, &Targets { itl_ms: 1.0, ..targets }, 1.0).is_err());
    }

    #[test]
    fn demand_and_corrections_are_read_safely() {
        assert_eq!(Demand::per_interval(0.0, 0.0, 0.0, 10.0), None);
        let demand = Demand::per_interval(20.0, 40_000.0, 4_000.0, 10.0).unwrap();
        assert_eq!(demand, Demand { requests_per_s: 2.0, prompt_tokens: 2000.0, output_tokens: 200.0 });
        assert_eq!(bounded_correction(100.0, 50.0), Some(2.0));
        assert_eq!(bounded_correction(1000.0, 1.0), Some(CORRECTION_LIMIT));
        assert_eq!(bounded_correction(1.0, 0.0), None);
        assert_eq!(bounded_correction(0.0, 10.0), None);
    }
}
