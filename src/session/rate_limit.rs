//! The request rate limit of a connection: a token bucket (SPEC 6) and the 4004 rule of SPEC
//! 13.13 (a client that keeps going far over its rate after ResourceExhausted errors is closed).

use std::time::{Duration, Instant};

/// More than this many rejections for rate within `REJECT_WINDOW` closes with 4004.
const REJECTED_MAX: u32 = 100;
const REJECT_WINDOW: Duration = Duration::from_secs(10);

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Allow,
    /// Answer ResourceExhausted.
    Reject,
    /// Close the connection with 4004.
    Close,
}

/// Single precision: it lives in every connection's task, and a bucket needs no more.
pub(super) struct RateLimit {
    tokens: f32,
    per_second: f32,
    burst: f32,
    rejected: u32,
    last: Instant,
    window_start: Instant,
}

impl RateLimit {
    pub(super) fn new(per_second: u32, burst: u32, now: Instant) -> RateLimit {
        RateLimit {
            tokens: burst as f32,
            last: now,
            per_second: per_second as f32,
            burst: burst as f32,
            rejected: 0,
            window_start: now,
        }
    }

    /// Counts one request made at `now`.
    pub(super) fn take(&mut self, now: Instant) -> Verdict {
        let dt = now.duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        if now.duration_since(self.window_start) > REJECT_WINDOW {
            self.window_start = now;
            self.rejected = 0;
        }
        self.rejected += 1;
        if self.rejected > REJECTED_MAX {
            Verdict::Close
        } else {
            Verdict::Reject
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refills_then_closes_abusers() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 5, t0);
        for _ in 0..5 {
            assert_eq!(r.take(t0), Verdict::Allow);
        }
        assert_eq!(r.take(t0), Verdict::Reject);
        assert_eq!(r.take(t0 + Duration::from_millis(100)), Verdict::Allow);
        for i in 0..REJECTED_MAX - 1 {
            assert_eq!(
                r.take(t0 + Duration::from_millis(100)),
                Verdict::Reject,
                "{i}"
            );
        }
        assert_eq!(r.take(t0 + Duration::from_millis(100)), Verdict::Close);
        // A short burst of rejections much later starts a new window.
        let mut r = RateLimit::new(10, 1, t0);
        assert_eq!(r.take(t0), Verdict::Allow);
        assert_eq!(r.take(t0), Verdict::Reject);
        assert_eq!(r.take(t0 + Duration::from_secs(11)), Verdict::Allow);
    }
}
