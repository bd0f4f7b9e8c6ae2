//! The desired-state document a fleet manager sets for a device. It travels
//! as JSON inside [`crate::protocol::Desired`], so the hub's API and the
//! agent read the same text, and both validate it with this type, through
//! the same [`crate::config::Section`] reader as the agent's config file (a
//! job in desired state is checked exactly like a `[[job]]` table).

use crate::config::{ConfigError, json_to_toml, read_table};
use crate::job::{JobSpec, describe_errors, read_jobs};
use std::time::Duration;

/// Shortest telemetry interval, from config or desired state.
pub const MIN_TELEMETRY_INTERVAL: Duration = Duration::from_millis(100);
/// Longest telemetry interval, from config or desired state.
pub const MAX_TELEMETRY_INTERVAL: Duration = Duration::from_secs(86_400);

/// Checks a telemetry interval read from `key` of `section`.
pub fn check_telemetry_interval(section: &crate::config::Section<'_>, key: &str, d: Duration) {
    section.check(key, d >= MIN_TELEMETRY_INTERVAL, "must be at least 100ms");
    section.check(key, d <= MAX_TELEMETRY_INTERVAL, "must be at most 1 day");
}

/// What a device should be doing. Every field is optional: absent means
/// "the device's own config decides".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredDoc {
    /// Telemetry sampling interval, e.g. `"30s"`; at least 100ms.
    pub telemetry_interval: Option<Duration>,
    /// Jobs from the hub; each replaces the config's job of the same name
    /// (`"enabled": false` switches one off).
    pub jobs: Vec<JobSpec>,
}

impl DesiredDoc {
    /// Parses and validates a document; the error lists every problem, each
    /// with its path (`jobs[nightly].schedule: ...`).
    pub fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
        let table = match json_to_toml(&value, "") {
            Ok(toml::Value::Table(t)) => t,
            Ok(_) => return Err("the document must be a JSON object".into()),
            Err(e) => return Err(describe_errors(&[e])),
        };
        read_table(&table, |root| {
            let telemetry_interval: Option<Duration> = root.get("telemetry_interval");
            if let Some(d) = telemetry_interval {
                check_telemetry_interval(root, "telemetry_interval", d);
            }
            DesiredDoc { telemetry_interval, jobs: read_jobs(root, "jobs") }
        })
        .map_err(|errors: Vec<ConfigError>| describe_errors(&errors))
    }
}

