//! GGUF type names, as GGML and llama.cpp spell them, and a header scan that
//! finds a tensor of a type candle cannot even parse (IQ4_XS, IQ2_XXS...),
//! so such a file is refused naming the tensor and its type rather than
//! with candle's "unknown dtype for tensor 23". Reads only the header.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;

/// GGML's name for a tensor type.
pub fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// GGML's name for the tensor type id `id` (`ggml_type` in ggml.h).
pub fn ggml_type_name_by_id(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// llama.cpp's name for a `general.file_type` (`llama_ftype` in llama.h).
pub fn file_type_name(n: u32) -> Option<&'static str> {
    Some(match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// Type ids candle 0.11 reads.
fn candle_reads(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// The first tensor in a GGUF header whose type id candle cannot read, with
/// that id. None if every type is readable or the header is malformed (the
/// caller then reports candle's own error).
pub fn unreadable_tensor<R: Read + Seek>(r: &mut R) -> Option<(String, u32)> {
    r.seek(SeekFrom::Start(0)).ok()?;
    let size = r.seek(SeekFrom::End(0)).ok()?;
    r.seek(SeekFrom::Start(0)).ok()?;
    let mut h = Header { r, size, v1: false };
    if h.u32()? != 0x4655_4747 {
        return None;
    }
    h.v1 = h.u32()? == 1;
    let (tensors, kvs) = (h.len()?, h.len()?);
    for _ in 0..kvs {
        h.skip_string()?;
        let t = h.u32()?;
        h.skip_value(t, 0)?;
    }
    for _ in 0..tensors {
        let name = h.string()?;
        let dims = h.u32()?;
        if dims > 8 {
            return None;
        }
        for _ in 0..dims {
            h.len()?;
        }
        let id = h.u32()?;
        h.u64()?;
        if !candle_reads(id) {
            return Some((name, id));
        }
    }
    None
}

struct Header<'a, R> {
    r: &'a mut R,
    size: u64,
    /// GGUF v1 counts and lengths are 32-bit; later ones 64-bit.
    v1: bool,
}

impl<R: Read + Seek> Header<'_, R> {
    fn u32(&mut self) -> Option<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    fn len(&mut self) -> Option<u64> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    /// Skips `n` bytes, refusing to go past the end of the file.
    fn skip(&mut self, n: u64) -> Option<()> {
        let at = self.r.stream_position().ok()?;
        if at.checked_add(n)? > self.size {
            return None;
        }
        self.r
            .seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()?;
        Some(())
    }

    fn skip_string(&mut self) -> Option<()> {
        let n = self.len()?;
        self.skip(n)
    }

    fn string(&mut self) -> Option<String> {
        let n = self.len()?;
        let at = self.r.stream_position().ok()?;
        if n > 1 << 16 || at.checked_add(n)? > self.size {
            return None;
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    }

    /// Skips one metadata value of type `t` (arrays nest, to a limit).
    fn skip_value(&mut self, t: u32, depth: usize) -> Option<()> {
        match t {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.skip_string(),
            9 if depth < 4 => {
                let (et, n) = (self.u32()?, self.len()?);
                let fixed = match et {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match fixed {
                    Some(w) => self.skip(n.checked_mul(w)?),
                    None => {
                        for _ in 0..n {
                            self.skip_value(et, depth + 1)?;
                        }
                        Some(())
                    }
                }
            }
            _ => None,
        }
    }
}
