//! Each test starts a real HTTP receiver on 127.0.0.1 port 0 and checks the exact requests.

use super::sender::sign;
use super::*;
use hmac::Mac;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Request {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

impl Request {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// `name channel [user]` of each event.
    fn events(&self) -> Vec<String> {
        let json = self.json();
        json["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut line = format!(
                    "{} {}",
                    e["name"].as_str().unwrap(),
                    e["channel"].as_str().unwrap()
                );
                if let Some(user) = e.get("user") {
                    line.push(' ');
                    line.push_str(user.as_str().unwrap());
                }
                line
            })
            .collect()
    }
}

/// A backend: answers each request with the next scripted status (200 once the script is
/// spent) and records it.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    fn start(script: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(listener, script)
    }

    fn serve(listener: TcpListener, script: &[u16]) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(
            script.iter().copied().collect::<VecDeque<u16>>(),
        ));
        let recorded = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (recorded, script) = (recorded.clone(), script.clone());
                std::thread::spawn(move || answer(stream, &recorded, &script));
            }
        });
        Receiver { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        lock(&self.requests).clone()
    }

    /// Waits (at most 3 s) until `n` requests have come, and returns them.
    fn wait_for(&self, n: usize) -> Vec<Request> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{n} requests expected, got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Serves one keep-alive connection: each request recorded and answered.
fn answer(stream: TcpStream, recorded: &Mutex<Vec<Request>>, script: &Mutex<VecDeque<u16>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        assert_eq!(line, "POST /hooks HTTP/1.1\r\n");
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
        }
        let length: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let at = Instant::now();
        lock(recorded).push(Request { headers, body, at });
        let status = lock(script).pop_front().unwrap_or(200);
        let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn hook(url: &str) -> WebhookConfig {
    WebhookConfig {
        url: url.to_string(),
        secret: "s3cret".to_string(),
        vacated_delay: Duration::ZERO,
        batch_delay: Duration::from_millis(5),
        timeout: Duration::from_millis(500),
        retry_max_delay: Duration::from_millis(100),
        ..WebhookConfig::default()
    }
}

fn start(config: WebhookConfig) -> (Webhooks, Arc<WebhookMetrics>) {
    let metrics = Arc::new(WebhookMetrics::default());
    (
        Webhooks::start(&[config], metrics.clone()).unwrap(),
        metrics,
    )
}

fn counted(metrics: &WebhookMetrics) -> (u64, u64, u64) {
    (
        metrics.events_total[0].load(Relaxed),
        metrics.events_total[1].load(Relaxed),
        metrics.dropped_total.load(Relaxed),
    )
}

/// The counts once they are `want` (or after 3 s): the receiver holds a request before the
/// sender has read the answer and counted it.
fn counted_as(metrics: &WebhookMetrics, want: (u64, u64, u64)) -> (u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while counted(metrics) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    counted(metrics)
}

#[test]
fn event_names_are_the_configured_ones() {
    let names: Vec<&str> = Event::ALL.iter().map(|e| e.name()).collect();
    assert_eq!(names, WEBHOOK_EVENTS);
    assert!(Webhooks::start(&[], Arc::new(WebhookMetrics::default())).is_none());
}

