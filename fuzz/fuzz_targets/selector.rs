//! A label selector as the API and the console take it (`env=prod,!retired`),
//! and an MQTT topic as the hub's bridge reads it: parsed or refused with a
//! reason, never a panic. A parsed selector is also matched against labels.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(selector) = outpost_hub::service::listing::Selector::parse(text) {
            let labels: std::collections::BTreeMap<String, String> =
                [("env".to_owned(), "prod".to_owned()), ("site".to_owned(), text.to_owned())].into_iter().collect();
            let _ = selector.matches(&labels);
        }
        let _ = outpost_shared::mqtt::parse_up_topic(text);
    }
});
