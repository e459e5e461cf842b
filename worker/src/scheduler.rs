//! The scheduler: continuous batching over the paged KV cache. A plain
//! struct, driven by the engine thread and unit-tested synchronously.
//!
//! Each step it first continues the running sequences in admission order (a
//! decode is one token; an unfinished prefill takes the next chunk the token
//! budget allows), then admits waiting sequences in arrival order while the
//! budget, the running cap and the free blocks allow. When a running
//! sequence needs a block and none is free, the most recently admitted
//! running sequence is preempted: its blocks are released and it goes back to
//! the front of the queue to be recomputed later (full blocks it had filled
//! stay in the prefix cache, so recomputation is often cheap). Admission
//! looks up the prompt's full blocks in the prefix cache and skips what hits.
//! A prompt whose next block another sequence computes in this very step
//! waits one step instead, and then finds it cached: a burst of requests
//! with one shared prefix computes it once, not once per request.
//!
//! The step it produces ([`StepPlan`]) is a plain value — which sequences,
//! which positions — that can be sent to other ranks.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::kv::{BlockId, BlockManager, chain_hash};

pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_running: usize,
    /// Tokens (prefill chunks + decodes) in one step at most.
    pub max_batch_tokens: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

#[derive(Debug)]
pub struct Sequence {
    /// Prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Block table: position p is in `table[p / block_size]`.
    pub table: Vec<BlockId>,
    /// Tokens whose keys and values are in the cache.
    pub computed: usize,
    /// Chain hashes of the full blocks of `tokens`, as far as computed.
    hashes: Vec<u64>,
    /// Full blocks of `table` registered in the prefix cache.
    registered: usize,
    /// Whether it has ever been scheduled.
    pub admitted: bool,
}

impl Sequence {
    /// The chain hash of full block `b` (hashing it, and those before it,
    /// on first use).
    fn block_hash(&mut self, b: usize, bs: usize) -> u64 {
        while self.hashes.len() <= b {
            let i = self.hashes.len();
            let parent = i.checked_sub(1).map(|p| self.hashes[p]);
            self.hashes
                .push(chain_hash(parent, &self.tokens[i * bs..(i + 1) * bs]));
        }
        self.hashes[b]
    }

