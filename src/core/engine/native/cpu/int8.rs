//! 8-bit weights (`--quantization int8`): each output feature's row is stored as symmetric int8 with one f32
//! scale (its largest magnitude over 127), quantized at load from whatever the checkpoint holds. A product
//! reads a quarter of f32's bytes and half of bf16's, which is what bounds decode on a CPU. Per-channel
//! rather than per-group: one scale per row costs nothing in the inner loop, and the error it leaves is
//! measured (the engine's tests compare logits with the unquantized model; `dynamo bench engine` prints it).
//!
//! Two layouts, as for bf16 (`packed`): on CPUs with AVX-512 VNNI the rows are packed in panels
//! (`PackedInt8`), whose products quantize activations to 16 bits on the vector unit and, for prefills on the
//! tile unit, read each panel converted to bf16. Elsewhere they stay rows (`Int8Rows`): decode's products
//! (few activation rows) quantize each activation row too, in blocks of 32 with a scale each (as llama.cpp's
//! q8_0 does, so an outlier spoils only its block), and multiply integers: AVX2's `vpmaddubsw`/`vpmaddwd` do
//! 32 products in three instructions, where widening every weight to f32 took eight; widened, the kernel ran
//! at 44 % of int8's memory bound. Their prefill's GEMM reads the weights dequantized, with activations as
//! they are.
use super::super::weights::HostData;
use super::packed::{Output, PackedBf16, SharedOutput};
use rayon::prelude::*;
use std::ops::Range;

pub struct Int8Rows {
    pub values: Vec<i8>,
    /// One per row: `weight ≈ value × scale`.
    pub scales: Vec<f32>,
}

impl Int8Rows {
    /// `data` (`rows × cols`, row-major) quantized row by row.
    pub fn quantize(rows: usize, cols: usize, data: &HostData) -> Self {
        let widened;
        let values: &[f32] = match data {
            HostData::F32(values) => values,
            HostData::Bf16(values) => {
                widened = values.par_iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
                &widened
            }
        };
        let mut quantized = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        if cols > 0 {
            quantized.par_chunks_mut(cols).zip(scales.par_iter_mut()).zip(values.par_chunks(cols)).for_each(
                |((out, scale), row)| {
                    let largest = row.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
                    // A row of zeros (or of non-finite values, which no quantization keeps) gets scale 1.
                    *scale = if largest > 0.0 && largest.is_finite() { largest / 127.0 } else { 1.0 };
                    let inverse = 1.0 / *scale;
                    for (q, v) in out.iter_mut().zip(row) {
                        *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
                    }
                },
            );
        }
        Self { values: quantized, scales }
    }

    /// Row `row` as f32 (an embedding lookup).
    pub fn row(&self, row: usize, cols: usize) -> impl Iterator<Item = f32> + '_ {
        let scale = self.scales[row];
        self.values[row * cols..(row + 1) * cols].iter().map(move |&q| f32::from(q) * scale)
    }

    /// The whole matrix as f32 (a prefill's GEMM reads it so).
    pub fn dequantize(&self, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.values.len()];
        if cols > 0 {
            out.par_chunks_mut(cols).zip(self.values.par_chunks(cols)).zip(self.scales.par_iter()).for_each(
                |((out, row), &scale)| {
                    for (o, &q) in out.iter_mut().zip(row) {
                        *o = f32::from(q) * scale;
                    }
                },
            );
        }
        out
    }
}

/// Values an activation block holds: one scale each.
pub const BLOCK: usize = 32;

/// An activation row quantized in blocks of `BLOCK` (the tail past the last whole block stays f32).
pub struct Q8Row {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Q8Row {
    pub fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i8; blocks * BLOCK];
        let mut scales = vec![0f32; blocks];
        for ((out, scale), block) in values.chunks_exact_mut(BLOCK).zip(&mut scales).zip(x.chunks_exact(BLOCK)) {
            let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = if largest > 0.0 && largest.is_finite() { largest / 127.0 } else { 0.0 };
            let inverse = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
            for (q, v) in out.iter_mut().zip(block) {
                *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
            }
        }
        Self { values, scales }
    }
}

