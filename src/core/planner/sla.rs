//! Profile-based sizing: the fewest workers each role needs next interval for its latency targets, from the
//! traffic forecast and the workers' performance profile (Dynamo's SLA planner, with queues counted).
//!
//! Requests arrive at random, at λ per second, spread over n workers.
//! - **Prefill** (target: time to first token). A prompt of the forecast mean length takes S ms alone (the
//!   profile, times the prefill correction). A worker busy a fraction ρ = λ·S/n of the time makes a prompt
//!   wait ρ·S / (2(1 − ρ)) on average (M/D/1: random spreading over workers is one such queue each; a
//!   router that balances does better, so this errs on the safe side), and past t with probability about
//!   ρ·e^(−t/m), m = S / (2(1 − ρ)) the mean wait of those that wait. With an attainment share q the target
//!   must hold for a share q of prompts, else for their mean. Dynamo sizes prefill by throughput alone,
//!   λ·S, a pool busy all the time, whose queue (and TTFT) grows without bound.
//! - **Decode** (target: time between tokens). A worker decodes b sequences at once, b = λ/n · OSL · ITL(b)
//!   (Little's law, ITL from the profile at the mean context: prompt plus half the output, divided by the
//!   decode correction's inverse); b varies like a Poisson count, so with an attainment share q the batch
//!   the target must hold for is b + z_q·√b. It must also fit the worker's KV and batch limit.
//! - **Aggregated** workers do both, time-shared: decoding gets the 1 − ρ of the time prefill leaves, so its
//!   ITL is ITL(b) / (1 − ρ).
//!
//! The corrections are observed over expected mean latency in the last interval (Dynamo's correction
//! factors), so a profile that is off (another model, a noisy neighbour) is corrected by what clients see.
use crate::core::engine::profile::Profile;

/// The latency targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Targets {
    pub ttft_ms: f64,
    pub itl_ms: f64,
    /// The share of requests that must meet them (below 1); `None`: their means must.
    pub attainment: Option<f64>,
}

impl Default for Targets {
    /// Dynamo's SLA defaults, for the means.
    fn default() -> Self {
        Self { ttft_ms: 500.0, itl_ms: 50.0, attainment: None }
    }
}

/// More workers than any role is sized to: past it a target is out of reach.
const MOST_WORKERS: usize = 4096;

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

/// The fewest prefill workers that meet the TTFT target with `demand`.
pub fn prefill_workers(
    demand: &Demand,
    profile: &Profile,
    targets: &Targets,
    correction: f64,
) -> Result<usize, String> {
    let service = profile.prefill_ms(demand.prompt_tokens) * correction;
    if service >= targets.ttft_ms {
        return Err(format!(
            "a prompt of {:.0} tokens takes {service:.0} ms alone, past the {:.0} ms TTFT target",
            demand.prompt_tokens, targets.ttft_ms
        ));
    }
    fewest(|n| ttft_within(demand.requests_per_s / n as f64, service, targets))
        .ok_or_else(|| format!("no {MOST_WORKERS} workers meet the TTFT target"))
}

/// Whether prompts taking `service` ms, arriving at `rate` per second at one worker, meet the TTFT target.
fn ttft_within(rate: f64, service: f64, targets: &Targets) -> bool {
    let busy = rate * service / 1000.0;
    if busy >= 1.0 {
        return false;
    }
    let mean_wait_of_waiting = service / (2.0 * (1.0 - busy));
    let slack = targets.ttft_ms - service;
    match targets.attainment {
        None => service + busy * mean_wait_of_waiting <= targets.ttft_ms,
        Some(share) => slack > 0.0 && busy * (-slack / mean_wait_of_waiting).exp() <= 1.0 - share,
    }
}

