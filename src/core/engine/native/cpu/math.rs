//! Element-wise math for the CPU kernels, written so the loops around it vectorise: an exp for softmax and
//! silu, and maxima, sums and dot products over eight lanes.

/// e^x for x ≤ 0, as softmax needs after subtracting the maximum, within 2 ulp (x below -87 gives e^-87, not
/// less: beside the maximum's weight of 1 that is nothing). Cephes' `expf` polynomial after reducing by ln 2,
/// in plain arithmetic so the loop around it vectorises; libm's `expf` is one call per score, which was a sixth
/// of a long prefill.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    use exp::*;
    let x = x.max(FLOOR);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = POLYNOMIAL[1..].iter().fold(POLYNOMIAL[0], |p, &c| p * r + c);
    let e = p * (r * r) + r + 1.0;
    // 2^n from its exponent bits; n ≥ -126 because x ≥ -87. The integer n is read off `shifted`'s low
    // mantissa bits rather than cast from `n` (a float-to-int `as` saturates, which kept this loop scalar).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// The constants of `exp_nonpositive`, which the tile attention's 16-lane copy uses too.
pub mod exp {
    /// Below this the result is e^-87 (n stays ≥ -126, a normal power of two).
    pub const FLOOR: f32 = -87.0;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 in two parts, so n · ln 2 is exact enough for the reduction.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a call to `round`.
    pub const ROUND: f32 = 12_582_912.0;
    /// e^r ≈ 1 + r + r² · p(r), p's coefficients from the highest power (Horner's order).
    pub const POLYNOMIAL: [f32; 6] =
        [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
}

/// `values` folded by `op` over eight interleaved lanes, then the lanes folded together: a maximum or a sum that
/// vectorises (a single running fold cannot be reordered, so it ran one value at a time: softmax's sum was a
/// tenth of prefill's attention; and `f32::max`'s NaN rule kept even the maximum scalar).
#[inline(always)]
pub fn lanes(values: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| op(a, b));
    for chunk in chunks {
        for i in 0..8 {
            acc[i] = op(acc[i], chunk[i]);
        }
    }
    acc.iter().fold(tail, |a, &b| op(a, b))
}

/// A stored value the kernels widen to f32 as they read it: f32 itself, or bf16 (KV pages of bf16 models).
pub trait Element: Copy + Send + Sync + 'static {
    /// Stored as bf16 (else as f32), for the kernels that load eight at a time.
    const BF16: bool;
    fn f32(self) -> f32;
    /// The value as the tile unit reads it: bf16 as stored, f32 rounded to the nearest bf16.
    fn bf16(self) -> half::bf16;
}

impl Element for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn bf16(self) -> half::bf16 {
        half::bf16::from_f32(self)
    }
}

impl Element for half::bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift (`to_f32` checks for NaN first).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn bf16(self) -> half::bf16 {
        self
    }
}

/// Eight partial sums so the loop vectorises without reassociating floats.
#[inline(always)]
pub fn dot<E: Element>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y.f32()).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::{exp_nonpositive, lanes};

    #[test]
    fn exp_matches_libm_where_softmax_uses_it() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) / 10_000.0;
            let (ours, exact) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            worst = worst.max((ours - exact).abs() / exact);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp_nonpositive(-1000.0) < 1e-37 && exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn lane_folds_equal_plain_folds_for_every_tail_length() {
        for len in 0..20 {
            let values: Vec<f32> = (0..len).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lanes(&values, f32::NEG_INFINITY, |a, b| if b > a { b } else { a }), max, "{len} values");
            // Small integers: every order of summation is exact.
            assert_eq!(lanes(&values, 0.0, |a, b| a + b), values.iter().sum::<f32>(), "{len} values");
        }
    }
}
