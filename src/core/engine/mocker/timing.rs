//! How long a simulated engine step takes: the polynomial fit of vLLM step times that NVIDIA Dynamo's mocker
//! uses, with its normalisation (checked against Dynamo's sources: its decode term divides the batch's
//! active KV tokens by the worker's KV capacity, blocks × block size, not by a fixed 16,384).
//!
//! prefill ms = 4.209989e-7·t² + 0.01518344·t + 16.50142 for t new prompt tokens in the step;
//! decode ms = −25.74·u² + 54.01·u + 5.74, at least 1, with u = active KV tokens / KV capacity tokens (the
//! sum of the decoding sequences' context lengths over what the cache holds).
//! A step that both prefills and decodes costs the sum.

pub fn prefill_ms(new_tokens: usize) -> f64 {
    if new_tokens == 0 {
        return 0.0;
    }
    let t = new_tokens as f64;
    4.209_989e-7 * t * t + 1.518_344e-2 * t + 16.501_42
}

pub fn decode_ms(active_kv_tokens: usize, kv_capacity_tokens: usize) -> f64 {
    // A cache of no capacity cannot be decoding; Dynamo reads it as full.
    let u = if kv_capacity_tokens == 0 { 1.0 } else { active_kv_tokens as f64 / kv_capacity_tokens as f64 };
    (-25.74 * u * u + 54.01 * u + 5.74).max(1.0)
}

/// The cost of one step with `prefill_tokens` new prompt tokens and `decoding` sequences holding
/// `active_kv_tokens` tokens of KV between them, on a cache of `kv_capacity_tokens`.
pub fn step_ms(prefill_tokens: usize, decoding: usize, active_kv_tokens: usize, kv_capacity_tokens: usize) -> f64 {
    let decode = if decoding > 0 { decode_ms(active_kv_tokens, kv_capacity_tokens) } else { 0.0 };
    prefill_ms(prefill_tokens) + decode
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_dynamos_fit_and_normalisation() {
        assert!((prefill_ms(1000) - (0.4209989 + 15.18344 + 16.50142)).abs() < 1e-9);
        // Side by side with Dynamo's mocker on its default cache (16,384 blocks of 16 tokens), decoding at
        // ~2.1 k context took 6.2 ms a token there and 12.2 ms here, when this divided by 16,384 tokens.
        let capacity = 16_384 * 16;
        assert!((decode_ms(2100, capacity) - 6.17).abs() < 0.01, "{}", decode_ms(2100, capacity));
        assert!((decode_ms(capacity, capacity) - (-25.74 + 54.01 + 5.74)).abs() < 1e-9);
        assert!((decode_ms(0, capacity) - 5.74).abs() < 1e-9);
        assert_eq!(step_ms(0, 0, 0, capacity), 0.0);
        assert_eq!(step_ms(10, 0, 0, capacity), prefill_ms(10));
    }
}
