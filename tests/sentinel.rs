//! SPEC 21's sentinel mode against real processes: a master, a replica and three sentinels
//! (`redis-server --sentinel`), two broadcaster nodes that find the master through the
//! sentinels, and the master SIGKILLed while publishing. The nodes follow the failover, and
//! nothing acknowledged before it is silently lost: a client resuming across it gets
//! `recovered: false`, or every publication it missed.

mod common;

use common::*;
use serde_json::json;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// One `redis-server` process (a server or a sentinel) in a directory of its own, killed on drop.
struct Proc {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Proc {
    /// `redis-server` with `args` after the port and directory; `conf` is written to a file
    /// passed first (a sentinel needs one it can rewrite).
    fn start(conf: Option<String>, args: &[&str]) -> Proc {
        let port = free_port();
        let dir = temp_path(&format!("-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("create the redis directory");
        let mut cmd = Command::new("redis-server");
        if let Some(conf) = conf {
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
            panic!("cannot run redis-server ({e}): the sentinel test needs the Debian package")
        });
        let p = Proc {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + T;
        while cli(port, &["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis on {port} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p PORT args...`, its output trimmed ("" when it could not run).
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A master, its replica (in sync), and three sentinels that see both.
fn sentinels() -> (Proc, Proc, Vec<Proc>) {
    let master = Proc::start(None, &[]);
    let replica = Proc::start(
        None,
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    );
    let deadline = Instant::now() + T;
    while !cli(master.port, &["INFO", "replication"]).contains("connected_slaves:1") {
        assert!(Instant::now() < deadline, "the replica never connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    let conf = format!(
        "sentinel monitor mymaster 127.0.0.1 {} 2\n\
         sentinel down-after-milliseconds mymaster 1000\n\
         sentinel failover-timeout mymaster 5000\n\
         sentinel parallel-syncs mymaster 1\n",
        master.port
    );
    let sentinels: Vec<Proc> = (0..3)
        .map(|_| Proc::start(Some(conf.clone()), &[]))
        .collect();
    for s in &sentinels {
        let deadline = Instant::now() + T;
        loop {
            let seen = cli(s.port, &["SENTINEL", "master", "mymaster"]);
            let known = seen
                .lines()
                .skip_while(|l| *l != "num-other-sentinels")
                .nth(1);
            if known == Some("2")
                && cli(s.port, &["SENTINEL", "replicas", "mymaster"]).contains("ip")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sentinel {} never saw it all: {seen}",
                s.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (master, replica, sentinels)
}

fn node(sentinels: &[Proc]) -> Server {
    let urls: Vec<String> = sentinels
        .iter()
        .map(|s| format!("redis://127.0.0.1:{}", s.port))
        .collect();
    Server::start(
        ServerOpts::shards(2)
            .env("BROADCASTER_REDIS_MODE", "sentinel")
            .env("BROADCASTER_REDIS_URLS", &urls.join(",")),
    )
}

async fn wait_ok(s: &Server) {
    let deadline = Instant::now() + T;
    loop {
        let r = http_get(s.public, "/health").await;
        if r.json()["status"] == json!("ok") {
            return;
        }
        assert!(Instant::now() < deadline, "/health: {}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POST /publish; the offset when acknowledged.
async fn publish(s: &Server, channel: &str, n: u64) -> Option<u64> {
    let body = publish_body(channel, "e", &n.to_string());
    let r = http_post_key(s.backend(), "/publish", &s.api_key, &body).await;
    (r.status == 200)
        .then(|| r.json()["offset"].as_u64())
        .flatten()
}

#[tokio::test]
async fn nodes_follow_a_sentinel_failover_and_lose_nothing_silently() {
    let (mut master, replica, sentinels) = sentinels();
    let a = node(&sentinels);
    let b = node(&sentinels);
    wait_ok(&a).await;
    wait_ok(&b).await;
    let channel = format!("failover-{}", std::process::id());
    let mut sub = b.ws_authed("alice").await;
    let result = sub.subscribe(&channel).await;
    let epoch = result["epoch"].as_str().expect("epoch").to_string();

    // Acknowledged before the kill: delivered, in order.
    let mut acked = Vec::new();
    for n in 1..=20u64 {
        let offset = publish(&a, &channel, n)
            .await
            .expect("publish before the kill");
        acked.push((n, offset));
    }
    for (n, _) in &acked {
        assert_eq!(sub.recv_broadcast().await["payload"], json!(n));
    }
    let last_seen = acked.last().unwrap().1;

    let killed = Instant::now();
    master.kill();
    let mut n = 20u64;
    let back = loop {
        n += 1;
        if publish(&a, &channel, n).await.is_some() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no publish after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("master killed to a publish acknowledged again: {back:?}");
    let promoted = cli(replica.port, &["INFO", "replication"]);
    assert!(promoted.contains("role:master"), "{promoted}");
    wait_ok(&b).await;

    // Resuming from before the failover: not silently short.
    let mut again = Ws::connect(b.public).await;
    again.auth_ok(&b.token_all("alice")).await;
    let since = json!({"channel": channel, "since": {"offset": last_seen, "epoch": epoch}});
    let r = again.call("subscribe", since).await;
    // False, with a new epoch: the promoted replica may lack the last writes of the master it
    // replaced, so what it holds is never offered as a complete replay (offsets would repeat).
    assert_eq!(r["recovered"], json!(false), "{r}");
    assert_ne!(r["epoch"].as_str(), Some(epoch.as_str()), "{r}");

    // After the failover both nodes deliver again, in order.
    let fresh = publish(&a, &channel, 1000)
        .await
        .expect("publish after the failover");
    assert!(fresh >= 1);
    let got = within(T, "a broadcast after the failover", async {
        loop {
            let m = again.recv_broadcast().await;
            if m["payload"] == json!(1000) {
                return m;
            }
        }
    })
    .await;
    assert_eq!(got["offset"], json!(fresh));
}
