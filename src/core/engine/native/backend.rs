//! The op-level seam between the model and the hardware. The model is written once against `Backend`;
//! the CPU implementation is `cpu`, a CUDA one slots in beside it. Index arguments (token ids, positions,
//! slots, block tables) are host slices: a device backend uploads them once per step.
use super::host::{self, Activation};
use super::weights::HostTensor;

/// Where one sequence's tokens sit in a step's batch and where its KV lives.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSeq {
    /// First row of this sequence in the batch.
    pub first_row: usize,
    pub rows: usize,
    /// Position of the first row; row `i` attends to positions `0..=first_position + i`.
    pub first_position: usize,
    /// Page of each block of positions.
    pub block_table: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// What KV pages hold. bf16 halves their memory and the bytes attention reads; a bf16 checkpoint's K and V
/// come out of bf16 weights, so its cache keeps them in bf16 (vLLM's default, `--kv-cache-dtype auto`, does
/// the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

/// A device failure (allocation, launch, copy). The CPU backend never fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

pub type Op<T = ()> = Result<T, BackendError>;

/// One of several products of the same activations (see `Backend::matmuls`).
pub struct Product<'a, B: Backend + ?Sized> {
    pub weight: &'a B::Matrix,
    pub bias: Option<&'a B::Vector>,
    pub out: &'a mut B::Vector,
}

