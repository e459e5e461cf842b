//! Matrix products with GGML-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) against activations quantized to 8
//! bits, written for this project. Other GGML types have no kernel here: the
//! loader refuses them (see [`Format::from_ggml`]); this module never
//! dequantizes weights to floats to multiply them.
//!
//! At load time each weight matrix is repacked: rows are taken eight at a
//! time (a *group*), and for every block the eight rows' quants are
//! interleaved four bytes at a time, followed by their eight scales (and
//! mins). One 32-byte load then holds the same four byte columns of all
//! eight rows, so a broadcast of four activation bytes and one integer
//! multiply-add (`vpdpbusd`, or `vpmaddubsw` on plain AVX2) advance eight dot
//! products at once, and the scales apply to eight rows with one vector
//! multiply. Each group is used for every activation row while it sits in
//! L1, so a batch of 16 reads the weights from memory once, like one stream.
//! The layouts (`repack.rs`), in bytes per row and block against GGML's:
//! - Q4_0, Q4_1, Q8_0: GGML's bytes, interleaved (Q4_0's offset of 8 is
//!   folded into the integer sums).
//! - Q5_0, Q5_1: the 4-bit nibbles as Q4's, then the fifth bits as one more
//!   interleaved 32-bit word per row, each byte holding the fifth bits of the
//!   eight quants its nibble byte column feeds (GGML's size: 22 and 24).
//! - Q4_K, Q5_K: 256-weight super-blocks; the quants interleaved (Q5_K's
//!   in 160-byte runs of four nibble columns and their fifth bits, in the
//!   order the kernel reads them), after the 6-bit scales and mins unpacked
//!   to bytes (148 and 180 instead of 144 and 176).
//! - Q2_K, Q3_K: the 2-bit fields kept packed four to a byte (and Q3_K's
//!   high-bit mask interleaved); Q2_K's 4-bit scale/min pairs as GGML's
//!   bytes (84, GGML's size), Q3_K's 6-bit scales unpacked to signed bytes
//!   (114 instead of 110).
//! - Q6_K: GGML's nibbles and 2-bit high parts rearranged into 192-byte
//!   chunks in the order the kernel reads them, the scales as bytes
//!   (GGML's size, 210).
//!
//! The quants of a block are read front to back, one stream: an earlier
//! Q6_K layout that read nibbles and high bits from two regions of the
//! block at once ran at a third of this one's speed from memory (one core,
//! 6 against 18 GB/s), though as fast from cache: the hardware prefetch
//! evidently follows one stream per block, not two.
//!
//! Every path (scalar, AVX2, AVX-512 VNNI) computes the same integer block
//! sums and applies the scales in the same order with fused multiply-adds,
//! so all paths give bit-identical results, and a row's result never depends
//! on what it is batched with.

mod repack;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use crate::mem::HugeBuf;
use crate::pool;
use candle_core::quantized::GgmlDType;

/// Weights per block, as in GGML's Q4_0/Q4_1/Q8_0.
pub const BLOCK: usize = 32;
/// Weight rows interleaved in one group.
pub const GROUP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit quants `q`, value `d·(q - 8)`.
    Q4_0,
    /// 4-bit quants `q`, value `d·q + m`.
    Q4_1,
    /// 5-bit quants `q`, value `d·(q - 16)`.
    Q5_0,
    /// 5-bit quants `q`, value `d·q + m`.
    Q5_1,
    /// 8-bit signed quants `q`, value `d·q`.
    Q8_0,
    /// 256-weight super-blocks of sixteen 16-weight sub-blocks, 2-bit quants
    /// `q`, value `d·scᵢ·q - dmin·mᵢ` with 4-bit `scᵢ`, `mᵢ`.
    Q2K,
    /// 256-weight super-blocks, 3-bit quants `q` (-4..3), value `d·scᵢ·q`
    /// with a 6-bit signed `scᵢ` per 16 weights.
    Q3K,
    /// 256-weight super-blocks of eight 32-weight sub-blocks, 4-bit quants
    /// `q`, value `d·scᵢ·q - dmin·mᵢ` with 6-bit `scᵢ`, `mᵢ` per sub-block.
    Q4K,
    /// As Q4_K with 5-bit quants.
    Q5K,
    /// 256-weight super-blocks, 6-bit quants `q`, value `d·scᵢ·(q - 32)`
    /// with an 8-bit signed `scᵢ` per 16 weights.
    Q6K,
}

