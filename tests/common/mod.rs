//! Test harness shared by the integration tests: it runs the real `broadcaster` binary on
//! `127.0.0.1:0`, mints client tokens, and talks to the server the way real clients do (a
//! WebSocket client library, a raw RFC 6455 socket, a tiny HTTP/1.1 client).
//!
//! Every wait is bounded by a timeout so that a broken server fails a test instead of hanging it.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub mod redis_proc;
pub mod sse;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The default bound on any single wait for the server.
pub const T: Duration = Duration::from_secs(5);

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const API_KEY: &str = "test-key-one";
pub const API_KEY_2: &str = "test-key-two";

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("its address").port()
}

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_broadcaster")
}

/// Awaits `fut` for at most `d`, panicking with `what` when it takes longer.
pub async fn within<F: std::future::Future>(d: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(d, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?}: {what}"),
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs() as i64
}

/// Raises the soft file-descriptor limit to the hard one, so that tests (and the server, which
/// inherits it) can hold a thousand connections.
pub fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

pub struct ServerOpts {
    pub shards: usize,
    /// Extra environment variables (limits and the like), applied after the defaults below.
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments after `serve ...`.
    pub args: Vec<String>,
    /// `Some(addr)` passes `--listen addr`; `None` passes no `--listen` flag.
    pub listen: Option<String>,
    /// Passes `--admin-listen 127.0.0.1:0` and waits for the admin listening line too.
    pub admin: bool,
    /// Sets BROADCASTER_AUTH_JWT_SECRET (None: dev mode, unless the config file sets one).
    pub secret: Option<String>,
    /// Sets BROADCASTER_AUTH_API_KEYS as a comma list (empty: not set).
    pub api_keys: Vec<String>,
    /// Written to a temporary file passed with `--config`.
    pub config_toml: Option<String>,
    /// Runs the bare binary (no `serve` subcommand and no flags at all).
    pub bare: bool,
    /// Caps the server's open files (soft and hard limit), to run it out of descriptors.
    pub nofile: Option<u64>,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            shards: 2,
            env: Vec::new(),
            args: Vec::new(),
            listen: Some("127.0.0.1:0".into()),
            admin: false,
            secret: Some(SECRET.into()),
            api_keys: vec![API_KEY.into(), API_KEY_2.into()],
            config_toml: None,
            nofile: None,
            bare: false,
        }
    }
}

impl ServerOpts {
    pub fn shards(n: usize) -> Self {
        ServerOpts {
            shards: n,
            ..Default::default()
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique temporary path for this test process.
pub fn temp_path(suffix: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "broadcaster-test-{}-{}{}",
        std::process::id(),
        n,
        suffix
    ))
}

/// Makes the kernel kill the server if the test thread that started it dies without running
/// `Drop` (an aborted test binary must not leave servers behind).
pub fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the new process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Removes every `BROADCASTER_*` variable the test process might have inherited, so the
/// server sees only what a test sets.
pub fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("BROADCASTER_") {
            cmd.env_remove(&k);
        }
    }
}

