//! The playground page (SPEC 11) and its browser client, embedded: no build step, no CDN.

const PAGE: &str = include_str!("playground/index.html");
const CLIENT_JS: &str = include_str!("playground/client.js");

/// The page; dev mode pre-fills its token (dev mode only ever listens on loopback and answers
/// only loopback `Host` names).
pub(super) fn page(dev_token: Option<&str>) -> String {
    PAGE.replace("{{DEV_TOKEN}}", dev_token.unwrap_or(""))
}

/// The reusable browser client the page runs on (`/client.js`).
pub(super) fn client_js() -> &'static str {
    CLIENT_JS
}
