//! What a change did, in words for the audit log: labels before and after,
//! which keys of a desired state changed and how, a command's kind and
//! arguments. Pure; the API and the console note the same words.

use crate::store::Labels;

/// Longest value shown in a description before it is cut.
const VALUE_SHOWN: usize = 60;

/// `labels: site=lab→berlin, +env=prod, -retired` (or `labels: unchanged`).
pub fn labels(before: &Labels, after: &Labels) -> String {
    let mut parts = Vec::new();
    for (key, value) in after {
        match before.get(key) {
            Some(old) if old == value => {}
            Some(old) => parts.push(format!("{key}={}→{}", cut(old), cut(value))),
            None => parts.push(format!("+{key}={}", cut(value))),
        }
    }
    parts.extend(before.keys().filter(|k| !after.contains_key(*k)).map(|k| format!("-{k}")));
    if parts.is_empty() { "labels: unchanged".into() } else { format!("labels: {}", parts.join(", ")) }
}

/// `desired state v3→v4: telemetry_interval "30s"→"1s", +jobs, -foo` (top-level
/// keys; `unchanged` when none differs).
pub fn desired(from: u64, before: &serde_json::Value, to: u64, after: &serde_json::Value) -> String {
    let empty = serde_json::Map::new();
    let (old, new) = (before.as_object().unwrap_or(&empty), after.as_object().unwrap_or(&empty));
    let mut parts = Vec::new();
    for (key, value) in new {
        match old.get(key) {
            Some(was) if was == value => {}
            Some(was) => parts.push(format!("{key} {}→{}", cut(&was.to_string()), cut(&value.to_string()))),
            None => parts.push(format!("+{key}")),
        }
    }
    parts.extend(old.keys().filter(|k| !new.contains_key(*k)).map(|k| format!("-{k}")));
    let what = if parts.is_empty() { "unchanged".to_owned() } else { parts.join(", ") };
    format!("desired state v{from}→v{to}: {what}")
}

/// `command 2000007: exec sh -c 'echo hi'` (without an id: not queued yet).
pub fn command(kind: &str, args: &[String], id: Option<u64>) -> String {
    let text = cut(&typed(kind, args));
    match id {
        Some(id) => format!("command {id}: {text}"),
        None => format!("command: {text}"),
    }
}

/// A command as one would type it: `exec sh -c 'echo hi'`.
pub fn typed(kind: &str, args: &[String]) -> String {
    if args.is_empty() { kind.to_owned() } else { format!("{kind} {}", words(args)) }
}

/// Arguments as one would type them: `sh -c 'echo hi'`.
pub fn words(args: &[String]) -> String {
    args.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" ")
}

/// `arg` as one would type it in a shell: quoted when it has to be.
pub fn shell_word(arg: &str) -> String {
    let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain { arg.to_owned() } else { format!("'{}'", arg.replace('\'', r"'\''")) }
}

/// `text`, cut to [`VALUE_SHOWN`] characters with `…`.
fn cut(text: &str) -> String {
    if text.chars().count() <= VALUE_SHOWN {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(VALUE_SHOWN).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn labels_say_what_changed() {
        let before = l(&[("site", "lab"), ("retired", "yes"), ("env", "dev")]);
        let after = l(&[("site", "berlin"), ("env", "dev"), ("gpu", "1")]);
        assert_eq!(labels(&before, &after), "labels: +gpu=1, site=lab→berlin, -retired");
        assert_eq!(labels(&after, &after), "labels: unchanged");
    }

    #[test]
    fn a_desired_state_says_which_keys_changed() {
        let before = json!({"telemetry_interval": "30s", "foo": 1, "jobs": []});
        let after = json!({"telemetry_interval": "1s", "jobs": [], "bar": true});
        assert_eq!(desired(3, &before, 4, &after), r#"desired state v3→v4: +bar, telemetry_interval "30s"→"1s", -foo"#);
        assert_eq!(desired(0, &json!(null), 1, &json!({})), "desired state v0→v1: unchanged");
        let long = json!({"k": "x".repeat(100)});
        assert!(desired(1, &json!({}), 2, &long).len() < 40, "a new key is named, not shown");
        let changed = desired(1, &json!({"k": 1}), 2, &long);
        assert!(changed.ends_with("…") && changed.chars().count() < 100, "{changed}");
    }

    #[test]
    fn a_command_reads_as_typed() {
        let args = ["sh".to_owned(), "-c".to_owned(), "echo 'hi'".to_owned()];
        assert_eq!(command("exec", &args, Some(7)), r"command 7: exec sh -c 'echo '\''hi'\'''");
        assert_eq!(command("echo", &[], None), "command: echo");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("/var/log"), "/var/log");
    }
}
