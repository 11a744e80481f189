//! Webhooks (SPEC 18): channel and member changes POSTed to backends in signed batches.
//!
//! The shards and the Redis bridge call `Webhooks::emit`, which only queues: each
//! `[[webhooks]]` table has its own bounded queue and its own sender thread (`sender.rs`), a
//! plain blocking thread, so a slow or dead backend costs the shards nothing but a full queue,
//! whose oldest events are dropped and counted. The sender batches, holds `channel_vacated`
//! for `vacated_delay`, signs each body, and retries a failed batch, same id and body, until
//! the backend acknowledges it.

mod sender;

use crate::config::{WebhookConfig, WEBHOOK_EVENTS};
use crate::metrics::WebhookMetrics;
use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// What happened to a channel; `name` is how the body and the `events` key write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A channel got its first subscriber.
    Occupied,
    /// A channel lost its last subscriber.
    Vacated,
    /// A member (a user, once however many connections) joined a presence channel.
    MemberAdded,
    /// A member left.
    MemberRemoved,
}

impl Event {
    const ALL: [Event; 4] = [
        Event::Occupied,
        Event::Vacated,
        Event::MemberAdded,
        Event::MemberRemoved,
    ];

    /// `channel_occupied`, `channel_vacated`, `member_added`, `member_removed`.
    pub(crate) fn name(self) -> &'static str {
        WEBHOOK_EVENTS[self as usize]
    }

    /// Only member events carry a user.
    fn has_user(self) -> bool {
        matches!(self, Event::MemberAdded | Event::MemberRemoved)
    }
}

/// One event as emitted.
#[derive(Debug)]
struct Item {
    event: Event,
    channel: Box<str>,
    user: Option<Box<str>>,
    /// When it was emitted: a held `channel_vacated` is compared with it, not with the time
    /// the sender got to it.
    at: Instant,
}

/// Every configured webhook of the node. `Send + Sync`: the shards share it through `Node`.
pub(crate) struct Webhooks {
    hooks: Vec<Hook>,
}

/// One `[[webhooks]]` table: what it wants, its queue, its sender thread.
struct Hook {
    /// `events`, indexed by `Event as usize`.
    events: [bool; 4],
    patterns: Vec<String>,
    shared: Arc<Shared>,
    /// Unparked by `emit` and `stop`.
    thread: Thread,
    /// Taken by `stop`, which joins it.
    handle: Mutex<Option<JoinHandle<()>>>,
}

/// What a hook's emitters and its sender share.
struct Shared {
    /// Events emitted and not yet taken by the sender, at most `queue_max`. A mutex rather
    /// than a lock-free ring: it is held only for one push (an emitter) or one pop (the
    /// sender), never across I/O, and memory follows use instead of `queue_max` slots
    /// allocated up front (up to 10 million).
    queue: Mutex<VecDeque<Item>>,
    queue_max: usize,
    /// Set by `stop` (or the drop of `Webhooks`): the sender sends what it can until then and
    /// ends.
    stop_by: Mutex<Option<Instant>>,
    /// The sender is parked waiting for events (or a batch's or a vacated's time), not busy
    /// with a POST or a backoff: `emit` unparks it only then.
    idle: AtomicBool,
    metrics: Arc<WebhookMetrics>,
}

/// A poisoned lock only means a thread panicked while holding it, which ends the process
/// anyway (`server::exit_on_panic`); the data under these locks is always whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn push(&self, item: Item) {
        let mut queue = lock(&self.queue);
        if queue.len() >= self.queue_max {
            queue.pop_front();
            self.metrics.dropped_total.fetch_add(1, Relaxed);
        } else {
            self.metrics.queue_depth.fetch_add(1, Relaxed);
        }
        queue.push_back(item);
    }

    fn pop(&self) -> Option<Item> {
        let item = lock(&self.queue).pop_front();
        if item.is_some() {
            self.metrics.queue_depth.fetch_sub(1, Relaxed);
        }
        item
    }

    fn is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
    }

    fn stop_by(&self) -> Option<Instant> {
        *lock(&self.stop_by)
    }

    /// Asks the sender to end by `by`; an earlier request stands.
    fn stop(&self, by: Instant) {
        let mut stop_by = lock(&self.stop_by);
        *stop_by = Some(stop_by.map_or(by, |s| s.min(by)));
    }
}

