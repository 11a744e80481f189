//! Runs a short `fanout` (over WebSocket, compressed and SSE), `idle`, `chat`, `scoreboard`, `proxy`
//! and `presence` against the real server and checks the JSON summaries.
//!
//! The server binary is `$BROADCASTER_BIN`, else the `broadcaster` next to this crate's own binary
//! (same target directory and profile: `cargo build --workspace --bins` builds both), else
//! `target/debug/broadcaster` of this workspace. A missing binary fails the test: a load generator
//! that was never run against the server proves nothing.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SECRET: &str = "smoke-test-secret-0123456789abcdef";
const API_KEY: &str = "smoke-test-key";

struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = bytes.len().saturating_sub(4000);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }
}

fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BROADCASTER_BIN") {
        return PathBuf::from(p);
    }
    let sibling =
        PathBuf::from(env!("CARGO_BIN_EXE_broadcaster-loadtest")).with_file_name("broadcaster");
    if sibling.exists() {
        return sibling;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/broadcaster")
}

fn start_server(name: &str) -> Server {
    start_server_with(name, &[], &[])
}

/// A server started with `args` after `serve ...` and `env` besides the secret and API key.
fn start_server_with(name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
    let bin = server_bin();
    assert!(
        bin.exists(),
        "the server binary {} does not exist: build it with `cargo build --workspace --bins`, or set \
         BROADCASTER_BIN to its path",
        bin.display()
    );
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("smoke-{name}-server.log"));
    let log_file = std::fs::File::create(&log).expect("creating the server log file");
    let mut child = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .args(args)
        .env("BROADCASTER_AUTH_JWT_SECRET", SECRET)
        .env("BROADCASTER_AUTH_API_KEYS", API_KEY)
        // The load generator connects from one address, thousands at once before their auth.
        .env(
            "BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX",
            "1000000",
        )
        .env_remove("BROADCASTER_ADMIN_LISTEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening public=") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let mut s = String::new();
            let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut s));
            panic!(
                "the server printed no `listening public=ADDR` line within 30 s; its stderr:\n{s}"
            );
        }
    };
    Server { child, addr, log }
}

fn run_loadtest(server: &Server, args: &[&str], json: &PathBuf) -> serde_json::Value {
    let out = loadtest_output(server, args, json);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "broadcaster-loadtest {args:?} failed ({}):\n{stdout}\n{stderr}\nserver log tail:\n{}",
        out.status,
        server.log_tail()
    );
    let text = std::fs::read_to_string(json).expect("the JSON summary was written");
    serde_json::from_str(&text).expect("the JSON summary parses")
}

/// Runs the load generator against `server`, whatever comes of it.
/// A run that must fail: exit 1, `LOAD TEST FAILED` on stderr, `"passed": false` in its JSON
/// summary. Returns the stderr and the summary.
fn failed_loudly(out: &std::process::Output, json: &PathBuf) -> (String, serde_json::Value) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("LOAD TEST FAILED"), "{stderr}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("the JSON summary")).unwrap();
    assert_eq!(s["passed"], false);
    (stderr, s)
}

fn loadtest_output(server: &Server, args: &[&str], json: &PathBuf) -> std::process::Output {
    let pid = server.child.id().to_string();
    Command::new(env!("CARGO_BIN_EXE_broadcaster-loadtest"))
        .args(args)
        .args([
            "--server",
            &server.addr,
            "--secret",
            SECRET,
            "--api-key",
            API_KEY,
            "--server-pid",
            &pid,
            "--quiet",
            "--json",
        ])
        .arg(json)
        .output()
        .expect("running broadcaster-loadtest")
}

fn assert_clean(s: &serde_json::Value) {
    assert_eq!(s["passed"], true, "{s:#}");
    for k in ["seq", "offsets"] {
        assert_eq!(s[k]["lost"], 0, "{k} {s:#}");
        assert_eq!(s[k]["duplicated"], 0, "{k} {s:#}");
        assert_eq!(s[k]["reordered"], 0, "{k} {s:#}");
    }
    assert_eq!(s["seq_offset_mismatch"], 0);
    assert_eq!(s["connection_failures"], 0);
    assert_eq!(s["deliveries"], s["expected_deliveries"]);
}

