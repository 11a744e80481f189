//! Starts the node: one glommio executor per shard, pinned round robin to the CPUs the process
//! may use, the rings between them, the Redis bridge in cluster mode; then waits for a signal
//! and lets every shard drain.

use crate::config::Config;
use crate::io::listener::Listener;
use crate::node::Node;
use crate::ring::Ends;
use crate::shard::{Shard, Watched};
use crate::web::{self, Role};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// io_uring submission queue entries per glommio ring (see `spawn_shard`).
const RING_DEPTH: usize = 4096;
/// How often a shard looks at the shutdown flag and sweeps idle channels.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The exit status of a process that stopped because a thread panicked.
pub const PANIC_EXIT_CODE: i32 = 101;

/// The listening addresses a shard got (public, admin), or why it could not listen.
type Addrs = (SocketAddr, Option<SocketAddr>);
type Ready = crossbeam_channel::Sender<Result<Addrs, String>>;
type Readiness = crossbeam_channel::Receiver<Result<Addrs, String>>;

/// Runs the server until SIGINT or SIGTERM has drained it. Prints the listening lines on stdout
/// once every shard is ready.
pub fn run(mut config: Config) -> Result<(), String> {
    exit_on_panic();
    crate::preflight::check_io_uring()?;
    let shards = config.shard_count();
    let dev = config.dev_mode.then(|| crate::dev::setup(&mut config));
    let (node, ends) = node(config, shards)?;
    let (handles, listen) = start_shards(&node, ends)?;
    if let Some(dev) = dev {
        crate::dev::banner(&dev, listen.0);
    }
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening public={}", listen.0);
        if let Some(admin) = listen.1 {
            let _ = writeln!(stdout, "listening admin={admin}");
        }
        let _ = stdout.flush();
    }
    tracing::info!(shards, public = %listen.0, admin = ?listen.1, "serving");
    let signals = node.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signal(&signals))
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    for h in handles {
        let _ = h.join();
    }
    // After the shards, so the vacateds and leaves of their drain are queued too.
    if let Some(webhooks) = &node.webhooks {
        webhooks.stop(node.config.shutdown_grace);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The node, with the Redis bridge started in cluster mode, and each shard's ends of the rings.
fn node(config: Config, shards: usize) -> Result<(Arc<Node>, Vec<Ends>), String> {
    let mut node = Node::new(config, shards)?;
    let (ends, to_shards) = crate::ring::mesh(shards, node.config.redis.enabled());
    if node.config.redis.enabled() {
        let setup = crate::cluster::Setup {
            upstream: crate::cluster::Upstream::of(&node.config.redis),
            node_id: node.node_id.clone(),
            rules: node.rules.clone(),
            presence: node.presence.clone(),
            node_timeout: node.config.presence.node_timeout,
            revocations: node.revocations.clone(),
            webhooks: node.webhooks.clone(),
        };
        let bridge = crate::cluster::start(setup, to_shards)?;
        node.exposition.add_bridge(bridge.metrics.clone());
        node.bridge = Some(bridge);
    }
    Ok((Arc::new(node), ends))
}

/// Starts every shard and waits until each listens. Shard 0 resolves port 0; the others bind
/// the port it got (SO_REUSEPORT).
fn start_shards(
    node: &Arc<Node>,
    ends: Vec<Ends>,
) -> Result<(Vec<ExecutorJoinHandle<()>>, Addrs), String> {
    let cpus = crate::sys::allowed_cpus();
    let mut listen = (node.config.listen, node.config.admin_listen);
    let mut started = Vec::new();
    for (id, ends) in ends.into_iter().enumerate() {
        let cpu = cpus.get(id % cpus.len().max(1)).copied().unwrap_or(0);
        let (handle, readiness) = spawn_shard(id, cpu, node.clone(), ends, listen)?;
        if id == 0 {
            let (addrs, handle) = wait_ready(id, &readiness, handle)?;
            listen = addrs;
            started.push((handle, None));
        } else {
            started.push((handle, Some(readiness)));
        }
    }
    let mut handles = Vec::new();
    for (id, (handle, readiness)) in started.into_iter().enumerate() {
        handles.push(match readiness {
            Some(readiness) => wait_ready(id, &readiness, handle)?.1,
            None => handle,
        });
    }
    Ok((handles, listen))
}

/// Starts shard `id` on its own executor pinned to `cpu`.
fn spawn_shard(
    id: usize,
    cpu: usize,
    node: Arc<Node>,
    ends: Ends,
    listen: Addrs,
) -> Result<(ExecutorJoinHandle<()>, Readiness), String> {
    // One channel per shard, its sender held by the shard alone: a shard that ends before it
    // is ready (glommio could not build its executor) drops it, and `wait_ready` reports why
    // instead of waiting forever.
    let (ready, readiness) = crossbeam_channel::bounded(1);
    let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(&format!("shard-{id}"))
        // No file I/O: the storage buffers glommio would register are not needed.
        .io_memory(64 * 1024)
        // Each idle connection had a poll armed in the ring, and every cancellation glommio
        // submits (its preemption and sleep timers, several per executor turn) searches one
        // bucket of the kernel's table of armed polls, which the kernel sizes from the ring:
        // 128 entries (glommio's default) give 8 buckets, and at 5,000 connections a cancel
        // walked ~600 polls (11% of the server's CPU in the chat benchmark). 4,096 entries
        // give the most, 256 buckets. TLS sockets still wait in the ring.
        .ring_depth(RING_DEPTH)
        .spawn(move || shard_main(id, node, ends, listen, ready))
        .map_err(|e| format!("cannot start shard {id}: {e}"))?;
    Ok((handle, readiness))
}

/// Waits until shard `id` listens; when it ended instead, says why (glommio's error).
fn wait_ready(
    id: usize,
    readiness: &Readiness,
    handle: ExecutorJoinHandle<()>,
) -> Result<(Addrs, ExecutorJoinHandle<()>), String> {
    match readiness.recv() {
        Ok(Ok(addrs)) => Ok((addrs, handle)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let why = match handle.join() {
                Err(e) => e.to_string(),
                Ok(()) => "it ended".to_string(),
            };
            Err(format!(
                "shard {id} stopped during start (glommio could not build its executor): {why}"
            ))
        }
    }
}

/// Makes a panic on any thread (a shard, the Redis bridge) end the whole process with
/// `PANIC_EXIT_CODE` once the panic is logged. A server with one shard gone would be half
/// alive: that shard's connections dead, its channels never sequenced, and the start waiting
/// for it forever.
pub(crate) fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!(thread = name, "a thread panicked; stopping the process");
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

fn wait_for_signal(node: &Node) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down");
        node.shutting_down.store(true, Relaxed);
    }
}

