//! The CUDA backend, through cudarc with every NVIDIA library loaded at run time: the binary builds and
//! starts without a CUDA toolkit and uses a GPU when one is present. Kernels (`kernels.cu`) are compiled by
//! NVRTC when the backend starts; matrix products go to cuBLAS (weights widened to f32 on upload for now, so
//! results can be compared with the CPU backend to float rounding).
//!
//! cudarc panics, rather than returning an error, when a library is missing, so `CudaBackend::new` checks
//! each one first and says which is absent.
use super::backend::{AttentionSeq, AttentionShape, Backend, BackendError, KvDtype, Op};
use super::weights::HostTensor;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

pub const KERNELS: &str = include_str!("kernels.cu");
/// Every kernel in `KERNELS`, each loaded by name.
pub const KERNEL_NAMES: [&str; 10] = [
    "embedding",
    "rms_norm",
    "rope",
    "silu_mul",
    "add",
    "add_bias",
    "gather_rows",
    "write_kv",
    "copy_pages",
    "paged_attention",
];

/// Which CUDA libraries this process can load, checked without touching cudarc's panicking loaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaLibraries {
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
}

impl CudaLibraries {
    pub fn probe() -> Self {
        // SAFETY: these only try to dlopen the library names; nothing is called.
        unsafe {
            Self {
                driver: cudarc::driver::sys::is_culib_present(),
                nvrtc: cudarc::nvrtc::sys::is_culib_present(),
                cublas: cudarc::cublas::sys::is_culib_present(),
            }
        }
    }

    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.driver {
            missing.push("libcuda.so (the NVIDIA driver)");
        }
        if !self.nvrtc {
            missing.push("libnvrtc.so.12 (pip install nvidia-cuda-nvrtc-cu12, or a CUDA 12 toolkit)");
        }
        if !self.cublas {
            missing.push("libcublas.so.12 (pip install nvidia-cublas-cu12, or a CUDA 12 toolkit)");
        }
        missing
    }
}

/// Compiles every kernel to PTX (needs only NVRTC, no GPU).
pub fn compile_kernels() -> Result<cudarc::nvrtc::Ptx, BackendError> {
    if !CudaLibraries::probe().nvrtc {
        return Err(BackendError("NVRTC is not installed: libnvrtc.so.12 was not found".into()));
    }
    cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| BackendError(format!("NVRTC could not compile the kernels: {e}")))
}

struct Kernels {
    embedding: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    add: CudaFunction,
    add_bias: CudaFunction,
    gather_rows: CudaFunction,
    write_kv: CudaFunction,
    copy_pages: CudaFunction,
    paged_attention: CudaFunction,
}

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    ordinal: usize,
    /// The device's name as the driver gives it (empty when it would not).
    name: String,
}

pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    data: CudaSlice<f32>,
}

fn device_error(e: impl std::fmt::Display) -> BackendError {
    BackendError(format!("CUDA: {e}"))
}

/// Threads per block for row-wise kernels (a power of two, as `rms_norm` needs).
const ROW_THREADS: u32 = 256;

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        let missing = CudaLibraries::probe().missing();
        if !missing.is_empty() {
            return Err(BackendError(format!("cannot use CUDA, missing: {}", missing.join(", "))));
        }
        let count = CudaContext::device_count().map_err(device_error)?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError(format!("there is no cuda:{ordinal}; this machine has {count} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_error)?;
        let stream = ctx.default_stream();
        let module = ctx.load_module(compile_kernels()?).map_err(device_error)?;
        let load = |name: &str| module.load_function(name).map_err(device_error);
        let kernels = Kernels {
            embedding: load("embedding")?,
            rms_norm: load("rms_norm")?,
            rope: load("rope")?,
            silu_mul: load("silu_mul")?,
            add: load("add")?,
            add_bias: load("add_bias")?,
            gather_rows: load("gather_rows")?,
            write_kv: load("write_kv")?,
            copy_pages: load("copy_pages")?,
            paged_attention: load("paged_attention")?,
        };
        let blas = CudaBlas::new(stream.clone()).map_err(device_error)?;
        let name = ctx.name().unwrap_or_default();
        Ok(Self { stream, blas, kernels, ordinal, name })
    }

    fn upload_u32(&self, values: &[u32]) -> Op<CudaSlice<u32>> {
        // A zero-length device buffer cannot be allocated; kernels never read it then.
        let values: &[u32] = if values.is_empty() { &[0] } else { values };
        self.stream.clone_htod(values).map_err(device_error)
    }

    /// Makes `out` exactly `len` long (reallocating only when the length changes).
    fn ensure(&self, out: &mut CudaSlice<f32>, len: usize) -> Op {
        if out.len() != len {
            *out = self.stream.alloc_zeros::<f32>(len.max(1)).map_err(device_error)?;
        }
        Ok(())
    }

    fn elementwise(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block per row; callers return early when there are no rows.
    fn rows(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: ROW_THREADS * 4,
        }
    }
}

