//! Starts the shards, wires the rings between them, waits for a signal, and shuts down.

use crate::config::Config;
use crate::io::listener::Listener;
use crate::node::Node;
use crate::ring::Ends;
use crate::shard::{Shard, Watched};
use crate::web::{self, Role};
use glommio::{LocalExecutorBuilder, Placement};
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// io_uring submission queue entries per ring (see `start`).
const RING_DEPTH: usize = 4096;

/// How often a shard looks at the shutdown flag and sweeps idle channels.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the server until SIGINT or SIGTERM has drained it. Prints the listening lines on stdout
/// once every shard is ready.
pub fn run(mut config: Config) -> Result<(), String> {
    exit_on_panic();
    crate::preflight::check_io_uring()?;
    let shards = config.shard_count();
    let dev = config.dev_mode.then(|| crate::dev::setup(&mut config));
    let mut node = Node::new(config, shards)?;
    let (ends, to_shards) = crate::ring::mesh(shards, node.config.redis.url.is_some());
    if let Some(url) = node.config.redis.url.clone() {
        let history = &node.config.history;
        let bridge = crate::cluster::start(
            &url,
            node.node_id.clone(),
            to_shards,
            history.size,
            history.ttl,
        )?;
        node.exposition.add_bridge(bridge.metrics.clone());
        node.bridge = Some(bridge);
    }
    let node = Arc::new(node);

    let cpus = allowed_cpus();
    let mut listen = (node.config.listen, node.config.admin_listen);
    let mut started = Vec::new();
    for (id, ends) in ends.into_iter().enumerate() {
        let node = node.clone();
        // One channel per shard, its sender held by the shard alone: a shard that ends before
        // it is ready (glommio could not build its executor) drops it, and the wait below
        // reports why instead of waiting forever.
        let (ready, readiness) = crossbeam_channel::bounded(1);
        let cpu = cpus[id % cpus.len()];
        let addrs = listen;
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            // No file I/O: the storage buffers glommio would register are not needed.
            .io_memory(64 * 1024)
            // Each idle connection has a poll armed in the ring, and every cancellation glommio
            // submits (its preemption and sleep timers, several per executor turn) searches one
            // bucket of the kernel's table of armed polls. The kernel sizes that table from the
            // ring: 128 entries (glommio's default) give 8 buckets, so at 5,000 connections a
            // cancel walked ~600 polls and took 11% of the server's CPU in the chat benchmark.
            // 4,096 entries give the most, 256 buckets.
            .ring_depth(RING_DEPTH)
            .spawn(move || shard_main(id, node, ends, addrs, ready))
            .map_err(|e| format!("cannot start shard {id}: {e}"))?;
        // Shard 0 resolves port 0; the others bind the port it got (SO_REUSEPORT).
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
    tracing::info!("stopped");
    Ok(())
}

/// The exit status of a process that stopped because a thread panicked.
pub const PANIC_EXIT_CODE: i32 = 101;

/// Makes a panic on any thread (a shard, the Redis bridge) end the whole process with
/// `PANIC_EXIT_CODE` once the panic is logged. A server with one shard gone would be half
/// alive: that shard's connections dead, its channels never sequenced, and the start waiting
/// for it forever.
pub fn exit_on_panic() {
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

/// The listening addresses a shard got, or why it could not listen.
type Ready = crossbeam_channel::Sender<Result<Addrs, String>>;
type Addrs = (SocketAddr, Option<SocketAddr>);

/// Waits until shard `id` listens; when it ended instead, says why (glommio's error).
fn wait_ready(
    id: usize,
    readiness: &crossbeam_channel::Receiver<Result<Addrs, String>>,
    handle: glommio::ExecutorJoinHandle<()>,
) -> Result<(Addrs, glommio::ExecutorJoinHandle<()>), String> {
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

async fn shard_main(
    id: usize,
    node: Arc<Node>,
    ends: Ends,
    (listen, admin_listen): (SocketAddr, Option<SocketAddr>),
    ready: Ready,
) {
    let bind = |addr: SocketAddr| {
        Listener::bind(addr)
            .map(Rc::new)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let public = match bind(listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let admin = match admin_listen.map(bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let addrs = (
        public.local_addr().unwrap_or(listen),
        admin.as_ref().and_then(|a| a.local_addr().ok()),
    );
    let shard = Shard::new(id, node.clone());
    // Every plain socket waits in the shard's epoll set, the listeners too. Their poller ids
    // count down from the top; connection ids count up from 0.
    let listeners: Vec<(u64, Rc<Listener>)> = std::iter::once(public.clone())
        .chain(admin.clone())
        .enumerate()
        .map(|(i, l)| (u64::MAX - i as u64, l))
        .collect();
    for (key, l) in &listeners {
        if let Err(e) = shard.poller.register(l.fd(), *key) {
            let _ = ready.send(Err(format!("cannot watch the listening socket: {e}")));
            return;
        }
        shard.watch(*key, Watched::Listener(l.clone()));
    }
    let flush_task = {
        let shard = shard.clone();
        glommio::spawn_local(async move { shard.flusher().run(shard.metrics()).await }).detach()
    };
    let poll_task = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            shard
                .poller
                .run(|id, events| shard.socket_ready(id, events))
                .await
        })
        .detach()
    };
    let timer_task = {
        let shard = shard.clone();
        glommio::spawn_local(
            async move { shard.timers.run(|id, due| shard.timer_due(id, due)).await },
        )
        .detach()
    };
    shard.connect_rings(ends);
    let _ = ready.send(Ok(addrs));

    let public_task = glommio::spawn_local(web::accept_loop(
        shard.clone(),
        public,
        Role::Public {
            backend: admin.is_none(),
        },
    ))
    .detach();
    let admin_task = admin
        .map(|a| glommio::spawn_local(web::accept_loop(shard.clone(), a, Role::Admin)).detach());

    let mut last_sweep = Instant::now();
    while !node.shutting_down.load(Relaxed) {
        glommio::timer::sleep(HOUSEKEEPING_INTERVAL).await;
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            shard.sweep();
            last_sweep = Instant::now();
        }
    }

    crate::shutdown::drain(&shard).await;
    public_task.cancel();
    for (key, _) in &listeners {
        shard.unwatch(*key);
    }
    flush_task.cancel();
    poll_task.cancel();
    timer_task.cancel();
    if let Some(t) = admin_task {
        t.cancel();
    }
}

/// CPUs this process may run on, in order; shards are pinned to them round robin.
fn allowed_cpus() -> Vec<usize> {
    let cpus = crate::sys::allowed_cpus();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}
