//! The Lua scripts, compiled into the binary and hashed once at startup.
//!
//! Every state change is one script, so each step is atomic in Redis. redis-rs `Script` sends
//! `EVALSHA` and reloads the script after `NOSCRIPT` (a Redis restart or `SCRIPT FLUSH`). The
//! scripts that change locks start with `common.lua` (its helpers and reply codes); each
//! script's reply is decoded by its type in [`reply`](super::reply).

use deadpool_redis::redis::Script;

use super::FENCE_GRACE;
use crate::backend::FAIR_ENTRY_TTL;

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
    /// Hashes the scripts, with lockd's settings written into common.lua (see [`settings`]):
    /// `events` and `released` are the backend's two channels. Build this once and share it.
    pub fn new(cluster: bool, events: &str, released: &str) -> Self {
        let common = settings(include_str!("common.lua"), cluster, events, released);
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

/// common.lua with its settings lines (`local NAME = default`) replaced by lockd's values, so no
/// call has to carry them as arguments:
/// - `EVENTS_ALWAYS`: true for a Redis Cluster, where a node cannot count another node's
///   subscribers, so lock events are always published (see common.lua's `watched`);
/// - `EVENTS` and `RELEASED`: the channels `<prefix>:events` and `<prefix>:released`, as given;
/// - `GRACE` ([`FENCE_GRACE`]) and `QUEUE_TTL` ([`FAIR_ENTRY_TTL`]), in ms.
fn settings(common: &str, cluster: bool, events: &str, released: &str) -> String {
    let values = [
        ("EVENTS_ALWAYS", cluster.to_string()),
        ("EVENTS", lua_string(events)),
        ("RELEASED", lua_string(released)),
        ("GRACE", FENCE_GRACE.as_millis().to_string()),
        ("QUEUE_TTL", FAIR_ENTRY_TTL.as_millis().to_string()),
    ];
    common
        .lines()
        .map(|line| {
            let setting = values.iter().find(|(name, _)| {
                line.strip_prefix("local ")
                    .and_then(|rest| rest.strip_prefix(name))
                    .is_some_and(|rest| rest.starts_with(" = "))
            });
            match setting {
                Some((name, value)) => format!("local {name} = {value}\n"),
                None => format!("{line}\n"),
            }
        })
        .collect()
}

/// `s` as a Lua string literal: every byte that is not printable ASCII, and the quote and the
/// backslash, written as a decimal escape.
fn lua_string(s: &str) -> String {
    let mut out = String::from("'");
    for b in s.bytes() {
        if (b.is_ascii_graphic() && b != b'\'' && b != b'\\') || b == b' ' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\{b:03}"));
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_of_common_lua_is_written_once_with_lockds_value() {
        let common = settings(
            include_str!("common.lua"),
            true,
            "app's\\locks:events",
            "app's\\locks:released",
        );
        for line in [
            "local EVENTS_ALWAYS = true",
            "local EVENTS = 'app\\039s\\092locks:events'",
            "local RELEASED = 'app\\039s\\092locks:released'",
            "local GRACE = 10000",
            "local QUEUE_TTL = 6000",
        ] {
            assert_eq!(common.lines().filter(|l| *l == line).count(), 1, "{line}");
        }
        assert!(!common.contains("EVENTS_ALWAYS = false"));
        assert!(!common.contains("'lockd:"));
    }

    #[test]
    fn scripts_differ_by_topology_and_key_prefix() {
        let single = Scripts::new(false, "lockd:events", "lockd:released");
        for other in [
            Scripts::new(true, "lockd:events", "lockd:released"),
            Scripts::new(false, "other:events", "other:released"),
        ] {
            assert_ne!(single.acquire.get_hash(), other.acquire.get_hash());
            assert_ne!(single.release.get_hash(), other.release.get_hash());
            assert_ne!(single.extend.get_hash(), other.extend.get_hash());
            assert_ne!(single.batch.get_hash(), other.batch.get_hash());
        }
    }
}
