//! Which GGML type each tensor of a llama GGUF file gets: `--gguf-type` of
//! `aquila make-model`. A plain type (`q4_k`) puts every 2-D weight in that
//! type, as `llama-quantize --pure` does; a mix (`q4_k_m`, `q4_k_s`,
//! `q5_k_m`, `q3_k_m`) follows llama.cpp's `llama_tensor_get_type` for a
//! LLaMA model (no experts, not 70B): output.weight Q6_K, more bits for
//! attn_v and ffn_down in some layers. Either way a weight whose rows do
//! not split into the type's blocks falls back as llama.cpp falls back.
//! Choosing only: nothing here quantizes or writes.

use candle_core::quantized::GgmlDType;

/// A GGUF file type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q2_k")]
    Q2k,
    #[value(name = "q3_k")]
    Q3k,
    #[value(name = "q4_k")]
    Q4k,
    #[value(name = "q5_k")]
    Q5k,
    #[value(name = "q6_k")]
    Q6k,
    /// llama.cpp's Q3_K_M mix.
    #[value(name = "q3_k_m")]
    Q3kM,
    /// llama.cpp's Q4_K_S mix.
    #[value(name = "q4_k_s")]
    Q4kS,
    /// llama.cpp's Q4_K_M mix.
    #[value(name = "q4_k_m")]
    Q4kM,
    /// llama.cpp's Q5_K_M mix.
    #[value(name = "q5_k_m")]
    Q5kM,
}

