//! The Lua scripts, compiled into the binary and hashed once at startup.
//!
//! Every state change is one script, so each step is atomic in Redis. redis-rs `Script` sends
//! `EVALSHA` and reloads the script after `NOSCRIPT` (a Redis restart or `SCRIPT FLUSH`). The
//! scripts that change locks start with `common.lua` (its helpers and reply codes); each
//! script's reply is decoded by its type in [`reply`](super::reply).

use deadpool_redis::redis::Script;

/// The scripts; see each `.lua` file's header for its KEYS, ARGV and reply.
#[derive(Debug)]
pub struct Scripts {
    /// `acquire.lua`: take the lock or report the holder ([`AcquireReply`](super::reply::AcquireReply)).
    pub acquire: Script,
    /// `release.lua`: compare the token, delete, publish the wake-up
    /// ([`ReleaseReply`](super::reply::ReleaseReply)).
    pub release: Script,
    /// `extend.lua`: compare the token, lengthen the TTL
    /// ([`ExtendReply`](super::reply::ExtendReply)).
    pub extend: Script,
    /// `inspect.lua`: the holders without their tokens
    /// ([`decode_inspect`](super::reply::decode_inspect)).
    pub inspect: Script,
    /// `dequeue.lua`: a fair waiter leaves the queue (its reply is not read).
    pub dequeue: Script,
}

impl Scripts {
    /// Hashes the scripts. Build this once and share it.
    pub fn new() -> Self {
        Self {
            acquire: Script::new(concat!(
                include_str!("common.lua"),
                include_str!("acquire.lua")
            )),
            release: Script::new(concat!(
                include_str!("common.lua"),
                include_str!("release.lua")
            )),
            extend: Script::new(concat!(
                include_str!("common.lua"),
                include_str!("extend.lua")
            )),
            inspect: Script::new(include_str!("inspect.lua")),
            dequeue: Script::new(include_str!("dequeue.lua")),
        }
    }
}
