//! RMSNorm and rotary position embeddings on row-major f32 activations.

use candle_core::{DType, Tensor};

use crate::config::RopeStyle;
use crate::error::{Result, WorkerError};

pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(name: &str, w: &Tensor, dim: usize, eps: f64) -> Result<Self> {
        if w.dims() != [dim] {
            return Err(WorkerError::Config(format!(
                "{name}: shape {:?}, the config implies [{dim}]",
                w.dims()
            )));
        }
        Ok(Self {
            weight: w.to_dtype(DType::F32)?.to_vec1()?,
            eps: eps as f32,
        })
    }

    pub fn from_weights(weight: Vec<f32>, eps: f32) -> Self {
        Self { weight, eps }
    }

    /// `x` is `[rows, dim]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let dim = self.weight.len();
        let mut out = vec![0f32; rows * dim];
        for (src, dst) in x.chunks(dim).zip(out.chunks_mut(dim)) {
            let ms = src.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((d, s), w) in dst.iter_mut().zip(src).zip(&self.weight) {
                *d = s * inv * w;
            }
        }
        out
    }
}

/// Precomputed cos/sin for every position of the context.
pub struct Rope {
    /// `[context, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
    style: RopeStyle,
}

impl Rope {
    pub fn new(head_dim: usize, context: usize, theta: f64, style: RopeStyle) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for p in 0..context {
            for i in 0..half {
                let freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos,
            sin,
            head_dim,
            style,
        }
    }

    /// The cos and sin tables, `[context][head_dim / 2]` each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    pub fn interleaved(&self) -> bool {
        self.style == RopeStyle::Interleaved
    }

    /// Rotates `x` (`[tokens, heads·head_dim]`) in place; token t is at
    /// `positions[t]`.
    pub fn apply(&self, x: &mut [f32], positions: &[usize], heads: usize) {
        let hd = self.head_dim;
        let half = hd / 2;
        for (t, &p) in positions.iter().enumerate() {
            let cos = &self.cos[p * half..(p + 1) * half];
            let sin = &self.sin[p * half..(p + 1) * half];
            for h in 0..heads {
                let v = &mut x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                for i in 0..half {
                    let (a, b) = self.style.pair(i, hd);
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * cos[i] - x1 * sin[i];
                    v[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

impl RopeStyle {
    /// The pair of dimensions rotated together with dimension `i < hd/2`.
    fn pair(self, i: usize, hd: usize) -> (usize, usize) {
        match self {
            RopeStyle::Half => (i, i + hd / 2),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}
