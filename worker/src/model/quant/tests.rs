use half::f16;

use super::*;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 24) as u8
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random GGML blocks for `[out, in]`: random bytes for quants, scales
/// and high bits, and f16 super-scales (d, dmin, m) from `scale`.
fn ggml_matrix(
    format: Format,
    out: usize,
    inp: usize,
    rng: &mut Rng,
    scale: &mut dyn FnMut(&mut Rng) -> f32,
) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut half = |raw: &mut Vec<u8>, rng: &mut Rng| {
        raw.extend_from_slice(&f16::from_f32(scale(rng)).to_le_bytes())
    };
    for _ in 0..out * inp / format.block_weights() {
        // GGML's field order: (f16 fields, random bytes, f16 fields).
        let (before, bytes, after) = match format {
            Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => (1, format.ggml_block_bytes() - 2, 0),
            Format::Q4_1 | Format::Q5_1 => (2, format.ggml_block_bytes() - 4, 0),
            Format::Q4K | Format::Q5K => (2, format.ggml_block_bytes() - 4, 0),
            Format::Q2K => (0, 80, 2),
            Format::Q3K | Format::Q6K => (0, format.ggml_block_bytes() - 2, 1),
        };
        for _ in 0..before {
            half(&mut raw, rng);
        }
        raw.extend((0..bytes).map(|_| rng.byte()));
        for _ in 0..after {
            half(&mut raw, rng);
        }
    }
    raw
}

fn h(b: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f64()
}

/// Q4_K's and Q5_K's 6-bit scale and min `j` from their 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f64, f64) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (d as f64, m as f64)
}

/// One GGML block's weights in f64, decoded from GGML's block layout as its
/// reference `dequantize_row_*` functions do, independently of the packing
/// and of the kernels.
fn dequantize_block(format: Format, blk: &[u8]) -> Vec<f64> {
    let mut y = vec![0f64; format.block_weights()];
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let (d, m, qs) = match format {
                Format::Q4_0 => (h(blk, 0), -8.0 * h(blk, 0), &blk[2..]),
                _ => (h(blk, 0), h(blk, 2), &blk[4..]),
            };
            for j in 0..16 {
                y[j] = d * (qs[j] & 0xF) as f64 + m;
                y[j + 16] = d * (qs[j] >> 4) as f64 + m;
            }
        }
        Format::Q5_0 | Format::Q5_1 => {
            let (d, m, rest) = match format {
                Format::Q5_0 => (h(blk, 0), -16.0 * h(blk, 0), &blk[2..]),
                _ => (h(blk, 0), h(blk, 2), &blk[4..]),
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = d * ((qs[j] as u32 & 0xF) | h0) as f64 + m;
                y[j + 16] = d * ((qs[j] as u32 >> 4) | h1) as f64 + m;
            }
        }
        Format::Q8_0 => {
            for j in 0..32 {
                y[j] = h(blk, 0) * (blk[2 + j] as i8) as f64;
            }
        }
        Format::Q2K => {
            let (scales, qs) = (&blk[..16], &blk[16..80]);
            let (d, dmin) = (h(blk, 80), h(blk, 82));
            let mut is = 0;
            for n in 0..2 {
                let q = &qs[32 * n..];
                for j in 0..4 {
                    for part in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let (dl, ml) = (d * (sc & 0xF) as f64, dmin * (sc >> 4) as f64);
                        for l in 0..16 {
                            let v = (q[l + 16 * part] >> (2 * j)) & 3;
                            y[128 * n + 32 * j + 16 * part + l] = dl * v as f64 - ml;
                        }
                    }
                }
            }
        }
        Format::Q3K => {
            let (hmask, qs, packed) = (&blk[..32], &blk[32..96], &blk[96..108]);
            let d = h(blk, 108);
            // GGML unpacks the scales as four 32-bit words.
            let word = |i: usize| u32::from_le_bytes(packed[4 * i..4 * i + 4].try_into().unwrap());
            let (a0, a1, tmp) = (word(0), word(1), word(2));
            let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
            let aux = [
                (a0 & k2) | ((tmp & k1) << 4),
                (a1 & k2) | (((tmp >> 2) & k1) << 4),
                ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
            ];
            let scales: Vec<i32> = aux
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .map(|b| b as i8 as i32 - 32)
                .collect();
            let (mut is, mut m) = (0, 1u8);
            for n in 0..2 {
                let q = &qs[32 * n..];
                for j in 0..4 {
                    for part in 0..2 {
                        let dl = d * scales[is] as f64;
                        is += 1;
                        for l in 0..16 {
                            let l = l + 16 * part;
                            let low = ((q[l] >> (2 * j)) & 3) as i32;
                            let v = low - if hmask[l] & m != 0 { 0 } else { 4 };
                            y[128 * n + 32 * j + l] = dl * v as f64;
                        }
                    }
                    m <<= 1;
                }
            }
        }
        Format::Q4K | Format::Q5K => {
            let (d, dmin, packed) = (h(blk, 0), h(blk, 2), &blk[4..16]);
            let (qh, ql) = match format {
                Format::Q5K => (Some(&blk[16..48]), &blk[48..]),
                _ => (None, &blk[16..]),
            };
            for c in 0..4 {
                for s in 0..2 {
                    let (sc, m) = scale_min_k4(2 * c + s, packed);
                    for l in 0..32 {
                        let byte = ql[32 * c + l];
                        let mut q = if s == 0 { byte & 0xF } else { byte >> 4 } as f64;
                        if qh.is_some_and(|qh| qh[l] & (1 << (2 * c + s)) != 0) {
                            q += 16.0;
                        }
                        y[64 * c + 32 * s + l] = d * sc * q - dmin * m;
                    }
                }
            }
        }
        Format::Q6K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            let d = h(blk, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                for l in 0..32 {
                    let is = l / 16;
                    let q = [
                        (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                        (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                    ];
                    for (k, q) in q.into_iter().enumerate() {
                        let s = sc[is + 2 * k] as i8 as f64;
                        y[128 * n + l + 32 * k] = d * s * (q as f64 - 32.0);
                    }
                }
            }
        }
    }
    y
}

