//! `broadcaster connect` recovers what it missed while its connection was down (SPEC section 2,
//! issue 6): the test cuts its TCP connection through a proxy, publishes meanwhile, and expects
//! every message printed once, in order, after the reconnect.

mod common;

use common::*;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy whose connections can all be cut at once.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<tokio::sync::Notify>,
}

async fn proxy(to: std::net::SocketAddr) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cut = Arc::new(tokio::sync::Notify::new());
    let cut2 = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let cut = cut2.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.notified() => {}
                }
            });
        }
    });
    Proxy { addr, cut }
}

fn printed(lines: &Mutex<Vec<String>>) -> Vec<String> {
    lines.lock().expect("lines").clone()
}

async fn wait_for(lines: &Mutex<Vec<String>>, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while printed(lines).len() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: printed so far {:?}",
            printed(lines)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connect_reconnects_and_recovers_what_it_missed() {
    let s = Server::start(ServerOpts::default());
    // Another subscriber keeps the channel (and its epoch) alive while the client is away.
    let mut keeper = s.ws_authed("keeper").await;
    keeper.subscribe("room").await;
    let p = proxy(s.public).await;

    let mut cmd = tokio::process::Command::new(bin());
    let mut child = cmd
        .args([
            "connect",
            "--url",
            &format!("ws://{}/ws", p.addr),
            "--token",
            &s.token_all("terminal"),
            "--channel",
            "room",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn connect");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let stdout = child.stdout.take().expect("stdout");
    tokio::spawn(async move {
        let mut r = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(l)) = r.next_line().await {
            sink.lock().expect("lines").push(l);
        }
    });

    // Live: publish until the client shows it is subscribed.
    let deadline = Instant::now() + T;
    let mut n = 0;
    while printed(&lines).is_empty() {
        assert!(
            Instant::now() < deadline,
            "connect never printed a broadcast"
        );
        n += 1;
        s.publish("room", "live", &n.to_string()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Messages published before the subscription started are not for it.
    let first: usize = printed(&lines)[0]
        .rsplit(": ")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a numeric payload");
    let live = n - first + 1;
    wait_for(&lines, live, "live messages").await;

    // Cut the connection, publish while it is down, and let it come back.
    p.cut.notify_waiters();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 1..=5 {
        s.publish("room", "missed", &(n + i).to_string()).await;
    }
    wait_for(&lines, live + 5, "recovered messages").await;
    s.publish("room", "after", &(n + 6).to_string()).await;
    wait_for(&lines, live + 6, "live after the reconnect").await;

    let got = printed(&lines);
    let payloads: Vec<String> = got
        .iter()
        .map(|l| l.rsplit(": ").next().unwrap_or_default().to_string())
        .collect();
    let expected: Vec<String> = (first..=n + 6).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "every message once, in order: {got:?}");
    assert!(got[live].starts_with("room missed: "), "{got:?}");
}
