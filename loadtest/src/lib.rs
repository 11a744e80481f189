//! `broadcaster-loadtest`: the load generator for Broadcaster.
//!
//! | module | does |
//! |---|---|
//! | [`cli`] | the command line, one subcommand per scenario |
//! | [`scenario`] | orchestration: workers, publisher, measurement window, checks |
//! | [`client`] | receive workers: one mio loop per thread over many WebSocket connections |
//! | [`publisher`] | the open-loop (or windowed max-rate) publisher over REST or WebSocket |
//! | [`ws`] | sans-IO client framing: masked frames out, server frames in, the upgrade |
//! | [`extract`] | the few JSON fields the receive path needs, by byte search |
//! | [`checker`] | loss / duplicate / reorder detection over `seq` and `offset` |
//! | [`schedule`] | the open-loop schedule (coordinated-omission correction) and the clock |
//! | [`hist`] | HdrHistogram percentiles, `.hgrm` output, SVG plot |
//! | [`procstat`] | /proc sampling of the server, own CPU, rlimits, pinning |
//! | [`net`] | non-blocking connects from 127.0.0.x source addresses |
//! | [`floor`] | the kernel floor: plain send() cost per frame |
//! | [`soak`] | the soak scenario: churning connections, recovery across reconnects, leak checks |
//! | [`metrics`] | the server's `/metrics` gauges |
//! | [`report`] | the table, the JSON summary |
//! | [`token`] | HS256 client tokens |

pub mod checker;
pub mod cli;
pub mod client;
pub mod extract;
pub mod floor;
pub mod hist;
pub mod metrics;
pub mod net;
pub mod procstat;
pub mod publisher;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod soak;
pub mod token;
pub mod ws;
