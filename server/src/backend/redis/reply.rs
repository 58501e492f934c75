//! Reading the array replies of the Lua scripts.

use std::collections::BTreeMap;

use deadpool_redis::redis::Value;

use super::from_ms;
use crate::error::{Error, Result};
use crate::lock::{LeaseStatus, LockInfo, UnixMillis};

/// A script's array reply, read field by field.
pub(super) struct Reply(pub(super) Vec<Value>);

impl Reply {
    pub(super) fn new(v: Value) -> Result<Self> {
        match v {
            Value::Array(items) => Ok(Self(items)),
            Value::Int(n) => Ok(Self(vec![Value::Int(n)])),
            other => Err(Error::Internal(format!("expected an array, got {other:?}"))),
        }
    }

    pub(super) fn int(&self, i: usize) -> Result<i64> {
        match self.0.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(Error::Internal(format!(
                "field {i}: expected an integer, got {other:?}"
            ))),
        }
    }

    /// The status code that release.lua and extend.lua put first: 1, 0 or -1.
    pub(super) fn lease_status(&self) -> Result<LeaseStatus> {
        Ok(match self.int(0)? {
            1 => LeaseStatus::Ok,
            0 => LeaseStatus::NotHeld,
            _ => LeaseStatus::HeldByOther,
        })
    }

    pub(super) fn uint(&self, i: usize) -> Result<u64> {
        u64::try_from(self.int(i)?).map_err(|_| Error::Internal(format!("field {i}: negative")))
    }

    pub(super) fn uint32(&self, i: usize) -> Result<u32> {
        u32::try_from(self.int(i)?).map_err(|_| Error::Internal(format!("field {i}: out of range")))
    }

    pub(super) fn text(&self, i: usize) -> Result<String> {
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
    pub(super) fn holder(
        &self,
        at: usize,
        now: UnixMillis,
        resource: &str,
    ) -> Result<(LockInfo, usize)> {
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
