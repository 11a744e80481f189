//! The command line of SPEC section 2: `token`, `publish`, `connect`, dev mode, configuration
//! errors and precedence, and graceful shutdown on SIGTERM/SIGINT.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn stdout_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

// ----- token ------------------------------------------------------------------------------

#[tokio::test]
async fn token_prints_a_verifiable_jwt_on_the_last_line() {
    let out = run_cli(
        &[
            "token",
            "--secret",
            "cli-secret-xyz",
            "--sub",
            "user-1",
            "--channel",
            "contest/a/*",
            "--channel",
            "news",
            "--scope",
            "subscribe,publish",
            "--ttl",
            "1h",
        ],
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr_of(&out)
    );
    let stdout = stdout_of(&out);
    let token = last_line(&stdout);
    assert_eq!(
        token.split('.').count(),
        3,
        "a JWT alone on the last line: {stdout:?}"
    );
    let claims = decode_token(token, "cli-secret-xyz").expect("token verifies with the secret");
    assert!(decode_token(token, "another-secret").is_err());
    assert_eq!(claims["sub"], json!("user-1"));
    assert_eq!(claims["authorizedChannels"], json!(["contest/a/*", "news"]));
    assert_eq!(claims["scope"], json!(["subscribe", "publish"]));
    let aud_ok = claims["aud"] == json!("broadcaster")
        || claims["aud"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("broadcaster")));
    assert!(aud_ok, "aud: {claims}");
    let exp = claims["exp"].as_i64().expect("exp");
    assert!(
        (exp - (now_secs() + 3600)).abs() <= 60,
        "exp one hour ahead: {claims}"
    );
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);

    // It works against a server with the same secret.
    let s = Server::start(ServerOpts {
        secret: Some("cli-secret-xyz".into()),
        ..Default::default()
    });
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(token).await;
    ws.subscribe("contest/a/x").await;
    ws.call_err("subscribe", json!({"channel": "other"}), "PermissionDenied")
        .await;
    let r = ws
        .call(
            "publish",
            json!({"channel": "news", "event": "e", "payload": 1}),
        )
        .await;
    assert_eq!(r["offset"], json!(1));

    // Another ttl.
    let out = run_cli(
        &[
            "token",
            "--secret",
            "s2",
            "--sub",
            "u",
            "--channel",
            "*",
            "--scope",
            "subscribe",
            "--ttl",
            "30m",
        ],
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let claims = decode_token(last_line(&stdout_of(&out)), "s2").expect("verifies");
    assert_eq!(claims["scope"], json!(["subscribe"]));
    let exp = claims["exp"].as_i64().unwrap();
    assert!(
        (exp - (now_secs() + 1800)).abs() <= 60,
        "exp 30 minutes ahead: {claims}"
    );
}

/// SPEC 16: `token --info` sets the `info` claim, which the server then shows in presence; an
/// info that is not a JSON object is refused with a message naming the flag.
#[tokio::test]
async fn token_info_sets_the_claim_and_must_be_an_object() {
    let args = |info: &'static str| {
        [
            "token",
            "--secret",
            SECRET,
            "--sub",
            "u-alice",
            "--channel",
            "chat/*",
            "--scope",
            "subscribe,publish,presence",
            "--info",
            info,
        ]
    };
    let out = run_cli(
        &args(r#"{"username":"alice"}"#),
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let token = last_line(&stdout_of(&out)).to_string();
    let claims = decode_token(&token, SECRET).expect("token verifies with the secret");
    assert_eq!(claims["info"], json!({"username": "alice"}), "{claims}");
    assert_eq!(claims["scope"], json!(["subscribe", "publish", "presence"]));

    let s = Server::start(ServerOpts {
        config_toml: Some(PRESENCE_RULES.into()),
        ..Default::default()
    });
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&token).await;
    let r = ws.subscribe("chat/x").await;
    assert_eq!(
        r["presence"]["members"],
        json!([{"user": "u-alice", "info": {"username": "alice"}}]),
        "{r}"
    );

    for (info, says) in [
        ("[1]", "must be a JSON object"),
        ("\"alice\"", "must be a JSON object"),
        ("{\"username\":", "not JSON"),
    ] {
        let out = run_cli(&args(info), &[], Duration::from_secs(10)).await;
        assert!(!out.status.success(), "--info {info} was accepted");
        let err = stderr_of(&out);
        assert!(
            err.contains("--info") && err.contains(says),
            "{info}: {err}"
        );
        assert!(
            stdout_of(&out).trim().is_empty(),
            "a token was printed for {info}"
        );
    }
}