/// Applies a JSON merge patch (RFC 7396) to `target`: objects merge key by
/// key, `null` removes a key, anything else replaces. How `PATCH` changes
/// one setting of a desired state without restating the rest.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in changes {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// What replacing the document `old` by `new` takes away: top-level keys
/// `new` lacks, and jobs (by name, `jobs[name]`) it no longer lists.
pub fn removed_by(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let job_names = |doc: &serde_json::Value| -> Vec<String> {
        doc.get("jobs")
            .and_then(|j| j.as_array())
            .map(|jobs| jobs.iter().filter_map(|j| j.get("name")?.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let mut removed = Vec::new();
    if let Some(old_keys) = old.as_object() {
        for key in old_keys.keys() {
            if new.get(key).is_none() {
                removed.push(key.clone());
            }
        }
    }
    if new.get("jobs").is_some() {
        let kept = job_names(new);
        removed.extend(job_names(old).into_iter().filter(|n| !kept.contains(n)).map(|n| format!("jobs[{n}]")));
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small deterministic fuzzer: documents made of hostile values
    /// (huge and negative numbers, long durations, odd schedules) never make
    /// validation or the schedule arithmetic on what it accepts panic.
    #[test]
    fn hostile_documents_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let numbers = ["0", "1", "59", "18446744073709551615", "9223372036854775813", "-1", "1e400", "99999999999"];
        let units = ["ns", "ms", "s", "m", "h", "days", "weeks", "years", ""];
        let mut pick = |items: &[&str]| items[(next() % items.len() as u64) as usize].to_owned();
        let mut accepted = 0;
        for _ in 0..6000 {
            // Each key: absent, a plausible value, or a hostile one.
            let mut duration = |plausible: &str| match pick(&["absent", "plausible", "hostile"]).as_str() {
                "absent" => None,
                "plausible" => Some(plausible.to_owned()),
                _ => Some(format!("{}{}", pick(&numbers), pick(&units))),
            };
            let (interval, timeout, jitter, backoff) =
                (duration("30s"), duration("5m"), duration("1s"), duration("10s"));
            let schedule = match pick(&["every", "every", "cron", "junk"]).as_str() {
                "every" => format!("@every {}{}", pick(&["1", "30", "86400", "9223372036854775813"]), pick(&units)),
                "cron" => format!("{} * * * * *", pick(&["0", "*/5", "99", "0-59/7"])),
                _ => pick(&["", "@every", "@daily", "* * * * *"]),
            };
            let mut job = json!({"name": pick(&["a", "b", "x y"]), "schedule": schedule, "command": ["true"]});
            for (key, value) in [("timeout", timeout), ("jitter", jitter), ("retry_backoff", backoff)] {
                if let Some(v) = value {
                    job[key] = json!(v);
                }
            }
            if pick(&["yes", "no"]) == "yes" {
                job["retries"] = json!(pick(&numbers).parse::<i64>().unwrap_or(3));
            }
            let mut doc = json!({"jobs": [job]});
            if let Some(v) = interval {
                doc["telemetry_interval"] = json!(v);
            }
            let Ok(parsed) = DesiredDoc::parse(&doc.to_string()) else { continue };
            accepted += 1;
            for job in &parsed.jobs {
                for (last, now) in [(0, 0), (u64::MAX, u64::MAX), (1, u64::MAX), (u64::MAX, 0)] {
                    let (last, now) = (crate::time::Timestamp(last), crate::time::Timestamp(now));
                    let _ = job.schedule.next_due(Some(last), now);
                    let _ = job.schedule.missed_between(last, now);
                }
                for attempt in [0, 2, 40, u32::MAX] {
                    assert!(job.retry_delay(attempt) <= crate::job::MAX_RETRY_DELAY);
                }
            }
        }
        assert!(accepted > 10, "the fuzzer made too few valid documents to mean anything ({accepted})");
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The examples of RFC 7396, appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (json!({"a":{"b":"c"}}), json!({"a":{"b":"d","c":null}}), json!({"a":{"b":"d"}})),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn a_replacement_names_what_it_removes() {
        let old = json!({"telemetry_interval":"30s","jobs":[{"name":"a"},{"name":"b"}]});
        assert_eq!(removed_by(&old, &json!({"jobs":[{"name":"b"}]})), ["telemetry_interval", "jobs[a]"]);
        assert_eq!(removed_by(&old, &json!({"telemetry_interval":"5s"})), ["jobs"]);
        assert!(removed_by(&json!({}), &json!({"jobs":[]})).is_empty());
    }

    #[test]
    fn validates_documents() {
        assert_eq!(DesiredDoc::parse("{}").unwrap(), DesiredDoc::default());
        let d = DesiredDoc::parse(r#"{"telemetry_interval":"2s"}"#).unwrap();
        assert_eq!(d.telemetry_interval, Some(Duration::from_secs(2)));
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":"1ms"}"#).unwrap_err().contains("at least 100ms"));
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":"2days"}"#).unwrap_err().contains("at most 1 day"));
        let err = DesiredDoc::parse(r#"{"telemetry_interval":"9223372036854775813s"}"#).unwrap_err();
        assert!(err.starts_with("telemetry_interval: ") && err.contains("too long"), "{err}");
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":"soon"}"#).unwrap_err().contains("invalid duration"));
        assert!(DesiredDoc::parse(r#"{"telemetry":1}"#).unwrap_err().contains("telemetry: unknown key"));
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":null}"#).unwrap_err().contains("null"));
        assert!(DesiredDoc::parse("[1]").unwrap_err().contains("object"));
    }

    #[test]
    fn jobs_are_validated_like_config_jobs() {
        let d = DesiredDoc::parse(r#"{"jobs":[{"name":"a","schedule":"@every 5s","command":["date"],"retries":2}]}"#)
            .unwrap();
        assert_eq!(d.jobs.len(), 1);
        assert_eq!(d.jobs[0].retries, 2);
        let err = DesiredDoc::parse(
            r#"{"jobs":[{"name":"a","schedule":"every day","command":["date"]},{"name":"b","schedule":"@every 1m","kind":"x"}]}"#,
        )
        .unwrap_err();
        assert!(err.contains("jobs[a].schedule: invalid cron expression"), "{err}");
        assert!(err.contains("jobs[b].kind: unknown job kind"), "{err}");
    }
}
