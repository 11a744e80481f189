//! Command line: one subcommand per scenario.

use std::path::PathBuf;
use std::time::Duration;

use crate::publisher::Via;

/// Load generator for the Broadcaster WebSocket pub/sub server.
#[derive(clap::Parser, Debug)]
#[command(name = "broadcaster-loadtest", version, about, long_about = None)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Scenarios.
#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// S subscribers on one channel, one publisher at a fixed rate (or max rate with a window).
    Fanout(FanoutArgs),
    /// C channels x K subscribers each, publications spread round robin over the channels.
    Chat(ChatArgs),
    /// N authenticated, subscribed connections held for T seconds: server RSS per connection.
    Idle(IdleArgs),
    /// Connect + auth + subscribe N connections as fast as possible: connections/s, server CPU each.
    Storm(StormArgs),
    /// Subscribers disconnect and resubscribe with `since` while publishing goes on: nothing lost.
    Recovery(RecoveryArgs),
    /// N viewers of one public channel, anonymous and then authenticated (two phases against the
    /// same server): server CPU per connect and per delivery, latency, rewind and order checks,
    /// side by side.
    #[command(after_help = SCOREBOARD_HELP)]
    Scoreboard(ScoreboardArgs),
    /// The latency the access proxy adds to one subscribe (SPEC 15): subscribes to a public
    /// channel, to a proxy channel never asked about (cache miss) and to one already allowed
    /// (cache hit), interleaved on the same connections, against an access backend run here.
    #[command(after_help = PROXY_HELP)]
    Proxy(ProxyArgs),
    /// A join/leave storm (SPEC 16): users connect, subscribe to presence channels and close again
    /// while observers check every join and leave; joins/s, server CPU per join, Redis commands
    /// per join; `--keep-one` makes it a reconnect storm that must change nobody's presence.
    #[command(after_help = PRESENCE_HELP)]
    Presence(PresenceArgs),
    /// Thousands of connections cycle connect/auth/subscribe/receive/unsubscribe/disconnect for a
    /// long while: nothing lost, and no RSS, gauge or file-descriptor leak in the server.
    #[command(after_help = SOAK_HELP)]
    Soak(SoakArgs),
    /// The kernel floor: CPU per frame of plain send() calls to N loopback sockets.
    Floor(FloorArgs),
}

/// What the load generator drives: which wire protocol its subscribers and publisher speak.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// Broadcaster: `GET /ws`, `auth` + `subscribe`, broadcasts with `seq` and `offset`,
    /// `POST /publish`.
    #[default]
    Broadcaster,
    /// Nchan (nginx + libnginx-mod-nchan, see loadtest/nchan/): a WebSocket on `/sub/<channel>`
    /// is subscribed by its URL, every frame is the raw payload; `POST /pub/<channel>` publishes
    /// the body. For a side-by-side benchmark: fanout, chat, idle and storm only.
    Nchan,
}

