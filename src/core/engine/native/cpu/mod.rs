//! The CPU backend: f32 activations, weights in f32 or bf16 (widened per element inside the dot product, so
//! decode streams half the bytes), KV pages in the weights' type (f32, or bf16 widened as attention reads).
//! Work is split over a rayon pool sized by `--threads`. While a pass runs its other threads stay awake looking
//! for work (`stay_awake`); between passes they sleep instead of spinning, which matters when several workers
//! share a small box.
//!
//! Matrix products take one of two paths: few rows (decode) stream each weight row once against every
//! activation row (`kernels`, bandwidth-bound); many rows (prefill) go to the `gemm` crate's packed,
//! cache-blocked GEMM (compute-bound), with bf16 weights widened to f32 for the call.
//!
//! With `--quantization int8` every matrix is held as int8 rows with a scale each (`int8`).
mod attention;
mod int8;
mod kernels;
pub(super) mod math;
mod packed;

use super::backend::{AttentionSeq, AttentionShape, Backend, BackendError, KvDtype, Op, Product};
use super::weights::{HostData, HostTensor};
use crate::core::transfer::Region;
use attention::{BLOCK_ROWS as ATTENTION_BLOCK, BlockAttention, TiledKv, attend};
use half::bf16;
use kernels::{BLOCK_FEATURES, BLOCK_ROWS, GROUP, WeightElement, dot_block, dot_rows};
use math::Element;
use packed::{PackedBf16, SharedOutput};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    /// Pack bf16 weights for bf16 dot products where the CPU has them (see `packed`).
    bf16_activations: bool,
    /// Keep a bf16 model's KV pages in bf16.
    bf16_kv: bool,
    /// Quantize every matrix to int8 as it is loaded (`--quantization int8`).
    int8: bool,
    /// The last step's rotary angles: every layer rotates q and k at the same positions, so a step computes
    /// its sines and cosines once instead of sixty times (at batch 16 that was about 1 % of a decode step).
    rope_angles: std::sync::Mutex<RopeAngles>,
}

#[derive(Default)]
struct RopeAngles {
    positions: Vec<u32>,
    inv_freq: Vec<f32>,
    /// `(cos, sin)` per position and frequency.
    cos_sin: Vec<(f32, f32)>,
}

impl RopeAngles {
    fn update(&mut self, positions: &[u32], inv_freq: &[f32]) {
        if self.positions != positions || self.inv_freq != inv_freq {
            self.positions = positions.to_vec();
            self.inv_freq = inv_freq.to_vec();
            self.cos_sin = positions
                .iter()
                .flat_map(|&p| inv_freq.iter().map(move |f| (p as f32 * f).sin_cos()).map(|(s, c)| (c, s)))
                .collect();
        }
    }
}

impl CpuBackend {
    pub fn new(threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("dynamo-cpu-{i}"))
            .build()?;
        Ok(Self {
            pool,
            bf16_activations: packed::available(),
            bf16_kv: true,
            int8: false,
            rope_angles: Default::default(),
        })
    }

    /// Holds every matrix as int8 with a scale per row (`--quantization int8`).
    pub fn quantized_int8(self) -> Self {
        Self { int8: true, ..self }
    }

    /// Keeps every activation and the KV cache in f32 (the reference `dynamo selftest` compares a device against).
    pub fn reference(threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        Ok(Self { bf16_activations: false, bf16_kv: false, ..Self::new(threads)? })
    }
}

/// How long a helper finds nothing to take before it goes back to rayon's sleeping.
const STAY_AWAKE_IDLE: Duration = Duration::from_millis(1);

/// Keeps a pool thread looking for work while a pass runs: each op's parallel split then starts on a thread
/// that is already awake instead of one woken from sleep (a futex round trip per op, a few hundred per
/// decode step). Between looks it yields its core to any other runnable thread, and a gap of
/// `STAY_AWAKE_IDLE` with nothing to take ends it, so a long serial stretch costs at most that much spinning.
fn stay_awake(running: &AtomicBool) {
    let mut idle_since: Option<Instant> = None;
    while running.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            _ => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STAY_AWAKE_IDLE {
                    return;
                }
                std::thread::yield_now();
            }
        }
    }
}

/// One layer's K or V pages, in shared memory a transfer agent can register (`Backend::page_memory`), so KV
/// blocks move between processes straight into and out of them.
pub enum CpuPages {
    F32(PageMemory<f32>),
    Bf16(PageMemory<bf16>),
}

/// Values of type `E` laid over a region. The KV cache owns it: the engine reads and writes pages through it
/// while it steps, and transfers move only pages of sequences the engine does not run until they are done
/// (the region's rule).
pub struct PageMemory<E> {
    region: std::sync::Arc<Region>,
    len: usize,
    _values: std::marker::PhantomData<E>,
}

