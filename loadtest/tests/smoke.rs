//! Runs a short `fanout` and `idle` against the real server and checks the JSON summaries.
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
        .env("BROADCASTER_AUTH_JWT_SECRET", SECRET)
        .env("BROADCASTER_AUTH_API_KEYS", API_KEY)
        .env_remove("BROADCASTER_ADMIN_LISTEN")
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
    let pid = server.child.id().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_broadcaster-loadtest"))
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
        .expect("running broadcaster-loadtest");
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
