//! GGML blocks into the grouped layout (see the module header): one row's
//! block at a time into its lane `r` of the group's block. Pure byte
//! shuffling; the values are what GGML's blocks say, exactly.

use super::{Format, GROUP};

/// One row's GGML block `src` into lane `r` of the group block `dst`.
pub(super) fn block(format: Format, src: &[u8], r: usize, dst: &mut [u8]) {
    match format {
        Format::Q4_0 | Format::Q4_1 | Format::Q8_0 => blocks32(format, src, r, dst),
        Format::Q5_0 | Format::Q5_1 => q5(format, src, r, dst),
        Format::Q2K => q2k(src, r, dst),
        Format::Q3K => q3k(src, r, dst),
        Format::Q4K => q4k(src, r, dst),
        Format::Q5K => q5k(src, r, dst),
        Format::Q6K => q6k(src, r, dst),
    }
}

/// `quants` (a multiple of 4 bytes) into lane `r`: bytes `4k..4k+4` go to
/// `dst[(k·GROUP + r)·4..]`.
fn interleave(quants: &[u8], r: usize, dst: &mut [u8]) {
    for (k, four) in quants.chunks_exact(4).enumerate() {
        dst[(k * GROUP + r) * 4..][..4].copy_from_slice(four);
    }
}

/// Q4_0, Q4_1, Q8_0: f16 `d` (and `m`), then the quants.
fn blocks32(format: Format, src: &[u8], r: usize, dst: &mut [u8]) {
    let (scales, quants) = match format {
        Format::Q4_1 => src.split_at(4),
        _ => src.split_at(2),
    };
    interleave(quants, r, dst);
    let sc = GROUP * format.quant_bytes();
    dst[sc + 2 * r..][..2].copy_from_slice(&scales[..2]);
    if format == Format::Q4_1 {
        dst[sc + 2 * GROUP + 2 * r..][..2].copy_from_slice(&scales[2..4]);
    }
}

/// Q5_0 (`d`, `qh[4]`, `qs[16]`) and Q5_1 (`d`, `m`, `qh`, `qs`): the
/// nibbles as Q4's, then the fifth bits as a 32-bit word per row in which
/// byte `b`, bit `2k + s` is the fifth bit of the quant in nibble `s` of
/// byte `4k + b` (GGML: bit `16s + 4k + b` of `qh`, little-endian).
fn q5(format: Format, src: &[u8], r: usize, dst: &mut [u8]) {
    let (scales, rest) = match format {
        Format::Q5_1 => src.split_at(4),
        _ => src.split_at(2),
    };
    let (qh, quants) = rest.split_at(4);
    interleave(quants, r, dst);
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut word = [0u8; 4];
    for (b, byte) in word.iter_mut().enumerate() {
        for k in 0..4 {
            for s in 0..2 {
                let bit = (qh >> (16 * s + 4 * k + b)) & 1;
                *byte |= (bit as u8) << (2 * k + s);
            }
        }
    }
    dst[GROUP * 16 + 4 * r..][..4].copy_from_slice(&word);
    let sc = GROUP * format.quant_bytes();
    dst[sc + 2 * r..][..2].copy_from_slice(&scales[..2]);
    if format == Format::Q5_1 {
        dst[sc + 2 * GROUP + 2 * r..][..2].copy_from_slice(&scales[2..4]);
    }
}

/// Q2_K (`scales[16]`: scale in the low nibble, min in the high; `qs[64]`;
/// `d`; `dmin`): the quant bytes interleaved, the scale bytes as `[16][8]`,
/// then d and dmin.
fn q2k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (scales, rest) = src.split_at(16);
    let (qs, d) = rest.split_at(64);
    interleave(qs, r, dst);
    let sc = GROUP * Format::Q2K.quant_bytes();
    for (i, &s) in scales.iter().enumerate() {
        dst[sc + i * GROUP + r] = s;
    }
    dst[sc + 128 + 2 * r..][..2].copy_from_slice(&d[..2]);
    dst[sc + 144 + 2 * r..][..2].copy_from_slice(&d[2..4]);
}

/// Q3_K (`hmask[32]`, `qs[64]`, 12 bytes of packed 6-bit scales, `d`): the
/// quant bytes and then the mask interleaved, the scales unpacked to `i8`
/// (less their offset of 32) as `[16][8]`, then d.
fn q3k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (hmask, rest) = src.split_at(32);
    let (qs, rest) = rest.split_at(64);
    let (packed, d) = rest.split_at(12);
    interleave(qs, r, dst);
    interleave(hmask, r, &mut dst[GROUP * 64..]);
    let sc = GROUP * Format::Q3K.quant_bytes();
    for i in 0..16 {
        // Low four bits: bytes 0–7, low nibbles for scales 0–7, high for
        // 8–15; top two: bytes 8–11, two bits per scale, by i / 4.
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        dst[sc + i * GROUP + r] = ((low | (high << 4)) as i8 - 32) as u8;
    }
    dst[sc + 128 + 2 * r..][..2].copy_from_slice(d);
}

