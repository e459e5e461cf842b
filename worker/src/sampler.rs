//! Turns a sequence's logits into its next token: penalties, temperature,
//! top-k, top-p, min-p, and a per-request random stream, so a seeded request
//! yields the same tokens whatever else runs beside it. Log probabilities are
//! those of the model's own distribution (before any of these transforms).

use std::collections::HashMap;

use aquila_proto::worker::v1::{SamplingParams, Token, TopToken};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens of the prompt, for the repetition penalty.
    prompt_tokens: Vec<u32>,
    /// Generated token → count, for presence/frequency/repetition penalties.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut prompt_tokens = prompt.to_vec();
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt_tokens,
            output_counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token is just the largest logit: greedy, with no
    /// penalty to apply first and no log probabilities to report. The
    /// device may then pick it ([`take`](Self::take)) instead of sending
    /// the logits.
    pub fn plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature == 0.0
            && !p.logprobs
            && p.top_logprobs == 0
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// Records `id`, picked elsewhere by argmax, as the next token: what
    /// [`sample`](Self::sample) returns for a plain greedy sampler.
    pub fn take(&mut self, id: u32) -> Token {
        *self.output_counts.entry(id).or_default() += 1;
        Token {
            id,
            ..Token::default()
        }
    }

    /// Picks the next token from `logits` (consumed as scratch space).
    pub fn sample(&mut self, logits: &mut [f32]) -> Token {
        let p = &self.params;
        // Log probabilities come from the untransformed logits.
        let raw = (p.logprobs || p.top_logprobs > 0).then(|| {
            let lse = log_sum_exp(logits);
            let top: Vec<TopToken> = top_n(logits, p.top_logprobs as usize)
                .into_iter()
                .map(|(id, l)| TopToken {
                    id,
                    logprob: l - lse,
                })
                .collect();
            (logits.to_vec(), lse, top)
        });
        self.apply_penalties(logits);
        let id = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.output_counts.entry(id).or_default() += 1;
        let mut token = Token {
            id,
            ..Token::default()
        };
        if let Some((raw, lse, top)) = raw {
            token.logprob = raw[id as usize] - lse;
            token.top = top;
        }
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            let seen = self
                .prompt_tokens
                .iter()
                .chain(self.output_counts.keys())
                .copied();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        // Candidates sorted by logit, truncated by top-k.
        let k = if p.top_k == 0 {
            logits.len()
        } else {
            (p.top_k as usize).min(logits.len())
        };
        let mut cand: Vec<(u32, f32)> = top_n(logits, k);
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|&(_, l)| ((l - max) * inv_t).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        // min-p: relative to the most likely token.
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        }
        // top-p: the smallest prefix whose mass reaches top_p.
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut n = 0;
            for &q in &probs[..keep] {
                mass += q;
                n += 1;
                if mass >= p.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        cand.truncate(keep);
        probs.truncate(keep);
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (i, &q) in probs.iter().enumerate() {
            if u < q {
                return cand[i].0;
            }
            u -= q;
        }
        cand[keep - 1].0
    }
}

/// Index of the largest value; the lowest index wins ties, NaN never wins
/// (a row of nothing but NaN gives 0). The GPU's `argmax_rows` agrees.
///
/// Two passes the compiler vectorizes, the largest number and then its
/// first position, instead of one pass that carries the best index from
/// element to element: a greedy step of 16 sequences over a 32,000-token
/// vocabulary scanned its logits at one element per cycle or worse.
pub fn argmax(v: &[f32]) -> u32 {
    const LANES: usize = 16;
    // `x > m` is false for NaN, so NaN never becomes the maximum.
    let bigger = |m: f32, x: f32| if x > m { x } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = bigger(*m, x);
        }
    }
    let max = lanes
        .into_iter()
        .chain(chunks.remainder().iter().copied())
        .fold(f32::NEG_INFINITY, bigger);
    // The first chunk holding the maximum, then its place in the chunk
    // (-0.0 and 0.0 are equal, as they are to `>` above). Without a
    // number in the row (all NaN) nothing matches: 0.
    let at = v
        .chunks(LANES)
        .position(|c| c.iter().fold(false, |hit, &x| hit | (x == max)))
        .unwrap_or(0);
    let within = v[at * LANES..].iter().position(|&x| x == max).unwrap_or(0);
    (at * LANES + within) as u32
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + v.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
}

