//! `--peer nchan` against a real Nchan: nginx with libnginx-mod-nchan (Debian packages `nginx`
//! and `libnginx-mod-nchan`), started here with loadtest/nchan/nginx.conf.template on a free
//! loopback port. A missing nginx or module fails the test: the adapter is only proven by
//! running it against the real peer.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NGINX: &str = "/usr/sbin/nginx";
const MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";
const TEMPLATE: &str = include_str!("../nchan/nginx.conf.template");

/// nginx, killed when the test ends however it ends.
struct Nchan {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Drop for Nchan {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nchan {
    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}

fn start_nchan() -> Nchan {
    assert!(
        Path::new(NGINX).exists() && Path::new(MODULE).exists(),
        "{NGINX} or {MODULE} is missing: install the Debian packages `nginx` and \
         `libnginx-mod-nchan` (apt-get install nginx libnginx-mod-nchan)"
    );
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nchan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating nginx's directory");
    let port = free_port();
    let conf = TEMPLATE
        .replace("@DIR@", &dir.display().to_string())
        .replace("@PORT@", &port.to_string());
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("writing nginx.conf");
    let child = Command::new(NGINX)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {NGINX}: {e}"));
    let mut n = Nchan {
        child,
        addr: format!("127.0.0.1:{port}"),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(&n.addr).is_ok() {
            return n;
        }
        if let Ok(Some(status)) = n.child.try_wait() {
            panic!(
                "nginx exited ({status}) at start; its error log:\n{}",
                n.error_log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not listen on {} within 30 s; its error log:\n{}",
            n.addr,
            n.error_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loadtest(n: &Nchan, args: &[&str], json: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_broadcaster-loadtest"))
        .args(args)
        .args(["--peer", "nchan", "--server", &n.addr, "--quiet"])
        .arg("--server-pid")
        .arg(n.child.id().to_string())
        .arg("--json")
        .arg(json)
        // No token or key goes to Nchan: a secret in the environment must not matter.
        .env_remove("BROADCASTER_AUTH_JWT_SECRET")
        .env_remove("BROADCASTER_AUTH_API_KEYS")
        .output()
        .expect("running broadcaster-loadtest")
}

/// Runs the load generator, requires a PASS, returns the JSON summary.
fn passes(n: &Nchan, args: &[&str], name: &str) -> serde_json::Value {
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nchan-{name}.json"));
    let out = loadtest(n, args, &json);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "broadcaster-loadtest {args:?} --peer nchan failed ({}):\n{stdout}\n{}\nnginx error log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        n.error_log()
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON summary"))
            .expect("the JSON summary parses");
    assert_eq!(s["passed"], true, "{s:#}");
    assert_eq!(s["peer"], "nchan", "{s:#}");
    assert_eq!(s["connection_failures"], 0, "{s:#}");
    s
}

fn assert_every_delivery(s: &serde_json::Value) {
    for k in ["seq", "offsets"] {
        assert_eq!(s[k]["lost"], 0, "{k} {s:#}");
        assert_eq!(s[k]["duplicated"], 0, "{k} {s:#}");
        assert_eq!(s[k]["reordered"], 0, "{k} {s:#}");
    }
    assert_eq!(s["deliveries"], s["expected_deliveries"], "{s:#}");
    assert_eq!(s["publish"]["errors"], 0, "{s:#}");
}

#[test]
fn fanout_storm_and_idle_drive_nchan() {
    let n = start_nchan();

    let s = passes(
        &n,
        &["fanout", "-s", "50", "--rate", "100", "--duration", "1"],
        "fanout",
    );
    assert_every_delivery(&s);
    let published = s["publish"]["published"].as_u64().unwrap_or(0);
    assert!(published >= 90, "{s:#}");
    assert_eq!(s["deliveries"].as_u64(), Some(50 * published), "{s:#}");
    assert_eq!(
        s["latency"]["count"].as_u64(),
        Some(50 * published),
        "{s:#}"
    );
    assert!(s["server_cpu_us_per_delivery"].as_f64().is_some(), "{s:#}");

    let s = passes(
        &n,
        &[
            "chat",
            "-c",
            "4",
            "-k",
            "5",
            "--rate",
            "0",
            "--window",
            "4",
            "--messages",
            "400",
        ],
        "chat-window",
    );
    assert_every_delivery(&s);
    assert_eq!(s["deliveries"], 5 * 400, "{s:#}");

    let s = passes(&n, &["storm", "-n", "200"], "storm");
    assert_eq!(s["subscribed"], 200, "{s:#}");
    assert!(
        s["server_cpu_us_per_connection"].as_f64().is_some(),
        "{s:#}"
    );

    // Twice on the same channels: the second run's subscribers must not be handed the first
    // run's publication (`nchan_subscriber_first_message newest`), which would count as a
    // duplicate.
    let prefix = format!("nchan-test-{}", std::process::id());
    for round in ["idle-1", "idle-2"] {
        let s = passes(
            &n,
            &[
                "idle",
                "-n",
                "200",
                "--hold",
                "1",
                "--channel-prefix",
                &prefix,
            ],
            round,
        );
        assert_every_delivery(&s);
        assert_eq!(s["deliveries"], 200, "{s:#}");
    }

    // What needs Broadcaster's protocol refuses the peer, saying so.
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nchan-refused.json");
    for args in [
        &["recovery"][..],
        &["fanout", "--via", "ws"],
        &["storm", "--compress"],
    ] {
        let out = loadtest(&n, args, &json);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("peer"), "{args:?}: {stderr}");
    }
}
