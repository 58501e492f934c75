//! The one-shot commands: list, get, watch, acquire, release, health. Each is parse → call →
//! print, and returns its exit code.

use std::future::Future;
use std::time::Duration;

use lockd_client::proto::{
    AcquireRequest, GetOwnerRequest, LeaseStatus, ListLocksRequest, ReleaseRequest, WatchRequest,
};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::cli::LockArgs;
use crate::connect::Connection;
use crate::error::{Error, code};
use crate::output;

/// The service name lockd reports health for.
const HEALTH_SERVICE: &str = "lockd.v1.LockService";

/// How many locks a `ListLocks` page asks for.
const PAGE_SIZE: u32 = 500;

/// Settings every command shares.
pub struct Context {
    pub conn: Connection,
    pub json: bool,
    /// Time limit of each call.
    pub timeout: Duration,
}

impl Context {
    /// Runs one call with the time limit plus `extra`, sent to lockd as the deadline as well.
    async fn call<T, R, F>(&self, message: T, extra: Duration, rpc: R) -> Result<F::Output, Error>
    where
        R: FnOnce(tonic::Request<T>) -> F,
        F: Future,
    {
        let limit = self.timeout.saturating_add(extra);
        let mut request = tonic::Request::new(message);
        request.set_timeout(limit);
        tokio::time::timeout(limit, rpc(request))
            .await
            .map_err(|_| Error::Lockd(lockd_client::Error::Timeout("no answer in time".into())))
    }

    /// Prints a JSON document, pretty.
    fn print_json(&self, value: &serde_json::Value) {
        println!("{value:#}");
    }
}

/// `lockctl list [prefix]`.
pub async fn list(ctx: &Context, prefix: String) -> Result<u8, Error> {
    let mut locks = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListLocksRequest {
            prefix: prefix.clone(),
            page_size: PAGE_SIZE,
            page_token,
        };
        let mut lockd = ctx.conn.lockd();
        let page = ctx
            .call(request, Duration::ZERO, |r| async move {
                lockd.list_locks(r).await
            })
            .await??
            .into_inner();
        locks.extend(page.locks);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    locks.sort_by(|a, b| {
        a.resource
            .cmp(&b.resource)
            .then(a.fencing_token.cmp(&b.fencing_token))
    });
    if ctx.json {
        ctx.print_json(&locks.iter().map(output::lock_json).collect());
    } else {
        print!("{}", output::lock_table(&locks));
    }
    Ok(code::OK)
}

/// `lockctl get <resource>`.
pub async fn get(ctx: &Context, resource: String) -> Result<u8, Error> {
    let mut lockd = ctx.conn.lockd();
    let request = GetOwnerRequest {
        resource: resource.clone(),
    };
    let reply = ctx
        .call(request, Duration::ZERO, |r| async move {
            lockd.get_owner(r).await
        })
        .await??
        .into_inner();
    // A mutex fills in `holder`; a semaphore also lists every holder.
    let holders = match (reply.holders.is_empty(), reply.holder) {
        (true, Some(holder)) => vec![holder],
        (_, _) => reply.holders,
    };
    if ctx.json {
        ctx.print_json(&json!({
            "resource": resource,
            "locked": !holders.is_empty(),
            "holders": holders.iter().map(output::lock_json).collect::<Vec<_>>(),
        }));
    } else if holders.is_empty() {
        println!("{resource} is free");
    } else {
        print!("{}", output::lock_table(&holders));
    }
    Ok(code::OK)
}

/// `lockctl watch [prefix]`: runs until interrupted or the stream ends.
pub async fn watch(ctx: &Context, prefix: String) -> Result<u8, Error> {
    let mut lockd = ctx.conn.lockd();
    let request = WatchRequest {
        prefix: prefix.clone(),
        ..Default::default()
    };
    let mut stream = ctx
        .call(
            request,
            Duration::ZERO,
            |r| async move { lockd.watch(r).await },
        )
        .await??
        .into_inner();
    // On stderr, so stdout holds only events; tests wait for this line before changing locks.
    eprintln!("watching {:?}", prefix);
    while let Some(message) = stream.message().await? {
        if message.missed > 0 {
            if ctx.json {
                println!("{}", json!({ "missed": message.missed }));
            } else {
                println!("(missed {} events: reading too slowly)", message.missed);
            }
        }
        if let Some(event) = message.event {
            if ctx.json {
                println!("{}", output::event_json(&event));
            } else {
                println!("{}", output::event_line(&event));
            }
        }
    }
    Err(Error::Lockd(lockd_client::Error::Unavailable(
        "lockd ended the watch (is it shutting down?)".into(),
    )))
}

