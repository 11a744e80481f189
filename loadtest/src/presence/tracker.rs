//! The join/leave ordering checker (SPEC 16 and pinned detail 2 of Part II): what one subscriber
//! sees of a channel's members. It starts from the presence snapshot of the subscribe result,
//! ignores events at or below the snapshot's version, and then holds the server to its word: a
//! `join` only for a user not present, a `leave` only for one present, versions strictly
//! increasing. Events that arrive before the snapshot wait for it.

use std::collections::{BTreeMap, BTreeSet};

/// A `join` or `leave` notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notice {
    pub(crate) kind: Kind,
    pub(crate) channel: String,
    pub(crate) user: String,
    pub(crate) version: u64,
}

/// Which notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Join,
    Leave,
}

/// What went wrong, over every channel of a tracker (or of several, added up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PresenceAnomalies {
    /// A `join` for a user already present: two joins without a leave between.
    pub(crate) double_joins: u64,
    /// A `leave` for a user not present.
    pub(crate) orphan_leaves: u64,
    /// An event above the snapshot's version but not above the last event's.
    pub(crate) version_regressions: u64,
    /// Events for a channel this subscriber never subscribed to.
    pub(crate) unexpected_channel: u64,
}

impl PresenceAnomalies {
    /// Every kind together.
    pub(crate) fn total(&self) -> u64 {
        self.double_joins + self.orphan_leaves + self.version_regressions + self.unexpected_channel
    }

    /// Adds `o` into `self`.
    pub(crate) fn add(&mut self, o: &PresenceAnomalies) {
        self.double_joins += o.double_joins;
        self.orphan_leaves += o.orphan_leaves;
        self.version_regressions += o.version_regressions;
        self.unexpected_channel += o.unexpected_channel;
    }
}

/// Events counted on one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Counts {
    /// Joins applied (after the snapshot).
    pub(crate) joins: u64,
    /// Leaves applied.
    pub(crate) leaves: u64,
    /// Events at or below the snapshot's version: ignored, as a client must.
    pub(crate) stale: u64,
    /// Versions that skipped ahead by more than one: not a failure (SPEC 16 promises increase,
    /// not steps of one, and this server's versions are microsecond clocks).
    pub(crate) version_gaps: u64,
}

impl Counts {
    /// `self - earlier`, for a window's counts.
    pub(crate) fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            joins: self.joins - earlier.joins.min(self.joins),
            leaves: self.leaves - earlier.leaves.min(self.leaves),
            stale: self.stale - earlier.stale.min(self.stale),
            version_gaps: self.version_gaps - earlier.version_gaps.min(self.version_gaps),
        }
    }

    /// Adds `o` into `self`.
    pub(crate) fn add(&mut self, o: &Counts) {
        self.joins += o.joins;
        self.leaves += o.leaves;
        self.stale += o.stale;
        self.version_gaps += o.version_gaps;
    }
}

#[derive(Debug, Default)]
struct ChannelTrack {
    /// The snapshot's version, once the subscribe result came.
    snapshot: Option<u64>,
    /// The latest version applied.
    version: u64,
    present: BTreeSet<String>,
    /// Events that came before the snapshot, in arrival order.
    early: Vec<Notice>,
    counts: Counts,
}

/// One subscriber's view of its channels' members.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    channels: BTreeMap<String, ChannelTrack>,
    anomalies: PresenceAnomalies,
    /// The first few anomalies, described.
    examples: Vec<String>,
}

/// How many anomalies are described in full.
const EXAMPLES_MAX: usize = 10;

impl Tracker {
    /// A tracker for `channels`, before their snapshots.
    pub(crate) fn new<S: AsRef<str>>(channels: &[S]) -> Tracker {
        Tracker {
            channels: channels
                .iter()
                .map(|c| (c.as_ref().to_string(), ChannelTrack::default()))
                .collect(),
            ..Tracker::default()
        }
    }