/// The `[out, in]` weights of GGML blocks, in f64.
fn dequantize(format: Format, raw: &[u8]) -> Vec<f64> {
    raw.chunks_exact(format.ggml_block_bytes())
        .flat_map(|blk| dequantize_block(format, blk))
        .collect()
}

const FORMATS: [Format; 10] = Format::ALL;

fn ggml_dtype(format: Format) -> GgmlDType {
    match format {
        Format::Q4_0 => GgmlDType::Q4_0,
        Format::Q4_1 => GgmlDType::Q4_1,
        Format::Q5_0 => GgmlDType::Q5_0,
        Format::Q5_1 => GgmlDType::Q5_1,
        Format::Q8_0 => GgmlDType::Q8_0,
        Format::Q2K => GgmlDType::Q2K,
        Format::Q3K => GgmlDType::Q3K,
        Format::Q4K => GgmlDType::Q4K,
        Format::Q5K => GgmlDType::Q5K,
        Format::Q6K => GgmlDType::Q6K,
    }
}

/// The f64 decoders above against candle's dequantization (in f32, so to
/// f32 rounding of each weight): a check of the test's own reference.
#[test]
fn the_reference_decoders_agree_with_candle() {
    let mut rng = Rng(31337);
    for format in FORMATS {
        assert_eq!(Format::from_ggml(ggml_dtype(format)), Some(format));
        let (out, inp) = (3, 512);
        let raw = ggml_matrix(format, out, inp, &mut rng, &mut |r| 0.05 * r.unit());
        let ours = dequantize(format, &raw);
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            ggml_dtype(format),
            &raw,
            vec![out, inp],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let theirs: Vec<f32> = t
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let tol = 1e-6 * (1.0 + a.abs());
            assert!((a - *b as f64).abs() <= tol, "{format:?} [{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn every_path_matches_an_f64_reference_on_random_blocks() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for format in FORMATS {
        let shapes = [
            (1, 8, 32),
            (3, 13, 64),
            (16, 40, 256),
            (9, 5, 96),
            (5, 11, 512),
        ];
        for (rows, out, inp) in shapes {
            if inp % format.block_weights() != 0 {
                continue;
            }
            let raw = ggml_matrix(format, out, inp, &mut rng, &mut |r| {
                0.01 + 0.02 * r.unit().abs()
            });
            let packed = PackedMatrix::from_ggml(format, &raw, out, inp);
            let wv = dequantize(format, &raw);
            let x: Vec<f32> = (0..rows * inp).map(|_| rng.unit()).collect();
            // The reference uses the activations as the kernels see them:
            // quantized to 8 bits, then dequantized in f64.
            let qx = QuantizedRows::new(&x, rows, inp);
            let xv = |r: usize, j: usize| {
                let i = qx.index(r, j / BLOCK);
                qx.qs[i * BLOCK + j % BLOCK] as f64 * qx.d[i] as f64
            };
            for isa in Isa::available() {
                let got = packed.matmul_with(isa, &x, rows);
                for r in 0..rows {
                    for o in 0..out {
                        let want: f64 = (0..inp).map(|j| wv[o * inp + j] * xv(r, j)).sum();
                        let g = got[r * out + o] as f64;
                        // f32 scale products and accumulation: a few ulps per block.
                        let tol = 1e-5 * (inp / BLOCK) as f64 * (1.0 + want.abs());
                        assert!(
                            (g - want).abs() <= tol,
                            "{format:?} {isa:?} {rows}x{out}x{inp} [{r},{o}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_path_is_bit_identical_to_the_scalar_one() {
    let mut rng = Rng(12345);
    for format in FORMATS {
        for (out, inp) in [(37, 512), (5, 256), (8, 768)] {
            let raw = ggml_matrix(format, out, inp, &mut rng, &mut |r| r.unit() * 0.05);
            let packed = PackedMatrix::from_ggml(format, &raw, out, inp);
            for rows in [1, 2, 3, 8, 16, 11] {
                // Extreme activations too: a block of zeros, and a lone
                // large value.
                let mut x: Vec<f32> = (0..rows * inp).map(|_| rng.unit() * 3.0).collect();
                x[..BLOCK].fill(0.0);
                x[BLOCK + 3] = 1e4;
                let reference = packed.matmul_with(Isa::Scalar, &x, rows);
                for isa in Isa::available() {
                    assert_eq!(
                        packed.matmul_with(isa, &x, rows),
                        reference,
                        "{format:?} {isa:?} {rows}x{out}x{inp}"
                    );
                }
            }
        }
    }
}

#[test]
fn integer_parts_are_exact() {
    // Scales that are powers of two make every float step exact, so the
    // result must equal the exact integer dot product.
    let mut rng = Rng(777);
    for format in FORMATS {
        let (out, inp) = (16, 256);
        let raw = ggml_matrix(format, out, inp, &mut rng, &mut |_| 1.0);
        let packed = PackedMatrix::from_ggml(format, &raw, out, inp);
        let wv = dequantize(format, &raw);
        // Activations whose blocks all have max |x| = 127: d = 1, x exact.
        let x: Vec<f32> = (0..2 * inp)
            .map(|j| {
                if j % BLOCK == 0 {
                    127.0
                } else {
                    (rng.byte() as i8 / 2) as f32
                }
            })
            .collect();
        for isa in Isa::available() {
            let got = packed.matmul_with(isa, &x, 2);
            for r in 0..2 {
                for o in 0..out {
                    let want: f64 = (0..inp)
                        .map(|j| wv[o * inp + j] * x[r * inp + j] as f64)
                        .sum();
                    assert_eq!(
                        got[r * out + o] as f64,
                        want,
                        "{format:?} {isa:?} [{r},{o}]"
                    );
                }
            }
        }
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
    let mut rng = Rng(4242);
    let (out, inp) = (24, 192);
    let raw = ggml_matrix(Format::Q4_1, out, inp, &mut rng, &mut |r| 0.02 * r.unit());
    let packed = PackedMatrix::from_ggml(Format::Q4_1, &raw, out, inp);
    let x: Vec<f32> = (0..17 * inp).map(|_| rng.unit()).collect();
    let batch = packed.matmul(&x, 17);
    for r in 0..17 {
        let alone = packed.matmul(&x[r * inp..(r + 1) * inp], 1);
        assert_eq!(alone, batch[r * out..(r + 1) * out], "row {r}");
    }
}

#[test]
fn matrices_run_together_give_what_they_give_alone() {
    let mut rng = Rng(99);
    let inp = 128;
    let raws: Vec<(usize, Vec<u8>)> = [40, 8, 13]
        .into_iter()
        .map(|out| {
            (
                out,
                ggml_matrix(Format::Q8_0, out, inp, &mut rng, &mut |r| 0.01 * r.unit()),
            )
        })
        .collect();
    let mats: Vec<PackedMatrix> = raws
        .iter()
        .map(|(out, raw)| PackedMatrix::from_ggml(Format::Q8_0, raw, *out, inp))
        .collect();
    let x: Vec<f32> = (0..5 * inp).map(|_| rng.unit()).collect();
    let together = PackedMatrix::matmul_many(&mats.iter().collect::<Vec<_>>(), &x, 5);
    for (m, t) in mats.iter().zip(&together) {
        assert_eq!(&m.matmul(&x, 5), t);
    }
}

/// Activation quantization against the rule written plainly (per block:
/// `d = max|x|/127`, quants rounded to nearest even, their sums), on random
/// blocks and on blocks of zeros, of one repeated value, with a NaN and
/// with an infinity; a batch small enough for one thread and one that is
/// quantized in parts on the pool.
#[test]
fn activations_quantize_as_the_plain_rule_says() {
    let mut rng = Rng(11);
    for (rows, blocks) in [(4, 16), (9, 40)] {
        let mut x: Vec<f32> = (0..rows * blocks * BLOCK)
            .map(|_| rng.unit() * 3.0)
            .collect();
        x[BLOCK..2 * BLOCK].fill(0.0);
        x[2 * BLOCK..3 * BLOCK].fill(-0.7);
        x[3 * BLOCK + 5] = f32::NAN;
        let end = x.len();
        x[end - 9] = f32::INFINITY;
        let q = QuantizedRows::new(&x, rows, blocks * BLOCK);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let want: Vec<i8> = block
                .iter()
                .map(|v| (v * id).round_ties_even() as i8)
                .collect();
            assert_eq!(&q.qs[b * BLOCK..(b + 1) * BLOCK], &want[..], "block {b}");
            let half = |h: usize| {
                want[h * 16..(h + 1) * 16]
                    .iter()
                    .map(|&v| i32::from(v))
                    .sum::<i32>()
            };
            assert_eq!(
                q.half_sum[2 * b..2 * b + 2],
                [half(0), half(1)],
                "block {b}"
            );
            assert_eq!(q.sum[b], half(0) + half(1));
            assert_eq!(q.d[b].to_bits(), d.to_bits());
            assert_eq!(q.s[b].to_bits(), (d * q.sum[b] as f32).to_bits());
        }
    }
}

/// Repacking in parallel from a row reader gives the same bytes as
/// repacking the whole matrix (odd row counts, one run and many).
#[test]
fn built_from_rows_equals_repacked_whole() {
    let mut rng = Rng(7);
    for format in [
        Format::Q4_0,
        Format::Q4_1,
        Format::Q8_0,
        Format::Q4K,
        Format::Q6K,
    ] {
        for out in [1, 13, 8 * 700 + 3] {
            let inp = 512;
            let raw = ggml_matrix(format, out, inp, &mut rng, &mut |r| r.unit());
            let row = raw.len() / out;
            let whole = PackedMatrix::from_ggml(format, &raw, out, inp);
            let built = PackedMatrix::build(format, out, inp, |rows, buf| {
                buf.clear();
                buf.extend_from_slice(&raw[rows.start * row..rows.end * row]);
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(&built.data[..], &whole.data[..], "{format:?} {out}");
        }
    }
}
