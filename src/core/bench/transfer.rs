//! `dynamo bench transfer`: KV blocks of real model shapes moved between two processes by each transfer
//! backend, against what the same bytes cost by `memcpy` and by raw loopback TCP (one stream and several),
//! measured in the same run.
//!
//! The other process is this binary again (`dynamo bench transfer-target`): an agent with the same regions,
//! and a raw TCP sink. Blocks are scattered over the pages on both sides (a seeded shuffle), as an engine's
//! free list leaves them, so adjacent descriptors rarely merge: with the `layered` layout (the engine's: K
//! and V pages per layer) one block is `2 × layers` descriptors.
use crate::core::transfer::{Agent, AgentSettings, Backend, Descriptor, Direction, Peer, Region, RegionId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A model's KV block: `block_tokens × layers × kv_heads × head_dim × 2 (K, V) × dtype_bytes`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub name: &'static str,
    pub layers: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub block_tokens: u64,
    pub dtype_bytes: u64,
}

pub const SMOLLM2_135M: Shape =
    Shape { name: "SmolLM2-135M", layers: 30, kv_heads: 3, head_dim: 64, block_tokens: 16, dtype_bytes: 2 };
pub const LLAMA_8B: Shape =
    Shape { name: "Llama-3-8B", layers: 32, kv_heads: 8, head_dim: 128, block_tokens: 16, dtype_bytes: 2 };
pub const SHAPES: [Shape; 2] = [SMOLLM2_135M, LLAMA_8B];

impl Shape {
    /// One layer's K (or V) for one block.
    fn page_bytes(&self) -> u64 {
        self.block_tokens * self.kv_heads * self.head_dim * self.dtype_bytes
    }

    pub fn block_bytes(&self) -> u64 {
        self.page_bytes() * 2 * self.layers
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// The engine's: a region of pages per layer for K and one for V; a block is one page in each.
    Layered,
    /// One region, each block's bytes contiguous: the best case.
    Contiguous,
}

impl Layout {
    fn regions(self, shape: &Shape, blocks: u64) -> Vec<u64> {
        match self {
            Layout::Layered => vec![blocks * shape.page_bytes(); 2 * shape.layers as usize],
            Layout::Contiguous => vec![blocks * shape.block_bytes()],
        }
    }

