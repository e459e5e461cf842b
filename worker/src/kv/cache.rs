//! The paged KV store: one pool of fixed-size blocks per layer, preallocated
//! at start and written in place. A sequence owns a block table (block ids in
//! position order); position p lives in block `table[p / block_size]`, slot
//! `p % block_size`. Layout per layer is `[block][kv_head][slot][head_dim]`,
//! so one head's part of a block is contiguous, and a tensor-parallel rank can
//! hold just its own heads of every block.
//!
//! Entries are f32, or bf16 (`--kv-cache-dtype bf16`): half the memory, so
//! twice the tokens in the same budget and half the bytes attention reads,
//! at bf16's 8-bit mantissa.

use half::bf16;

use super::blocks::BlockId;
use crate::mem::HugeBuf;

/// The element type of the cache (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvDtype {
    F32,
    Bf16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }
}

/// One layer's keys or values.
pub enum Store {
    F32(HugeBuf<f32>),
    Bf16(HugeBuf<bf16>),
}

/// An element type the cache can hold.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The store's elements; `None` if it holds another type.
    fn view(s: &Store) -> Option<&[Self]>;
    fn view_mut(s: &mut Store) -> Option<&mut [Self]>;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn view(s: &Store) -> Option<&[f32]> {
        match s {
            Store::F32(v) => Some(v),
            Store::Bf16(_) => None,
        }
    }
    fn view_mut(s: &mut Store) -> Option<&mut [f32]> {
        match s {
            Store::F32(v) => Some(v),
            Store::Bf16(_) => None,
        }
    }
}

impl KvElem for bf16 {
    /// The top half of an f32: a shift the compiler vectorizes.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    /// Rounded to nearest, ties to even.
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn view(s: &Store) -> Option<&[bf16]> {
        match s {
            Store::Bf16(v) => Some(v),
            Store::F32(_) => None,
        }
    }
    fn view_mut(s: &mut Store) -> Option<&mut [bf16]> {
        match s {
            Store::Bf16(v) => Some(v),
            Store::F32(_) => None,
        }
    }
}

pub struct PagedKv {
    k: Vec<Store>,
    v: Vec<Store>,
    dtype: KvDtype,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl PagedKv {
    /// The whole pool is in memory when this returns (see
    /// [`HugeBuf::resident`]): serving does not stop to fault it in.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Self {
        let n = num_blocks * kv_heads * block_size * head_dim;
        let store = || match dtype {
            KvDtype::F32 => Store::F32(HugeBuf::resident(n)),
            KvDtype::Bf16 => Store::Bf16(HugeBuf::resident(n)),
        };
        Self {
            k: (0..num_layers).map(|_| store()).collect(),
            v: (0..num_layers).map(|_| store()).collect(),
            dtype,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
        }
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
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
        match self.dtype {
            KvDtype::F32 => self.write_as::<f32>(layer, table, start, k, v),
            KvDtype::Bf16 => self.write_as::<bf16>(layer, table, start, k, v),
        }
    }

    fn write_as<T: KvElem>(
        &mut self,
        layer: usize,
        table: &[BlockId],
        start: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let (hd, heads, bs) = (self.head_dim, self.kv_heads, self.block_size);
        let n = k.len() / (heads * hd);
        let bases: Vec<(usize, usize)> = (0..n)
            .flat_map(|t| {
                let pos = start + t;
                (0..heads).map(move |h| (t * heads + h, (table[pos / bs], h, pos % bs)))
            })
            .map(|(src, (block, h, slot))| (src * hd, self.base(block, h) + slot * hd))
            .collect();
        for (store, rows) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            let dst = T::view_mut(store).expect("the store holds the cache's dtype");
            for &(src, at) in &bases {
                for (d, &x) in dst[at..at + hd].iter_mut().zip(&rows[src..src + hd]) {
                    *d = T::from_f32(x);
                }
            }
        }
    }

    /// Keys and values of `head` in `block` for layer `layer`,
    /// `[slot][head_dim]`, as `T`, which must be the cache's dtype.
    pub fn block<T: KvElem>(&self, layer: usize, block: BlockId, head: usize) -> (&[T], &[T]) {
        let b = self.base(block, head);
        let len = self.block_size * self.head_dim;
        let view = |s| T::view(s).expect("block read as the cache's dtype");
        (
            &view(&self.k[layer])[b..b + len],
            &view(&self.v[layer])[b..b + len],
        )
    }
}
