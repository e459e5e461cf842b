//! Float matrix products, `[rows, in] × [out, in]ᵀ`, for f32, bf16 and f16
//! weights, with f32 activations and accumulation; one kernel for decode
//! batches and prefill alike.
//!
//! At load time the weights are repacked into *panels* of 16 output rows
//! stored column by column (`[in][16]`), so one step of the inner loop loads
//! two vectors of weights and, for each of up to six activation rows,
//! broadcasts one activation and does two fused multiply-adds: twelve
//! accumulators in registers, a weight load shared by six rows (the shape of
//! BLIS's 6×16 micro-kernel; with AVX-512's 32 registers, up to 16 rows
//! in one pass). The `in` dimension is cut into chunks of 256 so
//! that a panel's chunk stays in L1 while every row tile passes over it, and
//! a batch of 16 reads each weight from memory once. 16-bit weights are
//! widened in registers, so they cost half the memory traffic of f32.
//!
//! Each output is accumulated over `in` in order in one lane, whatever the
//! number of rows or the tiling, so a sequence's result does not depend on
//! what it is batched with.
//!
//! Where the CPU has AVX-512 BF16, bf16 weights take `vdpbf16ps` instead:
//! the activations are rounded to bf16 (as a bf16 model computes them in
//! transformers or llama.cpp), and each instruction adds two products per
//! lane, pairs of `in` in order, so the same holds; twice the
//! multiply-adds of the fused path per instruction, for prefill, where the
//! fused path is bound by the machine's f32 peak.

use std::ops::Range;

use half::{bf16, f16};

use super::quant::Isa;
use crate::mem::{HugeBuf, Zeroed};
use crate::pool;

/// Output rows per panel.
const PANEL: usize = 16;
/// Activation rows per micro-kernel call.
const TILE: usize = 6;
/// Columns of `in` per pass over the row tiles.
const KC: usize = 256;

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FloatPath {
    /// Portable code; plain multiplies and adds, so its last bits differ.
    Scalar,
    /// 6 rows × 16 outputs in 12 ymm accumulators.
    Avx2,
    /// Up to 16 rows × 16 outputs in zmm accumulators (32 registers), so a
    /// batch of 16 passes over the weights once. Same fused multiply-adds in
    /// the same order as AVX2, so the same bits.
    Avx512,
    /// As `Avx512`, but bf16 weights go through `vdpbf16ps` (AVX-512 BF16)
    /// with the activations rounded to bf16: two multiply-adds per lane and
    /// instruction. f32 and f16 weights as `Avx512`, same bits.
    Avx512Bf16,
}

impl FloatPath {
    /// Every path this machine can run, slowest first.
    pub fn available() -> Vec<FloatPath> {
        let isas = Isa::available();
        let mut v = vec![FloatPath::Scalar];
        if isas.contains(&Isa::Avx2) {
            v.push(FloatPath::Avx2);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                v.push(FloatPath::Avx512);
                if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16") {
                    v.push(FloatPath::Avx512Bf16);
                }
            }
        }
        v
    }

    /// Follows [`Isa::selected`]: `AQUILA_KERNELS=scalar|avx2` holds both
    /// kernel families back alike; `AQUILA_KERNELS=avx512` keeps bf16
    /// weights on the fused f32 path (activations not rounded).
    pub fn selected() -> FloatPath {
        static CHOICE: std::sync::OnceLock<FloatPath> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let best = *Self::available().last().expect("scalar");
            match Isa::selected() {
                Isa::Scalar => FloatPath::Scalar,
                Isa::Avx2 => best.min(FloatPath::Avx2),
                Isa::Avx512Vnni if std::env::var("AQUILA_KERNELS").as_deref() == Ok("avx512") => {
                    best.min(FloatPath::Avx512)
                }
                Isa::Avx512Vnni => best,
            }
        })
    }

    /// Whether this path rounds the activations to bf16 for weights of
    /// type `T` (and so gives other bits than the fused paths).
    pub fn rounds_activations<T: Elem>(self) -> bool {
        self == FloatPath::Avx512Bf16 && T::IS_BF16
    }

    pub fn label(self) -> &'static str {
        match self {
            FloatPath::Scalar => "scalar",
            FloatPath::Avx2 => "avx2",
            FloatPath::Avx512 => "avx512",
            FloatPath::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// Rows per micro-kernel call.
    fn tile(self) -> usize {
        match self {
            FloatPath::Avx512 | FloatPath::Avx512Bf16 => 16,
            FloatPath::Scalar | FloatPath::Avx2 => TILE,
        }
    }
}

/// Where a tile's results go: row r of the tile at `ptr + r·ldc`, 16
/// columns each. Tasks write disjoint columns of the same output rows, so
/// this is a raw pointer; whoever makes one guarantees the tile's memory is
/// valid and written by nobody else meanwhile.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ldc: usize,
}