/// Options every server scenario takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The server under test speaks Broadcaster's protocol, or is Nchan (nginx with
    /// libnginx-mod-nchan, configured as loadtest/nchan/nginx.conf.template) driven the same way:
    /// subscribe by URL, publish by `POST /pub/<channel>`, no tokens (fanout, chat, idle, storm).
    #[arg(long, value_enum, default_value_t = Peer::Broadcaster)]
    pub(crate) peer: Peer,
    /// The server's public listener (WebSocket), HOST:PORT. Several nodes of a cluster: repeat the
    /// option or give a comma list; subscribers are spread round robin over them (each channel's
    /// subscribers alternate between the nodes) and publications go to the first (all of them with
    /// --publish-all).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    pub(crate) server: Vec<String>,
    /// Where REST publishes go (the admin listener if the server has one), one per --server in the
    /// same order; default: the --server addresses.
    #[arg(long, value_delimiter = ',')]
    pub(crate) rest: Vec<String>,
    /// The server's HS256 JWT secret; the load generator mints its own tokens.
    #[arg(long, env = "BROADCASTER_AUTH_JWT_SECRET", hide_env_values = true)]
    pub(crate) secret: Option<String>,
    /// An API key for REST publishing (the first of a comma list).
    #[arg(long, env = "BROADCASTER_AUTH_API_KEYS", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Receive threads (0: one per CPU in --cpus, else CPUs - 1, at least 1).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Pin the load generator's threads to these CPUs (comma list), e.g. `--cpus 1` with the
    /// server on CPU 0.
    #[arg(long, value_delimiter = ',')]
    pub(crate) cpus: Vec<usize>,
    /// The server's pid: report its CPU per delivered message and RSS per connection from /proc.
    /// Repeat it (or give a comma list) for several nodes: their CPU and RSS are summed (add
    /// redis-server's pid to count the broker too).
    #[arg(long, value_delimiter = ',')]
    pub(crate) server_pid: Vec<u32>,
    /// The broker's pids (redis-server processes, comma list or repeated): fanout and chat
    /// report their CPU over the same window above what they use idle (measured for a second
    /// before publishing), apart, and per publication.
    #[arg(long, value_delimiter = ',')]
    pub(crate) broker_pid: Vec<u32>,
    /// Write the JSON summary here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write the latency percentile distribution (.hgrm, milliseconds) here.
    #[arg(long)]
    pub(crate) hgrm: Option<PathBuf>,
    /// Write an SVG latency-percentile plot here.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// A label for the plot legend and the summary.
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Loopback source addresses 127.0.0.2.. to spread connections over (0: as many as the
    /// ephemeral port range needs).
    #[arg(long, default_value_t = 0)]
    pub(crate) source_ips: usize,
    /// Do not bind source addresses (for a non-loopback server).
    #[arg(long)]
    pub(crate) no_source_bind: bool,
    /// Connection setups in flight per thread.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Seconds allowed for all connections to subscribe.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) setup_timeout: f64,
    /// Seconds to wait after the last publication for every delivery.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) drain_timeout: f64,
    /// Payload size in bytes (the JSON value, send time and padding included).
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
    /// What fills the payload after its send time: one string of `x` (`pad`), or the rows of a
    /// contest scoreboard (`scoreboard`), which compresses about as well as a real one.
    #[arg(long, value_enum, default_value_t = crate::extract::PayloadShape::Pad)]
    pub(crate) payload_shape: crate::extract::PayloadShape,
    /// Subscribers offer permessage-deflate, as browsers do, and inflate what arrives compressed.
    #[arg(long)]
    pub(crate) compress: bool,
    /// Subscribers read server-sent events (`GET /sse?channel=..`, SPEC 19) instead of a
    /// WebSocket, one channel each (fanout, chat, idle, scoreboard).
    #[arg(long, conflicts_with = "compress")]
    pub(crate) sse: bool,
    /// Prefix of the channel names (default: `lt-PID`).
    #[arg(long)]
    pub(crate) channel_prefix: Option<String>,
    /// Also measure the kernel floor (same socket count and frame size) and report ratios to it.
    #[arg(long)]
    pub(crate) floor: bool,
    /// Frames per send() for the coalesced floor.
    #[arg(long, default_value_t = 4)]
    pub(crate) floor_k: usize,
    /// Microseconds a receive thread sleeps after a wake-up that found few ready connections, so
    /// reads batch more frames: lowers the load generator's CPU per message, adds up to this much to
    /// measured latency (0: exact latency).
    #[arg(long, default_value_t = 0)]
    pub(crate) coalesce_us: u64,
    /// No progress line.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// How publications are made.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// Publications per second (open loop); 0: max-rate mode bounded by --window.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// Publish this many messages (default: run for --duration).
    #[arg(long)]
    pub(crate) messages: Option<u64>,
    /// Seconds to publish for (default 10 when --messages is not given).
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Max-rate mode: publications not yet delivered to every subscriber, at most.
    #[arg(long, default_value_t = 4)]
    pub(crate) window: u64,
    /// Max-rate mode: publish requests sent before their answers are read, at most (HTTP/1.1
    /// pipelining on the keep-alive connection, or WebSocket requests by id); 1: one at a time.
    /// With --window 4 --pipeline 4 four publications are in flight, as in the peers' max-rate
    /// benchmark, and the server may take several in one read.
    #[arg(long, default_value_t = 1)]
    pub(crate) pipeline: u64,
    /// Publish over REST (keep-alive) or a WebSocket.
    #[arg(long, value_enum, default_value_t = Via::Rest)]
    pub(crate) via: Via,
    /// Several --server nodes: publish round robin over all of them (one keep-alive connection
    /// each) instead of to the first only.
    #[arg(long)]
    pub(crate) publish_all: bool,
}

