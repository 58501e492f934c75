//! A job as given on the command line: its name (also its lock's resource), its schedule, its
//! shell command, and optional lock timing.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// One scheduled job, parsed from a `--job` spec (see [`Job::from_str`]).
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's name, and the resource of its one lock: every tick of the job takes the same
    /// lock, so its fencing token grows with every run.
    pub name: String,
    /// When it runs.
    pub schedule: Schedule,
    /// The shell command (run with `sh -c`).
    pub command: String,
    /// The lease's TTL; `None`: the scheduler's `--ttl`.
    pub ttl: Option<Duration>,
    /// The minimum hold; `None`: the scheduler's `--min-hold`.
    pub min_hold: Option<MinHold>,
}

/// When a job runs, in UTC.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression with seconds: `sec min hour day-of-month month day-of-week [year]`.
    Cron(Box<cron::Schedule>),
    /// Every so often, at the multiples of the interval since the Unix epoch, so every instance
    /// agrees on the ticks without talking to the others.
    Every(Duration),
}

impl Schedule {
    /// The first tick strictly after `t`, if there is one.
    pub fn after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron(schedule) => schedule.after(&t).next(),
            Self::Every(interval) => {
                let step = i64::try_from(interval.as_millis()).ok()?.max(1);
                let next = (t.timestamp_millis().div_euclid(step) + 1).checked_mul(step)?;
                DateTime::from_timestamp_millis(next)
            }
        }
    }
}

/// How long a run keeps its lock at least, counted from the grant (ShedLock's
/// `lockAtLeastFor`): what keeps an instance whose timer fires late from running a tick again
/// after a quick run has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinHold {
    /// 80% of the time from this tick to the job's next one: long enough to cover any timer
    /// that is late by less than that, short enough to leave the next tick free.
    Auto,
    /// A fixed time (zero: none).
    Fixed(Duration),
}

impl MinHold {
    /// The minimum hold for a run of `tick`, whose next tick is `next`.
    pub fn resolve(self, tick: DateTime<Utc>, next: Option<DateTime<Utc>>) -> Duration {
        match self {
            Self::Fixed(d) => d,
            Self::Auto => next
                .and_then(|next| (next - tick).to_std().ok())
                .map(|gap| gap.mul_f64(0.8))
                .unwrap_or_default(),
        }
    }
}

impl FromStr for MinHold {
    type Err = String;

    /// `auto`, or a duration such as `800ms` (`0`: none).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            d => parse_duration(d).map(Self::Fixed),
        }
    }
}

impl FromStr for Job {
    type Err = String;

    /// Parses `name=<name>;cron=<expression>;cmd=<shell command>`, or `every=<duration>` instead
    /// of `cron=`, with optional `ttl=<duration>` and `min_hold=<duration|auto>` fields before
    /// `cmd`. Fields are separated by `;`; `cmd` comes last and takes the rest of the spec, so
    /// the command may contain `;`.
    fn from_str(spec: &str) -> Result<Self, String> {
        let mut fields = HashMap::new();
        let mut command = None;
        let mut rest = spec.trim();
        while !rest.is_empty() {
            let (key, tail) = rest
                .split_once('=')
                .ok_or_else(|| format!("`{rest}`: expected key=value"))?;
            let key = key.trim();
            if key == "cmd" {
                command = Some(tail.trim().to_owned());
                break;
            }
            let (value, tail) = tail.split_once(';').unwrap_or((tail, ""));
            if fields.insert(key, value.trim()).is_some() {
                return Err(format!("`{key}` given twice"));
            }
            rest = tail.trim_start();
        }
        let name = fields.remove("name").unwrap_or_default().to_owned();
        if name.is_empty() {
            return Err("a job needs a name=".into());
        }
        let command = command
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("job {name}: a job needs a cmd= (last)"))?;
        let schedule = match (fields.remove("cron"), fields.remove("every")) {
            (Some(expression), None) => Schedule::Cron(Box::new(
                cron::Schedule::from_str(expression)
                    .map_err(|e| format!("job {name}: cron `{expression}`: {e}"))?,
            )),
            (None, Some(every)) => {
                let interval = parse_duration(every)?;
                if interval.is_zero() {
                    return Err(format!("job {name}: every= must be more than 0"));
                }
                Schedule::Every(interval)
            }
            _ => return Err(format!("job {name}: give exactly one of cron= and every=")),
        };
        let ttl = fields.remove("ttl").map(parse_duration).transpose()?;
        let min_hold = fields.remove("min_hold").map(str::parse).transpose()?;
        if let Some(unknown) = fields.keys().next() {
            return Err(format!(
                "job {name}: unknown field `{unknown}` (name, cron, every, ttl, min_hold, cmd)"
            ));
        }
        Ok(Self {
            name,
            schedule,
            command,
            ttl,
            min_hold,
        })
    }
}

/// Parses durations such as `500ms`, `30s`, `5m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 30s, 5m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    #[test]
    fn a_full_spec_is_parsed_with_a_command_that_contains_separators() {
        let job: Job =
            "name=report; cron=*/5 * * * * *; ttl=10s; min_hold=auto; cmd=echo a; echo b=c"
                .parse()
                .unwrap();
        assert_eq!(job.name, "report");
        assert_eq!(job.command, "echo a; echo b=c");
        assert_eq!(job.ttl, Some(Duration::from_secs(10)));
        assert_eq!(job.min_hold, Some(MinHold::Auto));
        assert_eq!(job.schedule.after(at(1_000)), Some(at(5_000)));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        for (spec, reason) in [
            ("cron=* * * * * *;cmd=true", "name="),
            ("name=a;cron=* * * * * *", "cmd="),
            ("name=a;cmd=true", "exactly one"),
            ("name=a;every=1s;cron=* * * * * *;cmd=true", "exactly one"),
            ("name=a;cron=not cron;cmd=true", "cron `not cron`"),
            ("name=a;every=1x;cmd=true", "unknown unit"),
            (
                "name=a;every=1s;colour=red;cmd=true",
                "unknown field `colour`",
            ),
        ] {
            let err = spec.parse::<Job>().unwrap_err();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }

    #[test]
    fn cron_and_every_ticks_are_strictly_after_and_aligned() {
        let every_second = Schedule::Cron(Box::new("* * * * * *".parse().unwrap()));
        assert_eq!(every_second.after(at(1_000)), Some(at(2_000)));
        assert_eq!(every_second.after(at(1_400)), Some(at(2_000)));
        let every = Schedule::Every(Duration::from_millis(400));
        assert_eq!(every.after(at(1_000)), Some(at(1_200)));
        assert_eq!(every.after(at(1_200)), Some(at(1_600)));
    }

    #[test]
    fn auto_min_hold_is_most_of_the_gap_to_the_next_tick() {
        let hold = MinHold::Auto.resolve(at(1_000), Some(at(2_000)));
        assert_eq!(hold, Duration::from_millis(800));
        assert_eq!(MinHold::Auto.resolve(at(1_000), None), Duration::ZERO);
        assert_eq!(
            "0".parse::<MinHold>().unwrap(),
            MinHold::Fixed(Duration::ZERO)
        );
    }
}
