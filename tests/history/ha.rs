//! High-availability faults for the history checker: a Sentinel failover (watching the demoted
//! master for writes it should no longer get), a cluster master killed and replaced by its
//! replica, and a cluster reshard of the slots that hold live locks.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis;
use futures_util::StreamExt as _;
use tokio::time::{Instant, sleep};

use super::model::{Fault, History, Micros, Outcome};
use super::workload::{Recorder, Rng};
use crate::support::{Cluster, SentinelGroup, eventually, redis_cmd};

/// A write reaching the old master this long after the first `+switch-master` counts as stale.
/// It covers lockd hearing of the switch later than the test (each process gets the message on
/// its own, and a loaded 2-core CI machine delayed it by about 200 ms once), and scripts on their
/// way. Without the switch handling, lockd writes to the old master for about 10 s.
pub const STALE_MARGIN: Micros = 1_000_000;

/// What the old master saw around a Sentinel failover, on the run's clock.
#[derive(Debug, Default, Clone)]
pub struct OldMaster {
    /// When the first sentinel announced `+switch-master`.
    pub switched: Option<Micros>,
    /// When the old master stopped being a master (Sentinel demoted it).
    pub demoted: Option<Micros>,
    /// Writes to lockd's keys on the old master while it was one: (when, key, event).
    pub writes: Vec<(Micros, String, String)>,
}

impl OldMaster {
    /// The writes after the switch (plus [`STALE_MARGIN`]) and before the demotion: writes
    /// that lockd sent to a master Sentinel had already replaced.
    pub fn stale_writes(&self) -> Vec<&(Micros, String, String)> {
        let Some(switched) = self.switched else {
            return Vec::new();
        };
        self.writes
            .iter()
            .filter(|(t, _, _)| *t > switched + STALE_MARGIN)
            .filter(|(t, _, _)| self.demoted.is_none_or(|d| *t < d))
            .collect()
    }

    /// The last write after the switch, relative to it, in ms (negative: none after it).
    pub fn last_write_after_switch_ms(&self) -> Option<f64> {
        let switched = self.switched?;
        let last = self.writes.iter().map(|w| w.0).max()?;
        Some((last as f64 - switched as f64) / 1000.0)
    }
}

/// Records every keyspace event on lockd's keys (`<prefix>:*`) of the node at `port`, until it
/// stops being a master.
fn record_writes(port: u16, rec: Recorder, seen: Arc<Mutex<OldMaster>>) {
    tokio::spawn(async move {
        let _: String = redis_cmd(
            port,
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg("KEA"),
        )
        .await
        .unwrap();
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.psubscribe("__keyspace@0__:lockd:*").await.unwrap();
        let mut messages = pubsub.on_message();
        let mut role_check = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { return };
                    let event: String = msg.get_payload().unwrap_or_default();
                    if event == "expired" {
                        continue;
                    }
                    let key = msg
                        .get_channel_name()
                        .trim_start_matches("__keyspace@0__:")
                        .to_owned();
                    seen.lock().unwrap().writes.push((rec.now(), key, event));
                }
                _ = role_check.tick() => {
                    let role: redis::RedisResult<Vec<redis::Value>> =
                        redis_cmd(port, &redis::cmd("ROLE")).await;
                    let master = matches!(
                        role.as_ref().ok().and_then(|r| r.first()),
                        Some(redis::Value::BulkString(b)) if b == b"master"
                    );
                    if !master {
                        seen.lock().unwrap().demoted = Some(rec.now());
                        return;
                    }
                }
            }
        }
    });
}

/// Records when the first sentinel announces `+switch-master`.
fn record_switch(sentinel_ports: &[u16], rec: Recorder, seen: Arc<Mutex<OldMaster>>) {
    for &port in sentinel_ports {
        let (rec, seen) = (rec.clone(), seen.clone());
        tokio::spawn(async move {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            let mut pubsub = client.get_async_pubsub().await.unwrap();
            pubsub.subscribe("+switch-master").await.unwrap();
            if pubsub.on_message().next().await.is_some() {
                let mut seen = seen.lock().unwrap();
                let now = rec.now();
                seen.switched = Some(seen.switched.map_or(now, |t| t.min(now)));
            }
        });
    }
}

