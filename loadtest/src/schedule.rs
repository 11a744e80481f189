//! The open-loop publish schedule and the clock.
//!
//! Publication `k` is due at `start + k / rate`, whatever happened to publication `k - 1`. Its payload
//! carries the *scheduled* time, and receivers measure latency from it, so a stall in the server (or in
//! the publisher) shows up as latency for every publication that should have gone out during the stall,
//! instead of silently delaying the schedule: the coordinated-omission correction of wrk2 and
//! HdrHistogram, done at the source.

use std::time::{Duration, Instant};

/// Wall-clock time in unix nanoseconds (CLOCK_REALTIME through the vDSO, ~20 ns).
pub(crate) fn now_unix_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An open-loop schedule at a fixed rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    start: Instant,
    start_unix_ns: u64,
    /// Nanoseconds between publications; 0 means "as fast as allowed" (max-rate mode).
    interval_ns: f64,
}

impl Schedule {
    /// A schedule of `rate` publications per second starting now (`rate == 0.0`: unscheduled).
    pub(crate) fn new(rate: f64) -> Self {
        Self::starting_at(Instant::now(), now_unix_ns(), rate)
    }

    /// A schedule starting at a given instant; `start_unix_ns` is the same moment on the wall clock.
    fn starting_at(start: Instant, start_unix_ns: u64, rate: f64) -> Self {
        let interval_ns = if rate > 0.0 { 1e9 / rate } else { 0.0 };
        Schedule {
            start,
            start_unix_ns,
            interval_ns,
        }
    }

    /// True when publications follow a rate.
    pub(crate) fn paced(&self) -> bool {
        self.interval_ns > 0.0
    }

    /// Offset of publication `k` from the start.
    pub(crate) fn offset(&self, k: u64) -> Duration {
        Duration::from_nanos((k as f64 * self.interval_ns) as u64)
    }

    /// When publication `k` is due (monotonic).
    pub(crate) fn due(&self, k: u64) -> Instant {
        self.start + self.offset(k)
    }

    /// When publication `k` is due, in unix nanoseconds: the time its payload carries.
    pub(crate) fn due_unix_ns(&self, k: u64) -> u64 {
        self.start_unix_ns + self.offset(k).as_nanos() as u64
    }

    /// The start instant.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }
}

/// Sleeps until `deadline`: a plain sleep to within 20 µs, then a short spin. Call
/// [`precise_timers`] once on the sleeping thread first, or the kernel's default 50 µs timer slack
/// adds that much (recorded as latency) to every publication.
pub(crate) fn sleep_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > Duration::from_micros(20) {
            std::thread::sleep(left - Duration::from_micros(10));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sets the calling thread's timer slack to 1 ns, so sleeps end when asked (the publisher's schedule is
/// only as accurate as its wake-ups).
pub(crate) fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_follow_the_rate_not_the_sends() {
        let t0 = Instant::now();
        let s = Schedule::starting_at(t0, 1_000_000_000, 1000.0);
        assert!(s.paced());
        assert_eq!(s.due(0), t0);
        assert_eq!(s.due(1) - t0, Duration::from_millis(1));
        assert_eq!(s.due(2500) - t0, Duration::from_millis(2500));
        assert_eq!(s.due_unix_ns(3), 1_003_000_000);
    }

    #[test]
    fn due_times_ignore_stalls() {
        let t0 = Instant::now();
        let s = Schedule::starting_at(t0, 0, 100.0);
        // A publisher that stalled for a second owes 100 publications, each stamped with its own
        // scheduled time, so the stall is charged to all of them.
        assert_eq!(s.due(100) - t0, Duration::from_millis(1000));
        assert_eq!(s.due_unix_ns(50), 500_000_000);
    }

    #[test]
    fn fractional_rates() {
        let t0 = Instant::now();
        let s = Schedule::starting_at(t0, 0, 3.0);
        assert_eq!(s.due(3) - t0, Duration::from_secs(1));
        let s = Schedule::starting_at(t0, 0, 0.0);
        assert!(!s.paced());
    }

    #[test]
    fn sleep_until_reaches_the_deadline() {
        let d = Instant::now() + Duration::from_millis(3);
        sleep_until(d);
        assert!(Instant::now() >= d);
    }
}