    pub fn new(prompt: Vec<u32>) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            table: Vec::new(),
            computed: 0,
            hashes: Vec::new(),
            registered: 0,
            admitted: false,
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// One sequence's part of a step: run `tokens[start..start+len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the sequence's end: sample its next token.
    pub sample: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences admitted for the first time in this step.
    pub newly_admitted: Vec<SeqId>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Prompt tokens looked up in the prefix cache at admission, and hits.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    /// Tokens run through the model (prefill chunks and decodes).
    pub computed_tokens: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order; the last is the first to be preempted.
    running: Vec<SeqId>,
    pub counters: Counters,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size),
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: Counters::default(),
        }
    }

    pub fn add(&mut self, id: SeqId, seq: Sequence) {
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Removes a sequence (finished or cancelled), releasing its blocks.
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        self.blocks.release_all(&seq.table);
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        Some(seq)
    }

    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_batch_tokens;
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let remaining = seq.tokens.len() - seq.computed;
            let n = remaining.min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let need = (seq.computed + n)
                .div_ceil(self.cfg.block_size)
                .saturating_sub(seq.table.len());
            if !self.make_room(need, id) {
                // `id` itself was the newest and has been preempted.
                continue;
            }
            self.grow(id, need);
            plan.seqs.push(self.scheduled(id, n));
            budget -= n;
            i += 1;
        }
        // Hashes of the full blocks this step computes.
        let mut computing: HashSet<u64> = HashSet::new();
        for s in &plan.seqs {
            self.blocks_computed(s, &mut computing);
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            // Arrival order holds: a waiting sequence that cannot start
            // (no room, or its next block being computed) holds the others.
            let Some(n) = self.admit(id, budget, &computing) else {
                break;
            };
            self.waiting.pop_front();
            self.running.push(id);
            if let Some(seq) = self.seqs.get_mut(&id)
                && !seq.admitted
            {
                seq.admitted = true;
                plan.newly_admitted.push(id);
            }
            let scheduled = self.scheduled(id, n);
            self.blocks_computed(&scheduled, &mut computing);
            plan.seqs.push(scheduled);
            budget -= n;
        }
        plan
    }

    /// Adds the chain hashes of the full prompt blocks `s` completes in its
    /// step to `into` (decodes complete none worth sharing: generated text).
    fn blocks_computed(&mut self, s: &ScheduledSeq, into: &mut HashSet<u64>) {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(&s.id) else {
            return;
        };
        let end = (s.start + s.len).min(seq.prompt_len) / bs;
        for b in s.start / bs..end {
            into.insert(seq.block_hash(b, bs));
        }
    }

    /// Frees blocks until `need` are available, preempting the newest
    /// running sequences. False if `for_id` had to be preempted itself.
    fn make_room(&mut self, need: usize, for_id: SeqId) -> bool {
        while self.blocks.num_available() < need {
            let Some(victim) = self.running.pop() else {
                return false;
            };
            self.preempt(victim);
            if victim == for_id {
                return false;
            }
        }
        true
    }

    fn preempt(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.blocks.release_all(&seq.table);
            seq.table.clear();
            seq.computed = 0;
            seq.registered = 0;
            self.waiting.push_front(id);
            self.counters.preemptions += 1;
        }
    }

    fn grow(&mut self, id: SeqId, need: usize) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            for _ in 0..need {
                // make_room guaranteed availability.
                if let Some(b) = self.blocks.allocate() {
                    seq.table.push(b);
                }
            }
        }
    }

    /// Tries to admit `id` with up to `budget` tokens: prefix-cache lookup,
    /// then blocks for the first chunk. Returns the chunk length; `None`
    /// when blocks are short or when the first block it would compute is in
    /// `computing` (it is cached after this step).
    fn admit(&mut self, id: SeqId, budget: usize, computing: &HashSet<u64>) -> Option<usize> {
        let bs = self.cfg.block_size;
        let seq = self.seqs.get_mut(&id)?;
        // At least one token must run to produce logits.
        let eligible = (seq.tokens.len() - 1) / bs;
        let mut hits = Vec::new();
        for b in 0..eligible {
            let h = seq.block_hash(b, bs);
            match self.blocks.lookup(h) {
                Some(block) => hits.push(block),
                None if computing.contains(&h) => {
                    self.blocks.release_all(&hits);
                    return None;
                }
                None => break,
            }
        }
        let computed = hits.len() * bs;
        let n = (seq.tokens.len() - computed).min(budget);
        let need = (computed + n).div_ceil(bs) - hits.len();
        if self.blocks.num_available() < need {
            self.blocks.release_all(&hits);
            return None;
        }
        self.counters.prefix_query_tokens += seq.tokens.len() as u64;
        self.counters.prefix_hit_tokens += computed as u64;
        seq.registered = hits.len();
        seq.table = hits;
        seq.computed = computed;
        for _ in 0..need {
            if let Some(b) = self.blocks.allocate() {
                seq.table.push(b);
            }
        }
        Some(n)
    }

    fn scheduled(&self, id: SeqId, n: usize) -> ScheduledSeq {
        let seq = &self.seqs[&id];
        ScheduledSeq {
            id,
            start: seq.computed,
            len: n,
            sample: seq.computed + n == seq.tokens.len(),
        }
    }

    /// Records that `plan` ran: advances each sequence, registers newly full
    /// blocks in the prefix cache, and appends the sampled tokens.
    pub fn complete(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)]) {
        let bs = self.cfg.block_size;
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            seq.computed = s.start + s.len;
            self.counters.computed_tokens += s.len as u64;
            let full = seq.computed / bs;
            while seq.registered < full {
                let b = seq.registered;
                let h = seq.block_hash(b, bs);
                self.blocks.register(seq.table[b], h);
                seq.registered += 1;
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.tokens.push(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(num_blocks: usize, max_batch_tokens: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_running: 8,
            max_batch_tokens,
            num_blocks,
            block_size: 4,
        })
    }

    /// Runs one step with a stand-in model that samples `100 + position`,
    /// and returns the plan.
    fn step(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        let sampled: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|x| x.sample)
            .map(|x| (x.id, 100 + (x.start + x.len) as u32))
            .collect();
        s.complete(&plan, &sampled);
        plan
    }

    fn prompt(n: usize, base: u32) -> Sequence {
        Sequence::new((0..n as u32).map(|i| base + i).collect())
    }

    #[test]
    fn prefills_and_decodes_share_steps() {
        let mut s = sched(16, 64);
        s.add(1, prompt(5, 0));
        s.add(2, prompt(3, 50));
        let p = step(&mut s);
        assert_eq!(
            p.seqs,
            vec![
                ScheduledSeq {
                    id: 1,
                    start: 0,
                    len: 5,
                    sample: true
                },
                ScheduledSeq {
                    id: 2,
                    start: 0,
                    len: 3,
                    sample: true
                },
            ]
        );
        assert_eq!(p.newly_admitted, vec![1, 2]);
        s.add(3, prompt(2, 70));
        let p = step(&mut s);
        // Two decodes, then the new prefill.
        assert_eq!(
            p.seqs
                .iter()
                .map(|x| (x.id, x.start, x.len))
                .collect::<Vec<_>>(),
            vec![(1, 5, 1), (2, 3, 1), (3, 0, 2)]
        );
        assert_eq!(s.seq(1).unwrap().generated(), &[105, 106]);
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks() {
        let mut s = sched(16, 8);
        s.add(1, prompt(20, 0));
        let chunks: Vec<(usize, usize, bool)> = (0..4)
            .map(|_| {
                let p = step(&mut s);
                (p.seqs[0].start, p.seqs[0].len, p.seqs[0].sample)
            })
            .collect();
        assert_eq!(
            chunks,
            vec![(0, 8, false), (8, 8, false), (16, 4, true), (20, 1, true)]
        );
    }

    #[test]
    fn a_shared_prefix_is_computed_once() {
        let mut s = sched(32, 64);
        s.add(1, prompt(13, 0));
        step(&mut s);
        s.finish(1);
        // Same first 12 tokens (3 full blocks), different rest.
        let mut b: Vec<u32> = (0..12).collect();
        b.extend([500, 501, 502]);
        s.add(2, Sequence::new(b));
        let p = step(&mut s);
        assert_eq!((p.seqs[0].start, p.seqs[0].len), (12, 3));
        assert_eq!(s.counters.prefix_hit_tokens, 12);
        assert_eq!(s.counters.prefix_query_tokens, 13 + 15);
        // A prompt that is entirely cached still computes its last token.
        s.add(3, prompt(12, 0));
        let p = step(&mut s);
        let p3 = p.seqs.iter().find(|x| x.id == 3).unwrap();
        assert_eq!((p3.start, p3.len, p3.sample), (8, 4, true));
    }

    #[test]
    fn a_prompt_waits_a_step_for_the_prefix_another_is_computing() {
        let mut s = sched(32, 64);
        // Two prompts sharing 3 full blocks arrive together.
        let mut b: Vec<u32> = (0..12).collect();
        b.extend([500, 501, 502]);
        s.add(1, prompt(13, 0));
        s.add(2, Sequence::new(b));
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 1, "the second waits while the first computes");
        let p = step(&mut s);
        let p2 = p.seqs.iter().find(|x| x.id == 2).unwrap();
        assert_eq!(
            (p2.start, p2.len),
            (12, 3),
            "and then skips the shared blocks"
        );
        assert_eq!(s.counters.prefix_hit_tokens, 12);
        // Prompts sharing nothing start together.
        s.add(3, prompt(9, 100));
        s.add(4, prompt(9, 200));
        let p = step(&mut s);
        assert!([3, 4].iter().all(|id| p.seqs.iter().any(|x| x.id == *id)));
    }

    #[test]
    fn when_blocks_run_out_the_newest_is_preempted_and_recomputed() {
        // 4 blocks of 4 tokens: two sequences of 6 + 8 new tokens cannot
        // both finish without one giving way.
        let mut s = sched(4, 64);
        s.add(1, prompt(6, 0));
        s.add(2, prompt(6, 20));
        let mut done = Vec::new();
        for _ in 0..60 {
            step(&mut s);
            for id in [1, 2] {
                if s.seq(id).is_some_and(|q| q.generated().len() == 8) {
                    done.push(s.finish(id).unwrap());
                }
            }
            if s.is_idle() {
                break;
            }
        }
        assert!(s.is_idle(), "did not finish");
        assert!(s.counters.preemptions >= 1);
        // Recomputation gives the same tokens: positions 6..14 sampled.
        for seq in &done {
            assert_eq!(seq.generated(), &(106..114).collect::<Vec<u32>>()[..]);
        }
        assert_eq!(s.blocks().num_used(), 0, "blocks leaked");
    }

    #[test]
    fn finishing_a_waiting_or_running_sequence_frees_everything() {
        let mut s = sched(8, 64);
        s.add(1, prompt(9, 0));
        s.add(2, prompt(4, 0));
        step(&mut s);
        s.add(3, prompt(4, 9));
        assert!(s.blocks().num_used() > 0);
        for id in [1, 2, 3] {
            s.finish(id);
        }
        assert!(s.is_idle());
        assert_eq!(s.blocks().num_used(), 0);
        assert_eq!((s.num_running(), s.num_waiting()), (0, 0));
    }
}
