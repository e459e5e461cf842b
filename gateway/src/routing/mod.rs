//! Routing policies: which of the eligible replicas gets the next request.
//!
//! A policy sees only replicas that are healthy, not draining, with a closed
//! (or half-open) circuit breaker, and serving the requested model: health,
//! model lookup, breakers and retries are the registry's job. One file per
//! policy, each with its tests; [`build`] turns the `--routing` flag into one.

pub mod least_load;
pub mod prefix_aware;
pub mod round_robin;

pub use least_load::LeastLoad;
pub use prefix_aware::PrefixAware;
pub use round_robin::RoundRobin;

/// What a policy knows about one eligible replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The replica's address ("http://host:port"): stable while it is registered.
    pub address: String,
    /// Requests this gateway has in flight on the replica: exact, and counted
    /// from the moment of the pick, so concurrent picks see each other.
    pub in_flight: usize,
    /// The worker's own figures, from the last poll of `GetLoad` (they
    /// include other gateways' requests); `None` before the first poll.
    pub load: Option<ReplicaLoad>,
}

/// The routing-relevant part of a worker's `Load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaLoad {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_free: u32,
    pub kv_blocks_total: u32,
    /// Tokens per KV block: the unit of the worker's prefix cache.
    pub kv_block_size: u32,
    /// Of `running + waiting`, the requests that were not this gateway's
    /// when polled (other gateways', direct clients'): what the exact
    /// `in_flight` cannot see.
    pub others: u32,
}

/// What a policy knows about the request being routed.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    /// The prompt's token ids, as the worker will see them.
    pub prompt: &'a [u32],
}

pub trait RoutingPolicy: Send + Sync + std::fmt::Debug {
    /// The flag value that selects this policy.
    fn name(&self) -> &'static str;

    /// Picks one of `candidates` (sorted by address, never empty when
    /// called by the registry) and returns its index; `None` when empty.
    fn pick(&self, route: &Route<'_>, candidates: &[Candidate]) -> Option<usize>;
}

/// The `--routing` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    /// Each eligible replica in turn.
    RoundRobin,
    /// The replica with the fewest requests in flight or queued.
    LeastLoad,
    /// Consistent hashing over the prompt's first KV blocks, so requests
    /// sharing a prefix reach the replica that caches it; bounded by load.
    PrefixAware,
}

/// Tuning of the prefix-aware policy (flags `--prefix-*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixOptions {
    /// Leading prompt tokens hashed to choose a replica (rounded down to
    /// whole KV blocks when the prompt is longer than one block).
    pub prefix_tokens: usize,
    /// A replica may take at most `(1 + load_factor) ×` the mean load (in
    /// flight, this request included) before its prefix moves on along the
    /// ring. The default, 1, allows twice the mean: a batching worker gains
    /// more from its cached prefixes than it loses to a busier batch, and
    /// a prefix that moves costs a recomputation on the next replica.
    pub load_factor: f64,
    /// A replica with fewer requests than this is never too loaded for its
    /// prefixes: at low load the bound above would be 1 and scatter
    /// prefixes over idle replicas, while a batching worker runs a few
    /// sequences as fast as one.
    pub min_load: usize,
}

impl Default for PrefixOptions {
    fn default() -> Self {
        PrefixOptions {
            prefix_tokens: 256,
            load_factor: 1.0,
            min_load: 4,
        }
    }
}

pub fn build(kind: PolicyKind, prefix: PrefixOptions) -> Box<dyn RoutingPolicy> {
    match kind {
        PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        PolicyKind::LeastLoad => Box::new(LeastLoad::default()),
        PolicyKind::PrefixAware => Box::new(PrefixAware::new(prefix)),
    }
}

/// `count` idle candidates with addresses in address order, for the
/// policies' tests.
#[cfg(test)]
pub(crate) fn idle_candidates(count: usize) -> Vec<Candidate> {
    (0..count)
        .map(|i| Candidate {
            address: format!("http://10.0.0.{i}:50051"),
            in_flight: 0,
            load: None,
        })
        .collect()
}

/// A deterministic stream for the policies' simulations (Knuth's MMIX LCG).
#[cfg(test)]
pub(crate) struct Lcg(pub u64);

#[cfg(test)]
impl Lcg {
    fn step(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// The high 32 bits: an LCG's low bits are the least random.
    pub fn next(&mut self) -> u32 {
        (self.step() >> 32) as u32
    }

    pub fn below(&mut self, bound: usize) -> usize {
        ((self.step() >> 33) % bound as u64) as usize
    }

    /// `len` token ids below 32000.
    pub fn prompt(&mut self, len: usize) -> Vec<u32> {
        (0..len).map(|_| self.next() % 32_000).collect()
    }
}
