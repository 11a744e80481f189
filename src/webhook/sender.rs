//! One hook's sender thread: takes its queue's events into batches, holds `channel_vacated`
//! for `vacated_delay`, and POSTs each batch until the backend acknowledges it.

use super::{Event, Item, Shared};
use crate::config::WebhookConfig;
use hmac::{Hmac, Mac};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first retry's delay; each next one doubles, up to `retry_max_delay`.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(100);
/// Most of a POST's answer body read (and dropped) so the connection can be reused.
const ANSWER_BYTES_MAX: u64 = 64 * 1024;

pub(super) struct Sender {
    shared: Arc<Shared>,
    agent: ureq::Agent,
    url: String,
    secret: Vec<u8>,
    vacated_delay: Duration,
    batch_max: usize,
    batch_delay: Duration,
    timeout: Duration,
    retry_max_delay: Duration,
    /// The batch being filled, at most `batch_max`.
    batch: Vec<Item>,
    /// When the batch goes even if not full: `batch_delay` after its first event.
    batch_due: Option<Instant>,
    /// Held `channel_vacated` events: the channel and when it is sent. At most `queue_max`.
    vacated: HashMap<Box<str>, Instant>,
    /// The same, in deadline order (events arrive in emission order and every one waits the
    /// same delay). An entry whose channel was cancelled, or held again, stays until it comes
    /// up, where it is skipped; `compact` bounds them.
    vacated_order: VecDeque<(Instant, Box<str>)>,
    /// Batch ids: this sender's random prefix and a count.
    id_prefix: u64,
    batches: u64,
}

impl Sender {
    pub(super) fn new(config: &WebhookConfig, shared: Arc<Shared>) -> Sender {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            // A redirected POST would become a GET that acknowledges nothing.
            .max_redirects(0)
            .user_agent(concat!("broadcaster/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Sender {
            shared,
            agent,
            url: config.url.clone(),
            secret: config.secret.as_bytes().to_vec(),
            vacated_delay: config.vacated_delay,
            batch_max: config.batch_max.max(1),
            batch_delay: config.batch_delay,
            timeout: config.timeout,
            retry_max_delay: config.retry_max_delay.max(RETRY_FIRST_DELAY),
            batch: Vec::with_capacity(config.batch_max.clamp(1, 1000)),
            batch_due: None,
            vacated: HashMap::new(),
            vacated_order: VecDeque::new(),
            id_prefix: rand::random(),
            batches: 0,
        }
    }

    /// The thread's life: until `stop`, then what can be sent by its deadline.
    pub(super) fn run(mut self) {
        loop {
            while let Some(item) = self.shared.pop() {
                self.take(item);
            }
            let now = Instant::now();
            if let Some(by) = self.shared.stop_by() {
                // Shutting down: the held vacateds are true now (every connection is closing).
                self.release_vacated(None);
                self.flush();
                if self.shared.is_empty() || Instant::now() >= by {
                    return;
                }
                continue;
            }
            self.release_vacated(Some(now));
            if self.batch_due.is_some_and(|due| due <= now) {
                self.flush();
                continue;
            }
            let first_vacated = self.vacated_order.front().map(|(d, _)| *d);
            let wake = match (self.batch_due, first_vacated) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // `emit` unparks only after seeing `idle`, set before the queue is looked at again:
            // an event pushed before that look is taken now, one after it unparks (a wake-up
            // already given makes the park return at once). `stop` always unparks.
            self.shared.idle.store(true, SeqCst);
            if self.shared.is_empty() {
                match wake {
                    Some(at) => std::thread::park_timeout(at.saturating_duration_since(now)),
                    None => std::thread::park(),
                }
            }
            self.shared.idle.store(false, SeqCst);
        }
    }

    /// One event from the queue: held, cancelled, or into the batch.
    fn take(&mut self, item: Item) {
        // Vacateds due before this event was emitted go first, so the order holds.
        self.release_vacated(Some(item.at));
        match item.event {
            Event::Vacated if !self.vacated_delay.is_zero() => self.hold_vacated(item),
            // The channel was only flapping: neither it nor its vacated is reported.
            Event::Occupied if self.vacated.remove(&item.channel).is_some() => {}
            _ => self.push(item),
        }
    }

    fn hold_vacated(&mut self, item: Item) {
        if self.vacated.contains_key(&item.channel) {
            return;
        }
        if self.vacated.len() >= self.shared.queue_max {
            // Full: the oldest held one goes now rather than being lost.
            self.release_first_vacated();
        }
        let due = item.at + self.vacated_delay;
        self.vacated.insert(item.channel.clone(), due);
        self.vacated_order.push_back((due, item.channel));
        if self.vacated_order.len() > 2 * self.shared.queue_max {
            let vacated = &self.vacated;
            self.vacated_order
                .retain(|(due, channel)| vacated.get(channel) == Some(due));
        }
    }

    /// Sends the held vacateds due by `until` (all of them when None) into the batch.
    fn release_vacated(&mut self, until: Option<Instant>) {
        while let Some((due, _)) = self.vacated_order.front() {
            if until.is_some_and(|until| *due > until) {
                return;
            }
            self.release_first_vacated();
        }
    }

    fn release_first_vacated(&mut self) {
        while let Some((due, channel)) = self.vacated_order.pop_front() {
            if self.vacated.get(&channel) != Some(&due) {
                continue;
            }
            self.vacated.remove(&channel);
            self.push(Item {
                event: Event::Vacated,
                channel,
                user: None,
                at: due,
            });
            return;
        }
    }

    fn push(&mut self, item: Item) {
        if self.batch.is_empty() {
            self.batch_due = Some(Instant::now() + self.batch_delay);
        }
        self.batch.push(item);
        if self.batch.len() >= self.batch_max {
            self.flush();
        }
    }

    /// Sends the batch, retrying until acknowledged (or, when stopping, until the deadline).
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.batches += 1;
        let id = format!("{:016x}-{}", self.id_prefix, self.batches);
        match body(&id, crate::clock::unix_ms(), &self.batch) {
            Ok(body) => self.deliver(&id, &body),
            Err(e) => tracing::error!(webhook = %self.url, "cannot encode a batch: {e}"),
        }
        self.batch.clear();
        self.batch_due = None;
    }