impl Format {
    /// Every format, in the order of [`Format::label`]'s list.
    pub const ALL: [Format; 10] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The format of a GGML type, if these kernels take it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q2K => Self::Q2K,
            GgmlDType::Q3K => Self::Q3K,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q8_1
            | GgmlDType::Q8K => return None,
        })
    }

    /// GGML's name for the type ("Q4_K").
    pub fn label(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Bytes a `[out, in]` matrix takes repacked (`in` a multiple of the
    /// block; out padded to groups).
    pub fn packed_bytes(self, out_dim: usize, in_dim: usize) -> usize {
        out_dim.div_ceil(GROUP) * (in_dim / self.block_weights()) * self.group_block_bytes()
    }

    /// Bytes of one block in a GGUF file.
    pub const fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Weights per GGML block.
    pub const fn block_weights(self) -> usize {
        match self {
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => 256,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => BLOCK,
        }
    }

    /// Bytes of quants (and high bits) for one block of one row.
    const fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => BLOCK / 2,
            // Nibbles, then a 32-bit word of fifth bits.
            Self::Q5_0 | Self::Q5_1 => BLOCK / 2 + 4,
            Self::Q8_0 => BLOCK,
            Self::Q2K => 64,
            // 2-bit fields, then the 32-byte high-bit mask.
            Self::Q3K => 64 + 32,
            Self::Q4K => 128,
            Self::Q5K => 128 + 32,
            // Nibbles and 2-bit high parts (see `repack::q6k`).
            Self::Q6K => 128 + 64,
        }
    }

    /// Where a group block's scales (and mins) start: after the quants, but
    /// for Q4_K and Q5_K, whose 160 bytes of scales, mins, d and dmin come
    /// first so that the kernel reads the block front to back.
    pub(super) const fn scales_at(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K => 0,
            _ => GROUP * self.quant_bytes(),
        }
    }

    /// Where a group block's quants start (see [`scales_at`](Self::scales_at)).
    pub(super) const fn quants_at(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K => GROUP * 16 + 2 * GROUP * 2,
            _ => 0,
        }
    }

    /// Bytes of one block of one group: quants and scales (and mins).
    const fn group_block_bytes(self) -> usize {
        let scales = match self {
            Self::Q4_1 | Self::Q5_1 => 2 * GROUP * 2,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => GROUP * 2,
            // Sixteen scale/min bytes per row (GGML's), then d and dmin.
            Self::Q2K => GROUP * 16 + 2 * GROUP * 2,
            // Sixteen i8 scales per row, then d.
            Self::Q3K | Self::Q6K => GROUP * 16 + GROUP * 2,
            // Eight scales and eight mins per row as bytes, then d and dmin.
            Self::Q4K | Self::Q5K => GROUP * 16 + 2 * GROUP * 2,
        };
        GROUP * self.quant_bytes() + scales
    }

    /// What the integer sum of `q·x` is corrected by, per unit of `Σx`, to
    /// make it the sum of the signed values' products: Q4_0's and Q5_0's
    /// quants are stored offset by 8 and 16; Q8_0's are offset by 128 on
    /// the VNNI path only, which handles that itself. (The K-quants' offsets
    /// apply per sub-block, in their own kernels.)
    const fn offset(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            Self::Q5_0 => 16,
            _ => 0,
        }
    }
}

