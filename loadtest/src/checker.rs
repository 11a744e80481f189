//! Loss, duplicate and reorder detection over a sequence that should count up by one (`seq` within a
//! subscription, `offset` within a channel).
//!
//! A value above the expected one opens a gap (counted lost); a value that later fills a gap is a
//! reorder (and no longer lost); any other value at or below the high mark is a duplicate. Gaps are
//! kept as ranges, at most [`GAPS_MAX`] of them, so a pathological stream cannot grow memory: past the
//! cap the oldest gap is forgotten and a late arrival into it counts as a duplicate, still a failure.

/// The most open gaps remembered per sequence.
const GAPS_MAX: usize = 256;

/// Anomaly counts for one or many sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Anomalies {
    /// Values received.
    pub(crate) received: u64,
    /// Values never received (gaps still open, plus the missing tail at `finish`).
    pub(crate) lost: u64,
    /// Values received more than once.
    pub(crate) duplicated: u64,
    /// Values received after a later one.
    pub(crate) reordered: u64,
}

impl Anomalies {
    /// True when nothing was lost, duplicated or reordered.
    #[cfg(test)]
    fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }

    /// Adds `other` into `self`.
    pub(crate) fn add(&mut self, other: &Anomalies) {
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
    }
}

/// Tracks one sequence.
#[derive(Debug, Clone)]
pub(crate) struct SeqChecker {
    /// The value expected next (one above the highest seen).
    next: u64,
    /// Open gaps as half-open ranges `[from, to)`, oldest first.
    gaps: Vec<(u64, u64)>,
    counts: Anomalies,
}

impl SeqChecker {
    /// A sequence whose first value should be `first`.
    pub(crate) fn new(first: u64) -> Self {
        SeqChecker {
            next: first,
            gaps: Vec::new(),
            counts: Anomalies::default(),
        }
    }

    /// The value expected next.
    pub(crate) fn next_expected(&self) -> u64 {
        self.next
    }

    /// The highest value seen so far (`first - 1` before any).
    pub(crate) fn high(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    /// Records one received value.
    pub(crate) fn observe(&mut self, v: u64) {
        self.counts.received += 1;
        if v == self.next {
            self.next += 1;
        } else if v > self.next {
            self.counts.lost += v - self.next;
            if self.gaps.len() == GAPS_MAX {
                self.gaps.remove(0);
            }
            self.gaps.push((self.next, v));
            self.next = v + 1;
        } else if let Some(i) = self.gaps.iter().position(|&(a, b)| a <= v && v < b) {
            self.counts.reordered += 1;
            self.counts.lost -= 1;
            let (a, b) = self.gaps[i];
            if a == v && b == v + 1 {
                self.gaps.remove(i);
            } else if a == v {
                self.gaps[i].0 = v + 1;
            } else if b == v + 1 {
                self.gaps[i].1 = v;
            } else {
                self.gaps[i].1 = v;
                self.gaps.insert(i + 1, (v + 1, b));
            }
        } else {
            self.counts.duplicated += 1;
        }
    }

    /// Moves the expected value forward to `next` without counting the values skipped as lost (a
    /// gap the server said it could not recover and was entitled not to); returns how many were
    /// skipped. Open gaps stay open.
    pub(crate) fn skip_to(&mut self, next: u64) -> u64 {
        if next > self.next {
            let skipped = next - self.next;
            self.next = next;
            skipped
        } else {
            0
        }
    }

    /// The counts so far, without a tail check.
    pub(crate) fn counts(&self) -> Anomalies {
        self.counts
    }

    /// The counts with every value up to `last_expected` required: the values above the high mark
    /// are added to `lost`.
    pub(crate) fn finish(&self, last_expected: u64) -> Anomalies {
        let mut c = self.counts;
        if last_expected >= self.next {
            c.lost += last_expected - self.next + 1;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u64, values: &[u64], last: u64) -> Anomalies {
        let mut c = SeqChecker::new(first);
        for &v in values {
            c.observe(v);
        }
        c.finish(last)
    }

    #[test]
    fn clean_sequence() {
        let a = run(1, &[1, 2, 3, 4], 4);
        assert!(a.clean());
        assert_eq!(a.received, 4);
    }

    #[test]
    fn gap_is_loss() {
        let a = run(1, &[1, 2, 5, 6], 6);
        assert_eq!((a.lost, a.duplicated, a.reordered), (2, 0, 0));
    }

    #[test]
    fn missing_head_and_tail_are_loss() {
        assert_eq!(run(1, &[2, 3], 3).lost, 1);
        assert_eq!(run(1, &[1, 2], 5).lost, 3);
        assert_eq!(run(1, &[], 3).lost, 3);
        assert_eq!(run(11, &[], 10).lost, 0, "nothing expected");
    }

    #[test]
    fn duplicates() {
        let a = run(1, &[1, 2, 2, 3, 1], 3);
        assert_eq!((a.lost, a.duplicated, a.reordered), (0, 2, 0));
    }

    #[test]
    fn late_arrival_is_reorder_not_loss() {
        let a = run(1, &[1, 3, 2, 4], 4);
        assert_eq!((a.lost, a.duplicated, a.reordered), (0, 0, 1));
        // A gap of three filled from the middle out, then a duplicate of a filled value.
        let a = run(1, &[1, 5, 3, 2, 4, 3], 5);
        assert_eq!((a.lost, a.duplicated, a.reordered), (0, 1, 3));
    }

    #[test]
    fn partial_fill_leaves_the_rest_lost() {
        let a = run(1, &[1, 6, 3], 6);
        assert_eq!((a.lost, a.duplicated, a.reordered), (3, 0, 1));
    }

    #[test]
    fn offsets_start_anywhere() {
        let a = run(101, &[101, 102, 104], 105);
        assert_eq!((a.lost, a.reordered), (2, 0));
    }

    #[test]
    fn gap_memory_is_bounded() {
        let mut c = SeqChecker::new(1);
        for i in 0..(GAPS_MAX as u64 * 4) {
            c.observe(1 + i * 2);
        }
        assert!(c.gaps.len() <= GAPS_MAX);
        // The oldest gap (value 2) was forgotten: its late arrival counts as a duplicate.
        c.observe(2);
        assert_eq!(c.counts().duplicated, 1);
        // A recent gap is still known.
        c.observe(1 + (GAPS_MAX as u64 * 4 - 2) * 2 + 1);
        assert_eq!(c.counts().reordered, 1);
    }

    #[test]
    fn skip_to_moves_on_without_loss() {
        let mut c = SeqChecker::new(1);
        c.observe(1);
        c.observe(2);
        assert_eq!(c.skip_to(10), 7);
        assert_eq!(c.skip_to(5), 0, "never backwards");
        c.observe(10);
        c.observe(11);
        let a = c.finish(11);
        assert!(a.clean(), "{a:?}");
        assert_eq!(a.received, 4);
        // A late arrival from the skipped range is a duplicate, not a reorder.
        c.observe(5);
        assert_eq!(c.counts().duplicated, 1);
    }

    #[test]
    fn anomalies_add() {
        let mut a = Anomalies {
            received: 1,
            lost: 2,
            duplicated: 3,
            reordered: 4,
        };
        a.add(&a.clone());
        assert_eq!(a.received, 2);
        assert!(!a.clean());
    }
}