// ----- publish and connect ------------------------------------------------------------------

#[tokio::test]
async fn publish_command_prints_the_json_result() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    ws.subscribe("cli").await;
    let url = format!("http://{}", s.public);
    let out = run_cli(
        &[
            "publish",
            "--url",
            &url,
            "--api-key",
            API_KEY,
            "--channel",
            "cli",
            "--event",
            "from-cli",
            "--payload",
            r#"{"x": [1, 2]}"#,
        ],
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr_of(&out)
    );
    let stdout = stdout_of(&out);
    let v: Value = serde_json::from_str(stdout.trim())
        .or_else(|_| serde_json::from_str(last_line(&stdout)))
        .unwrap_or_else(|e| panic!("stdout is not the JSON result ({e}): {stdout:?}"));
    assert_eq!(v["offset"], json!(1), "{v}");
    let b = ws.recv_broadcast().await;
    assert_eq!(b["id"], v["id"]);
    assert_eq!(b["event"], json!("from-cli"));
    assert_eq!(b["payload"], json!({"x": [1, 2]}));

    // A bad key is a failure exit.
    let out = run_cli(
        &[
            "publish",
            "--url",
            &url,
            "--api-key",
            "nope",
            "--channel",
            "cli",
            "--event",
            "e",
            "--payload",
            "1",
        ],
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(!out.status.success(), "publish with a bad key must fail");
}

/// Issue 14: `broadcaster publish --payload` sends the payload exactly as given: a re-encoder
/// would change `1.0e10`, key order, spacing and escapes. Invalid JSON is refused before
/// anything is sent.
/// `broadcaster publish` of `payload` to `channel`, event `e`.
async fn cli_publish(url: &str, channel: &str, payload: &str) -> std::process::Output {
    let args = [
        "publish",
        "--url",
        url,
        "--api-key",
        API_KEY,
        "--channel",
        channel,
        "--event",
        "e",
        "--payload",
        payload,
    ];
    run_cli(&args, &[], Duration::from_secs(10)).await
}

