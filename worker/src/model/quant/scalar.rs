//! The reference kernels: one group against one activation row, one lane
//! (weight row) at a time, reading quants out of the grouped layout one by
//! one. The SIMD kernels must give these results bit for bit: the same
//! integer sums, then the same float steps in the same order.

use half::f16;

use super::{BLOCK, Format, GROUP, QuantizedRows};

pub(super) fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// Group `w` against activation row `r`; `out` is the group's 8 lanes.
pub(super) fn group(format: Format, w: &[u8], x: &QuantizedRows, r: usize, out: &mut [f32]) {
    match format {
        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
            blocks32(format, w, x, r, out)
        }
        Format::Q2K | Format::Q3K => k2(format, w, x, r, out),
        Format::Q4K | Format::Q5K => k4(format, w, x, r, out),
        Format::Q6K => q6k(w, x, r, out),
    }
}

/// Bit `p` of byte `byte` as the value `v` (a quant's high bit).
fn high(byte: u8, p: usize, v: u8) -> u8 {
    if byte >> p & 1 == 1 { v } else { 0 }
}

/// 32-weight blocks: `acc += isum·(d_w·d_x)`, then (Q4_1, Q5_1)
/// `acc += m_w·(d_x·Σq)`.
fn blocks32(format: Format, w: &[u8], x: &QuantizedRows, r: usize, out: &mut [f32]) {
    let gb = format.group_block_bytes();
    let qb = format.quant_bytes();
    let with_min = matches!(format, Format::Q4_1 | Format::Q5_1);
    for (lane, acc) in out.iter_mut().enumerate() {
        *acc = 0.0;
        for b in 0..x.blocks {
            let wb = &w[b * gb..][..gb];
            let xi = x.index(r, b);
            let xq = &x.qs[xi * BLOCK..][..BLOCK];
            // Weight quant j of this lane's row: nibble j / 16 of byte j % 16.
            let quant = |j: usize| -> i32 {
                let (k, s) = ((j % 16) / 4, j / 16);
                let byte = wb[(k * GROUP + lane) * 4 + j % 4];
                let nibble = if s == 0 { byte & 0x0F } else { byte >> 4 };
                match format {
                    Format::Q4_0 | Format::Q4_1 => i32::from(nibble),
                    Format::Q5_0 | Format::Q5_1 => {
                        let bits = wb[GROUP * 16 + lane * 4 + j % 4];
                        i32::from(nibble | high(bits, 2 * k + s, 16))
                    }
                    Format::Q8_0 => i32::from(wb[(j / 4 * GROUP + lane) * 4 + j % 4] as i8),
                    _ => unreachable!("32-weight blocks only"),
                }
            };
            let isum = (0..BLOCK).map(|j| quant(j) * i32::from(xq[j])).sum::<i32>()
                - format.offset() * x.sum[xi];
            let scales = &wb[GROUP * qb..];
            let scale = f16_at(scales, lane) * x.d[xi];
            *acc = (isum as f32).mul_add(scale, *acc);
            if with_min {
                *acc = f16_at(scales, GROUP + lane).mul_add(x.s[xi], *acc);
            }
        }
    }
}

/// Q2_K and Q3_K: per 16-weight sub-block `i` of super-block `b` (element
/// `128h + 32j + l` is field `j` of quant byte `32h + l`, in sub-block
/// `8h + 2j + l / 16`):
/// - Q2_K: `acc += isum·((d·scᵢ)·d_x)`, then `acc -= (dmin·mᵢ)·(d_x·Σq)`;
/// - Q3_K: the quant is the field plus 4 where the mask's bit `4h + j` is
///   set, less 4: `isum = Σ q·x - 4·Σx` (exact), `acc += isum·((d·scᵢ)·d_x)`.
fn k2(format: Format, w: &[u8], x: &QuantizedRows, r: usize, out: &mut [f32]) {
    let gb = format.group_block_bytes();
    let sc = GROUP * format.quant_bytes();
    let three = format == Format::Q3K;
    for (lane, acc) in out.iter_mut().enumerate() {
        *acc = 0.0;
        for b in 0..x.blocks / 8 {
            let wb = &w[b * gb..][..gb];
            let d = f16_at(&wb[sc + 128..], lane);
            for i in 0..16 {
                let (h, j, half) = (i / 8, (i % 8) / 2, i % 2);
                let xi = x.index(r, b * 8 + 4 * h + j);
                let xq = &x.qs[xi * BLOCK + 16 * half..][..16];
                let hs = x.half_sum[2 * xi + half];
                let isum: i32 = (0..16)
                    .map(|e| {
                        let l = 16 * half + e;
                        let byte = wb[((8 * h + l / 4) * GROUP + lane) * 4 + l % 4];
                        let mut q = (byte >> (2 * j)) & 3;
                        if three {
                            let mask = wb[GROUP * 64 + ((l / 4) * GROUP + lane) * 4 + l % 4];
                            q |= high(mask, 4 * h + j, 4);
                        }
                        i32::from(q) * i32::from(xq[e])
                    })
                    .sum();
                let s = wb[sc + i * GROUP + lane];
                if three {
                    let scale = d * f32::from(s as i8) * x.d[xi];
                    *acc = ((isum - 4 * hs) as f32).mul_add(scale, *acc);
                } else {
                    let dmin = f16_at(&wb[sc + 144..], lane);
                    let scale = d * f32::from(s & 0x0F) * x.d[xi];
                    let min = dmin * f32::from(s >> 4);
                    *acc = (isum as f32).mul_add(scale, *acc);
                    *acc = (-min).mul_add(x.d[xi] * hs as f32, *acc);
                }
            }
        }
    }
}

