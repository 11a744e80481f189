/*
 * Broadcaster browser client — a small, dependency-free client for the Broadcaster WebSocket
 * protocol (SPEC sections 4 and 5). Served by the server at /client.js; no build step.
 *
 *   <script src="/client.js"></script>
 *   const client = new BroadcasterClient({ token: "<JWT>" });   // also window.Broadcaster
 *   client.on("broadcast", (m) => console.log(m.channel, m.event, m.payload, m.seq, m.offset));
 *   client.on("recoveryFailed", ({ channel }) => reloadStateOf(channel));
 *   client.on("revoked", async () => client.setToken(await fetchNewToken()));  // close 4007
 *   client.connect();                       // or client.connect(url, token)
 *   await client.subscribe("news");         // resolves with the subscribe result
 *   await client.publish("news", "hello", { text: "hi" });  // needs the `publish` scope
 *   client.on("join", ({ channel, user, info }) => show(channel, client.members(channel)));
 *
 * Constructor options (all optional):
 *   url               WebSocket URL; default ws(s)://<page host>/ws
 *   token             a JWT string, or a function returning one (or a promise of one); a function
 *                     is called before every (re)connect, so it can fetch a fresh token. Empty: no
 *                     auth (an anonymous viewer: public channels only, SPEC 14); "proxy": auth with
 *                     {"proxy": true}, the backend decides from the page's cookies (SPEC 15)
 *   reconnect         reconnect automatically after the connection drops (default true)
 *   minDelay          first reconnect delay in ms (default 500)
 *   maxDelay          cap of the reconnect delay in ms (default 15000)
 *   factor            backoff multiplier per failed attempt (default 2)
 *   jitter            fraction of the delay that is randomised, 0..1 (default 0.5)
 *   requestTimeout    ms before a request's promise rejects with code "Timeout" (default 10000)
 *   heartbeatInterval ms between `heartbeat` requests that detect a dead link; 0 = off (default 25000)
 *
 * Methods:
 *   connect(url?, token?)      opens the connection (and keeps it open until disconnect()); resolves
 *                              once authenticated the first time
 *   disconnect()               closes with 1000 and stops reconnecting; subscriptions (and their
 *                              positions) are kept, so a later connect() resumes them with `since`
 *                              (so does connect(url, newToken) after a `revoked`)
 *   subscribe(channel, {since, rewind}?)  resolves with {subscriptionId, timestamp, offset, epoch,
 *                              recovered?, rewound?}; if not connected it resolves once the subscription is
 *                              made after connecting. `since: {offset, epoch}` resumes from a position the
 *                              app saved itself; `rewind: N` replays the last N publications first (a
 *                              resubscribe after a reconnect uses `since` instead).
 *   unsubscribe(channel)       forgets the channel (and its position) and unsubscribes on the server
 *   publish(channel, event, payload)  resolves with {id, createTime, offset}
 *   request(method, params)    any request; resolves with `result`, rejects with an Error whose
 *                              `.code` is the server's error code ("PermissionDenied", ...)
 *   setToken(token)            replaces the token; when connected, re-authenticates (token refresh:
 *                              channels the new token does not allow end with `unsubscribed`, reason
 *                              "permission"); after a 4007 close (see `revoked`), connects again with it
 *                              and resolves once authenticated
 *   on(event, fn) / off(event, fn)   on() returns a function that removes the listener
 *   channels()                 the channels this client keeps subscribed
 *   position(channel)          {offset, epoch, active}: the last offset seen on channel and its epoch
 *                              (what a reconnect resumes from); active: subscribed right now
 *   members(channel)           [{user, info}] present in channel (SPEC 16), kept up to date from join
 *                              and leave events; null when there is no snapshot (the channel's rule has
 *                              no presence, or the token no `presence` scope)
 *   presence(channel)          asks the server (method `presence`) and resolves with {members, count,
 *                              version}; the answer becomes the channel's snapshot unless the one held
 *                              is newer
 *   state                      "idle" | "connecting" | "connected" | "reconnecting" | "closed"
 *   dropConnection({hold}?)    test/demo hook: drops the socket as a network failure would, so the
 *                              reconnect + recovery path runs; with hold: true the client waits to
 *                              reconnect until resumeReconnect() is called
 *   resumeReconnect()          ends a hold and reconnects now
 *
 * Events (listener arguments):
 *   broadcast       {id, seq, offset, createTime, channel, event, from?, payload}; duplicates (offset
 *                   not newer than the last one seen on the channel) are dropped before this event.
 *                   from: {user, info?}, the publisher, set by the server for WebSocket publications
 *   presence        {channel, members, count, version}: a new snapshot of who is in channel (from
 *                   a subscribe result, also after a reconnect, or from presence())
 *   join, leave     {channel, user, info?, version}: a member came or went; events the snapshot
 *                   already holds (version at or below its version) are dropped before these
 *   status          (state, {code, reason, delay, attempt, revoked?}) on every state change; code and
 *                   reason are the close's (README "Close codes")
 *   revoked         {code: 4007, reason} — the server closed the connection because the token was
 *                   revoked (SPEC 17). The client does NOT reconnect (the same token would be refused,
 *                   and a token function is not called again on its own); state is "closed". Get a
 *                   new token and call setToken(newToken) (or connect(url, newToken)): subscriptions
 *                   are kept and resume with `since`. A close 4006 (disconnected by the backend) is
 *                   not this: the client reconnects with backoff as after a network drop.
 *   error           Error with .code (server code, or "Connection", "Timeout", "Auth") and .method:
 *                   failures no pending promise reports (auth, a refused resubscribe after a
 *                   reconnect, a fatal close, an error answer without request id)
 *   subscribed      {channel, result, resumed}  (resumed: the subscribe carried `since`)
 *   recoveryFailed  {channel, result} — the server could not replay what was missed
 *                   (`recovered: false`): reload the channel's state (e.g. GET /history)
 *   gap             {channel, expected, got} — a `seq` skipped (a message was missed)
 *   unsubscribed    {channel, reason, byServer?} — the channel is forgotten: not resubscribed after a
 *                   reconnect (subscribe() again to ask anew). reason: "unsubscribe" (this client's
 *                   own unsubscribe()), a refused (re)subscribe's error message, or, with byServer:
 *                   true, why the server ended the subscription (SPEC 17): "server" (the backend's
 *                   unsubscribe API), "revoked", "permission" (a re-auth with a token that no longer
 *                   allows it), "expired" (the backend's access check said no); no broadcast of the
 *                   channel follows
 *
 * Recovery: the client remembers, per channel, the last `offset` it saw and the `epoch` from
 * the subscribe result; after a reconnect it authenticates again, then resubscribes every channel
 * with `since: {offset, epoch}`. The server replays the missed publications right after its
 * answer (`recovered: true`), in order, or says `recovered: false`.
 *
 * Presence: the subscribe result of a presence channel carries a snapshot {members, count,
 * version}; join/leave events newer than it update it. A resubscribe brings a fresh snapshot, so
 * members who came or went while the client was away are right again after a reconnect.
 */
