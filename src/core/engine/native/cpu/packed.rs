//! A bf16 matrix packed for AVX-512 BF16 and the matrix product that reads it: bf16 checkpoints on CPUs
//! that have it multiply bf16-rounded activations by the stored weights with f32 accumulation (as bf16
//! inference does on every engine), at twice the f32 FMA rate, the same way for one row or a thousand.
//!
//! `vdpbf16ps` multiplies pairs: each of its 16 f32 lanes gains `a[2i]·b[2i] + a[2i+1]·b[2i+1]`. So the
//! weights are stored in panels of 16 output features, and inside a panel by pairs of the reduction index:
//! `panel[k / 2][feature][k % 2]`, one 64-byte load per pair. Each activation row contributes the same pair,
//! broadcast to all lanes. A register tile of `TOKENS` activation rows × `PANELS` panels accumulates without
//! any horizontal sum and is stored straight into the row-major output. Rows and the reduction length are
//! padded with zeros to whole panels and pairs.
//!
//! That layout is also the one AMX's `tdpbf16ps` reads its second operand in: 16 rows of pairs, 64 bytes a row,
//! so on CPUs with AMX (Sapphire Rapids on) a panel's 16 pairs are one tile as they lie, and blocks of 16
//! activation rows by 32 reduction values are the other: prefill's products run on the tile unit (`amx`),
//! and only the last rows (decode's one row, a prompt's tail under 16) on the vector registers.
use half::bf16;

/// Whether this CPU has AVX-512 BF16 (the packed layout is only used then).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// What runs the bf16 products here, for the banner and the benchmarks: the tile unit, or the vector one.
pub fn unit() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        return Some("AMX tiles");
    }
    available().then_some("AVX-512 BF16")
}

/// Activations rounded to the nearest bf16 (ties to even), the form the product reads.
pub fn round(x: &[f32]) -> Vec<bf16> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 F and BW (checked just above).
        return unsafe { round_avx512(x) };
    }
    x.iter().map(|&v| round_one(v)).collect()
}

/// `round` into an existing slice (as long as `x`).
#[inline(always)]
pub fn round_into(x: &[f32], out: &mut [bf16]) {
    for (dst, &v) in out.iter_mut().zip(x) {
        *dst = round_one(v);
    }
}

/// Compiled with 512-bit registers: the plain loop does 16 values per step instead of SSE2's 4. It runs once
/// per product on the thread that starts it, which the other threads wait for.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn round_avx512(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| round_one(v)).collect()
}

/// `half`'s rounding (nearest, ties to even; NaN stays a quiet NaN), written on the bits so it vectorises;
/// `bf16::from_f32` in a loop did, but only as wide as the target's baseline.
#[inline(always)]
fn round_one(value: f32) -> bf16 {
    let bits = value.to_bits();
    let rounded = if bits & 0x7fff_ffff > 0x7f80_0000 {
        (bits >> 16) | 0x40
    } else {
        bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16
    };
    bf16::from_bits(rounded as u16)
}

const LANES: usize = 16;
/// Activation rows and panels of one register tile: 8 × 3 accumulators, 3 weight registers and one
/// broadcast fit the 32 AVX-512 registers.
const TOKENS: usize = 8;
const PANELS: usize = 3;
/// Panels per tile when rows go one at a time.
const SINGLE_ROW_PANELS: usize = 6;
/// Panels one call of `multiply_shared` should be given, so both tile shapes fill up.
pub const PANELS_PER_CALL: usize = 6;

/// Where a product's tiles store: a row-major output `width` floats wide whose column 0 is the first feature of
/// panel `base_panel`.
#[derive(Clone, Copy)]
pub(super) struct Output {
    ptr: *mut f32,
    len: usize,
    width: usize,
    base_panel: usize,
}

