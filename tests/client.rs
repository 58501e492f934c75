//! The Rust client crate (`lockd-client`) against a real lockd and Redis.