/// `clean_env` for a tokio command.
pub fn clean_tokio_env(cmd: &mut tokio::process::Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("BROADCASTER_") {
            cmd.env_remove(&k);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `broadcaster connect` as a child process
// ---------------------------------------------------------------------------------------------

/// The lines a child printed so far.
pub type Lines = Arc<Mutex<Vec<String>>>;

/// A running `broadcaster connect`, its stdout and stderr lines collected as they come.
pub struct Cli {
    pub child: tokio::process::Child,
    pub out: Lines,
    pub err: Lines,
    /// The reader of stderr: done once the child closed it.
    err_read: tokio::task::JoinHandle<()>,
}

/// `broadcaster connect --url URL --token T --channel C...` with stdin held open (its end
/// would end the client).
pub fn spawn_cli(url: &str, token: &str, channels: &[&str]) -> Cli {
    let mut cmd = tokio::process::Command::new(bin());
    clean_tokio_env(&mut cmd);
    cmd.args(["connect", "--url", url, "--token", token]);
    for c in channels {
        cmd.args(["--channel", c]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn connect");
    let (out, _) = lines_of(child.stdout.take().expect("stdout"));
    let (err, err_read) = lines_of(child.stderr.take().expect("stderr"));
    Cli {
        child,
        out,
        err,
        err_read,
    }
}

impl Cli {
    /// Waits for the exit; its status and all it said on stderr.
    pub async fn finish(self) -> (std::process::ExitStatus, String) {
        let mut child = self.child;
        let status = within(T, "connect to exit", child.wait())
            .await
            .expect("wait for connect");
        let _ = within(T, "connect's stderr to close", self.err_read).await;
        (status, printed(&self.err).join("\n"))
    }
}

/// Collects the lines `r` yields; the task ends when `r` does.
pub fn lines_of(
    r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Lines, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncBufReadExt;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        let mut r = tokio::io::BufReader::new(r).lines();
        while let Ok(Some(l)) = r.next_line().await {
            sink.lock().expect("lines").push(l);
        }
    });
    (lines, reader)
}

/// What `lines` holds now.
pub fn printed(lines: &Mutex<Vec<String>>) -> Vec<String> {
    lines.lock().expect("lines").clone()
}

pub struct Server {
    child: Option<Child>,
    pub public: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Every stdout line printed up to and including the listening line(s).
    pub stdout_head: Vec<String>,
    /// Stdout lines printed afterwards (collected by a thread).
    pub stdout_tail: Arc<Mutex<Vec<String>>>,
    pub stderr_path: PathBuf,
    pub secret: String,
    pub api_key: String,
    config_path: Option<PathBuf>,
}

impl Server {
    pub fn start(opts: ServerOpts) -> Server {
        Self::try_start(opts).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(opts: ServerOpts) -> Result<Server, String> {
        raise_nofile_limit();
        let mut cmd = Command::new(bin());
        clean_env(&mut cmd);
        if !opts.bare {
            cmd.arg("serve");
            if let Some(l) = &opts.listen {
                cmd.args(["--listen", l]);
            }
            cmd.args(["--shards", &opts.shards.to_string()]);
            if opts.admin {
                cmd.args(["--admin-listen", "127.0.0.1:0"]);
            }
        }
        let config_path = opts.config_toml.as_ref().map(|toml| {
            let p = temp_path(".toml");
            std::fs::write(&p, toml).expect("write config");
            p
        });
        if let Some(p) = &config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.args(&opts.args);
        if let Some(s) = &opts.secret {
            cmd.env("BROADCASTER_AUTH_JWT_SECRET", s);
        }
        if !opts.api_keys.is_empty() {
            cmd.env("BROADCASTER_AUTH_API_KEYS", opts.api_keys.join(","));
        }
        // Every test client connects from 127.0.0.1, many at once and each anonymous until its
        // auth: the per-address cap (tested on its own, with its default) would refuse them.
        cmd.env(
            "BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX",
            "1000000",
        );
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let stderr_path = temp_path(".stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        kill_with_parent(&mut cmd);
        if let Some(n) = opts.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the new process.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");

        // A thread reads stdout lines; the first ones go through a channel until the listening
        // lines were seen, everything after is kept in `stdout_tail`.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let tail2 = tail.clone();
        std::thread::spawn(move || {
            let reader = BufReader::new(stdout);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                tail2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut head = Vec::new();
        let mut public = None;
        let mut admin = None;
        loop {
            if public.is_some() && (!opts.admin || admin.is_some()) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening public=") {
                        public = Some(
                            a.trim()
                                .parse::<SocketAddr>()
                                .map_err(|e| format!("bad listening line {line:?}: {e}"))?,
                        );
                    } else if let Some(a) = line.strip_prefix("listening admin=") {
                        admin = Some(
                            a.trim()
                                .parse::<SocketAddr>()
                                .map_err(|e| format!("bad listening line {line:?}: {e}"))?,
                        );
                    }
                    head.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    return Err(format!(
                        "no listening line (exit {status:?}); stdout: {head:?}; stderr: {}",
                        last_chars(&err, 3000)
                    ));
                }
            }
        }
        // From here on the lines are in `tail` (the head lines too; drop those).
        {
            let mut t = tail.lock().unwrap();
            let n = head.len().min(t.len());
            t.drain(..n);
        }
        Ok(Server {
            child: Some(child),
            public: public.unwrap(),
            admin,
            stdout_head: head,
            stdout_tail: tail,
            stderr_path,
            secret: opts.secret.unwrap_or_default(),
            api_key: opts.api_keys.first().cloned().unwrap_or_default(),
            config_path,
        })
    }

    /// Where the backend endpoints live: the admin listener if there is one.
    pub fn backend(&self) -> SocketAddr {
        self.admin.unwrap_or(self.public)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("child").id() as i32
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, d: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + d;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "server did not exit within {d:?}; stderr: {}",
                    last_chars(&self.stderr(), 2000)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A token for this server's secret with the given channels and scopes, valid for an hour.
    pub fn token(&self, sub: &str, channels: &[&str], scope: &[&str]) -> String {
        TokenSpec::new(&self.secret, sub)
            .channels(channels)
            .scope(scope)
            .mint()
    }

    /// A token for every channel with both scopes.
    pub fn token_all(&self, sub: &str) -> String {
        self.token(sub, &["*"], &["subscribe", "publish"])
    }

    /// A WebSocket connection authenticated with `token_all(sub)`.
    pub async fn ws_authed(&self, sub: &str) -> Ws {
        let mut ws = Ws::connect(self.public).await;
        ws.auth_ok(&self.token_all(sub)).await;
        ws
    }

    /// POST /publish with the raw JSON text of the payload; returns the parsed 200 answer.
    pub async fn publish(&self, channel: &str, event: &str, payload_raw: &str) -> Value {
        let body = publish_body(channel, event, payload_raw);
        let r = http_request(
            self.backend(),
            "POST",
            "/publish",
            &[("Authorization", &format!("Bearer {}", self.api_key))],
            Some(body.as_bytes()),
        )
        .await;
        assert_eq!(r.status, 200, "publish answered {}: {}", r.status, r.text());
        r.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
        if let Some(p) = &self.config_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn last_chars(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A broadcast notification, told by its first bytes: its payload may hold JSON that
/// serde_json's `Value` cannot hold (`1e400`, unpaired surrogate escapes).
pub fn is_broadcast(frame: &str) -> bool {
    frame.starts_with(r#"{"method":"broadcast","params":{"#)
}

/// The payload's text in a broadcast frame, exactly as the server wrote it (it is the last
/// member of the params).
pub fn raw_payload(frame: &str) -> &str {
    let at = frame
        .find(r#","payload":"#)
        .unwrap_or_else(|| panic!("no payload in {frame}"));
    let rest = &frame[at + r#","payload":"#.len()..];
    rest.strip_suffix("}}")
        .unwrap_or_else(|| panic!("broadcast does not end with its payload: {frame}"))
}

/// A JSON scoreboard of about `bytes` bytes, like a contest's (rows of user, score, penalty).
pub fn scoreboard(bytes: usize, round: u32) -> String {
    let mut rows = Vec::new();
    let mut len = 0;
    let mut i = 0u32;
    while len < bytes {
        let row = format!(
            r#"{{"rank":{i},"user":"contestant_{i}","score":{},"penalty":{},"problems":[{}]}}"#,
            (i * 37 + round) % 1000,
            (i * 13) % 500,
            (0..8)
                .map(|p| ((i + p + round) % 3).to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        len += row.len() + 1;
        rows.push(row);
        i += 1;
    }
    format!(r#"{{"round":{round},"rows":[{}]}}"#, rows.join(","))
}

/// The reference inflater (flate2's `Read` adapter) over a message's payload and the four bytes
/// RFC 7692 drops.
pub fn inflate_message(payload: &[u8]) -> Vec<u8> {
    let mut stream = payload.to_vec();
    stream.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    // No final block in the stream: the reader stops with an early-EOF error after the data.
    let _ = std::io::Read::read_to_end(
        &mut flate2::read::DeflateDecoder::new(&stream[..]),
        &mut out,
    );
    out
}

/// Payloads that are valid JSON (RFC 8259) and that a re-encoder or simd-json alone would
/// change or refuse: integers beyond 64 bits, exponents beyond f64, negative zero, spacing, key
/// order, escapes, unpaired surrogate escapes, long strings, deep nesting within the bound.
pub fn hard_payloads() -> Vec<String> {
    let mut v: Vec<String> = [
        r#"{"i":1,"big":123456789012345678901234567890}"#,
        r#"[-123456789012345678901234567890,18446744073709551616,-9223372036854775809]"#,
        r#"{"e":[1e400,-1e400,1e-400,1.7976931348623159e308,1E+2,0e0],"n":1.0e10}"#,
        r#"[-0,-0.0,0.1234567890123456789012345678901234567890123456789]"#,
        "{ \"b\" : 1 ,\t\"a\":[ 2 ,3 ]\n}",
        r#""\u00e9\ud83d\ude00\/\b\f\n\r\t\"\\\u0000""#,
        r#"{"cut inside an emoji":"\ud83d","low alone":"\udc00"}"#,
        "\"é😀\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!(r#""{}""#, "\\u00e9x".repeat(3000)));
    // 1024 levels in all for a WebSocket publish: its envelope takes two.
    v.push(format!("{}{}", "[".repeat(1000), "]".repeat(1000)));
    v
}

/// The body of a publish request, with the payload inserted as raw JSON text.
pub fn publish_body(channel: &str, event: &str, payload_raw: &str) -> String {
    format!(
        "{{\"channel\":{},\"event\":{},\"payload\":{}}}",
        json!(channel),
        json!(event),
        payload_raw
    )
}

/// Runs the binary with `args` (no server expected to stay up) and returns its output.
pub async fn run_cli(args: &[&str], env: &[(&str, &str)], d: Duration) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("BROADCASTER_") {
            cmd.env_remove(&k);
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn broadcaster");
    within(
        d,
        &format!("broadcaster {args:?} to exit"),
        child.wait_with_output(),
    )
    .await
    .expect("wait for broadcaster")
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub enum Alg {
    HS256,
    HS384,
    None,
}

/// A client token to mint; every claim can be left out or replaced.
#[derive(Clone)]
pub struct TokenSpec {
    pub secret: String,
    pub alg: Alg,
    pub sub: Option<String>,
    pub aud: Option<Value>,
    /// Absolute expiry (seconds since the epoch).
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub channels: Option<Vec<String>>,
    pub scope: Option<Vec<String>>,
    /// The `info` claim (SPEC 16).
    pub info: Option<Value>,
    /// The `jti` claim (SPEC 17: revocable by it).
    pub jti: Option<String>,
}

impl TokenSpec {
    pub fn new(secret: &str, sub: &str) -> Self {
        TokenSpec {
            secret: secret.into(),
            alg: Alg::HS256,
            sub: Some(sub.into()),
            aud: Some(json!("broadcaster")),
            exp: Some(now_secs() + 3600),
            iat: Some(now_secs()),
            channels: Some(vec!["*".into()]),
            scope: Some(vec!["subscribe".into(), "publish".into()]),
            info: None,
            jti: None,
        }
    }

    pub fn jti(mut self, jti: &str) -> Self {
        self.jti = Some(jti.into());
        self
    }

    /// Issued at `iat` (seconds since the epoch).
    pub fn issued_at(mut self, iat: i64) -> Self {
        self.iat = Some(iat);
        self
    }

    pub fn info(mut self, info: Value) -> Self {
        self.info = Some(info);
        self
    }

    pub fn channels(mut self, c: &[&str]) -> Self {
        self.channels = Some(c.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn scope(mut self, s: &[&str]) -> Self {
        self.scope = Some(s.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn exp_in(mut self, secs: i64) -> Self {
        self.exp = Some(now_secs() + secs);
        self
    }

    pub fn claims(&self) -> Value {
        let mut m = serde_json::Map::new();
        if let Some(s) = &self.sub {
            m.insert("sub".into(), json!(s));
        }
        if let Some(a) = &self.aud {
            m.insert("aud".into(), a.clone());
        }
        if let Some(e) = self.exp {
            m.insert("exp".into(), json!(e));
        }
        if let Some(i) = self.iat {
            m.insert("iat".into(), json!(i));
        }
        if let Some(c) = &self.channels {
            m.insert("authorizedChannels".into(), json!(c));
        }
        if let Some(s) = &self.scope {
            m.insert("scope".into(), json!(s));
        }
        if let Some(i) = &self.info {
            m.insert("info".into(), i.clone());
        }
        if let Some(j) = &self.jti {
            m.insert("jti".into(), json!(j));
        }
        Value::Object(m)
    }

    pub fn mint(&self) -> String {
        let claims = self.claims();
        match self.alg {
            Alg::HS256 | Alg::HS384 => {
                let alg = match self.alg {
                    Alg::HS256 => jsonwebtoken::Algorithm::HS256,
                    _ => jsonwebtoken::Algorithm::HS384,
                };
                jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(alg),
                    &claims,
                    &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
                )
                .expect("encode token")
            }
            Alg::None => {
                let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
                let body = base64url(claims.to_string().as_bytes());
                format!("{header}.{body}.")
            }
        }
    }
}

pub fn base64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes and verifies an HS256 client token with `secret`, returning its claims.
pub fn decode_token(token: &str, secret: &str) -> Result<Value, String> {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["broadcaster"]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &v,
    )
    .map(|d| d.claims)
    .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Checks on values
// ---------------------------------------------------------------------------------------------

/// RFC 3339 date-time in UTC (`Z` or `+00:00`), optional fraction.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_digit());
    if !(digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    let rest = &s[i..];
    let month: u32 = s[5..7].parse().unwrap();
    let day: u32 = s[8..10].parse().unwrap();
    let hour: u32 = s[11..13].parse().unwrap();
    let min: u32 = s[14..16].parse().unwrap();
    let sec: u32 = s[17..19].parse().unwrap();
    (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && min < 60
        && sec < 61
        && (rest == "Z" || rest == "z" || rest == "+00:00")
}

/// Asserts that `resp` is a success response to request `id` and returns its result.
#[track_caller]
pub fn ok_result(resp: &Value, id: &Value) -> Value {
    assert_eq!(&resp["requestId"], id, "requestId of {resp}");
    assert!(
        resp.get("error").is_none(),
        "expected a result, got an error: {resp}"
    );
    resp.get("result")
        .unwrap_or_else(|| panic!("no result in {resp}"))
        .clone()
}

/// Asserts that `resp` is an error response with `code` to request `id`.
#[track_caller]
pub fn assert_error(resp: &Value, id: &Value, code: &str) {
    assert_eq!(&resp["requestId"], id, "requestId of {resp}");
    assert!(
        resp.get("result").is_none(),
        "expected error {code}, got a result: {resp}"
    );
    assert_eq!(resp["error"]["code"], json!(code), "error code of {resp}");
    assert!(
        resp["error"]["message"].is_string(),
        "error message must be a string: {resp}"
    );
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (a real client library)
// ---------------------------------------------------------------------------------------------

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What ended a connection, as seen by the client.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// A close frame with this code (None: a close frame without a code).
    Close(Option<u16>),
    /// The TCP connection ended without a close frame (EOF or reset).
    Dropped(String),
}

pub struct Ws {
    pub stream: WsStream,
    /// Broadcast notifications that arrived while waiting for a response, as raw text.
    pub pending: VecDeque<String>,
    next_id: i64,
    /// Pings received from the server.
    pub pings: usize,
}

impl Ws {
    pub async fn connect(addr: SocketAddr) -> Ws {
        Self::try_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("WebSocket connect to {addr}: {e}"))
    }

    pub async fn try_connect(
        addr: SocketAddr,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let req = format!("ws://{addr}/ws").into_client_request()?;
        Self::connect_request(req).await
    }

    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let (stream, _resp) = within(T, "WebSocket handshake", async {
            tokio_tungstenite::connect_async(req).await
        })
        .await?;
        Ok(Ws::from_stream(stream))
    }

    /// A client over a stream already past its handshake.
    pub fn from_stream(stream: WsStream) -> Ws {
        Ws {
            stream,
            pending: VecDeque::new(),
            next_id: 1,
            pings: 0,
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        within(T, "send", self.stream.send(Message::text(text.to_string())))
            .await
            .expect("send text frame");
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        within(T, "send", self.stream.send(Message::binary(data.to_vec())))
            .await
            .expect("send binary frame");
    }

    /// The next text frame's raw text (pings are answered by the library and counted).
    pub async fn recv_text(&mut self) -> String {
        self.recv_text_within(T).await
    }

    pub async fn recv_text_within(&mut self, d: Duration) -> String {
        match self.try_recv_text(d).await {
            Ok(Some(t)) => t,
            Ok(None) => panic!("no text frame within {d:?}"),
            Err(e) => panic!("connection ended while waiting for a text frame: {e:?}"),
        }
    }

    /// Ok(None) on timeout; Err when the connection ended.
    pub async fn try_recv_text(&mut self, d: Duration) -> Result<Option<String>, Ended> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Ok(None),
                Ok(n) => n,
            };
            match next {
                Some(Ok(Message::Text(t))) => return Ok(Some(t.as_str().to_string())),
                Some(Ok(Message::Ping(_))) => self.pings += 1,
                Some(Ok(Message::Pong(_))) => {}
                Some(Ok(Message::Binary(b))) => panic!("server sent a binary frame: {b:?}"),
                Some(Ok(Message::Close(f))) => {
                    return Err(Ended::Close(f.map(|f| u16::from(f.code))));
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(e)) => return Err(Ended::Dropped(e.to_string())),
                None => return Err(Ended::Dropped("stream ended".into())),
            }
        }
    }

    /// Sends one request (given as raw text) and returns the next response, keeping
    /// broadcasts that arrive before it in `pending`.
    pub async fn request_raw(&mut self, text: &str) -> Value {
        self.send_text(text).await;
        self.next_response().await
    }

    /// The next non-broadcast frame, parsed.
    pub async fn next_response(&mut self) -> Value {
        loop {
            let t = self.recv_text().await;
            // Notifications (broadcasts, joins, leaves, unsubscribed) have a method; responses
            // do not.
            if t.starts_with(r#"{"method":"#) {
                self.pending.push_back(t);
                continue;
            }
            let v: Value = serde_json::from_str(&t)
                .unwrap_or_else(|e| panic!("server sent invalid JSON {t:?}: {e}"));
            return v;
        }
    }

    /// Sends `{"id":N,"method":method,"params":params}` and returns the response, which must
    /// echo N.
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"id": id, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        let resp = self.request_raw(&req.to_string()).await;
        assert_eq!(resp["requestId"], json!(id), "requestId echo in {resp}");
        resp
    }

    /// A request that must succeed; returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        let resp = self.request(method, params).await;
        ok_result(&resp, &json!(id))
    }

    /// A request that must fail with `code`.
    pub async fn call_err(&mut self, method: &str, params: Value, code: &str) {
        let id = self.next_id;
        let resp = self.request(method, params).await;
        assert_error(&resp, &json!(id), code);
    }

    pub async fn auth_ok(&mut self, token: &str) {
        let r = self.call("auth", json!({"token": token})).await;
        assert_eq!(r, json!({"success": true}));
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.call("subscribe", json!({"channel": channel})).await
    }

    /// The next broadcast notification's raw text.
    pub async fn recv_broadcast_raw(&mut self) -> String {
        if let Some(t) = self.pending.pop_front() {
            return t;
        }
        let t = self.recv_text().await;
        assert!(is_broadcast(&t), "expected a broadcast, got {t}");
        t
    }

    /// The next broadcast notification's params.
    pub async fn recv_broadcast(&mut self) -> Value {
        let t = self.recv_broadcast_raw().await;
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["method"], json!("broadcast"), "{t}");
        assert!(v.get("id").is_none(), "a notification has no id: {t}");
        assert!(
            v.get("requestId").is_none(),
            "a notification has no requestId: {t}"
        );
        v["params"].clone()
    }

    /// The next notification (broadcast, join or leave), parsed, within `d`.
    pub async fn recv_note(&mut self, d: Duration) -> Value {
        let t = match self.pending.pop_front() {
            Some(t) => t,
            None => self.recv_text_within(d).await,
        };
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("invalid JSON {t:?}: {e}"))
    }

    /// Asserts that no notification is queued and none arrives within `d`.
    pub async fn expect_no_note(&mut self, d: Duration) {
        if let Some(t) = self.pending.pop_front() {
            panic!("unexpected notification {t}");
        }
        match self.try_recv_text(d).await {
            Ok(None) => {}
            Ok(Some(t)) => panic!("unexpected frame {t}"),
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }

    /// Asserts that no broadcast arrives within `d`.
    pub async fn expect_no_broadcast(&mut self, d: Duration) {
        if let Some(t) = self.pending.pop_front() {
            panic!("unexpected broadcast {t}");
        }
        match self.try_recv_text(d).await {
            Ok(None) => {}
            Ok(Some(t)) => panic!("unexpected frame {t}"),
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }

    /// Reads until the connection ends (skipping text frames) and says how.
    pub async fn ended(&mut self, d: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv_text(left).await {
                Ok(None) => panic!("connection still open after {d:?}"),
                Ok(Some(_)) => continue,
                Err(e) => return e,
            }
        }
    }

    /// Asserts that the server closes the connection with `code` within `d`.
    pub async fn expect_close(&mut self, code: u16, d: Duration) {
        let e = self.ended(d).await;
        assert_eq!(e, Ended::Close(Some(code)), "expected close {code}");
    }

    pub async fn heartbeat_ok(&mut self) {
        let r = self.call("heartbeat", Value::Null).await;
        assert!(
            r["timestamp"].as_str().is_some_and(is_rfc3339_utc),
            "heartbeat timestamp: {r}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Raw RFC 6455 client: handcrafted frames, no automatic pongs
// ---------------------------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Encodes one frame as a client would (masked with `mask` when given).
pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push((if fin { 0x80 } else { 0 }) | (rsv & 7) << 4 | (opcode & 0xF));
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        out.push(mbit | n as u8);
    } else if n <= 0xFFFF {
        out.push(mbit | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, OP_CLOSE);
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.payload.clone()).expect("server sent invalid UTF-8")
    }
}

/// What ended a raw connection.
#[derive(Debug, PartialEq)]
pub enum RawEnd {
    Close(Option<u16>),
    Eof,
    Reset(String),
}

pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A fresh random-ish Sec-WebSocket-Key.
pub fn ws_key() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut s = base64url(&bytes).replace('-', "+").replace('_', "/");
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    s
}

pub fn expected_accept(key: &str) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

impl RawWs {
    /// Connects and completes the opening handshake, checking the 101 answer.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let stream = within(T, "TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        Self::handshake(stream, addr).await
    }

    /// Like `connect`, with a small receive buffer so the server's writes back up quickly.
    pub async fn connect_small_rcvbuf(addr: SocketAddr, bytes: u32) -> RawWs {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(bytes).unwrap();
        let stream = within(T, "TCP connect", sock.connect(addr))
            .await
            .expect("TCP connect");
        Self::handshake(stream, addr).await
    }

    async fn handshake(stream: TcpStream, addr: SocketAddr) -> RawWs {
        Self::handshake_with(stream, addr, "").await.0
    }

    /// Connects offering the extensions `offer` (`Sec-WebSocket-Extensions`); returns the
    /// connection and the 101 answer's head, whose headers say what was accepted.
    pub async fn connect_offering(addr: SocketAddr, offer: &str) -> (RawWs, String) {
        let stream = within(T, "TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        let header = format!("Sec-WebSocket-Extensions: {offer}\r\n");
        Self::handshake_with(stream, addr, &header).await
    }

    async fn handshake_with(
        mut stream: TcpStream,
        addr: SocketAddr,
        extra_headers: &str,
    ) -> (RawWs, String) {
        stream.set_nodelay(true).unwrap();
        let key = ws_key();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        within(T, "send handshake", stream.write_all(req.as_bytes()))
            .await
            .unwrap();
        let (head, rest) = read_http_head(&mut stream).await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake answered {head:?}"
        );
        let accept = header_value(&head, "sec-websocket-accept").expect("Sec-WebSocket-Accept");
        assert_eq!(accept, expected_accept(&key));
        (RawWs { stream, buf: rest }, head)
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within(T, "raw send", self.stream.write_all(bytes))
            .await
            .expect("raw send");
    }

    /// Sends bytes, ignoring errors (the server may already have closed).
    pub async fn send_raw_lossy(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(T, self.stream.write_all(bytes)).await;
    }

    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let m: [u8; 4] = rand::random();
        let f = encode_frame(fin, 0, opcode, payload, Some(m));
        self.send_raw(&f).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await;
    }

    /// Reads one frame; Err says how the connection ended instead.
    pub async fn read_frame(&mut self, d: Duration) -> Result<RawFrame, RawEnd> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut tmp = vec![0u8; 65536];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Err(_) => panic!("no frame from the server within {d:?}"),
                Ok(Ok(0)) => return Err(RawEnd::Eof),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(RawEnd::Reset(e.to_string())),
            };
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// The next frame, which must arrive within `T`.
    pub async fn frame(&mut self) -> RawFrame {
        match self.read_frame(T).await {
            Ok(f) => f,
            Err(e) => panic!("connection ended while waiting for a frame: {e:?}"),
        }
    }

    /// The next text message (pings are skipped; unfragmented server messages expected).
    pub async fn recv_text(&mut self) -> String {
        loop {
            let f = self.frame().await;
            match f.opcode {
                OP_TEXT => {
                    assert!(f.fin, "fragmented server message");
                    return f.text();
                }
                OP_PING | OP_PONG => continue,
                _ => panic!("expected a text frame, got {f:?}"),
            }
        }
    }

    /// A request over the raw socket: sends the text, returns the next non-broadcast response.
    pub async fn request(&mut self, text: &str) -> Value {
        self.send_text(text).await;
        loop {
            let t = self.recv_text().await;
            let v: Value = serde_json::from_str(&t).unwrap();
            if v.get("method") != Some(&json!("broadcast")) {
                return v;
            }
        }
    }

    /// Reads (skipping data and ping frames) until a close frame or the end of the connection.
    pub async fn ended(&mut self, d: Duration) -> RawEnd {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(f) if f.opcode == OP_CLOSE => return RawEnd::Close(f.close_code()),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    /// Asserts a close frame with `code`, then that the server ends the TCP connection.
    pub async fn expect_close(&mut self, code: u16) {
        let e = self.ended(T).await;
        assert_eq!(e, RawEnd::Close(Some(code)), "expected close {code}");
    }

    /// After a close frame: the TCP connection ends (EOF or reset) within `T`.
    pub async fn expect_eof(&mut self) {
        match self.read_frame(T).await {
            Ok(f) => panic!("frame after close: {f:?}"),
            Err(RawEnd::Eof) | Err(RawEnd::Reset(_)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// Parses one server frame from the front of `buf` (server frames must not be masked).
pub fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 7;
    let opcode = buf[0] & 0xF;
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let len7 = (buf[1] & 0x7F) as usize;
    let (len, hdr) = match len7 {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n, 2),
    };
    if buf.len() < hdr + len {
        return None;
    }
    Some((
        RawFrame {
            fin,
            rsv,
            opcode,
            payload: buf[hdr..hdr + len].to_vec(),
        },
        hdr + len,
    ))
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }

    /// Asserts the status and the REST error object `{"error":{"code":..,"message":..}}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status; body {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], json!(code), "error code in {v}");
        assert!(v["error"]["message"].is_string(), "error message in {v}");
    }
}

pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads an HTTP head (up to and including the blank line); returns it and any bytes after.
pub async fn read_http_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 8192];
    loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
            return (head, buf[pos + 4..].to_vec());
        }
        let n = within(T, "HTTP response head", stream.read(&mut tmp))
            .await
            .expect("read HTTP response");
        assert!(
            n > 0,
            "connection closed before the end of the HTTP head; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 connection that can carry several requests (keep-alive).
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    addr: SocketAddr,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> HttpConn {
        let stream = within(T, "TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        stream.set_nodelay(true).unwrap();
        HttpConn {
            stream,
            buf: Vec::new(),
            addr,
        }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str("Content-Type: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        within(T, "send HTTP request", self.stream.write_all(&bytes))
            .await
            .expect("send HTTP request");
        self.read_response().await
    }

    pub async fn read_response(&mut self) -> HttpResponse {
        within(T, "HTTP response", self.read_response_inner()).await
    }

    async fn fill(&mut self) -> usize {
        let mut tmp = vec![0u8; 65536];
        let n = self.stream.read(&mut tmp).await.unwrap_or(0);
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    async fn read_response_inner(&mut self) -> HttpResponse {
        let pos = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            if self.fill().await == 0 {
                panic!(
                    "connection closed before a complete HTTP head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
        self.buf.drain(..pos + 4);
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let chunked = header_value(&head, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = find(&self.buf, b"\r\n") {
                        break p;
                    }
                    assert!(self.fill().await > 0, "EOF in chunked body");
                };
                let size_str = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size_str:?}"));
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await > 0, "EOF in chunk");
                }
                body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            }
            body
        } else if let Some(len) = header_value(&head, "content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                assert!(self.fill().await > 0, "EOF in body");
            }
            self.buf.drain(..len).collect()
        } else {
            // No length: the body runs to the end of the connection.
            while self.fill().await > 0 {}
            std::mem::take(&mut self.buf)
        };
        HttpResponse { status, head, body }
    }

    /// True when the server closes the connection within `d` (EOF or reset).
    pub async fn closed_within(&mut self, d: Duration) -> bool {
        let mut tmp = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

/// One request on a fresh connection.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let mut c = HttpConn::connect(addr).await;
    c.send(method, path, headers, body).await
}

pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], None).await
}

/// A GET with the API key.
pub async fn http_get_key(addr: SocketAddr, path: &str, key: &str) -> HttpResponse {
    let auth = format!("Bearer {key}");
    http_request(addr, "GET", path, &[("Authorization", &auth)], None).await
}

/// A POST with the API key and a body.
pub async fn http_post_key(addr: SocketAddr, path: &str, key: &str, body: &str) -> HttpResponse {
    let auth = format!("Bearer {key}");
    http_request(
        addr,
        "POST",
        path,
        &[("Authorization", &auth)],
        Some(body.as_bytes()),
    )
    .await
}

/// A `/metrics` answer read by a Prometheus text-format parser (the `prometheus-parse` crate).
/// Panics on a line that is neither a comment, blank, nor a sample it could read, so a
/// malformed exposition fails the test that scraped it.
pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("reading a string cannot fail");
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count();
    let read: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(read, lines, "lines the parser could not read in:\n{text}");
    scrape
}

/// The sum of every sample named `name` (every shard's, or the one unlabelled sample of a
/// node-wide metric); None when the exposition has none.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    use prometheus_parse::Value as V;
    parse_metrics(text)
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| match s.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => Some(v),
            _ => None,
        })
        .reduce(|a, b| a + b)
}