/// Rows `features` of an int8 matrix (`cols` wide, unscaled values `w`, row scales `scales`) against every
/// activation row (`x`, quantized as `q`), into `block[f * n + t]`: four weight rows at a time against each
/// activation row, so one pass over an activation block feeds four products and one reduction ends four.
pub fn tile(
    q: &[Q8Row],
    x: &[&[f32]],
    w: &[i8],
    scales: &[f32],
    cols: usize,
    features: Range<usize>,
    block: &mut [f32],
) {
    let n = x.len();
    let mut f = features.start;
    while f < features.end {
        let at = f - features.start;
        if f + 4 <= features.end {
            let rows: [&[i8]; 4] = std::array::from_fn(|i| &w[(f + i) * cols..(f + i + 1) * cols]);
            for t in 0..n {
                for (i, sum) in dot4(&q[t], x[t], rows).into_iter().enumerate() {
                    block[(at + i) * n + t] = sum * scales[f + i];
                }
            }
            f += 4;
        } else {
            let row = &w[f * cols..(f + 1) * cols];
            for t in 0..n {
                block[at * n + t] = dot_portable(&q[t], x[t], row) * scales[f];
            }
            f += 1;
        }
    }
}

/// Four weight rows against one activation row.
fn dot4(q: &Q8Row, x: &[f32], w: [&[i8]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present (checked just above).
        return unsafe { dot4_avx2(q, x, w) };
    }
    w.map(|row| dot_portable(q, x, row))
}

/// One weight row against one activation row, without SIMD.
fn dot_portable(q: &Q8Row, x: &[f32], w: &[i8]) -> f32 {
    let body = q.values.len();
    let blocks = q.values.chunks_exact(BLOCK).zip(w.chunks_exact(BLOCK)).zip(&q.scales);
    let sum: f32 = blocks
        .map(|((a, b), &scale)| a.iter().zip(b).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum::<i32>() as f32 * scale)
        .sum();
    sum + x[body..].iter().zip(&w[body..]).map(|(a, &b)| a * f32::from(b)).sum::<f32>()
}

/// Four weight rows against one activation row: integer products per block (`vpmaddubsw` takes unsigned
/// times signed bytes, so |x| times w with x's sign; |x| ≤ 127 keeps each pair's sum within i16), widened
/// and scaled by the block's activation scale; the tail past the last whole block in f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot4_avx2(q: &Q8Row, x: &[f32], w: [&[i8]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let body = q.values.len();
    for row in &w {
        assert!(row.len() >= body && row.len() == x.len(), "weight rows as long as the activation row");
    }
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    // The next four rows follow these in memory: two of their cache lines are asked for per block, so they
    // arrive while these are multiplied (rows of a few hundred bytes are too short for the hardware prefetcher
    // to get ahead on its own).
    let next = w[0].as_ptr().wrapping_add(4 * x.len());
    for (b, &scale) in q.scales.iter().enumerate() {
        // Prefetches never fault, so a line past the matrix's end costs nothing.
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * 128).cast());
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * 128 + 64).cast());
        // SAFETY: block b's 32 bytes lie within the activation values and every weight row (asserted).
        unsafe {
            let xs = _mm256_loadu_si256(q.values.as_ptr().add(b * BLOCK).cast());
            let magnitude = _mm256_sign_epi8(xs, xs);
            let scale = _mm256_set1_ps(scale);
            for i in 0..4 {
                let ws = _mm256_loadu_si256(w[i].as_ptr().add(b * BLOCK).cast());
                let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(ws, xs));
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[i] = _mm256_fmadd_ps(sums, scale, acc[i]);
            }
        }
    }
    // Four horizontal sums at once: pairwise adds leave each row's total in one lane.
    let halves = |v: __m256| _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let (a, b, c, d) = (halves(acc[0]), halves(acc[1]), halves(acc[2]), halves(acc[3]));
    let totals = _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds 4 f32s.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), totals) };
    for (i, row) in w.iter().enumerate() {
        out[i] += x[body..].iter().zip(&row[body..]).map(|(a, &b)| a * f32::from(b)).sum::<f32>();
    }
    out
}

/// Reduction values per activation scale in the packed product: wide enough that scaling a block's sums costs
/// little next to its multiply-adds, narrow enough that they cannot overflow i32 (32 pairs of 127 × 32767).
pub const PACKED_BLOCK: usize = 64;
const LANES: usize = 16;

