//! JWT mutations and an independent acceptance oracle: a token the verifier accepts must be an
//! HS256 JWS over claims the SPEC allows, signed with the server's secret, checked here with
//! `hmac`/`sha2` rather than with jsonwebtoken.

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

pub fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

pub fn hs256(secret: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// A compact JWS with this header and claims text, signed HS256 with `secret`.
pub fn sign(header: &[u8], claims: &[u8], secret: &[u8]) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let sig = hs256(secret, message.as_bytes());
    format!("{message}.{}", b64(&sig))
}

/// The header member the oracle looks at, read as jsonwebtoken reads headers: serde_json skips
/// the members it does not know without checking them (UTF-8, number range), so a signed token
/// may carry such bytes in an unknown member. That is serde_json's leniency, not a forgery.
#[derive(serde::Deserialize)]
struct HeaderSeen {
    alg: Option<Value>,
}

/// The claims the oracle looks at, read the same way.
#[derive(serde::Deserialize)]
struct ClaimsSeen {
    sub: Option<Value>,
    exp: Option<Value>,
    aud: Option<Value>,
}

/// Why an accepted token should not have been, or None when it is fine.
pub fn acceptance_error(
    token: &str,
    secret: &[u8],
    leeway_secs: u64,
    now: u64,
    sub: &str,
    exp: u64,
) -> Option<String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Some(format!("{} parts", parts.len()));
    }
    let Ok(header) = URL_SAFE_NO_PAD.decode(parts[0]) else {
        return Some("header is not base64url".into());
    };
    let Ok(header) = serde_json::from_slice::<HeaderSeen>(&header) else {
        return Some("header is not JSON".into());
    };
    if header.alg != Some(Value::from("HS256")) {
        return Some(format!("alg {:?}", header.alg));
    }
    let Ok(sig) = URL_SAFE_NO_PAD.decode(parts[2]) else {
        return Some("signature is not base64url".into());
    };
    let message = format!("{}.{}", parts[0], parts[1]);
    if sig != hs256(secret, message.as_bytes()) {
        return Some("signature does not match the secret".into());
    }
    let Ok(claims) = URL_SAFE_NO_PAD.decode(parts[1]) else {
        return Some("claims are not base64url".into());
    };
    let Ok(claims) = serde_json::from_slice::<ClaimsSeen>(&claims) else {
        return Some("claims are not JSON".into());
    };
    match claims.sub.as_ref().and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s == sub => {}
        other => return Some(format!("sub {other:?} accepted as {sub:?}")),
    }
    match claims.exp.as_ref().and_then(Value::as_u64) {
        Some(e) if e == exp && e.saturating_add(leeway_secs) >= now => {}
        other => return Some(format!("exp {other:?} accepted as {exp} at {now}")),
    }
    let aud_ok = match &claims.aud {
        Some(Value::String(a)) => a == "broadcaster",
        Some(Value::Array(a)) => a.iter().any(|v| v == "broadcaster"),
        _ => false,
    };
    if !aud_ok {
        return Some(format!("aud {:?}", claims.aud));
    }
    None
}

/// Headers an attacker would try.
pub const HEADERS: &[&str] = &[
    r#"{"alg":"HS256","typ":"JWT"}"#,
    r#"{"alg":"none","typ":"JWT"}"#,
    r#"{"alg":"None"}"#,
    r#"{"alg":"HS384","typ":"JWT"}"#,
    r#"{"alg":"HS512"}"#,
    r#"{"alg":"RS256","typ":"JWT"}"#,
    r#"{"alg":"ES256"}"#,
    r#"{"alg":"EdDSA"}"#,
    r#"{"alg":"hs256"}"#,
    r#"{"typ":"JWT"}"#,
    r#"{"alg":"HS256","crit":["exp"]}"#,
    r#"{"alg":"HS256","kid":"../../dev/null"}"#,
    r#"{"alg":"HS256","jku":"https://evil.example/keys"}"#,
    r#"{"alg":"HS256","b64":false}"#,
    r#"{"alg":["HS256"]}"#,
    r#"{"alg":"HS256","alg":"none"}"#,
    r#"{"alg":"none","alg":"HS256"}"#,
    "",
    "null",
];

