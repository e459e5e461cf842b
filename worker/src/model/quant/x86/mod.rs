//! The AVX2 and AVX-512 VNNI kernels. Both take one group (eight weight rows)
//! and `R` activation rows at a time; per block they form the eight rows'
//! integer sums for each activation row, then apply the scales exactly as
//! the scalar reference does. This file has the dispatch, the shared pieces
//! and the 32-weight-block kernels; `kquants.rs` the K-quants'.
//!
//! - AVX2: `vpmaddubsw` (unsigned quants × signed activations) into 16-bit
//!   sums, widened by `vpmaddwd` to 32 bits before they can overflow (each
//!   kernel says when). Q8_0 weights are signed, so the sign moves onto the
//!   activations (`vpsignb`) and each product pair widens at once.
//! - VNNI: `vpdpbusd` does the multiply and the widening in one instruction,
//!   on 256-bit registers (AVX-512VL), with 32 of them to hold eight rows'
//!   accumulators. Q8_0 weights are flipped to unsigned (`q + 128`), and
//!   `128·Σx` taken off afterwards.
//!
//! A quant's high bit (Q5's fifth, Q3_K's third) is kept as a bit plane, a
//! byte of it per byte column of quants; [`high_bit`] turns bit `p` of each
//! byte into the value that bit adds, so a few instructions per 32 bytes of
//! quants rebuild them (the weights are decoded once per group, then used for
//! every activation row).

mod kquants;

use std::arch::x86_64::*;

use super::{BLOCK, Format, GROUP, Isa, QuantizedRows};

/// Runs one group against every activation row, `R` rows at a time.
///
/// # Safety
/// The machine must support `isa` (AVX2, FMA and F16C; plus AVX-512F/VL/VNNI
/// for `Avx512Vnni`).
pub(super) unsafe fn group_rows(
    isa: Isa,
    format: Format,
    w: &[u8],
    x: &QuantizedRows,
    out: &mut [f32],
) {
    // The kernel for format code `F` on the widest `R` the rows left allow.
    macro_rules! widest {
        ($kernel:ident, $widest:literal, $f:expr, $r:expr, $o:expr) => {
            match x.rows - $r {
                n if n >= $widest => $kernel::<{ $f }, $widest>(w, x, $r, $o),
                n if n >= 2 => $kernel::<{ $f }, 2>(w, x, $r, $o),
                _ => $kernel::<{ $f }, 1>(w, x, $r, $o),
            }
        };
    }
    macro_rules! run {
        ($kernel:ident, $widest:literal) => {{
            let mut r = 0;
            while r < x.rows {
                let o = &mut out[r * GROUP..];
                // SAFETY: the caller guarantees the features.
                r += unsafe {
                    match format {
                        Format::Q4_0 => widest!($kernel, $widest, Q4_0, r, o),
                        Format::Q4_1 => widest!($kernel, $widest, Q4_1, r, o),
                        Format::Q5_0 => widest!($kernel, $widest, Q5_0, r, o),
                        Format::Q5_1 => widest!($kernel, $widest, Q5_1, r, o),
                        Format::Q8_0 => widest!($kernel, $widest, Q8_0, r, o),
                        Format::Q2K => widest!($kernel, $widest, Q2K, r, o),
                        Format::Q3K => widest!($kernel, $widest, Q3K, r, o),
                        Format::Q4K => widest!($kernel, $widest, Q4K, r, o),
                        Format::Q5K => widest!($kernel, $widest, Q5K, r, o),
                        Format::Q6K => widest!($kernel, $widest, Q6K, r, o),
                    }
                };
            }
        }};
    }
    match isa {
        Isa::Avx2 => run!(avx2, 4),
        Isa::Avx512Vnni => run!(vnni, 8),
        Isa::Scalar => unreachable!("the scalar path is not here"),
    }
}

