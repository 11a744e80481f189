//! SPEC 21's Redis Cluster mode against real processes: six `redis-server --cluster-enabled`
//! (three masters, each with a replica, made with `redis-cli --cluster create`) and three
//! broadcaster nodes. Channels live in their `{C}` slot and travel by sharded pub/sub; order,
//! offsets and recovery hold across nodes; the backend's controls and presence reach every node;
//! a master SIGKILLed while publishing fails over to its replica, and a channel's slot moved to
//! another master (a resharding) keeps delivering.

mod common;

use common::redis_proc::{
    publish, publish_until_acknowledged, redis_cli as cli, wait_ok, RedisProc as Proc,
};
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

/// A cluster-enabled `redis-server`.
fn cluster_node() -> Proc {
    let args = [
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        "1000",
        "--cluster-config-file",
        "nodes.conf",
    ];
    Proc::start(None, &args)
}

/// The node's id in the cluster.
fn node_id(p: &Proc) -> String {
    cli(p.port, &["CLUSTER", "MYID"])
}

/// Six processes made into three masters with a replica each, every slot covered.
fn redis_cluster() -> Vec<Proc> {
    let procs: Vec<Proc> = (0..6).map(|_| cluster_node()).collect();
    let addrs: Vec<String> = procs
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in &procs {
        loop {
            let info = cli(p.port, &["CLUSTER", "INFO"]);
            let nodes = cli(p.port, &["CLUSTER", "NODES"]);
            let replicas = nodes.lines().filter(|l| l.contains("slave")).count();
            if info.contains("cluster_state:ok") && replicas == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never formed: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Each replica in sync, so a failover has the data.
    for p in &procs {
        loop {
            let r = cli(p.port, &["INFO", "replication"]);
            if r.contains("role:master") || r.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "replica never synced: {r}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    procs
}

/// The process that is master of `channel`'s slot now, as `at` sees the cluster.
fn master_of<'a>(procs: &'a [Proc], at: u16, channel: &str) -> &'a Proc {
    let slot: u16 = cli(at, &["CLUSTER", "KEYSLOT", &format!("bc:{{{channel}}}")])
        .parse()
        .expect("a slot");
    let nodes = cli(at, &["CLUSTER", "NODES"]);
    for line in nodes.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let owns = f[8..].iter().any(|range| {
            let mut ends = range.split('-').map(|n| n.parse::<u16>().ok());
            match (ends.next().flatten(), ends.next().flatten()) {
                (Some(a), Some(b)) => (a..=b).contains(&slot),
                (Some(a), None) => a == slot,
                _ => false,
            }
        });
        if owns {
            let port: u16 = f[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("a port");
            return procs.iter().find(|p| p.port == port).expect("a known node");
        }
    }
    panic!("no master holds slot {slot}: {nodes}")
}

/// Channels under `room/` keep presence and announce joins and leaves.
const RULES: &str = "[[channels]]\npattern = \"room/*\"\npresence = true\njoin_leave = true\n";

fn node(procs: &[Proc]) -> Server {
    // Two seeds are enough to find the rest: the node learns the slot map from either.
    let urls: Vec<String> = procs[..2]
        .iter()
        .map(|p| format!("redis://127.0.0.1:{}", p.port))
        .collect();
    Server::start(
        ServerOpts {
            shards: 2,
            config_toml: Some(RULES.into()),
            ..Default::default()
        }
        .env("BROADCASTER_REDIS_MODE", "cluster")
        .env("BROADCASTER_REDIS_URLS", &urls.join(","))
        .env("BROADCASTER_PRESENCE_NODE_TIMEOUT", "3s"),
    )
}

/// `PUBSUB SHARDNUMSUB` of `channel`'s pub/sub channel on the Redis at `port`: the name, then the
/// count of its sharded subscribers.
fn shard_subscribers(port: u16, channel: &str) -> String {
    cli(
        port,
        &["PUBSUB", "SHARDNUMSUB", &format!("bc:{{{channel}}}")],
    )
}

/// A new connection of alice on `s` resumes `channel` from `offset` of `epoch`: the result.
async fn resume(s: &Server, channel: &str, offset: u64, epoch: &str) -> Value {
    let mut ws = s.ws_authed("alice").await;
    let since = json!({"channel": channel, "since": {"offset": offset, "epoch": epoch}});
    ws.call("subscribe", since).await
}

/// The next broadcast of `channel` on `ws` (others skipped), within `T`.
async fn next_of(ws: &mut Ws, channel: &str) -> Value {
    within(T, "a broadcast", async {
        loop {
            let b = ws.recv_broadcast().await;
            if b["channel"] == json!(channel) {
                return b;
            }
        }
    })
    .await
}

#[tokio::test]
async fn three_nodes_share_channels_through_sharded_pubsub() {
    let procs = redis_cluster();
    let nodes: Vec<Server> = (0..3).map(|_| node(&procs)).collect();
    for n in &nodes {
        wait_ok(n).await;
    }
    let pid = std::process::id();
    // Channels spread over the masters' slots.
    let channels: Vec<String> = (0..6).map(|i| format!("rc-{pid}-{i}")).collect();
    let masters: std::collections::HashSet<u16> = channels
        .iter()
        .map(|c| master_of(&procs, procs[0].port, c).port)
        .collect();
    assert!(masters.len() >= 2, "channels all in one shard: {masters:?}");

    let mut subs = Vec::new();
    for n in &nodes {
        let mut ws = n.ws_authed("alice").await;
        for c in &channels {
            ws.subscribe(c).await;
        }
        subs.push(ws);
    }
    // Sharded pub/sub only: every node holds an SSUBSCRIBE on the slot's master, none a
    // classic SUBSCRIBE.
    for c in &channels {
        let master = master_of(&procs, procs[0].port, c);
        let shard = shard_subscribers(master.port, c);
        assert!(shard.ends_with('3'), "SHARDNUMSUB {c}: {shard}");
        let classic = cli(master.port, &["PUBSUB", "NUMSUB", &format!("bc:{{{c}}}")]);
        assert!(classic.ends_with('0'), "NUMSUB {c}: {classic}");
    }

    // Publishes from every node, interleaved: each channel's offsets count 1, 2, 3 ... and
    // every subscriber on every node sees them in that order.
    let rounds = 10u64;
    for n in 1..=rounds {
        for (i, c) in channels.iter().enumerate() {
            let offset = publish(&nodes[(n as usize + i) % 3], c, n)
                .await
                .expect("publish");
            assert_eq!(offset, n, "offsets of {c}");
        }
    }
    for ws in &mut subs {
        let mut next = vec![1u64; channels.len()];
        for _ in 0..rounds as usize * channels.len() {
            let b = within(T, "a broadcast", ws.recv_broadcast()).await;
            let i = channels
                .iter()
                .position(|c| b["channel"] == json!(c))
                .expect("a subscribed channel");
            assert_eq!(b["offset"], json!(next[i]), "{b}");
            assert_eq!(b["payload"], json!(next[i]), "{b}");
            next[i] += 1;
        }
    }

    // Recovery on another node: a subscriber of node 0 that saw offset 4 resumes on node 2.
    let first = subs[0].subscribe(&format!("rc-{pid}-probe")).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    let probe = format!("rc-{pid}-probe");
    for n in 1..=8 {
        publish(&nodes[0], &probe, n).await.expect("publish");
    }
    let mut resumed = nodes[2].ws_authed("alice").await;
    let since = json!({"channel": probe, "since": {"offset": 4, "epoch": epoch}});
    let r = resumed.call("subscribe", since).await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    for n in 5..=8 {
        assert_eq!(next_of(&mut resumed, &probe).await["payload"], json!(n));
    }
    let h = http_get_key(
        nodes[1].backend(),
        &format!("/history?channel={probe}&limit=3"),
        &nodes[1].api_key,
    )
    .await;
    let offsets: Vec<u64> = h.json()["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .filter_map(|p| p["offset"].as_u64())
        .collect();
    assert_eq!(offsets, [6, 7, 8], "{}", h.text());

    // Presence: a member joining on node 1 is seen by a watcher on node 2, and listed by all.
    let room = format!("room/{pid}");
    let mut watcher = nodes[2].ws_authed("watcher").await;
    watcher.subscribe(&room).await;
    let mut bob = nodes[1].ws_authed("bob").await;
    bob.subscribe(&room).await;
    let joined = within(T, "bob's join", async {
        loop {
            let n = watcher.recv_note(T).await;
            if n["method"] == json!("join") && n["params"]["user"] == json!("bob") {
                return n;
            }
        }
    })
    .await;
    assert_eq!(joined["params"]["channel"], json!(room), "{joined}");
    let listed = http_get_key(
        nodes[0].backend(),
        &format!("/presence?channel={room}"),
        &nodes[0].api_key,
    )
    .await
    .json();
    let users: Vec<&str> = listed["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert!(users.contains(&"bob"), "{listed}");

    // The backend's disconnect, sent to node 0, closes bob's connection on node 1.
    let r = http_post_key(
        nodes[0].backend(),
        "/disconnect",
        &nodes[0].api_key,
        r#"{"user":"bob"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    bob.expect_close(4006, T).await;

    // A revocation made on node 0 closes mallory's connection on node 2 (4007), is held in the
    // control slot, and a node started later refuses the token.
    let stolen = TokenSpec::new(&nodes[0].secret, "mallory")
        .jti(&format!("jti-{pid}"))
        .mint();
    let mut mallory = Ws::connect(nodes[2].public).await;
    mallory.auth_ok(&stolen).await;
    let r = http_post_key(
        nodes[0].backend(),
        "/revoke",
        &nodes[0].api_key,
        &json!({"jti": format!("jti-{pid}")}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    mallory.expect_close(4007, T).await;
    let owner = master_of(&procs, procs[0].port, "bc");
    assert_eq!(cli(owner.port, &["HLEN", "bc:{bc}:revoked"]), "1");
    let late = node(&procs);
    wait_ok(&late).await;
    let mut again = Ws::connect(late.public).await;
    again
        .call_err("auth", json!({ "token": stolen }), "Unauthenticated")
        .await;

    // A node SIGKILLed: the others remove its member (heartbeats and the node's pairs are in
    // slots of their own) and the watcher sees one leave.
    let mut dave = nodes[1].ws_authed("dave").await;
    dave.subscribe(&room).await;
    within(T, "dave's join", async {
        loop {
            let n = watcher.recv_note(T).await;
            if n["method"] == json!("join") && n["params"]["user"] == json!("dave") {
                return;
            }
        }
    })
    .await;
    nodes[1].signal(libc::SIGKILL);
    let left = within(Duration::from_secs(15), "dave's leave", async {
        loop {
            let n = watcher.recv_note(Duration::from_secs(15)).await;
            // Bob's leave (disconnected above) comes first.
            if n["method"] == json!("leave") && n["params"]["user"] == json!("dave") {
                return n;
            }
        }
    })
    .await;
    assert_eq!(left["params"]["channel"], json!(room), "{left}");
}

/// Two nodes, a subscriber of `channel` on the second, 20 publications from the first seen.
async fn two_nodes_with_a_subscriber(
    procs: &[Proc],
    channel: &str,
) -> (Server, Server, Ws, String) {
    let a = node(procs);
    let b = node(procs);
    wait_ok(&a).await;
    wait_ok(&b).await;
    let mut sub = b.ws_authed("alice").await;
    let r = sub.subscribe(channel).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    for n in 1..=20u64 {
        assert_eq!(publish(&a, channel, n).await, Some(n), "publish {n}");
    }
    for n in 1..=20u64 {
        assert_eq!(next_of(&mut sub, channel).await["payload"], json!(n));
    }
    (a, b, sub, epoch)
}

#[tokio::test]
async fn a_killed_master_fails_over_to_its_replica_and_nothing_is_lost_silently() {
    let mut procs = redis_cluster();
    let channel = format!("rc-failover-{}", std::process::id());
    let (a, b, mut sub, epoch) = two_nodes_with_a_subscriber(&procs, &channel).await;
    let victim = master_of(&procs, procs[0].port, &channel).port;
    let killed = Instant::now();
    procs
        .iter_mut()
        .find(|p| p.port == victim)
        .expect("the victim")
        .kill();
    let survivor = procs
        .iter()
        .find(|p| p.port != victim)
        .expect("a survivor")
        .port;
    let (n, back) = publish_until_acknowledged(&a, &channel, 1000, killed).await;
    eprintln!("master killed to a publish acknowledged again: {back:?}");
    let promoted = master_of(&procs, survivor, &channel).port;
    assert_ne!(promoted, victim);

    // The subscriber from before the kill gets the publications after it, in order, from the
    // promoted replica, where its node subscribed again.
    let first = next_of(&mut sub, &channel).await;
    assert_eq!(first["payload"], json!(n), "{first}");
    for m in n + 1..n + 5 {
        publish(&a, &channel, m)
            .await
            .expect("publish after the failover");
        assert_eq!(next_of(&mut sub, &channel).await["payload"], json!(m));
    }
    let shard = shard_subscribers(promoted, &channel);
    assert!(
        shard.ends_with('1'),
        "SHARDNUMSUB on the promoted replica: {shard}"
    );

    // Resuming from before the failover on the other node: the promoted replica is another
    // generation, so the answer is `recovered: false` with a new epoch, never a replay that
    // might miss writes the dead master had not yet replicated.
    let r = resume(&b, &channel, 20, &epoch).await;
    assert_eq!(r["recovered"], json!(false), "{r}");
    assert_ne!(r["epoch"].as_str(), Some(epoch.as_str()), "{r}");
}

#[tokio::test]
async fn a_channels_slot_moved_to_another_master_keeps_delivering() {
    let procs = redis_cluster();
    let channel = format!("rc-reshard-{}", std::process::id());
    let (a, b, mut sub, epoch) = two_nodes_with_a_subscriber(&procs, &channel).await;
    let at = procs[0].port;
    let source = master_of(&procs, at, &channel);
    let target = procs
        .iter()
        .find(|p| p.port != source.port && cli(p.port, &["ROLE"]).starts_with("master"))
        .expect("another master");
    let slot = cli(at, &["CLUSTER", "KEYSLOT", &format!("bc:{{{channel}}}")]);
    let (source_id, target_id) = (node_id(source), node_id(target));

    // What `redis-cli --cluster reshard` does for one slot.
    let ok = |what: &str, out: String| assert_eq!(out, "OK", "{what}");
    ok(
        "importing",
        cli(
            target.port,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id],
        ),
    );
    ok(
        "migrating",
        cli(
            source.port,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
        ),
    );
    let keys = cli(source.port, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!(!keys.is_empty(), "the channel's keys are in slot {slot}");
    let port = target.port.to_string();
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
    migrate.extend(&keys);
    ok("migrate", cli(source.port, &migrate));
    for p in &procs {
        if cli(p.port, &["ROLE"]).starts_with("master") {
            ok(
                "node",
                cli(p.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]),
            );
        }
    }
    assert_eq!(master_of(&procs, at, &channel).port, target.port);

    // Publications after the move reach the subscriber from the slot's new master, in order,
    // with their offsets going on from 20 under the same epoch (the keys moved with the slot).
    for n in 21..=40u64 {
        let offset = within(T, "a publish after the move", async {
            loop {
                if let Some(o) = publish(&a, &channel, n).await {
                    return o;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(offset, n);
    }
    for n in 21..=40u64 {
        let m = next_of(&mut sub, &channel).await;
        assert_eq!(m["payload"], json!(n), "{m}");
        assert_eq!(m["offset"], json!(n), "{m}");
    }
    let shard = shard_subscribers(target.port, &channel);
    assert!(
        shard.ends_with('1'),
        "SHARDNUMSUB on the new master: {shard}"
    );
    // A resume across the move is complete: the history moved with the slot.
    let r = resume(&b, &channel, 30, &epoch).await;
    assert_eq!(r["recovered"], json!(true), "{r}");
}