    /// The descriptors of block `block` in regions starting at `first`.
    fn block(self, shape: &Shape, first: RegionId, block: u64) -> Vec<Descriptor> {
        match self {
            Layout::Layered => {
                crate::core::transfer::layered_page(first, 2 * shape.layers as u32, block, shape.page_bytes()).collect()
            }
            Layout::Contiguous => {
                vec![Descriptor { region: first, offset: block * shape.block_bytes(), len: shape.block_bytes() }]
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct TransferBenchSettings {
    /// This binary, started again as the other process.
    pub binary: PathBuf,
    pub blocks: u64,
    pub layout: Layout,
    pub backends: Vec<Backend>,
    pub rounds: usize,
    /// One-block transfers timed for the per-request latency.
    pub latency_requests: usize,
    pub streams: usize,
    /// Both agents keyed with it (`--sealed`).
    pub key: Option<crate::core::trust::ClusterKey>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendResult {
    pub backend: &'static str,
    pub gbps: f64,
    pub descriptors_per_s: f64,
    /// One block, one request: the overhead a transfer adds to a request.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Against memcpy (shm, nixl: same host) or the faster raw TCP (tcp).
    pub vs_reference: f64,
    /// Against NIXL (UCX) on the same regions in the same run, where it was measured.
    pub vs_nixl: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShapeResult {
    pub shape: &'static str,
    pub block_bytes: u64,
    pub blocks: u64,
    pub descriptors: usize,
    pub memcpy_gbps: f64,
    pub raw_tcp_gbps: f64,
    pub raw_tcp_streams_gbps: f64,
    pub streams: usize,
    pub backends: Vec<BackendResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferBenchError {
    #[error("cannot start the target process: {0}")]
    Spawn(std::io::Error),
    #[error("the target process did not get ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Transfer(#[from] crate::core::transfer::TransferError),
    #[error("raw tcp: {0}")]
    Raw(std::io::Error),
    #[error("{backend}: the blocks read back differ from the blocks written")]
    Corrupted { backend: &'static str },
}

/// Registers every shape's regions in `SHAPES` order; returns the first region id of each shape.
fn register_all(
    agent: &Agent,
    layout: Layout,
    blocks: u64,
) -> Result<Vec<RegionId>, crate::core::transfer::RegionError> {
    let mut firsts = Vec::new();
    for shape in &SHAPES {
        let mut first = None;
        for len in layout.regions(shape, blocks) {
            let (id, region) = agent.register(Region::new(len)?);
            // Touched now, so page faults are not part of any timing.
            // SAFETY: no transfer runs yet.
            if let Some(bytes) = unsafe { region.bytes_mut(0, len) } {
                // Every page different, so a page landing in the wrong place shows when it is read back.
                let seed = u64::from(id) * 13;
                bytes.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u64 + (i as u64 >> 12) * 7 + seed) as u8);
            }
            first.get_or_insert(id);
        }
        firsts.push(first.unwrap_or_default());
    }
    Ok(firsts)
}

/// `dynamo bench transfer-target`: an agent with the bench's regions and a raw TCP sink; prints
/// `ready <agent address> <sink address>` and serves until its stdin closes.
/// With `nixl`, its agent also runs NIXL.
pub async fn serve_target(
    layout: Layout,
    blocks: u64,
    nixl: bool,
    key: Option<crate::core::trust::ClusterKey>,
) -> anyhow::Result<()> {
    let backend = nixl.then_some(Backend::Nixl);
    let (agent, _notifications) =
        Agent::start(rand::random(), AgentSettings { backend, ..AgentSettings::loopback(key) })?;
    register_all(&agent, layout, blocks)?;
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("ready {} {}", agent.address(), sink.local_addr()?);
    let sinks = tokio::spawn(async move {
        while let Ok((stream, _)) = sink.accept().await {
            tokio::spawn(raw_sink(stream));
        }
    });
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
    sinks.abort();
    Ok(())
}

/// Reads `len u64` then that many bytes into one reused buffer, and acks with one byte; until EOF.
async fn raw_sink(mut stream: tokio::net::TcpStream) {
    let mut buffer = vec![0u8; 4 << 20];
    while let Ok(mut left) = stream.read_u64().await {
        while left > 0 {
            let n = left.min(buffer.len() as u64) as usize;
            if stream.read_exact(&mut buffer[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        if stream.write_u8(1).await.is_err() {
            return;
        }
    }
}

struct Target {
    child: tokio::process::Child,
    agent: String,
    sink: String,
}

async fn start_target(settings: &TransferBenchSettings) -> Result<Target, TransferBenchError> {
    let layout = match settings.layout {
        Layout::Layered => "layered",
        Layout::Contiguous => "contiguous",
    };
    let nixl = settings.backends.contains(&Backend::Nixl);
    let mut command = tokio::process::Command::new(&settings.binary);
    command.env_remove("DYNAMO_CLUSTER_KEY");
    if let Some(key) = &settings.key {
        command.env("DYNAMO_CLUSTER_KEY", key.to_hex());
    }
    let mut child = command
        .args(["bench", "transfer-target", "--layout", layout, "--blocks", &settings.blocks.to_string()])
        .args(nixl.then_some("--nixl"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(TransferBenchError::Spawn)?;
    let stdout = child.stdout.take().ok_or_else(|| TransferBenchError::NotReady("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| TransferBenchError::NotReady("no answer in 60 s".into()))?
        .map_err(|e| TransferBenchError::NotReady(e.to_string()))?
        .ok_or_else(|| TransferBenchError::NotReady("it exited".into()))?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("ready"), Some(agent), Some(sink)) => {
            Ok(Target { agent: agent.to_string(), sink: sink.to_string(), child })
        }
        _ => Err(TransferBenchError::NotReady(format!("it said {line:?}"))),
    }
}

pub async fn run(settings: &TransferBenchSettings) -> Result<Vec<ShapeResult>, TransferBenchError> {
    let mut target = start_target(settings).await?;
    let backend = settings.backends.contains(&Backend::Nixl).then_some(Backend::Nixl);
    let agent_settings =
        AgentSettings { streams: settings.streams, backend, ..AgentSettings::loopback(settings.key.clone()) };
    let (agent, _) = Agent::start(rand::random(), agent_settings)?;
    let firsts =
        register_all(&agent, settings.layout, settings.blocks).map_err(crate::core::transfer::TransferError::from)?;
    let mut peers = Vec::new();
    for &backend in &settings.backends {
        peers.push((backend, agent.connect_using(&target.agent, Some(backend)).await?));
    }
    let mut results = Vec::new();
    for (shape, &first) in SHAPES.iter().zip(&firsts) {
        results.push(measure_shape(settings, &agent, &peers, &target.sink, shape, first).await?);
    }
    drop(target.child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(5), target.child.wait()).await;
    Ok(results)
}

async fn measure_shape(
    settings: &TransferBenchSettings,
    agent: &Agent,
    peers: &[(Backend, Peer)],
    sink: &str,
    shape: &Shape,
    first: RegionId,
) -> Result<ShapeResult, TransferBenchError> {
    let blocks = settings.blocks;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut local_blocks, mut remote_blocks): (Vec<u64>, Vec<u64>) = ((0..blocks).collect(), (0..blocks).collect());
    local_blocks.shuffle(&mut rng);
    remote_blocks.shuffle(&mut rng);
    let descriptors = |order: &[u64]| -> Vec<Descriptor> {
        order.iter().flat_map(|&b| settings.layout.block(shape, first, b)).collect()
    };
    let (local, remote) = (descriptors(&local_blocks), descriptors(&remote_blocks));
    let bytes = blocks * shape.block_bytes();
    let regions: Vec<std::sync::Arc<Region>> =
        (0..settings.layout.regions(shape, blocks).len() as RegionId).filter_map(|r| agent.region(first + r)).collect();

    let scratch: Vec<Region> = regions.iter().filter_map(|r| Region::new(r.len()).ok()).collect();
    for region in &scratch {
        // Faulted in before any clock starts, as the regions are. SAFETY: a fresh region nothing else uses.
        if let Some(bytes) = unsafe { region.bytes_mut(0, region.len()) } {
            bytes.fill(1);
        }
    }
    let copy_all = || {
        let start = Instant::now();
        for (from, to) in regions.iter().zip(&scratch) {
            from.copy_to(0, to, 0, from.len());
        }
        start.elapsed()
    };
    let mut raw_one = RawTcp::connect(sink, &regions, 1).await?;
    let mut raw_many = RawTcp::connect(sink, &regions, settings.streams).await?;
    for (_, peer) in peers {
        agent.transfer(peer, Direction::Write, &local, &remote, None).await?;
    }
    // Every path once per round, so a noisy moment on this shared machine weighs on all of them alike.
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 3 + peers.len()];
    for _ in 0..settings.rounds {
        times[0].push(copy_all());
        times[1].push(raw_one.send().await?);
        times[2].push(raw_many.send().await?);
        for (i, (_, peer)) in peers.iter().enumerate() {
            let start = Instant::now();
            agent.transfer(peer, Direction::Write, &local, &remote, Some(b"bench")).await?;
            times[3 + i].push(start.elapsed());
        }
    }
    drop(scratch);
    let mut medians = times.into_iter().map(median_of);
    let mut next = || medians.next().unwrap_or_default();
    let (memcpy, raw_one, raw_many) = (next(), next(), next());
    let gbps = |elapsed: Duration| bytes as f64 / elapsed.as_secs_f64() / 1e9;

    let mut backends = Vec::new();
    for (backend, peer) in peers {
        let elapsed = next();
        let one = local.len() / blocks as usize;
        verify(agent, peer, *backend, &local[..one], &remote[..one]).await?;
        let mut latencies = Vec::with_capacity(settings.latency_requests);
        for i in 0..settings.latency_requests {
            let at = (i % blocks as usize) * one;
            let start = Instant::now();
            agent.transfer(peer, Direction::Write, &local[at..at + one], &remote[at..at + one], Some(b"one")).await?;
            latencies.push(start.elapsed().as_secs_f64() * 1e6);
        }
        latencies.sort_by(f64::total_cmp);
        // Against the better of one raw stream and several: what loopback TCP can do here at all.
        let reference = match backend {
            Backend::Shm | Backend::Nixl => gbps(memcpy),
            Backend::Tcp => gbps(raw_one.min(raw_many)),
        };
        backends.push(BackendResult {
            backend: backend.name(),
            gbps: gbps(elapsed),
            descriptors_per_s: local.len() as f64 / elapsed.as_secs_f64(),
            p50_us: super::percentile(&latencies, 0.5),
            p99_us: super::percentile(&latencies, 0.99),
            vs_reference: gbps(elapsed) / reference,
            vs_nixl: None,
        });
    }
    if let Some(nixl) = backends.iter().find(|b| b.backend == "nixl").map(|b| b.gbps) {
        backends.iter_mut().filter(|b| b.backend != "nixl").for_each(|b| b.vs_nixl = Some(b.gbps / nixl));
    }
    Ok(ShapeResult {
        shape: shape.name,
        block_bytes: shape.block_bytes(),
        blocks,
        descriptors: local.len(),
        memcpy_gbps: gbps(memcpy),
        raw_tcp_gbps: gbps(raw_one),
        raw_tcp_streams_gbps: gbps(raw_many),
        streams: settings.streams,
        backends,
    })
}

/// Reads one written block back into fresh memory and compares it with what was written.
async fn verify(
    agent: &Agent,
    peer: &Peer,
    backend: Backend,
    local: &[Descriptor],
    remote: &[Descriptor],
) -> Result<(), TransferBenchError> {
    let total: u64 = local.iter().map(|d| d.len).sum();
    let (id, scratch) = agent.register(Region::new(total).map_err(crate::core::transfer::TransferError::from)?);
    let mut at = 0;
    let back: Vec<Descriptor> = local
        .iter()
        .map(|d| {
            at += d.len;
            Descriptor { region: id, offset: at - d.len, len: d.len }
        })
        .collect();
    agent.transfer(peer, Direction::Read, &back, remote, None).await?;
    for (written, read) in local.iter().zip(&back) {
        let source = agent.region(written.region);
        // SAFETY: no transfer runs on these ranges now.
        let same = unsafe {
            source.as_ref().and_then(|r| r.bytes(written.offset, written.len)) == scratch.bytes(read.offset, read.len)
        };
        if !same {
            return Err(TransferBenchError::Corrupted { backend: backend.name() });
        }
    }
    Ok(())
}

/// Raw loopback TCP to the target's sink: `streams` connections each sending an equal share of the
/// regions' bytes, straight from region memory.
struct RawTcp<'a> {
    connections: Vec<tokio::net::TcpStream>,
    shares: Vec<Vec<(&'a Region, u64, u64)>>,
}

impl<'a> RawTcp<'a> {
    async fn connect(
        sink: &str,
        regions: &'a [std::sync::Arc<Region>],
        streams: usize,
    ) -> Result<Self, TransferBenchError> {
        let mut connections = Vec::with_capacity(streams);
        for _ in 0..streams {
            let stream = tokio::net::TcpStream::connect(sink).await.map_err(TransferBenchError::Raw)?;
            stream.set_nodelay(true).map_err(TransferBenchError::Raw)?;
            connections.push(stream);
        }
        // Stream i sends every region's i-th share.
        let shares = (0..streams as u64)
            .map(|i| {
                regions
                    .iter()
                    .map(|r| {
                        let share = r.len().div_ceil(streams as u64);
                        let at = (i * share).min(r.len());
                        (&**r, at, share.min(r.len() - at))
                    })
                    .collect()
            })
            .collect();
        Ok(Self { connections, shares })
    }

    /// Sends every share once and waits for the sink's acks.
    async fn send(&mut self) -> Result<Duration, TransferBenchError> {
        let start = Instant::now();
        let sends = self.connections.iter_mut().zip(&self.shares).map(|(stream, share)| async move {
            let total: u64 = share.iter().map(|(_, _, len)| len).sum();
            stream.write_u64(total).await?;
            for (region, at, len) in share {
                // SAFETY: nothing writes the regions during the bench's raw sends.
                if let Some(bytes) = unsafe { region.bytes(*at, *len) } {
                    stream.write_all(bytes).await?;
                }
            }
            stream.read_u8().await.map(|_| ())
        });
        futures::future::try_join_all(sends).await.map_err(TransferBenchError::Raw)?;
        Ok(start.elapsed())
    }
}

fn median_of(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// `unavailable`: backends asked for that could not run here, with why.
pub fn table(results: &[ShapeResult], unavailable: &[(&str, String)]) -> String {
    let mut out = String::new();
    for shape in results {
        out.push_str(&format!(
            "{}: {} blocks of {} KiB ({} descriptors, {:.0} MiB)\n",
            shape.shape,
            shape.blocks,
            shape.block_bytes / 1024,
            shape.descriptors,
            (shape.blocks * shape.block_bytes) as f64 / (1 << 20) as f64
        ));
        out.push_str(&format!("  {:<22} {:>8.2} GB/s\n", "memcpy", shape.memcpy_gbps));
        out.push_str(&format!("  {:<22} {:>8.2} GB/s\n", "raw tcp, 1 stream", shape.raw_tcp_gbps));
        out.push_str(&format!(
            "  {:<22} {:>8.2} GB/s\n",
            format!("raw tcp, {} streams", shape.streams),
            shape.raw_tcp_streams_gbps
        ));
        for backend in &shape.backends {
            let reference = if backend.backend == "tcp" { "raw tcp" } else { "memcpy" };
            let vs_nixl = backend.vs_nixl.map(|r| format!("  {r:.2}x nixl")).unwrap_or_default();
            out.push_str(&format!(
                "  {:<22} {:>8.2} GB/s  {:>5.2}x {reference}{vs_nixl}  {:>9.0} descriptors/s  1 block: p50 {:.0} µs, p99 {:.0} µs\n",
                backend.backend, backend.gbps, backend.vs_reference, backend.descriptors_per_s, backend.p50_us, backend.p99_us
            ));
        }
    }
    for (backend, why) in unavailable {
        out.push_str(&format!("  {backend:<22} not available: {why}\n"));
    }
    out
}

/// The summary object: the SmolLM2 shape's numbers at the top, every shape in `shapes`.
pub fn json(results: &[ShapeResult]) -> serde_json::Value {
    let mut summary = serde_json::json!({"bench": "transfer", "shapes": results});
    if let Some(small) = results.first() {
        summary["memcpy_gbps"] = small.memcpy_gbps.into();
        summary["raw_tcp_gbps"] = small.raw_tcp_gbps.into();
        summary["raw_tcp_streams_gbps"] = small.raw_tcp_streams_gbps.into();
        for name in ["shm", "tcp", "nixl"] {
            let found = small.backends.iter().find(|b| b.backend == name);
            summary[format!("{name}_gbps")] = found.map(|b| b.gbps).into();
            summary[format!("{name}_p50_us")] = found.map(|b| b.p50_us).into();
        }
    }
    summary
}
