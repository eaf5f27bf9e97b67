//! 8-bit weights (`--quantization int8`): each output feature's row is stored as symmetric int8 with one f32
//! scale (its largest magnitude over 127), quantized at load from whatever the checkpoint holds. A product
//! reads a quarter of f32's bytes and half of bf16's, which is what bounds decode on a CPU. Per-channel
//! rather than per-group: one scale per row costs nothing in the inner loop, and the error it leaves is
//! measured (the engine's tests compare logits with the unquantized model; `dynamo bench engine` prints it).
//!
//! Decode's products (few activation rows) quantize each activation row too, in blocks of 32 with a scale
//! each (as llama.cpp's q8_0 does, so an outlier spoils only its block), and multiply integers: AVX2's
//! `vpmaddubsw`/`vpmaddwd` do 32 products in three instructions, where widening every weight to f32 took
//! eight; widened, the kernel ran at 44 % of int8's memory bound. Prefill's GEMM reads the weights
//! dequantized, with activations as they are.
use super::super::weights::HostData;
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
