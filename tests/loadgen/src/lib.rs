//! `aquila bench`: a load generator for a running gateway. It drives the
//! public streaming API (`GenerateStream` or `ChatStream`) in a closed loop
//! (N clients) or an open loop (Poisson arrivals), and reports throughput and
//! time-to-first-token, inter-token and end-to-end latency percentiles.
//!
//! It only ever talks to the one gateway address it is given, and every run
//! ends by itself (after --num-requests, or at --duration-s at the latest).
//! It holds no serving logic and links no gateway or worker code.
//!
//! ```text
//! LoadgenArgs (flags) --into_config--> LoadgenConfig --run--> Report
//! ```

mod config;
mod dist;
mod driver;
mod error;
mod report;
mod request;
mod stats;
mod workload;

pub use config::{Api, Arrival, LoadgenArgs, LoadgenConfig};
pub use dist::{LengthDist, poisson_gap};
pub use driver::run;
pub use error::LoadgenError;
pub use report::Report;
pub use stats::{Summary, percentile};
