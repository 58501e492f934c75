//! Request validation at the edge: every rule, with a message that names the field and the
//! rule. Nothing invalid reaches a backend.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use lockd_proto::v1 as pb;

use crate::auth::Namespace;
use crate::backend::{Backend, ExtendParams};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::lock::{AcquireParams, ReleaseParams, Token};
use crate::locks::Locks;

/// Longest resource name, in bytes.
pub const MAX_RESOURCE_BYTES: usize = 256;
/// Longest client-chosen token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 128;
/// Longest owner text, in bytes.
pub const MAX_OWNER_BYTES: usize = 256;
/// Most labels on one lease.
pub const MAX_LABELS: usize = 16;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// Largest semaphore limit.
pub const MAX_LIMIT: u32 = 1024;
/// Largest ListLocks page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// ListLocks page size when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// A validated Acquire.
#[derive(Debug)]
pub struct Acquire {
    pub params: AcquireParams,
    /// Zero: try once.
    pub wait: Duration,
}

/// A validated ListLocks.
#[derive(Debug)]
pub struct List {
    pub prefix: String,
    pub page_size: usize,
    pub page_token: String,
}

/// What a Watch follows.
#[derive(Debug, Clone)]
pub enum WatchScope {
    /// One resource.
    Resource(String),
    /// Every resource under a prefix.
    Prefix(String),
}

/// A validated lease reference from a KeepAlive message.
#[derive(Debug, Clone)]
pub struct KeptLease {
    pub resource: String,
    pub token: Token,
    pub ttl: Duration,
}

/// Checks a resource name: 1 to 256 bytes of UTF-8 (guaranteed by protobuf) without control
/// characters.
pub fn resource(r: String) -> Result<String> {
    if r.is_empty() {
        return Err(Error::invalid("resource", "is required (1 to 256 bytes)"));
    }
    if r.len() > MAX_RESOURCE_BYTES {
        return Err(Error::invalid(
            "resource",
            format!(
                "must be at most {MAX_RESOURCE_BYTES} bytes (got {})",
                r.len()
            ),
        ));
    }
    if r.chars().any(char::is_control) {
        return Err(Error::invalid(
            "resource",
            "must not contain control characters",
        ));
    }
    Ok(r)
}

/// Checks a resource-name prefix: at most 256 bytes, no control characters; may be empty.
fn prefix(field: &str, p: String) -> Result<String> {
    if p.len() > MAX_RESOURCE_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {MAX_RESOURCE_BYTES} bytes (got {})",
                p.len()
            ),
        ));
    }
    if p.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(p)
}

fn required_token(t: String) -> Result<Token> {
    if t.is_empty() {
        return Err(Error::invalid(
            "token",
            "is required (the token returned by Acquire)",
        ));
    }
    bounded_token(t)
}

fn bounded_token(t: String) -> Result<Token> {
    if t.len() > MAX_TOKEN_BYTES {
        return Err(Error::invalid(
            "token",
            format!("must be at most {MAX_TOKEN_BYTES} bytes (got {})", t.len()),
        ));
    }
    Ok(Token::new(t))
}

/// Converts a protobuf Duration, refusing negative or malformed ones.
fn duration(field: &str, d: &prost_types::Duration) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a non-negative duration"));
    }
    Ok(Duration::new(
        d.seconds.unsigned_abs(),
        d.nanos.unsigned_abs(),
    ))
}

/// A TTL: whole milliseconds (as Redis keeps them), from 1ms to `max`.
fn ttl(field: &str, d: &prost_types::Duration, max: Duration) -> Result<Duration> {
    let d = duration(field, d)?;
    let whole_ms = Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if whole_ms.is_zero() {
        return Err(Error::invalid(field, "must be at least 1ms"));
    }
    if whole_ms > max {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {}ms (the server's maximum TTL)",
                max.as_millis()
            ),
        ));
    }
    Ok(whole_ms)
}

fn owner(o: String, peer: Option<SocketAddr>) -> Result<String> {
    if o.is_empty() {
        return Ok(peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()));
    }
    if o.len() > MAX_OWNER_BYTES {
        return Err(Error::invalid(
            "owner",
            format!("must be at most {MAX_OWNER_BYTES} bytes (got {})", o.len()),
        ));
    }
    if o.chars().any(char::is_control) {
        return Err(Error::invalid(
            "owner",
            "must not contain control characters",
        ));
    }
    Ok(o)
}

fn labels(l: std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if l.len() > MAX_LABELS {
        return Err(Error::invalid(
            "labels",
            format!("must have at most {MAX_LABELS} entries (got {})", l.len()),
        ));
    }
    for (k, v) in &l {
        if k.is_empty() {
            return Err(Error::invalid("labels", "keys must not be empty"));
        }
        if k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES {
            return Err(Error::invalid(
                "labels",
                format!("keys and values must be at most {MAX_LABEL_BYTES} bytes (label `{k}`)"),
            ));
        }
    }
    Ok(l.into_iter().collect())
}

