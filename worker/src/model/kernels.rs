//! f32 matrix products for small batches (decode steps): `[rows, in] ×
//! [out, in]ᵀ` without packing the weights. Each task takes a band of weight
//! rows and uses every weight row for all activation rows while it is in L1,
//! so a batch of 16 reads the weights once, like a single stream. (candle's
//! gemm packs the whole weight matrix on every call, which at 16 rows costs
//! more than the arithmetic.)
//!
//! Each output element is accumulated in the same order whatever the number
//! of rows, so a sequence's result does not depend on what it is batched with.

use rayon::prelude::*;

/// Weight rows per parallel task.
const BAND: usize = 32;

/// `x` is `[rows, in]`, `w` is `[out, in]`; returns `[rows, out]`.
pub fn matmul_t(x: &[f32], rows: usize, w: &[f32], out_dim: usize, in_dim: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * in_dim);
    debug_assert_eq!(w.len(), out_dim * in_dim);
    let simd = simd_available();
    let xr = |r: usize| &x[r * in_dim..(r + 1) * in_dim];
    let wr = |j: usize| &w[j * in_dim..(j + 1) * in_dim];
    // Computed as [out, rows] so each task owns a contiguous band.
    let mut out_t = vec![0f32; out_dim * rows];
    out_t
        .par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, chunk)| {
            let j0 = band * BAND;
            let n = chunk.len() / rows;
            let mut j = 0;
            while j < n {
                // Four weight rows at a time (the last group may repeat a row).
                let ws: [&[f32]; 4] = std::array::from_fn(|i| wr(j0 + (j + i).min(n - 1)));
                let width = (n - j).min(4);
                let mut put = |r: usize, d: [f32; 4]| {
                    for (i, v) in d.into_iter().take(width).enumerate() {
                        chunk[(j + i) * rows + r] = v;
                    }
                };
                let mut r = 0;
                // Three activation rows at a time share each weight load.
                while r + 3 <= rows {
                    let d = dot_rows::<3>([xr(r), xr(r + 1), xr(r + 2)], ws, simd);
                    for (k, dk) in d.into_iter().enumerate() {
                        put(r + k, dk);
                    }
                    r += 3;
                }
                while r < rows {
                    put(r, dot_rows::<1>([xr(r)], ws, simd)[0]);
                    r += 1;
                }
                j += 4;
            }
        });
    let mut out = vec![0f32; rows * out_dim];
    for j in 0..out_dim {
        for r in 0..rows {
            out[r * out_dim + j] = out_t[j * rows + r];
        }
    }
    out
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2_FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2_FMA.get_or_init(|| {
            std::env::var("AQUILA_KERNELS").map_or(true, |v| v != "scalar")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Dot products of `R` activation rows with four weight rows, each weight
/// load shared by the `R` rows. Every result is accumulated in the same
/// order whatever `R` is.
fn dot_rows<const R: usize>(x: [&[f32]; R], w: [&[f32]; 4], simd: bool) -> [[f32; 4]; R] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is true only when AVX2 and FMA were detected.
        return unsafe { avx2::dot_rows(x, w) };
    }
    let _ = simd;
    x.map(|xr| scalar_dot4(xr, w))
}

/// Eight lanes per row, summed at the end: the shape of the AVX2 code,
/// written so the compiler can vectorize it anywhere.
fn scalar_dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let chunks = x.len() / 8;
    for c in 0..chunks {
        let xs = &x[c * 8..c * 8 + 8];
        for (a, wr) in acc.iter_mut().zip(&w) {
            let ws = &wr[c * 8..c * 8 + 8];
            for l in 0..8 {
                a[l] += xs[l] * ws[l];
            }
        }
    }
    std::array::from_fn(|i| {
        let tail: f32 = x[chunks * 8..]
            .iter()
            .zip(&w[i][chunks * 8..])
            .map(|(p, q)| p * q)
            .sum();
        acc[i].iter().sum::<f32>() + tail
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const R: usize>(x: [&[f32]; R], w: [&[f32]; 4]) -> [[f32; 4]; R] {
        let n = w[0].len();
        let chunks = n / 8;
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let xp = x.map(|r| r.as_ptr());
        let wp = w.map(|r| r.as_ptr());
        for c in 0..chunks {
            // SAFETY: c*8+8 <= n, and every row has n elements.
            unsafe {
                let xv: [__m256; R] = std::array::from_fn(|k| _mm256_loadu_ps(xp[k].add(c * 8)));
                for i in 0..4 {
                    let wv = _mm256_loadu_ps(wp[i].add(c * 8));
                    for k in 0..R {
                        acc[k][i] = _mm256_fmadd_ps(xv[k], wv, acc[k][i]);
                    }
                }
            }
        }
        std::array::from_fn(|k| {
            std::array::from_fn(|i| {
                let mut lanes = [0f32; 8];
                // SAFETY: lanes has 8 f32.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[k][i]) };
                let tail: f32 = x[k][chunks * 8..]
                    .iter()
                    .zip(&w[i][chunks * 8..])
                    .map(|(p, q)| p * q)
                    .sum();
                lanes.iter().sum::<f32>() + tail
            })
        })
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

    #[test]
    fn matches_an_f64_reference_and_does_not_depend_on_batch_size() {
        for (rows, inp, out) in [
            (1, 8, 4),
            (3, 13, 7),
            (5, 64, 33),
            (16, 100, 70),
            (2, 768, 129),
        ] {
            let x = data(rows * inp, 1);
            let w = data(out * inp, 2);
            let got = matmul_t(&x, rows, &w, out, inp);
            for r in 0..rows {
                for j in 0..out {
                    let want: f64 = (0..inp)
                        .map(|k| x[r * inp + k] as f64 * w[j * inp + k] as f64)
                        .sum();
                    let g = got[r * out + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (inp as f64).sqrt() * want.abs().max(1.0),
                        "{rows}x{inp}x{out} [{r},{j}]: {g} vs {want}"
                    );
                }
                // Row r alone gives bit-identical results.
                let alone = matmul_t(&x[r * inp..(r + 1) * inp], 1, &w, out, inp);
                assert_eq!(alone, got[r * out..(r + 1) * out]);
            }
        }
    }

    #[test]
    fn simd_and_scalar_paths_agree() {
        let (inp, x, w) = (77, data(77, 3), data(4 * 77, 4));
        let rows: [&[f32]; 4] = std::array::from_fn(|i| &w[i * inp..(i + 1) * inp]);
        let s = scalar_dot4(&x, rows);
        let v = dot_rows::<1>([&x], rows, simd_available())[0];
        for (a, b) in s.iter().zip(v) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