impl<E: plain::Plain> PageMemory<E> {
    fn zeroed(len: usize) -> Result<Self, BackendError> {
        let bytes = (len * std::mem::size_of::<E>()) as u64;
        let region = Region::new(bytes.max(1)).map_err(|e| BackendError(e.to_string()))?;
        Ok(Self { region: std::sync::Arc::new(region), len, _values: std::marker::PhantomData })
    }
}

impl<E> std::ops::Deref for PageMemory<E> {
    type Target = [E];

    fn deref(&self) -> &[E] {
        // SAFETY: the region holds `len` values of `E` (made so by `zeroed`), is page-aligned (so aligned for
        // `E`), and every bit pattern is an `E` (`Plain`); other access follows the region's rule.
        unsafe { std::slice::from_raw_parts(self.region.as_mut_ptr() as *const E, self.len) }
    }
}

impl<E> std::ops::DerefMut for PageMemory<E> {
    fn deref_mut(&mut self) -> &mut [E] {
        // SAFETY: as in `deref`, through the cache's exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_mut_ptr() as *mut E, self.len) }
    }
}

/// Types any bit pattern of which is a value: what may be laid over shared memory.
mod plain {
    pub trait Plain: Copy {}
    impl Plain for f32 {}
    impl Plain for half::bf16 {}
}

pub struct CpuMatrix {
    rows: usize,
    cols: usize,
    data: Weights,
}

enum Weights {
    /// Row-major, as stored in the checkpoint.
    Rows(HostData),
    Packed(PackedBf16),
    /// int8 rows, for CPUs without AVX-512 VNNI.
    Int8(int8::Int8Rows),
    PackedInt8(int8::PackedInt8),
}

/// Weights in panels of 16 features, which `packed_matmuls` multiplies in one parallel split.
#[derive(Clone, Copy)]
enum Panels<'a> {
    Bf16(&'a PackedBf16),
    Int8(&'a int8::PackedInt8),
}

impl Panels<'_> {
    fn of(weights: &Weights) -> Option<Panels<'_>> {
        match weights {
            Weights::Packed(w) => Some(Panels::Bf16(w)),
            Weights::PackedInt8(w) => Some(Panels::Int8(w)),
            Weights::Rows(_) | Weights::Int8(_) => None,
        }
    }

    fn panel_count(&self) -> usize {
        match self {
            Panels::Bf16(w) => w.panel_count(),
            Panels::Int8(w) => w.panel_count(),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Panels::Bf16(w) => w.rows,
            Panels::Int8(w) => w.rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Panels::Bf16(w) => w.cols,
            Panels::Int8(w) => w.cols,
        }
    }

    /// # Safety
    /// Calls running at the same time on one output must be given disjoint panels.
    unsafe fn multiply_shared(&self, x: &int8::Prepared, n: usize, first: usize, count: usize, out: &SharedOutput<'_>) {
        // SAFETY: as the caller promised.
        unsafe {
            match self {
                Panels::Bf16(w) => w.multiply_shared(&x.rounded, n, first, count, out),
                Panels::Int8(w) => w.multiply_shared(x, n, first, count, out),
            }
        }
    }
}

/// Output features one task computes: small enough to spread a decode step over every thread, large enough
/// that scheduling costs little next to `TILE × cols` multiply-adds.
const TILE: usize = 16;

/// From this many activation rows on, a packed GEMM beats streaming weight rows (measured with
/// `dynamo bench engine`: the grouped kernel still wins at batch 16).
const GEMM_MIN_ROWS: usize = 32;

/// Dot products of weight rows `features` against every activation row, into `block[f * n + token]`: full
/// register tiles where they fit, grouped rows for the edges.
fn tile_dots<W: WeightElement>(
    activations: &[&[f32]],
    weights: &[W],
    cols: usize,
    features: std::ops::Range<usize>,
    block: &mut [f32],
) {
    let n = activations.len();
    let row = |f: usize| &weights[f * cols..(f + 1) * cols];
    let full_rows = if n >= BLOCK_ROWS { n - n % BLOCK_ROWS } else { 0 };
    let mut f = features.start;
    while f < features.end {
        let at = f - features.start;
        if f + BLOCK_FEATURES <= features.end && full_rows > 0 {
            let w: [&[W]; BLOCK_FEATURES] = std::array::from_fn(|i| row(f + i));
            for r in (0..full_rows).step_by(BLOCK_ROWS) {
                let x: [&[f32]; BLOCK_ROWS] = std::array::from_fn(|i| activations[r + i]);
                for (i, values) in dot_block(x, w).iter().enumerate() {
                    block[(at + i) * n + r..][..BLOCK_ROWS].copy_from_slice(values);
                }
            }
            for i in 0..BLOCK_FEATURES {
                let dst = &mut block[(at + i) * n..(at + i + 1) * n];
                dot_rows(&activations[full_rows..], row(f + i), &mut dst[full_rows..]);
            }
            f += BLOCK_FEATURES;
        } else {
            let dst = &mut block[at * n..(at + 1) * n];
            for (group, dst) in activations.chunks(GROUP).zip(dst.chunks_mut(GROUP)) {
                dot_rows(group, row(f), dst);
            }
            f += 1;
        }
    }
}

