//! An observer: one connection, a member itself, subscribed to presence channels, that follows
//! every `join` and `leave` through a [`Tracker`] on a thread of its own, and on demand asks the
//! `presence` method what the server thinks, to hold it against what it tracked.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tracker::Tracker;
use super::{channel_request, may_be_notice, parse_frame, Frame, Snapshot};
use crate::net::Node;
use crate::publisher::WsConn;

/// How long a read waits before the observer looks at its commands again.
const POLL: Duration = Duration::from_millis(50);

/// What an observer connects as, and to what.
#[derive(Debug, Clone)]
pub(crate) struct ObserverSpec {
    pub(crate) node: Node,
    pub(crate) source: Option<Ipv4Addr>,
    /// Its `sub`: it is a member of its channels too.
    pub(crate) user: String,
    /// A token for `user` with the presence scope.
    pub(crate) token: String,
    pub(crate) channels: Vec<String>,
    /// Varies the mask keys.
    pub(crate) seed: u64,
}

/// What the `presence` method answered for one channel.
pub(crate) type Answer = (String, Result<Snapshot, String>);

enum Cmd {
    AskPresence,
    Close,
}

#[derive(Default)]
struct State {
    tracker: Mutex<Tracker>,
    /// Every channel's subscribe result (and snapshot) is in.
    ready: AtomicBool,
    /// Why the observer stopped, if it did on its own.
    error: Mutex<Option<String>>,
    answers: Mutex<Vec<Answer>>,
}

/// A running observer.
pub(crate) struct Observer {
    pub(crate) user: String,
    channels: usize,
    state: Arc<State>,
    cmds: Sender<Cmd>,
    handle: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked observer thread leaves its data as it was: still worth reading.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Observer {
    /// Starts the observer's thread: connect, auth, subscribe to every channel, then follow.
    pub(crate) fn start(spec: ObserverSpec) -> Result<Observer, String> {
        let state = Arc::new(State {
            tracker: Mutex::new(Tracker::new(&spec.channels)),
            ..State::default()
        });
        let (cmds, rx) = mpsc::channel();
        let (user, channels) = (spec.user.clone(), spec.channels.len());
        let st = state.clone();
        let handle = std::thread::Builder::new()
            .name(format!("lt-observer-{}", spec.seed))
            .spawn(move || {
                if let Err(e) = observe(&spec, &st, &rx) {
                    *lock(&st.error) = Some(format!("observer {}: {e}", spec.user));
                }
            })
            .map_err(|e| format!("spawning an observer thread: {e}"))?;
        Ok(Observer {
            user,
            channels,
            state,
            cmds,
            handle: Some(handle),
        })
    }

    /// Waits until every subscribe result came, or the observer failed, or `timeout`.
    pub(crate) fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.state.ready.load(Ordering::Acquire) {
            if let Some(e) = self.error() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "observer {}: no subscribe result with presence within {timeout:?}",
                    self.user
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Why the observer stopped on its own (a failed connect, subscribe, or a dropped connection).
    pub(crate) fn error(&self) -> Option<String> {
        lock(&self.state.error).clone()
    }

    /// Reads the tracker.
    pub(crate) fn with_tracker<R>(&self, f: impl FnOnce(&Tracker) -> R) -> R {
        f(&lock(&self.state.tracker))
    }

    /// Asks the `presence` method about every channel; the answers, once all came (or what
    /// came by `timeout`).
    pub(crate) fn ask_presence(&self, timeout: Duration) -> Vec<Answer> {
        lock(&self.state.answers).clear();
        if self.cmds.send(Cmd::AskPresence).is_err() {
            return Vec::new();
        }
        let deadline = Instant::now() + timeout;
        while lock(&self.state.answers).len() < self.channels
            && Instant::now() < deadline
            && self.error().is_none()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        lock(&self.state.answers).clone()
    }

    /// Closes the connection (the WebSocket closing handshake) and ends the thread; the error
    /// the observer stopped with, if any.
    pub(crate) fn close(mut self) -> Option<String> {
        let _ = self.cmds.send(Cmd::Close);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                return Some(format!("observer {}: its thread panicked", self.user));
            }
        }
        self.error()
    }
}

