//! Typed replies of the Lua scripts, decoded from their arrays. The status codes carry the
//! names that `common.lua` gives them.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_redis::redis::Value;

use super::from_ms;
use crate::error::{Error, Result};
use crate::lock::{Holders, LockInfo, UnixMillis};

/// acquire.lua: the lock was granted.
const GRANTED: i64 = 1;
/// acquire.lua: not granted.
const BUSY: i64 = 0;
/// acquire.lua: the resource exists with another limit.
const LIMIT_MISMATCH: i64 = -2;
/// release.lua, extend.lua: the token held the lease; the change took effect.
const OK: i64 = 1;
/// release.lua, extend.lua: nobody holds the lease (free, expired, or released).
const NOT_HELD: i64 = 0;
/// release.lua, extend.lua: another token holds the lock (or, for release.lua, another
/// KeepAlive stream renewed the lease last).
const HELD_BY_OTHER: i64 = -1;

/// What acquire.lua answered.
#[derive(Debug)]
pub(super) enum AcquireReply {
    /// Granted, or refreshed for a token that already held it.
    Granted {
        /// The lease's fencing token.
        fencing_token: u64,
        /// Redis TIME when granted, in ms.
        now: UnixMillis,
        /// A new lease, rather than a refresh of one the token already held.
        new: bool,
    },
    /// Not granted.
    Busy {
        /// When a retry may succeed (a lease ends, or the fair queue's head goes stale).
        retry_in: Option<Duration>,
        /// The first holder, when there is one.
        holder: Option<LockInfo>,
    },
    /// The resource is a mutex (1) or a semaphore with this limit, unlike the request.
    LimitMismatch {
        /// The resource's limit.
        limit: u32,
    },
}

impl AcquireReply {
    /// Decodes the reply of acquire.lua for `resource`.
    pub(super) fn decode(v: Value, resource: &str) -> Result<Self> {
        let f = Fields::new(v)?;
        match f.int(0)? {
            GRANTED => Ok(Self::Granted {
                fencing_token: f.uint(1)?,
                now: f.int(2)?,
                new: f.int(3)? == 1,
            }),
            BUSY => {
                let now = f.int(1)?;
                let retry = f.int(2)?;
                let holder = if f.len() > 3 {
                    Some(f.holder(3, now, resource)?.0)
                } else {
                    None
                };
                Ok(Self::Busy {
                    retry_in: (retry >= 0).then(|| from_ms(retry)),
                    holder,
                })
            }
            LIMIT_MISMATCH => Ok(Self::LimitMismatch {
                limit: f.uint32(1)?,
            }),
            other => Err(unknown("acquire", other)),
        }
    }
}

/// What release.lua answered.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReleaseReply {
    /// Released; the lock frees for others at this time (now, or the minimum-hold point).
    Released {
        /// When the lock frees, in ms since the epoch; `None` when it was freed at once and the
        /// script did not read Redis's time for it.
        frees_at: Option<UnixMillis>,
    },
    /// Not held by anyone.
    NotHeld,
    /// Held by another token, or renewed last by another KeepAlive stream.
    HeldByOther,
}

impl ReleaseReply {
    /// Decodes the reply of release.lua.
    pub(super) fn decode(v: Value) -> Result<Self> {
        let f = Fields::new(v)?;
        match f.int(0)? {
            OK => Ok(Self::Released {
                frees_at: Some(f.int(1)?).filter(|&t| t != 0),
            }),
            NOT_HELD => Ok(Self::NotHeld),
            HELD_BY_OTHER => Ok(Self::HeldByOther),
            other => Err(unknown("release", other)),
        }
    }
}

/// What extend.lua answered.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ExtendReply {
    /// Extended.
    Extended {
        /// The lease's fencing token.
        fencing_token: u64,
        /// Redis TIME when extended, in ms.
        now: UnixMillis,
        /// The new remaining time, in ms.
        ttl_ms: i64,
    },
    /// Not held by anyone (or released with a minimum hold).
    NotHeld,
    /// Held by another token.
    HeldByOther,
}

impl ExtendReply {
    /// Decodes the reply of extend.lua.
    pub(super) fn decode(v: Value) -> Result<Self> {
        let f = Fields::new(v)?;
        match f.int(0)? {
            OK => Ok(Self::Extended {
                fencing_token: f.uint(1)?,
                now: f.int(2)?,
                ttl_ms: f.int(3)?,
            }),
            NOT_HELD => Ok(Self::NotHeld),
            HELD_BY_OTHER => Ok(Self::HeldByOther),
            other => Err(unknown("extend", other)),
        }
    }
}

