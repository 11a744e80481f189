//! What every scenario shares: resolving the servers, the environment of a run (token, API key,
//! receive threads, channel prefix, open-files limit), source addresses, channel names, and the
//! measurement window over which server and load-generator CPU are sampled.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{Common, Peer};
use crate::net::{self, Node, SourcePlan};
use crate::procstat::{self, ProcSample};
use crate::report::Report;

/// A scenario that could not run at all (bad options, server unreachable). A run that ran but found
/// anomalies returns a [`Report`] with `passed == false` instead.
pub type SetupError = String;

/// The environment of a run.
pub(crate) struct Env {
    /// The servers' public listeners (one for a single node).
    pub(crate) nodes: Arc<Vec<Node>>,
    /// Where REST requests go, one per node.
    pub(crate) rest_nodes: Vec<Node>,
    pub(crate) token: String,
    pub(crate) api_key: String,
    pub(crate) prefix: String,
    pub(crate) threads: usize,
    pub(crate) nofile: u64,
}

impl Env {
    /// A scenario's report, with what ran: `connections` over `channels` (`per_channel` each)
    /// from this load generator's threads, open-file limit and source addresses.
    pub(crate) fn report<F: Default>(
        &self,
        scenario: &'static str,
        common: &Common,
        plan: &SourcePlan,
        connections: usize,
        channels: usize,
        per_channel: usize,
    ) -> Report<F> {
        let mut report = Report::new(scenario, common, &self.nodes);
        report.connections = connections as u64;
        report.channels = channels as u64;
        report.subscribers_per_channel = per_channel as u64;
        report.loadgen_threads = self.threads as u64;
        report.open_files_limit = self.nofile;
        report.source_addresses = plan.addrs().len() as u64;
        report
    }

    /// True when every node is on loopback (source addresses can be bound).
    fn all_loopback(&self) -> bool {
        self.nodes.iter().all(|n| n.addr.ip().is_loopback())
    }
}

/// Resolves HOST:PORT to its first address.
fn resolve(addr: &str) -> Result<SocketAddr, SetupError> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

/// Resolves a list of HOST:PORT into nodes (the text kept as the Host header).
fn resolve_nodes(list: &[String]) -> Result<Vec<Node>, SetupError> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            Ok(Node {
                addr: resolve(s)?,
                host: s.to_string(),
            })
        })
        .collect()
}

/// Checks the options every scenario shares and sets up a run of `connections` connections
/// against Broadcaster (`--peer nchan` is refused: see [`prepare_any_peer`]).
pub(crate) fn prepare(
    common: &Common,
    connections: usize,
    need_api_key: bool,
) -> Result<Env, SetupError> {
    if common.peer != Peer::Broadcaster {
        return Err(
            "--peer nchan drives fanout, chat, idle and storm only: this scenario needs what \
             Broadcaster alone has (tokens, offsets, recovery, presence, public channels, the \
             access proxy, /metrics)"
                .into(),
        );
    }
    prepare_env(common, connections, need_api_key)
}

/// Like [`prepare`], for the scenarios that can also drive Nchan (fanout, chat, idle, storm):
/// with `--peer nchan` no token or API key is needed, and what Nchan has no counterpart for is
/// refused.
pub(crate) fn prepare_any_peer(
    common: &Common,
    connections: usize,
    need_api_key: bool,
) -> Result<Env, SetupError> {
    if common.peer == Peer::Nchan {
        check_nchan(common)?;
    }
    prepare_env(common, connections, need_api_key)
}

/// The options of a run against Nchan that cannot apply to it.
fn check_nchan(common: &Common) -> Result<(), SetupError> {
    if common.compress {
        return Err(
            "--compress needs --peer broadcaster (the Nchan peer is configured without \
                    permessage-deflate)"
                .into(),
        );
    }
    if common.sse {
        return Err(
            "--sse needs --peer broadcaster (Nchan's subscribers here are WebSockets)".into(),
        );
    }
    if common.server.len() > 1 {
        return Err(
            "--peer nchan takes one --server (one nginx; its channels are not shared)".into(),
        );
    }
    Ok(())
}

