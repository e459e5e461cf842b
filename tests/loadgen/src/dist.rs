//! Length distributions (`32`, `uniform:MIN:MAX`, `normal:MEAN:STD`) and the
//! exponential gaps of Poisson arrivals. Pure and seeded: the same seed gives
//! the same numbers, so a run can be repeated. No I/O here.

use std::fmt;

use rand::Rng;

/// Longest prompt or output a distribution may ask for; keeps a typo from
/// building a multi-gigabyte request.
pub const MAX_TOKENS: u32 = 1 << 20;

/// A distribution of token counts. Every sample is in `1..=MAX_TOKENS`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LengthDist {
    Fixed(u32),
    /// Both ends included.
    Uniform {
        min: u32,
        max: u32,
    },
    /// Rounded, then clamped to at least 1.
    Normal {
        mean: f64,
        std: f64,
    },
}

impl LengthDist {
    /// Parses `N`, `uniform:MIN:MAX` or `normal:MEAN:STD`; the error is the
    /// reason only (the caller names the flag).
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let int = |p: &str| -> Result<u32, String> {
            let n: u32 = p
                .parse()
                .map_err(|_| format!("{p:?} is not a whole number of tokens"))?;
            if n == 0 || n > MAX_TOKENS {
                return Err(format!("{n} is outside 1..={MAX_TOKENS}"));
            }
            Ok(n)
        };
        let real = |p: &str| -> Result<f64, String> {
            match p.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 && x <= MAX_TOKENS as f64 => Ok(x),
                _ => Err(format!("{p:?} is not a number in 0..={MAX_TOKENS}")),
            }
        };
        match parts.as_slice() {
            [n] => Ok(LengthDist::Fixed(int(n)?)),
            ["uniform", lo, hi] => {
                let (min, max) = (int(lo)?, int(hi)?);
                if min > max {
                    return Err(format!("uniform minimum {min} is above maximum {max}"));
                }
                Ok(LengthDist::Uniform { min, max })
            }
            ["normal", mean, std] => Ok(LengthDist::Normal {
                mean: real(mean)?,
                std: real(std)?,
            }),
            _ => Err("expected N, uniform:MIN:MAX or normal:MEAN:STD".into()),
        }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { min, max } => rng.random_range(min..=max),
            LengthDist::Normal { mean, std } => {
                let x = mean + std * standard_normal(rng);
                x.round().clamp(1.0, MAX_TOKENS as f64) as u32
            }
        }
    }

    /// The smallest value a sample can take.
    pub fn min(&self) -> u32 {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { min, .. } => min,
            LengthDist::Normal { .. } => 1,
        }
    }
}

impl fmt::Display for LengthDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LengthDist::Fixed(n) => write!(f, "{n}"),
            LengthDist::Uniform { min, max } => write!(f, "uniform:{min}:{max}"),
            LengthDist::Normal { mean, std } => write!(f, "normal:{mean}:{std}"),
        }
    }
}

/// Box–Muller; one of the pair is thrown away, which costs nothing that matters here.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    // `1 - u` is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Seconds to the next arrival of a Poisson process at `rate` per second:
/// exponential with mean `1 / rate`. `rate` must be positive and finite.
pub fn poisson_gap(rate: f64, rng: &mut impl Rng) -> f64 {
    let u = 1.0 - rng.random::<f64>();
    -u.ln() / rate
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(LengthDist::parse("32"), Ok(LengthDist::Fixed(32)));
        assert_eq!(
            LengthDist::parse("uniform:8:32"),
            Ok(LengthDist::Uniform { min: 8, max: 32 })
        );
        assert_eq!(
            LengthDist::parse("normal:100:20.5"),
            Ok(LengthDist::Normal {
                mean: 100.0,
                std: 20.5
            })
        );
        for d in ["7", "uniform:1:9", "normal:3.5:1"] {
            assert_eq!(LengthDist::parse(d).unwrap().to_string(), d);
        }
    }

    #[test]
    fn rejects_bad_forms_with_a_reason() {
        for (s, why) in [
            ("0", "outside"),
            ("-3", "whole number"),
            ("abc", "whole number"),
            ("uniform:9:3", "above maximum"),
            ("uniform:0:3", "outside"),
            ("uniform:3", "expected"),
            ("normal:10:-1", "not a number"),
            ("normal:nan:1", "not a number"),
            ("poisson:3", "expected"),
            ("2000000", "outside"),
        ] {
            let err = LengthDist::parse(s).unwrap_err();
            assert!(err.contains(why), "{s}: {err}");
        }
    }

    #[test]
    fn samples_stay_in_range_and_normal_is_clamped() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let u = LengthDist::Uniform { min: 8, max: 32 };
        let xs: Vec<u32> = (0..2000).map(|_| u.sample(&mut rng)).collect();
        assert!(xs.iter().all(|&x| (8..=32).contains(&x)));
        assert!(xs.contains(&8) && xs.contains(&32), "both ends are drawn");

        // Mean 0: about half the raw draws are below 1, all clamp to 1.
        let n = LengthDist::Normal {
            mean: 0.0,
            std: 5.0,
        };
        let xs: Vec<u32> = (0..2000).map(|_| n.sample(&mut rng)).collect();
        assert!(xs.iter().all(|&x| x >= 1));
        let ones = xs.iter().filter(|&&x| x == 1).count();
        assert!((1000..1300).contains(&ones), "{ones} of 2000 clamped to 1");

        let n = LengthDist::Normal {
            mean: 200.0,
            std: 10.0,
        };
        let mean = (0..4000).map(|_| n.sample(&mut rng) as f64).sum::<f64>() / 4000.0;
        assert!((mean - 200.0).abs() < 1.0, "mean {mean}");
    }

    #[test]
    fn same_seed_same_samples() {
        let d = LengthDist::Uniform { min: 1, max: 1000 };
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..50).map(|_| d.sample(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn poisson_gaps_have_mean_one_over_rate() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let rate = 20.0;
        let n = 20_000;
        let gaps: Vec<f64> = (0..n).map(|_| poisson_gap(rate, &mut rng)).collect();
        assert!(gaps.iter().all(|&g| g.is_finite() && g >= 0.0));
        let mean = gaps.iter().sum::<f64>() / n as f64;
        // Standard error of the mean is (1/rate)/sqrt(n) ≈ 0.7%; allow 3%.
        assert!((mean - 1.0 / rate).abs() < 0.03 / rate, "mean gap {mean}");
        // Exponential: the standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (var.sqrt() - mean).abs() < 0.05 * mean,
            "std {}",
            var.sqrt()
        );
    }
}
