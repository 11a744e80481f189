//! End-to-end test of the playground page (SPEC section 11) in headless Chromium.
//!
//! The test starts the real server in dev mode, launches `/usr/bin/chromium --headless` with
//! `--remote-debugging-port=0` and drives it over the Chrome DevTools Protocol (a WebSocket,
//! spoken here with tokio-tungstenite): it opens the playground, connects with the pre-filled dev
//! token, subscribes, publishes over REST and from the page's form and reads the message list back
//! from the DOM; then it drops the page's WebSocket, publishes while it is down and checks that
//! `/client.js` reconnects, resubscribes with `since` and recovers every missed message once, in
//! order (and that an unrecoverable position is reported as `recovered: false`). A second test
//! shows presence (SPEC 16): the member list of a channel follows another client's join and leave.
//! A third follows what the backend decides (SPEC 17, 22.1): a channel the server unsubscribes is
//! logged with its reason and not resubscribed, a close 4006 is reconnected and a 4007 (token
//! revoked) is not, until the page is given a new token. A fourth checks compression (SPEC 20)
//! with the browser's own permessage-deflate, both ways.
//!
//! Chromium is required: a missing browser fails the test (CI installs the Debian `chromium`
//! package). `CHROMIUM=/path` picks another binary; `PLAYGROUND_SCREENSHOT=/tmp/x.png` saves
//! screenshots of the page (desktop, and `-phone` for a phone-width viewport).

mod common;
mod fake_server;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    http_get_key, http_post_key, kill_with_parent, last_chars, Server, ServerOpts, TokenSpec, Ws,
};
use fake_server::{accept_session, close_with};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on one DevTools command.
const CDP_T: Duration = Duration::from_secs(10);
/// Bound on a condition in the page becoming true.
const PAGE_T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Chromium process
// ---------------------------------------------------------------------------------------------

