//! The inner loops of the CPU backend: dot products of activation rows against a weight row, several rows
//! at once so each weight is loaded (and widened from bf16) once per group. The binary targets baseline
//! x86-64, so there is an AVX2 + FMA version written with intrinsics (the auto-vectoriser turned the bf16
//! widening into scalar loads and shuffles), picked at run time, and a portable one for other CPUs.

/// Activation rows that share one pass over a weight row.
pub const GROUP: usize = 4;

/// Weight element types the kernels read.
pub trait WeightElement: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// Eight consecutive elements as f32 lanes.
    ///
    /// # Safety
    /// `ptr` must point at 8 readable elements, on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable f32s.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(ptr) }
    }
}

impl WeightElement for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bf16s (16 bytes) and AVX2.
        unsafe {
            let halves = _mm_loadu_si128(ptr.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
        }
    }
}

/// `out[t] = x[t] · w` for up to `GROUP` rows `x[t]`, each as long as `w`.
pub fn dot_rows<W: WeightElement>(x: &[&[f32]], w: &[W], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_rows_avx2(x, w, out) };
    }
    dispatch(x, w, out);
}

/// Weight rows and activation rows of one register tile: `BLOCK_FEATURES × BLOCK_ROWS` accumulators plus the
/// loaded weights fill the 16 AVX2 registers, and every load feeds several FMAs (batched decode is
/// compute-bound, unlike batch 1).
pub const BLOCK_FEATURES: usize = 4;
pub const BLOCK_ROWS: usize = 3;

/// `out[f][r] = w[f] · x[r]` for a full tile.
pub fn dot_block<W: WeightElement>(
    x: [&[f32]; BLOCK_ROWS],
    w: [&[W]; BLOCK_FEATURES],
) -> [[f32; BLOCK_ROWS]; BLOCK_FEATURES] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2_block(x, w) };
    }
    w.map(|row| dot_group::<W, BLOCK_ROWS>(x, row))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexes rows, features and accumulators in lockstep