#[test]
fn fanout_delivers_every_message_to_every_subscriber() {
    let server = start_server("fanout");
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-fanout.json");
    let s = run_loadtest(
        &server,
        &[
            "fanout",
            "--subscribers",
            "50",
            "--rate",
            "200",
            "--messages",
            "200",
        ],
        &json,
    );
    assert_clean(&s);
    assert_eq!(s["publish"]["published"], 200);
    assert_eq!(s["publish"]["errors"], 0);
    assert_eq!(s["deliveries"], 50 * 200);
    assert_eq!(s["latency"]["count"], 50 * 200);
    assert!(s["latency"]["p50_ns"].as_u64().unwrap_or(0) > 0);
    assert!(s["server_cpu_us_per_delivery"].as_f64().is_some());
}

/// `--compress` with a scoreboard payload: every delivery arrives compressed (far smaller on the
/// wire than the payload) and inflates to a broadcast that checks out; `--sse`: the same over
/// server-sent events.
#[test]
fn compressed_and_sse_subscribers_get_every_message() {
    let server = start_server("transports");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let base = [
        "fanout",
        "--subscribers",
        "20",
        "--rate",
        "50",
        "--messages",
        "20",
    ];
    let board = ["--payload-bytes", "20000", "--payload-shape", "scoreboard"];
    let json = dir.join("smoke-compress.json");
    let args: Vec<&str> = [&base[..], &board[..], &["--compress"]].concat();
    let s = run_loadtest(&server, &args, &json);
    assert_clean(&s);
    assert_eq!(s["deliveries"], 20 * 20);
    let wire = s["frame_bytes_mean"].as_f64().unwrap_or(f64::MAX);
    assert!(
        wire < 20_000.0 / 3.0,
        "compressed on the wire: {wire} bytes"
    );

    let json = dir.join("smoke-sse.json");
    let s = run_loadtest(&server, &[&base[..], &["--sse"]].concat(), &json);
    assert_clean(&s);
    assert_eq!(s["deliveries"], 20 * 20);
    assert_eq!(s["latency"]["count"], 20 * 20);
}

#[test]
fn idle_connections_stay_subscribed() {
    let server = start_server("idle");
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-idle.json");
    let s = run_loadtest(
        &server,
        &["idle", "--connections", "200", "--hold", "1"],
        &json,
    );
    assert_clean(&s);
    assert_eq!(s["connections"], 200);
    // The closing publication reached every held connection.
    assert_eq!(s["deliveries"], 200);
    assert!(s["server_rss_bytes_per_connection"].as_f64().is_some());
}

