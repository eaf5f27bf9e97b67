//! The engine against transformers' golden outputs, and against itself under batching, chunking, paging and
//! prefix caching (each of which must not change a single token).
use super::*;
use crate::core::engine::blocks::PageId;
use crate::core::engine::scheduler::SeqId;
use crate::core::protocol::{EngineOutput, SamplingOptions};
use backend::{AttentionSeq, AttentionShape, KvDtype};
use std::path::{Path, PathBuf};

struct Golden {
    prompt_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

fn testdata(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(path)
}

fn golden(file: &str) -> Golden {
    let text = std::fs::read_to_string(testdata(file)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |key: &str| -> Vec<u32> { serde_json::from_value(json[key].clone()).unwrap() };
    Golden {
        prompt_ids: ids("prompt_ids"),
        logits: serde_json::from_value(json["logits"].clone()).unwrap(),
        greedy_ids: ids("greedy_ids"),
    }
}

/// (model source, golden file)
fn fixtures() -> Vec<(ModelSource, &'static str)> {
    vec![
        (ModelSource::Builtin, "golden/tiny-chat.json"),
        (ModelSource::Dir(testdata("golden/llama")), "golden/llama/golden.json"),
        (ModelSource::Dir(testdata("golden/qwen3")), "golden/qwen3/golden.json"),
    ]
}

fn golden_is_bf16(file: &str) -> bool {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(testdata(file)).unwrap()).unwrap();
    json["weights_dtype"] == "bfloat16"
}

fn load(source: &ModelSource) -> Arc<Transformer<CpuBackend>> {
    load_cpu(source, 2, Default::default(), |_, _| {}).unwrap()
}

fn scheduler(
    model: Arc<Transformer<CpuBackend>>,
    budget: usize,
    num_blocks: usize,
) -> Scheduler<NativeExecutor<CpuBackend>> {
    let config = SchedulerConfig {
        block_size: 4,
        num_blocks,
        max_num_seqs: 16,
        max_num_batched_tokens: budget,
        watermark: 0.0,
        enable_prefix_caching: true,
    };
    Scheduler::new(config.clone(), NativeExecutor::new(model, num_blocks, config.block_size).unwrap())
}

fn greedy(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    let mut request = PreprocessedRequest::greedy("t", tokens, max_tokens);
    request.logprobs = Some(1);
    request
}

fn run(s: &mut Scheduler<NativeExecutor<CpuBackend>>) -> Vec<(SeqId, EngineOutput)> {
    let mut outputs = Vec::new();
    while !s.is_idle() {
        outputs.extend(s.step().outputs);
    }
    outputs
}

/// Tokens and their logprobs, per sequence.
fn of(outputs: &[(SeqId, EngineOutput)], id: SeqId) -> (Vec<u32>, Vec<f32>) {
    outputs.iter().filter(|(i, _)| *i == id).map(|(_, o)| (o.token_ids[0], o.logprobs[0].logprob)).unzip()
}

fn assert_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst < tolerance, "{what}: max |Δ| = {worst} ≥ {tolerance}");
}

