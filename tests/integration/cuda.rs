//! The CUDA backend on a machine without a GPU: its kernels compile with NVRTC (from the
//! `nvidia-cuda-nvrtc-cu12` wheel, installed into a venv under target/), and asking for a GPU that is not
//! there is a clear error rather than a crash.
use crate::util::{dynamo, python_venv};

fn nvrtc_lib_dir() -> Result<std::path::PathBuf, String> {
    let venv = python_venv("nvrtc-venv", &["nvidia-cuda-nvrtc-cu12"])?;
    let lib = std::fs::read_dir(venv.join("lib"))
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/nvidia/cuda_nvrtc/lib"))
        .find(|dir| dir.join("libnvrtc.so.12").exists());
    lib.ok_or_else(|| "the wheel has no libnvrtc.so.12".to_string())
}

#[test]
fn every_cuda_kernel_compiles_to_ptx_with_nvrtc() {
    let lib = match nvrtc_lib_dir() {
        Ok(lib) => lib,
        Err(why) => {
            eprintln!("SKIPPED every_cuda_kernel_compiles_to_ptx_with_nvrtc: could not install NVRTC ({why})");
            return;
        }
    };
    let output = dynamo().args(["selftest", "--compile-only", "--json"]).env("LD_LIBRARY_PATH", &lib).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(json["selftest"]["kernels_compiled"], 10, "{json}");
    assert!(json["selftest"]["ptx_bytes"].as_u64().unwrap() > 1000, "{json}");
}

#[test]
fn without_cuda_libraries_selftest_says_what_is_missing() {
    let output = dynamo().args(["selftest"]).env("LD_LIBRARY_PATH", "").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("libnvrtc") || stderr.contains("libcuda"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn serving_on_a_gpu_that_is_not_there_is_refused_with_what_is_missing() {
    let output =
        dynamo().args(["run", "--http-port", "0", "--device", "cuda:1"]).env("LD_LIBRARY_PATH", "").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot use CUDA") && !stderr.contains("panicked"), "{stderr}");
}
