//! alora-bench: a load-testing harness for OpenAI-compatible servers (alora, vLLM,
//! llama-server), with the aLoRA "intrinsics" and "race" workloads. The binary is a thin CLI over
//! [`run::run`], [`report::Report`] and [`plot::all`]; the test suite drives the same functions
//! against a tiny in-process server.

pub mod client;
pub mod plot;
pub mod report;
pub mod run;
pub mod stats;
pub mod workload;

pub use client::{lora_adapters, AdapterField, Client, LoraAdapter, Target};
pub use report::{compare_table, race_table, Report, Slo};
pub use run::{run, LoadConfig, Record, RunOutput};
pub use workload::{Endpoint, Kind, Workload, WorkloadConfig};
