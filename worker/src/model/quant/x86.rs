//! The AVX2 and AVX-512 VNNI kernels. Both take one group (eight weight rows)
//! and `R` activation rows at a time; per block they form the eight rows'
//! integer sums for each activation row, then apply the scales exactly as
//! the scalar reference does.
//!
//! - AVX2: `vpmaddubsw` (unsigned 4-bit quants × signed activations) into
//!   16-bit sums, which cannot overflow within a block (8 × 2 × 15 × 128),
//!   then `vpmaddwd` to 32 bits. Q8_0 weights are signed, so the sign moves
//!   onto the activations (`vpsignb`) and each product pair widens at once.
//! - VNNI: `vpdpbusd` does the multiply and the widening in one instruction,
//!   on 256-bit registers (AVX-512VL), with 32 of them to hold eight rows'
//!   accumulators. Q8_0 weights are flipped to unsigned (`q + 128`), and
//!   `128·Σx` taken off afterwards.

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
    macro_rules! run {
        ($kernel:ident, $widest:literal) => {{
            let mut r = 0;
            while r < x.rows {
                let o = &mut out[r * GROUP..];
                // SAFETY: the caller guarantees the features.
                r += unsafe {
                    match (x.rows - r, format) {
                        (n, Format::Q4_0) if n >= $widest => $kernel::<0, $widest>(w, x, r, o),
                        (n, Format::Q4_1) if n >= $widest => $kernel::<1, $widest>(w, x, r, o),
                        (n, Format::Q8_0) if n >= $widest => $kernel::<2, $widest>(w, x, r, o),
                        (n, Format::Q4_0) if n >= 2 => $kernel::<0, 2>(w, x, r, o),
                        (n, Format::Q4_1) if n >= 2 => $kernel::<1, 2>(w, x, r, o),
                        (n, Format::Q8_0) if n >= 2 => $kernel::<2, 2>(w, x, r, o),
                        (_, Format::Q4_0) => $kernel::<0, 1>(w, x, r, o),
                        (_, Format::Q4_1) => $kernel::<1, 1>(w, x, r, o),
                        (_, Format::Q8_0) => $kernel::<2, 1>(w, x, r, o),
                        (n, Format::Q4K) if n >= $widest => $kernel::<3, $widest>(w, x, r, o),
                        (n, Format::Q4K) if n >= 2 => $kernel::<3, 2>(w, x, r, o),
                        (_, Format::Q4K) => $kernel::<3, 1>(w, x, r, o),
                        (n, Format::Q6K) if n >= $widest => $kernel::<4, $widest>(w, x, r, o),
                        (n, Format::Q6K) if n >= 2 => $kernel::<4, 2>(w, x, r, o),
                        (_, Format::Q6K) => $kernel::<4, 1>(w, x, r, o),
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

const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
const Q4K: u8 = 3;
const Q6K: u8 = 4;

fn format_of(f: u8) -> Format {
    match f {
        0 => Format::Q4_0,
        Q4_1 => Format::Q4_1,
        Q8_0 => Format::Q8_0,
        Q4K => Format::Q4K,
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

/// Applies block `b`'s scales to the integer sums of rows `r0..r0+R`, as
/// `scalar_group` does: `acc += isum·(d_w·d_x)`, then `acc += m_w·(d_x·Σq)`.
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
    // SAFETY: the scales (and mins) follow the quants inside the block.
    unsafe {
        let scales = wb.add(GROUP * format.quant_bytes());
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(scales as *const __m128i));
        let mw = if F == Q4_1 {
            _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * GROUP) as *const __m128i))
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
            if F == Q4_1 {
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

/// The AVX2 kernel for format `F`; returns `R`, the activation rows done.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const F: u8, const R: usize>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: the same features; the kernels check their bounds.
    unsafe {
        match F {
            Q4K => q4k::<R, false>(w, x, r0, out),
            Q6K => q6k::<R, false>(w, x, r0, out),
            _ => blocks32::<F, R, false>(w, x, r0, out),
        }
    }
}

/// The VNNI kernel for format `F`; returns `R`, the activation rows done.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn vnni<const F: u8, const R: usize>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: the same features; the kernels check their bounds.
    unsafe {
        match F {
            Q4K => q4k::<R, true>(w, x, r0, out),
            Q6K => q6k::<R, true>(w, x, r0, out),
            _ => blocks32::<F, R, true>(w, x, r0, out),
        }
    }
}

/// Q4_0, Q4_1 and Q8_0 (32-weight blocks): per block the eight rows'
/// integer sums for each activation row, then `scale_block`. Returns `R`.
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
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..x.blocks {
            let wb = w.as_ptr().add(b * gb);
            let mut isum = [_mm256_setzero_si256(); R];
            if F == Q8_0 {
                for k in 0..BLOCK / 4 {
                    let q = _mm256_loadu_si256(wb.add(k * 32) as *const __m256i);
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
                // Without VNNI, isum holds 16-bit sums until the block ends.
                for k in 0..BLOCK / 8 {
                    let q = _mm256_loadu_si256(wb.add(k * 32) as *const __m256i);
                    let lo = _mm256_and_si256(q, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
                    for (r, s) in isum.iter_mut().enumerate() {
                        let xl = broadcast4(x, r0 + r, b, 4 * k);
                        let xh = broadcast4(x, r0 + r, b, 16 + 4 * k);
                        if VNNI {
                            *s = dpbusd(dpbusd(*s, lo, xl), hi, xh);
                        } else {
                            let pl = _mm256_maddubs_epi16(lo, xl);
                            let ph = _mm256_maddubs_epi16(hi, xh);
                            *s = _mm256_add_epi16(*s, _mm256_add_epi16(pl, ph));
                        }
                    }
                }
                if !VNNI {
                    isum = isum.map(|s| _mm256_madd_epi16(s, ones));
                }
            }
            scale_block::<F, R>(wb, x, r0, b, offset, isum, &mut acc);
        }
        store(acc, out);
    }
    R
}

/// Q4_K: per 64-weight chunk of a super-block, the integer sums of its two
/// sub-blocks (low and high nibbles), then `acc += isum·((d·scᵢ)·d_x)` and
/// `acc -= (dmin·mᵢ)·(d_x·Σq)`, as `scalar_group_q4k`. `VNNI` picks
/// `vpdpbusd` over `vpmaddubsw` + `vpmaddwd` (16-bit sums cannot overflow:
/// 8 × 2 × 15 × 128 < 2¹⁵). Returns `R`.
///
/// # Safety
/// AVX2, FMA and F16C; with `VNNI` also AVX-512F/VL/VNNI.
#[inline(always)]
unsafe fn q4k<const R: usize, const VNNI: bool>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    let gb = Format::Q4K.group_block_bytes();
    let supers = x.blocks / 8;
    assert!(w.len() >= supers * gb && r0 + R <= x.rows);
    let sc = GROUP * Format::Q4K.quant_bytes();
    // SAFETY: every access below stays within super-block b of the group
    // (asserted above) or within row r's 32-blocks (broadcast4).
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..supers {
            let wb = w.as_ptr().add(b * gb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(sc + 128) as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(sc + 144) as *const __m128i));
            for c in 0..4 {
                let (lo_blk, hi_blk) = (b * 8 + 2 * c, b * 8 + 2 * c + 1);
                let mut lo_sum = [_mm256_setzero_si256(); R];
                let mut hi_sum = [_mm256_setzero_si256(); R];
                for l4 in 0..8 {
                    let q = _mm256_loadu_si256(wb.add((c * 8 + l4) * 32) as *const __m256i);
                    let lo = _mm256_and_si256(q, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
                    for r in 0..R {
                        let xl = broadcast4(x, r0 + r, lo_blk, 4 * l4);
                        let xh = broadcast4(x, r0 + r, hi_blk, 4 * l4);
                        if VNNI {
                            lo_sum[r] = dpbusd(lo_sum[r], lo, xl);
                            hi_sum[r] = dpbusd(hi_sum[r], hi, xh);
                        } else {
                            lo_sum[r] = _mm256_add_epi16(lo_sum[r], _mm256_maddubs_epi16(lo, xl));
                            hi_sum[r] = _mm256_add_epi16(hi_sum[r], _mm256_maddubs_epi16(hi, xh));
                        }
                    }
                }
                for (i, sums) in [(2 * c, lo_sum), (2 * c + 1, hi_sum)] {
                    let widen = |p: *const u8| {
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            p as *const __m128i,
                        )))
                    };
                    let dsc = _mm256_mul_ps(d, widen(wb.add(sc + i * GROUP)));
                    let dm = _mm256_mul_ps(dmin, widen(wb.add(sc + 64 + i * GROUP)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xi = x.index(r0 + r, b * 8 + i);
                        let s = if VNNI {
                            sums[r]
                        } else {
                            _mm256_madd_epi16(sums[r], ones)
                        };
                        let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(x.d[xi]));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *a);
                        *a = _mm256_fnmadd_ps(dm, _mm256_set1_ps(x.s[xi]), *a);
                    }
                }
            }
        }
        store(acc, out);
    }
    R
}

