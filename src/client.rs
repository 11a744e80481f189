//! The `publish` subcommand: one REST publish, for scripts and cron jobs.

use std::time::Duration;

/// Publishes one message through `POST {base}/publish` and returns the JSON answer.
pub fn publish(
    base: &str,
    api_key: &str,
    channel: &str,
    event: &str,
    payload: &str,
) -> Result<String, String> {
    let payload: serde_json::Value =
        serde_json::from_str(payload).map_err(|e| format!("--payload is not JSON: {e}"))?;
    let body = serde_json::json!({"channel": channel, "event": event, "payload": payload});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/publish", base.trim_end_matches('/'));
    let mut response = agent
        .post(&url)
        .header("Authorization", &format!("Bearer {api_key}"))
        .send_json(&body)
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    if status == 200 {
        Ok(text)
    } else {
        Err(format!("HTTP {status}: {text}"))
    }
}
