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
/// of quants): quants interleaved, then scales and mins as `[8][8]` bytes,
/// then d and dmin.
fn q4k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (head, quants) = src.split_at(16);
    interleave(quants, r, dst);
    k4_scales(Format::Q4K, head, r, dst);
}

/// Q5_K (Q4_K's head, `qh[32]`, `qs[128]`): as Q4_K, with `qh` interleaved
/// after the quants (byte `l`, bit `2c + s`: the fifth bit of the quant in
/// nibble `s` of byte `l` of 64-weight chunk `c`, as GGML has it).
fn q5k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (head, rest) = src.split_at(16);
    let (qh, quants) = rest.split_at(32);
    interleave(quants, r, dst);
    interleave(qh, r, &mut dst[GROUP * 128..]);
    k4_scales(Format::Q5K, head, r, dst);
}

/// Q4_K's and Q5_K's 16-byte head (`d`, `dmin`, packed scales and mins)
/// after the group's quants.
fn k4_scales(format: Format, head: &[u8], r: usize, dst: &mut [u8]) {
    let sc = GROUP * format.quant_bytes();
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

/// Q6_K (`ql[128]`, `qh[64]`, 16 i8 scales, `d`): quants 0..63 in element
/// order, interleaved four at a time, then the scales as `[16][8]`, then d.
fn q6k(src: &[u8], r: usize, dst: &mut [u8]) {
    let (ql, rest) = src.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (scales, d) = rest.split_at(16);
    let mut q = [0u8; 256];
    // GGML's layout: two halves of 128, each from 64 bytes of ql and 32 of
    // qh; ql's low nibbles give elements 0..64 of the half, its high
    // nibbles 64..128; qh's 2-bit fields are the top bits of the four.
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let y = &mut q[128 * half..];
        for l in 0..32 {
            y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    interleave(&q, r, dst);
    let sc = GROUP * Format::Q6K.quant_bytes();
    for (i, &s) in scales.iter().enumerate() {
        dst[sc + i * GROUP + r] = s;
    }
    dst[sc + 128 + 2 * r..][..2].copy_from_slice(d);
}
