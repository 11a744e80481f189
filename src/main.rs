//! The `broadcaster` binary: `serve` (the default), `token`, `publish` and `connect`, each a thin
//! layer over the library (see `lib.rs` for the map of the code).
use broadcaster::config::{Config, Overrides};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Real-time WebSocket messaging server.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default). Every config key can also be set as BROADCASTER_<KEY_PATH>,
    /// e.g. BROADCASTER_AUTH_JWT_SECRET, BROADCASTER_LIMITS_PING_INTERVAL=30s; flags beat the
    /// environment, which beats the file. Channel rules ([[channels]]) are set in the file only:
    /// arrays of tables have no environment form. With no auth.jwt_secret it runs in dev mode.
    Serve(ServeArgs),
    /// Print a signed client JWT (alone on the last line).
    Token {
        #[arg(long, env = "BROADCASTER_AUTH_JWT_SECRET")]
        secret: String,
        #[arg(long)]
        sub: String,
        /// Channel pattern the token authorizes (exact name, or prefix ending in `*`); repeatable.
        #[arg(long = "channel", required = true)]
        channels: Vec<String>,
        /// Comma list of scopes: subscribe, publish, presence.
        #[arg(long, default_value = "subscribe", value_delimiter = ',')]
        scope: Vec<String>,
        /// The `info` claim: a JSON object shown with the user in presence and in the `from`
        /// of their publications, e.g. '{"username":"alice"}'.
        #[arg(long, value_parser = parse_info)]
        info: Option<serde_json::Value>,
        /// Lifetime, like 1h or 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Publish one message over REST and print the JSON result.
    Publish {
        /// Base URL of the server (or of its admin listener), e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        #[arg(long, env = "BROADCASTER_API_KEY")]
        api_key: String,
        #[arg(long)]
        channel: String,
        #[arg(long)]
        event: String,
        /// Any JSON value.
        #[arg(long)]
        payload: String,
    },
    /// Terminal client (a chat): says on stderr whom the token connects as; prints chat messages
    /// (event `message` published over a WebSocket) as `alice: text`, other broadcasts as
    /// `channel event: payload`, and for presence channels who is there on subscribing
    /// (`in chat/x: alice, bob (2)`) and `bob joined chat/x` / `bob left chat/x`. Each stdin line
    /// is published to the first channel as event `message`. Reconnects and recovers with
    /// `since` (also after 4006, disconnected by the backend); exits on 4007 (token revoked: get
    /// a new one); a channel the server unsubscribes is not followed again. Names are the
    /// token's `info.username`, else its `sub`.
    Connect {
        /// Server URL: ws://HOST:PORT/ws (or http://HOST:PORT).
        #[arg(long)]
        url: String,
        #[arg(long, env = "BROADCASTER_TOKEN")]
        token: String,
        /// Channel to subscribe to; repeatable. Lines typed are published to the first.
        #[arg(long = "channel", required = true)]
        channels: Vec<String>,
    },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML configuration file (see broadcaster.toml in tuning/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Public listener address (key `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Backend listener address (key `admin_listen`).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Number of shards, one per core; 0 for every core (key `shards`).
    #[arg(long)]
    shards: Option<usize>,
    /// Redis URL: cluster mode (key `redis.url`).
    #[arg(long)]
    redis: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::Token {
            secret,
            sub,
            channels,
            scope,
            ttl,
            info,
        } => match broadcaster::auth::mint_with_info(
            &secret,
            &sub,
            &channels,
            &scope,
            ttl,
            info.as_ref(),
        ) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Connect {
            url,
            token,
            channels,
        } => match broadcaster::cli::connect(&url, &token, &channels) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Publish {
            url,
            api_key,
            channel,
            event,
            payload,
        } => match broadcaster::cli::publish(&url, &api_key, &channel, &event, &payload) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// `--info`: one JSON object.
fn parse_info(text: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object, like '{\"username\":\"alice\"}'".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("broadcaster: {message}");
    ExitCode::FAILURE
}

fn serve(args: ServeArgs) -> ExitCode {
    let flags = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        shards: args.shards,
        redis: args.redis,
    };
    let config = match Config::load(args.config.as_deref(), &|k| std::env::var(k).ok(), &flags) {
        Ok(c) => c,
        Err(e) => return fail(&format!("invalid configuration: {e}")),
    };
    // RUST_LOG is read only when ASCII: tracing-subscriber can panic on other directives.
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| v.is_ascii());
    let filter = from_env
        .ok_or(())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).map_err(|_| ()))
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match broadcaster::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