// Formats as const-generic codes.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
const Q4K: u8 = 3;
const Q6K: u8 = 4;
const Q5_0: u8 = 5;
const Q5_1: u8 = 6;
const Q5K: u8 = 7;
const Q2K: u8 = 8;
const Q3K: u8 = 9;

const fn format_of(f: u8) -> Format {
    match f {
        Q4_0 => Format::Q4_0,
        Q4_1 => Format::Q4_1,
        Q8_0 => Format::Q8_0,
        Q4K => Format::Q4K,
        Q5_0 => Format::Q5_0,
        Q5_1 => Format::Q5_1,
        Q5K => Format::Q5K,
        Q2K => Format::Q2K,
        Q3K => Format::Q3K,
        _ => Format::Q6K,
    }
}

/// Four activation bytes, `x[r][b][j..j+4]`, in every 32-bit lane.
#[inline(always)]
unsafe fn broadcast4(x: &QuantizedRows, r: usize, b: usize, j: usize) -> __m256i {
    let i = (x.index(r, b) * BLOCK + j) as isize;
    // SAFETY: j + 4 <= BLOCK inside row r's block b.
    unsafe {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            x.qs.as_ptr().offset(i) as *const i32
        ))
    }
}

/// `value` in each byte of `bits` whose bit `p` is set, 0 in the others.
#[inline(always)]
unsafe fn high_bit(bits: __m256i, p: usize, value: i8) -> __m256i {
    // SAFETY: AVX2, the callers' contract.
    unsafe {
        let m = _mm256_set1_epi8((1u8 << p) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bits, m), m);
        _mm256_and_si256(set, _mm256_set1_epi8(value))
    }
}

/// Bit `p` of each byte of `bits` moved to bit `t` (a quant's high bit to
/// where it adds its value), other bits as they fall: mask the result.
/// 16-bit shifts by at most 7 keep every byte's bit within its byte.
#[inline(always)]
unsafe fn bit_to(bits: __m256i, p: i32, t: i32) -> __m256i {
    // SAFETY: AVX2, the callers' contract. The callers pass constants (of
    // their const parameters), so once inlined one arm remains.
    unsafe {
        match p - t {
            -4 => _mm256_slli_epi16::<4>(bits),
            -3 => _mm256_slli_epi16::<3>(bits),
            -2 => _mm256_slli_epi16::<2>(bits),
            -1 => _mm256_slli_epi16::<1>(bits),
            0 => bits,
            1 => _mm256_srli_epi16::<1>(bits),
            2 => _mm256_srli_epi16::<2>(bits),
            3 => _mm256_srli_epi16::<3>(bits),
            4 => _mm256_srli_epi16::<4>(bits),
            5 => _mm256_srli_epi16::<5>(bits),
            _ => unreachable!("no quant's high bit is that far"),
        }
    }
}

/// How far ahead of the block in hand a batched product asks for weights,
/// in bytes.
const AHEAD: usize = 4096;

/// With more than one activation row, asks the cache for the `bytes` of
/// weights that start [`AHEAD`] bytes past `wb` (a few blocks on; past a
/// group's end, the next group's, which follows it in memory). A batched
/// product spends long enough on each block that the hardware prefetcher
/// alone let the next block's loads wait for memory: on 7B's MLP at 8 rows,
/// 116 → 157 GMAC/s (Q4_0), 150 → 179 (Q4_K), 66 → 97 (Q6_K), medians of 15
/// (BENCHMARKS.md). One row streams the weights at the memory's rate
/// without it, and lost 8% (Q4_K) and 20% (Q6_K) with it. A prefetch never
/// faults, so an address past the matrix is harmless.
#[inline(always)]
unsafe fn prefetch_ahead<const R: usize>(wb: *const u8, bytes: usize) {
    if R == 1 {
        return;
    }
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(AHEAD + line) as *const i8) };
    }
}

