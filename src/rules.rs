//! Channel rules (SPEC 14): `[[channels]]` in the configuration file, each a pattern with its
//! access (token, public, proxy), history and rewind; the first rule that matches a channel
//! decides, and a channel no rule matches gets the defaults of Part I.
//!
//! A shard looks a channel's policy up once per subscribe, and an owner once per channel state
//! it creates; never per message.

use serde::Deserialize;
use std::time::Duration;

/// Who may subscribe to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// A token whose `authorizedChannels` match (Part I).
    #[default]
    Token,
    /// Anyone, before `auth` too.
    Public,
    /// The backend, asked over HTTP at each subscribe (`[proxy] subscribe_url`).
    Proxy,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Token => "token",
            Access::Public => "public",
            Access::Proxy => "proxy",
        }
    }
}

/// One `[[channels]]` table as written in the file; unset keys take the `[history]` values.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// An exact channel name, or a prefix ending in `*` (`*` alone matches every channel).
    pub pattern: String,
    /// `token` (the default), `public` or `proxy`.
    #[serde(default)]
    pub access: Access,
    /// Publications kept per channel; default `history.size`.
    pub history_size: Option<usize>,
    /// How long they are kept; default `history.ttl`.
    #[serde(default, with = "crate::clock::duration_opt")]
    pub history_ttl: Option<Duration>,
    /// Publications replayed on a subscribe without `since` or `rewind`. Default 0.
    #[serde(default)]
    pub rewind_default: usize,
    /// Members (token `sub`s) can be listed. Default false.
    #[serde(default)]
    pub presence: bool,
    /// Subscribers get `join` and `leave` notifications. Default false.
    #[serde(default)]
    pub join_leave: bool,
    /// Most members at once; a subscribe that would add one more is ResourceExhausted.
    /// Default 1000.
    pub presence_members_max: Option<usize>,
}

/// The default of a rule's `presence_members_max`.
pub const PRESENCE_MEMBERS_MAX: usize = 1000;

/// What applies to one channel: its rule's values, or the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Who may subscribe.
    pub access: Access,
    /// Publications kept.
    pub history_size: usize,
    /// How long they are kept.
    pub history_ttl: Duration,
    /// Replayed on a plain subscribe.
    pub rewind_default: usize,
    /// Members can be listed.
    pub presence: bool,
    /// Subscribers hear joins and leaves.
    pub join_leave: bool,
    /// Most members at once.
    pub presence_members_max: usize,
}

impl Policy {
    /// Whether the channel counts its members: it lists them or announces them.
    pub fn tracks_members(&self) -> bool {
        self.presence || self.join_leave
    }
}

/// The rules in order, resolved against the defaults.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<(String, Policy)>,
    default: Policy,
    hash: Option<String>,
}

impl Rules {
    /// The rules of `[[channels]]`, with `[history]`'s size and TTL as the defaults. The
    /// configuration has been checked (`check`) already.
    pub fn new(list: &[RuleConfig], history_size: usize, history_ttl: Duration) -> Rules {
        let default = Policy {
            access: Access::Token,
            history_size,
            history_ttl,
            rewind_default: 0,
            presence: false,
            join_leave: false,
            presence_members_max: PRESENCE_MEMBERS_MAX,
        };
        let rules: Vec<(String, Policy)> = list
            .iter()
            .map(|r| {
                let policy = Policy {
                    access: r.access,
                    history_size: r.history_size.unwrap_or(history_size),
                    history_ttl: r.history_ttl.unwrap_or(history_ttl),
                    rewind_default: r.rewind_default,
                    presence: r.presence,
                    join_leave: r.join_leave,
                    presence_members_max: r.presence_members_max.unwrap_or(PRESENCE_MEMBERS_MAX),
                };
                (r.pattern.clone(), policy)
            })
            .collect();
        let hash = (!rules.is_empty()).then(|| hash_of(&rules));
        Rules {
            rules,
            default,
            hash,
        }
    }

    /// The policy of `channel`: the first rule whose pattern matches, or the defaults.
    pub fn policy(&self, channel: &str) -> &Policy {
        self.rules
            .iter()
            .find(|(p, _)| matches(p, channel))
            .map_or(&self.default, |(_, policy)| policy)
    }

    /// A hex digest of the resolved rules, for `/health`; none without rules.
    pub fn hash(&self) -> Option<&str> {
        self.hash.as_deref()
    }

    /// The most publications any channel keeps (the longest rewind possible).
    pub fn history_size_max(&self) -> usize {
        let rules = self.rules.iter().map(|(_, p)| p.history_size);
        rules.fold(self.default.history_size, usize::max)
    }

    /// True when some rule asks the access proxy.
    pub fn any_proxy(&self) -> bool {
        self.rules.iter().any(|(_, p)| p.access == Access::Proxy)
    }
}

/// The syntax of `authorizedChannels`: exact, or a prefix ending in `*`.
pub fn matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

/// True when every channel `later` matches is matched by `earlier` too.
fn shadows(earlier: &str, later: &str) -> bool {
    match (earlier.strip_suffix('*'), later.strip_suffix('*')) {
        (Some(e), Some(l)) => l.starts_with(e),
        (Some(e), None) => later.starts_with(e),
        (None, Some(_)) => false,
        (None, None) => earlier == later,
    }
}