// SAFETY: an `Out` is only dereferenced under the contract above.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The same tile `r` rows further down.
    fn down(self, r: usize) -> Out {
        Out {
            ptr: self.ptr.wrapping_add(r * self.ldc),
            ldc: self.ldc,
        }
    }
}

/// A weight element the kernels can widen to f32.
pub trait Elem: Zeroed {
    /// bf16, which [`FloatPath::Avx512Bf16`] multiplies as it is.
    const IS_BF16: bool = false;
    fn to_f32(self) -> f32;
    /// `v` rounded to this type (to nearest, ties to even).
    fn from_f32(v: f32) -> Self;
    /// [`from_f32`](Self::from_f32) of each of `src` into `dst`.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &v)| *d = Self::from_f32(v));
    }
    /// Sixteen consecutive elements as two vectors of eight f32.
    ///
    /// # Safety
    /// `p` must point to 16 readable elements; AVX2 and F16C must exist.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> [std::arch::x86_64::__m256; 2];
    /// The same sixteen as one vector.
    ///
    /// # Safety
    /// As `load16`, and AVX-512F must exist.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16x(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16x(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        // F16C eight at a time, where the machine has it.
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe {
            let p = p as *const __m128i;
            [
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
            ]
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16x(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl Elem for bf16 {
    const IS_BF16: bool = true;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. bf16 is the top half of an f32.
        unsafe {
            let p = p as *const __m128i;
            let widen =
                |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            [widen(_mm_loadu_si128(p)), widen(_mm_loadu_si128(p.add(1)))]
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16x(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. bf16 is the top half of an f32.
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }
}

/// A `[out, in]` float weight matrix in panels.
pub struct PackedFloat<T: Elem> {
    out_dim: usize,
    in_dim: usize,
    data: HugeBuf<T>,
}

impl<T: Elem> PackedFloat<T> {
    /// Packs row-major `[out, in]` weights.
    pub fn from_rows(w: &[T], out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(w.len(), out_dim * in_dim);
        let panels = out_dim.div_ceil(PANEL);
        // Rows past out_dim stay zero.
        let mut data = HugeBuf::zeroed(panels * PANEL * in_dim);
        for (o, row) in w.chunks_exact(in_dim).enumerate() {
            let panel = &mut data[o / PANEL * PANEL * in_dim..][..PANEL * in_dim];
            for (k, &v) in row.iter().enumerate() {
                panel[k * PANEL + o % PANEL] = v;
            }
        }
        Self {
            out_dim,
            in_dim,
            data,
        }
    }

    /// Packs a `[out, in]` matrix whose rows `fill(rows, dst)` writes
    /// row-major into `dst` (`rows.len() × in` values), a panel of rows at a
    /// time, panels in parallel on the compute pool: how weights are loaded
    /// (each task reads and converts its panels' rows from the file itself).
    /// The first error `fill` returns is returned.
    pub fn build<E: Send>(
        out_dim: usize,
        in_dim: usize,
        fill: impl Fn(Range<usize>, &mut [T]) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        let panels = out_dim.div_ceil(PANEL);
        let mut data = HugeBuf::zeroed(panels * PANEL * in_dim);
        let len = PANEL * in_dim;
        let failed = std::sync::Mutex::new(None);
        let per_task = panels.div_ceil(pool::threads() * 8).max(1);
        let tasks: Vec<(usize, &mut [T])> = data
            .chunks_mut(per_task * len)
            .enumerate()
            .map(|(t, chunk)| (t * per_task, chunk))
            .collect();
        // Rows are read a run of panels at a time, about 4 MiB of f32:
        // reads of one panel (128 KiB) left the disk far below its speed.
        let run = ((1 << 20) / len).clamp(1, per_task);
        pool::run_parts(tasks, |(first, chunk)| {
            let mut rows_buf = vec![T::from_f32(0.0); run * len];
            for (j, panels) in chunk.chunks_mut(run * len).enumerate() {
                let start = (*first + j * run) * PANEL;
                let rows = start..(start + panels.len() / in_dim).min(out_dim);
                let n = rows.len();
                if let Err(e) = fill(rows, &mut rows_buf[..n * in_dim]) {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
                for (panel, rows) in panels
                    .chunks_mut(len)
                    .zip(rows_buf[..n * in_dim].chunks(len))
                {
                    for (r, row) in rows.chunks_exact(in_dim).enumerate() {
                        for (k, &v) in row.iter().enumerate() {
                            panel[k * PANEL + r] = v;
                        }
                    }
                }
            }
        });
        match failed.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(Self {
                out_dim,
                in_dim,
                data,
            }),
        }
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<T>()
    }

    /// Elements a packed `[out, in]` matrix holds (out padded to panels).
    pub fn packed_len(out_dim: usize, in_dim: usize) -> usize {
        out_dim.div_ceil(PANEL) * PANEL * in_dim
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_with(FloatPath::selected(), x, rows)
    }

    /// [`matmul`](Self::matmul) on a given path, which the machine must
    /// run.
    pub fn matmul_with(&self, path: FloatPath, x: &[f32], rows: usize) -> Vec<f32> {
        Self::matmul_many_with(path, &[self], x, rows).remove(0)
    }

    /// Several matrices with the same input (q, k and v; gate and up) in one
    /// parallel loop: one wake-up of the thread pool instead of one each.
    pub fn matmul_many(mats: &[&Self], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        Self::matmul_many_with(FloatPath::selected(), mats, x, rows)
    }

    pub fn matmul_many_with(
        path: FloatPath,
        mats: &[&Self],
        x: &[f32],
        rows: usize,
    ) -> Vec<Vec<f32>> {
        let in_dim = mats[0].in_dim;
        assert!(mats.iter().all(|m| m.in_dim == in_dim));
        assert_eq!(x.len(), rows * in_dim);
        assert!(
            FloatPath::available().contains(&path),
            "{path:?} is not available"
        );
        let xt = Acts::new(path.rounds_activations::<T>(), x, rows, in_dim, path.tile());
        let panels: usize = mats.iter().map(|m| m.out_dim.div_ceil(PANEL)).sum();
        let per_task = panels.div_ceil(pool::threads() * 16).max(1);
        // The kernels write straight into each `[rows, out]` result; every
        // task owns a range of panels, that is of 16-column stripes. The
        // results start uninitialized (zeroing them cost 3% of a batched
        // step): the first chunk of `in` stores, and every stripe of every
        // row belongs to one task, so all is written when the loop returns.
        let mut outs: Vec<Vec<f32>> = mats
            .iter()
            .map(|m| Vec::with_capacity(rows * m.out_dim))
            .collect();
        let mut tasks = Vec::new();
        for (&m, out) in mats.iter().zip(outs.iter_mut()) {
            let base = Out {
                ptr: out.as_mut_ptr(),
                ldc: m.out_dim,
            };
            let n = m.out_dim.div_ceil(PANEL);
            for p0 in (0..n).step_by(per_task) {
                tasks.push((m, p0..(p0 + per_task).min(n), base));
            }
        }
        pool::run(tasks.len(), |t| {
            let (m, ref range, base) = tasks[t];
            for p in range.clone() {
                let panel = &m.data[p * PANEL * in_dim..][..PANEL * in_dim];
                let cols = (m.out_dim - p * PANEL).min(PANEL);
                if cols == PANEL {
                    let c = Out {
                        ptr: base.ptr.wrapping_add(p * PANEL),
                        ldc: base.ldc,
                    };
                    // SAFETY: columns p·16.. p·16+16 of every row lie inside
                    // this result and belong to this task alone.
                    unsafe { m.panel(path, panel, &xt, rows, c) };
                } else {
                    // The last, narrower panel goes through a scratch tile.
                    let mut scratch = vec![0f32; rows * PANEL];
                    let c = Out {
                        ptr: scratch.as_mut_ptr(),
                        ldc: PANEL,
                    };
                    // SAFETY: scratch holds rows × 16.
                    unsafe { m.panel(path, panel, &xt, rows, c) };
                    for (r, lanes) in scratch.chunks_exact(PANEL).enumerate() {
                        // SAFETY: as above, for the `cols` columns that exist.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                lanes.as_ptr(),
                                base.ptr.wrapping_add(r * base.ldc + p * PANEL),
                                cols,
                            )
                        };
                    }
                }
            }
        });
        for (out, m) in outs.iter_mut().zip(mats) {
            // SAFETY: every element was written (above); a panicking task
            // would have resumed in `pool::run` before this point.
            unsafe { out.set_len(rows * m.out_dim) };
        }
        outs
    }

    /// One panel against every row, into `c` (`rows` rows of 16).
    /// `xt` is the activations in groups of `path.tile()` rows, each group
    /// transposed (see [`transpose`]), so that a tile's activations for one
    /// k are adjacent and its activations for a chunk of k one run of
    /// memory.
    ///
    /// # Safety
    /// `c` must be valid for `rows` rows of 16 and written by no one else.
    unsafe fn panel(&self, path: FloatPath, panel: &[T], xt: &Acts<'_>, rows: usize, c: Out) {
        let n = self.in_dim;
        let height = path.tile();
        let tiles = rows.div_ceil(height);
        for k0 in (0..n).step_by(KC) {
            let kc = KC.min(n - k0);
            let w = &panel[k0 * PANEL..(k0 + kc) * PANEL];
            let first = k0 == 0;
            for (g, g0) in (0..rows).step_by(height).enumerate() {
                let width = height.min(rows - g0);
                // This group's tiles' share of prefetching the next chunk:
                // with several groups each takes a slice; a single row
                // leaves it to the hardware prefetcher, which keeps up with
                // one stream.
                let share = (rows > 1).then_some((g, tiles));
                let mut r = 0;
                while r < width {
                    let cs = c.down(g0 + r);
                    let left = width - r;
                    let xs = match xt {
                        Acts::F32(xt) => &xt[g0 * n + k0 * width + r..],
                        Acts::Bf16Pairs(xp) => {
                            let xs = &xp[g0 * n.div_ceil(2) + k0 / 2 * width + r..];
                            #[cfg(target_arch = "x86_64")]
                            {
                                // SAFETY: T is bf16 (Acts::new makes pairs
                                // only for it), a 16-bit type; the rest as
                                // below.
                                let w = unsafe {
                                    std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len())
                                };
                                // SAFETY: matmul_many_with checked that the
                                // machine runs this path.
                                r += unsafe {
                                    simd::tile_avx512_bf16(xs, width, w, kc, cs, first, share, left)
                                };
                                continue;
                            }
                            #[cfg(not(target_arch = "x86_64"))]
                            unreachable!("{xs:?}")
                        }
                    };
                    r += match path {
                        // SAFETY: the caller's contract covers these rows of c.
                        FloatPath::Scalar => unsafe {
                            scalar_tile::<T>(xs, width, w, kc, cs, first, left)
                        },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: matmul_many_with checked that the machine
                        // runs this path; the slices cover what the kernels
                        // read, the caller's contract what they write.
                        FloatPath::Avx2 => unsafe {
                            simd::tile_avx2::<T>(xs, width, w, kc, cs, first, share, left)
                        },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above.
                        FloatPath::Avx512 | FloatPath::Avx512Bf16 => unsafe {
                            simd::tile_avx512::<T>(xs, width, w, kc, cs, first, share, left)
                        },
                        #[cfg(not(target_arch = "x86_64"))]
                        _ => unreachable!(),
                    };
                }
            }
        }
    }
}

