//! Owner-shard state of a channel: its offset, epoch, history, members, and which shards watch
//! it. Only the owner shard (`hash(channel) % shards`) ever touches a `ChannelState`.

use crate::constants::{SHARDS_MAX, WATCH_WORDS};
use crate::error::Error;
use crate::presence::{self, Kind, Member, Members};
use crate::rules::Rules;
use crate::wire::request::{PublishParams, Start};
use crate::wire::{broadcast, deflate, reply, sse};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// One publication, immutable once built, shared by every shard through `Arc`. Its broadcast
/// frame is encoded once here; each subscriber only splices in its own `seq`.
///
/// A `join` or `leave` notification travels the same way, in order with the channel's
/// publications: then `presence` holds its version and `prefix` its whole text (no `seq`).
#[derive(Debug)]
pub struct Publication {
    pub(crate) channel: Arc<str>,
    pub(crate) offset: u64,
    pub(crate) id: Box<str>,
    pub(crate) create_time: Box<str>,
    pub(crate) event: Box<str>,
    /// `{"user","info"}` of a WebSocket publisher; none for REST.
    pub(crate) from: Option<Arc<str>>,
    /// A join or leave notification, with its version.
    pub(crate) presence: Option<u64>,
    /// The broadcast notification up to its `seq` value (`wire::broadcast`).
    pub prefix: Box<[u8]>,
    /// Ends with `"payload":PAYLOAD}}`: the payload is kept once, inside the frame.
    pub suffix: Box<[u8]>,
    /// Where the payload starts in `suffix`.
    payload_at: u32,
    /// The channel's epoch when known (cluster mode): offsets compare only within one epoch.
    pub(crate) epoch: Option<Arc<str>>,
    /// When the publication was accepted, for `publish_to_write_seconds`.
    pub(crate) accepted: Instant,
    /// `suffix` compressed for permessage-deflate subscribers (`wire::deflate`), by the first
    /// shard that had one; None inside when it is not worth compressing.
    deflated: OnceLock<Option<Box<[u8]>>>,
    /// `suffix` without line breaks for SSE subscribers (`wire::sse::flattened`), by the first
    /// shard that had one; None inside when `suffix` has none.
    sse_flat: OnceLock<Option<Box<[u8]>>>,
}

/// What a publication says besides its channel, offset and payload.
pub(crate) struct Header<'a> {
    pub(crate) id: &'a str,
    pub(crate) create_time: &'a str,
    pub(crate) event: &'a str,
    /// `{"user","info"}` of a WebSocket publisher.
    pub(crate) from: Option<Arc<str>>,
}

impl Publication {
    pub(crate) fn new(
        channel: Arc<str>,
        offset: u64,
        header: Header<'_>,
        payload: &[u8],
        accepted: Instant,
    ) -> Publication {
        let Header {
            id,
            create_time,
            event,
            from,
        } = header;
        let (prefix, suffix) = broadcast::broadcast_parts(
            id,
            offset,
            create_time,
            &channel,
            event,
            from.as_deref(),
            payload,
        );
        // Payloads are bounded by max_payload_bytes, far below u32::MAX.
        let payload_at = (suffix.len() - 2 - payload.len()) as u32;
        Publication {
            channel,
            offset,
            id: id.into(),
            create_time: create_time.into(),
            event: event.into(),
            from,
            presence: None,
            prefix,
            suffix,
            payload_at,
            epoch: None,
            accepted,
            deflated: OnceLock::new(),
            sse_flat: OnceLock::new(),
        }
    }

    /// A `join` or `leave` of `member` at `version`, as every subscriber of `channel` gets it.
    pub(crate) fn presence_event(
        channel: Arc<str>,
        kind: Kind,
        member: &Member,
        version: u64,
    ) -> Publication {
        let text = reply::presence_event(
            kind.as_str(),
            &channel,
            &member.user,
            member.info.as_deref(),
            version,
        );
        Publication {
            channel,
            offset: 0,
            id: Box::default(),
            create_time: Box::default(),
            event: kind.as_str().into(),
            from: None,
            presence: Some(version),
            prefix: text.into_boxed_slice(),
            suffix: Box::default(),
            payload_at: 0,
            epoch: None,
            accepted: Instant::now(),
            deflated: OnceLock::new(),
            sse_flat: OnceLock::new(),
        }
    }

    /// The compressed suffix for permessage-deflate subscribers: compressed at most once per
    /// shard (shards that race each compress, and one result is kept; none waits on another),
    /// usually once per publication. None for payloads under `min_payload_bytes` or that do not
    /// compress.
    pub(crate) fn deflated(&self, (level, min_payload_bytes): (u32, usize)) -> Option<&[u8]> {
        if let Some(z) = self.deflated.get() {
            return z.as_deref();
        }
        let z = (self.presence.is_none() && self.payload().len() >= min_payload_bytes)
            .then(|| deflate::compress(&self.suffix, level))
            .flatten();
        let _ = self.deflated.set(z);
        self.deflated.get()?.as_deref()
    }