impl Output {
    /// Stores 16 values at row `row`, starting at the first feature of panel `panel`.
    ///
    /// # Safety
    /// No other thread may be writing those 16 floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store(&self, row: usize, panel: usize, values: std::arch::x86_64::__m512) {
        let at = row * self.width + (panel - self.base_panel) * LANES;
        assert!(at + LANES <= self.len, "a tile inside its output");
        // SAFETY: 16 floats at `at` are inside the output (asserted); the caller rules out other writers.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(self.ptr.add(at), values) };
    }

    /// Multiplies the 16 values at row `row` of panel `panel` by `factors`.
    ///
    /// # Safety
    /// As `store`; the values were stored before.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn scale(&self, row: usize, panel: usize, factors: std::arch::x86_64::__m512) {
        use std::arch::x86_64::{_mm512_loadu_ps, _mm512_mul_ps, _mm512_storeu_ps};
        let at = row * self.width + (panel - self.base_panel) * LANES;
        assert!(at + LANES <= self.len, "a tile inside its output");
        // SAFETY: 16 floats at `at` are inside the output (asserted) and initialised (the caller stored them).
        unsafe { _mm512_storeu_ps(self.ptr.add(at), _mm512_mul_ps(_mm512_loadu_ps(self.ptr.add(at)), factors)) };
    }

    /// # Safety
    /// As `store`.
    unsafe fn set(&self, row: usize, feature: usize, value: f32) {
        let at = row * self.width + feature - self.base_panel * LANES;
        assert!(at < self.len, "a value inside its output");
        // SAFETY: inside the output (asserted); the caller rules out other writers.
        unsafe { *self.ptr.add(at) = value };
    }
}

/// A row-major output one padded row of features wide (`panels · 16`), which the tasks of one product fill
/// in parallel, each the columns of its own panels: they share every row, so no task can hold a `&mut` slice.
pub struct SharedOutput<'a> {
    output: Output,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the output is only written through `multiply_shared`, whose callers give concurrent calls disjoint
// panels, and so disjoint floats.
unsafe impl Send for SharedOutput<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for SharedOutput<'_> {}

impl<'a> SharedOutput<'a> {
    /// An output over memory that need not be initialised: the products that fill it write every float of
    /// their panels' columns, so zeroing it first would only be a second pass over it.
    pub fn new(out: &'a mut [std::mem::MaybeUninit<f32>], width: usize) -> Self {
        Self {
            output: Output { ptr: out.as_mut_ptr().cast(), len: out.len(), width, base_panel: 0 },
            _borrow: std::marker::PhantomData,
        }
    }

    pub(super) fn output(&self) -> Output {
        self.output
    }

    /// The same output seen from panel `first` on: its panel 0 is this one's `first`.
    pub(super) fn panels_from(&self, first: usize) -> SharedOutput<'a> {
        let skip = (first - self.output.base_panel) * LANES;
        assert!(skip <= self.output.len, "the panel inside the output");
        let output = Output {
            // SAFETY: `skip` floats are inside the output (asserted).
            ptr: unsafe { self.output.ptr.add(skip) },
            len: self.output.len - skip,
            width: self.output.width,
            base_panel: 0,
        };
        SharedOutput { output, _borrow: std::marker::PhantomData }
    }

    /// Multiplies panel `panel`'s columns in rows `0..n` by `factors` (16 of them).
    ///
    /// # Safety
    /// As `PackedBf16::multiply_shared`: no other call is given this panel meanwhile, and its columns in those
    /// rows were written.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn scale_panel(&self, panel: usize, n: usize, factors: &[f32]) {
        assert!(factors.len() == LANES && available(), "16 factors, on a CPU with AVX-512");
        // SAFETY: 16 floats; the CPU has AVX-512 F (asserted).
        let factors = unsafe { std::arch::x86_64::_mm512_loadu_ps(factors.as_ptr()) };
        for row in 0..n {
            // SAFETY: as the caller promised.
            unsafe { self.output.scale(row, panel, factors) };
        }
    }
}

pub struct PackedBf16 {
    pub rows: usize,
    pub cols: usize,
    /// `cols` rounded up to even.
    depth: usize,
    panels: usize,
    data: Vec<bf16>,
}