/// Decodes the reply of inspect.lua for `resource`: `None` when the resource is free.
pub(super) fn decode_inspect(v: Value, resource: &str) -> Result<Option<Holders>> {
    let f = Fields::new(v)?;
    if f.len() == 0 {
        return Ok(None);
    }
    let now = f.int(0)?;
    let limit = f.uint32(1)?;
    let count = f.int(2)?;
    let mut at = 3;
    let mut holders = Vec::new();
    for _ in 0..count {
        let (holder, next) = f.holder(at, now, resource)?;
        holders.push(holder);
        at = next;
    }
    holders.sort_by_key(|h| h.fencing_token);
    Ok(Some(Holders { limit, holders }))
}

fn unknown(script: &str, code: i64) -> Error {
    Error::Internal(format!("{script}.lua answered the unknown code {code}"))
}

/// A script's array reply, read field by field.
struct Fields(Vec<Value>);

impl Fields {
    fn new(v: Value) -> Result<Self> {
        match v {
            Value::Array(items) => Ok(Self(items)),
            Value::Int(n) => Ok(Self(vec![Value::Int(n)])),
            other => Err(Error::Internal(format!("expected an array, got {other:?}"))),
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn int(&self, i: usize) -> Result<i64> {
        match self.0.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(Error::Internal(format!(
                "field {i}: expected an integer, got {other:?}"
            ))),
        }
    }

    fn uint(&self, i: usize) -> Result<u64> {
        u64::try_from(self.int(i)?).map_err(|_| Error::Internal(format!("field {i}: negative")))
    }

    fn uint32(&self, i: usize) -> Result<u32> {
        u32::try_from(self.int(i)?).map_err(|_| Error::Internal(format!("field {i}: out of range")))
    }

    fn text(&self, i: usize) -> Result<String> {
        match self.0.get(i) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            other => Err(Error::Internal(format!(
                "field {i}: expected a string, got {other:?}"
            ))),
        }
    }

    /// The holder layout of acquire.lua and inspect.lua, starting at `at`: fencing token,
    /// acquired-at, remaining ms, owner, 2 x number of labels, then the labels. Returns the
    /// holder and the index after it.
    fn holder(&self, at: usize, now: UnixMillis, resource: &str) -> Result<(LockInfo, usize)> {
        let remaining = self.int(at + 2)?.max(0);
        let n = usize::try_from(self.int(at + 4)?).unwrap_or(0);
        let mut labels = BTreeMap::new();
        for i in (at + 5..at + 5 + n).step_by(2) {
            labels.insert(self.text(i)?, self.text(i + 1)?);
        }
        let info = LockInfo {
            resource: resource.to_owned(),
            owner: self.text(at + 3)?,
            fencing_token: self.uint(at)?,
            acquired_at: self.int(at + 1)?,
            expires_at: now.saturating_add(remaining),
            remaining: from_ms(remaining),
            labels,
        };
        Ok((info, at + 5 + n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(items: &[i64]) -> Value {
        Value::Array(items.iter().map(|&n| Value::Int(n)).collect())
    }

    #[test]
    fn script_codes_decode_by_name() {
        assert_eq!(
            ReleaseReply::decode(array(&[OK, 42])).unwrap(),
            ReleaseReply::Released { frees_at: Some(42) }
        );
        assert_eq!(
            ReleaseReply::decode(array(&[HELD_BY_OTHER])).unwrap(),
            ReleaseReply::HeldByOther
        );
        assert_eq!(
            ExtendReply::decode(array(&[NOT_HELD])).unwrap(),
            ExtendReply::NotHeld
        );
        assert!(matches!(
            AcquireReply::decode(array(&[LIMIT_MISMATCH, 3]), "r").unwrap(),
            AcquireReply::LimitMismatch { limit: 3 }
        ));
        assert!(matches!(
            AcquireReply::decode(array(&[BUSY, 1000, 250]), "r").unwrap(),
            AcquireReply::Busy { retry_in: Some(d), holder: None } if d == Duration::from_millis(250)
        ));
        assert!(AcquireReply::decode(array(&[7]), "r").is_err());
    }
}
