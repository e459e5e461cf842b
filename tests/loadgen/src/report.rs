//! The result of a run: counts, throughput and latency summaries, as a table
//! for people and one JSON document for scripts. Built from outcomes only;
//! nothing here talks to the network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::LoadgenConfig;
use crate::driver::Phase;
use crate::request::Outcome;
use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The configuration the run used.
    pub config: serde_json::Value,
    /// The measured phase, from its first request to its last answer (or the deadline).
    pub wall_s: f64,
    pub succeeded: u64,
    pub failed: u64,
    /// Sent but still unanswered when --duration-s ran out (abandoned, not failures).
    pub unfinished: u64,
    /// The run stopped at --duration-s rather than after --num-requests.
    pub hit_duration_limit: bool,
    pub warmup_succeeded: u64,
    pub warmup_failed: u64,
    /// Succeeded requests per second.
    pub requests_per_s: f64,
    /// Output tokens of succeeded requests per second.
    pub output_tokens_per_s: f64,
    pub total_output_tokens: u64,
    pub total_prompt_tokens: u64,
    pub ttft_ms: Option<Summary>,
    pub itl_ms: Option<Summary>,
    pub e2e_ms: Option<Summary>,
    /// Failed requests by gRPC code name (plus INCOMPLETE for a stream that
    /// ended without its final message).
    pub failures: BTreeMap<String, u64>,
}

