//! The K-quant kernels (256-weight super-blocks): Q2_K and Q3_K (16-weight
//! sub-blocks, 2-bit fields packed four to a byte), Q4_K and Q5_K (32-weight
//! sub-blocks, nibbles), Q6_K (16-weight sub-blocks, nibbles and 2-bit high
//! parts).
//! Each applies the scales per sub-block exactly as its scalar reference.

use std::arch::x86_64::*;

use super::{broadcast4, dpbusd, high_bit, load, load_f16, prefetch_ahead, store};
use crate::model::quant::{Format, GROUP, QuantizedRows};

/// Eight bytes at `p` as f32, unsigned.
#[inline(always)]
unsafe fn widen_u8(p: *const u8) -> __m256 {
    // SAFETY: the callers' bounds.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}

/// Eight bytes at `p` as f32, signed.
#[inline(always)]
unsafe fn widen_i8(p: *const u8) -> __m256 {
    // SAFETY: the callers' bounds.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}

/// Q2_K (`THREE` false) and Q3_K: per 16-weight sub-block `i = 8h + 2j +
/// half`, the integer sums of its quants (field `j` of the quant bytes of
/// half `h`, plus 4 where Q3_K's mask has bit `4h + j`) with the
/// activations, then as `scalar::k2`:
/// - Q2_K: `acc += isum·((d·scᵢ)·d_x)`, `acc -= (dmin·mᵢ)·(d_x·Σq)`;
/// - Q3_K: `acc += (isum - 4·Σq)·((d·scᵢ)·d_x)`.
///
/// On AVX2 the four `vpmaddubsw` of a sub-block add up in 16 bits
/// (4 × 2 × 7 × 127 < 2¹⁵). Returns `R`.
///
/// # Safety
/// AVX2, FMA and F16C; with `VNNI` also AVX-512F/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn k2<const R: usize, const VNNI: bool, const THREE: bool>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    let format = if THREE { Format::Q3K } else { Format::Q2K };
    let gb = format.group_block_bytes();
    let supers = x.blocks / 8;
    assert!(w.len() >= supers * gb && r0 + R <= x.rows);
    let sc = GROUP * format.quant_bytes();
    // SAFETY: every access below stays within super-block b of the group
    // (asserted above) or within row r's 32-blocks (broadcast4).
    unsafe {
        let three = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let low4 = _mm256_set1_epi32(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..supers {
            let wb = w.as_ptr().add(b * gb);
            prefetch_ahead::<R>(wb, gb);
            let d = load_f16(wb.add(sc + 128));
            let dmin = if THREE {
                _mm256_setzero_ps()
            } else {
                load_f16(wb.add(sc + 144))
            };
            for h in 0..2 {
                for j in 0..4 {
                    // Activation block of these 32 weights (per row).
                    let blk = b * 8 + 4 * h + j;
                    let shift = _mm256_set1_epi32(2 * j as i32);
                    for half in 0..2 {
                        let i = 8 * h + 2 * j + half;
                        let mut sums = [_mm256_setzero_si256(); R];
                        for l4 in 4 * half..4 * half + 4 {
                            // 32-bit shifts keep each byte's field in its byte.
                            let q = load(wb.add((8 * h + l4) * 32));
                            let mut v = _mm256_and_si256(_mm256_srlv_epi32(q, shift), three);
                            if THREE {
                                let mask = load(wb.add(GROUP * 64 + l4 * 32));
                                v = _mm256_or_si256(v, high_bit(mask, 4 * h + j, 4));
                            }
                            for (r, s) in sums.iter_mut().enumerate() {
                                let xv = broadcast4(x, r0 + r, blk, 4 * l4);
                                *s = if VNNI {
                                    dpbusd(*s, v, xv)
                                } else {
                                    _mm256_add_epi16(*s, _mm256_maddubs_epi16(v, xv))
                                };
                            }
                        }
                        let scales = wb.add(sc + i * GROUP);
                        let (dsc, dm) = if THREE {
                            (_mm256_mul_ps(d, widen_i8(scales)), d)
                        } else {
                            let s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(scales as *const __m128i));
                            let scale = _mm256_cvtepi32_ps(_mm256_and_si256(s, low4));
                            let min = _mm256_cvtepi32_ps(_mm256_srli_epi32(s, 4));
                            (_mm256_mul_ps(d, scale), _mm256_mul_ps(dmin, min))
                        };
                        for (r, a) in acc.iter_mut().enumerate() {
                            let xi = x.index(r0 + r, blk);
                            let hs = x.half_sum[2 * xi + half];
                            let mut s = if VNNI {
                                sums[r]
                            } else {
                                _mm256_madd_epi16(sums[r], ones)
                            };
                            if THREE {
                                s = _mm256_sub_epi32(s, _mm256_set1_epi32(4 * hs));
                            }
                            let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(x.d[xi]));
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *a);
                            if !THREE {
                                let xs = _mm256_set1_ps(x.d[xi] * hs as f32);
                                *a = _mm256_fnmadd_ps(dm, xs, *a);
                            }
                        }
                    }
                }
            }
        }
        store(acc, out);
    }
    R
}