/// A headless Chromium in its own process group; killed (group and all) on drop.
struct Chromium {
    child: Option<Child>,
    profile: PathBuf,
    /// The browser's DevTools WebSocket URL.
    ws_url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Chromium {
    fn launch() -> Chromium {
        let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let profile = common::temp_path("-chromium-profile");
        std::fs::create_dir_all(&profile).expect("create the Chromium profile dir");
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-proxy-server",
            "--remote-debugging-port=0",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        kill_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            let _ = std::fs::remove_dir_all(&profile);
            panic!(
                "cannot start Chromium at {bin}: {e}; the playground test needs it \
                 (Debian: apt-get install chromium chromium-driver)"
            )
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let lines2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut browser = Chromium {
            child: Some(child),
            profile,
            ws_url: String::new(),
            stderr: lines,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        browser.ws_url = url.trim().to_string();
                        return browser;
                    }
                }
                Err(_) => panic!(
                    "Chromium printed no DevTools URL within 30 s; stderr:\n{}",
                    browser.stderr_text()
                ),
            }
        }
    }

    fn stderr_text(&self) -> String {
        let all = self.stderr.lock().unwrap().join("\n");
        last_chars(&all, 3000).to_string()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signals the process group this test created for Chromium (its pgid is
            // the browser's pid), so renderer and helper processes go too.
            unsafe {
                libc::kill(-(c.id() as i32), libc::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Helpers may still be exiting and writing; retry briefly.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chrome DevTools Protocol client
// ---------------------------------------------------------------------------------------------

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;
type WsSink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

struct Cdp {
    sink: tokio::sync::Mutex<WsSink>,
    next_id: AtomicU64,
    pending: Pending,
    /// Console messages and exceptions of the page, for failure reports.
    console: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Cdp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Cdp {
    async fn connect(ws_url: &str) -> Cdp {
        let (ws, _) = common::within(
            CDP_T,
            "DevTools WebSocket connect",
            tokio_tungstenite::connect_async(ws_url),
        )
        .await
        .unwrap_or_else(|e| panic!("DevTools WebSocket {ws_url}: {e}"));
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let console: Arc<Mutex<Vec<String>>> = Arc::default();
        let (p2, c2) = (pending.clone(), console.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    if let Some(tx) = p2.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                    continue;
                }
                let params = &v["params"];
                match v["method"].as_str() {
                    Some("Runtime.consoleAPICalled") => {
                        let args: Vec<String> = params["args"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .map(|x| match &x["value"] {
                                        Value::Null => x["description"].to_string(),
                                        v => v.to_string(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        c2.lock().unwrap().push(format!(
                            "console.{}: {}",
                            params["type"].as_str().unwrap_or("log"),
                            args.join(" ")
                        ));
                    }
                    Some("Runtime.exceptionThrown") => {
                        let d = &params["exceptionDetails"];
                        c2.lock().unwrap().push(format!(
                            "exception: {} {}",
                            d["text"].as_str().unwrap_or(""),
                            d["exception"]["description"].as_str().unwrap_or("")
                        ));
                    }
                    Some("Log.entryAdded") => {
                        let e = &params["entry"];
                        c2.lock().unwrap().push(format!(
                            "log.{}: {} {}",
                            e["level"].as_str().unwrap_or(""),
                            e["text"].as_str().unwrap_or(""),
                            e["url"].as_str().unwrap_or("")
                        ));
                    }
                    _ => {}
                }
            }
        });
        Cdp {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            pending,
            console,
            reader,
        }
    }

    /// One DevTools command (on the page session when `session` is given); its `result`.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        common::within(CDP_T, &format!("send {method}"), async {
            self.sink
                .lock()
                .await
                .send(Message::text(msg.to_string()))
                .await
        })
        .await
        .unwrap_or_else(|e| panic!("DevTools send {method}: {e}"));
        let v = match tokio::time::timeout(CDP_T, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => panic!("DevTools connection ended during {method}"),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                panic!("DevTools {method} got no answer within {CDP_T:?}")
            }
        };
        if let Some(e) = v.get("error") {
            panic!("DevTools {method} failed: {e}");
        }
        v["result"].clone()
    }
}

/// One page (tab), attached with a flat session.
struct Page {
    cdp: Cdp,
    session: String,
    server_stderr: Box<dyn Fn() -> String + Send + Sync>,
}

impl Page {
    async fn open(browser: &Chromium, server: &Server) -> Page {
        let cdp = Cdp::connect(&browser.ws_url).await;
        let target = cdp
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let stderr_path = server.stderr_path.clone();
        let page = Page {
            cdp,
            session,
            server_stderr: Box::new(move || {
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            }),
        };
        page.call("Runtime.enable", json!({})).await;
        page.call("Log.enable", json!({})).await;
        page.call("Page.enable", json!({})).await;
        page.viewport(1280, 1000, false).await;
        page
    }

    async fn call(&self, method: &str, params: Value) -> Value {
        self.cdp.call(Some(&self.session), method, params).await
    }

    async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    async fn navigate(&self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url})).await;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            panic!("navigating to {url}: {e}");
        }
        self.wait_for(
            "document.readyState === 'complete' && !!window.playground",
            "the playground page to load",
        )
        .await;
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value as JSON; an
    /// exception is an `Err` with its description.
    async fn try_eval(&self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(d) = r.get("exceptionDetails") {
            return Err(format!(
                "{} {}",
                d["text"].as_str().unwrap_or(""),
                d["exception"]["description"].as_str().unwrap_or("")
            ));
        }
        Ok(r["result"]["value"].clone())
    }

    async fn eval(&self, expr: &str) -> Value {
        match self.try_eval(expr).await {
            Ok(v) => v,
            Err(e) => panic!("{expr} threw: {e}\n{}", self.diagnostics().await),
        }
    }

    /// Polls `expr` until it is truthy; returns that value. Fails with the page's state.
    async fn wait_for(&self, expr: &str, what: &str) -> Value {
        let deadline = Instant::now() + PAGE_T;
        loop {
            let last = match self.try_eval(expr).await {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => v,
                Err(e) => json!(format!("threw: {e}")),
            };
            if Instant::now() > deadline {
                panic!(
                    "timed out after {PAGE_T:?} waiting for {what} ({expr}); last value {last}\n{}",
                    self.diagnostics().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn set_value(&self, id: &str, value: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.getElementById({id}); e.value = {value}; \
             e.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            id = json!(id),
            value = json!(value)
        ))
        .await;
    }

    async fn click(&self, id: &str) {
        let ok = self
            .eval(&format!(
                "(() => {{ const e = document.getElementById({}); if (!e || e.disabled) return false; \
                 e.click(); return true; }})()",
                json!(id)
            ))
            .await;
        assert_eq!(
            ok,
            json!(true),
            "#{id} is missing or disabled\n{}",
            self.diagnostics().await
        );
    }

    async fn text(&self, id: &str) -> String {
        self.eval(&format!(
            "(document.getElementById({}) || {{}}).textContent || ''",
            json!(id)
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The message rows, oldest first.
    async fn rows(&self) -> Vec<Row> {
        let v = self.eval(ROWS_JS).await;
        serde_json::from_value(v).expect("rows")
    }

    /// A PNG of the viewport, or of the whole page with `full`.
    async fn screenshot(&self, path: &Path, full: bool) {
        let mut params = json!({"format": "png"});
        if full {
            let m = self.call("Page.getLayoutMetrics", json!({})).await;
            let size = &m["cssContentSize"];
            params["captureBeyondViewport"] = json!(true);
            params["clip"] = json!({"x": 0, "y": 0, "width": size["width"],
                                    "height": size["height"], "scale": 1});
        }
        let r = self.call("Page.captureScreenshot", params).await;
        let png = base64_decode(r["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("screenshot: {}", path.display());
    }

    /// What the page shows and logged, for failure messages.
    async fn diagnostics(&self) -> String {
        let page = self
            .try_eval(
                "JSON.stringify({status: (document.getElementById('status')||{}).textContent, \
                 log: Array.from(document.querySelectorAll('#log li')).map(l => l.textContent).reverse(), \
                 rows: Array.from(document.querySelectorAll('#messages li.msg')).map(l => l.dataset)})",
            )
            .await
            .unwrap_or_else(|e| json!(e));
        let console = self.cdp.console.lock().unwrap().join("\n");
        format!(
            "page: {}\nconsole:\n{}\nserver stderr (tail):\n{}",
            page.as_str().unwrap_or(&page.to_string()),
            console,
            last_chars(&(self.server_stderr)(), 2000)
        )
    }
}

const ROWS_JS: &str = "Array.from(document.querySelectorAll('#messages li.msg')).map(li => ({\
    n: +li.dataset.n, channel: li.dataset.channel, event: li.dataset.event, \
    seq: +li.dataset.seq, offset: +li.dataset.offset, \
    payload: li.querySelector('.payload').textContent, \
    latency: (li.querySelector('.latency b') || {}).textContent || ''})).sort((a, b) => a.n - b.n)";

#[derive(Debug, Clone, serde::Deserialize)]
struct Row {
    channel: String,
    event: String,
    seq: u64,
    offset: u64,
    payload: String,
    latency: String,
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let Some(v) = val(c) else { continue }; // padding and whitespace
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// The dev-mode API key and token from the server's banner.
fn dev_credentials(server: &Server) -> (String, String) {
    let mut lines: Vec<String> = server.stdout_head.clone();
    lines.extend(server.stdout_tail.lock().unwrap().iter().cloned());
    let key = lines
        .iter()
        .find_map(|l| l.strip_prefix("api key:"))
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|| panic!("no `api key:` line in the dev-mode banner: {lines:?}"));
    let token = lines
        .iter()
        .position(|l| l.starts_with("token (sub=dev"))
        .and_then(|i| lines.get(i + 1))
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|| panic!("no dev token in the banner: {lines:?}"));
    (key, token)
}

async fn rest_publish(
    server: &Server,
    key: &str,
    channel: &str,
    event: &str,
    payload: Value,
) -> u64 {
    let body = json!({"channel": channel, "event": event, "payload": payload}).to_string();
    let r = http_post_key(server.public, "/publish", key, &body).await;
    assert_eq!(r.status, 200, "POST /publish: {}", r.text());
    r.json()["offset"]
        .as_u64()
        .expect("offset in the publish answer")
}

fn rows_on<'a>(rows: &'a [Row], channel: &str) -> Vec<&'a Row> {
    rows.iter().filter(|r| r.channel == channel).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_in_headless_chromium() {
    common::within(Duration::from_secs(60), "the browser test", scenario()).await;
}

async fn scenario() {
    let server = Server::start(ServerOpts {
        secret: None,
        api_keys: Vec::new(),
        config_toml: Some(
            "[[channels]]\npattern = \"e2e-board/*\"\naccess = \"public\"\nhistory_size = 1\nrewind_default = 1\n"
                .into(),
        ),
        ..ServerOpts::shards(2)
    });
    let (key, dev_token) = dev_credentials(&server);
    let browser = Chromium::launch();
    let page = Page::open(&browser, &server).await;
    let base = format!("http://{}", server.public);
    page.navigate(&format!("{base}/")).await;

    // The page and its client: the token field holds the dev token.
    assert_eq!(
        page.eval("typeof BroadcasterClient").await,
        json!("function"),
        "/client.js did not define BroadcasterClient"
    );
    let token = page.eval("document.getElementById('token').value").await;
    assert_eq!(
        token,
        json!(dev_token),
        "token field not pre-filled with the dev token"
    );
    assert_eq!(
        page.eval("document.getElementById('url').value").await,
        json!(format!("ws://{}/ws", server.public))
    );

    // Connect and subscribe.
    page.click("connect").await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'connected'",
        "the page to connect",
    )
    .await;
    assert_eq!(page.text("status").await, "connected");
    // A refused subscription is shown as an error and not kept.
    page.set_value("channel", "bad channel").await;
    page.click("subscribe").await;
    page.wait_for(
        "Array.from(document.querySelectorAll('#log li[data-kind=error]'))\
         .some(l => l.textContent.includes('InvalidArgument'))",
        "the InvalidArgument error of a bad channel name",
    )
    .await;
    page.wait_for(
        "document.querySelectorAll('#subs li').length === 0",
        "the refused subscription to leave the list",
    )
    .await;

    let ch = "e2e/news";
    page.set_value("channel", ch).await;
    page.click("subscribe").await;
    let sub_sel = format!("#subs li[data-channel={}][data-active=true]", json!(ch));
    page.wait_for(
        &format!("!!document.querySelector({})", json!(sub_sel)),
        "the subscription to show as active",
    )
    .await;

    // A REST publication appears with seq 1 and its offset, and a latency from `t`.
    let off1 = rest_publish(
        &server,
        &key,
        ch,
        "rest",
        json!({"t": now_ms(), "text": "from REST"}),
    )
    .await;
    assert_eq!(off1, 1);
    page.wait_for(
        "document.querySelectorAll('#messages li.msg').length >= 1",
        "the REST publication on the page",
    )
    .await;
    let rows = page.rows().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!((r.channel.as_str(), r.event.as_str()), (ch, "rest"));
    assert_eq!((r.seq, r.offset), (1, off1));
    assert!(r.payload.contains("\"text\":\"from REST\""), "{r:?}");
    assert!(
        r.latency.ends_with(" ms"),
        "latency shown for a payload with t: {r:?}"
    );

    // The page's publish form uses the WebSocket `publish` method; the message comes back.
    page.set_value("pub-channel", ch).await;
    page.set_value("pub-event", "from-page").await;
    page.set_value("pub-payload", r#"{"text": "from the page"}"#)
        .await;
    page.click("publish").await;
    page.wait_for(
        "document.querySelectorAll('#messages li.msg').length >= 2",
        "the page's own publication",
    )
    .await;
    let rows = page.rows().await;
    let r = &rows[1];
    assert_eq!(
        (r.event.as_str(), r.seq, r.offset),
        ("from-page", 2, 2),
        "{rows:?}"
    );
    assert!(r.payload.contains("\"text\":\"from the page\""), "{r:?}");
    assert!(r.latency.ends_with(" ms"), "the form adds t: {r:?}");
    page.wait_for(
        "document.getElementById('pub-result').textContent.includes('offset 2')",
        "the publish result",
    )
    .await;
    let h = http_get_key(server.public, "/history?channel=e2e/news", &key).await;
    assert_eq!(h.status, 200, "{}", h.text());
    let h = h.json();
    assert_eq!(h["publications"][1]["event"], json!("from-page"), "{h}");
    assert_eq!(
        h["publications"][1]["payload"]["text"],
        json!("from the page"),
        "{h}"
    );

    // Recovery: the socket drops, three messages are published meanwhile, and after the
    // reconnect all three arrive, in order, exactly once, then live delivery goes on.
    let dropped = page
        .eval("window.playground.client.dropConnection({hold: true})")
        .await;
    assert_eq!(dropped, json!(true));
    page.wait_for(
        "document.getElementById('status').dataset.state === 'reconnecting'",
        "the page to notice the drop",
    )
    .await;
    let mut missed = Vec::new();
    for i in 1..=3 {
        missed.push(rest_publish(&server, &key, ch, &format!("missed-{i}"), json!({"i": i})).await);
    }
    assert_eq!(missed, vec![3, 4, 5]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        page.rows().await.len(),
        2,
        "messages arrived while disconnected"
    );
    page.eval("window.playground.client.resumeReconnect()")
        .await;
    page.wait_for(
        "document.querySelectorAll('#messages li.msg').length >= 5",
        "the missed messages after the reconnect",
    )
    .await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'connected'",
        "the page to reconnect",
    )
    .await;
    let live = rest_publish(&server, &key, ch, "live", json!({"t": now_ms()})).await;
    assert_eq!(live, 6);
    page.wait_for(
        "document.querySelectorAll('#messages li.msg').length >= 6",
        "a live message after the recovery",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // room for a duplicate to show up
    let rows = page.rows().await;
    let got: Vec<(String, u64, u64)> = rows_on(&rows, ch)
        .iter()
        .map(|r| (r.event.clone(), r.seq, r.offset))
        .collect();
    let want: Vec<(String, u64, u64)> = [
        ("rest", 1, 1),
        ("from-page", 2, 2),
        // A new subscription after the reconnect: seq starts again at 1.
        ("missed-1", 1, 3),
        ("missed-2", 2, 4),
        ("missed-3", 3, 5),
        ("live", 4, 6),
    ]
    .iter()
    .map(|(e, s, o)| (e.to_string(), *s, *o))
    .collect();
    assert_eq!(
        got,
        want,
        "messages after the recovery\n{}",
        page.diagnostics().await
    );
    let log = page.text("log").await;
    assert!(log.contains("missed messages recovered"), "log: {log}");
    let position = page
        .eval(&format!(
            "window.playground.client.position({}).offset",
            json!(ch)
        ))
        .await;
    assert_eq!(position, json!(6));

    if let Ok(path) = std::env::var("PLAYGROUND_SCREENSHOT") {
        page.screenshot(Path::new(&path), false).await;
    }

    // Phone width: nothing overflows horizontally.
    page.viewport(390, 844, true).await;
    page.wait_for(
        "document.documentElement.scrollWidth <= window.innerWidth",
        "the page to fit a 390 px wide viewport",
    )
    .await;
    if let Ok(path) = std::env::var("PLAYGROUND_SCREENSHOT") {
        let phone = match path.strip_suffix(".png") {
            Some(stem) => format!("{stem}-phone.png"),
            None => format!("{path}-phone.png"),
        };
        page.screenshot(Path::new(&phone), true).await;
    }
    page.viewport(1280, 1000, false).await;

    // The socket closes by itself (its close event, no hold): the backoff timer reconnects and
    // a message published around the close shows exactly once.
    let lost_before = page
        .eval("document.querySelectorAll('#log li[data-kind=warn]').length")
        .await;
    page.eval("window.playground.client._ws.close(4000, 'test close'); true")
        .await;
    let around = rest_publish(&server, &key, ch, "around-close", json!({})).await;
    page.wait_for(
        &format!(
            "document.querySelectorAll('#log li[data-kind=warn]').length > {lost_before} && \
             document.getElementById('status').dataset.state === 'connected' && \
             !!document.querySelector('#messages li.msg[data-offset=\"{around}\"]')"
        ),
        "the reconnect after a close event, and the message published around it",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = page.rows().await;
    assert_eq!(
        rows.iter().filter(|r| r.offset == around).count(),
        1,
        "{rows:?}"
    );

    // A position the server cannot resume from (another epoch): `recovered: false` is reported,
    // and delivery continues with live messages.
    page.eval(&format!(
        "window.playground.client._subs.get({}).epoch = 'not-this-epoch'",
        json!(ch)
    ))
    .await;
    page.eval("window.playground.client.dropConnection({hold: true})")
        .await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'reconnecting'",
        "the second drop",
    )
    .await;
    let lost = rest_publish(&server, &key, ch, "lost", json!({})).await;
    page.eval("window.playground.client.resumeReconnect()")
        .await;
    page.wait_for(
        "document.getElementById('log').textContent.includes('recovered: false')",
        "the page to report recovered: false",
    )
    .await;
    let after = rest_publish(&server, &key, ch, "after", json!({})).await;
    page.wait_for(
        &format!("!!document.querySelector('#messages li.msg[data-offset=\"{after}\"]')"),
        "a live message after recovered: false",
    )
    .await;
    let rows = page.rows().await;
    assert!(rows.iter().all(|r| r.offset != lost), "{rows:?}");
    let last = rows.last().expect("rows");
    assert_eq!((last.event.as_str(), last.seq), ("after", 1), "{rows:?}");

    // Disconnect and connect again with the buttons: the subscription is kept and resumed with
    // `since`, so a message published while disconnected still arrives.
    page.click("disconnect").await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'closed'",
        "the page to disconnect",
    )
    .await;
    let offline = rest_publish(&server, &key, ch, "while-offline", json!({})).await;
    page.click("connect").await;
    page.wait_for(
        &format!("!!document.querySelector('#messages li.msg[data-offset=\"{offline}\"]')"),
        "the message published while disconnected, after connecting again",
    )
    .await;
    // The client's heartbeat request (used to detect a dead link) is answered.
    let hb = page
        .eval("window.playground.client.request('heartbeat', {}).then(r => typeof r.timestamp)")
        .await;
    assert_eq!(hb, json!("string"));

    // Unsubscribe from the list: nothing more arrives.
    page.eval("document.querySelector('#subs li button.unsubscribe').click()")
        .await;
    page.wait_for(
        "document.querySelectorAll('#subs li').length === 0",
        "the subscription list to empty",
    )
    .await;
    let n = page.rows().await.len();
    let _ = rest_publish(&server, &key, ch, "after-unsubscribe", json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(page.rows().await.len(), n, "a message after unsubscribe");

    anonymous_viewer(&page, &server, &key).await;

    assert_no_page_errors(&page);

    drop(page);
    drop(browser);
    drop(server);
}

/// SPEC 14 in the browser: with the token field empty the page connects without `auth`, and a
/// public channel shows its current board at once (rewind_default), then what follows.
async fn anonymous_viewer(page: &Page, server: &Server, key: &str) {
    let board = "e2e-board/1";
    let first = rest_publish(server, key, board, "board", json!({"v": 1})).await;
    page.click("disconnect").await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'closed'",
        "the page to disconnect",
    )
    .await;
    page.set_value("token", "").await;
    page.click("connect").await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'connected'",
        "the page to connect without a token",
    )
    .await;
    page.wait_for(
        "Array.from(document.querySelectorAll('#log li'))\
         .some(l => l.textContent.includes('connected (anonymous)'))",
        "the log to say the connection is anonymous",
    )
    .await;
    page.set_value("channel", board).await;
    page.click("subscribe").await;
    page.wait_for(
        &format!("!!document.querySelector('#messages li.msg[data-channel=\"{board}\"][data-offset=\"{first}\"]')"),
        "the rewound publication: the current board",
    )
    .await;
    let next = rest_publish(server, key, board, "board", json!({"v": 2})).await;
    page.wait_for(
        &format!("!!document.querySelector('#messages li.msg[data-channel=\"{board}\"][data-offset=\"{next}\"]')"),
        "the next publication on the public channel",
    )
    .await;
    assert_eq!(rows_on(&page.rows().await, board).len(), 2);
}

/// A member of `chat/*` named `name` (`info.username`; its `sub` is `u-<name>`).
fn chat_token(server: &Server, name: &str) -> String {
    TokenSpec::new(&server.secret, &format!("u-{name}"))
        .channels(&["chat/*"])
        .scope(&["subscribe", "publish", "presence"])
        .info(json!({ "username": name }))
        .mint()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_shows_presence_in_headless_chromium() {
    common::within(Duration::from_secs(60), "the presence test", presence()).await;
}

/// SPEC 16 in the browser: the page, subscribed with a token that has the `presence` scope,
/// lists who is in the channel; another client's join and leave update the list, its WebSocket
/// publication shows its sender, and a join the snapshot already holds is not applied again.
async fn presence() {
    let config = "playground = true\n\
                  [[channels]]\npattern = \"chat/*\"\npresence = true\njoin_leave = true\n";
    let server = Server::start(ServerOpts {
        config_toml: Some(config.into()),
        ..ServerOpts::shards(2)
    });
    let browser = Chromium::launch();
    let page = Page::open(&browser, &server).await;
    let ch = "chat/room";
    connect_and_subscribe(&page, &server, &chat_token(&server, "alice"), ch).await;
    let members = members_shown(ch);
    let shows = |want: &str| format!("{members} === {}", json!(want));
    page.wait_for(
        &shows("u-alice=alice"),
        "the page's own user as the only member",
    )
    .await;

    let mut bob = Ws::connect(server.public).await;
    bob.auth_ok(&chat_token(&server, "bob")).await;
    bob.subscribe(ch).await;
    page.wait_for(&shows("u-alice=alice,u-bob=bob"), "bob in the member list")
        .await;
    let count = "document.querySelector('#subs .members .count').textContent";
    assert_eq!(page.eval(count).await, json!("2 here:"));
    let client_members = format!(
        "window.playground.client.members({}).map(m => m.user).sort().join(',')",
        json!(ch)
    );
    assert_eq!(page.eval(&client_members).await, json!("u-alice,u-bob"));

    let publish = json!({"channel": ch, "event": "message", "payload": "Hello everyone!"});
    bob.call("publish", publish).await;
    let sender = "(document.querySelector('#messages li.msg[data-from=\"u-bob\"] .from b') || {}).textContent";
    assert_eq!(
        page.wait_for(sender, "bob's message with its sender").await,
        json!("bob")
    );

    // A join at or below the snapshot's version is old news: not applied, not shown.
    page.eval(&stale_join(ch)).await;
    drop(bob);
    page.wait_for(&shows("u-alice=alice"), "bob gone from the member list")
        .await;
    assert_eq!(page.eval(count).await, json!("1 here:"));
    let log = page.text("log").await;
    for line in ["bob joined chat/room", "bob left chat/room"] {
        assert_eq!(
            log.matches(line).count(),
            1,
            "{line} once in the log: {log}"
        );
    }
    assert!(!log.contains("ghost"), "a stale join was shown: {log}");

    // The presence method answers the same, and its answer is the snapshot.
    let r = page
        .eval(&format!(
            "window.playground.client.presence({}).then(r => r.members.map(m => m.user).join(',') + '/' + r.count)",
            json!(ch)
        ))
        .await;
    assert_eq!(r, json!("u-alice/1"));
    assert_eq!(page.eval(&client_members).await, json!("u-alice"));
    assert_no_page_errors(&page);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_compresses_in_headless_chromium() {
    common::within(
        Duration::from_secs(60),
        "the compression test",
        compression(),
    )
    .await;
}

/// SPEC 20 with the browser's own permessage-deflate: `/client.js` receives a 64 kB scoreboard
/// the server sent compressed, byte for byte, and Chromium's compressed publications (two, so a
/// compressor that kept its window across messages would be caught) reach another subscriber
/// intact.
async fn compression() {
    let config = "playground = true\n[limits]\nmax_payload_bytes = 100000\n\
                  max_frame_bytes = 131072\noutbound_buffer_bytes = 4194304\n";
    let server = Server::start(ServerOpts {
        config_toml: Some(config.into()),
        ..ServerOpts::shards(2)
    });
    let browser = Chromium::launch();
    let page = Page::open(&browser, &server).await;
    connect_and_subscribe(&page, &server, &server.token_all("viewer"), "board").await;
    page.eval(
        "window.boards = []; window.playground.client.on('broadcast', m => { \
         if (m.channel === 'board') window.boards.push(JSON.stringify(m.payload)); }); true",
    )
    .await;
    page.wait_for(
        "window.playground.client.position('board').active",
        "the board subscription",
    )
    .await;
    let board = common::scoreboard(64_000, 1);
    server.publish("board", "scoreboard", &board).await;
    page.wait_for("window.boards.length === 1", "the scoreboard")
        .await;
    assert_eq!(page.eval("window.boards[0]").await, json!(board));
    let metrics = common::http_get(server.public, "/metrics").await.text();
    let after = common::metric_sum(&metrics, "compression_bytes_after_total").unwrap_or(0.0);
    let before = common::metric_sum(&metrics, "compression_bytes_before_total").unwrap_or(0.0);
    assert!(
        before >= 64_000.0 && after * 4.0 < before,
        "sent compressed to the page: {before} -> {after}"
    );

    let mut reader = server.ws_authed("reader").await;
    reader.subscribe("up").await;
    page.eval(
        "(async () => { for (const n of [1, 2]) \
         await window.playground.client.publish('up', 'pad', {n, pad: 'x'.repeat(20000)}); \
         return true; })()",
    )
    .await;
    for n in 1..=2 {
        let frame = reader.recv_broadcast_raw().await;
        let sent = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(20000));
        assert_eq!(common::raw_payload(&frame), sent);
    }
    assert_no_page_errors(&page);
}

/// JS: hands the page's client a join of `u-ghost` with version 1, as a server re-sending an
/// event the snapshot already holds would.
fn stale_join(channel: &str) -> String {
    format!(
        "window.playground.client._onMessage(JSON.stringify({{method: 'join', params: \
         {{channel: {}, user: 'u-ghost', info: {{username: 'ghost'}}, version: 1}}}})); true",
        json!(channel)
    )
}

/// JS: `sub=name` of every member the page lists for `channel`, sorted, joined by commas.
fn members_shown(channel: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('#subs li[data-channel={q}] .member'))\
         .map(m => m.dataset.user + '=' + m.textContent).sort().join(',')",
        q = json!(channel).to_string().replace('"', "\\\"")
    )
}

/// Opens the playground, connects with `token` from the form and subscribes to `channel`.
async fn connect_and_subscribe(page: &Page, server: &Server, token: &str, channel: &str) {
    page.navigate(&format!("http://{}/", server.public)).await;
    page.set_value("token", token).await;
    page.click("connect").await;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'connected'",
        "the page to connect",
    )
    .await;
    page.set_value("channel", channel).await;
    page.click("subscribe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_follows_the_backend_in_headless_chromium() {
    common::within(
        Duration::from_secs(60),
        "the backend test",
        backend_decides(),
    )
    .await;
}

/// SPEC 17 and 22.1 in the browser: what `/client.js` and the page do when the server ends a
/// subscription or closes with 4006 or 4007.
async fn backend_decides() {
    let server = Server::start(ServerOpts {
        config_toml: Some("playground = true\n".into()),
        ..ServerOpts::shards(2)
    });
    let browser = Chromium::launch();
    let page = Page::open(&browser, &server).await;
    server_unsubscribes(&page, &server).await;
    revoked_and_disconnected(&page).await;
    assert_no_page_errors(&page);
}

/// JS: whether the page's log holds `text`.
fn log_has(text: &str) -> String {
    format!(
        "document.getElementById('log').textContent.includes({})",
        json!(text)
    )
}

const CONNECTED: &str = "document.getElementById('status').dataset.state === 'connected'";

/// JS: records every frame the page's WebSockets send in `window.sent`.
const RECORD_SENT: &str = "(() => { if (!window.sent) { window.sent = []; \
    const send = WebSocket.prototype.send; \
    WebSocket.prototype.send = function (d) { window.sent.push(d); return send.call(this, d); }; } \
    return true; })()";

/// Two subscriptions ended by the server: `cut` by a re-auth with a token that no longer
/// allows it (`unsubscribed`, reason "permission"), `gone` by the backend's `POST /unsubscribe`
/// (reason "server"). Each is logged with its reason and leaves the list, and after a reconnect
/// only `keep` is subscribed again: `gone`'s publications no longer reach the page.
async fn server_unsubscribes(page: &Page, server: &Server) {
    let token = |channels: &[&str]| server.token("u-page", channels, &["subscribe"]);
    connect_and_subscribe(page, server, &token(&["keep", "gone", "cut"]), "keep").await;
    for ch in ["gone", "cut"] {
        let js = format!(
            "window.playground.client.subscribe({}).then(() => true)",
            json!(ch)
        );
        page.eval(&js).await;
    }
    let all =
        "['keep', 'gone', 'cut'].every(c => (window.playground.client.position(c) || {}).active)";
    page.wait_for(all, "three subscriptions").await;
    page.eval(RECORD_SENT).await;

    let narrower = json!(token(&["keep", "gone"]));
    let reauth = format!("window.playground.client.setToken({narrower}).then(() => true)");
    page.eval(&reauth).await;
    let cut = "unsubscribed from cut by the server (permission); not resubscribed";
    page.wait_for(&log_has(cut), "the page to log cut's unsubscribed")
        .await;
    let body = json!({"user": "u-page", "channel": "gone"}).to_string();
    let r = http_post_key(server.backend(), "/unsubscribe", common::API_KEY, &body).await;
    assert_eq!(r.json(), json!({"subscriptions": 1}), "{}", r.text());
    let gone = "unsubscribed from gone by the server (server); not resubscribed";
    page.wait_for(&log_has(gone), "the page to log gone's unsubscribed")
        .await;
    let listed =
        "Array.from(document.querySelectorAll('#subs li')).map(l => l.dataset.channel).join(',')";
    assert_eq!(page.eval(listed).await, json!("keep"));
    assert_eq!(
        page.eval("window.playground.client.channels().join(',')")
            .await,
        json!("keep")
    );

    page.eval("window.sent.length = 0; window.playground.client.dropConnection()")
        .await;
    page.wait_for(
        &log_has("resubscribed to keep"),
        "the resubscribe after the drop",
    )
    .await;
    server.publish("gone", "e", "1").await;
    server.publish("keep", "e", "2").await;
    page.wait_for(
        "!!document.querySelector('#messages li.msg[data-channel=\"keep\"]')",
        "keep's publication",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = page.rows().await;
    assert!(rows.iter().all(|r| r.channel == "keep"), "{rows:?}");
    let subscribed = "window.sent.map(f => JSON.parse(f)).filter(m => m.method === 'subscribe')\
                      .map(m => m.params.channel).join(',')";
    assert_eq!(page.eval(subscribed).await, json!("keep"));
}

/// Against the stand-in server: a close 4006 is reconnected with `since`; a 4007 is not, the
/// page says the token was revoked, and `setToken` with a new one connects again.
async fn revoked_and_disconnected(page: &Page) {
    let mut fake = fake_server::start().await;
    let js = format!(
        "window.playground.client.disconnect(); window.playground.client.connect({}, 't1'); true",
        json!(fake.ws_url())
    );
    page.eval(&js).await;
    let mut ws = fake.next_conn("the page's connection").await;
    let s = accept_session(&mut ws, 1).await;
    assert_eq!(s.auth, json!({"token": "t1"}));
    assert_eq!(s.subscribes[0]["channel"], json!("keep"));
    page.wait_for(CONNECTED, "the page to connect to the stand-in")
        .await;
    let resumed = json!({"channel": "keep", "since": {"offset": 7, "epoch": "e1"}});

    close_with(ws, 4006, "maintenance").await;
    let lost = "connection lost (4006 disconnected by the backend: maintenance); reconnecting in";
    page.wait_for(&log_has(lost), "the page to log the 4006")
        .await;
    let mut ws = fake.next_conn("a reconnect after 4006").await;
    let again = accept_session(&mut ws, 1).await.subscribes;
    assert_eq!(again, std::slice::from_ref(&resumed));
    page.wait_for(CONNECTED, "the page to reconnect after 4006")
        .await;

    close_with(ws, 4007, "token revoked").await;
    page.wait_for(
        &log_has("the token was revoked"),
        "the page to say the token was revoked",
    )
    .await;
    assert!(
        truthy(
            &page
                .eval(&log_has("disconnected (4007 token revoked: token revoked)"))
                .await
        ),
        "{}",
        page.diagnostics().await
    );
    assert_eq!(
        page.eval("window.playground.client.state").await,
        json!("closed")
    );
    assert!(page.text("token-hint").await.contains("revoked"));
    // Well past the first backoff (at most 500 ms): the revoked token is not tried again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!fake.has_conn(), "the client reconnected after 4007");

    page.eval("window.playground.client.setToken('t2'); true")
        .await;
    let mut ws = fake.next_conn("a connection with the new token").await;
    let s = accept_session(&mut ws, 1).await;
    assert_eq!(s.auth, json!({"token": "t2"}));
    assert_eq!(s.subscribes, [resumed]);
    page.wait_for(CONNECTED, "the page to connect with the new token")
        .await;
    assert!(!page.text("token-hint").await.contains("revoked"));
    page.eval("window.playground.client.disconnect(); true")
        .await;
}

/// No script error (exception or `console.error`) was logged on the page.
fn assert_no_page_errors(page: &Page) {
    let errors: Vec<String> = page
        .cdp
        .console
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("exception") || l.starts_with("console.error"))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "page errors: {errors:?}");
}

