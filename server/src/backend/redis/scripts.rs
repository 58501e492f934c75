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
    /// `batch.lua` after acquire.lua, release.lua and extend.lua: several of them in one call
    /// (a reply per operation, each decoded as its script's; see [`batch`](super::batch)).
    pub batch: Script,
}

impl Scripts {
    /// Hashes the scripts. Build this once and share it. `cluster`: the Redis is a Cluster, where
    /// a node cannot count another node's subscribers, so lock events are always published (see
    /// common.lua's `watched`).
    pub fn new(cluster: bool) -> Self {
        let common = include_str!("common.lua");
        let common = if cluster {
            common.replacen(EVENTS_ON_DEMAND, "local EVENTS_ALWAYS = true", 1)
        } else {
            common.to_owned()
        };
        let (acquire, release, extend) = (
            include_str!("acquire.lua"),
            include_str!("release.lua"),
            include_str!("extend.lua"),
        );
        let batch = format!(
            "{common}local OPS = {{}}\n\
             OPS.a = function(KEYS, ARGV)\n{acquire}\nend\n\
             OPS.r = function(KEYS, ARGV)\n{release}\nend\n\
             OPS.e = function(KEYS, ARGV)\n{extend}\nend\n{}",
            include_str!("batch.lua")
        );
        Self {
            acquire: Script::new(&(common.clone() + acquire)),
            release: Script::new(&(common.clone() + release)),
            extend: Script::new(&(common + extend)),
            inspect: Script::new(include_str!("inspect.lua")),
            dequeue: Script::new(include_str!("dequeue.lua")),
            batch: Script::new(&batch),
        }
    }
}

/// The line of common.lua that [`Scripts::new`] rewrites for a Redis Cluster.
const EVENTS_ON_DEMAND: &str = "local EVENTS_ALWAYS = false";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_scripts_always_publish_events() {
        assert!(include_str!("common.lua").contains(EVENTS_ON_DEMAND));
        let single = Scripts::new(false);
        let cluster = Scripts::new(true);
        assert_ne!(single.acquire.get_hash(), cluster.acquire.get_hash());
        assert_ne!(single.release.get_hash(), cluster.release.get_hash());
        assert_ne!(single.extend.get_hash(), cluster.extend.get_hash());
    }
}