    fn deliver(&self, id: &str, body: &[u8]) {
        let signature = sign(&self.secret, body);
        let events = self.batch.len() as u64;
        let metrics = &self.shared.metrics;
        let mut delay = RETRY_FIRST_DELAY;
        for attempt in 1u64.. {
            let stop_by = self.shared.stop_by();
            let timeout = match stop_by {
                Some(by) => self
                    .timeout
                    .min(by.saturating_duration_since(Instant::now())),
                None => self.timeout,
            };
            if timeout.is_zero() {
                tracing::warn!(webhook = %self.url, id, events, "shutting down: batch not delivered");
                return;
            }
            match self.post(body, &signature, timeout) {
                Ok(()) => {
                    metrics.events_total[0].fetch_add(events, Relaxed);
                    if attempt > 1 {
                        tracing::info!(webhook = %self.url, id, attempt, "batch delivered");
                    }
                    return;
                }
                Err(why) => {
                    metrics.events_total[1].fetch_add(events, Relaxed);
                    if attempt == 1 {
                        tracing::warn!(webhook = %self.url, id, "batch not delivered, retrying: {why}");
                    } else {
                        tracing::debug!(webhook = %self.url, id, attempt, "batch not delivered: {why}");
                    }
                }
            }
            // Jitter: between half and all of the delay, so nodes that failed together do not
            // retry together.
            let half = delay / 2;
            let jitter = half.mul_f64(rand::random::<f64>());
            self.sleep(half + jitter);
            delay = (delay * 2).min(self.retry_max_delay);
        }
    }

    /// Waits `d`, or less when a stop's deadline comes first (`stop` unparks). Emits wait for
    /// the batch being retried.
    fn sleep(&self, d: Duration) {
        let mut until = Instant::now() + d;
        loop {
            if let Some(by) = self.shared.stop_by() {
                until = until.min(by);
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::park_timeout(until - now);
        }
    }

    /// One POST; Ok on a 2xx.
    fn post(&self, body: &[u8], signature: &str, timeout: Duration) -> Result<(), String> {
        let mut answer = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("X-Broadcaster-Signature", signature)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .send(body)
            .map_err(|e| e.to_string())?;
        let status = answer.status();
        let _ = answer
            .body_mut()
            .with_config()
            .limit(ANSWER_BYTES_MAX)
            .read_to_vec();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

#[derive(serde::Serialize)]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "timeMs")]
    time_ms: u64,
    events: Vec<WireEvent<'a>>,
}

#[derive(serde::Serialize)]
struct WireEvent<'a> {
    name: &'static str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

/// `{"id":..,"timeMs":..,"events":[{"name":..,"channel":..,"user"?:..}]}`.
fn body(id: &str, time_ms: u64, batch: &[Item]) -> Result<Vec<u8>, serde_json::Error> {
    let events = batch
        .iter()
        .map(|item| WireEvent {
            name: item.event.name(),
            channel: &item.channel,
            user: item.user.as_deref(),
        })
        .collect();
    serde_json::to_vec(&Body {
        id,
        time_ms,
        events,
    })
}

/// Lowercase hex HMAC-SHA256 of `body` keyed with `secret`.
pub(super) fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length, so `new_from_slice` cannot fail.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}