/// `lockctl acquire <resource>`: prints the token on stdout, the rest on stderr, so that
/// `TOKEN=$(lockctl acquire job)` works.
pub async fn acquire(ctx: &Context, resource: String, lock: LockArgs) -> Result<u8, Error> {
    let wait = lock.wait.unwrap_or_default();
    let request = AcquireRequest {
        resource: resource.clone(),
        ttl: Some(proto_duration(lock.ttl)),
        wait_timeout: lock.wait.map(proto_duration),
        owner: lock.owner(),
        labels: lock.labels.iter().cloned().collect(),
        ..Default::default()
    };
    let mut lockd = ctx.conn.lockd();
    let reply = ctx
        .call(request, wait, |r| async move { lockd.acquire(r).await })
        .await??
        .into_inner();
    match (reply.acquired, reply.lease) {
        (true, Some(lease)) => {
            if ctx.json {
                ctx.print_json(&json!({
                    "acquired": true,
                    "resource": lease.resource,
                    "token": lease.token,
                    "fencing_token": lease.fencing_token,
                    "expires_at": output::time(lease.expires_at),
                }));
            } else {
                println!("{}", lease.token);
                eprintln!(
                    "acquired {} (fencing token {}, expires in {}); release with: lockctl release {} <token>",
                    lease.resource,
                    lease.fencing_token,
                    output::remaining(lease.expires_at),
                    lease.resource,
                );
            }
            Ok(code::OK)
        }
        (true, None) => Err(Error::Lockd(lockd_client::Error::Protocol(
            "Acquire answered acquired without a lease".into(),
        ))),
        (false, _) => {
            busy(ctx, &resource, reply.holder.as_ref());
            Ok(code::BUSY)
        }
    }
}

/// Says that `resource` is held, and by whom (on stdout as JSON, else on stderr).
pub fn busy(ctx: &Context, resource: &str, holder: Option<&lockd_client::LockInfo>) {
    if ctx.json {
        ctx.print_json(&json!({
            "acquired": false,
            "resource": resource,
            "holder": holder.map(output::lock_json),
        }));
    } else {
        match holder {
            Some(h) => eprintln!(
                "busy: {resource} is held by {:?} (fencing token {}, expires in {})",
                h.owner,
                h.fencing_token,
                output::remaining(h.expires_at)
            ),
            None => eprintln!("busy: {resource} was not free when the wait ended"),
        }
    }
}

/// `lockctl release <resource> <token>`: exit 0 when released, 1 when the token did not hold
/// the lock.
pub async fn release(
    ctx: &Context,
    resource: String,
    token: String,
    min_hold: Option<Duration>,
) -> Result<u8, Error> {
    let request = ReleaseRequest {
        resource: resource.clone(),
        token,
        min_hold: min_hold.map(proto_duration),
        ..Default::default()
    };
    let mut lockd = ctx.conn.lockd();
    let reply = ctx
        .call(request, Duration::ZERO, |r| async move {
            lockd.release(r).await
        })
        .await??
        .into_inner();
    let status = match reply.status() {
        LeaseStatus::Ok => "released",
        LeaseStatus::NotHeld => "not held (free, released or expired)",
        LeaseStatus::HeldByOther => "held by another token",
        LeaseStatus::Unspecified => "unknown",
    };
    let released = reply.released || reply.status() == LeaseStatus::Ok;
    if ctx.json {
        ctx.print_json(&json!({ "resource": resource, "released": released, "status": status }));
    } else if released {
        println!("released {resource}");
    } else {
        eprintln!("not released: {resource} is {status}");
    }
    Ok(if released { code::OK } else { code::NO })
}

/// `lockctl health`: exit 0 when lockd serves, 1 when it says it does not.
pub async fn health(ctx: &Context) -> Result<u8, Error> {
    let mut health = ctx.conn.health();
    let request = HealthCheckRequest {
        service: HEALTH_SERVICE.into(),
    };
    let status = ctx
        .call(
            request,
            Duration::ZERO,
            |r| async move { health.check(r).await },
        )
        .await??
        .into_inner()
        .status();
    let name = status.as_str_name();
    if ctx.json {
        ctx.print_json(&json!({ "service": HEALTH_SERVICE, "status": name }));
    } else {
        println!("{name}");
    }
    Ok(if status == ServingStatus::Serving {
        code::OK
    } else {
        code::NO
    })
}

/// A std duration as a protobuf one (lockd validates the range).
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}
