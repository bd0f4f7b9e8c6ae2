//! How people read times in the console and `outpostctl`: "3 min ago",
//! "2 h". Pure.

use outpost_shared::time::Timestamp;

/// "5 s", "3 min", "2 h" (under two days), "4 d".
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// "3 min ago", "never", "just now" (a time ahead of `now`).
pub fn ago(at: Option<Timestamp>, now: Timestamp) -> String {
    match at {
        None => "never".into(),
        Some(t) if t > now => "just now".into(),
        Some(t) => format!("{} ago", duration(t.until(now).as_secs())),
    }
}

/// [`ago`] of an RFC 3339 time as the API gives it (the text itself if it
/// does not parse).
pub fn ago_text(rfc3339: Option<&str>, now: Timestamp) -> String {
    match rfc3339 {
        None => "never".into(),
        Some(text) => match humantime::parse_rfc3339_weak(text) {
            Ok(t) => ago(Some(Timestamp::from_system(t)), now),
            Err(_) => text.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(5), "5 s");
        assert_eq!(duration(125), "2 min");
        assert_eq!(duration(7200), "2 h");
        assert_eq!(duration(3 * 86400), "3 d");
        assert_eq!(ago(None, Timestamp(0)), "never");
        assert_eq!(ago(Some(Timestamp(5000)), Timestamp(1000)), "just now");
        assert_eq!(ago_text(Some("1970-01-01T00:00:10Z"), Timestamp(70_000)), "1 min ago");
    }
}