/// 32 bytes at `p`.
#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the callers' bounds.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// Eight f16 at `p`, as f32.
#[inline(always)]
unsafe fn load_f16(p: *const u8) -> __m256 {
    // SAFETY: the callers' bounds; F16C, their contract.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Applies block `b`'s scales to the integer sums of rows `r0..r0+R`, as
/// the scalar reference does: `acc += isum·(d_w·d_x)`, then
/// `acc += m_w·(d_x·Σq)`.
#[inline(always)]
unsafe fn scale_block<const F: u8, const R: usize>(
    wb: *const u8,
    x: &QuantizedRows,
    r0: usize,
    b: usize,
    offset: i32,
    isum: [__m256i; R],
    acc: &mut [__m256; R],
) {
    let format = format_of(F);
    let with_min = F == Q4_1 || F == Q5_1;
    // SAFETY: the scales (and mins) follow the quants inside the block.
    unsafe {
        let scales = wb.add(GROUP * format.quant_bytes());
        let dw = load_f16(scales);
        let mw = if with_min {
            load_f16(scales.add(2 * GROUP))
        } else {
            _mm256_setzero_ps()
        };
        for r in 0..R {
            let xi = x.index(r0 + r, b);
            let mut s = isum[r];
            if offset != 0 {
                s = _mm256_sub_epi32(s, _mm256_set1_epi32(offset * x.sum[xi]));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[xi]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
            if with_min {
                acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[xi]), acc[r]);
            }
        }
    }
}

unsafe fn store<const R: usize>(acc: [__m256; R], out: &mut [f32]) {
    assert!(out.len() >= R * GROUP);
    for (r, a) in acc.into_iter().enumerate() {
        // SAFETY: checked above.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * GROUP), a) };
    }
}

/// The kernel for format `F` with or without VNNI; returns `R`, the
/// activation rows done.
#[inline(always)]
unsafe fn kernel<const F: u8, const R: usize, const VNNI: bool>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: the callers' features; the kernels check their bounds.
    unsafe {
        match F {
            Q2K => kquants::k2::<R, VNNI, false>(w, x, r0, out),
            Q3K => kquants::k2::<R, VNNI, true>(w, x, r0, out),
            Q4K => kquants::k4::<R, VNNI, false>(w, x, r0, out),
            Q5K => kquants::k4::<R, VNNI, true>(w, x, r0, out),
            Q6K => kquants::q6k::<R, VNNI>(w, x, r0, out),
            _ => blocks32::<F, R, VNNI>(w, x, r0, out),
        }
    }
}

/// The AVX2 kernel for format `F`; returns `R`, the activation rows done.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const F: u8, const R: usize>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: the same features.
    unsafe { kernel::<F, R, false>(w, x, r0, out) }
}

/// The VNNI kernel for format `F`; returns `R`, the activation rows done.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn vnni<const F: u8, const R: usize>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: the same features.
    unsafe { kernel::<F, R, true>(w, x, r0, out) }
}

/// Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (32-weight blocks): per block the eight
/// rows' integer sums for each activation row, then `scale_block`. On AVX2
/// 4-bit sums stay 16-bit for the whole block (8 × 2 × 15 × 127 < 2¹⁵),
/// 5-bit ones for half of it (4 × 2 × 31 × 127 < 2¹⁵). Returns `R`.
///
/// # Safety
/// AVX2, FMA and F16C; with `VNNI` also AVX-512F/VL/VNNI.
#[inline(always)]
unsafe fn blocks32<const F: u8, const R: usize, const VNNI: bool>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    let format = format_of(F);
    let five = F == Q5_0 || F == Q5_1;
    let gb = format.group_block_bytes();
    assert!(w.len() >= x.blocks * gb && r0 + R <= x.rows);
    // VNNI takes Q8_0's quants as unsigned (q + 128) and removes 128·Σx.
    let offset = if VNNI && F == Q8_0 {
        128
    } else {
        format.offset()
    };
    // SAFETY: block b of the group lies within w (asserted above), and
    // broadcast4 stays within row r's block b.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..x.blocks {
            let wb = w.as_ptr().add(b * gb);
            prefetch_ahead::<R>(wb, gb);
            let mut isum = [_mm256_setzero_si256(); R];
            if F == Q8_0 {
                for k in 0..BLOCK / 4 {
                    let q = load(wb.add(k * 32));
                    if VNNI {
                        let uq = _mm256_xor_si256(q, flip);
                        for (r, s) in isum.iter_mut().enumerate() {
                            *s = dpbusd(*s, uq, broadcast4(x, r0 + r, b, 4 * k));
                        }
                    } else {
                        let aq = _mm256_abs_epi8(q);
                        for (r, s) in isum.iter_mut().enumerate() {
                            let xs = _mm256_sign_epi8(broadcast4(x, r0 + r, b, 4 * k), q);
                            let pairs = _mm256_maddubs_epi16(aq, xs);
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
            } else {
                let bits = if five {
                    load(wb.add(GROUP * 16))
                } else {
                    _mm256_setzero_si256()
                };
                // AVX2's 16-bit sums of 4-bit quants (see `nibbles`).
                let mut isum16 = [_mm256_setzero_si256(); R];
                nibbles::<F, R, VNNI, 0>(wb, bits, x, r0, b, &mut isum, &mut isum16);
                nibbles::<F, R, VNNI, 1>(wb, bits, x, r0, b, &mut isum, &mut isum16);
                nibbles::<F, R, VNNI, 2>(wb, bits, x, r0, b, &mut isum, &mut isum16);
                nibbles::<F, R, VNNI, 3>(wb, bits, x, r0, b, &mut isum, &mut isum16);
                if !VNNI && !five {
                    for r in 0..R {
                        isum[r] = _mm256_madd_epi16(isum16[r], ones);
                    }
                }
            }
            scale_block::<F, R>(wb, x, r0, b, offset, isum, &mut acc);
        }
        store(acc, out);
    }
    R
}

/// Byte column `K` (bytes `4K..4K+4` of each row) of a 4- or 5-bit block:
/// the nibbles are quants `4K..4K+4` and `16+4K..`, their fifth bits bits
/// `2K` and `2K + 1` of `bits`; adds their products with the activations
/// to `isum`. On AVX2, 4-bit products go to the 16-bit `isum16` for the
/// caller to widen after the block (8 × 2 × 15 × 127 < 2¹⁵); 5-bit ones
/// are added in pairs in 16 bits (2 × 2 × 31 × 127 < 2¹⁵) and widened at
/// once.
#[inline(always)]
unsafe fn nibbles<const F: u8, const R: usize, const VNNI: bool, const K: i32>(
    wb: *const u8,
    bits: __m256i,
    x: &QuantizedRows,
    r0: usize,
    b: usize,
    isum: &mut [__m256i; R],
    isum16: &mut [__m256i; R],
) {
    let k = K as usize;
    let five = F == Q5_0 || F == Q5_1;
    // SAFETY: within block b (the caller's bounds).
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let q = load(wb.add(k * 32));
        let mut lo = _mm256_and_si256(q, nibble);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
        if five {
            let sixteen = _mm256_set1_epi8(16);
            lo = _mm256_or_si256(lo, _mm256_and_si256(bit_to(bits, 2 * K, 4), sixteen));
            hi = _mm256_or_si256(hi, _mm256_and_si256(bit_to(bits, 2 * K + 1, 4), sixteen));
        }
        for r in 0..R {
            let xl = broadcast4(x, r0 + r, b, 4 * k);
            let xh = broadcast4(x, r0 + r, b, 16 + 4 * k);
            if VNNI {
                isum[r] = dpbusd(dpbusd(isum[r], lo, xl), hi, xh);
            } else {
                let pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                if five {
                    isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, ones));
                } else {
                    isum16[r] = _mm256_add_epi16(isum16[r], pairs);
                }
            }
        }
    }
}

/// `vpdpbusd` on 256 bits; only called where VNNI was detected.
#[inline(always)]
unsafe fn dpbusd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_dpbusd_epi32(acc, a, b) }
}