/// Q4_K (`FIVE` false) and Q5_K: per 64-weight chunk `c` of a super-block,
/// the integer sums of its two sub-blocks (see [`k4_chunk`]), then
/// `acc += isum·((d·scᵢ)·d_x)` and `acc -= (dmin·mᵢ)·(d_x·Σq)`, as
/// `scalar::k4`. Returns `R`.
///
/// # Safety
/// AVX2, FMA and F16C; with `VNNI` also AVX-512F/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn k4<const R: usize, const VNNI: bool, const FIVE: bool>(
    w: &[u8],
    x: &QuantizedRows,
    r0: usize,
    out: &mut [f32],
) -> usize {
    let format = if FIVE { Format::Q5K } else { Format::Q4K };
    let gb = format.group_block_bytes();
    let supers = x.blocks / 8;
    assert!(w.len() >= supers * gb && r0 + R <= x.rows);
    let sc = format.scales_at();
    // SAFETY: every access below stays within super-block b of the group
    // (asserted above) or within row r's 32-blocks (broadcast4).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..supers {
            let wb = w.as_ptr().add(b * gb);
            prefetch_ahead::<R>(wb, gb);
            let d = load_f16(wb.add(sc + 128));
            let dmin = load_f16(wb.add(sc + 144));
            let (r0, s) = (r0, (d, dmin, sc));
            k4_scale(
                wb,
                x,
                r0,
                b,
                0,
                s,
                k4_chunk::<R, VNNI, FIVE, 0>(wb, x, r0, b),
                &mut acc,
            );
            k4_scale(
                wb,
                x,
                r0,
                b,
                1,
                s,
                k4_chunk::<R, VNNI, FIVE, 1>(wb, x, r0, b),
                &mut acc,
            );
            k4_scale(
                wb,
                x,
                r0,
                b,
                2,
                s,
                k4_chunk::<R, VNNI, FIVE, 2>(wb, x, r0, b),
                &mut acc,
            );
            k4_scale(
                wb,
                x,
                r0,
                b,
                3,
                s,
                k4_chunk::<R, VNNI, FIVE, 3>(wb, x, r0, b),
                &mut acc,
            );
        }
        store(acc, out);
    }
    R
}

/// Applies chunk `c`'s scales to its two sub-blocks' integer sums; `s` is
/// (d, dmin, the offset of the scales in the super-block).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn k4_scale<const R: usize>(
    wb: *const u8,
    x: &QuantizedRows,
    r0: usize,
    b: usize,
    c: usize,
    (d, dmin, sc): (__m256, __m256, usize),
    [lo_sum, hi_sum]: [[__m256i; R]; 2],
    acc: &mut [__m256; R],
) {
    // SAFETY: within super-block b (the caller's bounds).
    unsafe {
        for (i, sums) in [(2 * c, lo_sum), (2 * c + 1, hi_sum)] {
            let dsc = _mm256_mul_ps(d, widen_u8(wb.add(sc + i * GROUP)));
            let dm = _mm256_mul_ps(dmin, widen_u8(wb.add(sc + 64 + i * GROUP)));
            for (r, a) in acc.iter_mut().enumerate() {
                let xi = x.index(r0 + r, b * 8 + i);
                let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(x.d[xi]));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, *a);
                *a = _mm256_fnmadd_ps(dm, _mm256_set1_ps(x.s[xi]), *a);
            }
        }
    }
}

/// Quants of byte column `l4` of chunk `C`: low and high nibbles, plus 16
/// where (Q5_K) the fifth bit is set: bits `l4 % 4` and `4 + l4 % 4` of the
/// half's bit column (see `repack::q5k`).
#[inline(always)]
unsafe fn k4_quants<const FIVE: bool, const C: i32>(
    wb: *const u8,
    l4: usize,
) -> (__m256i, __m256i) {
    // SAFETY: within the super-block (the caller's bounds).
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let c = C as usize;
        let wb = wb.add(if FIVE { Format::Q5K } else { Format::Q4K }.quants_at());
        if !FIVE {
            let q = load(wb.add((c * 8 + l4) * 32));
            return (
                _mm256_and_si256(q, nibble),
                _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble),
            );
        }
        let half = wb.add(c * 320 + l4 / 4 * 160);
        let q = load(half.add(l4 % 4 * 32));
        // Column m's bits to bits 0 and 4 (16-bit shifts by at most 3 keep
        // them within their byte).
        let bits = _mm256_srl_epi16(load(half.add(128)), _mm_cvtsi32_si128((l4 % 4) as i32));
        let sixteen = _mm256_set1_epi8(16);
        let lo = _mm256_or_si256(
            _mm256_and_si256(q, nibble),
            _mm256_and_si256(_mm256_slli_epi16(bits, 4), sixteen),
        );
        let hi = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble),
            _mm256_and_si256(bits, sixteen),
        );
        (lo, hi)
    }
}