/// The fewest workers, 1 to `MOST_WORKERS`, for which `enough` holds (it holds for all counts above too).
fn fewest(enough: impl Fn(usize) -> bool) -> Option<usize> {
    if !enough(MOST_WORKERS) {
        return None;
    }
    let (mut low, mut high) = (1, MOST_WORKERS);
    while low < high {
        let middle = (low + high) / 2;
        if enough(middle) { high = middle } else { low = middle + 1 }
    }
    Some(low)
}

/// The mean TTFT the queueing model expects with `workers` prefilling `demand`.
pub fn expected_ttft_ms(demand: &Demand, profile: &Profile, workers: f64) -> f64 {
    let service = profile.prefill_ms(demand.prompt_tokens);
    let busy = (demand.requests_per_s * service / 1000.0 / workers.max(f64::MIN_POSITIVE)).min(0.99);
    service + busy * service / (2.0 * (1.0 - busy))
}

/// The fewest decode workers that meet the ITL target with `demand`.
pub fn decode_workers(demand: &Demand, profile: &Profile, targets: &Targets, correction: f64) -> Result<usize, String> {
    fewest(|n| itl_within(demand.requests_per_s / n as f64, demand, profile, targets, correction, 0.0))
        .ok_or_else(|| out_of_reach(demand, targets))
}

/// The fewest aggregated workers (each prefilling and decoding) that meet both targets with `demand`.
pub fn aggregated_workers(
    demand: &Demand,
    profile: &Profile,
    targets: &Targets,
    corrections: &Corrections,
) -> Result<usize, String> {
    let prefill = prefill_workers(demand, profile, targets, corrections.prefill)?;
    let service = profile.prefill_ms(demand.prompt_tokens) * corrections.prefill;
    fewest(|n| {
        let rate = demand.requests_per_s / n as f64;
        let prefilling = rate * service / 1000.0;
        n >= prefill && itl_within(rate, demand, profile, targets, corrections.decode, prefilling)
    })
    .ok_or_else(|| out_of_reach(demand, targets))
}

fn out_of_reach(demand: &Demand, targets: &Targets) -> String {
    format!(
        "no {MOST_WORKERS} workers decode sequences of {:.0} tokens within the {:.1} ms ITL target (one alone is \
         slower, or does not fit in a worker's KV)",
        demand.context_tokens(),
        targets.itl_ms
    )
}

/// Whether one worker that gets `rate` requests per second of `demand`, and spends a share `prefilling` of
/// its time prefilling, decodes them within the ITL target.
fn itl_within(
    rate: f64,
    demand: &Demand,
    profile: &Profile,
    targets: &Targets,
    correction: f64,
    prefilling: f64,
) -> bool {
    if prefilling >= 1.0 {
        return false;
    }
    let context = demand.context_tokens();
    let itl = |batch: f64| profile.itl_ms(context, batch.max(1.0)) * correction / (1.0 - prefilling);
    let fits = (profile.kv_tokens as f64 / context.max(1.0)).min(f64::from(profile.max_batch));
    // Little's law, iterated to its fixed point: a bigger batch is slower, which makes the batch bigger.
    let mut batch = rate * demand.output_tokens * itl(1.0) / 1000.0;
    for _ in 0..50 {
        let next = rate * demand.output_tokens * itl(batch) / 1000.0;
        if next > fits {
            return false;
        }
        if (next - batch).abs() < 1e-6 {
            break;
        }
        batch = next;
    }
    let peak = match targets.attainment {
        None => batch,
        Some(share) => batch + normal_quantile(share) * batch.sqrt(),
    };
    peak <= fits && itl(peak) <= targets.itl_ms
}

/// The standard normal's quantile at `share` (0.5 to 1; Abramowitz and Stegun 26.2.23, within 4.5e-4).
fn normal_quantile(share: f64) -> f64 {
    let tail = (1.0 - share).clamp(1e-12, 0.5);
    let t = (-2.0 * tail.ln()).sqrt();
    t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
}