/// Which request an id was.
enum Asked {
    Subscribe(String),
    Presence(String),
}

/// The observer's thread: returns when told to close, or with the first error.
fn observe(spec: &ObserverSpec, state: &State, rx: &Receiver<Cmd>) -> Result<(), String> {
    let mut ws = WsConn::open(&spec.node, spec.source, &spec.token, spec.seed)?
        .map_err(|code| format!("auth failed: {code} (check --secret)"))?;
    let mut asked = Vec::new();
    send_requests(&mut ws, spec, "subscribe", &mut asked)?;
    ws.set_read_timeout(Some(POLL));
    loop {
        match rx.try_recv() {
            Ok(Cmd::AskPresence) => send_requests(&mut ws, spec, "presence", &mut asked)?,
            Ok(Cmd::Close) | Err(TryRecvError::Disconnected) => {
                // The server's answer to our close says nothing the run checks.
                let _ = ws.close(Duration::from_secs(5));
                return Ok(());
            }
            Err(TryRecvError::Empty) => {}
        }
        let Some(text) = ws.next_text()? else {
            continue;
        };
        on_frame(state, &mut asked, &text)?;
    }
}

/// One request of `method` per channel, in one write.
fn send_requests(
    ws: &mut WsConn,
    spec: &ObserverSpec,
    method: &str,
    asked: &mut Vec<(u64, Asked)>,
) -> Result<(), String> {
    let reqs: Vec<Vec<u8>> = spec
        .channels
        .iter()
        .map(|c| {
            let id = ws.next_id();
            asked.push((
                id,
                match method {
                    "subscribe" => Asked::Subscribe(c.clone()),
                    _ => Asked::Presence(c.clone()),
                },
            ));
            channel_request(id, method, c)
        })
        .collect();
    let refs: Vec<&[u8]> = reqs.iter().map(Vec::as_slice).collect();
    ws.send_texts(&refs)
}

/// A notification goes to the tracker; a response settles its request.
fn on_frame(state: &State, asked: &mut Vec<(u64, Asked)>, text: &[u8]) -> Result<(), String> {
    // Broadcasts (the soak publishes on its presence channel) need no JSON parse.
    if !may_be_notice(text) && crate::ws::find(text, b"\"requestId\"").is_none() {
        return Ok(());
    }
    let (id, error, presence) = match parse_frame(text) {
        Frame::Notice(n) => {
            lock(&state.tracker).event(n);
            return Ok(());
        }
        Frame::Response {
            id,
            error,
            presence,
        } => (id, error, presence),
        Frame::Other => return Ok(()),
    };
    let Some(pos) = asked.iter().position(|(i, _)| Some(*i) == id) else {
        return Ok(());
    };
    match asked.swap_remove(pos).1 {
        Asked::Subscribe(channel) => {
            if let Some(code) = error {
                return Err(format!("subscribe to {channel} failed: {code}"));
            }
            let p = presence.ok_or_else(|| {
                format!(
                    "the subscribe result for {channel} has no presence: is the channel's rule \
                     `presence = true`, and does the token's presence scope count?"
                )
            })?;
            let mut t = lock(&state.tracker);
            t.snapshot(&channel, p.users, p.version);
            if t.all_snapshots() {
                state.ready.store(true, Ordering::Release);
            }
        }
        Asked::Presence(channel) => {
            let answer = match (error, presence) {
                (Some(code), _) => Err(code),
                (None, Some(p)) => Ok(p),
                (None, None) => Err("a result without members/count/version".into()),
            };
            lock(&state.answers).push((channel, answer));
        }
    }
    Ok(())
}
