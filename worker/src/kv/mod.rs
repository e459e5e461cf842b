//! The KV cache: fixed-size blocks from one preallocated pool ([`PagedKv`]),
//! and the bookkeeping of who holds which block, with prefix caching
//! ([`BlockManager`]).

pub mod blocks;
pub mod cache;

pub use blocks::{BlockId, BlockManager, chain_hash};
pub use cache::{KvDtype, KvElem, PagedKv};
