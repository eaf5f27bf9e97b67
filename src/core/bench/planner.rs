//! `dynamo bench planner`: one-step-ahead forecast error (WAPE) of every load predictor on a trace's
//! requests, input tokens and output tokens per interval, in one run, with the best of each marked.
//!
//! Traces: Mooncake JSONL (`timestamp` ms, `input_length`, `output_length`) or the Azure LLM inference CSV
//! (`TIMESTAMP`, `ContextTokens`, `GeneratedTokens`).
use crate::core::planner::forecast::{self, wape};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The predictor the planner uses unless told otherwise.
pub const DEFAULT_PREDICTOR: &str = "auto";

/// Every predictor the bench compares: the default, the baselines it must stay within a point of, and the
/// Kalman filters (Dynamo's default noise, and adapted).
pub const PREDICTORS: [&str; 9] = [
    "auto",
    "constant",
    "mavg-5",
    "ewma-0.3",
    "ewma-0.5",
    "kalman",
    "kalman-log1p",
    "kalman-adaptive",
    "kalman-adaptive-log1p",
];

/// One request of a trace: seconds from its start, prompt and output tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    pub at_s: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadTraceError {
    #[error(transparent)]
    Mooncake(#[from] super::trace::TraceError),
    #[error("cannot read trace {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {what}; an Azure trace has the columns TIMESTAMP,ContextTokens,GeneratedTokens")]
    Azure { path: PathBuf, line: usize, what: String },
}

/// Reads a Mooncake JSONL trace, or an Azure CSV one (recognised by its header).
pub fn load_arrivals(path: &Path) -> Result<Vec<Arrival>, LoadTraceError> {
    let io = |source| LoadTraceError::Io { path: path.into(), source };
    let text = std::fs::read_to_string(path).map_err(io)?;
    if !text.trim_start().starts_with("TIMESTAMP") {
        let requests = super::trace::load(path)?;
        let arrivals = requests.iter().map(|r| Arrival {
            at_s: r.timestamp as f64 / 1000.0,
            input_tokens: r.input_length,
            output_tokens: r.output_length,
        });
        return Ok(arrivals.collect());
    }
    parse_azure(path, &text)
}

fn parse_azure(path: &Path, text: &str) -> Result<Vec<Arrival>, LoadTraceError> {
    let error = |line: usize, what: String| LoadTraceError::Azure { path: path.into(), line, what };
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| error(1, "no header".into()))?;
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |name: &str| {
        columns.iter().position(|c| *c == name).ok_or_else(|| error(1, format!("no {name} column in {header:?}")))
    };
    let (time, input, output) = (column("TIMESTAMP")?, column("ContextTokens")?, column("GeneratedTokens")?);
    let mut first = None;
    let mut arrivals = Vec::new();
    for (i, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let field =
            |at: usize| fields.get(at).copied().ok_or_else(|| error(i + 1, format!("too few fields: {line:?}")));
        let stamp = field(time)?;
        let moment = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.f")
            .map_err(|e| error(i + 1, format!("timestamp {stamp:?}: {e}")))?;
        let number = |at: usize| -> Result<u64, LoadTraceError> {
            let text = field(at)?;
            text.parse().map_err(|_| error(i + 1, format!("{text:?} is not a token count")))
        };
        let start = *first.get_or_insert(moment);
        let at_s = (moment - start).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        arrivals.push(Arrival { at_s, input_tokens: number(input)?, output_tokens: number(output)? });
    }
    if arrivals.is_empty() {
        return Err(error(1, "no requests".into()));
    }
    Ok(arrivals)
}

/// What one interval saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Interval {
    pub requests: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
}