impl Webhooks {
    /// None when no [[webhooks]] is configured. Starts one sender thread per hook.
    pub(crate) fn start(hooks: &[WebhookConfig], metrics: Arc<WebhookMetrics>) -> Option<Webhooks> {
        let mut started = Vec::with_capacity(hooks.len());
        for (n, config) in hooks.iter().enumerate() {
            match Hook::start(n, config, metrics.clone()) {
                Ok(hook) => started.push(hook),
                // Only thread creation can fail here; the other hooks still run.
                Err(e) => tracing::error!(webhook = n, "cannot start the webhook sender: {e}"),
            }
        }
        (!started.is_empty()).then_some(Webhooks { hooks: started })
    }

    /// Cheap: does any hook want this event for this channel? (callers skip work when not)
    pub(crate) fn wants(&self, event: Event, channel: &str) -> bool {
        self.hooks.iter().any(|h| h.wants(event, channel))
    }

    /// Never blocks: queues the event for every hook that wants it; a full queue drops its
    /// oldest event (counted).
    pub(crate) fn emit(&self, event: Event, channel: &str, user: Option<&str>) {
        let at = Instant::now();
        for hook in self.hooks.iter().filter(|h| h.wants(event, channel)) {
            hook.shared.push(Item {
                event,
                channel: channel.into(),
                user: user.filter(|_| event.has_user()).map(Into::into),
                at,
            });
            // Only a sender waiting for events is woken: one in a POST or a retry's backoff
            // takes the queue when it is done, so a dead backend costs an event no system call.
            if hook.shared.idle.load(SeqCst) {
                hook.thread.unpark();
            }
        }
    }

    /// At shutdown: stops the threads after trying to send what is queued, within `grace`.
    pub(crate) fn stop(&self, grace: Duration) {
        let by = Instant::now() + grace;
        for hook in &self.hooks {
            hook.shared.stop(by);
            hook.thread.unpark();
        }
        for hook in &self.hooks {
            if let Some(handle) = lock(&hook.handle).take() {
                // A sender never panics on purpose; if one did, the process is ending anyway.
                let _ = handle.join();
            }
        }
    }
}

/// Without `stop`, the senders end at once (after a POST in flight) with what is queued lost.
impl Drop for Webhooks {
    fn drop(&mut self) {
        let now = Instant::now();
        for hook in &self.hooks {
            hook.shared.stop(now);
            hook.thread.unpark();
        }
    }
}

impl Hook {
    fn start(
        n: usize,
        config: &WebhookConfig,
        metrics: Arc<WebhookMetrics>,
    ) -> std::io::Result<Hook> {
        let mut events = [false; 4];
        for e in Event::ALL {
            events[e as usize] = config.events.iter().any(|name| name == e.name());
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            queue_max: config.queue_max.max(1),
            stop_by: Mutex::new(None),
            idle: AtomicBool::new(false),
            metrics,
        });
        let sender = sender::Sender::new(config, shared.clone());
        let handle = std::thread::Builder::new()
            .name(format!("webhook-{n}"))
            .spawn(move || sender.run())?;
        Ok(Hook {
            events,
            patterns: config.patterns.clone(),
            shared,
            thread: handle.thread().clone(),
            handle: Mutex::new(Some(handle)),
        })
    }

    fn wants(&self, event: Event, channel: &str) -> bool {
        self.events[event as usize]
            && self
                .patterns
                .iter()
                .any(|p| crate::rules::matches(p, channel))
    }
}

#[cfg(test)]
mod tests;