fn prepare_env(common: &Common, connections: usize, need_api_key: bool) -> Result<Env, SetupError> {
    let nofile = procstat::raise_nofile();
    // The load generator needs one descriptor per connection plus a few dozen of its own.
    if (connections as u64) + 64 > nofile {
        return Err(format!(
            "{connections} connections need {} open files but the limit is {nofile}: raise `ulimit -n` \
             (hard limit) or use fewer connections",
            connections + 64
        ));
    }
    let (nodes, rest_nodes) = servers(common)?;
    let nchan = common.peer == Peer::Nchan;
    // Nchan's peer is configured open: nothing to mint, no key to send.
    let (token, api_key) = if nchan {
        (String::new(), String::new())
    } else {
        let secret = common
            .secret
            .clone()
            .ok_or("--secret (or BROADCASTER_AUTH_JWT_SECRET) is required to mint client tokens")?;
        let ttl = 24 * 3600;
        let token = crate::token::mint(&secret, "broadcaster-loadtest", ttl)?;
        let api_key = common
            .api_key
            .as_deref()
            .and_then(|k| k.split(',').next())
            .map(|k| k.trim().to_string())
            .unwrap_or_default();
        if need_api_key && api_key.is_empty() {
            return Err(
                "--api-key (or BROADCASTER_AUTH_API_KEYS) is required to publish over REST".into(),
            );
        }
        (token, api_key)
    };
    let prefix = common.channel_prefix.clone().unwrap_or_else(|| {
        format!(
            "lt-{}-{}",
            std::process::id(),
            crate::schedule::now_unix_ns() % 100_000
        )
    });
    Ok(Env {
        nodes: Arc::new(nodes),
        rest_nodes,
        token,
        api_key,
        prefix,
        threads: receive_threads(common).min(connections.max(1)),
        nofile,
    })
}

/// The `--server` nodes, and where REST requests go (`--rest`, one per node or one for all).
fn servers(common: &Common) -> Result<(Vec<Node>, Vec<Node>), SetupError> {
    let nodes = resolve_nodes(&common.server)?;
    if nodes.is_empty() {
        return Err("--server names no address".into());
    }
    if nodes.len() > u16::MAX as usize {
        return Err("too many --server addresses".into());
    }
    let rest_nodes = if common.rest.is_empty() {
        nodes.clone()
    } else {
        resolve_nodes(&common.rest)?
    };
    if rest_nodes.len() != nodes.len() && rest_nodes.len() != 1 {
        return Err(format!(
            "--rest gives {} addresses for {} --server nodes: give one, or one per node in the same order",
            rest_nodes.len(),
            nodes.len()
        ));
    }
    Ok((nodes, rest_nodes))
}

/// `--threads`, else one per `--cpus` entry, else one per CPU but one (at least 1).
fn receive_threads(common: &Common) -> usize {
    if common.threads > 0 {
        common.threads
    } else if !common.cpus.is_empty() {
        common.cpus.len()
    } else {
        procstat::available_cpus().saturating_sub(1).max(1)
    }
}

/// The source addresses of `connections` connections (none when not on loopback, or with
/// `--no-source-bind`).
pub(crate) fn source_plan(common: &Common, env: &Env, connections: usize) -> SourcePlan {
    if common.no_source_bind || !env.all_loopback() {
        return SourcePlan::none();
    }
    // Keep each source address's share of the ephemeral range small: connect()'s search for a free
    // port grows with occupancy. Measured here: 19,000 connections from one address cost the load
    // generator 321 µs of (kernel) CPU per connect and ran at 2,756 connections/s; from 8 addresses,
    // 27 µs and 21,281/s.
    let per_addr = (net::ephemeral_ports() as usize / 8).clamp(1000, 50_000);
    SourcePlan::loopback(connections, per_addr, common.source_ips.max(1))
}

/// The source addresses of a churn: every cycle is a new connection, whose 4-tuple stays in
/// TIME_WAIT for a minute after it, so cycles are spread over at least 32 addresses (or
/// `--source-ips`), which keeps a tuple from coming back while its last use is still remembered.
pub(crate) fn churn_source_plan(common: &Common, env: &Env, connections: usize) -> SourcePlan {
    if common.no_source_bind || !env.all_loopback() {
        return SourcePlan::none();
    }
    SourcePlan::loopback(connections, 1000, common.source_ips.max(32))
}

/// The measurement window's start.
pub(crate) struct Window {
    pub(crate) t0: Instant,
    self_cpu0: Duration,
    self_sys0: Duration,
    server0: Option<ProcSample>,
}

/// Starts the measurement window: the load generator's and the servers' CPU now.
pub(crate) fn window_start(pids: &[u32]) -> Window {
    Window {
        t0: Instant::now(),
        self_cpu0: procstat::self_cpu(),
        self_sys0: procstat::self_cpu_user_sys().1,
        server0: procstat::sample_all(pids),
    }
}