(function (global) {
  "use strict";

  // Close codes after which reconnecting cannot help (the client itself must change).
  const FATAL_CLOSE = new Set([1002, 1003, 1007, 1008, 1009]);
  // Token revoked (SPEC 22.1): the server would refuse the same token again, so the client stops
  // until the app gives it a new one. (4006, disconnected by the backend, is reconnected as a
  // network drop is.)
  const REVOKED = 4007;

  function defaultUrl() {
    const loc = global.location;
    if (!loc || !/^https?:$/.test(loc.protocol)) return "ws://127.0.0.1:8080/ws";
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
  }

  // A presence answer {members: [{user, info}], version} as the client keeps it.
  function snapshot(p) {
    const members = new Map();
    for (const m of p.members || []) members.set(m.user, m.info);
    return { members, version: Number(p.version) || 0 };
  }

  function makeError(code, message, method) {
    const e = new Error(message ? code + ": " + message : code);
    e.code = code;
    if (method) e.method = method;
    return e;
  }

  class BroadcasterClient {
    constructor(options) {
      const o = options || {};
      this.url = o.url || defaultUrl();
      this.token = o.token || "";
      this.options = {
        reconnect: o.reconnect !== false,
        minDelay: o.minDelay != null ? o.minDelay : 500,
        maxDelay: o.maxDelay != null ? o.maxDelay : 15000,
        factor: o.factor != null ? o.factor : 2,
        jitter: o.jitter != null ? o.jitter : 0.5,
        requestTimeout: o.requestTimeout != null ? o.requestTimeout : 10000,
        heartbeatInterval: o.heartbeatInterval != null ? o.heartbeatInterval : 25000,
      };
      this.state = "idle";
      this._listeners = new Map();
      this._ws = null;
      this._nextId = 1;
      this._pending = new Map(); // request id -> {resolve, reject, timer, method}
      // channel -> {offset, epoch, seq, active, presence: {members, version} | null, waiters}
      this._subs = new Map();
      this._wanted = false; // connect() called and not disconnect()
      this._attempt = 0;
      this._timer = null;
      this._heartbeat = null;
      this._hold = false;
      this._revoked = false; // stopped by a 4007 close; setToken() connects again
      this._connectWaiters = [];
      this._onOnline = () => {
        if (this.state === "reconnecting" && !this._hold) this._reconnectNow();
      };
      if (global.addEventListener) global.addEventListener("online", this._onOnline);
    }

    // ----- events -------------------------------------------------------------------------

    on(name, fn) {
      if (!this._listeners.has(name)) this._listeners.set(name, new Set());
      this._listeners.get(name).add(fn);
      return () => this.off(name, fn);
    }

    off(name, fn) {
      const set = this._listeners.get(name);
      if (set) set.delete(fn);
    }

    _emit(name, ...args) {
      const set = this._listeners.get(name);
      if (!set) return;
      for (const fn of Array.from(set)) {
        try {
          fn(...args);
        } catch (e) {
          if (global.console) console.error("Broadcaster listener for " + name + " threw", e);
        }
      }
    }

    _setState(state, info) {
      if (this.state === state && !info) return;
      this.state = state;
      this._emit("status", state, info || {});
    }

    // ----- connection ---------------------------------------------------------------------

    connect(url, token) {
      if (url) this.url = url;
      // An empty string is a choice too: connect anonymously.
      if (token !== undefined && token !== null) this.token = token;
      const done = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
      if (this.state === "connected") {
        this._settleConnect(null);
        return done;
      }
      this._wanted = true;
      this._hold = false;
      this._revoked = false;
      this._attempt = 0;
      clearTimeout(this._timer);
      if (!this._ws) this._open();
      return done;
    }

    disconnect() {
      this._wanted = false;
      this._hold = false;
      this._revoked = false; // the app chose to stop: setToken() must not connect
      clearTimeout(this._timer);
      this._timer = null;
      const ws = this._ws;
      this._teardown("disconnected");
      if (ws) {
        try {
          ws.close(1000, "client disconnect");
        } catch (_) {
          /* already closed */
        }
      }
      this._settleConnect(makeError("Connection", "disconnected"));
      this._setState("closed", { code: 1000, reason: "client disconnect" });
    }

    setToken(token) {
      this.token = token;
      if (this.state === "connected") {
        return this._resolveToken().then((t) => this.request("auth", { token: t }));
      }
      // Stopped because the old token was revoked: a new one is what the client waited for.
      if (this._revoked) return this.connect();
      return Promise.resolve(null);
    }

    dropConnection(opts) {
      const ws = this._ws;
      if (!ws) return false;
      this._hold = !!(opts && opts.hold);
      this._lost(ws, 4000, "simulated drop");
      try {
        ws.close(4000, "simulated drop");
      } catch (_) {
        /* ignore */
      }
      return true;
    }

    resumeReconnect() {
      this._hold = false;
      if (this._wanted && !this._ws) this._reconnectNow();
    }

    _resolveToken() {
      const t = this.token;
      return Promise.resolve(typeof t === "function" ? t() : t);
    }

    _open() {
      this._setState(this._attempt === 0 && this.state !== "reconnecting" ? "connecting" : "reconnecting", {
        attempt: this._attempt,
      });
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (e) {
        this._emit("error", makeError("Connection", e.message || String(e)));
        this._settleConnect(makeError("Connection", e.message || String(e)));
        this._wanted = false;
        this._setState("closed", { reason: String(e) });
        return;
      }
      this._ws = ws;
      ws.onopen = () => {
        if (this._ws !== ws) return;
        this._handshake(ws);
      };
      ws.onmessage = (ev) => {
        if (this._ws !== ws) return;
        this._onMessage(ev.data);
      };
      ws.onerror = () => {
        /* the close event that follows carries the details */
      };
      ws.onclose = (ev) => {
        if (this._ws !== ws) return;
        this._lost(ws, ev.code, ev.reason);
      };
    }

    async _handshake(ws) {
      let token;
      try {
        token = await this._resolveToken();
      } catch (e) {
        this._emit("error", makeError("Auth", "token function failed: " + (e && e.message)));
        this._lost(ws, 4001, "no token");
        try {
          ws.close(1000);
        } catch (_) {
          /* ignore */
        }
        return;
      }
      if (this._ws !== ws) return;
      try {
        // No token: an anonymous viewer of public channels; nothing to send.
        if (token === "proxy") await this.request("auth", { proxy: true });
        else if (token) await this.request("auth", { token });
      } catch (e) {
        if (this._ws !== ws) return;
        this._emit("error", e);
        const retry = typeof this.token === "function" && e.code !== "InvalidArgument";
        if (!retry) this._wanted = false; // a fixed bad token will not get better
        this._settleConnect(e);
        try {
          ws.close(1000, "auth failed");
        } catch (_) {
          /* ignore */
        }
        this._lost(ws, 4001, "auth failed: " + e.message);
        return;
      }
      if (this._ws !== ws) return;
      this._attempt = 0;
      this._setState("connected", {});
      this._settleConnect(null);
      this._startHeartbeat(ws);
      for (const [channel, sub] of this._subs) this._sendSubscribe(channel, sub);
    }

    _settleConnect(err) {
      const waiters = this._connectWaiters;
      this._connectWaiters = [];
      for (const w of waiters) (err ? w.reject : w.resolve)(err || undefined);
    }

    _startHeartbeat(ws) {
      clearInterval(this._heartbeat);
      const every = this.options.heartbeatInterval;
      if (!every) return;
      this._heartbeat = setInterval(() => {
        if (this._ws !== ws) return;
        this.request("heartbeat", {}).catch((e) => {
          if (this._ws === ws && e.code === "Timeout") {
            this._lost(ws, 4005, "heartbeat timed out");
            try {
              ws.close(4000, "heartbeat timed out");
            } catch (_) {
              /* ignore */
            }
          }
        });
      }, every);
    }

    // Forgets the socket: fails pending requests, marks subscriptions inactive.
    _teardown(reason) {
      clearInterval(this._heartbeat);
      this._heartbeat = null;
      const ws = this._ws;
      this._ws = null;
      if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      const pending = this._pending;
      this._pending = new Map();
      for (const p of pending.values()) {
        clearTimeout(p.timer);
        p.reject(makeError("Connection", reason, p.method));
      }
      for (const sub of this._subs.values()) sub.active = false;
    }

    // The connection `ws` ended (closed by the server, the network, or us): reconnect if wanted.
    _lost(ws, code, reason) {
      if (this._ws !== ws) return;
      const wasConnected = this.state === "connected";
      this._teardown("connection closed (" + code + (reason ? " " + reason : "") + ")");
      if (FATAL_CLOSE.has(code)) {
        this._wanted = false;
        this._emit("error", makeError("Connection", "closed " + code + (reason ? ": " + reason : "")));
      }
      const revoked = code === REVOKED;
      if (revoked) {
        // Even a token function is not called again on its own: it may hand back the same
        // token, and the app decides where a new one comes from (setToken or connect).
        this._wanted = false;
        this._revoked = true;
      }
      if (!this._wanted || !this.options.reconnect) {
        this._wanted = false;
        this._settleConnect(makeError("Connection", "closed " + code));
        this._setState("closed", revoked ? { code, reason, revoked } : { code, reason });
        if (revoked) this._emit("revoked", { code, reason });
        return;
      }
      if (code === 4004) this._attempt = Math.max(this._attempt, 4); // told to back off
      const delay = this._backoff();
      this._attempt += 1;
      this._setState("reconnecting", { code, reason, delay, attempt: this._attempt, wasConnected });
      clearTimeout(this._timer);
      this._timer = setTimeout(() => {
        this._timer = null;
        if (this._hold) return; // resumeReconnect() continues
        this._reconnectNow();
      }, delay);
    }

    _reconnectNow() {
      clearTimeout(this._timer);
      this._timer = null;
      if (this._wanted && !this._ws) this._open();
    }

    _backoff() {
      const o = this.options;
      const base = Math.min(o.maxDelay, o.minDelay * Math.pow(o.factor, this._attempt));
      return Math.round(base * (1 - o.jitter * Math.random()));
    }

    // ----- requests -----------------------------------------------------------------------

    request(method, params) {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1) {
        return Promise.reject(makeError("Connection", "not connected", method));
      }
      const id = this._nextId++;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          if (this._pending.delete(id)) reject(makeError("Timeout", "no answer to " + method, method));
        }, this.options.requestTimeout);
        this._pending.set(id, { resolve, reject, timer, method });
        try {
          ws.send(JSON.stringify({ id, method, params: params || {} }));
        } catch (e) {
          clearTimeout(timer);
          this._pending.delete(id);
          reject(makeError("Connection", e.message || String(e), method));
        }
      });
    }

    publish(channel, event, payload) {
      return this.request("publish", { channel, event, payload: payload === undefined ? null : payload });
    }

    subscribe(channel, opts) {
      let sub = this._subs.get(channel);
      if (sub && sub.active && sub.result) return Promise.resolve(sub.result);
      const since = opts && opts.since;
      if (!sub) {
        const rewind = opts && opts.rewind != null ? Number(opts.rewind) : null;
        sub = { offset: null, epoch: null, seq: 0, active: false, result: null, waiters: [], rewind, presence: null };
        if (since && since.epoch != null && since.offset != null) {
          sub.offset = Number(since.offset);
          sub.epoch = String(since.epoch);
        }
        this._subs.set(channel, sub);
      }
      const done = new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
      if (this.state === "connected" && !sub.sending) this._sendSubscribe(channel, sub);
      return done;
    }

    _sendSubscribe(channel, sub) {
      const params = { channel };
      const resumed = sub.offset != null && sub.epoch != null;
      if (resumed) params.since = { offset: sub.offset, epoch: sub.epoch };
      else if (sub.rewind != null) params.rewind = sub.rewind;
      sub.sending = true;
      sub.result = null;
      this.request("subscribe", params).then(
        (result) => {
          sub.sending = false;
          if (this._subs.get(channel) !== sub) return; // unsubscribed meanwhile
          sub.active = true;
          sub.result = result;
          sub.seq = 0;
          sub.epoch = result.epoch;
          // Recovered: the missed publications follow and advance the offset themselves.
          // Otherwise delivery starts after the channel's current offset.
          // Rewound: the last `rewound` publications up to the offset follow.
          if (!(resumed && result.recovered === true)) sub.offset = result.offset - (result.rewound || 0);
          sub.presence = result.presence ? snapshot(result.presence) : null;
          const waiters = sub.waiters;
          sub.waiters = [];
          for (const w of waiters) w.resolve(result);
          this._emit("subscribed", { channel, result, resumed });
          if (result.presence) this._emit("presence", Object.assign({ channel }, result.presence));
          if (resumed && result.recovered === false) this._emit("recoveryFailed", { channel, result });
        },
        (err) => {
          sub.sending = false;
          if (this._subs.get(channel) !== sub) return;
          if (err.code === "Connection" || err.code === "Timeout") {
            return; // retried after the next (re)connect; the waiters keep waiting
          }
          this._subs.delete(channel);
          const waiters = sub.waiters;
          sub.waiters = [];
          for (const w of waiters) w.reject(err);
          if (!waiters.length) this._emit("error", err); // a resubscribe nobody awaits
          this._emit("unsubscribed", { channel, reason: err.message });
        }
      );
    }

    unsubscribe(channel) {
      const sub = this._subs.get(channel);
      if (!sub) return Promise.resolve({ success: true });
      this._subs.delete(channel);
      const waiters = sub.waiters;
      sub.waiters = [];
      for (const w of waiters) w.reject(makeError("Cancelled", "unsubscribed", "subscribe"));
      this._emit("unsubscribed", { channel, reason: "unsubscribe" });
      if (this.state !== "connected" || !(sub.active || sub.sending)) return Promise.resolve({ success: true });
      return this.request("unsubscribe", { channel }).catch((e) => {
        if (e.code === "NotFound") return { success: true };
        throw e;
      });
    }

    channels() {
      return Array.from(this._subs.keys());
    }

    position(channel) {
      const sub = this._subs.get(channel);
      return sub ? { offset: sub.offset, epoch: sub.epoch, active: sub.active } : null;
    }

    members(channel) {
      const sub = this._subs.get(channel);
      if (!sub || !sub.presence) return null;
      return Array.from(sub.presence.members, ([user, info]) =>
        info === undefined ? { user } : { user, info });
    }

    presence(channel) {
      return this.request("presence", { channel }).then((result) => {
        const sub = this._subs.get(channel);
        // Events newer than the answer may already have been applied; an older answer would
        // bring back members who left since.
        if (sub && !(sub.presence && sub.presence.version > result.version)) {
          sub.presence = snapshot(result);
          this._emit("presence", Object.assign({ channel }, result));
        }
        return result;
      });
    }

    // ----- incoming -----------------------------------------------------------------------

    _onMessage(data) {
      if (typeof data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(data);
      } catch (_) {
        this._emit("error", makeError("InvalidArgument", "server sent non-JSON text"));
        return;
      }
      if (msg && msg.method === "broadcast") {
        this._onBroadcast(msg.params || {});
        return;
      }
      if (msg && (msg.method === "join" || msg.method === "leave")) {
        this._onPresenceEvent(msg.method, msg.params || {});
        return;
      }
      if (msg && msg.method === "unsubscribed") {
        const { channel, reason } = msg.params || {};
        const sub = this._subs.get(channel);
        if (sub) {
          this._subs.delete(channel);
          for (const w of sub.waiters) w.reject(makeError("Cancelled", "unsubscribed by the server", "subscribe"));
          // Deleted above, so a reconnect does not subscribe it again: that would undo the
          // backend's decision, or be refused.
          this._emit("unsubscribed", { channel, reason, byServer: true });
        }
        return;
      }
      const id = msg ? msg.requestId : null;
      const p = id != null ? this._pending.get(id) : undefined;
      if (!p) {
        if (msg && msg.error) {
          this._emit("error", makeError(msg.error.code || "Internal", msg.error.message || ""));
        }
        return;
      }
      this._pending.delete(id);
      clearTimeout(p.timer);
      if (msg.error) p.reject(makeError(msg.error.code || "Internal", msg.error.message || "", p.method));
      else p.resolve(msg.result);
    }

    _onBroadcast(b) {
      const sub = this._subs.get(b.channel);
      if (!sub) return; // a late message of a channel we left
      if (typeof b.offset === "number" && sub.offset != null && b.offset <= sub.offset) return; // duplicate
      if (typeof b.offset === "number") sub.offset = b.offset;
      if (typeof b.seq === "number") {
        if (sub.seq && b.seq !== sub.seq + 1) {
          this._emit("gap", { channel: b.channel, expected: sub.seq + 1, got: b.seq });
        }
        sub.seq = b.seq;
      }
      this._emit("broadcast", b);
    }

    _onPresenceEvent(kind, e) {
      const sub = this._subs.get(e.channel);
      if (!sub) return; // a late event of a channel we left
      const p = sub.presence;
      // Without a snapshot there is nothing to compare with: every event is news.
      if (p) {
        if (!(e.version > p.version)) return; // the snapshot (or an earlier event) has it
        p.version = e.version;
        if (kind === "join") p.members.set(e.user, e.info);
        else p.members.delete(e.user);
      }
      this._emit(kind, e);
    }
  }

  global.BroadcasterClient = BroadcasterClient;
  global.Broadcaster = BroadcasterClient;
  if (typeof module !== "undefined" && module.exports) module.exports = BroadcasterClient;
})(typeof window !== "undefined" ? window : globalThis);