/// Whether every one of the server's `shards` holds at least `n` open connections.
pub async fn every_shard_holds(s: &Server, shards: usize, n: f64) -> bool {
    let text = http_get(s.backend(), "/metrics").await.text();
    (0..shards).all(|i| {
        let label = format!("shard=\"{i}\"");
        metric_labelled(&text, "connections_active", &[&label]) >= n
    })
}

/// The sum of the samples of `name` whose labels hold every one of `labels` (`kind="x"`).
pub fn metric_labelled(text: &str, name: &str, labels: &[&str]) -> f64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads everything a std reader has (used for child pipes in the CLI tests).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// A WebSocket from `source` (an address of 127.0.0.0/8) with extra handshake headers; the
/// handshake's status when it is refused.
pub async fn ws_from(addr: SocketAddr, source: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = within(T, "connect", socket.connect(addr)).await.unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    match within(T, "handshake", tokio_tungstenite::client_async(req, tcp)).await {
        Ok((stream, _)) => Ok(Ws::from_stream(stream)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// Runs `cmd` to its end and returns what it printed, killing it after `d` (its output is read
/// as it comes, so a talkative command cannot block on a full pipe).
pub fn run_bounded(mut cmd: Command, d: Duration) -> Result<std::process::Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || read_all(out));
    let err = std::thread::spawn(move || read_all(err));
    let deadline = Instant::now() + d;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {d:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default().into_bytes(),
        stderr: err.join().unwrap_or_default().into_bytes(),
    })
}
