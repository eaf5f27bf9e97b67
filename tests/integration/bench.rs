//! The benchmarks' plumbing and their `--json` contract, on tiny inputs (nothing here is timed).
use crate::util::dynamo;
use serde_json::Value;

pub fn last_json_line(args: &[&str]) -> Value {
    last_json_line_of(dynamo().args(args))
}

/// The last line of what `command` printed, as JSON; it must have succeeded.
pub fn last_json_line_of(command: &mut std::process::Command) -> Value {
    let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let out = command.output().expect("dynamo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the last line is JSON")
}

/// A small Mooncake-format trace whose requests share prefixes.
fn trace_file(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let lines: Vec<String> = (0..60u64)
        .map(|i| {
            let ids: Vec<String> = (0..4)
                .map(|b| if b < 2 { (i % 4 * 10 + b).to_string() } else { (1000 + i * 10 + b).to_string() })
                .collect();
            format!(
                r#"{{"timestamp": {}, "input_length": 60, "output_length": 3, "hash_ids": [{}]}}"#,
                i * 100,
                ids.join(", ")
            )
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("the trace is written");
    path
}

#[test]
fn bench_index_reports_the_documented_json() {
    let trace = trace_file("index-trace.jsonl");
    let json = last_json_line(&[
        "bench",
        "index",
        "--trace",
        trace.to_str().unwrap(),
        "--workers",
        "4",
        "--repeat",
        "2",
        "--micro-blocks",
        "2000",
        "--micro-workers",
        "4",
        "--json",
    ]);
    for key in [
        "block_ops_per_s",
        "lookup_p50_us",
        "lookup_p99_us",
        "baseline_block_ops_per_s",
        "bytes_per_entry",
        "concurrent_lookup_p99_us",
    ] {
        assert!(json[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {json}");
    }
    assert_eq!(json["requests"], 120);
}

#[test]
fn bench_route_compares_the_modes() {
    let trace = trace_file("route-trace.jsonl");
    let json = last_json_line(&[
        "bench",
        "route",
        "--trace",
        trace.to_str().unwrap(),
        "--workers",
        "3",
        // Requests 10 ms apart in wall time: a worker's Stored events reach the router well before the next
        // request even on a loaded 2-core runner (at 50 µs apart, a busy CI machine routed them all blind).
        "--speedup",
        "10",
        "--block-tokens",
        "16",
        "--json",
    ]);
    let modes = json["modes"].as_object().expect("modes by name");
    let names: Vec<&str> = modes.keys().map(String::as_str).collect();
    assert_eq!(names.len(), 4, "{json}");
    for name in ["latency", "kv", "round-robin", "random"] {
        let mode = &modes[name];
        assert_eq!(mode["requests"], 60, "{name}: {mode}");
        assert_eq!(mode["errors"], 0, "{name}: {mode}");
        for key in ["ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms"] {
            assert!(mode[key].as_f64().is_some_and(|v| v > 0.0), "{name} {key}: {mode}");
        }
        let spread = mode["requests_per_worker"].as_array().expect("the load spread");
        assert_eq!(spread.iter().filter_map(|n| n.as_u64()).sum::<u64>(), 60, "{mode}");
    }
    // Requests share one of four 2-block prefixes (32 of 60 tokens). Sending each prefix back to its worker
    // misses only the first four: 56/60 × 32/60 = 0.498, the ideal. Round-robin over 3 workers misses each
    // prefix once per worker: 48/60 × 32/60 = 0.427.
    let ideal = json["ideal_cached_fraction"].as_f64().expect("the ideal");
    assert!((ideal - 56.0 / 60.0 * 32.0 / 60.0).abs() < 1e-9, "{json}");
    let cached = |name: &str| modes[name]["cached_fraction"].as_f64().unwrap_or(0.0);
    for name in ["latency", "kv"] {
        assert!(cached(name) > 0.45, "{name}: {json}");
        assert!(cached(name) > cached("round-robin"), "{name}: {json}");
    }
}

#[test]
fn bench_route_sweeps_concurrency_on_a_synthesized_shared_prefix_trace() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("shared.jsonl");
    let status = dynamo()
        .args(["bench", "trace", "shared-prefix", "--prefixes", "6", "--uses", "3", "--prefix-tokens", "256"])
        .args(["--suffix-tokens", "16", "--output-tokens", "4", "--out"])
        .arg(&trace)
        .status()
        .expect("dynamo runs");
    assert!(status.success());
    let json = last_json_line(&[
        "bench",
        "route",
        "--trace",
        trace.to_str().unwrap(),
        "--block-tokens",
        "16",
        "--workers",
        "2",
        "--modes",
        "latency,round-robin",
        "--concurrency",
        "1,4",
        "--speedup",
        "10",
        "--json",
    ]);
    let levels = json["levels"].as_array().expect("one result per level");
    assert_eq!(levels.iter().map(|l| l["concurrency"].as_u64()).collect::<Vec<_>>(), [Some(1), Some(4)]);
    // 12 of 18 requests can reuse 256 of 272 tokens.
    let ideal = json["ideal_cached_fraction"].as_f64().unwrap_or(0.0);
    assert!((ideal - 12.0 / 18.0 * 256.0 / 272.0).abs() < 1e-9, "{json}");
    for level in levels {
        assert_eq!(level["modes"]["latency"]["requests"], 18, "{level}");
        assert_eq!(level["modes"]["round-robin"]["errors"], 0, "{level}");
    }
    // One client at a time: every prefix goes back to the worker that holds it, idle by then.
    let alone = levels[0]["modes"]["latency"]["cached_fraction"].as_f64().unwrap_or(0.0);
    assert!((alone - ideal).abs() < 1e-9, "{json}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bench_http_reports_both_paths() {
    let json = last_json_line(&["bench", "http", "--concurrency", "2", "--rate", "200", "--requests", "40", "--json"]);
    let levels = json["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2);
    for level in levels {
        assert_eq!(level["http"]["errors"], 0, "{level}");
        assert_eq!(level["direct"]["requests"], 40, "{level}");
        assert!(level["http"]["p99_ms"].as_f64().is_some_and(|v| v > 0.0), "{level}");
    }
}

#[test]
fn bench_plane_delivers_every_message_and_every_streamed_output() {
    // The bench fails if any stream comes back short (a ROUTER socket at its high-water mark drops
    // silently; that once cost outputs here).
    let args = ["bench", "plane", "--messages", "2000", "--events-per-message", "2", "--requests", "500"];
    let json = last_json_line(&[&args[..], &["--tokens", "40", "--json"]].concat());
    let result = &json["result"];
    assert_eq!(result["plane"]["messages"], 2000, "{json}");
    assert_eq!(result["plane"]["lost"], 0, "{json}");
    assert!(result["ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    // Linux tells a process its CPU time, so the CPU view of the ratio is there too.
    assert!(result["cpu_ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    assert_eq!(json["requests"]["plane"]["requests"], 500, "{json}");
    assert!(json["requests"]["ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
}

#[test]
fn bench_epp_picks_through_the_grpc_stream_and_directly_without_errors() {
    let args = ["bench", "epp", "--picks", "200", "--rounds", "2", "--rate", "400", "--workers", "2", "--json"];
    let json = last_json_line(&args);
    let result = &json["result"];
    for path in ["direct", "grpc"] {
        assert_eq!(
            (result[path]["requests"].as_u64(), result[path]["errors"].as_u64()),
            (Some(200), Some(0)),
            "{json}"
        );
        assert!(result[path]["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{json}");
    }
    assert!(result["ratio_p50"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    assert!(result["added_p99_us"].is_number(), "{json}");
    assert_eq!(result["rounds"], 2, "{json}");
}

#[test]
fn bench_plane_with_a_cluster_key_delivers_every_sealed_message() {
    let args = ["bench", "plane", "--messages", "1000", "--requests", "200", "--rounds", "1", "--cluster-key"];
    let json = last_json_line(&[&args[..], &["--json"]].concat());
    assert_eq!(json["result"]["plane"]["messages"], 1000, "{json}");
    assert_eq!(json["result"]["plane"]["lost"], 0, "{json}");
    assert_eq!(json["requests"]["plane"]["requests"], 200, "{json}");
}

#[test]
fn bench_encode_reports_images_per_second_against_the_product_peak() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-llava");
    let args = ["bench", "encode", "--model", model.to_str().unwrap(), "--threads", "2", "--batch", "2"];
    let json =
        last_json_line(&[&args[..], &["--rounds", "2", "--text-streams", "2", "--images", "2", "--json"]].concat());
    let result = &json["result"];
    assert_eq!((result["batch"].as_u64(), result["tokens_per_image"].as_u64()), (Some(2), Some(25)), "{json}");
    // 25 patches + the class token through 2 of 3 layers (the projector reads the second-to-last), then the
    // projector: counted from the config, not measured.
    assert_eq!(result["macs_per_image"], 752_512, "{json}");
    for field in ["images_per_s", "median_ms_per_image", "peak_macs_per_s", "fraction_of_peak"] {
        assert!(result[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {json}");
    }
    // Text decoding while two images arrive, aggregated and with an encode worker, side by side.
    let interference = &result["interference"];
    assert_eq!((interference["text_streams"].as_u64(), interference["images"].as_u64()), (Some(2), Some(2)));
    for side in ["aggregated", "with_encode_worker"] {
        for field in ["gaps", "itl_p50_ms", "itl_p99_ms", "image_ttft_p50_ms"] {
            assert!(interference[side][field].as_f64().is_some_and(|v| v > 0.0), "{side} {field}: {json}");
        }
    }
    assert!(interference["itl_p99_ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    // Without a vision tower it says so.
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/llama");
    let ran = dynamo().args(["bench", "encode", "--model", text.to_str().unwrap()]).output().unwrap();
    assert!(!ran.status.success());
    assert!(String::from_utf8_lossy(&ran.stderr).contains("no vision tower"), "{ran:?}");
}

#[test]
fn bench_engine_reports_prefill_decode_and_both_bounds() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/llama");
    let json = last_json_line(&[
        "bench",
        "engine",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--prompt-tokens",
        "8,64",
        "--batch",
        "1,4",
        "--temperature",
        "0,1",
        "--decode-steps",
        "3",
        "--repeats",
        "1",
        "--structured",
        "--json",
    ]);
    let result = &json["results"][0];
    assert!(result["bandwidth_gb_s"].as_f64().is_some_and(|b| b > 0.0), "{json}");
    assert!(result["peak_gmacs"].as_f64().is_some_and(|p| p > 0.0), "{json}");
    let units = ["AMX tiles", "AVX-512 BF16", "f32 FMA"];
    assert!(result["product_unit"].as_str().is_some_and(|unit| units.contains(&unit)), "{json}");
    assert_eq!(result["prefill"].as_array().map(Vec::len), Some(2), "{json}");
    let decode = result["decode"].as_array().unwrap();
    assert_eq!(decode[0]["speedup_vs_batch_1"], 1.0, "{json}");
    assert!(decode.iter().all(|d| d["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0)), "{json}");
    // Every batch at each temperature; sampled runs are compared with greedy ones and their sampling timed.
    // Each free, then held to the JSON schema and compared with the free run.
    let runs: Vec<(u64, f64, bool)> = decode
        .iter()
        .map(|d| (d["batch"].as_u64().unwrap(), d["temperature"].as_f64().unwrap(), d["structured"] == true))
        .collect();
    let expected: Vec<(u64, f64, bool)> = [(1, 0.0), (4, 0.0), (1, 1.0), (4, 1.0)]
        .into_iter()
        .flat_map(|(batch, temperature)| [(batch, temperature, false), (batch, temperature, true)])
        .collect();
    assert_eq!(runs, expected, "{json}");
    assert!(decode.iter().all(|d| d["vs_greedy"].as_f64().is_some_and(|v| v > 0.0)), "{json}");
    assert!(decode.iter().all(|d| d["vs_unconstrained"].as_f64().is_some() == (d["structured"] == true)), "{json}");
    assert!(decode[7]["sampling_share"].as_f64().is_some_and(|s| s > 0.0 && s < 1.0), "{json}");
}

#[test]
fn bench_engine_measures_int8_beside_the_checkpoints_weights() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/llama");
    let args = ["bench", "engine", "--model", model.to_str().unwrap(), "--threads", "2", "--prompt-tokens", "8"];
    let more = ["--batch", "1,2", "--temperature", "0", "--decode-steps", "2", "--repeats", "1"];
    let json = last_json_line(&[&args[..], &more, &["--quantization", "none,int8", "--json"]].concat());
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{json}");
    assert!(results[0]["logits_error"].is_null(), "{json}");
    let error = &results[1]["logits_error"];
    assert!(error["max"].as_f64().is_some_and(|e| e > 0.0), "{json}");
    assert!(error["same_top_token"].as_f64().is_some_and(|s| s > 0.5), "{json}");
    // A byte a weight and a scale a row, against the checkpoint's f32 (and f32's norms, kept as they are).
    let bytes = |r: &serde_json::Value| r["weight_bytes"].as_f64().unwrap();
    assert!(bytes(&results[1]) < bytes(&results[0]) / 3.0, "{json}");
    // The summary rows, each with its quantization.
    let rows: Vec<(u64, &str)> = json["decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["batch"].as_u64().unwrap(), d["quantization"].as_str().unwrap()))
        .collect();
    assert_eq!(rows, [(1, "none"), (2, "none"), (1, "int8"), (2, "int8")], "{json}");
    assert!(json["decode"].as_array().unwrap().iter().all(|d| d["tok_s"].as_f64().is_some_and(|t| t > 0.0)));
    assert_eq!(json["prefill"].as_array().map(Vec::len), Some(2), "{json}");
    // The quantization of the native engine only.
    let ran = dynamo().args(["run", "--engine", "mocker", "--quantization", "int8"]).output().unwrap();
    assert!(!ran.status.success());
    assert!(String::from_utf8_lossy(&ran.stderr).contains("read only by --engine native"), "{ran:?}");
}

#[test]
fn bench_soak_loses_nothing_while_workers_are_killed() {
    let json = last_json_line(&[
        "bench",
        "soak",
        "--minutes",
        "0.15",
        "--rate",
        "30",
        "--kill-every",
        "2",
        "--workers",
        "2",
        "--json",
    ]);
    let result = &json["result"];
    assert!(result["worker_kills"].as_u64().is_some_and(|k| k >= 3), "{result}");
    assert!(result["served"].as_u64().is_some_and(|n| n > 50), "{result}");
    assert!(result["refused_as_expected"].as_u64().is_some_and(|n| n > 5), "{result}");
    assert_eq!((result["lost"].as_u64(), result["wrong_status"].as_u64()), (Some(0), Some(0)), "{result}");
    assert!(result["fds_end"].as_u64().is_some_and(|n| n > 0), "{result}");
}

#[test]
fn bench_transfer_moves_blocks_between_two_processes_and_reads_them_back() {
    // The bench reads one written block back through each backend and fails if it differs.
    let args = ["bench", "transfer", "--blocks", "8", "--rounds", "1", "--latency-requests", "5", "--json"];
    // Sealed: both processes keyed, tcp's bytes encrypted on the way and checked on reading back.
    for sealed in [&[][..], &["--sealed"]] {
        let json = last_json_line(&[&args[..], &["--backend", "shm,tcp"], sealed].concat());
        for key in ["memcpy_gbps", "raw_tcp_gbps", "shm_gbps", "shm_p50_us", "tcp_gbps", "tcp_p50_us"] {
            assert!(json[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {json}");
        }
        assert!(json["nixl_gbps"].is_null() && json["nixl_p50_us"].is_null(), "{json}");
        assert_eq!(json["sealed"], !sealed.is_empty(), "{json}");
        let shapes = json["shapes"].as_array().expect("shapes");
        assert_eq!(shapes.len(), 2, "{json}");
        assert_eq!(shapes[0]["descriptors"], 8 * 60, "SmolLM2: a page per layer for K and for V: {json}");
    }
}

#[test]
fn bench_disagg_compares_aggregated_disaggregated_and_conditional() {
    let trace = trace_file("disagg-trace.jsonl");
    let json = last_json_line(&[
        "bench",
        "disagg",
        "--trace",
        trace.to_str().unwrap(),
        "--gpus",
        "4",
        "--speedup",
        "10",
        "--block-tokens",
        "16",
        // Prompts are 60 tokens; 32 of them are a prefix shared with other requests.
        "--threshold",
        "32",
        "--json",
    ]);
    let setups = json["setups"].as_array().expect("setups");
    let names: Vec<_> = setups.iter().map(|s| s["setup"].as_str().unwrap_or_default()).collect();
    assert_eq!(names, vec!["aggregated", "disaggregated", "conditional"]);
    for setup in setups {
        assert_eq!((setup["requests"].as_u64(), setup["errors"].as_u64()), (Some(60), Some(0)), "{setup}");
        for field in ["ttft_p50_ms", "itl_p90_ms", "goodput_rps"] {
            assert!(setup[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {setup}");
        }
    }
    assert_eq!((setups[0]["prefill_workers"].as_u64(), setups[1]["prefill_workers"].as_u64()), (Some(0), Some(2)));
    let remote = |i: usize| setups[i]["remote_share"].as_f64().unwrap_or(-1.0);
    assert_eq!((remote(0), remote(1)), (0.0, 1.0), "none and every prompt's KV moved: {json}");
    // Once a prefix is cached on its decode worker, 28 uncached tokens are under the threshold: only the
    // first prompts of each prefix move.
    assert!(remote(2) > 0.0 && remote(2) < 0.5, "{json}");
}

#[test]
fn bench_disagg_native_compares_aggregated_and_disaggregated_serving() {
    let json = last_json_line(&[
        "bench",
        "disagg-native",
        "--requests",
        "8",
        "--concurrency",
        "2",
        "--long-tokens",
        "200",
        "--short-tokens",
        "16",
        "--max-tokens",
        "4",
        "--threads",
        "1",
        "--json",
    ]);
    let setups = json["setups"].as_array().expect("setups");
    let names: Vec<_> = setups.iter().map(|s| s["setup"].as_str().unwrap_or_default()).collect();
    assert_eq!(names, vec!["aggregated", "disaggregated"]);
    for setup in setups {
        assert_eq!((setup["requests"].as_u64(), setup["errors"].as_u64()), (Some(8), Some(0)), "{setup}");
        for field in ["ttft_p50_ms", "short_ttft_p90_ms", "itl_p90_ms", "output_tokens_per_s"] {
            assert!(setup[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {setup}");
        }
    }
    assert_eq!((setups[1]["prefill_workers"].as_u64(), setups[1]["decode_workers"].as_u64()), (Some(1), Some(1)));
}

#[test]
fn bench_planner_scores_every_predictor_on_every_series() {
    let trace = trace_file("planner-trace.jsonl");
    let json =
        last_json_line(&["bench", "planner", "--trace", trace.to_str().unwrap(), "--interval", "0.5,1", "--json"]);
    assert_eq!(json["default"], "auto");
    let results = json["results"].as_array().expect("results");
    let of = |interval: f64, series: &str| {
        (results.iter())
            .filter(|r| r["interval_s"].as_f64() == Some(interval) && r["series"] == series)
            .map(|r| (r["predictor"].as_str().unwrap_or_default().to_string(), r["wape"].as_f64()))
            .collect::<Vec<_>>()
    };
    for interval in [0.5, 1.0] {
        for series in ["requests", "input_tokens", "output_tokens"] {
            let row = of(interval, series);
            let names: Vec<&str> = row.iter().map(|(name, _)| name.as_str()).collect();
            assert!(names.contains(&"auto") && names.contains(&"kalman") && names.contains(&"mavg-5"), "{names:?}");
            // The trace is one request every 100 ms: every interval holds the same load, forecast exactly.
            let constant = row.iter().find(|(name, _)| name == "constant").and_then(|(_, w)| *w);
            assert!(constant.is_some_and(|w| w < 0.05), "{interval} {series}: {row:?}");
        }
    }
}

#[test]
fn bench_planner_simulate_compares_the_planner_with_the_fewest_static_workers_that_meet_the_targets() {
    let trace = trace_file("scaling-trace.jsonl");
    let json = last_json_line(&[
        "bench",
        "planner",
        "--trace",
        trace.to_str().unwrap(),
        "--simulate",
        "--speedup",
        "20",
        "--block-tokens",
        "16",
        "--max-workers",
        "3",
        "--planner-interval",
        "1",
        "--json",
    ]);
    let setups = json["setups"].as_array().expect("setups");
    let names: Vec<&str> = setups.iter().map(|s| s["setup"].as_str().unwrap_or_default()).collect();
    assert_eq!(names.first(), Some(&"planner"), "{names:?}");
    assert!(names.contains(&"static 3"), "the most workers are always tried: {names:?}");
    for setup in setups {
        assert_eq!((setup["requests"].as_u64(), setup["errors"].as_u64()), (Some(60), Some(0)), "{setup}");
        let attainment = setup["attainment"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&attainment), "{setup}");
        assert!(setup["worker_hours"].as_f64().is_some_and(|h| h > 0.0), "{setup}");
    }
    // One 60-token request every 100 ms is light work: one static worker meets the targets, and it is the
    // best; the planner's worker-hours are compared with its own.
    assert_eq!(json["best_static"], "static 1", "{json}");
    let ratio = json["worker_hours_ratio"].as_f64().expect("a ratio");
    let planner = &setups[0];
    let best = setups.iter().find(|s| s["setup"] == "static 1").expect("static 1");
    let expected = planner["worker_hours"].as_f64().unwrap() / best["worker_hours"].as_f64().unwrap();
    assert!((ratio - expected).abs() < 1e-9, "{json}");
}

#[test]
fn bench_http_measures_an_engine_directly_and_through_a_dynamo_worker_and_router() {
    // The engine is a `dynamo run` itself: it speaks the vLLM API the worker uses (token-id prompts,
    // return_token_ids), so the whole chain runs here without vLLM.
    let engine = crate::util::Server::start(&["--speedup", "1000000"]);
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-chat");
    let args = ["bench", "http", "--engine-url", &engine.base, "--model", model, "--concurrency", "4", "--rate", "0"];
    let json = last_json_line(&[&args[..], &["--requests", "40", "--json"]].concat());
    let level = &json["levels"][0];
    for path in ["direct", "http"] {
        assert_eq!((level[path]["requests"].as_u64(), level[path]["errors"].as_u64()), (Some(40), Some(0)), "{json}");
    }
    assert!(level["throughput_ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    // The mocker stack's flags make no sense beside an engine of one's own.
    let refused = dynamo()
        .args(["bench", "http", "--engine-url", &engine.base, "--model", model, "--workers", "2"])
        .output()
        .unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--workers"));
}