impl Backend for CudaBackend {
    type Vector = CudaSlice<f32>;
    type Matrix = CudaMatrix;
    type Pages = CudaSlice<f32>;

    fn describe(&self) -> String {
        format!("cuda:{} {}", self.ordinal, self.name).trim_end().to_string()
    }

    fn memory_use(&self) -> Option<(u64, u64)> {
        let (free, total) = self.stream.context().mem_get_info().ok()?;
        Some(((total - free.min(total)) as u64, total as u64))
    }

    fn vector(&self, data: &[f32]) -> Op<CudaSlice<f32>> {
        if data.is_empty() {
            return self.zeros(0);
        }
        self.stream.clone_htod(data).map_err(device_error)
    }

    fn zeros(&self, len: usize) -> Op<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(device_error)
    }

    fn matrix(&self, tensor: HostTensor) -> Op<CudaMatrix> {
        let rows = tensor.shape.first().copied().unwrap_or(1);
        let cols = tensor.shape.iter().skip(1).product::<usize>().max(1);
        Ok(CudaMatrix { rows, cols, data: self.vector(&tensor.data.to_f32())? })
    }

    fn pages(&self, num_pages: usize, page_len: usize, dtype: KvDtype) -> Op<CudaSlice<f32>> {
        if dtype != KvDtype::F32 {
            return Err(BackendError(format!("the CUDA backend keeps KV pages in f32, not {dtype:?}")));
        }
        self.zeros(num_pages * page_len)
    }

    fn to_host(&self, v: &CudaSlice<f32>) -> Op<Vec<f32>> {
        self.stream.clone_dtoh(v).map_err(device_error)
    }

    fn embedding(&self, table: &CudaMatrix, ids: &[u32], out: &mut CudaSlice<f32>) -> Op {
        self.ensure(out, ids.len() * table.cols)?;
        if ids.is_empty() {
            return Ok(());
        }
        let ids = self.upload_u32(ids)?;
        let (cols, vocab) = (table.cols as i32, table.rows as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding);
        launch.arg(&table.data).arg(&ids).arg(&mut *out).arg(&cols).arg(&vocab);
        // SAFETY: argument types and order match `embedding` in kernels.cu; buffers hold rows × cols.
        unsafe { launch.launch(Self::rows(ids.len())) }.map(drop).map_err(device_error)
    }

    fn matmul(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaMatrix,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
    ) -> Op {
        let n = x.len() / w.cols;
        self.ensure(out, n * w.rows)?;
        if n == 0 {
            return Ok(());
        }
        // Row-major out (n × rows) is column-major (rows × n) = Wᵀᵀ… i.e. op(W) · x with W read transposed.
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: w.rows as i32,
            n: n as i32,
            k: w.cols as i32,
            alpha: 1.0f32,
            lda: w.cols as i32,
            ldb: w.cols as i32,
            beta: 0.0f32,
            ldc: w.rows as i32,
        };
        // SAFETY: the dimensions and leading dimensions describe exactly the three buffers' extents.
        unsafe { self.blas.gemm(config, &w.data, x, &mut *out) }.map_err(device_error)?;
        if let Some(bias) = bias {
            let (total, width) = ((n * w.rows) as i64, w.rows as i32);
            let mut launch = self.stream.launch_builder(&self.kernels.add_bias);
            launch.arg(&mut *out).arg(bias).arg(&total).arg(&width);
            // SAFETY: matches `add_bias`; `out` holds n × rows values, `bias` rows.
            unsafe { launch.launch(Self::elementwise(n * w.rows)) }.map_err(device_error)?;
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        dim: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Op {
        let rows = x.len() / dim;
        self.ensure(out, rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let dim = dim as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.rms_norm);
        launch.arg(x).arg(weight).arg(&mut *out).arg(&dim).arg(&eps);
        // SAFETY: matches `rms_norm`; shared memory holds ROW_THREADS floats.
        unsafe { launch.launch(Self::rows(rows)) }.map(drop).map_err(device_error)
    }

    fn rope(&self, x: &mut CudaSlice<f32>, positions: &[u32], heads: usize, head_dim: usize, inv_freq: &[f32]) -> Op {
        if positions.is_empty() {
            return Ok(());
        }
        let positions = self.upload_u32(positions)?;
        let inv_freq = self.vector(inv_freq)?;
        let (heads, head_dim) = (heads as i32, head_dim as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.rope);
        launch.arg(x).arg(&positions).arg(&inv_freq).arg(&heads).arg(&head_dim);
        // SAFETY: matches `rope`; x holds rows × heads × head_dim.
        unsafe { launch.launch(Self::rows(positions.len())) }.map(drop).map_err(device_error)
    }

    fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Op {
        let n = gate.len().min(up.len()) as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.silu_mul);
        launch.arg(gate).arg(up).arg(&n);
        // SAFETY: matches `silu_mul`; both hold n values.
        unsafe { launch.launch(Self::elementwise(n as usize)) }.map(drop).map_err(device_error)
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Op {
        let n = x.len().min(y.len()) as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.add);
        launch.arg(x).arg(y).arg(&n);
        // SAFETY: matches `add`; both hold at least n values.
        unsafe { launch.launch(Self::elementwise(n as usize)) }.map(drop).map_err(device_error)
    }

    fn gather_rows(&self, x: &CudaSlice<f32>, dim: usize, rows: &[usize]) -> Op<CudaSlice<f32>> {
        let mut out = self.zeros(rows.len() * dim)?;
        if rows.is_empty() {
            return Ok(out);
        }
        let indices: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let indices = self.upload_u32(&indices)?;
        let dim = dim as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.gather_rows);
        launch.arg(x).arg(&indices).arg(&mut out).arg(&dim);
        // SAFETY: matches `gather_rows`; every index is a row of x.
        unsafe { launch.launch(Self::rows(rows.len())) }.map_err(device_error)?;
        Ok(out)
    }

    fn write_kv(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        slots: &[u32],
        k_pages: &mut CudaSlice<f32>,
        v_pages: &mut CudaSlice<f32>,
    ) -> Op {
        if slots.is_empty() {
            return Ok(());
        }
        let width = (k.len() / slots.len()) as i32;
        let slots_device = self.upload_u32(slots)?;
        let mut launch = self.stream.launch_builder(&self.kernels.write_kv);
        launch.arg(k).arg(v).arg(&slots_device).arg(&mut *k_pages).arg(&mut *v_pages).arg(&width);
        // SAFETY: matches `write_kv`; every slot lies inside the pages.
        unsafe { launch.launch(Self::rows(slots.len())) }.map(drop).map_err(device_error)
    }

    fn read_pages(&self, pages: &CudaSlice<f32>, ids: &[u32], page_len: usize) -> Op<Vec<f32>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut staging = self.zeros(ids.len() * page_len)?;
        let (from, to) = (self.upload_u32(ids)?, self.upload_u32(&(0..ids.len() as u32).collect::<Vec<_>>())?);
        let page_len_arg = page_len as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.copy_pages);
        launch.arg(pages).arg(&mut staging).arg(&from).arg(&to).arg(&page_len_arg);
        // SAFETY: matches `copy_pages`; ids are pages of `pages`, staging holds ids.len() pages.
        unsafe { launch.launch(Self::rows(ids.len())) }.map_err(device_error)?;
        self.to_host(&staging)
    }

    fn write_pages(&self, pages: &mut CudaSlice<f32>, ids: &[u32], page_len: usize, data: &[f32]) -> Op {
        if ids.is_empty() {
            return Ok(());
        }
        let staging = self.vector(data)?;
        let (from, to) = (self.upload_u32(&(0..ids.len() as u32).collect::<Vec<_>>())?, self.upload_u32(ids)?);
        let page_len_arg = page_len as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.copy_pages);
        launch.arg(&staging).arg(&mut *pages).arg(&from).arg(&to).arg(&page_len_arg);
        // SAFETY: matches `copy_pages`; ids are pages of `pages`, staging holds ids.len() pages.
        unsafe { launch.launch(Self::rows(ids.len())) }.map(drop).map_err(device_error)
    }

    fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        k_pages: &CudaSlice<f32>,
        v_pages: &CudaSlice<f32>,
        seqs: &[AttentionSeq],
        shape: &AttentionShape,
        out: &mut CudaSlice<f32>,
    ) -> Op {
        self.ensure(out, q.len())?;
        let (mut context, mut table_at, mut tables) = (Vec::new(), Vec::new(), Vec::new());
        for seq in seqs {
            let offset = tables.len() as u32;
            tables.extend_from_slice(&seq.block_table);
            for r in 0..seq.rows {
                context.push((seq.first_position + r + 1) as u32);
                table_at.push(offset);
            }
        }
        if context.is_empty() {
            return Ok(());
        }
        let rows = context.len();
        let (context, table_at, tables) =
            (self.upload_u32(&context)?, self.upload_u32(&table_at)?, self.upload_u32(&tables)?);
        let threads = shape.head_dim.next_power_of_two() as u32;
        let (heads, kv_heads, head_dim, block) =
            (shape.num_heads as i32, shape.num_kv_heads as i32, shape.head_dim as i32, shape.block_size as i32);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let mut launch = self.stream.launch_builder(&self.kernels.paged_attention);
        launch
            .arg(q)
            .arg(k_pages)
            .arg(v_pages)
            .arg(&context)
            .arg(&table_at)
            .arg(&tables)
            .arg(&mut *out)
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&block)
            .arg(&scale);
        let config = LaunchConfig {
            grid_dim: (rows as u32, shape.num_heads as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: threads * 4,
        };
        // SAFETY: matches `paged_attention`; block tables cover every row's context.
        unsafe { launch.launch(config) }.map(drop).map_err(device_error)
    }
}