#[test]
fn pipelined_max_rate_publishing_loses_and_reorders_nothing() {
    let server = start_server("pipeline");
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-pipeline.json");
    let s = run_loadtest(
        &server,
        &[
            "chat",
            "--channels",
            "3",
            "--per-channel",
            "7",
            "--rate",
            "0",
            "--window",
            "4",
            "--pipeline",
            "4",
            "--messages",
            "600",
        ],
        &json,
    );
    assert_clean(&s);
    assert_eq!(s["pipeline"], 4);
    assert_eq!(s["publish"]["published"], 600);
    assert_eq!(s["publish"]["errors"], 0);
    // Every answer was matched to its own request: each channel's last offset is its count.
    let counts = s["publish"]["counts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let offsets = s["publish"]["last_offsets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(counts.len(), 3, "{s:#}");
    assert_eq!(counts, offsets, "{s:#}");
}

/// The public rule `scoreboard` needs (SPEC 14), in a config file of its own.
fn scoreboard_config(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.toml"));
    std::fs::write(
        &path,
        "[[channels]]\npattern = \"scoreboard/*\"\naccess = \"public\"\nhistory_size = 1\nrewind_default = 1\n",
    )
    .expect("writing the config file");
    path
}

#[test]
fn scoreboard_viewers_get_the_rewound_publication_then_every_one() {
    let config = scoreboard_config("smoke-scoreboard");
    let server = start_server_with(
        "scoreboard",
        &["--config", config.to_str().expect("a UTF-8 path")],
        &[(
            "BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX",
            "1000000",
        )],
    );
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-scoreboard.json");
    let s = run_loadtest(
        &server,
        &[
            "scoreboard",
            "--viewers",
            "40",
            "--rate",
            "20",
            "--duration",
            "1",
            "--rounds",
            "2",
        ],
        &json,
    );
    assert_clean(&s);
    let b = &s["scoreboard"];
    assert_eq!(b["phases"].as_array().map(Vec::len), Some(4), "{s:#}");
    for kind in ["anonymous", "authenticated"] {
        let k = &b[kind];
        assert_eq!(k["connections"], 80, "{kind} {s:#}");
        assert_eq!(k["rewound"], 80, "{kind}: one rewound per viewer {s:#}");
        assert_eq!(k["replayed"], 80, "{kind} {s:#}");
        assert_eq!(k["deliveries"], k["expected_deliveries"], "{kind} {s:#}");
        assert!(
            k["deliveries"].as_u64().unwrap_or(0) >= 2 * 40 * 15,
            "{kind} {s:#}"
        );
        assert!(k["server_cpu_us_per_connect"].as_f64().is_some(), "{s:#}");
        assert!(k["server_cpu_us_per_delivery"].as_f64().is_some(), "{s:#}");
    }
    assert!(
        b["ratio"]["server_cpu_per_connect"].as_f64().is_some(),
        "{s:#}"
    );
}

#[test]
fn scoreboard_fails_loudly_without_a_public_rule() {
    // No [[channels]] rule: an anonymous subscribe is refused, and nothing is rewound.
    let server = start_server("scoreboard-no-rule");
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-scoreboard-no-rule.json");
    let out = loadtest_output(
        &server,
        &[
            "scoreboard",
            "--viewers",
            "10",
            "--rate",
            "20",
            "--duration",
            "0.5",
        ],
        &json,
    );
    let (stderr, _) = failed_loudly(&out, &json);
    assert!(stderr.contains("anonymous viewers, round 1"), "{stderr}");
    assert!(stderr.contains("rewind_default"), "{stderr}");
}

const PROXY_SECRET: &str = "smoke-proxy-secret";

/// A free loopback port for the `proxy` scenario's backend (the server's config names it before
/// the load generator listens on it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A server whose `contest/*` channels are asked of a backend on `port` (cache TTL `ttl`) and
/// whose `public/*` are public, with the request rate limit lifted.
fn start_proxy_server(name: &str, port: u16, ttl: &str) -> Server {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[[channels]]\npattern = \"public/*\"\naccess = \"public\"\n\
             [[channels]]\npattern = \"contest/*\"\naccess = \"proxy\"\n\
             [proxy]\nsecret = \"{PROXY_SECRET}\"\nsubscribe_cache_ttl = \"{ttl}\"\n\
             subscribe_url = \"http://127.0.0.1:{port}/subscribe\"\n"
        ),
    )
    .expect("writing the config file");
    start_server_with(
        name,
        &["--config", config.to_str().expect("a UTF-8 path")],
        &[
            ("BROADCASTER_LIMITS_REQUESTS_PER_SECOND", "1000000"),
            ("BROADCASTER_LIMITS_REQUEST_BURST", "1000000"),
        ],
    )
}

fn proxy_args(port: &str) -> Vec<&str> {
    vec![
        "proxy",
        "--connections",
        "3",
        "--count",
        "100",
        "--warmup",
        "2",
        "--backend-listen",
        port,
        "--proxy-secret",
        PROXY_SECRET,
    ]
}

#[test]
fn proxy_times_baseline_miss_and_hit_and_the_backend_is_asked_for_misses_only() {
    let port = free_port();
    let server = start_proxy_server("smoke-proxy", port, "30s");
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-proxy.json");
    let listen = format!("127.0.0.1:{port}");
    let s = run_loadtest(&server, &proxy_args(&listen), &json);
    assert_eq!(s["passed"], true, "{s:#}");
    assert_eq!(s["connection_failures"], 0, "{s:#}");
    let p = &s["proxy"];
    for kind in ["baseline", "miss", "hit"] {
        assert_eq!(p[kind]["count"], 100, "{kind} {s:#}");
        assert!(p[kind]["p50_ns"].as_u64().unwrap_or(0) > 0, "{kind} {s:#}");
    }
    // 100 misses, 3 connections x 2 warm-up misses, one hit warm per connection.
    assert_eq!(p["warmup_misses"], 6, "{s:#}");
    assert_eq!(p["hit_warms"], 3, "{s:#}");
    assert_eq!(p["expected_backend_calls"], 109, "{s:#}");
    assert_eq!(p["backend"]["calls"], 109, "{s:#}");
    assert_eq!(p["backend"]["miss_channels"], 106, "{s:#}");
    assert_eq!(p["backend"]["hit_channels"], 3, "{s:#}");
    assert_eq!(p["backend"]["other_channels"], 0, "{s:#}");
    assert_eq!(p["backend"]["unauthorized"], 0, "{s:#}");
    assert_eq!(p["server_allow_calls"], 109.0, "{s:#}");
    assert!(
        p["server_call_mean_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{s:#}"
    );
    assert!(p["added_miss"]["p50_us"].as_f64().is_some(), "{s:#}");
}

#[test]
fn proxy_fails_loudly_when_hits_are_asked() {
    // No cache: every hit is asked, which the backend's count must catch.
    let port = free_port();
    let server = start_proxy_server("smoke-proxy-no-cache", port, "0s");
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-proxy-no-cache.json");
    let listen = format!("127.0.0.1:{port}");
    let out = loadtest_output(&server, &proxy_args(&listen), &json);
    let (stderr, s) = failed_loudly(&out, &json);
    // 100 measured hits and 3 x 2 warm-up ones.
    assert!(stderr.contains("106 HITS WERE ASKED"), "{stderr}");
    assert_eq!(s["proxy"]["backend"]["calls"], 109 + 106, "{s:#}");
}

/// A server whose `room/*` channels have presence (and join/leave when `join_leave`).
fn start_presence_server(name: &str, join_leave: bool) -> Server {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("[[channels]]\npattern = \"room/*\"\npresence = true\njoin_leave = {join_leave}\n"),
    )
    .expect("writing the config file");
    start_server_with(
        name,
        &["--config", config.to_str().expect("a UTF-8 path")],
        &[],
    )
}