#[test]
fn logits_match_transformers_at_every_prompt_position() {
    for (source, file) in fixtures() {
        let model = load(&source);
        let golden = golden(file);
        let n = golden.prompt_ids.len();
        let pages: Vec<PageId> = (0..n.div_ceil(4) as PageId).collect();
        let mut batch = ForwardBatch::default();
        batch.push_seq(&golden.prompt_ids, 0, n, &pages, 4, true);
        batch.logit_rows = (0..n).collect();
        let mut cache = model.new_cache(pages.len(), 4).unwrap();
        let logits = model.forward(&mut cache, &batch, 4).unwrap();
        // The fixture ran transformers in f32 on exactly the checkpoint's values, so f32 compute differs only in
        // summation order. A bf16 checkpoint keeps its KV pages in bf16, and on CPUs with AVX-512 BF16 also
        // rounds activations to bf16 (8 bits of mantissa) for prompt batches: logits of magnitude ~5 then move
        // by up to ~0.04.
        let rounded = model.kv_dtype() == KvDtype::Bf16 || CpuBackend::rounds_bf16_activations();
        let tolerance = if golden_is_bf16(file) && rounded { 5e-2 } else { 1e-4 };
        assert_close(&logits, &golden.logits.concat(), tolerance, file);
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for (source, file) in fixtures() {
        let golden = golden(file);
        // In f32 throughout (the reference backend: f32 activations and KV pages), exactly transformers' tokens.
        let reference = super::load(&source, CpuBackend::reference(2).unwrap(), |_, _| {}).unwrap();
        let mut s = scheduler(reference, 1024, 64);
        s.add(1, &greedy(golden.prompt_ids.clone(), golden.greedy_ids.len() as u32), 0);
        assert_eq!(of(&run(&mut s), 1).0, golden.greedy_ids, "{file}");
        if golden_is_bf16(file) {
            greedy_within_tolerance_of_transformers(&source, &golden, file);
        }
    }
}

/// A bf16 checkpoint on the fast path (bf16 activations where the CPU has AVX-512 BF16, bf16 KV pages) can
/// break a near-tie the other way and then go on differently, so it is checked teacher-forced: along
/// transformers' greedy tokens, each one's logit is within the logits test's tolerance of the best.
fn greedy_within_tolerance_of_transformers(source: &ModelSource, golden: &Golden, file: &str) {
    let model = load(source);
    let tokens: Vec<u32> = golden.prompt_ids.iter().chain(&golden.greedy_ids).copied().collect();
    let pages: Vec<PageId> = (0..tokens.len().div_ceil(4) as PageId).collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(&tokens, 0, tokens.len() - 1, &pages, 4, true);
    let prompt = golden.prompt_ids.len();
    batch.logit_rows = (prompt - 1..tokens.len() - 1).collect();
    let logits = model.forward(&mut model.new_cache(pages.len(), 4).unwrap(), &batch, 4).unwrap();
    let vocab = model.config.vocab_size;
    for (step, (row, &token)) in logits.chunks_exact(vocab).zip(&golden.greedy_ids).enumerate() {
        let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let gap = best - row[token as usize];
        assert!(gap < 5e-2, "{file}: transformers' token {step} ({token}) is {gap} below our best logit");
    }
}

fn prompts() -> Vec<Vec<u32>> {
    let golden = golden("golden/tiny-chat.json");
    vec![golden.prompt_ids.clone(), golden.prompt_ids[3..].to_vec(), (100..107).collect(), (300..340).collect()]
}

#[test]
fn a_batch_equals_each_sequence_alone() {
    let model = load(&ModelSource::Dir(testdata("golden/llama")));
    let alone: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            let mut s = scheduler(model.clone(), 1024, 64);
            s.add(0, &greedy(p, 8), 0);
            of(&run(&mut s), 0)
        })
        .collect();
    let mut s = scheduler(model, 1024, 64);
    for (i, p) in prompts().into_iter().enumerate() {
        s.add(i as SeqId, &greedy(p, 8), 0);
    }
    let together = run(&mut s);
    for (i, (tokens, logprobs)) in alone.iter().enumerate() {
        let (t, l) = of(&together, i as SeqId);
        assert_eq!(&t, tokens, "sequence {i}");
        assert_close(&l, logprobs, 1e-4, "logprobs");
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let model = load(&ModelSource::Builtin);
    let prompt = prompts()[3].clone();
    let mut one_shot = scheduler(model.clone(), 1024, 64);
    one_shot.add(0, &greedy(prompt.clone(), 6), 0);
    // A budget of 7 splits the 40-token prompt into chunks that straddle block boundaries.
    let mut chunked = scheduler(model, 7, 64);
    chunked.add(0, &greedy(prompt, 6), 0);
    let (a, b) = (of(&run(&mut one_shot), 0), of(&run(&mut chunked), 0));
    assert_eq!(a.0, b.0);
    assert_close(&a.1, &b.1, 1e-4, "logprobs");
}

#[test]
fn a_prefix_cache_hit_gives_the_same_output_as_a_cold_run() {
    let model = load(&ModelSource::Dir(testdata("golden/qwen3")));
    let prompt = prompts()[3].clone();
    let mut s = scheduler(model, 1024, 64);
    s.add(0, &greedy(prompt.clone(), 6), 0);
    let cold = run(&mut s);
    s.add(1, &greedy(prompt, 6), 0);
    let warm = run(&mut s);
    assert_eq!(warm[0].1.cached_tokens, Some(36), "9 of 10 blocks reused");
    let (a, b) = (of(&cold, 0), of(&warm, 1));
    assert_eq!(a.0, b.0);
    assert_close(&a.1, &b.1, 1e-5, "logprobs");
}

#[test]
fn preemption_under_memory_pressure_changes_no_token() {
    let model = load(&ModelSource::Builtin);
    let alone: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            let mut s = scheduler(model.clone(), 1024, 64);
            s.add(0, &greedy(p, 12), 0);
            of(&run(&mut s), 0).0
        })
        .collect();
    // The four need 40 blocks at their longest; 20 forces preemption and recompute.
    let mut s = scheduler(model, 1024, 20);
    for (i, p) in prompts().into_iter().enumerate() {
        s.add(i as SeqId, &greedy(p, 12), 0);
    }
    let together = run(&mut s);
    for (i, tokens) in alone.iter().enumerate() {
        assert_eq!(&of(&together, i as SeqId).0, tokens, "sequence {i}");
    }
    assert_eq!(s.load().kv_active_blocks, 0);
}

#[test]
fn seeded_sampling_is_reproducible_through_the_engine() {
    let model = load(&ModelSource::Builtin);
    let sample = |seed| {
        let mut s = scheduler(model.clone(), 1024, 64);
        let mut request = greedy(prompts()[0].clone(), 10);
        request.sampling = SamplingOptions { temperature: 1.5, ..SamplingOptions::default() };
        s.add(0, &request, seed);
        of(&run(&mut s), 0).0
    };
    assert_eq!(sample(5), sample(5));
    assert_ne!(sample(5), sample(6));
}