    /// The suffix as an SSE `data:` line holds it (`wire::sse::flattened`): checked once per
    /// publication (by each shard that races for it at most), never per subscriber.
    pub(crate) fn sse_suffix(&self) -> &[u8] {
        if self.sse_flat.get().is_none() {
            let _ = self.sse_flat.set(sse::flattened(&self.suffix));
        }
        match self.sse_flat.get() {
            Some(Some(flat)) => flat,
            _ => &self.suffix,
        }
    }

    /// The payload exactly as published (a slice of the encoded frame's tail).
    pub(crate) fn payload(&self) -> &[u8] {
        let end = self.suffix.len().saturating_sub(2);
        self.suffix
            .get(self.payload_at as usize..end)
            .unwrap_or_default()
    }
}

/// Publications oldest first, with the channel's offset and epoch (`GET /history`).
pub(crate) type HistoryPage = (Vec<Arc<Publication>>, u64, String);

/// What a subscribe asks of the channel's owner (a shard, or Redis) besides the channel.
#[derive(Debug)]
pub struct Asked {
    /// Where the subscription starts.
    pub start: Start,
    /// The subscriber, when the channel counts members.
    pub member: Option<Member>,
    /// Whether the answer lists the members.
    pub list: bool,
}

impl Asked {
    /// A live subscription that counts no member and lists none.
    pub fn live() -> Asked {
        Asked {
            start: Start::Live,
            member: None,
            list: false,
        }
    }
}

/// What a subscriber needs to start: the channel's position and, on recovery or rewind, what
/// it is given first.
#[derive(Debug)]
pub(crate) struct Position {
    pub(crate) offset: u64,
    pub(crate) epoch: Arc<str>,
    /// Asked with `since`: whether every publication after it was held.
    pub(crate) recovered: Option<bool>,
    /// Asked with `rewind`: how many publications are replayed.
    pub(crate) rewound: Option<usize>,
    /// Publications up to `offset`, oldest first, delivered before any newer one.
    pub(crate) replay: Vec<Arc<Publication>>,
    /// For a channel that counts members: the presence version when the answer was made
    /// (join/leave notifications at or below it are older than the subscription).
    pub(crate) presence_version: Option<u64>,
    /// Asked for: the members (`reply::presence`), for the subscribe result.
    pub(crate) presence: Option<Vec<u8>>,
}

impl Position {
    pub(crate) fn new(offset: u64, epoch: Arc<str>) -> Position {
        Position {
            offset,
            epoch,
            recovered: None,
            rewound: None,
            replay: Vec::new(),
            presence_version: None,
            presence: None,
        }
    }
}

/// A member joined or left: the notification (when the rule announces them) and the shards
/// it goes to.
pub(crate) type PresenceChange = (Option<Arc<Publication>>, [u64; WATCH_WORDS]);

pub(crate) struct ChannelState {
    name: Arc<str>,
    offset: u64,
    epoch: Arc<str>,
    /// The channel's rule's history size and TTL, looked up once when the state is created.
    history_size: usize,
    history_ttl: Duration,
    history: VecDeque<Arc<Publication>>,
    /// Bit per shard that has (or is about to have) subscribers: they get every publication.
    watchers: [u64; WATCH_WORDS],
    /// Subscribed members, when the rule counts them (empty, allocating nothing, otherwise).
    members: Members,
    /// Bumped by every join and leave (`presence::next_version`).
    version: u64,
}

/// Every channel an owner shard sequences.
pub struct Channels {
    states: HashMap<Arc<str>, ChannelState>,
    rules: Arc<Rules>,
}

fn bit(shard: usize) -> (usize, u64) {
    (shard / 64, 1u64 << (shard % 64))
}

impl ChannelState {
    fn new(name: Arc<str>, rules: &Rules) -> ChannelState {
        let policy = rules.policy(&name);
        ChannelState {
            history_size: policy.history_size,
            history_ttl: policy.history_ttl,
            name,
            offset: 0,
            // A fresh epoch whenever the state is created: offsets restart, old ones mean nothing.
            epoch: format!("{:016x}", rand::random::<u64>()).into(),
            history: VecDeque::new(),
            watchers: [0; WATCH_WORDS],
            members: Members::default(),
            version: 0,
        }
    }

    fn unwatched(&self) -> bool {
        self.watchers.iter().all(|w| *w == 0)
    }

