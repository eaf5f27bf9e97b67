//! The maths over a worker's performance profile (`protocol::profile`), what the planner's replica maths and
//! a `latency` router read to turn load into time:
//!
//! - prefill: for prompts of some lengths, how long one takes alone (its time to first token on an idle
//!   worker);
//! - decode: for some context lengths and batch sizes, the time between tokens of a batch of that many
//!   sequences of that context.
//!
//! Between measured points it interpolates linearly (decode first along the context, then along the batch);
//! past the ends it extrapolates from the last two points, never below the nearest point's value. The
//! mocker's profile comes from its timing formula; the native engine's is measured (`dynamo profile`).
use crate::core::engine::mocker::{MockerConfig, timing};
use crate::core::engine::{Engine, EngineError};
use crate::core::protocol::PreprocessedRequest;
pub use crate::core::protocol::profile::{DecodePoint, PrefillPoint, Profile};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read the profile {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the profile {path} is {len} bytes, over the {MAX_PROFILE_BYTES}-byte limit for one")]
    TooLarge { path: String, len: u64 },
    #[error("the profile {path} is not a profile: {reason}")]
    Invalid { path: String, reason: String },
    #[error(transparent)]
    Model(#[from] crate::core::model::ModelError),
    #[error(transparent)]
    Spawn(#[from] crate::core::engine::SpawnError),
    #[error("measuring: {0}")]
    Measure(#[from] EngineError),
}

/// The profile of a worker running `settings` on `source`: the mocker's from its timing fit, any other
/// engine's measured on `grid` (prompts and contexts bounded by the model's context length).
pub async fn of_worker(
    source: &crate::core::model::ModelSource,
    settings: &crate::core::engine::EngineSettings,
    grid: &Grid,
) -> Result<Profile, ProfileError> {
    use crate::core::engine::EngineSettings;
    let model = crate::core::model::Model::load(source, None)?;
    let block_size = settings.block_size() as u64;
    if let EngineSettings::Mocker(config) = settings {
        return Ok(Profile::mocker(config));
    }
    let engines = crate::core::engine::spawn_engines(&model, source, settings, &[0])?;
    let engine = engines.into_iter().next().ok_or(crate::core::engine::SpawnError::NoEngine)?;
    let kv_tokens = engine.load().kv_total_blocks * block_size;
    let context = model.card.context_length;
    let grid = Grid {
        max_prompt: grid.max_prompt.min(context.saturating_sub(1)),
        max_context: grid.max_context.min(context.saturating_sub(grid.decode_tokens)),
        ..*grid
    };
    let source = format!("{} on {}, measured", model.card.name, settings.describe());
    // An external engine's step budget is its own business; vLLM's default stands in for it.
    let step_tokens = match settings {
        EngineSettings::Native(native) => u32::try_from(native.scheduler.max_num_batched_tokens).unwrap_or(u32::MAX),
        _ => 8192,
    };
    Ok(measure(&engine, model.card.vocab_size, kv_tokens, step_tokens, &grid, source).await?)
}

/// A profile's file is a few hundred points; one past this is not a profile.
pub const MAX_PROFILE_BYTES: u64 = 4 << 20;

impl Profile {
    /// Reads and checks a profile written by `dynamo profile`.
    pub fn read(path: &std::path::Path) -> Result<Self, ProfileError> {
        let name = path.display().to_string();
        let read = |source| ProfileError::Read { path: name.clone(), source };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge { path: name, len });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let profile: Profile = serde_json::from_str(&text)
            .map_err(|error| ProfileError::Invalid { path: name.clone(), reason: error.to_string() })?;
        profile.check().map_err(|reason| ProfileError::Invalid { path: name, reason })?;
        Ok(profile)
    }

    /// The mocker's profile, from its timing formula and its scheduler: a prompt alone is computed
    /// `max_num_batched_tokens` at a time, each chunk one step of the fit's prefill time; a batch of sequences
    /// of some context decodes at the fit's time for their KV over the cache's capacity.
    pub fn mocker(config: &MockerConfig) -> Self {
        let scheduler = &config.scheduler;
        let speedup = if config.speedup.is_finite() && config.speedup > 0.0 { config.speedup } else { 1.0 };
        let kv_tokens = (scheduler.num_blocks * scheduler.block_size).max(1) as u64;
        let max_batch = u32::try_from(scheduler.max_num_seqs).unwrap_or(u32::MAX).max(1);
        let step_tokens = scheduler.max_num_batched_tokens.max(1);
        // From one token: small prompts differ by little, but a router comparing a hit with a miss on them
        // should see that little rather than a flat line.
        let prefill = doubling(1, 32_768)
            .map(|tokens| {
                let (steps, last) = ((tokens as usize) / step_tokens, (tokens as usize) % step_tokens);
                let ms = steps as f64 * timing::prefill_ms(step_tokens) + timing::prefill_ms(last);
                PrefillPoint { prompt_tokens: tokens, ttft_ms: ms / speedup }
            })
            .collect();
        let capacity = usize::try_from(kv_tokens).unwrap_or(usize::MAX);
        let mut decode = Vec::new();
        for context in doubling(64, 32_768).filter(|&c| u64::from(c) <= kv_tokens) {
            let fits = u32::try_from(kv_tokens / u64::from(context)).unwrap_or(u32::MAX).min(max_batch);
            let mut batches: Vec<u32> = doubling(1, fits).collect();
            if batches.last() != Some(&fits) {
                batches.push(fits);
            }
            for batch in batches {
                let active = batch as usize * context as usize;
                let itl_ms = timing::decode_ms(active, capacity) / speedup;
                decode.push(DecodePoint { context_tokens: context, batch, itl_ms });
            }
        }
        Self {
            source: format!("the mocker's timing fit at speedup {speedup}"),
            kv_tokens,
            max_batch,
            step_tokens: u32::try_from(step_tokens).unwrap_or(u32::MAX),
            prefill,
            decode,
        }
    }

    /// Time to first token of a prompt of `tokens` on an idle worker.
    // Both are read for every worker at every latency-routed request: no allocation but the rows' index.
    pub fn prefill_ms(&self, tokens: f64) -> f64 {
        interpolate_by(&self.prefill, |p| f64::from(p.prompt_tokens), |p| p.ttft_ms, tokens)
    }

    /// Time between tokens of `batch` sequences of `context` tokens each.
    pub fn itl_ms(&self, context: f64, batch: f64) -> f64 {
        // One row per context, ascending; each row's value at `batch`, then the rows' line at `context`.
        let rows: Vec<&[DecodePoint]> = self.decode.chunk_by(|a, b| a.context_tokens == b.context_tokens).collect();
        let at_batch = |row: &&[DecodePoint]| interpolate_by(row, |p| f64::from(p.batch), |p| p.itl_ms, batch);
        let row_context = |row: &&[DecodePoint]| row.first().map_or(0.0, |p| f64::from(p.context_tokens));
        interpolate_by(&rows, row_context, at_batch, context)
    }

    /// The most tokens per second one worker decodes for sequences of `context` tokens with the time between
    /// tokens at most `itl_target_ms`, and the batch that does it; `None` when even one sequence alone is
    /// slower than that.
    pub fn decode_capacity(&self, context: f64, itl_target_ms: f64) -> Option<(f64, f64)> {
        let fits = (self.kv_tokens as f64 / context.max(1.0)).floor().min(f64::from(self.max_batch));
        if fits < 1.0 {
            return None;
        }
        // ITL grows with the batch; the largest batch within the target is found by bisection.
        let within = |batch: f64| self.itl_ms(context, batch) <= itl_target_ms;
        if !within(1.0) {
            return None;
        }
        let (mut low, mut high) = (1.0_f64, fits);
        if within(high) {
            low = high;
        }
        while high - low > 0.5 {
            let mid = ((low + high) / 2.0).floor().max(low + 1.0).min(high);
            if mid >= high {
                break;
            }
            if within(mid) { low = mid } else { high = mid }
        }
        let batch = low;
        Some((batch * 1000.0 / self.itl_ms(context, batch), batch))
    }
}

/// What `measure` tries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// Prompts of 64, 128, … up to this many tokens are prefilled alone.
    pub max_prompt: u32,
    /// Batches of 1, 2, 4, … sequences, up to `max_batch`, decode at contexts of 64, 128, … up to this.
    pub max_context: u32,
    pub max_batch: u32,
    /// Tokens each decoding sequence generates.
    pub decode_tokens: u32,
    /// Each prefill is timed this many times; the median counts.
    pub repeats: u32,
}

/// Measures `engine`'s profile on `grid`: each prompt and batch of distinct tokens (below `vocab`), so no
/// prefix cache shortens them. `kv_tokens` is the engine's KV capacity in tokens.
pub async fn measure(
    engine: &Arc<dyn Engine>,
    vocab: u32,
    kv_tokens: u64,
    step_tokens: u32,
    grid: &Grid,
    source: String,
) -> Result<Profile, EngineError> {
    let mut next_prompt = 0_u32;
    let mut prompt = |tokens: u32| {
        next_prompt += 1;
        let seed = next_prompt;
        let ids =
            (0..tokens).map(|i| (seed.wrapping_mul(7919).wrapping_add(i.wrapping_mul(31))) % vocab.max(1)).collect();
        PreprocessedRequest::greedy(format!("profile-{seed}"), ids, 1)
    };
    let mut prefill = Vec::new();
    for tokens in doubling(64, grid.max_prompt).filter(|&t| u64::from(t) < kv_tokens) {
        let mut times = Vec::new();
        for _ in 0..grid.repeats.max(1) {
            let started = Instant::now();
            let mut stream = engine.submit(prompt(tokens))?;
            while stream.next().await.is_some_and(|output| output.token_ids.is_empty()) {}
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        prefill.push(PrefillPoint { prompt_tokens: tokens, ttft_ms: times[times.len() / 2] });
    }
    let mut decode = Vec::new();
    let per_sequence = |context: u32| u64::from(context) + u64::from(grid.decode_tokens);
    for context in doubling(64, grid.max_context).filter(|&c| per_sequence(c) <= kv_tokens) {
        let fits = u32::try_from(kv_tokens / per_sequence(context)).unwrap_or(u32::MAX).min(grid.max_batch);
        for batch in doubling(1, fits) {
            let requests: Vec<PreprocessedRequest> = (0..batch)
                .map(|_| {
                    let mut request = prompt(context);
                    request.stop.max_tokens = grid.decode_tokens.max(2);
                    request
                })
                .collect();
            let streams = requests.into_iter().map(|r| engine.submit(r)).collect::<Result<Vec<_>, _>>()?;
            let arrivals = futures::future::join_all(streams.into_iter().map(|mut stream| async move {
                let mut times = Vec::new();
                while let Some(output) = stream.next().await {
                    let now = Instant::now();
                    times.extend(std::iter::repeat_n(now, output.token_ids.len()));
                }
                times
            }))
            .await;
            if let Some(itl_ms) = steady_itl_ms(&arrivals) {
                decode.push(DecodePoint { context_tokens: context, batch, itl_ms });
            }
        }
    }
    Ok(Profile {
        source,
        kv_tokens,
        max_batch: grid.max_batch.max(1),
        step_tokens: step_tokens.max(1),
        prefill,
        decode,
    })
}

/// The time between tokens while every sequence of a batch was decoding: from the last first token to the
/// first last token, over the tokens each sequence got meanwhile (their mean). `None` when that window
/// held none (a batch whose sequences never all decoded together).
fn steady_itl_ms(arrivals: &[Vec<Instant>]) -> Option<f64> {
    let start = arrivals.iter().filter_map(|times| times.first()).max()?;
    let end = arrivals.iter().filter_map(|times| times.last()).min()?;
    let tokens: usize = arrivals.iter().map(|times| times.iter().filter(|&t| t > start && t <= end).count()).sum();
    let mean = tokens as f64 / arrivals.len() as f64;
    (mean >= 1.0).then(|| (*end - *start).as_secs_f64() * 1000.0 / mean)
}

/// 1, 2, 4, … from `from` up to `to`, both included when `to` is a power of two times `from`.
fn doubling(from: u32, to: u32) -> impl Iterator<Item = u32> {
    std::iter::successors(Some(from), |&n| n.checked_mul(2)).take_while(move |&n| n <= to)
}

/// `interpolate_by` over (x, y) pairs.
#[cfg(test)]
fn interpolate(points: &[(f64, f64)], x: f64) -> f64 {
    interpolate_by(points, |p| p.0, |p| p.1, x)
}

/// Piecewise linear through `items` (x ascending, read by `x_of`; y by `y_of`, only of the two items around
/// `x`); beyond the ends, the last two items' line, never below the end item's y. One item is a constant.
fn interpolate_by<T>(items: &[T], x_of: impl Fn(&T) -> f64, y_of: impl Fn(&T) -> f64, x: f64) -> f64 {
    match items {
        [] => 0.0,
        [only] => y_of(only),
        _ => {
            let at = items.partition_point(|item| x_of(item) < x).clamp(1, items.len() - 1);
            let (x0, y0) = (x_of(&items[at - 1]), y_of(&items[at - 1]));
            let (x1, y1) = (x_of(&items[at]), y_of(&items[at]));
            let y = y0 + (y1 - y0) * (x - x0) / (x1 - x0);
            if x < x0 {
                y.max(y0.min(y1))
            } else if x > x1 {
                y.max(y1)
            } else {
                y
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::scheduler::SchedulerConfig;

    #[test]
    fn the_mockers_profile_is_its_timing_formula() {
        let profile = Profile::mocker(&MockerConfig { speedup: 2.0, ..MockerConfig::default() });
        profile.check().unwrap();
        assert_eq!(profile.prefill_ms(1024.0), timing::prefill_ms(1024) / 2.0);
        // Between points: on the line between them.
        let between = profile.prefill_ms(1536.0);
        assert!(between > profile.prefill_ms(1024.0) && between < profile.prefill_ms(2048.0));
        let capacity = 16_384 * 16;
        assert_eq!(profile.itl_ms(1024.0, 64.0), timing::decode_ms(64 * 1024, capacity) / 2.0);
    }

    #[test]
    fn decode_capacity_is_the_largest_batch_within_the_itl_target() {
        let profile = Profile::mocker(&MockerConfig::default());
        let (tokens_per_s, batch) = profile.decode_capacity(2048.0, 30.0).expect("one sequence is within 30 ms");
        assert!(profile.itl_ms(2048.0, batch) <= 30.0);
        assert!(profile.itl_ms(2048.0, batch + 1.0) > 30.0, "batch {batch} is the largest");
        assert!((tokens_per_s - batch * 1000.0 / profile.itl_ms(2048.0, batch)).abs() < 1e-9);
        // KV bounds the batch: 262,144 tokens hold 8 sequences of 32,768.
        let (_, batch) = profile.decode_capacity(32_768.0, 1e6).unwrap();
        assert_eq!(batch, 8.0);
        assert_eq!(profile.decode_capacity(2048.0, 1.0), None, "a single sequence is slower than 1 ms");
        assert_eq!(profile.decode_capacity(1e7, 1e6), None, "a sequence longer than the KV cache");
    }

    #[tokio::test]
    async fn a_measured_profile_covers_its_grid_and_reads_back() {
        use crate::core::engine::mocker::{MockerConfig, MockerEngine};
        let config = MockerConfig { speedup: 50.0, ..MockerConfig::default() };
        let kv_tokens = (config.scheduler.num_blocks * config.scheduler.block_size) as u64;
        let engine: Arc<dyn Engine> = Arc::new(MockerEngine::spawn(1, config, (0..1000).collect()));
        let grid = Grid { max_prompt: 256, max_context: 128, max_batch: 4, decode_tokens: 8, repeats: 1 };
        let profile = measure(&engine, 1000, kv_tokens, 8192, &grid, "mocker".into()).await.unwrap();
        profile.check().unwrap();
        let prompts: Vec<u32> = profile.prefill.iter().map(|p| p.prompt_tokens).collect();
        assert_eq!(prompts, [64, 128, 256]);
        let decode: Vec<(u32, u32)> = profile.decode.iter().map(|p| (p.context_tokens, p.batch)).collect();
        assert_eq!(decode, [(64, 1), (64, 2), (64, 4), (128, 1), (128, 2), (128, 4)]);
        assert_eq!(engine.load().kv_active_blocks, 0, "every request ran to its end");
    }

    #[test]
    fn the_steady_window_counts_only_tokens_while_every_sequence_decodes() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // The second sequence starts at 30 ms; until the first ends at 70, each gets a token per 10 ms.
        let arrivals = vec![
            vec![at(0), at(10), at(20), at(30), at(40), at(50), at(60), at(70)],
            vec![at(30), at(40), at(50), at(60), at(70), at(80)],
        ];
        assert_eq!(steady_itl_ms(&arrivals), Some(10.0));
        assert_eq!(steady_itl_ms(&[vec![at(0)], vec![at(5)]]), None);
    }

    #[test]
    fn interpolation_extrapolates_from_the_ends_and_never_below_them() {
        let points = [(1.0, 10.0), (2.0, 20.0), (4.0, 20.0)];
        assert_eq!(interpolate(&points, 1.5), 15.0);
        assert_eq!(interpolate(&points, 3.0), 20.0);
        assert_eq!(interpolate(&points, 8.0), 20.0);
        assert_eq!(interpolate(&[(1.0, 10.0), (2.0, 20.0)], 4.0), 40.0);
        assert_eq!(interpolate(&[(1.0, 10.0), (2.0, 20.0)], 0.0), 10.0);
    }

    fn small_mocker() -> Profile {
        let scheduler = SchedulerConfig { num_blocks: 4096, max_num_seqs: 64, ..SchedulerConfig::default() };
        Profile::mocker(&MockerConfig { scheduler, speedup: 1.0, ..MockerConfig::default() })
    }

    #[test]
    fn a_bad_profile_file_is_refused_with_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Profile::read(&path).map_err(|e| e.to_string())
        };
        let good = serde_json::to_string(&small_mocker()).unwrap();
        assert!(write("good.json", &good).is_ok());
        let error = write("empty.json", r#"{"source":"x","kv_tokens":1,"max_batch":1,"prefill":[],"decode":[]}"#);
        assert!(error.unwrap_err().contains("at least one prefill"));
        let mut shuffled = small_mocker();
        shuffled.prefill.reverse();
        let error = write("order.json", &serde_json::to_string(&shuffled).unwrap()).unwrap_err();
        assert!(error.contains("ascending"), "{error}");
        assert!(write("text.json", "not json").unwrap_err().contains("is not a profile"));
        assert!(Profile::read(&dir.join("missing.json")).unwrap_err().to_string().contains("cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
