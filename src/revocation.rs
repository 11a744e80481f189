//! Revoked tokens (SPEC 17): a user's tokens issued before a cutoff, or one token by its `jti`.
//! One table per node, read at each `auth` (never per message) and written by `/revoke`, by
//! other nodes' revocations and, in cluster mode, by what Redis holds when the bridge connects.
//! Entries live `auth.revocation_ttl` from their revocation; at most `auth.revocations_max`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// What one revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every token of this `sub` whose `iat` is before the cutoff.
    User(String),
    /// The token with this `jti`.
    Jti(String),
}

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Whose tokens.
    pub target: Target,
    /// Unix ms: a `User` revocation takes tokens issued before it (0 for `Jti`).
    pub cutoff_ms: u64,
    /// Unix ms when the entry is forgotten.
    pub expires_ms: u64,
}

impl Revocation {
    /// One line of a revocations file: `u|j <cutoff ms> <expires ms> <name as a JSON string>`.
    pub fn to_line(&self) -> String {
        let (kind, name) = match &self.target {
            Target::User(user) => ("u", user),
            Target::Jti(jti) => ("j", jti),
        };
        // A string always serializes.
        let name = serde_json::to_string(name).unwrap_or_default();
        format!("{kind} {} {} {name}", self.cutoff_ms, self.expires_ms)
    }

    /// The revocation `to_line` wrote.
    pub fn from_line(line: &str) -> Option<Revocation> {
        let mut fields = line.splitn(4, ' ');
        let kind = fields.next()?;
        let cutoff_ms = fields.next()?.parse().ok()?;
        let expires_ms = fields.next()?.parse().ok()?;
        let name: String = serde_json::from_str(fields.next()?).ok()?;
        let target = match kind {
            "u" if !name.is_empty() => Target::User(name),
            "j" if !name.is_empty() => Target::Jti(name),
            _ => return None,
        };
        Some(Revocation {
            target,
            cutoff_ms,
            expires_ms,
        })
    }

    /// Whether a token of `sub` issued at `iat` (unix seconds, 0 when the token has none)
    /// with `jti` is revoked by this entry. `iat` has whole seconds: a token issued within the
    /// cutoff's second counts as issued before it unless the cutoff is a whole second.
    pub fn takes(&self, sub: &str, iat: u64, jti: Option<&str>) -> bool {
        match &self.target {
            Target::User(user) => user == sub && iat.saturating_mul(1000) < self.cutoff_ms,
            Target::Jti(id) => jti == Some(id.as_str()),
        }
    }
}

/// The table is full: `auth.revocations_max` entries that have not expired.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// A node's revocations.
#[derive(Debug)]
pub struct Revocations {
    entries: RwLock<HashMap<Target, Revocation>>,
    /// Nothing revoked yet: `auth` skips the lock.
    empty: AtomicBool,
    max: usize,
    ttl: Duration,
    /// `auth.revocations_file`, open for appending.
    file: Option<Mutex<std::fs::File>>,
}

impl Revocations {
    /// A table of at most `max` entries, each kept `ttl`.
    pub fn new(max: usize, ttl: Duration) -> Revocations {
        Revocations {
            entries: RwLock::new(HashMap::new()),
            empty: AtomicBool::new(true),
            max,
            ttl,
            file: None,
        }
    }