/// Claims an attacker would try, beside arbitrary ones; `{now}` is replaced.
pub const CLAIMS: &[&str] = &[
    r#"{"sub":"a","aud":"broadcaster","exp":{exp}}"#,
    r#"{"sub":"a","aud":["x","broadcaster"],"exp":{exp}}"#,
    r#"{"sub":"a","exp":{exp}}"#,
    r#"{"sub":"a","aud":"broadcaster"}"#,
    r#"{"aud":"broadcaster","exp":{exp}}"#,
    r#"{"sub":"","aud":"broadcaster","exp":{exp}}"#,
    r#"{"sub":5,"aud":"broadcaster","exp":{exp}}"#,
    r#"{"sub":"a","aud":"Broadcaster","exp":{exp}}"#,
    r#"{"sub":"a","aud":[],"exp":{exp}}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":"{exp}"}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":{exp}.5}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":-1}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":1}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":18446744073709551615}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":18446744073709551616}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":{exp},"scope":"publish"}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":{exp},"authorizedChannels":"*"}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":{exp},"authorizedChannels":[1]}"#,
    r#"{"sub":"a","aud":"broadcaster","exp":{exp},"nbf":99999999999}"#,
    r#"{"sub":"a","sub":"b","aud":"broadcaster","exp":{exp}}"#,
    r#"[]"#,
];

#[derive(Debug, Arbitrary)]
pub enum Mutation {
    FlipBit(u16, u8),
    Insert(u16, u8),
    Delete(u16),
    Truncate(u16),
    /// Swap two of the three parts.
    SwapParts(u8),
    /// Replace the header with a known one and keep the signature.
    Header(u8),
    /// Replace the header and sign again with the right secret.
    HeaderResigned(u8),
    /// Replace the claims with a known text and sign again with the right secret.
    ClaimsResigned(u8, i32),
    /// Arbitrary claims, signed again with the right secret.
    OwnClaimsResigned(String),
    /// Sign with another secret (a guessed one: empty, the default of some library, ...).
    OtherSecret(u8),
    /// Keep header and claims, drop the signature (what `alg: none` tokens look like).
    StripSignature,
    AddPadding,
    AppendPart(String),
}

pub const OTHER_SECRETS: &[&str] = &["", "secret", "broadcaster", "\0", "integration-test-secret"];

/// Applies one mutation; `secret` is the server's secret (for the re-signing mutations).
pub fn mutate(token: &str, m: &Mutation, secret: &str, now: u64) -> String {
    let parts: Vec<&str> = token.splitn(3, '.').collect();
    let (h, c, s) = match parts.as_slice() {
        [h, c, s] => (*h, *c, *s),
        _ => ("", "", ""),
    };
    let decoded_claims = URL_SAFE_NO_PAD.decode(c).unwrap_or_default();
    match m {
        Mutation::FlipBit(at, bit) => {
            let mut b = token.as_bytes().to_vec();
            if !b.is_empty() {
                let i = *at as usize % b.len();
                b[i] ^= 1 << (bit % 8);
            }
            String::from_utf8_lossy(&b).into_owned()
        }
        Mutation::Insert(at, byte) => {
            let mut b = token.as_bytes().to_vec();
            let i = *at as usize % (b.len() + 1);
            b.insert(i, *byte);
            String::from_utf8_lossy(&b).into_owned()
        }
        Mutation::Delete(at) => {
            let mut b = token.as_bytes().to_vec();
            if !b.is_empty() {
                let i = *at as usize % b.len();
                b.remove(i);
            }
            String::from_utf8_lossy(&b).into_owned()
        }
        Mutation::Truncate(at) => {
            let i = *at as usize % (token.len() + 1);
            String::from_utf8_lossy(&token.as_bytes()[..i]).into_owned()
        }
        Mutation::SwapParts(which) => match which % 3 {
            0 => format!("{c}.{h}.{s}"),
            1 => format!("{h}.{s}.{c}"),
            _ => format!("{s}.{c}.{h}"),
        },
        Mutation::Header(i) => {
            let header = HEADERS[*i as usize % HEADERS.len()];
            format!("{}.{c}.{s}", b64(header.as_bytes()))
        }
        Mutation::HeaderResigned(i) => {
            let header = HEADERS[*i as usize % HEADERS.len()];
            sign(header.as_bytes(), &decoded_claims, secret.as_bytes())
        }
        Mutation::ClaimsResigned(i, delta) => {
            let exp = (now as i64 + *delta as i64).max(0).to_string();
            let claims = CLAIMS[*i as usize % CLAIMS.len()].replace("{exp}", &exp);
            sign(HEADERS[0].as_bytes(), claims.as_bytes(), secret.as_bytes())
        }
        Mutation::OwnClaimsResigned(claims) => {
            sign(HEADERS[0].as_bytes(), claims.as_bytes(), secret.as_bytes())
        }
        Mutation::OtherSecret(i) => {
            let other = OTHER_SECRETS[*i as usize % OTHER_SECRETS.len()];
            let header = URL_SAFE_NO_PAD.decode(h).unwrap_or_default();
            sign(&header, &decoded_claims, other.as_bytes())
        }
        Mutation::StripSignature => format!("{h}.{c}."),
        Mutation::AddPadding => format!("{h}=.{c}==.{s}="),
        Mutation::AppendPart(p) => format!("{token}.{p}"),
    }
}