#[test]
fn presence_storm_joins_and_leaves_once_per_cycle_and_ends_with_nobody() {
    let server = start_presence_server("smoke-presence", true);
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-presence.json");
    let s = run_loadtest(
        &server,
        &[
            "presence",
            "--users",
            "20",
            "--workers",
            "4",
            "--channels",
            "2",
            "--count",
            "300",
            "--observers",
            "2",
            "--baseline",
        ],
        &json,
    );
    assert_eq!(s["passed"], true, "{s:#}");
    assert_eq!(s["connection_failures"], 0, "{s:#}");
    let p = &s["presence"];
    assert_eq!(p["cycles"], 300, "{s:#}");
    // Every cycle is its user's only connection: one join and one leave per channel, seen by
    // both observers, counted alike by the server.
    assert_eq!(p["joins_from"], "observers", "{s:#}");
    assert_eq!(p["joins"], 600, "{s:#}");
    assert_eq!(p["leaves"], 600, "{s:#}");
    assert_eq!(p["server_joins"], 600.0, "{s:#}");
    assert_eq!(p["server_leaves"], 600.0, "{s:#}");
    assert_eq!(p["observers_agree"], true, "{s:#}");
    for k in ["double_joins", "orphan_leaves", "version_regressions"] {
        assert_eq!(p["anomalies"][k], 0, "{k} {s:#}");
    }
    assert_eq!(p["missing_presence"], 0, "{s:#}");
    assert_eq!(p["settled"]["ok"], true, "{s:#}");
    assert_eq!(p["emptied"]["ok"], true, "{s:#}");
    for c in p["emptied"]["rest_counts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert_eq!(c["count"], 0, "{s:#}");
    }
    assert_eq!(p["method"]["asked"], 4, "{s:#}");
    assert_eq!(p["method"]["mismatches"], serde_json::json!([]), "{s:#}");
    assert!(p["server_cpu_us_per_join"].as_f64().is_some(), "{s:#}");
    assert_eq!(p["baseline"]["cycles"], 300, "{s:#}");
    assert!(
        p["baseline"]["presence_us_per_join"].as_f64().is_some(),
        "{s:#}"
    );

    // A reconnect storm: every user holds a second connection, so nothing changes.
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-presence-keep-one.json");
    let s = run_loadtest(
        &server,
        &[
            "presence",
            "--users",
            "20",
            "--workers",
            "4",
            "--count",
            "200",
            "--keep-one",
        ],
        &json,
    );
    assert_eq!(s["passed"], true, "{s:#}");
    let p = &s["presence"];
    assert_eq!(
        (p["cycles"].as_u64(), p["keep_one"].as_bool()),
        (Some(200), Some(true))
    );
    assert_eq!(
        (p["joins"].as_u64(), p["leaves"].as_u64()),
        (Some(0), Some(0)),
        "{s:#}"
    );
    assert_eq!(p["kept"]["ok"], true, "{s:#}");
    assert_eq!(p["emptied"]["ok"], true, "{s:#}");
}

#[test]
fn presence_fails_loudly_without_join_leave() {
    let server = start_presence_server("smoke-presence-quiet", false);
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smoke-presence-quiet.json");
    let out = loadtest_output(
        &server,
        &[
            "presence",
            "--users",
            "8",
            "--workers",
            "2",
            "--count",
            "40",
        ],
        &json,
    );
    let (stderr, s) = failed_loudly(&out, &json);
    assert!(stderr.contains("join_leave = true"), "{stderr}");
    assert_eq!(s["presence"]["joins"], 0, "{s:#}");
}