/// An `EventSource` page (SPEC 19): the server closes its stream (`/disconnect`, close event
/// 4006), the browser reconnects by itself after the stream's `retry` with `Last-Event-ID`, and
/// the page ends up with every message once, in order, the ones published during the gap
/// included, each channel's `subscribed` saying `recovered: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_resumes_in_headless_chromium() {
    common::within(
        Duration::from_secs(60),
        "the EventSource test",
        event_source(),
    )
    .await;
}

async fn event_source() {
    let server = Server::start(ServerOpts {
        config_toml: Some("playground = true\n[sse]\nretry = \"500ms\"\n".into()),
        ..ServerOpts::shards(2)
    });
    let key = server.api_key.clone();
    let token = server.token("es-user", &["es/*"], &["subscribe"]);
    let browser = Chromium::launch();
    let page = Page::open(&browser, &server).await;
    page.navigate(&format!("http://{}/", server.public)).await;
    let js = format!(
        "window.sse = {{subs: [], got: [], closes: [], opens: 0}};
         const es = new EventSource('/sse?channel=es/a&channel=es/b&token={token}');
         es.onopen = () => sse.opens++;
         es.addEventListener('subscribed', e => sse.subs.push(JSON.parse(e.data)));
         es.addEventListener('broadcast', e => {{
             const d = JSON.parse(e.data);
             sse.got.push([d.channel, d.payload, e.lastEventId]);
         }});
         es.addEventListener('close', e => sse.closes.push(JSON.parse(e.data)));
         window.es = es; true"
    );
    page.eval(&js).await;
    page.wait_for("sse.subs.length === 2", "both subscribed events")
        .await;
    for (channel, n) in [("es/a", 1), ("es/b", 2), ("es/a", 3)] {
        rest_publish(&server, &key, channel, "e", json!(n)).await;
    }
    page.wait_for("sse.got.length === 3", "the first three broadcasts")
        .await;
    let r = http_post_key(
        server.public,
        "/disconnect",
        &key,
        &json!({"user": "es-user"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // During the browser's 500 ms wait before it reconnects.
    for (channel, n) in [("es/b", 4), ("es/a", 5), ("es/b", 6)] {
        rest_publish(&server, &key, channel, "e", json!(n)).await;
    }
    page.wait_for(
        "sse.subs.length === 4 && sse.got.length === 6",
        "the reconnect and the missed broadcasts",
    )
    .await;
    rest_publish(&server, &key, "es/a", "e", json!(7)).await;
    page.wait_for(
        "sse.got.length === 7",
        "a live broadcast after the reconnect",
    )
    .await;
    let state = page.eval("sse").await;
    assert_eq!(state["closes"], json!([{"code": 4006}]), "{state}");
    assert_eq!(state["opens"], json!(2), "one reconnect: {state}");
    for sub in &state["subs"].as_array().unwrap()[2..] {
        assert_eq!(sub["recovered"], json!(true), "{state}");
    }
    let got = state["got"].as_array().unwrap();
    let on = |c: &str| -> Vec<u64> {
        got.iter()
            .filter(|g| g[0] == json!(c))
            .map(|g| g[1].as_u64().unwrap())
            .collect()
    };
    assert_eq!(on("es/a"), [1, 3, 5, 7], "{state}");
    assert_eq!(on("es/b"), [2, 4, 6], "{state}");
    assert_no_page_errors(&page);
}