#[test]
fn bodies_are_signed_and_exact() {
    let receiver = Receiver::start(&[]);
    let (hooks, metrics) = start(hook(&receiver.url()));
    let before = crate::clock::unix_ms();
    hooks.emit(Event::Occupied, "a\"b\\c\u{1}é", Some("ignored"));
    hooks.emit(Event::MemberAdded, "c", Some("u\"1"));
    hooks.emit(Event::MemberRemoved, "c", None);
    let requests = receiver.wait_for(1);
    let request = &requests[0];
    assert_eq!(request.headers["content-type"], "application/json");
    let expected = sign(b"s3cret", &request.body);
    assert_eq!(request.headers["x-broadcaster-signature"], expected);
    assert_eq!(expected.len(), 64);
    assert!(expected
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    // A reference HMAC, computed apart from the sender's.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(&request.body);
    let reference: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(request.headers["x-broadcaster-signature"], reference);
    let json = request.json();
    let id = json["id"].as_str().unwrap().to_string();
    let time_ms = json["timeMs"].as_u64().unwrap();
    assert!(time_ms >= before && time_ms <= crate::clock::unix_ms());
    let exact = format!(
        "{{\"id\":\"{id}\",\"timeMs\":{time_ms},\"events\":[\
         {{\"name\":\"channel_occupied\",\"channel\":\"a\\\"b\\\\c\\u0001é\"}},\
         {{\"name\":\"member_added\",\"channel\":\"c\",\"user\":\"u\\\"1\"}},\
         {{\"name\":\"member_removed\",\"channel\":\"c\"}}]}}"
    );
    assert_eq!(String::from_utf8(request.body.clone()).unwrap(), exact);
    assert_eq!(counted_as(&metrics, (3, 0, 0)), (3, 0, 0));
    hooks.emit(Event::Vacated, "a", None);
    let second = receiver.wait_for(2)[1].json();
    assert_ne!(
        second["id"].as_str().unwrap(),
        id,
        "each batch has its own id"
    );
    hooks.stop(Duration::from_secs(1));
}

#[test]
fn batches_hold_at_most_batch_max_and_wait_batch_delay() {
    let receiver = Receiver::start(&[]);
    let (hooks, metrics) = start(WebhookConfig {
        batch_max: 3,
        batch_delay: Duration::from_millis(1000),
        ..hook(&receiver.url())
    });
    let start = Instant::now();
    for n in 0..7 {
        hooks.emit(Event::Occupied, &format!("c{n}"), None);
    }
    let requests = receiver.wait_for(3);
    let events: Vec<Vec<String>> = requests.iter().map(Request::events).collect();
    assert_eq!(
        events,
        [
            vec![
                "channel_occupied c0",
                "channel_occupied c1",
                "channel_occupied c2"
            ],
            vec![
                "channel_occupied c3",
                "channel_occupied c4",
                "channel_occupied c5"
            ],
            vec!["channel_occupied c6"],
        ]
    );
    // Full batches go at once; the last waits for batch_delay.
    assert!(
        requests[1].at - start < Duration::from_millis(900),
        "{:?}",
        requests[1].at - start
    );
    assert!(requests[2].at - start >= Duration::from_millis(1000));
    assert_eq!(counted_as(&metrics, (7, 0, 0)), (7, 0, 0));
    assert_eq!(metrics.queue_depth.load(Relaxed), 0);
    hooks.stop(Duration::from_secs(1));
}

#[test]
fn vacated_waits_and_is_cancelled_by_occupied() {
    let receiver = Receiver::start(&[]);
    let delay = Duration::from_millis(200);
    let (hooks, _) = start(WebhookConfig {
        vacated_delay: delay,
        ..hook(&receiver.url())
    });
    let start = Instant::now();
    hooks.emit(Event::Vacated, "a", None);
    hooks.emit(Event::Vacated, "b", None);
    std::thread::sleep(Duration::from_millis(50));
    hooks.emit(Event::Occupied, "b", None);
    hooks.emit(Event::MemberAdded, "c", Some("u"));
    let requests = receiver.wait_for(2);
    assert_eq!(requests[0].events(), ["member_added c u"]);
    assert!(requests[0].at - start < delay);
    assert_eq!(requests[1].events(), ["channel_vacated a"]);
    assert!(requests[1].at - start >= delay);
    // b flapped: neither its vacated nor its occupied is ever sent.
    std::thread::sleep(delay + Duration::from_millis(50));
    assert_eq!(receiver.requests().len(), 2, "{:?}", receiver.requests());
    // A vacated not followed by an occupied in time is sent, then the occupied too.
    hooks.emit(Event::Vacated, "d", None);
    let requests = receiver.wait_for(3);
    hooks.emit(Event::Occupied, "d", None);
    let requests2 = receiver.wait_for(4);
    assert_eq!(requests[2].events(), ["channel_vacated d"]);
    assert_eq!(requests2[3].events(), ["channel_occupied d"]);
    hooks.stop(Duration::from_secs(1));
}

#[test]
fn a_failed_batch_is_retried_with_the_same_id_and_body() {
    let receiver = Receiver::start(&[500, 503]);
    let (hooks, metrics) = start(hook(&receiver.url()));
    hooks.emit(Event::MemberAdded, "c", Some("u"));
    hooks.emit(Event::MemberRemoved, "c", Some("u"));
    let requests = receiver.wait_for(3);
    assert_eq!(requests[0].body, requests[1].body);
    assert_eq!(requests[1].body, requests[2].body);
    assert_eq!(
        requests[0].headers["x-broadcaster-signature"],
        requests[2].headers["x-broadcaster-signature"]
    );
    // Backoff: about 100 ms (50 to 100 with jitter), then about 100 ms again (the cap).
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_millis(50), "{gap:?}");
    let deadline = Instant::now() + Duration::from_secs(1);
    while counted(&metrics).0 < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(counted(&metrics), (2, 4, 0));
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(receiver.requests().len(), 3, "acknowledged: not sent again");
    hooks.stop(Duration::from_secs(1));
}

