//! The scenarios, one per file. Most drive the subscribers' receive workers: start the workers,
//! wait for every subscription, publish, drain, then check and report (`scoreboard` twice: one
//! phase of anonymous viewers, one of authenticated ones). `proxy` makes sequential subscribes on
//! a few blocking connections against an access backend of its own; `presence` cycles blocking
//! connections of many users through presence channels while observers check every join and
//! leave. Server and load-generator CPU are sampled over the same window. The soak, whose
//! connections churn, is [`crate::soak`].

mod chat;
mod fanout;
mod floor;
mod idle;
mod presence;
mod proxy;
mod pubsub;
mod recovery;
mod scoreboard;
mod storm;
mod workers;

pub use chat::chat;
pub use fanout::fanout;
pub use floor::floor_only;
pub use idle::idle;
pub use presence::{presence, PresenceFigures};
pub use proxy::{proxy, ProxyFigures};
pub use recovery::recovery;
pub use scoreboard::{scoreboard, ScoreboardFigures};
pub use storm::storm;
