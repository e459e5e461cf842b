//! The paged KV store: one pool of fixed-size blocks per layer, preallocated
//! at start and written in place. A sequence owns a block table (block ids in
//! position order); position p lives in block `table[p / block_size]`, slot
//! `p % block_size`. Layout per layer is `[block][kv_head][slot][head_dim]`,
//! so one head's part of a block is contiguous, and a tensor-parallel rank can
//! hold just its own heads of every block.

use super::blocks::BlockId;

pub struct PagedKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl PagedKv {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let n = num_blocks * kv_heads * block_size * head_dim;
        Self {
            k: (0..num_layers).map(|_| vec![0.0; n]).collect(),
            v: (0..num_layers).map(|_| vec![0.0; n]).collect(),
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Offset of (block, head, slot 0) in a layer's buffer.
    fn base(&self, block: BlockId, head: usize) -> usize {
        ((block as usize * self.kv_heads + head) * self.block_size) * self.head_dim
    }

    /// Writes rows `k`, `v` (`[n, kv_heads·head_dim]`) for positions
    /// `start..start+n` of the sequence with block table `table`.
    pub fn write(&mut self, layer: usize, table: &[BlockId], start: usize, k: &[f32], v: &[f32]) {
        let (hd, heads, bs) = (self.head_dim, self.kv_heads, self.block_size);
        let n = k.len() / (heads * hd);
        for t in 0..n {
            let pos = start + t;
            let block = table[pos / bs];
            for h in 0..heads {
                let src = (t * heads + h) * hd;
                let dst = self.base(block, h) + (pos % bs) * hd;
                self.k[layer][dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                self.v[layer][dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// Keys and values of `head` in `block` for layer `layer`, `[slot][head_dim]`.
    pub fn block(&self, layer: usize, block: BlockId, head: usize) -> (&[f32], &[f32]) {
        let b = self.base(block, head);
        let len = self.block_size * self.head_dim;
        (&self.k[layer][b..b + len], &self.v[layer][b..b + len])
    }
}
