//! The desired-state document a fleet manager sets for a device. It travels
//! as JSON inside [`crate::protocol::Desired`], so the hub's API and the
//! agent read the same text, and both validate it with this type.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a device should be doing. Every field is optional: absent means
/// "the device's own config decides".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredDoc {
    /// Telemetry sampling interval, e.g. `"30s"`; at least 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval: Option<String>,
}

impl DesiredDoc {
    /// Parses and validates a document; the error lists every problem.
    pub fn parse(json: &str) -> Result<Self, String> {
        let doc: DesiredDoc = serde_json::from_str(json).map_err(|e| e.to_string())?;
        doc.telemetry_interval()?;
        Ok(doc)
    }

    /// The telemetry interval, if set.
    pub fn telemetry_interval(&self) -> Result<Option<Duration>, String> {
        let Some(text) = &self.telemetry_interval else {
            return Ok(None);
        };
        let d = humantime::parse_duration(text)
            .map_err(|e| format!("telemetry_interval: invalid duration {text:?}: {e}"))?;
        if d < Duration::from_millis(100) {
            return Err(format!("telemetry_interval: {text:?} is below the minimum of 100ms"));
        }
        Ok(Some(d))
    }

    /// The document as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_documents() {
        assert_eq!(DesiredDoc::parse("{}").unwrap(), DesiredDoc::default());
        let d = DesiredDoc::parse(r#"{"telemetry_interval":"2s"}"#).unwrap();
        assert_eq!(d.telemetry_interval().unwrap(), Some(Duration::from_secs(2)));
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":"1ms"}"#).unwrap_err().contains("minimum"));
        assert!(DesiredDoc::parse(r#"{"telemetry_interval":"soon"}"#).unwrap_err().contains("invalid duration"));
        assert!(DesiredDoc::parse(r#"{"jobs":[]}"#).unwrap_err().contains("unknown field"));
    }
}
