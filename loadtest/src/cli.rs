//! Command line: one subcommand per scenario.

use std::path::PathBuf;

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
    /// The kernel floor: CPU per frame of plain send() calls to N loopback sockets.
    Floor(FloorArgs),
}

/// Options every server scenario takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The server's public listener (WebSocket), HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: String,
    /// Where REST publishes go (the admin listener if the server has one); default: --server.
    #[arg(long)]
    pub rest: Option<String>,
    /// The server's HS256 JWT secret; the load generator mints its own tokens.
    #[arg(long, env = "BROADCASTER_AUTH_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// An API key for REST publishing (the first of a comma list).
    #[arg(long, env = "BROADCASTER_AUTH_API_KEYS", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Receive threads (0: one per CPU in --cpus, else CPUs - 1, at least 1).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Pin the load generator's threads to these CPUs (comma list), e.g. `--cpus 1` with the
    /// server on CPU 0.
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
    /// The server's pid: report its CPU per delivered message and RSS per connection from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency percentile distribution (.hgrm, milliseconds) here.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Write an SVG latency-percentile plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// A label for the plot legend and the summary.
    #[arg(long)]
    pub label: Option<String>,
    /// Loopback source addresses 127.0.0.2.. to spread connections over (0: as many as the
    /// ephemeral port range needs).
    #[arg(long, default_value_t = 0)]
    pub source_ips: usize,
    /// Do not bind source addresses (for a non-loopback server).
    #[arg(long)]
    pub no_source_bind: bool,
    /// Connection setups in flight per thread.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds allowed for all connections to subscribe.
    #[arg(long, default_value_t = 120.0)]
    pub setup_timeout: f64,
    /// Seconds to wait after the last publication for every delivery.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// Payload size in bytes (the JSON value, send time and padding included).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Prefix of the channel names (default: `lt-PID`).
    #[arg(long)]
    pub channel_prefix: Option<String>,
    /// Also measure the kernel floor (same socket count and frame size) and report ratios to it.
    #[arg(long)]
    pub floor: bool,
    /// Frames per send() for the coalesced floor.
    #[arg(long, default_value_t = 4)]
    pub floor_k: usize,
    /// Microseconds a receive thread sleeps after a wake-up that found few ready connections, so
    /// reads batch more frames: lowers the load generator's CPU per message, adds up to this much to
    /// measured latency (0: exact latency).
    #[arg(long, default_value_t = 0)]
    pub coalesce_us: u64,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// How publications are made.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// Publications per second (open loop); 0: max-rate mode bounded by --window.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Publish this many messages (default: run for --duration).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Seconds to publish for (default 10 when --messages is not given).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Max-rate mode: publications not yet delivered to every subscriber, at most.
    #[arg(long, default_value_t = 4)]
    pub window: u64,
    /// Publish over REST (keep-alive) or a WebSocket.
    #[arg(long, value_enum, default_value_t = Via::Rest)]
    pub via: Via,
}

/// `fanout` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribers on the channel.
    #[arg(long, short = 's', default_value_t = 1000)]
    pub subscribers: usize,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub common: Common,
}

/// `chat` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// Channels.
    #[arg(long, short = 'c', default_value_t = 100)]
    pub channels: usize,
    /// Subscribers per channel.
    #[arg(long, short = 'k', default_value_t = 50)]
    pub per_channel: usize,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub common: Common,
}

/// `idle` options.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Connections.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to hold them.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Channels the connections subscribe to (round robin).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    #[command(flatten)]
    pub common: Common,
}

/// `storm` options.
#[derive(clap::Args, Debug, Clone)]
pub struct StormArgs {
    /// Connections.
    #[arg(long, short = 'n', default_value_t = 5000)]
    pub connections: usize,
    /// Channels the connections subscribe to (round robin).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    #[command(flatten)]
    pub common: Common,
}

/// `recovery` options.
#[derive(clap::Args, Debug, Clone)]
pub struct RecoveryArgs {
    /// Subscribers on the channel.
    #[arg(long, short = 's', default_value_t = 200)]
    pub subscribers: usize,
    /// Mean seconds between one subscriber's disconnects (each is uniform in 0.5x..1.5x).
    #[arg(long, default_value_t = 1.0)]
    pub reconnect_every: f64,
    #[command(flatten)]
    pub publish: PublishArgs,
    #[command(flatten)]
    pub common: Common,
}

/// `floor` options.
#[derive(clap::Args, Debug, Clone)]
pub struct FloorArgs {
    /// Sockets written in turn.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub sockets: usize,
    /// Bytes per frame (default: the size of a broadcast frame of a --payload-bytes payload).
    #[arg(long)]
    pub frame_bytes: Option<usize>,
    /// Payload size the default frame size is computed for.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Frames per send() to measure besides 1 (comma list).
    #[arg(long, short = 'k', value_delimiter = ',', default_value = "4")]
    pub frames_per_send: Vec<usize>,
    /// Seconds of sending per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Passes over all sockets per second (0: back to back).
    #[arg(long, default_value_t = 0.0)]
    pub passes_per_s: f64,
    /// Pin the sender to CPU 0 and the reader to CPU 1.
    #[arg(long)]
    pub pin: bool,
    /// Write the JSON result here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}
