//! The block manager: which KV blocks are free, who holds each one, and
//! which full blocks hold a known token prefix (prefix caching). Pure
//! bookkeeping over block ids — it never touches tensors, so every rank of a
//! tensor-parallel group can follow the leader's decisions on its own slice.
//!
//! A block is *held* while its reference count is positive. A released block
//! that was registered with a prefix hash stays cached, on an LRU list, until
//! a new allocation needs it; one that was not goes straight back to the free
//! list.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;

/// Hash of a full block's tokens chained with its predecessor's hash, so
/// equal hashes mean equal whole prefixes, not just equal blocks.
pub fn chain_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: stable within and across runs.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    hash: Vec<Option<u64>>,
    by_hash: HashMap<u64, BlockId>,
    /// Never-cached blocks with no holder.
    free: Vec<BlockId>,
    /// Cached blocks with no holder, least recently released first.
    evictable: VecDeque<BlockId>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: VecDeque::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks an allocation could get now (free or evictable).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by some sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_available()
    }

    /// A block for new content, evicting the least recently used cached
    /// block if nothing is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let id = self.evictable.pop_front()?;
                if let Some(h) = self.hash[id as usize].take() {
                    self.by_hash.remove(&h);
                }
                id
            }
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// Takes a hold on the cached block with this prefix hash, if any.
    pub fn lookup(&mut self, hash: u64) -> Option<BlockId> {
        let id = *self.by_hash.get(&hash)?;
        if self.refs[id as usize] == 0 {
            self.evictable.retain(|&b| b != id);
        }
        self.refs[id as usize] += 1;
        Some(id)
    }

    /// Records that held block `id` is full and holds the prefix `hash`. If
    /// another block already holds that prefix, the first one stays the
    /// cached copy.
    pub fn register(&mut self, id: BlockId, hash: u64) {
        debug_assert!(self.refs[id as usize] > 0, "registering an unheld block");
        if self.hash[id as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.hash[id as usize] = Some(hash);
            self.by_hash.insert(hash, id);
        }
    }

    /// Drops one hold on `id`.
    pub fn release(&mut self, id: BlockId) {
        let r = &mut self.refs[id as usize];
        debug_assert!(*r > 0, "releasing a free block");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.hash[id as usize].is_some() {
                self.evictable.push_back(id);
            } else {
                self.free.push(id);
            }
        }
    }

    pub fn release_all(&mut self, ids: &[BlockId]) {
        for &id in ids {
            self.release(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_release() {
        let mut m = BlockManager::new(3, 16);
        let a: Vec<_> = (0..3).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.allocate(), None);
        assert_eq!(m.num_used(), 3);
        m.release_all(&a);
        assert_eq!(m.num_available(), 3);
    }

    #[test]
    fn cached_blocks_are_shared_then_evicted_least_recent_first() {
        let mut m = BlockManager::new(3, 4);
        let h1 = chain_hash(None, &[1, 2, 3, 4]);
        let h2 = chain_hash(Some(h1), &[5, 6, 7, 8]);
        let b1 = m.allocate().unwrap();
        let b2 = m.allocate().unwrap();
        m.register(b1, h1);
        m.register(b2, h2);
        // A second sequence with the same prefix shares both blocks.
        assert_eq!(m.lookup(h1), Some(b1));
        assert_eq!(m.lookup(h2), Some(b2));
        assert_eq!(m.num_used(), 2);
        m.release_all(&[b1, b2]);
        m.release_all(&[b1, b2]);
        // Unheld but cached: available, and still found.
        assert_eq!(m.num_available(), 3);
        assert_eq!(m.lookup(h1), Some(b1));
        m.release(b1);
        // The free block goes first, then the least recently released (b2).
        let c = m.allocate().unwrap();
        assert!(c != b1 && c != b2);
        assert_eq!(m.allocate(), Some(b2));
        assert_eq!(m.lookup(h2), None, "evicted block still indexed");
        assert_eq!(m.lookup(h1), Some(b1));
    }

    #[test]
    fn chained_hashes_depend_on_the_whole_prefix() {
        let a = chain_hash(None, &[1, 2]);
        let b = chain_hash(None, &[9, 9]);
        assert_ne!(chain_hash(Some(a), &[3, 4]), chain_hash(Some(b), &[3, 4]));
        assert_eq!(chain_hash(Some(a), &[3, 4]), chain_hash(Some(a), &[3, 4]));
    }
}
