//! Client JWT verification into `Permissions`, API key checks, and token minting for the CLI.

use crate::clock::unix_now;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The default bound on a token's `info` claim as compact JSON (`presence.info_bytes_max`).
pub const INFO_BYTES_MAX: usize = 1024;

/// What a verified token allows. Built once per `auth`, read on every subscribe and publish.
#[derive(Debug, Clone)]
pub struct Permissions {
    /// The token's subject: the user (shared with the presence entries it makes).
    pub sub: Arc<str>,
    /// Unix seconds; the connection is closed with 4002 at this time unless re-authenticated.
    pub exp: u64,
    /// The `subscribe` scope.
    pub can_subscribe: bool,
    /// The `publish` scope.
    pub can_publish: bool,
    /// The `presence` scope: may read who is in the channels it may subscribe to.
    pub can_presence: bool,
    /// The `info` claim as compact JSON (an object), shown with the user in presence.
    pub info: Option<Arc<str>>,
    /// Boxed, not a `Vec`: a session keeps its permissions as long as it lives, and their
    /// size is idle memory.
    patterns: Box<[String]>,
}

impl Permissions {
    /// Permissions as a token's claims give them (the connect proxy's answer has the same).
    pub fn new(sub: String, exp: u64, authorized_channels: Vec<String>, scope: &[String]) -> Self {
        Permissions {
            sub: Arc::from(sub),
            exp,
            can_subscribe: scope.iter().any(|s| s == "subscribe"),
            can_publish: scope.iter().any(|s| s == "publish"),
            can_presence: scope.iter().any(|s| s == "presence"),
            info: None,
            patterns: authorized_channels.into_boxed_slice(),
        }
    }

    /// The same permissions with the `info` claim (compact JSON of an object).
    pub fn with_info(mut self, info: Option<Arc<str>>) -> Self {
        self.info = info;
        self
    }

    /// `{"user":<sub>,"info":<info>}`: the `from` of this user's publications. Made per
    /// publication rather than kept: a session holds its permissions for as long as it lives,
    /// and its size is idle memory.
    pub(crate) fn from(&self) -> Arc<str> {
        from_json(&self.sub, self.info.as_deref())
    }

    /// A pattern is an exact channel name, or ends in `*` and matches every channel with that
    /// prefix (SPEC 13.6: `contest/a/*` matches `contest/a/x`, not `contest/a`).
    pub fn allows_channel(&self, channel: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| crate::rules::matches(p, channel))
    }
}

/// `{"user":<sub>}` or `{"user":<sub>,"info":<info>}`, as a broadcast's `from` carries it.
fn from_json(sub: &str, info: Option<&str>) -> Arc<str> {
    // A string always serializes.
    let user = serde_json::to_string(sub).unwrap_or_default();
    match info {
        Some(info) => format!("{{\"user\":{user},\"info\":{info}}}").into(),
        None => format!("{{\"user\":{user}}}").into(),
    }
}

/// Why a token was refused; the text goes back to the client in an `Unauthenticated` error.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenError(pub String);

/// A token's claims, read once. `sub`, `exp` and `aud` are required (checked after reading, so
/// a token lacking one is told so rather than called malformed).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(rename = "authorizedChannels", default)]
    authorized_channels: Vec<String>,
    #[serde(default)]
    scope: Vec<String>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
}

/// The `aud` claim: one name or several (RFC 7519 4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, name: &str) -> bool {
        match self {
            Audience::One(a) => a == name,
            Audience::Many(all) => all.iter().any(|a| a == name),
        }
    }
}

/// The JOSE header: only `alg` is read.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
}

/// One base64url part of a token, read as JSON.
fn read_part<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    use base64::Engine;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

/// When and as what a token was issued, for revocation (`/revoke`): read at `auth`, kept by
/// the shard's index of users rather than by the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Issued {
    /// The `iat` claim, unix seconds; 0 when the token has none (revoked by any cutoff).
    pub iat: u64,
    /// The `jti` claim.
    pub jti: Option<String>,
}

/// The `info` claim checked (an object, at most `max` bytes as compact JSON) and encoded.
pub fn check_info(info: Option<serde_json::Value>, max: usize) -> Result<Option<Arc<str>>, String> {
    match info {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v @ serde_json::Value::Object(_)) => {
            let text = v.to_string();
            if text.len() > max {
                return Err(format!(
                    "token info claim is {} bytes as JSON, over presence.info_bytes_max ({max})",
                    text.len()
                ));
            }
            Ok(Some(Arc::from(text)))
        }
        Some(_) => Err("token info claim must be a JSON object".into()),
    }
}

/// Verifies HS256 tokens against one secret. Built once at start and shared by every shard.
///
/// jsonwebtoken checks the signature; the header and claims are read here, once each:
/// `jsonwebtoken::decode` read the header twice and the claims twice (into the caller's type
/// and again for its validation), 2.7 µs of a connection's auth (`cargo bench -- jwt_verify`).
pub struct Verifier {
    key: DecodingKey,
    /// Seconds of clock skew allowed past `exp`.
    leeway: u64,
    info_bytes_max: usize,
}