/// A batch mixing constrained and free sequences, greedy and sampled: each constrained one writes JSON valid
/// under its schema and ends as `Complete`; the free one is what it is alone (the masks, computed beside the
/// forward pass, touch nobody else's row).
#[test]
fn structured_outputs_keep_to_their_schema_in_a_mixed_batch() {
    use crate::core::protocol::{Constraint, FinishReason};
    let text = crate::core::model::Model::load(&ModelSource::Builtin, None).unwrap();
    let model = load(&ModelSource::Builtin);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["answer", "score"],
        "additionalProperties": false,
    });
    let free = greedy(prompts()[1].clone(), 12);
    let alone = {
        let mut s = scheduler(model.clone(), 1024, 256);
        s.add(0, &free, 0);
        of(&run(&mut s), 0).0
    };
    let mut s = scheduler(model.clone(), 1024, 256);
    s.set_grammars(text.grammars().clone());
    let mut constrained = greedy(prompts()[0].clone(), 64);
    constrained.constraint = Some(Constraint::JsonSchema(schema.to_string()));
    let mut sampled = constrained.clone();
    sampled.sampling = SamplingOptions { temperature: 1.0, ..SamplingOptions::default() };
    s.add(0, &constrained, 0);
    s.add(1, &free, 0);
    s.add(2, &sampled, 9);
    let outputs = run(&mut s);
    for id in [0, 2] {
        let tokens = of(&outputs, id).0;
        let written = text.tokenizer.decode(&tokens, false);
        let value: serde_json::Value = serde_json::from_str(&written).unwrap_or_else(|e| panic!("{written}: {e}"));
        assert!(["yes", "no"].contains(&value["answer"].as_str().unwrap_or("")), "{written}");
        assert!((1..=5).contains(&value["score"].as_i64().unwrap_or(0)), "{written}");
        let last = outputs.iter().rev().find(|(i, _)| *i == id).unwrap();
        assert_eq!(last.1.finish_reason, Some(FinishReason::Complete), "{written}");
    }
    assert_eq!(of(&outputs, 1).0, alone, "the free sequence changed beside constrained ones");
}