/// Which instructions the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// Every path this machine can run, slowest first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        v
    }

    /// The fastest available path, or the one `AQUILA_KERNELS` names
    /// (`scalar`, `avx2`, `vnni`) if this machine can run it.
    pub fn selected() -> Isa {
        static CHOICE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let available = Isa::available();
            let best = *available.last().expect("scalar is always available");
            match std::env::var("AQUILA_KERNELS").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") if available.contains(&Isa::Avx2) => Isa::Avx2,
                _ => best,
            }
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// A `[out, in]` quantized weight matrix in the grouped layout.
pub struct PackedMatrix {
    format: Format,
    out_dim: usize,
    in_dim: usize,
    blocks: usize,
    data: HugeBuf<u8>,
}

impl PackedMatrix {
    /// Repacks GGML blocks of a row-major `[out, in]` matrix. `in_dim` must
    /// be a multiple of the format's block (GGUF guarantees it).
    pub fn from_ggml(format: Format, raw: &[u8], out_dim: usize, in_dim: usize) -> Self {
        let bw = format.block_weights();
        assert_eq!(in_dim % bw, 0, "in_dim {in_dim} is not a multiple of {bw}");
        let blocks = in_dim / bw;
        let src_block = format.ggml_block_bytes();
        assert_eq!(raw.len(), out_dim * blocks * src_block, "GGML data size");
        let groups = out_dim.div_ceil(GROUP);
        let gb = format.group_block_bytes();
        // Rows past out_dim stay zero: scale 0, so they contribute nothing.
        let mut data = HugeBuf::zeroed(groups * blocks * gb);
        for (o, row) in raw.chunks_exact(blocks * src_block).enumerate() {
            let group = &mut data[o / GROUP * blocks * gb..][..blocks * gb];
            repack_row(format, row, o % GROUP, group);
        }
        Self {
            format,
            out_dim,
            in_dim,
            blocks,
            data,
        }
    }

    /// [`from_ggml`](Self::from_ggml) from rows that `fill(rows, buf)` reads
    /// (their GGML bytes, into `buf`), a group of rows at a time, groups in
    /// parallel on the compute pool: how weights are loaded. The first error
    /// `fill` returns is returned.
    pub fn build<E: Send>(
        format: Format,
        out_dim: usize,
        in_dim: usize,
        fill: impl Fn(Range<usize>, &mut Vec<u8>) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        let bw = format.block_weights();
        assert_eq!(in_dim % bw, 0, "in_dim {in_dim} is not a multiple of {bw}");
        let blocks = in_dim / bw;
        let row_bytes = blocks * format.ggml_block_bytes();
        let groups = out_dim.div_ceil(GROUP);
        let len = blocks * format.group_block_bytes();
        let mut data = HugeBuf::zeroed(groups * len);
        let failed = std::sync::Mutex::new(None);
        let per_task = groups.div_ceil(pool::threads() * 8).max(1);
        let tasks: Vec<(usize, &mut [u8])> = data
            .chunks_mut(per_task * len)
            .enumerate()
            .map(|(t, chunk)| (t * per_task, chunk))
            .collect();
        // Rows are read a run of groups at a time, about 4 MiB.
        let run = ((4 << 20) / (GROUP * row_bytes).max(1)).clamp(1, per_task);
        pool::run_parts(tasks, |(first, chunk)| {
            let mut raw = Vec::new();
            for (j, groups) in chunk.chunks_mut(run * len).enumerate() {
                let start = (*first + j * run) * GROUP;
                let rows = start..(start + groups.len() / len * GROUP).min(out_dim);
                if let Err(e) = fill(rows.clone(), &mut raw) {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
                assert_eq!(raw.len(), rows.len() * row_bytes, "GGML data size");
                for (o, row) in raw.chunks_exact(row_bytes).enumerate() {
                    let group = &mut groups[o / GROUP * len..][..len];
                    repack_row(format, row, o % GROUP, group);
                }
            }
        });
        match failed.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(Self {
                format,
                out_dim,
                in_dim,
                blocks,
                data,
            }),
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn groups(&self) -> usize {
        self.out_dim.div_ceil(GROUP)
    }

    /// `x` is `[rows, in]` f32; returns `[rows, out]`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_with(Isa::selected(), x, rows)
    }

    /// [`matmul`](Self::matmul) on a given path; panics if this machine
    /// cannot run it.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], rows: usize) -> Vec<f32> {
        Self::matmul_many_with(isa, &[self], x, rows).remove(0)
    }