/// Q4_K and Q5_K: per sub-block `i` of super-block `b`,
/// `acc += isum·((d·scᵢ)·d_x)`, then `acc -= (dmin·mᵢ)·(d_x·Σq)`.
fn k4(format: Format, w: &[u8], x: &QuantizedRows, r: usize, out: &mut [f32]) {
    let gb = format.group_block_bytes();
    let (sc, qa) = (format.scales_at(), format.quants_at());
    let five = format == Format::Q5K;
    for (lane, acc) in out.iter_mut().enumerate() {
        *acc = 0.0;
        for b in 0..x.blocks / 8 {
            let wb = &w[b * gb..][..gb];
            let d = f16_at(&wb[sc + 128..], lane);
            let dmin = f16_at(&wb[sc + 144..], lane);
            for i in 0..8 {
                let xi = x.index(r, b * 8 + i);
                let xq = &x.qs[xi * BLOCK..][..BLOCK];
                // Element e of sub-block i: byte e of 64-chunk i/2, low
                // nibble for even i; Q5_K's chunks as `repack::q5k` lays
                // them out, with the fifth bit in bit 4·(i % 2) + column.
                let isum: i32 = (0..BLOCK)
                    .map(|e| {
                        let q = if five {
                            let at = qa + i / 2 * 320 + e / 16 * 160;
                            let (m, j) = (e % 16 / 4, e % 4);
                            let byte = wb[at + 32 * m + 4 * lane + j];
                            let bits = wb[at + 128 + 4 * lane + j];
                            let q = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                            q | high(bits, 4 * (i % 2) + m, 16)
                        } else {
                            let byte = wb[qa + ((i / 2 * 8 + e / 4) * GROUP + lane) * 4 + e % 4];
                            if i % 2 == 0 { byte & 0x0F } else { byte >> 4 }
                        };
                        i32::from(q) * i32::from(xq[e])
                    })
                    .sum();
                let scale = d * f32::from(wb[sc + i * GROUP + lane]) * x.d[xi];
                let min = dmin * f32::from(wb[sc + 64 + i * GROUP + lane]);
                *acc = (isum as f32).mul_add(scale, *acc);
                *acc = (-min).mul_add(x.s[xi], *acc);
            }
        }
    }
}

/// Q6_K: per 16 weights `i`, `isum = Σ q·x - 32·Σx` (exact), then
/// `acc += isum·((d·scᵢ)·d_x)`, in the SIMD kernels' order (the layout's,
/// see `repack::q6k`): per half `n`, nibble run `p`, sixteen `l` at `16s`,
/// the sub-blocks of kinds `p` and `p + 2`.
fn q6k(w: &[u8], x: &QuantizedRows, r: usize, out: &mut [f32]) {
    let gb = Format::Q6K.group_block_bytes();
    let sc = GROUP * Format::Q6K.quant_bytes();
    for (lane, acc) in out.iter_mut().enumerate() {
        *acc = 0.0;
        for b in 0..x.blocks / 8 {
            let wb = &w[b * gb..][..gb];
            let d = f16_at(&wb[sc + 128..], lane);
            // Quant `l` (< 32) of kind `k` in half `n`.
            let quant = |n: usize, k: usize, l: usize| {
                let (p, s, c, half, j) = (k % 2, l / 16, l % 16 / 8, l % 8 / 4, l % 4);
                let pair = ((n * 2 + p) * 2 + s) * 192 + 96 * c;
                let ql = wb[pair + 32 * half + 4 * lane + j];
                let qh = wb[pair + 64 + 4 * lane + j];
                ((ql >> (4 * (k / 2))) & 0x0F) | (((qh >> (4 * half + 2 * (k / 2))) & 3) << 4)
            };
            for n in 0..2 {
                for p in 0..2 {
                    for s in 0..2 {
                        for k in [p, p + 2] {
                            let i = 8 * n + 2 * k + s;
                            let xi = x.index(r, b * 8 + i / 2);
                            let xq = &x.qs[xi * BLOCK + s * 16..][..16];
                            let isum: i32 = (0..16)
                                .map(|e| i32::from(quant(n, k, 16 * s + e)) * i32::from(xq[e]))
                                .sum::<i32>()
                                - 32 * x.half_sum[2 * xi + s];
                            let scale = d * f32::from(wb[sc + i * GROUP + lane] as i8) * x.d[xi];
                            *acc = (isum as f32).mul_add(scale, *acc);
                        }
                    }
                }
            }
        }
    }
}