/// The trace cut into intervals of `interval_s` from its first arrival, empty ones included.
pub fn intervals(arrivals: &[Arrival], interval_s: f64) -> Vec<Interval> {
    let start = arrivals.iter().map(|a| a.at_s).fold(f64::INFINITY, f64::min);
    let mut bins: Vec<Interval> = Vec::new();
    for arrival in arrivals {
        let at = ((arrival.at_s - start) / interval_s).floor().max(0.0) as usize;
        if bins.len() <= at {
            bins.resize(at + 1, Interval::default());
        }
        bins[at].requests += 1.0;
        bins[at].input_tokens += arrival.input_tokens as f64;
        bins[at].output_tokens += arrival.output_tokens as f64;
    }
    bins
}

#[derive(Debug, Clone, Serialize)]
pub struct ForecastResult {
    pub interval_s: f64,
    pub series: &'static str,
    pub predictor: String,
    /// Weighted absolute percentage error, as a fraction; `None` when the series had nothing to forecast.
    pub wape: Option<f64>,
}

pub fn run(arrivals: &[Arrival], interval_s: &[f64]) -> Vec<ForecastResult> {
    let mut results = Vec::new();
    for &interval in interval_s {
        let bins = intervals(arrivals, interval);
        let series: [(&'static str, Vec<f64>); 3] = [
            ("requests", bins.iter().map(|b| b.requests).collect()),
            ("input_tokens", bins.iter().map(|b| b.input_tokens).collect()),
            ("output_tokens", bins.iter().map(|b| b.output_tokens).collect()),
        ];
        for (name, values) in &series {
            for predictor in PREDICTORS {
                // The names are this module's own, so they always build.
                let Ok(mut built) = forecast::by_name(predictor) else { continue };
                let wape = wape(built.as_mut(), values);
                results.push(ForecastResult { interval_s: interval, series: name, predictor: predictor.into(), wape });
            }
        }
    }
    results
}

/// The readable report: one row per interval and series, one column per predictor, the best marked `*`.
pub fn table(results: &[ForecastResult]) -> String {
    let mut out = format!("{:>9} {:<14}", "interval", "series");
    for predictor in PREDICTORS {
        out.push_str(&format!(" {predictor:>22}"));
    }
    out.push('\n');
    for row in results.chunks(PREDICTORS.len()) {
        let best = row.iter().filter_map(|r| r.wape).fold(f64::INFINITY, f64::min);
        out.push_str(&format!("{:>8}s {:<14}", row[0].interval_s, row[0].series));
        for r in row {
            let cell = match r.wape {
                Some(w) => format!("{:.1}%{}", w * 100.0, if w == best { "*" } else { " " }),
                None => "-".into(),
            };
            out.push_str(&format!(" {cell:>22}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_traces_are_read_by_their_columns_and_bad_rows_named() {
        let dir = std::env::temp_dir().join(format!("dynamo-azure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.csv");
        std::fs::write(
            &good,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n\
             2023-11-16 18:15:50.1805900,396,109\n",
        )
        .unwrap();
        let arrivals = load_arrivals(&good).unwrap();
        assert_eq!(arrivals.len(), 2);
        assert!((arrivals[1].at_s - 3.5).abs() < 1e-6);
        assert_eq!((arrivals[1].input_tokens, arrivals[1].output_tokens), (396, 109));
        let bad = dir.join("bad.csv");
        std::fs::write(&bad, "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,x,44\n").unwrap();
        let error = load_arrivals(&bad).unwrap_err().to_string();
        assert!(error.contains(":2:") && error.contains("not a token count"), "{error}");
    }

    #[test]
    fn intervals_count_requests_and_tokens_and_keep_the_empty_ones() {
        let at = |at_s, input_tokens| Arrival { at_s, input_tokens, output_tokens: 1 };
        let bins = intervals(&[at(0.5, 10), at(9.9, 20), at(31.0, 5)], 10.0);
        let requests: Vec<f64> = bins.iter().map(|b| b.requests).collect();
        assert_eq!(requests, vec![2.0, 0.0, 0.0, 1.0]);
        assert_eq!(bins[0].input_tokens, 30.0);
    }
}