impl Verifier {
    /// A verifier of tokens signed with `secret`, allowing `leeway` of clock skew on `exp`.
    pub fn new(secret: &str, leeway: Duration) -> Verifier {
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            leeway: leeway.as_secs(),
            info_bytes_max: INFO_BYTES_MAX,
        }
    }

    /// The same verifier, refusing tokens whose `info` claim is larger than `max` bytes.
    pub fn info_bytes_max(mut self, max: usize) -> Verifier {
        self.info_bytes_max = max;
        self
    }

    /// The permissions `token` grants, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Permissions, TokenError> {
        self.verify_issued(token).map(|(p, _)| p)
    }

    /// `verify`, with the claims that revocation looks at.
    pub fn verify_issued(&self, token: &str) -> Result<(Permissions, Issued), TokenError> {
        let refuse = |why: &str| TokenError(why.to_string());
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse("malformed token"));
        };
        let header: JoseHeader = read_part(header).ok_or_else(|| refuse("malformed token"))?;
        // Only HS256: `none`, RS256 (alg confusion) and every other alg are refused.
        if header.alg != "HS256" {
            return Err(refuse("token alg must be HS256"));
        }
        let signed = &token[..token.len() - signature.len() - 1];
        match jsonwebtoken::crypto::verify(
            signature,
            signed.as_bytes(),
            &self.key,
            Algorithm::HS256,
        ) {
            Ok(true) => {}
            Ok(false) => return Err(refuse("bad token signature")),
            Err(_) => return Err(refuse("malformed token")),
        }
        let c: Claims = read_part(claims).ok_or_else(|| refuse("malformed token"))?;
        let (Some(sub), Some(exp), Some(aud)) = (c.sub, c.exp, c.aud) else {
            return Err(refuse("token lacks a required claim (sub, exp, aud)"));
        };
        if exp < unix_now().saturating_sub(self.leeway) {
            return Err(refuse("token expired"));
        }
        if !aud.names("broadcaster") {
            return Err(refuse("token aud must contain \"broadcaster\""));
        }
        if sub.is_empty() {
            return Err(refuse("token sub is empty"));
        }
        let info = check_info(c.info, self.info_bytes_max).map_err(TokenError)?;
        let issued = Issued {
            iat: c.iat.unwrap_or(0),
            jti: c.jti,
        };
        let perms = Permissions::new(sub, exp, c.authorized_channels, &c.scope);
        Ok((perms.with_info(info), issued))
    }
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    #[serde(rename = "authorizedChannels")]
    authorized_channels: &'a [String],
    scope: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a serde_json::Value>,
}

/// Signs a client token (for `broadcaster token`, dev mode and tests).
pub fn mint(
    secret: &str,
    sub: &str,
    channels: &[String],
    scopes: &[String],
    ttl: Duration,
) -> Result<String, String> {
    mint_with_info(secret, sub, channels, scopes, ttl, None)
}

/// `mint` with an `info` claim (shown with the user in presence and in `from`).
pub fn mint_with_info(
    secret: &str,
    sub: &str,
    channels: &[String],
    scopes: &[String],
    ttl: Duration,
    info: Option<&serde_json::Value>,
) -> Result<String, String> {
    let now = unix_now();
    let claims = MintClaims {
        sub,
        aud: "broadcaster",
        exp: now + ttl.as_secs().max(1),
        iat: now,
        authorized_channels: channels,
        scope: scopes,
        info,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("cannot sign token: {e}"))
}

