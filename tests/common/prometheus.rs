//! The tests' one reader of the Prometheus text exposition, as the
//! `prometheus` crate writes it on `/metrics`: `name{k="v",...} value`
//! lines and `#` comments. A line it cannot read fails the test; it does not
//! check HELP and TYPE (tests/metrics.rs holds the metrics to their names).

use std::collections::BTreeMap;

/// One sample: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// What one `/metrics` answered.
#[derive(Debug)]
pub struct Scrape(pub Vec<Sample>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| sample(l).unwrap_or_else(|| panic!("not a sample: {l:?}")))
            .collect();
        Scrape(samples)
    }

    /// The sum of `name` over the samples carrying every label in `labels`;
    /// panics if there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching = self.matching(name, labels);
        assert!(!matching.is_empty(), "no {name}{labels:?} in {:#?}", self.0);
        matching.iter().map(|s| s.value).sum()
    }

    /// As [`Scrape::get`], but 0 where there is no such sample (a counter
    /// with labels has none before its first increment).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.0.iter().any(|s| s.name.starts_with(prefix))
    }

    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }
}

/// GET http://ADDR/metrics (which must answer 200 with text), parsed.
pub async fn scrape(addr: &str) -> Scrape {
    let reply = super::http::get(addr, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let kind = reply.header("content-type").unwrap_or_default();
    assert!(kind.starts_with("text/plain"), "{kind}");
    Scrape::parse(&reply.text())
}

/// `name`, `name{k="v",...}` or `name{}`, then the value (and perhaps a
/// timestamp). Label values may hold `\\`, `\"` and `\n` escapes.
fn sample(line: &str) -> Option<Sample> {
    let end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(end);
    let mut labels = BTreeMap::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, quoted) = inner.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let close = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.to_string(), value);
            inner = &quoted[close + 1..];
            inner = inner.strip_prefix(',').unwrap_or(inner);
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}
