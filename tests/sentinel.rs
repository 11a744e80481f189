//! SPEC 21's sentinel mode against real processes: a master, a replica and three sentinels
//! (`redis-server --sentinel`), two broadcaster nodes that find the master through the
//! sentinels, and the master SIGKILLed while publishing. The nodes follow the failover, and
//! nothing acknowledged before it is silently lost: a client resuming across it gets
//! `recovered: false`, or every publication it missed.

mod common;

use common::redis_proc::{
    publish, publish_until_acknowledged, redis_cli as cli, wait_ok, RedisProc as Proc,
};
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

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
    let (_, back) = publish_until_acknowledged(&a, &channel, 20, killed).await;
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
