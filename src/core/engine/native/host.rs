//! The ops only a vision encoder needs (layer norm with a bias, the GELU family, attention without a causal
//! mask), on host slices. `Backend`'s defaults run them here for every backend: a tower runs once per image
//! beside a decoder that runs at every token, so a device copying in and out around them costs little next to
//! the matrix products, which stay on the device.
use super::cpu::math::{exp_nonpositive, lanes};
use rayon::prelude::*;

/// An activation function, by the name a config gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact, with erf.
    Gelu,
    /// `gelu_pytorch_tanh`, `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x · sigmoid(1.702 x)`, what OpenAI's CLIP was trained with.
    QuickGelu,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

/// `(x - mean) / sqrt(var + eps) · weight + bias` over every `dim`-long row (the variance biased, as torch's).
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = row.iter().sum::<f32>() / dim as f32;
        let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let scale = 1.0 / (variance + eps).sqrt();
        for (((d, v), w), b) in dst.iter_mut().zip(row).zip(weight).zip(bias) {
            *d = (v - mean) * scale * w + b;
        }
    }
    out
}

pub fn activate(x: &mut [f32], activation: Activation) {
    match activation {
        Activation::Gelu => {
            x.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2)))
        }
        Activation::GeluTanh => {
            let k = (2.0 / std::f32::consts::PI).sqrt();
            x.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + (k * (*v + 0.044_715 * *v * *v * *v)).tanh()))
        }
        Activation::QuickGelu => x.iter_mut().for_each(|v| *v /= 1.0 + (-1.702 * *v).exp()),
    }
}

/// Every position of a sequence attending to every position of the same sequence: `q`, `k`, `v` and the
/// result are `[sequences × seq_len, heads × head_dim]`. Each (sequence, head) is two matrix products, read in
/// place through their strides (a CLIP-L image is 577 positions: scores one at a time ran at a tenth of
/// the products' speed).
pub fn bidirectional_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seq_len: usize,
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let width = heads * head_dim;
    let sequences = q.len() / (seq_len * width).max(1);
    assert!(q.len() >= sequences * seq_len * width && k.len() >= q.len() && v.len() >= q.len());
    let scale = 1.0 / (head_dim as f32).sqrt();
    // One task per (sequence, head): its rows of the output are written by it alone, gathered afterwards.
    let per_head: Vec<Vec<f32>> = (0..sequences * heads)
        .into_par_iter()
        .map(|task| {
            let (seq, head) = (task / heads, task % heads);
            let first = seq * seq_len * width + head * head_dim;
            let (n, d) = (seq_len, head_dim);
            let mut scores = vec![0.0f32; n * n];
            // SAFETY: Q's and K's head slices start at `first` and span n rows of stride `width` and d
            // columns, inside `q` and `k` (asserted above); `scores` holds n × n; nothing aliases.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    q.as_ptr().add(first),
                    1,
                    width as isize,
                    k.as_ptr().add(first),
                    width as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for row in scores.chunks_exact_mut(n) {
                let max = lanes(row, f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|score| *score = exp_nonpositive(*score - max));
                let sum = lanes(row, 0.0, |a, b| a + b);
                row.iter_mut().for_each(|p| *p /= sum);
            }
            let mut out = vec![0.0f32; n * d];
            // SAFETY: `scores` is n × n, V's head slice n rows of stride `width` and d columns inside `v`,
            // `out` n × d; nothing aliases.
            unsafe {
                gemm::gemm(
                    n,
                    d,
                    n,
                    out.as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n as isize,
                    v.as_ptr().add(first),
                    1,
                    width as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            out
        })
        .collect();
    let mut out = vec![0.0; q.len()];
    for (task, values) in per_head.iter().enumerate() {
        let (seq, head) = (task / heads, task % heads);
        for (row, src) in values.chunks_exact(head_dim).enumerate() {
            let start = (seq * seq_len + row) * width + head * head_dim;
            out[start..start + head_dim].copy_from_slice(src);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_centres_and_scales_each_row() {
        let out = layer_norm(&[1.0, 2.0, 3.0, 10.0, 10.0, 10.0], &[1.0, 2.0, 1.0], &[0.0, 0.0, 5.0], 3, 1e-6);
        let s = (2.0f32 / 3.0).sqrt();
        let expected = [-1.0 / s, 0.0, 1.0 / s + 5.0, 0.0, 0.0, 5.0];
        assert!(out.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-5), "{out:?}");
    }

    #[test]
    fn activations_match_their_definitions() {
        let mut x = [-3.0f32, -0.5, 0.0, 0.7, 2.0];
        let mut quick = x;
        activate(&mut quick, Activation::QuickGelu);
        let mut tanh = x;
        activate(&mut tanh, Activation::GeluTanh);
        activate(&mut x, Activation::Gelu);
        // gelu(0.7) = 0.7 · Φ(0.7), Φ(0.7) = 0.758036.
        assert!((x[3] - 0.7 * 0.758_036).abs() < 1e-6 && x[2] == 0.0);
        assert!((quick[4] - 2.0 / (1.0 + (-3.404f32).exp())).abs() < 1e-6);
        assert!(x.iter().zip(&tanh).all(|(a, b)| (a - b).abs() < 1e-3), "the approximation is close");
        assert_eq!(Activation::from_name("relu"), None);
    }

    #[test]
    fn each_sequence_attends_only_to_itself_and_all_of_itself() {
        // Two sequences of two positions, one head of width 2. With equal keys, every query averages the values
        // of its own sequence, whatever the order: no causal mask, no mixing.
        let q = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0];
        let k = [1.0; 8];
        let v = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
        let out = bidirectional_attention(&q, &k, &v, 2, 1, 2);
        assert_eq!(out, vec![2.0, 3.0, 2.0, 3.0, 20.0, 30.0, 20.0, 30.0]);
    }
}
