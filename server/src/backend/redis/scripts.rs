//! The Lua scripts, compiled into the binary and hashed once at startup.
//!
//! Every state change is one script, so each step is atomic in Redis. redis-rs `Script` sends
//! `EVALSHA` and reloads the script after `NOSCRIPT` (a Redis restart or `SCRIPT FLUSH`).

use deadpool_redis::redis::Script;

/// The scripts; see each `.lua` file's header for its KEYS, ARGV and reply.
#[derive(Debug)]
pub struct Scripts {
    /// `acquire.lua`: take the lock or report the holder.
    pub acquire: Script,
    /// `release.lua`: compare the token, delete, publish the wake-up.
    pub release: Script,
    /// `extend.lua`: compare the token, lengthen the TTL.
    pub extend: Script,
    /// `inspect.lua`: the holders without their tokens.
    pub inspect: Script,
    /// `dequeue.lua`: a fair waiter leaves the queue.
    pub dequeue: Script,
}

impl Scripts {
    /// Hashes the scripts. Build this once and share it.
    pub fn new() -> Self {
        Self {
            acquire: Script::new(include_str!("acquire.lua")),
            release: Script::new(include_str!("release.lua")),
            extend: Script::new(include_str!("extend.lua")),
            inspect: Script::new(include_str!("inspect.lua")),
            dequeue: Script::new(include_str!("dequeue.lua")),
        }
    }
}
