//! Causal attention over paged K/V on the CPU, for a block of consecutive query rows of one sequence.
//!
//! A block shares every key and value row it reads among its query rows and among the query heads that
//! share a KV head (GQA), so a long prefill reads its K/V once per block instead of once per row per head.
//! The loops are plain Rust written to auto-vectorise; like `kernels`, they are compiled a second time with
//! AVX2 + FMA enabled and that copy is used when the CPU has them.
//!
//! On CPUs with AMX, a bf16 model's prefill takes both products of attention (Q·Kᵀ and weights·V) to the tile
//! unit instead (`tiles`): the context's keys and values are laid out once per layer in the tile unit's pair
//! layout (`TiledKv`), queries and weights are rounded to bf16 as bf16 attention does on every engine, and
//! what is left on the vector registers is the softmax.
use super::math::{Element, dot, exp_nonpositive, lanes};
use crate::core::engine::native::backend::{AttentionSeq, AttentionShape};

/// Query rows per block: enough that gathering a tile's keys and values is paid for by many rows, few enough
/// that a prompt of a few hundred tokens still spreads over every thread.
pub const BLOCK_ROWS: usize = 32;

/// Key positions scored together (two AVX2 vectors).
const KEYS: usize = 16;

/// Query rows scored together against those keys.
const QUERIES: usize = 4;

/// Key positions per tile of a block's attention: with a block's rows, its scores (rows × query heads per KV
/// head × TILE) stay in L1/L2 however long the context.
const TILE: usize = 64;

/// Rows `first..first + rows` of `seq`'s chunk; `queries` and `dst` hold exactly those rows. K/V pages hold
/// f32 or bf16 (`E`), widened to f32 as they are read.
pub struct BlockAttention<'a, E: Element> {
    pub queries: &'a [f32],
    pub k_pages: &'a [E],
    pub v_pages: &'a [E],
    pub seq: &'a AttentionSeq,
    pub first: usize,
    pub rows: usize,
    pub shape: &'a AttentionShape,
    /// The sequence's keys and values laid out for the tile unit: the block is attended there.
    pub tiled: Option<&'a TiledKv>,
    /// The KV heads (and their query heads) this job attends, for a single row (a decode step): one
    /// sequence's step is split by KV head so that a long context is read by several threads; `dst` then holds
    /// those heads only. Blocks of several rows take every head.
    pub kv_heads: std::ops::Range<usize>,
}

