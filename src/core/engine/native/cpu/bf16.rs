//! bf16 × bf16 dot products with f32 accumulation (AVX-512 BF16's `vdpbf16ps`: 32 multiply-adds per
//! instruction, twice the f32 FMA rate), for bf16 checkpoints on CPUs that have it. Activations are rounded to
//! bf16 once per matrix product, as bf16 inference does on every engine; weights are used as stored.
//!
//! One kernel serves decode and prefill: a register tile of `FEATURES` weight rows × up to `ROWS` activation
//! rows, so each load feeds several dot-product instructions.
use half::bf16;

pub const FEATURES: usize = 4;
pub const ROWS: usize = 4;

pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Activations rounded to the nearest bf16 (ties to even), the form the kernel reads.
pub fn round(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// `out[f][r] = w[f] · x[r]` for `F` weight rows and `R` activation rows of equal length.
///
/// Callers check `available()` first; without AVX-512 BF16 this computes the same sums in plain Rust.
pub fn tile<const F: usize, const R: usize>(x: [&[bf16]; R], w: [&[bf16]; F]) -> [[f32; R]; F] {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above).
        return unsafe { tile_avx512(x, w) };
    }
    w.map(|row| x.map(|xs| xs.iter().zip(row).map(|(a, b)| a.to_f32() * b.to_f32()).sum()))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::needless_range_loop)] // indexes rows, features and accumulators in lockstep
unsafe fn tile_avx512<const F: usize, const R: usize>(x: [&[bf16]; R], w: [&[bf16]; F]) -> [[f32; R]; F] {
    use std::arch::x86_64::{
        __m512bh, __m512i, __mmask32, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_maskz_loadu_epi16,
        _mm512_reduce_add_ps, _mm512_setzero_ps,
    };
    const STEP: usize = 32;
    let len = w.first().map_or(0, |row| row.len());
    for row in x.iter().chain(w.iter()) {
        assert!(row.len() >= len, "rows of one tile differ in length");
    }
    let mut acc = [[_mm512_setzero_ps(); R]; F];
    let body = len - len % STEP;
    let tail_mask: __mmask32 = if len == body { 0 } else { (1u32 << (len - body)) - 1 };
    let load = |ptr: *const bf16, at: usize, full: bool| -> __m512bh {
        // SAFETY: full loads read 32 elements at `at + 32 ≤ len`; the tail load is masked to `len - at`
        // elements, and masked-off lanes are not read.
        unsafe {
            let words = if full {
                _mm512_loadu_si512(ptr.add(at).cast())
            } else {
                _mm512_maskz_loadu_epi16(tail_mask, ptr.add(at).cast())
            };
            std::mem::transmute::<__m512i, __m512bh>(words)
        }
    };
    let mut at = 0;
    while at < len {
        let full = at < body;
        let weights: [__m512bh; F] = std::array::from_fn(|f| load(w[f].as_ptr(), at, full));
        for r in 0..R {
            let xs = load(x[r].as_ptr(), at, full);
            for f in 0..F {
                acc[f][r] = _mm512_dpbf16_ps(acc[f][r], xs, weights[f]);
            }
        }
        at += STEP;
    }
    let mut out = [[0.0f32; R]; F];
    for f in 0..F {
        for r in 0..R {
            out[f][r] = _mm512_reduce_add_ps(acc[f][r]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_equal_plain_sums_of_bf16_products_including_a_ragged_tail() {
        for len in [32, 64, 37, 5] {
            let x: Vec<Vec<bf16>> = (0..3)
                .map(|r| (0..len).map(|i| bf16::from_f32(((i * 7 + r) % 11) as f32 / 4.0 - 1.0)).collect())
                .collect();
            let w: Vec<Vec<bf16>> =
                (0..2).map(|f| (0..len).map(|i| bf16::from_f32(((i * 3 + f) % 5) as f32 / 8.0)).collect()).collect();
            let got = tile::<2, 3>([&x[0], &x[1], &x[2]], [&w[0], &w[1]]);
            for f in 0..2 {
                for r in 0..3 {
                    // Every product and partial sum here is exact in f32, so any order agrees exactly.
                    let expected: f32 = x[r].iter().zip(&w[f]).map(|(a, b)| a.to_f32() * b.to_f32()).sum();
                    assert_eq!(got[f][r], expected, "len {len}, feature {f}, row {r}");
                }
            }
        }
    }
}