impl Acquire {
    /// Validates an Acquire. `locks` gives the limits, and makes the token when the client gave
    /// none.
    pub fn parse<B: Backend>(
        r: pb::AcquireRequest,
        locks: &Locks<B>,
        peer: Option<SocketAddr>,
        ns: &Namespace,
    ) -> Result<Self> {
        let limits = locks.limits();
        let resource = ns.qualify(resource(r.resource)?);
        let ttl = match &r.ttl {
            Some(d) => ttl("ttl", d, limits.max_ttl)?,
            None => limits.default_ttl,
        };
        let wait = match &r.wait_timeout {
            Some(d) => duration("wait_timeout", d)?,
            None => Duration::ZERO,
        };
        if wait > limits.max_wait {
            return Err(Error::invalid(
                "wait_timeout",
                format!(
                    "must be at most {}ms (the server's maximum wait)",
                    limits.max_wait.as_millis()
                ),
            ));
        }
        let new_token = r.token.is_empty();
        let token = if new_token {
            locks.new_token()
        } else {
            bounded_token(r.token)?
        };
        if r.limit > MAX_LIMIT {
            return Err(Error::invalid(
                "limit",
                format!("must be at most {MAX_LIMIT} (got {})", r.limit),
            ));
        }
        // Only a waiting request takes a place in the fair queue; a single attempt still
        // respects the queue (the backend does that for every request).
        let fair = (r.fair && !wait.is_zero()).then(|| locks.new_id());
        Ok(Self {
            params: AcquireParams {
                resource,
                token,
                owner: owner(r.owner, peer)?,
                ttl,
                labels: labels(r.labels)?,
                limit: r.limit.max(1),
                fair,
                waiting: !wait.is_zero(),
                new_token,
                renewer: None,
            },
            wait,
        })
    }
}

/// Validates a Release.
pub fn release(r: pb::ReleaseRequest, limits: &Limits, ns: &Namespace) -> Result<ReleaseParams> {
    let keep_until = match r.keep_until {
        None => None,
        Some(t) if (0..1_000_000_000).contains(&t.nanos) => Some(
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos / 1_000_000)),
        ),
        Some(_) => return Err(Error::invalid("keep_until", "must be a valid timestamp")),
    };
    let min_hold = match &r.min_hold {
        Some(d) => duration("min_hold", d)?,
        None => Duration::ZERO,
    };
    Ok(ReleaseParams {
        resource: ns.qualify(resource(r.resource)?),
        token: required_token(r.token)?,
        keep_until,
        min_hold,
        max_ttl: limits.max_ttl,
        only_if_renewer: None,
    })
}

/// Validates an Extend.
pub fn extend(r: pb::ExtendRequest, limits: &Limits, ns: &Namespace) -> Result<ExtendParams> {
    let resource = ns.qualify(resource(r.resource)?);
    let token = required_token(r.token)?;
    let Some(d) = &r.ttl else {
        return Err(Error::invalid(
            "ttl",
            "is required (the time to add, at least 1ms)",
        ));
    };
    Ok(ExtendParams {
        resource,
        token,
        ttl: ttl("ttl", d, limits.max_ttl)?,
        replace_ttl: r.replace_ttl,
        max_ttl: limits.max_ttl,
        renewer: None,
    })
}

impl List {
    /// Validates a ListLocks.
    pub fn parse(r: pb::ListLocksRequest, ns: &Namespace) -> Result<Self> {
        let page_size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            n => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE} (got {n})"),
                ));
            }
        };
        Ok(Self {
            prefix: ns.qualify(prefix("prefix", r.prefix)?),
            page_size: page_size as usize,
            page_token: r.page_token,
        })
    }
}

impl WatchScope {
    /// Validates a Watch: exactly one of `resource` and `prefix`.
    pub fn parse(r: pb::WatchRequest, ns: &Namespace) -> Result<Self> {
        match (r.resource.is_empty(), r.prefix.is_empty()) {
            (false, true) => Ok(Self::Resource(ns.qualify(resource(r.resource)?))),
            (true, false) => Ok(Self::Prefix(ns.qualify(prefix("prefix", r.prefix)?))),
            (true, true) => Err(Error::invalid(
                "resource",
                "give exactly one of `resource` and `prefix` (both are empty)",
            )),
            (false, false) => Err(Error::invalid(
                "resource",
                "give exactly one of `resource` and `prefix` (both are set)",
            )),
        }
    }

    /// True when events of `resource` belong to this watch.
    pub fn covers(&self, r: &str) -> bool {
        match self {
            Self::Resource(name) => name == r,
            Self::Prefix(p) => r.starts_with(p.as_str()),
        }
    }
}

impl KeptLease {
    /// Validates a lease named in a KeepAlive message.
    pub fn parse(r: pb::LeaseRef, limits: &Limits, ns: &Namespace) -> Result<Self> {
        Ok(Self {
            resource: ns.qualify(resource(r.resource)?),
            token: required_token(r.token)?,
            ttl: match &r.ttl {
                Some(d) => ttl("ttl", d, limits.max_ttl)?,
                None => limits.default_ttl,
            },
        })
    }
}