/// `out[t] += bias` for every `rows`-wide row `t`.
fn add_bias(out: &mut [f32], rows: usize, bias: Option<&Vec<f32>>) {
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(rows) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    }
}

/// Values of `silu_mul` per task: a decode batch's MLP width spreads over the threads.
const SILU_CHUNK: usize = 4096;

#[inline(always)]
fn silu_mul_chunk(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        // σ(x) from e^-|x|, which never overflows, with the vectorisable exp (libm's is a call per value).
        let e = math::exp_nonpositive(-g.abs());
        let sigmoid = if *g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        *g *= sigmoid * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_chunk(gate, up);
}

/// Panels (of 16 output features) one task of the packed product computes.
const PANELS_PER_TASK: usize = packed::PANELS_PER_CALL;

impl CpuBackend {
    /// Whether products with bf16 weights round their activations to bf16 on this CPU (those with AVX-512
    /// BF16), which moves logits by up to a few hundredths.
    pub fn rounds_bf16_activations() -> bool {
        packed::available()
    }

    /// Whether a bf16 model's prompts attend on the tile unit here (see `attention`), for attention of `shape`.
    pub fn attends_on_tiles(shape: &AttentionShape) -> bool {
        TiledKv::usable(shape)
    }

    /// What runs this backend's fastest matrix product: the bf16 one's unit where the CPU has one, else f32 FMA.
    pub fn product_unit() -> &'static str {
        packed::unit().unwrap_or("f32 FMA")
    }

    /// Packed weights (bf16, or int8 on CPUs with VNNI) × activations in the form each reads, for any number of
    /// rows: each product's output is `n × rows`, all computed in one parallel split.
    fn packed_matmuls(&self, x: &[f32], products: &mut [(Panels<'_>, &mut Vec<f32>)]) {
        let Some(cols) = products.first().map(|(w, _)| w.cols()) else { return };
        let n = x.len() / cols;
        let reads_rounded = |w: &Panels<'_>| match w {
            Panels::Bf16(_) => true,
            Panels::Int8(w) => w.on_tiles(n),
        };
        let prepared = int8::Prepared {
            rounded: match products.iter().any(|(w, _)| reads_rounded(w)) {
                true => packed::round(x),
                false => Vec::new(),
            },
            quantized: match products.iter().any(|(w, _)| !reads_rounded(w)) {
                true => int8::Q16Rows::quantize(x, cols),
                false => int8::Q16Rows::default(),
            },
        };
        // Each task stores its panels' columns straight into its product's output, padded to whole panels;
        // gathering per-task blocks afterwards cost a copy of the output (3 MB for a batch of 16 through a 49k
        // vocabulary).
        let weights: Vec<Panels<'_>> = products.iter().map(|(w, _)| *w).collect();
        let mut tasks = Vec::new();
        let outputs: Vec<SharedOutput<'_>> = products
            .iter_mut()
            .enumerate()
            .map(|(product, (w, out))| {
                let (panels, width) = (w.panel_count(), w.panel_count() * 16);
                tasks.extend((0..panels).step_by(PANELS_PER_TASK).map(|first| (product, first)));
                out.clear();
                out.reserve(n * width);
                SharedOutput::new(&mut out.spare_capacity_mut()[..n * width], width)
            })
            .collect();
        self.pool.install(|| {
            tasks.into_par_iter().for_each(|(product, first)| {
                let w = weights[product];
                let count = PANELS_PER_TASK.min(w.panel_count() - first);
                // SAFETY: every task has its own panels of its product's output.
                unsafe { w.multiply_shared(&prepared, n, first, count, &outputs[product]) };
            })
        });
        drop(outputs);
        for (w, out) in products.iter_mut() {
            let (width, rows) = (w.panel_count() * 16, w.rows());
            // SAFETY: the tasks covered panels 0..panels of this product, and each wrote every row of its
            // panels' columns: all n · width floats are initialised.
            unsafe { out.set_len(n * width) };
            if width != rows {
                for t in 1..n {
                    out.copy_within(t * width..t * width + rows, t * rows);
                }
                out.truncate(n * rows);
            }
        }
    }

    fn packed_matmul(&self, x: &[f32], w: &PackedBf16, out: &mut Vec<f32>) {
        self.packed_matmuls(x, &mut [(Panels::Bf16(w), out)]);
    }

    /// Multiply-adds per second of this backend's fastest matrix product (the packed f32 GEMM, or the packed
    /// bf16 one where the CPU has it) on weights that stay in cache: the compute ceiling prefill and big
    /// batches are measured against.
    pub fn peak_macs_per_s(&self) -> f64 {
        let (n, rows, cols) = (256, 576, 576);
        let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 * 1e-2).collect();
        let data = HostData::F32((0..rows * cols).map(|i| (i % 5) as f32 * 1e-2).collect());
        let packed = self.bf16_activations.then(|| PackedBf16::pack(rows, cols, &packed::round(&data.to_f32())));
        let mut out = Vec::new();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let start = std::time::Instant::now();
            self.gemm(&x, &Weights::Rows(HostData::F32(data.to_f32())), rows, cols, &mut out);
            best = best.min(start.elapsed().as_secs_f64());
            if let Some(packed) = &packed {
                let start = std::time::Instant::now();
                self.packed_matmul(&x, packed, &mut out);
                best = best.min(start.elapsed().as_secs_f64());
            }
        }
        (n * rows * cols) as f64 / best
    }

    /// Streams every weight row once, against all activation rows in groups of `GROUP`.
    fn gemv(&self, x: &[f32], weights: &Weights, rows: usize, cols: usize, out: &mut Vec<f32>) {
        let n = x.len() / cols;
        let activations: Vec<&[f32]> = x.chunks_exact(cols).collect();
        // Feature-major (`[rows × n]`), so each task owns one contiguous slice; a single token needs no
        // transpose afterwards.
        // int8 weights multiply int8 activations (`int8`): each row quantized once, before the split.
        let quantized_rows: Vec<int8::Q8Row> = match weights {
            Weights::Int8(_) => activations.iter().map(|x| int8::Q8Row::quantize(x)).collect(),
            _ => Vec::new(),
        };
        let mut feature_major = if n == 1 { std::mem::take(out) } else { Vec::new() };
        feature_major.clear();
        feature_major.resize(rows * n, 0.0);
        self.pool.install(|| {
            feature_major.par_chunks_mut(TILE * n).enumerate().for_each(|(tile, block)| {
                let features = tile * TILE..((tile + 1) * TILE).min(rows);
                match weights {
                    Weights::Rows(HostData::F32(v)) => tile_dots(&activations, v, cols, features, block),
                    Weights::Rows(HostData::Bf16(v)) => tile_dots(&activations, v, cols, features, block),
                    Weights::Int8(q) => {
                        int8::tile(&quantized_rows, &activations, &q.values, &q.scales, cols, features, block)
                    }
                    // Packed products never come here (`matmul` sends them to `packed_matmuls`).
                    Weights::Packed(_) | Weights::PackedInt8(_) => {}
                }
            })
        });
        if n == 1 {
            *out = feature_major;
            return;
        }
        out.clear();
        out.resize(n * rows, 0.0);
        for (f, values) in feature_major.chunks_exact(n).enumerate() {
            for (token, value) in values.iter().enumerate() {
                out[token * rows + f] = *value;
            }
        }
    }

    fn gemm(&self, x: &[f32], weights: &Weights, rows: usize, cols: usize, out: &mut Vec<f32>) {
        let n = x.len() / cols;
        let threads = self.pool.current_num_threads();
        self.pool.install(|| {
            let weights: Cow<'_, [f32]> = match weights {
                Weights::Rows(HostData::F32(v)) => Cow::Borrowed(v),
                Weights::Rows(HostData::Bf16(v)) => Cow::Owned(v.par_iter().map(|b| b.to_f32()).collect()),
                Weights::Int8(q) => Cow::Owned(q.dequantize(cols)),
                Weights::Packed(packed) => {
                    Cow::Owned((0..rows).flat_map(|r| packed.row(r).map(|v| v.to_f32())).collect())
                }
                Weights::PackedInt8(packed) => Cow::Owned((0..rows).flat_map(|r| packed.row(r)).collect()),
            };
            out.clear();
            out.resize(n * rows, 0.0);
            // out (n × rows, row-major) = x (n × cols, row-major) · wᵀ, where wᵀ (cols × rows) is w read with
            // row stride 1 and column stride `cols`.
            // SAFETY: every pointer covers the extent its dimensions and strides describe: out n·rows,
            // x n·cols, weights rows·cols; none alias.
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    cols,
                    out.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    weights.as_ptr(),
                    cols as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        });
    }
}