pub trait Backend: Send + Sync + 'static {
    /// f32 activations, norms and biases.
    type Vector: Send + Sync;
    /// A weight matrix `[rows = out features, cols = in features]` in its storage type.
    type Matrix: Send + Sync;
    /// One layer's K or V pages: `[page, slot in page, kv head, head_dim]`.
    type Pages: Send + Sync;

    fn describe(&self) -> String;

    /// Bytes its device has in use and has in all: the GPU's memory, or on the CPU this process's resident
    /// memory and the machine's.
    fn memory_use(&self) -> Option<(u64, u64)> {
        None
    }
    /// Runs a whole forward pass; the CPU backend runs it on one of its own threads, so each op's parallel
    /// split starts there instead of waking the pool from outside and sleeping until it finishes.
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }
    fn vector(&self, data: &[f32]) -> Op<Self::Vector>;
    fn zeros(&self, len: usize) -> Op<Self::Vector>;
    fn matrix(&self, tensor: HostTensor) -> Op<Self::Matrix>;
    /// Bytes `matrix(tensor)` will hold, which a decode step streams: the checkpoint's unless the backend
    /// stores it otherwise (quantized).
    fn matrix_bytes(&self, tensor: &HostTensor) -> u64 {
        tensor.data.byte_len() as u64
    }
    /// What this backend's KV pages hold for a model whose weights are bf16 (`bf16_weights`) or not.
    fn kv_dtype(&self, bf16_weights: bool) -> KvDtype {
        let _ = bf16_weights;
        KvDtype::F32
    }
    fn pages(&self, num_pages: usize, page_len: usize, dtype: KvDtype) -> Op<Self::Pages>;
    /// The memory `pages` live in, for a transfer agent to register, so KV blocks move straight into and out
    /// of them; `None` where the backend cannot hand it out (device memory awaits the CUDA transfer seam).
    fn page_memory(&self, pages: &Self::Pages) -> Option<std::sync::Arc<crate::core::transfer::Region>> {
        let _ = pages;
        None
    }
    fn to_host(&self, v: &Self::Vector) -> Op<Vec<f32>>;

    /// `out[i] = table[ids[i]]`.
    fn embedding(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Vector) -> Op;
    /// `out[n × rows] = x[n × cols] · wᵀ (+ bias)`. Like every op, it resizes `out` as needed.
    fn matmul(&self, x: &Self::Vector, w: &Self::Matrix, bias: Option<&Self::Vector>, out: &mut Self::Vector) -> Op;
    /// `matmul` of the same `x` by each weight (a layer's q/k/v, or its gate and up). A backend may run them as
    /// one: the CPU splits all their output features over its threads at once, instead of waiting for the
    /// slowest thread after each.
    fn matmuls(&self, x: &Self::Vector, products: &mut [Product<'_, Self>]) -> Op {
        for product in products {
            self.matmul(x, product.weight, product.bias, product.out)?;
        }
        Ok(())
    }
    /// Root-mean-square norm of every `dim`-long row.
    fn rms_norm(&self, x: &Self::Vector, weight: &Self::Vector, dim: usize, eps: f32, out: &mut Self::Vector) -> Op;
    /// Rotary embedding in place on `[rows, heads, head_dim]`, rotating half against half.
    fn rope(&self, x: &mut Self::Vector, positions: &[u32], heads: usize, head_dim: usize, inv_freq: &[f32]) -> Op;
    /// `gate = silu(gate) · up`.
    fn silu_mul(&self, gate: &mut Self::Vector, up: &Self::Vector) -> Op;
    /// `x += y`.
    fn add(&self, x: &mut Self::Vector, y: &Self::Vector) -> Op;
    /// Picks rows `rows` of a `[_, dim]` matrix.
    fn gather_rows(&self, x: &Self::Vector, dim: usize, rows: &[usize]) -> Op<Self::Vector>;
    /// Overwrites rows `first_row..` of a `[_, dim]` matrix with `data`: an image's embeddings in place of what
    /// its placeholder tokens looked up.
    fn write_rows(&self, x: &mut Self::Vector, dim: usize, first_row: usize, data: &[f32]) -> Op {
        let mut rows = self.to_host(x)?;
        let target = rows_in(rows.len(), dim, first_row, data.len())?;
        rows[target].copy_from_slice(data);
        *x = self.vector(&rows)?;
        Ok(())
    }
    /// Layer norm with a bias over every `dim`-long row (vision encoders; `host` says why on the host).
    fn layer_norm(
        &self,
        x: &Self::Vector,
        weight: &Self::Vector,
        bias: &Self::Vector,
        dim: usize,
        eps: f32,
        out: &mut Self::Vector,
    ) -> Op {
        let (x, weight, bias) = (self.to_host(x)?, self.to_host(weight)?, self.to_host(bias)?);
        *out = self.vector(&host::layer_norm(&x, &weight, &bias, dim, eps))?;
        Ok(())
    }
    /// An activation in place.
    fn activate(&self, x: &mut Self::Vector, activation: Activation) -> Op {
        let mut values = self.to_host(x)?;
        host::activate(&mut values, activation);
        *x = self.vector(&values)?;
        Ok(())
    }
    /// Attention of every position over every position of its own `seq_len`-long sequence, unmasked.
    #[allow(clippy::too_many_arguments)]
    fn bidirectional_attention(
        &self,
        q: &Self::Vector,
        k: &Self::Vector,
        v: &Self::Vector,
        seq_len: usize,
        heads: usize,
        head_dim: usize,
        out: &mut Self::Vector,
    ) -> Op {
        let (q, k, v) = (self.to_host(q)?, self.to_host(k)?, self.to_host(v)?);
        *out = self.vector(&host::bidirectional_attention(&q, &k, &v, seq_len, heads, head_dim))?;
        Ok(())
    }
    /// Stores each row's K and V (`[rows, kv heads, head_dim]`) at its slot (`page · block_size + offset`).
    fn write_kv(
        &self,
        k: &Self::Vector,
        v: &Self::Vector,
        slots: &[u32],
        k_pages: &mut Self::Pages,
        v_pages: &mut Self::Pages,
    ) -> Op;
    /// Copies whole pages (`page_len` values each) out to the host, in the order of `ids`.
    fn read_pages(&self, pages: &Self::Pages, ids: &[u32], page_len: usize) -> Op<Vec<f32>>;
    /// Overwrites pages `ids` with `data` (as `read_pages` returned it).
    fn write_pages(&self, pages: &mut Self::Pages, ids: &[u32], page_len: usize, data: &[f32]) -> Op;
    /// Causal attention of every row's query over its sequence's paged K/V (which already holds this step's rows).
    fn paged_attention(
        &self,
        q: &Self::Vector,
        k_pages: &Self::Pages,
        v_pages: &Self::Pages,
        seqs: &[AttentionSeq],
        shape: &AttentionShape,
        out: &mut Self::Vector,
    ) -> Op;
}

/// The values `data_len` values written from row `first_row` of a `[_, dim]` matrix of `len` values cover.
pub fn rows_in(len: usize, dim: usize, first_row: usize, data_len: usize) -> Op<std::ops::Range<usize>> {
    let start = first_row.saturating_mul(dim);
    match start.checked_add(data_len) {
        Some(end) if end <= len && data_len.is_multiple_of(dim.max(1)) => Ok(start..end),
        _ => Err(BackendError(format!(
            "{data_len} values from row {first_row} do not fit a matrix of {len} values in rows of {dim}"
        ))),
    }
}