    /// Several matrices with the same input (q, k and v; gate and up): the
    /// input is quantized once and all their groups share one parallel
    /// loop, one wake-up of the thread pool instead of one per matrix.
    pub fn matmul_many(mats: &[&Self], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        Self::matmul_many_with(Isa::selected(), mats, x, rows)
    }

    pub fn matmul_many_with(isa: Isa, mats: &[&Self], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        assert!(Isa::available().contains(&isa), "{isa:?} is not available");
        let in_dim = mats[0].in_dim;
        assert!(mats.iter().all(|m| m.in_dim == in_dim));
        assert_eq!(x.len(), rows * in_dim);
        let qx = QuantizedRows::new(x, rows, in_dim);
        let jobs: Vec<Job<'_>> = mats
            .iter()
            .map(|&m| Job {
                m,
                blocks: 0..m.blocks,
                x: &qx,
            })
            .collect();
        run_jobs(isa, &jobs, rows)
    }

    /// `x · Wᵀ` as `k` partial products, one per equal run of the input's
    /// blocks (`[rows, out]` each), for a row-parallel layer to add in a
    /// fixed order whatever the tensor-parallel size: a rank holding `k`
    /// of the `K` runs computes exactly the partials a single process
    /// does for them. `k` must divide the blocks.
    pub fn matmul_segments(&self, x: &[f32], rows: usize, k: usize) -> Vec<Vec<f32>> {
        let isa = Isa::selected();
        assert_eq!(x.len(), rows * self.in_dim);
        assert!(
            k > 0 && self.blocks.is_multiple_of(k),
            "{k} runs of {} blocks",
            self.blocks
        );
        let (sb, seg_in) = (self.blocks / k, self.in_dim / k);
        // Each run's activations, quantized as the whole row's would be
        // (a block at a time).
        let qxs: Vec<QuantizedRows> = (0..k)
            .map(|s| {
                let xs: Vec<f32> = x
                    .chunks_exact(self.in_dim)
                    .flat_map(|row| &row[s * seg_in..(s + 1) * seg_in])
                    .copied()
                    .collect();
                QuantizedRows::new(&xs, rows, seg_in)
            })
            .collect();
        let jobs: Vec<Job<'_>> = qxs
            .iter()
            .enumerate()
            .map(|(s, x)| Job {
                m: self,
                blocks: s * sb..(s + 1) * sb,
                x,
            })
            .collect();
        run_jobs(isa, &jobs, rows)
    }