/// int8 weights laid out as `PackedBf16` lays out bf16 (panels of 16 output features, inside a panel by pairs of
/// the reduction index: `panel[k / 2][feature][k % 2]`), for CPUs with AVX-512 VNNI. One 32-byte load widened to
/// 16-bit is a pair for each of the 16 features, and `vpdpwssd` multiplies it by an activation pair quantized to
/// 16 bits and adds both products to each lane: activations keep 15 bits per block of `PACKED_BLOCK` (the
/// row-layout kernel's 8-bit blocks lose more than the weights do), and no horizontal sum is needed. On the
/// tile unit a prefill's product reads each panel converted to bf16 (int8 values are exact in bf16), so
/// prompts run as fast as bf16's do; the row scales are applied to the outputs.
pub struct PackedInt8 {
    pub rows: usize,
    pub cols: usize,
    /// `cols` rounded up to whole `PACKED_BLOCK`s, zeros past `cols`.
    depth: usize,
    panels: usize,
    data: Vec<i8>,
    /// One per feature, zero past `rows`.
    scales: Vec<f32>,
}

impl PackedInt8 {
    /// Whether this CPU has what the packed product needs: AVX-512 F, BW and VNNI.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static DETECTED: OnceLock<bool> = OnceLock::new();
            *DETECTED.get_or_init(|| {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The quantized rows (`rows × cols`) in panels.
    pub fn pack(quantized: &Int8Rows, rows: usize, cols: usize) -> Self {
        let depth = cols.next_multiple_of(PACKED_BLOCK).max(PACKED_BLOCK);
        let panels = rows.div_ceil(LANES);
        let mut data = vec![0i8; panels * LANES * depth];
        let mut scales = vec![0f32; panels * LANES];
        scales[..rows].copy_from_slice(&quantized.scales[..rows]);
        data.par_chunks_mut(LANES * depth).enumerate().for_each(|(panel, out)| {
            for lane in 0..LANES.min(rows - panel * LANES) {
                let row = panel * LANES + lane;
                for (k, &value) in quantized.values[row * cols..(row + 1) * cols].iter().enumerate() {
                    out[(k / 2) * LANES * 2 + lane * 2 + k % 2] = value;
                }
            }
        });
        Self { rows, cols, depth, panels, data, scales }
    }

    /// Row `row` as f32 (an embedding lookup).
    pub fn row(&self, row: usize) -> impl Iterator<Item = f32> + '_ {
        let (panel, lane, scale) = (row / LANES, row % LANES, self.scales[row]);
        (0..self.cols).map(move |k| {
            f32::from(self.data[panel * LANES * self.depth + (k / 2) * LANES * 2 + lane * 2 + k % 2]) * scale
        })
    }

    pub fn panel_count(&self) -> usize {
        self.panels
    }

    /// Whether a product of `n` activation rows runs on the tile unit (the activations it reads rounded to
    /// bf16) rather than on the vector one (quantized, `Q16Rows`).
    pub fn on_tiles(&self, n: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use super::packed::amx;
            n >= amx::ROWS && self.cols.is_multiple_of(amx::DEPTH) && amx::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Panels `first..first + count` as bf16 (unscaled: int8 values are exact in bf16) in `PackedBf16`'s layout.
    #[cfg(target_arch = "x86_64")]
    fn bf16_panels(&self, first: usize, count: usize, mut buffer: Vec<half::bf16>) -> PackedBf16 {
        let depth = self.cols.next_multiple_of(2);
        let len = count * LANES * depth;
        // Not zeroed first: every value is written below, and a zeroing pass cost as much as the conversion.
        buffer.clear();
        buffer.reserve(len);
        let spare = &mut buffer.spare_capacity_mut()[..len];
        for p in 0..count {
            let from = &self.data[(first + p) * LANES * self.depth..][..LANES * depth];
            // SAFETY: the CPU has AVX-512 F, BW and BF16 (the tile unit is used only where it does).
            unsafe { widen_avx512(from, &mut spare[p * LANES * depth..][..LANES * depth]) };
        }
        // SAFETY: the panels cover all `len` values, each written by `widen_avx512`.
        unsafe { buffer.set_len(len) };
        PackedBf16::from_panels(count * LANES, self.cols, count, buffer)
    }

    /// `PackedBf16::multiply_shared` for int8: the columns of panels `first_panel..first_panel+count` of `out`,
    /// all `n` rows.
    ///
    /// # Safety
    /// Calls running at the same time on one output must be given disjoint panels.
    pub unsafe fn multiply_shared(
        &self,
        x: &Prepared,
        n: usize,
        first_panel: usize,
        count: usize,
        out: &SharedOutput<'_>,
    ) {
        assert!(first_panel + count <= self.panels, "panels inside the matrix");
        #[cfg(target_arch = "x86_64")]
        {
            if self.on_tiles(n) {
                // The thread's buffer for converted panels, kept between calls: a fresh one per call would have
                // the kernel zero its pages every time.
                thread_local! {
                    static PANELS: std::cell::RefCell<Vec<half::bf16>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                let buffer = PANELS.with(|cell| cell.take());
                let converted = self.bf16_panels(first_panel, count, buffer);
                let shifted = out.panels_from(first_panel);
                // SAFETY: the caller gave this call these panels, which `shifted` starts at.
                unsafe { converted.multiply_shared(&x.rounded, n, 0, count, &shifted) };
                for p in 0..count {
                    let scales = &self.scales[(first_panel + p) * LANES..][..LANES];
                    // SAFETY: as above.
                    unsafe { shifted.scale_panel(p, n, scales) };
                }
                PANELS.with(|cell| cell.replace(converted.into_data()));
                return;
            }
            // SAFETY: as the caller promised; the CPU has AVX-512 F, BW and VNNI (the layout is made only then).
            unsafe { self.multiply_avx512(&x.quantized, n, first_panel, count, out.output()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, n, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn multiply_avx512(&self, x: &Q16Rows, n: usize, first_panel: usize, count: usize, out: Output) {
        assert!(x.depth == self.depth && x.values.len() >= n * self.depth, "activations quantized for this matrix");
        let mut t = 0;
        while t + ROW_TILE <= n {
            let mut p = 0;
            while p < count {
                let panels = (count - p).min(3);
                // SAFETY: rows t..t+4 and these panels are in bounds (asserted above).
                unsafe {
                    match panels {
                        3 => self.tile::<ROW_TILE, 3>(x, t, first_panel + p, out),
                        2 => self.tile::<ROW_TILE, 2>(x, t, first_panel + p, out),
                        _ => self.tile::<ROW_TILE, 1>(x, t, first_panel + p, out),
                    }
                }
                p += panels;
            }
            t += ROW_TILE;
        }
        // Single rows (a decode step's) with six panels in flight: bound by how fast the weights stream in.
        for row in t..n {
            let mut p = 0;
            while p < count {
                let panels = (count - p).min(6);
                // SAFETY: as above.
                unsafe {
                    match panels {
                        6 => self.tile::<1, 6>(x, row, first_panel + p, out),
                        5 => self.tile::<1, 5>(x, row, first_panel + p, out),
                        4 => self.tile::<1, 4>(x, row, first_panel + p, out),
                        3 => self.tile::<1, 3>(x, row, first_panel + p, out),
                        2 => self.tile::<1, 2>(x, row, first_panel + p, out),
                        _ => self.tile::<1, 1>(x, row, first_panel + p, out),
                    }
                }
                p += panels;
            }
        }
    }

    /// Rows `t..t+T` × panels `panel..panel+P`: per block, 16-bit activation pairs times widened weight pairs
    /// summed exactly in i32, then scaled by the block's activation scale into f32; the row scales at the end.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // indexes rows, panels and accumulators in lockstep
    unsafe fn tile<const T: usize, const P: usize>(&self, x: &Q16Rows, t: usize, panel: usize, out: Output) {
        use std::arch::x86_64::*;
        let blocks = self.depth / PACKED_BLOCK;
        let mut sums = [[_mm512_setzero_ps(); P]; T];
        for b in 0..blocks {
            let mut acc = [[_mm512_setzero_si512(); P]; T];
            for kk in b * PACKED_BLOCK / 2..(b + 1) * PACKED_BLOCK / 2 {
                // SAFETY: every panel holds `depth / 2` pairs of 16 lanes and each activation row `depth` values
                // (asserted by the caller), so every load is inside its allocation.
                unsafe {
                    if kk % 2 == 0 {
                        // Each panel is a stream of its own, too short for the hardware prefetcher to get far
                        // ahead of (and a decode step reads it once): its lines are asked for a block ahead.
                        for j in 0..P {
                            let ahead = (panel + j) * LANES * self.depth + kk * LANES * 2 + PREFETCH_AHEAD;
                            // A prefetch never faults, so one past the matrix's end costs nothing.
                            _mm_prefetch::<_MM_HINT_T0>(self.data.as_ptr().wrapping_add(ahead).cast());
                        }
                    }
                    let weights: [__m512i; P] = std::array::from_fn(|j| {
                        let at = (panel + j) * LANES * self.depth + kk * LANES * 2;
                        _mm512_cvtepi8_epi16(_mm256_loadu_si256(self.data.as_ptr().add(at).cast()))
                    });
                    for r in 0..T {
                        let pair = x.values.as_ptr().add((t + r) * self.depth + 2 * kk).cast::<i32>().read_unaligned();
                        let broadcast = _mm512_set1_epi32(pair);
                        for j in 0..P {
                            acc[r][j] = _mm512_dpwssd_epi32(acc[r][j], weights[j], broadcast);
                        }
                    }
                }
            }
            for r in 0..T {
                let scale = _mm512_set1_ps(x.scales[(t + r) * blocks + b]);
                for j in 0..P {
                    sums[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), scale, sums[r][j]);
                }
            }
        }
        for j in 0..P {
            // SAFETY: the scales hold 16 per panel.
            let scales = unsafe { _mm512_loadu_ps(self.scales.as_ptr().add((panel + j) * LANES)) };
            for r in 0..T {
                // SAFETY: the caller has ruled out other writers of these panels.
                unsafe { out.store(t + r, panel + j, _mm512_mul_ps(sums[r][j], scales)) };
            }
        }
    }
}

/// Activation rows of one multi-row tile: 4 × 3 i32 and f32 accumulators, 3 weight registers and a broadcast
/// fit the 32 AVX-512 registers.
const ROW_TILE: usize = 4;
/// How far ahead of its reads a tile asks for a panel's lines: a block of pairs (1 KiB), about what arrives
/// from memory while the lines before it are multiplied.
const PREFETCH_AHEAD: usize = PACKED_BLOCK / 2 * LANES * 2;

/// int8 values to bf16, in place of each other (exact: |v| ≤ 127 needs 7 of bf16's 8 significant bits), 32 at
/// a time: widened to i32, converted to f32, and two registers' worth narrowed to bf16 at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn widen_avx512(from: &[i8], to: &mut [std::mem::MaybeUninit<half::bf16>]) {
    use std::arch::x86_64::*;
    assert!(from.len() == to.len() && from.len().is_multiple_of(32), "whole groups of 32");
    for (from, to) in from.chunks_exact(32).zip(to.chunks_exact_mut(32)) {
        // SAFETY: 32 values on each side.
        unsafe {
            let low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(from.as_ptr().cast())));
            let high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(from.as_ptr().add(16).cast())));
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
            _mm512_storeu_si512(to.as_mut_ptr().cast(), both);
        }
    }
}

/// Activation rows quantized to 16 bits for `PackedInt8`'s vector product: each row padded with zeros to the
/// matrix's depth, one scale per `PACKED_BLOCK` values.
#[derive(Default)]
pub struct Q16Rows {
    depth: usize,
    values: Vec<i16>,
    scales: Vec<f32>,
}

impl Q16Rows {
    /// `x` (`n` rows of `cols`).
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        let depth = cols.next_multiple_of(PACKED_BLOCK).max(PACKED_BLOCK);
        let n = x.len() / cols.max(1);
        let blocks = depth / PACKED_BLOCK;
        let mut values = vec![0i16; n * depth];
        let mut scales = vec![0f32; n * blocks];
        for ((row, out), scales) in
            x.chunks_exact(cols).zip(values.chunks_exact_mut(depth)).zip(scales.chunks_exact_mut(blocks))
        {
            for ((block, out), scale) in row.chunks(PACKED_BLOCK).zip(out.chunks_exact_mut(PACKED_BLOCK)).zip(scales) {
                let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = if largest > 0.0 && largest.is_finite() { largest / 32767.0 } else { 0.0 };
                let inverse = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
                for (q, v) in out.iter_mut().zip(block) {
                    *q = (v * inverse).round().clamp(-32767.0, 32767.0) as i16;
                }
            }
        }
        Self { depth, values, scales }
    }
}

