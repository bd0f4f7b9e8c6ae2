//! Reading TOML config files so that an operator sees every problem at once.
//!
//! serde stops at the first error; an operator fixing a device over a slow
//! link wants the whole list. A [`Section`] hands out typed values key by
//! key, records each failure with its key path (`uplink.backoff_max`), and at
//! [`Section::finish`] reports every key nobody asked for as unknown. The
//! binaries print the list and exit with status 64 (`EX_USAGE`).

use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit status for configuration errors (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`uplink.hub`), or empty for the file as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file the errors are about.
    pub file: PathBuf,
    /// The problems, in the order they were found.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{}: {n} error{}", self.file.display(), if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            if e.path.is_empty() {
                write!(f, "\n  - {}", e.message)?;
            } else {
                write!(f, "\n  - {}: {}", e.path, e.message)?;
            }
        }
        Ok(())
    }
}

/// A config type read from a TOML file through a [`Section`].
pub trait ConfigFile: Sized {
    /// Builds the config from the document's root, recording every problem
    /// in `root`.
    fn read(root: &Section<'_>) -> Self;

    /// Reads and validates a config file, reporting every problem.
    fn load(path: &Path) -> Result<Self, ConfigErrors> {
        load_file(path, Self::read)
    }

    /// Reads and validates config text; `file` names it in errors.
    fn parse(file: &Path, text: &str) -> Result<Self, ConfigErrors> {
        load_str(file, text, Self::read)
    }

    /// What the file alone cannot show and the daemon needs before it can
    /// run: files the config names, the state of the data dir (enrolled,
    /// initialised). `validate` and the daemon's start both check it, so
    /// what `validate` accepts starts, and what cannot start exits 64 with
    /// the same messages instead of restarting in a loop. Default: nothing.
    fn check_environment(&self) -> Vec<ConfigError> {
        Vec::new()
    }

    /// [`ConfigFile::load`], then [`ConfigFile::check_environment`].
    fn load_checked(path: &Path) -> Result<Self, ConfigErrors> {
        let config = Self::load(path)?;
        let errors = config.check_environment();
        if errors.is_empty() { Ok(config) } else { Err(ConfigErrors { file: path.to_owned(), errors }) }
    }

    /// Loads `path` for a command line tool: on errors, prints them all to
    /// standard error and returns exit status 64.
    fn load_or_exit(path: &Path) -> Result<Self, std::process::ExitCode> {
        Self::load(path).map_err(exit_config)
    }

    /// Like [`ConfigFile::load_or_exit`], with the environment checked too:
    /// for a daemon about to start.
    fn load_checked_or_exit(path: &Path) -> Result<Self, std::process::ExitCode> {
        Self::load_checked(path).map_err(exit_config)
    }

    /// The `validate --config F` command: prints `F: ok` or every error.
    fn validate_command(path: &Path) -> std::process::ExitCode {
        match Self::load_checked_or_exit(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                std::process::ExitCode::SUCCESS
            }
            Err(code) => code,
        }
    }
}

fn exit_config(errors: ConfigErrors) -> std::process::ExitCode {
    eprintln!("{errors}");
    std::process::ExitCode::from(EXIT_CONFIG as u8)
}

/// Checks a `host:port` address as devices dial it (a name or an IP
/// address, and a port from 1 to 65535; IPv6 in brackets).
pub fn check_host_port(text: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{text:?} {why}; write host:port, e.g. \"hub.example.com:7443\""));
    let Some((host, port)) = text.rsplit_once(':') else { return bad("has no port") };
    if host.is_empty() || host.contains(char::is_whitespace) || (host.contains(':') && !host.starts_with('[')) {
        return bad("has no valid host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("has no valid port"),
    }
}

/// The hub addresses in `text`: one `host:port`, or several separated by
/// commas (the hubs of one fleet), in the order written.
pub fn hub_addresses(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect()
}

/// Checks a list of hub addresses ([`hub_addresses`]): at least one, each
/// `host:port`.
pub fn check_hub_addresses(text: &str) -> Result<(), String> {
    let list = hub_addresses(text);
    if list.is_empty() {
        return Err(format!("{text:?} names no hub; write host:port, or several separated by commas"));
    }
    list.iter().try_for_each(|a| check_host_port(a))
}