/// `fanout` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribers on the channel.
    #[arg(long, short = 's', default_value_t = 1000)]
    pub(crate) subscribers: usize,
    #[command(flatten)]
    pub(crate) publish: PublishArgs,
    #[command(flatten)]
    pub common: Common,
}

/// `chat` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// Channels.
    #[arg(long, short = 'c', default_value_t = 100)]
    pub(crate) channels: usize,
    /// Subscribers per channel.
    #[arg(long, short = 'k', default_value_t = 50)]
    pub(crate) per_channel: usize,
    #[command(flatten)]
    pub(crate) publish: PublishArgs,
    #[command(flatten)]
    pub common: Common,
}

/// `idle` options.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Connections.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub(crate) connections: usize,
    /// Seconds to hold them.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) hold: f64,
    /// Channels the connections subscribe to (round robin).
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: usize,
    #[command(flatten)]
    pub common: Common,
}

/// `storm` options.
#[derive(clap::Args, Debug, Clone)]
pub struct StormArgs {
    /// Connections.
    #[arg(long, short = 'n', default_value_t = 5000)]
    pub(crate) connections: usize,
    /// Channels the connections subscribe to (round robin).
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: usize,
    #[command(flatten)]
    pub common: Common,
}

/// `recovery` options.
#[derive(clap::Args, Debug, Clone)]
pub struct RecoveryArgs {
    /// Subscribers on the channel.
    #[arg(long, short = 's', default_value_t = 200)]
    pub(crate) subscribers: usize,
    /// Mean seconds between one subscriber's disconnects (each is uniform in 0.5x..1.5x).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) reconnect_every: f64,
    #[command(flatten)]
    pub(crate) publish: PublishArgs,
    #[command(flatten)]
    pub common: Common,
}

/// How to run the server for `scoreboard` (shown under `scoreboard --help`).
const SCOREBOARD_HELP: &str = "\
The channels must be public, with rewind: give the server a config file with the rule

    [[channels]]
    pattern = \"scoreboard/*\"
    access = \"public\"
    history_size = 1
    rewind_default = 1

(--public-prefix names the prefix the pattern matches, --rewind-default the rule's rewind_default)
and lift the per-address cap on anonymous connections, which every connection counts against
from its handshake until its `auth`, and which a load generator on loopback reaches at once:

    BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000 \\
        broadcaster serve --config scoreboard.toml --shards 1 ...

Each phase, on a channel of its own: publish --rewind-default publications; connect and
subscribe the viewers (anonymous: `subscribe` alone; authenticated: `auth` then `subscribe`,
in one write), every one of which must get `rewound` = --rewind-default and those publications
first, seq 1.. (server CPU per connect is measured from the first connect to the last rewound
publication received); publish at --rate for --duration over REST (server CPU per delivery,
latency); close the viewers and wait for the server to count them gone. --rounds 2 runs
anonymous, authenticated, authenticated, anonymous.

Exit status: 0 passed, 1 a check failed, 2 could not run.";

/// `scoreboard` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ScoreboardArgs {
    /// Viewers of the channel in each phase.
    #[arg(long, short = 'n', default_value_t = 2000)]
    pub(crate) viewers: usize,
    /// Publications per second (open loop, over REST) in each phase.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) rate: f64,
    /// Seconds of publishing in each phase.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) duration: f64,
    /// Rounds of an anonymous and an authenticated phase, the order alternating (anonymous
    /// first in odd rounds), so what drifts over a run weighs on both kinds alike; each kind's
    /// figures add up over its phases.
    #[arg(long, default_value_t = 1)]
    pub(crate) rounds: usize,
    /// What the server's public rule matches (`pattern = "scoreboard/*"`): the phases' channels
    /// are this followed by the run's channel prefix, the kind and the round.
    #[arg(long, default_value = "scoreboard/")]
    pub(crate) public_prefix: String,
    /// The rule's `rewind_default`: each phase publishes this many before its viewers come, and
    /// every subscribe must answer `rewound` with it and replay them first.
    #[arg(long, default_value_t = 1)]
    pub(crate) rewind_default: u64,
    /// Seconds to wait after a phase for the server to count its viewers gone (`/metrics`).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) settle_timeout: f64,
    #[command(flatten)]
    pub common: Common,
}