/// The activations as the micro-kernels read them: f32, or for
/// [`FloatPath::Avx512Bf16`] on bf16 weights, bf16 pairs.
enum Acts<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    /// `in` in pairs of bf16, `(x[2p], x[2p+1])` in one u32, even k in the
    /// low half (an odd `in`'s last pair holds a zero), laid out as
    /// [`transpose`] says with pairs for columns.
    Bf16Pairs(Vec<u32>),
}

impl<'a> Acts<'a> {
    fn new(pairs: bool, x: &'a [f32], rows: usize, in_dim: usize, group: usize) -> Self {
        if pairs {
            Acts::Bf16Pairs(transpose(x, rows, in_dim, group, 2, |two| {
                let lo = bf16::from_f32(two[0]).to_bits() as u32;
                let hi = two
                    .get(1)
                    .map_or(0, |&v| bf16::from_f32(v).to_bits() as u32);
                lo | hi << 16
            }))
        } else if rows == 1 {
            // A single row is its own layout.
            Acts::F32(std::borrow::Cow::Borrowed(x))
        } else {
            Acts::F32(std::borrow::Cow::Owned(transpose(
                x,
                rows,
                in_dim,
                group,
                1,
                |one| one[0],
            )))
        }
    }
}

/// `x` (`[rows, in]`) for the micro-kernels: cut into groups of `group`
/// rows (the last may be narrower), each stored transposed, `[in][width]`,
/// one group after the other, where a column is `unit` of `step`
/// consecutive values of a row (the last may be shorter). Within a tile
/// the activations of one k are then adjacent, and a tile's activations
/// for a chunk of k are one run of memory. With all the rows in one
/// transposed block (as before), a prefill's 512 rows put successive k
/// 2 KiB apart: a tile's reads fell in two L1 sets and evicted the weights
/// the tiles share, and 512-row products ran at 172 GFLOP/s against 64-row
/// ones at 200.
///
/// Larger inputs (a prefill's hundreds of rows) are laid out in parts on
/// the pool: done by the engine thread alone, they kept the others waiting.
fn transpose<U: Send>(
    x: &[f32],
    rows: usize,
    in_dim: usize,
    group: usize,
    step: usize,
    unit: impl Fn(&[f32]) -> U + Sync,
) -> Vec<U> {
    /// Below this many values one thread is quicker than a parallel loop.
    const PARALLEL: usize = 1 << 14;
    let units = in_dim.div_ceil(step);
    let mut xt: Vec<U> = Vec::with_capacity(rows * units);
    // Columns u0.. of the group's rows from g0 into `out`, `[u][width]`,
    // 16 values (a cache line of each row) at a time, so that reads and
    // writes both run along memory.
    let per_line = 16 / step;
    let fill = |g0: usize, u0: usize, out: &mut [std::mem::MaybeUninit<U>]| {
        let width = group.min(rows - g0);
        for (b, block) in out.chunks_mut(per_line * width).enumerate() {
            let ub = u0 + b * per_line;
            let ks = ub * step..((ub + block.len() / width) * step).min(in_dim);
            for r in 0..width {
                let src = &x[(g0 + r) * in_dim..][ks.clone()];
                for (j, values) in src.chunks(step).enumerate() {
                    block[j * width + r].write(unit(values));
                }
            }
        }
    };
    // Parts of KC values of one group each.
    let mut parts = Vec::new();
    let mut rest = &mut xt.spare_capacity_mut()[..rows * units];
    for g0 in (0..rows).step_by(group) {
        let width = group.min(rows - g0);
        let (this, more) = rest.split_at_mut(width * units);
        rest = more;
        for (i, part) in this.chunks_mut(KC / step * width).enumerate() {
            parts.push((g0, i * KC / step, part));
        }
    }
    if x.len() < PARALLEL {
        for (g0, u0, part) in parts {
            fill(g0, u0, part);
        }
    } else {
        pool::run_parts(parts, |(g0, u0, out)| fill(*g0, *u0, out));
    }
    // SAFETY: the parts cover all `rows × units` values and `fill` wrote
    // each (a panicking task would have resumed in `pool::run` before this
    // point).
    unsafe { xt.set_len(rows * units) };
    xt
}