pub fn attend<E: Element>(job: &BlockAttention<'_, E>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    assert!(job.rows == 1 || job.kv_heads == (0..job.shape.num_kv_heads), "only a single row splits by KV head");
    #[cfg(target_arch = "x86_64")]
    if let Some(tiled) = job.tiled {
        // SAFETY: a `TiledKv` exists only where the tile unit is usable (`TiledKv::usable`): AMX, AVX-512 F,
        // BW and BF16 (which AMX's checks include), AVX2 and FMA.
        return unsafe { tiles::attend(job, tiled, scores, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { attend_avx2(job, scores, dst) };
    }
    attend_with::<false, E>(job, scores, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<E: Element>(job: &BlockAttention<'_, E>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    attend_with::<true, E>(job, scores, dst);
}

/// One sequence's keys and values for one layer, positions `0..positions`, laid out as the tile unit reads its
/// second operand (`packed`): 16 rows of 64 bytes, each row one pair of the reduction for 16 outputs.
pub struct TiledKv {
    /// Per KV head, the keys (`keys`) and values (`values`), both zero-padded to whole tiles of `TILE` positions.
    heads: Vec<HeadTiles>,
}

struct HeadTiles {
    /// Scores are a reduction over the head's dimensions: panels of 16 positions, `[head_dim / 2][16][2]`.
    keys: Vec<half::bf16>,
    /// Outputs are a reduction over positions: per tile, panels of 16 dimensions, `[TILE / 2][16][2]`.
    values: Vec<half::bf16>,
}

impl TiledKv {
    /// Whether attention of this shape can run on the tile unit here: it reads the head's dimensions 32 at a
    /// time, and only CPUs with AMX (and Linux's permission to use it) have one.
    pub fn usable(shape: &AttentionShape) -> bool {
        #[cfg(target_arch = "x86_64")]
        return shape.head_dim.is_multiple_of(super::packed::amx::DEPTH)
            && super::packed::amx::available()
            && super::kernels::has_avx2_fma();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `seq`'s context (every position its last row attends to) of one KV head, read from the pages.
    fn pack_head<E: Element>(
        k_pages: &[E],
        v_pages: &[E],
        seq: &AttentionSeq,
        shape: &AttentionShape,
        kv_head: usize,
    ) -> HeadTiles {
        let AttentionShape { num_kv_heads, head_dim, block_size, .. } = *shape;
        let kv_width = num_kv_heads * head_dim;
        let positions = seq.first_position + seq.rows;
        let len = positions.div_ceil(TILE) * TILE * head_dim;
        let (mut keys, mut values) = (vec![half::bf16::ZERO; len], vec![half::bf16::ZERO; len]);
        for p in 0..positions {
            let slot = seq.block_table[p / block_size] as usize * block_size + p % block_size;
            let at = slot * kv_width + kv_head * head_dim;
            let panel = &mut keys[(p / PANEL) * PANEL * head_dim..][..PANEL * head_dim];
            for (d, k) in k_pages[at..][..head_dim].iter().enumerate() {
                panel[(d / 2) * 2 * PANEL + (p % PANEL) * 2 + d % 2] = k.bf16();
            }
            let (tile, j) = (p / TILE, p % TILE);
            let tile = &mut values[tile * TILE * head_dim..][..TILE * head_dim];
            for (d, v) in v_pages[at..][..head_dim].iter().enumerate() {
                tile[(d / PANEL) * TILE * PANEL + (j / 2) * 2 * PANEL + (d % PANEL) * 2 + j % 2] = v.bf16();
            }
        }
        HeadTiles { keys, values }
    }

    /// Every KV head of `seq`'s context; the heads are laid out in parallel (on the caller's pool).
    pub fn pack<E: Element>(k_pages: &[E], v_pages: &[E], seq: &AttentionSeq, shape: &AttentionShape) -> TiledKv {
        use rayon::prelude::*;
        let heads = (0..shape.num_kv_heads)
            .into_par_iter()
            .map(|kv_head| Self::pack_head(k_pages, v_pages, seq, shape, kv_head))
            .collect();
        TiledKv { heads }
    }
}

/// Outputs of one tile-unit panel.
const PANEL: usize = 16;

/// `FUSED`: compiled into `attend_avx2`, so the two inner loops may use the explicit FMA kernels of `fused`.
///
/// Keys are taken a tile at a time, and each (row, head) keeps its softmax's running maximum and sum from
/// tile to tile (its output rescaled when the maximum grows), so no row's scores are ever held whole: a
/// tile's keys, values and scores stay in cache however long the context.
#[inline(always)]
fn attend_with<const FUSED: bool, E: Element>(job: &BlockAttention<'_, E>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    if job.rows == 1 {
        return attend_one_row::<FUSED, E>(job, scores, dst);
    }
    let AttentionShape { num_heads, num_kv_heads, head_dim, block_size } = *job.shape;
    let group = num_heads / num_kv_heads;
    let (kv_width, row_width) = (num_kv_heads * head_dim, num_heads * head_dim);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let pairs = job.rows * group;
    // Row r of the block attends to positions 0..context(r); the last row sees the most.
    let context = |r: usize| job.seq.first_position + job.first + r + 1;
    let longest = context(job.rows - 1);
    let table = &job.seq.block_table;
    let slot = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
    let out_of = |pair: usize| (pair / group) * row_width + (pair % group) * head_dim;
    // scores[pair * TILE + j] for the (row, head) pair `pair` = r * group + h and the tile's key j.
    scores.clear();
    scores.resize(pairs * TILE, 0.0);
    dst.fill(0.0);
    // The tile's keys transposed KEYS at a time (`keys_t[chunk][d][j]`), so each query accumulates a whole
    // vector of scores with no horizontal sums; its values row by row.
    let mut keys_t = vec![0.0f32; TILE * head_dim];
    let mut values = vec![0.0f32; TILE * head_dim];
    // Each pair's softmax so far: the largest score seen and the sum of exp(score − that).
    let mut running = vec![(f32::NEG_INFINITY, 0.0f32); pairs];
    for kv_head in 0..num_kv_heads {
        running.fill((f32::NEG_INFINITY, 0.0));
        let head_out = kv_head * group * head_dim;
        for t0 in (0..longest).step_by(TILE) {
            let width = TILE.min(longest - t0);
            for j in 0..width {
                let key = &job.k_pages[slot(t0 + j) * kv_width + kv_head * head_dim..][..head_dim];
                let chunk = &mut keys_t[(j / KEYS) * head_dim * KEYS..][..head_dim * KEYS];
                for (d, &k) in key.iter().enumerate() {
                    chunk[d * KEYS + j % KEYS] = k.f32();
                }
            }
            // Rows whose context ends before this tile have nothing in it.
            let live = t0.saturating_sub(context(0) - 1) * group..pairs;
            // (row, head) pairs QUERIES at a time: one accumulator chain per query would wait on the FMA's
            // latency; several independent ones keep both FMA ports busy.
            for start in live.clone().step_by(QUERIES) {
                let count = QUERIES.min(live.end - start);
                // A short last group repeats its first query; those results are not stored.
                let query = |i: usize| {
                    let pair = start + i.min(count - 1);
                    &job.queries[out_of(pair) + head_out..][..head_dim]
                };
                let queries: [&[f32]; QUERIES] = std::array::from_fn(query);
                for (chunk, keys_t) in keys_t.chunks_exact(head_dim * KEYS).take(width.div_ceil(KEYS)).enumerate() {
                    let acc = score_chunk::<FUSED>(&queries, keys_t);
                    for (i, acc) in acc.iter().enumerate().take(count) {
                        let dst = &mut scores[(start + i) * TILE + chunk * KEYS..][..KEYS];
                        for (s, a) in dst.iter_mut().zip(acc) {
                            *s = a * scale;
                        }
                    }
                }
            }
            for pair in live.clone() {
                let valid = (context(pair / group) - t0).min(width);
                let tile = &mut scores[pair * TILE..][..valid];
                let (max, sum) = running[pair];
                let new_max = max.max(lanes(tile, f32::NEG_INFINITY, |a, b| if b > a { b } else { a }));
                for score in tile.iter_mut() {
                    *score = exp_nonpositive(*score - new_max);
                }
                let correction = exp_nonpositive(max - new_max);
                running[pair] = (new_max, sum * correction + lanes(tile, 0.0, |a, b| a + b));
                if correction != 1.0 {
                    dst[out_of(pair) + head_out..][..head_dim].iter_mut().for_each(|o| *o *= correction);
                }
            }
            for j in 0..width {
                let value = &job.v_pages[slot(t0 + j) * kv_width + kv_head * head_dim..][..head_dim];
                for (dst, &v) in values[j * head_dim..(j + 1) * head_dim].iter_mut().zip(value) {
                    *dst = v.f32();
                }
            }
            // Every live pair adds its share while the tile's values are in L1, 16 output dimensions per
            // register-held accumulator.
            for pair in live {
                let valid = (context(pair / group) - t0).min(width);
                let out = &mut dst[out_of(pair) + head_out..][..head_dim];
                accumulate::<FUSED, f32>(out, &scores[pair * TILE..][..valid], &values, head_dim);
            }
        }
        for (pair, &(_, sum)) in running.iter().enumerate() {
            let inverse = 1.0 / sum;
            dst[out_of(pair) + head_out..][..head_dim].iter_mut().for_each(|o| *o *= inverse);
        }
    }
}

/// A single query row (a decode step): too few queries to pay for gathering keys and values into chunks, so
/// keys and values are read where they lie, a page at a time (a page's rows are evenly spaced).
#[inline(always)]
fn attend_one_row<const FUSED: bool, E: Element>(job: &BlockAttention<'_, E>, scores: &mut Vec<f32>, dst: &mut [f32]) {
    let AttentionShape { num_heads, num_kv_heads, head_dim, .. } = *job.shape;
    let group = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let context = job.seq.first_position + job.first + 1;
    // The job's query heads; `dst` and the scores hold those only, from the first.
    let first_head = job.kv_heads.start * group;
    assert_eq!(dst.len(), job.kv_heads.len() * group * head_dim, "the job's heads of one row");
    // scores[(head - first_head) * context + position]
    scores.clear();
    scores.resize(job.kv_heads.len() * group * context, 0.0);
    dst.fill(0.0);
    each_page_and_kv_head(job, job.k_pages, context, |p0, width, kv_head, keys| {
        for h in kv_head * group..(kv_head + 1) * group {
            let out = &mut scores[(h - first_head) * context + p0..][..width];
            score_rows::<FUSED, E>(&job.queries[h * head_dim..][..head_dim], keys, kv_width, out);
            out.iter_mut().for_each(|s| *s *= scale);
        }
    });
    scores.chunks_exact_mut(context).for_each(softmax);
    each_page_and_kv_head(job, job.v_pages, context, |p0, width, kv_head, values| {
        for h in kv_head * group..(kv_head + 1) * group {
            let out = &mut dst[(h - first_head) * head_dim..][..head_dim];
            accumulate::<FUSED, E>(out, &scores[(h - first_head) * context + p0..][..width], values, kv_width);
        }
    });
}

/// `visit(first position, positions, KV head, rows)` for every page of the first `context` positions and each
/// of the job's KV heads, with that head's rows of the page (`kv_width` apart). Every KV head of a page is done
/// before the next page, which is prefetched meanwhile, so each page is read from memory as one stretch.
#[inline(always)]
fn each_page_and_kv_head<E: Element>(
    job: &BlockAttention<'_, E>,
    pages: &[E],
    context: usize,
    mut visit: impl FnMut(usize, usize, usize, &[E]),
) {
    let AttentionShape { num_kv_heads, head_dim, block_size, .. } = *job.shape;
    let kv_width = num_kv_heads * head_dim;
    let page_start = |p0: usize| job.seq.block_table[p0 / block_size] as usize * block_size * kv_width;
    for p0 in (0..context).step_by(block_size) {
        let width = block_size.min(context - p0);
        let next = p0 + block_size;
        if next < context {
            // The job's heads of each position of the next page (all of the page when it takes every head).
            let (from, len) = (job.kv_heads.start * head_dim, job.kv_heads.len() * head_dim);
            for row in 0..block_size.min(context - next) {
                prefetch(&pages[page_start(next) + row * kv_width + from..][..len]);
            }
        }
        for kv_head in job.kv_heads.clone() {
            let start = page_start(p0) + kv_head * head_dim;
            visit(p0, width, kv_head, &pages[start..start + (width - 1) * kv_width + head_dim]);
        }
    }
}

/// Asks for `values` to be brought into cache ahead of their use.
#[inline(always)]
fn prefetch<E>(values: &[E]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(64 / std::mem::size_of::<E>().max(1)) {
        // SAFETY: the address is inside `values`; a prefetch never faults.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
}

/// `out[j] = query · keys[j · stride..][..query.len()]`.
#[inline(always)]
fn score_rows<const FUSED: bool, E: Element>(query: &[f32], keys: &[E], stride: usize, out: &mut [f32]) {
    let head_dim = query.len();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if FUSED && head_dim.is_multiple_of(8) {
        for (chunk, out) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: FUSED code runs only inside `attend_avx2`, on a CPU with AVX2 and FMA.
            let eight = unsafe { fused::dot_8(query, &keys[chunk * 8 * stride..], stride) };
            out.copy_from_slice(&eight);
        }
        done = out.len() - out.len() % 8;
    }
    for (j, out) in out.iter_mut().enumerate().skip(done) {
        *out = dot(query, &keys[j * stride..][..head_dim]);
    }
}

/// Scores to attention weights, in place.
#[inline(always)]
fn softmax(scores: &mut [f32]) {
    let max = lanes(scores, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    for score in scores.iter_mut() {
        *score = exp_nonpositive(*score - max);
    }
    let total = lanes(scores, 0.0, |a, b| a + b);
    for score in scores.iter_mut() {
        *score /= total;
    }
}

/// `acc[i][j] = Σ_d queries[i][d] · keys_t[d · KEYS + j]`.
#[inline(always)]
fn score_chunk<const FUSED: bool>(queries: &[&[f32]; QUERIES], keys_t: &[f32]) -> [[f32; KEYS]; QUERIES] {
    #[cfg(target_arch = "x86_64")]
    if FUSED {
        // SAFETY: FUSED code runs only inside `attend_avx2`, on a CPU with AVX2 and FMA.
        return unsafe { fused::score_chunk(queries, keys_t) };
    }
    let mut acc = [[0.0f32; KEYS]; QUERIES];
    for (d, column) in keys_t.chunks_exact(KEYS).enumerate() {
        for (acc, query) in acc.iter_mut().zip(queries) {
            let q = query[d];
            for j in 0..KEYS {
                acc[j] += q * column[j];
            }
        }
    }
    acc
}

/// `out += Σ_j weights[j] · values[j · stride..][..out.len()]`.
#[inline(always)]
fn accumulate<const FUSED: bool, E: Element>(out: &mut [f32], weights: &[f32], values: &[E], stride: usize) {
    let head_dim = out.len();
    // 64 output dimensions per pass where they divide: eight independent AVX2 accumulators, so consecutive
    // weights do not wait on each other's FMA; then 16 at a time, then one.
    let wide = head_dim - head_dim % 64;
    let narrow = head_dim - head_dim % 16;
    #[cfg(target_arch = "x86_64")]
    if FUSED {
        for (block, out) in out[..wide].chunks_exact_mut(64).enumerate() {
            // SAFETY: FUSED code runs only inside `attend_avx2`, on a CPU with AVX2 and FMA.
            unsafe { fused::accumulate_64(out, weights, values, block * 64, stride) };
        }
        accumulate_dims::<16, E>(&mut out[wide..narrow], wide, weights, values, stride);
        accumulate_dims::<1, E>(&mut out[narrow..], narrow, weights, values, stride);
        return;
    }
    accumulate_dims::<64, E>(&mut out[..wide], 0, weights, values, stride);
    accumulate_dims::<16, E>(&mut out[wide..narrow], wide, weights, values, stride);
    accumulate_dims::<1, E>(&mut out[narrow..], narrow, weights, values, stride);
}

/// `accumulate` for the output dimensions `offset..offset + out.len()`, `DIMS` of them per register block.
#[inline(always)]
fn accumulate_dims<const DIMS: usize, E: Element>(
    out: &mut [f32],
    offset: usize,
    weights: &[f32],
    values: &[E],
    stride: usize,
) {
    for (block, out) in out.chunks_exact_mut(DIMS).enumerate() {
        let mut acc = [0.0f32; DIMS];
        acc.copy_from_slice(out);
        for (j, &w) in weights.iter().enumerate() {
            let v = &values[j * stride + offset + block * DIMS..][..DIMS];
            for i in 0..DIMS {
                acc[i] += w * v[i].f32();
            }
        }
        out.copy_from_slice(&acc);
    }
}

/// A block's attention on the tile unit: per KV head and tile of `TILE` positions, the scores of every (row,
/// head) pair in blocks of 16 pairs × 16 positions, the running softmax as in `attend_with` (on 512-bit
/// registers), the weights rounded to bf16, and their product with the tile's values in blocks of 16 pairs ×
/// 16 dimensions, added to the output under the softmax's correction.
#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::super::packed::amx::{DEPTH, ROWS, Tiles};
    use super::super::packed::round_into;
    use super::{BlockAttention, Element, HeadTiles, PANEL, TILE, TiledKv, exp_nonpositive};
    use crate::core::engine::native::backend::AttentionShape;
    use half::bf16;

    /// # Safety
    /// The CPU has AMX and AVX-512 and this thread may use the tiles (`TiledKv::usable`), and `tiled` holds
    /// `job`'s sequence (`TiledKv::pack` of it).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
    pub unsafe fn attend<E: Element>(
        job: &BlockAttention<'_, E>,
        tiled: &TiledKv,
        scores: &mut Vec<f32>,
        dst: &mut [f32],
    ) {
        let AttentionShape { num_heads, num_kv_heads, head_dim, .. } = *job.shape;
        let group = num_heads / num_kv_heads;
        let row_width = num_heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let pairs = job.rows * group;
        // Whole blocks of 16 pairs; the pairs past the last one are zeros whose results are not read.
        let blocks = pairs.div_ceil(ROWS);
        let context = |r: usize| job.seq.first_position + job.first + r + 1;
        let longest = context(job.rows - 1);
        let out_of = |pair: usize| (pair / group) * row_width + (pair % group) * head_dim;
        assert!(tiled.heads.len() == num_kv_heads, "one layout per KV head");
        assert!(head_dim.is_multiple_of(DEPTH) && dst.len() == pairs * num_kv_heads * head_dim);
        scores.clear();
        scores.resize(blocks * ROWS * TILE, 0.0);
        let mut queries = vec![bf16::ZERO; blocks * ROWS * head_dim];
        let mut weights = vec![bf16::ZERO; blocks * ROWS * TILE];
        let mut products = vec![0.0f32; blocks * ROWS * head_dim];
        let mut running = vec![(f32::NEG_INFINITY, 0.0f32); pairs];
        let mut corrections = vec![1.0f32; pairs];
        dst.fill(0.0);
        let tiles = Tiles::configure();
        for (kv_head, HeadTiles { keys, values }) in tiled.heads.iter().enumerate() {
            assert!(keys.len() >= longest.div_ceil(TILE) * TILE * head_dim && values.len() == keys.len());
            running.fill((f32::NEG_INFINITY, 0.0));
            let head_out = kv_head * group * head_dim;
            for pair in 0..pairs {
                round_into(
                    &job.queries[out_of(pair) + head_out..][..head_dim],
                    &mut queries[pair * head_dim..][..head_dim],
                );
            }
            for t0 in (0..longest).step_by(TILE) {
                let width = TILE.min(longest - t0);
                // Rows whose context ends before this tile have nothing in it; whole blocks of them are skipped.
                let live = t0.saturating_sub(context(0) - 1) * group..pairs;
                let first_block = live.start / ROWS;
                let key_panels = width.div_ceil(PANEL);
                // SAFETY (both products): the tiles are configured on this thread; rows of blocks
                // `first_block..blocks` lie in `queries`, `scores`, `weights` and `products` (sized for
                // `blocks`); key panels up to `key_panels` of this tile and value panels of this tile lie in
                // the head's layout, which holds whole tiles up to `longest` (asserted); a weight row is read
                // for `chunks · DEPTH ≤ TILE` positions.
                for block in (first_block..blocks).step_by(2) {
                    let row_blocks = (blocks - block).min(2);
                    for panel in (0..key_panels).step_by(2) {
                        // SAFETY: see above.
                        unsafe {
                            tiles.multiply(
                                queries.as_ptr().add(block * ROWS * head_dim),
                                head_dim * 2,
                                keys.as_ptr().add((t0 / PANEL + panel) * PANEL * head_dim),
                                PANEL * head_dim,
                                scores.as_mut_ptr().add(block * ROWS * TILE + panel * PANEL),
                                TILE * 4,
                                head_dim / DEPTH,
                                row_blocks,
                                (key_panels - panel).min(2),
                            )
                        };
                    }
                }
                let chunks = width.div_ceil(DEPTH);
                // A weight row is rounded whole, zeros past `valid`, so the product may read `chunks · DEPTH`.
                for pair in live.clone() {
                    let valid = (context(pair / group) - t0).min(width);
                    let (max, sum) = running[pair];
                    let row: &mut [bf16; TILE] = (&mut weights[pair * TILE..][..TILE]).try_into().expect("a tile");
                    let (new_max, tile_sum) =
                        weigh(scores[pair * TILE..][..TILE].try_into().expect("a tile"), valid, scale, max, row);
                    corrections[pair] = exp_nonpositive(max - new_max);
                    running[pair] = (new_max, sum * corrections[pair] + tile_sum);
                }
                let tile_values = values[(t0 / TILE) * TILE * head_dim..].as_ptr();
                for block in (first_block..blocks).step_by(2) {
                    let row_blocks = (blocks - block).min(2);
                    for panel in (0..head_dim / PANEL).step_by(2) {
                        // SAFETY: see above.
                        unsafe {
                            tiles.multiply(
                                weights.as_ptr().add(block * ROWS * TILE),
                                TILE * 2,
                                tile_values.add(panel * TILE * PANEL),
                                TILE * PANEL,
                                products.as_mut_ptr().add(block * ROWS * head_dim + panel * PANEL),
                                head_dim * 4,
                                chunks,
                                row_blocks,
                                (head_dim / PANEL - panel).min(2),
                            )
                        };
                    }
                }
                for pair in live {
                    let out = &mut dst[out_of(pair) + head_out..][..head_dim];
                    let correction = corrections[pair];
                    for (o, p) in out.iter_mut().zip(&products[pair * head_dim..][..head_dim]) {
                        *o = *o * correction + p;
                    }
                }
            }
            for (pair, &(_, sum)) in running.iter().enumerate() {
                let inverse = 1.0 / sum;
                dst[out_of(pair) + head_out..][..head_dim].iter_mut().for_each(|o| *o *= inverse);
            }
        }
    }

    /// One (row, head) pair's tile of raw scores, its first `valid` real: scaled, their maximum taken with
    /// `max` (the largest earlier score), and `weights` set to e^(score − that maximum) rounded to bf16, zero
    /// past `valid`. Returns the new maximum and the sum of the f32 weights. Four 512-bit registers hold the
    /// tile from start to end: written as plain loops it was five passes and two scalar horizontal folds.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    fn weigh(scores: &[f32; TILE], valid: usize, scale: f32, max: f32, weights: &mut [bf16; TILE]) -> (f32, f32) {
        use std::arch::x86_64::*;
        const LANES: usize = 16;
        let live = |v: usize| -> __mmask16 {
            let lanes = valid.saturating_sub(v * LANES).min(LANES);
            ((1u32 << lanes) - 1) as __mmask16
        };
        let masks: [__mmask16; TILE / LANES] = std::array::from_fn(live);
        // SAFETY: each load reads 16 floats of the 64 in `scores`.
        let x: [__m512; TILE / LANES] = std::array::from_fn(|v| unsafe {
            _mm512_mul_ps(
                _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), masks[v], scores.as_ptr().add(v * LANES)),
                _mm512_set1_ps(scale),
            )
        });
        let tile_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])));
        let new_max = max.max(tile_max);
        let e: [__m512; TILE / LANES] =
            std::array::from_fn(|v| _mm512_maskz_mov_ps(masks[v], exp(_mm512_sub_ps(x[v], _mm512_set1_ps(new_max)))));
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(e[0], e[1]), _mm512_add_ps(e[2], e[3])));
        for half in 0..2 {
            // Nearest-even rounding, as `round_into`; lanes 0..16 from the second operand, 16..32 from the first.
            let pair = _mm512_cvtne2ps_pbh(e[2 * half + 1], e[2 * half]);
            // SAFETY: 32 bf16s (64 bytes) at `half · 32` of the 64 in `weights`.
            unsafe {
                _mm512_storeu_si512(
                    weights.as_mut_ptr().add(half * 32).cast(),
                    std::mem::transmute::<__m512bh, __m512i>(pair),
                )
            };
        }
        (new_max, sum)
    }

    /// `exp_nonpositive` on 16 lanes, with fused multiply-adds.
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
        use super::super::math::exp::*;
        use std::arch::x86_64::*;
        let x = _mm512_max_ps(x, _mm512_set1_ps(FLOOR));
        let round = _mm512_set1_ps(ROUND);
        let shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), round);
        let n = _mm512_sub_ps(shifted, round);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(POLYNOMIAL[0]);
        for c in &POLYNOMIAL[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        let bits = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(round));
        _mm512_mul_ps(e, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(bits, _mm512_set1_epi32(127)))))
    }

    #[cfg(test)]
    mod tests {
        use super::super::exp_nonpositive;

        /// The 16-lane exp agrees with the scalar one it copies within a few ulp (fused multiply-adds round
        /// once where the scalar rounds twice), over softmax's whole range and past its floor.
        #[test]
        fn the_wide_exp_agrees_with_the_scalar_one() {
            if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
                eprintln!("SKIPPED the_wide_exp_agrees_with_the_scalar_one: this CPU has no AVX-512");
                return;
            }
            let xs: Vec<f32> = (0..=95_000).map(|i| -(i as f32) / 1_000.0).collect();
            for chunk in xs.chunks_exact(16) {
                let mut wide = [0.0f32; 16];
                // SAFETY: the CPU has AVX-512 F and FMA (checked above); 16 floats are read and written.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(wide.as_mut_ptr(), super::exp(_mm512_loadu_ps(chunk.as_ptr())));
                }
                for (&x, &w) in chunk.iter().zip(&wide) {
                    let scalar = exp_nonpositive(x);
                    assert!((w - scalar).abs() <= 4.0 * f32::EPSILON * scalar, "e^{x}: {w} vs {scalar}");
                }
            }
        }
    }
}