    /// The same table kept in `path` too: what the file holds (and has not expired) is loaded
    /// now, the file rewritten with only that, and each later revocation appended.
    pub fn with_file(mut self, path: &str, now_ms: u64) -> Result<Revocations, String> {
        let why = |e: std::io::Error| format!("auth.revocations_file {path:?}: {e}");
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(why(e)),
        };
        let mut unreadable = 0usize;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match Revocation::from_line(line) {
                // Full: the oldest lines won; the rest are dropped as a revoke beyond the bound is.
                Some(r) => drop(self.insert(&r, now_ms)),
                None => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                path,
                lines = unreadable,
                "unreadable revocation lines skipped"
            );
        }
        // Compacted through a temporary file and a rename, so a crash leaves the old or the new.
        let tmp = format!("{path}.tmp");
        let mut out = String::new();
        for r in self.live(now_ms) {
            out.push_str(&r.to_line());
            out.push('\n');
        }
        std::fs::write(&tmp, out).map_err(why)?;
        std::fs::rename(&tmp, path).map_err(why)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(why)?;
        self.file = Some(Mutex::new(file));
        Ok(self)
    }

    /// Appends `r` to the file, if there is one. A failure is logged: the revocation holds in
    /// memory, and a restart would forget it.
    fn persist(&self, r: &Revocation) {
        let Some(file) = &self.file else {
            return;
        };
        let line = format!("{}\n", r.to_line());
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(error = %e, "revocation not written to auth.revocations_file");
        }
    }

    /// A revocation of `target` made at `now_ms`, kept for the table's TTL.
    pub fn revocation(&self, target: Target, cutoff_ms: u64, now_ms: u64) -> Revocation {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        Revocation {
            target,
            cutoff_ms,
            expires_ms: now_ms.saturating_add(ttl_ms),
        }
    }

    /// Entries held (some may have expired: they go when room is needed).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries held at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Adds `r`, or widens the entry for the same target (the later cutoff and expiry win).
    /// Expired entries are dropped first when the table is full. True when it revokes more
    /// than the table did (a new target, or a later cutoff).
    pub fn insert(&self, r: &Revocation, now_ms: u64) -> Result<bool, Full> {
        if r.expires_ms <= now_ms {
            return Ok(false);
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = entries.get_mut(&r.target) {
            let wider = r.cutoff_ms > held.cutoff_ms;
            let later = r.expires_ms > held.expires_ms;
            held.cutoff_ms = held.cutoff_ms.max(r.cutoff_ms);
            held.expires_ms = held.expires_ms.max(r.expires_ms);
            if wider || later {
                self.persist(held);
            }
            return Ok(wider);
        }
        if entries.len() >= self.max {
            entries.retain(|_, e| e.expires_ms > now_ms);
            if entries.len() >= self.max {
                return Err(Full);
            }
        }
        entries.insert(r.target.clone(), r.clone());
        self.empty.store(false, Relaxed);
        self.persist(r);
        Ok(true)
    }

    /// Whether a token of `sub` issued at `iat` with `jti` is revoked at `now_ms`.
    pub fn revoked(&self, sub: &str, iat: u64, jti: Option<&str>, now_ms: u64) -> bool {
        if self.empty.load(Relaxed) {
            return false;
        }
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let takes = |r: &Revocation| r.expires_ms > now_ms && r.takes(sub, iat, jti);
        let by_user = entries
            .get(&Target::User(sub.to_string()))
            .is_some_and(takes);
        by_user || jti.is_some_and(|j| entries.get(&Target::Jti(j.to_string())).is_some_and(takes))
    }

    /// Every entry still live at `now_ms` (to put back into a Redis that lost them).
    pub fn live(&self, now_ms: u64) -> Vec<Revocation> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let live = entries.values().filter(|r| r.expires_ms > now_ms);
        live.cloned().collect()
    }
}