/// Q6_K: per 16 weights, the integer sum of `q·x` (quants 0..63) less
/// `32·Σx`, then `acc += isum·((d·scᵢ)·d_x)`, as `scalar_group_q6k`. On
/// AVX2 two `vpmaddubsw` results are added in 16 bits (2 × 2 × 63 × 128 <
/// 2¹⁵) before widening. Returns `R`.
///
/// # Safety
/// AVX2, FMA and F16C; with `VNNI` also AVX-512F/VL/VNNI.
#[inline(always)]
unsafe fn q6k<const R: usize, const VNNI: bool>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    let gb = Format::Q6K.group_block_bytes();
    let supers = x.blocks / 8;
    assert!(w.len() >= supers * gb && r0 + R <= x.rows);
    let sc = GROUP * Format::Q6K.quant_bytes();
    // SAFETY: every access below stays within super-block b of the group
    // (asserted above) or within row r's 32-blocks (broadcast4).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..supers {
            let wb = w.as_ptr().add(b * gb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(sc + 128) as *const __m128i));
            for i in 0..16 {
                let (blk, off) = (b * 8 + i / 2, (i % 2) * 16);
                let mut sums = [_mm256_setzero_si256(); R];
                for pair in 0..2 {
                    let k = 4 * i + 2 * pair;
                    let q0 = _mm256_loadu_si256(wb.add(k * 32) as *const __m256i);
                    let q1 = _mm256_loadu_si256(wb.add((k + 1) * 32) as *const __m256i);
                    for (r, s) in sums.iter_mut().enumerate() {
                        let x0 = broadcast4(x, r0 + r, blk, off + 8 * pair);
                        let x1 = broadcast4(x, r0 + r, blk, off + 8 * pair + 4);
                        if VNNI {
                            *s = dpbusd(dpbusd(*s, q0, x0), q1, x1);
                        } else {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(q0, x0),
                                _mm256_maddubs_epi16(q1, x1),
                            );
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                let scales = _mm_loadl_epi64(wb.add(sc + i * GROUP) as *const __m128i);
                let dsc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xi = x.index(r0 + r, blk);
                    let hs = x.half_sum[2 * xi + i % 2];
                    let s = _mm256_sub_epi32(sums[r], _mm256_set1_epi32(32 * hs));
                    let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(x.d[xi]));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *a);
                }
            }
        }
        store(acc, out);
    }
    R
}

/// `vpdpbusd` on 256 bits; only called where VNNI was detected.
#[inline(always)]
unsafe fn dpbusd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_dpbusd_epi32(acc, a, b) }
}
