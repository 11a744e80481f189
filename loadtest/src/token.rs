//! Client tokens, minted by the load generator from the server's HS256 secret, so a run needs no
//! call to `broadcaster token` per connection.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    #[serde(rename = "authorizedChannels")]
    authorized_channels: [&'a str; 1],
    scope: [&'a str; 2],
}

/// An HS256 token for `sub`, audience `broadcaster`, every channel (`*`), scopes subscribe and
/// publish, valid for `ttl_s` seconds.
pub(crate) fn mint(secret: &str, sub: &str, ttl_s: u64) -> Result<String, String> {
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
        scope: ["subscribe", "publish"],
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

    #[test]
    fn minted_token_verifies_with_the_claims_the_server_needs() {
        let t = mint("s3cret", "lt-1", 3600).unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&["broadcaster"]);
        let data =
            decode::<serde_json::Value>(&t, &DecodingKey::from_secret(b"s3cret"), &v).unwrap();
        assert_eq!(data.claims["sub"], "lt-1");
        assert_eq!(data.claims["authorizedChannels"][0], "*");
        assert_eq!(data.claims["scope"][1], "publish");
        assert!(decode::<serde_json::Value>(&t, &DecodingKey::from_secret(b"other"), &v).is_err());
    }
}