#[tokio::test]
async fn publish_command_sends_the_payload_exactly_as_given() {
    let s = Server::start(ServerOpts::default());
    let mut ws = s.ws_authed("u").await;
    ws.subscribe("exact").await;
    let url = format!("http://{}", s.public);
    let mut payloads = vec![r#"{"from":"cli","n":1.0e10}"#.to_string()];
    payloads.extend(hard_payloads());
    for payload in &payloads {
        let out = cli_publish(&url, "exact", payload).await;
        assert!(out.status.success(), "{payload:.60}: {}", stderr_of(&out));
        assert_eq!(raw_payload(&ws.recv_broadcast_raw().await), payload);
    }
    for (payload, says) in [("{\"a\":1", "EOF while parsing"), ("1 2", "trailing")] {
        let out = cli_publish(&url, "exact", payload).await;
        assert!(!out.status.success(), "{payload} was accepted");
        let err = stderr_of(&out);
        assert!(err.contains("--payload") && err.contains(says), "{err}");
    }
    ws.expect_no_broadcast(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn connect_command_prints_broadcasts_and_publishes_stdin_lines() {
    let s = Server::start(ServerOpts::default());
    let mut watcher = s.ws_authed("watcher").await;
    watcher.subscribe("chat").await;

    let mut cli = spawn_cli(&s.ws_url(), &s.token_all("terminal"), &["chat"]);
    let lines = cli.out.clone();
    let child = &mut cli.child;

    // Wait until the terminal client is subscribed.
    let deadline = Instant::now() + T;
    loop {
        let r = http_get_key(s.public, "/channels", API_KEY).await;
        let v = r.json();
        let n = v["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["channel"] == json!("chat")))
            .and_then(|c| c["subscribers"].as_u64())
            .unwrap_or(0);
        if n == 2 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let err = printed(&cli.err).join("\n");
            panic!("broadcaster connect exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "connect never subscribed: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Printed as published, byte for byte: numbers, spacing and escapes untouched.
    let payload = r#"{"n":1.0e10, "big":123456789012345678901234567890,"s":"\ud83d"}"#;
    s.publish("chat", "note", payload).await;
    watcher.recv_broadcast_raw().await;
    let expected = format!("chat note: {payload}");
    let deadline = Instant::now() + T;
    while !printed(&lines).contains(&expected) {
        assert!(
            Instant::now() < deadline,
            "connect did not print the broadcast: {:?}",
            lines.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"typed line\n").await.unwrap();
    stdin.flush().await.unwrap();
    let raw = watcher.recv_broadcast_raw().await;
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["params"]["event"], json!("message"), "{raw}");
    assert_eq!(v["params"]["channel"], json!("chat"), "{raw}");
    assert!(raw.contains("typed line"), "{raw}");
    let _ = child.kill().await;
}

const PRESENCE_RULES: &str =
    "[[channels]]\npattern = \"chat/*\"\npresence = true\njoin_leave = true\n";

/// A member of `chat/*` with `info.username` = `name`, its `sub` another word, so what is shown
/// can only come from the info claim.
fn chat_token(s: &Server, name: &str) -> String {
    TokenSpec::new(&s.secret, &format!("u-{name}"))
        .channels(&["chat/*"])
        .scope(&["subscribe", "publish", "presence"])
        .info(json!({ "username": name }))
        .mint()
}

/// Waits for a line equal to `want` in `lines`; returns its index.
async fn wait_line(lines: &Mutex<Vec<String>>, want: &str, other: &Mutex<Vec<String>>) -> usize {
    let deadline = Instant::now() + T;
    loop {
        if let Some(i) = lines.lock().unwrap().iter().position(|l| l == want) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "no line {want:?}; printed {:?}; the other stream {:?}",
            lines.lock().unwrap(),
            other.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SPEC 16 "CLI", seed 004: `connect` says whom it connected as and who is there, shows
/// `bob joined chat/x`, `bob: Hello everyone!` and `bob left chat/x`, and its own lines come
/// back as `alice: ...`; a REST publication (no `from`) keeps the `channel event: payload` form.
#[tokio::test]
async fn connect_command_is_a_chat_with_presence() {
    let s = Server::start(ServerOpts {
        config_toml: Some(PRESENCE_RULES.into()),
        ..Default::default()
    });
    // Carol is there before alice: in the list at start, and never shown as joining.
    let mut carol = Ws::connect(s.public).await;
    carol.auth_ok(&chat_token(&s, "carol")).await;
    carol.subscribe("chat/x").await;

    let mut cli = spawn_cli(&s.ws_url(), &chat_token(&s, "alice"), &["chat/x"]);
    let (out, err) = (cli.out.clone(), cli.err.clone());
    let child = &mut cli.child;
    wait_line(&err, &format!("connected to {} as alice", s.ws_url()), &out).await;
    let at_start = [
        "in chat/x: alice, carol (2)".to_string(),
        "in chat/x: carol, alice (2)".to_string(),
    ];
    let deadline = Instant::now() + T;
    while !out.lock().unwrap().iter().any(|l| at_start.contains(l)) {
        assert!(
            Instant::now() < deadline,
            "no member list: {:?} {:?}",
            out,
            err
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Carol sees alice join: the CLI's subscription is made.
    let join = carol.recv_note(T).await;
    assert_eq!(join["params"]["user"], json!("u-alice"), "{join}");

    let mut bob = Ws::connect(s.public).await;
    bob.auth_ok(&chat_token(&s, "bob")).await;
    bob.subscribe("chat/x").await;
    let joined = wait_line(&out, "bob joined chat/x", &err).await;
    let params = json!({"channel": "chat/x", "event": "message", "payload": "Hello everyone!"});
    bob.call("publish", params).await;
    let said = wait_line(&out, "bob: Hello everyone!", &err).await;
    s.publish("chat/x", "message", r#""from REST""#).await;
    let rest = wait_line(&out, r#"chat/x message: "from REST""#, &err).await;

    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"Hi bob!\n").await.unwrap();
    stdin.flush().await.unwrap();
    let typed = wait_line(&out, "alice: Hi bob!", &err).await;

    drop(bob);
    let left = wait_line(&out, "bob left chat/x", &err).await;
    assert!(joined < said && said < rest && rest < typed && typed < left);
    // Nothing twice, and no join of anyone the list at start already showed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let printed = out.lock().unwrap().clone();
    for l in [
        "bob joined chat/x",
        "bob left chat/x",
        "bob: Hello everyone!",
    ] {
        assert_eq!(
            printed.iter().filter(|p| *p == l).count(),
            1,
            "{l}: {printed:?}"
        );
    }
    assert!(
        !printed
            .iter()
            .any(|l| l.contains("carol joined") || l.contains("alice joined")),
        "{printed:?}"
    );
    let _ = child.kill().await;
}

#[tokio::test]
async fn serve_help_documents_the_flags() {
    let out = run_cli(&["serve", "--help"], &[], Duration::from_secs(10)).await;
    assert!(out.status.success());
    let text = stdout_of(&out);
    for flag in ["--config", "--listen", "--admin-listen", "--shards"] {
        assert!(text.contains(flag), "serve --help lacks {flag}:\n{text}");
    }
    // SPEC 14: the rules have no environment form, and --help says so.
    assert!(
        text.contains("[[channels]]") && text.contains("file only"),
        "{text}"
    );
}

#[tokio::test]
async fn bare_binary_runs_the_server() {
    let s = Server::start(ServerOpts {
        bare: true,
        env: vec![
            ("BROADCASTER_LISTEN".into(), "127.0.0.1:0".into()),
            ("BROADCASTER_SHARDS".into(), "1".into()),
        ],
        ..Default::default()
    });
    assert_eq!(http_get(s.public, "/health").await.status, 200);
}

// ----- dev mode -----------------------------------------------------------------------------

/// Every word of `text` and its pieces around `=`, `:` and `,`.
fn candidates(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || "\"'`<>()[]{}".contains(c)) {
        let mut push = |w: &str| {
            let w = w.trim_matches(|c: char| ",;.".contains(c));
            if w.len() >= 8 {
                out.insert(w.to_string());
            }
        };
        push(word);
        for piece in word.split(['=', ':', ',']) {
            push(piece);
        }
    }
    out
}

#[tokio::test]
async fn dev_mode_prints_working_credentials() {
    let s = Server::start(ServerOpts {
        secret: None,
        api_keys: vec![],
        shards: 1,
        ..Default::default()
    });
    let stdout = s.stdout_head.join("\n");
    let words = candidates(&stdout);
    let token = words
        .iter()
        .find(|w| w.starts_with("eyJ") && w.split('.').count() == 3)
        .unwrap_or_else(|| panic!("no token in dev-mode stdout:\n{stdout}"))
        .clone();
    let secret = words
        .iter()
        .find(|w| **w != token && decode_token(&token, w).is_ok())
        .unwrap_or_else(|| {
            panic!("the printed token is not signed by any printed secret:\n{stdout}")
        })
        .clone();
    let claims = decode_token(&token, &secret).unwrap();
    assert!(
        stdout.contains("publish"),
        "dev mode prints a publish example:\n{stdout}"
    );

    // The API key is one of the printed words.
    let mut key = None;
    for w in words.iter().filter(|w| **w != token) {
        let r = http_post_key(
            s.public,
            "/publish",
            w,
            r#"{"channel":"probe","event":"e","payload":1}"#,
        )
        .await;
        if r.status == 200 {
            key = Some(w.clone());
            break;
        }
        assert_eq!(r.status, 401, "{}", r.text());
    }
    let key = key.unwrap_or_else(|| panic!("no printed word is a working API key:\n{stdout}"));

    // End to end: the printed token subscribes, the printed key publishes.
    let pattern = claims["authorizedChannels"][0]
        .as_str()
        .unwrap_or_else(|| panic!("dev token authorizes no channel: {claims}"));
    let channel = match pattern.strip_suffix('*') {
        Some(prefix) => format!("{prefix}devtest"),
        None => pattern.to_string(),
    };
    let mut ws = Ws::connect(s.public).await;
    ws.auth_ok(&token).await;
    ws.subscribe(&channel).await;
    let r = http_post_key(
        s.public,
        "/publish",
        &key,
        &publish_body(&channel, "dev", r#"{"hello":"dev"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = ws.recv_broadcast().await;
    assert_eq!(b["id"], r.json()["id"]);
    assert_eq!(b["payload"], json!({"hello": "dev"}));

    // Dev mode serves the playground page.
    let r = http_get(s.public, "/").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.contains("text/html")),
        "{}",
        r.head
    );
    assert!(r.text().to_ascii_lowercase().contains("<html"));
}

#[tokio::test]
async fn dev_mode_refuses_a_non_loopback_address() {
    let out = run_cli(
        &["serve", "--listen", "0.0.0.0:0", "--shards", "1"],
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(!out.status.success(), "dev mode must refuse 0.0.0.0");
    assert!(
        !stdout_of(&out).contains("listening public="),
        "{}",
        stdout_of(&out)
    );
    let err = stderr_of(&out);
    assert!(
        !err.contains("panicked"),
        "a clear error, not a panic: {err}"
    );
}

// ----- configuration --------------------------------------------------------------------------

async fn expect_config_error(args: &[&str], env: &[(&str, &str)], names: &[&str]) {
    let mut all_env = vec![("BROADCASTER_AUTH_JWT_SECRET", SECRET)];
    all_env.extend_from_slice(env);
    let mut all_args = vec!["serve", "--listen", "127.0.0.1:0", "--shards", "1"];
    all_args.extend_from_slice(args);
    let out = run_cli(&all_args, &all_env, Duration::from_secs(10)).await;
    let err = stderr_of(&out);
    assert!(
        !out.status.success(),
        "args {args:?} env {env:?} must fail; stdout {}",
        stdout_of(&out)
    );
    assert!(
        !stdout_of(&out).contains("listening public="),
        "must not start listening"
    );
    assert!(
        names.iter().any(|n| err.contains(n)),
        "stderr must name {names:?}: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "a clear error, not a panic: {err}"
    );
}

#[tokio::test]
async fn invalid_config_values_exit_non_zero_naming_the_key() {
    expect_config_error(
        &[],
        &[("BROADCASTER_LIMITS_MAX_FRAME_BYTES", "abc")],
        &[
            "limits.max_frame_bytes",
            "BROADCASTER_LIMITS_MAX_FRAME_BYTES",
        ],
    )
    .await;
    expect_config_error(
        &[],
        &[("BROADCASTER_LIMITS_AUTH_TIMEOUT", "soon")],
        &["limits.auth_timeout", "BROADCASTER_LIMITS_AUTH_TIMEOUT"],
    )
    .await;
    expect_config_error(
        &[],
        &[("BROADCASTER_SHARDS", "many")],
        &["shards", "BROADCASTER_SHARDS"],
    )
    .await;

    let bad_duration = temp_path(".toml");
    std::fs::write(&bad_duration, "[limits]\nauth_timeout = \"ten seconds\"\n").unwrap();
    expect_config_error(
        &["--config", bad_duration.to_str().unwrap()],
        &[],
        &["limits.auth_timeout", "auth_timeout"],
    )
    .await;

    let unknown_key = temp_path(".toml");
    std::fs::write(&unknown_key, "[limits]\nmax_frame_bytez = 5\n").unwrap();
    expect_config_error(
        &["--config", unknown_key.to_str().unwrap()],
        &[],
        &["max_frame_bytez"],
    )
    .await;

    let unknown_top = temp_path(".toml");
    std::fs::write(&unknown_top, "listn = \"127.0.0.1:1\"\n").unwrap();
    expect_config_error(
        &["--config", unknown_top.to_str().unwrap()],
        &[],
        &["listn"],
    )
    .await;

    let wrong_type = temp_path(".toml");
    std::fs::write(&wrong_type, "[limits]\nmax_payload_bytes = \"big\"\n").unwrap();
    expect_config_error(
        &["--config", wrong_type.to_str().unwrap()],
        &[],
        &["max_payload_bytes"],
    )
    .await;

    let missing = temp_path(".toml");
    expect_config_error(
        &["--config", missing.to_str().unwrap()],
        &[],
        &[missing.to_str().unwrap()],
    )
    .await;

    for p in [bad_duration, unknown_key, unknown_top, wrong_type] {
        let _ = std::fs::remove_file(p);
    }
}

#[tokio::test]
async fn flags_beat_environment_which_beats_the_file() {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let file = format!("listen = \"127.0.0.1:{p1}\"\n");
    let start = |env: Vec<(String, String)>, listen: Option<String>| {
        Server::start(ServerOpts {
            shards: 1,
            env,
            listen,
            config_toml: Some(file.clone()),
            ..Default::default()
        })
    };
    let s = start(vec![], None);
    assert_eq!(s.public.port(), p1, "file listen");
    drop(s);
    let env = vec![("BROADCASTER_LISTEN".to_string(), format!("127.0.0.1:{p2}"))];
    let s = start(env.clone(), None);
    assert_eq!(s.public.port(), p2, "env beats file");
    drop(s);
    let s = start(env, Some(format!("127.0.0.1:{p3}")));
    assert_eq!(s.public.port(), p3, "flag beats env");
}

#[tokio::test]
async fn environment_overrides_file_values_and_lists() {
    let s = Server::start(ServerOpts {
        shards: 1,
        api_keys: vec!["env-key-1".into()],
        config_toml: Some(
            "[auth]\njwt_secret = \"file-secret\"\napi_keys = [\"file-key\"]\n\
             [limits]\nmax_subscriptions_per_connection = 1\n"
                .into(),
        ),
        env: vec![(
            "BROADCASTER_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION".into(),
            "2".into(),
        )],
        ..Default::default()
    });
    let body = r#"{"channel":"p","event":"e","payload":1}"#;
    assert_eq!(
        http_post_key(s.public, "/publish", "env-key-1", body)
            .await
            .status,
        200
    );
    http_post_key(s.public, "/publish", "file-key", body)
        .await
        .assert_error(401, "Unauthenticated");

    // The environment's secret is the one in force.
    let mut ws = Ws::connect(s.public).await;
    ws.call_err(
        "auth",
        json!({"token": TokenSpec::new("file-secret", "u").mint()}),
        "Unauthenticated",
    )
    .await;
    ws.auth_ok(&s.token_all("u")).await;
    ws.subscribe("a").await;
    ws.subscribe("b").await;
    ws.call_err("subscribe", json!({"channel": "c"}), "ResourceExhausted")
        .await;

    // Values only in the file apply.
    let s2 = Server::start(ServerOpts {
        shards: 1,
        secret: None,
        api_keys: vec![],
        config_toml: Some(
            "[auth]\njwt_secret = \"file-secret\"\napi_keys = [\"file-key\"]\n".into(),
        ),
        ..Default::default()
    });
    assert_eq!(
        http_post_key(s2.public, "/publish", "file-key", body)
            .await
            .status,
        200
    );
    let mut ws = Ws::connect(s2.public).await;
    ws.auth_ok(&TokenSpec::new("file-secret", "u").mint()).await;
}

// ----- shutdown -------------------------------------------------------------------------------

/// GET /health on a fresh connection: Ok((status, body)) or Err when refused or dropped.
async fn try_health(addr: SocketAddr) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        let mut tmp = vec![0u8; 4096];
        loop {
            match s.read(&mut tmp).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(e.to_string()),
            }
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..p]).to_string();
                if let Some(len) = header_value(&head, "content-length") {
                    if buf.len() >= p + 4 + len.parse::<usize>().unwrap_or(0) {
                        return Ok(());
                    }
                }
            }
        }
    })
    .await;
    match read {
        Err(_) => return Err("no answer within 2s".into()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => {}
    }
    let p = find(&buf, b"\r\n\r\n").ok_or("connection closed without an answer")?;
    let head = String::from_utf8_lossy(&buf[..p]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or("bad status line")?;
    let body: Value = serde_json::from_slice(&buf[p + 4..])
        .map_err(|e| format!("health body not JSON: {e}"))
        .unwrap_or(Value::Null);
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_closes_1001_and_exits_0() {
    let mut s = Server::start(ServerOpts::default().env("BROADCASTER_SHUTDOWN_GRACE", "1s"));
    let mut authed = s.ws_authed("u").await;
    authed.subscribe("bye").await;
    let mut anon = Ws::connect(s.public).await;
    anon.heartbeat_ok().await;
    assert_eq!(
        try_health(s.public).await,
        Ok((200, json!({"status": "ok"})))
    );

    s.signal(libc::SIGTERM);
    let addr = s.public;
    let health = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            match try_health(addr).await {
                Ok((200, body)) if body == json!({"status": "ok"}) => {}
                Ok((503, body)) => {
                    assert_eq!(body, json!({"status": "shutting_down"}));
                    return "503";
                }
                Ok(other) => panic!("health during shutdown answered {other:?}"),
                Err(_) => return "refused",
            }
            assert!(Instant::now() < deadline, "/health still ok after SIGTERM");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    authed.expect_close(1001, Duration::from_secs(5)).await;
    anon.expect_close(1001, Duration::from_secs(5)).await;
    let how = health.await.expect("health poller");
    eprintln!("/health after SIGTERM: {how}");
    let status = s.wait_exit(Duration::from_secs(8)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[tokio::test]
async fn sigint_exits_0() {
    let mut s = Server::start(ServerOpts::default().env("BROADCASTER_SHUTDOWN_GRACE", "1s"));
    let mut ws = s.ws_authed("u").await;
    s.signal(libc::SIGINT);
    ws.expect_close(1001, Duration::from_secs(5)).await;
    let status = s.wait_exit(Duration::from_secs(8)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}
