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

/// Random GGML blocks for `[out, in]`; scales from `scale`.
fn ggml_matrix(
    format: Format,
    out: usize,
    inp: usize,
    rng: &mut Rng,
    scale: &mut dyn FnMut(&mut Rng) -> f32,
) -> Vec<u8> {
    let mut raw = Vec::new();
    if format == Format::Q6K {
        for _ in 0..out * inp / 256 {
            raw.extend((0..128 + 64 + 16).map(|_| rng.byte()));
            raw.extend_from_slice(&f16::from_f32(scale(rng)).to_le_bytes());
        }
        return raw;
    }
    if format == Format::Q4K {
        for _ in 0..out * inp / 256 {
            raw.extend_from_slice(&f16::from_f32(scale(rng)).to_le_bytes());
            raw.extend_from_slice(&f16::from_f32(scale(rng)).to_le_bytes());
            raw.extend((0..12 + 128).map(|_| rng.byte()));
        }
        return raw;
    }
    for _ in 0..out * inp / BLOCK {
        raw.extend_from_slice(&f16::from_f32(scale(rng)).to_le_bytes());
        if format == Format::Q4_1 {
            raw.extend_from_slice(&f16::from_f32(scale(rng)).to_le_bytes());
        }
        for _ in 0..format.quant_bytes() {
            raw.push(rng.byte());
        }
    }
    raw
}

/// Weight `[o][j]` from the GGML bytes, independently of the packing (for
/// Q4_K through candle's own dequantization).
fn ggml_value(format: Format, raw: &[u8], inp: usize, o: usize, j: usize) -> f64 {
    if let Format::Q4K | Format::Q6K = format {
        let bb = format.ggml_block_bytes();
        let row = &raw[o * inp / 256 * bb..][..inp / 256 * bb];
        let dtype = if format == Format::Q4K {
            GgmlDType::Q4K
        } else {
            GgmlDType::Q6K
        };
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            row,
            vec![inp],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let v: Vec<f32> = t
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        return v[j] as f64;
    }
    let bb = format.ggml_block_bytes();
    let blk = &raw[(o * inp / BLOCK + j / BLOCK) * bb..][..bb];
    let e = j % BLOCK;
    let d = f16_at(blk, 0) as f64;
    match format {
        Format::Q4_0 => {
            let byte = blk[2 + e % 16];
            let q = if e < 16 { byte & 0x0F } else { byte >> 4 };
            d * (q as f64 - 8.0)
        }
        Format::Q4_1 => {
            let byte = blk[4 + e % 16];
            let q = if e < 16 { byte & 0x0F } else { byte >> 4 };
            d * q as f64 + f16_at(blk, 1) as f64
        }
        Format::Q8_0 => d * (blk[2 + e] as i8) as f64,
        Format::Q4K | Format::Q6K => unreachable!("dequantized by candle above"),
    }
}

const FORMATS: [Format; 5] = [
    Format::Q4_0,
    Format::Q4_1,
    Format::Q8_0,
    Format::Q4K,
    Format::Q6K,
];

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
                        let want: f64 = (0..inp)
                            .map(|j| ggml_value(format, &raw, inp, o, j) * xv(r, j))
                            .sum();
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
        let (out, inp) = (37, 512);
        let raw = ggml_matrix(format, out, inp, &mut rng, &mut |r| r.unit() * 0.05);
        let packed = PackedMatrix::from_ggml(format, &raw, out, inp);
        // Extreme activations too: a block of zeros, and a lone large value.
        let mut x: Vec<f32> = (0..11 * inp).map(|_| rng.unit() * 3.0).collect();
        x[..BLOCK].fill(0.0);
        x[BLOCK + 3] = 1e4;
        let reference = packed.matmul_with(Isa::Scalar, &x, 11);
        for isa in Isa::available() {
            assert_eq!(
                packed.matmul_with(isa, &x, 11),
                reference,
                "{format:?} {isa:?}"
            );
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
                        .map(|j| ggml_value(format, &raw, inp, o, j) * x[r * inp + j] as f64)
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