/// Parses an RFC 3339 time (`2026-12-06T10:00:00Z`, `...00.5+02:00`) into unix ms.
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    // humantime reads only UTC (`Z`): apply a numeric offset by hand.
    let (utc, offset_s) = match text.len().checked_sub(6).and_then(|i| text.get(i..)) {
        Some(tail) if matches!(tail.as_bytes(), [b'+' | b'-', _, _, b':', _, _]) => {
            let sign: i64 = if tail.starts_with('-') { -1 } else { 1 };
            let h: i64 = tail.get(1..3)?.parse().ok()?;
            let m: i64 = tail.get(4..6)?.parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            let head = text.get(..text.len() - 6)?;
            (format!("{head}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (text.replace('z', "Z"), 0),
    };
    let t = humantime::parse_rfc3339(&utc.replacen('t', "T", 1)).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    let ms = i64::try_from(ms).ok()?.checked_sub(offset_s * 1000)?;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_revocations_take_tokens_issued_before_the_cutoff() {
        let t = Revocations::new(10, Duration::from_secs(60));
        assert!(!t.revoked("alice", 0, None, 0));
        let r = t.revocation(Target::User("alice".into()), 1_000_000, 5_000);
        assert_eq!(t.insert(&r, 5_000), Ok(true));
        assert!(t.revoked("alice", 999, None, 5_000));
        assert!(t.revoked("alice", 0, None, 5_000), "no iat: revoked");
        assert!(
            !t.revoked("alice", 1_000, None, 5_000),
            "issued at the cutoff"
        );
        assert!(!t.revoked("bob", 999, None, 5_000));
        assert!(!t.revoked("alice", 999, None, 65_000), "expired");
        // A later cutoff widens the entry; an earlier one does not narrow it.
        let later = t.revocation(Target::User("alice".into()), 2_000_000, 6_000);
        assert_eq!(t.insert(&later, 6_000), Ok(true));
        let earlier = t.revocation(Target::User("alice".into()), 10, 7_000);
        assert_eq!(t.insert(&earlier, 7_000), Ok(false), "revokes nothing more");
        assert!(t.revoked("alice", 1_999, None, 7_000));
        assert_eq!(t.live(7_000).len(), 1);
    }

    #[test]
    fn jti_revocations_take_one_token() {
        let t = Revocations::new(10, Duration::from_secs(60));
        t.insert(&t.revocation(Target::Jti("j1".into()), 0, 0), 0)
            .unwrap();
        assert!(t.revoked("anyone", 5, Some("j1"), 1));
        assert!(!t.revoked("anyone", 5, Some("j2"), 1));
        assert!(!t.revoked("anyone", 5, None, 1));
    }

    #[test]
    fn the_table_is_bounded_and_expired_entries_make_room() {
        let t = Revocations::new(2, Duration::from_secs(1));
        for j in ["a", "b"] {
            t.insert(&t.revocation(Target::Jti(j.into()), 0, 0), 0)
                .unwrap();
        }
        let c = t.revocation(Target::Jti("c".into()), 0, 500);
        assert_eq!(t.insert(&c, 500), Err(Full));
        // The same target again is not a new entry.
        let a = t.revocation(Target::Jti("a".into()), 0, 500);
        assert_eq!(t.insert(&a, 500), Ok(false));
        // At 1 s "b" has expired ("a" was renewed): room for "c".
        let c = t.revocation(Target::Jti("c".into()), 0, 1_000);
        assert_eq!(t.insert(&c, 1_000), Ok(true));
        assert_eq!(t.live(1_000).len(), 2);
    }

    #[test]
    fn a_file_keeps_revocations_across_a_restart() {
        let path = std::env::temp_dir().join(format!("bc-revoked-{}", std::process::id()));
        let path = path.to_str().unwrap().to_string();
        let _ = std::fs::remove_file(&path);
        let ttl = Duration::from_secs(10);
        let t = Revocations::new(10, ttl).with_file(&path, 0).unwrap();
        t.insert(&t.revocation(Target::User("a \"b\"\n".into()), 5_000, 0), 0)
            .unwrap();
        t.insert(&t.revocation(Target::Jti("j".into()), 0, 0), 0)
            .unwrap();
        // Expired by the time of the restart: dropped from the file.
        t.insert(
            &Revocations::new(10, Duration::from_secs(1)).revocation(
                Target::Jti("old".into()),
                0,
                0,
            ),
            0,
        )
        .unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not a line\n");
        std::fs::write(&path, text).unwrap();
        let again = Revocations::new(10, ttl).with_file(&path, 2_000).unwrap();
        assert!(again.revoked("a \"b\"\n", 4, None, 2_000));
        assert!(again.revoked("x", 0, Some("j"), 2_000));
        assert!(!again.revoked("x", 0, Some("old"), 2_000));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        assert!(Revocations::new(10, ttl)
            .with_file("/nonexistent-dir/x", 0)
            .is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn rfc3339_times_parse_with_offsets_and_fractions() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01Z"), Some(1_000));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00-00:01"), Some(60_000));
        assert_eq!(
            parse_rfc3339_ms("2026-12-06T10:00:00z"),
            Some(1_796_551_200_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-06T10:00:00+25:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), None);
    }
}