#[test]
fn a_full_queue_drops_its_oldest_while_the_receiver_is_down() {
    // A port with nothing listening: connections are refused until the receiver binds it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (hooks, metrics) = start(WebhookConfig {
        queue_max: 3,
        batch_max: 1,
        ..hook(&format!("http://{addr}/hooks"))
    });
    hooks.emit(Event::Occupied, "e1", None);
    // e1 is in the sender's batch, failing; the queue fills behind it.
    let deadline = Instant::now() + Duration::from_secs(3);
    while counted(&metrics).1 == 0 {
        assert!(Instant::now() < deadline, "e1 never attempted");
        std::thread::sleep(Duration::from_millis(2));
    }
    for n in 2..=6 {
        hooks.emit(Event::Occupied, &format!("e{n}"), None);
    }
    assert_eq!(counted(&metrics).2, 2, "e2 and e3 dropped");
    assert_eq!(metrics.queue_depth.load(Relaxed), 3);
    let receiver = Receiver::serve(TcpListener::bind(addr).unwrap(), &[]);
    let requests = receiver.wait_for(4);
    let events: Vec<Vec<String>> = requests.iter().map(Request::events).collect();
    assert_eq!(
        events,
        [
            ["channel_occupied e1"],
            ["channel_occupied e4"],
            ["channel_occupied e5"],
            ["channel_occupied e6"],
        ]
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while counted(&metrics).0 < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let (delivered, failed, dropped) = counted(&metrics);
    assert_eq!((delivered, dropped), (4, 2));
    assert!(failed >= 1);
    assert_eq!(metrics.queue_depth.load(Relaxed), 0);
    hooks.stop(Duration::from_secs(1));
}

#[test]
fn wants_follows_events_and_patterns() {
    let receiver = Receiver::start(&[]);
    let members = WebhookConfig {
        events: vec!["member_added".into(), "member_removed".into()],
        patterns: vec!["chat/*".into(), "lobby".into()],
        ..hook(&receiver.url())
    };
    let channels = WebhookConfig {
        events: vec!["channel_occupied".into()],
        patterns: vec!["contest/*".into()],
        ..hook(&receiver.url())
    };
    let metrics = Arc::new(WebhookMetrics::default());
    let hooks = Webhooks::start(&[members, channels], metrics.clone()).unwrap();
    assert!(hooks.wants(Event::MemberAdded, "chat/1"));
    assert!(hooks.wants(Event::MemberRemoved, "lobby"));
    assert!(!hooks.wants(Event::MemberAdded, "lobby/1"));
    assert!(!hooks.wants(Event::Occupied, "chat/1"));
    assert!(hooks.wants(Event::Occupied, "contest/1"));
    assert!(!hooks.wants(Event::Vacated, "contest/1"));
    assert!(!hooks.wants(Event::MemberAdded, "contest/1"));
    hooks.emit(Event::Vacated, "contest/1", None);
    hooks.emit(Event::Occupied, "chat/1", None);
    hooks.emit(Event::MemberAdded, "other", Some("u"));
    hooks.emit(Event::MemberAdded, "chat/1", Some("u"));
    hooks.emit(Event::Occupied, "contest/1", None);
    let requests = receiver.wait_for(2);
    let mut events: Vec<Vec<String>> = requests.iter().map(Request::events).collect();
    events.sort();
    assert_eq!(
        events,
        [["channel_occupied contest/1"], ["member_added chat/1 u"]]
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(receiver.requests().len(), 2);
    assert_eq!(counted_as(&metrics, (2, 0, 0)), (2, 0, 0));
    hooks.stop(Duration::from_secs(1));
}

#[test]
fn stop_sends_what_is_queued_and_held() {
    let receiver = Receiver::start(&[]);
    let (hooks, metrics) = start(WebhookConfig {
        batch_delay: Duration::from_secs(10),
        vacated_delay: Duration::from_secs(60),
        ..hook(&receiver.url())
    });
    hooks.emit(Event::MemberRemoved, "c", Some("u"));
    hooks.emit(Event::Vacated, "c", None);
    std::thread::sleep(Duration::from_millis(20));
    assert!(receiver.requests().is_empty());
    let start = Instant::now();
    hooks.stop(Duration::from_secs(2));
    assert!(start.elapsed() < Duration::from_secs(1));
    let events: Vec<String> = receiver
        .requests()
        .iter()
        .flat_map(Request::events)
        .collect();
    assert_eq!(events, ["member_removed c u", "channel_vacated c"]);
    assert_eq!(counted_as(&metrics, (2, 0, 0)), (2, 0, 0));
}

#[test]
fn stop_gives_up_at_its_deadline() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (hooks, metrics) = start(hook(&format!("http://{addr}/hooks")));
    hooks.emit(Event::Occupied, "c", None);
    let start = Instant::now();
    hooks.stop(Duration::from_millis(300));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(900),
        "{took:?}"
    );
    assert_eq!(counted(&metrics).0, 0);
    assert!(counted(&metrics).1 >= 1);
}
