//! Domain → protobuf conversions. Tokens leave only inside a [`pb::Lease`]. Resource names
//! leave as the caller's [`Namespace`] names them.

use std::time::Duration;

use lockd_proto::v1 as pb;

use crate::auth::Namespace;
use crate::lock::{
    AcquireOutcome, EventKind, ExtendOutcome, Holders, Lease, LeaseStatus, LockEvent, LockInfo,
    ReleaseOutcome, UnixMillis,
};

pub fn timestamp(ms: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // Always in 0..1000 ms, so the nanoseconds fit an i32.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // subsec_nanos() < 1e9, so it fits an i32.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The lease for its holder, token included: only Acquire answers with this.
pub fn lease(l: Lease, ns: &Namespace) -> pb::Lease {
    pb::Lease {
        token: l.token.expose().to_owned(),
        ..lease_without_token(l, ns)
    }
}

/// The lease without its token (Extend: the caller already has it).
pub fn lease_without_token(l: Lease, ns: &Namespace) -> pb::Lease {
    pb::Lease {
        expires_at: Some(timestamp(l.expires_at)),
        ttl: Some(duration(l.ttl)),
        fencing_token: l.fencing_token,
        token: String::new(),
        resource: ns.unqualify(l.resource),
    }
}

/// The answer to a Release (the RPC, or a Session operation).
pub fn release(outcome: ReleaseOutcome) -> pb::ReleaseResponse {
    pb::ReleaseResponse {
        released: outcome.status == LeaseStatus::Ok,
        status: lease_status(outcome.status) as i32,
        frees_at: outcome.frees_at.map(timestamp),
    }
}

/// The answer to an Extend (the RPC, or a Session operation).
pub fn extend(outcome: ExtendOutcome, ns: &Namespace) -> pb::ExtendResponse {
    pb::ExtendResponse {
        extended: outcome.status == LeaseStatus::Ok,
        status: lease_status(outcome.status) as i32,
        // Only Acquire returns tokens: the caller of Extend already has it.
        lease: outcome.lease.map(|l| lease_without_token(l, ns)),
    }
}

pub fn lock_info(h: LockInfo, ns: &Namespace) -> pb::LockInfo {
    pb::LockInfo {
        resource: ns.unqualify(h.resource),
        owner: h.owner,
        fencing_token: h.fencing_token,
        acquired_at: Some(timestamp(h.acquired_at)),
        expires_at: Some(timestamp(h.expires_at)),
        labels: h.labels.into_iter().collect(),
    }
}

pub fn lease_status(s: LeaseStatus) -> pb::LeaseStatus {
    match s {
        LeaseStatus::Ok => pb::LeaseStatus::Ok,
        LeaseStatus::NotHeld => pb::LeaseStatus::NotHeld,
        LeaseStatus::HeldByOther => pb::LeaseStatus::HeldByOther,
    }
}

pub fn acquire(outcome: AcquireOutcome, ns: &Namespace) -> pb::AcquireResponse {
    match outcome {
        AcquireOutcome::Acquired(l) => pb::AcquireResponse {
            acquired: true,
            lease: Some(lease(l, ns)),
            holder: None,
        },
        AcquireOutcome::Busy(b) => pb::AcquireResponse {
            acquired: false,
            lease: None,
            holder: b.holder.map(|h| lock_info(h, ns)),
        },
    }
}

pub fn is_locked(found: Option<Holders>) -> pb::IsLockedResponse {
    match found {
        None => pb::IsLockedResponse::default(),
        Some(h) => pb::IsLockedResponse {
            locked: true,
            remaining: h.holders.iter().map(|x| x.remaining).max().map(duration),
            holders: u32::try_from(h.holders.len()).unwrap_or(u32::MAX),
            limit: h.limit,
        },
    }
}

pub fn get_owner(found: Option<Holders>, ns: &Namespace) -> pb::GetOwnerResponse {
    match found {
        None => pb::GetOwnerResponse::default(),
        Some(h) => {
            let holders: Vec<_> = h.holders.into_iter().map(|h| lock_info(h, ns)).collect();
            pb::GetOwnerResponse {
                holder: holders.first().cloned(),
                holders,
                limit: h.limit,
            }
        }
    }
}

pub fn event(e: &LockEvent, ns: &Namespace) -> pb::LockEvent {
    pb::LockEvent {
        r#type: match e.kind {
            EventKind::Acquired => pb::LockEventType::Acquired,
            EventKind::Extended => pb::LockEventType::Extended,
            EventKind::Released => pb::LockEventType::Released,
            EventKind::Expired => pb::LockEventType::Expired,
        } as i32,
        resource: ns.unqualify(e.resource.clone()),
        owner: e.owner.clone(),
        fencing_token: e.fencing_token,
        time: Some(timestamp(e.time)),
        expires_at: e.expires_at.map(timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_milliseconds_and_handle_times_before_1970() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
        let t = timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_000_000));
    }
}
