//! Causal attention of one query row over its sequence's paged K/V, on the CPU.
//!
//! The query heads that share a KV head (GQA) are done together, so each key and value row is read once per
//! group rather than once per head. The loops are plain Rust written to auto-vectorise; like `kernels`, they
//! are compiled a second time with AVX2 + FMA enabled and that copy is used when the CPU has them.
use crate::core::engine::native::backend::{AttentionSeq, AttentionShape};

/// Everything one row needs; `dst` is the row's `[heads × head_dim]` output.
pub struct RowAttention<'a> {
    pub query: &'a [f32],
    pub k_pages: &'a [f32],
    pub v_pages: &'a [f32],
    pub seq: &'a AttentionSeq,
    /// Row within the sequence's chunk.
    pub row: usize,
    pub shape: &'a AttentionShape,
}

pub fn attend(job: &RowAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { attend_avx2(job, scores, dst) };
    }
    attend_portable(job, scores, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(job: &RowAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    attend_portable(job, scores, dst);
}

#[inline(always)]
fn attend_portable(job: &RowAttention<'_>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    let AttentionShape { num_heads, num_kv_heads, head_dim, block_size } = *job.shape;
    let group = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let context = job.seq.first_position + job.row + 1;
    let table = &job.seq.block_table;
    let slot = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
    scores.clear();
    scores.resize(group * context, 0.0);
    dst.fill(0.0);
    for kv_head in 0..num_kv_heads {
        let heads = kv_head * group..(kv_head + 1) * group;
        let queries = &job.query[heads.start * head_dim..heads.end * head_dim];
        for p in 0..context {
            let key = &job.k_pages[slot(p) * kv_width + kv_head * head_dim..][..head_dim];
            for (h, query) in queries.chunks_exact(head_dim).enumerate() {
                scores[h * context + p] = dot(query, key) * scale;
            }
        }
        for head_scores in scores.chunks_exact_mut(context) {
            let max = head_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for score in head_scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            for score in head_scores.iter_mut() {
                *score /= total;
            }
        }
        let outputs = &mut dst[heads.start * head_dim..heads.end * head_dim];
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
