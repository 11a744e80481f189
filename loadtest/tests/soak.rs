//! A short `soak` against the real server: a few hundred connections churn (connect, auth,
//! subscribe, receive, unsubscribe/resubscribe, close or drop, reconnect with `since`) for 60 s while
//! two publishers run, 60 of them as 30 presence users on a presence channel; the summary must
//! pass: nothing lost or reordered, the server's gauges and descriptors back where they were, its
//! RSS steady, no user joined twice without a leave between, and presence back to nobody.
//!
//! The server binary is found as in `smoke.rs`: `$BROADCASTER_BIN`, else the `broadcaster` next to
//! the load generator's binary, else `target/debug/broadcaster`; missing is a failure.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SECRET: &str = "soak-test-secret-0123456789abcdef";
const API_KEY: &str = "soak-test-key";

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

fn start_server() -> Server {
    let bin = server_bin();
    assert!(
        bin.exists(),
        "the server binary {} does not exist: build it with `cargo build --workspace --bins`, or set \
         BROADCASTER_BIN to its path",
        bin.display()
    );
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak-server.log");
    let log_file = std::fs::File::create(&log).expect("creating the server log file");
    // The presence churn's channel (`--presence-users`) needs presence and join/leave.
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak-server.toml");
    std::fs::write(
        &config,
        "[[channels]]\npattern = \"room/*\"\npresence = true\njoin_leave = true\n",
    )
    .expect("writing the config file");
    let mut child = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--config",
        ])
        .arg(&config)
        .env("BROADCASTER_AUTH_JWT_SECRET", SECRET)
        .env("BROADCASTER_AUTH_API_KEYS", API_KEY)
        // The load generator connects from one address, thousands at once before their auth.
        .env(
            "BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX",
            "1000000",
        )
        // History large enough for every gap, and short-lived enough to reach its steady size
        // within the warm-up (so its growth does not count as a leak).
        .env("BROADCASTER_HISTORY_SIZE", "10000")
        .env("BROADCASTER_HISTORY_TTL", "4s")
        .env("RUST_LOG", "warn")
        .env_remove("BROADCASTER_ADMIN_LISTEN")
        .env_remove("BROADCASTER_REDIS_URL")
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
    let Ok(addr) = rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the server printed no `listening public=ADDR` line within 30 s; its stderr:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    Server { child, addr, log }
}

#[test]
fn soak_churn_loses_nothing_and_leaks_nothing() {
    let server = start_server();
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak.json");
    let pid = server.child.id().to_string();
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_broadcaster-loadtest"))
        .args([
            "soak",
            "--connections",
            "300",
            "--channels",
            "4",
            "--channels-per-conn",
            "2",
            "--duration",
            "60s",
            "--rate",
            "40",
            "--session",
            "2",
            "--pause",
            "0.5",
            "--resubscribe",
            "0.5",
            "--history-size",
            "10000",
            "--history-ttl",
            "4s",
            "--threads",
            "1",
            "--settle-timeout",
            "15",
            // A 30 MiB (debug) server still raises its allocator high-water mark by one ~2 MiB
            // step now and then in a short run; the default 2 MiB slack would make the test flaky.
            "--rss-slack-mib",
            "4",
            "--presence-users",
            "30",
            "--server",
            &server.addr,
            "--server-pid",
            &pid,
            "--secret",
            SECRET,
            "--api-key",
            API_KEY,
            "--quiet",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("running broadcaster-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let log_tail = &log[log.len().saturating_sub(3000)..];
    assert!(
        out.status.success(),
        "soak failed ({}):\n{stdout}\n{stderr}\nserver log tail:\n{log_tail}",
        out.status
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON summary")).unwrap();
    assert_eq!(s["passed"], true, "{s:#}");
    for k in ["seq", "offsets"] {
        assert_eq!(s[k]["lost"], 0, "{k}: {s:#}");
        assert_eq!(s[k]["duplicated"], 0, "{k}: {s:#}");
        assert_eq!(s[k]["reordered"], 0, "{k}: {s:#}");
    }
    assert_eq!(s["seq_offset_mismatch"], 0);
    assert_eq!(s["connection_failures"], 0);
    assert_eq!(s["unrecovered"], 0);
    assert!(s["deliveries"].as_u64().unwrap() > 0);
    let k = &s["soak"];
    assert_eq!(k["connections"], 300);
    assert_eq!(k["settled"], 300, "every connection caught up at the end");
    // The churn happened: sessions ended and came back, resubscribes and recoveries were made.
    assert!(k["cycled"].as_u64().unwrap() >= 300, "{k:#}");
    assert!(k["abrupt_closes"].as_u64().unwrap() > 0, "{k:#}");
    assert!(k["resubscribes"].as_u64().unwrap() > 0, "{k:#}");
    assert!(k["recovered"].as_u64().unwrap() > 0, "{k:#}");
    assert!(k["replayed"].as_u64().unwrap() > 0, "{k:#}");
    // Gauges: all open at the end (and the presence observer: one connection, one
    // subscription), then back to zero; descriptors back to the pre-run count.
    assert_eq!(k["gauges_open"]["connections_active"], 301, "{k:#}");
    assert_eq!(
        k["gauges_open"]["subscriptions_total"].as_u64(),
        k["subscriptions"].as_u64().map(|n| n + 1),
        "{k:#}"
    );
    assert_eq!(k["gauges_after_close"]["connections_active"], 0, "{k:#}");
    assert_eq!(k["gauges_after_close"]["subscriptions_total"], 0, "{k:#}");
    assert_eq!(k["fd_after"], k["fd_before"], "{k:#}");
    assert!(k["fd_open_end"].as_u64().unwrap() >= k["fd_before"].as_u64().unwrap() + 300);
    // Presence: users joined and left, never twice in a row, and nobody is left.
    let p = &k["presence"];
    assert_eq!(
        (p["users"].as_u64(), p["connections"].as_u64()),
        (Some(30), Some(60))
    );
    assert!(p["observed"]["joins"].as_u64().unwrap() >= 30, "{p:#}");
    assert_eq!(p["observed"]["joins"], p["observed"]["leaves"], "{p:#}");
    for a in ["double_joins", "orphan_leaves", "version_regressions"] {
        assert_eq!(p["anomalies"][a], 0, "{a}: {p:#}");
    }
    assert_eq!(p["alone"]["ok"], true, "{p:#}");
    assert_eq!(p["emptied"]["ok"], true, "{p:#}");
    let counts = p["emptied"]["rest_counts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !counts.is_empty() && counts.iter().all(|c| c["count"] == 0),
        "{p:#}"
    );
    // The RSS check ran (and passed, with the rest of the summary).
    assert!(k["rss_warm_bytes"].as_u64().is_some_and(|b| b > 0), "{k:#}");
    assert!(k["rss_end_bytes"].as_u64().is_some_and(|b| b > 0), "{k:#}");
    assert!(
        t0.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t0.elapsed()
    );
}
