//! Client JWT verification into `Permissions`, API key checks, and token minting for the CLI.

use crate::clock::unix_now;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a verified token allows. Built once per `auth`, read on every subscribe and publish.
#[derive(Debug, Clone)]
pub struct Permissions {
    /// The token's subject: the user.
    pub sub: String,
    /// Unix seconds; the connection is closed with 4002 at this time unless re-authenticated.
    pub exp: u64,
    /// The `subscribe` scope.
    pub can_subscribe: bool,
    /// The `publish` scope.
    pub can_publish: bool,
    patterns: Vec<String>,
}

impl Permissions {
    /// Permissions as a token's claims give them (the connect proxy's answer has the same).
    pub fn new(sub: String, exp: u64, authorized_channels: Vec<String>, scope: &[String]) -> Self {
        Permissions {
            sub,
            exp,
            can_subscribe: scope.iter().any(|s| s == "subscribe"),
            can_publish: scope.iter().any(|s| s == "publish"),
            patterns: authorized_channels,
        }
    }

    /// A pattern is an exact channel name, or ends in `*` and matches every channel with that
    /// prefix (SPEC 13.6: `contest/a/*` matches `contest/a/x`, not `contest/a`).
    pub fn allows_channel(&self, channel: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| crate::rules::matches(p, channel))
    }
}

/// Why a token was refused; the text goes back to the client in an `Unauthenticated` error.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenError(pub String);

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(rename = "authorizedChannels", default)]
    authorized_channels: Vec<String>,
    #[serde(default)]
    scope: Vec<String>,
}

/// Verifies HS256 tokens against one secret. Built once at start and shared by every shard.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier of tokens signed with `secret`, allowing `leeway` of clock skew on `exp`.
    pub fn new(secret: &str, leeway: Duration) -> Verifier {
        // Only HS256 is listed, so `none`, RS256 (alg confusion) and every other alg fail.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&["broadcaster"]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The permissions `token` grants, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Permissions, TokenError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                TokenError(
                    match e.kind() {
                        K::ExpiredSignature => "token expired",
                        K::InvalidSignature => "bad token signature",
                        K::InvalidAlgorithm | K::InvalidAlgorithmName => "token alg must be HS256",
                        K::InvalidAudience => "token aud must contain \"broadcaster\"",
                        K::MissingRequiredClaim(_) => {
                            "token lacks a required claim (sub, exp, aud)"
                        }
                        _ => "malformed token",
                    }
                    .to_string(),
                )
            })?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(TokenError("token sub is empty".into()));
        }
        Ok(Permissions::new(
            c.sub,
            c.exp,
            c.authorized_channels,
            &c.scope,
        ))
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
}

/// Signs a client token (for `broadcaster token`, dev mode and tests).
pub fn mint(
    secret: &str,
    sub: &str,
    channels: &[String],
    scopes: &[String],
    ttl: Duration,
) -> Result<String, String> {
    let now = unix_now();
    let claims = MintClaims {
        sub,
        aud: "broadcaster",
        exp: now + ttl.as_secs().max(1),
        iat: now,
        authorized_channels: channels,
        scope: scopes,
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
        assert_eq!(p.sub, "alice");
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

    #[test]
    fn api_keys_compare_whole() {
        let keys = scopes(&["alpha", "beta"]);
        assert!(api_key_matches(&keys, b"beta"));
        assert!(!api_key_matches(&keys, b"bet"));
        assert!(!api_key_matches(&keys, b"betaa"));
        assert!(!api_key_matches(&keys, b""));
    }
}