impl Backend for CpuBackend {
    type Vector = Vec<f32>;
    type Matrix = CpuMatrix;
    type Pages = CpuPages;

    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        if self.pool.current_num_threads() < 2 || self.pool.current_thread_index().is_some() {
            return self.pool.install(work);
        }
        // The other threads are woken once per pass (by the broadcast) rather than once per op; the pass's own
        // thread skips its copy, which it meets only when it looks for work.
        let running = Arc::new(AtomicBool::new(true));
        self.pool.install(|| {
            let owner = rayon::current_thread_index();
            let helpers = running.clone();
            self.pool.spawn_broadcast(move |thread| {
                if Some(thread.index()) != owner {
                    stay_awake(&helpers);
                }
            });
            let result = work();
            running.store(false, Ordering::Release);
            result
        })
    }

    fn describe(&self) -> String {
        let weights = if self.int8 { ", int8 weights" } else { "" };
        format!("cpu ({} threads{weights})", self.pool.current_num_threads())
    }

    fn memory_use(&self) -> Option<(u64, u64)> {
        use crate::core::telemetry::{machine_memory_bytes, resident_bytes};
        Some((resident_bytes(std::process::id())?, machine_memory_bytes()?))
    }

    fn vector(&self, data: &[f32]) -> Op<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn zeros(&self, len: usize) -> Op<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn matrix(&self, tensor: HostTensor) -> Op<CpuMatrix> {
        let rows = tensor.shape.first().copied().unwrap_or(1);
        let cols = tensor.shape.iter().skip(1).product::<usize>().max(1);
        let data = match tensor.data {
            data if self.int8 => {
                let quantized = int8::Int8Rows::quantize(rows, cols, &data);
                match int8::PackedInt8::available() {
                    true => Weights::PackedInt8(int8::PackedInt8::pack(&quantized, rows, cols)),
                    false => Weights::Int8(quantized),
                }
            }
            HostData::Bf16(values) if self.bf16_activations => Weights::Packed(PackedBf16::pack(rows, cols, &values)),
            data => Weights::Rows(data),
        };
        Ok(CpuMatrix { rows, cols, data })
    }

    fn matrix_bytes(&self, tensor: &HostTensor) -> u64 {
        match self.int8 {
            // A byte per weight and an f32 scale per row.
            true => (tensor.data.len() + 4 * tensor.shape.first().copied().unwrap_or(1)) as u64,
            false => tensor.data.byte_len() as u64,
        }
    }

    fn kv_dtype(&self, bf16_weights: bool) -> KvDtype {
        if bf16_weights && self.bf16_kv { KvDtype::Bf16 } else { KvDtype::F32 }
    }

    fn pages(&self, num_pages: usize, page_len: usize, dtype: KvDtype) -> Op<CpuPages> {
        Ok(match dtype {
            // Zeroed by the kernel as pages are first touched: nothing is committed at start.
            KvDtype::F32 => CpuPages::F32(PageMemory::zeroed(num_pages * page_len)?),
            KvDtype::Bf16 => CpuPages::Bf16(PageMemory::zeroed(num_pages * page_len)?),
        })
    }

    fn page_memory(&self, pages: &CpuPages) -> Option<std::sync::Arc<Region>> {
        Some(match pages {
            CpuPages::F32(memory) => memory.region.clone(),
            CpuPages::Bf16(memory) => memory.region.clone(),
        })
    }

    fn to_host(&self, v: &Vec<f32>) -> Op<Vec<f32>> {
        Ok(v.clone())
    }

    fn embedding(&self, table: &CpuMatrix, ids: &[u32], out: &mut Vec<f32>) -> Op {
        let cols = table.cols;
        out.clear();
        out.reserve(ids.len() * cols);
        for &id in ids {
            let at = (id as usize).min(table.rows.saturating_sub(1)) * cols;
            match &table.data {
                Weights::Rows(HostData::F32(v)) => out.extend_from_slice(&v[at..at + cols]),
                Weights::Rows(HostData::Bf16(v)) => out.extend(v[at..at + cols].iter().map(|x| x.to_f32())),
                Weights::Packed(packed) => out.extend(packed.row(at / cols).map(|x| x.to_f32())),
                Weights::Int8(q) => out.extend(q.row(at / cols, cols)),
                Weights::PackedInt8(packed) => out.extend(packed.row(at / cols)),
            }
        }
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, w: &CpuMatrix, bias: Option<&Vec<f32>>, out: &mut Vec<f32>) -> Op {
        let n = x.len() / w.cols;
        match &w.data {
            _ if n == 0 => out.clear(),
            weights @ (Weights::Packed(_) | Weights::PackedInt8(_)) => {
                if let Some(panels) = Panels::of(weights) {
                    self.packed_matmuls(x, &mut [(panels, out)]);
                }
            }
            weights if n >= GEMM_MIN_ROWS => self.gemm(x, weights, w.rows, w.cols, out),
            weights => self.gemv(x, weights, w.rows, w.cols, out),
        }
        add_bias(out, w.rows, bias);
        Ok(())
    }

    fn matmuls(&self, x: &Vec<f32>, products: &mut [Product<'_, Self>]) -> Op {
        let cols = products.first().map_or(0, |p| p.weight.cols);
        let packed: Option<Vec<Panels<'_>>> =
            products.iter().map(|p| Panels::of(&p.weight.data).filter(|_| p.weight.cols == cols)).collect();
        let Some(packed) = packed else {
            for product in products {
                self.matmul(x, product.weight, product.bias, product.out)?;
            }
            return Ok(());
        };
        let mut pairs: Vec<(Panels<'_>, &mut Vec<f32>)> =
            packed.into_iter().zip(products.iter_mut().map(|p| &mut *p.out)).collect();
        self.packed_matmuls(x, &mut pairs);
        for product in products.iter_mut() {
            add_bias(product.out, product.weight.rows, product.bias);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &Vec<f32>, dim: usize, eps: f32, out: &mut Vec<f32>) -> Op {
        out.clear();
        out.resize(x.len(), 0.0);
        for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let mean_square = math::dot(row, row) / dim as f32;
            let scale = 1.0 / (mean_square + eps).sqrt();
            for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
                *d = v * scale * w;
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, positions: &[u32], heads: usize, head_dim: usize, inv_freq: &[f32]) -> Op {
        let half = head_dim / 2;
        // A poisoned lock only means another rope call panicked mid-update; the angles are recomputed whenever
        // they do not match, so the state inside is still usable.
        let mut angles = self.rope_angles.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        angles.update(positions, inv_freq);
        let rows = x.chunks_exact_mut(heads * head_dim).zip(angles.cos_sin.chunks_exact(inv_freq.len().max(1)));
        for (row, angles) in rows {
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(cos, sin)) in angles.iter().enumerate().take(half) {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos - b * sin;
                    head[i + half] = b * cos + a * sin;
                }
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Op {
        self.pool.install(|| {
            gate.par_chunks_mut(SILU_CHUNK).zip(up.par_chunks(SILU_CHUNK)).for_each(|(gate, up)| {
                #[cfg(target_arch = "x86_64")]
                if kernels::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { silu_mul_avx2(gate, up) };
                }
                silu_mul_chunk(gate, up);
            })
        });
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Op {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, dim: usize, rows: &[usize]) -> Op<Vec<f32>> {
        Ok(rows.iter().flat_map(|&r| x[r * dim..(r + 1) * dim].iter().copied()).collect())
    }

    fn write_rows(&self, x: &mut Vec<f32>, dim: usize, first_row: usize, data: &[f32]) -> Op {
        let target = super::backend::rows_in(x.len(), dim, first_row, data.len())?;
        x[target].copy_from_slice(data);
        Ok(())
    }

    fn write_kv(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        slots: &[u32],
        k_pages: &mut CpuPages,
        v_pages: &mut CpuPages,
    ) -> Op {
        let width = k.len() / slots.len().max(1);
        for (row, &slot) in slots.iter().enumerate() {
            let (src, dst) = (row * width..(row + 1) * width, slot as usize * width..(slot as usize + 1) * width);
            for (pages, values) in [(&mut *k_pages, k), (&mut *v_pages, v)] {
                match pages {
                    CpuPages::F32(pages) => pages[dst.clone()].copy_from_slice(&values[src.clone()]),
                    CpuPages::Bf16(pages) => packed::round_into(&values[src.clone()], &mut pages[dst.clone()]),
                }
            }
        }
        Ok(())
    }

    fn read_pages(&self, pages: &CpuPages, ids: &[u32], page_len: usize) -> Op<Vec<f32>> {
        let page = |id: u32| id as usize * page_len..(id as usize + 1) * page_len;
        Ok(match pages {
            CpuPages::F32(pages) => ids.iter().flat_map(|&id| pages[page(id)].iter().copied()).collect(),
            CpuPages::Bf16(pages) => ids.iter().flat_map(|&id| pages[page(id)].iter().map(|v| v.f32())).collect(),
        })
    }

    fn write_pages(&self, pages: &mut CpuPages, ids: &[u32], page_len: usize, data: &[f32]) -> Op {
        for (&id, values) in ids.iter().zip(data.chunks_exact(page_len)) {
            let page = id as usize * page_len..(id as usize + 1) * page_len;
            match pages {
                CpuPages::F32(pages) => pages[page].copy_from_slice(values),
                CpuPages::Bf16(pages) => packed::round_into(values, &mut pages[page]),
            }
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &Vec<f32>,
        k_pages: &CpuPages,
        v_pages: &CpuPages,
        seqs: &[AttentionSeq],
        shape: &AttentionShape,
        out: &mut Vec<f32>,
    ) -> Op {
        match (k_pages, v_pages) {
            (CpuPages::F32(k), CpuPages::F32(v)) => self.attend_pages(q, k, v, seqs, shape, out),
            (CpuPages::Bf16(k), CpuPages::Bf16(v)) => self.attend_pages(q, k, v, seqs, shape, out),
            _ => return Err(BackendError("K and V pages of different types".into())),
        }
        Ok(())
    }
}

impl CpuBackend {
    fn attend_pages<E: Element>(
        &self,
        q: &[f32],
        k_pages: &[E],
        v_pages: &[E],
        seqs: &[AttentionSeq],
        shape: &AttentionShape,
        out: &mut Vec<f32>,
    ) {
        let row_width = shape.num_heads * shape.head_dim;
        out.clear();
        out.resize(q.len(), 0.0);
        // A bf16 model's prompts go to the tile unit where there is one (the decode step's single row stays on
        // the vector registers: too few queries to pay for laying its context out).
        let tiled: Vec<Option<TiledKv>> = if E::BF16 && TiledKv::usable(shape) {
            self.pool.install(|| {
                seqs.iter().map(|seq| (seq.rows > 1).then(|| TiledKv::pack(k_pages, v_pages, seq, shape))).collect()
            })
        } else {
            seqs.iter().map(|_| None).collect()
        };
        // Blocks of consecutive rows of one sequence, each with its own slice of `out` (the batch lays the
        // sequences' rows out back to back, in order).
        let mut jobs = Vec::new();
        let mut rest: &mut [f32] = out;
        let every_head = 0..shape.num_kv_heads;
        let head_width = row_width / shape.num_kv_heads;
        for (seq, tiled) in seqs.iter().zip(&tiled) {
            let tiled = tiled.as_ref();
            if seq.rows == 1 {
                // A decode step: one job per KV head, so one long context is read by several threads.
                let queries = &q[seq.first_row * row_width..][..row_width];
                let (mut dst, tail) = rest.split_at_mut(row_width);
                rest = tail;
                for kv_head in every_head.clone() {
                    let (heads, others) = dst.split_at_mut(head_width);
                    dst = others;
                    let job = BlockAttention {
                        queries,
                        k_pages,
                        v_pages,
                        seq,
                        first: 0,
                        rows: 1,
                        shape,
                        tiled,
                        kv_heads: kv_head..kv_head + 1,
                    };
                    jobs.push((job, heads));
                }
                continue;
            }
            for first in (0..seq.rows).step_by(ATTENTION_BLOCK) {
                let rows = ATTENTION_BLOCK.min(seq.rows - first);
                let (dst, tail) = rest.split_at_mut(rows * row_width);
                rest = tail;
                let queries = &q[(seq.first_row + first) * row_width..][..rows * row_width];
                let kv_heads = every_head.clone();
                jobs.push((
                    BlockAttention { queries, k_pages, v_pages, seq, first, rows, shape, tiled, kv_heads },
                    dst,
                ));
            }
        }
        self.pool.install(|| {
            jobs.into_par_iter().for_each_init(Vec::new, |scores, (job, dst)| attend(&job, scores, dst));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Passes of several engines sharing one pool, each keeping the pool's other threads awake while it runs
    /// (nested in each other's helpers as work is stolen), all finish with their own results.
    #[test]
    fn passes_sharing_a_pool_all_finish() {
        let backend = Arc::new(CpuBackend::new(2).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        for engine in 0..4u64 {
            let (backend, done) = (backend.clone(), done.clone());
            std::thread::spawn(move || {
                for pass in 0..200u64 {
                    let sum: u64 = backend.run(|| {
                        let first: u64 = (0..2_000u64).into_par_iter().map(|i| i * engine + pass).sum();
                        // Ops install again from inside the pass, as `packed_matmuls` does.
                        first + backend.pool.install(|| (0..500u64).into_par_iter().sum::<u64>())
                    });
                    let expected = engine * (1_999 * 2_000 / 2) + pass * 2_000 + 499 * 500 / 2;
                    assert_eq!(sum, expected, "engine {engine}, pass {pass}");
                }
                let _ = done.send(engine);
            });
        }
        drop(done);
        for _ in 0..4 {
            let engine = finished.recv_timeout(Duration::from_secs(120));
            assert!(engine.is_ok(), "a pass never finished (or failed): {engine:?}");
        }
    }

    /// `matmuls` (one parallel split over every product's panels) gives each product exactly what `matmul` does
    /// alone, biases included; with an f32 matrix among them it falls back to one product at a time.
    #[test]
    fn grouped_products_equal_separate_ones() {
        let backend = CpuBackend::new(2).unwrap();
        let cols = 36;
        let matrix = |rows: usize, salt: usize, bf16_weights: bool| {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7 + salt) % 13) as f32 / 4.0 - 1.5).collect();
            let data = if bf16_weights {
                HostData::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect())
            } else {
                HostData::F32(w)
            };
            backend.matrix(HostTensor { shape: vec![rows, cols], data }).unwrap()
        };
        let bias = |rows: usize| -> Vec<f32> { (0..rows).map(|i| i as f32 / 8.0).collect() };
        for bf16_last in [true, false] {
            let weights = [matrix(150, 1, true), matrix(32, 2, true), matrix(40, 3, bf16_last)];
            let biases = [Some(bias(150)), None, Some(bias(40))];
            for n in [1, 9, 16, 40] {
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 5) % 9) as f32 / 8.0 - 0.5).collect();
                let mut grouped = [vec![f32::NAN; 3], Vec::new(), Vec::new()];
                let [a, b, c] = &mut grouped;
                let mut products = [
                    Product { weight: &weights[0], bias: biases[0].as_ref(), out: a },
                    Product { weight: &weights[1], bias: biases[1].as_ref(), out: b },
                    Product { weight: &weights[2], bias: biases[2].as_ref(), out: c },
                ];
                backend.matmuls(&x, &mut products).unwrap();
                for ((w, bias), grouped) in weights.iter().zip(&biases).zip(&grouped) {
                    let mut alone = Vec::new();
                    backend.matmul(&x, w, bias.as_ref(), &mut alone).unwrap();
                    assert_eq!(grouped, &alone, "{n} rows, {} features", w.rows);
                }
            }
        }
    }

    /// bf16 weights through `matmul` (the packed product where the CPU has AVX-512 BF16): feature counts that
    /// fill whole panels and one that does not (its padded output rows are compacted), for decode and prefill
    /// row counts. Activations are multiples of 1/8 and weights of 1/4, so bf16 holds them exactly and every
    /// summation order gives the same sum.
    #[test]
    fn bf16_products_are_exact_for_any_feature_count() {
        let backend = CpuBackend::new(2).unwrap();
        let cols = 40;
        for rows in [150, 160] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7) % 13) as f32 / 4.0 - 1.5).collect();
            let tensor = HostTensor {
                shape: vec![rows, cols],
                data: HostData::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
            };
            let matrix = backend.matrix(tensor).unwrap();
            for n in [1, 3, 16, 40] {
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 5) % 9) as f32 / 8.0 - 0.5).collect();
                let mut out = vec![f32::NAN; 7];
                backend.matmul(&x, &matrix, None, &mut out).unwrap();
                assert_eq!(out.len(), n * rows);
                for t in 0..n {
                    for f in 0..rows {
                        let expected: f32 = (0..cols).map(|k| x[t * cols + k] * w[f * cols + k]).sum();
                        assert_eq!(out[t * rows + f], expected, "{rows} features, {n} rows: row {t}, feature {f}");
                    }
                }
            }
        }
    }

    /// int8 weights through `matmul` and `embedding`, for decode rows and prefill rows, on whichever path this
    /// CPU takes (the row layout's int8 × int8 blocks and GEMM on dequantized weights; or the packed layout's
    /// 16-bit activations on the vector unit and bf16 ones on the tile unit): each output is the dot product
    /// with the dequantized row, within what the activations' rounding on that path allows. Weights are whole
    /// multiples of their steps, so quantizing keeps them exactly.
    #[test]
    fn int8_products_equal_products_with_the_dequantized_weights() {
        let backend = CpuBackend::new(2).unwrap().quantized_int8();
        // 43: a tail past the 8- and 16-lane bodies and the 64-value blocks; 96: whole tiles of 32.
        for (rows, cols) in [(150, 43), (7, 43), (40, 96)] {
            // Row r's values are multiples of (r + 1) / 127 up to ±(r + 1): its scale is exactly that step.
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let (r, k) = (i / cols, i % cols);
                    let steps = if k == 0 { 127 } else { ((i * 7) % 255) as i32 - 127 };
                    steps as f32 * (r + 1) as f32 / 127.0
                })
                .collect();
            let matrix =
                backend.matrix(HostTensor { shape: vec![rows, cols], data: HostData::F32(w.clone()) }).unwrap();
            match int8::PackedInt8::available() {
                true => assert!(matches!(matrix.data, Weights::PackedInt8(_))),
                false => assert!(matches!(matrix.data, Weights::Int8(_))),
            }
            for n in [1, 2, 3, 5, 16, 40] {
                // Likewise activations: whole steps of 0.5 / 127, with a full-scale value in each row's first
                // block, so the row layout's int8 activations hold them exactly too.
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| if i % cols == 0 { 127 } else { ((i * 5) % 255) as i32 - 127 })
                    .map(|steps| steps as f32 * 0.5 / 127.0)
                    .collect();
                let mut out = vec![f32::NAN; 3];
                backend.matmul(&x, &matrix, None, &mut out).unwrap();
                assert_eq!(out.len(), n * rows);
                for t in 0..n {
                    for f in 0..rows {
                        let terms = (0..cols).map(|k| (x[t * cols + k], w[f * cols + k]));
                        let expected: f32 = terms.clone().map(|(x, w)| x * w).sum();
                        let rounding = match &matrix.data {
                            // bf16 activations: each within 2⁻⁹ of its value.
                            Weights::PackedInt8(packed) if packed.on_tiles(n) => {
                                terms.map(|(x, w)| (x * w).abs()).sum::<f32>() / 256.0
                            }
                            // 16-bit activations: each within half a step of its block's largest (0.5) / 32767.
                            Weights::PackedInt8(_) => terms.map(|(_, w)| w.abs()).sum::<f32>() * 0.5 / 65534.0,
                            _ => 0.0,
                        };
                        let got = out[t * rows + f];
                        assert!(
                            (got - expected).abs() <= rounding + 1e-4 * (1.0 + expected.abs()),
                            "{rows}x{cols}, {n} rows: {t},{f}: {got} vs {expected}"
                        );
                    }
                }
            }
            let mut looked_up = Vec::new();
            backend.embedding(&matrix, &[1, 0], &mut looked_up).unwrap();
            let expected: Vec<f32> = w[cols..2 * cols].iter().chain(&w[..cols]).copied().collect();
            for (got, want) in looked_up.iter().zip(&expected) {
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{got} vs {want}");
            }
        }
        // What it streams per token: a byte per weight and a scale per row.
        let tensor = HostTensor { shape: vec![10, 20], data: HostData::F32(vec![0.5; 200]) };
        assert_eq!(backend.matrix_bytes(&tensor), 200 + 40);
    }
}