/// Chunk `C` (64 weights) of super-block `b`: the integer sums of its two
/// sub-blocks for rows `r0..r0+R`, from the low and high nibbles (plus 16
/// where Q5_K's fifth bit is set). `VNNI` picks
/// `vpdpbusd` over `vpmaddubsw` + `vpmaddwd`. AVX2 keeps 4-bit sums in 16
/// bits for the chunk (8 × 2 × 15 × 127 < 2¹⁵) and adds 5-bit ones in pairs
/// (2 × 2 × 31 × 127 < 2¹⁵) before widening.
#[inline(always)]
unsafe fn k4_chunk<const R: usize, const VNNI: bool, const FIVE: bool, const C: i32>(
    wb: *const u8,
    x: &QuantizedRows,
    r0: usize,
    b: usize,
) -> [[__m256i; R]; 2] {
    let c = C as usize;
    let (lo_blk, hi_blk) = (b * 8 + 2 * c, b * 8 + 2 * c + 1);
    // SAFETY: within super-block b (the caller's bounds) and row r's
    // 32-blocks.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut lo_sum = [_mm256_setzero_si256(); R];
        let mut hi_sum = [_mm256_setzero_si256(); R];
        if VNNI {
            for l4 in 0..8 {
                let (lo, hi) = k4_quants::<FIVE, C>(wb, l4);
                for r in 0..R {
                    let xl = broadcast4(x, r0 + r, lo_blk, 4 * l4);
                    let xh = broadcast4(x, r0 + r, hi_blk, 4 * l4);
                    lo_sum[r] = dpbusd(lo_sum[r], lo, xl);
                    hi_sum[r] = dpbusd(hi_sum[r], hi, xh);
                }
            }
        } else if FIVE {
            for l4 in (0..8).step_by(2) {
                let (lo0, hi0) = k4_quants::<FIVE, C>(wb, l4);
                let (lo1, hi1) = k4_quants::<FIVE, C>(wb, l4 + 1);
                for r in 0..R {
                    let (xl0, xl1) = (
                        broadcast4(x, r0 + r, lo_blk, 4 * l4),
                        broadcast4(x, r0 + r, lo_blk, 4 * l4 + 4),
                    );
                    let (xh0, xh1) = (
                        broadcast4(x, r0 + r, hi_blk, 4 * l4),
                        broadcast4(x, r0 + r, hi_blk, 4 * l4 + 4),
                    );
                    let pl = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo0, xl0),
                        _mm256_maddubs_epi16(lo1, xl1),
                    );
                    let ph = _mm256_add_epi16(
                        _mm256_maddubs_epi16(hi0, xh0),
                        _mm256_maddubs_epi16(hi1, xh1),
                    );
                    lo_sum[r] = _mm256_add_epi32(lo_sum[r], _mm256_madd_epi16(pl, ones));
                    hi_sum[r] = _mm256_add_epi32(hi_sum[r], _mm256_madd_epi16(ph, ones));
                }
            }
        } else {
            for l4 in 0..8 {
                let (lo, hi) = k4_quants::<FIVE, C>(wb, l4);
                for r in 0..R {
                    let xl = broadcast4(x, r0 + r, lo_blk, 4 * l4);
                    let xh = broadcast4(x, r0 + r, hi_blk, 4 * l4);
                    lo_sum[r] = _mm256_add_epi16(lo_sum[r], _mm256_maddubs_epi16(lo, xl));
                    hi_sum[r] = _mm256_add_epi16(hi_sum[r], _mm256_maddubs_epi16(hi, xh));
                }
            }
            // (Loops, not closures: a closure would not inherit the
            // caller's target features and its intrinsics would be calls.)
            for r in 0..R {
                lo_sum[r] = _mm256_madd_epi16(lo_sum[r], ones);
                hi_sum[r] = _mm256_madd_epi16(hi_sum[r], ones);
            }
        }
        [lo_sum, hi_sum]
    }
}

