//! Real `redis-server` processes for the Sentinel and Redis Cluster tests: each on a free
//! loopback port, in a directory of its own, killed (and its directory removed) on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{http_get, http_post_key, kill_with_parent, publish_body, temp_path, Server};
use serde_json::json;

/// A free loopback port whose Redis Cluster bus port (+10000) is free too.
pub fn free_redis_port() -> u16 {
    loop {
        let port = super::free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub struct RedisProc {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl RedisProc {
    /// `redis-server` with persistence off and `args` after the port, bind and directory; with
    /// `sentinel_conf`, a sentinel (`--sentinel`) whose configuration file holds it (a sentinel
    /// needs one it can rewrite). Returns once it answers PING.
    pub fn start(sentinel_conf: Option<String>, args: &[&str]) -> RedisProc {
        let port = free_redis_port();
        let dir = temp_path(&format!("-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("create the redis directory");
        let mut cmd = Command::new("redis-server");
        if let Some(conf) = sentinel_conf {
            let path = dir.join("sentinel.conf");
            std::fs::write(&path, format!("port {port}\n{conf}")).expect("write sentinel.conf");
            cmd.arg(path).arg("--sentinel");
        } else {
            cmd.args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
        }
        cmd.args(["--bind", "127.0.0.1", "--dir"])
            .arg(&dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}): this test needs the Debian package")
        });
        let p = RedisProc {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(port, &["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis on {port} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p PORT args...`, its output trimmed ("" when it could not run).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Waits (10 s at most) until the node's `/health` says `ok`: Redis (or the cluster) reached.
pub async fn wait_ok(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http_get(s.public, "/health").await;
        if r.json()["status"] == json!("ok") {
            return;
        }
        assert!(Instant::now() < deadline, "/health: {}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /publish` of the number `n` to `channel`; the offset when acknowledged.
pub async fn publish(s: &Server, channel: &str, n: u64) -> Option<u64> {
    let body = publish_body(channel, "e", &n.to_string());
    let r = http_post_key(s.backend(), "/publish", &s.api_key, &body).await;
    (r.status == 200)
        .then(|| r.json()["offset"].as_u64())
        .flatten()
}

/// Publishes the numbers after `n` to `channel` until one is acknowledged (30 s at most), as a
/// client retrying through a failover does; that number and the time since `killed`.
pub async fn publish_until_acknowledged(
    s: &Server,
    channel: &str,
    mut n: u64,
    killed: Instant,
) -> (u64, Duration) {
    loop {
        n += 1;
        if publish(s, channel, n).await.is_some() {
            return (n, killed.elapsed());
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no publish acknowledged after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
