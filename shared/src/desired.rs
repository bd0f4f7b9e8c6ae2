//! The desired-state document a fleet manager sets for a device. It travels
//! as JSON inside [`crate::protocol::Desired`], so the hub's API and the
//! agent read the same text, and both validate it with this type, through
//! the same [`crate::config::Section`] reader as the agent's config file (a
//! job in desired state is checked exactly like a `[[job]]` table).

use crate::config::{ConfigError, json_to_toml, read_table};
use crate::job::{JobSpec, describe_errors, read_jobs};
use std::time::Duration;

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
                root.check("telemetry_interval", d >= Duration::from_millis(100), "must be at least 100ms");
            }
            DesiredDoc { telemetry_interval, jobs: read_jobs(root, "jobs") }
        })
        .map_err(|errors: Vec<ConfigError>| describe_errors(&errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_documents() {
        assert_eq!(DesiredDoc::parse("{}").unwrap(), DesiredDoc::default());
        let d = DesiredDoc::parse(r#"{"telemetry_interval":"2s"}"#).unwrap();
        assert_eq!(d.telemetry_interval, Some(Duration::from_secs(2)));
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":"1ms"}"#).unwrap_err().contains("at least 100ms"));
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
