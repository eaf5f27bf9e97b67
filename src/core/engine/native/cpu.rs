//! The CPU backend: f32 activations, weights in f32 or bf16 (converted per element inside the dot product,
//! so decode streams half the bytes), KV pages in f32. Work is split over a rayon pool sized by `--threads`;
//! rayon's idle workers sleep instead of spinning, which matters when several workers share a small box.
use super::backend::{AttentionSeq, AttentionShape, Backend};
use super::weights::{HostData, HostTensor};
use rayon::prelude::*;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
}

impl CpuBackend {
    pub fn new(threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("dynamo-cpu-{i}"))
            .build()?;
        Ok(Self { pool })
    }
}

pub struct CpuMatrix {
    rows: usize,
    cols: usize,
    data: HostData,
}

/// Output features one task computes: small enough to spread a decode step over every thread, large enough
/// that scheduling costs little next to `TILE × cols` multiply-adds.
const TILE: usize = 16;

impl Backend for CpuBackend {
    type Vector = Vec<f32>;
    type Matrix = CpuMatrix;
    type Pages = Vec<f32>;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.pool.current_num_threads())
    }

    fn vector(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn matrix(&self, tensor: HostTensor) -> CpuMatrix {
        let rows = tensor.shape.first().copied().unwrap_or(1);
        let cols = tensor.shape.iter().skip(1).product::<usize>().max(1);
        CpuMatrix { rows, cols, data: tensor.data }
    }

    fn pages(&self, num_pages: usize, page_len: usize) -> Vec<f32> {
        vec![0.0; num_pages * page_len]
    }

    fn to_host(&self, v: &Vec<f32>) -> Vec<f32> {
        v.clone()
    }

    fn embedding(&self, table: &CpuMatrix, ids: &[u32], out: &mut Vec<f32>) {
        let cols = table.cols;
        out.clear();
        out.reserve(ids.len() * cols);
        for &id in ids {
            let at = (id as usize).min(table.rows.saturating_sub(1)) * cols;
            match &table.data {
                HostData::F32(v) => out.extend_from_slice(&v[at..at + cols]),
                HostData::Bf16(v) => out.extend(v[at..at + cols].iter().map(|x| x.to_f32())),
            }
        }
    }

    fn matmul(&self, x: &Vec<f32>, w: &CpuMatrix, bias: Option<&Vec<f32>>, out: &mut Vec<f32>) {
        let (rows, cols) = (w.rows, w.cols);
        let n = x.len() / cols;
        let tiles: Vec<Vec<f32>> = self.pool.install(|| {
            (0..rows.div_ceil(TILE))
                .into_par_iter()
                .map(|tile| {
                    let features = tile * TILE..((tile + 1) * TILE).min(rows);
                    let mut block = Vec::with_capacity(n * features.len());
                    for token in x.chunks_exact(cols) {
                        for f in features.clone() {
                            let row = f * cols..(f + 1) * cols;
                            let dot = match &w.data {
                                HostData::F32(v) => dot_f32(token, &v[row]),
                                HostData::Bf16(v) => dot_bf16(token, &v[row]),
                            };
                            block.push(dot + bias.map_or(0.0, |b| b[f]));
                        }
                    }
                    block
                })
                .collect()
        });
        out.clear();
        out.resize(n * rows, 0.0);
        for (tile, block) in tiles.iter().enumerate() {
            let first = tile * TILE;
            let width = block.len() / n.max(1);
            for (token, values) in block.chunks_exact(width.max(1)).enumerate() {
                out[token * rows + first..token * rows + first + width].copy_from_slice(values);
            }
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &Vec<f32>, dim: usize, eps: f32, out: &mut Vec<f32>) {
        out.clear();
        out.resize(x.len(), 0.0);
        for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let scale = 1.0 / (mean_square + eps).sqrt();
            for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
                *d = v * scale * w;
            }
        }
    }

    fn rope(&self, x: &mut Vec<f32>, positions: &[u32], heads: usize, head_dim: usize, inv_freq: &[f32]) {
        let half = head_dim / 2;
        for (row, &position) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
            let angles: Vec<(f32, f32)> =
                inv_freq.iter().map(|f| (position as f32 * f).sin_cos()).map(|(s, c)| (c, s)).collect();
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(cos, sin)) in angles.iter().enumerate().take(half) {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos - b * sin;
                    head[i + half] = b * cos + a * sin;
                }
            }
        }
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }

    fn gather_rows(&self, x: &Vec<f32>, dim: usize, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&r| x[r * dim..(r + 1) * dim].iter().copied()).collect()
    }

    fn write_kv(&self, k: &Vec<f32>, v: &Vec<f32>, slots: &[u32], k_pages: &mut Vec<f32>, v_pages: &mut Vec<f32>) {
        let width = k.len() / slots.len().max(1);
        for (row, &slot) in slots.iter().enumerate() {
            let (src, dst) = (row * width..(row + 1) * width, slot as usize * width..(slot as usize + 1) * width);
            k_pages[dst.clone()].copy_from_slice(&k[src.clone()]);
            v_pages[dst].copy_from_slice(&v[src]);
        }
    }

    fn paged_attention(
        &self,
        q: &Vec<f32>,
        k_pages: &Vec<f32>,
        v_pages: &Vec<f32>,
        seqs: &[AttentionSeq],
        shape: &AttentionShape,
        out: &mut Vec<f32>,
    ) {
        let AttentionShape { num_heads, num_kv_heads, head_dim, block_size } = *shape;
        let group = num_heads / num_kv_heads;
        let kv_width = num_kv_heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let rows: Vec<(&AttentionSeq, usize)> = seqs.iter().flat_map(|s| (0..s.rows).map(move |r| (s, r))).collect();
        out.clear();
        out.resize(q.len(), 0.0);
        self.pool.install(|| {
            out.par_chunks_mut(num_heads * head_dim).zip(&rows).for_each(|(dst, &(seq, r))| {
                let row = seq.first_row + r;
                let context = seq.first_position + r + 1;
                let slot = |p: usize| seq.block_table[p / block_size] as usize * block_size + p % block_size;
                let mut scores = vec![0.0f32; context];
                for (head, dst) in dst.chunks_exact_mut(head_dim).enumerate() {
                    let kv_head = head / group;
                    let query = &q[(row * num_heads + head) * head_dim..][..head_dim];
                    let mut max = f32::NEG_INFINITY;
                    for (p, score) in scores.iter_mut().enumerate() {
                        let key = &k_pages[slot(p) * kv_width + kv_head * head_dim..][..head_dim];
                        *score = dot_f32(query, key) * scale;
                        max = max.max(*score);
                    }
                    let mut total = 0.0;
                    for score in scores.iter_mut() {
                        *score = (*score - max).exp();
                        total += *score;
                    }
                    dst.fill(0.0);
                    for (p, &weight) in scores.iter().enumerate() {
                        let value = &v_pages[slot(p) * kv_width + kv_head * head_dim..][..head_dim];
                        let weight = weight / total;
                        for (d, v) in dst.iter_mut().zip(value) {
                            *d += weight * v;
                        }
                    }
                }
            })
        });
    }
}

/// Eight independent accumulators so the compiler can keep them in vector registers.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn dot_bf16(a: &[f32], b: &[half::bf16]) -> f32 {
    let widen = |x: half::bf16| f32::from_bits(u32::from(x.to_bits()) << 16);
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * widen(*y)).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * widen(y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}