/// The two inner loops with explicit FMA instructions. LLVM vectorises the plain loops but, without fast-math,
/// never fuses their multiply and add; written with `f32::mul_add` it stopped vectorising them at all.
#[cfg(target_arch = "x86_64")]
mod fused {
    use super::{Element, KEYS, QUERIES};
    use std::arch::x86_64::*;

    const LANES: usize = 8;

    /// Eight values at `at`, widened to f32 (a bf16 is an f32's top 16 bits).
    ///
    /// # Safety
    /// Eight values at `at` are readable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_8<E: Element>(at: *const E) -> __m256 {
        // SAFETY: eight values at `at` (the caller's promise): 16 bytes of bf16 or 32 of f32.
        unsafe {
            if E::BF16 {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(at.cast()))))
            } else {
                _mm256_loadu_ps(at.cast())
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn score_chunk(queries: &[&[f32]; QUERIES], keys_t: &[f32]) -> [[f32; KEYS]; QUERIES] {
        let mut acc = [[_mm256_setzero_ps(); KEYS / LANES]; QUERIES];
        for (d, column) in keys_t.chunks_exact(KEYS).enumerate() {
            // SAFETY: `column` holds KEYS = 16 f32s, two vectors.
            let keys = unsafe { [_mm256_loadu_ps(column.as_ptr()), _mm256_loadu_ps(column.as_ptr().add(LANES))] };
            for (acc, query) in acc.iter_mut().zip(queries) {
                let q = _mm256_set1_ps(query[d]);
                acc[0] = _mm256_fmadd_ps(q, keys[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(q, keys[1], acc[1]);
            }
        }
        let mut out = [[0.0f32; KEYS]; QUERIES];
        for (out, acc) in out.iter_mut().zip(&acc) {
            for (lanes, vector) in out.chunks_exact_mut(LANES).zip(acc) {
                // SAFETY: `lanes` holds 8 f32s.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *vector) };
            }
        }
        out
    }

    /// `query · keys[j · stride..][..query.len()]` for j in 0..8: one accumulator per key over the head's
    /// dimensions, then the eight sums reduced into one vector with three rounds of pairwise adds.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_8<E: Element>(query: &[f32], keys: &[E], stride: usize) -> [f32; 8] {
        let head_dim = query.len();
        assert!(head_dim.is_multiple_of(LANES) && keys.len() >= 7 * stride + head_dim, "eight whole key rows");
        let mut acc = [_mm256_setzero_ps(); 8];
        for d in (0..head_dim).step_by(LANES) {
            // SAFETY: d + 8 ≤ head_dim, and key j's row lies inside `keys` (asserted).
            unsafe {
                let q = _mm256_loadu_ps(query.as_ptr().add(d));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(q, load_8(keys.as_ptr().add(j * stride + d)), *acc);
                }
            }
        }
        // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: after two rounds each 128-bit
        // half holds four keys' partial sums in key order, and adding the halves finishes them.
        let pairs = [
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
            _mm256_hadd_ps(acc[4], acc[5]),
            _mm256_hadd_ps(acc[6], acc[7]),
        ];
        let (first, second) = (_mm256_hadd_ps(pairs[0], pairs[1]), _mm256_hadd_ps(pairs[2], pairs[3]));
        let low = _mm256_permute2f128_ps(first, second, 0x20);
        let high = _mm256_permute2f128_ps(first, second, 0x31);
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 f32s.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(low, high)) };
        out
    }

    /// `out[..64] += Σ_j weights[j] · values[j · stride + offset ..][..64]`, eight independent accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate_64<E: Element>(
        out: &mut [f32],
        weights: &[f32],
        values: &[E],
        offset: usize,
        stride: usize,
    ) {
        assert!(out.len() == 64, "a 64-wide block of one head");
        assert!(
            weights.is_empty() || values.len() >= (weights.len() - 1) * stride + offset + 64,
            "a value row per weight"
        );
        // SAFETY: `out` holds 64 f32s (asserted), eight vectors.
        let mut acc: [__m256; 8] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(out.as_ptr().add(k * LANES)) });
        for (j, &w) in weights.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            let row = j * stride + offset;
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row + 64 ≤ values.len() for every j < weights.len() (asserted): all eight loads inside.
                let v = unsafe { load_8(values.as_ptr().add(row + k * LANES)) };
                *acc = _mm256_fmadd_ps(w, v, *acc);
            }
        }
        for (k, acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds 64 f32s (asserted).
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(k * LANES), *acc) };
        }
    }
}
