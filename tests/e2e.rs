//! Black-box tests of lockd: real `lockd` processes, real `redis-server`s, gRPC over TCP.
//!
//! This file and its modules live in the top-level `tests/` folder but belong to the `lockd`
//! package (`server/Cargo.toml`), so cargo builds the `lockd` binary for them.

// A test harness: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod tls;

mod auth;
mod backend_semantics;
mod bad_input;
mod bad_metadata;
mod client;
mod conformance;
mod contention;
mod differential;
mod fairness;
mod keepalive;
mod limits;
mod listing;
mod lock_core;
mod lockctl;
mod memory_bounds;
mod min_hold;
mod node;
mod observability;
mod operations;
mod python;
mod redis_safety;
mod redis_tls;
mod replicas;
mod scheduler;
mod semaphore;
mod session;
mod validation;
mod waiting;
mod watch;
