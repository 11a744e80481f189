//! `broadcaster-loadtest`: the load generator for Broadcaster.
//!
//! | module | does |
//! |---|---|
//! | [`cli`] | the command line, one subcommand per scenario |
//! | [`scenario`] | the scenarios, one per file: fanout, chat, recovery, idle, storm, scoreboard (over the subscribers' receive workers), proxy (sequential subscribes against its own access backend), presence (a join/leave storm checked by observers), floor |
//! | [`soak`] | the soak scenario: churning connections, recovery across reconnects, leak checks (run phases, worker, plan, verdict, figures) |
//! | [`report`] | the table, the JSON summary; scenarios add their rows as (label, value) pairs |
//! | `harness` | what every scenario shares: servers, token, threads, source addresses, channel names, the measurement window |
//! | `client` | receive workers: one mio loop per thread over many WebSocket connections |
//! | `recv` | the one receive path of the workers: read loop, partial frames, pings |
//! | `publisher` | the open-loop (or windowed max-rate) publisher over REST or WebSocket |
//! | `http` | the HTTP/1.1 answer reader (REST publishing), one-shot `GET`s (`/metrics`, `/presence`) |
//! | `backend` | the `proxy` scenario's access backend: a tokio HTTP/1.1 keep-alive server that allows every call and counts them |
//! | `ws` | sans-IO client framing: masked frames out, server frames in, the upgrade |
//! | `extract` | the few JSON fields the receive path needs, by byte search |
//! | `checker` | loss / duplicate / reorder detection over `seq` and `offset` |
//! | `schedule` | the open-loop schedule (coordinated-omission correction) and the clock |
//! | `hist` | HdrHistogram percentiles, `.hgrm` output, SVG plot |
//! | `procstat` | /proc sampling of the server, own CPU, rlimits, pinning |
//! | `net` | non-blocking connects from 127.0.0.x source addresses |
//! | `floor` | the kernel floor: plain send() cost per frame |
//! | `metrics` | the server's `/metrics` gauges and labelled samples |
//! | `redis` | `INFO commandstats` over a few words of RESP: Redis commands per command name |
//! | `presence` | join/leave notifications and presence objects, the ordering checker, observer connections, `GET /presence` |
//! | `token` | HS256 client tokens |
//!
//! Each module imports only modules of earlier lines, so there is no import circle:
//!
//! 1. `checker`, `hist`, `net`, `procstat`, `schedule`, `token`, `ws`
//! 2. `extract`, `http`, `backend`, `redis`
//! 3. `recv`, `metrics`, `floor`
//! 4. `client`
//! 5. `publisher`
//! 6. `cli`, `presence`
//! 7. `report`
//! 8. `harness`
//! 9. `scenario`, `soak`

pub mod cli;
pub mod report;
pub mod scenario;
pub mod soak;

mod backend;
mod checker;
mod client;
mod extract;
mod floor;
mod harness;
mod hist;
mod http;
mod metrics;
mod net;
mod presence;
mod procstat;
mod publisher;
mod recv;
mod redis;
mod schedule;
mod token;
mod ws;
