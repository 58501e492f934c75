//! The fault injector: on a timer, one fault at a time, each recorded with its start and end.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::model::Fault;
use super::proxy::Proxy;
use super::workload::{Recorder, Rng};
use crate::support::{Lockd, RedisServer};

/// The processes and proxies under test.
pub struct Topology {
    /// None: lockd runs on its embedded backend.
    pub redis: Option<RedisServer>,
    pub lockds: Vec<Lockd>,
    /// One per lockd: that lockd's way to Redis.
    pub redis_proxies: Vec<Proxy>,
    /// One per lockd: the clients' way to it.
    pub client_proxies: Vec<Proxy>,
}

/// The kinds of fault, for figures.
pub const KINDS: [&str; 6] = [
    "lockd SIGKILL + restart",
    "redis SIGSTOP/SIGCONT",
    "redis SIGKILL + restart (AOF)",
    "proxy latency spike",
    "proxy connection reset",
    "proxy black-hole",
];

/// Injects faults until `until` (none starts later than 4 s before it), one at a time, each
/// healed before the next, with a quiet gap of 2.5–6 s after each. Without Redis (the embedded
/// backend) only the proxies get faults: a lockd restart would lose its locks by design.
pub async fn inject(mut rng: Rng, rec: Recorder, mut t: Topology, until: Instant) -> Topology {
    sleep(Duration::from_millis(rng.range(1500, 3000))).await;
    while Instant::now() + Duration::from_secs(4) < until {
        let kind = match t.redis {
            Some(_) => rng.below(KINDS.len() as u64) as usize,
            None => rng.range(3, KINDS.len() as u64) as usize,
        };
        let start = rec.now();
        let target = match kind {
            0 => {
                let i = rng.below(t.lockds.len() as u64) as usize;
                t.lockds[i].restart().await;
                format!("lockd {i}")
            }
            1 => {
                let redis = t.redis.as_ref().unwrap();
                redis.pause();
                sleep(Duration::from_millis(rng.range(1000, 2000))).await;
                redis.resume();
                "redis".to_owned()
            }
            2 => {
                t.redis.as_mut().unwrap().restart().await;
                "redis".to_owned()
            }
            _ => {
                let proxies: Vec<&Proxy> = t
                    .redis_proxies
                    .iter()
                    .chain(t.client_proxies.iter())
                    .collect();
                let p = proxies[rng.below(proxies.len() as u64) as usize];
                match kind {
                    3 => {
                        p.set_latency(Duration::from_millis(rng.range(100, 400)));
                        sleep(Duration::from_millis(rng.range(1000, 3000))).await;
                        p.set_latency(Duration::ZERO);
                    }
                    4 => p.reset_all(),
                    _ => {
                        let period = Duration::from_millis(rng.range(1000, 3000));
                        p.black_hole(period);
                        sleep(period).await;
                    }
                }
                p.name.clone()
            }
        };
        rec.fault(Fault {
            kind: KINDS[kind],
            target,
            start,
            end: rec.now(),
        });
        sleep(Duration::from_millis(rng.range(2500, 6000))).await;
    }
    t
}