/// Compares an offered API key with every configured one in time that does not depend on where
/// the first differing byte is, so response timing tells an attacker nothing about a key.
pub(crate) fn api_key_matches(keys: &[String], offered: &[u8]) -> bool {
    let mut found = false;
    for key in keys {
        let key = key.as_bytes();
        let mut diff = (key.len() != offered.len()) as u8;
        for (i, b) in key.iter().enumerate() {
            diff |= b ^ offered.get(i).copied().unwrap_or(0);
        }
        found |= diff == 0;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn minted_tokens_verify_and_carry_permissions() {
        let t = mint(
            "s3",
            "alice",
            &scopes(&["contest/a/*", "news"]),
            &scopes(&["subscribe"]),
            Duration::from_secs(60),
        )
        .unwrap();
        let p = Verifier::new("s3", Duration::ZERO).verify(&t).unwrap();
        assert_eq!(&*p.sub, "alice");
        assert!(p.can_subscribe && !p.can_publish);
        assert!(p.allows_channel("contest/a/x"));
        assert!(p.allows_channel("contest/a/x/y"));
        assert!(!p.allows_channel("contest/a"));
        assert!(!p.allows_channel("contest/ab"));
        assert!(p.allows_channel("news"));
        assert!(!p.allows_channel("news2"));
        assert!(Verifier::new("other", Duration::ZERO).verify(&t).is_err());
    }

    #[test]
    fn info_claims_are_objects_within_the_bound() {
        let mint_info = |info: serde_json::Value| {
            let t = mint_with_info(
                "s",
                "al\"ice",
                &[],
                &[],
                Duration::from_secs(60),
                Some(&info),
            );
            Verifier::new("s", Duration::ZERO)
                .info_bytes_max(40)
                .verify(&t.unwrap())
        };
        let p = mint_info(serde_json::json!({"username": "alice"})).unwrap();
        assert_eq!(p.info.as_deref(), Some(r#"{"username":"alice"}"#));
        assert_eq!(
            &*p.from(),
            r#"{"user":"al\"ice","info":{"username":"alice"}}"#
        );
        assert!(mint_info(serde_json::json!({"n": "x".repeat(40)})).is_err());
        assert!(mint_info(serde_json::json!(["a"])).is_err());
        assert!(mint_info(serde_json::json!(null)).unwrap().info.is_none());
        let p = Permissions::new("bob".into(), 1, vec![], &["presence".into()]);
        assert!(p.can_presence && !p.can_subscribe);
        assert_eq!(&*p.from(), r#"{"user":"bob"}"#);
    }

    #[test]
    fn other_algorithms_are_refused() {
        let claims = serde_json::json!({"sub":"a","aud":"broadcaster","exp": unix_now() + 60});
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(Verifier::new("s", Duration::ZERO).verify(&t).is_err());
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiYXVkIjoiYnJvYWRjYXN0ZXIiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(Verifier::new("s", Duration::ZERO).verify(none).is_err());
    }

    /// Every token jsonwebtoken's own `decode` (with the validation this verifier applies)
    /// accepts is accepted, and every one it refuses is refused.
    #[test]
    fn accepts_and_refuses_what_jsonwebtoken_decode_does() {
        use serde_json::json;
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Reference {
            sub: String,
            exp: u64,
        }
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_audience(&["broadcaster"]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = 5;
        let now = unix_now();
        let sign = |alg: Algorithm, claims: &serde_json::Value, secret: &[u8]| {
            jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret))
                .unwrap()
        };
        let ok = json!({"sub":"a","aud":"broadcaster","exp": now + 60});
        let good = sign(Algorithm::HS256, &ok, b"s");
        let mut tokens = vec![
            good.clone(),
            sign(Algorithm::HS256, &ok, b"other secret"),
            sign(Algorithm::HS384, &ok, b"s"),
            sign(Algorithm::HS512, &ok, b"s"),
            format!("{good}."),
            good.replacen('.', "..", 1),
            good[..good.len() - 2].to_string(),
            format!("{good}=="),
            good.split('.').take(2).collect::<Vec<_>>().join("."),
            "not a token".into(),
            String::new(),
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiYXVkIjoiYnJvYWRjYXN0ZXIiLCJleHAiOjk5OTk5OTk5OTl9.".into(),
        ];
        let claims = [
            json!({"sub":"a","aud":["x","broadcaster"],"exp": now + 60}),
            json!({"sub":"a","aud":["x"],"exp": now + 60}),
            json!({"sub":"a","aud":[],"exp": now + 60}),
            json!({"sub":"a","aud":"other","exp": now + 60}),
            json!({"sub":"a","aud":7,"exp": now + 60}),
            json!({"sub":"a","exp": now + 60}),
            json!({"aud":"broadcaster","exp": now + 60}),
            json!({"sub":"a","aud":"broadcaster"}),
            json!({"sub":7,"aud":"broadcaster","exp": now + 60}),
            json!({"sub":"a","aud":"broadcaster","exp":"soon"}),
            json!({"sub":"a","aud":"broadcaster","exp": -1}),
            json!({"sub":"a","aud":"broadcaster","exp": now - 3}),
            json!({"sub":"a","aud":"broadcaster","exp": now - 60}),
            json!({"sub":"a","aud":"broadcaster","exp": now + 60, "nbf": now + 600}),
            json!({"sub":"a","aud":"broadcaster","exp": now + 60, "iss": "anyone"}),
            json!(["sub", "a"]),
        ];
        tokens.extend(claims.iter().map(|c| sign(Algorithm::HS256, c, b"s")));
        let ours = Verifier::new("s", Duration::from_secs(5));
        let key = DecodingKey::from_secret(b"s");
        for t in &tokens {
            let theirs = jsonwebtoken::decode::<Reference>(t, &key, &validation);
            assert_eq!(
                ours.verify(t).is_ok(),
                theirs.is_ok(),
                "{t}: ours {:?}, jsonwebtoken {theirs:?}",
                ours.verify(t).err()
            );
        }
        assert!(ours.verify(&good).is_ok());
    }

    #[test]
    fn api_keys_compare_whole() {
        let keys = scopes(&["alpha", "beta"]);
        assert!(api_key_matches(&keys, b"beta"));
        assert!(!api_key_matches(&keys, b"bet"));
        assert!(!api_key_matches(&keys, b"betaa"));
        assert!(!api_key_matches(&keys, b""));
    }
}