impl PackedBf16 {
    /// Packs a row-major `rows × cols` matrix.
    pub fn pack(rows: usize, cols: usize, values: &[bf16]) -> Self {
        let depth = cols.next_multiple_of(2);
        let panels = rows.div_ceil(LANES);
        let mut data = vec![bf16::ZERO; panels * LANES * depth];
        for row in 0..rows {
            let (panel, lane) = (row / LANES, row % LANES);
            for (k, &value) in values[row * cols..(row + 1) * cols].iter().enumerate() {
                data[panel * LANES * depth + (k / 2) * LANES * 2 + lane * 2 + k % 2] = value;
            }
        }
        Self { rows, cols, depth, panels, data }
    }

    /// Panels already laid out (`panels` of 16 features × `cols` rounded up to even), as `pack` lays them.
    pub(super) fn from_panels(rows: usize, cols: usize, panels: usize, data: Vec<bf16>) -> Self {
        let depth = cols.next_multiple_of(2);
        assert_eq!(data.len(), panels * LANES * depth, "whole panels");
        Self { rows, cols, depth, panels, data }
    }

    /// The packed values, for reuse of their memory.
    pub(super) fn into_data(self) -> Vec<bf16> {
        self.data
    }

    /// Row `row` back in its original order (for embedding lookups).
    pub fn row(&self, row: usize) -> impl Iterator<Item = bf16> + '_ {
        let (panel, lane) = (row / LANES, row % LANES);
        (0..self.cols).map(move |k| self.data[panel * LANES * self.depth + (k / 2) * LANES * 2 + lane * 2 + k % 2])
    }

    pub fn panel_count(&self) -> usize {
        self.panels
    }

    /// `out[t][f - 16·first_panel] = x[t] · w[f]` for the features of panels `first_panel..first_panel+count`,
    /// all `n` activation rows (`x` is `n × cols` bf16, `out` is `n × 16·count`, row-major).
    #[cfg(test)]
    pub fn multiply_panels(&self, x: &[bf16], n: usize, first_panel: usize, count: usize, out: &mut [f32]) {
        let output = Output { ptr: out.as_mut_ptr(), len: out.len(), width: count * LANES, base_panel: first_panel };
        // SAFETY: `out` is borrowed mutably here, so nothing else writes to it.
        unsafe { self.multiply(x, n, first_panel, count, output) }
    }

    /// `multiply_panels` into the columns of panels `first_panel..first_panel+count` of a shared output: every
    /// float of those columns, in all `n` rows, is written.
    ///
    /// # Safety
    /// Calls running at the same time on one output must be given disjoint panels.
    pub unsafe fn multiply_shared(
        &self,
        x: &[bf16],
        n: usize,
        first_panel: usize,
        count: usize,
        out: &SharedOutput<'_>,
    ) {
        // SAFETY: the caller's disjoint panels mean disjoint floats.
        unsafe { self.multiply(x, n, first_panel, count, out.output) }
    }

    /// # Safety
    /// Nothing else writes to the columns of these panels in `out` meanwhile.
    unsafe fn multiply(&self, x: &[bf16], n: usize, first_panel: usize, count: usize, out: Output) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked just above); writers as the caller promised.
            return unsafe { self.multiply_avx512(x, n, first_panel, count, out) };
        }
        // SAFETY: as the caller promised.
        unsafe { self.multiply_portable(x, n, first_panel, count, out) };
    }

    /// # Safety
    /// As `multiply`.
    unsafe fn multiply_portable(&self, x: &[bf16], n: usize, first_panel: usize, count: usize, out: Output) {
        for t in 0..n {
            for p in 0..count {
                let panel = &self.data[(first_panel + p) * LANES * self.depth..][..LANES * self.depth];
                for lane in 0..LANES {
                    let mut sum = 0.0f32;
                    for k in 0..self.cols {
                        sum += x[t * self.cols + k].to_f32() * panel[(k / 2) * LANES * 2 + lane * 2 + k % 2].to_f32();
                    }
                    // SAFETY: as the caller promised.
                    unsafe { out.set(t, (first_panel + p) * LANES + lane, sum) };
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn multiply_avx512(&self, x: &[bf16], n: usize, first_panel: usize, count: usize, out: Output) {
        assert!(x.len() >= n * self.cols && first_panel + count <= self.panels);
        // SAFETY: rows and panels in bounds (asserted above); writers as the caller promised.
        let t = unsafe { self.multiply_amx(x, n, first_panel, count, out) };
        // SAFETY: as above.
        unsafe { self.multiply_rows_avx512(x, t, n, first_panel, count, out) }
    }

    /// The whole blocks of 16 rows on the tile unit, when the CPU has one and the reduction is whole tiles of 32
    /// values; the rows it did (from 0).
    ///
    /// # Safety
    /// As `multiply`, with rows and panels in bounds.
    #[cfg(target_arch = "x86_64")]
    unsafe fn multiply_amx(&self, x: &[bf16], n: usize, first_panel: usize, count: usize, out: Output) -> usize {
        const ROWS: usize = amx::ROWS;
        if n < ROWS || !self.cols.is_multiple_of(amx::DEPTH) || !amx::available() {
            return 0;
        }
        let blocks = n / ROWS;
        let last = (blocks * ROWS - 1) * out.width + (first_panel + count - out.base_panel) * LANES;
        assert!(last <= out.len, "the tiles inside their output");
        let panel_len = LANES * self.depth;
        let chunks = self.cols / amx::DEPTH;
        let tile = amx::Tiles::configure();
        let mut block = 0;
        while block < blocks {
            let row_blocks = (blocks - block).min(2);
            let mut p = 0;
            while p < count {
                let panels = (count - p).min(2);
                let rows = block * ROWS;
                // SAFETY: `row_blocks` blocks of 16 rows from `rows` are inside `x` (n rows of `cols`) and `out`
                // (asserted above), the panels inside the packed data; the caller rules out other writers.
                unsafe {
                    tile.multiply(
                        x.as_ptr().add(rows * self.cols),
                        self.cols * 2,
                        self.data.as_ptr().add((first_panel + p) * panel_len),
                        panel_len,
                        out.ptr.add(rows * out.width + (first_panel + p - out.base_panel) * LANES),
                        out.width * 4,
                        chunks,
                        row_blocks,
                        panels,
                    )
                };
                p += panels;
            }
            block += row_blocks;
        }
        blocks * ROWS
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn multiply_rows_avx512(
        &self,
        x: &[bf16],
        from: usize,
        n: usize,
        first_panel: usize,
        count: usize,
        out: Output,
    ) {
        // The 8-row tiles are compute-bound once their panels are in cache, and the first pass over them is
        // bound by memory instead; so they fetch the panels after these (the same thread's next task, most
        // often) into L2 as they go, a share each, and the memory traffic overlaps the multiply-adds.
        let panel_len = LANES * self.depth;
        let next = (first_panel + count) * panel_len..((first_panel + 2 * count) * panel_len).min(self.data.len());
        let tiles = ((n - from) / TOKENS) * count.div_ceil(PANELS);
        let share = next.len().div_ceil(tiles.max(1));
        let mut fetched = next.start;
        let mut t = from;
        while t + TOKENS <= n {
            let mut p = 0;
            while p < count {
                let panels = (count - p).min(PANELS);
                let ahead = fetched..(fetched + share).min(next.end);
                fetched = ahead.end;
                // SAFETY: rows t..t+8 and panels p..p+panels are in bounds (asserted above).
                unsafe {
                    match panels {
                        3 => self.tile::<TOKENS, 3>(x, t, first_panel + p, out, ahead),
                        2 => self.tile::<TOKENS, 2>(x, t, first_panel + p, out, ahead),
                        _ => self.tile::<TOKENS, 1>(x, t, first_panel + p, out, ahead),
                    }
                }
                p += panels;
            }
            t += TOKENS;
        }
        // The last rows (all of them when decoding) one at a time, with more panels in flight: a single row
        // is bound by how fast the weights stream in, and more independent accumulators keep more loads going.
        for row in t..n {
            let mut p = 0;
            while p < count {
                let panels = (count - p).min(SINGLE_ROW_PANELS);
                // SAFETY: row `row` and panels p..p+panels are in bounds (asserted above).
                unsafe {
                    match panels {
                        6 => self.tile::<1, 6>(x, row, first_panel + p, out, 0..0),
                        5 => self.tile::<1, 5>(x, row, first_panel + p, out, 0..0),
                        4 => self.tile::<1, 4>(x, row, first_panel + p, out, 0..0),
                        3 => self.tile::<1, 3>(x, row, first_panel + p, out, 0..0),
                        2 => self.tile::<1, 2>(x, row, first_panel + p, out, 0..0),
                        _ => self.tile::<1, 1>(x, row, first_panel + p, out, 0..0),
                    }
                }
                p += panels;
            }
        }
    }

    /// Rows `t..t+T` × panels `panel..panel+P`, stored into `out` (whose writers the caller has ruled out),
    /// while weights `ahead` (indices into the packed data) are fetched into L2 for a later tile.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::needless_range_loop)] // indexes rows, panels and accumulators in lockstep
    unsafe fn tile<const T: usize, const P: usize>(
        &self,
        x: &[bf16],
        t: usize,
        panel: usize,
        out: Output,
        ahead: std::ops::Range<usize>,
    ) {
        use std::arch::x86_64::{
            __m512bh, __m512i, _MM_HINT_T1, _mm_prefetch, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_set1_epi32,
            _mm512_setzero_ps,
        };
        let mut acc = [[_mm512_setzero_ps(); P]; T];
        let pairs = self.depth / 2;
        let full_pairs = self.cols / 2;
        // bf16 values per 64-byte line, and lines to fetch per pair so `ahead` is done by the last pair.
        const LINE: usize = 32;
        let lines_per_pair = ahead.len().div_ceil(LINE).div_ceil(pairs.max(1));
        let mut fetch = ahead.start;
        for kk in 0..pairs {
            for _ in 0..lines_per_pair {
                if fetch < ahead.end {
                    // SAFETY: `fetch` indexes the packed data (the caller's range lies inside it); a prefetch
                    // never faults anyway.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(self.data.as_ptr().add(fetch).cast()) };
                    fetch += LINE;
                }
            }
            // SAFETY: every panel holds `pairs` pairs of 16 lanes; rows hold `cols` values, and the last,
            // odd column (if any) is read alone below.
            unsafe {
                let weights: [__m512bh; P] = std::array::from_fn(|j| {
                    let at = (panel + j) * LANES * self.depth + kk * LANES * 2;
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(self.data.as_ptr().add(at).cast()))
                });
                for r in 0..T {
                    let row = x.as_ptr().add((t + r) * self.cols + 2 * kk);
                    let pair =
                        if kk < full_pairs { row.cast::<u32>().read_unaligned() } else { u32::from((*row).to_bits()) };
                    let broadcast = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32));
                    for j in 0..P {
                        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], broadcast, weights[j]);
                    }
                }
            }
        }
        for r in 0..T {
            for j in 0..P {
                // SAFETY: the caller has ruled out other writers of these panels.
                unsafe { out.store(t + r, panel + j, acc[r][j]) };
            }
        }
    }
}