/// An embedding is the final hidden state the head reads: through the (tied) embedding matrix it gives the
/// logits the same prompt is sampled from, so its argmax is the greedy token and its log-softmax the logprob.
/// It is the same alone, beside generating sequences, and when the prompt's prefix is cached.
#[test]
fn an_embedding_is_the_hidden_state_the_head_reads() {
    use crate::core::protocol::{FinishReason, Pooling};
    let model = load(&ModelSource::Builtin);
    let weights = safetensors::SafeTensors::deserialize(crate::core::model::BUILTIN_WEIGHTS).unwrap();
    let table = weights.tensor("model.embed_tokens.weight").unwrap();
    let embed: Vec<f32> = table.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let hidden_size = model.config.hidden_size;
    let prompt = prompts()[1].clone();
    let embedding_of = |outputs: &[(SeqId, EngineOutput)], id| {
        let output = &outputs.iter().find(|(i, _)| *i == id).unwrap().1;
        assert_eq!(output.finish_reason, Some(FinishReason::Length));
        assert!(output.token_ids.is_empty(), "an embedding request generates nothing");
        output.embedding.clone().unwrap()
    };
    let pooled = |normalize| PreprocessedRequest { pooling: Some(Pooling { normalize }), ..greedy(prompt.clone(), 1) };

    let mut s = scheduler(model.clone(), 1024, 256);
    s.add(0, &pooled(false), 0);
    s.add(1, &greedy(prompt.clone(), 1), 0);
    s.add(2, &greedy(prompts()[0].clone(), 4), 0);
    let outputs = run(&mut s);
    let hidden = embedding_of(&outputs, 0);
    assert_eq!(hidden.len(), hidden_size);
    let logits: Vec<f32> =
        embed.chunks_exact(hidden_size).map(|row| row.iter().zip(&hidden).map(|(a, b)| a * b).sum()).collect();
    let (tokens, logprobs) = of(&outputs, 1);
    assert_eq!(sampler::argmax(&logits), tokens[0], "the head over the embedding picks the greedy token");
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    assert!((logits[tokens[0] as usize] - log_sum - logprobs[0]).abs() < 1e-3);

    // Again, its prefix now cached, and normalized: the same direction, unit length.
    s.add(3, &pooled(true), 0);
    let again = run(&mut s);
    assert!(again.iter().find(|(i, _)| *i == 3).unwrap().1.cached_tokens > Some(0), "the prefix was cached");
    let unit = embedding_of(&again, 3);
    let norm = hidden.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((unit.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
    assert_close(&unit, &hidden.iter().map(|v| v / norm).collect::<Vec<_>>(), 1e-4, "cached and normalized");
}

/// Paged attention over a shuffled block table against plain causal attention over contiguous K/V, as one
/// prefill of every row and as a decode step of each row alone. Shapes cover each width the value
/// accumulation is split into (64, 16, 1 dimensions), query groups that do not fill the scoring's groups of
/// four, more rows than one attention block, pages shorter than, as long as and longer than the decode's
/// groups of eight keys, and a head size that is not a multiple of eight. Contexts of several of the
/// prefill's key tiles (a running softmax carried across them), with scores growing along the context so a
/// later tile's maximum overtakes an earlier one's, and prefills of the rows after a cached prefix. Where
/// the CPU has AMX, bf16 pages of head sizes in whole 32s take the prefill to the tile unit: blocks of one row
/// and of pairs that do not fill its 16 rows, several key tiles, a last tile of fewer keys than a panel.
#[test]
fn paged_attention_equals_contiguous_attention() {
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        for (heads, kv_heads, dim, rows) in
            [(4, 2, 8, 11), (6, 2, 80, 21), (3, 1, 64, 35), (2, 1, 12, 19), (2, 1, 64, 33), (5, 1, 32, 70)]
        {
            for block in [4, 8, 16] {
                paged_attention_case(dtype, heads, kv_heads, dim, rows, block, 0);
            }
        }
        for (heads, kv_heads, dim, rows, cached) in
            [(3, 1, 64, 203, 0), (4, 2, 16, 150, 77), (6, 2, 24, 300, 131), (8, 2, 32, 140, 45), (9, 3, 64, 261, 0)]
        {
            paged_attention_case(dtype, heads, kv_heads, dim, rows, 16, cached);
        }
    }
}

/// `rows` positions of one sequence whose first `cached` are already in the pages: the prefill computes the
/// rest, and each row alone as a decode step.
fn paged_attention_case(
    dtype: KvDtype,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    rows: usize,
    block: usize,
    cached: usize,
) {
    let backend = CpuBackend::new(2).unwrap();
    let shape = AttentionShape { num_heads: heads, num_kv_heads: kv_heads, head_dim: dim, block_size: block };
    let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
    let q: Vec<f32> = (0..rows * heads * dim).map(value).collect();
    // Keys lean towards later positions, so the running maximum moves from tile to tile.
    let lean = |i: usize| 1.0 + (i / (kv_heads * dim)) as f32 / 64.0;
    let k: Vec<f32> = (0..rows * kv_heads * dim).map(|i| value(i + 17) * lean(i)).collect();
    let v: Vec<f32> = (0..rows * kv_heads * dim).map(|i| value(i + 91)).collect();
    // A table with room for every row, in reverse order.
    let table: Vec<u32> = (0..rows.div_ceil(block) as u32).rev().collect();
    let slots: Vec<u32> = (0..rows).map(|p| table[p / block] * block as u32 + (p % block) as u32).collect();
    let page_len = block * kv_heads * dim;
    let pages = || backend.pages(table.len(), page_len, dtype).unwrap();
    let (mut k_pages, mut v_pages) = (pages(), pages());
    backend.write_kv(&k, &v, &slots, &mut k_pages, &mut v_pages).unwrap();
    // What the pages hold: bf16 pages round each value, and attention must compute on exactly those values.
    let stored = |x: &[f32]| -> Vec<f32> {
        match dtype {
            KvDtype::F32 => x.to_vec(),
            KvDtype::Bf16 => x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
        }
    };
    let (k, v) = (stored(&k), stored(&v));
    let seqs = [AttentionSeq { first_row: 0, rows: rows - cached, first_position: cached, block_table: table.clone() }];
    let mut out = Vec::new();
    let row_width = heads * dim;
    backend.paged_attention(&q[cached * row_width..].to_vec(), &k_pages, &v_pages, &seqs, &shape, &mut out).unwrap();
    // Row r alone, as the decode step at position r of the same sequence.
    let steps: Vec<AttentionSeq> = (0..rows)
        .map(|r| AttentionSeq { first_row: r, rows: 1, first_position: r, block_table: table.clone() })
        .collect();
    let mut decoded = Vec::new();
    backend.paged_attention(&q, &k_pages, &v_pages, &steps, &shape, &mut decoded).unwrap();

    // Causal attention in f64 over what the pages hold, for queries `q`.
    let attention = |q: &[f32]| -> Vec<f32> {
        let mut expected = vec![0.0f32; q.len()];
        for r in 0..rows {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qv = &q[(r * heads + h) * dim..][..dim];
                let scores: Vec<f64> = (0..=r)
                    .map(|p| {
                        let kv = &k[(p * kv_heads + kvh) * dim..][..dim];
                        qv.iter().zip(kv).map(|(a, b)| f64::from(a * b)).sum::<f64>() / (dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (p, s) in scores.iter().enumerate() {
                    let weight = ((s - max).exp() / total) as f32;
                    for d in 0..dim {
                        expected[(r * heads + h) * dim + d] += weight * v[(p * kv_heads + kvh) * dim + d];
                    }
                }
            }
        }
        expected
    };
    let expected = attention(&q);
    let case =
        format!("{dtype:?} pages, {heads} heads / {kv_heads} KV heads of {dim}, pages of {block}, {cached} cached");
    // The tile unit reads the queries and the softmax's weights as bf16: the expected prefill takes the
    // queries' rounding, and the weights' leaves differences of a few thousandths.
    if dtype == KvDtype::Bf16 && CpuBackend::attends_on_tiles(&shape) {
        let rounded: Vec<f32> = q.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let expected = attention(&rounded);
        assert_close(&out, &expected[cached * row_width..], 4e-3, &format!("prefill attention on tiles, {case}"));
    } else {
        assert_close(&out, &expected[cached * row_width..], 1e-5, &format!("prefill attention, {case}"));
    }
    assert_close(&decoded, &expected, 1e-5, &format!("decode attention, {case}"));
}

#[test]
fn unsupported_and_broken_checkpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("dynamo-broken-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(testdata("golden/llama").join(f), dir.join(f)).unwrap();
    }
    let err = load_cpu(&ModelSource::Dir(dir.clone()), 1, Default::default(), |_, _| {}).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::write(dir.join("model.safetensors"), b"not safetensors").unwrap();
    let err = load_cpu(&ModelSource::Dir(dir.clone()), 1, Default::default(), |_, _| {}).err().unwrap().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");
    // The Qwen3 weights under the Llama config: shapes disagree, and the error says which tensor.
    std::fs::copy(testdata("golden/qwen3/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = load_cpu(&ModelSource::Dir(dir.clone()), 1, Default::default(), |_, _| {}).err().unwrap().to_string();
    assert!(err.contains("tensor `"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// Prefill on one cache, move the blocks to other pages of another cache, decode there: the same logits as
/// decoding where the prefill ran (what disaggregated prefill/decode relies on).
#[test]
fn exported_blocks_imported_elsewhere_decode_exactly_like_local_blocks() {
    let model = load(&ModelSource::Builtin);
    let golden = golden("golden/tiny-chat.json");
    let prompt = &golden.prompt_ids;
    let (n, block) = (prompt.len(), 4);
    let local_pages: Vec<PageId> = (0..n.div_ceil(block) as PageId + 1).collect();
    let mut local = model.new_cache(local_pages.len(), block).unwrap();
    let mut prefill = ForwardBatch::default();
    prefill.push_seq(prompt, 0, n, &local_pages, block, true);
    let first = sampler::argmax(&model.forward(&mut local, &prefill, block).unwrap());

    // Only the full blocks and the partial one the prompt touched move; the remote cache is bigger and the
    // blocks land on other pages.
    let used = n.div_ceil(block);
    let blocks = model.export_blocks(&local, &local_pages[..used], block).unwrap();
    let remote_pages: Vec<PageId> = (0..used as PageId).map(|i| 10 + 2 * i).chain([3]).collect();
    let mut remote = model.new_cache(32, block).unwrap();
    model.import_blocks(&mut remote, &remote_pages[..used], &blocks).unwrap();

    let tokens: Vec<u32> = prompt.iter().copied().chain([first]).collect();
    let decode = |cache: &mut KvCache<CpuBackend>, pages: &[PageId]| {
        let mut batch = ForwardBatch::default();
        batch.push_seq(&tokens, n, n + 1, pages, block, true);
        model.forward(cache, &batch, block).unwrap()
    };
    assert_eq!(decode(&mut remote, &remote_pages), decode(&mut local, &local_pages));
    let wrong = model.import_blocks(&mut remote, &remote_pages[..1], &blocks).unwrap_err();
    assert!(wrong.to_string().contains("blocks"), "{wrong}");
}

/// Writes `tensors` (name → (dtype, shape, little-endian bytes)) as safetensors.
fn write_safetensors(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The Llama fixture's tensors as f32 values, after `round` (to emulate a lower-precision checkpoint).
fn llama_tensors(round: impl Fn(f32) -> f32) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(testdata("golden/llama/model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let view = file.tensor(&name).unwrap();
            let values = view.data().chunks_exact(4).map(|b| round(f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            (name, view.shape().to_vec(), values.collect())
        })
        .collect()
}

fn checkpoint_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynamo-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(testdata("golden/llama").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn prompt_logits(source: &ModelSource) -> Vec<f32> {
    let model = load(source);
    let prompt = golden("golden/llama/golden.json").prompt_ids;
    let pages: Vec<PageId> = (0..prompt.len().div_ceil(4) as PageId).collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(&prompt, 0, prompt.len(), &pages, 4, true);
    batch.logit_rows = (0..prompt.len()).collect();
    model.forward(&mut model.new_cache(pages.len(), 4).unwrap(), &batch, 4).unwrap()
}

#[test]
fn a_sharded_checkpoint_loads_like_a_single_file() {
    let dir = checkpoint_dir("sharded");
    let tensors = llama_tensors(|v| v);
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let encoded: Vec<_> = part
            .iter()
            .map(|(name, shape, values)| {
                weight_map.insert(name.clone(), serde_json::json!(file));
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.clone(), safetensors::Dtype::F32, shape.clone(), bytes)
            })
            .collect();
        write_safetensors(&dir.join(file), &encoded);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = prompt_logits(&ModelSource::Dir(dir.clone()));
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(sharded, prompt_logits(&ModelSource::Dir(testdata("golden/llama"))));
}

#[test]
fn f16_weights_load_as_the_values_they_hold() {
    let round = |v: f32| half::f16::from_f32(v).to_f32();
    let tensors = llama_tensors(round);
    let (f16_dir, f32_dir) = (checkpoint_dir("f16"), checkpoint_dir("f16-as-f32"));
    let as_f16: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| {
            let bytes = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
            (n.clone(), safetensors::Dtype::F16, s.clone(), bytes)
        })
        .collect();
    let as_f32: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| {
            (n.clone(), safetensors::Dtype::F32, s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    write_safetensors(&f16_dir.join("model.safetensors"), &as_f16);
    write_safetensors(&f32_dir.join("model.safetensors"), &as_f32);
    let (a, b) = (prompt_logits(&ModelSource::Dir(f16_dir.clone())), prompt_logits(&ModelSource::Dir(f32_dir.clone())));
    std::fs::remove_dir_all(&f16_dir).ok();
    std::fs::remove_dir_all(&f32_dir).ok();
    assert_eq!(a, b);
    // And the rounding really happened: f16 weights do not give the f32 checkpoint's logits.
    assert_ne!(a, prompt_logits(&ModelSource::Dir(testdata("golden/llama"))));
}

/// Disaggregation's hand-off without staging: a prefill's pages registered with one transfer agent are
/// written by each backend straight into other pages of another cache registered with another, and decoding
/// there gives the very logits decoding where the prefill ran does; for f32 pages (the tiny model) and bf16
/// ones (the bf16 Qwen3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_moved_by_the_transfer_layer_decode_exactly_like_local_blocks() {
    use crate::core::transfer::{Agent, AgentSettings, Backend as Link, Direction, layered_page};
    for (source, golden_file, dtype) in [
        (ModelSource::Builtin, "golden/tiny-chat.json", KvDtype::F32),
        (ModelSource::Dir(testdata("golden/qwen3")), "golden/qwen3/golden.json", KvDtype::Bf16),
    ] {
        let model = load(&source);
        assert_eq!(model.kv_dtype(), dtype, "{golden_file}");
        let prompt = &golden(golden_file).prompt_ids;
        let (n, block) = (prompt.len(), 4);
        let used = n.div_ceil(block);
        let local_pages: Vec<PageId> = (0..used as PageId + 1).collect();
        let mut local = model.new_cache(local_pages.len(), block).unwrap();
        let mut prefill = ForwardBatch::default();
        prefill.push_seq(prompt, 0, n, &local_pages, block, true);
        let first = sampler::argmax(&model.forward(&mut local, &prefill, block).unwrap());
        let tokens: Vec<u32> = prompt.iter().copied().chain([first]).collect();
        let decode = |cache: &mut KvCache<CpuBackend>, pages: &[PageId]| {
            let mut batch = ForwardBatch::default();
            batch.push_seq(&tokens, n, n + 1, pages, block, true);
            model.forward(cache, &batch, block).unwrap()
        };
        let expected = decode(&mut local, &local_pages);
        let remote_pages: Vec<PageId> = (0..used as PageId).map(|i| 10 + 2 * i).chain([3]).collect();
        let page_bytes = model.kv_page_bytes(block);
        for link in [Link::Tcp, Link::Shm] {
            let mut remote = model.new_cache(32, block).unwrap();
            let (source_agent, _) = Agent::start(1, AgentSettings::loopback(None)).unwrap();
            let (target_agent, _) = Agent::start(2, AgentSettings::loopback(None)).unwrap();
            let regions = model.cache_memory(&local).expect("CPU pages are shared memory");
            let count = regions.len() as u32;
            regions.into_iter().for_each(|r| drop(source_agent.register(r)));
            model.cache_memory(&remote).unwrap().into_iter().for_each(|r| drop(target_agent.register(r)));
            let descriptors = |pages: &[PageId]| -> Vec<_> {
                pages[..used].iter().flat_map(|&p| layered_page(0, count, u64::from(p), page_bytes)).collect()
            };
            let peer = source_agent.connect_using(&target_agent.address(), Some(link)).await.unwrap();
            let (from, to) = (descriptors(&local_pages), descriptors(&remote_pages));
            source_agent.transfer(&peer, Direction::Write, &from, &to, None).await.unwrap();
            let moved = decode(&mut remote, &remote_pages);
            assert!(moved == expected, "{golden_file} over {link:?}: logits differ after the move");
        }
    }
}

/// Disaggregated serving at the engine level: a prefill engine runs the prompt and holds its pages, a transfer
/// agent writes them into the pages a decode engine set aside, and the decode engine continues from there.
/// The tokens are the very ones one engine generates alone (greedy), the prefill's pages go back to its pool
/// when the lease is released, and a decode engine whose KV never came computes the prompt itself and still
/// generates the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_handed_to_another_engine_decodes_the_same_tokens_as_one_engine() {
    use crate::core::engine::{Engine, KvPages};
    use crate::core::transfer::{Agent, AgentSettings, Direction, layered_page};
    use futures::StreamExt;
    let model = load(&ModelSource::Builtin);
    let settings = NativeSettings {
        device: Device::Cpu,
        threads: 1,
        kv_cache_gib: 0.0,
        num_blocks: Some(64),
        scheduler: SchedulerConfig { block_size: 4, num_blocks: 64, ..SchedulerConfig::default() },
        profile: None,
        quantization: Default::default(),
    };
    let prompt = golden("golden/tiny-chat.json").prompt_ids;
    let tokens = |stream: crate::core::engine::ResponseStream| async move {
        stream.flat_map(|o: EngineOutput| futures::stream::iter(o.token_ids)).collect::<Vec<u32>>().await
    };
    let greedy = |tokens: Vec<u32>, max_tokens| PreprocessedRequest::greedy("pd", tokens, max_tokens);
    let alone = spawn(1, model.clone(), &settings).unwrap();
    let expected = tokens(alone.submit(greedy(prompt.clone(), 8)).unwrap()).await;

    let prefill = spawn(2, model.clone(), &settings).unwrap();
    let decode = spawn(3, model.clone(), &settings).unwrap();
    let (prefill_agent, _) = Agent::start(2, AgentSettings::loopback(None)).unwrap();
    let (decode_agent, _) = Agent::start(3, AgentSettings::loopback(None)).unwrap();
    let (memory, decode_memory) = (prefill.memory().clone(), decode.memory().clone());
    memory.regions.iter().for_each(|r| drop(prefill_agent.register(r.clone())));
    decode_memory.regions.iter().for_each(|r| drop(decode_agent.register(r.clone())));
    let regions = memory.regions.len() as u32;

    let (held, stream) = prefill.submit_holding(greedy(prompt.clone(), 1), std::time::Duration::from_secs(30)).unwrap();
    let outputs: Vec<EngineOutput> = stream.collect().await;
    let first: Vec<u32> = outputs.iter().flat_map(|o| o.token_ids.clone()).collect();
    assert_eq!(first, expected[..1]);
    let named = outputs.last().and_then(|o| o.held.clone()).expect("the final output names the held pages");
    assert_eq!((named.lease, named.tokens as usize), (held, prompt.len()));
    let source = named.pages;
    assert_eq!(source.len(), prompt.len().div_ceil(4));
    assert!(prefill.load().kv_active_blocks >= source.len() as u64);

    let continued: Vec<u32> = prompt.iter().copied().chain(first.iter().copied()).collect();
    let (id, target, stream) =
        decode.submit_arriving(greedy(continued.clone(), 7), prompt.len(), std::time::Duration::from_secs(30)).unwrap();
    let target = target.await.unwrap();
    let descriptors = |pages: &[PageId]| -> Vec<_> {
        pages.iter().flat_map(|&p| layered_page(0, regions, u64::from(p), memory.page_bytes)).collect()
    };
    let peer = prefill_agent.connect(&decode_agent.address()).await.unwrap();
    prefill_agent
        .transfer(&peer, Direction::Write, &descriptors(&source), &descriptors(&target.pages), None)
        .await
        .unwrap();
    decode.arrived(id, true).unwrap();
    let rest = tokens(stream).await;
    assert_eq!([first.clone(), rest].concat(), expected, "handed over, the same tokens");

    prefill.release_lease(held).unwrap();
    let released = std::time::Instant::now();
    while prefill.load().kv_active_blocks > 0 {
        assert!(released.elapsed() < std::time::Duration::from_secs(10), "the held pages are back in the pool");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    // The KV never comes: the decode engine computes the prompt itself.
    let fresh = spawn(4, model.clone(), &settings).unwrap();
    let (id, _, stream) =
        fresh.submit_arriving(greedy(continued.clone(), 7), prompt.len(), std::time::Duration::from_secs(30)).unwrap();
    fresh.arrived(id, false).unwrap();
    assert_eq!([first.clone(), tokens(stream).await].concat(), expected, "recomputed, the same tokens");
    // Nobody says anything: once the wait is over the engine wakes and computes it.
    let short = std::time::Duration::from_millis(100);
    let (_, _, stream) = fresh.submit_arriving(greedy(continued, 7), prompt.len(), short).unwrap();
    assert_eq!([first, tokens(stream).await].concat(), expected, "computed after the wait, the same tokens");
}

/// What `dynamo top` shows of a worker: its device, and its memory and request limits in its load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_names_its_device_and_reports_its_memory_and_limit() {
    use crate::core::engine::Engine;
    use futures::StreamExt;
    let settings = NativeSettings {
        device: Device::Cpu,
        threads: 1,
        kv_cache_gib: 0.0,
        num_blocks: Some(16),
        scheduler: SchedulerConfig { block_size: 4, num_blocks: 16, max_num_seqs: 3, ..SchedulerConfig::default() },
        profile: None,
        quantization: Default::default(),
    };
    let engine = spawn(1, load(&ModelSource::Builtin), &settings).unwrap();
    assert!(engine.device().starts_with("cpu (") && engine.device().ends_with(" threads)"), "{}", engine.device());
    let outputs: Vec<EngineOutput> = engine.submit(greedy(vec![5, 6, 7], 2)).unwrap().collect().await;
    assert!(!outputs.is_empty());
    let load = engine.load();
    assert_eq!(load.max_running, 3);
    assert!(load.device_memory_used > 0 && load.device_memory_used < load.device_memory_total, "{load:?}");
}

/// A LLaVA checkpoint's outputs for one prompt with images, from `testdata/generate_tiny_llava.py`.
struct LlavaCase {
    text: String,
    images: Vec<String>,
    prompt_ids: Vec<u32>,
    features: Vec<f32>,
    last_logits: Vec<f32>,
    greedy_ids: Vec<u32>,
}

fn llava_cases(dir: &Path) -> Vec<LlavaCase> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let field = |case: &serde_json::Value, key: &str| case[key].clone();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| LlavaCase {
            text: serde_json::from_value(field(case, "text")).unwrap(),
            images: serde_json::from_value(field(case, "images")).unwrap(),
            prompt_ids: serde_json::from_value(field(case, "prompt_ids")).unwrap(),
            features: serde_json::from_value::<Vec<Vec<f32>>>(field(case, "features")).unwrap().concat(),
            last_logits: serde_json::from_value(field(case, "last_logits")).unwrap(),
            greedy_ids: serde_json::from_value(field(case, "greedy_ids")).unwrap(),
        })
        .collect()
}

/// The pixel values of a case's image files, through the checkpoint's own image processor.
fn llava_pixels(dir: &Path, case: &LlavaCase) -> Vec<Vec<f32>> {
    use crate::core::multimodal::{DecodeLimits, ImageProcessor, decode};
    let processor = ImageProcessor::from_dir(dir).unwrap().expect("the checkpoint ships its image processor");
    case.images
        .iter()
        .map(|file| {
            processor
                .preprocess(&decode(&std::fs::read(dir.join(file)).unwrap(), &DecodeLimits::default()).unwrap())
                .data
        })
        .collect()
}

#[test]
fn a_llava_checkpoint_matches_transformers_features_logits_and_greedy_tokens() {
    // tiny-llava: f32, CLIP with quick_gelu, the second-to-last layer's patches, a Llama, transformers 5's
    // tensor names. llava-full: bf16 under the hub's older names, the class token and two layers
    // concatenated, gelu in the tower, a tied Qwen2.
    for dir in [testdata("tiny-llava"), testdata("golden/llava-full")] {
        let what = dir.display().to_string();
        let model = super::load(&ModelSource::Dir(dir.clone()), CpuBackend::reference(2).unwrap(), |_, _| {}).unwrap();
        let multimodal = model.config.multimodal.clone().expect("a multimodal config");
        let tokenizer = crate::core::model::Tokenizer::from_json(
            &std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
            "tokenizer.json",
        )
        .unwrap();
        for case in llava_cases(&dir) {
            // The prompt as transformers' processor expands it: one `<image>` in the text, a run in the ids.
            let text_ids = tokenizer.encode(&case.text, false).unwrap();
            let per_image = multimodal.tokens_per_image();
            let (ids, runs) =
                crate::core::multimodal::expand_placeholders(&text_ids, multimodal.image_token_id, per_image);
            assert_eq!(ids, case.prompt_ids, "{what}: placeholders expanded as LlavaProcessor does");
            assert_eq!(runs.len(), case.images.len());

            let pixels = llava_pixels(&dir, &case);
            let images: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
            let features = Arc::new(model.encode_images(&images).unwrap());
            assert_close(&features, &case.features, 1e-4, &format!("{what}: image features"));

            // Greedy decoding over the paged cache: the prompt with the images' embeddings, then a token a step.
            let mut tokens = ids.clone();
            let total = tokens.len() + case.greedy_ids.len();
            let pages: Vec<PageId> = (0..total.div_ceil(4) as PageId).collect();
            let mut cache = model.new_cache(pages.len(), 4).unwrap();
            let mut batch = ForwardBatch::default();
            batch.push_seq(&tokens, 0, tokens.len(), &pages, 4, true);
            for (image, run) in runs.iter().enumerate() {
                batch.embeds.push(model::RowEmbeds {
                    first_row: run.start,
                    values: features.clone(),
                    from: image * per_image,
                    rows: per_image,
                });
            }
            let mut logits = model.forward(&mut cache, &batch, 4).unwrap();
            assert_close(&logits, &case.last_logits, 1e-4, &format!("{what}: logits at the last prompt position"));
            while tokens.len() < total {
                let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
                tokens.push(best as u32);
                let mut step = ForwardBatch::default();
                step.push_seq(&tokens, tokens.len() - 1, tokens.len(), &pages, 4, true);
                logits = model.forward(&mut cache, &step, 4).unwrap();
            }
            assert_eq!(tokens[ids.len()..], case.greedy_ids[..], "{what}: greedy tokens");
        }
    }
}

#[test]
fn images_of_one_step_reach_their_rows_whatever_the_embeddings_cache_holds() {
    llava_cases_through_the_scheduler(1024);
}

#[test]
fn an_image_split_across_prefill_chunks_gives_the_same_tokens() {
    // 7 tokens a step: every image's 25 placeholders are prefilled over several steps, chunks starting and
    // ending inside them.
    llava_cases_through_the_scheduler(7);
}

/// Both tiny-llava cases in one scheduler (`budget` tokens a step) whose embeddings cache holds one image.
fn llava_cases_through_the_scheduler(budget: usize) {
    use crate::core::multimodal::{DecodeLimits, content_hash, decode};
    use crate::core::protocol::MediaInput;
    let dir = testdata("tiny-llava");
    let model = super::load(&ModelSource::Dir(dir.clone()), CpuBackend::reference(2).unwrap(), |_, _| {}).unwrap();
    let multimodal = model.config.multimodal.clone().unwrap();
    let config = SchedulerConfig {
        block_size: 4,
        num_blocks: 128,
        max_num_seqs: 16,
        max_num_batched_tokens: budget,
        watermark: 0.0,
        enable_prefix_caching: true,
    };
    let mut executor = NativeExecutor::new(model, config.num_blocks, config.block_size).unwrap();
    // Room for one image, and the step below prefills two prompts holding three images (two distinct).
    let image_len = multimodal.tokens_per_image() * executor.model.config.hidden_size;
    executor.embeddings = Some(Arc::new(EmbeddingCache::new(image_len, 0)));
    let mut s = Scheduler::new(config, executor);
    let cases = llava_cases(&dir);
    for (id, case) in cases.iter().enumerate() {
        let mut request = greedy(case.prompt_ids.clone(), case.greedy_ids.len() as u32);
        let starts = (0..case.prompt_ids.len()).filter(|&i| {
            case.prompt_ids[i] == multimodal.image_token_id
                && (i == 0 || case.prompt_ids[i - 1] != multimodal.image_token_id)
        });
        let media = starts
            .zip(&case.images)
            .map(|(start, file)| {
                let data = std::fs::read(dir.join(file)).unwrap();
                let hash = content_hash(&decode(&data, &DecodeLimits::default()).unwrap());
                let end = (start + multimodal.tokens_per_image()) as u32;
                MediaInput { start: start as u32, end, hash, data: data.into(), encoded: None }
            })
            .collect();
        request.media = Some(Arc::new(media));
        s.add(id as SeqId, &request, 0);
    }
    let outputs = run(&mut s);
    for (id, case) in cases.iter().enumerate() {
        assert_eq!(of(&outputs, id as SeqId).0, case.greedy_ids, "case {id}");
    }
}

/// int8 weights (one scale per output channel; activations as the CPU's int8 products read them) move
/// every fixture's logits by a few percent of the largest at most (these are random models of 2 layers and 64
/// features, with no structure for the error to average out in), and mostly keep the most likely token.
#[test]
fn int8_weights_keep_every_fixtures_logits_close() {
    for (source, file) in fixtures() {
        let golden = golden(file);
        let error = super::logits_error(&source, 2, super::Quantization::Int8, &golden.prompt_ids).unwrap();
        eprintln!("{file}: int8 {error:?}");
        assert!(error.max > 0.0, "{file}: int8 changed nothing: the quantization did not apply");
        assert!(error.relative < 0.08, "{file}: int8 moved logits by {error:?}");
        assert!(error.same_top_token >= 0.8, "{file}: int8 changed the top token too often: {error:?}");
    }
}