/// Checks every rule; errors name `channels[N].key`.
pub fn check(list: &[RuleConfig], default_size: usize, size_max: usize) -> Result<(), String> {
    for (n, rule) in list.iter().enumerate() {
        let bad = |key: &str, why: String| Err(format!("channels[{n}].{key}: {why}"));
        let p = &rule.pattern;
        let body = p.strip_suffix('*').unwrap_or(p);
        if p.is_empty() {
            return bad("pattern", "may not be empty".into());
        }
        if body.contains('*') {
            return bad("pattern", format!("{p:?}: '*' may only end a pattern"));
        }
        if p.len() > 255 || body.chars().any(|c| c.is_whitespace() || c.is_control()) {
            let why = "a channel name (at most 255 bytes, no whitespace or control characters), optionally ending in '*'";
            return bad("pattern", format!("{p:?}: must be {why}"));
        }
        if let Some(i) = list[..n].iter().position(|e| shadows(&e.pattern, p)) {
            let why = format!("{p:?} is matched wholly by channels[{i}] ({:?}), which comes first and wins; put the narrower rule first or remove it", list[i].pattern);
            return bad("pattern", why);
        }
        if rule.history_size.is_some_and(|s| s > size_max) {
            return bad("history_size", format!("at most {size_max}"));
        }
        if rule.presence_members_max == Some(0) || rule.presence_members_max > Some(1_000_000) {
            return bad(
                "presence_members_max",
                "must be between 1 and 1000000".into(),
            );
        }
        if rule.rewind_default > rule.history_size.unwrap_or(default_size) {
            let why =
                "may not exceed this rule's history_size (what is not kept cannot be replayed)";
            return bad("rewind_default", why.into());
        }
    }
    Ok(())
}

/// FNV-1a over a canonical text of the rules: stable across builds and platforms, which a
/// rolling deploy comparing `/health` of old and new nodes needs (std's hasher is not).
fn hash_of(rules: &[(String, Policy)]) -> String {
    let mut text = String::new();
    for (pattern, p) in rules {
        let ttl = p.history_ttl.as_millis();
        text.push_str(&format!(
            "{pattern}\u{0}{}\u{0}{}\u{0}{ttl}\u{0}{}",
            p.access.as_str(),
            p.history_size,
            p.rewind_default
        ));
        // Rules without presence hash as they did before presence existed.
        if p.tracks_members() {
            text.push_str(&format!(
                "\u{0}{}\u{0}{}\u{0}{}",
                p.presence, p.join_leave, p.presence_members_max
            ));
        }
        text.push('\n');
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, access: Access) -> RuleConfig {
        RuleConfig {
            pattern: pattern.into(),
            access,
            ..RuleConfig::default()
        }
    }

    #[test]
    fn first_match_wins_and_unmatched_get_the_defaults() {
        let list = [
            RuleConfig {
                history_size: Some(1),
                rewind_default: 1,
                ..rule("scoreboard/*", Access::Public)
            },
            rule("contest/*", Access::Proxy),
            rule("*", Access::Token),
        ];
        check(&list, 100, 100_000).unwrap();
        let rules = Rules::new(&list, 100, Duration::from_secs(300));
        let p = rules.policy("scoreboard/x");
        assert_eq!(
            (p.access, p.history_size, p.rewind_default),
            (Access::Public, 1, 1)
        );
        assert_eq!(rules.policy("contest/a").access, Access::Proxy);
        assert_eq!(rules.policy("chat").access, Access::Token);
        assert_eq!(rules.policy("chat").history_size, 100);
        assert!(rules.any_proxy());
        assert_eq!(rules.hash().unwrap().len(), 16);
        assert!(Rules::new(&[], 100, Duration::ZERO).hash().is_none());
    }

    #[test]
    fn the_hash_changes_with_any_value() {
        let a = Rules::new(&[rule("a", Access::Public)], 100, Duration::ZERO);
        let b = Rules::new(&[rule("a", Access::Proxy)], 100, Duration::ZERO);
        let c = Rules::new(&[rule("a", Access::Public)], 101, Duration::ZERO);
        assert_ne!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
        let again = Rules::new(&[rule("a", Access::Public)], 100, Duration::ZERO);
        assert_eq!(a.hash(), again.hash());
    }

    #[test]
    fn bad_rules_name_their_index_and_key() {
        let cases: &[(&[&str], &str)] = &[
            (&[""], "channels[0].pattern"),
            (&["a*b"], "channels[0].pattern"),
            (&["a b"], "channels[0].pattern"),
            (&["**"], "channels[0].pattern"),
            (&["a/*", "a/b"], "channels[1].pattern"),
            (&["a/*", "a/b/*"], "channels[1].pattern"),
            (&["x", "*"], ""),
            (&["*", "x"], "channels[1].pattern"),
            (&["x", "x"], "channels[1].pattern"),
        ];
        for (patterns, want) in cases {
            let list: Vec<_> = patterns.iter().map(|p| rule(p, Access::Token)).collect();
            match check(&list, 100, 100) {
                Ok(()) => assert!(want.is_empty(), "{patterns:?} passed"),
                Err(e) => assert!(!want.is_empty() && e.starts_with(want), "{patterns:?}: {e}"),
            }
        }
        let big = RuleConfig {
            history_size: Some(2),
            rewind_default: 3,
            ..rule("a", Access::Public)
        };
        let e = check(&[big], 100, 100).unwrap_err();
        assert!(e.starts_with("channels[0].rewind_default"), "{e}");
    }
}