/// The portable micro-kernel on up to six of the `left` rows:
/// `c[r][j] (+)= Σ_k x[r][k]·w[k][j]`. Returns the rows done.
///
/// # Safety
/// `c` must be valid for `left.min(6)` rows of 16 and written by no one else.
unsafe fn scalar_tile<T: Elem>(
    x: &[f32],
    stride: usize,
    w: &[T],
    kc: usize,
    c: Out,
    first: bool,
    left: usize,
) -> usize {
    let rows = left.min(TILE);
    let mut acc = [[0f32; PANEL]; TILE];
    let acc = &mut acc[..rows];
    // SAFETY: the caller's contract.
    let row = |r: usize| unsafe { std::slice::from_raw_parts_mut(c.down(r).ptr, PANEL) };
    if !first {
        for (r, a) in acc.iter_mut().enumerate() {
            a.copy_from_slice(row(r));
        }
    }
    for k in 0..kc {
        let wk: [f32; PANEL] = std::array::from_fn(|j| w[k * PANEL + j].to_f32());
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[k * stride + r];
            for j in 0..PANEL {
                a[j] += xv * wk[j];
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        row(r).copy_from_slice(a);
    }
    rows
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Elem, Out, PANEL, TILE};

    /// Runs the widest tile that fits in `left` rows; returns its height.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must exist; the slices and `c` as for `avx2`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2<T: Elem>(
        x: &[f32],
        stride: usize,
        w: &[T],
        kc: usize,
        c: Out,
        first: bool,
        prefetch: Option<(usize, usize)>,
        left: usize,
    ) -> usize {
        macro_rules! pick {
            ($($r:literal)*) => {
                match left.min(TILE) {
                    // SAFETY: the caller's contract.
                    $($r => unsafe { avx2::<T, $r>(x, stride, w, kc, c, first, prefetch) },)*
                    _ => unreachable!("left is at least 1"),
                }
            };
        }
        pick!(1 2 3 4 5 6)
    }

    /// `$call` with the const `$r` set to the tallest tile of 16, 8, 4, 2
    /// or 1 rows that `$left` rows hold.
    macro_rules! tallest {
        ($left:expr, $r:ident => $call:expr) => {
            match $left {
                16.. => {
                    const $r: usize = 16;
                    $call
                }
                8.. => {
                    const $r: usize = 8;
                    $call
                }
                4.. => {
                    const $r: usize = 4;
                    $call
                }
                2.. => {
                    const $r: usize = 2;
                    $call
                }
                _ => {
                    const $r: usize = 1;
                    $call
                }
            }
        };
    }

    /// A zmm kernel's accumulators for `R` rows of 16 at `c`: zero for the
    /// first chunk of `in`, else what the earlier chunks stored.
    ///
    /// # Safety
    /// AVX-512F must exist; `c` valid for `R` rows of 16.
    #[inline(always)]
    unsafe fn load_acc<const R: usize>(c: Out, first: bool) -> [__m512; R] {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            if !first {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(c.down(r).ptr);
                }
            }
            acc
        }
    }

    /// Stores what `load_acc` loaded, after the chunk's sums.
    ///
    /// # Safety
    /// As `load_acc`, and nobody else writes those rows meanwhile.
    #[inline(always)]
    unsafe fn store_acc<const R: usize>(c: Out, acc: &[__m512; R]) {
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { _mm512_storeu_ps(c.down(r).ptr, *a) };
        }
    }

    /// As `tile_avx2`, with tiles of 16, 8, 4, 2 or 1 rows.
    ///
    /// # Safety
    /// AVX-512F, AVX2, FMA and F16C must exist; the slices and `c` as for `avx2`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx512<T: Elem>(
        x: &[f32],
        stride: usize,
        w: &[T],
        kc: usize,
        c: Out,
        first: bool,
        prefetch: Option<(usize, usize)>,
        left: usize,
    ) -> usize {
        // SAFETY: the caller's contract.
        tallest!(left, R => unsafe { avx512::<T, R>(x, stride, w, kc, c, first, prefetch) })
    }

    /// As `tile_avx512` for bf16 weights (as u16) and bf16 pair
    /// activations (see [`Acts::Bf16Pairs`](super::Acts)).
    ///
    /// # Safety
    /// AVX-512F/BW/BF16 must exist; the slices and `c` as for `avx512_bf16`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx512_bf16(
        x: &[u32],
        stride: usize,
        w: &[u16],
        kc: usize,
        c: Out,
        first: bool,
        prefetch: Option<(usize, usize)>,
        left: usize,
    ) -> usize {
        // SAFETY: the caller's contract.
        tallest!(left, R => unsafe { avx512_bf16::<R>(x, stride, w, kc, c, first, prefetch) })
    }

    /// A tile's share of prefetching the next chunk: with `Some((i, n))`,
    /// the i-th of n slices of the `kc·16` weights after `w`, one cache line
    /// every `every` steps of k. A countdown: computing the line from
    /// `k / every` kept a division in the loop (at every step of a 16-row
    /// tile, whose `every` is 1).
    struct Prefetch {
        ahead: *const i8,
        left: usize,
        every: usize,
        countdown: usize,
    }

    impl Prefetch {
        #[inline(always)]
        fn new<T>(w: *const T, kc: usize, share: Option<(usize, usize)>) -> Prefetch {
            let lines = kc * PANEL * std::mem::size_of::<T>() / 64;
            let (first_line, count) = match share {
                Some((i, n)) => (i * lines / n, (i + 1) * lines / n - i * lines / n),
                None => (0, 0),
            };
            Prefetch {
                ahead: (w.wrapping_add(kc * PANEL) as *const i8).wrapping_add(first_line * 64),
                left: count,
                every: kc.div_ceil(count.max(1)),
                countdown: 0,
            }
        }

        /// Called at every step of the loop: a line at steps 0, every,
        /// 2·every... until the share is asked for. Prefetches never fault,
        /// so one past the end of the matrix is harmless.
        #[inline(always)]
        unsafe fn step(&mut self) {
            if self.left == 0 {
                return;
            }
            if self.countdown == 0 {
                // SAFETY: a prefetch reads nothing; any address is allowed.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(self.ahead) };
                self.ahead = self.ahead.wrapping_add(64);
                self.left -= 1;
                self.countdown = self.every;
            }
            self.countdown -= 1;
        }
    }

    /// `c[r][j] (+)= Σ_k x[r][k]·w[k][j]` for `R` rows, with fused
    /// multiply-adds in k order. With `prefetch: Some((i, n))`, also asks
    /// for the i-th of n slices of the next `kc·16` weights (the next chunk
    /// of this panel, or the start of the next panel), spread over the loop,
    /// so that the next chunk's memory traffic overlaps this one's
    /// arithmetic instead of following it. Returns `R`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must exist. `x` holds `kc` steps `stride` apart
    /// of `R` activations each, `w` holds `kc·16`, `c` is valid for `R` rows of 16,
    /// written by no one else.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<T: Elem, const R: usize>(
        x: &[f32],
        stride: usize,
        w: &[T],
        kc: usize,
        c: Out,
        first: bool,
        prefetch: Option<(usize, usize)>,
    ) -> usize {
        assert!(w.len() >= kc * PANEL);
        assert!(x.len() >= (kc - 1) * stride + R);
        let (xp, wp, cp, ldc) = (x.as_ptr(), w.as_ptr(), c.ptr, c.ldc);
        let mut prefetch = Prefetch::new(wp, kc, prefetch);
        // SAFETY: the asserts above bound every access.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if !first {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = [
                        _mm256_loadu_ps(cp.add(r * ldc)),
                        _mm256_loadu_ps(cp.add(r * ldc + 8)),
                    ];
                }
            }
            for k in 0..kc {
                prefetch.step();
                let [w0, w1] = T::load16(wp.add(k * PANEL));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add(k * stride + r));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(cp.add(r * ldc), a[0]);
                _mm256_storeu_ps(cp.add(r * ldc + 8), a[1]);
            }
        }
        R
    }

    /// As `avx2`, one zmm accumulator per row.
    ///
    /// # Safety
    /// As `avx2`, and AVX-512F must exist.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn avx512<T: Elem, const R: usize>(
        x: &[f32],
        stride: usize,
        w: &[T],
        kc: usize,
        c: Out,
        first: bool,
        prefetch: Option<(usize, usize)>,
    ) -> usize {
        assert!(w.len() >= kc * PANEL);
        assert!(x.len() >= (kc - 1) * stride + R);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut prefetch = Prefetch::new(wp, kc, prefetch);
        // SAFETY: the asserts above bound every access.
        unsafe {
            let mut acc = load_acc::<R>(c, first);
            for k in 0..kc {
                prefetch.step();
                let wv = T::load16x(wp.add(k * PANEL));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(k * stride + r)), wv, *a);
                }
            }
            store_acc(c, &acc);
        }
        R
    }

    /// `c[r][j] (+)= Σ_p x[r][2p]·w[2p][j] + x[r][2p+1]·w[2p+1][j]` for `R`
    /// rows with `vdpbf16ps`, pairs in k order; a pair's two weight rows
    /// (adjacent in the panel, `[k][16]`) are interleaved in a register by
    /// one `vpermw`. An odd `kc`'s last k pairs its weights with zeros.
    /// Returns `R`.
    ///
    /// # Safety
    /// AVX-512F/BW/BF16 must exist. `x` holds `kc.div_ceil(2)` steps
    /// `stride` apart of `R` pairs each, `w` holds `kc·16`, `c` is valid for
    /// `R` rows of 16, written by no one else.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    unsafe fn avx512_bf16<const R: usize>(
        x: &[u32],
        stride: usize,
        w: &[u16],
        kc: usize,
        c: Out,
        first: bool,
        prefetch: Option<(usize, usize)>,
    ) -> usize {
        assert!(w.len() >= kc * PANEL);
        assert!(x.len() >= (kc.div_ceil(2) - 1) * stride + R);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut prefetch = Prefetch::new(wp, kc, prefetch);
        // SAFETY: the asserts above bound every access; __m512i and
        // __m512bh are the same 64 bytes.
        unsafe {
            // Element 2j ← w[k][j] (element j), 2j + 1 ← w[k+1][j] (16 + j).
            let interleave = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
            let mut acc = load_acc::<R>(c, first);
            for p in 0..kc / 2 {
                prefetch.step();
                prefetch.step();
                let two = _mm512_loadu_si512(wp.add(2 * p * PANEL) as *const __m512i);
                let wv = bh(_mm512_permutexvar_epi16(interleave, two));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = bh(_mm512_set1_epi32(*xp.add(p * stride + r) as i32));
                    *a = _mm512_dpbf16_ps(*a, wv, xv);
                }
            }
            if kc % 2 == 1 {
                let last = _mm256_loadu_si256(wp.add((kc - 1) * PANEL) as *const __m256i);
                let wv = bh(_mm512_cvtepu16_epi32(last));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = bh(_mm512_set1_epi32(*xp.add(kc / 2 * stride + r) as i32));
                    *a = _mm512_dpbf16_ps(*a, wv, xv);
                }
            }
            store_acc(c, &acc);
        }
        R
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Packing in parallel from a row reader gives the same bytes as
    /// packing the whole matrix, for outputs that do and do not fill the
    /// last panel and matrices of one and of many runs of panels.
    #[test]
    fn built_from_rows_equals_packed_whole() {
        for (out, inp) in [(1, 8), (17, 33), (70, 100), (1000, 64), (5000, 300)] {
            let w = data(out * inp, 3);
            let whole = PackedFloat::from_rows(&w, out, inp);
            let built = PackedFloat::<f32>::build(out, inp, |rows, dst| {
                dst.copy_from_slice(&w[rows.start * inp..rows.end * inp]);
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(&built.data[..], &whole.data[..], "{out}x{inp}");
        }
        let failed = PackedFloat::<f32>::build(40, 8, |rows, _| {
            if rows.start >= 16 {
                Err(rows.start)
            } else {
                Ok(())
            }
        });
        assert_eq!(failed.err(), Some(16));
    }

    fn check<T: Elem>(convert: impl Fn(f32) -> T, tol: f64) {
        let paths = FloatPath::available();
        for (rows, inp, out) in [
            (1, 8, 4),
            (3, 13, 7),
            (7, 300, 33),
            (16, 100, 70),
            (2, 768, 129),
            // Enough values for the parallel transpose, `in` not a whole
            // number of chunks.
            (40, 600, 20),
            // An odd `in` over several chunks (the last pair of the last
            // chunk is half empty), 16-row tiles and a narrower one.
            (21, 555, 18),
        ] {
            let x = data(rows * inp, 1);
            let w: Vec<T> = data(out * inp, 2).into_iter().map(&convert).collect();
            let packed = PackedFloat::from_rows(&w, out, inp);
            for &path in &paths {
                let got = packed.matmul_with(path, &x, rows);
                // The bf16 dot-product path multiplies the activations
                // rounded to bf16; the reference rounds them the same way,
                // so here too only f32 accumulation separates the two.
                let xr: Vec<f64> = if path.rounds_activations::<T>() {
                    x.iter().map(|&v| bf16::from_f32(v).to_f64()).collect()
                } else {
                    x.iter().map(|&v| v as f64).collect()
                };
                for r in 0..rows {
                    for j in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| xr[r * inp + k] * w[j * inp + k].to_f32() as f64)
                            .sum();
                        let g = got[r * out + j] as f64;
                        assert!(
                            (g - want).abs() <= tol * (inp as f64).sqrt() * want.abs().max(1.0),
                            "{path:?} {rows}x{inp}x{out} [{r},{j}]: {g} vs {want}"
                        );
                    }
                    // Row r alone gives bit-identical results.
                    let alone = packed.matmul_with(path, &x[r * inp..(r + 1) * inp], 1);
                    assert_eq!(alone, got[r * out..(r + 1) * out]);
                }
            }
        }
    }

    #[test]
    fn f32_weights_match_an_f64_reference_and_do_not_depend_on_batch_size() {
        check(|v| v, 1e-5);
    }

    #[test]
    fn matrices_run_together_give_what_they_give_alone() {
        let (inp, rows) = (96, 7);
        let x = data(rows * inp, 5);
        let mats: Vec<PackedFloat<f32>> = [(33, 6), (16, 7), (100, 8)]
            .into_iter()
            .map(|(out, seed)| PackedFloat::from_rows(&data(out * inp, seed), out, inp))
            .collect();
        let together = PackedFloat::matmul_many(&mats.iter().collect::<Vec<_>>(), &x, rows);
        for (m, t) in mats.iter().zip(&together) {
            assert_eq!(&m.matmul(&x, rows), t);
        }
    }

    #[test]
    fn the_simd_paths_give_the_same_bits() {
        let (inp, out, rows) = (600, 45, 21);
        let x = data(rows * inp, 9);
        let packed = PackedFloat::from_rows(&data(out * inp, 10), out, inp);
        let simd: Vec<FloatPath> = FloatPath::available().into_iter().skip(1).collect();
        for pair in simd.windows(2) {
            assert_eq!(
                packed.matmul_with(pair[0], &x, rows),
                packed.matmul_with(pair[1], &x, rows),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn half_weights_match_an_f64_reference_of_the_same_weights() {
        // The reference uses the 16-bit weights themselves, so only f32
        // accumulation separates the two.
        check(bf16::from_f32, 1e-5);
        check(f16::from_f32, 1e-5);
        if !FloatPath::available().contains(&FloatPath::Avx512Bf16) {
            // A CPU feature, not something set-up can install: CI machines
            // come with and without it.
            eprintln!("SKIPPED: this CPU has no AVX-512 BF16; the vdpbf16ps path was not run");
        }
    }

    /// The bf16 dot-product path rounds activations as a bf16 model does:
    /// against the unrounded f64 product it stays within bf16's rounding.
    /// Each term is off by at most 2⁻⁸ of itself (bf16's unit roundoff),
    /// in either direction, so the sum by about 2⁻⁸/√3 of the terms' root
    /// sum of squares; allowed: 1/64 of it, over 6 such deviations.
    #[test]
    fn bf16_dot_products_stay_within_bf16_rounding_of_the_exact_product() {
        if !FloatPath::available().contains(&FloatPath::Avx512Bf16) {
            eprintln!("SKIPPED: this CPU has no AVX-512 BF16; the vdpbf16ps path was not run");
            return;
        }
        let (rows, inp, out) = (16, 4096, 32);
        let x = data(rows * inp, 11);
        let w: Vec<bf16> = data(out * inp, 12)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let packed = PackedFloat::from_rows(&w, out, inp);
        let got = packed.matmul_with(FloatPath::Avx512Bf16, &x, rows);
        let fused = packed.matmul_with(FloatPath::Avx512, &x, rows);
        let mut worst = 0f64;
        for r in 0..rows {
            for j in 0..out {
                let terms = (0..inp).map(|k| x[r * inp + k] as f64 * w[j * inp + k].to_f64());
                let scale = terms.map(|t| t * t).sum::<f64>().sqrt();
                let want: f64 = (0..inp)
                    .map(|k| x[r * inp + k] as f64 * w[j * inp + k].to_f64())
                    .sum();
                let err = (got[r * out + j] as f64 - want).abs() / scale;
                assert!(
                    err <= 1.0 / 64.0,
                    "[{r},{j}]: {} vs {want}",
                    got[r * out + j]
                );
                worst = worst.max(err);
            }
        }
        // The rounding is really there (this is not the fused path).
        assert!(worst > 1e-5, "worst relative error {worst}");
        assert_ne!(got, fused);
    }
}