/// One shard's life: listen, serve, sweep, and on shutdown drain.
async fn shard_main(id: usize, node: Arc<Node>, ends: Ends, listen: Addrs, ready: Ready) {
    let shard = Shard::new(id, node.clone());
    let listeners = match listen_on(&shard, listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let services = start_services(&shard);
    shard.connect_rings(ends);
    let addrs = (
        listeners[0].1.local_addr().unwrap_or(listen.0),
        listeners
            .get(1)
            .and_then(|(_, a)| a.local_addr().ok())
            .or(listen.1),
    );
    let _ = ready.send(Ok(addrs));
    let backend = listeners.len() == 1;
    let accepts: Vec<_> = listeners
        .iter()
        .enumerate()
        .map(|(i, (_, l))| {
            let role = if i == 0 {
                Role::Public { backend }
            } else {
                Role::Admin
            };
            glommio::spawn_local(web::accept_loop(shard.clone(), l.clone(), role)).detach()
        })
        .collect();
    let mut last_sweep = Instant::now();
    while !node.shutting_down.load(Relaxed) {
        glommio::timer::sleep(HOUSEKEEPING_INTERVAL).await;
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            shard.sweep();
            last_sweep = Instant::now();
        }
    }
    crate::shutdown::drain(&shard).await;
    for task in accepts.into_iter().chain(services) {
        task.cancel();
    }
    for (key, _) in &listeners {
        shard.unwatch(*key);
    }
}

/// The shard's listeners (public, then admin if configured), bound and in its epoll set. Their
/// poller ids count down from the top; connection ids count up from 0.
fn listen_on(shard: &Shard, (public, admin): Addrs) -> Result<Vec<(u64, Rc<Listener>)>, String> {
    let mut listeners = Vec::new();
    for (i, addr) in std::iter::once(public).chain(admin).enumerate() {
        let listener = Listener::bind(addr)
            .map(Rc::new)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let key = u64::MAX - i as u64;
        shard
            .poller
            .register(listener.fd(), key)
            .map_err(|e| format!("cannot watch the listening socket: {e}"))?;
        shard.watch(key, Watched::Listener(listener.clone()));
        listeners.push((key, listener));
    }
    Ok(listeners)
}

/// The shard's own tasks for its life: the flush pass, the epoll set's readiness, the timers.
fn start_services(shard: &Rc<Shard>) -> Vec<glommio::task::JoinHandle<()>> {
    let (s1, s2, s3) = (shard.clone(), shard.clone(), shard.clone());
    vec![
        glommio::spawn_local(async move { s1.flusher().run(s1.metrics()).await }).detach(),
        glommio::spawn_local(async move {
            s2.poller
                .run(|id, events| s2.socket_ready(id, events))
                .await
        })
        .detach(),
        glommio::spawn_local(async move { s3.timers.run(|id, due| s3.timer_due(id, due)).await })
            .detach(),
    ]
}
