//! Causal attention over paged K/V on the CPU, for a block of consecutive query rows of one sequence.
//!
//! A block shares every key and value row it reads among its query rows and among the query heads that
//! share a KV head (GQA), so a long prefill reads its K/V once per block instead of once per row per head.
//! The loops are plain Rust written to auto-vectorise; like `kernels`, they are compiled a second time with
//! AVX2 + FMA enabled and that copy is used when the CPU has them.
use crate::core::engine::native::backend::{AttentionSeq, AttentionShape};

/// Query rows per block: enough to amortise K/V reads, few enough that a long prefill still spreads over
/// every thread and the scores stay in cache.
pub const BLOCK_ROWS: usize = 16;

/// Key positions scored together (two AVX2 vectors).
const KEYS: usize = 16;

/// Query rows scored together against those keys.
const QUERIES: usize = 4;

/// Rows `first..first + rows` of `seq`'s chunk; `queries` and `dst` hold exactly those rows.
pub struct BlockAttention<'a> {
    pub queries: &'a [f32],
    pub k_pages: &'a [f32],
    pub v_pages: &'a [f32],
    pub seq: &'a AttentionSeq,
    pub first: usize,
    pub rows: usize,
    pub shape: &'a AttentionShape,
}

pub fn attend(job: &BlockAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { attend_avx2(job, scores, dst) };
    }
    attend_portable(job, scores, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(job: &BlockAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    attend_portable(job, scores, dst);
}

#[inline(always)]
fn attend_portable(job: &BlockAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    if job.rows == 1 {
        return attend_one_row(job, scores, dst);
    }
    let AttentionShape { num_heads, num_kv_heads, head_dim, block_size } = *job.shape;
    let group = num_heads / num_kv_heads;
    let (kv_width, row_width) = (num_kv_heads * head_dim, num_heads * head_dim);
    let scale = 1.0 / (head_dim as f32).sqrt();
    // Row r of the block attends to positions 0..context(r); the last row sees the most.
    let context = |r: usize| job.seq.first_position + job.first + r + 1;
    let longest = context(job.rows - 1);
    let table = &job.seq.block_table;
    let slot = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
    // scores[(r * group + h) * longest + p]
    scores.clear();
    scores.resize(job.rows * group * longest, 0.0);
    dst.fill(0.0);
    let mut keys_t = vec![0.0f32; head_dim * KEYS];
    let mut values = vec![0.0f32; KEYS * head_dim];
    for kv_head in 0..num_kv_heads {
        // Scores for KEYS positions at a time: the keys are gathered transposed (`keys_t[d][j]`), so each
        // query accumulates a whole vector of scores with no horizontal sums.
        for p0 in (0..longest).step_by(KEYS) {
            let width = KEYS.min(longest - p0);
            for j in 0..width {
                let key = &job.k_pages[slot(p0 + j) * kv_width + kv_head * head_dim..][..head_dim];
                for (d, &k) in key.iter().enumerate() {
                    keys_t[d * KEYS + j] = k;
                }
            }
            let first_row = p0.saturating_sub(context(0) - 1);
            // (row, head) pairs QUERIES at a time: one accumulator chain per query would wait on the FMA's
            // latency; several independent ones keep both FMA ports busy.
            let pairs = first_row * group..job.rows * group;
            for start in pairs.clone().step_by(QUERIES) {
                let count = QUERIES.min(pairs.end - start);
                // A short last group repeats its first query; those results are not stored.
                let query = |i: usize| {
                    let pair = start + i.min(count - 1);
                    let (r, h) = (pair / group, pair % group);
                    &job.queries[r * row_width + (kv_head * group + h) * head_dim..][..head_dim]
                };
                let queries: [&[f32]; QUERIES] = std::array::from_fn(query);
                let mut acc = [[0.0f32; KEYS]; QUERIES];
                for d in 0..head_dim {
                    let column = &keys_t[d * KEYS..(d + 1) * KEYS];
                    for (acc, query) in acc.iter_mut().zip(&queries) {
                        let q = query[d];
                        for j in 0..KEYS {
                            acc[j] += q * column[j];
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate().take(count) {
                    let dst = &mut scores[(start + i) * longest + p0..][..width];
                    for (s, a) in dst.iter_mut().zip(acc) {
                        *s = a * scale;
                    }
                }
            }
        }
        for r in 0..job.rows {
            for h in 0..group {
                softmax(&mut scores[(r * group + h) * longest..][..context(r)]);
            }
        }
        // Values likewise KEYS positions at a time: the chunk stays in L1 while every (row, head) of the block
        // adds its share, 16 output dimensions per register-held accumulator.
        for p0 in (0..longest).step_by(KEYS) {
            let width = KEYS.min(longest - p0);
            for j in 0..width {
                let value = &job.v_pages[slot(p0 + j) * kv_width + kv_head * head_dim..][..head_dim];
                values[j * head_dim..(j + 1) * head_dim].copy_from_slice(value);
            }
            let first_row = p0.saturating_sub(context(0) - 1);
            for r in first_row..job.rows {
                let valid = (context(r) - p0).min(width);
                for h in 0..group {
                    let weights = &scores[(r * group + h) * longest + p0..][..valid];
                    let out = &mut dst[r * row_width + (kv_head * group + h) * head_dim..][..head_dim];
                    accumulate(out, weights, &values, head_dim);
                }
            }
        }
    }
}

/// A single query row (a decode step): too few queries to pay for gathering keys and values into chunks, so
/// each key and value row is used where it lies.
#[inline(always)]
fn attend_one_row(job: &BlockAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    let AttentionShape { num_heads, num_kv_heads, head_dim, block_size } = *job.shape;
    let group = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let context = job.seq.first_position + job.first + 1;
    let table = &job.seq.block_table;
    let slot = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
    scores.clear();
    scores.resize(group * context, 0.0);
    dst.fill(0.0);
    for kv_head in 0..num_kv_heads {
        let queries = &job.queries[kv_head * group * head_dim..(kv_head + 1) * group * head_dim];
        for p in 0..context {
            let key = &job.k_pages[slot(p) * kv_width + kv_head * head_dim..][..head_dim];
            for (h, query) in queries.chunks_exact(head_dim).enumerate() {
                scores[h * context + p] = dot(query, key) * scale;
            }
        }
        scores.chunks_exact_mut(context).for_each(softmax);
        let outputs = &mut dst[kv_head * group * head_dim..(kv_head + 1) * group * head_dim];
        for p in 0..context {
            let value = &job.v_pages[slot(p) * kv_width + kv_head * head_dim..][..head_dim];
            for (h, out) in outputs.chunks_exact_mut(head_dim).enumerate() {
                let weight = scores[h * context + p];
                for (o, v) in out.iter_mut().zip(value) {
                    *o += weight * v;
                }
            }
        }
    }
}

/// Scores to attention weights, in place.
#[inline(always)]
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        total += *score;
    }
    for score in scores.iter_mut() {
        *score /= total;
    }
}

/// Eight partial sums so the loop vectorises without reassociating floats.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += Σ_j weights[j] · values[j]` over rows of `head_dim`.
#[inline(always)]
fn accumulate(out: &mut [f32], weights: &[f32], values: &[f32], head_dim: usize) {
    // 64 output dimensions per pass where they divide: eight independent AVX2 accumulators, so consecutive
    // weights do not wait on each other's FMA; then 16 at a time, then one.
    let wide = head_dim - head_dim % 64;
    let narrow = head_dim - head_dim % 16;
    accumulate_dims::<64>(&mut out[..wide], 0, weights, values, head_dim);
    accumulate_dims::<16>(&mut out[wide..narrow], wide, weights, values, head_dim);
    accumulate_dims::<1>(&mut out[narrow..], narrow, weights, values, head_dim);
}

/// `accumulate` for the output dimensions `offset..offset + out.len()`, `DIMS` of them per register block.
#[inline(always)]
fn accumulate_dims<const DIMS: usize>(
    out: &mut [f32],
    offset: usize,
    weights: &[f32],
    values: &[f32],
    head_dim: usize,
) {
    for (block, out) in out.chunks_exact_mut(DIMS).enumerate() {
        let mut acc = [0.0f32; DIMS];
        acc.copy_from_slice(out);
        for (j, &w) in weights.iter().enumerate() {
            let v = &values[j * head_dim + offset + block * DIMS..][..DIMS];
            for i in 0..DIMS {
                acc[i] += w * v[i];
            }
        }
        out.copy_from_slice(&acc);
    }
}