    /// Nothing to keep: no watcher, no history, no member.
    fn idle(&self) -> bool {
        self.unwatched() && self.history.is_empty() && self.members.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.history.front() {
            if now.duration_since(front.accepted) < self.history_ttl {
                break;
            }
            self.history.pop_front();
        }
    }
}

impl Channels {
    /// The channels of one owner shard, each keeping the history its rule says.
    pub fn new(rules: Arc<Rules>) -> Channels {
        Channels {
            states: HashMap::new(),
            rules,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    fn state(&mut self, channel: &str) -> &mut ChannelState {
        if !self.states.contains_key(channel) {
            let name: Arc<str> = Arc::from(channel);
            let state = ChannelState::new(name.clone(), &self.rules);
            self.states.insert(name, state);
        }
        self.states
            .get_mut(channel)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Sequences one publication: the next offset, its frame parts, a place in history.
    /// Returns it with the shards that must receive it.
    pub fn publish(
        &mut self,
        p: &PublishParams,
        id: &str,
        create_time: &str,
        accepted: Instant,
    ) -> (Arc<Publication>, [u64; WATCH_WORDS]) {
        let channel = p.channel.as_str();
        let state = self.state(channel);
        let size = state.history_size;
        let name = state.name.clone();
        state.offset += 1;
        let header = Header {
            id,
            create_time,
            event: &p.event,
            from: p.from.clone(),
        };
        let publication = Arc::new(Publication::new(
            name,
            state.offset,
            header,
            &p.payload,
            accepted,
        ));
        if size > 0 {
            if state.history.len() == size {
                state.history.pop_front();
            }
            state.history.push_back(publication.clone());
        }
        state.expire(accepted);
        let watchers = state.watchers;
        if state.idle() {
            self.states.remove(channel);
        }
        (publication, watchers)
    }

    /// One more subscription of `member` (the rule counts members): the join when it is new,
    /// or ResourceExhausted beyond the rule's `presence_members_max`.
    pub(crate) fn join(
        &mut self,
        channel: &str,
        member: &Member,
    ) -> Result<Option<PresenceChange>, Error> {
        let policy = self.rules.policy(channel);
        let (max, announce) = (policy.presence_members_max, policy.join_leave);
        let state = self.state(channel);
        if !state.members.add(member, max)? {
            return Ok(None);
        }
        Ok(Some(self.changed(channel, Kind::Join, member, announce)))
    }

    /// One subscription of `user` fewer: the leave when it was its last.
    pub(crate) fn leave(&mut self, channel: &str, user: &Arc<str>) -> Option<PresenceChange> {
        let announce = self.rules.policy(channel).join_leave;
        let state = self.states.get_mut(channel)?;
        let info = state.members.remove(user)?;
        let member = Member {
            user: user.clone(),
            info,
        };
        let change = self.changed(channel, Kind::Leave, &member, announce);
        if self.states.get(channel).is_some_and(ChannelState::idle) {
            self.states.remove(channel);
        }
        Some(change)
    }

    /// A new version for a join or leave, with its notification when the rule announces.
    fn changed(
        &mut self,
        channel: &str,
        kind: Kind,
        member: &Member,
        announce: bool,
    ) -> PresenceChange {
        let state = self.state(channel);
        state.version = presence::next_version(state.version);
        let event = announce.then(|| {
            let name = state.name.clone();
            Arc::new(Publication::presence_event(
                name,
                kind,
                member,
                state.version,
            ))
        });
        (event, state.watchers)
    }

    /// The channel's presence version, with its members encoded when `list`.
    pub(crate) fn presence(&self, channel: &str, list: bool) -> (u64, Option<Vec<u8>>) {
        match self.states.get(channel) {
            Some(s) => (s.version, list.then(|| s.members.encode(s.version))),
            None => (0, list.then(|| Members::default().encode(0))),
        }
    }

    /// Members per channel, for the channels here that have some.
    pub(crate) fn member_counts(&self) -> Vec<(Arc<str>, usize)> {
        let with_members = self.states.values().filter(|s| !s.members.is_empty());
        with_members
            .map(|s| (s.name.clone(), s.members.len()))
            .collect()
    }

    /// Registers `shard` as a watcher and answers with the channel's position; with `since`,
    /// also the publications after it when history still holds every one of them; with
    /// `rewind`, the last ones held.
    pub(crate) fn subscribe(&mut self, shard: usize, channel: &str, start: &Start) -> Position {
        let state = self.state(channel);
        let (w, b) = bit(shard);
        state.watchers[w] |= b;
        state.expire(Instant::now());
        let mut position = Position::new(state.offset, state.epoch.clone());
        if let Start::Rewind(n) = *start {
            let skip = state.history.len().saturating_sub(n);
            position.replay = state.history.iter().skip(skip).cloned().collect();
            position.rewound = Some(position.replay.len());
        }
        if let Start::Since(since) = start {
            let first_held = state
                .history
                .front()
                .map(|p| p.offset)
                .unwrap_or(state.offset + 1);
            let ok = *since.epoch == *state.epoch
                && since.offset <= state.offset
                && since.offset + 1 >= first_held;
            position.recovered = Some(ok);
            if ok {
                position.replay = state
                    .history
                    .iter()
                    .filter(|p| p.offset > since.offset)
                    .cloned()
                    .collect();
            }
        }
        position
    }

    /// Whether some shard watches `channel`.
    pub(crate) fn watched(&self, channel: &str) -> bool {
        self.states.get(channel).is_some_and(|s| !s.unwatched())
    }

    /// `shard` has no subscriber left for `channel`; true when no shard watches it any more
    /// (it had watchers before).
    pub(crate) fn unwatch(&mut self, shard: usize, channel: &str) -> bool {
        let Some(state) = self.states.get_mut(channel) else {
            return false;
        };
        let was_watched = !state.unwatched();
        let (w, b) = bit(shard);
        state.watchers[w] &= !b;
        let vacated = was_watched && state.unwatched();
        if state.idle() {
            self.states.remove(channel);
        }
        vacated
    }

    /// The newest `limit` publications, oldest first, with the channel's offset and epoch.
    pub(crate) fn history(&mut self, channel: &str, limit: usize) -> HistoryPage {
        match self.states.get_mut(channel) {
            None => (Vec::new(), 0, String::new()),
            Some(state) => {
                state.expire(Instant::now());
                let skip = state.history.len().saturating_sub(limit);
                let items = state.history.iter().skip(skip).cloned().collect();
                (items, state.offset, state.epoch.to_string())
            }
        }
    }

    /// Drops expired history and forgets channels with neither watchers nor history, so memory
    /// does not grow with the number of channels ever used.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.states.retain(|_, s| {
            s.expire(now);
            !s.idle()
        });
    }
}

