//! Per-sequence key/value cache, preallocated for the sequence's whole
//! budget (prompt + max new tokens) and written in place: a step writes the
//! new positions, never reallocates or concatenates. Paged blocks shared by a
//! pool replace this with the serving engine; the attention code reads it
//! through [`LayerCache::keys`]/[`LayerCache::values`] per head, which is the
//! interface blocks will keep.

/// One layer's cache: `[kv_heads][capacity][head_dim]` for K and for V, so
/// one head's history is contiguous.
pub struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

pub struct SeqCache {
    layers: Vec<LayerCache>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Positions `0..len` hold valid entries in every layer.
    len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let n = kv_heads * capacity * head_dim;
        let layers = (0..num_layers)
            .map(|_| LayerCache {
                k: vec![0.0; n],
                v: vec![0.0; n],
            })
            .collect();
        Self {
            layers,
            kv_heads,
            head_dim,
            capacity,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks positions `0..len` valid after every layer has written them.
    pub fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    pub fn layer(&self, l: usize) -> &LayerCache {
        &self.layers[l]
    }

    /// Writes rows `k`, `v` (`[n, kv_heads·head_dim]`, token-major) at
    /// positions `start..start+n` of layer `l`.
    pub fn write(&mut self, l: usize, start: usize, k: &[f32], v: &[f32]) {
        let (hd, heads, cap) = (self.head_dim, self.kv_heads, self.capacity);
        let n = k.len() / (heads * hd);
        assert!(start + n <= cap, "cache write past capacity {cap}");
        let layer = &mut self.layers[l];
        for t in 0..n {
            for h in 0..heads {
                let src = (t * heads + h) * hd;
                let dst = (h * cap + start + t) * hd;
                layer.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                layer.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
}

impl LayerCache {
    /// Keys of `head` for positions `0..n`, `[n, head_dim]`.
    pub fn keys(&self, head: usize, n: usize, cap: usize, hd: usize) -> &[f32] {
        &self.k[head * cap * hd..(head * cap + n) * hd]
    }

    pub fn values(&self, head: usize, n: usize, cap: usize, hd: usize) -> &[f32] {
        &self.v[head * cap * hd..(head * cap + n) * hd]
    }
}
