//! `dynamo selftest`: checks a device backend against the CPU backend, op by op on pseudo-random inputs and
//! then a whole forward pass, so a new GPU machine can be trusted (or not) before it serves anything.
use super::backend::{AttentionSeq, AttentionShape, Backend, BackendError, KvDtype};
use super::model::{ForwardBatch, Transformer};
use super::weights::{HostData, HostTensor};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub max_abs_diff: f32,
    pub tolerance: f32,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.max_abs_diff <= self.tolerance
    }
}

fn check(name: &str, a: &[f32], b: &[f32], tolerance: f32) -> Check {
    let max_abs_diff = if a.len() == b.len() {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    } else {
        f32::INFINITY
    };
    Check { name: name.to_string(), max_abs_diff, tolerance }
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 8) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Runs every op on both backends with the same inputs and compares what comes back.
pub fn compare_ops<A: Backend, B: Backend>(a: &A, b: &B) -> Result<Vec<Check>, BackendError> {
    let mut checks = Vec::new();
    let (rows, cols, features) = (5, 64, 96);
    let x = values(rows * cols, 1);

    for (label, data) in [
        ("f32", HostData::F32(values(features * cols, 2))),
        ("bf16", HostData::Bf16(values(features * cols, 2).into_iter().map(half::bf16::from_f32).collect())),
    ] {
        let tensor = HostTensor { shape: vec![features, cols], data };
        let (wa, wb) = (a.matrix(tensor.clone())?, b.matrix(tensor)?);
        let bias = values(features, 3);
        let (ba, bb) = (a.vector(&bias)?, b.vector(&bias)?);
        for n in [1, rows, 40] {
            let x = values(n * cols, 4);
            let (mut oa, mut ob) = (a.zeros(0)?, b.zeros(0)?);
            a.matmul(&a.vector(&x)?, &wa, Some(&ba), &mut oa)?;
            b.matmul(&b.vector(&x)?, &wb, Some(&bb), &mut ob)?;
            checks.push(check(&format!("matmul {label} {n} rows"), &a.to_host(&oa)?, &b.to_host(&ob)?, 1e-3));
        }
        let ids = [0u32, 7, 95, 3];
        let (mut oa, mut ob) = (a.zeros(0)?, b.zeros(0)?);
        a.embedding(&wa, &ids, &mut oa)?;
        b.embedding(&wb, &ids, &mut ob)?;
        checks.push(check(&format!("embedding {label}"), &a.to_host(&oa)?, &b.to_host(&ob)?, 0.0));
    }

    let weight = values(cols, 5);
    let (mut oa, mut ob) = (a.zeros(0)?, b.zeros(0)?);
    a.rms_norm(&a.vector(&x)?, &a.vector(&weight)?, cols, 1e-6, &mut oa)?;
    b.rms_norm(&b.vector(&x)?, &b.vector(&weight)?, cols, 1e-6, &mut ob)?;
    checks.push(check("rms_norm", &a.to_host(&oa)?, &b.to_host(&ob)?, 1e-5));

    let (heads, head_dim) = (4, 16);
    let positions = [0u32, 1, 17, 300, 4095];
    let inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32)).collect();
    let (mut ra, mut rb) = (a.vector(&x)?, b.vector(&x)?);
    a.rope(&mut ra, &positions, heads, head_dim, &inv_freq)?;
    b.rope(&mut rb, &positions, heads, head_dim, &inv_freq)?;
    checks.push(check("rope", &a.to_host(&ra)?, &b.to_host(&rb)?, 1e-4));

    let up = values(x.len(), 6);
    let (mut ga, mut gb) = (a.vector(&x)?, b.vector(&x)?);
    a.silu_mul(&mut ga, &a.vector(&up)?)?;
    b.silu_mul(&mut gb, &b.vector(&up)?)?;
    checks.push(check("silu_mul", &a.to_host(&ga)?, &b.to_host(&gb)?, 1e-5));
    a.add(&mut ga, &a.vector(&up)?)?;
    b.add(&mut gb, &b.vector(&up)?)?;
    checks.push(check("add", &a.to_host(&ga)?, &b.to_host(&gb)?, 1e-5));
    let picked = [4usize, 0, 2];
    let (pa, pb) = (a.gather_rows(&ga, cols, &picked)?, b.gather_rows(&gb, cols, &picked)?);
    checks.push(check("gather_rows", &a.to_host(&pa)?, &b.to_host(&pb)?, 1e-5));

    // Two sequences on shuffled pages: 6 prompt rows of one, a decode row of the other at position 9.
    let shape = AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 16, block_size: 4 };
    let page_len = shape.block_size * shape.num_kv_heads * shape.head_dim;
    let kv_width = shape.num_kv_heads * shape.head_dim;
    let seqs = vec![
        AttentionSeq { first_row: 0, rows: 6, first_position: 0, block_table: vec![7, 2] },
        AttentionSeq { first_row: 6, rows: 1, first_position: 9, block_table: vec![0, 5, 3] },
    ];
    let (mut ka, mut va, mut kb, mut vb) = {
        let f32_pages = KvDtype::F32;
        (
            a.pages(8, page_len, f32_pages)?,
            a.pages(8, page_len, f32_pages)?,
            b.pages(8, page_len, f32_pages)?,
            b.pages(8, page_len, f32_pages)?,
        )
    };
    // Fill the second sequence's earlier positions first, as earlier steps would have.
    let history_slots: Vec<u32> = (0..9).map(|p| [0u32, 5, 3][p / 4] * 4 + (p % 4) as u32).collect();
    let (hk, hv) = (values(9 * kv_width, 7), values(9 * kv_width, 8));
    a.write_kv(&a.vector(&hk)?, &a.vector(&hv)?, &history_slots, &mut ka, &mut va)?;
    b.write_kv(&b.vector(&hk)?, &b.vector(&hv)?, &history_slots, &mut kb, &mut vb)?;
    let slots: Vec<u32> = (0..6).map(|p| [7u32, 2][p / 4] * 4 + (p % 4) as u32).chain([3 * 4 + 1]).collect();
    let (k, v) = (values(7 * kv_width, 9), values(7 * kv_width, 10));
    a.write_kv(&a.vector(&k)?, &a.vector(&v)?, &slots, &mut ka, &mut va)?;
    b.write_kv(&b.vector(&k)?, &b.vector(&v)?, &slots, &mut kb, &mut vb)?;
    let all_pages: Vec<u32> = (0..8).collect();
    checks.push(check(
        "write_kv + read_pages",
        &a.read_pages(&ka, &all_pages, page_len)?,
        &b.read_pages(&kb, &all_pages, page_len)?,
        0.0,
    ));
    let q = values(7 * shape.num_heads * shape.head_dim, 11);
    let (mut oa, mut ob) = (a.zeros(0)?, b.zeros(0)?);
    a.paged_attention(&a.vector(&q)?, &ka, &va, &seqs, &shape, &mut oa)?;
    b.paged_attention(&b.vector(&q)?, &kb, &vb, &seqs, &shape, &mut ob)?;
    checks.push(check("paged_attention", &a.to_host(&oa)?, &b.to_host(&ob)?, 1e-4));

    let moved = values(2 * page_len, 12);
    a.write_pages(&mut ka, &[6, 1], page_len, &moved)?;
    b.write_pages(&mut kb, &[6, 1], page_len, &moved)?;
    checks.push(check(
        "write_pages",
        &a.read_pages(&ka, &all_pages, page_len)?,
        &b.read_pages(&kb, &all_pages, page_len)?,
        0.0,
    ));
    Ok(checks)
}