pub(crate) fn shards_in(mask: &[u64; WATCH_WORDS]) -> impl Iterator<Item = usize> + '_ {
    (0..SHARDS_MAX).filter(move |s| {
        let (w, b) = bit(*s);
        mask[w] & b != 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(size: usize, ttl: Duration) -> Channels {
        Channels::new(Arc::new(Rules::new(&[], size, ttl)))
    }

    fn publish(c: &mut Channels, name: &str, n: usize) {
        for i in 0..n {
            let p = PublishParams {
                channel: name.into(),
                event: "e".into(),
                payload: b"1".to_vec(),
                from: None,
            };
            c.publish(&p, &format!("id{i}"), "t", Instant::now());
        }
    }

    #[test]
    fn offsets_count_and_history_is_bounded() {
        let mut c = channels(3, Duration::from_secs(60));
        publish(&mut c, "a", 5);
        let (items, offset, epoch) = c.history("a", 10);
        assert_eq!(offset, 5);
        assert_eq!(
            items.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert!(!epoch.is_empty());
        let (items, _, _) = c.history("a", 1);
        assert_eq!(items[0].offset, 5);
    }

    #[test]
    fn recovery_needs_same_epoch_and_held_offsets() {
        let mut c = channels(3, Duration::from_secs(60));
        publish(&mut c, "a", 5);
        let p = c.subscribe(0, "a", &Start::Live);
        let since = |offset, epoch: &str| {
            Start::Since(crate::wire::request::Since {
                offset,
                epoch: epoch.to_string(),
            })
        };
        let e = p.epoch.to_string();
        let r = c.subscribe(0, "a", &since(2, &e));
        assert_eq!(r.recovered, Some(true));
        assert_eq!(
            r.replay.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(c.subscribe(0, "a", &since(1, &e)).recovered, Some(false));
        assert_eq!(c.subscribe(0, "a", &since(5, &e)).replay.len(), 0);
        assert_eq!(c.subscribe(0, "a", &since(6, &e)).recovered, Some(false));
        assert_eq!(c.subscribe(0, "a", &since(4, "x")).recovered, Some(false));
    }

    #[test]
    fn idle_channels_are_forgotten() {
        let mut c = channels(3, Duration::from_millis(1));
        c.subscribe(2, "w", &Start::Live);
        publish(&mut c, "h", 1);
        for i in 0..100 {
            publish(&mut c, &format!("x{i}"), 1);
        }
        std::thread::sleep(Duration::from_millis(5));
        c.sweep(Instant::now());
        assert_eq!(c.len(), 1, "only the watched channel stays");
        c.unwatch(2, "w");
        assert!(c.is_empty());
        let mut c = channels(0, Duration::from_secs(1));
        publish(&mut c, "n", 1);
        assert!(c.is_empty(), "no history and no watcher: nothing kept");
    }
}