unsafe fn avx2_block<W: WeightElement>(
    x: [&[f32]; BLOCK_ROWS],
    w: [&[W]; BLOCK_FEATURES],
) -> [[f32; BLOCK_ROWS]; BLOCK_FEATURES] {
    use std::arch::x86_64::*;
    let len = w[0].len();
    let body = len - len % LANES;
    for row in &x {
        assert!(row.len() >= len, "activation row shorter than the weight row");
    }
    for row in &w {
        assert!(row.len() >= len, "weight rows of one tile differ in length");
    }
    let mut acc = [[_mm256_setzero_ps(); BLOCK_ROWS]; BLOCK_FEATURES];
    let mut at = 0;
    while at < body {
        // SAFETY: at + 8 ≤ body ≤ len, and every row holds at least len values (asserted).
        unsafe {
            let weights: [__m256; BLOCK_FEATURES] = std::array::from_fn(|f| W::load8(w[f].as_ptr().add(at)));
            for r in 0..BLOCK_ROWS {
                let xs = _mm256_loadu_ps(x[r].as_ptr().add(at));
                for f in 0..BLOCK_FEATURES {
                    acc[f][r] = _mm256_fmadd_ps(xs, weights[f], acc[f][r]);
                }
            }
        }
        at += LANES;
    }
    let mut out = [[0.0f32; BLOCK_ROWS]; BLOCK_FEATURES];
    for f in 0..BLOCK_FEATURES {
        for r in 0..BLOCK_ROWS {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` holds 8 f32s.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[f][r]) };
            let tail: f32 = (body..len).map(|i| x[r][i] * w[f][i].widen()).sum();
            out[f][r] = lanes.iter().sum::<f32>() + tail;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<W: WeightElement>(x: &[&[f32]], w: &[W], out: &mut [f32]) {
    // SAFETY: AVX2 and FMA are present (the caller checked), which is all every arm needs.
    unsafe {
        match x {
            [a] => out[0] = avx2_group::<W, 1, 4>([a], w)[0],
            [a, b] => out[..2].copy_from_slice(&avx2_group::<W, 2, 2>([a, b], w)),
            [a, b, c] => out[..3].copy_from_slice(&avx2_group::<W, 3, 2>([a, b, c], w)),
            [a, b, c, d, ..] => out[..4].copy_from_slice(&avx2_group::<W, 4, 2>([a, b, c, d], w)),
            [] => {}
        }
    }
}

/// `R` activation rows against one weight row, `U` vectors of 8 per row per iteration so that `R × U`
/// independent FMA chains hide the FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indexes rows, chunks and accumulators in lockstep
unsafe fn avx2_group<W: WeightElement, const R: usize, const U: usize>(x: [&[f32]; R], w: &[W]) -> [f32; R] {
    use std::arch::x86_64::*;
    let len = w.len();
    let step = LANES * U;
    let body = len - len % step;
    for row in &x {
        assert!(row.len() >= len, "activation row shorter than the weight row");
    }
    let mut acc = [[_mm256_setzero_ps(); U]; R];
    let mut at = 0;
    while at < body {
        for u in 0..U {
            // SAFETY: at + u·8 + 8 ≤ body ≤ len, and every row holds at least len values (asserted).
            unsafe {
                let weights = W::load8(w.as_ptr().add(at + u * LANES));
                for r in 0..R {
                    let xs = _mm256_loadu_ps(x[r].as_ptr().add(at + u * LANES));
                    acc[r][u] = _mm256_fmadd_ps(xs, weights, acc[r][u]);
                }
            }
        }
        at += step;
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let mut sum = acc[r][0];
        for u in 1..U {
            sum = _mm256_add_ps(sum, acc[r][u]);
        }
        let mut lanes = [0.0f32; LANES];
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let tail: f32 = (body..len).map(|i| x[r][i] * w[i].widen()).sum();
        out[r] = lanes.iter().sum::<f32>() + tail;
    }
    out
}

/// The portable path; a constant row count lets the accumulators live in registers.
fn dispatch<W: WeightElement>(x: &[&[f32]], w: &[W], out: &mut [f32]) {
    match x {
        [a] => out[0] = dot_group::<W, 1>([a], w)[0],
        [a, b] => out[..2].copy_from_slice(&dot_group::<W, 2>([a, b], w)),
        [a, b, c] => out[..3].copy_from_slice(&dot_group::<W, 3>([a, b, c], w)),
        [a, b, c, d, ..] => out[..4].copy_from_slice(&dot_group::<W, 4>([a, b, c, d], w)),
        [] => {}
    }
}

const LANES: usize = 8;

#[inline(always)]
fn dot_group<W: WeightElement, const R: usize>(x: [&[f32]; R], w: &[W]) -> [f32; R] {
    let len = w.len();
    let body = len - len % LANES;
    let mut acc = [[0.0f32; LANES]; R];
    let weights = w[..body].chunks_exact(LANES);
    let rows: [&[f32]; R] = x.map(|row| &row[..body]);
    for (at, chunk) in weights.enumerate() {
        let mut wide = [0.0f32; LANES];
        for lane in 0..LANES {
            wide[lane] = chunk[lane].widen();
        }
        for r in 0..R {
            let xs = &rows[r][at * LANES..at * LANES + LANES];
            for lane in 0..LANES {
                acc[r][lane] += xs[lane] * wide[lane];
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let tail: f32 = (body..len).map(|i| x[r][i] * w[i].widen()).sum();
        out[r] = acc[r].iter().sum::<f32>() + tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_dots_equal_one_at_a_time_in_both_element_types() {
        let len = 37; // not a multiple of the lanes
        let w: Vec<f32> = (0..len).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
        let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let rows: Vec<Vec<f32>> = (0..3).map(|r| (0..len).map(|i| ((i + r * 7) % 5) as f32 - 2.0).collect()).collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let mut grouped = [0.0; 3];
        dot_rows(&refs, &w, &mut grouped);
        let mut grouped16 = [0.0; 3];
        dot_rows(&refs, &w16, &mut grouped16);
        for (r, row) in rows.iter().enumerate() {
            let expected: f32 = row.iter().zip(&w).map(|(a, b)| a * b).sum();
            assert!((grouped[r] - expected).abs() < 1e-4, "{} vs {expected}", grouped[r]);
            // The weights are exact in bf16 (multiples of 1/8), so the bf16 path must agree too.
            assert!((grouped16[r] - expected).abs() < 1e-4);
        }
        let block = dot_block([&rows[0], &rows[1], &rows[2]], [&w16, &w16, &w16, &w16]);
        for feature in block {
            for (value, expected) in feature.iter().zip(grouped16) {
                assert!((value - expected).abs() < 1e-4);
            }
        }
        // The portable path (what a CPU without AVX2 runs) agrees as well.
        let mut portable = [0.0; 3];
        dispatch(&refs, &w16, &mut portable);
        for r in 0..3 {
            assert!((portable[r] - grouped16[r]).abs() < 1e-4);
        }
    }
}
