//! Mutual exclusion under load: many clients hammer a few resources through the real server,
//! and a checker verifies the recorded history.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;

/// One lease as a client saw it: from the moment it had the grant in hand to the moment it
/// sent the release. That window lies inside the real holding time, so if two recorded windows
/// overlap, two real leases overlapped.
#[derive(Debug, Clone)]
struct Held {
    resource: String,
    fencing_token: u64,
    client: usize,
    from: Instant,
    to: Instant,
}

/// Verifies, per resource: fencing tokens are unique and, in fencing order, every lease ends
/// before the next one starts (so no two leases overlap, and tokens increase over time).
fn check_history(history: &[Held]) -> Result<usize, String> {
    let mut per_resource: HashMap<&str, Vec<&Held>> = HashMap::new();
    for h in history {
        per_resource.entry(&h.resource).or_default().push(h);
    }
    for (resource, mut leases) in per_resource {
        leases.sort_by_key(|h| h.fencing_token);
        for pair in leases.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.fencing_token == b.fencing_token {
                return Err(format!(
                    "{resource}: fencing token {} granted twice",
                    a.fencing_token
                ));
            }
            if b.from < a.to {
                return Err(format!(
                    "{resource}: lease {} (client {}) started before lease {} (client {}) ended",
                    b.fencing_token, b.client, a.fencing_token, a.client
                ));
            }
        }
    }
    Ok(history.len())
}

async fn hammer(
    endpoints: Vec<String>,
    clients: usize,
    resources: usize,
    run_for: Duration,
) -> Vec<Held> {
    let history = Arc::new(Mutex::new(Vec::new()));
    let stop_at = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let endpoint = endpoints[client % endpoints.len()].clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = lockd_client::connect(endpoint).await.unwrap();
            let mut n = 0usize;
            while Instant::now() < stop_at {
                let resource = format!("res-{}", (client + n) % resources);
                n += 1;
                let r = wait_acquire(&mut c, &resource, 5.0, 1.0).await;
                let Some(lease) = r.lease else { continue };
                let from = Instant::now();
                // Hold briefly, sometimes not at all, to shake out interleavings.
                if !n.is_multiple_of(3) {
                    tokio::time::sleep(Duration::from_micros(200 * (n % 5) as u64)).await;
                }
                let to = Instant::now();
                let rel = release(&mut c, &lease).await;
                assert!(
                    rel.released,
                    "a lease held well within its TTL must release"
                );
                history.lock().unwrap().push(Held {
                    resource,
                    fencing_token: lease.fencing_token,
                    client,
                    from,
                    to,
                });
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(history).unwrap().into_inner().unwrap()
}

crate::conformance! {
    async fn thirty_two_clients_never_hold_one_resource_at_once(store: Store) {
        let s = Setup::new(store).await;
        let history = hammer(vec![s.lockd.endpoint()], 32, 3, Duration::from_secs(3)).await;
        let checked = check_history(&history).unwrap();
        assert!(checked > 100, "only {checked} leases in 3 s: the test proves little");
        let clients: std::collections::HashSet<_> = history.iter().map(|h| h.client).collect();
        assert!(clients.len() >= 16, "only {} clients ever got a lease", clients.len());
    }
}

/// The same over two lockd replicas sharing one Redis: exclusion holds across replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_two_replicas_never_hold_one_resource_at_once() {
    let redis = RedisServer::start().await;
    let a = Lockd::start(Some(&redis)).await;
    let b = Lockd::start(Some(&redis)).await;
    let history = hammer(
        vec![a.endpoint(), b.endpoint()],
        32,
        3,
        Duration::from_secs(3),
    )
    .await;
    let checked = check_history(&history).unwrap();
    assert!(checked > 100, "only {checked} leases");
}

#[test]
fn the_checker_catches_overlapping_leases() {
    let t = Instant::now();
    let ms = |n| t + Duration::from_millis(n);
    let ok = vec![
        Held {
            resource: "r".into(),
            fencing_token: 1,
            client: 0,
            from: ms(0),
            to: ms(10),
        },
        Held {
            resource: "r".into(),
            fencing_token: 2,
            client: 1,
            from: ms(11),
            to: ms(20),
        },
    ];
    assert_eq!(check_history(&ok), Ok(2));
    let mut overlap = ok.clone();
    overlap[1].from = ms(5);
    assert!(check_history(&overlap).is_err());
    let mut duplicate = ok;
    duplicate[1].fencing_token = 1;
    assert!(check_history(&duplicate).is_err());
}
