//! Load forecasts: each predictor is fed one observation per interval (requests, input tokens or output
//! tokens in it) and forecasts the next interval's. Forecasts are never negative.
//!
//! - `constant`: the last value.
//! - `mavg-N`: the mean of the last N values.
//! - `ewma-A`: an exponentially weighted mean, A the weight of the newest value.
//! - `kalman`: a local-linear-trend Kalman filter, optionally in log1p space. The state is x = [level, trend]
//!   with covariance P; each interval
//!   - predicts x ← F·x, P ← F·P·Fᵀ + Q, with F = [[1, 1], [0, 1]] and Q = diag(q_level, q_trend);
//!   - forecasts z = level (the observation is the level: H = [1, 0]);
//!   - updates with the observation z: innovation y = z − level, S = P₀₀ + r, gain K = [P₀₀, P₁₀] / S,
//!     x ← x + K·y, P ← (I − K·H)·P.
//!
//!   It starts at x = [z₀, 0], P = 1000·I. Its noise is either fixed (Dynamo's defaults are q_level 1,
//!   q_trend 0.1, r 10, in the observation's units, whatever its scale) or adapted from the innovations:
//!   with C the running mean of y² (innovation-based estimation), r = max(C − P₀₀⁻, ε) and Q keeps
//!   Dynamo's ratios to it (q_level = r/10, q_trend = r/100), so the filter weighs a series of any scale
//!   as Dynamo's defaults weigh one whose noise is about 10.
//! - `auto`: runs `constant`, `mavg-5`, `ewma-0.3`, `ewma-0.5` and `kalman` side by side and forecasts with
//!   whichever has the lowest recent error (each one's absolute errors, exponentially weighted): no single
//!   predictor is best on every series and interval, and a series' character changes over a day.
use std::collections::VecDeque;

/// One interval-ahead forecaster of a non-negative series.
pub trait Predictor: Send {
    fn name(&self) -> String;
    /// The value of the interval that just ended.
    fn observe(&mut self, value: f64);
    /// The next interval's value; `None` before the first observation.
    fn forecast(&self) -> Option<f64>;
}

/// Builds a predictor from its name: `constant`, `mavg-N`, `ewma-A`, `kalman` (Dynamo's default noise),
/// `kalman-log1p`, `kalman-adaptive`, `kalman-adaptive-log1p`.
pub fn by_name(name: &str) -> Result<Box<dyn Predictor>, String> {
    let number = |prefix: &str| name.strip_prefix(prefix).and_then(|n| n.parse::<f64>().ok());
    let predictor: Box<dyn Predictor> = match name {
        "constant" => Box::new(Constant::default()),
        "auto" => Box::new(Auto::new()),
        "kalman" => Box::new(Kalman::new(Noise::DYNAMO, false)),
        "kalman-log1p" => Box::new(Kalman::new(Noise::DYNAMO, true)),
        "kalman-adaptive" => Box::new(Kalman::new(Noise::Adaptive, false)),
        "kalman-adaptive-log1p" => Box::new(Kalman::new(Noise::Adaptive, true)),
        _ => match (number("mavg-"), number("ewma-")) {
            (Some(window), _) if window >= 1.0 && window.fract() == 0.0 => {
                Box::new(MovingAverage::new(window as usize))
            }
            (_, Some(alpha)) if alpha > 0.0 && alpha <= 1.0 => Box::new(Ewma::new(alpha)),
            _ => {
                return Err(format!(
                    "unknown predictor {name:?}: use auto, constant, mavg-N (N ≥ 1), ewma-A (0 < A ≤ 1), kalman, \
                     kalman-log1p, kalman-adaptive or kalman-adaptive-log1p"
                ));
            }
        },
    };
    Ok(predictor)
}

#[derive(Debug, Default)]
pub struct Constant(Option<f64>);

impl Predictor for Constant {
    fn name(&self) -> String {
        "constant".into()
    }

    fn observe(&mut self, value: f64) {
        self.0 = Some(value.max(0.0));
    }

    fn forecast(&self) -> Option<f64> {
        self.0
    }
}

