//! The scenarios that drive the subscribers' receive workers, one per file: start the workers,
//! wait for every subscription, publish, drain, then check and report (`scoreboard` twice: one
//! phase of anonymous viewers, one of authenticated ones). Server and load-generator
//! CPU are sampled over the same window. The soak, whose connections churn, is [`crate::soak`].

mod chat;
mod fanout;
mod floor;
mod idle;
mod pubsub;
mod recovery;
mod scoreboard;
mod storm;
mod workers;

pub use chat::chat;
pub use fanout::fanout;
pub use floor::floor_only;
pub use idle::idle;
pub use recovery::recovery;
pub use scoreboard::{scoreboard, ScoreboardFigures};
pub use storm::storm;