/// Q4_K (`d`, `dmin`, 12 bytes of packed 6-bit scales and mins, 128 bytes
/// of quants): scales and mins as `[8][8]` bytes, d and dmin (160 bytes
/// for the group), then the quants interleaved.
fn q4k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (head, quants) = src.split_at(16);
    interleave(quants, r, &mut dst[Format::Q4K.quants_at()..]);
    k4_scales(Format::Q4K, head, r, dst);
}

/// Q5_K (Q4_K's head, `qh[32]`, `qs[128]`; GGML: the fifth bit of nibble
/// `s` of byte `l` of 64-weight chunk `c` is bit `2c + s` of `qh[l]`), in
/// the order the kernel reads it: per chunk, two 160-byte halves, each the
/// chunk's quant bytes `16h..16h + 16` interleaved (four columns `m`), then
/// one interleaved 4-byte column whose byte `j` has the fifth bit of
/// nibble `s` of column `m`'s byte `j` in bit `4s + m`; the scales and
/// mins ahead of them, as Q4_K's.
fn q5k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (head, rest) = src.split_at(16);
    let (qh, quants) = rest.split_at(32);
    for c in 0..4 {
        for h in 0..2 {
            let at = Format::Q5K.quants_at() + c * 320 + h * 160;
            interleave(&quants[32 * c + 16 * h..][..16], r, &mut dst[at..]);
            for j in 0..4 {
                let mut byte = 0;
                for m in 0..4 {
                    for s in 0..2 {
                        let bit = (qh[16 * h + 4 * m + j] >> (2 * c + s)) & 1;
                        byte |= bit << (4 * s + m);
                    }
                }
                dst[at + 128 + 4 * r + j] = byte;
            }
        }
    }
    k4_scales(Format::Q5K, head, r, dst);
}

/// Q4_K's and Q5_K's 16-byte head (`d`, `dmin`, packed scales and mins)
/// before the group's quants.
fn k4_scales(format: Format, head: &[u8], r: usize, dst: &mut [u8]) {
    let sc = format.scales_at();
    for j in 0..8 {
        let (scale, min) = k4_scale_min(j, &head[4..16]);
        dst[sc + j * GROUP + r] = scale;
        dst[sc + 64 + j * GROUP + r] = min;
    }
    dst[sc + 128 + 2 * r..][..2].copy_from_slice(&head[..2]);
    dst[sc + 144 + 2 * r..][..2].copy_from_slice(&head[2..4]);
}

/// Sub-block `j`'s 6-bit scale and min from Q4_K's 12 packed bytes: the
/// first four of each in the low six bits of bytes 0–3 and 4–7, the last
/// four split between bytes 8–11 and the top two bits of bytes 0–7.
fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q6_K (`ql[128]`, `qh[64]`, 16 i8 scales, `d`), in the order the kernel
/// reads it (GGML's size). GGML: in half `n`, weight `l + 32k` (`l` < 32,
/// kind `k` < 4) has its low four bits in nibble `k / 2` of `ql` byte
/// `64n + 32(k % 2) + l` and its top two in field `k` of `qh` byte
/// `32n + l`. Here, per half `n`, nibble run `p` (kinds `p` and `p + 2`) and
/// sixteen `l` at `16s`, a 192-byte chunk of two 96-byte pairs `c`: nibble
/// bytes `l = 16s + 8c + 0..4` interleaved, then `+ 4..8`, then one
/// interleaved 4-byte column whose byte `j` holds the top bits of the first
/// four's `l = 16s + 8c + j` (kind `p` in bits 0–1, `p + 2` in 2–3) and
/// of the second four's (bits 4–5 and 6–7). Then the scales as `[16][8]`,
/// then d.
fn q6k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (ql, rest) = src.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (scales, d) = rest.split_at(16);
    for n in 0..2 {
        for p in 0..2 {
            for s in 0..2 {
                let chunk = ((n * 2 + p) * 2 + s) * 192;
                for c in 0..2 {
                    let pair = chunk + 96 * c;
                    for half in 0..2 {
                        let l = 16 * s + 8 * c + 4 * half;
                        let at = pair + 32 * half + 4 * r;
                        dst[at..at + 4].copy_from_slice(&ql[64 * n + 32 * p + l..][..4]);
                    }
                    for j in 0..4 {
                        let mut byte = 0;
                        for half in 0..2 {
                            let h = qh[32 * n + 16 * s + 8 * c + 4 * half + j];
                            let lo = (h >> (2 * p)) & 3;
                            let hi = (h >> (2 * p + 4)) & 3;
                            byte |= (lo | hi << 2) << (4 * half);
                        }
                        dst[pair + 64 + 4 * r + j] = byte;
                    }
                }
            }
        }
    }
    let sc = GROUP * Format::Q6K.quant_bytes();
    for (i, &s) in scales.iter().enumerate() {
        dst[sc + i * GROUP + r] = s;
    }
    dst[sc + 128 + 2 * r..][..2].copy_from_slice(d);
}
