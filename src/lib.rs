//! Tailor: a real-time marketing personalization engine.
//!
//! Map (see docs/ARCHITECTURE.md for the invariants):
//! - [`config`]: compiled-in defaults → `tailor.toml` → `TAILOR_*` environment;
//! - [`app`]: builds the [`app::Engine`] from settings and serves it;
//! - [`api`]: GraphQL and REST, the only module that knows the wire formats;
//! - [`auth`]: API keys (hashed) and the roles each API field and route is open to;
//! - [`customers`], [`events`], [`features`], [`segments`], [`content`], [`decision`],
//!   [`bandit`], [`experiments`]: the domain, pure logic over the storage traits;
//! - [`expressions`]: Rhai formulas of derived features and predicates of segments;
//! - [`model`]: the candle recommendation model: training, registry, batched scoring;
//! - [`ope`]: off-policy evaluation of a target policy on a log of bandit rounds;
//! - [`privacy`]: PII encrypted at rest (AES-256-GCM, per-customer data keys wrapped
//!   by master keys with ids), the blind index of emails, erasure's key destruction;
//! - [`jsonl`]: JSON Lines imports, with errors naming the line and the field;
//! - [`snapshot`]: in-memory copies the decision path reads, with a time to live;
//! - [`storage`]: one trait per capability and the backends;
//! - [`telemetry`]: OpenTelemetry meters exported as Prometheus text, and tracing;
//! - [`demo`]: the synthetic demo world;
//! - [`simulate`]: the policies played offline against the demo world's hidden preferences.

pub mod api;
pub mod app;
pub mod auth;
pub mod bandit;
pub mod config;
pub mod content;
pub mod customers;
pub mod decision;
pub mod demo;
pub mod error;
pub mod events;
pub mod experiments;
pub mod expressions;
pub mod features;
pub mod jsonl;
pub mod loadgen;
pub mod model;
pub mod ope;
pub mod privacy;
pub mod rules;
pub mod segments;
pub mod simulate;
pub mod snapshot;
pub mod storage;
pub mod telemetry;