/// Q6_K: per 16 weights, the integer sum of `q·x` (quants 0..63) less
/// `32·Σx`, then `acc += isum·((d·scᵢ)·d_x)`, in `scalar::q6k`'s order,
/// reading the super-block front to back (see `repack::q6k`). On AVX2 two
/// `vpmaddubsw` results are added in 16 bits (2 × 2 × 63 × 127 < 2¹⁵)
/// before widening. Returns `R`.
///
/// # Safety
/// AVX2, FMA and F16C; with `VNNI` also AVX-512F/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn q6k<const R: usize, const VNNI: bool>(
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
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..supers {
            let wb = w.as_ptr().add(b * gb);
            prefetch_ahead::<R>(wb, gb);
            let d = load_f16(wb.add(sc + 128));
            for n in 0..2 {
                for p in 0..2 {
                    q6k_sixteen::<R, VNNI>(wb, x, r0, (b, n, p, 0), d, &mut acc);
                    q6k_sixteen::<R, VNNI>(wb, x, r0, (b, n, p, 1), d, &mut acc);
                }
            }
        }
        store(acc, out);
    }
    R
}

/// Sixteen `l` at `16s` of half `n`, nibble run `p` of super-block `b`:
/// the sub-blocks of kinds `p` (low nibbles) and `p + 2` (high), summed
/// from one 192-byte chunk and scaled into `acc`.
#[inline(always)]
unsafe fn q6k_sixteen<const R: usize, const VNNI: bool>(
    wb: *const u8,
    x: &QuantizedRows,
    r0: usize,
    (b, n, p, s): (usize, usize, usize, usize),
    d: __m256,
    acc: &mut [__m256; R],
) {
    let sc = GROUP * Format::Q6K.quant_bytes();
    let (lo_blk, hi_blk) = (b * 8 + 4 * n + p, b * 8 + 4 * n + p + 2);
    let chunk = ((n * 2 + p) * 2 + s) * 192;
    // SAFETY: within super-block b (the caller's bounds) and row r's
    // 32-blocks.
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let top = _mm256_set1_epi8(0x30);
        let ones = _mm256_set1_epi16(1);
        let mut lo_sum = [_mm256_setzero_si256(); R];
        let mut hi_sum = [_mm256_setzero_si256(); R];
        for c in 0..2 {
            let pair = wb.add(chunk + 96 * c);
            let (q0, q1, h) = (load(pair), load(pair.add(32)), load(pair.add(64)));
            let lo0 = _mm256_or_si256(
                _mm256_and_si256(q0, nibble),
                _mm256_and_si256(_mm256_slli_epi16::<4>(h), top),
            );
            let hi0 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q0), nibble),
                _mm256_and_si256(_mm256_slli_epi16::<2>(h), top),
            );
            let lo1 = _mm256_or_si256(_mm256_and_si256(q1, nibble), _mm256_and_si256(h, top));
            let hi1 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q1), nibble),
                _mm256_and_si256(_mm256_srli_epi16::<2>(h), top),
            );
            let l = 16 * s + 8 * c;
            for r in 0..R {
                let (xl0, xl1) = (
                    broadcast4(x, r0 + r, lo_blk, l),
                    broadcast4(x, r0 + r, lo_blk, l + 4),
                );
                let (xh0, xh1) = (
                    broadcast4(x, r0 + r, hi_blk, l),
                    broadcast4(x, r0 + r, hi_blk, l + 4),
                );
                if VNNI {
                    lo_sum[r] = dpbusd(dpbusd(lo_sum[r], lo0, xl0), lo1, xl1);
                    hi_sum[r] = dpbusd(dpbusd(hi_sum[r], hi0, xh0), hi1, xh1);
                } else {
                    let pl = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo0, xl0),
                        _mm256_maddubs_epi16(lo1, xl1),
                    );
                    let ph = _mm256_add_epi16(
                        _mm256_maddubs_epi16(hi0, xh0),
                        _mm256_maddubs_epi16(hi1, xh1),
                    );
                    lo_sum[r] = _mm256_add_epi32(lo_sum[r], _mm256_madd_epi16(pl, ones));
                    hi_sum[r] = _mm256_add_epi32(hi_sum[r], _mm256_madd_epi16(ph, ones));
                }
            }
        }
        for (k, blk, sums) in [(p, lo_blk, lo_sum), (p + 2, hi_blk, hi_sum)] {
            let i = 8 * n + 2 * k + s;
            let dsc = _mm256_mul_ps(d, widen_i8(wb.add(sc + i * GROUP)));
            for (r, a) in acc.iter_mut().enumerate() {
                let xi = x.index(r0 + r, blk);
                let hs = x.half_sum[2 * xi + s];
                let v = _mm256_sub_epi32(sums[r], _mm256_set1_epi32(32 * hs));
                let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(x.d[xi]));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), scale, *a);
            }
        }
    }
}