/// Logits at every position of `prompt` from two loads of the same model.
pub fn compare_forward<A: Backend, B: Backend>(
    name: &str,
    a: &Transformer<A>,
    b: &Transformer<B>,
    prompt: &[u32],
) -> Result<Check, BackendError> {
    let block = 16;
    let pages: Vec<u32> = (0..prompt.len().div_ceil(block) as u32).collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(prompt, 0, prompt.len(), &pages, block, true);
    batch.logit_rows = (0..prompt.len()).collect();
    let la = a.forward(&mut a.new_cache(pages.len(), block)?, &batch, block)?;
    let lb = b.forward(&mut b.new_cache(pages.len(), block)?, &batch, block)?;
    Ok(check(&format!("forward {name}"), &la, &lb, 1e-3))
}

/// What `dynamo selftest` does.
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    /// Compile the CUDA kernels with NVRTC and stop (needs no GPU).
    pub compile_only: bool,
    /// The CUDA device to compare against the CPU.
    pub cuda_device: usize,
    /// Checkpoints whose forward pass to compare; the built-in model is always one.
    pub models: Vec<std::path::PathBuf>,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    pub kernels_compiled: usize,
    pub ptx_bytes: usize,
    pub device: Option<String>,
    pub checks: Vec<Check>,
}

