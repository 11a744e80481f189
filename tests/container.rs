//! The container image (deploy/Dockerfile, deploy/build-image.sh) under a real Docker engine:
//! built from scratch around the test's own binary, run with `--network host` on a loopback port
//! under tuning/seccomp.json and in cluster mode with a Redis it reaches by host name, it serves
//! /health and delivers a publication to a WebSocket subscriber, takes the descriptor limit given
//! with `--ulimit`, and stops with exit 0 on
//! `docker stop`. Under a profile that denies io_uring it exits 1 with the error naming the fix.
//!
//! Needs `docker` and a running `dockerd` (Debian package docker.io; `.ci/run` installs and starts
//! them): without them the test fails, saying so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `docker ARGS`, bounded by `d`.
fn docker(args: &[&str], d: Duration) -> std::process::Output {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run_bounded(cmd, d).unwrap_or_else(|e| {
        panic!(
            "docker {args:?}: {e}. This test needs Docker: apt-get install docker.io, and dockerd \
             running (.ci/run does both)"
        )
    })
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes what a run made, whatever happened to it.
struct Cleanup {
    image: String,
    containers: Vec<String>,
    files: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let mut cmd = Command::new("docker");
            cmd.args(["rm", "-f", c]);
            let _ = run_bounded(cmd, Duration::from_secs(30));
        }
        let mut cmd = Command::new("docker");
        cmd.args(["rmi", "-f", &self.image]);
        let _ = run_bounded(cmd, Duration::from_secs(30));
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Polls /health until it answers `{"status":"ok"}` (in cluster mode: Redis reached) or `d`
/// passes; the last answer and the container's log on failure.
async fn wait_healthy(addr: std::net::SocketAddr, name: &str, d: Duration) {
    let deadline = Instant::now() + d;
    let mut last = String::new();
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            let r = http_get(addr, "/health").await;
            last = format!("{} {}", r.status, r.text());
            if r.status == 200 && r.json() == json!({"status": "ok"}) {
                return;
            }
        }
        // A container that exited (a missing library, a refused configuration) is not waited for.
        let running = docker(
            &["inspect", name, "--format", "{{.State.Running}}"],
            Duration::from_secs(30),
        );
        let exited = String::from_utf8_lossy(&running.stdout).trim() != "true";
        if exited || Instant::now() > deadline {
            let logs = docker(&["logs", name], Duration::from_secs(30));
            panic!(
                "no /health ok on {addr} within {d:?} (last answer: {last:?}; container exited: \
                 {exited}); container log: {}",
                text(&logs)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn image_serves_under_the_shipped_profile_and_explains_a_denied_io_uring() {
    let info = docker(
        &["info", "--format", "{{.ServerVersion}}"],
        Duration::from_secs(30),
    );
    assert!(
        info.status.success(),
        "`docker info` failed: {}. This test needs a Docker engine: apt-get install docker.io and \
         start dockerd (.ci/run does both)",
        text(&info)
    );

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let id = format!("{}-{nanos}", std::process::id());
    let image = format!("broadcaster-test:{id}");
    let name = format!("broadcaster-test-{id}");
    let denied_name = format!("broadcaster-test-{id}-denied");
    let deny_profile = temp_path("-deny-io_uring.json");
    let _cleanup = Cleanup {
        image: image.clone(),
        containers: vec![name.clone(), denied_name.clone()],
        files: vec![deny_profile.clone()],
    };

    // The image around the binary under test (the debug build: no release build for the test).
    let mut build = Command::new(repo().join("deploy/build-image.sh"));
    build.args(["--binary", bin(), &image]);
    let built = run_bounded(build, Duration::from_secs(300)).expect("run deploy/build-image.sh");
    assert!(built.status.success(), "build-image.sh: {}", text(&built));
    println!("{}", String::from_utf8_lossy(&built.stdout).trim());
    let user = docker(
        &["image", "inspect", &image, "--format", "{{.Config.User}}"],
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");

    // Cluster mode with Redis named by host name: the image's glibc must resolve it (its files
    // and dns lookups are built in; the engine mounts /etc/hosts).
    let redis_port = free_port().to_string();
    let mut redis = Command::new("redis-server");
    redis
        .args(["--bind", "127.0.0.1", "-::1", "--port", &redis_port])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null());
    kill_with_parent(&mut redis);
    let _redis = KillOnDrop(redis.spawn().unwrap_or_else(|e| {
        panic!("cannot run redis-server ({e}): this test needs it (Debian package redis-server)")
    }));
    let redis_env = format!("BROADCASTER_REDIS_URL=redis://localhost:{redis_port}");

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let seccomp = format!("seccomp={}", repo().join("tuning/seccomp.json").display());
    let secret_env = format!("BROADCASTER_AUTH_JWT_SECRET={SECRET}");
    let keys_env = format!("BROADCASTER_AUTH_API_KEYS={API_KEY}");
    let run = docker(
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--security-opt",
            &seccomp,
            // Below the engine's own limit: raising past it needs CAP_SYS_RESOURCE, which some
            // sandboxes (these machines) do not give even to root.
            "--ulimit",
            "nofile=8192:8192",
            "-e",
            &secret_env,
            "-e",
            &keys_env,
            "-e",
            &redis_env,
            &image,
            "serve",
            "--listen",
            &listen,
            "--shards",
            "1",
        ],
        Duration::from_secs(60),
    );
    assert!(run.status.success(), "docker run: {}", text(&run));
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    wait_healthy(addr, &name, Duration::from_secs(20)).await;

    // One publication reaches a WebSocket subscriber.
    let mut ws = Ws::connect(addr).await;
    let token = TokenSpec::new(SECRET, "alice")
        .channels(&["container/*"])
        .scope(&["subscribe"])
        .mint();
    ws.auth_ok(&token).await;
    ws.subscribe("container/news").await;
    let r = http_post_key(
        addr,
        "/publish",
        API_KEY,
        &publish_body("container/news", "hello", r#"{"from":"docker"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "publish: {}", r.text());
    let b = within(T, "the broadcast", ws.recv_broadcast()).await;
    assert_eq!(b["channel"], "container/news");
    assert_eq!(b["event"], "hello");
    assert_eq!(b["payload"], json!({"from": "docker"}));
    assert_eq!(b["offset"], r.json()["offset"]);

    // The descriptor limit is the one given to docker run.
    let metrics = http_get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metric_sum(&metrics.text(), "process_max_fds"),
        Some(8192.0),
        "the container's nofile limit"
    );

    // docker stop sends SIGTERM: the server drains and exits 0.
    drop(ws);
    let stop = docker(&["stop", "-t", "10", &name], Duration::from_secs(30));
    assert!(stop.status.success(), "docker stop: {}", text(&stop));
    let code = docker(
        &["inspect", &name, "--format", "{{.State.ExitCode}}"],
        Duration::from_secs(30),
    );
    let logs = docker(&["logs", &name], Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&code.stdout).trim(),
        "0",
        "exit status after docker stop; log: {}",
        text(&logs)
    );

    // What Docker 25+, containerd and Podman do by default: io_uring denied with EPERM.
    std::fs::write(
        &deny_profile,
        json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{
                "names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 1
            }]
        })
        .to_string(),
    )
    .unwrap();
    let deny = format!("seccomp={}", deny_profile.display());
    let listen2 = format!("127.0.0.1:{}", free_port());
    let denied = docker(
        &[
            "run",
            "--name",
            &denied_name,
            "--network",
            "host",
            "--security-opt",
            &deny,
            "-e",
            &secret_env,
            &image,
            "serve",
            "--listen",
            &listen2,
        ],
        Duration::from_secs(60),
    );
    let said = text(&denied);
    assert_eq!(denied.status.code(), Some(1), "exit status; output: {said}");
    for needle in [
        "io_uring is not available",
        "A seccomp filter blocks the io_uring system calls",
        "--security-opt seccomp=tuning/seccomp.json",
    ] {
        assert!(said.contains(needle), "no {needle:?} in: {said}");
    }
}
