//! The nixl transfer backend against the real NIXL library: the `nixl-cu12` wheel's `libnixl_capi.so` with
//! its UCX plugin, installed into a venv under target/ (it loads on a machine without a GPU). KV blocks move
//! between two `dynamo` processes through it, and a prefill worker's KV reaches a decode worker through it.
//! Without PyPI or python3 each test says SKIPPED and why.
use crate::bench::last_json_line_of;
use crate::disagg::{NATIVE, disaggregated_equals_aggregated, split_cluster_with};
use crate::util::{dynamo, python_venv};
use std::path::PathBuf;

/// The directory holding the wheel's `libnixl_capi.so`, or why there is none.
fn nixl_library_dir() -> Result<PathBuf, String> {
    let venv = python_venv("nixl-venv", &["--no-deps", "nixl-cu12==1.5.1"])?;
    let lib = venv.join("lib");
    let python = std::fs::read_dir(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    python
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages/.nixl_cu12.mesonpy.libs"))
        .find(|dir| dir.join("libnixl_capi.so").exists())
        .ok_or_else(|| format!("no libnixl_capi.so under {}", lib.display()))
}

fn library_or_skip(test: &str) -> Option<PathBuf> {
    nixl_library_dir()
        .inspect_err(|why| eprintln!("SKIPPED {test}: the NIXL wheel could not be installed ({why})"))
        .ok()
}

#[test]
fn bench_transfer_moves_blocks_through_nixl_between_two_processes() {
    let Some(dir) = library_or_skip("bench_transfer_moves_blocks_through_nixl_between_two_processes") else { return };
    // The bench reads one written block back through each backend and fails if it differs.
    let json = last_json_line_of(
        dynamo()
            .args(["bench", "transfer", "--backend", "shm,nixl", "--blocks", "8", "--rounds", "1"])
            .args(["--latency-requests", "5", "--json"])
            .env("LD_LIBRARY_PATH", &dir),
    );
    for key in ["nixl_gbps", "nixl_p50_us", "shm_gbps"] {
        assert!(json[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {json}");
    }
    let shm = &json["shapes"][0]["backends"][0];
    assert!(shm["vs_nixl"].as_f64().is_some_and(|r| r > 0.0), "ours against NIXL in the same run: {json}");
}

#[tokio::test]
async fn prompts_kv_moves_from_prefill_to_decode_worker_through_nixl() {
    let Some(dir) = library_or_skip("prompts_kv_moves_from_prefill_to_decode_worker_through_nixl") else { return };
    let with_nixl = |_: &str, command: &mut std::process::Command| {
        command.args(["--transfer-backend", "nixl"]).env("LD_LIBRARY_PATH", &dir);
    };
    let (_prefill, _decode, router) = split_cluster_with("disagg-nixl", NATIVE, with_nixl).await;
    disaggregated_equals_aggregated(&router).await;
}

#[test]
fn asking_for_nixl_where_the_library_is_missing_says_how_to_get_it() {
    let out = dynamo()
        .args([
            "decode",
            "--kv-transfer",
            "--transfer-backend",
            "nixl",
            "--discovery",
            "file:/nonexistent/cluster.toml",
        ])
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .expect("dynamo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--transfer-backend nixl: cannot open libnixl_capi.so"), "{stderr}");
    assert!(stderr.contains("LD_LIBRARY_PATH"), "{stderr}");
}