/// The order in which to try `hubs`: `preferred` (the hub that answered
/// last) first, then the others in an order `seed` shuffles, so a fleet
/// whose devices each pick a random seed spreads over its hubs and a device
/// stays with the hub that answers.
pub fn hub_order(hubs: &[String], preferred: Option<&str>, seed: u64) -> Vec<String> {
    let mut rest: Vec<String> = hubs.iter().filter(|h| Some(h.as_str()) != preferred).cloned().collect();
    let mut state = seed;
    for i in (1..rest.len()).rev() {
        // splitmix64: enough to spread devices, no dependency.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let j = usize::try_from(z % (i as u64 + 1)).unwrap_or(0);
        rest.swap(i, j);
    }
    let mut order: Vec<String> =
        preferred.filter(|p| hubs.iter().any(|h| h == p)).map(str::to_owned).into_iter().collect();
    order.extend(rest);
    order
}

/// Reads `path` and builds a config from it with `build`, which reads the
/// document through the given [`Section`].
pub fn load_file<T>(path: &Path, build: impl FnOnce(&Section<'_>) -> T) -> Result<T, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(path, &text, build),
        Err(e) => Err(ConfigErrors {
            file: path.to_owned(),
            errors: vec![ConfigError { path: String::new(), message: format!("cannot read: {e}") }],
        }),
    }
}

/// Like [`load_file`], on text already read; `file` names it in errors.
pub fn load_str<T>(file: &Path, text: &str, build: impl FnOnce(&Section<'_>) -> T) -> Result<T, ConfigErrors> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigErrors {
        file: file.to_owned(),
        errors: vec![ConfigError {
            path: String::new(),
            message: format!("not valid TOML: {}", e.to_string().trim_end()),
        }],
    })?;
    let sink = Sink::default();
    let root = Section::new(String::new(), &table, &sink);
    let value = build(&root);
    root.finish();
    let errors = sink.0.into_inner();
    if errors.is_empty() { Ok(value) } else { Err(ConfigErrors { file: file.to_owned(), errors }) }
}