#[derive(Debug)]
pub struct MovingAverage {
    window: usize,
    values: VecDeque<f64>,
    sum: f64,
}

impl MovingAverage {
    pub fn new(window: usize) -> Self {
        Self { window: window.max(1), values: VecDeque::new(), sum: 0.0 }
    }
}

impl Predictor for MovingAverage {
    fn name(&self) -> String {
        format!("mavg-{}", self.window)
    }

    fn observe(&mut self, value: f64) {
        self.values.push_back(value.max(0.0));
        if self.values.len() > self.window {
            self.values.pop_front();
        }
        // Summed again rather than kept running, so rounding never drifts over a long series.
        self.sum = self.values.iter().sum();
    }

    fn forecast(&self) -> Option<f64> {
        (!self.values.is_empty()).then(|| self.sum / self.values.len() as f64)
    }
}

#[derive(Debug)]
pub struct Ewma {
    alpha: f64,
    mean: Option<f64>,
}

impl Ewma {
    pub fn new(alpha: f64) -> Self {
        Self { alpha: alpha.clamp(f64::MIN_POSITIVE, 1.0), mean: None }
    }
}

impl Predictor for Ewma {
    fn name(&self) -> String {
        format!("ewma-{}", self.alpha)
    }

    fn observe(&mut self, value: f64) {
        let value = value.max(0.0);
        self.mean = Some(self.mean.map_or(value, |mean| mean + self.alpha * (value - mean)));
    }