/// Intel AMX through inline assembly (its intrinsics are not stable Rust): eight tile registers of 16 rows by 64
/// bytes, configured alike; a block of the product is `tmm0..tmm3` accumulating two row blocks (`tmm4`,
/// `tmm5`) by two panels (`tmm6`, `tmm7`), 32 reduction values a step.
#[cfg(target_arch = "x86_64")]
pub(super) mod amx {
    use std::arch::asm;

    /// Activation rows of one tile.
    pub const ROWS: usize = 16;
    /// Reduction values (bf16) of one step: a 64-byte tile row.
    pub const DEPTH: usize = 32;
    /// Bytes from one pair-row of a panel to the next.
    const PANEL_ROW: usize = 64;

    /// Whether this CPU has AMX with bf16 and Linux lets this process use it (it must ask first:
    /// `ARCH_REQ_XCOMP_PERM` for the tile data; without it the first tile instruction is an illegal one).
    pub fn available() -> bool {
        use std::sync::OnceLock;
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            let features = std::arch::x86_64::__cpuid_count(7, 0);
            let (tile, bf16) = (features.edx >> 24 & 1 == 1, features.edx >> 22 & 1 == 1);
            if std::env::var_os("DYNAMO_NO_AMX").is_some() || !tile || !bf16 || !super::available() {
                return false;
            }
            // SAFETY: a request for a permission; it changes nothing but what this process may use.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        })
    }