/// Reads an already parsed document (a JSON document converted with
/// [`json_to_toml`], say) through [`Section`]s; the errors carry key paths
/// only.
pub fn read_table<T>(table: &toml::Table, build: impl FnOnce(&Section<'_>) -> T) -> Result<T, Vec<ConfigError>> {
    let sink = Sink::default();
    let root = Section::new(String::new(), table, &sink);
    let value = build(&root);
    root.finish();
    let errors = sink.0.into_inner();
    if errors.is_empty() { Ok(value) } else { Err(errors) }
}

/// Converts a JSON value to TOML so that JSON documents are read by the same
/// [`Section`] code as config files. JSON `null` has no TOML form and is
/// refused with the path where it occurs.
pub fn json_to_toml(value: &serde_json::Value, path: &str) -> Result<toml::Value, ConfigError> {
    use serde_json::Value as J;
    Ok(match value {
        J::Null => {
            return Err(ConfigError {
                path: path.to_owned(),
                message: "null is not allowed; leave the key out".into(),
            });
        }
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(items) => toml::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_to_toml(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => toml::Value::Table(
            map.iter()
                .map(|(k, v)| {
                    let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    json_to_toml(v, &sub).map(|v| (k.clone(), v))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

#[derive(Debug, Default)]
struct Sink(RefCell<Vec<ConfigError>>);

/// A table of the document, read key by key.
#[derive(Debug)]
pub struct Section<'a> {
    path: String,
    table: &'a toml::Table,
    used: RefCell<BTreeSet<String>>,
    sink: &'a Sink,
}

impl<'a> Section<'a> {
    fn new(path: String, table: &'a toml::Table, sink: &'a Sink) -> Self {
        Section { path, table, used: RefCell::default(), sink }
    }

    /// The dotted path of `key` in this section.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    /// Records a problem with `key` of this section.
    pub fn error(&self, key: &str, message: impl Into<String>) {
        self.sink.0.borrow_mut().push(ConfigError { path: self.path_of(key), message: message.into() });
    }

    fn take(&self, key: &str) -> Option<&'a toml::Value> {
        self.used.borrow_mut().insert(key.to_owned());
        self.table.get(key)
    }

    /// The value of an optional key; a value of the wrong type is recorded
    /// and reads as absent.
    pub fn get<T: FromConfig>(&self, key: &str) -> Option<T> {
        let value = self.take(key)?;
        match T::from_config(value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    /// The value of an optional key, or `default`.
    pub fn get_or<T: FromConfig>(&self, key: &str, default: T) -> T {
        self.get(key).unwrap_or(default)
    }

    /// The value of a required key; a missing key is recorded.
    pub fn require<T: FromConfig>(&self, key: &str) -> Option<T> {
        if !self.table.contains_key(key) {
            self.used.borrow_mut().insert(key.to_owned());
            self.error(key, "missing required key");
            return None;
        }
        self.get(key)
    }

    /// A sub-table; absent reads as empty. Call [`Section::finish`] on it.
    pub fn table(&self, key: &str) -> Section<'a> {
        static EMPTY: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(toml::Table::new);
        let table = match self.take(key) {
            None => empty,
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                self.error(key, format!("expected a table, found {}", other.type_str()));
                empty
            }
        };
        Section::new(self.path_of(key), table, self.sink)
    }

    /// An array of tables (`[[job]]` in TOML); absent reads as empty. Each
    /// element's path is `key[name]` when it has a string `name`, else
    /// `key[index]`, so errors point at the element an operator recognises.
    /// Call [`Section::finish`] on each.
    pub fn array(&self, key: &str) -> Vec<Section<'a>> {
        let items = match self.take(key) {
            None => return Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                self.error(key, format!("expected a list of tables, found {}", other.type_str()));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let label = match item.get("name").and_then(toml::Value::as_str) {
                Some(name) => format!("{}[{name}]", self.path_of(key)),
                None => format!("{}[{i}]", self.path_of(key)),
            };
            match item {
                toml::Value::Table(t) => out.push(Section::new(label, t, self.sink)),
                other => self.sink.0.borrow_mut().push(ConfigError {
                    path: label,
                    message: format!("expected a table, found {}", other.type_str()),
                }),
            }
        }
        out
    }

    /// True if the section has `key` (whether or not it was read).
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// This section's own path (`job[nightly]`), for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Records every key of this section that was never read as unknown.
    pub fn finish(&self) {
        let used = self.used.borrow();
        for key in self.table.keys().filter(|k| !used.contains(*k)) {
            self.error(key, "unknown key");
        }
    }

    /// Records `message` against `key` unless `ok`.
    pub fn check(&self, key: &str, ok: bool, message: &str) {
        if !ok {
            self.error(key, message);
        }
    }
}

/// A type a config value can be read as. The error is the message shown to
/// the operator.
pub trait FromConfig: Sized {
    /// Converts one TOML value.
    fn from_config(value: &toml::Value) -> Result<Self, String>;
}

/// `text` with the commented-out example table `header` (a line `# [header]`
/// and the `# key = value` lines after it, up to the next blank line)
/// switched on: how the reference configs' optional examples are checked.
pub fn uncomment_block(text: &str, header: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.lines() {
        inside = (inside && !line.trim().is_empty()) || line == format!("# {header}");
        match line.strip_prefix("# ") {
            Some(rest) if inside && (rest.starts_with('[') || rest.contains(" = ")) => out.push_str(rest),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Plain serde types (strings, numbers, booleans, lists, enums).
macro_rules! via_serde {
    ($($t:ty),*) => {$(
        impl FromConfig for $t {
            fn from_config(value: &toml::Value) -> Result<Self, String> {
                serde_value(value)
            }
        }
    )*};
}
via_serde!(String, bool, u8, u16, u32, u64, usize, i64, f64, Vec<String>, PathBuf, std::collections::BTreeMap<String, String>, std::net::SocketAddr);

fn serde_value<T: DeserializeOwned>(value: &toml::Value) -> Result<T, String> {
    value.clone().try_into().map_err(|e: toml::de::Error| e.message().to_owned())
}

/// The longest duration any setting accepts. Keys with a tighter meaning
/// check their own bound as well; this one keeps every duration that
/// reaches the daemons far from the range of clocks and timers.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Parses a humantime duration (`"30s"`, `"1h 30m"`) of at most `max`.
pub fn parse_duration(text: &str, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?} ({e}); write e.g. \"500ms\", \"30s\", \"5m\""))?;
    if d > max {
        let secs = max.as_secs();
        let most = if secs.is_multiple_of(86_400) {
            format!("{} days", secs / 86_400)
        } else {
            humantime::format_duration(max).to_string()
        };
        return Err(format!("{text:?} is too long: at most {most}"));
    }
    Ok(d)
}

/// Durations are written the humantime way: `"30s"`, `"5m"`, `"1h 30m"`;
/// at most [`MAX_DURATION`].
impl FromConfig for Duration {
    fn from_config(value: &toml::Value) -> Result<Self, String> {
        let text =
            value.as_str().ok_or_else(|| format!("expected a duration such as \"30s\", found {}", value.type_str()))?;
        parse_duration(text, MAX_DURATION)
    }
}

/// Sizes: a whole number of bytes, or a string with a unit (`"64 MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromConfig for ByteSize {
    fn from_config(value: &toml::Value) -> Result<Self, String> {
        if let Some(n) = value.as_integer() {
            return u64::try_from(n).map(ByteSize).map_err(|_| "a size cannot be negative".into());
        }
        let text =
            value.as_str().ok_or_else(|| format!("expected a size such as \"64 MiB\", found {}", value.type_str()))?;
        parse_size(text)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {text:?}; write e.g. 1048576, \"512 KiB\", \"64 MiB\", \"1 GiB\""))
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_lists_are_read_checked_and_ordered() {
        assert_eq!(hub_addresses(" a:1, b:2 ,,c:3"), ["a:1", "b:2", "c:3"]);
        assert!(check_hub_addresses("a:1,b:2").is_ok());
        assert!(check_hub_addresses("a:1,b").unwrap_err().contains("\"b\""));
        assert!(check_hub_addresses(" , ").is_err());
        let hubs = hub_addresses("a:1,b:2,c:3,d:4");
        for seed in 0..50 {
            let order = hub_order(&hubs, Some("c:3"), seed);
            assert_eq!(order[0], "c:3", "the hub that answered last comes first");
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, hubs, "every hub once");
        }
        let firsts: std::collections::HashSet<String> = (0..50).map(|s| hub_order(&hubs, None, s)[0].clone()).collect();
        assert_eq!(firsts.len(), 4, "devices spread over every hub");
        assert_eq!(hub_order(&hubs, Some("gone:9"), 3).len(), 4, "a preferred hub no longer listed is dropped");
    }

    #[derive(Debug)]
    struct Demo {
        name: Option<String>,
        timeout: Duration,
        hub: Option<String>,
        max: ByteSize,
    }

    fn build(root: &Section<'_>) -> Demo {
        let net = root.table("net");
        let demo = Demo {
            name: root.get("name"),
            timeout: net.get_or("timeout", Duration::from_secs(5)),
            hub: net.require("hub"),
            max: net.get_or("max", ByteSize(1)),
        };
        net.finish();
        demo
    }

    #[test]
    fn reads_a_good_document() {
        let text = "name = \"a\"\n[net]\nhub = \"h:1\"\ntimeout = \"1m 30s\"\nmax = \"2 MiB\"\n";
        let d = load_str(Path::new("x.toml"), text, build).unwrap();
        assert_eq!(d.name.as_deref(), Some("a"));
        assert_eq!(d.timeout, Duration::from_secs(90));
        assert_eq!(d.hub.as_deref(), Some("h:1"));
        assert_eq!(d.max, ByteSize(2 << 20));
    }

    #[test]
    fn reports_every_error_with_its_path() {
        let text = "nmae = \"a\"\nname = 5\n[net]\ntimeout = \"3 fortnights\"\nmax = \"big\"\n";
        let err = load_str(Path::new("x.toml"), text, build).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["name", "net.timeout", "net.hub", "net.max", "nmae"], "{err}");
        let shown = err.to_string();
        assert!(shown.starts_with("x.toml: 5 errors"), "{shown}");
        assert!(shown.contains("net.hub: missing required key"), "{shown}");
        assert!(shown.contains("nmae: unknown key"), "{shown}");
        assert!(shown.contains("invalid duration \"3 fortnights\""), "{shown}");
    }

    #[test]
    fn absurd_durations_are_refused_with_their_key() {
        let text = "[net]\nhub = \"h:1\"\ntimeout = \"9223372036854775813s\"\n";
        let err = load_str(Path::new("x.toml"), text, build).unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].path, "net.timeout");
        assert!(err.errors[0].message.contains("too long: at most 3650 days"), "{err}");
        let text = "[net]\nhub = \"h:1\"\ntimeout = \"3650days\"\n";
        assert!(load_str(Path::new("x.toml"), text, build).is_ok());
    }

    #[test]
    fn host_port_addresses_need_a_port() {
        for good in ["hub.example.com:7443", "10.0.0.1:1", "[::1]:7443"] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        for bad in ["hub.example.com", "hub:0", "hub:99999", ":7443", "::1:7443", "hub :7443"] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
        assert!(check_host_port("hub.example.com").unwrap_err().contains("has no port"));
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = load_str(Path::new("x.toml"), "name = ", build).unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert!(err.errors[0].message.contains("not valid TOML"));
    }
}
