//! The soak's pure planning and RSS arithmetic: which channels each connection takes, how long the
//! server's history takes to fill (the warm-up), and the RSS levels and the check on them.

use std::time::Duration;

/// A small xorshift64* generator (uniform enough for jitter; no dependency).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded generator (zero replaced).
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (0 when n is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Picks each connection's channels: 1 to `per_conn_max` distinct channels out of `channels`
/// (consecutive from a random start, so every channel gets about the same number of subscribers).
pub(crate) fn plan_channels(
    n: usize,
    channels: usize,
    per_conn_max: usize,
    seed: u64,
) -> Vec<Vec<u32>> {
    let channels = channels.max(1);
    let max = per_conn_max.clamp(1, channels);
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let k = 1 + rng.below(max as u64) as usize;
            let start = rng.below(channels as u64) as usize;
            (0..k).map(|j| ((start + j) % channels) as u32).collect()
        })
        .collect()
}

/// `recovered: false` is legitimate when more publications were missed than history holds, or
/// when the first missed one may have outlived the history TTL (`age_ns` is an upper bound of its
/// age).
pub(crate) fn history_cannot_hold(gap: u64, age_ns: u64, history_size: u64, ttl_ns: u64) -> bool {
    gap > history_size || age_ns >= ttl_ns
}

/// How long the server's history takes to reach its steady size: `size` publications per channel
/// at `per_channel_rate`, or the TTL, whichever comes first.
pub(crate) fn history_fill_time(size: u64, ttl: Duration, per_channel_rate: f64) -> Duration {
    if per_channel_rate <= 0.0 {
        return ttl;
    }
    Duration::from_secs_f64((size as f64 / per_channel_rate).min(1e9)).min(ttl)
}

/// The default warm-up: 20% of the run, 10 s to 6 min, at least the history's fill time plus two
/// seconds, and never more than half the run.
pub(crate) fn default_warmup(duration: Duration, history_fill: Duration) -> Duration {
    duration
        .mul_f64(0.2)
        .clamp(Duration::from_secs(10), Duration::from_secs(360))
        .max(history_fill + Duration::from_secs(2))
        .min(duration / 2)
}

/// The median of the RSS samples `(seconds into the run, bytes)` taken from `from` to `to` seconds.
pub(crate) fn rss_level(samples: &[(f64, u64)], from: f64, to: f64) -> Option<u64> {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|&(_, r)| r)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

/// The length of the RSS windows: 10% of the run, 5 s to 60 s.
pub(crate) fn rss_window(duration: Duration) -> Duration {
    duration
        .mul_f64(0.1)
        .clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// The RSS check: `end` within `tolerance_pct` percent of `warm`, or within `slack_mib` MiB.
pub(crate) fn rss_within(warm: u64, end: u64, tolerance_pct: f64, slack_mib: f64) -> bool {
    let diff = (end as f64 - warm as f64).abs();
    diff <= warm as f64 * tolerance_pct / 100.0 || diff <= slack_mib * 1048576.0
}

/// RSS change from `warm` to `end`, percent of `warm`.
pub(crate) fn rss_change_pct(warm: u64, end: u64) -> f64 {
    (end as f64 - warm as f64) / (warm.max(1) as f64) * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_plan_is_distinct_bounded_and_spread() {
        let plan = plan_channels(8000, 8, 3, 42);
        assert_eq!(plan.len(), 8000);
        let mut per_channel = [0u32; 8];
        let mut sizes = [0u32; 4];
        for chans in &plan {
            assert!((1..=3).contains(&chans.len()));
            sizes[chans.len()] += 1;
            let mut sorted = chans.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), chans.len(), "distinct: {chans:?}");
            for &c in chans {
                assert!(c < 8);
                per_channel[c as usize] += 1;
            }
        }
        // Every size and every channel is well represented.
        for s in &sizes[1..] {
            assert!(*s > 2000, "{sizes:?}");
        }
        let mean = per_channel.iter().sum::<u32>() / 8;
        for p in per_channel {
            assert!(p > mean * 8 / 10 && p < mean * 12 / 10, "{per_channel:?}");
        }
        // More channels per connection than channels: capped.
        assert!(plan_channels(10, 2, 5, 1).iter().all(|c| c.len() <= 2));
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::new(3);
        let n = 100_000;
        let mean = (0..n).map(|_| r.unit()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn rss_levels_are_window_medians() {
        let m = 1u64 << 20;
        // Flat at 40 MiB with one 2 MiB step in the last second: the level does not move.
        let mut s: Vec<(f64, u64)> = (0..60).map(|t| (t as f64, 40 * m)).collect();
        s.push((60.0, 42 * m));
        assert_eq!(rss_level(&s, 10.0, 16.0), Some(40 * m));
        assert_eq!(rss_level(&s, 54.0, 61.0), Some(40 * m));
        // Steady growth moves it.
        let g: Vec<(f64, u64)> = (0..60).map(|t| (t as f64, (40 + t / 6) * m)).collect();
        assert_eq!(rss_level(&g, 54.0, 61.0), Some(49 * m));
        assert_eq!(rss_level(&g, 100.0, 110.0), None);
        assert_eq!(rss_window(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(rss_window(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(
            rss_window(Duration::from_secs(1800)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn history_judgement() {
        let s = 1_000_000_000;
        // Within size and TTL: history should have held it.
        assert!(!history_cannot_hold(50, 2 * s, 100, 10 * s));
        // Too many missed, or possibly expired.
        assert!(history_cannot_hold(101, 2 * s, 100, 10 * s));
        assert!(history_cannot_hold(50, 10 * s, 100, 10 * s));
    }

    #[test]
    fn warmup_and_rss_change() {
        let secs = Duration::from_secs;
        // 12.5 msg/s per channel: 10,000 take 800 s, the 300 s TTL comes first; a 10 s TTL fills in 10 s.
        assert_eq!(history_fill_time(10_000, secs(300), 12.5), secs(300));
        assert_eq!(history_fill_time(10_000, secs(10), 12.5), secs(10));
        assert_eq!(history_fill_time(100, secs(300), 12.5), secs(8));
        assert_eq!(history_fill_time(100, secs(300), 0.0), secs(300));
        assert_eq!(default_warmup(secs(60), secs(10)), secs(12));
        assert_eq!(
            default_warmup(secs(60), secs(300)),
            secs(30),
            "at most half the run"
        );
        assert_eq!(default_warmup(secs(20), secs(5)), secs(10));
        assert_eq!(default_warmup(secs(10), secs(1)), secs(5));
        assert_eq!(default_warmup(secs(1800), secs(300)), secs(360));
        assert_eq!(default_warmup(secs(3600), secs(400)), secs(402));
        assert!((rss_change_pct(100, 104) - 4.0).abs() < 1e-9);
        let mib = 1 << 20;
        assert!(rss_within(100 * mib, 104 * mib, 5.0, 2.0));
        assert!(rss_within(100 * mib, 96 * mib, 5.0, 2.0));
        assert!(!rss_within(100 * mib, 106 * mib, 5.0, 2.0));
        assert!(!rss_within(100 * mib, 94 * mib, 5.0, 2.0));
        // A 30 MiB server one 2 MiB allocator step up: 6.7%, within the slack.
        assert!(rss_within(30 * mib, 32 * mib, 5.0, 2.0));
        assert!(!rss_within(30 * mib, 33 * mib, 5.0, 2.0));
        assert!((rss_change_pct(100, 90) + 10.0).abs() < 1e-9);
    }
}