    /// The subscribe result's presence: `members` at `version`; events that came before it are
    /// applied now.
    pub(crate) fn snapshot(&mut self, channel: &str, members: Vec<String>, version: u64) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        ch.snapshot = Some(version);
        ch.version = version;
        ch.present = members.into_iter().collect();
        for n in std::mem::take(&mut ch.early) {
            self.event(n);
        }
    }

    /// One `join` or `leave`.
    pub(crate) fn event(&mut self, n: Notice) {
        let Some(ch) = self.channels.get_mut(&n.channel) else {
            self.anomalies.unexpected_channel += 1;
            let why = format!("{:?} for {} on a channel never subscribed", n.kind, n.user);
            self.example(why, &n);
            return;
        };
        let Some(snapshot) = ch.snapshot else {
            ch.early.push(n);
            return;
        };
        if n.version <= ch.version {
            if n.version <= snapshot {
                ch.counts.stale += 1;
            } else {
                self.anomalies.version_regressions += 1;
                let why = format!("version {} after version {}", n.version, ch.version);
                self.example(why, &n);
            }
            return;
        }
        if n.version > ch.version + 1 {
            ch.counts.version_gaps += 1;
        }
        ch.version = n.version;
        let why = match n.kind {
            Kind::Join => {
                ch.counts.joins += 1;
                (!ch.present.insert(n.user.clone())).then(|| {
                    self.anomalies.double_joins += 1;
                    "a second join without a leave between"
                })
            }
            Kind::Leave => {
                ch.counts.leaves += 1;
                (!ch.present.remove(&n.user)).then(|| {
                    self.anomalies.orphan_leaves += 1;
                    "a leave for a user not present"
                })
            }
        };
        if let Some(why) = why {
            self.example(format!("{why}: {}", n.user), &n);
        }
    }

    fn example(&mut self, why: String, n: &Notice) {
        if self.examples.len() < EXAMPLES_MAX {
            self.examples
                .push(format!("{why} ({} version {})", n.channel, n.version));
        }
    }

    /// The anomalies so far.
    pub(crate) fn anomalies(&self) -> PresenceAnomalies {
        self.anomalies
    }

    /// The first anomalies, described.
    pub(crate) fn examples(&self) -> &[String] {
        &self.examples
    }

    /// Per channel, the events counted so far.
    pub(crate) fn counts(&self) -> BTreeMap<String, Counts> {
        self.channels
            .iter()
            .map(|(name, ch)| (name.clone(), ch.counts))
            .collect()
    }

    /// Who is present on `channel` as far as this subscriber knows, and at which version; None
    /// before its snapshot.
    pub(crate) fn present(&self, channel: &str) -> Option<(&BTreeSet<String>, u64)> {
        let ch = self.channels.get(channel)?;
        ch.snapshot.map(|_| (&ch.present, ch.version))
    }

    /// Whether every channel has had its snapshot.
    pub(crate) fn all_snapshots(&self) -> bool {
        self.channels.values().all(|c| c.snapshot.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(kind: Kind, user: &str, version: u64) -> Notice {
        Notice {
            kind,
            channel: "room/a".into(),
            user: user.into(),
            version,
        }
    }

    fn tracker() -> Tracker {
        let mut t = Tracker::new(&["room/a"]);
        t.snapshot("room/a", vec!["obs".into()], 10);
        t
    }

    #[test]
    fn joins_and_leaves_in_order_are_clean() {
        let mut t = tracker();
        t.event(n(Kind::Join, "alice", 11));
        t.event(n(Kind::Join, "bob", 12));
        t.event(n(Kind::Leave, "alice", 13));
        t.event(n(Kind::Join, "alice", 14));
        t.event(n(Kind::Leave, "alice", 15));
        t.event(n(Kind::Leave, "bob", 16));
        assert_eq!(t.anomalies(), PresenceAnomalies::default());
        let c = t.counts()["room/a"];
        assert_eq!((c.joins, c.leaves, c.stale, c.version_gaps), (3, 3, 0, 0));
        let (present, version) = t.present("room/a").unwrap();
        assert_eq!(present.iter().collect::<Vec<_>>(), ["obs"]);
        assert_eq!(version, 16);
    }

    #[test]
    fn two_joins_without_a_leave_are_caught() {
        let mut t = tracker();
        t.event(n(Kind::Join, "alice", 11));
        t.event(n(Kind::Join, "alice", 12));
        assert_eq!(t.anomalies().double_joins, 1);
        assert!(
            t.examples()[0].contains("second join"),
            "{:?}",
            t.examples()
        );
        // The snapshot counts as present: a join for a member it listed is a double join too.
        t.event(n(Kind::Join, "obs", 13));
        assert_eq!(t.anomalies().double_joins, 2);
        assert_eq!(t.anomalies().total(), 2);
    }

    #[test]
    fn a_leave_for_someone_absent_is_caught() {
        let mut t = tracker();
        t.event(n(Kind::Leave, "carol", 11));
        assert_eq!(t.anomalies().orphan_leaves, 1);
        t.event(n(Kind::Join, "carol", 12));
        t.event(n(Kind::Leave, "carol", 13));
        t.event(n(Kind::Leave, "carol", 14));
        assert_eq!(t.anomalies().orphan_leaves, 2);
    }

    #[test]
    fn versions_must_increase_but_the_snapshot_hides_older_events() {
        let mut t = tracker();
        // At or below the snapshot's version: already in the snapshot, ignored.
        t.event(n(Kind::Join, "obs", 10));
        t.event(n(Kind::Join, "zed", 3));
        assert_eq!(t.counts()["room/a"].stale, 2);
        assert_eq!(t.anomalies(), PresenceAnomalies::default());
        t.event(n(Kind::Join, "alice", 12));
        assert_eq!(t.counts()["room/a"].version_gaps, 1, "11 was skipped");
        // Above the snapshot but not above the last one: the server reordered.
        t.event(n(Kind::Leave, "alice", 12));
        t.event(n(Kind::Leave, "alice", 11));
        assert_eq!(t.anomalies().version_regressions, 2);
        assert!(t.present("room/a").unwrap().0.contains("alice"));
    }

    #[test]
    fn events_before_the_snapshot_wait_for_it() {
        let mut t = Tracker::new(&["room/a", "room/b"]);
        t.event(n(Kind::Join, "alice", 4));
        t.event(n(Kind::Join, "bob", 6));
        assert!(t.present("room/a").is_none());
        assert!(!t.all_snapshots());
        // The snapshot at 5 holds alice already: her join is stale, bob's applies.
        t.snapshot("room/a", vec!["alice".into()], 5);
        t.snapshot("room/b", vec![], 1);
        assert!(t.all_snapshots());
        assert_eq!(t.anomalies(), PresenceAnomalies::default());
        let c = t.counts()["room/a"];
        assert_eq!((c.joins, c.stale), (1, 1));
        assert_eq!(t.present("room/a").unwrap().0.len(), 2);
        let mut other = n(Kind::Join, "x", 1);
        other.channel = "elsewhere".into();
        t.event(other);
        assert_eq!(t.anomalies().unexpected_channel, 1);
    }

    #[test]
    fn window_counts_subtract() {
        let a = Counts {
            joins: 5,
            leaves: 4,
            stale: 1,
            version_gaps: 0,
        };
        let mut b = a;
        b.joins += 3;
        b.leaves += 2;
        assert_eq!(
            b.since(&a),
            Counts {
                joins: 3,
                leaves: 2,
                ..Counts::default()
            }
        );
        let mut sum = Counts::default();
        sum.add(&a);
        sum.add(&a);
        assert_eq!(sum.joins, 10);
    }
}