/// After 4 s of load, `SENTINEL FAILOVER`; the fault lasts until the old master is back as a
/// synced replica (with replica acknowledgements on, writes cannot be acknowledged before).
pub async fn sentinel_failover(
    _rng: Rng,
    rec: Recorder,
    group: SentinelGroup,
    until: Instant,
) -> (SentinelGroup, OldMaster) {
    sleep(Duration::from_secs(4)).await;
    let seen = Arc::new(Mutex::new(OldMaster::default()));
    let old = group.master_port().await;
    record_writes(old, rec.clone(), seen.clone());
    record_switch(&group.sentinel_ports, rec.clone(), seen.clone());
    sleep(Duration::from_millis(300)).await;
    let start = rec.now();
    let (old, new) = group.failover().await;
    eventually(
        Duration::from_secs(40),
        "the old master syncs as a replica",
        || async {
            let info: String = redis_cmd(old, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            info.contains("role:slave") && info.contains("master_link_status:up")
        },
    )
    .await;
    sleep(Duration::from_secs(1)).await;
    rec.fault(Fault {
        kind: "sentinel failover",
        target: format!("master {old} -> {new}"),
        start,
        end: rec.now(),
    });
    let seen = seen.lock().unwrap().clone();
    if let Some(left) = until.checked_duration_since(Instant::now()) {
        sleep(left).await;
    }
    (group, seen)
}

/// The port of the master that serves `key`'s slot.
async fn master_of(cluster: &Cluster, key: &str) -> u16 {
    let mut slot = None;
    for n in &cluster.nodes {
        if let Ok(s) = redis_cmd::<i64>(n.port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
        {
            slot = Some(s);
            break;
        }
    }
    let slot = slot.expect("a node answers CLUSTER KEYSLOT");
    for port in cluster.master_ports().await {
        let Ok(slots) =
            redis_cmd::<Vec<Vec<redis::Value>>>(port, redis::cmd("CLUSTER").arg("SLOTS")).await
        else {
            continue;
        };
        for range in slots {
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                (range.first(), range.get(1))
            else {
                continue;
            };
            let Some(redis::Value::Array(node)) = range.get(2) else {
                continue;
            };
            if (*lo..=*hi).contains(&slot)
                && let Some(redis::Value::Int(p)) = node.get(1)
            {
                return *p as u16;
            }
        }
    }
    panic!("no master serves {key}");
}

/// The node id of the node at `port`.
async fn node_id(port: u16) -> String {
    redis_cmd(port, redis::cmd("CLUSTER").arg("MYID"))
        .await
        .unwrap()
}

/// After 4 s of load, SIGKILL of the master that holds `history-mutex-0`; its replica takes
/// over. The killed node is started again (it rejoins as a replica); the fault lasts until it
/// has synced.
pub async fn cluster_master_kill(
    _rng: Rng,
    rec: Recorder,
    mut cluster: Cluster,
    until: Instant,
) -> Cluster {
    sleep(Duration::from_secs(4)).await;
    let victim = master_of(&cluster, "lockd:{history-mutex-0}").await;
    let start = rec.now();
    let i = cluster.nodes.iter().position(|n| n.port == victim).unwrap();
    cluster.nodes[i].kill();
    eventually(Duration::from_secs(30), "a replica takes over", || async {
        master_of(&cluster, "lockd:{history-mutex-0}").await != victim
    })
    .await;
    let promoted = rec.now();
    cluster.nodes[i].restart().await;
    eventually(
        Duration::from_secs(40),
        "the killed master rejoins as a synced replica",
        || async move {
            let info: String = redis_cmd(victim, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            info.contains("role:slave") && info.contains("master_link_status:up")
        },
    )
    .await;
    sleep(Duration::from_secs(1)).await;
    rec.fault(Fault {
        kind: "cluster master SIGKILL",
        target: format!(
            "master {victim} (replica promoted after {} ms)",
            (promoted - start) / 1000
        ),
        start,
        end: rec.now(),
    });
    if let Some(left) = until.checked_duration_since(Instant::now()) {
        sleep(left).await;
    }
    cluster
}

/// After 3 s of load, moves every slot of the master that holds `history-mutex-0` to another
/// master with `redis-cli --cluster reshard`, while the clients keep using the locks.
pub async fn cluster_reshard(
    _rng: Rng,
    rec: Recorder,
    cluster: Cluster,
    until: Instant,
) -> Cluster {
    sleep(Duration::from_secs(3)).await;
    let from = master_of(&cluster, "lockd:{history-mutex-0}").await;
    let to = cluster
        .master_ports()
        .await
        .into_iter()
        .find(|p| *p != from)
        .unwrap();
    let (from_id, to_id) = (node_id(from).await, node_id(to).await);
    let slots: i64 = {
        let nodes: String = redis_cmd(from, redis::cmd("CLUSTER").arg("NODES"))
            .await
            .unwrap();
        let mine = nodes.lines().find(|l| l.starts_with(&from_id)).unwrap();
        mine.split_whitespace()
            .skip(8)
            .map(|range| match range.split_once('-') {
                Some((lo, hi)) => hi.parse::<i64>().unwrap() - lo.parse::<i64>().unwrap() + 1,
                None => 1,
            })
            .sum()
    };
    let start = rec.now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "redis-cli --cluster reshard failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    rec.fault(Fault {
        kind: "cluster reshard",
        target: format!("{slots} slots {from} -> {to}"),
        start,
        end: rec.now(),
    });
    assert_eq!(
        master_of(&cluster, "lockd:{history-mutex-0}").await,
        to,
        "the live lock's slot moved"
    );
    if let Some(left) = until.checked_duration_since(Instant::now()) {
        sleep(left).await;
    }
    cluster
}

/// The time without service: the longest stretch without a change that took effect (a grant,
/// an extension or a release), over all resources and on the worst single resource, in ms. A
/// refusal (busy) is not service: it needs no write.
pub fn longest_outage(h: &History) -> (f64, f64, String) {
    let mut all: Vec<Micros> = Vec::new();
    let mut by_resource: std::collections::BTreeMap<&str, Vec<Micros>> = Default::default();
    for c in &h.calls {
        if matches!(c.outcome, Outcome::Granted(_) | Outcome::Released { .. }) {
            all.push(c.reply);
            by_resource.entry(&c.resource).or_default().push(c.reply);
        }
    }
    let longest = |times: &mut Vec<Micros>| {
        times.sort_unstable();
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    };
    let overall = longest(&mut all);
    let mut worst = (0, String::new());
    for (resource, mut times) in by_resource {
        let l = longest(&mut times);
        if l > worst.0 {
            worst = (l, resource.to_owned());
        }
    }
    (overall as f64 / 1000.0, worst.0 as f64 / 1000.0, worst.1)
}