/// How to run the server for `proxy` (shown under `proxy --help`).
const PROXY_HELP: &str = "\
The load generator runs the access backend itself, on --backend-listen (127.0.0.1:8000): it
answers every call {\"result\":{\"allow\":true}} (after --backend-delay-us) and counts them. Give
the server a config file whose proxy rule and URL match it, e.g.

    [[channels]]
    pattern = \"public/*\"
    access = \"public\"
    [[channels]]
    pattern = \"contest/*\"
    access = \"proxy\"
    [proxy]
    secret = \"lt-proxy-secret\"
    subscribe_url = \"http://127.0.0.1:8000/subscribe\"

and lift the per-connection request rate limit (100/s by default), which every connection
exceeds at once, and the per-address cap on anonymous connections:

    BROADCASTER_LIMITS_REQUESTS_PER_SECOND=1000000 BROADCASTER_LIMITS_REQUEST_BURST=1000000 \\
    BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000 \\
        broadcaster serve --config proxy.toml --shards 1 ...

--connections connections (each with a token of its own user) make their requests one at a
time, rounds of: subscribe + unsubscribe on --public-prefix (baseline, no call); on a fresh
--proxy-prefix channel (miss: one call); on the connection's hit channel, allowed before
(hit: answered from the server's cache, no call). Only the subscribe's request-to-result round
trip is timed. Each connection warms its hit channel with one call first, and moves to a fresh
one every --rewarm, well inside the server's proxy.subscribe_cache_ttl (30 s by default).

The run fails unless every request succeeded, the backend's calls equal the misses plus the
warm-ups (so no hit was asked), none came for a public channel, and (where /metrics can be
read) the server counted as many allowed subscribe calls.

Exit status: 0 passed, 1 a check failed, 2 could not run.";

/// `proxy` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Client connections, each authenticated as a user of its own, each making its requests one
    /// at a time.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub(crate) connections: usize,
    /// Measured subscribes of each kind (baseline, miss, hit), all connections together.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub(crate) count: u64,
    /// Run this long instead of --count (seconds, or with a unit: `90s`, `5m`); every
    /// connection finishes its round, so each kind gets as many subscribes.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Untimed rounds per connection before measuring (they open the server's connections to the
    /// backend, and warm both processes up).
    #[arg(long, default_value_t = 20)]
    pub(crate) warmup: u64,
    /// Where the access backend listens: the server's proxy.subscribe_url must point here.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub(crate) backend_listen: String,
    /// Microseconds the backend waits before each answer (0: answers at once).
    #[arg(long, default_value_t = 0)]
    pub(crate) backend_delay_us: u64,
    /// The server's proxy.secret: when given, the backend checks that every call carries it
    /// (`Authorization: Bearer`).
    #[arg(long, env = "BROADCASTER_PROXY_SECRET", hide_env_values = true)]
    pub(crate) proxy_secret: Option<String>,
    /// What the server's public rule matches: baseline channels are this followed by the run's
    /// channel prefix.
    #[arg(long, default_value = "public/")]
    pub(crate) public_prefix: String,
    /// What the server's proxy rule matches: miss and hit channels are this followed by the
    /// run's channel prefix.
    #[arg(long, default_value = "contest/")]
    pub(crate) proxy_prefix: String,
    /// How long a connection uses one hit channel before warming a fresh one; keep it under the
    /// server's proxy.subscribe_cache_ttl.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) rewarm: Duration,
    #[command(flatten)]
    pub common: Common,
}

/// How to run the server for `presence` (shown under `presence --help`).
const PRESENCE_HELP: &str = "\
The channels must have presence and join/leave: give the server a config file with the rule

    [[channels]]
    pattern = \"room/*\"
    presence = true
    join_leave = true

(--presence-prefix names the prefix the pattern matches), lift the per-address cap on anonymous
connections (every connection counts against it until its auth), and give the load generator the
API key (GET /presence):

    BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000 \\
        broadcaster serve --config presence.toml --shards 1 ...

--users users (each a token of its own: sub, an info claim, the presence scope) are cycled by
--workers threads, one connection each at a time: connect, auth and one subscribe per channel in
one write, then the closing handshake. A user's cycles never overlap, so each is one join and one
leave per channel. --observers connections (one per --server node by default), members
themselves, follow every join and leave and fail the run on a second join without a leave
between, a leave of someone absent, or a version not above the last; after the churn presence
must come back to the observers alone (their tracking and GET /presence on every node agree,
and the presence method answers the same), and to nobody once they close.

--keep-one: every user first opens a connection of its own on the same node, held through the
churn, so a cycle changes nobody's presence: no join or leave may come, and with --redis-addr
the cluster's Redis commands per cycle should be about 0. --baseline runs the same churn first
on channels no rule matches: the difference is what presence costs the server per join.

Exit status: 0 passed, 1 a check failed, 2 could not run.";

/// `presence` options.
#[derive(clap::Args, Debug, Clone)]
pub struct PresenceArgs {
    /// Distinct users (token subs, each with an `info` claim) whose connections churn.
    #[arg(long, short = 'u', default_value_t = 200)]
    pub(crate) users: usize,
    /// Connections churning at once, each on a thread of its own going through its share of the
    /// users (at most --users).
    #[arg(long, short = 'w', default_value_t = 8)]
    pub(crate) workers: usize,
    /// Presence channels every connection subscribes to (a cycle joins and leaves each).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub(crate) channels: usize,
    /// Cycles, all workers together (default: run for --duration).
    #[arg(long, short = 'n')]
    pub(crate) count: Option<u64>,
    /// How long to churn without --count (seconds, or with a unit: `90s`, `5m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Observer connections, spread round robin over the nodes (default: one per --server node;
    /// 0: none, and the joins are counted from the servers' /metrics).
    #[arg(long)]
    pub(crate) observers: Option<usize>,
    /// A reconnect storm: every user also holds a connection subscribed on the same node, so
    /// closing and reopening the churning one must change nobody's presence.
    #[arg(long)]
    pub(crate) keep_one: bool,
    /// Run the same churn first on channels without presence: the server's CPU per cycle
    /// without it, and so what presence adds per join.
    #[arg(long)]
    pub(crate) baseline: bool,
    /// What the server's presence rule matches (`pattern = "room/*"`): the channels are this
    /// followed by the run's channel prefix and a number.
    #[arg(long, default_value = "room/")]
    pub(crate) presence_prefix: String,
    /// The cluster's Redis (HOST:PORT or redis://[:password@]HOST:PORT): its commands over the
    /// churn by `INFO commandstats`, per join and per cycle, by command.
    #[arg(long)]
    pub(crate) redis_addr: Option<String>,
    /// Seconds allowed for presence to come back after the churn (to the observers), and after
    /// the observers close (to nobody).
    #[arg(long, default_value_t = 15.0)]
    pub(crate) settle_timeout: f64,
    #[command(flatten)]
    pub common: Common,
}

/// How to run the server for `soak` (shown under `soak --help`).
const SOAK_HELP: &str = "\
The server must keep enough history for what a client misses while it is away or unsubscribed
(the load generator passes nothing to it). Run it on a server of its own (other clients would
move its gauges and descriptors) with a large history, e.g.

    BROADCASTER_HISTORY_SIZE=10000 broadcaster serve ...                  # --duration 30m
    BROADCASTER_HISTORY_SIZE=10000 BROADCASTER_HISTORY_TTL=10s broadcaster serve ...   # 60 s

and give the same figures as --history-size and --history-ttl. A `recovered: false` fails the
run unless history really could not hold the gap: more than --history-size publications missed,
or the first missed one possibly older than --history-ttl.

Checks besides loss and order: with --server-pid, the server's RSS after the warm-up and at the
end of the churn agree within --rss-tolerance percent (or --rss-slack-mib MiB), and its open
file descriptors (/proc/PID/fd) come back to the pre-run count once every connection is
closed; the gauges connections_active and subscriptions_total of GET /metrics (on --rest when
the server has an admin listener) equal what the load generator holds open at the end, then
fall back to their pre-run values. History grows until it holds history.size publications per channel or
history.ttl of them, and that growth is not a leak: the warm-up is made at least that long
(at most half the run). With the server's default TTL (300 s) a short run cannot reach it,
hence BROADCASTER_HISTORY_TTL=10s for 60 s runs; `--duration 30m` warms up for 6 minutes.

--presence-users U adds presence churn (SPEC 16): connections 0..2U belong to U users, two
each, and also subscribe to a presence channel, published to like the others; their sessions
overlap at random. Give the server a config file with the rule

    [[channels]]
    pattern = \"room/*\"
    presence = true
    join_leave = true

An observer follows every join and leave; the run fails on a user's second join without a leave
between, a leave of someone absent, or a version not above the last, and unless, once every
connection closed, GET /presence counts the observer alone, then nobody.

Exit status: 0 passed, 1 a check failed, 2 could not run.";

/// `soak` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Connections, each cycling connect → auth → subscribe → receive → disconnect → reconnect.
    #[arg(long, short = 'n', default_value_t = 2000)]
    pub(crate) connections: usize,
    /// Channels published to.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub(crate) channels: usize,
    /// Most channels one connection subscribes to (each takes 1 to this many, fixed for its life).
    #[arg(long, default_value_t = 3)]
    pub(crate) channels_per_conn: usize,
    /// How long to run: seconds, or with a unit (`90s`, `30m`, `1h`).
    #[arg(long, default_value = "60", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// When the server's RSS is taken as the reference (default: 20% of --duration, 10 s to 6 min,
    /// and at least the time the server's history takes to fill; at most half the run).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) warmup: Option<Duration>,
    /// Publications per second, all publishers together (open loop, round robin over channels).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) rate: f64,
    /// Publisher threads, each with its own keep-alive connection, share of the rate and channels.
    #[arg(long, default_value_t = 2)]
    pub(crate) publishers: usize,
    /// Publish over REST (keep-alive) or a WebSocket.
    #[arg(long, value_enum, default_value_t = Via::Rest)]
    pub(crate) via: Via,
    /// Mean seconds a connection stays connected (each session is uniform in 0.5x..1.5x).
    #[arg(long, default_value_t = 8.0)]
    pub(crate) session: f64,
    /// Most seconds a connection stays away before reconnecting (uniform from 0).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) pause: f64,
    /// Share of sessions that unsubscribe from one of their channels mid-session and subscribe again
    /// (with `since`) up to --pause later.
    #[arg(long, default_value_t = 0.3)]
    pub(crate) resubscribe: f64,
    /// Share of sessions that end by dropping the TCP connection with no close frame (the others
    /// do the WebSocket closing handshake).
    #[arg(long, default_value_t = 0.25)]
    pub(crate) abrupt: f64,
    /// The server's history.size (BROADCASTER_HISTORY_SIZE): `recovered: false` is allowed only for
    /// a gap larger than this, or for one whose first missed publication may be older than
    /// --history-ttl.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) history_size: u64,
    /// The server's history.ttl (BROADCASTER_HISTORY_TTL).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub(crate) history_ttl: Duration,
    /// Largest change of the server's RSS between the warm-up and the end, percent.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) rss_tolerance: f64,
    /// A change of the server's RSS within this many MiB passes whatever the percentage: the
    /// allocator commits memory in steps of about 2 MiB, 7% of a 30 MiB server.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) rss_slack_mib: f64,
    /// Seconds allowed at the end for every connection to come back and catch up, and then for the
    /// server's gauges and descriptors to come back.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) settle_timeout: f64,
    /// Presence churn (SPEC 16): this many users, each on two of the churning connections (tokens
    /// of their own, with an info claim and the presence scope), which add a presence channel to
    /// their channels; an observer checks every join and leave, and presence must come back to
    /// nobody at the end. 0: none. Needs --api-key and a server rule with presence and
    /// join_leave for --presence-prefix.
    #[arg(long, default_value_t = 0)]
    pub(crate) presence_users: usize,
    /// What the server's presence rule matches: the presence channel is this followed by the
    /// run's channel prefix and `/soak`.
    #[arg(long, default_value = "room/")]
    pub(crate) presence_prefix: String,
    #[command(flatten)]
    pub common: Common,
}

