//! Per-identity rate limiting: a token bucket per caller SPIFFE ID (and per
//! override rule), against credential stuffing and runaway callers.
//!
//! Keys are verified SPIFFE IDs, so the set of keys is bounded by the
//! identities the trust domain issues; the table is still capped, and idle
//! buckets (which would be full again anyway) are evicted first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Default rate per caller identity; 0 disables the default limit.
    pub requests_per_second: f64,
    /// Bucket size; 0 means twice the rate (at least 1).
    pub burst: u32,
    /// Most buckets kept at once.
    pub max_tracked: usize,
    /// First match wins: a rule applies when every field it sets matches.
    pub overrides: Vec<Override>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            requests_per_second: 0.0,
            burst: 0,
            max_tracked: 10_000,
            overrides: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub spiffe_id: Option<String>,
    pub path_prefix: Option<String>,
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: u32,
}

#[derive(Clone, Copy, Debug)]
struct Rate {
    per_second: f64,
    burst: f64,
}

impl Rate {
    fn new(per_second: f64, burst: u32) -> Option<Rate> {
        (per_second > 0.0).then(|| Rate {
            per_second,
            burst: if burst == 0 {
                (per_second * 2.0).max(1.0)
            } else {
                f64::from(burst)
            },
        })
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimiter {
    default: Option<Rate>,
    overrides: Vec<(Override, Option<Rate>)>,
    max_tracked: usize,
    buckets: Mutex<HashMap<(String, usize), Bucket>>,
}

/// The outcome for one request.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allowed,
    /// Over the limit: retry after this long.
    Limited {
        retry_after: Duration,
    },
}

impl RateLimiter {
    pub fn new(config: &Config) -> RateLimiter {
        RateLimiter {
            default: Rate::new(config.requests_per_second, config.burst),
            overrides: config
                .overrides
                .iter()
                .map(|o| (o.clone(), Rate::new(o.requests_per_second, o.burst)))
                .collect(),
            max_tracked: config.max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.default.is_some() || self.overrides.iter().any(|(_, r)| r.is_some())
    }

    pub fn check(&self, spiffe_id: &str, path: &str) -> Verdict {
        // The clock is read only when a rate applies: with none configured
        // (the default) every request would pay for a read it never uses.
        self.decide(spiffe_id, path, Instant::now)
    }

    #[cfg(test)]
    fn check_at(&self, spiffe_id: &str, path: &str, now: Instant) -> Verdict {
        self.decide(spiffe_id, path, || now)
    }

    fn decide(&self, spiffe_id: &str, path: &str, now: impl FnOnce() -> Instant) -> Verdict {
        let rule = self.overrides.iter().position(|(o, _)| {
            o.spiffe_id.as_deref().is_none_or(|id| id == spiffe_id)
                && o.path_prefix
                    .as_deref()
                    .is_none_or(|prefix| path.starts_with(prefix))
        });
        // Index 0 is the default; override i is i + 1.
        let (slot, rate) = match rule {
            Some(i) => (i + 1, self.overrides[i].1),
            None => (0, self.default),
        };
        let Some(rate) = rate else {
            return Verdict::Allowed;
        };
        let now = now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = (spiffe_id.to_owned(), slot);
        if !buckets.contains_key(&key) && buckets.len() >= self.max_tracked {
            evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: rate.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(rate.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Verdict::Allowed
        } else {
            let wait = (1.0 - bucket.tokens) / rate.per_second;
            Verdict::Limited {
                retry_after: Duration::from_secs_f64(wait),
            }
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }
}

/// Makes room for one more bucket: first every bucket idle long enough to
/// be full again (forgetting it changes nothing), then, if none was, the
/// least recently used one.
fn evict(buckets: &mut HashMap<(String, usize), Bucket>, now: Instant) {
    let before = buckets.len();
    buckets.retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(60));
    if buckets.len() == before {
        if let Some(oldest) = buckets
            .iter()
            .min_by_key(|(_, b)| b.last)
            .map(|(k, _)| k.clone())
        {
            buckets.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "spiffe://pay.example/ns/shop/sa/checkout";
    const B: &str = "spiffe://pay.example/ns/shop/sa/frontend";

    #[test]
    fn bucket_limits_one_identity_and_refills() {
        let rl = RateLimiter::new(&Config {
            requests_per_second: 10.0,
            burst: 3,
            ..Config::default()
        });
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(rl.check_at(A, "/", t), Verdict::Allowed);
        }
        let Verdict::Limited { retry_after } = rl.check_at(A, "/", t) else {
            panic!("fourth request should be limited");
        };
        assert!(retry_after <= Duration::from_millis(100));
        // Another identity has its own bucket.
        assert_eq!(rl.check_at(B, "/", t), Verdict::Allowed);
        // 100 ms later one token is back.
        let later = t + Duration::from_millis(100);
        assert_eq!(rl.check_at(A, "/", later), Verdict::Allowed);
    }

    #[test]
    fn overrides_match_identity_and_path_prefix() {
        let rl = RateLimiter::new(&Config {
            requests_per_second: 0.0,
            overrides: vec![
                Override {
                    spiffe_id: Some(B.into()),
                    path_prefix: Some("/v1/payments".into()),
                    requests_per_second: 1.0,
                    burst: 1,
                },
                Override {
                    spiffe_id: None,
                    path_prefix: Some("/v1/reports".into()),
                    requests_per_second: 0.0,
                    burst: 0,
                },
            ],
            ..Config::default()
        });
        let t = Instant::now();
        assert_eq!(rl.check_at(B, "/v1/payments", t), Verdict::Allowed);
        assert!(matches!(
            rl.check_at(B, "/v1/payments/x", t),
            Verdict::Limited { .. }
        ));
        // Default is off, and the reports rule has no rate: unlimited.
        for _ in 0..100 {
            assert_eq!(rl.check_at(B, "/v1/reports", t), Verdict::Allowed);
            assert_eq!(rl.check_at(A, "/v1/payments", t), Verdict::Allowed);
        }
    }

    #[test]
    fn memory_is_bounded_with_many_identities() {
        let rl = RateLimiter::new(&Config {
            requests_per_second: 1.0,
            max_tracked: 100,
            ..Config::default()
        });
        let t = Instant::now();
        for i in 0..10_000 {
            rl.check_at(&format!("spiffe://pay.example/ns/x/sa/w{i}"), "/", t);
        }
        assert!(rl.tracked() <= 100, "{}", rl.tracked());
    }
}
