//! How long a simulated engine step takes: Dynamo's published fit of vLLM step times.
//!
//! prefill ms = 4.21e-7·t² + 0.01518·t + 16.5 for t new prompt tokens in the step;
//! decode ms = −25.74·u² + 54.01·u + 5.74 with u = active KV tokens / 16384.
//! The decode fit was made for u in [0, 1]; past 1 the parabola bends down, so u is clamped there.
//! A step that both prefills and decodes costs the sum.

pub fn prefill_ms(new_tokens: usize) -> f64 {
    let t = new_tokens as f64;
    4.21e-7 * t * t + 0.01518 * t + 16.5
}

pub fn decode_ms(active_kv_tokens: usize) -> f64 {
    let u = (active_kv_tokens as f64 / 16384.0).min(1.0);
    -25.74 * u * u + 54.01 * u + 5.74
}

/// The cost of one step with `prefill_tokens` new prompt tokens and `decoding` sequences holding
/// `active_kv_tokens` tokens of KV between them.
pub fn step_ms(prefill_tokens: usize, decoding: usize, active_kv_tokens: usize) -> f64 {
    let prefill = if prefill_tokens > 0 { prefill_ms(prefill_tokens) } else { 0.0 };
    let decode = if decoding > 0 { decode_ms(active_kv_tokens) } else { 0.0 };
    prefill + decode
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fit() {
        assert!((prefill_ms(1000) - (0.421 + 15.18 + 16.5)).abs() < 1e-9);
        assert!((decode_ms(16384) - (-25.74 + 54.01 + 5.74)).abs() < 1e-9);
        assert!((decode_ms(0) - 5.74).abs() < 1e-9);
        assert_eq!(decode_ms(10 * 16384), decode_ms(16384));
        assert_eq!(step_ms(0, 0, 0), 0.0);
    }
}
