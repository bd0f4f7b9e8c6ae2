//! How people read times in the console and `outpostctl`: "3 min ago",
//! "2 h", and absolute times in one zone, labelled ("… UTC"). Pure.

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

/// The one zone the console shows times in, labelled: "2026-12-07
/// 07:50:13 UTC".
pub fn utc(t: Timestamp) -> String {
    let text = t.rfc3339();
    format!("{} UTC", text.trim_end_matches('Z').replacen('T', " ", 1))
}

/// [`utc`] of an RFC 3339 time as the API gives it (the text itself if it
/// does not parse).
pub fn utc_text(rfc3339: &str) -> String {
    match humantime::parse_rfc3339_weak(rfc3339) {
        Ok(t) => utc(Timestamp::from_system(t)),
        Err(_) => rfc3339.to_owned(),
    }
}

/// When a coming time is: "in 3 min (2026-12-07 07:53:00 UTC)".
pub fn ahead_text(rfc3339: &str, now: Timestamp) -> String {
    match humantime::parse_rfc3339_weak(rfc3339) {
        Ok(t) => {
            let t = Timestamp::from_system(t);
            let when = if t <= now { "now".to_owned() } else { format!("in {}", duration(now.until(t).as_secs())) };
            format!("{when} ({})", utc(t))
        }
        Err(_) => rfc3339.to_owned(),
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

    #[test]
    fn times_are_in_one_zone_and_say_which() {
        assert_eq!(utc(Timestamp(1_796_629_813_000)), "2026-12-07 07:50:13 UTC");
        assert_eq!(utc_text("2026-12-07T07:50:13Z"), "2026-12-07 07:50:13 UTC");
        assert_eq!(utc_text("garbage"), "garbage");
        let now = Timestamp(1_796_629_813_000);
        assert_eq!(ahead_text("2026-12-07T07:53:13Z", now), "in 3 min (2026-12-07 07:53:13 UTC)");
        assert_eq!(ahead_text("2026-12-07T07:00:00Z", now), "now (2026-12-07 07:00:00 UTC)");
    }
}