impl SelftestReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }
}

pub fn run(options: &SelftestOptions) -> Result<SelftestReport, super::NativeError> {
    use super::cuda::{CudaBackend, KERNEL_NAMES, compile_kernels};
    use crate::core::model::ModelSource;
    let ptx = compile_kernels()?.to_src();
    let missing: Vec<&str> = KERNEL_NAMES.iter().copied().filter(|k| !ptx.contains(&format!(".entry {k}("))).collect();
    if !missing.is_empty() {
        return Err(BackendError(format!("the compiled PTX lacks kernels: {}", missing.join(", "))).into());
    }
    let mut report =
        SelftestReport { kernels_compiled: KERNEL_NAMES.len(), ptx_bytes: ptx.len(), device: None, checks: Vec::new() };
    if options.compile_only {
        return Ok(report);
    }
    let cuda = CudaBackend::new(options.cuda_device)?;
    report.device = Some(cuda.describe());
    let cpu = super::cpu::CpuBackend::reference(options.threads)
        .map_err(|e| super::NativeError::Threads { threads: options.threads, detail: e.to_string() })?;
    report.checks = compare_ops(&cpu, &cuda)?;
    let sources = std::iter::once(ModelSource::Builtin).chain(options.models.iter().cloned().map(ModelSource::Dir));
    for source in sources {
        let name = match &source {
            ModelSource::Builtin => "tiny-chat".to_string(),
            ModelSource::Dir(dir) => dir.display().to_string(),
        };
        let reference = super::cpu::CpuBackend::reference(options.threads)
            .map_err(|e| super::NativeError::Threads { threads: options.threads, detail: e.to_string() })?;
        let on_cpu = super::load(&source, reference, |_, _| {})?;
        let on_cuda = super::load(&source, CudaBackend::new(options.cuda_device)?, |_, _| {})?;
        let prompt: Vec<u32> = (0..48).map(|i| (i * 37 + 11) % on_cpu.config.vocab_size as u32).collect();
        report.checks.push(compare_forward(&name, &on_cpu, &on_cuda, &prompt)?);
    }
    Ok(report)
}

pub fn table(report: &SelftestReport) -> String {
    let mut out =
        format!("compiled {} CUDA kernels to PTX ({} bytes) with NVRTC\n", report.kernels_compiled, report.ptx_bytes);
    if let Some(device) = &report.device {
        out.push_str(&format!(
            "{device} against the CPU backend:\n{:<34} {:>12} {:>12}\n",
            "check", "max |Δ|", "tolerance"
        ));
        for c in &report.checks {
            let verdict = if c.passed() { "ok" } else { "FAILED" };
            out.push_str(&format!("{:<34} {:>12.2e} {:>12.0e}  {verdict}\n", c.name, c.max_abs_diff, c.tolerance));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::native::cpu::CpuBackend;

    /// The checks themselves must be able to fail: two CPU backends agree, and a wrong op is caught.
    #[test]
    fn two_cpu_backends_agree_and_a_difference_is_reported() {
        let (a, b) = (CpuBackend::reference(1).unwrap(), CpuBackend::reference(2).unwrap());
        let checks = compare_ops(&a, &b).unwrap();
        assert!(checks.len() >= 14, "{checks:?}");
        assert!(checks.iter().all(Check::passed), "{checks:?}");
        assert!(!check("x", &[1.0, 2.0], &[1.0, 2.5], 1e-3).passed());
        assert!(!check("x", &[1.0], &[1.0, 2.0], 1e-3).passed());
    }
}