/// The ITL a decode worker has with `running` sequences of `demand`'s mean context.
pub fn expected_itl_ms(demand: &Demand, profile: &Profile, running: f64) -> f64 {
    profile.itl_ms(demand.context_tokens(), running.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::mocker(&crate::core::engine::mocker::MockerConfig::default())
    }

    const DEMAND: Demand = Demand { requests_per_s: 10.0, prompt_tokens: 2048.0, output_tokens: 200.0 };

    #[test]
    fn prefill_workers_are_the_fewest_whose_queue_keeps_ttft_within_the_target() {
        let profile = profile();
        let demand = Demand { requests_per_s: 40.0, ..DEMAND };
        let targets = Targets { ttft_ms: 120.0, ..Targets::default() };
        let workers = prefill_workers(&demand, &profile, &targets, 1.0).unwrap();
        assert!(expected_ttft_ms(&demand, &profile, workers as f64) <= 120.0);
        assert!(expected_ttft_ms(&demand, &profile, (workers - 1) as f64) > 120.0, "{workers} is the fewest");
        // Busy all the time (Dynamo's count) would be fewer workers and an unbounded queue.
        let busy = demand.requests_per_s * profile.prefill_ms(2048.0) / 1000.0;
        assert!(workers as f64 > busy.ceil(), "{workers} workers, {busy} busy");
        // 95% within the target needs more than the mean within it; a slower profile needs more too.
        let strict = Targets { attainment: Some(0.95), ..targets };
        assert!(prefill_workers(&demand, &profile, &strict, 1.0).unwrap() > workers);
        assert!(prefill_workers(&demand, &profile, &targets, 1.5).unwrap() > workers);
        let error = prefill_workers(&demand, &profile, &Targets { ttft_ms: 10.0, ..targets }, 1.0).unwrap_err();
        assert!(error.contains("past the 10 ms TTFT target"), "{error}");
    }

    #[test]
    fn decode_workers_are_the_fewest_whose_batch_decodes_within_the_itl_target() {
        let profile = profile();
        let demand = Demand { requests_per_s: 200.0, ..DEMAND };
        let targets = Targets { itl_ms: 12.0, ..Targets::default() };
        let workers = decode_workers(&demand, &profile, &targets, 1.0).unwrap();
        assert!(workers > 1, "{workers}");
        let within = |n: usize, targets: &Targets| itl_within(200.0 / n as f64, &demand, &profile, targets, 1.0, 0.0);
        assert!(within(workers, &targets) && !within(workers - 1, &targets));
        // Clients seeing a slower ITL than the profile's, or a share that must meet it: more workers.
        assert!(decode_workers(&demand, &profile, &targets, 1.5).unwrap() > workers);
        let strict = Targets { attainment: Some(0.95), ..targets };
        assert!(decode_workers(&demand, &profile, &strict, 1.0).unwrap() > workers);
        assert!(decode_workers(&demand, &profile, &Targets { itl_ms: 1.0, ..targets }, 1.0).is_err());
    }

    #[test]
    fn aggregated_workers_prefill_and_decode_in_the_same_time() {
        let profile = profile();
        let demand = Demand { requests_per_s: 200.0, ..DEMAND };
        let targets = Targets { ttft_ms: 500.0, itl_ms: 12.0, attainment: Some(0.95) };
        let corrections = Corrections::default();
        let aggregated = aggregated_workers(&demand, &profile, &targets, &corrections).unwrap();
        let prefill = prefill_workers(&demand, &profile, &targets, 1.0).unwrap();
        let decode = decode_workers(&demand, &profile, &targets, 1.0).unwrap();
        assert!(aggregated >= prefill.max(decode), "{aggregated} against {prefill} and {decode}");
        assert!(aggregated > decode, "prefilling takes time the decode would have had");
    }

    #[test]
    fn the_normal_quantile_is_close() {
        for (share, z) in [(0.5, 0.0), (0.9, 1.2816), (0.95, 1.6449), (0.99, 2.3263)] {
            assert!((normal_quantile(share) - z).abs() < 1e-3, "{share}: {}", normal_quantile(share));
        }
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