/// What the measurement window measured.
pub(crate) struct WindowEnd {
    pub(crate) elapsed: Duration,
    pub(crate) self_cpu: Duration,
    self_sys: Duration,
    server_sys_ns: Option<u64>,
    pub(crate) server_cpu_ns: Option<u64>,
    pub(crate) server_before: Option<ProcSample>,
    pub(crate) server_after: Option<ProcSample>,
}

/// Ends the measurement window.
pub(crate) fn window_end(w: &Window, pids: &[u32]) -> WindowEnd {
    let after = procstat::sample_all(pids);
    WindowEnd {
        elapsed: w.t0.elapsed(),
        self_cpu: procstat::self_cpu().saturating_sub(w.self_cpu0),
        self_sys: procstat::self_cpu_user_sys().1.saturating_sub(w.self_sys0),
        server_sys_ns: match (w.server0, after) {
            (Some(a), Some(b)) => Some(b.sys_ticks_ns.saturating_sub(a.sys_ticks_ns)),
            _ => None,
        },
        server_cpu_ns: match (w.server0, after) {
            (Some(a), Some(b)) => Some(b.cpu_ns().saturating_sub(a.cpu_ns())),
            _ => None,
        },
        server_before: w.server0,
        server_after: after,
    }
}

/// The run's channel names: `PREFIX/NAME/0` .. `PREFIX/NAME/n-1`.
pub(crate) fn channel_names(prefix: &str, name: &str, n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| format!("{prefix}/{name}/{i}")).collect())
}

impl WindowEnd {
    /// Puts the CPU figures every scenario reports into `report`: the load generator's CPU and its
    /// kernel share, the server's CPU and its kernel share, the load generator's RSS.
    pub(crate) fn record<F>(&self, report: &mut Report<F>) {
        report.loadgen_cpu_s = self.self_cpu.as_secs_f64();
        report.loadgen_cpu_sys_fraction =
            self.self_sys.as_secs_f64() / self.self_cpu.as_secs_f64().max(1e-9);
        if let (Some(sys), Some(a), Some(b)) =
            (self.server_sys_ns, self.server_before, self.server_after)
        {
            // Both from /proc/PID/stat ticks, so the fraction is consistent even when schedstat is
            // used for the total.
            let ticks = b.cpu_ticks_ns.saturating_sub(a.cpu_ticks_ns);
            report.server_cpu_sys_fraction = (ticks > 0).then(|| sys as f64 / ticks as f64);
        }
        report.loadgen_rss_bytes = procstat::self_rss();
        if let Some(cpu) = self.server_cpu_ns {
            report.server_cpu_s = Some(cpu as f64 / 1e9);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Scenario};
    use clap::Parser;

    fn common(args: &[&str]) -> Common {
        match Cli::parse_from(args).scenario {
            Scenario::Fanout(a) => a.common,
            Scenario::Recovery(a) => a.common,
            _ => panic!("fanout or recovery"),
        }
    }

    #[test]
    fn nchan_needs_no_credentials_and_refuses_what_it_lacks() {
        let c = common(&["lt", "fanout", "--peer", "nchan", "--server", "127.0.0.1:9"]);
        let env = prepare_any_peer(&c, 1, true).unwrap();
        assert!(env.token.is_empty() && env.api_key.is_empty());
        let e = prepare(&c, 1, true).err().unwrap();
        assert!(
            e.contains("--peer nchan drives fanout, chat, idle and storm only"),
            "{e}"
        );
        let c = common(&["lt", "recovery", "--peer", "nchan"]);
        assert!(prepare(&c, 1, true).is_err());
        for extra in [
            &["--compress"][..],
            &["--sse"],
            &["--server", "127.0.0.1:1,127.0.0.1:2"],
        ] {
            let mut args = vec!["lt", "fanout", "--peer", "nchan"];
            args.extend_from_slice(extra);
            let e = prepare_any_peer(&common(&args), 1, true).err().unwrap();
            assert!(e.contains("peer"), "{extra:?}: {e}");
        }
    }

    #[test]
    fn nodes_resolve_in_order() {
        let n = resolve_nodes(&["127.0.0.1:1".into(), " 127.0.0.1:2 ".into(), "".into()]).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].addr, "127.0.0.1:2".parse().unwrap());
        assert_eq!(n[1].host, "127.0.0.1:2");
        assert!(resolve_nodes(&["no-such-host.invalid:1".into()]).is_err());
    }
}
