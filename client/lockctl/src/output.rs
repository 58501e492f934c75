//! How lockctl prints: aligned tables for people, JSON for scripts. Never a token, except the
//! one `acquire` prints on purpose.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use lockd_client::proto::{LockEvent, LockEventType, LockInfo};
use serde_json::{Value, json};

/// A timestamp in RFC 3339, or "" when absent or out of range.
pub fn time(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_default()
}

/// Time left until `t`, such as `29s` or `1m 3s` ("expired" when past).
pub fn remaining(t: Option<prost_types::Timestamp>) -> String {
    let Some(at) = t.and_then(|t| SystemTime::try_from(t).ok()) else {
        return String::new();
    };
    match at.duration_since(SystemTime::now()) {
        // Whole seconds read best in a table; below one second, milliseconds.
        Ok(left) if left >= Duration::from_secs(1) => {
            humantime::format_duration(Duration::from_secs(left.as_secs())).to_string()
        }
        Ok(left) => {
            humantime::format_duration(Duration::from_millis(left.as_millis() as u64)).to_string()
        }
        Err(_) => "expired".into(),
    }
}

/// Labels as `k=v,k2=v2`, sorted.
fn labels(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

/// One lock as JSON (no token: lockd never sends one with a `LockInfo`).
pub fn lock_json(info: &LockInfo) -> Value {
    json!({
        "resource": info.resource,
        "owner": info.owner,
        "fencing_token": info.fencing_token,
        "acquired_at": time(info.acquired_at),
        "expires_at": time(info.expires_at),
        "labels": info.labels,
    })
}

/// Locks as an aligned table.
pub fn lock_table(locks: &[LockInfo]) -> String {
    let rows: Vec<Vec<String>> = locks
        .iter()
        .map(|l| {
            vec![
                l.resource.clone(),
                l.owner.clone(),
                l.fencing_token.to_string(),
                remaining(l.expires_at),
                labels(&l.labels),
            ]
        })
        .collect();
    table(
        &["RESOURCE", "OWNER", "FENCING TOKEN", "EXPIRES IN", "LABELS"],
        &rows,
    )
}

/// An event's type as a word: ACQUIRED, EXTENDED, RELEASED, EXPIRED.
fn event_type(event: &LockEvent) -> &'static str {
    match event.r#type() {
        LockEventType::Acquired => "ACQUIRED",
        LockEventType::Extended => "EXTENDED",
        LockEventType::Released => "RELEASED",
        LockEventType::Expired => "EXPIRED",
        LockEventType::Unspecified => "UNSPECIFIED",
    }
}

/// One event as a line: time, type, resource, fencing token, owner.
pub fn event_line(event: &LockEvent) -> String {
    let owner = if event.owner.is_empty() {
        String::new()
    } else {
        format!(" owner={:?}", event.owner)
    };
    format!(
        "{} {:<8} {} fencing_token={}{owner}",
        time(event.time),
        event_type(event),
        event.resource,
        event.fencing_token
    )
}

/// One event as JSON.
pub fn event_json(event: &LockEvent) -> Value {
    json!({
        "type": event_type(event),
        "resource": event.resource,
        "owner": event.owner,
        "fencing_token": event.fencing_token,
        "time": time(event.time),
        "expires_at": time(event.expires_at),
    })
}

/// Rows under headers, each column as wide as its widest cell, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns_and_drops_trailing_spaces() {
        let rows = vec![
            vec!["nightly-scan".to_owned(), "a".to_owned(), "7".to_owned()],
            vec!["x".to_owned(), "scheduler-2".to_owned(), String::new()],
        ];
        assert_eq!(
            table(&["RESOURCE", "OWNER", "N"], &rows),
            "RESOURCE      OWNER        N\nnightly-scan  a            7\nx             scheduler-2\n"
        );
    }
}
