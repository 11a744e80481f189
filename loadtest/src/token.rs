//! Client tokens, minted by the load generator from the server's HS256 secret, so a run needs no
//! call to `broadcaster token` per connection.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

/// The scopes of the load generator's ordinary tokens.
pub(crate) const SUBSCRIBE_PUBLISH: &[&str] = &["subscribe", "publish"];
/// The scopes of a presence member that also reads presence (SPEC 16).
pub(crate) const SUBSCRIBE_PRESENCE: &[&str] = &["subscribe", "publish", "presence"];

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    #[serde(rename = "authorizedChannels")]
    authorized_channels: [&'a str; 1],
    scope: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a serde_json::Value>,
}

/// An HS256 token for `sub`, audience `broadcaster`, every channel (`*`), scopes subscribe and
/// publish, valid for `ttl_s` seconds.
pub(crate) fn mint(secret: &str, sub: &str, ttl_s: u64) -> Result<String, String> {
    mint_user(secret, sub, ttl_s, SUBSCRIBE_PUBLISH, None)
}

/// [`mint`] with the given scopes and, when given, the `info` claim (a JSON object the server
/// shows with the user in presence and in the `from` of its publications).
pub(crate) fn mint_user(
    secret: &str,
    sub: &str,
    ttl_s: u64,
    scope: &[&str],
    info: Option<&serde_json::Value>,
) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = Claims {
        sub,
        aud: "broadcaster",
        iat: now,
        exp: now + ttl_s,
        authorized_channels: ["*"],
        scope,
        info,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("minting a token failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    fn claims(t: &str) -> serde_json::Value {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&["broadcaster"]);
        decode::<serde_json::Value>(t, &DecodingKey::from_secret(b"s3cret"), &v)
            .unwrap()
            .claims
    }

    #[test]
    fn minted_token_verifies_with_the_claims_the_server_needs() {
        let t = mint("s3cret", "lt-1", 3600).unwrap();
        let c = claims(&t);
        assert_eq!(c["sub"], "lt-1");
        assert_eq!(c["authorizedChannels"][0], "*");
        assert_eq!(c["scope"], serde_json::json!(["subscribe", "publish"]));
        assert!(c.get("info").is_none(), "no info claim unless asked: {c}");
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&["broadcaster"]);
        assert!(decode::<serde_json::Value>(&t, &DecodingKey::from_secret(b"other"), &v).is_err());
    }

    #[test]
    fn presence_tokens_carry_the_scope_and_the_info_object() {
        let info = serde_json::json!({"username": "alice"});
        let t = mint_user("s3cret", "u-7", 60, SUBSCRIBE_PRESENCE, Some(&info)).unwrap();
        let c = claims(&t);
        assert_eq!(c["sub"], "u-7");
        assert_eq!(
            c["scope"],
            serde_json::json!(["subscribe", "publish", "presence"])
        );
        assert_eq!(c["info"], info);
    }
}
