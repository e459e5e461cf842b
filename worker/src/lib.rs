//! The Aquila Serve worker: loads a LLaMA-architecture model, runs it on its
//! own engine thread, and serves token ids in / token events out over the
//! internal `aquila.worker.v1` API. Knows nothing of text beyond handing the
//! tokenizer to the gateway.

pub mod backend;
pub mod bench;
pub mod chat_template;
pub mod comm;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod export;
pub mod fit;
pub mod gpu;
pub mod kv;
pub mod loader;
pub mod mem;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod presets;
pub mod sampler;
pub mod scheduler;
pub mod service;
pub mod tokenizer;
pub mod tp;
pub mod weights;

pub use error::{Result, WorkerError};
pub use service::{WorkerArgs, WorkerState, run};