    /// `[groups][rows][8]` to `[rows, out]`.
    fn untranspose(&self, out_t: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * self.out_dim];
        for (g, block) in out_t.chunks_exact(rows * GROUP).enumerate() {
            let cols = (self.out_dim - g * GROUP).min(GROUP);
            for (r, lanes) in block.chunks_exact(GROUP).enumerate() {
                out[r * self.out_dim + g * GROUP..][..cols].copy_from_slice(&lanes[..cols]);
            }
        }
        out
    }

    /// One group against every activation row; `out` is `[rows, 8]`.
    fn group_rows(&self, isa: Isa, w: &[u8], x: &QuantizedRows, out: &mut [f32]) {
        match isa {
            Isa::Scalar => {
                for r in 0..x.rows {
                    scalar::group(self.format, w, x, r, &mut out[r * GROUP..][..GROUP]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: matmul_with checked that the machine runs this path.
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::group_rows(isa, self.format, w, x, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!(),
        }
    }
}

/// One row's GGML blocks into lane `r` of its group's blocks (`dst`, all
/// of the group's blocks).
fn repack_row(format: Format, row: &[u8], r: usize, dst: &mut [u8]) {
    let gb = format.group_block_bytes();
    for (src, dst) in row
        .chunks_exact(format.ggml_block_bytes())
        .zip(dst.chunks_exact_mut(gb))
    {
        repack::block(format, src, r, dst);
    }
}

/// Activation rows quantized like GGML's Q8_0/Q8_1: per 32 values a scale
/// `d = max|x|/127` and quants `round(x/d)`, plus the quants' sum (for
/// offsets) and `d·Σq` (for Q4_1's mins); also the sums of each half (for
/// Q6_K, whose scales cover 16 weights).
pub struct QuantizedRows {
    rows: usize,
    blocks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
    half_sum: Vec<i32>,
    s: Vec<f32>,
}

impl QuantizedRows {
    pub fn new(x: &[f32], rows: usize, in_dim: usize) -> Self {
        /// Below this many values one thread is quicker than a parallel loop.
        const PARALLEL: usize = 1 << 12;
        let blocks = in_dim / BLOCK;
        let n = rows * blocks;
        let mut q = Self {
            rows,
            blocks,
            qs: vec![0; n * BLOCK],
            d: vec![0.0; n],
            sum: vec![0; n],
            half_sum: vec![0; 2 * n],
            s: vec![0.0; n],
        };
        if rows < 2 || x.len() < PARALLEL {
            Blocks::of(&mut q).fill(x);
            return q;
        }
        // A batch's rows in parts on the pool: done by the engine thread
        // alone, they kept the others waiting (3–5% of a 16-row demo step).
        let per = rows.div_ceil(2 * pool::threads());
        let mut parts = Vec::new();
        let mut rest = Blocks::of(&mut q);
        for x in x.chunks(per * in_dim) {
            let (part, more) = rest.split_at(x.len() / BLOCK);
            parts.push((x, part));
            rest = more;
        }
        pool::run_parts(parts, |(x, blocks)| blocks.fill(x));
        q
    }

    fn index(&self, row: usize, block: usize) -> usize {
        row * self.blocks + block
    }
}

/// A run of consecutive blocks of a [`QuantizedRows`], to fill.
struct Blocks<'a> {
    qs: &'a mut [i8],
    d: &'a mut [f32],
    sum: &'a mut [i32],
    half_sum: &'a mut [i32],
    s: &'a mut [f32],
}

impl<'a> Blocks<'a> {
    fn of(q: &'a mut QuantizedRows) -> Self {
        Self {
            qs: &mut q.qs,
            d: &mut q.d,
            sum: &mut q.sum,
            half_sum: &mut q.half_sum,
            s: &mut q.s,
        }
    }

    /// The first `n` blocks, and the rest.
    fn split_at(self, n: usize) -> (Self, Self) {
        let (qs, qs2) = self.qs.split_at_mut(n * BLOCK);
        let (d, d2) = self.d.split_at_mut(n);
        let (sum, sum2) = self.sum.split_at_mut(n);
        let (half_sum, half_sum2) = self.half_sum.split_at_mut(2 * n);
        let (s, s2) = self.s.split_at_mut(n);
        (
            Self {
                qs,
                d,
                sum,
                half_sum,
                s,
            },
            Self {
                qs: qs2,
                d: d2,
                sum: sum2,
                half_sum: half_sum2,
                s: s2,
            },
        )
    }

    /// Quantizes `x`, one value per quant of these blocks.
    fn fill(&mut self, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if Isa::selected() >= Isa::Avx2 {
            // SAFETY: the AVX2 path is selected only where AVX2 exists.
            unsafe { quantize_avx2(x, self) };
            return;
        }
        quantize(x, self);
    }
}

/// Same code as [`quantize`], compiled with AVX2 (the arithmetic is the same,
/// so the quants are too).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], q: &mut Blocks<'_>) {
    quantize(x, q)
}

/// Fills `q` from `x`, a block at a time. Written so the compiler vectorizes
/// it: the maximum in eight lanes, and rounding (to nearest, ties to even, as
/// `vroundps` does) by adding and subtracting 1.5·2²³, exact for |v| < 2²².
#[inline(always)]
fn quantize(x: &[f32], q: &mut Blocks<'_>) {
    const ROUND: f32 = 12_582_912.0;
    for (i, (src, dst)) in x
        .chunks_exact(BLOCK)
        .zip(q.qs.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        // `a > m` rather than `f32::max`, whose NaN rule kept the loop
        // scalar; the lanes start at 0 and never hold NaN, so they agree.
        let mut lanes = [0f32; 8];
        for c in src.chunks_exact(8) {
            for l in 0..8 {
                let a = c[l].abs();
                lanes[l] = if a > lanes[l] { a } else { lanes[l] };
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        // The quants as i32 first, then their sums and bytes in separate
        // loops: summing into `halves` element by element, through memory,
        // chained every element on the one before and kept the whole block
        // scalar (≈ 6% of a demo step at 16 rows). Values are within ±127
        // (NaN gives 0, as before), so the bytes are the same.
        let mut qi = [0i32; BLOCK];
        for (o, v) in qi.iter_mut().zip(src) {
            *o = ((v * id + ROUND) - ROUND) as i32;
        }
        let halves = [
            qi[..BLOCK / 2].iter().sum::<i32>(),
            qi[BLOCK / 2..].iter().sum::<i32>(),
        ];
        for (o, &v) in dst.iter_mut().zip(&qi) {
            *o = v as i8;
        }
        let sum = halves[0] + halves[1];
        q.d[i] = d;
        q.sum[i] = sum;
        q.half_sum[2 * i..2 * i + 2].copy_from_slice(&halves);
        q.s[i] = d * sum as f32;
    }
}

/// One matrix, or one run of its blocks, against quantized activations
/// holding exactly those blocks.
struct Job<'a> {
    m: &'a PackedMatrix,
    blocks: Range<usize>,
    x: &'a QuantizedRows,
}

/// Runs `jobs` in one parallel loop, a few groups per task so a slow
/// thread does not hold up the step; returns each job's `[rows, out]`.
fn run_jobs(isa: Isa, jobs: &[Job<'_>], rows: usize) -> Vec<Vec<f32>> {
    let groups: usize = jobs.iter().map(|j| j.m.groups()).sum();
    let per_task = groups.div_ceil(pool::threads() * 4).max(1);
    let mut outs: Vec<Vec<f32>> = jobs
        .iter()
        .map(|j| vec![0f32; j.m.groups() * rows * GROUP])
        .collect();
    let mut tasks = Vec::new();
    for (j, out) in jobs.iter().zip(outs.iter_mut()) {
        for (t, chunk) in out.chunks_mut(per_task * rows * GROUP).enumerate() {
            tasks.push((j, t * per_task, chunk));
        }
    }
    pool::run_parts(tasks, |&mut (j, g0, ref mut chunk)| {
        let gb = j.m.format.group_block_bytes();
        for (i, out) in chunk.chunks_mut(rows * GROUP).enumerate() {
            let start = ((g0 + i) * j.m.blocks + j.blocks.start) * gb;
            j.m.group_rows(isa, &j.m.data[start..start + j.blocks.len() * gb], j.x, out);
        }
    });
    jobs.iter()
        .zip(outs)
        .map(|(j, o)| j.m.untranspose(&o, rows))
        .collect()
}

#[cfg(test)]
mod tests;