/// A product's activations in the forms its packed weights read: rounded to bf16 (bf16 weights, and int8 ones
/// on the tile unit) and quantized to 16 bits (int8 ones on the vector unit); each made only if some product of
/// the call reads it.
#[derive(Default)]
pub struct Prepared {
    pub rounded: Vec<half::bf16>,
    pub quantized: Q16Rows,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_half_a_step_of_their_own_scale() {
        let rows = 5;
        let cols = 37;
        let data: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 211) as f32 / 13.0 - 8.0).collect();
        let mut data = data;
        data[2 * cols..3 * cols].fill(0.0); // a row of zeros
        let q = Int8Rows::quantize(rows, cols, &HostData::F32(data.clone()));
        let back = q.dequantize(cols);
        for r in 0..rows {
            let largest = data[r * cols..(r + 1) * cols].iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in 0..cols {
                let (want, got) = (data[r * cols + c], back[r * cols + c]);
                assert!((want - got).abs() <= largest / 127.0 / 2.0 + 1e-6, "row {r} col {c}: {want} vs {got}");
            }
            // Each row's largest value is exact (it is ±127 steps).
            assert!(q.values[r * cols..(r + 1) * cols].iter().all(|&v| v >= -127));
            assert_eq!(q.row(r, cols).collect::<Vec<_>>(), back[r * cols..(r + 1) * cols]);
        }
        assert_eq!(q.scales[2], 1.0);
        let from_bf16 =
            Int8Rows::quantize(rows, cols, &HostData::Bf16(data.iter().map(|&v| half::bf16::from_f32(v)).collect()));
        assert_eq!(from_bf16.values.len(), rows * cols);
    }

    #[test]
    fn quantized_dots_are_within_the_activations_rounding_and_both_paths_agree() {
        for len in [32, 64, 100, 576] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
            let w: Vec<i8> = (0..len).map(|i| ((i * 53) % 255) as i32 - 127).map(|v| v as i8).collect();
            let q = Q8Row::quantize(&x);
            let exact: f32 = x.iter().zip(&w).map(|(a, &b)| a * f32::from(b)).sum();
            // Each activation moves by at most half its block's step.
            let bound: f32 = x
                .iter()
                .zip(&w)
                .enumerate()
                .map(|(i, (_, &b))| {
                    let step = q.scales.get(i / BLOCK).copied().unwrap_or(0.0);
                    step / 2.0 * f32::from(b).abs()
                })
                .sum();
            let mut got = [0f32; 5];
            // Five copies of the row: four through the four-row kernel, the fifth alone.
            let matrix: Vec<i8> = w.iter().copied().cycle().take(5 * len).collect();
            tile(std::slice::from_ref(&q), &[&x], &matrix, &[1.0; 5], len, 0..5, &mut got);
            assert!(got.iter().all(|&g| (g - got[4]).abs() <= 1e-3 * (1.0 + g.abs())), "{got:?}");
            let got = got[0];
            assert!((got - exact).abs() <= bound + 1e-3, "{len}: {got} vs {exact} (bound {bound})");
            // The portable sum of the same integers is the same number, up to float order.
            let blocks = q.values.chunks_exact(BLOCK).zip(w.chunks_exact(BLOCK)).zip(&q.scales);
            let portable: f32 = blocks
                .map(|((a, b), &s)| a.iter().zip(b).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum::<i32>() as f32 * s)
                .sum::<f32>()
                + x[q.values.len()..].iter().zip(&w[q.values.len()..]).map(|(a, &b)| a * f32::from(b)).sum::<f32>();
            assert!((got - portable).abs() <= 1e-3 * (1.0 + portable.abs()), "{len}: {got} vs {portable}");
        }
        // Extremes: ±127 everywhere stays exact (no i16 saturation), and zeros give zero.
        let one_row = |x: &[f32], w: &[i8]| {
            let mut out = [0f32; 4];
            let matrix: Vec<i8> = w.iter().copied().cycle().take(4 * w.len()).collect();
            tile(std::slice::from_ref(&Q8Row::quantize(x)), &[x], &matrix, &[1.0; 4], w.len(), 0..4, &mut out);
            out[0]
        };
        assert_eq!(one_row(&[1.0; 64], &[-127; 64]), -127.0 * 64.0);
        assert_eq!(one_row(&[-1.0; 64], &[-127; 64]), 127.0 * 64.0);
        assert_eq!(one_row(&[0.0; 64], &[-127; 64]), 0.0);
    }
}
