//! Backend semantics that both stores must share: semaphore leases during a minimum hold, the
//! lifetime of a semaphore's key, fencing tokens across lost data, and resource names that
//! contain Redis Cluster hash-tag braces.

use std::collections::BTreeSet;
use std::time::Duration;

use lockd_client::proto::{AcquireRequest, LeaseStatus, ListLocksRequest, ReleaseRequest};
use tokio::time::Instant;

use crate::support::*;

fn sem_req(resource: &str, limit: u32, ttl: f64, token: &str) -> AcquireRequest {
    AcquireRequest {
        limit,
        token: token.into(),
        ..acquire_req(resource, ttl)
    }
}

/// Releases with a minimum hold of an hour: the lease lingers.
async fn release_with_min_hold(c: &mut Client, resource: &str, token: &str) -> bool {
    c.release(ReleaseRequest {
        resource: resource.into(),
        token: token.into(),
        min_hold: Some(secs(3600.0)),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .released
}

/// Acquires until the store answers (lockd reconnects to a restarted Redis on its own).
async fn acquire_when_back(c: &mut Client, resource: &str) -> lockd_client::proto::Lease {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.acquire(acquire_req(resource, 30.0)).await {
            Ok(r) if r.get_ref().acquired => return r.into_inner().lease.unwrap(),
            other => assert!(Instant::now() < deadline, "store not back: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Redis Cluster hash slot of a key (CRC16/XMODEM of its hash tag, modulo 16384), as the
/// Redis Cluster specification defines it.
fn slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let tag = k
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = k[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &k[open + 1..open + 1 + close])
        })
        .unwrap_or(k);
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[test]
fn the_slot_function_follows_the_cluster_specification() {
    // CRC16/XMODEM("123456789") = 0x31C3; "foo" is slot 12182 in the specification.
    assert_eq!(slot("123456789"), 0x31C3);
    assert_eq!(slot("foo"), 12182);
    assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
    assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
}

/// Names with braces, and the escape sequences an escaping scheme might produce.
const BRACED: [&str; 9] = ["}x", "a}b", "{c}", "%7D", "}", "{", "%", "%25", "a}"];

crate::conformance! {
    async fn a_semaphore_lease_released_with_a_minimum_hold_is_not_granted_again(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let first = c.acquire(sem_req("pool", 2, 30.0, "T")).await.unwrap().into_inner();
        assert!(first.acquired);
        assert!(release_with_min_hold(&mut c, "pool", "T").await);
        // As for a mutex: the lingering lease is not granted to its own token again.
        let again = c.acquire(sem_req("pool", 2, 30.0, "T")).await.unwrap().into_inner();
        assert!(!again.acquired, "re-granted during the minimum hold: {again:?}");
        assert_eq!(is_locked(&mut c, "pool").await.holders, 1);
        let lease = first.lease.unwrap();
        assert_eq!(extend(&mut c, &lease, 30.0, false).await.status(), LeaseStatus::NotHeld);
        // The other slot is still free for another token.
        let other = c.acquire(sem_req("pool", 2, 30.0, "U")).await.unwrap().into_inner();
        assert!(other.acquired);
        assert_eq!(is_locked(&mut c, "pool").await.holders, 2);
    }

    async fn a_semaphore_goes_with_its_last_live_holder(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        assert!(c.acquire(sem_req("pool", 3, 1.0, "short")).await.unwrap().into_inner().acquired);
        let long = c.acquire(sem_req("pool", 3, 3600.0, "long")).await.unwrap().into_inner();
        let long = long.lease.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(release(&mut c, &long).await.released);
        assert!(!is_locked(&mut c, "pool").await.locked);
        // Nothing is left of the semaphore: the name may become a mutex.
        let lease = acquire_ok(&mut c, "pool", 30.0).await;
        if let Some(redis) = &s.redis {
            assert!(redis.keys().await.contains(&"lockd:{pool}".to_owned()));
        }
        release(&mut c, &lease).await;
        if let Some(redis) = &s.redis {
            assert!(!redis.keys().await.contains(&"lockd:{pool}".to_owned()));
        }
    }

    async fn a_semaphore_extended_to_a_shorter_time_ends_then(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let long = c.acquire(sem_req("pool", 3, 3600.0, "long")).await.unwrap().into_inner();
        let long = long.lease.unwrap();
        assert!(extend(&mut c, &long, 0.5, true).await.extended);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!is_locked(&mut c, "pool").await.locked);
        assert!(try_acquire(&mut c, "pool", 30.0).await.acquired, "still a semaphore");
    }

    async fn a_semaphore_released_with_a_minimum_hold_ends_at_its_last_holder(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        assert!(c.acquire(sem_req("pool", 3, 0.5, "short")).await.unwrap().into_inner().acquired);
        assert!(c.acquire(sem_req("pool", 3, 3600.0, "long")).await.unwrap().into_inner().acquired);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let until = now + Duration::from_millis(500);
        let r = c
            .release(ReleaseRequest {
                resource: "pool".into(),
                token: "long".into(),
                keep_until: Some(prost_types::Timestamp {
                    seconds: until.as_secs() as i64,
                    nanos: until.subsec_nanos() as i32,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.released);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!is_locked(&mut c, "pool").await.locked);
        assert!(try_acquire(&mut c, "pool", 30.0).await.acquired, "still a semaphore");
    }

    async fn fencing_tokens_keep_increasing_when_the_store_loses_its_data(store: Store) {
        let mut s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut last = 0;
        for _ in 0..3 {
            let lease = acquire_ok(&mut c, "job-1", 30.0).await;
            assert!(lease.fencing_token > last);
            last = lease.fencing_token;
            release(&mut c, &lease).await;
        }
        // An old holder may still act on `last`: the next token must be greater.
        match &mut s.redis {
            Some(redis) => redis.restart().await,
            None => s.lockd.restart().await,
        }
        let mut c = s.client().await;
        let after = acquire_when_back(&mut c, "job-1").await;
        assert!(after.fencing_token > last, "{} after {last}", after.fencing_token);
    }

    async fn resources_with_braces_work_and_stay_distinct(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut leases = Vec::new();
        for name in BRACED {
            leases.push(acquire_ok(&mut c, name, 30.0).await);
        }
        for (name, lease) in BRACED.iter().zip(&leases) {
            assert!(is_locked(&mut c, name).await.locked, "{name}");
            assert!(!try_acquire(&mut c, name, 30.0).await.acquired, "{name}");
            assert!(extend(&mut c, lease, 30.0, true).await.extended, "{name}");
        }
        for (prefix, want) in [("}", vec!["}", "}x"]), ("a}", vec!["a}", "a}b"]), ("%", vec!["%", "%25", "%7D"]), ("{", vec!["{", "{c}"])] {
            let page = c
                .list_locks(ListLocksRequest { prefix: prefix.into(), page_size: 100, page_token: String::new() })
                .await
                .unwrap()
                .into_inner();
            assert!(page.next_page_token.is_empty());
            let listed: BTreeSet<_> = page.locks.iter().map(|l| l.resource.as_str()).collect();
            assert_eq!(listed, want.into_iter().collect(), "prefix {prefix}");
        }
        for (name, lease) in BRACED.iter().zip(&leases) {
            assert!(release(&mut c, lease).await.released, "{name}");
            assert!(!is_locked(&mut c, name).await.locked, "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_of_a_resource_share_one_cluster_slot() {
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut holder = s.client().await;
    for name in BRACED.into_iter().chain(["plain", "x{y}z"]) {
        let before: BTreeSet<String> = redis.keys().await.into_iter().collect();
        // A lease shorter than the fencing grace period has a counter key.
        let lease = acquire_ok(&mut holder, name, 5.0).await;
        // A fair waiter creates the queue keys.
        let mut waiter = s.client().await;
        let resource = name.to_owned();
        let wait = tokio::spawn(async move {
            let mut req = acquire_req(&resource, 30.0);
            req.fair = true;
            req.wait_timeout = Some(secs(10.0));
            waiter.acquire(req).await.unwrap().into_inner()
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let keys = loop {
            let keys: Vec<String> = redis
                .keys()
                .await
                .into_iter()
                .filter(|k| !before.contains(k))
                .collect();
            if keys.len() >= 4 {
                break keys;
            }
            assert!(Instant::now() < deadline, "{name}: only {keys:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let slots: BTreeSet<u16> = keys.iter().map(|k| slot(k)).collect();
        assert_eq!(slots.len(), 1, "{name}: {keys:?} in slots {slots:?}");
        // The hash tag is not empty: the slot is not that of the whole key.
        assert!(
            keys.iter().all(|k| k.contains('{') && !k.contains("{}")),
            "{keys:?}"
        );
        assert!(release(&mut holder, &lease).await.released);
        let got = wait.await.unwrap();
        assert!(got.acquired, "{name}");
        release(&mut holder, &got.lease.unwrap()).await;
    }
}

/// A mutex lease keeps its fencing token in its lock hash. The `:fence` counter holds it as
/// well, until the grace period (ten seconds) after the lease, only where the hash cannot stand
/// for it: a lease shorter than the grace, a resource whose counter still exists, and a
/// release. A lease of ten seconds or more taken on a fresh resource is one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_key_is_kept_only_where_the_lock_hash_cannot_stand_for_it() {
    let s = Setup::new(Store::Redis).await;
    let port = s.redis.as_ref().unwrap().port;
    let mut c = s.client().await;
    let pttl = |key: &'static str| async move {
        redis_cmd::<i64>(port, deadpool_redis::redis::cmd("PTTL").arg(key))
            .await
            .unwrap()
    };
    let counter = || async move {
        redis_cmd::<Option<u64>>(
            port,
            deadpool_redis::redis::cmd("GET").arg("lockd:{job-1}:fence"),
        )
        .await
        .unwrap()
    };
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    assert!(extend(&mut c, &lease, 60.0, true).await.extended);
    assert_eq!(
        pttl("lockd:{job-1}:fence").await,
        -2,
        "a 30 s lease, then a 60 s one, on a fresh resource needs no counter key"
    );
    let mut lease = lease;
    for step in ["shortened", "extended", "released", "acquired"] {
        let lock_ttl = match step {
            "shortened" => {
                assert!(extend(&mut c, &lease, 5.0, true).await.extended);
                5_000
            }
            "extended" => {
                assert!(extend(&mut c, &lease, 60.0, true).await.extended);
                60_000
            }
            "released" => {
                assert!(release(&mut c, &lease).await.released);
                0
            }
            _ => {
                lease = acquire_ok(&mut c, "job-1", 30.0).await;
                30_000
            }
        };
        let (lock, fence) = (
            pttl("lockd:{job-1}").await.max(0),
            pttl("lockd:{job-1}:fence").await,
        );
        assert!(
            lock > lock_ttl - 2_000 && lock <= lock_ttl,
            "{step}: lock PTTL {lock}"
        );
        assert!(
            (9_000..=10_500).contains(&(fence - lock)),
            "{step}: the counter ends {} ms after the lease, not ten seconds",
            fence - lock
        );
        assert_eq!(counter().await, Some(lease.fencing_token), "{step}");
    }
}

/// The `:fence` key must not outlive the resource's last lease by more than the grace period
/// (ten seconds) that covers a backward step of Redis's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_key_goes_some_time_after_the_last_lease_ends() {
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut c = s.client().await;
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    release(&mut c, &lease).await;
    let mut sem = c
        .acquire(sem_req("pool", 2, 1.0, "T"))
        .await
        .unwrap()
        .into_inner();
    assert!(sem.lease.take().is_some());
    assert!(
        redis
            .keys()
            .await
            .contains(&"lockd:{job-1}:fence".to_owned())
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !redis.keys().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            redis.keys().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