    /// The tile registers of this thread, configured; released when dropped.
    pub struct Tiles(std::marker::PhantomData<*const ()>);

    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Tiles {
        /// Configures this thread's tiles (once `available` has said yes).
        pub fn configure() -> Tiles {
            let mut config = Config([0; 64]);
            config.0[0] = 1; // palette 1
            for tile in 0..8 {
                config.0[16 + 2 * tile] = 64; // bytes a row
                config.0[48 + tile] = ROWS as u8;
            }
            // SAFETY: a valid palette-1 configuration; `available` said the CPU and the OS allow tiles.
            unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
            Tiles(std::marker::PhantomData)
        }

        /// `c[r][f] = Σ_k a[r][k] · b[f][k]` for `row_blocks` (1 or 2) blocks of 16 rows and `panels` (1 or 2)
        /// panels of 16 features, over `chunks` steps of 32 values: `a` row-major (`a_stride` bytes a row),
        /// panel `j` at `b + j · panel_len` in the packed layout, `c` row-major (`c_stride` bytes a row).
        ///
        /// # Safety
        /// Every row and panel read is inside its allocation, every float written inside `c`'s, and no other
        /// thread writes those.
        #[allow(clippy::too_many_arguments)] // one block's pointers, strides and counts
        pub unsafe fn multiply(
            &self,
            a: *const half::bf16,
            a_stride: usize,
            b: *const half::bf16,
            panel_len: usize,
            c: *mut f32,
            c_stride: usize,
            chunks: usize,
            row_blocks: usize,
            panels: usize,
        ) {
            // SAFETY: the tiles are configured (`configure`); the caller vouches for the memory each load (here
            // and below) reads and each store writes.
            unsafe {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem))
            };
            let (a1, b1) = (a.wrapping_add(ROWS * a_stride / 2), b.wrapping_add(panel_len));
            for chunk in 0..chunks {
                let (a0, a1) = (a.wrapping_add(chunk * DEPTH), a1.wrapping_add(chunk * DEPTH));
                // A panel's 16 pairs of one step lie together: 16 × 32 values from the step's first.
                let (b0, b1) = (b.wrapping_add(chunk * ROWS * 32), b1.wrapping_add(chunk * ROWS * 32));
                // SAFETY: as above.
                unsafe {
                    asm!("tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm6, [{b} + {p}*1]", "tdpbf16ps tmm0, tmm4, tmm6",
                         a = in(reg) a0, s = in(reg) a_stride, b = in(reg) b0, p = in(reg) PANEL_ROW,
                         options(nostack, readonly));
                    if panels == 2 {
                        asm!("tileloadd tmm7, [{b} + {p}*1]", "tdpbf16ps tmm1, tmm4, tmm7",
                             b = in(reg) b1, p = in(reg) PANEL_ROW, options(nostack, readonly));
                    }
                    if row_blocks == 2 {
                        asm!("tileloadd tmm5, [{a} + {s}*1]", "tdpbf16ps tmm2, tmm5, tmm6",
                             a = in(reg) a1, s = in(reg) a_stride, options(nostack, readonly));
                        if panels == 2 {
                            asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                        }
                    }
                }
            }
            let c1 = c.wrapping_add(ROWS * c_stride / 4);
            // SAFETY: as above.
            unsafe {
                asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) c, s = in(reg) c_stride, options(nostack));
                if panels == 2 {
                    asm!("tilestored [{c} + {s}*1], tmm1", c = in(reg) c.wrapping_add(16), s = in(reg) c_stride,
                         options(nostack));
                }
                if row_blocks == 2 {
                    asm!("tilestored [{c} + {s}*1], tmm2", c = in(reg) c1, s = in(reg) c_stride, options(nostack));
                    if panels == 2 {
                        asm!("tilestored [{c} + {s}*1], tmm3", c = in(reg) c1.wrapping_add(16), s = in(reg) c_stride,
                             options(nostack));
                    }
                }
            }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: releases this thread's tile state, which `configure` made.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_half_for_every_kind_of_value() {
        // Ties both ways, values that round up into the next exponent or to infinity, subnormals, signed
        // zeros, infinities, NaNs; then a spread of ordinary bit patterns. More values than one vector, so
        // both the wide loop and its tail run.
        let mut values = vec![
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 3.0 / 256.0),
            f32::from_bits(0x3fff_ffff),
            f32::from_bits(0x7f7f_ffff),
            f32::from_bits(0x0000_8001),
            f32::from_bits(0x8000_7fff),
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xff80_0001),
        ];
        values.extend((0..4099u32).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9))));
        let expected: Vec<u16> = values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let rounded: Vec<u16> = round(&values).iter().map(|v| v.to_bits()).collect();
        assert_eq!(rounded, expected);
        assert!(values.iter().map(|&v| round_one(v).to_bits()).eq(expected));
    }

    /// Weights (`rows × cols`) and activations (`n × cols`) of few distinct values, so that every product and
    /// partial sum is exact in f32 and any summation order agrees exactly.
    fn operands(rows: usize, cols: usize, n: usize) -> (Vec<bf16>, Vec<bf16>) {
        let w = (0..rows * cols).map(|i| bf16::from_f32(((i * 7) % 13) as f32 / 4.0 - 1.5)).collect();
        let x = (0..n * cols).map(|i| bf16::from_f32(((i * 5) % 9) as f32 / 8.0 - 0.5)).collect();
        (w, x)
    }

    #[test]
    fn tile_unit_blocks_and_the_rows_after_them_equal_plain_sums() {
        // A reduction of whole 32-value steps, so the tile unit takes the two blocks of 16 rows (where the
        // CPU has one), then the vector registers the last 5; 5 panels: two pairs and one alone.
        let (rows, cols, n) = (80, 96, 37);
        let (w, x) = operands(rows, cols, n);
        let packed = PackedBf16::pack(rows, cols, &w);
        let panels = packed.panel_count();
        // Two calls over disjoint panels of one output, as the engine's tasks make them.
        let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); n * panels * LANES];
        let shared = SharedOutput::new(&mut out, panels * LANES);
        // SAFETY: the two calls are given disjoint panels.
        unsafe {
            packed.multiply_shared(&x, n, 0, 3, &shared);
            packed.multiply_shared(&x, n, 3, panels - 3, &shared);
        }
        for t in 0..n {
            for f in 0..rows {
                // Every product and partial sum is exact in f32, so any summation order agrees exactly.
                let expected: f32 = (0..cols).map(|k| x[t * cols + k].to_f32() * w[f * cols + k].to_f32()).sum();
                // SAFETY: every float of the panels' columns was written.
                assert_eq!(unsafe { out[t * panels * LANES + f].assume_init() }, expected, "row {t}, feature {f}");
            }
        }
    }

    #[test]
    fn packed_products_equal_plain_sums_for_ragged_shapes() {
        // 150 rows (10 panels, the last one partial), 9 columns (odd), 11 activation rows: a tile of 8 rows,
        // then 3 single rows over 6 + 4 panels.
        let (rows, cols, n) = (150, 9, 11);
        let (w, x) = operands(rows, cols, n);
        let packed = PackedBf16::pack(rows, cols, &w);
        assert!(packed.row(5).eq(w[5 * cols..6 * cols].iter().copied()));
        let panels = packed.panel_count();
        let mut out = vec![0.0; n * panels * LANES];
        packed.multiply_panels(&x, n, 0, panels, &mut out);
        let mut portable = vec![0.0; n * panels * LANES];
        let output = Output { ptr: portable.as_mut_ptr(), len: portable.len(), width: panels * LANES, base_panel: 0 };
        // SAFETY: `portable` is only written here.
        unsafe { packed.multiply_portable(&x, n, 0, panels, output) };
        for t in 0..n {
            for f in 0..rows {
                // Every product and partial sum is exact in f32, so any summation order agrees exactly.
                let expected: f32 = (0..cols).map(|k| x[t * cols + k].to_f32() * w[f * cols + k].to_f32()).sum();
                assert_eq!(out[t * panels * LANES + f], expected, "row {t}, feature {f}");
                assert_eq!(portable[t * panels * LANES + f], expected);
            }
        }
    }
}