impl GgufType {
    /// The type of most 2-D weights (llama.cpp's default type of the mix).
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q2k => GgmlDType::Q2K,
            Self::Q3k | Self::Q3kM => GgmlDType::Q3K,
            Self::Q4k | Self::Q4kS | Self::Q4kM => GgmlDType::Q4K,
            Self::Q5k | Self::Q5kM => GgmlDType::Q5K,
            Self::Q6k => GgmlDType::Q6K,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`). A plain K-quant
    /// gets the number of its `_M` mix, as `llama-quantize --pure` writes.
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q2k => 10,
            Self::Q3k | Self::Q3kM => 12,
            Self::Q4kS => 14,
            Self::Q4k | Self::Q4kM => 15,
            Self::Q5k | Self::Q5kM => 17,
            Self::Q6k => 18,
            Self::Bf16 => 32,
        }
    }

    fn is_mix(self) -> bool {
        matches!(self, Self::Q3kM | Self::Q4kS | Self::Q4kM | Self::Q5kM)
    }

    /// The type of tensor `hf_name` (its Hugging Face name) of `shape` in
    /// a model of `n_layers` layers; `tied`: the file has no output.weight,
    /// so the embedding is also the output layer.
    pub fn tensor_type(
        self,
        hf_name: &str,
        shape: &[usize],
        n_layers: usize,
        tied: bool,
    ) -> GgmlDType {
        let base = self.ggml();
        // Norms (1-D) stay F32; float file types take every 2-D weight.
        let &[_, cols] = shape else {
            return GgmlDType::F32;
        };
        if matches!(base, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return base;
        }
        let chosen = if self.is_mix() {
            self.mix_type(hf_name, cols, n_layers, tied)
        } else {
            base
        };
        fallback(chosen, cols)
    }

    /// llama.cpp's choice for a LLaMA tensor in this mix.
    fn mix_type(self, hf_name: &str, cols: usize, n_layers: usize, tied: bool) -> GgmlDType {
        use GgmlDType::{Q4K, Q5K, Q6K, Q8_0};
        let base = self.ggml();
        if hf_name == "lm_head.weight" || (tied && hf_name == "model.embed_tokens.weight") {
            return if !cols.is_multiple_of(base.block_size()) {
                Q8_0
            } else {
                Q6K
            };
        }
        let layer = hf_name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        let Some(i) = layer else {
            return base;
        };
        let n = n_layers;
        // More bits in the first and last eighths, and every third layer
        // between.
        let more_bits = i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let part = hf_name.rsplit('.').nth(1).unwrap_or("");
        match (self, part) {
            (Self::Q4kM | Self::Q5kM, "v_proj" | "down_proj") if more_bits => Q6K,
            (Self::Q4kS, "v_proj") if i < 4 => Q5K,
            (Self::Q4kS, "down_proj") if i < n / 8 => Q5K,
            (Self::Q3kM, "v_proj") => {
                if i < 2 {
                    Q5K
                } else {
                    Q4K
                }
            }
            (Self::Q3kM, "down_proj") => {
                if i < n / 16 {
                    Q5K
                } else {
                    Q4K
                }
            }
            (Self::Q3kM, "o_proj") => Q4K,
            _ => base,
        }
    }
}

/// `t`, or what llama.cpp falls back to when rows of `cols` weights do not
/// split into `t`'s blocks: a 32-weight type for a K-quant, F16 when that
/// does not fit either. (For 32-weight types llama.cpp has no fallback and
/// refuses; F16 here, so any shape can be written.)
fn fallback(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let next = match t {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if cols.is_multiple_of(next.block_size()) {
        next
    } else {
        GgmlDType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlDType::*;

    /// `part` of every layer of a 32-layer model (7B's depth) in `t`.
    fn layers(t: GgufType, part: &str) -> Vec<GgmlDType> {
        (0..32)
            .map(|l| {
                t.tensor_type(
                    &format!("model.layers.{l}.{part}.weight"),
                    &[4096, 4096],
                    32,
                    false,
                )
            })
            .collect()
    }

    #[test]
    fn mixes_give_more_bits_where_llama_cpp_does() {
        // use_more_bits(i, 32): layers 0–3, 28–31 and 6, 9, ..., 27.
        let more: Vec<usize> = (0..32)
            .filter(|&i| !(4..28).contains(&i) || (i - 4) % 3 == 2)
            .collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        for (t, base) in [(GgufType::Q4kM, Q4K), (GgufType::Q5kM, Q5K)] {
            for part in ["self_attn.v_proj", "mlp.down_proj"] {
                let want: Vec<_> = (0..32)
                    .map(|i| if more.contains(&i) { Q6K } else { base })
                    .collect();
                assert_eq!(layers(t, part), want, "{t:?} {part}");
            }
            assert_eq!(layers(t, "self_attn.q_proj"), vec![base; 32]);
            assert_eq!(layers(t, "mlp.up_proj"), vec![base; 32]);
        }
        let q4ks = layers(GgufType::Q4kS, "self_attn.v_proj");
        assert_eq!(&q4ks[..5], &[Q5K, Q5K, Q5K, Q5K, Q4K]);
        let q4ks = layers(GgufType::Q4kS, "mlp.down_proj");
        assert_eq!(&q4ks[..5], &[Q5K, Q5K, Q5K, Q5K, Q4K]);
        assert_eq!(layers(GgufType::Q3kM, "self_attn.o_proj"), vec![Q4K; 32]);
        let v = layers(GgufType::Q3kM, "self_attn.v_proj");
        assert_eq!(&v[..3], &[Q5K, Q5K, Q4K]);
        let down = layers(GgufType::Q3kM, "mlp.down_proj");
        assert_eq!(&down[..3], &[Q5K, Q5K, Q4K]);
        assert_eq!(layers(GgufType::Q3kM, "mlp.gate_proj"), vec![Q3K; 32]);
        // Plain types are pure.
        assert_eq!(layers(GgufType::Q4k, "self_attn.v_proj"), vec![Q4K; 32]);
    }

    #[test]
    fn output_embedding_norms_and_fallbacks() {
        let t =
            |ft: GgufType, name: &str, shape: &[usize], tied| ft.tensor_type(name, shape, 32, tied);
        assert_eq!(
            t(GgufType::Q4kM, "lm_head.weight", &[32000, 4096], false),
            Q6K
        );
        assert_eq!(
            t(
                GgufType::Q4kM,
                "model.embed_tokens.weight",
                &[32000, 4096],
                false
            ),
            Q4K
        );
        assert_eq!(
            t(
                GgufType::Q4kM,
                "model.embed_tokens.weight",
                &[32000, 4096],
                true
            ),
            Q6K
        );
        assert_eq!(
            t(GgufType::Q4k, "lm_head.weight", &[32000, 4096], false),
            Q4K
        );
        assert_eq!(t(GgufType::Q4kM, "model.norm.weight", &[4096], false), F32);
        assert_eq!(
            t(GgufType::Bf16, "lm_head.weight", &[32000, 4096], false),
            BF16
        );
        assert_eq!(t(GgufType::F16, "model.norm.weight", &[4096], false), F32);
        // Rows of 96: K-quants fall back to 32-weight types, as llama.cpp.
        let up = "model.layers.5.mlp.up_proj.weight";
        assert_eq!(t(GgufType::Q4k, up, &[8, 96], false), Q5_0);
        assert_eq!(t(GgufType::Q5k, up, &[8, 96], false), Q5_1);
        assert_eq!(t(GgufType::Q6k, up, &[8, 96], false), Q8_0);
        assert_eq!(t(GgufType::Q2k, up, &[8, 96], false), Q4_0);
        assert_eq!(t(GgufType::Q3k, up, &[8, 96], false), Q4_0);
        // Rows of 8 fit no block: F16.
        assert_eq!(t(GgufType::Q4k, up, &[8, 8], false), F16);
        assert_eq!(t(GgufType::Q8_0, up, &[8, 8], false), F16);
        // An output layer whose rows are not whole K blocks: Q8_0.
        assert_eq!(t(GgufType::Q4kM, "lm_head.weight", &[320, 96], false), Q8_0);
        assert_eq!(GgufType::Q4kM.file_type(), 15);
        assert_eq!(GgufType::Q4kS.file_type(), 14);
        assert_eq!(GgufType::Q5kM.file_type(), 17);
        assert_eq!(GgufType::Bf16.file_type(), 32);
    }
}
