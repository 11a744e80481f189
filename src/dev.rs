//! Dev mode (SPEC 2): with no JWT secret configured, a single node on loopback with a generated
//! secret, API key and token, printed with a ready `curl` line, and the playground on.

use crate::auth;
use crate::config::Config;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

/// What dev mode generated.
pub(crate) struct Dev {
    secret: String,
    key: String,
    token: String,
}

/// Dev mode (SPEC section 2): a generated secret and API key, and the playground on.
pub(crate) fn setup(config: &mut Config) -> Dev {
    let secret = random_token(32);
    config.auth.jwt_secret = Some(secret.clone());
    if config.auth.api_keys.is_empty() {
        config.auth.api_keys = vec![random_token(24)];
    }
    config.playground = true;
    let token = auth::mint(
        &secret,
        "dev",
        &["*".to_string()],
        &[
            "subscribe".to_string(),
            "publish".to_string(),
            "presence".to_string(),
        ],
        Duration::from_secs(24 * 3600),
    )
    .unwrap_or_default();
    config.dev_token = Some(token.clone());
    Dev {
        secret,
        key: config.auth.api_keys[0].clone(),
        token,
    }
}

/// Prints what to paste to try the server.
pub(crate) fn banner(dev: &Dev, listen: SocketAddr) {
    let url = format!("http://{listen}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "broadcaster: dev mode (no auth.jwt_secret configured); loopback only, secrets are new each start\n\
         jwt secret: {secret}\n\
         api key:    {key}\n\
         token (sub=dev, all channels, subscribe+publish, 24h):\n{token}\n\
         connect:    ws://{listen}/ws  then send {{\"id\":1,\"method\":\"auth\",\"params\":{{\"token\":\"<token>\"}}}}\n\
         playground: {url}/\n\
         publish:    curl -sS -X POST {url}/publish -H 'Authorization: Bearer {key}' -d '{{\"channel\":\"news\",\"event\":\"hello\",\"payload\":{{\"text\":\"hi\"}}}}'",
        secret = dev.secret,
        key = dev.key,
        token = dev.token,
    );
    let _ = out.flush();
}

fn random_token(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