    fn forecast(&self) -> Option<f64> {
        self.mean
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Noise {
    Fixed { q_level: f64, q_trend: f64, r: f64 },
    Adaptive,
}

impl Noise {
    /// Dynamo's planner defaults.
    pub const DYNAMO: Noise = Noise::Fixed { q_level: 1.0, q_trend: 0.1, r: 10.0 };
}

/// The local-linear-trend filter of the module's doc.
#[derive(Debug)]
pub struct Kalman {
    noise: Noise,
    log1p: bool,
    /// [level, trend], after the last update.
    x: [f64; 2],
    p: [[f64; 2]; 2],
    started: bool,
    /// Adaptive noise: the running mean of squared innovations, and the noise it gives.
    innovation_power: f64,
    adapted: (f64, f64, f64),
}

/// How fast the adaptive filter's innovation mean forgets (about the last 1/0.1 = 10 intervals).
const ADAPT_RATE: f64 = 0.1;
/// q_level / r and q_trend / r of Dynamo's defaults, kept when the adaptive filter rescales them.
const LEVEL_TO_MEASUREMENT: f64 = 0.1;
const TREND_TO_MEASUREMENT: f64 = 0.01;

impl Kalman {
    pub fn new(noise: Noise, log1p: bool) -> Self {
        Self {
            noise,
            log1p,
            x: [0.0; 2],
            p: [[1000.0, 0.0], [0.0, 1000.0]],
            started: false,
            innovation_power: 0.0,
            adapted: (1.0, 0.1, 10.0),
        }
    }

    fn noise(&self) -> (f64, f64, f64) {
        match self.noise {
            Noise::Fixed { q_level, q_trend, r } => (q_level, q_trend, r),
            Noise::Adaptive => self.adapted,
        }
    }

    /// The state and covariance one interval ahead.
    fn predicted(&self) -> ([f64; 2], [[f64; 2]; 2]) {
        let (q_level, q_trend, _) = self.noise();
        let [level, trend] = self.x;
        let [[p00, p01], [p10, p11]] = self.p;
        let x = [level + trend, trend];
        let p = [[p00 + p01 + p10 + p11 + q_level, p01 + p11], [p10 + p11, p11 + q_trend]];
        (x, p)
    }
}

impl Predictor for Kalman {
    fn name(&self) -> String {
        let noise = match self.noise {
            Noise::Fixed { q_level, q_trend, r } => format!("q {q_level}/{q_trend} r {r}"),
            Noise::Adaptive => "adaptive".into(),
        };
        format!("kalman ({noise}{})", if self.log1p { ", log1p" } else { "" })
    }

    fn observe(&mut self, value: f64) {
        let z = if self.log1p { value.max(0.0).ln_1p() } else { value.max(0.0) };
        if !self.started {
            self.started = true;
            self.x = [z, 0.0];
            return;
        }
        let (x, p) = self.predicted();
        let (_, _, r) = self.noise();
        let y = z - x[0];
        let s = p[0][0] + r;
        let k = [p[0][0] / s, p[1][0] / s];
        self.x = [x[0] + k[0] * y, x[1] + k[1] * y];
        self.p =
            [[(1.0 - k[0]) * p[0][0], (1.0 - k[0]) * p[0][1]], [p[1][0] - k[1] * p[0][0], p[1][1] - k[1] * p[0][1]]];
        if self.noise == Noise::Adaptive {
            self.innovation_power += ADAPT_RATE * (y * y - self.innovation_power);
            let c = self.innovation_power;
            let r = (c - p[0][0]).max(1e-6 * (1.0 + z.abs()));
            // Dynamo's ratios of process to measurement noise, at the scale the innovations show.
            self.adapted = (r * LEVEL_TO_MEASUREMENT, r * TREND_TO_MEASUREMENT, r);
        }
    }

    fn forecast(&self) -> Option<f64> {
        if !self.started {
            return None;
        }
        let (x, _) = self.predicted();
        let level = if self.log1p { x[0].exp_m1() } else { x[0] };
        // A falling trend must not forecast negative load (Dynamo's raw-mode filter did: its issue #14493).
        Some(if level.is_finite() { level.max(0.0) } else { 0.0 })
    }
}

/// The candidates `auto` chooses among.
const AUTO_CANDIDATES: [&str; 5] = ["constant", "mavg-5", "ewma-0.3", "ewma-0.5", "kalman"];
/// How fast `auto` forgets a candidate's past errors (about the last 1/0.2 = 5 intervals).
const AUTO_FORGET: f64 = 0.2;

/// Follows the leader: the candidate whose recent one-step errors are lowest.
pub struct Auto {
    candidates: Vec<(Box<dyn Predictor>, f64)>,
}

impl Auto {
    pub fn new() -> Self {
        // The names are this module's own, so they always build.
        let candidates = AUTO_CANDIDATES.iter().filter_map(|name| by_name(name).ok()).map(|p| (p, 0.0)).collect();
        Self { candidates }
    }
}

impl Default for Auto {
    fn default() -> Self {
        Self::new()
    }
}

impl Predictor for Auto {
    fn name(&self) -> String {
        "auto".into()
    }

    fn observe(&mut self, value: f64) {
        for (predictor, error) in &mut self.candidates {
            if let Some(forecast) = predictor.forecast() {
                *error += AUTO_FORGET * ((forecast - value).abs() - *error);
            }
            predictor.observe(value);
        }
    }

    fn forecast(&self) -> Option<f64> {
        // Ties go to the first listed, the simplest.
        let leader = self.candidates.iter().min_by(|a, b| a.1.total_cmp(&b.1))?;
        leader.0.forecast()
    }
}

/// One-step-ahead weighted absolute percentage error of `predictor` on `series`: Σ|forecast − actual| over
/// Σ actual, counting every interval that has a forecast (all but the first). Leading idle intervals are
/// skipped: a trace that starts quiet says nothing about its load. `None` when nothing was forecast or the
/// series is all zeros.
pub fn wape(predictor: &mut dyn Predictor, series: &[f64]) -> Option<f64> {
    let start = series.iter().position(|&v| v > 0.0)?;
    let (mut error, mut total) = (0.0, 0.0);
    for &actual in &series[start..] {
        if let Some(forecast) = predictor.forecast() {
            error += (forecast - actual).abs();
            total += actual;
        }
        predictor.observe(actual);
    }
    (total > 0.0).then_some(error / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(name: &str, values: &[f64]) -> f64 {
        let mut predictor = by_name(name).unwrap();
        values.iter().for_each(|&v| predictor.observe(v));
        predictor.forecast().unwrap()
    }

    #[test]
    fn the_baselines_forecast_what_their_definitions_say() {
        assert_eq!(after("constant", &[3.0, 9.0]), 9.0);
        assert_eq!(after("mavg-2", &[3.0, 9.0, 5.0]), 7.0);
        assert_eq!(after("mavg-5", &[4.0]), 4.0);
        assert!((after("ewma-0.5", &[4.0, 8.0]) - 6.0).abs() < 1e-12);
        assert!(by_name("constant").unwrap().forecast().is_none(), "nothing before the first observation");
        for bad in ["mavg-0", "mavg-1.5", "ewma-0", "ewma-2", "arima"] {
            assert!(by_name(bad).err().is_some_and(|e| e.contains("unknown predictor")), "{bad}");
        }
    }

    #[test]
    fn kalman_follows_a_trend_and_never_forecasts_negative_load() {
        // A steady ramp: the filter learns its slope and forecasts the next step.
        let ramp: Vec<f64> = (0..60).map(|i| 100.0 + 10.0 * i as f64).collect();
        for name in ["kalman", "kalman-adaptive"] {
            let next = after(name, &ramp);
            assert!((next - 700.0).abs() < 5.0, "{name}: {next}");
        }
        // A collapse: the raw trend points below zero; the forecast stops at zero.
        let falling = [1000.0, 600.0, 200.0, 0.0, 0.0];
        for name in ["kalman", "kalman-adaptive", "kalman-log1p", "kalman-adaptive-log1p"] {
            let mut predictor = by_name(name).unwrap();
            for &v in &falling {
                predictor.observe(v);
                assert!(predictor.forecast().is_some_and(|f| f >= 0.0), "{name}");
            }
        }
        let mut raw = Kalman::new(Noise::DYNAMO, false);
        falling.iter().for_each(|&v| raw.observe(v));
        assert!(raw.predicted().0[0] < 0.0, "the unclamped level would be negative here");
    }

    #[test]
    fn adaptive_noise_follows_a_series_of_any_scale() {
        // A level that jumps and stays: the adaptive filter overshoots with the trend it learns, then settles.
        let jump: Vec<f64> = (0..40).map(|i| if i < 20 { 1000.0 } else { 5000.0 }).collect();
        let adaptive = after("kalman-adaptive", &jump[..32]);
        assert!((adaptive - 5000.0).abs() < 500.0, "{adaptive}");
        let wape_adaptive = wape(by_name("kalman-adaptive").unwrap().as_mut(), &jump).unwrap();
        let wape_constant = wape(by_name("constant").unwrap().as_mut(), &jump).unwrap();
        assert!(wape_adaptive < 0.15 && wape_constant < 0.05, "{wape_adaptive} {wape_constant}");
    }

    #[test]
    fn auto_forecasts_with_whichever_candidate_has_been_right_lately() {
        // Alternating load: the last value is always ~100 % wrong, the averages ~60 %.
        let alternating: Vec<f64> = (0..40).map(|i| if i % 2 == 0 { 100.0 } else { 300.0 }).collect();
        let score = |name: &str, series: &[f64]| wape(by_name(name).unwrap().as_mut(), series).unwrap();
        let all: Vec<(&str, f64)> = ["auto", "constant", "mavg-5", "ewma-0.3", "ewma-0.5", "kalman"]
            .map(|n| (n, score(n, &alternating)))
            .to_vec();
        assert!(score("auto", &alternating) < 0.7 * score("constant", &alternating), "{all:?}");
        assert!(score("auto", &alternating) <= score("mavg-5", &alternating) + 0.02, "{all:?}");
        // A level that steps up and stays: the last value is right at once, and auto takes it.
        let steps: Vec<f64> = (0..30).map(|i| 100.0 * (i / 10 + 1) as f64).collect();
        assert_eq!(after("auto", &steps), after("constant", &steps));
    }

    #[test]
    fn wape_skips_idle_leading_intervals_and_scores_one_step_ahead() {
        // Forecasts: 2 (for 4), 4 (for 4): errors 2 + 0 over 8.
        let mut constant = Constant::default();
        assert_eq!(wape(&mut constant, &[0.0, 0.0, 2.0, 4.0, 4.0]), Some(0.25));
        assert_eq!(wape(&mut Constant::default(), &[0.0, 0.0]), None);
    }
}