/// The `n` largest `(id, value)` pairs, largest first (ties: lower id first).
fn top_n(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = v.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let n = n.min(idx.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx.truncate(n);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            max_new_tokens: 1,
            temperature,
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, -1.0, 0.0];

    #[test]
    fn greedy_takes_the_largest_and_the_lowest_id_on_ties() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&mut LOGITS.clone()).id, 1);
        assert_eq!(argmax(&[2.0, 5.0, 5.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 3.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN; 3]), 0);
    }

    /// The two-pass argmax against the one-pass rule it replaces, on rows
    /// of every length around the chunk size, drawn from a few values so
    /// that ties, NaN, infinities and both zeros come up often.
    #[test]
    fn argmax_agrees_with_a_plain_scan() {
        fn plain(v: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] || (v[best].is_nan() && !x.is_nan()) {
                    best = i;
                }
            }
            best as u32
        }
        const VALUES: [f32; 7] = [
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
            -0.0,
            0.0,
            1.5,
            -2.0,
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for len in (1..70).chain([1000, 32000]) {
            for _ in 0..50 {
                // Rows that mostly hold one value, so the maximum is often
                // a rare one far into the row.
                let common = VALUES[rng.random_range(0..VALUES.len())];
                let v: Vec<f32> = (0..len)
                    .map(|_| {
                        if rng.random_range(0..8) == 0 {
                            VALUES[rng.random_range(0..VALUES.len())]
                        } else {
                            common
                        }
                    })
                    .collect();
                assert_eq!(argmax(&v), plain(&v), "{v:?}");
            }
        }
    }

    /// A token picked elsewhere by argmax is what sampling would have
    /// given, and counts for later penalties the same way; only samplers
    /// that are nothing but an argmax let it be picked elsewhere.
    #[test]
    fn plain_greedy_picks_made_elsewhere_match_sampling() {
        let mut here = Sampler::new(params(0.0), &[]);
        let mut there = Sampler::new(params(0.0), &[]);
        assert!(here.plain_greedy());
        let picked = here.sample(&mut LOGITS.clone());
        assert_eq!(there.take(argmax(&LOGITS)), picked);
        assert_eq!(here.output_counts, there.output_counts);
        let not_plain: [fn(&mut SamplingParams); 6] = [
            |p| p.temperature = 0.7,
            |p| p.logprobs = true,
            |p| p.top_logprobs = 2,
            |p| p.repetition_penalty = 1.1,
            |p| p.presence_penalty = 0.5,
            |p| p.frequency_penalty = 0.5,
        ];
        for f in not_plain {
            let mut p = params(0.0);
            f(&mut p);
            assert!(!Sampler::new(p.clone(), &[]).plain_greedy(), "{p:?}");
        }
    }

    #[test]
    fn a_seed_fixes_the_draws() {
        let mut p = params(1.0);
        p.seed = Some(42);
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..50)
                .map(|_| s.sample(&mut LOGITS.clone()).id)
                .collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1 never varied: {a:?}"
        );
    }

    #[test]
    fn top_k_top_p_and_min_p_truncate() {
        let run = |f: fn(&mut SamplingParams)| {
            let mut p = params(1.0);
            p.seed = Some(7);
            f(&mut p);
            let mut s = Sampler::new(p, &[]);
            let mut seen: Vec<u32> = (0..200).map(|_| s.sample(&mut LOGITS.clone()).id).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        assert_eq!(run(|p| p.top_k = 1), vec![1]);
        assert_eq!(run(|p| p.top_k = 2), vec![1, 2]);
        // p(1) ≈ 0.52, p(2) ≈ 0.31: the nucleus of 0.5 is token 1 alone.
        assert_eq!(run(|p| p.top_p = 0.5), vec![1]);
        // min_p 0.5: only tokens at least half as likely as the best.
        assert_eq!(run(|p| p.min_p = 0.5), vec![1, 2]);
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let mut p = params(0.0);
        p.repetition_penalty = 2.0;
        // Token 1 is in the prompt: 3.0 / 2 = 1.5 < 2.5, so token 2 wins.
        let mut s = Sampler::new(p, &[1]);
        assert_eq!(s.sample(&mut LOGITS.clone()).id, 2);

        let mut p = params(0.0);
        p.frequency_penalty = 2.0;
        let mut s = Sampler::new(p, &[]);
        assert_eq!(s.sample(&mut LOGITS.clone()).id, 1);
        // Generated once: 3.0 − 2 = 1.0 < 2.5.
        assert_eq!(s.sample(&mut LOGITS.clone()).id, 2);
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let mut p = params(0.0);
        p.logprobs = true;
        p.top_logprobs = 2;
        p.repetition_penalty = 2.0;
        let mut s = Sampler::new(p, &[1]);
        let t = s.sample(&mut LOGITS.clone());
        let lse = LOGITS.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert_eq!(t.id, 2);
        assert!((t.logprob - (2.5 - lse)).abs() < 1e-5);
        assert_eq!(t.top.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 2]);
        assert!((t.top[0].logprob - (3.0 - lse)).abs() < 1e-5);
    }
}