impl Report {
    pub(crate) fn new(
        config: &LoadgenConfig,
        wall: Duration,
        warmup: Option<&Phase>,
        measured: &Phase,
    ) -> Report {
        let mut ttft = Vec::new();
        let mut itl = Vec::new();
        let mut e2e = Vec::new();
        let mut failures = BTreeMap::new();
        let (mut output, mut prompt, mut succeeded) = (0u64, 0u64, 0u64);
        for o in &measured.outcomes {
            match o {
                Outcome::Ok(m) => {
                    succeeded += 1;
                    output += m.output_tokens;
                    prompt += m.prompt_tokens;
                    ttft.extend(m.ttft_ms);
                    itl.extend_from_slice(&m.itl_ms);
                    e2e.push(m.e2e_ms);
                }
                Outcome::Failed(code) => *failures.entry(code.to_string()).or_insert(0) += 1,
            }
        }
        let answered = measured.outcomes.len() as u64;
        let warm_ok = warmup.map_or(0, |w| {
            w.outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Ok(_)))
                .count() as u64
        });
        let warm_all = warmup.map_or(0, |w| w.outcomes.len() as u64);
        let wall_s = wall.as_secs_f64();
        let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        Report {
            config: config.to_json(),
            wall_s,
            succeeded,
            failed: answered - succeeded,
            unfinished: measured.issued.saturating_sub(answered),
            hit_duration_limit: measured.hit_deadline || warmup.is_some_and(|w| w.hit_deadline),
            warmup_succeeded: warm_ok,
            warmup_failed: warm_all - warm_ok,
            requests_per_s: per_s(succeeded),
            output_tokens_per_s: per_s(output),
            total_output_tokens: output,
            total_prompt_tokens: prompt,
            ttft_ms: Summary::of(&ttft),
            itl_ms: Summary::of(&itl),
            e2e_ms: Summary::of(&e2e),
            failures,
        }
    }

    /// The whole report, configuration included, as one pretty-printed JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .expect("a Report serializes: string keys, numbers and strings only")
    }

    pub fn print_table(&self) {
        print!("{}", self.table());
    }

    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let c = &self.config;
        let mode = match (c["concurrency"].as_u64(), c["request_rate"].as_f64()) {
            (Some(n), _) => format!("closed loop, concurrency {n}"),
            (None, Some(r)) => match c["max_concurrency"].as_u64() {
                Some(m) => format!("Poisson arrivals at {r} req/s, at most {m} in flight"),
                None => format!("Poisson arrivals at {r} req/s"),
            },
            _ => String::new(),
        };
        let _ = writeln!(
            t,
            "aquila bench: {} ({}), {mode}",
            c["gateway"].as_str().unwrap_or(""),
            c["api"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            t,
            "requests     {} succeeded, {} failed, {} unfinished{}",
            self.succeeded,
            self.failed,
            self.unfinished,
            if self.hit_duration_limit {
                " (stopped at --duration-s)"
            } else {
                ""
            }
        );
        if self.warmup_succeeded + self.warmup_failed > 0 {
            let _ = writeln!(
                t,
                "warm-up      {} succeeded, {} failed (not counted)",
                self.warmup_succeeded, self.warmup_failed
            );
        }
        let _ = writeln!(t, "wall time    {:.2} s", self.wall_s);
        let _ = writeln!(
            t,
            "throughput   {:.2} req/s, {:.1} output tok/s",
            self.requests_per_s, self.output_tokens_per_s
        );
        let _ = writeln!(
            t,
            "tokens       {} output, {} prompt",
            self.total_output_tokens, self.total_prompt_tokens
        );
        let _ = writeln!(
            t,
            "\n{:<16}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "mean", "p50", "p90", "p99", "max"
        );
        for (name, s) in [
            ("time to first", &self.ttft_ms),
            ("inter-token", &self.itl_ms),
            ("end-to-end", &self.e2e_ms),
        ] {
            match s {
                Some(s) => {
                    let _ = writeln!(
                        t,
                        "{name:<16}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                        s.mean, s.p50, s.p90, s.p99, s.max
                    );
                }
                None => {
                    let _ = writeln!(t, "{name:<16}{:>10}", "-");
                }
            }
        }
        if !self.failures.is_empty() {
            let list: Vec<String> = self
                .failures
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            let _ = writeln!(t, "\nfailures     {}", list.join(", "));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoadgenArgs;
    use crate::request::Measured;
    use clap::Parser;

    fn ok(ttft: f64, itl: &[f64], e2e: f64, out: u64) -> Outcome {
        Outcome::Ok(Measured {
            ttft_ms: Some(ttft),
            itl_ms: itl.to_vec(),
            e2e_ms: e2e,
            output_tokens: out,
            prompt_tokens: 10,
        })
    }

    #[test]
    fn counts_throughput_and_failures() {
        let config = LoadgenArgs::parse_from(["bench", "--concurrency", "2"])
            .into_config()
            .unwrap();
        let measured = Phase {
            outcomes: vec![
                ok(10.0, &[1.0, 1.0], 12.0, 3),
                ok(20.0, &[2.0, 4.0], 26.0, 3),
                Outcome::Failed("RESOURCE_EXHAUSTED"),
                Outcome::Failed("RESOURCE_EXHAUSTED"),
                Outcome::Failed("UNAVAILABLE"),
            ],
            issued: 6,
            hit_deadline: true,
        };
        let r = Report::new(&config, Duration::from_secs(2), None, &measured);
        assert_eq!((r.succeeded, r.failed, r.unfinished), (2, 3, 1));
        assert!(r.hit_duration_limit);
        assert_eq!(r.total_output_tokens, 6);
        assert_eq!(r.total_prompt_tokens, 20);
        assert_eq!(r.requests_per_s, 1.0);
        assert_eq!(r.output_tokens_per_s, 3.0);
        assert_eq!(r.failures["RESOURCE_EXHAUSTED"], 2);
        assert_eq!(r.failures["UNAVAILABLE"], 1);
        let itl = r.itl_ms.unwrap();
        assert_eq!((itl.count, itl.mean), (4, 2.0));
        assert_eq!(r.ttft_ms.unwrap().p50, 15.0);

        let table = r.table();
        assert!(table.contains("closed loop, concurrency 2"), "{table}");
        assert!(
            table.contains("RESOURCE_EXHAUSTED 2, UNAVAILABLE 1"),
            "{table}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["failures"]["RESOURCE_EXHAUSTED"], 2);
        assert_eq!(json["config"]["concurrency"], 2);
        assert_eq!(json["e2e_ms"]["max"], 26.0);
    }

    #[test]
    fn no_successes_gives_empty_summaries() {
        let config = LoadgenArgs::parse_from(["bench"]).into_config().unwrap();
        let measured = Phase {
            outcomes: vec![Outcome::Failed("UNAVAILABLE")],
            issued: 1,
            hit_deadline: false,
        };
        let r = Report::new(&config, Duration::ZERO, None, &measured);
        assert_eq!(r.ttft_ms, None);
        assert_eq!(r.requests_per_s, 0.0);
        assert!(r.table().contains("end-to-end"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["ttft_ms"], serde_json::Value::Null);
    }
}