/// Parses a duration: plain seconds (`60`, `0.5`) or a number with a unit (`ms`, `s`, `m`, `h`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 60, 90s, 30m, 1h)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => v,
        "ms" => v / 1e3,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        u => return Err(format!("unknown duration unit {u:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `floor` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FloorArgs {
    /// Sockets written in turn.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub(crate) sockets: usize,
    /// Bytes per frame (default: the size of a broadcast frame of a --payload-bytes payload).
    #[arg(long)]
    pub(crate) frame_bytes: Option<usize>,
    /// Payload size the default frame size is computed for.
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
    /// Frames per send() to measure besides 1 (comma list).
    #[arg(long, short = 'k', value_delimiter = ',', default_value = "4")]
    pub(crate) frames_per_send: Vec<usize>,
    /// Seconds of sending per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) seconds: f64,
    /// Passes per second (0: back to back).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) passes_per_s: f64,
    /// Sockets written per pass, the next ones each pass, like one publication of a channel
    /// among several (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) group: usize,
    /// Pin the sender to CPU 0 and the reader to CPU 1.
    #[arg(long)]
    pub pin: bool,
    /// Write the JSON result here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn peer_defaults_to_broadcaster() {
        let cli = Cli::parse_from(["lt", "fanout"]);
        let Scenario::Fanout(a) = cli.scenario else {
            panic!("not fanout")
        };
        assert_eq!(a.common.peer, Peer::Broadcaster);
        let cli = Cli::parse_from(["lt", "storm", "--peer", "nchan", "-n", "10"]);
        let Scenario::Storm(a) = cli.scenario else {
            panic!("not storm")
        };
        assert_eq!(a.common.peer, Peer::Nchan);
        assert!(Cli::try_parse_from(["lt", "idle", "--peer", "centrifugo"]).is_err());
    }

    #[test]
    fn several_servers_and_pids() {
        let cli = Cli::parse_from([
            "lt",
            "fanout",
            "--server",
            "127.0.0.1:1",
            "--server",
            "127.0.0.1:2,127.0.0.1:3",
            "--server-pid",
            "10",
            "--server-pid",
            "11",
            "--publish-all",
        ]);
        let Scenario::Fanout(a) = cli.scenario else {
            panic!("not fanout")
        };
        assert_eq!(
            a.common.server,
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        );
        assert_eq!(a.common.server_pid, [10, 11]);
        assert!(a.publish.publish_all);
        let cli = Cli::parse_from(["lt", "soak", "--duration", "30m"]);
        let Scenario::Soak(s) = cli.scenario else {
            panic!("not soak")
        };
        assert_eq!(s.duration, Duration::from_secs(1800));
        assert_eq!(s.connections, 2000);
        assert_eq!(s.common.server, ["127.0.0.1:8080"]);
        assert!(s.common.server_pid.is_empty());
        let cli = Cli::parse_from(["lt", "scoreboard", "-n", "50", "--rounds", "2"]);
        let Scenario::Scoreboard(b) = cli.scenario else {
            panic!("not scoreboard")
        };
        assert_eq!(
            (b.viewers, b.rounds, b.rate, b.rewind_default),
            (50, 2, 10.0, 1)
        );
        assert_eq!(b.public_prefix, "scoreboard/");
        let cli = Cli::parse_from([
            "lt",
            "proxy",
            "--duration",
            "5s",
            "--backend-delay-us",
            "50",
        ]);
        let Scenario::Proxy(p) = cli.scenario else {
            panic!("not proxy")
        };
        assert_eq!(
            (p.connections, p.count, p.duration, p.backend_delay_us),
            (8, 20_000, Some(Duration::from_secs(5)), 50)
        );
        assert_eq!(p.backend_listen, "127.0.0.1:8000");
        assert_eq!(
            (p.public_prefix.as_str(), p.proxy_prefix.as_str()),
            ("public/", "contest/")
        );
        assert_eq!(p.rewarm, Duration::from_secs(10));
        let cli = Cli::parse_from([
            "lt",
            "presence",
            "--users",
            "50",
            "--keep-one",
            "--redis-addr",
            "127.0.0.1:16379",
        ]);
        let Scenario::Presence(q) = cli.scenario else {
            panic!("not presence")
        };
        assert_eq!((q.users, q.workers, q.channels, q.count), (50, 8, 1, None));
        assert_eq!(q.duration, Duration::from_secs(10));
        assert!(q.keep_one && !q.baseline);
        assert_eq!(q.observers, None);
        assert_eq!(q.presence_prefix, "room/");
        assert_eq!(q.redis_addr.as_deref(), Some("127.0.0.1:16379"));
    }
}
